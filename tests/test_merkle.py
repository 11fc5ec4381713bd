"""RFC 6962 / RFC 9162 Merkle trees: published test vectors, proofs round-tripped for
every small tree, and the compact range the log writer keeps agreeing with the full tree.

The vectors are those of the Go reference code (transparency-dev/merkle
proof/verify_test.go, from certificate-transparency-go), which generated them for
RFC 6962.
"""

from __future__ import annotations

import hashlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ca.audit.merkle import (
    EMPTY_ROOT,
    CompactRange,
    Growth,
    MerkleTree,
    TreeHead,
    build_levels,
    growth,
    leaf_hash,
    leaf_hashes,
    needs_proof,
    node_hash,
    verify_consistency,
    verify_inclusion,
)

LEAVES = [bytes.fromhex(h) for h in (
    "", "00", "10", "2021", "3031", "40414243", "5051525354555657",
    "606162636465666768696a6b6c6d6e6f")]

# ROOTS[n] is the root of the first n leaves.
ROOTS = [bytes.fromhex(h) for h in (
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328")]


def _h(*hexes: str) -> list[bytes]:
    return [bytes.fromhex(h) for h in hexes]


# (leaf index, tree size, proof): the reference vectors use 1-based leaf numbers.
INCLUSION = [
    (0, 1, []),
    (0, 8, _h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
              "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
              "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4")),
    (5, 8, _h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
              "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
              "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7")),
    (2, 3, _h("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125")),
    (1, 5, _h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
              "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
              "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b")),
]

# (old size, new size, proof)
CONSISTENCY = [
    (1, 1, []),
    (1, 8, _h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
              "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
              "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4")),
    (6, 8, _h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
              "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
              "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7")),
    (2, 5, _h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
              "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b")),
    (6, 7, _h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
              "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
              "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7")),
]

SOME_HASH = bytes.fromhex("abacaba000000000000000000000000000000000000000000060061e00123456")


def reference_tree() -> MerkleTree:
    return MerkleTree(leaf_hash(leaf) for leaf in LEAVES)


def tree_of(n: int) -> tuple[MerkleTree, list[bytes]]:
    leaves = [leaf_hash(i.to_bytes(4, "big")) for i in range(n)]
    return MerkleTree(leaves), leaves


def naive_root(leaves: list[bytes]) -> bytes:
    """MTH straight from RFC 6962 section 2.1, as the oracle."""
    if not leaves:
        return EMPTY_ROOT
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return node_hash(naive_root(leaves[:k]), naive_root(leaves[k:]))


# ---- hashing and roots ----------------------------------------------------------------------


def test_hashes_are_domain_separated_as_rfc6962_says() -> None:
    assert hashlib.sha256(b"").digest() == EMPTY_ROOT
    assert leaf_hash(b"abc") == hashlib.sha256(b"\x00abc").digest()
    assert node_hash(b"L" * 32, b"R" * 32) == hashlib.sha256(b"\x01" + b"L" * 32 + b"R" * 32
                                                             ).digest()


def test_bulk_leaf_hashes_are_the_leaf_hashes() -> None:
    assert leaf_hashes(LEAVES) == b"".join(leaf_hash(leaf) for leaf in LEAVES)
    assert leaf_hashes([]) == b""


def test_growth_says_how_a_newer_tree_relates_to_an_older_one() -> None:
    """The one "extends" rule the writer, the verifiers and the witnesses share."""
    tree = MerkleTree(leaf_hash(leaf) for leaf in LEAVES)
    forked = MerkleTree(leaf_hash(leaf) for leaf in [*LEAVES[:3], b"forged", *LEAVES[4:]])
    for old in range(len(LEAVES) + 1):
        for new in range(len(LEAVES) + 1):
            old_head, new_head = TreeHead(old, ROOTS[old]), TreeHead(new, ROOTS[new])
            proof = tree.consistency_proof(old, new) if old <= new else []
            assert needs_proof(old_head, new_head) == (0 < old < new)
            want = (Growth.SHRANK if new < old else Growth.SAME if new == old
                    else Growth.EXTENDS)
            assert growth(old_head, new_head, proof) is want, (old, new)
            if new >= old > 3:  # leaf 3 differs in the forked tree
                fork = TreeHead(new, forked.root(new))
                fork_proof = forked.consistency_proof(old, new)
                assert growth(old_head, fork, fork_proof) is Growth.FORKED, (old, new)
    # A proof is only taken when one is needed: the same tree needs none and gets none.
    assert growth(TreeHead(5, ROOTS[5]), TreeHead(5, ROOTS[5]), [b"x" * 32]) is Growth.SAME
    assert growth(TreeHead(5, ROOTS[5]), TreeHead(5, ROOTS[4]), []) is Growth.FORKED
    assert growth(TreeHead(5, ROOTS[5]), TreeHead(7, ROOTS[7]), []) is Growth.FORKED  # no proof


def test_roots_match_the_reference_vectors_for_every_prefix() -> None:
    tree = reference_tree()
    for size, root in enumerate(ROOTS):
        assert tree.root(size) == root, size
    assert tree.root() == ROOTS[8]
    assert MerkleTree().root() == ROOTS[0]


def test_compact_range_matches_the_reference_vectors() -> None:
    cr = CompactRange()
    assert cr.root() == ROOTS[0]
    for n, leaf in enumerate(LEAVES, start=1):
        cr.append(leaf_hash(leaf))
        assert cr.size == n
        assert cr.root() == ROOTS[n]


# ---- the reference proofs -------------------------------------------------------------------


@pytest.mark.parametrize(("index", "size", "proof"), INCLUSION)
def test_inclusion_vectors_are_produced_and_verified(index: int, size: int,
                                                     proof: list[bytes]) -> None:
    tree = reference_tree()
    leaf = leaf_hash(LEAVES[index])
    assert tree.inclusion_proof(index, size) == proof
    assert verify_inclusion(leaf, index, size, proof, ROOTS[size])


@pytest.mark.parametrize(("old", "size", "proof"), CONSISTENCY)
def test_consistency_vectors_are_produced_and_verified(old: int, size: int,
                                                       proof: list[bytes]) -> None:
    tree = reference_tree()
    assert tree.consistency_proof(old, size) == proof
    assert verify_consistency(old, size, ROOTS[old], ROOTS[size], proof)


@pytest.mark.parametrize(("index", "size", "proof"), [v for v in INCLUSION if v[2]])
def test_corrupted_inclusion_proofs_are_refused(index: int, size: int,
                                                proof: list[bytes]) -> None:
    # The probes of the Go reference tests: every one of them must fail.
    leaf, root = leaf_hash(LEAVES[index]), ROOTS[size]
    probes = [
        (index - 1, size, leaf, proof, root), (index + 1, size, leaf, proof, root),
        (index ^ 2, size, leaf, proof, root), (index, size * 2, leaf, proof, root),
        (index, size // 2, leaf, proof, root), (index, size, leaf_hash(b"WrongLeaf"), proof, root),
        (index, size, leaf, proof, EMPTY_ROOT), (index, size, leaf, proof, SOME_HASH),
        (index, size, leaf, [*proof, b""], root), (index, size, leaf, [*proof, root], root),
        (index, size, leaf, [b"", *proof], root), (index, size, leaf, [root, *proof], root),
        (index, size, leaf, proof[:-1], root),
    ]
    for i in range(len(proof)):
        flipped = list(proof)
        flipped[i] = bytes([proof[i][0] ^ 8]) + proof[i][1:]
        probes.append((index, size, leaf, flipped, root))
    if len(proof) > 1:
        probes.append((index, size, leaf, [proof[0], SOME_HASH, *proof[1:]], root))
    for i, s, lf, p, r in probes:
        assert not verify_inclusion(lf, i, s, p, r), (i, s)


@pytest.mark.parametrize(("old", "size", "proof"), [v for v in CONSISTENCY if v[2]])
def test_corrupted_consistency_proofs_are_refused(old: int, size: int,
                                                  proof: list[bytes]) -> None:
    r1, r2 = ROOTS[old], ROOTS[size]
    probes = [
        (old - 1, size, r1, r2, proof), (old + 1, size, r1, r2, proof),
        (old ^ 2, size, r1, r2, proof), (old, size * 2, r1, r2, proof),
        (old, size // 2, r1, r2, proof), (old, size, SOME_HASH, r2, proof),
        (old, size, r1, SOME_HASH, proof), (old, size, r2, r1, proof),
        (old, size, r1, r2, []), (old, size, r1, r2, [*proof, b""]),
        (old, size, r1, r2, [*proof, r1]), (old, size, r1, r2, [*proof, r2]),
        (old, size, r1, r2, [b"", *proof]), (old, size, r1, r2, [r1, *proof]),
        (old, size, r1, r2, [r2, *proof]), (old, size, r1, r2, [proof[0], *proof]),
        (old, size, r1, r2, proof[:-1]),
    ]
    for i in range(len(proof)):
        flipped = list(proof)
        flipped[i] = bytes([proof[i][0] ^ 16]) + proof[i][1:]
        probes.append((old, size, r1, r2, flipped))
    for o, s, a, b, p in probes:
        assert not verify_consistency(o, s, a, b, p), (o, s)


def test_trivial_consistency_cases() -> None:
    root = ROOTS[3]
    assert verify_consistency(3, 3, root, root, [])
    assert not verify_consistency(3, 3, root, ROOTS[4], [])
    assert not verify_consistency(3, 3, root, root, [root])
    assert verify_consistency(0, 5, EMPTY_ROOT, ROOTS[5], [])
    assert not verify_consistency(0, 5, SOME_HASH, ROOTS[5], [])  # size 0 has one root
    assert not verify_consistency(0, 5, EMPTY_ROOT, ROOTS[5], [EMPTY_ROOT])
    assert not verify_consistency(4, 3, ROOTS[4], ROOTS[3], [])  # time travel
    assert not verify_inclusion(leaf_hash(b""), 0, 0, [], EMPTY_ROOT)


# ---- every small tree, round trip -----------------------------------------------------------


def test_every_inclusion_proof_up_to_40_leaves_round_trips() -> None:
    tree, leaves = tree_of(40)
    roots = [naive_root(leaves[:n]) for n in range(41)]
    for size in range(1, 41):
        assert tree.root(size) == roots[size]
        for index in range(size):
            proof = tree.inclusion_proof(index, size)
            assert verify_inclusion(leaves[index], index, size, proof, roots[size])
            assert not verify_inclusion(leaves[index], index, size, proof, roots[size - 1])
            other = (index + 1) % size
            if other != index:
                assert not verify_inclusion(leaves[other], index, size, proof, roots[size])


def test_every_consistency_proof_up_to_40_leaves_round_trips() -> None:
    tree, leaves = tree_of(40)
    roots = [naive_root(leaves[:n]) for n in range(41)]
    for size in range(41):
        for old in range(size + 1):
            proof = tree.consistency_proof(old, size)
            assert verify_consistency(old, size, roots[old], roots[size], proof), (old, size)
            if 0 < old < size:
                assert not verify_consistency(old, size, roots[old - 1], roots[size], proof)
                assert not verify_consistency(old, size, roots[old], roots[size - 1], proof)


def test_proof_arguments_out_of_range_are_errors() -> None:
    tree, _ = tree_of(5)
    with pytest.raises(ValueError):
        tree.inclusion_proof(5, 5)
    with pytest.raises(ValueError):
        tree.inclusion_proof(0, 6)
    with pytest.raises(ValueError):
        tree.consistency_proof(6, 5)
    with pytest.raises(ValueError):
        tree.root(6)
    with pytest.raises(ValueError):
        tree.append(b"short")


# ---- compact range and bulk building --------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=600), st.integers(min_value=0, max_value=2**32))
def test_compact_range_root_equals_full_tree_root(size: int, salt: int) -> None:
    leaves = [leaf_hash(f"{salt}:{i}".encode()) for i in range(size)]
    cr = CompactRange()
    tree = MerkleTree()
    for leaf in leaves:
        cr.append(leaf)
        tree.append(leaf)
    assert cr.root() == tree.root() == MerkleTree.from_leaf_hashes(b"".join(leaves)).root()
    assert len(cr.hashes) == size.bit_count()  # O(log n) memory
    assert CompactRange.from_hashes(size, cr.hashes).root() == cr.root()


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 300), st.integers(0, 2**32))
def test_a_trees_compact_range_is_the_one_built_leaf_by_leaf(size: int, salt: int) -> None:
    leaves = [leaf_hash(f"{salt}:{i}".encode()) for i in range(size + 5)]
    tree = MerkleTree.from_leaf_hashes(b"".join(leaves))
    cr = CompactRange()
    for leaf in leaves[:size]:
        cr.append(leaf)
    got = tree.compact_range(size)
    assert (got.size, got.hashes, got.root()) == (size, cr.hashes, tree.root(size))
    got.append(leaves[size])  # and it goes on growing as the tree does
    assert got.root() == tree.root(size + 1)


def test_compact_range_copy_is_independent() -> None:
    cr = CompactRange()
    for i in range(5):
        cr.append(leaf_hash(bytes([i])))
    five = cr.root()
    snapshot = cr.copy()
    cr.append(leaf_hash(b"more"))
    assert snapshot.size == 5 and cr.size == 6
    assert snapshot.root() == five != cr.root()
    with pytest.raises(ValueError):
        CompactRange.from_hashes(7, cr.hashes)  # 7 leaves have 3 perfect subtrees, 6 have 2


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=0, max_value=300), st.integers(min_value=0, max_value=5))
def test_trees_built_from_chunked_levels_equal_incremental_trees(size: int, height: int) -> None:
    # How the verifier's workers build the tree: levels over aligned chunks, joined.
    leaves = [leaf_hash(i.to_bytes(2, "big")) for i in range(size)]
    chunk = 1 << height
    parts = [build_levels(b"".join(leaves[i:i + chunk]), height)
             for i in range(0, size, chunk)] or [[b""]]
    depth = min(len(p) for p in parts)
    joined = MerkleTree.from_levels([b"".join(p[k] for p in parts) for k in range(depth)])
    incremental = MerkleTree(leaves)
    for n in range(size + 1):
        assert joined.root(n) == incremental.root(n)
    assert joined.root() == naive_root(leaves)
    joined.append(leaf_hash(b"next"))  # still appendable after bulk construction
    incremental.append(leaf_hash(b"next"))
    assert joined.root() == incremental.root()


def test_levels_of_the_wrong_shape_are_refused() -> None:
    leaves = b"".join(leaf_hash(bytes([i])) for i in range(5))
    with pytest.raises(ValueError):
        MerkleTree.from_levels([leaves, b"\x00" * 32])  # 5 leaves make 2 pairs
    with pytest.raises(ValueError):
        MerkleTree.from_leaf_hashes(leaves[:-1])


def test_a_million_leaf_tree_gives_small_proofs() -> None:
    # Proofs come from cached subtree roots: O(log n) hashes, not a re-hash of the tree.
    n = 1 << 20
    leaves = os.urandom(32 * n)
    tree = MerkleTree.from_leaf_hashes(leaves)
    root = tree.root()
    for index in (0, 1, 12345, n - 1):
        proof = tree.inclusion_proof(index)
        assert len(proof) == 20
        leaf = leaves[index * 32:(index + 1) * 32]
        assert verify_inclusion(leaf, index, n, proof, root)
    old = 999_999
    assert verify_consistency(old, n, tree.root(old), root, tree.consistency_proof(old))

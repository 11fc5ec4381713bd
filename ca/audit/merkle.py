"""RFC 6962 / RFC 9162 Merkle trees over the audit log's lines.

Leaf hash ``SHA-256(0x00 || line)``, node hash ``SHA-256(0x01 || left || right)``,
the empty tree's root is ``SHA-256(b"")``. A tree of n leaves splits at the largest
power of two k < n: ``MTH(D[n]) = node(MTH(D[0:k]), MTH(D[k:n]))``.

Two shapes are kept in memory:

* `CompactRange` holds only the roots of the perfect subtrees that make up the
  tree (one per set bit of its size). The log writer keeps one, so appending is
  O(1) amortised and the root is O(log n), and it never re-hashes the log.
* `MerkleTree` keeps every complete subtree root, level by level, so the root of
  any prefix and any inclusion or consistency proof costs O(log n) hashes. Each
  level is one flat bytearray (32 bytes per node): a million leaves cost about
  64 MB instead of the ~150 MB a list of bytes objects would. The auditor's
  verifier uses it.
* `SubtreeHashes`, its base, computes roots and proofs from any source of subtree
  roots; `ca.audit.tiles.TiledTree` is the log writer's, read from C2SP tiles.

The verification functions follow RFC 9162 sections 2.1.3.2 and 2.1.4.2 and use
nothing but their arguments, so an auditor can check proofs without a tree.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable, Sequence
from typing import NamedTuple

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

_sha256 = hashlib.sha256
# RFC 6962 hashes a leaf as SHA-256(0x00 || leaf) and an interior node as
# SHA-256(0x01 || left || right). Hashing goes on from a copy of these prefix
# states, which spares building a concatenated bytes object per hash.
_LEAF_PREFIX = _sha256(b"\x00")
_NODE_PREFIX = _sha256(b"\x01")


def leaf_hash(line: bytes) -> bytes:
    """The RFC 6962 hash of one leaf (for the audit log: a line without its newline)."""
    h = _LEAF_PREFIX.copy()
    h.update(line)
    return h.digest()


def leaf_hashes(lines: Iterable[bytes]) -> bytes:
    """`leaf_hash` of each line, concatenated (what `build_levels` takes)."""
    new_leaf = _LEAF_PREFIX.copy
    out: list[bytes] = []
    append = out.append
    for line in lines:
        h = new_leaf()
        h.update(line)
        append(h.digest())
    return b"".join(out)


def node_hash(left: bytes, right: bytes) -> bytes:
    """The RFC 6962 hash of an interior node."""
    h = _NODE_PREFIX.copy()
    h.update(left)
    h.update(right)
    return h.digest()


def _check_hash(value: bytes, what: str = "leaf hash") -> bytes:
    if not isinstance(value, bytes | bytearray) or len(value) != HASH_SIZE:
        raise ValueError(f"a {what} must be {HASH_SIZE} bytes")
    return bytes(value)


def _split(n: int) -> int:
    """The largest power of two strictly below n (n >= 2): where RFC 6962 splits."""
    return 1 << ((n - 1).bit_length() - 1)


def build_levels(leaves: bytes, height: int | None = None) -> list[bytes]:
    """Levels 0..height of complete subtree roots over concatenated leaf hashes.

    Level k + 1 hashes adjacent pairs of level k; an odd last node waits for its
    sibling. Stops when a level has one node (or at `height`).
    """
    if len(leaves) % HASH_SIZE:
        raise ValueError(f"leaf hashes must be a multiple of {HASH_SIZE} bytes")
    levels = [leaves]
    level = leaves
    # A plain loop, a node per step: the pair is fed as one slice of the level.
    new_node = _NODE_PREFIX.copy
    while len(level) >= 2 * HASH_SIZE and (height is None or len(levels) <= height):
        pairs = len(level) // (2 * HASH_SIZE) * 2 * HASH_SIZE
        nodes: list[bytes] = []
        append = nodes.append
        for i in range(0, pairs, 2 * HASH_SIZE):
            node = new_node()
            node.update(level[i:i + 2 * HASH_SIZE])
            append(node.digest())
        level = b"".join(nodes)
        levels.append(level)
    return levels


class CompactRange:
    """The right-hand frontier of a Merkle tree: enough to append and to get the root.

    ``hashes[i]`` is the root of a perfect subtree; their sizes are the set bits of
    `size`, largest (leftmost) first.
    """

    __slots__ = ("_hashes", "_size")

    def __init__(self) -> None:
        self._size = 0
        self._hashes: list[bytes] = []

    @classmethod
    def from_hashes(cls, size: int, hashes: Sequence[bytes]) -> CompactRange:
        """Rebuild a range saved with `size` and `hashes` (e.g. from a snapshot)."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError("size must be a non-negative integer")
        if len(hashes) != size.bit_count():
            raise ValueError(f"a tree of {size} leaves has {size.bit_count()} frontier hashes, "
                             f"got {len(hashes)}")
        cr = cls()
        cr._size = size
        cr._hashes = [_check_hash(h, "frontier hash") for h in hashes]
        return cr

    @property
    def size(self) -> int:
        return self._size

    @property
    def hashes(self) -> tuple[bytes, ...]:
        return tuple(self._hashes)

    def append(self, leaf: bytes) -> None:
        """Add one leaf hash (see `leaf_hash`)."""
        h = _check_hash(leaf)
        # Each trailing 1 bit of the old size is a perfect subtree the new leaf completes.
        n = self._size
        hashes = self._hashes
        while n & 1:
            h = node_hash(hashes.pop(), h)
            n >>= 1
        hashes.append(h)
        self._size += 1

    def root(self) -> bytes:
        if not self._hashes:
            return EMPTY_ROOT
        # RFC 6962 nests the smaller subtrees on the right, so fold from the right.
        h = self._hashes[-1]
        for left in reversed(self._hashes[:-1]):
            h = node_hash(left, h)
        return h

    def copy(self) -> CompactRange:
        cr = CompactRange()
        cr._size = self._size
        cr._hashes = list(self._hashes)
        return cr

    def __repr__(self) -> str:
        return f"CompactRange(size={self._size})"


class SubtreeHashes:
    """Roots, compact ranges and RFC 6962 proofs of a tree whose complete subtrees a
    subclass can look up (`_node`). RFC 6962's recursion only ever asks for ranges
    that start at a multiple of the smallest power of two >= their width, so every
    left part is a perfect subtree and only the right border needs hashing: each
    answer costs O(log n) look-ups.

    `MerkleTree` holds every subtree root in memory; `ca.audit.tiles.TiledTree` reads
    them from C2SP tiles, so the log writer needs no more memory for a large log.
    """

    __slots__ = ()

    @property
    def size(self) -> int:
        raise NotImplementedError

    def _node(self, level: int, index: int) -> bytes:
        """The root of the perfect subtree of 2**level leaves starting at index << level."""
        raise NotImplementedError

    def root(self, size: int | None = None) -> bytes:
        """Root of the first `size` leaves (default: all of them)."""
        size = self._check_size(size)
        return self._mth(0, size) if size else EMPTY_ROOT

    def compact_range(self, size: int | None = None) -> CompactRange:
        """The compact range of the first `size` leaves (default: all of them): what
        appending to that prefix needs, without the tree."""
        size = self._check_size(size)
        hashes: list[bytes] = []
        lo = 0
        for level in range(size.bit_length() - 1, -1, -1):  # the largest subtree first
            if size >> level & 1:
                hashes.append(self._node(level, lo >> level))
                lo += 1 << level
        return CompactRange.from_hashes(size, hashes)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """RFC 6962 PATH(index, D[0:size]), leaf-side sibling first."""
        size = self._check_size(size)
        if not 0 <= index < size:
            raise ValueError(f"leaf index {index} is outside a tree of {size} leaves")
        proof: list[bytes] = []
        lo, hi = 0, size
        while hi - lo > 1:
            k = _split(hi - lo)
            if index < lo + k:
                proof.append(self._mth(lo + k, hi))
                hi = lo + k
            else:
                proof.append(self._mth(lo, lo + k))
                lo += k
        proof.reverse()
        return proof

    def consistency_proof(self, old: int, size: int | None = None) -> list[bytes]:
        """RFC 6962 PROOF(old, D[0:size]); empty when old is 0 or equals size."""
        size = self._check_size(size)
        if not 0 <= old <= size:
            raise ValueError(f"old size {old} is not between 0 and {size}")
        if old in (0, size):
            return []
        proof: list[bytes] = []
        lo, hi, m, whole = 0, size, old, True  # whole: SUBPROOF's b flag
        while m != hi - lo:
            k = _split(hi - lo)
            if m <= k:
                proof.append(self._mth(lo + k, hi))
                hi = lo + k
            else:
                proof.append(self._mth(lo, lo + k))
                lo += k
                m -= k
                whole = False
        if not whole:
            proof.append(self._mth(lo, hi))
        proof.reverse()
        return proof

    def _check_size(self, size: int | None) -> int:
        if size is None:
            return self.size
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= self.size:
            raise ValueError(f"size {size!r} is not between 0 and {self.size}")
        return size

    def _mth(self, lo: int, hi: int) -> bytes:
        """MTH(D[lo:hi]) for the ranges RFC 6962 recursion produces (see the class)."""
        n = hi - lo
        if n & (n - 1) == 0:
            level = n.bit_length() - 1
            return self._node(level, lo >> level)
        k = _split(n)
        return node_hash(self._mth(lo, lo + k), self._mth(lo + k, hi))


class MerkleTree(SubtreeHashes):
    """Every leaf hash plus every complete subtree root, for prefix roots and proofs.

    ``_levels[k]`` concatenates the roots of the aligned perfect subtrees of 2**k
    leaves, left to right; level 0 is the leaf hashes themselves.
    """

    __slots__ = ("_levels", "_size")

    def __init__(self, leaves: Iterable[bytes] = ()) -> None:
        self._size = 0
        self._levels: list[bytearray] = [bytearray()]
        for leaf in leaves:
            self.append(leaf)

    @classmethod
    def from_leaf_hashes(cls, leaves: bytes | bytearray | memoryview) -> MerkleTree:
        """Build from concatenated 32-byte leaf hashes, one bulk pass per level.

        Much faster than appending one by one.
        """
        return cls.from_levels(build_levels(bytes(leaves)))

    @classmethod
    def from_levels(cls, levels: Sequence[bytes]) -> MerkleTree:
        """Build from the lower levels as `build_levels` returns them (level 0 first).

        Lets a caller hash aligned chunks of leaves in parallel and join the levels;
        the levels above the highest one given are computed here.
        """
        if not levels:
            raise ValueError("at least level 0 (the leaf hashes) is needed")
        size, extra = divmod(len(levels[0]), HASH_SIZE)
        if extra:
            raise ValueError(f"leaf hashes must be a multiple of {HASH_SIZE} bytes")
        for k, level in enumerate(levels):
            if len(level) != (size >> k) * HASH_SIZE:
                raise ValueError(f"level {k} of a {size}-leaf tree must hold {size >> k} "
                                 f"hashes, not {len(level) / HASH_SIZE:g}")
        tree = cls()
        tree._size = size
        tree._levels = [bytearray(level) for level in levels]
        tree._levels += [bytearray(level) for level in build_levels(bytes(levels[-1]))[1:]]
        while len(tree._levels) > 1 and not tree._levels[-1]:
            tree._levels.pop()  # levels given for a bigger tree than this one
        return tree

    @property
    def size(self) -> int:
        return self._size

    def append(self, leaf: bytes) -> None:
        """Add one leaf hash and every subtree root it completes (O(1) amortised)."""
        levels = self._levels
        levels[0] += _check_hash(leaf)
        self._size += 1
        k = 0
        while len(levels[k]) % (2 * HASH_SIZE) == 0:  # an even count: a new pair is complete
            level = levels[k]
            parent = node_hash(bytes(level[-64:-32]), bytes(level[-32:]))
            k += 1
            if k == len(levels):
                levels.append(bytearray())
            levels[k] += parent

    def _node(self, level: int, index: int) -> bytes:
        start = index * HASH_SIZE
        return bytes(self._levels[level][start:start + HASH_SIZE])

    def __repr__(self) -> str:
        return f"MerkleTree(size={self._size})"


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes],
                     root: bytes) -> bool:
    """RFC 9162 2.1.3.2: does `proof` show leaf `index` of a `size`-leaf tree under `root`?"""
    if not 0 <= index < size or not _all_hashes(leaf, root, *proof):
        return False
    fn, sn = index, size - 1
    r = leaf
    for p in proof:
        if sn == 0:
            return False  # more proof than tree
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(old: int, size: int, old_root: bytes, new_root: bytes,
                       proof: Sequence[bytes]) -> bool:
    """RFC 9162 2.1.4.2: is the `size`-leaf tree under `new_root` an append-only
    extension of the `old`-leaf tree under `old_root`?

    The trivial cases the RFC leaves out: equal sizes need equal roots and an
    empty proof; from size 0 the old root must be the empty tree's and the proof
    empty.
    """
    if not 0 <= old <= size or not _all_hashes(old_root, new_root, *proof):
        return False
    if old == size:
        return not proof and old_root == new_root
    if old == 0:
        return not proof and old_root == EMPTY_ROOT
    if not proof:
        return False
    path = list(proof)
    if old & (old - 1) == 0:  # the old tree is itself a perfect subtree of the new one
        path.insert(0, old_root)
    fn, sn = old - 1, size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root


class TreeHead(NamedTuple):
    """A tree as a checkpoint (or an auditor's state) names it: its size and root."""

    size: int
    root: bytes


class Growth(enum.Enum):
    """How a newer tree head relates to an older one (see `growth`)."""

    SAME = "same"  # the same size and root
    EXTENDS = "extends"  # more leaves, and the proof shows the old tree is their prefix
    SHRANK = "shrank"  # fewer leaves: the log was cut
    FORKED = "forked"  # the old tree is not a prefix of the new one: the log was rewritten


def needs_proof(old: TreeHead, new: TreeHead) -> bool:
    """Whether `growth(old, new, proof)` needs a consistency proof (else it takes [])."""
    return 0 < old.size < new.size


def growth(old: TreeHead, new: TreeHead, proof: Sequence[bytes]) -> Growth:
    """The one "this checkpoint extends that one" rule, for every party that holds an
    older tree head and is shown a newer one: the log's writer at start-up, the
    verifiers, a witness.

    `proof` is the RFC 9162 consistency proof from `old.size` to `new.size` when
    `needs_proof` says so, and is ignored otherwise. A holder of the whole tree
    passes its own `MerkleTree.consistency_proof`.
    """
    if new.size < old.size:
        return Growth.SHRANK
    if new.size == old.size:
        return Growth.SAME if new.root == old.root else Growth.FORKED
    ok = verify_consistency(old.size, new.size, old.root, new.root,
                            proof if needs_proof(old, new) else [])
    return Growth.EXTENDS if ok else Growth.FORKED


def _all_hashes(*values: bytes) -> bool:
    return all(isinstance(v, bytes) and len(v) == HASH_SIZE for v in values)

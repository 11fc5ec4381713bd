"""The audit log's Merkle tree as C2SP tiles (c2sp.org/tlog-tiles): kept beside the log
through batches, restarts and crashes; checked at start (a damaged or disagreeing
tile directory refuses the start, a missing one is built again); served by a real
daemon, where tile 0/000 is the RFC 6962 leaf hashes of the first 256 lines and a
tile client written here from the specification proves an entry's inclusion from
tiles alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ca.audit.log import AuditLog, AuditLogError
from ca.audit.merkle import MerkleTree, leaf_hash
from ca.audit.note import verify_checkpoint
from ca.audit.tiles import (
    FileTileStore,
    TiledTree,
    entry_bundle,
    index_path,
    parse_tile_path,
    tile_path,
)
from hsm.errors import AuditUnavailable
from tests.conftest import Daemon, init_ca, start_daemon
from tests.helpers import enroll, http
from tests.test_audit_remote import _audit_key, get, path, verify_inclusion

# ---- paths and shapes ------------------------------------------------------------------


def test_tile_paths_are_those_of_the_specification() -> None:
    assert index_path(1234067) == "x001/x234/067"
    assert tile_path(0, 0) == "tile/0/000"
    assert tile_path(2, 1234067, 112) == "tile/2/x001/x234/067.p/112"
    assert parse_tile_path("0/x001/x234/067.p/5") == (0, 1234067, 5)
    assert parse_tile_path("entries/000") == (None, 0, 256)
    assert parse_tile_path("63/999.p/255") == (63, 999, 255)
    for bad in ("0/00", "0/0000", "0/x000/001", "64/000", "01/000", "0/000.p/0",
                "0/000.p/256", "0/000.p/07", "0/001/002", "x/000", "entries", "0/000.p"):
        with pytest.raises(ValueError):
            parse_tile_path(bad)


def test_a_tree_of_70000_leaves_has_the_tiles_the_specification_lists(tmp_path: Path) -> None:
    """c2sp.org/tlog-tiles: "273 full level 0 tiles, one partial level 0 tile of width
    112, one full level 1 tile, one partial level 1 tile of width 17, and one partial
    level 2 tile of width 1"."""
    store = FileTileStore(tmp_path, create=True)
    tree = TiledTree(store)
    for i in range(70000):
        tree.append(leaf_hash(b"%d" % i))
    assert tree.read_tile(0, 272) is not None and tree.read_tile(0, 273) is None
    assert tree.read_tile(0, 273, 112) is not None and tree.read_tile(0, 273, 113) is None
    assert tree.read_tile(1, 0) is not None and tree.read_tile(1, 1) is None
    assert tree.read_tile(1, 1, 17) is not None and tree.read_tile(1, 1, 18) is None
    assert tree.read_tile(2, 0, 1) is not None and tree.read_tile(2, 0, 2) is None
    assert tree.read_tile(3, 0, 1) is None


# ---- the writer's tiles ---------------------------------------------------------------------


def fill(log: AuditLog, rng: random.Random, lines: int) -> None:
    """Appends in group commits of random sizes, lines of random lengths."""
    done = 0
    while done < lines:
        n = min(rng.randint(1, 90), lines - done)
        futs = log.append_durable([("test.line", {"n": done + k, "pad": "x" * rng.randint(0, 80)})
                                   for k in range(n)])
        assert all(f.exception() is None for f in futs)
        done += n


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def agrees(log: AuditLog, lines: list[bytes], rng: random.Random) -> None:
    """Root, proofs, tiles, entries and pages of lines, as the whole tree would give them."""
    ref = MerkleTree(leaf_hash(line) for line in lines)
    n = len(lines)
    assert log.root() == (n, ref.root())
    for size in sorted({1, 255, 256, 257, 511, 512, 513, n, *rng.sample(range(1, n + 1), 6)}):
        if size > n:
            continue
        assert log.root() == (n, ref.root())
        index = rng.randrange(size)
        assert log.inclusion_proof(index, size) == ref.inclusion_proof(index, size)
        old = rng.randint(1, size)
        assert log.consistency_proof(old, size) == ref.consistency_proof(old, size)
    for start in (0, 1, 255, 256, 300, n - 2, rng.randrange(n)):
        assert log.read_lines(start, 70) == b"".join(line + b"\n"
                                                     for line in lines[start:start + 70])
    leaves = [leaf_hash(line) for line in lines]
    for index in range(n // 256 + 1):
        for width in (1, 17, 255, 256):
            first = index * 256
            if first + width > n:
                assert log.read_entries(index, width) is None
                assert log.read_tile(0, index, width) is None
                continue
            assert log.read_entries(index, width) == entry_bundle(lines[first:first + width])
            assert log.read_tile(0, index, width) == b"".join(leaves[first:first + width])


def test_the_log_and_its_tiles_agree_through_batches_and_restarts(tmp_path: Path) -> None:
    rng = random.Random(19)
    path_ = tmp_path / "log.jsonl"
    for _ in range(3):
        log = AuditLog.open(path_)
        fill(log, rng, 400)
        agrees(log, lines_of(path_), rng)
        log.close()
    log = AuditLog.open(path_)
    try:
        agrees(log, lines_of(path_), rng)
    finally:
        log.close()
    bundles = (tmp_path / "tiles" / "bundles").read_bytes()
    ends = [int.from_bytes(bundles[i:i + 8], "big") for i in range(0, len(bundles), 8)]
    data = path_.read_bytes()
    assert ends == [len(b"".join(line + b"\n" for line in lines_of(path_)[:256 * (k + 1)]))
                    for k in range(len(ends))]
    assert len(ends) == 1200 // 256 and all(data[end - 1:end] == b"\n" for end in ends)


def test_start_reads_only_what_the_tiles_do_not_hold(tmp_path: Path) -> None:
    """Lines under full tiles, except the last bundle, are not read at start (the
    auditors' verification reads them): here one is made unparseable, and the log
    still opens. Damage at the edge, which start does read, is refused."""
    path_ = tmp_path / "log.jsonl"
    log = AuditLog.open(path_)
    fill(log, random.Random(1), 900)
    log.close()
    data = path_.read_bytes()
    lines = lines_of(path_)
    early = data.index(lines[10])
    path_.write_bytes(data[:early] + b"#" * len(lines[10]) + data[early + len(lines[10]):])
    AuditLog.open(path_).close()
    edge = data.index(lines[700])  # in the last full bundle (512..767)
    path_.write_bytes(data[:edge] + b"#" + data[edge + 1:])
    with pytest.raises(AuditLogError, match=r"lines 512 to 767 .* no longer match its tiles"
                       ) as refused:
        AuditLog.open(path_)
    # and the way on when the log verifies (an auditor trial was left at "run audit verify")
    assert "if it passes, the tiles are at fault" in str(refused.value)
    assert "move them aside and start again" in str(refused.value)


def rewritten(tmp_path: Path, rng: random.Random, size: int, seq: int
              ) -> tuple[Path, bytes, int]:
    """A log of `size` lines whose line `seq` was then rewritten in place, at the same
    length: the log, the line as written, and where it starts in the file."""
    path_ = tmp_path / "log.jsonl"
    log = AuditLog.open(path_)
    fill(log, rng, size)
    log.close()
    original = lines_of(path_)[seq]
    at = path_.read_bytes().index(original)
    with path_.open("r+b") as f:
        f.seek(at + len(original) // 2)
        f.write(b"X")
    return path_, original, at


def test_a_line_rewritten_under_the_tiles_stops_signing_until_it_is_put_back(
        tmp_path: Path) -> None:
    """What start-up does not read, the daemon reads again in the background
    (`check_on_disk`, a few bundles per call): a line rewritten in place, at the same
    length, passed the start and was served as the log's (auditor trial, H3). Once
    found, nothing is written (the caller hears which line and why) until it is back."""
    # 19 full bundles; line 4500 is in bundle 17: not the last full one, which start reads
    path_, original, at = rewritten(tmp_path, random.Random(2), 5000, 4500)
    log = AuditLog.open(path_)
    try:
        assert log.healthy
        assert log.check_on_disk(0) == 16 and log.damaged_seq is None  # bundles 0 to 15
        log.check_on_disk(16)
        assert log.damaged_seq == 4500 and not log.healthy
        assert "line 4500 of the audit log" in (log.problem or "")
        [refused] = log.append_durable([("test.line", {"n": -1})])
        with pytest.raises(AuditUnavailable, match=r"line 4500 of the audit log .* no longer "
                                                   r"hashes to its leaf .* rewritten on disk"):
            refused.result()
        assert len(lines_of(path_)) == 5000
        with path_.open("r+b") as f:  # put back, in place
            f.seek(at)
            f.write(original)
        log.check_on_disk(16)
        assert log.damaged_seq is None
        [written] = log.append_durable([("test.line", {"n": 5000})])
        assert written.result() == 5001 and log.healthy
        resumed = json.loads(lines_of(path_)[5000])  # the outage, in the log itself
        assert resumed["event"] == "log.resume" and "line 4500" in resumed["after"], resumed
    finally:
        log.close()


def test_a_line_put_back_before_any_write_still_leaves_its_outage_in_the_log(
        tmp_path: Path) -> None:
    """A web view trial rewrote a line and put it back within a second: the daemon
    found it and stopped signing, no write was refused meanwhile, and the log itself
    kept no trace of it (no log.resume line), only the daemon's stderr did."""
    path_, original, at = rewritten(tmp_path, random.Random(3), 5000, 4500)
    log = AuditLog.open(path_)
    try:
        log.check_on_disk(16)
        assert log.damaged_seq == 4500 and not log.resume_owed
        with path_.open("r+b") as f:  # put back, in place, before anything was written
            f.seek(at)
            f.write(original)
        log.check_on_disk(16)
        assert log.damaged_seq is None and log.healthy and log.resume_owed
        [written] = log.append_durable([("test.line", {"n": 5000})])
        assert written.result() == 5001 and not log.resume_owed
        resumed = json.loads(lines_of(path_)[5000])
        assert resumed["event"] == "log.resume" and "line 4500" in resumed["after"], resumed
    finally:
        log.close()


def test_a_line_rewritten_behind_a_damaged_tile_is_found_and_never_served(
        tmp_path: Path) -> None:
    """A line rewritten in place and one bit flipped in its tile: the background check
    passed the bundle over (a damaged tile "not its to judge"), /health said ok,
    renewals went on and the rewritten line was served (an auditor trial). The lines
    are judged by the tile above now; and once a rewrite is found, its lines are not
    served (they were, after the damage was known: the same trial)."""
    from ca.audit.log import LinesRewritten
    # 19 full bundles; line 4500 is in bundle 17 (4352..4607)
    path_, original, at = rewritten(tmp_path, random.Random(3), 5000, 4500)
    level0 = tmp_path / "tiles" / "level-0"
    data = bytearray(level0.read_bytes())
    data[(17 * 256 + 248) * 32] ^= 1  # the hash of line 4600, another line of the bundle
    level0.write_bytes(bytes(data))
    log = AuditLog.open(path_)
    try:
        assert log.check_on_disk(0) == 16 and log.damaged_seq is None
        log.check_on_disk(16)
        assert log.damaged_seq == 4352 and not log.healthy
        assert "a line from 4352 to 4607 of the audit log" in (log.problem or "")
        assert "its tile (audit/tiles, 0/17) is damaged too" in (log.problem or "")
        for read in (lambda: log.read_entries(17, 256), lambda: log.read_lines(4500, 1)):
            with pytest.raises(LinesRewritten, match="a line from 4352 to 4607"):
                read()
        assert log.read_lines(4000, 2).count(b"\n") == 2  # the other bundles are served
        with path_.open("r+b") as f:  # the line put back, the tile still damaged
            f.seek(at)
            f.write(original)
        log.check_on_disk(16)
        assert log.damaged_seq is None and log.healthy
        assert log.read_lines(4500, 1) == original + b"\n"
    finally:
        log.close()


def test_lines_under_a_damaged_tile_above_are_not_taken_for_intact(tmp_path: Path) -> None:
    """A review: one bit flipped in tile 1/0 (a full tile past 65,536 lines, which the
    start does not read) made every bundle under it unjudgeable, and each was logged
    "intact": a line rewritten there passed the check and was served. Lines that
    cannot be checked stop signing and are not served, saying what to do."""
    from ca.audit.log import LinesRewritten
    path_, _, _ = rewritten(tmp_path, random.Random(11), 66000, 4500)  # bundle 17
    level1 = tmp_path / "tiles" / "level-1"
    data = bytearray(level1.read_bytes())
    data[5 * 32] ^= 1  # bundle 5's entry in tile 1/0; bundle 17's own is intact
    level1.write_bytes(bytes(data))
    log = AuditLog.open(path_)
    try:
        assert log.healthy
        log.check_on_disk(0)
        assert log.damaged_seq == 0 and not log.healthy  # the first bundle under 1/0
        assert ("lines 0 to 255 of the audit log" in (log.problem or "") and
                "cannot be checked: the tiles that hold their hashes are damaged (tile 1/0 "
                "does not hash" in (log.problem or "")), log.problem
        with pytest.raises(LinesRewritten, match=r"lines 4352 to 4607 .* cannot be checked"):
            log.read_lines(4500, 1)
    finally:
        log.close()


def test_each_rewritten_bundle_is_remembered_until_it_is_put_back(tmp_path: Path) -> None:
    """A review: a second rewrite found (by a read) while a first was recorded was
    forgotten, and signing resumed once the first was put back."""
    from ca.audit.log import LinesRewritten
    path_, original, at = rewritten(tmp_path, random.Random(12), 5000, 1000)  # bundle 3
    second = lines_of(path_)[4500]  # bundle 17
    at2 = path_.read_bytes().index(second)
    with path_.open("r+b") as f:
        f.seek(at2 + len(second) // 2)
        f.write(b"X")
    log = AuditLog.open(path_)
    try:
        log.check_on_disk(0)
        assert log.damaged_seq == 1000
        with pytest.raises(LinesRewritten, match="line 4500 of the audit log"):
            log.read_lines(4500, 1)
        for seq, where, line in ((1000, at, original), (4500, at2, second)):
            assert log.damaged_seq == seq and not log.healthy
            with path_.open("r+b") as f:  # put back, in place
                f.seek(where)
                f.write(line)
            log.check_on_disk(0)
        assert log.damaged_seq is None and log.healthy
    finally:
        log.close()


def test_a_line_rewritten_under_the_tiles_is_not_served_once_found(tmp_path: Path) -> None:
    """The first read of a rewritten line finds it (and stops signing); neither that read
    nor any later one hands it out as the log's (an auditor trial: served twice)."""
    from ca.audit.log import LinesRewritten
    path_, _, _ = rewritten(tmp_path, random.Random(4), 1000, 500)
    log = AuditLog.open(path_)
    try:
        for _ in range(2):
            for read in (lambda: log.read_entries(1, 256), lambda: log.read_lines(500, 1)):
                with pytest.raises(LinesRewritten, match="line 500 of the audit log"):
                    read()
        assert log.damaged_seq == 500 and not log.healthy
    finally:
        log.close()


def test_a_crash_before_the_commit_point_is_tiled_again_at_start(tmp_path: Path) -> None:
    """The lines of a batch are durable, the tiles it completed are not recorded: the
    tile directory is as it was before the batch (its new tile maybe written), the
    bundle index's last append torn, and the log ends in a torn line."""
    path_ = tmp_path / "log.jsonl"
    tiles = tmp_path / "tiles"
    log = AuditLog.open(path_)
    fill(log, random.Random(2), 500)
    log.close()
    before = tmp_path / "tiles-before"
    shutil.copytree(tiles, before)
    log = AuditLog.open(path_)
    fill(log, random.Random(3), 200)  # completes bundle 1 (lines 256..511)
    log.close()
    level0 = (tiles / "level-0").read_bytes()
    whole = (tiles / "bundles").read_bytes()
    shutil.rmtree(tiles)
    before.rename(tiles)
    (tiles / "level-0").write_bytes(level0)  # the tile made it, its end did not
    (tiles / "bundles").write_bytes(whole[:8] + whole[8:12])
    with open(path_, "ab") as fh:
        fh.write(b'{"event":"test.li')
    log = AuditLog.open(path_)
    try:
        lines = lines_of(path_)
        assert json.loads(lines[-1])["event"] == "log.recover"
        agrees(log, lines, random.Random(4))
    finally:
        log.close()
    assert (tiles / "bundles").read_bytes() == whole  # the same end, recorded again
    assert (tiles / "level-0").read_bytes()[8192:16384] == b"".join(
        leaf_hash(line) for line in lines[256:512])


def cut(path_: Path, size: int) -> None:
    with open(path_, "r+b") as fh:
        fh.truncate(size)


@pytest.mark.parametrize(("damage", "why"), [
    (lambda t: cut(t / "level-0", 3 * 8192 - 32), r"level-0 hold 24544 bytes, the bundle "
                                                   r"index says 24576"),
    (lambda t: (t / "level-1").unlink(), r"the tiles .*level-1 are missing"),
    (lambda t: (t / "bundles").unlink(), r"the bundle index .* is missing"),
])
def test_a_damaged_tile_directory_refuses_the_start(tmp_path: Path,
                                                    damage: Callable[[Path], None],
                                                    why: str) -> None:
    path_ = tmp_path / "log.jsonl"
    log = AuditLog.open(path_)
    fill(log, random.Random(4), 800)
    log.close()
    damage(tmp_path / "tiles")
    with pytest.raises(AuditLogError, match=why) as refused:
        AuditLog.open(path_)
    assert "is damaged" in str(refused.value) and "move" in str(refused.value)


def test_a_log_cut_below_its_tiles_is_refused(tmp_path: Path) -> None:
    path_ = tmp_path / "log.jsonl"
    log = AuditLog.open(path_)
    fill(log, random.Random(5), 600)
    log.close()
    lines = lines_of(path_)
    path_.write_bytes(b"".join(line + b"\n" for line in lines[:500]))
    with pytest.raises(AuditLogError, match=r"cover its first 512 lines.*truncated or replaced"):
        AuditLog.open(path_)


def signed_log(tmp_path: Path, rng: random.Random
               ) -> tuple[Path, list[bytes], Path, Ed25519PublicKey]:
    """A log of 1000 lines with its tiles, and a checkpoint over all but its last two
    lines, as the daemon's own are (its signing's intent and outcome come after the
    lines it signs, before the file is written): the log, its lines, the checkpoint
    file and the public audit key."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from ca.audit.note import sign_checkpoint
    path_ = tmp_path / "log.jsonl"
    log = AuditLog.open(path_)
    fill(log, rng, 1000)
    log.close()
    key = ed25519.Ed25519PrivateKey.generate()
    lines = lines_of(path_)
    checkpoint = tmp_path / "checkpoint"
    root = MerkleTree(leaf_hash(line) for line in lines[:-2]).root()
    checkpoint.write_text(sign_checkpoint("t.example/audit", len(lines) - 2, root,
                                          "t.example/audit", key.public_key(), key.sign))
    return path_, lines, checkpoint, key.public_key()


def test_a_missing_tile_directory_is_built_from_the_whole_log_and_checked(
        tmp_path: Path) -> None:
    """The first start with tiles, or a directory moved aside: the whole log is read,
    and a line rewritten anywhere is found against the checkpoint, as before tiles."""
    path_, lines, checkpoint, key = signed_log(tmp_path, random.Random(6))
    shutil.rmtree(tmp_path / "tiles")
    log = AuditLog.open(path_, checkpoint, key)
    try:
        agrees(log, lines, random.Random(7))
    finally:
        log.close()

    shutil.rmtree(tmp_path / "tiles")
    data = path_.read_bytes()
    at = data.index(lines[3])
    path_.write_bytes(data[:at] + lines[3].replace(b'"test.line"', b'"test.lime"')
                      + data[at + len(lines[3]):])
    with pytest.raises(AuditLogError, match=r"no longer match .*the log was rewritten"):
        AuditLog.open(path_, checkpoint, key)


def test_a_damaged_tile_at_start_is_not_blamed_on_the_log_alone(tmp_path: Path) -> None:
    """One hash flipped in the top tile: the tree read from the tiles no longer matches
    the checkpoint. The start said "the log was rewritten" of a log that verified (an
    auditor trial); it names the tiles too, and moving them aside, as it says, works."""
    path_, lines, checkpoint, key = signed_log(tmp_path, random.Random(9))
    level1 = tmp_path / "tiles" / "level-1"
    data = bytearray(level1.read_bytes())
    data[32] ^= 1  # bundle 1's entry
    level1.write_bytes(bytes(data))
    with pytest.raises(AuditLogError, match=(
            r"as its tiles \(.*tiles\) hold them, no longer match .*: the log was rewritten, "
            r"or the tiles damaged.* if it passes, the tiles are at fault: move them aside")):
        AuditLog.open(path_, checkpoint, key)
    shutil.move(tmp_path / "tiles", tmp_path / "tiles.damaged")
    log = AuditLog.open(path_, checkpoint, key)
    try:
        agrees(log, lines, random.Random(10))
    finally:
        log.close()


def test_an_older_tile_damaged_behind_the_daemon_is_never_served(tmp_path: Path) -> None:
    """Start-up reads only the last full bundle's tile; an older tile altered since is
    found when it is first read, against the entry its parent tile holds, and refused
    (TileDamaged, which the daemon answers as 503) instead of being served with proofs
    built from it (auditor trial: the web view turned red over an intact log)."""
    from ca.audit.tiles import TileDamaged
    path_ = tmp_path / "log.jsonl"
    log = AuditLog.open(path_)
    fill(log, random.Random(8), 1000)
    log.close()
    level0 = tmp_path / "tiles" / "level-0"
    data = bytearray(level0.read_bytes())
    data[100] ^= 1  # a byte of the hash of line 3, in tile 0
    level0.write_bytes(bytes(data))
    log = AuditLog.open(path_)  # tile 3 is the last full one: tile 0 is not read
    try:
        for read in (lambda: log.read_tile(0, 0, 256), lambda: log.inclusion_proof(5, 1000),
                     lambda: log.consistency_proof(100, 1000)):
            with pytest.raises(TileDamaged, match=r"tile 0/0 does not hash to the entry its "
                                                  r"parent tile 1/0 holds"):
                read()
        lines = lines_of(path_)
        ref = MerkleTree(leaf_hash(line) for line in lines)
        assert log.inclusion_proof(700, 1000) == ref.inclusion_proof(700, 1000)  # tile 2
    finally:
        log.close()


def test_a_line_too_long_for_an_entry_bundle_is_refused_alone(tmp_path: Path) -> None:
    log = AuditLog.open(tmp_path / "log.jsonl")
    try:
        long, short = log.append_durable([("test.line", {"pad": "x" * 70000}),
                                          ("test.line", {"pad": "x"})])
        with pytest.raises(ValueError, match="longer than the 65535"):
            long.result()
        assert short.result() == 0
    finally:
        log.close()


# ---- over HTTP, with a tile client written from the specification ---------------------------


class TileClient:
    """Fetches only tiles and entry bundles for a checkpoint's size: c2sp.org/tlog-tiles
    and RFC 6962 section 2.1, nothing of hsmca's."""

    def __init__(self, fetch: Callable[[str], Awaitable[bytes]], size: int) -> None:
        self.fetch, self.size = fetch, size
        self.tiles: dict[tuple[int, int], bytes] = {}

    @staticmethod
    def index(n: int) -> str:
        digits = f"{n:03d}"
        digits = "0" * (-len(digits) % 3) + digits
        groups = [digits[i:i + 3] for i in range(0, len(digits), 3)]
        return "/".join(["x" + g for g in groups[:-1]] + groups[-1:])

    def _suffix(self, width: int) -> str:
        return "" if width == 256 else f".p/{width}"

    async def tile(self, level: int, n: int) -> bytes:
        """Tile n at `level` for this tree size: partial if the tree ends inside it."""
        if (level, n) not in self.tiles:
            width = min(256, self.size // 256 ** level - n * 256)
            data = await self.fetch(f"tile/{level}/{self.index(n)}{self._suffix(width)}")
            assert len(data) == 32 * width
            self.tiles[(level, n)] = data
        return self.tiles[(level, n)]

    async def entries(self, n: int) -> list[bytes]:
        width = min(256, self.size - n * 256)
        data = await self.fetch(f"tile/entries/{self.index(n)}{self._suffix(width)}")
        out = []
        while data:
            length = int.from_bytes(data[:2], "big")
            out.append(data[2:2 + length])
            data = data[2 + length:]
        assert len(out) == width
        return out

    async def mth(self, lo: int, hi: int) -> bytes:
        """MTH(D[lo:hi]) for the ranges RFC 6962's recursion produces."""
        n = hi - lo
        if n & (n - 1) == 0:  # a perfect, aligned subtree: a run of one tile's hashes
            level, j = divmod(n.bit_length() - 1, 8)
            first = lo // 256 ** level
            data = await self.tile(level, first // 256)
            run = [data[32 * k:32 * k + 32] for k in range(first % 256, first % 256 + 2 ** j)]
            while len(run) > 1:
                run = [hashlib.sha256(b"\x01" + run[k] + run[k + 1]).digest()
                       for k in range(0, len(run), 2)]
            return run[0]
        k = 1
        while k * 2 < n:
            k *= 2
        left, right = await self.mth(lo, lo + k), await self.mth(lo + k, hi)
        return hashlib.sha256(b"\x01" + left + right).digest()

    async def inclusion_path(self, m: int, lo: int, hi: int) -> list[bytes]:
        """RFC 6962 PATH(m, D[lo:hi]), m counted from lo."""
        n = hi - lo
        if n == 1:
            return []
        k = 1
        while k * 2 < n:
            k *= 2
        if m < k:
            return [*await self.inclusion_path(m, lo, lo + k), await self.mth(lo + k, hi)]
        return [*await self.inclusion_path(m - k, lo + k, hi), await self.mth(lo, lo + k)]


async def test_tiles_over_http_match_the_lines_and_prove_inclusion(tmp_path: Path) -> None:
    ca = init_ca(tmp_path)
    log = ca.state / "audit" / "log.jsonl"
    daemons: list[Daemon] = []
    try:
        d = start_daemon(ca.state)
        daemons.append(d)
        svc = enroll(d, tmp_path, "service", ["svc.tiles.example"])
        while len(lines_of(log)) < 600:  # renewals: intent, outcome, and OCSP's
            await asyncio.gather(*(http("POST", f"{d.url}/v1/x509/renew", d.ssl(*svc),
                                        body={}) for _ in range(8)))
        assert daemons.pop().stop() == 0  # its final checkpoint covers all of them
        d = start_daemon(ca.state)
        daemons.append(d)
        auditor = enroll(d, tmp_path, "auditor", ["auditor@example.com"])
        status, ctype, raw = await get(d, "/v1/audit/checkpoint")
        assert status == 200 and ctype == "text/plain"
        key = _audit_key(ca.state)
        cp = verify_checkpoint(raw.decode(), raw.decode().split("\n")[0], key)
        lines = lines_of(log)
        assert cp.size >= 600

        status, ctype, tile0 = await get(d, "/v1/audit/tile/0/000", auditor)
        assert status == 200 and ctype == "application/octet-stream"
        assert tile0 == b"".join(hashlib.sha256(b"\x00" + line).digest() for line in lines[:256])
        status, _, bundle0 = await get(d, "/v1/audit/tile/entries/000", auditor)
        assert status == 200
        assert bundle0 == b"".join(len(line).to_bytes(2, "big") + line for line in lines[:256])
        # Kept a year by caches, compressed when asked: cached apart by encoding.
        async with aiohttp.ClientSession() as s, s.get(
                f"{d.url}/v1/audit/tile/entries/000", ssl=d.ssl(*auditor),
                headers={"Accept-Encoding": "gzip"}) as r:
            assert r.headers.get("Content-Encoding") == "gzip"
            assert r.headers.get("Vary") == "Accept-Encoding", r.headers
            assert await r.read() == bundle0
        for path_ in ("/v1/audit/tile/0/000", "/v1/audit/tile/entries/000"):
            assert (await get(d, path_))[0] == 403
            assert (await get(d, path_, svc))[0] == 403
        assert (await get(d, "/v1/audit/tile/0/x000/000", auditor))[0] == 400
        assert (await get(d, f"/v1/audit/tile/0/{TileClient.index(len(lines) // 256 + 1)}",
                          auditor))[0] == 404

        fetched: list[str] = []

        async def fetch(p: str) -> bytes:
            status, _, body = await get(d, f"/v1/audit/{p}", auditor)
            assert status == 200, (p, body)
            fetched.append(p)
            return body

        client = TileClient(fetch, cp.size)
        root = await client.mth(0, cp.size)
        index = cp.size - 5
        entry = (await client.entries(index // 256))[index % 256]
        hashes = await client.inclusion_path(index, 0, cp.size)
        assert root == cp.root  # the tiles reproduce the signed root
        assert entry == lines[index]
        assert verify_inclusion(index, cp.size, hashlib.sha256(b"\x00" + entry).digest(),
                                hashes, cp.root)
        assert hashes == path(index, lines[:cp.size])
        assert any(".p/" in p for p in fetched) and any("tile/1/" in p for p in fetched)
    finally:
        for daemon in daemons:
            daemon.stop()

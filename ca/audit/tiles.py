"""The audit log's Merkle tree as C2SP tlog-tiles (c2sp.org/tlog-tiles), kept on disk.

A tile holds 256 consecutive hashes of one level of the RFC 6962 tree: at tile
level 0 the leaf hashes ``SHA-256(0x00 || line)``, at tile level L the roots of the
full tiles of level L - 1. The tiles of a tree of n leaves are the full tiles and,
at the right-hand edge, one partial tile per level (its first hashes). Every
subtree root a proof needs is either in a tile or the root of a run of hashes
within one (`TiledTree._node`), so proofs need O(log n) tile reads and no tree in
memory. The log's lines are the tiles' entries; an entry bundle is 256 of them,
each without its newline and after a big-endian uint16 length (`entry_bundle`).

What the writer keeps in memory is the right-hand edge (a partial tile per level,
under 8 KiB each) and a compact range for the root: the same whatever the log's
size. Full tiles it reads back when a proof needs them, through a small cache.

Where tiles live is a `TileStore`: files beside the log (`FileTileStore`); in cluster
mode a node also copies them to PostgreSQL, whence the other nodes read them
(ca/audit/cluster_tiles.py). A store holds the full tiles, the
partial tiles of levels 1 and up, and where in the log each full entry bundle ends
(so that the log's lines can be served as bundles, and the writer knows how much
of the log the tiles cover). Level 0's partial tile is not stored: it changes with
every group commit, and the writer re-reads those (at most 255) lines from the log
at start instead, which costs less than a write per commit.

Commit order, as Tessera's POSIX storage does it: the tiles a full bundle
completes, flushed, then the bundle's end appended to the bundle index and
flushed: that append is the commit point. A crash before it leaves tiles that are
simply written again; nothing refers to a tile before it is durable.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import struct
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

from ca.audit.merkle import HASH_SIZE, CompactRange, SubtreeHashes, build_levels
from ca.fileutil import fsync_dir

TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT  # hashes in a full tile, entries in a full bundle
TILE_BYTES = TILE_WIDTH * HASH_SIZE
MAX_LEVEL = 63  # C2SP: tile levels are 0 to 63
MAX_ENTRY_BYTES = 0xFFFF  # an entry's length is a uint16 in a bundle
_END = struct.Struct(">Q")  # one bundle end in the bundle index


class TileDamaged(Exception):
    """A tile or the bundle index is missing, short or unreadable: the message says which."""


class Tile(NamedTuple):
    level: int
    index: int
    width: int  # 1 to 256 hashes; 256 is a full tile
    data: bytes


# ---- paths (C2SP tlog-tiles) ------------------------------------------------------------


def index_path(index: int) -> str:
    """A tile index as zero-padded 3-digit path elements, all but the last prefixed
    with x: 1234067 is x001/x234/067."""
    if index < 0:
        raise ValueError("a tile index is not negative")
    groups = [index % 1000]
    index //= 1000
    while index:
        groups.append(index % 1000)
        index //= 1000
    groups.reverse()
    return "/".join([f"x{g:03d}" for g in groups[:-1]] + [f"{groups[-1]:03d}"])


def tile_path(level: int, index: int, width: int = TILE_WIDTH) -> str:
    """``tile/<L>/<N>[.p/<W>]``"""
    return f"tile/{level}/{index_path(index)}" + (f".p/{width}" if width < TILE_WIDTH else "")


_GROUP = re.compile(r"x[0-9]{3}")
_LAST = re.compile(r"[0-9]{3}")
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,2}")


def parse_tile_path(path: str) -> tuple[int | None, int, int]:
    """``<L>/<N>[.p/<W>]`` or ``entries/<N>[.p/<W>]`` (what follows ``tile/``) as
    (level, or None for an entry bundle; index; width). ValueError if it is not a
    path C2SP allows."""
    parts = path.split("/")
    head = parts.pop(0) if parts else ""
    width = TILE_WIDTH
    if len(parts) >= 2 and parts[-2].endswith(".p"):
        w = parts.pop()
        if not _DECIMAL.fullmatch(w) or not 1 <= int(w) < TILE_WIDTH:
            raise ValueError(f"the width of a partial tile is 1 to {TILE_WIDTH - 1}, not {w!r}")
        width = int(w)
        parts[-1] = parts[-1][:-2]
    if not parts or not _LAST.fullmatch(parts[-1]) or not all(
            _GROUP.fullmatch(p) for p in parts[:-1]):
        raise ValueError("a tile index is 3-digit path elements, all but the last "
                         "prefixed with x (e.g. x001/x234/067)")
    if len(parts) > 1 and parts[0] == "x000":
        raise ValueError("a tile index has no leading zero elements")
    index = int("".join(p.lstrip("x") for p in parts))
    if index >= 1 << 56:  # beyond any log (2^64 leaves at most); keeps it an int64 on the wire
        raise ValueError("no log has a tile of that index")
    if head == "entries":
        return None, index, width
    if not _DECIMAL.fullmatch(head) or int(head) > MAX_LEVEL:
        raise ValueError(f"a tile level is a decimal from 0 to {MAX_LEVEL}, not {head!r}")
    return int(head), index, width


def full_tiles(since: int, size: int) -> list[tuple[int, int]]:
    """(level, index) of the full tiles a tree of `size` leaves has and one of `since`
    leaves had not, level by level."""
    found, level = [], 0
    while size >> (TILE_HEIGHT * (level + 1)):
        shift = TILE_HEIGHT * (level + 1)
        found += [(level, index) for index in range(since >> shift, size >> shift)]
        level += 1
    return found


def partial_tiles(size: int) -> list[tuple[int, int, int]]:
    """(level, index, width) of the partial tile of each level above 0 in a tree of
    `size` leaves (a whole number of bundles): what a store holds beside full tiles."""
    found, level = [], 1
    while size >> (TILE_HEIGHT * level):
        width = (size >> (TILE_HEIGHT * level)) & (TILE_WIDTH - 1)
        if width:
            found.append((level, size >> (TILE_HEIGHT * (level + 1)), width))
        level += 1
    return found


def entry_bundle(lines: Iterable[bytes]) -> bytes:
    """Lines (without their newlines) as a C2SP entry bundle."""
    return b"".join(len(line).to_bytes(2, "big") + line for line in lines)


def tile_root(data: bytes) -> bytes:
    """The root of the perfect subtree under a full tile's 256 hashes: its hash in
    the tile one level up."""
    return build_levels(data)[-1]


def stored_tiles(store: TileStore, since: int, page: int = 256,
                 lock: contextlib.AbstractContextManager[object] | None = None
                 ) -> Iterator[tuple[list[Tile], int]]:
    """The tiles `store` holds for the bundles from `since` on, in pages: the full tiles
    of every level, then each level's partial tile; with how many bundles the store
    covers. For a copy elsewhere to catch up (cluster mode). `lock`: held while the
    partial tiles are read, if a writer may change them meanwhile."""
    with lock or contextlib.nullcontext():
        bundles = store.committed()
        partial = [Tile(level, index, width, store.read_tile(level, index, width))
                   for level, index, width in partial_tiles(bundles * TILE_WIDTH)]
    # Full tiles below `bundles` never change: read without holding up a writer.
    wanted = full_tiles(since * TILE_WIDTH, bundles * TILE_WIDTH)
    for lo in range(0, len(wanted), page):
        yield [Tile(level, index, TILE_WIDTH, store.read_tile(level, index))
               for level, index in wanted[lo:lo + page]], bundles
    if partial:
        yield partial, bundles


# ---- storage ------------------------------------------------------------------------------


class TileStore(Protocol):
    """Where the tiles and the bundle index live (files; another node's, read from
    PostgreSQL, in ca/audit/cluster_tiles.py)."""

    def committed(self) -> int:
        """How many full entry bundles the tiles cover (256 lines each)."""
        ...

    def bundle_end(self, index: int) -> int:
        """The log's byte offset just after full bundle `index` (< committed())."""
        ...

    def read_tile(self, level: int, index: int, width: int = TILE_WIDTH) -> bytes:
        """A stored tile (full, or a partial tile of level 1 and up); TileDamaged if
        it is not there whole."""
        ...

    def commit(self, tiles: Sequence[Tile], ends: Sequence[int]) -> None:
        """Store `tiles`, then the ends of the bundles they complete: the commit point.
        OSError if the storage refuses (nothing refers to what was not committed)."""
        ...

    def close(self) -> None: ...


class FileTileStore:
    """Tiles in one file per level beside the log: tile N of level L is bytes
    [8192 N, 8192 (N + 1)) of `directory/level-L`, the level's partial tile its last
    bytes. And the bundle index `directory/bundles`: 8 bytes (big-endian) per full
    bundle, the log's byte offset where it ends. The index's length is the commit
    point: what lies in the level files beyond what it covers was written by a commit
    that did not finish, and is written over.

    One file per level rather than one per tile (Tessera's layout): a commit that
    completes tiles costs a flush per level touched and one for the index, not a
    file, a flush and a directory flush per tile, and a 10-million-line log has four
    files rather than 40,000. Tiles are served over HTTP, never from these files
    directly, so their layout is the store's own.
    """

    INDEX = "bundles"

    def __init__(self, directory: Path, *, create: bool = False, sync: bool = True) -> None:
        self.dir = Path(directory)
        # Off only while a whole log is turned into tiles, which ends with one sync.
        self._sync = sync
        self._levels: dict[int, int] = {}  # level -> open file
        index = self.dir / self.INDEX
        try:
            # A tile directory without its index is damaged, not empty: starting it
            # from nothing would take the whole log for lines the tiles do not hold.
            self._fd = os.open(index, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0),
                               0o640)
        except FileNotFoundError:
            raise TileDamaged(f"the bundle index {index} is missing") from None
        except OSError as exc:
            raise TileDamaged(f"cannot open the bundle index {index}: {exc.strerror}") from None
        size = os.fstat(self._fd).st_size
        self._count = size // _END.size
        if size % _END.size:
            # An append cut short by a crash: the commit it would have made never
            # happened, and the next commit writes that slot again.
            os.ftruncate(self._fd, self._count * _END.size)
        # Every hash the index says is committed must be there: cheap to check, and
        # a level file cut short would otherwise surface only when a proof needs it.
        hashes, level = self._count * TILE_WIDTH, 0
        try:
            while hashes >> (TILE_HEIGHT * level):
                need = (hashes >> (TILE_HEIGHT * level)) * HASH_SIZE
                have = os.fstat(self._file(level, create=False)).st_size
                if have < need:
                    raise TileDamaged(f"the tiles {self._path(level)} hold {have} bytes, the "
                                      f"bundle index says {need} were written")
                level += 1
        except TileDamaged:
            self.close()
            raise

    def committed(self) -> int:
        return self._count

    def bundle_end(self, index: int) -> int:
        if not 0 <= index < self._count:
            raise ValueError(f"bundle {index} is not committed (there are {self._count})")
        raw = os.pread(self._fd, _END.size, index * _END.size)
        if len(raw) != _END.size:
            raise TileDamaged(f"the bundle index {self.dir / self.INDEX} was cut short")
        return int(_END.unpack(raw)[0])

    def read_tile(self, level: int, index: int, width: int = TILE_WIDTH) -> bytes:
        want = width * HASH_SIZE
        try:
            data = os.pread(self._file(level, create=False), want, index * TILE_BYTES)
        except OSError as exc:
            raise TileDamaged(f"the tiles {self._path(level)} cannot be read: "
                              f"{exc.strerror}") from None
        if len(data) != want:
            raise TileDamaged(f"tile {level}/{index} of {width} hashes is not all in "
                              f"{self._path(level)}")
        return data

    def commit(self, tiles: Sequence[Tile], ends: Sequence[int]) -> None:
        touched: set[int] = set()
        for tile in tiles:
            fd = self._file(tile.level, create=True)
            if os.pwrite(fd, tile.data, tile.index * TILE_BYTES) != len(tile.data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (a short write)")
            touched.add(fd)
        if self._sync:
            for fd in touched:
                os.fdatasync(fd)
        if ends:
            blob = b"".join(_END.pack(end) for end in ends)
            if os.pwrite(self._fd, blob, self._count * _END.size) != len(blob):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (a short write)")
            if self._sync:
                os.fdatasync(self._fd)
            self._count += len(ends)

    def close(self) -> None:
        fds = [self._fd, *self._levels.values()] if self._fd >= 0 else []
        self._fd = -1  # closing twice must not close a descriptor reused meanwhile
        self._levels.clear()
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def _path(self, level: int) -> Path:
        return self.dir / f"level-{level}"

    def _file(self, level: int, *, create: bool) -> int:
        fd = self._levels.get(level)
        if fd is None:
            path = self._path(level)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC, 0o640)
            except FileNotFoundError:
                if not create:
                    raise TileDamaged(f"the tiles {path} are missing") from None
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
                if self._sync:  # its name must survive a crash as long as what it holds
                    fsync_dir(self.dir)
            self._levels[level] = fd
        return fd




# ---- the tree -----------------------------------------------------------------------------


class TiledTree(SubtreeHashes):
    """The log writer's Merkle tree: the right-hand edge in memory, the rest in tiles.

    Not thread-safe: the log calls it under its own lock. `append` adds a leaf;
    `pending` lists the tiles that its appends completed or changed and the store
    does not hold yet, and `stored` forgets them once the store holds them (until
    then they are served from memory).
    """

    __slots__ = ("_cache", "_changed", "_edges", "_range", "_size", "_store", "_unstored")

    CACHE_TILES = 64  # full tiles kept after a read (8 KiB each): a proof touches ~4

    def __init__(self, store: TileStore) -> None:
        self._store = store
        self._size = store.committed() * TILE_WIDTH
        self._edges: list[bytearray] = [bytearray()]  # level 0: the lines after the last bundle
        level = 1
        while self._size >> (TILE_HEIGHT * level):
            width = self._edge_width(level)
            self._edges.append(bytearray(store.read_tile(level, self._edge_index(level), width)
                                         if width else b""))
            level += 1
        self._unstored: dict[tuple[int, int], bytes] = {}
        self._changed: set[int] = set()
        self._cache: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._range: CompactRange = self.compact_range()

    @property
    def size(self) -> int:
        return self._size

    def append(self, leaf: bytes) -> None:
        """Add one leaf hash; a tile it fills goes up a level as its root."""
        self._range.append(leaf)  # also checks that it is a hash
        edges = self._edges
        edges[0] += leaf
        self._size += 1
        level = 0
        while len(edges[level]) == TILE_BYTES:
            full = bytes(edges[level])
            self._unstored[(level, (self._size >> (TILE_HEIGHT * (level + 1))) - 1)] = full
            edges[level] = bytearray()
            level += 1
            if level == len(edges):
                edges.append(bytearray())
            edges[level] += tile_root(full)
            self._changed.add(level)

    def root(self, size: int | None = None) -> bytes:
        if size is None or size == self._size:
            return self._range.root()  # no tile read for the current root
        return super().root(size)

    def pending(self) -> list[Tile]:
        """Full tiles not yet stored, and the edge tiles of level 1 and up that changed."""
        tiles = [Tile(level, index, TILE_WIDTH, data)
                 for (level, index), data in sorted(self._unstored.items())]
        for level in sorted(self._changed):
            width = len(self._edges[level]) // HASH_SIZE
            if width:
                tiles.append(Tile(level, self._edge_index(level), width,
                                  bytes(self._edges[level])))
        return tiles

    def stored(self, tiles: Sequence[Tile]) -> None:
        """The store holds `tiles` now (what `pending` returned, nothing appended since)."""
        for tile in tiles:
            if tile.width == TILE_WIDTH:
                self._keep(tile.level, tile.index, self._unstored.pop((tile.level, tile.index)))
            else:
                self._changed.discard(tile.level)

    def read_tile(self, level: int, index: int, width: int = TILE_WIDTH) -> bytes | None:
        """Tile `level`/`index` of the current tree, `width` hashes of it (C2SP
        serves a partial tile as a prefix); None if the tree has not got them."""
        if level >= len(self._edges):
            return None
        edge = self._edge_index(level)
        if index < edge:
            return self._full(level, index)[:width * HASH_SIZE]
        if index == edge and width * HASH_SIZE <= len(self._edges[level]):
            return bytes(self._edges[level][:width * HASH_SIZE])
        return None

    def checked_leaves(self, index: int) -> bytes:
        """Full tile 0/`index`, checked against its parent as a read for a proof is, but
        not taken into the cache: the log's background check reads every one of them
        (`AuditLog.check_on_disk`), and would push out the tiles proofs need."""
        key = (0, index)
        data = self._unstored.get(key) or self._cache.get(key)
        if data is None:
            data = self._store.read_tile(0, index)
            self._check_against_parent(0, index, data)
        return data

    def leaves_agree(self, index: int, hashes: bytes) -> bool:
        """Whether `hashes`, the leaf hashes of full bundle `index` as its lines on disk
        hash now, hash to what the tile above holds for the bundle. How lines are judged
        when their own tile 0/`index` is damaged: passed over, a rewritten line hid
        behind one flipped bit in its tile (an auditor trial). TileDamaged if the tile
        above is damaged too."""
        entry = self._parent_entry(0, index)
        return entry is not None and tile_root(hashes) == entry  # none to judge by: no

    # ---- internals -----------------------------------------------------------------------

    def _edge_index(self, level: int) -> int:
        """The index of the tile at `level` that is not full yet."""
        return self._size >> (TILE_HEIGHT * (level + 1))

    def _edge_width(self, level: int) -> int:
        return (self._size >> (TILE_HEIGHT * level)) & (TILE_WIDTH - 1)

    def _node(self, level: int, index: int) -> bytes:
        # Tile level L holds tree level 8L; a subtree of 2**j of those hashes (j < 8)
        # is a run within one tile, hashed up here.
        tile_level, j = divmod(level, TILE_HEIGHT)
        first = index << j
        tile_index = first >> TILE_HEIGHT
        if tile_index == self._edge_index(tile_level):
            data: bytes | bytearray = self._edges[tile_level]
        else:
            data = self._full(tile_level, tile_index)
        lo = (first & (TILE_WIDTH - 1)) * HASH_SIZE
        run = bytes(data[lo:lo + (HASH_SIZE << j)])
        if len(run) != HASH_SIZE << j:
            raise ValueError(f"the subtree {level}/{index} is not complete in a tree of "
                             f"{self._size} leaves")
        return run if j == 0 else build_levels(run)[-1]

    def _full(self, level: int, index: int) -> bytes:
        key = (level, index)
        data = self._unstored.get(key)
        if data is None:
            data = self._cache.get(key)
            if data is None:
                data = self._store.read_tile(level, index)
                self._check_against_parent(level, index, data)
                self._keep(level, index, data)
            else:
                self._cache.move_to_end(key)
        return data

    def _check_against_parent(self, level: int, index: int, data: bytes) -> None:
        """A full tile read from the store hashes to the entry its parent tile holds for
        it, or TileDamaged: start-up reads only the last bundle's tile, and a damaged
        older one would be served, and its proofs with it, as the log's (auditor
        trial). 255 hashes, once per tile the cache takes in."""
        entry = self._parent_entry(level, index)
        if entry is not None and tile_root(data) != entry:
            raise TileDamaged(f"tile {level}/{index} does not hash to the entry its parent "
                              f"tile {level + 1}/{index // TILE_WIDTH} holds for it: the "
                              "tiles were damaged or altered on disk (the start reads only the "
                              "newest of them, so this may be older than this run). If `hsmca "
                              "audit verify` passes on the log, stop the daemon, move the tile "
                              "directory aside and start again (it is built anew)")

    def _parent_entry(self, level: int, index: int) -> bytes | None:
        """The hash the tile above holds for full tile `level`/`index` (that tile checked
        as reads are: TileDamaged if it is not whole), or None at the top."""
        parent_index, slot = divmod(index, TILE_WIDTH)
        if level + 1 >= len(self._edges):
            return None
        if parent_index == self._edge_index(level + 1):
            parent: bytes | bytearray = self._edges[level + 1]
        else:
            parent = self._full(level + 1, parent_index)
        entry = bytes(parent[slot * HASH_SIZE:(slot + 1) * HASH_SIZE])
        return entry if len(entry) == HASH_SIZE else None

    def _keep(self, level: int, index: int, data: bytes) -> None:
        self._cache[(level, index)] = data
        if len(self._cache) > self.CACHE_TILES:
            self._cache.popitem(last=False)

    def __repr__(self) -> str:
        return f"TiledTree(size={self._size})"

"""A node's Merkle tiles in PostgreSQL (cluster mode), so that any node serves any
node's log as tiles and proves it from tiles, the dead ones' too.

The node whose log it is copies each tile its store commits (`TileCopy`, after the
file's commit, off the commit path: tiles are made from durable lines and can always
be made again) and catches up at start with whatever PostgreSQL lacks
(`catch_up`). Another node reads them (`tree_at`): the tiles up to the last bundle
they cover, and the few lines after it from `audit_lines`, so a proof costs a handful
of rows, not the whole log. Where PostgreSQL holds no tiles yet (a node of an earlier
version), the lines stand in for them, as they did before.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import structlog

from ca.audit.log import AuditLog, AuditLogError
from ca.audit.merkle import HASH_SIZE, leaf_hash
from ca.audit.tiles import TILE_HEIGHT, TILE_WIDTH, Tile, TileDamaged, TiledTree
from ca.store.errors import StoreUnavailable

if TYPE_CHECKING:  # psycopg is loaded only where a cluster runs
    from ca.store.postgres import PostgresStore

log = structlog.get_logger("hsmca.audit")
CATCH_UP_TIMEOUT_S = 60.0
_PAGE = 5000


class TileCopy:
    """`AuditLog.on_tiles` in cluster mode: copies the tiles to PostgreSQL, one
    transaction at a time. What a failed copy did not store goes with the next tiles,
    or at the stop (`flush`); the log never waits for the copy. Copies may land out of
    order without harm (a stored tile is only replaced by a longer one, the head only
    grows), so a copy that hangs is passed by the next after STUCK_S."""

    STUCK_S = 30.0

    def __init__(self, store: PostgresStore, node: str) -> None:
        self.store, self.node = store, node
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when a copy ends
        self._owed: dict[tuple[int, int], bytes] = {}  # (level, index) -> latest data
        self._bundles = 0
        self._copy = 0  # the number of the copy under way (or the last one)
        self._started: float | None = None  # when the copy under way began; None: none is

    def __call__(self, tiles: Sequence[Tile], bundles: int) -> None:
        with self._lock:
            for tile in tiles:
                self._owed[(tile.level, tile.index)] = tile.data
            self._bundles = max(self._bundles, bundles)
            if self._started is not None and time.monotonic() - self._started < self.STUCK_S:
                return  # the copy under way takes these along when it ends
        self._send()

    def _send(self) -> None:
        with self._lock:
            self._copy += 1
            copy, sent, bundles = self._copy, dict(self._owed), self._bundles
            self._started = time.monotonic()
        tiles = [Tile(level, index, len(data) // HASH_SIZE, data)
                 for (level, index), data in sorted(sent.items())]
        try:
            fut = self.store.put_audit_tiles(self.node, tiles, bundles)
        except RuntimeError as exc:  # the store is closed
            self._done(copy, sent, exc)
            return
        fut.add_done_callback(lambda f: self._done(
            copy, sent, StoreUnavailable("cancelled") if f.cancelled() else f.exception()))

    def _done(self, copy: int, sent: dict[tuple[int, int], bytes],
              error: BaseException | None) -> None:
        with self._lock:
            if error is None:
                for key, data in sent.items():
                    if self._owed.get(key) is data:  # not replaced by a longer one since
                        del self._owed[key]
            current = copy == self._copy
            if current:
                self._started = None
            again = current and error is None and bool(self._owed)
            self._idle.notify_all()
        if error is not None:
            log.warning("cannot copy the audit log's tiles to PostgreSQL yet; the next "
                        "tiles take them along", node=self.node, error=str(error))
        if again:
            self._send()

    def flush(self, timeout: float) -> bool:
        """Copy what is owed and wait: whether every tile given so far is stored after
        at most `timeout` seconds (a clean stop; the next start copies the rest)."""
        with self._lock:
            idle = self._started is None
            owed = bool(self._owed)
        if idle and owed:
            self._send()
        with self._idle:
            return self._idle.wait_for(lambda: self._started is None, timeout) \
                and not self._owed


def catch_up(audit: AuditLog, store: PostgresStore, node: str) -> int:
    """Store the tiles of `audit` that PostgreSQL lacks (a node of an earlier version,
    or a crash between the file's tiles and the copy); how many. At start, before the
    node writes."""
    return copy_tiles(audit.stored_tiles, store, node)


def copy_tiles(source: Callable[[int], Iterator[tuple[list[Tile], int]]],
               store: PostgresStore, node: str) -> int:
    """Store the tiles `source(since)` gives from the bundles PostgreSQL's head for
    `node` covers on; how many. The head moves only with the last page, so a copy cut
    short leaves a head whose tiles are all there, and the next copy resumes from it."""
    held, _ = store.audit_tile_head_sync(node)
    count = 0
    try:
        pages = source(held)
        page = next(pages, None)
        while page is not None:
            tiles, bundles = page
            following = next(pages, None)
            store.put_audit_tiles(node, tiles, bundles if following is None else held
                                  ).result(timeout=CATCH_UP_TIMEOUT_S)
            count += len(tiles)
            page = following
    except TimeoutError:
        raise TimeoutError(f"PostgreSQL did not store the audit log's tiles within "
                           f"{CATCH_UP_TIMEOUT_S:.0f} s") from None
    except TileDamaged as exc:
        raise AuditLogError(f"cannot copy the audit log's tiles to PostgreSQL: {exc}") from None
    if count:
        log.info("copied the audit log's tiles to PostgreSQL", node=node, tiles=count)
    return count


class _StoredTiles:
    """The TileStore a reader's TiledTree starts from: one snapshot of the head (the
    bundles covered and the partial tiles there), full tiles read as needed."""

    def __init__(self, store: PostgresStore, node: str) -> None:
        self.store, self.node = store, node
        self._bundles, self._edges = store.audit_tile_head_sync(node)

    def committed(self) -> int:
        return self._bundles

    def bundle_end(self, index: int) -> int:
        raise NotImplementedError("another node's lines are read by seq, not by offset")

    def read_tile(self, level: int, index: int, width: int = TILE_WIDTH) -> bytes:
        edge = self._edges.get(level)
        if edge is not None and index == (self._bundles * TILE_WIDTH) >> (
                TILE_HEIGHT * (level + 1)):
            data: bytes | None = edge
        else:
            data = self.store.audit_tile_sync(self.node, level, index)
        if data is None or len(data) < width * HASH_SIZE:
            raise TileDamaged(f"PostgreSQL lacks tile {level}/{index} of node {self.node!r}")
        return data[:width * HASH_SIZE]

    def commit(self, tiles: Sequence[Tile], ends: Sequence[int]) -> None:
        raise NotImplementedError("another node's tiles are read, never written here")

    def close(self) -> None:
        pass


def tree_at(store: PostgresStore, node: str, size: int) -> TiledTree:
    """`node`'s Merkle tree with at least `size` leaves, from its tiles and the lines
    after them (all its lines where it stored no tiles): a tree larger than `size`
    proves and serves everything a tree of `size` does. Blocking: run it off the event
    loop."""
    tree = TiledTree(_StoredTiles(store, node))
    while tree.size < size:
        lines = store.audit_lines_sync(node, tree.size, min(_PAGE, size - tree.size),
                                       bounded=True)
        if not lines:
            raise ValueError(f"the log of node {node!r} has only {tree.size} lines, "
                             f"not {size}")
        # The rows are read by seq order: a missing row would shift every leaf after
        # it. Each line names its seq; the first and last of a page pin the page.
        first, last = (_seq(line) for line in (lines[0], lines[-1]))
        if (first, last) != (tree.size, tree.size + len(lines) - 1):
            raise TileDamaged(f"PostgreSQL lacks lines of node {node!r}'s log from seq "
                              f"{tree.size} (it has seq {first} there)")
        for line in lines:
            tree.append(leaf_hash(line))
    return tree


def _seq(line: bytes) -> int | None:
    try:
        seq = json.loads(line)["seq"]
    except (ValueError, KeyError, TypeError):
        return None
    return seq if isinstance(seq, int) else None

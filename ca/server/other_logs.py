"""Other nodes' audit logs, read from PostgreSQL (cluster mode): what `?log=NODE`
serves on the audit endpoints when NODE is not this node.

The lines are the ones each node committed there with its group commits, byte for
byte; tiles and proofs come from the tiles each node copies there, and the few
lines after the last bundle they cover (ca/audit/cluster_tiles.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from aiohttp import web

from ca.audit.cluster_tiles import tree_at
from ca.audit.note import parse_checkpoint
from ca.audit.tiles import TILE_HEIGHT, TILE_WIDTH, TileDamaged, TiledTree, entry_bundle
from ca.config import NODE_NAME
from ca.server.common import SETTINGS, STORE
from ca.server.problems import Problem
from hsm.errors import AuditUnavailable

T = TypeVar("T")


class OtherLog:
    def __init__(self, store: object, node: str) -> None:
        self.store, self.node = store, node

    async def read(self, start: int, limit: int) -> bytes:
        lines = await self.store.audit_lines(self.node, start, limit)  # type: ignore[attr-defined]
        return b"".join(line + b"\n" for line in lines)

    async def checkpoint(self) -> str | None:
        return await self.store.audit_checkpoint(self.node)  # type: ignore[attr-defined,no-any-return]

    async def exists(self) -> bool:
        """Whether PostgreSQL holds any line of this log (asked only when there is no
        checkpoint to serve, to tell a name with no log from a log not signed yet)."""
        return bool(await self.store.audit_lines(self.node, 0, 1))  # type: ignore[attr-defined]

    async def _from_tree(self, size: int, ask: Callable[[TiledTree], T]) -> T:
        """`ask(tree)` on the log's tree of at least `size` leaves. The tree's tiles are
        read from PostgreSQL as `ask` needs them, blocking: both off the event loop."""
        def run() -> T:
            return ask(tree_at(self.store, self.node, size))  # type: ignore[arg-type]
        try:
            return await asyncio.to_thread(run)
        except TileDamaged as exc:
            raise AuditUnavailable(str(exc)) from None

    async def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        if not 0 <= index < size:
            raise ValueError(f"index {index} is not below size {size}")
        return await self._from_tree(size, lambda t: t.inclusion_proof(index, size))

    async def consistency_proof(self, old: int, size: int) -> list[bytes]:
        if not 0 <= old <= size:
            raise ValueError(f"old size {old} is larger than size {size}")
        return await self._from_tree(size, lambda t: t.consistency_proof(old, size))

    async def _signed_size(self) -> int:
        """The size of the node's latest checkpoint: tiles and bundles are served up to
        it, never beyond (lines past it may belong to a group the node gave up on and
        replaced, and tiles are served as immutable)."""
        note = await self.checkpoint()
        return parse_checkpoint(note).size if note else 0

    async def tile(self, level: int, index: int, width: int) -> bytes | None:
        """C2SP tile `level`/`index`, `width` hashes of it, if the log has them."""
        size = await self._signed_size()
        if (index * TILE_WIDTH + width) << (TILE_HEIGHT * level) > size:
            return None
        return await self._from_tree(size, lambda t: t.read_tile(level, index, width))

    async def entries(self, index: int, width: int) -> bytes | None:
        """C2SP entry bundle `index`, its first `width` lines, if the log has them."""
        if index * TILE_WIDTH + width > await self._signed_size():
            return None
        lines = await self.store.audit_lines(  # type: ignore[attr-defined]
            self.node, index * TILE_WIDTH, width)
        return entry_bundle(lines) if len(lines) == width else None


class AllLogs:
    def __init__(self, store: object) -> None:
        self.store = store

    async def logs(self) -> list[tuple[str, int, str | None]]:
        return await self.store.audit_logs()  # type: ignore[attr-defined,no-any-return]


def _cluster_store(request: web.Request) -> object | None:
    store = request.app[STORE]
    return store if hasattr(store, "audit_logs") else None


def other_logs(request: web.Request) -> AllLogs | None:
    store = _cluster_store(request)
    return AllLogs(store) if store is not None else None


def other_log(request: web.Request) -> OtherLog | None:
    """The log `?log=` (or the path's `/v1/audit/logs/NODE/`) names if it is another
    node's; None for this node's own."""
    name, asked = request.match_info.get("log"), request.query.get("log")
    if name is not None and asked not in (None, name):
        raise Problem(400, "Bad Request", f"the path names log {name!r} and ?log= {asked!r}: "
                      "name one", "bad-query")
    name = name if name is not None else asked
    if name is None or name == request.app[SETTINGS].node:
        return None
    if not NODE_NAME.fullmatch(name):  # the names `serve --node` accepts
        raise Problem(400, "Bad Request", "log must be a node name (letters, digits, '.', "
                      "'_', '-')", "bad-query")
    store = _cluster_store(request)
    if store is None:
        raise Problem(404, "Not Found", f"this CA has one log; there is no log {name!r}")
    return OtherLog(store, name)

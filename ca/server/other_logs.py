"""Other nodes' audit logs, read from PostgreSQL (cluster mode): what `?log=NODE`
serves on the audit endpoints when NODE is not this node.

The lines are the ones each node committed there with its group commits, byte for
byte. Proofs are computed from those lines (a Merkle tree built for the request: the
node whose log it is serves them from its tiles, and is the fast path)."""

from __future__ import annotations

import re

from aiohttp import web

from ca.audit.merkle import MerkleTree, leaf_hash
from ca.server.common import SETTINGS, STORE
from ca.server.problems import Problem

_NODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
PAGE = 5000


class OtherLog:
    def __init__(self, store: object, node: str) -> None:
        self.store, self.node = store, node

    async def read(self, start: int, limit: int) -> bytes:
        lines = await self.store.audit_lines(self.node, start, limit)  # type: ignore[attr-defined]
        return b"".join(line + b"\n" for line in lines)

    async def checkpoint(self) -> str | None:
        return await self.store.audit_checkpoint(self.node)  # type: ignore[attr-defined,no-any-return]

    async def _tree(self, size: int) -> MerkleTree:
        tree = MerkleTree()
        while tree.size < size:
            lines = await self.store.audit_lines(  # type: ignore[attr-defined]
                self.node, tree.size, min(PAGE, size - tree.size))
            if not lines:
                raise ValueError(f"the log of node {self.node!r} has only {tree.size} lines, "
                                 f"not {size}")
            for line in lines:
                tree.append(leaf_hash(line))
        return tree

    async def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        if not 0 <= index < size:
            raise ValueError(f"index {index} is not below size {size}")
        return (await self._tree(size)).inclusion_proof(index, size)

    async def consistency_proof(self, old: int, size: int) -> list[bytes]:
        if not 0 <= old <= size:
            raise ValueError(f"old size {old} is larger than size {size}")
        return (await self._tree(size)).consistency_proof(old, size)


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
    """The log `?log=` names if it is another node's; None for this node's own."""
    name = request.query.get("log")
    if name is None or name == request.app[SETTINGS].node:
        return None
    if not _NODE.match(name):
        raise Problem(400, "Bad Request", "log must be a node name (letters, digits, '.', "
                      "'_', '-')", "bad-query")
    store = _cluster_store(request)
    if store is None:
        raise Problem(404, "Not Found", f"this CA has one log; there is no log {name!r}")
    return OtherLog(store, name)

"""Errors of the inventory that callers (routes, the CLI, start-up) answer alike,
whichever implementation raised them."""

from __future__ import annotations


class StoreUnavailable(Exception):
    """The inventory cannot be reached (PostgreSQL down, or the network to it): nothing
    is decided or signed, and callers answer 503 until it is back."""


class StoreDamaged(StoreUnavailable):
    """The inventory's file is damaged: unavailable until the operator restores it, so
    a client is not told that a retry will help."""


class TooManyPending(Exception):
    """An ACME order refused: with its names, the account would have more waiting for
    validation than its bound. Counted in the transaction that would insert the order,
    so that orders sent at once cannot all pass one count made before any landed."""

    def __init__(self, waiting: int) -> None:
        super().__init__(f"{waiting} names waiting")
        self.waiting = waiting


class SchemaTooNew(Exception):
    """The inventory was made by a newer hsmca: this code must not touch it."""


class CAExists(Exception):
    """A CA cannot be made or moved into an inventory that holds one already."""


class NoInventory(Exception):
    """The database named holds no hsmca inventory at all: a wrong URL, which must not
    be given one (and this node's log) on the way to the refusal."""


class NodeNameTaken(Exception):
    """Another process claimed the node whose log this process writes (a second
    `hsmca serve --node` of its name, which took the name while PostgreSQL was away):
    that process writes the log now, and this one's group is refused."""


class AuditLinesMissing(Exception):
    """The store lacks the line just before a group of a node's audit lines: lines it
    had committed are gone (the database was restored from an older backup, or failed
    over to a lagging replica)."""

    def __init__(self, missing: int, why: str) -> None:
        super().__init__(why)
        self.missing = missing

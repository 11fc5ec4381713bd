"""Several nodes, one policy: each node says which [policy] it has in force, and the
others compare.

Every node reads `[policy]` from its own copy of hsmca.toml, and a SIGHUP reloads one
node. A `deny` added to one host's file and reloaded there off-boarded a service on that
node only: behind a load balancer its renewals went on through the others, and no
node said a word (a cluster trial). So each node's primary records its settings in
the inventory at start and at each reload, and says at once whether the running nodes
agree; /health says it too, for as long as they differ. A difference is not an
outage (each node still decides by a policy its operator wrote): /health stays 200.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import structlog

from ca.policy import Policy, settings
from ca.store import Store

log = structlog.get_logger("hsmca.policy")


def settings_of(policy: Policy) -> dict[str, Any]:
    """The policy's settings (ca.policy.settings), each list sorted: the lists are sets
    of names, and the same entries in another order on another node are the same
    policy (a review)."""
    return {name: sorted(value) if isinstance(value, list) else value
            for name, value in settings(policy).items()}


def differences(node: str, running: dict[str, str]) -> dict[str, list[str]]:
    """For each other running node whose settings differ from `node`'s: the settings
    that differ (by name), sorted. Empty when they agree, or `node`'s are not known."""
    if node not in running:
        return {}
    own = _read(running[node])
    apart: dict[str, list[str]] = {}
    for other, text in sorted(running.items()):
        theirs = _read(text)
        if other != node and (names := sorted(k for k in own.keys() | theirs.keys()
                                              if own.get(k) != theirs.get(k))):
            apart[other] = names
    return apart


def _read(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def describe(node: str, running: dict[str, str]) -> str:
    """What /health says: the same on N running nodes, or where they differ and what to
    do about it."""
    apart = differences(node, running)
    if not apart:
        return f"the same on {len(running)} running node{'s' if len(running) != 1 else ''}"
    named = "; ".join(f"node {other} in {', '.join(names)}" for other, names in apart.items())
    return (f"differs from {named}: give every node's hsmca.toml the same [policy] and "
            "reload each node (SIGHUP)")


class PolicyWatch:
    """This node's side of the comparison: its settings recorded, and what it last said
    of the running nodes'. Another node's reload or start moves the store's "policy"
    counter, and every node says a change of the verdict too: before, only the node
    reloaded said the nodes agreed again, and the other's log ended on its error (a
    cluster trial)."""

    def __init__(self, store: Store, node: str) -> None:
        self.store, self.node = store, node
        self.said: dict[str, list[str]] | None = None  # the differences last said
        # One comparison at a time, in order: a recheck that read the records before a
        # later one must not say its older verdict after it; and this node's own record
        # (whose notice comes back as a recheck) is said once, by its publish.
        self._turn = asyncio.Lock()

    async def publish(self, policy: Policy) -> None:
        """Record this node's settings and say whether the running nodes agree (said at
        every start and reload, changed or not): an error log line naming the others
        that differ, which stays until their [policy] is the same."""
        async with self._turn:
            await self.store.put_node_policy(self.node, json.dumps(settings_of(policy),
                                                                   sort_keys=True))
            await self._say(always=True)

    async def withdraw(self) -> None:
        """This node stops: it is compared no more, and the others say so if that makes
        them agree (a node whose [policy] differed, taken out, left the others' logs on
        their error: a review)."""
        async with self._turn:
            await self.store.put_node_policy(self.node, None)

    async def recheck(self) -> None:
        """A node recorded its settings, or stopped: said only if the verdict changed."""
        async with self._turn:
            await self._say(always=False)

    async def _say(self, always: bool) -> None:
        running = await self.store.running_node_policies()
        apart = differences(self.node, running)
        if not always and apart == self.said:
            return
        self.said = apart
        if apart:
            log.error("this node's [policy] differs from other running nodes': a request "
                      "is decided differently by the node that takes it; give every "
                      "node's hsmca.toml the same [policy] and reload each node (SIGHUP)",
                      node=self.node,
                      differs_from={n: ", ".join(k) for n, k in apart.items()})
        elif len(running) > 1:
            log.info("[policy] is the same on every running node", running=len(running))

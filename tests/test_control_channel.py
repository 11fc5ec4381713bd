"""A worker's control channel from the primary: the policy it decides by. What the
worker does with a frame it cannot read, tested on a socket pair (no daemon needed:
the primary's config checks make such a frame impossible to send from the outside)."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import struct

import msgspec
import pytest

from ca import ipc
from ca.daemon.control import ControlClient, NewPolicy
from ca.policy import Policy

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_a_policy_the_worker_cannot_read_stops_it_instead_of_the_old_one_deciding(
) -> None:
    ours, primary = socket.socketpair()
    stopped = asyncio.Event()
    client = ControlClient(ours, on_unreadable=stopped.set)
    primary.sendall(ipc.encode(NewPolicy(0, Policy())))
    await client.start()
    assert client.policy == Policy()
    # A newer policy it reads, then one whose allow list holds a number.
    newer = dataclasses.replace(Policy(), deny=("old.example",))
    primary.sendall(ipc.encode(NewPolicy(1, newer)))
    bad = msgspec.msgpack.encode({"type": "policy", "version": 2,
                                  "policy": {**msgspec.to_builtins(newer), "allow": [1]}})
    primary.sendall(struct.pack(">I", len(bad)) + bad)
    await asyncio.wait_for(stopped.wait(), timeout=10)
    assert client.policy == newer  # what it decided by until then
    await client.close()
    primary.close()

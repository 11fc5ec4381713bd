"""`hsmca key hand-over`: on a CA of several nodes, the audit key's hand-over on a log
that no running process writes (docs/keys.md, the audit key).

After `hsmca key rotate audit`, each log hands over from the previous audit key to the
new one at its next checkpoint, signed by both. The old key can be retired only once
every log has done so. A retired key no longer signs, and a log whose latest checkpoint
only it signed would verify with neither key. A running node hands over within a
second. Two kinds of log are written by no running process:

- `init`'s, the log of the offline ceremonies: before this command, it handed over only
  at the root's next rotation, which needs every node stopped;
- the log of a node that has gone for good: it never handed over.

So the old audit key stayed usable, and unretirable, for as long as either existed.
For such a log, this command does what a node's start does. It holds the log (the
node's name, as a running node holds it; init's lock). It brings the log level with
PostgreSQL, and on a host that never held the log it writes the file from there. Then
it signs a checkpoint of the audit keys in use, audited like any other, and publishes
it where every node serves it from. The nodes that run go on serving.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ca.audit import cluster
from ca.audit.checkpointer import Checkpointer, publish_key, published_keys
from ca.audit.cluster_tiles import TileCopy
from ca.audit.cluster_tiles import catch_up as catch_up_tiles
from ca.audit.log import AuditLog
from ca.audit.note import parse_checkpoint
from ca.config import Config
from ca.daemon.keys import load_issuers
from ca.errors import CLIError
from ca.issuance.pipeline import SigningPipeline
from ca.store import open_store


@dataclass(frozen=True)
class HandedOver:
    log: str  # "init" or the node's name
    size: int  # the checkpoint's tree size
    active: str  # the audit key it hands over to
    previous: tuple[str, ...]  # and the keys that signed beside it


async def hand_over(config: Config, node: str | None) -> HandedOver:
    """Sign a checkpoint of the audit keys in use on init's log (`node` None) or on
    the log of `node`, which must not be running."""
    if not config.cluster:
        raise CLIError("a CA on one node has no log that no process writes: the daemon "
                       "hands over at its next checkpoint, within a second of the rotation")
    if node == cluster.CEREMONIES:
        node = None
    local = config if node is None else config.for_node(node)
    name = node or cluster.CEREMONIES
    if config.softhsm_conf:
        os.environ["SOFTHSM2_CONF"] = config.softhsm_conf
    from ca.store.postgres import PostgresStore
    store = open_store(config.store_location)
    assert isinstance(store, PostgresStore)
    lease = None
    try:
        if node is not None:
            if node not in {n for n, _, _ in await store.audit_logs()}:
                raise CLIError(f"the CA has no log of a node {node!r} (GET /v1/audit/logs "
                               "lists them)")
            lease = store.lease(f"node:{node}")
            if not await lease.try_take():
                raise CLIError(f"node {node!r} is running: it hands over at its next "
                               "checkpoint by itself (within a second of the rotation)")
        cluster.sync_local_log(local.audit_log, local.checkpoint_path, store, name)
        audit = AuditLog.open(local.audit_log, local.checkpoint_path,
                              published_keys(config.audit_key_pem),
                              mirror=cluster.mirror(store, name, local.audit_log))
        try:
            catch_up_tiles(audit, store, name)
            audit.on_tiles = TileCopy(store, name)
            pipeline = SigningPipeline(config.hsm, audit)
            try:
                pipeline.start()
                issuers = await load_issuers(store, pipeline)
                keys = [issuers.audit, *issuers.audit_previous]
                latest = (parse_checkpoint(local.checkpoint_path.read_text("utf-8"))
                          if local.checkpoint_path.exists() else None)
                if not issuers.audit_previous:
                    raise CLIError("no audit key is previous: there is nothing to hand "
                                   "over (hsmca key rotate audit makes one)")
                await audit.append("key.ceremony", what="audit key hand-over", log=name,
                                   active=issuers.audit.label,
                                   previous=[k.label for k in issuers.audit_previous],
                                   after=None if latest is None else latest.size)
                text = await Checkpointer(
                    audit, pipeline, keys, local.audit_origin, local.checkpoint_path,
                    on_handover=publish_key(config.audit_key_pem),
                    on_checkpoint=cluster.publisher(store, name)).checkpoint()
            finally:
                # The HSM's logout lines are the log's last, committed before it closes.
                pipeline.close()
        finally:
            audit.close()
    finally:
        if lease is not None:
            lease.close()
        store.close()
    return HandedOver(name, parse_checkpoint(text).size, issuers.audit.label,
                      tuple(k.label for k in issuers.audit_previous))

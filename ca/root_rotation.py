"""`hsmca key rotate-root`: a new root, with the daemon stopped (docs/keys.md, the root).

A new root changes what every relying party trusts, so it is a ceremony the operator
runs on the CA host, never an API call: a daemon that could mint a root on request is
one whose compromise mints roots. It holds the audit log's lock, so it cannot run
beside the daemon, and every step is in the log like init's:

1. a new root key in the token (`hsm.keygen`), of the old root's type, and its
   self-signed certificate, with the old root's name;
2. the two certificates that join the roots (RFC 4210 section 4.4): the new key
   certified by the old root (NewWithOld: a relying party that trusts only the old
   root accepts what the new one anchors) and the old key by the new root
   (OldWithNew: the other way round). Both roots have the same name, so these are
   self-issued and do not count against the roots' path length of one;
3. a new issuing key certified by the new root: certificates issued from the next
   start chain to it, served with NewWithOld and the old root;
4. the inventory: the new root and issuing keys active, the old ones previous (the old
   issuing key keeps signing CRLs and OCSP for what it issued), the cross-certificates
   recorded; the state directory's certificate files, a new TLS certificate for the
   daemon, and a checkpoint over it all.

Once every relying party trusts the new root, `hsmca key retire` the old root: chains
end at the new root alone.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    load_pem_public_key,
)

from ca import ra
from ca.audit.checkpointer import Checkpointer, keys_to_open_with, publish_key
from ca.audit.cluster import CEREMONIES
from ca.audit.log import AuditKeys, AuditLog
from ca.config import Config
from ca.daemon.keys import load_issuers, seed
from ca.errors import CLIError
from ca.fileutil import write_atomic
from ca.issuance import issuers as iss
from ca.issuance import profiles as prof
from ca.issuance.issue import Issuance, decision_context, sign_ca_cert
from ca.issuance.pipeline import SigningPipeline
from ca.lifecycle import write_bundle, write_chain_files
from ca.local_certs import local_cert
from ca.policy import Refused
from ca.server_cert import TLS_DAYS, replace_pair, server_names
from ca.store import CrossCert, KeyRecord, Store, open_store
from hsm.session import KeyInfo

if TYPE_CHECKING:  # psycopg is loaded only where a cluster runs
    from ca.store.postgres import Lease


@dataclass(frozen=True)
class RootRotated:
    root: str  # the new root key's label
    previous: str
    issuing: str  # the new issuing key's label
    files: tuple[Path, ...]


async def rotate_root(config: Config) -> RootRotated:
    """Run the ceremony on `config`'s state directory; the daemon must be stopped
    (AuditLogError naming the lock otherwise)."""
    if config.softhsm_conf:
        os.environ["SOFTHSM2_CONF"] = config.softhsm_conf
    audit_key = load_pem_public_key(config.audit_key_pem.read_bytes())
    if not isinstance(audit_key, Ed25519PublicKey):
        raise ValueError(f"{config.audit_key_pem} is not an Ed25519 public key")
    # Cluster mode: the ceremony's lines go on init's log in PostgreSQL too.
    store: Store | None = open_store(config.store_location) if config.cluster else None
    try:
        # Init's log hands over here, at the root's rotation: its last checkpoint may be
        # the previous audit key's alone, while the state directory's is the new key.
        audit = _ceremony_log(config, audit_key if store is None else
                              await keys_to_open_with(config.audit_key_pem, store), store)
    except BaseException:
        if store is not None:
            store.close()
        raise
    pipeline = SigningPipeline(config.hsm, audit)
    nodes: list[Lease] = []
    try:
        if store is not None:
            nodes = await _hold_every_node(store)
        if store is None:
            store = open_store(config.store_location)
        # Refused by the key records before the HSM is opened: a refused ceremony wrote
        # its session's lines after the clean stop's checkpoint, and an offline `audit
        # verify` failed on them until the daemon ran again (a key trial).
        _decide(config, [r for r in await store.keys() if r.kind == "root"])
        pipeline.start()
        await seed(config, store, pipeline)
        before = await load_issuers(store, pipeline)
        try:  # decided before any key is made
            ra.order(decision_context(config.policy, before), ra.Local(),
                     ra.KeyRequest("rotate", "root"))
        except Refused as exc:
            raise CLIError(exc.detail) from None
        await audit.append("key.ceremony", what="root rotation", phase="start",
                           previous=before.root_key.label)
        done = await _ceremony(config, store, pipeline, before)
        await audit.append("key.ceremony", what="root rotation", phase="done",
                           root=done.root, previous=done.previous, issuing=done.issuing,
                           files=[str(p.relative_to(config.state_dir)) for p in done.files])
        after = await load_issuers(store, pipeline)
        await Checkpointer(audit, pipeline, [after.audit, *after.audit_previous],
                           config.audit_origin, config.checkpoint_path,
                           on_handover=publish_key(config.audit_key_pem),
                           on_checkpoint=_publisher(store)).checkpoint()
        return done
    finally:
        # The HSM's logout lines are the log's last: written (and, on a cluster,
        # committed in PostgreSQL) before the log and then the store close.
        pipeline.close()
        audit.close()
        for lease in nodes:
            lease.close()
        if store is not None:
            store.close()


class _RecordedRoots(ra.NoIssuers):
    """What the decision to rotate the root reads, from the key records alone."""

    def __init__(self, previous_root: str | None) -> None:
        self.previous_root = previous_root


def _decide(config: Config, roots: list[KeyRecord]) -> None:
    if not roots:  # records not seeded yet (an old CA): decided once they are
        return
    previous = iss.previous_root(roots)
    try:
        ra.order(decision_context(config.policy, _RecordedRoots(
            previous.label if previous is not None else None)), ra.Local(),
                 ra.KeyRequest("rotate", "root"))
    except Refused as exc:
        raise CLIError(exc.detail) from None


async def refuse_running_nodes(config: Config) -> None:
    """Cluster mode: CLIError now if a node runs, before the operator is asked (a
    cluster trial was told only after its "yes"); rotate_root holds them all anyway."""
    if not config.cluster:
        return
    store = open_store(config.store_location)
    try:
        for lease in await _hold_every_node(store):
            lease.close()
    finally:
        store.close()


async def _hold_every_node(store: Store) -> list[Lease]:
    """Cluster mode: the ceremony's lock is init's log, which no node holds; so take
    every node's name as well (the lock a running node holds, docs/cluster.md). A node
    that serves is refused by name; one that is stopped cannot start until the
    ceremony is over, since its TLS chain and trust bundle change under it."""
    from ca.store.postgres import PostgresStore
    assert isinstance(store, PostgresStore)
    held: list[Lease] = []
    try:
        for node, _, _ in await store.audit_logs():
            if node == CEREMONIES:
                continue
            lease = store.lease(f"node:{node}")
            held.append(lease)
            if not await lease.try_take():
                raise CLIError(f"node {node!r} is running: stop every node before the "
                                    "root's rotation (docs/keys.md), then start them again")
            # And its log claimed: a node whose name's session had just ended (a
            # PostgreSQL restart) went on serving beside the ceremony (a fencing trial);
            # its groups are refused until it has its name back, after the ceremony.
            await store.claim_node(node, lease.token)
    except BaseException:
        for lease in held:
            lease.close()
        raise
    return held


def _ceremony_log(config: Config, audit_key: AuditKeys, store: Store | None
                  ) -> AuditLog:
    if store is None:
        return AuditLog.open(config.audit_log, config.checkpoint_path, audit_key)
    from ca.audit import cluster
    from ca.store.postgres import PostgresStore
    assert isinstance(store, PostgresStore)
    cluster.sync_local_log(config.audit_log, config.checkpoint_path, store,
                           cluster.CEREMONIES)
    return AuditLog.open(config.audit_log, config.checkpoint_path, audit_key,
                         mirror=cluster.mirror(store, cluster.CEREMONIES, config.audit_log))


def _publisher(store: Store) -> Callable[[int, str], Awaitable[None]] | None:
    from ca.audit import cluster
    from ca.store.postgres import PostgresStore
    if not isinstance(store, PostgresStore):
        return None
    return cluster.publisher(store, cluster.CEREMONIES)


async def _ceremony(config: Config, store: Store, pipeline: SigningPipeline,
                    before: iss.Issuers) -> RootRotated:
    old_key, old_root = before.root_key, before.root
    now = prof.utcnow()
    suffix = f"{now:%Y%m%d%H%M%S}-{secrets.token_hex(2)}"
    # Every signature first, every record after: a failure half-way leaves the
    # inventory as it was (and the log says which keys were made).
    new_key = await pipeline.generate_key(f"root-ca-{suffix}", old_key.key_type)
    # The operator decided the ceremony; the registration authority still orders each
    # certificate of it (SPEC 11), and refuses what would not chain.
    ctx = decision_context(config.policy, before)

    async def make(signer: KeyInfo, request: ra.Request) -> x509.Certificate:
        return await sign_ca_cert(pipeline, signer, ra.order(ctx, ra.Local(), request))

    root = await make(new_key, ra.RootRequest(new_key.label, new_key.public_key,
                                              old_root.subject))
    new_with_old = await make(old_key, ra.CrossRequest(old_key.label, old_root, root))
    old_with_new = await make(new_key, ra.CrossRequest(new_key.label, root, old_root))
    # The issuing key once the roots are joined: a refusal above leaves one key behind.
    issuing_key = await pipeline.generate_key(f"issuing-ca-{suffix}",
                                              before.current.key.key_type)
    issuing = await make(new_key, ra.IntermediateRequest(
        issuing_key.public_key, prof.issuing_ca_name(prof.ca_name(old_root), suffix),
        signer=new_key.label, issuer=root, public_url=config.public_url))

    at = prof.utcnow().isoformat()

    def record(info: KeyInfo, kind: str, cert: x509.Certificate) -> KeyRecord:
        return KeyRecord(info.label, kind, "active", info.key_type, at, info.spki_sha256,
                         info.uri, cert.public_bytes(Encoding.DER), at)

    # One transaction: a ceremony cut short before it leaves the inventory as it was,
    # never a new root without its cross certificates or its issuing key.
    await store.rotate_keys(
        [record(new_key, "root", root), record(issuing_key, "issuing", issuing)],
        [CrossCert(new_key.label, old_key.label, new_with_old.public_bytes(Encoding.DER), at),
         CrossCert(old_key.label, new_key.label, old_with_new.public_bytes(Encoding.DER), at)])

    after = await load_issuers(store, pipeline)
    x509_dir = config.root_pem.parent
    files = {config.root_pem: prof.pem(root),
             x509_dir / "roots.pem": "".join(prof.pem(c) for c in after.roots),
             x509_dir / "cross.pem": prof.pem(new_with_old) + prof.pem(old_with_new)}
    for path, text in files.items():
        write_atomic(path, text)
    write_chain_files(x509_dir, after)
    await write_bundle(config.bundle_pem, store)
    # The daemon's TLS certificate from the new issuer, served with the chain that
    # both roots' relying parties can follow.
    issuance = Issuance(pipeline, store, iss.Fixed(after), None,
                        CEREMONIES if config.cluster else None)  # the log it signs in
    tls_pem, tls_key, _ = await local_cert(issuance, config.policy, role="server",
                                           names=server_names(config.dns_name),
                                           days=TLS_DAYS)
    # (the one it replaces is revoked as superseded by the daemon's first round)
    replace_pair(config, tls_key, tls_pem + after.current.chain_pem)
    written = [*files, x509_dir / "issuing.pem", x509_dir / "chain.pem", config.bundle_pem,
               config.tls_cert, config.tls_key]
    return RootRotated(new_key.label, old_key.label, issuing_key.label, tuple(written))


"""The CA's keys in a process of the daemon: recorded in the inventory, loaded from the
token, turned into issuers, and rebuilt when any process rotates, retires or
destroys one (the shared `keys` counter moves; ca/generations.py).

At the first start of a state directory made before keys were recorded, the keys the
config names are recorded (every certificate checked against its key first: a
swapped token or state directory is refused), and records made before issuers were
named get the keys `init` made.
"""

from __future__ import annotations

import dataclasses

import structlog
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from ca.config import KEY_LABELS, Config
from ca.generations import Generations, OnChange
from ca.issuance import issuers as iss
from ca.issuance.pipeline import SigningPipeline
from ca.issuance.profiles import utcnow
from ca.store import KeyRecord, Store
from hsm.errors import HSMError, KeyNotFound

log = structlog.get_logger("hsmca.keys")


class Keyring:
    """The issuers of this process, as of the last `refresh`."""

    def __init__(self, store: Store, pipeline: SigningPipeline,
                 generations: Generations) -> None:
        self.store, self.pipeline = store, pipeline
        self._on = OnChange(generations, "keys", self._build)
        self.issuers: iss.Issuers

    async def refresh(self) -> iss.Issuers:
        _, self.issuers = await self._on.get()
        return self.issuers

    async def _build(self) -> iss.Issuers:
        return await load_issuers(self.store, self.pipeline)


async def load_issuers(store: Store, pipeline: SigningPipeline) -> iss.Issuers:
    """The issuers the inventory records, every key in use found in the token."""
    records = await store.keys()
    infos = {}
    for r in records:
        if r.state not in ("active", "previous", "next"):
            continue
        try:
            infos[r.label] = await pipeline.load_key(r.label)
        except KeyNotFound:
            # The inventory knows this key, so this is the CA's token or a copy of it: a
            # key gone since (destroyed after a backup restored now, removed by hand) is
            # likelier than another token (a key lifecycle trial: "was `hsmca init` run
            # against this token?" sent the operator looking for another token).
            # Or the token is the older copy: a restore trial put back a token backup
            # taken before a rotation beside the newest state backup, and was told the
            # key was destroyed.
            raise KeyNotFound(
                f"the inventory lists the {r.kind} key {r.label!r} (made {r.created_at}) as "
                f"{r.state}, and the token does not hold it: the token was restored from a "
                f"backup taken before that key was made (restore a token backup taken since, "
                f"which holds it), or the key was destroyed or removed after this inventory "
                f"was written (a backup restored from before `hsmca key destroy`? restore the "
                f"newest backup: docs/operator.md, \"Backup and restore\"), or [hsm] in "
                f"hsmca.toml names another token") from None
    issuers = iss.build(records, infos, await store.cross_certs())
    pipeline.expect_keys(infos)
    return issuers


async def seed(config: Config, store: Store, pipeline: SigningPipeline) -> None:
    """Record the config's keys if the inventory has none yet (a state directory made
    before keys were recorded), each certificate checked against its key. Once it has
    them, the inventory says which keys are in use (rotations change them there), and
    [keys] is only checked for labels the CA never had: a typo, or another CA's."""
    records = await store.keys()
    if records:
        await _keep_ssh_public_keys(store, pipeline, records)
        known = {r.label: r.state for r in records}
        for purpose in KEY_LABELS:
            label = config.key_label(purpose)
            if label not in known:
                log.warning("the config's [keys] names a key this CA does not have; the "
                            "keys in use are the inventory's (hsmca key list), so it is "
                            "ignored", purpose=purpose, label=label, config=str(config.path))
            elif known[label] in ("retired", "destroyed"):
                # Said, not a fault: [keys] names the keys init made, and rotations change
                # the inventory alone (a key trial read it as the keys in use).
                log.info("the config's [keys] names a key that is retired now; the keys in "
                         "use are the inventory's (hsmca key list; the start's "
                         "\"listening\" line names them)", purpose=purpose, label=label,
                         state=known[label], config=str(config.path))
        return
    if not sum((await store.signed_by()).values()):
        # Not a state directory from before keys were recorded (its inventory holds the
        # certificates init made): an empty one, which taken as it is forgot every
        # certificate and revocation (a disaster trial).
        from ca.store.errors import NoInventory
        raise NoInventory(
            f"the inventory {config.store_location} holds no key and no certificate, while "
            "hsmca init records both: it is not this CA's (emptied, or made anew). Restore "
            "the newest backup (docs/operator.md, \"Backup and restore\"); served as it "
            "is, it would forget every certificate and revocation")
    keys = {purpose: await pipeline.load_key(config.key_label(purpose))
            for purpose in KEY_LABELS}
    root = x509.load_pem_x509_certificate(config.root_pem.read_bytes())
    issuing = x509.load_pem_x509_certificate(config.issuing_pem.read_bytes())
    if root.public_key() != keys["root"].public_key:
        raise ValueError(f"{config.root_pem} does not belong to the root key in the HSM")
    if issuing.public_key() != keys["issuing"].public_key:
        raise ValueError(f"{config.issuing_pem} does not belong to the issuing key in the HSM")
    await record_init_keys(store, keys, root, issuing)


async def _keep_ssh_public_keys(store: Store, pipeline: SigningPipeline,
                                records: list[KeyRecord]) -> None:
    """SSH CA keys recorded before the inventory kept their public keys get them, from
    the token (a retired one is still there): the KRL names their revoked certificates
    after they are retired (KeyRecord.ssh_public_key)."""
    filled = []
    for r in records:
        if r.ssh_public_key is not None or r.state == "destroyed" or \
                r.kind not in ("ssh-user", "ssh-host"):
            continue
        try:
            info = await pipeline.load_key(r.label)
        except HSMError as exc:  # not in the token any more: a KRL without its section
            log.warning("an SSH CA key the inventory lists is not in the token; the KRL "
                        "cannot name its revoked certificates", label=r.label,
                        error=str(exc))
            continue
        filled.append(dataclasses.replace(r, ssh_public_key=iss.ssh_public_key(r.kind, info)))
    if filled:
        await store.add_keys(filled)


async def record_init_keys(store: Store, keys: dict[str, iss.KeyInfo],
                           root: x509.Certificate, issuing: x509.Certificate) -> None:
    await store.add_keys(iss.seed_records(keys, root, issuing, utcnow().isoformat()))
    await store.name_first_issuers(keys["issuing"].label, {
        "user": keys["ssh_user"].label, "host": keys["ssh_host"].label})


async def open_keyring(config: Config, store: Store, pipeline: SigningPipeline,
                       generations: Generations) -> Keyring:
    """The keyring of a process: every key found and checked non-exportable, every
    certificate matched to its key, the audit key matched to the state directory's."""
    ring = Keyring(store, pipeline, generations)
    issuers = await ring.refresh()
    if issuers.audit.key_type != "ed25519":
        raise ValueError("the audit key must be Ed25519 (C2SP signed notes)")
    published = load_pem_public_key(config.audit_key_pem.read_bytes())
    if all(published != k.public_key for k in (issuers.audit, *issuers.audit_previous)):
        raise ValueError(f"{config.audit_key_pem} does not belong to an audit key in the HSM")
    return ring

"""The inventory behind one typed interface: every SQL statement of hsmca lives in
an implementation of `Store`: ca/store/sqlite.py, the embedded default, and
ca/store/postgres.py for several nodes (docs/cluster.md). One suite of store tests
(tests/test_store_*.py, tests/test_acme_store.py) runs against both.

Methods are domain verbs, never CRUD. Reads and most writes are coroutines for the
event loop. The writes of the signing transaction (`add_cert`, `add_ssh_cert`) are
called on the signing thread and return a future that resolves once the row is
committed: the signing pipeline releases nothing before that.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, TypeGuard

from ca.store.errors import NoInventory
from ca.store.records import (
    AcmeAccount,
    AcmeAuthz,
    AcmeCert,
    AcmeChallenge,
    AcmeEAB,
    AcmeOrder,
    CertPage,
    CertQuery,
    CertRecord,
    CRLRecord,
    CrossCert,
    IssuanceCount,
    IssuedCert,
    KeyRecord,
    NewCert,
    NewSSHCert,
    NewToken,
    OCSPDue,
    OCSPRecord,
    Revoked,
    SSHCertPage,
    SSHCertQuery,
    SSHCertRecord,
    SSHSelector,
    TokenRecord,
)

if TYPE_CHECKING:
    from pathlib import Path

    from ca.store.postgres import PostgresStore

__all__ = ["AcmeAccount", "AcmeAuthz", "AcmeCert", "AcmeChallenge", "AcmeEAB", "AcmeOrder",
           "CRLRecord", "CertPage", "CertQuery", "CertRecord", "CrossCert", "IssuanceCount",
           "IssuedCert", "KeyRecord", "NewCert", "NewSSHCert", "NewToken", "OCSPDue",
           "OCSPRecord", "Revoked", "SSHCertPage", "SSHCertQuery", "SSHCertRecord",
           "SSHSelector", "Store", "TokenRecord", "open_store"]


class Store(Protocol):
    @property
    def schema_version(self) -> int:
        """The inventory's schema version once open (migrations run at open): the
        daemon.start line records it, so an auditor sees when the inventory changed."""
        ...

    @property
    def migrated_from(self) -> int | None:
        """The schema version this store's open migrated from (None: it migrated
        nothing; another process's open, `store move` or `key rotate-root`, may have):
        the daemon.start line records it, so an upgrade is in the audit log, and one a
        killed start cut short shows as migrating from the version between (an upgrade
        trial found neither)."""
        ...

    @property
    def healthy(self) -> bool: ...

    @property
    def problem(self) -> str | None:
        """Why it is not healthy, in words for /health; None while it is."""
        ...

    async def probe(self) -> None:
        """Ask the back-end whether it answers (for /health), so that `healthy` follows
        it; raises StoreUnavailable when it does not."""
        ...

    async def writes_held(self) -> str | None:
        """Why the CA's writes wait on another session's lock, for /health; None when
        they do not (PostgreSQL's is asked; a SQLite file's writers are this daemon's)."""
        ...

    def close(self) -> None: ...

    # ---- bootstrap tokens (only the SHA-256 of a secret is ever stored) ------------------

    async def add_token(self, token: NewToken) -> None: ...

    async def token_by_secret(self, secret_sha256: str) -> TokenRecord | None: ...

    async def consume_token(self, token_id: str, at: dt.datetime) -> bool:
        """Mark the token used; True for exactly one of concurrent callers."""
        ...

    async def release_token(self, token_id: str) -> None:
        """Make a used token usable again if nothing was issued with it."""
        ...

    async def settle_tokens(self, released: Sequence[str], spent_since: dt.datetime | None,
                            at: dt.datetime, enrolled: Sequence[str] = ()) -> tuple[int, int]:
        """At a start after a kill: tokens whose certificate (hex serial) is among
        `released` are recorded as released at `at` (the kill came between the outcome
        line and that write); with `spent_since`, tokens spent since then on which no
        certificate was recorded are given back (the kill came before one was), unless
        the log says they `enrolled` a certificate it released (an inventory copied
        before that row, as a backup is). How many of each."""
        ...

    async def token_released(self, token_id: str, at: dt.datetime) -> None:
        """Record that the certificate `token_id` enrolled was released (its outcome line
        durable): a retry of the same key may then be answered with it."""
        ...

    async def release_token_spent_on(self, serial: int) -> str | None:
        """Make the token spent on certificate `serial` usable again (the certificate
        was never released, and is revoked); its id, or None if no token was."""
        ...

    # ---- X.509 certificates ------------------------------------------------------------

    def add_cert(self, cert: NewCert) -> cf.Future[None]:
        """Insert an issued certificate (and mark its token as spent on it), from any
        thread; the future resolves once committed."""
        ...

    async def cert(self, serial: int) -> CertRecord | None: ...

    async def cert_by_fingerprint(self, fingerprint: str) -> CertRecord | None:
        """A certificate by the SHA-256 of its DER, with its ACME order if it has one."""
        ...

    async def revoked_certs(self) -> list[tuple[int, dt.datetime, str | None, str | None]]:
        """(serial, revocation time, reason, issuer label) of every revoked certificate."""
        ...

    async def lineage(self, serial: int, now: dt.datetime) -> list[int]:
        """Every certificate connected to `serial` by renewals (its predecessors, its
        successors, theirs), `serial` included, that is neither revoked nor expired."""
        ...

    async def live_certs_named(self, name: str, now: dt.datetime) -> list[int]:
        """Every unrevoked certificate that carries `name` and is live, or has a live SSH
        certificate issued on its strength (which would otherwise outlive an
        offboarding: `hsmca revoke --identity`). Not the daemon's own listener
        certificates (role `server`): no holder's, and named `localhost` as SSH hosts on
        loopback are, an offboarding revoked them unsaid (a relying-party trial)."""
        ...

    async def revoked_certs_named(self, name: str, now: dt.datetime
                                  ) -> list[tuple[int, str | None]]:
        """(serial, reason) of every revoked, unexpired certificate that carries `name`
        (not a text search: `name` among its names), the listener's aside as above."""
        ...

    async def live_certs_with_keys(self, spkis: Sequence[str], now: dt.datetime) -> list[int]:
        """Every unrevoked, unexpired certificate whose subject key's SPKI SHA-256 is
        among `spkis`."""
        ...

    async def revoke_certs(self, serials: Sequence[int], at: dt.datetime,
                           reason: str | None) -> Revoked:
        """Revoke those of `serials` that are not revoked yet, and every SSH certificate
        issued on the strength of any of them, in one transaction. With keyCompromise,
        those revoked for another reason take it too, keeping their revocation time (RFC
        5280 5.3.1 lets a reason become keyCompromise; a key found leaked after its
        certificate was revoked as superseded must still be barred): they are among the
        serials returned, as their responses must be signed again."""
        ...

    # ---- reading the inventory (auditors and operators: the read API, `hsmca ui`) -------
    # The records these return carry issued_at, audit_seq and acme_order.

    async def find_certs(self, query: CertQuery, now: dt.datetime,
                         soon: dt.datetime) -> CertPage:
        """The X.509 certificates `query` matches, one page of them, as of `now`; those
        live but ending before `soon` are "expiring" (see CertQuery)."""
        ...

    async def issued_cert(self, serial: int) -> IssuedCert | None:
        """A certificate's record and DER."""
        ...

    async def settled_cert(self, serial: int) -> IssuedCert | None:
        """issued_cert, read once no add_cert of `serial` can still commit. A commit the
        store gave up on (PostgreSQL's answer timeout) may land later: read as absent
        before it did, a row signed and never released was left live, OCSP-good, and
        held by nobody (a review). StoreUnavailable while such a commit is pending."""
        ...

    async def find_ssh_certs(self, query: SSHCertQuery, now: dt.datetime,
                             soon: dt.datetime) -> SSHCertPage:
        """The SSH certificates `query` matches, one page of them, as find_certs."""
        ...

    async def renewal_family(self, serial: int) -> list[CertRecord]:
        """Every certificate connected to `serial` by renewals (its predecessors, its
        successors, theirs), `serial` included, whatever their state, oldest first."""
        ...

    async def issuance_counts(self, since: dt.datetime, until: dt.datetime
                              ) -> list[IssuanceCount]:
        """Certificates issued in [since, until), X.509 and SSH, by kind and hour."""
        ...

    # ---- SSH certificates ----------------------------------------------------------------

    def add_ssh_cert(self, cert: NewSSHCert) -> cf.Future[None]: ...

    async def count_ssh_certs(self, which: SSHSelector, revoked: bool = False) -> int:
        """How many unrevoked SSH certificates `which` names (revoked ones, with
        `revoked`)."""
        ...

    async def revoke_ssh(self, which: SSHSelector, at: dt.datetime,
                         revoke_key: str | None = None) -> int:
        """Revoke the unrevoked SSH certificates `which` names and, with `revoke_key`
        (an OpenSSH public key line), the key itself; how many certificates it hit."""
        ...

    async def revoked_ssh_certs(self) -> list[tuple[str, int, str | None]]:
        """(cert type, serial, issuer label) of every revoked SSH certificate."""
        ...

    async def compromised_keys(self) -> list[str]:
        """The SPKI SHA-256 of every key a certificate was revoked for as keyCompromise:
        no certificate is issued for them again."""
        ...

    async def revoked_ssh_keys(self) -> list[str]: ...

    async def latest_ssh_revocation(self) -> dt.datetime | None:
        """When the newest SSH revocation (of a certificate or a key) was made: the KRL's
        version, the same in every process that builds it."""
        ...

    # ---- pre-signed OCSP responses ------------------------------------------------------

    async def ocsp_settle(self, now: dt.datetime, issuers: Sequence[str]) -> int:
        """Takes certificates that expired, or whose issuer is no longer among `issuers`
        (retired), off the due list for good; how many."""
        ...

    async def ocsp_due(self, now: dt.datetime, limit: int,
                       issuers: Sequence[str]) -> list[OCSPDue]:
        """Live certificates of `issuers` whose responses are due by `now`: new ones (a
        'pending' row is recorded with the certificate), revoked ones (revoke_certs makes
        them due), and those whose stored responses reach their refresh time; the
        longest-due first. Reads an index of what is due, not every certificate."""
        ...

    async def put_ocsp(self, responses: Sequence[OCSPRecord]) -> None:
        """Stores each certificate's responses and when they are next due; a 'good'
        response never replaces the row of a certificate revoked meanwhile."""
        ...

    async def ocsp(self, serial: int) -> OCSPRecord | None:
        """The signed responses of a certificate (None until its first are signed)."""
        ...

    # ---- CRLs ------------------------------------------------------------------------------

    async def next_crl_number(self, lead: dt.timedelta = dt.timedelta(0)
                              ) -> tuple[int, dt.datetime]:
        """A CRL number larger than any handed out before, and a time for it in whole
        seconds: now, or a second after the last one handed out if that is later, but at
        most `lead` ahead of now; so a larger number gets a later time (a CRL's
        thisUpdate comes from it, and OpenSSL chooses among CRLs by thisUpdate, keeping
        the first of equal ones), whichever process or node took it."""
        ...

    async def log_scanned(self, log: str) -> int:
        """How far (in bytes) the start's completion read the audit log `log` (0: not
        yet): ca/revocation/from_log.py."""
        ...

    async def set_log_scanned(self, log: str, end: int) -> None: ...

    # ---- several nodes: each one's [policy], compared (ca/cluster_policy.py) ----------

    async def put_node_policy(self, node: str, settings: str | None) -> None:
        """Record the [policy] settings `node` has in force (canonical JSON); None: it
        stops, and is compared no more. Every running node is told, to compare again. A
        single node (SQLite) has no other to compare with, and keeps nothing."""
        ...

    async def running_node_policies(self) -> dict[str, str]:
        """The settings each running node recorded, by node: only the nodes whose
        process holds its name now (a stopped node's are left out). Empty on SQLite."""
        ...

    async def keep_crl_numbers_above(self, number: int) -> None:
        """Make every CRL number handed out from now on larger than `number`."""
        ...

    async def add_crl(self, crl: CRLRecord) -> None: ...

    async def latest_crl(self, issuer: str | None) -> CRLRecord | None:
        """The newest CRL of an issuer (None: the first issuing key's)."""
        ...

    # ---- the CA's keys --------------------------------------------------------------------

    async def keys(self) -> list[KeyRecord]: ...

    async def add_keys(self, records: Sequence[KeyRecord]) -> None:
        """Record keys (those already recorded are left alone, but for an SSH public key
        they lack: recorded before the inventory kept it)."""
        ...

    async def stage_key(self, record: KeyRecord, active: str) -> bool:
        """Record `record` as its kind's `next` key, in one transaction, if the kind's
        active key is still `active` and it has no next key yet; else change nothing
        and return False (another staging or a rotation of the kind committed first)."""
        ...

    async def rotate_keys(self, new: Sequence[KeyRecord], cross: Sequence[CrossCert] = (),
                          replacing: Mapping[str, str] | None = None) -> list[str] | None:
        """Make each of `new` its kind's active key and the one active before it
        previous, and record `cross`, all in one transaction (a root ceremony's new
        root, its cross certificates and its new issuing key are there together or not
        at all); the labels that became previous. `replacing`, kind to label: the
        active key each kind must still have, and no staged key; if one has another, or
        a staged key (a rotation or staging of the same kind committed meanwhile, which
        this rotation would have promoted), nothing changes and None is returned."""
        ...

    async def promote_key(self, label: str, kind: str, at: str,
                          replacing: str | None = None) -> list[str] | None:
        """The `next` key `label` (staged with `add_keys`: published, signing nothing)
        becomes its kind's active key and the active one
        previous, in one transaction; the labels that became previous, or None when
        `label` is not a next key of `kind`, or the kind's active key is not `replacing`
        when that is given (it changed meanwhile: nothing changed)."""
        ...

    async def set_key_state(self, label: str, state: str, at: dt.datetime,
                            expect: str) -> bool:
        """Move a key from state `expect` to `state`; False if it was not in `expect`."""
        ...

    async def revoke_ca_key(self, label: str, at: dt.datetime, reason: str | None) -> bool:
        """The issuing key `label`'s CA certificate revoked by its root (its CRL lists it);
        False if it was revoked already."""
        ...

    async def name_first_issuers(self, x509_label: str, ssh: dict[str, str]) -> None:
        """Records made before issuers were named get the keys `init` made."""
        ...

    async def signed_by(self) -> dict[str | None, int]: ...

    async def live_signed_by(self, issuer: str | None, now: dt.datetime
                             ) -> tuple[int, str | None]:
        """(certificates, X.509 and SSH, that `issuer` signed and that are neither
        expired nor revoked at `now`, the latest notAfter among them). None: those
        recorded before issuers were named (the first issuing key's)."""
        ...

    async def live_renewed_by(self, issuer: str | None, now: dt.datetime) -> int:
        """How many of `live_signed_by`'s X.509 certificates have a renewal that is
        neither expired nor revoked: their holders have moved on, and renewing does not
        end them (they lapse at their notAfter)."""
        ...

    async def cross_certs(self) -> list[CrossCert]:
        """Every certificate one root key made for another, oldest first."""
        ...

    # ---- ACME (RFC 8555): accounts, orders, authorizations, challenges -------------------
    # An ACME certificate itself goes in with `add_cert` (NewCert.acme_account and
    # .acme_order), which links it to its account and makes its order valid in the same
    # transaction.

    async def add_acme_eab(self, eab: AcmeEAB) -> None: ...

    async def acme_eab(self, kid: str) -> AcmeEAB | None: ...

    async def acme_eabs(self, limit: int) -> list[AcmeEAB]:
        """The latest `limit` EAB keys, newest first, without their secrets: `mac_key`
        is b"" where the key is still held, None where it was erased."""
        ...

    async def withdraw_acme_eab(self, kid: str, at: dt.datetime) -> bool:
        """Erase the MAC key of an EAB key not yet bound, and end it at `at`; False if
        it is bound, withdrawn, erased at its expiry or unknown."""
        ...

    async def erase_expired_acme_eab_keys(self, at: dt.datetime) -> list[str]:
        """Erase the MAC key of every EAB key that expired unbound by `at`, keeping an
        empty one so that its state still reads expired, not withdrawn; the kids
        erased."""
        ...

    async def acme_accounts(self, limit: int) -> list[AcmeAccount]:
        """The latest `limit` ACME accounts, newest first."""
        ...

    async def add_acme_account(self, account: AcmeAccount, at: dt.datetime) -> bool:
        """Insert the account and, when it names an EAB key, spend that key (erasing
        its MAC key) in the same transaction; False if the key is spent or expired, or
        another account has this JWK."""
        ...

    async def acme_account(self, account_id: str) -> AcmeAccount | None: ...

    async def acme_account_by_thumbprint(self, thumbprint: str) -> AcmeAccount | None: ...

    async def set_acme_contact(self, account_id: str, contact: Sequence[str]) -> None: ...

    async def deactivate_acme_account(self, account_id: str) -> None:
        """Deactivate the account and its pending authorizations (RFC 8555 7.3.6)."""
        ...

    async def change_acme_key(self, account_id: str, old_thumbprint: str, thumbprint: str,
                              jwk: str) -> bool:
        """Replace the account's key if it is still `old_thumbprint`; False if it is not,
        or another account has the new key."""
        ...

    async def add_acme_order(self, order: AcmeOrder, authzs: Sequence[AcmeAuthz],
                             pending_cap: int | None = None) -> bool:
        """Insert an order with its authorizations and their challenges; False (and
        nothing inserted) if the certificate it `replaces` is replaced by another order
        already, one that has not failed (RFC 9773 5). With `pending_cap`, raise
        TooManyPending (nothing inserted) if the account's pending authorizations
        (`acme_pending_authzs` at the order's creation) and these would exceed it:
        counted in the inserting transaction, one account's orders one at a time."""
        ...

    async def acme_order(self, order_id: str) -> AcmeOrder | None: ...

    async def acme_order_ids(self, account_id: str, now: str, limit: int) -> list[str]:
        """The account's orders that are not invalid (an order expired before it was
        valid is), newest first (by the second), at most `limit` (RFC 8555 7.1.2.1)."""
        ...

    async def acme_pending_authzs(self, account_id: str, now: str) -> int:
        """How many of the account's authorizations are unexpired and pending, or were
        deactivated (their rows stay until their order is deleted, so deactivating must
        not make room: a review): what a new order's names add to is bounded (an account
        filled the inventory with orders it never validated, a security trial)."""
        ...

    async def acme_authorized(self, account_id: str, names: Sequence[str], now: str
                              ) -> bool:
        """Whether the account holds a valid, unexpired authorization for every one of
        `names` (a wildcard name needs a wildcard authorization of its base name): RFC
        8555 7.6 lets such an account revoke a certificate for them."""
        ...

    async def purge_acme_orders(self, before: str, batch: int = 1000) -> int:
        """Delete at most `batch` orders that never became valid (pending, ready or
        invalid) and expired before `before`, with their authorizations and
        challenges; how many. Valid orders stay: their certificates name them."""
        ...

    async def acme_authz(self, authz_id: str) -> AcmeAuthz | None: ...

    async def acme_challenge(self, challenge_id: str) -> AcmeChallenge | None: ...

    async def deactivate_acme_authz(self, authz_id: str) -> bool:
        """A client gives up a pending or valid authorization (RFC 8555 7.5.2); its order,
        if not finalized yet, can no longer be. False if it was neither."""
        ...

    async def start_acme_challenge(self, challenge_id: str, at: dt.datetime,
                                   stale_before: dt.datetime) -> bool:
        """pending -> processing, if its authorization is still pending; or processing
        again when its validation began before `stale_before` (the worker running it went
        away). True for exactly one of concurrent callers: it validates."""
        ...

    async def finish_acme_challenge(self, challenge_id: str, valid: bool, error: str | None,
                                    at: dt.datetime) -> None:
        """Record a validation's result: the challenge, its authorization and, once
        every authorization is valid (or one is invalid), its order."""
        ...

    async def begin_acme_finalize(self, order_id: str) -> bool:
        """ready -> processing: True for exactly one of concurrent callers."""
        ...

    async def fail_acme_finalize(self, order_id: str, status: str, error: str | None) -> None:
        """A finalization that issued nothing: the order goes back to `status`."""
        ...

    async def release_acme_order(self, order_id: str) -> None:
        """processing -> valid, once the certificate its row names (`add_cert` sets it and
        leaves the order `processing`) was released: its audit outcome is durable. Until
        then the order offers no certificate: a client polling it beside its finalize
        could fetch one that a failed outcome line leaves unreleased (a review)."""
        ...

    async def complete_acme_finalizes(self, audit_log: str | None) -> int:
        """At a start, once unreleased certificates are revoked (which reopens their
        orders): orders left `processing` with a certificate of this node's log (the
        stop came between its release and `release_acme_order`) become `valid`; how
        many."""
        ...

    async def reopen_acme_finalizes(self) -> int:
        """Every order left `processing` without a certificate goes back to `ready` (a
        start after the CA was killed while finalizing them, before anything was
        issued); how many."""
        ...

    async def reopen_acme_order_of(self, serial: int) -> str | None:
        """The order of the certificate `serial` (`valid`, or `processing` if it was never
        released) goes back to `ready`, without it (a certificate signed and never
        released, revoked: its client downloaded nothing, and finalizes again); the
        order's id, or None."""
        ...

    async def acme_cert(self, serial: int) -> AcmeCert | None: ...

    async def acme_secret(self, name: str, make: bytes) -> bytes:
        """The secret called `name` every process of the daemon shares (`make` is stored
        if there is none yet)."""
        ...

    async def redeem_acme_nonce(self, nonce_id: str, expires: dt.datetime,
                                at: dt.datetime) -> bool:
        """Mark a nonce used; False if it was used before (every worker sees it)."""
        ...

    async def acme_rate_take(self, kind: str, keys: Sequence[str], at: dt.datetime,
                             since: dt.datetime, limit: int | None) -> str | None:
        """Count one `kind` event for each key, unless a key already has `limit` of them
        since `since`: then count nothing and return that key. limit None: just count."""
        ...

    async def acme_rate_over(self, kind: str, keys: Sequence[str], since: dt.datetime,
                             limit: int) -> str | None:
        """The first key with `limit` or more `kind` events since `since`, if any."""
        ...

    async def acme_rate_frees(self, kind: str, key: str, since: dt.datetime,
                              limit: int) -> str | None:
        """When `key`'s `limit`-th newest `kind` event since `since` happened (ISO 8601):
        once it is a window old, the key is under the limit again. None if it is not."""
        ...


def is_postgres(location: object) -> bool:
    return str(location).startswith(("postgresql://", "postgres://"))


def clustered(store: Store | None) -> TypeGuard[PostgresStore]:
    """A PostgreSQL store (several nodes; a commit whose answer was lost may land
    later). A single node never loads psycopg: if the module is not loaded, no store
    can be of its class."""
    import sys
    if store is None or "ca.store.postgres" not in sys.modules:
        return False
    from ca.store.postgres import PostgresStore
    return isinstance(store, PostgresStore)


def _wal_of_another_file(path: Path) -> Path | None:
    """The write-ahead log beside an inventory in rollback-journal mode, which cannot be
    its own: a backup (`hsmca backup` turns WAL off in its copy) put where a killed
    daemon's inventory was. SQLite applies whatever log it finds to the file it opens,
    and the restored inventory was damaged, and served on (a restore trial)."""
    wal = path.with_name(path.name + "-wal")
    try:
        if wal.stat().st_size == 0:
            return None
        with open(path, "rb") as fh:
            header = fh.read(20)
    except OSError:
        return None  # no log, or no file: the checks below and SQLite say the rest
    # The file format's write and read versions: 1 rollback journal, 2 WAL.
    rollback = header.startswith(b"SQLite format 3\x00") and header[18:20] == b"\x01\x01"
    return wal if rollback else None


def refuse_another_files_wal(path: Path) -> None:
    """NoInventory if a write-ahead log that cannot be the inventory's is beside it
    (_wal_of_another_file). Asked at a start's outset, before anything opens the file:
    a read-only look at it applies the log as well (a review: the start's check of the
    log against the inventory read the damaged copy, and blamed the log)."""
    if (foreign := _wal_of_another_file(path)) is not None:
        raise NoInventory(
            f"the inventory {path} is a copy without a write-ahead log (as `hsmca backup` "
            f"writes it), yet {foreign} is beside it: the write-ahead log of the file it "
            "replaced, left by a stop that was not clean. SQLite would apply it to this "
            f"file and damage it: remove {foreign.name} and {path.name}-shm (they belong "
            "to the replaced file), then start again")


def open_store(location: object, *, autocheckpoint: bool = True, new: bool = False) -> Store:
    """The configured inventory: a `postgresql://` URL ([store] url, several nodes:
    docs/cluster.md), else the SQLite file at `location` (the embedded default), which
    must exist unless `new` (`hsmca init` makes it)."""
    if is_postgres(location):
        from ca.store.postgres import PostgresStore
        return PostgresStore(str(location), existing=True)
    from pathlib import Path

    from ca.store.sqlite import SQLiteStore
    path = Path(str(location))
    wal = path.with_name(path.name + "-wal")
    if not new and path.exists() and path.stat().st_size == 0 and not (
            wal.exists() and wal.stat().st_size > 0):  # (pages not yet copied from its WAL)
        # An empty file is no inventory either: taken for a new one, it forgot every
        # certificate and revocation as a missing one did (a disaster trial).
        raise NoInventory(
            f"the inventory {path} is empty (0 bytes; hsmca init made it, and every "
            "certificate and revocation is in it): was it truncated or replaced? Restore "
            "the newest backup (docs/operator.md, \"Backup and restore\")")
    if not new:
        refuse_another_files_wal(path)
    if not new and not path.exists():
        # A start on a new, empty inventory forgot every certificate and revocation, and
        # refused every client, the admin's too (a chaos trial moved the file away).
        raise NoInventory(
            f"the inventory {path} does not exist (hsmca init made it; every certificate "
            "and revocation is in it): was it moved or deleted? Put it back, or restore "
            "the newest backup (docs/operator.md, \"Backup and restore\"); a new, empty "
            "one would forget them all")
    return SQLiteStore(path, autocheckpoint=autocheckpoint, create=new)

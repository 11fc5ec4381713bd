"""The inventory in SQLite: the embedded default implementation of `ca.store.Store`.

Writes go through one thread that group-commits: every write that arrived while
the previous COMMIT (an fsync, with synchronous=FULL) ran is applied in the next
transaction, each in its own SAVEPOINT so one failing write cannot undo the others.
A caller's future resolves only after the COMMIT, so a row the daemon acknowledged
survives a crash. Reads use their own connection (WAL lets them run beside the
writer).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import datetime as dt
import json
import os
import queue
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ca.handoff import STOP, Batch, Coalescer, Sink, async_sink, claim, drain_queue, stop_thread
from ca.logs import logging_thread
from ca.store.errors import (
    NoInventory,
    SchemaTooNew,
    StoreDamaged,
    StoreUnavailable,
    TooManyPending,
)
from ca.store.records import (
    KEY_COLUMNS,
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
    authz_bases,
    authz_cover,
    crl_time,
    key_row,
    latest_of,
)

T = TypeVar("T")
KEEP_CRLS = 16
# An account's names waiting for validation (Store.acme_pending_authzs).
_PENDING_AUTHZS = ("SELECT count(*) FROM acme_authzs WHERE account_id = ? AND status IN "
                   "('pending', 'deactivated') AND expires > ?")


def _latest(not_after: str | None, valid_before: int | None) -> str | None:
    """The later of an X.509 notAfter (ISO 8601) and an SSH validBefore (Unix seconds),
    as ISO 8601; None if neither."""
    ssh = dt.datetime.fromtimestamp(int(valid_before), dt.UTC).isoformat() \
        if valid_before is not None else None
    return max(filter(None, (not_after, ssh)), default=None)


# Numbered migrations: the database's PRAGMA user_version says how many have run. Each
# runs in its own transaction at open; a database newer than this code is refused.
MIGRATIONS: tuple[str, ...] = (
    # 1: the first schema (databases made before versioning have its tables already).
    """
    CREATE TABLE IF NOT EXISTS certs (
        serial TEXT PRIMARY KEY,          -- hex, lower case
        fingerprint TEXT NOT NULL UNIQUE, -- SHA-256 of the DER certificate
        role TEXT NOT NULL,
        subject TEXT NOT NULL,
        names TEXT NOT NULL,              -- JSON list
        principals TEXT NOT NULL,         -- JSON list
        spki_sha256 TEXT NOT NULL,
        not_before TEXT NOT NULL,
        not_after TEXT NOT NULL,
        issued_at TEXT NOT NULL,
        revoked_at TEXT,
        reason TEXT,
        der BLOB NOT NULL
    );
    CREATE TABLE IF NOT EXISTS tokens (
        id TEXT PRIMARY KEY,
        secret_sha256 TEXT NOT NULL UNIQUE,
        role TEXT NOT NULL,
        names TEXT NOT NULL,
        principals TEXT NOT NULL,
        expires TEXT NOT NULL,
        created_at TEXT NOT NULL,
        created_by TEXT NOT NULL,
        used_at TEXT,
        used_serial TEXT
    );
    CREATE TABLE IF NOT EXISTS ssh_certs (
        serial TEXT PRIMARY KEY,          -- decimal uint64
        key_id TEXT NOT NULL,
        cert_type TEXT NOT NULL,          -- user | host
        key_sha256 TEXT NOT NULL,         -- SHA-256 of the subject public key blob
        public_key TEXT NOT NULL,
        principals TEXT NOT NULL,
        valid_after TEXT NOT NULL,
        valid_before TEXT NOT NULL,
        owner_serial TEXT NOT NULL,       -- the X.509 cert that asked for it
        issued_at TEXT NOT NULL,
        revoked_at TEXT
    );
    CREATE INDEX IF NOT EXISTS ssh_certs_key_id ON ssh_certs(key_id);
    CREATE INDEX IF NOT EXISTS ssh_certs_key ON ssh_certs(key_sha256);
    CREATE TABLE IF NOT EXISTS ssh_revoked_keys (
        public_key TEXT PRIMARY KEY,
        revoked_at TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS crls (
        number INTEGER PRIMARY KEY,       -- CRLNumber
        revoked INTEGER NOT NULL,         -- how many revocations it lists
        this_update TEXT NOT NULL,
        der BLOB NOT NULL
    );
    """,
    # 2: issuers by name, lineage (each certificate's predecessor), pre-signed OCSP.
    """
    ALTER TABLE certs ADD COLUMN issuer TEXT;        -- key label; NULL: the first issuing key
    ALTER TABLE certs ADD COLUMN renewed_from TEXT;  -- serial (hex) presented at renewal
    CREATE INDEX certs_renewed_from ON certs(renewed_from);
    CREATE INDEX ssh_certs_owner ON ssh_certs(owner_serial);
    CREATE TABLE ocsp_responses (
        serial TEXT PRIMARY KEY,          -- hex, as in certs
        status TEXT NOT NULL,             -- good | revoked
        this_update TEXT NOT NULL,
        next_update TEXT NOT NULL,
        der_sha1 BLOB NOT NULL,           -- the response to a SHA-1 CertID
        der_sha256 BLOB NOT NULL          -- and to a SHA-256 one
    );
    """,
    # 3: the CA's keys and their lifecycle; SSH certificates and CRLs name their issuer.
    """
    CREATE TABLE ca_keys (
        label TEXT PRIMARY KEY,           -- the key's label in the token
        kind TEXT NOT NULL,               -- root | issuing | ssh-user | ssh-host | audit
        state TEXT NOT NULL,              -- active | previous | retired | destroyed
        algorithm TEXT NOT NULL,
        created_at TEXT NOT NULL,
        fingerprint TEXT NOT NULL,        -- SHA-256 of the public key (SPKI)
        uri TEXT NOT NULL,                -- RFC 7512
        cert BLOB,                        -- issuing and root: its CA certificate (DER)
        changed_at TEXT NOT NULL
    );
    ALTER TABLE ssh_certs ADD COLUMN issuer TEXT;  -- NULL: the first key of its type
    ALTER TABLE crls ADD COLUMN issuer TEXT;       -- NULL: the first issuing key
    """,
    # 4: ACME (RFC 8555): EAB keys, accounts, orders, authorizations, challenges, the
    # certificate -> account link, redeemed nonces, rate-limit events, shared secrets.
    """
    CREATE TABLE acme_eab (
        kid TEXT PRIMARY KEY,
        mac_key BLOB,                     -- erased (NULL) once the key is used
        names TEXT NOT NULL,              -- JSON list of patterns
        expires TEXT NOT NULL,
        created_at TEXT NOT NULL,
        created_by TEXT NOT NULL,
        used_at TEXT,
        account_id TEXT
    );
    CREATE TABLE acme_accounts (
        id TEXT PRIMARY KEY,
        thumbprint TEXT NOT NULL UNIQUE,  -- RFC 7638, base64url
        jwk TEXT NOT NULL,
        status TEXT NOT NULL,
        contact TEXT NOT NULL,            -- JSON list
        names TEXT NOT NULL,              -- JSON list of patterns (from the EAB key)
        eab_kid TEXT,
        created_at TEXT NOT NULL
    );
    CREATE TABLE acme_orders (
        id TEXT PRIMARY KEY,
        account_id TEXT NOT NULL,
        status TEXT NOT NULL,
        names TEXT NOT NULL,              -- JSON list
        expires TEXT NOT NULL,
        created_at TEXT NOT NULL,
        cert_serial TEXT,
        error TEXT
    );
    CREATE INDEX acme_orders_account ON acme_orders(account_id);
    CREATE TABLE acme_authzs (
        id TEXT PRIMARY KEY,
        order_id TEXT NOT NULL,
        account_id TEXT NOT NULL,
        name TEXT NOT NULL,
        wildcard INTEGER NOT NULL,
        status TEXT NOT NULL,
        expires TEXT NOT NULL,
        position INTEGER NOT NULL         -- its place in the order's list
    );
    CREATE INDEX acme_authzs_order ON acme_authzs(order_id);
    CREATE TABLE acme_challenges (
        id TEXT PRIMARY KEY,
        authz_id TEXT NOT NULL,
        type TEXT NOT NULL,
        token TEXT NOT NULL,
        status TEXT NOT NULL,
        validated TEXT,
        error TEXT,
        position INTEGER NOT NULL,
        started TEXT                      -- when its validation last began
    );
    CREATE INDEX acme_challenges_authz ON acme_challenges(authz_id);
    CREATE TABLE acme_certs (
        serial TEXT PRIMARY KEY,          -- hex, as in certs
        account_id TEXT NOT NULL,
        order_id TEXT NOT NULL
    );
    CREATE INDEX acme_certs_account ON acme_certs(account_id);
    CREATE TABLE acme_nonces (
        id TEXT PRIMARY KEY,              -- redeemed nonces, until they would expire
        expires TEXT NOT NULL
    );
    CREATE INDEX acme_nonces_expires ON acme_nonces(expires);
    CREATE TABLE acme_rate (
        kind TEXT NOT NULL,
        key TEXT NOT NULL,
        at TEXT NOT NULL
    );
    CREATE INDEX acme_rate_key ON acme_rate(kind, key, at);
    CREATE TABLE acme_secrets (name TEXT PRIMARY KEY, value BLOB NOT NULL);
    """,
    # 5: reading the inventory (auditors, `hsmca ui`): where each certificate's intent is
    # in the audit log, and indexes for counts by hour and searches by expiry.
    """
    ALTER TABLE certs ADD COLUMN audit_seq INTEGER;  -- seq of its hsm.sign intent line
    CREATE INDEX certs_issued_at ON certs(issued_at);
    CREATE INDEX certs_not_after ON certs(not_after);
    CREATE INDEX ssh_certs_issued_at ON ssh_certs(issued_at);
    """,
    # 6: the certificates the roots made for each other when the root was rotated.
    """
    CREATE TABLE cross_certs (
        der BLOB PRIMARY KEY,
        subject_label TEXT NOT NULL,      -- the root key it certifies
        issuer_label TEXT NOT NULL,       -- the root key that signed it
        made_at TEXT NOT NULL
    );
    """,
    # 7: when each certificate's OCSP responses are next due ('' now, NULL never), so the
    # refresher reads an index of what is due instead of scanning every live certificate
    # each second. New certificates get a 'pending' row (due now) as they are recorded.
    # Existing rows are due half their validity (12 h) before their nextUpdate.
    """
    ALTER TABLE ocsp_responses ADD COLUMN refresh_at TEXT;
    UPDATE ocsp_responses SET refresh_at = CASE
        WHEN serial IN (SELECT serial FROM certs WHERE revoked_at IS NOT NULL)
             AND status = 'good' THEN ''
        ELSE strftime('%Y-%m-%dT%H:%M:%f+00:00', next_update, '-12 hours') END;
    INSERT INTO ocsp_responses (serial, status, this_update, next_update, der_sha1,
                                der_sha256, refresh_at)
        SELECT serial, 'pending', '', '', x'', x'', '' FROM certs
        WHERE serial NOT IN (SELECT serial FROM ocsp_responses);
    CREATE INDEX ocsp_responses_refresh_at ON ocsp_responses(refresh_at);
    """,
    # 8: cluster mode only (PostgreSQL): each node's Merkle tiles, from which every node
    # serves the others' tiles and proofs. A single node keeps its tiles in files.
    """
    SELECT 1;
    """,
    # 9: which audit log holds a certificate's intent line, at audit_seq: in cluster mode
    # the issuing node's; NULL: the CA's one log (a single node).
    """
    ALTER TABLE certs ADD COLUMN audit_log TEXT;
    """,
    # 10: the certificate an ACME order replaces (RFC 9773 5), as its canonical CertID:
    # one order at a time may replace it, unless that order failed.
    """
    ALTER TABLE acme_orders ADD COLUMN replaces TEXT;
    CREATE UNIQUE INDEX acme_orders_replaces ON acme_orders(replaces)
        WHERE replaces IS NOT NULL AND status <> 'invalid';
    """,
    # 11: an SSH CA key's public key (OpenSSH), kept once the key is retired or destroyed:
    # the KRL goes on naming the certificates of it that were revoked, for the hosts and
    # clients that still trust it. Filled at the daemon's start for keys recorded before.
    """
    ALTER TABLE ca_keys ADD COLUMN ssh_public_key TEXT;
    """,
    # 12: the keys revoked for keyCompromise, read by every process at each revocation
    # (no certificate is issued for them again): an index, not a scan of every row.
    """
    CREATE INDEX certs_key_compromise ON certs(spki_sha256) WHERE reason = 'keyCompromise';
    """,
    # 13: reasons by their RFC 5280 names. The first release wrote cryptography's snake
    # case (key_compromise), which the keyCompromise key bar and its index do not read:
    # an upgraded CA certified again a key it had revoked as compromised.
    """
    UPDATE certs SET reason = CASE reason
        WHEN 'key_compromise' THEN 'keyCompromise'
        WHEN 'ca_compromise' THEN 'cACompromise'
        WHEN 'affiliation_changed' THEN 'affiliationChanged'
        WHEN 'cessation_of_operation' THEN 'cessationOfOperation'
        WHEN 'certificate_hold' THEN 'certificateHold'
        WHEN 'privilege_withdrawn' THEN 'privilegeWithdrawn'
        WHEN 'aa_compromise' THEN 'aACompromise' END
    WHERE reason IN ('key_compromise', 'ca_compromise', 'affiliation_changed',
                     'cessation_of_operation', 'certificate_hold', 'privilege_withdrawn',
                     'aa_compromise');
    """,
    # 14: the live certificates of a key, found when that key is revoked for keyCompromise
    # (every certificate of a compromised key is revoked, not only its lineage).
    """
    CREATE INDEX certs_live_spki ON certs(spki_sha256) WHERE revoked_at IS NULL;
    """,
    # 15: when a token's certificate was released (its outcome line durable, the answer
    # on its way). A retry with the same key is answered with that certificate only then:
    # the token's used_serial commits with the row, before the outcome, and a row whose
    # outcome never made it is revoked (a review: a replay handed one out).
    """
    ALTER TABLE tokens ADD COLUMN released_at TEXT;
    """,
    # 16: an ACME account's pending authorizations, counted at each new order.
    """
    CREATE INDEX acme_authzs_account ON acme_authzs(account_id, status, expires);
    CREATE INDEX acme_orders_expires ON acme_orders(expires);
    """,
    # 17: an issuing key's CA certificate revoked by its root (`hsmca key revoke`): the
    # root's CRL lists it.
    """
    ALTER TABLE ca_keys ADD COLUMN revoked_at TEXT;
    ALTER TABLE ca_keys ADD COLUMN revocation_reason TEXT;
    """,
)

_CERT_COLS = ("serial, fingerprint, role, subject, names, principals, spki_sha256, not_before, "
              "not_after, revoked_at, reason, issuer, renewed_from")


def _cert(r: tuple[Any, ...]) -> CertRecord:
    return CertRecord(r[0], r[1], r[2], r[3], tuple(json.loads(r[4])), tuple(json.loads(r[5])),
                      r[6], r[7], r[8], r[9], r[10], r[11], r[12])


# The inventory reads: the columns above (of `certs c`), then issued_at, audit_seq, the
# ACME order and account (of `acme_certs a`, joined).
_READ_COLS = ", ".join(f"c.{c.strip()}" for c in _CERT_COLS.split(",")) + (
    ", c.issued_at, c.audit_seq, a.order_id, c.audit_log, a.account_id")
_READ_FROM = "certs c LEFT JOIN acme_certs a ON a.serial = c.serial"
_SORTS = {"issued": "c.issued_at", "expires": "c.not_after", "subject": "c.subject",
          "role": "c.role", "serial": "length(c.serial), c.serial"}


def _read_cert(r: tuple[Any, ...]) -> CertRecord:
    return CertRecord(r[0], r[1], r[2], r[3], tuple(json.loads(r[4])), tuple(json.loads(r[5])),
                      r[6], r[7], r[8], r[9], r[10], r[11], r[12], r[13], r[14], r[15], r[16],
                      r[17])


def _like(text: str) -> str:
    """A LIKE pattern (ESCAPE '\\') for values containing `text`."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _status_clause(status: str, revoked_at: str, end: str, now: object, soon: object,
                   where: list[str], args: list[Any], *, two_thirds: str,
                   now_s: int) -> None:
    """Add the condition for one of CERT_STATUSES, each disjoint from the others, on the
    columns (or expressions) saying when a certificate was revoked and when it ends;
    `two_thirds` is the condition, with `now_s` (Unix seconds) as its one parameter,
    that it has lived two thirds of its lifetime (CertQuery: expiring)."""
    live = f"{revoked_at} IS NULL AND {end}"
    ending = f"{end} <= ? AND {two_thirds}"
    clauses = {"revoked": (f"{revoked_at} IS NOT NULL", []),
               "expired": (f"{live} <= ?", [now]),
               "expiring": (f"{live} > ? AND {ending}", [now, soon, now_s]),
               "valid": (f"{live} > ? AND NOT ({ending})", [now, soon, now_s])}
    if status not in clauses:
        raise ValueError(f"unknown certificate status {status!r}")
    clause, values = clauses[status]
    where.append(clause)
    args += values


# An SSH certificate issued on the strength of this X.509 certificate is still live: an
# SSH user certificate (up to 24 h) may outlive the credential it was asked with.
_LIVE_SSH_CHILD = ("EXISTS (SELECT 1 FROM ssh_certs s WHERE s.owner_serial = certs.serial "
                   "AND s.revoked_at IS NULL AND CAST(s.valid_before AS {integer}) > {p})")
EPOCH = "CAST(strftime('%s', {}) AS INTEGER)"  # an ISO 8601 column's Unix seconds


def _cert_filter(query: CertQuery, now: dt.datetime, soon: dt.datetime, epoch: str
                 ) -> tuple[str, list[Any]]:
    """The WHERE clause of a CertQuery, and its arguments (dialect-neutral SQL but for
    `epoch`, the dialect's Unix seconds of an ISO 8601 column, as a format)."""
    where: list[str] = []
    args: list[Any] = []
    text = (query.text or "").strip()
    if text:
        # Names and principals are JSON lists: match the text as JSON writes it.
        pattern = _like(json.dumps(text.lower())[1:-1])
        alts = ["lower(c.names) LIKE ? ESCAPE '\\'", "lower(c.principals) LIKE ? ESCAPE '\\'",
                "lower(c.subject) LIKE ? ESCAPE '\\'", "c.role = ?"]
        args += [pattern, pattern, _like(text.lower()), text]
        serial = text.lower().replace(":", "").replace(" ", "").lstrip("0")
        if serial and all(ch in "0123456789abcdef" for ch in serial):
            alts.append("c.serial LIKE ?")
            args.append(serial + "%")
        where.append("(" + " OR ".join(alts) + ")")
    if query.status is not None:
        lived = (f"3 * CAST(? AS BIGINT) >= 2 * {epoch.format('c.not_after')} + "
                 f"{epoch.format('c.not_before')}")
        _status_clause(query.status, "c.revoked_at", "c.not_after", now.isoformat(),
                       soon.isoformat(), where, args, two_thirds=lived,
                       now_s=int(now.timestamp()))
    if query.role:
        where.append("c.role = ?")
        args.append(query.role)
    if query.kind == "acme":
        where.append("a.serial IS NOT NULL")
    elif query.kind == "x509":
        where.append("a.serial IS NULL")
    elif query.kind is not None:
        raise ValueError(f"unknown certificate kind {query.kind!r}")
    if query.account is not None:  # acme_certs_account indexes it
        where.append("a.account_id = ?")
        args.append(query.account)
    if query.issuer is not None:
        where.append("c.issuer = ?")
        args.append(query.issuer)
    return (" WHERE " + " AND ".join(where)) if where else "", args


_SSH_COLS = ("serial, key_id, cert_type, key_sha256, principals, valid_after, valid_before, "
             "owner_serial, issued_at, revoked_at, issuer")
_SSH_SORTS = {"issued": "issued_at", "expires": "{until}", "key_id": "key_id",
              "serial": "length(serial), serial"}


def _ssh_filter(query: SSHCertQuery, now: int, soon: int, integer: str
                ) -> tuple[str, list[Any]]:
    """The WHERE clause of an SSHCertQuery and its arguments; `integer` is the
    dialect's 64-bit integer type, for validBefore kept as text."""
    until = f"CAST(valid_before AS {integer})"
    lived = f"3 * CAST(? AS {integer}) >= 2 * {until} + CAST(valid_after AS {integer})"
    where: list[str] = []
    args: list[Any] = []
    text = (query.text or "").strip()
    if text:
        alts = ["lower(key_id) LIKE ? ESCAPE '\\'", "lower(principals) LIKE ? ESCAPE '\\'"]
        args += [_like(text.lower()), _like(json.dumps(text.lower())[1:-1])]
        if text.isdigit():
            alts.append("serial LIKE ?")
            args.append(text.lstrip("0") + "%")
        if text.startswith("SHA256:"):  # the key's, as ssh-keygen -l prints it (when a
            alts.append("key_sha256 = ?")  # key leaks, what is known of it: an SSH trial)
            args.append(text)
        where.append("(" + " OR ".join(alts) + ")")
    if query.status is not None:
        _status_clause(query.status, "revoked_at", until, now, soon, where, args,
                       two_thirds=lived, now_s=now)
    if query.cert_type in ("host", "user"):
        where.append("cert_type = ?")
        args.append(query.cert_type)
    elif query.cert_type is not None:
        raise ValueError(f"unknown SSH certificate type {query.cert_type!r}")
    if query.owner is not None:
        where.append("owner_serial = ?")
        args.append(format(query.owner, "x"))
    return (" WHERE " + " AND ".join(where)) if where else "", args


def _ssh_order(query: SSHCertQuery, integer: str) -> str:
    if query.sort not in _SSH_SORTS:
        raise ValueError(f"unknown sort {query.sort!r}")
    order = " DESC" if query.descending else ""
    columns = _SSH_SORTS[query.sort].format(until=f"CAST(valid_before AS {integer})")
    tie = "" if query.sort == "serial" else ", length(serial), serial"
    return ", ".join(f"{c}{order}" for c in (columns + tie).split(", "))


def _read_ssh(r: tuple[Any, ...]) -> SSHCertRecord:
    return SSHCertRecord(int(r[0]), r[1], r[2], r[3], tuple(json.loads(r[4])), int(r[5]),
                         int(r[6]), r[7], r[8], r[9], r[10])


def _where(which: SSHSelector) -> tuple[str, str]:
    if which.serial is not None:
        return "serial = ?", str(which.serial)
    if which.key_id is not None:
        return "key_id = ?", which.key_id
    if which.key_sha256 is not None:
        return "key_sha256 = ?", which.key_sha256
    raise ValueError("an SSH selector names a serial, a key id or a key")


def damaged(exc: BaseException) -> bool:
    """SQLite's "database disk image is malformed" or "file is not a database": the
    file's fault, not the statement's (a plain DatabaseError, not one of its kinds)."""
    return isinstance(exc, sqlite3.DatabaseError) and (
        getattr(exc, "sqlite_errorname", "") in ("SQLITE_CORRUPT", "SQLITE_NOTADB")
        or type(exc) is sqlite3.DatabaseError)


def damaged_error(path: Path, exc: BaseException | str) -> StoreUnavailable:
    """What a damaged inventory is answered with: 503 and /health, one line at start."""
    return StoreDamaged(f"the inventory {path} is damaged ({exc}): nothing can be "
                            "recorded; stop hsmca and restore it from a backup "
                            "(docs/operator.md, Backup and restore)")


# SQLite's result codes of the host's doing, not the statement's (by prefix: the extended
# codes, SQLITE_IOERR_WRITE and the like, begin so).
_THE_HOSTS = ("SQLITE_IOERR", "SQLITE_FULL", "SQLITE_CANTOPEN", "SQLITE_BUSY", "SQLITE_LOCKED",
              "SQLITE_READONLY", "SQLITE_PERM", "SQLITE_AUTH", "SQLITE_PROTOCOL")


# What a disk must have free again after a write failed on it full, before the
# inventory takes writes: a certificate's row with its OCSP responses is ~2 KB.
ROOM_AGAIN = 1 << 20


# A host certificate a later live one for the same host key replaced: sshd presents the
# newest (its file is rewritten), so the older one is in nobody's use, and counting it
# held an SSH host CA key's retirement for a whole host lifetime after every host had
# moved to the new key (an SSH trial). User certificates count all: an agent may still
# hold an older one.
_SUPERSEDED_HOST = (
    "(s.cert_type = 'host' AND EXISTS (SELECT 1 FROM ssh_certs n WHERE n.cert_type = "
    "'host' AND n.key_sha256 = s.key_sha256 AND n.issued_at > s.issued_at AND "
    "n.revoked_at IS NULL AND CAST(n.valid_before AS {integer}) > {p}))")


def _full_disk(exc: sqlite3.Error, path: Path) -> bool:
    """Whether `exc` is a full disk's: SQLite's words for one, or an I/O error on a
    disk with less than ROOM_AGAIN free (SQLite says "disk I/O error" for a WAL that
    cannot grow)."""
    if "disk is full" in str(exc):
        return True
    if "disk I/O error" not in str(exc):
        return False
    try:
        return _free(path.parent) < ROOM_AGAIN
    except OSError:
        return False


def _free(directory: Path) -> int:
    """Bytes this process may still write on `directory`'s disk: root, the blocks
    reserved for it too (a review: f_bavail alone held a root daemon's inventory
    unavailable while ext4's reserve let it write gigabytes)."""
    st = os.statvfs(directory)
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def _with_hint(why: str, path: Path) -> str:
    """SQLite's words for a full disk (or one failing writes: a full one can show as
    "disk I/O error"), with what to do (a full-disk trial read them bare)."""
    if "disk is full" in why or "disk I/O error" in why:
        return (f"{why} (free space on the disk of {path.parent}, or check that disk: "
                "the daemon takes writes again once it can)")
    return why


def _connect(path: Path) -> sqlite3.Connection:
    # mode=rw: never a new, empty file where the inventory was deleted (a background
    # checkpoint made one under a running daemon, which the next start took for the
    # inventory and forgot every certificate and revocation: a disaster trial).
    db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=rw", uri=True,
                         check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA busy_timeout=5000")
    db.execute("PRAGMA synchronous=FULL")
    return db


Read = Callable[..., list[tuple[Any, ...]]]  # (sql, args=()) -> rows


def _keys(read: Read) -> list[KeyRecord]:
    return [KeyRecord(*r) for r in read(
        "SELECT label, kind, state, algorithm, created_at, fingerprint, uri, cert, "
        "changed_at, ssh_public_key, revoked_at, revocation_reason FROM ca_keys "
        "ORDER BY created_at, label")]


def _signed_by(read: Read) -> dict[str | None, int]:
    counts: dict[str | None, int] = {}
    for issuer, n in read("SELECT issuer, COUNT(*) FROM certs GROUP BY issuer"):
        counts[issuer] = counts.get(issuer, 0) + int(n)
    for issuer, kind, n in read("SELECT issuer, cert_type, COUNT(*) FROM ssh_certs "
                                "GROUP BY issuer, cert_type"):
        key = issuer if issuer is not None else f"ssh-{kind}"
        counts[key] = counts.get(key, 0) + int(n)
    return counts


def _read_only(path: Path) -> sqlite3.Connection:
    """A connection that cannot write the inventory (a read beside a stopped daemon)."""
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)  # quoted: '#', '?'...
    db.execute("PRAGMA busy_timeout=5000")
    return db


def _too_new(path: Path, version: int) -> SchemaError:
    return SchemaError(f"the inventory {path} has schema version {version}, newer than this "
                       f"hsmca knows ({len(MIGRATIONS)}): upgrade hsmca, or restore a backup "
                       "made for this version")


def read_keys(path: Path) -> tuple[list[KeyRecord], dict[str | None, int]]:
    """The key records and how many certificates each signed, read from the inventory at
    `path` without the daemon (`hsmca key list` while it is stopped: a root ceremony, a
    token backup), and without writing: an inventory the daemon has not migrated yet
    is refused, since migrating it is the daemon's."""
    if not path.exists():
        raise NoInventory(f"the inventory {path} does not exist")
    db = _read_only(path)
    try:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > len(MIGRATIONS):
            raise _too_new(path, version)
        if version < len(MIGRATIONS):
            raise SchemaError(f"the inventory {path} has schema version {version}, older "
                              f"than this hsmca reads ({len(MIGRATIONS)}): start the daemon "
                              "once (it migrates the inventory), then look again")

        def read(sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
            return db.execute(sql, args).fetchall()
        return _keys(read), _signed_by(read)
    except sqlite3.DatabaseError as exc:
        if damaged(exc):
            raise damaged_error(path, exc) from None
        raise
    finally:
        db.close()


def latest_audit_seq(path: Path, recent: int = 1000) -> tuple[int, str] | None:
    """The highest audit line a certificate of the inventory at `path` names (the seq
    of its intent), among the last `recent` written, or the last line a checkpoint
    covered as the daemon noted it, whichever is higher: evidence of how long the CA's
    log was, for a start-up that finds it shorter. With it, which of the two it is, in
    words for the refusal (a trial could not tell from "a certificate's intent, or a
    checkpoint"). None: no such certificate (or no inventory yet, or one from before
    certificates named their lines)."""
    if not path.exists():
        return None
    db = _read_only(path)
    try:
        row = db.execute("SELECT MAX(audit_seq) FROM certs WHERE rowid > "
                         "(SELECT COALESCE(MAX(rowid), 0) FROM certs) - ?", (recent,)).fetchone()
        # and the last line a checkpoint covered, as the daemon noted it (note_audit_size)
        seen = db.execute("SELECT CAST(v AS INTEGER) - 1 FROM meta WHERE k = 'audit_seen'"
                          ).fetchone()
    except sqlite3.DatabaseError as exc:
        if damaged(exc):
            raise damaged_error(path, exc) from None
        if not isinstance(exc, sqlite3.OperationalError):
            raise
        # no audit_seq yet: migrated by the daemon's open
        return None
    finally:
        db.close()
    found = []
    if row and row[0] is not None:
        seq = int(row[0])
        found.append((seq, f"records a certificate whose intent is the log's line {seq} "
                           f"(seq, from 0)"))
    if seen and seen[0] is not None:
        seq = int(seen[0])
        found.append((seq, f"noted a checkpoint of the log's first {seq + 1} lines"))
    return max(found) if found else None


class SchemaError(SchemaTooNew, sqlite3.DatabaseError):
    """The database was made by a newer hsmca: this code must not touch it. The same
    kind as PostgreSQL's refusal, which the CLI says in one line (an upgrade trial's
    way back ended in a traceback)."""


def migrate(db: sqlite3.Connection, path: Path) -> int | None:
    """Run the migrations the database has not had, each in one transaction; the
    version migrated from, or None if there was nothing to do."""
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    # The first release counted no migrations: its inventory is version 0 with tables.
    upgrade = version > 0 or db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'certs'").fetchone()
    if version > len(MIGRATIONS):
        raise _too_new(path, version)
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        try:
            db.executescript(f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {number};\n"
                             "COMMIT;")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
    if upgrade and version < len(MIGRATIONS):  # (a new inventory is not news)
        import structlog  # loaded only when there is something to say
        structlog.get_logger("hsmca.store").warning(
            "inventory migrated", path=str(path), schema_from=version,
            schema_to=len(MIGRATIONS),
            # What an operator who has to go back needs to know, where the upgrade is said.
            way_back="the release before refuses this inventory now: restore the backup "
                     "taken before the upgrade (docs/operator.md, Upgrading)")
        return version
    return None


Table = tuple[str, tuple[str, ...], Iterator[tuple[Any, ...]]]


def export_inventory(path: Path) -> Iterator[Table]:
    """Every table of the inventory at `path` (brought to this code's schema first):
    its name, its columns and its rows in the order they were written, for `hsmca store
    move`. One read transaction, so every table is of the same moment; iterate on one
    thread, each table's rows before the next table."""
    # Any thread may close it: a consumer that fails part-way leaves the generator to
    # be finalised wherever the garbage collector runs.
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA busy_timeout=5000")
        migrate(db, path)
        db.execute("BEGIN")
        names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                          "AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        for name in names:
            cols = tuple(r[1] for r in db.execute(f'PRAGMA table_info("{name}")'))
            quoted = ", ".join(f'"{c}"' for c in cols)
            yield name, cols, iter(db.execute(f'SELECT {quoted} FROM "{name}" ORDER BY rowid'))
        db.execute("COMMIT")
    finally:
        db.close()


class SQLiteStore:
    schema_version = len(MIGRATIONS)

    def __init__(self, path: Path, autocheckpoint: bool = True, create: bool = True) -> None:
        """`autocheckpoint=False` for the workers: the commit that fills the WAL would
        otherwise copy it into the database there and then (hundreds of milliseconds
        on a slow disk), stalling its worker's every signature behind it; the primary
        checkpoints in the background instead (`wal_checkpoint`). `create=False`: the
        file must be there (a worker started after the inventory was deleted made a new
        one, a review of the deletion's guard)."""
        self.path = path
        # Made 0600 before SQLite makes it (its WAL and SHM files take its mode): the
        # inventory names every client, and holds tokens' hashes.
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
        try:
            st = os.fstat(fd)
            self._file = (st.st_dev, st.st_ino)  # the file it opened: see _gone
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                # Made by an older release (the first made it 0644): brought to 0600, and
                # said, since it has been readable to others until now (an upgrade trial).
                os.fchmod(fd, mode & 0o700)
                import structlog
                structlog.get_logger("hsmca.store").warning(
                    "the inventory was readable by others: made owner-only (0600)",
                    path=str(path), mode_was=oct(mode))
        finally:
            os.close(fd)
        try:
            w = _connect(path)
            w.execute("PRAGMA journal_mode=WAL")
            if not autocheckpoint:
                w.execute("PRAGMA wal_autocheckpoint=0")
            self.migrated_from = migrate(w, path)
            self._reader = _connect(path)
        except sqlite3.DatabaseError as exc:
            if damaged(exc):
                raise damaged_error(path, exc) from None
            if getattr(exc, "sqlite_errorname", "").startswith(_THE_HOSTS):
                # The disk's or the file's doing (a full disk, a file it cannot open): one
                # line, where a start gave a traceback. A statement's error stays one.
                with contextlib.suppress(NameError, sqlite3.Error):
                    w.close()
                raise StoreUnavailable(f"cannot open the inventory {path}: "
                                       f"{_with_hint(str(exc), path)}") from None
            raise
        self._writer_db = w
        self._read_lock = threading.Lock()
        self._searcher: sqlite3.Connection | None = None  # see _search: only its thread
        self._search_thread = cf.ThreadPoolExecutor(1, thread_name_prefix="store-search")
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._coalescer = Coalescer(self._queue)
        self._problem: str | None = None  # why the last transaction failed, if it did
        self._full = False  # a write failed on a full disk: room must come back first
        # Damage found in the file: said by /health until a restart, whatever a later
        # transaction that misses the damaged pages does.
        self._damage: str | None = None
        # Damage the primary's check of every page found, for the workers' stores (the
        # daemon's shared gauge): theirs missed it while their statements missed the
        # damaged pages, and went on signing into the damaged file (a restore trial:
        # six certificates issued, their rows then garbled).
        self.damage_found: Callable[[], bool] = lambda: False
        self._thread = logging_thread(self._write_loop, "store-writer")
        self._thread.start()

    @property
    def healthy(self) -> bool:
        # The file's presence too (a stat, asked before each signature): nothing is
        # signed whose record would go into a file deleted under the daemon.
        return self._thread.is_alive() and self._problem is None and \
            self._damage is None and not self.damage_found() and self._gone() is None \
            and self._no_room() is None

    @property
    def problem(self) -> str | None:
        if self._damage is None and self.damage_found():
            return str(damaged_error(self.path, "a check of its every page found damage, "
                                                "which the daemon's log names"))
        return self._damage or self._problem or self._gone() or self._no_room()

    def _no_room(self) -> str | None:
        """After a write failed on a full disk, why none is taken yet: until the disk
        has ROOM_AGAIN free. A small write (the probe's, a nonce's) still fit where a
        certificate's row did not, and each said the inventory was well again: /health
        said ok through a full-disk outage, and every other request signed a
        certificate to throw away (an SRE trial: 18)."""
        if not self._full:
            return None
        try:
            free = _free(self.path.parent)
        except OSError:
            return None  # _gone says what is wrong with the directory
        if free >= ROOM_AGAIN:
            self._full = False
            import structlog
            structlog.get_logger("hsmca.store").info(
                "the inventory's disk has room again", path=str(self.path.parent),
                free_mib=free >> 20)
            return None
        return (f"the disk of the inventory {self.path} is full ({free >> 10} KiB free): "
                f"nothing is signed until it has {ROOM_AGAIN >> 20} MiB free again")

    def note_damage(self, found: str) -> None:
        """Damage a check of every page found (`find_damage`): nothing more is signed
        into this file, as after a statement that met it."""
        self._damage = str(damaged_error(self.path, found))

    def _gone(self) -> str | None:
        """Why the path no longer names the file this store opened, or None. Deleted or
        replaced under the daemon, every write went on into a file the next start never
        sees (a disaster trial: /health said ok, and the next start forgot every
        certificate and revocation)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            how = "deleted"
        except OSError as exc:  # its directory made unreadable, an I/O error: fail closed
            return (f"cannot look at the inventory {self.path} ({exc.strerror or exc}): "
                    "no certificate or OCSP response is signed until it can be")
        else:
            if (st.st_dev, st.st_ino) == self._file:
                return None
            how = "replaced by another file"
        return (f"the inventory {self.path} was {how} while the daemon ran: no "
                "certificate or OCSP response is signed, since its record would be lost at "
                "the next start; move the file back (a copy is another file), or stop the "
                "daemon and restore the newest backup (docs/operator.md, \"Backup and "
                "restore\")")

    async def writes_held(self) -> str | None:
        return None  # its writers are this daemon's own processes

    async def probe(self) -> None:
        """A file in this process: `healthy` says whether its writer runs and its last
        transaction committed, and whether the file is still at its path. After one
        that failed, a transaction that writes (and leaves nothing behind) tries again,
        so a disk with room again is noticed without a request that writes: a load
        balancer sends none to a node it took out."""
        if self._damage is not None or self.damage_found():
            # No retry mends it: the restore the answer names does (a write to try
            # would go into the damaged file).
            raise StoreDamaged(self.problem or "the inventory is damaged")
        if self._problem is None:
            return  # (a file gone is said by `healthy` and `problem` themselves)

        def touch(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('probe', '1')")
            db.execute("DELETE FROM meta WHERE k = 'probe'")
        await self._write(touch)

    def close(self) -> None:
        stop_thread(self._thread, self._queue)
        self._writer_db.close()
        self._reader.close()
        self._search_thread.shutdown(wait=True)  # a search under way ends first
        if self._searcher is not None:
            self._searcher.close()

    # ---- the writer -----------------------------------------------------------------------

    def _submit(self, fn: Callable[[sqlite3.Connection], T]) -> cf.Future[T]:
        fut: cf.Future[T] = cf.Future()
        self._queue.put((fn, fut))
        return fut

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(db)` in the writer's next transaction; return once it is committed."""
        fut, sink = async_sink()
        self._coalescer.put(sink[0], (fn, sink))
        return await fut  # type: ignore[no-any-return]

    def _write_loop(self) -> None:
        db = self._writer_db
        while True:
            batch = drain_queue(self._queue, self._queue.get())
            stop = STOP in batch
            jobs = [j for j in batch if j is not STOP]
            if jobs:
                self._run_batch(db, jobs)
            if stop:
                return

    def _run_batch(self, db: sqlite3.Connection, jobs: list[Any]) -> None:
        results: list[tuple[Sink, bool, Any]] = []
        claimed: list[Sink] = []
        out = Batch()
        try:
            if (gone := self._gone()) is not None:
                raise sqlite3.OperationalError(gone)
            db.execute("BEGIN IMMEDIATE")
            for fn, fut in jobs:
                if not claim(fut):
                    continue
                claimed.append(fut)
                db.execute("SAVEPOINT job")
                try:
                    value = fn(db)
                except BaseException as exc:
                    if isinstance(exc, sqlite3.OperationalError) or damaged(exc):
                        raise  # the disk's or the file's, not the job's: the batch fails
                    db.execute("ROLLBACK TO job")
                    db.execute("RELEASE job")
                    results.append((fut, False, exc))
                    continue
                db.execute("RELEASE job")
                results.append((fut, True, value))
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            try:
                if db.in_transaction:
                    db.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # SQLite has rolled back itself (a full disk, an I/O error)
            error: BaseException = exc
            if damaged(exc):  # as below, but retrying cannot mend it: it says what can
                error = damaged_error(self.path, exc)
                self._problem = self._damage = str(error)
            elif isinstance(exc, sqlite3.OperationalError):
                # A full disk, an I/O error, a lock held too long: 503 and retry, and
                # /health says so, rather than a 500 per request.
                why = str(exc)
                if "locked" in why:
                    # Another process holds the write lock past the busy timeout: a
                    # worker stopped mid-transaction, which the primary kills after
                    # [server] worker-timeout-s (a fault trial read only "unavailable").
                    why += (" (another process holds its write lock past the busy timeout: "
                            "a sqlite3 shell, a backup, or a process of the daemon that "
                            "stopped answering, which is killed after [server] "
                            "worker-timeout-s)")
                if not self._full and _full_disk(exc, self.path):
                    self._full = True
                    import structlog  # (as above: loaded when there is something to say)
                    structlog.get_logger("hsmca.store").warning(
                        "the inventory's disk is full: nothing is signed until it has "
                        f"{ROOM_AGAIN >> 20} MiB free again", path=str(self.path.parent))
                why = _with_hint(why, self.path)
                self._problem = why if why.startswith("the inventory ") else \
                    f"cannot write the inventory {self.path}: {why}"
                error = StoreUnavailable(f"the inventory (SQLite) is unavailable: {why}")
            # The whole transaction is gone: every job failed, those not reached yet
            # too (BEGIN itself may be what failed: a lock held past the busy timeout).
            for _, fut in jobs:
                if fut in claimed or claim(fut):
                    out.fail(fut, error)
            out.flush()
            return
        self._problem = None
        for fut, ok, value in results:
            if ok:
                out.ok(fut, value)
            else:
                out.fail(fut, value)
        out.flush()

    def _connect_again(self) -> sqlite3.Connection:
        """Another connection to the file this store opened, never to one put at its
        path since: a checkpoint into a file restored under the daemon copied the live
        WAL's pages into it and destroyed it (a review)."""
        if (gone := self._gone()) is not None:
            raise StoreUnavailable(gone)
        return _connect(self.path)

    def wal_checkpoint(self) -> None:
        """Copy the WAL into the database without waiting for, or blocking, anyone
        (PASSIVE); blocking, for a thread of its own."""
        db = self._connect_again()
        try:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            db.close()

    def find_damage(self) -> str | None:
        """What SQLite's `PRAGMA quick_check` finds wrong in the file (its first lines),
        or None. Reads every page, on a connection of its own; blocking, for a thread.
        A damaged page that no start reads (an index, old rows) is otherwise found only
        by the request that reads it (an operator trial)."""
        db = self._connect_again()
        try:
            found = [str(r[0]) for r in db.execute("PRAGMA quick_check(5)")]
        except sqlite3.DatabaseError as exc:
            if not damaged(exc):
                raise
            return str(exc)
        finally:
            db.close()
        return None if found == ["ok"] else "; ".join(found)

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._read_lock:
            return self._guarded(self._reader, sql, args)

    def _guarded(self, db: sqlite3.Connection, sql: str, args: tuple[Any, ...]
                 ) -> list[tuple[Any, ...]]:
        try:
            return db.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as exc:
            if not damaged(exc):
                raise
            error = damaged_error(self.path, exc)
            self._damage = str(error)  # /health says so, as for a write
            raise error from None

    async def _search(self, *queries: tuple[str, tuple[Any, ...]]
                      ) -> list[list[tuple[Any, ...]]]:
        """The inventory's searches (admins', auditors', the web view's), run in a
        thread of their own on a connection of their own. A search for a text reads the
        whole table (0.4 s at 200,000 certificates here); on the event loop, or on the
        reader the request path shares, it held up every renewal of its worker meanwhile
        (a soak trial saw searches slow as the inventory grew). Not the loop's default
        pool: a burst of searches would queue the name lookups waiting there (a review)."""
        def run() -> list[list[tuple[Any, ...]]]:
            if self._searcher is None:
                self._searcher = self._connect_again()  # a 503 that says why, if gone
            return [self._guarded(self._searcher, sql, args) for sql, args in queries]
        return await asyncio.get_running_loop().run_in_executor(self._search_thread, run)

    # ---- tokens ------------------------------------------------------------------------------

    async def add_token(self, token: NewToken) -> None:
        def insert(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO tokens (id, secret_sha256, role, names, principals, expires, "
                       "created_at, created_by) VALUES (?,?,?,?,?,?,?,?)",
                       (token.id, token.secret_sha256, token.role,
                        json.dumps([list(n) for n in token.names]),
                        json.dumps(list(token.principals)), token.expires, token.created_at,
                        token.created_by))
        await self._write(insert)

    async def token_by_secret(self, secret_sha256: str) -> TokenRecord | None:
        rows = self._read("SELECT id, role, names, principals, expires, used_at, used_serial, "
                          "released_at FROM tokens WHERE secret_sha256 = ?", (secret_sha256,))
        if not rows:
            return None
        r = rows[0]
        return TokenRecord(r[0], r[1], tuple((k, v) for k, v in json.loads(r[2])),
                           tuple(json.loads(r[3])), r[4], r[5], r[6], r[7])

    async def consume_token(self, token_id: str, at: dt.datetime) -> bool:
        def consume(db: sqlite3.Connection) -> int:
            return db.execute("UPDATE tokens SET used_at = ? WHERE id = ? AND used_at IS NULL",
                              (at.isoformat(), token_id)).rowcount
        return await self._write(consume) == 1

    async def release_token(self, token_id: str) -> None:
        def restore(db: sqlite3.Connection) -> None:
            db.execute("UPDATE tokens SET used_at = NULL WHERE id = ? AND used_serial IS NULL",
                       (token_id,))
        await self._write(restore)

    async def settle_tokens(self, released: Sequence[str], spent_since: dt.datetime | None,
                            at: dt.datetime, enrolled: Sequence[str] = ()) -> tuple[int, int]:
        def settle(db: sqlite3.Connection) -> tuple[int, int]:
            marked = db.execute(
                "UPDATE tokens SET released_at = ? WHERE released_at IS NULL AND used_serial "
                "IN (SELECT value FROM json_each(?))",
                (at.isoformat(), json.dumps(list(released)))).rowcount
            given = 0 if spent_since is None else db.execute(
                "UPDATE tokens SET used_at = NULL WHERE used_at IS NOT NULL AND used_serial "
                "IS NULL AND used_at >= ? AND id NOT IN (SELECT value FROM json_each(?))",
                (spent_since.isoformat(), json.dumps(list(enrolled)))).rowcount
            return marked, given
        return await self._write(settle)

    async def token_released(self, token_id: str, at: dt.datetime) -> None:
        def mark(db: sqlite3.Connection) -> None:
            db.execute("UPDATE tokens SET released_at = ? WHERE id = ? AND used_serial IS NOT "
                       "NULL", (at.isoformat(), token_id))
        await self._write(mark)

    async def release_token_spent_on(self, serial: int) -> str | None:
        def restore(db: sqlite3.Connection) -> str | None:
            rows = db.execute("UPDATE tokens SET used_at = NULL, used_serial = NULL, "
                              "released_at = NULL "
                              "WHERE used_serial = ? RETURNING id",
                              (format(serial, "x"),)).fetchall()
            return rows[0][0] if rows else None
        return await self._write(restore)

    # ---- X.509 certificates ---------------------------------------------------------------

    def add_cert(self, cert: NewCert) -> cf.Future[None]:
        def insert(db: sqlite3.Connection) -> None:
            serial = format(cert.serial, "x")
            db.execute(
                "INSERT INTO certs (serial, fingerprint, role, subject, names, principals, "
                "spki_sha256, not_before, not_after, issued_at, der, issuer, renewed_from, "
                "audit_seq, audit_log) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (serial, cert.fingerprint, cert.role, cert.subject,
                 json.dumps(list(cert.names)), json.dumps(list(cert.principals)),
                 cert.spki_sha256, cert.not_before, cert.not_after, cert.issued_at, cert.der,
                 cert.issuer, cert.renewed_from, cert.audit_seq, cert.audit_log))
            db.execute("INSERT INTO ocsp_responses (serial, status, this_update, next_update, "
                       "der_sha1, der_sha256, refresh_at) VALUES (?, 'pending', '', '', "
                       "x'', x'', '')", (serial,))
            if cert.token_id is not None:
                db.execute("UPDATE tokens SET used_serial = ? WHERE id = ?",
                           (serial, cert.token_id))
            if cert.acme_account is not None and cert.acme_order is not None:
                db.execute("INSERT INTO acme_certs (serial, account_id, order_id) "
                           "VALUES (?,?,?)", (serial, cert.acme_account, cert.acme_order))
                # Still `processing`: valid once released (release_acme_order).
                db.execute("UPDATE acme_orders SET cert_serial = ?, error = NULL WHERE id = ?",
                           (serial, cert.acme_order))
        return self._submit(insert)

    async def cert(self, serial: int) -> CertRecord | None:
        rows = self._read(f"SELECT {_CERT_COLS} FROM certs WHERE serial = ?",
                          (format(serial, "x"),))
        return _cert(rows[0]) if rows else None

    async def cert_by_fingerprint(self, fingerprint: str) -> CertRecord | None:
        # With its ACME order: a certificate issued over ACME is renewed over ACME only.
        rows = self._read(f"SELECT {_READ_COLS} FROM {_READ_FROM} WHERE c.fingerprint = ?",
                          (fingerprint,))
        return _read_cert(rows[0]) if rows else None

    async def revoked_certs(self) -> list[tuple[int, dt.datetime, str | None, str | None]]:
        return [(int(s, 16), dt.datetime.fromisoformat(at), reason, issuer)
                for s, at, reason, issuer in self._read(
                    "SELECT serial, revoked_at, reason, issuer FROM certs "
                    "WHERE revoked_at IS NOT NULL")]

    async def lineage(self, serial: int, now: dt.datetime) -> list[int]:
        rows = self._read(
            "WITH RECURSIVE family(serial) AS (SELECT ? UNION "
            "SELECT c.renewed_from FROM certs c JOIN family f ON c.serial = f.serial "
            "WHERE c.renewed_from IS NOT NULL UNION "
            "SELECT c.serial FROM certs c JOIN family f ON c.renewed_from = f.serial) "
            "SELECT c.serial FROM certs c JOIN family f ON c.serial = f.serial "
            "WHERE c.revoked_at IS NULL AND c.not_after > ?",
            (format(serial, "x"), now.isoformat()))
        return sorted(int(r[0], 16) for r in rows)

    async def live_certs_named(self, name: str, now: dt.datetime) -> list[int]:
        rows = self._read(
            "SELECT serial FROM certs WHERE revoked_at IS NULL AND role <> 'server' AND "
            "EXISTS (SELECT 1 FROM json_each(certs.names) WHERE json_each.value = ?) AND "
            f"(not_after > ? OR {_LIVE_SSH_CHILD.format(integer='INTEGER', p='?')})",
            (name, now.isoformat(), int(now.timestamp())))
        return sorted(int(r[0], 16) for r in rows)

    async def revoked_certs_named(self, name: str, now: dt.datetime
                                  ) -> list[tuple[int, str | None]]:
        rows = self._read(
            "SELECT serial, reason FROM certs WHERE revoked_at IS NOT NULL AND role <> "
            "'server' AND EXISTS (SELECT 1 FROM json_each(certs.names) WHERE "
            "json_each.value = ?) AND not_after > ?", (name, now.isoformat()))
        return sorted((int(r[0], 16), r[1]) for r in rows)

    async def live_certs_with_keys(self, spkis: Sequence[str], now: dt.datetime) -> list[int]:
        found: list[int] = []
        keys = sorted(set(spkis))
        for at in range(0, len(keys), 500):  # well under SQLite's limit of variables
            part = keys[at:at + 500]
            found += [int(r[0], 16) for r in self._read(
                "SELECT serial FROM certs WHERE revoked_at IS NULL AND spki_sha256 IN "
                f"({','.join('?' * len(part))}) AND not_after > ?", (*part, now.isoformat()))]
        return sorted(found)

    async def revoke_certs(self, serials: Sequence[int], at: dt.datetime,
                           reason: str | None) -> Revoked:
        hexes = [format(s, "x") for s in serials]

        def mark(db: sqlite3.Connection) -> Revoked:
            done: list[int] = []
            ssh = 0
            for h in hexes:
                row = db.execute("UPDATE certs SET revoked_at = ?, reason = ? WHERE serial = ? "
                                 "AND revoked_at IS NULL RETURNING serial",
                                 (at.isoformat(), reason, h)).fetchone()
                if row is None and reason == "keyCompromise":  # see Store.revoke_certs
                    row = db.execute("UPDATE certs SET reason = ? WHERE serial = ? AND "
                                     "revoked_at IS NOT NULL AND (reason IS NULL OR "
                                     "reason <> ?) RETURNING serial",
                                     (reason, h, reason)).fetchone()
                if row is not None:
                    done.append(int(row[0], 16))
                    db.execute("UPDATE ocsp_responses SET refresh_at = '' WHERE serial = ?",
                               (h,))
                ssh += db.execute("UPDATE ssh_certs SET revoked_at = ? WHERE owner_serial = ? "
                                  "AND revoked_at IS NULL", (at.isoformat(), h)).rowcount
            return Revoked(tuple(done), ssh)
        return await self._write(mark)

    # ---- reading the inventory --------------------------------------------------------------

    async def find_certs(self, query: CertQuery, now: dt.datetime,
                         soon: dt.datetime) -> CertPage:
        if query.sort not in _SORTS:
            raise ValueError(f"unknown sort {query.sort!r}")
        where, args = _cert_filter(query, now, soon, EPOCH)
        order = " DESC" if query.descending else ""
        columns = ", ".join(f"{c}{order}" for c in _SORTS[query.sort].split(", "))
        tie = "" if query.sort == "serial" else f", length(c.serial){order}, c.serial{order}"
        counted, rows = await self._search(
            (f"SELECT COUNT(*) FROM {_READ_FROM}{where}", tuple(args)),
            (f"SELECT {_READ_COLS} FROM {_READ_FROM}{where} ORDER BY {columns}{tie} "
             "LIMIT ? OFFSET ?", (*args, query.limit, query.offset)))
        return CertPage(int(counted[0][0]), tuple(_read_cert(r) for r in rows))

    async def issued_cert(self, serial: int) -> IssuedCert | None:
        rows = self._read(f"SELECT {_READ_COLS}, c.der FROM {_READ_FROM} WHERE c.serial = ?",
                          (format(serial, "x"),))
        return IssuedCert(_read_cert(rows[0]), bytes(rows[0][-1])) if rows else None

    async def settled_cert(self, serial: int) -> IssuedCert | None:
        return await self.issued_cert(serial)  # a commit here is never given up on

    async def renewal_family(self, serial: int) -> list[CertRecord]:
        rows = self._read(
            "WITH RECURSIVE family(serial) AS (SELECT ? UNION "
            "SELECT c.renewed_from FROM certs c JOIN family f ON c.serial = f.serial "
            "WHERE c.renewed_from IS NOT NULL UNION "
            "SELECT c.serial FROM certs c JOIN family f ON c.renewed_from = f.serial) "
            f"SELECT {_READ_COLS} FROM {_READ_FROM} JOIN family f ON c.serial = f.serial "
            "ORDER BY c.issued_at, length(c.serial), c.serial", (format(serial, "x"),))
        return [_read_cert(r) for r in rows]

    async def issuance_counts(self, since: dt.datetime, until: dt.datetime
                              ) -> list[IssuanceCount]:
        window = (since.isoformat(), until.isoformat())
        rows = self._read(
            "SELECT CASE WHEN a.serial IS NULL THEN 'x509-' || c.role ELSE 'acme' END, "
            f"substr(c.issued_at, 1, 13), COUNT(*) FROM {_READ_FROM} "
            "WHERE c.issued_at >= ? AND c.issued_at < ? GROUP BY 1, 2 UNION ALL "
            "SELECT 'ssh-' || cert_type, substr(issued_at, 1, 13), COUNT(*) FROM ssh_certs "
            "WHERE issued_at >= ? AND issued_at < ? GROUP BY 1, 2 ORDER BY 2, 1",
            (*window, *window))
        return [IssuanceCount(kind, hour, int(n)) for kind, hour, n in rows]

    # ---- SSH certificates -----------------------------------------------------------------
    async def find_ssh_certs(self, query: SSHCertQuery, now: dt.datetime,
                             soon: dt.datetime) -> SSHCertPage:
        where, args = _ssh_filter(query, int(now.timestamp()), int(soon.timestamp()),
                                  "INTEGER")
        order = _ssh_order(query, "INTEGER")
        counted, rows = await self._search(
            (f"SELECT COUNT(*) FROM ssh_certs{where}", tuple(args)),
            (f"SELECT {_SSH_COLS} FROM ssh_certs{where} ORDER BY {order} LIMIT ? OFFSET ?",
             (*args, query.limit, query.offset)))
        return SSHCertPage(int(counted[0][0]), tuple(_read_ssh(r) for r in rows))


    def add_ssh_cert(self, cert: NewSSHCert) -> cf.Future[None]:
        def insert(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO ssh_certs (serial, key_id, cert_type, key_sha256, public_key, "
                "principals, valid_after, valid_before, owner_serial, issued_at, issuer) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (str(cert.serial), cert.key_id, cert.cert_type, cert.key_sha256,
                 cert.public_key, json.dumps(list(cert.principals)), str(cert.valid_after),
                 str(cert.valid_before), cert.owner_serial, cert.issued_at, cert.issuer))
        return self._submit(insert)

    async def count_ssh_certs(self, which: SSHSelector, revoked: bool = False) -> int:
        where, arg = _where(which)
        return int(self._read(f"SELECT COUNT(*) FROM ssh_certs WHERE {where} AND revoked_at "
                              f"IS {'NOT ' if revoked else ''}NULL", (arg,))[0][0])

    async def revoke_ssh(self, which: SSHSelector, at: dt.datetime,
                         revoke_key: str | None = None) -> int:
        where, arg = _where(which)

        def mark(db: sqlite3.Connection) -> int:
            if revoke_key is not None:
                db.execute("INSERT OR IGNORE INTO ssh_revoked_keys (public_key, revoked_at) "
                           "VALUES (?, ?)", (revoke_key, at.isoformat()))
            return db.execute(f"UPDATE ssh_certs SET revoked_at = ? WHERE {where} "
                              "AND revoked_at IS NULL", (at.isoformat(), arg)).rowcount
        return await self._write(mark)

    async def revoked_ssh_certs(self) -> list[tuple[str, int, str | None]]:
        return [(t, int(s), issuer) for t, s, issuer in self._read(
            "SELECT cert_type, serial, issuer FROM ssh_certs WHERE revoked_at IS NOT NULL")]

    async def compromised_keys(self) -> list[str]:
        return [r[0] for r in self._read("SELECT DISTINCT spki_sha256 FROM certs WHERE "
                                         "reason = 'keyCompromise'")]

    async def revoked_ssh_keys(self) -> list[str]:
        return [r[0] for r in self._read("SELECT public_key FROM ssh_revoked_keys")]

    async def latest_ssh_revocation(self) -> dt.datetime | None:
        return latest_of(self._read("SELECT (SELECT MAX(revoked_at) FROM ssh_certs), "
            "(SELECT MAX(revoked_at) FROM ssh_revoked_keys)")[0])

    # ---- pre-signed OCSP responses -----------------------------------------------------

    async def ocsp_settle(self, now: dt.datetime, issuers: Sequence[str]) -> int:
        def settle(db: sqlite3.Connection) -> int:
            marks = ",".join("?" * len(issuers))
            return db.execute(
                "UPDATE ocsp_responses SET refresh_at = NULL WHERE refresh_at <= ? AND serial "
                "IN (SELECT c.serial FROM ocsp_responses o JOIN certs c ON c.serial = o.serial "
                f"WHERE o.refresh_at <= ? AND (c.not_after <= ? OR c.issuer NOT IN ({marks})))",
                (now.isoformat(), now.isoformat(), now.isoformat(), *issuers)).rowcount
        return await self._write(settle)

    async def ocsp_due(self, now: dt.datetime, limit: int,
                       issuers: Sequence[str]) -> list[OCSPDue]:
        marks = ",".join("?" * len(issuers))
        rows = self._read(
            "SELECT c.serial, c.issuer, c.revoked_at, c.reason, c.not_after "
            "FROM ocsp_responses o JOIN certs c ON c.serial = o.serial "
            f"WHERE o.refresh_at <= ? AND c.not_after > ? AND c.issuer IN ({marks}) "
            "ORDER BY o.refresh_at, c.revoked_at IS NULL LIMIT ?",
            (now.isoformat(), now.isoformat(), *issuers, limit))
        return [OCSPDue(int(r[0], 16), r[1], r[2], r[3], r[4]) for r in rows]

    async def put_ocsp(self, responses: Sequence[OCSPRecord]) -> None:
        def put(db: sqlite3.Connection) -> None:
            # A 'good' response signed before a revocation landed must not replace the
            # revoked row: the revocation set the row due, and its own signing follows.
            db.executemany(
                "INSERT INTO ocsp_responses (serial, status, this_update, next_update, der_sha1, "
                "der_sha256, refresh_at) VALUES (?,?,?,?,?,?,?) ON CONFLICT (serial) DO UPDATE "
                "SET status = excluded.status, this_update = excluded.this_update, "
                "next_update = excluded.next_update, der_sha1 = excluded.der_sha1, "
                "der_sha256 = excluded.der_sha256, refresh_at = excluded.refresh_at "
                "WHERE excluded.status = 'revoked' OR NOT EXISTS (SELECT 1 FROM certs "
                "WHERE serial = excluded.serial AND revoked_at IS NOT NULL)",
                [(format(r.serial, "x"), r.status, r.this_update, r.next_update, r.der_sha1,
                  r.der_sha256, r.refresh_at) for r in responses])
        await self._write(put)

    async def ocsp(self, serial: int) -> OCSPRecord | None:
        # A 'good' response of a certificate revoked since is never served, even before
        # its revoked one is signed (or ever, its issuer retired).
        rows = self._read("SELECT o.status, o.this_update, o.next_update, o.der_sha1, "
                          "o.der_sha256, o.refresh_at FROM ocsp_responses o JOIN certs c ON "
                          "c.serial = o.serial WHERE o.serial = ? AND o.status != 'pending' "
                          "AND NOT (o.status = 'good' AND c.revoked_at IS NOT NULL)",
                          (format(serial, "x"),))
        return OCSPRecord(serial, *rows[0]) if rows else None

    # ---- CRLs ---------------------------------------------------------------------------------

    async def next_crl_number(self, lead: dt.timedelta = dt.timedelta(0)
                              ) -> tuple[int, dt.datetime]:
        def bump(db: sqlite3.Connection) -> tuple[int, dt.datetime]:
            row = db.execute("SELECT v FROM meta WHERE k = 'crl_number'").fetchone()
            number = int(row[0]) + 1 if row else 1
            db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('crl_number', ?)",
                       (str(number),))
            last = db.execute("SELECT v FROM meta WHERE k = 'crl_time'").fetchone()
            at = crl_time(dt.datetime.now(dt.UTC), last[0] if last else None, lead)
            db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('crl_time', ?)",
                       (at.isoformat(),))
            return number, at  # under the write lock: in order with the number
        return await self._write(bump)

    async def log_scanned(self, log: str) -> int:
        rows = self._read("SELECT v FROM meta WHERE k = ?", (f"log_scanned:{log}",))
        return int(rows[0][0]) if rows else 0

    async def note_audit_size(self, size: int) -> None:
        """The log reached `size` lines, covered by a checkpoint: evidence for a start
        that finds it shorter (latest_audit_seq), which the certificates' own seqs gave
        only for X.509 ones (an auditor trial's log, cut back past 150 SSH
        certificates, was started on and signed)."""
        def keep(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO meta (k, v) VALUES ('audit_seen', ?) ON CONFLICT (k) DO "
                       "UPDATE SET v = excluded.v WHERE CAST(excluded.v AS INTEGER) > "
                       "CAST(meta.v AS INTEGER)", (str(size),))
        await self._write(keep)

    async def set_log_scanned(self, log: str, end: int) -> None:
        def keep(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)",
                       (f"log_scanned:{log}", str(end)))
        await self._write(keep)

    async def put_node_policy(self, node: str, settings: str | None) -> None:
        return None  # one node: nothing to compare its policy with

    async def running_node_policies(self) -> dict[str, str]:
        return {}

    async def keep_crl_numbers_above(self, number: int) -> None:
        def keep(db: sqlite3.Connection) -> None:
            row = db.execute("SELECT v FROM meta WHERE k = 'crl_number'").fetchone()
            if row is None or int(row[0]) < number:
                db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('crl_number', ?)",
                           (str(number),))
        await self._write(keep)

    async def add_crl(self, crl: CRLRecord) -> None:
        def keep(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO crls (number, revoked, this_update, der, issuer) "
                       "VALUES (?,?,?,?,?)",
                       (crl.number, crl.revoked, crl.this_update, crl.der, crl.issuer))
            db.execute("DELETE FROM crls WHERE number < ? AND issuer IS ?",
                       (crl.number - KEEP_CRLS, crl.issuer))
        await self._write(keep)

    async def latest_crl(self, issuer: str | None) -> CRLRecord | None:
        rows = self._read("SELECT number, revoked, this_update, der, issuer FROM crls "
                          "WHERE issuer IS ? ORDER BY number DESC LIMIT 1", (issuer,))
        return CRLRecord(int(rows[0][0]), int(rows[0][1]), rows[0][2], rows[0][3],
                         rows[0][4]) if rows else None

    # ---- the CA's keys ----------------------------------------------------------------------

    async def keys(self) -> list[KeyRecord]:
        return _keys(self._read)

    async def add_keys(self, records: Sequence[KeyRecord]) -> None:
        def insert(db: sqlite3.Connection) -> None:
            db.executemany(
                f"INSERT INTO ca_keys ({KEY_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT (label) DO UPDATE SET ssh_public_key = "
                "COALESCE(ca_keys.ssh_public_key, excluded.ssh_public_key)",
                [key_row(r) for r in records])
        await self._write(insert)

    async def stage_key(self, record: KeyRecord, active: str) -> bool:
        def stage(db: sqlite3.Connection) -> bool:
            if _active_labels(db, record.kind) != [active] or _has_next(db, record.kind):
                return False
            db.execute(f"INSERT INTO ca_keys ({KEY_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                       key_row(record, "next"))
            return True
        return await self._write(stage)

    async def rotate_keys(self, new: Sequence[KeyRecord], cross: Sequence[CrossCert] = (),
                          replacing: Mapping[str, str] | None = None) -> list[str] | None:
        def rotate(db: sqlite3.Connection) -> list[str] | None:
            for kind, label in (replacing or {}).items():
                if _active_labels(db, kind) != [label] or _has_next(db, kind):
                    return None
            old: list[str] = []
            for key in new:
                old += [r[0] for r in db.execute(
                    "UPDATE ca_keys SET state = 'previous', changed_at = ? WHERE kind = ? "
                    "AND state = 'active' RETURNING label", (key.changed_at, key.kind))]
                db.execute(f"INSERT INTO ca_keys ({KEY_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                           key_row(key, "active"))
            db.executemany("INSERT INTO cross_certs (der, subject_label, issuer_label, made_at) "
                           "VALUES (?,?,?,?) ON CONFLICT DO NOTHING",
                           [(c.der, c.subject_label, c.issuer_label, c.made_at) for c in cross])
            return old
        return await self._write(rotate)

    async def promote_key(self, label: str, kind: str, at: str,
                          replacing: str | None = None) -> list[str] | None:
        def promote(db: sqlite3.Connection) -> list[str] | None:
            if replacing is not None and _active_labels(db, kind) != [replacing]:
                return None
            if db.execute("UPDATE ca_keys SET state = 'active', changed_at = ? WHERE label = ? "
                          "AND kind = ? AND state = 'next'", (at, label, kind)).rowcount != 1:
                return None
            return [r[0] for r in db.execute(
                "UPDATE ca_keys SET state = 'previous', changed_at = ? WHERE kind = ? AND "
                "state = 'active' AND label != ? RETURNING label", (at, kind, label))]
        return await self._write(promote)

    async def set_key_state(self, label: str, state: str, at: dt.datetime,
                            expect: str) -> bool:
        def change(db: sqlite3.Connection) -> int:
            return db.execute("UPDATE ca_keys SET state = ?, changed_at = ? WHERE label = ? "
                              "AND state = ?", (state, at.isoformat(), label, expect)).rowcount
        return await self._write(change) == 1

    async def revoke_ca_key(self, label: str, at: dt.datetime, reason: str | None) -> bool:
        def revoke(db: sqlite3.Connection) -> int:
            return db.execute("UPDATE ca_keys SET revoked_at = ?, revocation_reason = ? "
                              "WHERE label = ? AND revoked_at IS NULL",
                              (at.isoformat(), reason, label)).rowcount
        return await self._write(revoke) == 1

    async def name_first_issuers(self, x509_label: str, ssh: dict[str, str]) -> None:
        def name(db: sqlite3.Connection) -> None:
            db.execute("UPDATE certs SET issuer = ? WHERE issuer IS NULL", (x509_label,))
            for cert_type, label in ssh.items():
                db.execute("UPDATE ssh_certs SET issuer = ? WHERE issuer IS NULL AND "
                           "cert_type = ?", (label, cert_type))
            db.execute("UPDATE crls SET issuer = ? WHERE issuer IS NULL", (x509_label,))
        await self._write(name)

    async def cross_certs(self) -> list[CrossCert]:
        return [CrossCert(*r) for r in self._read(
            "SELECT subject_label, issuer_label, der, made_at FROM cross_certs "
            "ORDER BY made_at, rowid")]

    async def signed_by(self) -> dict[str | None, int]:
        """How many certificates each issuer label signed (None: before labels were kept)."""
        return _signed_by(self._read)

    async def live_signed_by(self, issuer: str | None, now: dt.datetime
                             ) -> tuple[int, str | None]:
        n, until = self._read("SELECT COUNT(*), MAX(not_after) FROM certs WHERE issuer IS ? "
                              "AND not_after > ? AND revoked_at IS NULL",
                              (issuer, now.isoformat()))[0]
        # An SSH certificate's validBefore is kept as Unix seconds.
        m, before = self._read("SELECT COUNT(*), MAX(CAST(valid_before AS INTEGER)) FROM "
                               "ssh_certs s WHERE issuer IS ? AND CAST(valid_before AS "
                               "INTEGER) > ? AND revoked_at IS NULL AND NOT "
                               + _SUPERSEDED_HOST.format(integer="INTEGER", p="?"),
                               (issuer, int(now.timestamp()), int(now.timestamp())))[0]
        return int(n) + int(m), _latest(until, before)

    async def live_renewed_by(self, issuer: str | None, now: dt.datetime) -> int:
        return int(self._read(
            "SELECT COUNT(*) FROM certs c WHERE issuer IS ? AND not_after > ? AND revoked_at "
            "IS NULL AND EXISTS (SELECT 1 FROM certs r WHERE r.renewed_from = c.serial AND "
            "r.revoked_at IS NULL AND r.not_after > ?)",
            (issuer, now.isoformat(), now.isoformat()))[0][0])

    # ---- ACME -----------------------------------------------------------------------------

    async def add_acme_eab(self, eab: AcmeEAB) -> None:
        def insert(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO acme_eab (kid, mac_key, names, expires, created_at, "
                       "created_by) VALUES (?,?,?,?,?,?)",
                       (eab.kid, eab.mac_key, json.dumps(list(eab.names)), eab.expires,
                        eab.created_at, eab.created_by))
        await self._write(insert)

    async def acme_eab(self, kid: str) -> AcmeEAB | None:
        rows = self._read("SELECT kid, mac_key, names, expires, created_at, created_by, "
                          "used_at, account_id FROM acme_eab WHERE kid = ?", (kid,))
        if not rows:
            return None
        r = rows[0]
        return AcmeEAB(r[0], r[1], tuple(json.loads(r[2])), r[3], r[4], r[5], r[6], r[7])

    async def acme_eabs(self, limit: int) -> list[AcmeEAB]:
        rows = self._read("SELECT kid, CASE WHEN mac_key IS NULL THEN NULL ELSE x'' END, "
                          "names, expires, created_at, created_by, used_at, account_id FROM "
                          "acme_eab ORDER BY created_at DESC, kid LIMIT ?", (limit,))
        return [AcmeEAB(r[0], r[1], tuple(json.loads(r[2])), r[3], r[4], r[5], r[6], r[7])
                for r in rows]

    async def withdraw_acme_eab(self, kid: str, at: dt.datetime) -> bool:
        def withdraw(db: sqlite3.Connection) -> bool:
            return db.execute(
                "UPDATE acme_eab SET mac_key = NULL, expires = min(expires, ?) WHERE kid = ? "
                "AND used_at IS NULL AND length(mac_key) > 0", (at.isoformat(), kid)
            ).rowcount == 1
        return await self._write(withdraw)

    async def erase_expired_acme_eab_keys(self, at: dt.datetime) -> list[str]:
        def erase(db: sqlite3.Connection) -> list[str]:
            return [r[0] for r in db.execute(
                "UPDATE acme_eab SET mac_key = x'' WHERE used_at IS NULL AND mac_key IS NOT "
                "NULL AND length(mac_key) > 0 AND expires <= ? RETURNING kid",
                (at.isoformat(),))]
        return await self._write(erase)

    async def acme_accounts(self, limit: int) -> list[AcmeAccount]:
        return [self._account(r) for r in self._read(
            f"SELECT {self._ACCOUNT_COLS} FROM acme_accounts ORDER BY created_at DESC, id "
            "LIMIT ?", (limit,))]

    async def add_acme_account(self, account: AcmeAccount, at: dt.datetime) -> bool:
        def insert(db: sqlite3.Connection) -> bool:
            if account.eab_kid is not None:
                spent = db.execute(
                    "UPDATE acme_eab SET used_at = ?, account_id = ?, mac_key = NULL "
                    "WHERE kid = ? AND used_at IS NULL AND length(mac_key) > 0 AND expires > ?",
                    (at.isoformat(), account.id, account.eab_kid, at.isoformat())).rowcount
                if spent != 1:
                    return False
            try:
                db.execute("INSERT INTO acme_accounts (id, thumbprint, jwk, status, contact, "
                           "names, eab_kid, created_at) VALUES (?,?,?,?,?,?,?,?)",
                           (account.id, account.thumbprint, account.jwk, account.status,
                            json.dumps(list(account.contact)), json.dumps(list(account.names)),
                            account.eab_kid, account.created_at))
            except sqlite3.IntegrityError:
                raise _Undo(False) from None
            return True
        try:
            return await self._write(insert)
        except _Undo as u:
            return bool(u.value)

    _ACCOUNT_COLS = "id, thumbprint, jwk, status, contact, names, eab_kid, created_at"

    @staticmethod
    def _account(r: tuple[Any, ...]) -> AcmeAccount:
        return AcmeAccount(r[0], r[1], r[2], r[3], tuple(json.loads(r[4])),
                           tuple(json.loads(r[5])), r[6], r[7])

    async def acme_account(self, account_id: str) -> AcmeAccount | None:
        rows = self._read(f"SELECT {self._ACCOUNT_COLS} FROM acme_accounts WHERE id = ?",
                          (account_id,))
        return self._account(rows[0]) if rows else None

    async def acme_account_by_thumbprint(self, thumbprint: str) -> AcmeAccount | None:
        rows = self._read(f"SELECT {self._ACCOUNT_COLS} FROM acme_accounts "
                          "WHERE thumbprint = ?", (thumbprint,))
        return self._account(rows[0]) if rows else None

    async def set_acme_contact(self, account_id: str, contact: Sequence[str]) -> None:
        def update(db: sqlite3.Connection) -> None:
            db.execute("UPDATE acme_accounts SET contact = ? WHERE id = ?",
                       (json.dumps(list(contact)), account_id))
        await self._write(update)

    async def deactivate_acme_account(self, account_id: str) -> None:
        def update(db: sqlite3.Connection) -> None:
            db.execute("UPDATE acme_accounts SET status = 'deactivated' WHERE id = ?",
                       (account_id,))
            db.execute("UPDATE acme_authzs SET status = 'deactivated' WHERE account_id = ? "
                       "AND status = 'pending'", (account_id,))
        await self._write(update)

    async def change_acme_key(self, account_id: str, old_thumbprint: str, thumbprint: str,
                              jwk: str) -> bool:
        def update(db: sqlite3.Connection) -> bool:
            try:
                return db.execute("UPDATE acme_accounts SET thumbprint = ?, jwk = ? WHERE id = ? "
                                  "AND thumbprint = ?",
                                  (thumbprint, jwk, account_id, old_thumbprint)).rowcount == 1
            except sqlite3.IntegrityError:  # another account has that key
                return False
        return await self._write(update)

    async def add_acme_order(self, order: AcmeOrder, authzs: Sequence[AcmeAuthz],
                             pending_cap: int | None = None) -> bool:
        def insert(db: sqlite3.Connection) -> bool:
            # BEGIN IMMEDIATE: every process's writes one after the other, so the count
            # sees the orders inserted before this one, in this batch or another's.
            if pending_cap is not None:
                waiting = int(db.execute(_PENDING_AUTHZS, (order.account_id,
                                                           order.created_at)).fetchone()[0])
                if waiting + len(authzs) > pending_cap:
                    raise TooManyPending(waiting)
            if order.replaces is not None:  # an order that expired unfinished replaces nothing
                db.execute("UPDATE acme_orders SET status = 'invalid' WHERE replaces = ? AND "
                           "status IN ('pending', 'ready') AND expires <= ?",
                           (order.replaces, order.created_at))
            if db.execute("INSERT INTO acme_orders (id, account_id, status, names, expires, "
                          "created_at, replaces) VALUES (?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                          (order.id, order.account_id, order.status,
                           json.dumps(list(order.names)), order.expires, order.created_at,
                           order.replaces)).rowcount != 1:
                return False  # another live order replaces that certificate
            for i, a in enumerate(authzs):
                db.execute("INSERT INTO acme_authzs (id, order_id, account_id, name, wildcard, "
                           "status, expires, position) VALUES (?,?,?,?,?,?,?,?)",
                           (a.id, order.id, a.account_id, a.name, int(a.wildcard), a.status,
                            a.expires, i))
                db.executemany("INSERT INTO acme_challenges (id, authz_id, type, token, "
                               "status, position) VALUES (?,?,?,?,?,?)",
                               [(c.id, a.id, c.type, c.token, c.status, j)
                                for j, c in enumerate(a.challenges)])
            return True
        return await self._write(insert)

    async def acme_order_ids(self, account_id: str, now: str, limit: int) -> list[str]:
        rows = self._read(
            "SELECT id FROM acme_orders WHERE account_id = ? AND status <> 'invalid' "
            "AND (status = 'valid' OR expires > ?) ORDER BY created_at DESC, id LIMIT ?",
            (account_id, now, limit))
        return [r[0] for r in rows]

    async def acme_pending_authzs(self, account_id: str, now: str) -> int:
        return int(self._read(_PENDING_AUTHZS, (account_id, now))[0][0])

    async def acme_authorized(self, account_id: str, names: Sequence[str], now: str
                              ) -> bool:
        rows = self._read(
            "SELECT DISTINCT name, wildcard FROM acme_authzs WHERE account_id = ? AND "
            "status = 'valid' AND expires > ? AND name IN (SELECT value FROM json_each(?))",
            (account_id, now, json.dumps(authz_bases(names))))
        return authz_cover(names, rows)

    async def purge_acme_orders(self, before: str, batch: int = 1000) -> int:
        def purge(db: sqlite3.Connection) -> int:
            ids = [r[0] for r in db.execute(
                "SELECT id FROM acme_orders WHERE expires < ? AND status IN ('pending', "
                "'ready', 'invalid') LIMIT ?", (before, batch))]
            for chunk in (ids[i:i + 500] for i in range(0, len(ids), 500)):
                marks = ", ".join("?" * len(chunk))
                db.execute("DELETE FROM acme_challenges WHERE authz_id IN (SELECT id FROM "
                           f"acme_authzs WHERE order_id IN ({marks}))", chunk)
                db.execute(f"DELETE FROM acme_authzs WHERE order_id IN ({marks})", chunk)
                db.execute(f"DELETE FROM acme_orders WHERE id IN ({marks})", chunk)
            return len(ids)
        return await self._write(purge)

    async def acme_order(self, order_id: str) -> AcmeOrder | None:
        rows = self._read("SELECT id, account_id, status, names, expires, created_at, "
                          "cert_serial, error, replaces FROM acme_orders WHERE id = ?",
                          (order_id,))
        if not rows:
            return None
        r = rows[0]
        authzs = self._read("SELECT id FROM acme_authzs WHERE order_id = ? ORDER BY position",
                            (order_id,))
        return AcmeOrder(r[0], r[1], r[2], tuple(json.loads(r[3])), r[4], r[5],
                         tuple(a[0] for a in authzs), r[6], r[7], r[8])

    _CHALLENGE_COLS = "id, authz_id, type, token, status, validated, error, started"

    async def acme_authz(self, authz_id: str) -> AcmeAuthz | None:
        rows = self._read("SELECT id, order_id, account_id, name, wildcard, status, expires "
                          "FROM acme_authzs WHERE id = ?", (authz_id,))
        if not rows:
            return None
        r = rows[0]
        challenges = self._read(f"SELECT {self._CHALLENGE_COLS} FROM acme_challenges "
                                "WHERE authz_id = ? ORDER BY position", (authz_id,))
        return AcmeAuthz(r[0], r[1], r[2], r[3], bool(r[4]), r[5], r[6],
                         tuple(AcmeChallenge(*c) for c in challenges))

    async def acme_challenge(self, challenge_id: str) -> AcmeChallenge | None:
        rows = self._read(f"SELECT {self._CHALLENGE_COLS} FROM acme_challenges WHERE id = ?",
                          (challenge_id,))
        return AcmeChallenge(*rows[0]) if rows else None

    async def deactivate_acme_authz(self, authz_id: str) -> bool:
        def deactivate(db: sqlite3.Connection) -> bool:
            row = db.execute("UPDATE acme_authzs SET status = 'deactivated' WHERE id = ? AND "
                             "status IN ('pending', 'valid') RETURNING order_id",
                             (authz_id,)).fetchone()
            if row is None:
                return False
            db.execute("UPDATE acme_orders SET status = 'invalid' WHERE id = ? AND status IN "
                       "('pending', 'ready')", (row[0],))
            return True
        return await self._write(deactivate)

    async def start_acme_challenge(self, challenge_id: str, at: dt.datetime,
                                   stale_before: dt.datetime) -> bool:
        def start(db: sqlite3.Connection) -> bool:
            return db.execute(
                "UPDATE acme_challenges SET status = 'processing', started = ? WHERE id = ? "
                "AND (status = 'pending' OR (status = 'processing' AND started < ?)) AND "
                "(SELECT status FROM acme_authzs a WHERE a.id = authz_id) = 'pending'",
                (at.isoformat(), challenge_id, stale_before.isoformat())).rowcount == 1
        return await self._write(start)

    async def finish_acme_challenge(self, challenge_id: str, valid: bool, error: str | None,
                                    at: dt.datetime) -> None:
        status = "valid" if valid else "invalid"

        def finish(db: sqlite3.Connection) -> None:
            row = db.execute("UPDATE acme_challenges SET status = ?, validated = ?, error = ? "
                             "WHERE id = ? AND status = 'processing' RETURNING authz_id",
                             (status, at.isoformat() if valid else None, error,
                              challenge_id)).fetchone()
            if row is None:
                return
            order = db.execute("UPDATE acme_authzs SET status = ? WHERE id = ? AND status = "
                               "'pending' RETURNING order_id", (status, row[0])).fetchone()
            if order is None:
                return
            if not valid:
                db.execute("UPDATE acme_orders SET status = 'invalid', error = ? WHERE id = ? "
                           "AND status = 'pending'", (error, order[0]))
                return
            left = db.execute("SELECT COUNT(*) FROM acme_authzs WHERE order_id = ? AND "
                              "status != 'valid'", (order[0],)).fetchone()[0]
            if left == 0:
                db.execute("UPDATE acme_orders SET status = 'ready' WHERE id = ? AND "
                           "status = 'pending'", (order[0],))
        await self._write(finish)

    async def begin_acme_finalize(self, order_id: str) -> bool:
        def begin(db: sqlite3.Connection) -> bool:
            return db.execute("UPDATE acme_orders SET status = 'processing' WHERE id = ? AND "
                              "status = 'ready'", (order_id,)).rowcount == 1
        return await self._write(begin)

    async def fail_acme_finalize(self, order_id: str, status: str, error: str | None) -> None:
        def fail(db: sqlite3.Connection) -> None:
            db.execute("UPDATE acme_orders SET status = ?, error = ?, cert_serial = NULL "
                       "WHERE id = ? AND status = 'processing'", (status, error, order_id))
        await self._write(fail)

    async def release_acme_order(self, order_id: str) -> None:
        def release(db: sqlite3.Connection) -> None:
            db.execute("UPDATE acme_orders SET status = 'valid' WHERE id = ? AND "
                       "status = 'processing' AND cert_serial IS NOT NULL", (order_id,))
        await self._write(release)

    async def complete_acme_finalizes(self, audit_log: str | None) -> int:
        def complete(db: sqlite3.Connection) -> int:
            return db.execute("UPDATE acme_orders SET status = 'valid' WHERE status = "
                              "'processing' AND cert_serial IN (SELECT serial FROM certs "
                              "WHERE audit_log IS ?)", (audit_log,)).rowcount
        return await self._write(complete)

    async def reopen_acme_finalizes(self) -> int:
        def reopen(db: sqlite3.Connection) -> int:
            return db.execute("UPDATE acme_orders SET status = 'ready' WHERE status = "
                              "'processing' AND cert_serial IS NULL").rowcount
        return await self._write(reopen)

    async def reopen_acme_order_of(self, serial: int) -> str | None:
        def reopen(db: sqlite3.Connection) -> str | None:
            row = db.execute("UPDATE acme_orders SET status = 'ready', cert_serial = NULL, "
                             "error = NULL WHERE cert_serial = ? AND status IN ('valid', "
                             "'processing') RETURNING id", (format(serial, "x"),)).fetchone()
            return str(row[0]) if row else None
        return await self._write(reopen)

    async def acme_cert(self, serial: int) -> AcmeCert | None:
        rows = self._read(
            "SELECT c.serial, a.account_id, a.order_id, c.der, c.issuer, c.not_before, "
            "c.not_after, c.revoked_at, c.spki_sha256 FROM acme_certs a JOIN certs c ON "
            "c.serial = a.serial WHERE a.serial = ?", (format(serial, "x"),))
        return AcmeCert(*rows[0]) if rows else None

    async def acme_secret(self, name: str, make: bytes) -> bytes:
        rows = self._read("SELECT value FROM acme_secrets WHERE name = ?", (name,))
        if rows:
            return bytes(rows[0][0])

        def keep(db: sqlite3.Connection) -> bytes:
            db.execute("INSERT OR IGNORE INTO acme_secrets (name, value) VALUES (?, ?)",
                       (name, make))
            return bytes(db.execute("SELECT value FROM acme_secrets WHERE name = ?",
                                    (name,)).fetchone()[0])
        return await self._write(keep)

    async def redeem_acme_nonce(self, nonce_id: str, expires: dt.datetime,
                                at: dt.datetime) -> bool:
        def redeem(db: sqlite3.Connection) -> bool:
            # Nonces past their expiry are refused by their own timestamp, so their rows
            # can go; a few at a time, on the way.
            db.execute("DELETE FROM acme_nonces WHERE rowid IN (SELECT rowid FROM acme_nonces "
                       "WHERE expires < ? LIMIT 64)", (at.isoformat(),))
            return db.execute("INSERT OR IGNORE INTO acme_nonces (id, expires) VALUES (?, ?)",
                              (nonce_id, expires.isoformat())).rowcount == 1
        return await self._write(redeem)

    async def acme_rate_take(self, kind: str, keys: Sequence[str], at: dt.datetime,
                             since: dt.datetime, limit: int | None) -> str | None:
        def take(db: sqlite3.Connection) -> str | None:
            db.execute("DELETE FROM acme_rate WHERE rowid IN (SELECT rowid FROM acme_rate "
                       "WHERE kind = ? AND at < ? LIMIT 64)", (kind, since.isoformat()))
            if limit is not None:
                over = _rate_over(db, kind, keys, since, limit)
                if over is not None:
                    return over
            db.executemany("INSERT INTO acme_rate (kind, key, at) VALUES (?,?,?)",
                           [(kind, k, at.isoformat()) for k in keys])
            return None
        return await self._write(take)

    async def acme_rate_over(self, kind: str, keys: Sequence[str], since: dt.datetime,
                             limit: int) -> str | None:
        with self._read_lock:
            return _rate_over(self._reader, kind, keys, since, limit)

    async def acme_rate_frees(self, kind: str, key: str, since: dt.datetime,
                              limit: int) -> str | None:
        rows = self._read("SELECT at FROM acme_rate WHERE kind = ? AND key = ? AND at >= ? "
                          "ORDER BY at DESC LIMIT 1 OFFSET ?",
                          (kind, key, since.isoformat(), limit - 1))
        return str(rows[0][0]) if rows else None


def _rate_over(db: sqlite3.Connection, kind: str, keys: Sequence[str], since: dt.datetime,
               limit: int) -> str | None:
    for key in keys:
        n = db.execute("SELECT COUNT(*) FROM (SELECT 1 FROM acme_rate WHERE kind = ? AND "
                       "key = ? AND at >= ? LIMIT ?)",
                       (kind, key, since.isoformat(), limit)).fetchone()[0]
        if n >= limit:
            return key
    return None


def _has_next(db: sqlite3.Connection, kind: str) -> bool:
    return db.execute("SELECT 1 FROM ca_keys WHERE kind = ? AND state = 'next'",
                      (kind,)).fetchone() is not None


def _active_labels(db: sqlite3.Connection, kind: str) -> list[str]:
    return [r[0] for r in db.execute("SELECT label FROM ca_keys WHERE kind = ? AND state = "
                                     "'active'", (kind,))]


class _Undo(Exception):
    """Raised inside a write to roll its savepoint back and hand `value` to the caller."""

    def __init__(self, value: object) -> None:
        super().__init__("undone")
        self.value = value

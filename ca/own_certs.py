"""The daemon's own certificates while it runs.

Its listener's certificate and this host's admin credential (STATE_DIR/admin, made by
`hsmca init` for a year) were renewed only at a start, or never: a daemon up for eleven
months served an expired certificate, and a year after `init` no admin command worked,
with nothing said (an operator trial). Checked every hour and at each SIGHUP:

- the listener's certificate is renewed 30 days before it ends (ca/server_cert.py), and
  whenever the file changed, by this node or another sharing the state directory, every
  worker's listener loads it at its next handshake (the `tls` counter);
- the admin credential is renewed in the last third of its life (at most 30 days before
  its end) for as long as it lived, as a renewal of it (its lineage, and revoked with it
  if a revocation of it commits meanwhile); one revoked or expired is replaced by a new
  one with a new key (a lineage of its own); not one whose role is not admin, not one
  whose files were taken away;
- /metrics says when each of the CA's own certificates ends, whatever failed.

Renewals of one state directory take a lock on a file in it, so two nodes sharing it
never interleave a key and a certificate.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca import ra
from ca.chains import first_cert
from ca.config import Config
from ca.daemon.control import PolicyFeed
from ca.fileutil import write_atomic, write_atomic_together
from ca.issuance.issue import Issuance, decision_context
from ca.issuance.profiles import fingerprint, pem
from ca.logs import Recurring
from ca.policy import Reason, Refused
from ca.revocation import Revocations, sent_or_withheld
from ca.server_cert import RENEW_BEFORE, ensure_server_cert, noted_certs, superseded_path
from ca.store import Store

CHECK_S = 3600.0
KEYS_POLL_S = 1.0  # how soon a key change is looked at
log = structlog.get_logger("hsmca.own_certs")


def _digest_of(path: Path) -> str | None:
    """The whole file's: the chain after the certificate changes alone when a root is
    retired, and the listeners must load it then too (a review found them presenting
    the old chain until a restart, while only the leaf's fingerprint was compared)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


@contextmanager
def _renewing(state: Path) -> Iterator[bool]:
    """Whether this process may renew now: one renewal at a time per directory of the
    listener's files (nodes may share the state directory), the others skip their
    round."""
    try:
        fd = os.open(state / ".renew.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:  # a directory it cannot write: no renewal, said
        log.warning("cannot take the lock to renew the daemon's own certificates",
                    path=str(state / ".renew.lock"), error=exc.strerror or str(exc))
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # and the lock with it


class OwnCerts:
    def __init__(self, config: Config, issuance: Issuance, store: Store, generations: Any,
                 metrics: Any, policies: PolicyFeed, revocations: Revocations) -> None:
        self.config, self.issuance, self.store = config, issuance, store
        self.generations, self.metrics = generations, metrics
        self.policies, self.revocations = policies, revocations
        self._lock = asyncio.Lock()
        # What the workers' listeners loaded: the file as the start left it.
        self._served = _digest_of(config.tls_cert)
        self._tls = Recurring(log, "cannot renew the daemon's TLS certificate now",
                              "the daemon's TLS certificate can be renewed again")
        self._admin = Recurring(log, "cannot renew this host's admin credential now",
                                "this host's admin credential can be renewed again")

    async def check(self) -> None:
        async with self._lock:  # the hourly round and a SIGHUP's: one at a time
            with _renewing(self.config.tls_cert.parent) as mine:
                if mine:
                    try:
                        await ensure_server_cert(self.config, self.issuance)
                    except Exception as exc:  # the HSM or the log away: the next round
                        self._tls.failed(str(exc) or type(exc).__name__)
                    else:
                        self._tls.ok()
                    try:
                        await self._renew_admin()
                    except Exception as exc:
                        self._admin.failed(str(exc) or type(exc).__name__)
                    else:
                        self._admin.ok()
                    self._load_if_changed()
                    # Under the lock: another node of this state directory notes what
                    # it replaces in the same file (a review).
                    await self._supersede_noted()
            self._load_if_changed()  # renewed by another node of the state directory
            await self._say_ends()

    def _load_if_changed(self) -> None:
        now = _digest_of(self.config.tls_cert)
        if now is not None and now != self._served:
            self._served = now
            self.generations.bump("tls")
            log.info("the listeners take the daemon's TLS certificate file anew at their "
                     "next handshake")

    async def _supersede_noted(self) -> None:
        """The listener's certificates replaced (by a round, a start, the root's
        ceremony: ca/server_cert.py notes each), revoked as superseded once the new one
        is served: each stayed valid for its year, and every issuing key retired after a
        rotation counted it among its live certificates, so `key retire` named its end,
        a year on, as the time to wait for (a key trial). One that cannot be revoked now
        (the HSM or the inventory away) stays noted for the next round."""
        noted = superseded_path(self.config)
        if not noted.exists():
            return
        served = first_cert(self.config.tls_cert)
        if served is None:
            return  # the pair being made again: not yet
        revoked = {cert.serial_number for cert in noted_certs(noted)
                   if cert.serial_number != served.serial_number
                   and await self._supersede(cert)}
        # Read again, the pair too: a start of another node of this state directory,
        # which takes no lock, may have noted one meanwhile, and replaced the pair. What
        # was not revoked stays noted; the one served now (noted by a replacement a crash
        # cut short) is dropped.
        served = first_cert(self.config.tls_cert) or served
        left = [cert for cert in noted_certs(noted) if cert.serial_number not in revoked
                and cert.serial_number != served.serial_number]
        if left:
            write_atomic(noted, "".join(pem(cert) for cert in left), mode=0o644)
        else:
            noted.unlink(missing_ok=True)

    async def _supersede(self, cert: x509.Certificate, role: str = "server",
                         what: str = "the daemon's previous TLS certificate") -> bool:
        """Revoke `cert`, this daemon's former certificate of `role`, as superseded;
        False if it must be tried again."""
        serial = format(cert.serial_number, "x")
        try:
            rec = await self.store.cert_by_fingerprint(fingerprint(cert))
            if rec is None or rec.revoked_at is not None or rec.role != role:
                return True  # not this CA's, revoked already (a leaked key's), not its own
            ctx = decision_context(self.policies.current, self.issuance.issuers)
            order = ra.order(ctx, ra.Local(), ra.RevokeRequest(cert.serial_number,
                                                               "superseded"))
            await self.revocations.revoke(order, None)
        except Refused as exc:  # for good: not tried again
            if exc.reason is not Reason.ALREADY_REVOKED:  # (another node of this state
                log.warning(f"{what} is not revoked as superseded", serial=serial,
                            error=exc.detail)  # directory's)
            return True
        except Exception as exc:  # the HSM or the inventory away
            log.warning(f"{what} is not revoked as superseded now", serial=serial,
                        error=str(exc) or type(exc).__name__)
            return False
        log.info(f"{what} is revoked as superseded", serial=serial)
        return True

    async def _say_ends(self) -> None:
        ends = {"tls": first_cert(self.config.tls_cert),
                "admin": first_cert(self.config.admin_cert)}
        try:
            issuers = await self.issuance.keys.refresh()
            ends |= {"root": issuers.current.root, "issuing": issuers.current.cert}
        except Exception:  # the inventory away: the files' ends still count
            pass
        for which, cert in ends.items():
            if cert is not None:
                self.metrics.not_after.labels(which).set(cert.not_valid_after_utc.timestamp())

    async def _renew_admin(self) -> None:
        path = self.config.admin_cert
        cert = first_cert(path)
        if cert is None:  # taken away: the operator's choice
            return
        rec = await self.store.cert_by_fingerprint(fingerprint(cert))
        if rec is None or rec.role != "admin":
            return  # not this CA's, or not an admin's: not renewed
        life = cert.not_valid_after_utc - cert.not_valid_before_utc
        left = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
        # Revoked or expired, it authenticates no more, and an API trial that revoked
        # the CA's only admin credential found no way back: no admin could ask for
        # another, and `init` refuses an existing CA. Whoever may read this directory
        # holds the admin credential anyway, so the daemon makes a new one in its place,
        # with a new key and a lineage of its own (the revoked one's would take it too).
        # Removing the files says "no admin credential here" (not replaced).
        dead = ("revoked" if rec.revoked_at is not None
                else "expired" if left <= dt.timedelta(0) else None)
        issuers = await self.issuance.keys.refresh()
        # Its issuing CA's certificate revoked (`hsmca key revoke`): it authenticates no
        # more, so it is renewed now, not months later in its last third (a review: each
        # node's own admin credential was locked out).
        cut_off = issuers.x509_of(rec.issuer) in issuers.revoked_ca
        if dead is None and left >= min(RENEW_BEFORE, life / 3) and not cut_off:
            return  # not due
        if dead is not None:
            log.warning(f"this host's admin credential was {dead}: a new one, with a new "
                        "key, replaces it (remove the files for none)", path=str(path),
                        serial=rec.serial)
        else:
            log.info("renewing this host's admin credential", path=str(path),
                     ends=cert.not_valid_after_utc.isoformat(), serial=rec.serial)
        key = ec.generate_private_key(ec.SECP256R1())
        ctx = decision_context(self.policies.current, self.issuance.issuers)
        order = ra.order(ctx, ra.Local(), ra.LocalCertRequest(
            "admin", key.public_key(), rec.names, life,
            renewed_from=None if dead else rec.serial))
        issued = await self.issuance.x509(order)
        async with sent_or_withheld(self.issuance, issued):  # not written: revoked
            # Revoked while it was signed: the new one goes with it, and is not written.
            if dead is None:
                await self.revocations.settle(rec.serial, None,
                                              child=issued.cert.serial_number)
            # Both written before either is replaced: a full disk leaves the old pair
            # whole, not a new key beside the old certificate (a review).
            write_atomic_together([(self.config.admin_key, key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()), 0o600), (path, pem(issued.cert), 0o644)])
        log.info("this host's admin credential is renewed", path=str(path),
                 serial=format(issued.cert.serial_number, "x"),
                 ends=issued.cert.not_valid_after_utc.isoformat())
        if cut_off:  # its CA revoked: not left "valid" among what must enroll again
            await self._supersede(cert, "admin", "this host's previous admin credential")

    async def run(self) -> None:
        while True:
            seen = (self.generations.get("keys"), self.generations.get("revocations"))
            try:
                await self.check()
            except Exception:  # never the end of the task: the next round tries again
                log.exception("the round of the daemon's own certificates failed")
            # Hourly, and at once when a key changed (the listener's chain follows a
            # retired root when it is retired, not at some later restart, which hid the
            # cause of the clients it cut off: a key trial) or a certificate was revoked
            # (the listener's own, revoked, is replaced at once: a relying-party trial).
            for _ in range(int(CHECK_S / KEYS_POLL_S)):
                await asyncio.sleep(KEYS_POLL_S)  # a poll of a shared counter's pace
                if (self.generations.get("keys"),
                        self.generations.get("revocations")) != seen:
                    break

"""Revocation: what is revoked, the CRL, OCSP (ocsp.py), SSH revocations and the KRL.

What revocations made by any process of the daemon come to here is rebuilt when
the shared counters move (ca/generations.py). A revocation is written to the audit
log before the inventory: a revocation the log does not show never happened. It
reaches everything issued on the strength of what it revokes: with keyCompromise
the whole live lineage (each certificate records the one it was renewed from), and
every SSH certificate any of them obtained; those show in the CRL, OCSP and the KRL.
Every signature (CRL, OCSP) is ordered by the registration authority and made by
the issuers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca import ra
from ca.audit.voided import void
from ca.chains import issued_by
from ca.generations import Generations, OnChange
from ca.issuance import profiles as prof
from ca.issuance.issue import Issuance, Issued, IssuedSSH
from ca.logs import keep_trying
from ca.policy import Reason, Refused
from ca.revocation.adopted import adopted, line_fields
from ca.revocation.ocsp import OCSPSigner
from ca.ssh import (
    RevokedCerts,
    SSHPublicKey,
    blob_of,
    build_krl,
    parse_public_key,
    revocable_key,
)
from ca.store import CertRecord, CRLRecord, OCSPDue, SSHSelector, Store
from ca.store.errors import StoreUnavailable
from ca.store.records import Revoked as Reached
from hsm.errors import AuditUnavailable, HSMUnavailable

CRL_VALIDITY = ra.CRL_VALIDITY
CRL_NUMBER_TRIES = 5  # numbers a refresh takes at most while revocations land meanwhile
Revoked = dict[int, tuple[dt.datetime, str | None, str | None]]  # serial -> (at, reason, issuer)
log = structlog.get_logger("hsmca.revocation")
# A cert.revoke line names this many serials at most: 1,000 of 40 hex digits (a serial's
# 20 octets) take 43 KB of the 64 KiB an audit line may have.
SERIALS_PER_LINE = 1000
# What an SSH revocation this node committed moves (ca/generations.py)
SSH_COMMITTED = ("ssh_revocations", "ssh_revoked_here")
COMMIT_RETRY_S = 5  # a revocation recorded and not committed: tried again this often


class RecordedNotCommitted(StoreUnavailable):
    """The revocation's audit line is durable and the inventory did not take it: it
    happened (the log says so, and a start completes it from there), and is committed
    as soon as the inventory is back. Not "nothing was revoked" (a chaos trial: the
    503 said so, and the next start revoked it all the same, with the recorded time)."""

    def __init__(self, why: str, at: dt.datetime, serials: list[int], count: int) -> None:
        super().__init__(why)
        self.at, self.serials, self.count = at, serials, count

    def advice(self, effect: str, meanwhile: str = "") -> str:
        """The warning its answer carries: what happened, when `effect` follows, and
        not to send it again (a second line)."""
        return (f"the inventory is unavailable ({self}): the revocation is recorded in the "
                f"audit log and stands, and {effect} once the inventory takes it, tried "
                "every few seconds, at the latest at the daemon's next start"
                f"{'; ' + meanwhile if meanwhile else ''}. Do not send it again")


@asynccontextmanager
async def sent_or_withheld(issuance: Issuance, issued: Issued | IssuedSSH
                           ) -> AsyncIterator[None]:
    """What runs between a certificate's signing and its delivery (a check that a
    revocation did not race it, the files it is written to): if that fails, the
    certificate is not delivered, and is withheld, so that it does not stay valid with
    nobody holding it. For the routes and the daemon's own credential alike."""
    try:
        yield
    except (RecordedNotCommitted, Refused) as exc:
        # The check revoked it itself (a revocation raced the request), or that
        # revocation stands recorded: not withheld, a second revocation would race it.
        if isinstance(exc, Refused) and exc.reason is not Reason.REVOKED:
            issuance.withhold(issued, exc)
        raise
    except BaseException as exc:  # a stop's cancellation too
        issuance.withhold(issued, exc)
        raise


async def unless_revoked_meanwhile(revocation: Awaitable[object]) -> None:
    """Await a revocation the caller makes on its own account (not asked by a client):
    one committed between the caller's look and this one (the revocation's own sweep,
    an admin's, another node's) has done it, and its line is voided, so the certificate
    is revoked all the same. Only a client is told 409 already-revoked (a review: the
    callers that did not expect it answered 409 or logged that it could not be revoked)."""
    try:
        await revocation
    except Refused as exc:
        if exc.reason is not Reason.ALREADY_REVOKED:
            raise


@dataclass(frozen=True)
class Revocation:
    """What a revocation did, once it is recorded and committed."""

    at: dt.datetime
    serials: list[int]  # every certificate revoked
    ssh_certs: int  # SSH certificates revoked with them
    # Serials whose issuer is retired: it signs nothing, so their CRL and OCSP cannot
    # say they are revoked (the daemon itself refuses them).
    unpublished: dict[int, str]
    # Why their CRL and OCSP responses are not re-signed yet (the HSM or the log is
    # away; the refresher and the next CRL request sign them when it is back), or None.
    pending: str | None = None
    audit_seq: int | None = None  # the cert.revoke line's


class AuditAppend(Protocol):
    async def append(self, event: str, **fields: Any) -> int: ...


class _Counted:
    """Revocations the inventory took, for the daemon's metrics (hsmca_revoked_total):
    each process that revokes sets `on_revoked`."""

    def __init__(self) -> None:
        self.on_revoked: Callable[[str, str, int], None] | None = None  # kind, reason, n

    def add(self, kind: str, reason: str | None, count: int) -> None:
        if count and self.on_revoked is not None:
            self.on_revoked(kind, reason or "unspecified", count)


COUNTED = _Counted()


class Revocations:
    def __init__(self, store: Store, audit: AuditAppend, issuance: Issuance,
                 generations: Generations,
                 context: Callable[[], Awaitable[ra.Context]]) -> None:
        self.store, self.audit, self.issuance = store, audit, issuance
        self.generations = generations
        self._context = context  # the RA's context, as of now
        self._crl_locks: dict[str, asyncio.Lock] = {}
        self.ocsp = OCSPSigner(issuance, context)
        # label: (DER, nextUpdate, serials), the last CRL served, for an inventory outage
        self._served_crls: dict[str, tuple[bytes, dt.datetime, frozenset[int]]] = {}
        self._served_crls_while_away: str | None = None  # said once per outage
        self.revoked: OnChange[Revoked] = OnChange(generations, "revocations", self._load)
        self.revoked_ssh_keys: OnChange[frozenset[str]] = OnChange(
            generations, "ssh_revocations", self._load_ssh_keys)
        self.compromised_keys: OnChange[frozenset[str]] = OnChange(
            generations, "revocations", self._load_compromised_keys)
        self.krl: OnChange[bytes] = OnChange(generations, "ssh_revocations", self._build_krl)
        self._krl_while_away = False  # said once per outage (served_krl)
        self._krl_here = -1  # `ssh_revoked_here` as the last KRL built read it
        self._committing: set[asyncio.Task[None]] = set()  # see _commit_later

    def _commit_later(self, what: str, commit: Callable[[], Awaitable[Any]],
                      counters: tuple[str, ...]) -> None:
        """Commit a revocation whose line is durable once the inventory takes it, then
        move `counters` so every process sees it; a stop before that leaves it to the
        next start (ca/revocation/from_log.py)."""
        async def attempt() -> None:
            await commit()
            for counter in counters:
                self.generations.bump(counter)
        keep_trying(self._committing, log, f"{what} recorded in the audit log, committed",
                    attempt, COMMIT_RETRY_S, (StoreUnavailable,))

    async def _revoke_certs(self, serials: Sequence[int], at: dt.datetime,
                            reason: str | None) -> Reached:
        done = await self.store.revoke_certs(serials, at, reason)
        COUNTED.add("x509", reason, len(done.serials))
        COUNTED.add("ssh", reason, done.ssh_certs)  # issued on the strength of those
        return done

    async def _load(self) -> Revoked:
        return {serial: (at, reason, issuer)
                for serial, at, reason, issuer in await self.store.revoked_certs()}

    async def _load_compromised_keys(self) -> frozenset[str]:
        return frozenset(await self.store.compromised_keys())

    async def _load_ssh_keys(self) -> frozenset[str]:
        return frozenset(await self.store.revoked_ssh_keys())

    async def is_revoked(self, serial_hex: str) -> bool:
        return int(serial_hex, 16) in (await self.revoked.get())[1]

    # ---- X.509 ---------------------------------------------------------------------------

    async def issuer_of(self, cert: x509.Certificate) -> str | None:
        """The label of the issuing key in use whose signature `cert` carries, or None:
        what proves a certificate the inventory does not know is this CA's own."""
        issuers = await self.issuance.keys.refresh()
        return next((label for label, issuer in issuers.x509.items()
                     if issued_by(cert, issuer.cert)), None)

    async def adopt(self, cert: x509.Certificate, issuer: str, actor: str,
                    request_id: str | None) -> None:
        """Record a certificate this CA's key signed and its inventory lacks
        (ca/revocation/adopted.py), the audit line first, as for anything the inventory
        takes. One recorded meanwhile (the same request twice at once) is left as it is."""
        new = adopted(cert, issuer, self.issuance.audit_log)
        await self.audit.append("cert.adopt", **line_fields(new), actor=actor,
                                request_id=request_id)
        try:
            await asyncio.wrap_future(self.store.add_cert(new))
        except StoreUnavailable:
            raise
        except Exception:  # its row is there already (a unique key): the same, or say so
            held = await self.store.cert(new.serial)
            if held is None or held.fingerprint != new.fingerprint:
                raise

    async def revoke(self, order: ra.RevokeOrder, request_id: str | None) -> Revocation:
        """Record and commit the revocation, then sign what says so. Once committed it
        stands: a failure to sign then is reported (`pending`), not raised, so the
        client does not retry what is done."""
        now = prof.utcnow()
        if order.identity is not None:
            targets = await self.store.live_certs_named(order.identity, now)
            revoked = await self.store.revoked_certs_named(order.identity, now)
            if order.reason == "keyCompromise":
                # Those revoked for another reason too, whose reason becomes
                # keyCompromise (their keys barred, their lineages revoked), as a
                # serial's does: an identity offboarded, then found leaked, was refused
                # as revoked already, and its keys enrolled again (a relying-party trial).
                targets = sorted({*targets, *(s for s, why in revoked
                                              if why != "keyCompromise")})
            if not targets:
                # A repeat (a retry whose answer was lost) is told so, as a serial's is,
                # not "not found": an API trial's client took that for never revoked
                # (a name, not a text: a page of 100 others containing it hid it).
                if revoked:
                    raise Refused(f"everything live issued to {order.identity!r} is revoked "
                                  "already", Reason.ALREADY_REVOKED)
                raise Refused(f"nothing live was issued to {order.identity!r}",
                              Reason.NOT_FOUND)
        else:
            assert order.serial is not None
            targets = [order.serial]
        roots = list(targets)  # each one's lineage is its whole family tree
        if order.lineage:
            targets = sorted(await self._reach(roots, now))
        # The record first: a revocation the log does not show never happened.
        parts = await self._record(order, targets, request_id)
        seq = parts[0][0]
        try:
            done = await self._revoke_certs(targets, now, order.reason)
        except StoreUnavailable as exc:
            async def commit() -> None:
                late = await self._revoke_certs(targets, now, order.reason)
                late = await self._sweep(order, roots, late, now, None)
                await self._revoke_renewed_since(order, roots, list(late.serials), now)
            self._commit_later("revocation", commit, ("revocations", *SSH_COMMITTED))
            raise RecordedNotCommitted(str(exc), now, list(targets), len(targets)) from None
        if done.serials:
            self.generations.bump("revocations")  # committed: every process reloads
        if done.ssh_certs:
            self.generations.bump(*SSH_COMMITTED)
        lost = set(targets) - set(done.serials)
        for part, serials in parts:  # revoked already when this commit came (another
            if here := sorted(lost.intersection(serials)):  # request's, at once)
                await self._void(part, here if len(here) < len(serials) else None,
                                 request_id)
        if not done.serials:
            raise Refused("already revoked", Reason.ALREADY_REVOKED)
        done = await self._sweep(order, roots, done, now, request_id)
        # The revoked responses are signed now (the refresher would within seconds, but a
        # relying party should not get a good one a moment longer than needed); the
        # stored CRL is stale from now on, and if re-signing fails here the next GET
        # tries again. Meanwhile OCSP serves no 'good' response for them (tryLater).
        unpublished: dict[int, str] = {}
        pending = None
        at = now
        try:
            issuers = await self.issuance.keys.refresh()  # a key retired meanwhile counts
            records = {s: await self.store.cert(s) for s in done.serials}
            # Every one revoked before, its reason only made keyCompromise: the time that
            # stands is the answer's (it was this request's, which a CI run's repeat a
            # second later told apart from the first answer's)
            times = {r.revoked_at for r in records.values() if r is not None and r.revoked_at}
            if times and now.isoformat() not in times:
                at = min(dt.datetime.fromisoformat(t) for t in times)
            of = {s: issuers.x509_of(r.issuer if r else None) for s, r in records.items()}
            unpublished = {s: label for s, label in of.items() if label not in issuers.x509}
            # (a certificate whose reason became keyCompromise keeps its revocation time)
            await self.ocsp.sign([OCSPDue(s, of[s], r.revoked_at or now.isoformat(),
                                          order.reason, r.not_after)
                                  for s, r in records.items() if r is not None],
                                 order.actor, request_id)
            for label in sorted(set(of.values()) & set(issuers.x509)):
                await self.refresh_crl(request_id, label)
        except (AuditUnavailable, HSMUnavailable, StoreUnavailable, Refused) as exc:
            # Committed, so it stands: what says so follows (the refresher, the next CRL
            # request), and the client must not retry what is done.
            pending = str(exc) or type(exc).__name__
            log.warning("revoked, but the CRL and OCSP responses are not re-signed yet",
                        serials=[format(s, "x") for s in done.serials], error=pending,
                        request_id=request_id)
        if unpublished:
            log.warning("revoked certificates of a retired issuer: their CRL and OCSP cannot "
                        "say so", serials=[format(s, "x") for s in unpublished],
                        issuers=sorted(set(unpublished.values())), request_id=request_id)
        return Revocation(at, list(done.serials), done.ssh_certs, unpublished, pending, seq)

    async def _void(self, seq: int, lost: list[int] | None, request_id: str | None) -> None:
        """Say that the revocation line at `seq` changed nothing (or nothing for `lost`).
        After the counters moved, and never failing the request: what it says is only
        that the line above it did less than it claims (a review: written before the
        counters, a log that failed here left a revocation unseen by the workers)."""
        try:
            await void(self.audit, seq, "cert.revoke", "already revoked when this "
                       "revocation was committed", request_id,
                       **({} if lost is None else {"serials": [format(s, "x") for s in lost]}))
        except AuditUnavailable as exc:
            log.warning("cannot say in the audit log that a revocation line changed nothing",
                        seq=seq, error=str(exc), request_id=request_id)

    async def _record(self, order: ra.RevokeOrder, serials: list[int],
                      request_id: str | None, swept: bool = False
                      ) -> list[tuple[int, list[int]]]:
        """The audit lines, (seq, serials) each; `swept` for the certificates a
        revocation's second look found (`serials` are those alone: the first line named
        the rest). SERIALS_PER_LINE serials a line, `part` and `parts` saying which of
        how many lines when there are several: one line for every serial of a lineage of
        1,750 was longer than an audit line may be, a 500, and nothing was revoked (a
        review)."""
        chunks = [serials[i:i + SERIALS_PER_LINE]
                  for i in range(0, len(serials), SERIALS_PER_LINE)] or [[]]
        written: list[tuple[int, list[int]]] = []
        try:
            for n, chunk in enumerate(chunks, 1):
                written.append((await self.audit.append(
                    "cert.revoke",
                    serial=None if order.serial is None else format(order.serial, "x"),
                    serials=[format(s, "x") for s in chunk],
                    identity=order.identity, lineage=order.lineage, reason=order.reason,
                    actor=order.actor, request_id=request_id,
                    **({} if order.follows is None else {"follows": format(order.follows,
                                                                           "x")}),
                    **({"swept": True} if swept else {}),
                    **({"part": n, "parts": len(chunks)} if len(chunks) > 1 else {})),
                    chunk))
        except AuditUnavailable:
            # A part could not be written: nothing is committed, and the parts before it
            # say so (a review: a start would otherwise complete them alone from the log,
            # a revocation half done that nobody asked for). With the log away for those
            # too, that start does; the daemon's log says so now.
            for seq, _ in written:
                try:
                    await void(self.audit, seq, "cert.revoke", "a later part of this "
                               "revocation could not be written: nothing of it was "
                               "committed", request_id)
                except AuditUnavailable:
                    log.error("a revocation's first parts are in the audit log, its next "
                              "part could not be written: a start completes those parts "
                              "from the log; revoke the rest again once the log takes "
                              "lines", parts=[s for s, _ in written], request_id=request_id)
                    break
            raise
        return written

    async def _reach(self, roots: list[int], now: dt.datetime) -> set[int]:
        """What a keyCompromise revocation of `roots` takes: their lineages (a renewal
        with a new key proves only that the old key was held) and every live
        certificate of any key among them, with its lineage in turn, until nothing new
        turns up. A key certified twice outside one lineage (an EST client enrolled
        again with its configured key; a CA upgraded from a release that recorded no
        lineage) kept its other certificate good and renewable (an upgrade trial)."""
        reach: set[int] = set()
        walk, keys = set(roots), set[str]()
        while walk:
            family = set(walk)
            records: dict[int, CertRecord] = {}
            for serial in sorted(walk):
                # One read per family tree, whatever its members' state: a member another
                # read found has the same tree (a walk of each member was a walk of the
                # tree per member: an identity of 2,011 renewals of one certificate took
                # 31 s, its worker killed as stuck).
                if serial not in records:
                    records.update((int(r.serial, 16), r)
                                   for r in await self.store.renewal_family(serial))
            family.update(s for s, r in records.items()
                          if r.revoked_at is None and r.not_after > now.isoformat())
            added = family - reach
            reach |= family
            spkis = {r.spki_sha256 for s in sorted(added)
                     if (r := records.get(s) or await self.store.cert(s)) is not None} - keys
            keys |= spkis
            walk = set(await self.store.live_certs_with_keys(sorted(spkis), now)) - reach \
                if spkis else set()
        return reach

    async def _sweep(self, order: ra.RevokeOrder, roots: list[int], done: Reached,
                     now: dt.datetime, request_id: str | None) -> Reached:
        """Once more, now that the revocation is committed. A request signed while it
        ran may have recorded a renewal of one of these certificates, or an SSH
        certificate on the strength of one, after the lineage above was read (or, on
        PostgreSQL, after the SSH certificates were marked) and checked its parent
        before this commit: such a request found nothing to inherit, so this finds it
        (`settle` covers the other order; between them nothing escapes). The walk from
        each of `roots` covers its whole family tree, revoked members too, so a renewal
        of any member is found from the root: one walk each, not one per member (that
        was a walk of the whole tree per member: 37 s for a lineage of 368)."""
        serials, ssh = set(done.serials), done.ssh_certs
        # What was looked at: a member another revocation took meanwhile is not among
        # `serials` (this one did not revoke it), and must not be found new forever.
        seen = serials | set(roots)
        while True:
            new: list[int] = []
            if order.lineage:
                new = sorted(await self._reach(roots, now) - seen)
                seen.update(new)
                if new:
                    await self._record(order, new, request_id, swept=True)
            again = await self._revoke_certs([*sorted(serials), *new], now, order.reason)
            if again.serials:
                self.generations.bump("revocations")
            if again.ssh_certs:
                self.generations.bump(*SSH_COMMITTED)
            serials.update(again.serials)
            ssh += again.ssh_certs
            if not new:
                return Reached(tuple(sorted(serials)), ssh)

    async def _revoke_renewed_since(self, order: ra.RevokeOrder, roots: list[int],
                                    revoked: list[int], at: dt.datetime) -> None:
        """After a commit that came late: the renewals of revoked certificates made
        since the revocation's time, while the inventory did not say so (`settle` found
        their parent live), and theirs in turn, are revoked with it (a review renewed a
        certificate revoked for keyCompromise in that gap, and kept the renewal)."""
        family: dict[int, CertRecord] = {}
        for root in roots:
            family.update({int(r.serial, 16): r for r in await self.store.renewal_family(root)})
        gone, new = set(revoked), []
        grew = True
        while grew:
            grew = False
            for serial, rec in family.items():
                if serial in gone or rec.renewed_from is None or rec.revoked_at is not None:
                    continue
                if int(rec.renewed_from, 16) in gone and (rec.issued_at or "") >= at.isoformat():
                    gone.add(serial)
                    new.append(serial)
                    grew = True
        if new:
            await self._record(order, sorted(new), None, swept=True)
            await self._revoke_certs(sorted(new), at, order.reason)

    async def settle(self, parent_hex: str, request_id: str | None, *,
                     child: int | None = None, ssh_serial: int | None = None) -> None:
        """After a certificate was recorded on the strength of `parent_hex` (a renewal,
        `child`, or an SSH certificate): if that certificate was revoked meanwhile (a
        revocation ran while this request was signed, after its check at the start),
        what was just recorded is revoked with it, and the request is refused rather
        than answered with it. Read from the inventory itself, not from this process's
        cache of revocations, which follows a commit only after it."""
        parent = await self.store.cert(int(parent_hex, 16))
        if parent is None or parent.revoked_at is None:
            return
        order = ra.order(await self._context(), ra.Local(), ra.RevokedMeanwhile(
            int(parent_hex, 16), parent.reason, child, ssh_serial))
        # The revocation's own sweep may have got there first: then nothing is logged
        # twice, and the answer is the same.
        if isinstance(order, ra.SSHRevokeOrder):
            if matching := await self.count_ssh(ssh_serial, None, None):
                await unless_revoked_meanwhile(self.revoke_ssh(order, matching, request_id))
            what = f"SSH certificate {ssh_serial} is revoked with it (in the KRL)"
        else:
            assert child is not None
            record = await self.store.cert(child)
            if record is not None and record.revoked_at is None:
                await unless_revoked_meanwhile(self.revoke(order, request_id))
            what = f"the new certificate {child:x} is revoked with it"
        log.warning("a revocation raced this request: what it got is revoked too",
                    revoked_parent=parent_hex, child=None if child is None else format(child, "x"),
                    ssh_serial=ssh_serial, request_id=request_id)
        raise Refused(f"the client certificate {parent_hex} was revoked while this request "
                      f"was being signed; {what}", Reason.REVOKED)

    async def crl(self, issuer: str | None = None) -> bytes:
        """The newest CRL of `issuer` (the current one by default), re-signed when a
        revocation is missing from it or half its validity has passed. Kept in the
        inventory, so every worker serves the same one and CRL numbers only grow.
        (Revocations are never undone, so a CRL that lists as many as the inventory
        holds lists them all.) A retired issuer signs nothing: its last CRL is served
        as it is. With the inventory away, the last one this process served, while it
        is valid and lists every revocation this process knows of, its knowledge
        current (no change it has not read): nothing can be revoked meanwhile, the
        revocation's commit needing that same inventory."""
        try:
            label, der = await self._crl(issuer)
        except StoreUnavailable as exc:
            label = issuer or self.issuance.issuers.current_x509
            kept = self._served_crls.get(label)
            known = self.revoked.known()
            if kept is None or kept[1] <= prof.utcnow() or known is None or not {
                    s for s, (_, _, by) in known.items()
                    if self.issuance.issuers.x509_of(by) == label} <= kept[2]:
                raise
            if self._served_crls_while_away != label:
                log.warning("serving the last CRL this process served: the inventory is "
                            "away", issuer=label, error=str(exc))
                self._served_crls_while_away = label
            return kept[0]
        self._served_crls_while_away = None
        kept = self._served_crls.get(label)
        if kept is None or kept[0] != der:
            crl = x509.load_der_x509_crl(der)
            if crl.next_update_utc is not None:
                self._served_crls[label] = (der, crl.next_update_utc,
                                            frozenset(r.serial_number for r in crl))
        return der

    async def _crl(self, issuer: str | None) -> tuple[str, bytes]:
        """(the issuer's label, as it was resolved, and its CRL)."""
        issuers = await self.issuance.keys.refresh()
        label = issuer or issuers.current_x509
        if issuers.crl_signer(label) is None:
            latest = (await self.store.latest_crl(label) if label in issuers.crl_past()
                      else None)
            if latest is None:
                raise Refused(f"no CRL of an issuer {label!r}", Reason.NOT_FOUND)
            return label, latest.der
        for _ in range(3):  # a revocation racing the refresh: sign again, with it
            der = await self._current_crl(label)
            if der is not None:
                return label, der
            try:
                await self.refresh_crl(None, label, only_if_stale=True)
            except (AuditUnavailable, HSMUnavailable) as exc:
                # The HSM or the log is away: the last CRL stands until its nextUpdate
                # (a revocation since is published when they are back: `revoke` says so).
                still = await self.still_valid_crl(label)
                if still is None:
                    raise
                log.warning("serving the last CRL: it cannot be re-signed now",
                            issuer=label, error=str(exc) or type(exc).__name__)
                return label, still
        latest = await self.store.latest_crl(label)
        if latest is None:  # refresh_crl raises when it cannot sign; never serve nothing
            raise RuntimeError("no CRL after a successful refresh")
        return label, latest.der

    async def _revoked_by(self, label: str, fresh: bool = False
                          ) -> dict[int, tuple[dt.datetime, str | None]]:
        """What `label` has revoked: as this process knows it, or with `fresh` as the
        inventory holds it now (another node's revocation reaches the process a
        moment after its commit)."""
        revoked = await self._load() if fresh else (await self.revoked.get())[1]
        issuers = self.issuance.issuers
        if fresh:  # another process's revocation of a CA certificate counts too
            issuers = await self.issuance.keys.refresh()
        return {**{s: (at, reason) for s, (at, reason, issuer) in revoked.items()
                   if issuers.x509_of(issuer) == label},
                **issuers.revoked_by_root(label)}

    async def still_valid_crl(self, label: str) -> bytes | None:
        latest = await self.store.latest_crl(label)
        if latest is None:
            return None
        crl = x509.load_der_x509_crl(latest.der)
        nxt = crl.next_update_utc
        return latest.der if nxt is not None and nxt > prof.utcnow() else None

    async def _current_crl(self, label: str) -> bytes | None:
        revoked = await self._revoked_by(label)
        latest = await self.store.latest_crl(label)
        if latest is None:
            return None
        age = prof.utcnow() - dt.datetime.fromisoformat(latest.this_update)
        return latest.der if latest.revoked >= len(revoked) and age <= CRL_VALIDITY / 2 else None

    async def _numbered(self, label: str) -> tuple[int, dt.datetime,
                                                   dict[int, tuple[dt.datetime, str | None]]]:
        """A CRL number, when it was taken, and what `label` had revoked then. A relying party
        takes a higher number as superseding (RFC 5280 5.2.3), so a CRL must list what
        every lower-numbered one did, across processes and nodes. What is revoked is
        read from the inventory itself (another node's revocation reaches this
        process's cache a moment after its commit), before the number is taken and
        after: when the two reads agree, the CRL lists exactly what was revoked when its
        number was taken, and numbers are taken in order. (Reading only before let
        another refresh, numbered later, miss a revocation this one listed; reading
        only after, the other way round.) A revocation between the reads costs a
        number; after a few, the last reads are taken (the next CRL mends them)."""
        revoked = await self._revoked_by(label, fresh=True)
        for _ in range(CRL_NUMBER_TRIES):
            number, taken = await self.store.next_crl_number(lead=ra.BACKDATE)
            after = await self._revoked_by(label, fresh=True)
            if after == revoked:
                break
            revoked = after
        return number, taken, after

    async def refresh_crl(self, request_id: str | None, issuer: str | None = None,
                          only_if_stale: bool = False) -> None:
        """Sign a new CRL for `issuer` (every issuer that still signs, by default)."""
        issuers = await self.issuance.keys.refresh()
        for label in [issuer] if issuer else list(issuers.x509):
            lock = self._crl_locks.setdefault(label, asyncio.Lock())
            async with lock:
                if only_if_stale and await self._current_crl(label) is not None:
                    continue  # another request re-signed it while this one waited
                order = ra.order(await self._context(), ra.Local(), ra.CRLRequest(label))
                number, taken, revoked = await self._numbered(label)
                # thisUpdate as of its number, a minute back: a CRL numbered later has a
                # later one, whichever process or node signs it, a second later at least
                # while no more than one a second are signed for a minute (OpenSSL keeps
                # the first of equal ones: a review). A worker's own reading of the last
                # CRL's, a second added, gave one numbered later an earlier thisUpdate
                # under concurrent revocations (a cluster trial).
                order = dataclasses.replace(order, this_update=taken - ra.BACKDATE)
                crl = await self.issuance.crl(
                    order, number, [(s, at, r) for s, (at, r) in revoked.items()], request_id)
                await self.store.add_crl(CRLRecord(
                    number, len(revoked), order.this_update.isoformat(),
                    crl.public_bytes(serialization.Encoding.DER), label))

    # ---- SSH ---------------------------------------------------------------------------------

    async def count_ssh(self, serial: int | None, key_id: str | None,
                        public_key: SSHPublicKey | None, revoked: bool = False) -> int:
        """How many unrevoked SSH certificates the selector matches (revoked ones, with
        `revoked`): the RA's evidence."""
        return await self.store.count_ssh_certs(_selector(serial, key_id, public_key),
                                                revoked)

    async def revoke_ssh(self, order: ra.SSHRevokeOrder, matching: int,
                         request_id: str | None) -> int:
        """Carry out the registration authority's order, decided when `matching`
        certificates matched (`count_ssh`); how many it hit."""
        which = _selector(order.serial, order.key_id, order.public_key)
        key = order.public_key
        # The record first, as for X.509: a revocation the log does not show never happened.
        # The public key itself too (it is public): a start that finds the line without
        # its commit completes it, the key barred (ca/revocation/from_log.py).
        seq = await self.audit.append("ssh.revoke", serial=None if order.serial is None
                                      else str(order.serial), key_id=order.key_id,
                                      public_key_sha256=key.sha256 if key else None,
                                      **({"public_key": key.line} if key else {}),
                                      certificates=matching, actor=order.actor,
                                      request_id=request_id)
        at = prof.utcnow()
        try:
            hit = await self.store.revoke_ssh(which, at, key.line if key else None)
            COUNTED.add("ssh", None, hit)
        except StoreUnavailable as exc:
            self._commit_later("SSH revocation", lambda: self.store.revoke_ssh(
                which, at, key.line if key else None), SSH_COMMITTED)
            raise RecordedNotCommitted(str(exc), at, [], matching) from None
        self.generations.bump(*SSH_COMMITTED)  # committed: every process rebuilds its KRL
        if hit == 0 and matching and key is None:
            # Another request's revocation of the same certificate committed first (a
            # review: four at once were three 200s, each line claiming "certificates": 1).
            # Its line changed nothing, and says so; the client hears what a repeat does.
            try:
                await void(self.audit, seq, "ssh.revoke", "already revoked when this "
                           "revocation was committed", request_id)
            except AuditUnavailable as exc:
                log.warning("cannot say in the audit log that a revocation line changed "
                            "nothing", seq=seq, error=str(exc), request_id=request_id)
            raise Refused("already revoked (by a revocation committed just before this one)",
                          Reason.ALREADY_REVOKED)
        return hit

    async def served_krl(self) -> bytes:
        """The KRL; with the inventory away, the one this process last built (docs/
        cluster.md: the CRL's caveat). Built before and not since the database came
        back (its reconnection makes every process read the revocations again), it was
        a 503 in the next outage (a cluster trial). Not one built before an SSH
        revocation this node committed since: hosts would take it as current, and the
        revoked certificate would still log in (a review)."""
        try:
            krl = (await self.krl.get())[1]
        except StoreUnavailable as exc:
            last = self.krl.last()
            if last is None or self._krl_here != self.generations.get("ssh_revoked_here"):
                raise
            if not self._krl_while_away:
                log.warning("serving the last KRL this process built: the inventory is away",
                            error=str(exc))
                self._krl_while_away = True
            return last
        self._krl_while_away = False
        return krl

    async def _build_krl(self) -> bytes:
        """The KRL: the revoked certificates of every SSH CA key, a section each; of
        keys retired or destroyed too (hosts and clients may still trust them), and the
        revoked public keys."""
        here = self.generations.get("ssh_revoked_here")  # read before: never newer
        certs = await self.store.revoked_ssh_certs()
        keys = await self.store.revoked_ssh_keys()
        issuers = await self.issuance.keys.refresh()  # a retirement moves keys to ssh_past

        def serials(label: str, cert_type: str) -> list[int]:
            return [s for t, s, of in certs
                    if t == cert_type and issuers.ssh_of(of, t) == label]
        groups = [RevokedCerts(blob_of(i.key.public_key), serials(i.id, i.cert_type), [])
                  for i in issuers.ssh.values()]
        for label, (cert_type, line) in issuers.ssh_past.items():
            if revoked := serials(label, cert_type):
                groups.append(RevokedCerts(parse_public_key(line).blob, revoked, []))
        # Its version and date are the newest revocation's, not this process's clock:
        # each worker builds its own KRL, and their versions differed by a second, so
        # a poller's If-None-Match got 200 from one and 304 from another, and a version
        # went backwards between two polls (a relying-party trial).
        latest = await self.store.latest_ssh_revocation()
        at = int(latest.timestamp()) if latest is not None else 0
        krl = build_krl(at, at, groups, [revocable_key(k).blob for k in keys])
        self._krl_here = here  # with the value OnChange keeps: no await in between
        return krl


def _selector(serial: int | None, key_id: str | None,
              public_key: SSHPublicKey | None) -> SSHSelector:
    return SSHSelector(serial=serial, key_id=key_id,
                       key_sha256=public_key.sha256 if public_key else None)

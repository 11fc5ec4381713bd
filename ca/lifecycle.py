"""The CA's keys over their life: rotate, retire, destroy; every step decided by the
registration authority, done in the HSM through the audited path, recorded in the
inventory, and picked up by every process at once (the shared `keys` counter).

- rotate: a new non-exportable key of the same type in the token (`hsm.keygen`); for
  an issuing key, the root signs its CA certificate. The new key is active, the one
  it replaces previous: a previous issuing key keeps signing CRLs and OCSP for what it
  issued; a previous SSH CA key stays trusted (listed by /v1/ssh/ca, covered by the
  KRL).
- retire: no use of any kind any more; the certificates it issued stay trusted as
  client certificates until they expire or are revoked.
- destroy: C_DestroyObject on a retired key, with an intent and an outcome in the
  audit log like a signature.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ca import ra
from ca.audit.note import NoteError, verify_note
from ca.audit.voided import void
from ca.errors import NotDone
from ca.fileutil import write_atomic
from ca.generations import Generations
from ca.issuance.issue import Issuance, sign_ca_cert
from ca.issuance.issuers import Issuers, ssh_public_key
from ca.issuance.profiles import ca_name, issuing_ca_name, pem, utcnow
from ca.policy import Reason, Refused
from ca.store import KeyRecord, Store, clustered
from ca.store.errors import StoreUnavailable
from hsm.errors import HSMError

LABEL_PREFIX = {"issuing": "issuing-ca", "ssh-user": "ssh-user-ca", "ssh-host": "ssh-host-ca",
                "audit": "audit"}

log = structlog.get_logger("hsmca.keys")


def key_rows(records: Sequence[KeyRecord], counts: Mapping[str | None, int]
             ) -> list[dict[str, Any]]:
    """GET /v1/keys's rows (and `hsmca key list`'s, read beside a stopped daemon): each
    key with how many certificates it signed, newest first."""
    return [{"label": r.label, "kind": r.kind, "state": r.state, "algorithm": r.algorithm,
             "created_at": r.created_at, "changed_at": r.changed_at,
             "fingerprint": r.fingerprint, "uri": r.uri, "signed": counts.get(r.label, 0),
             **({"ssh_fingerprint": fp} if r.ssh_public_key
                and (fp := _ssh_fingerprint(r.ssh_public_key)) else {}),
             **({"revoked_at": r.revoked_at, "revocation_reason": r.revocation_reason}
                if r.revoked_at else {})}
            for r in reversed(records)]


def _ssh_fingerprint(line: str) -> str | None:
    """An SSH CA key's fingerprint as sshd logs it and ssh-keygen -l prints it
    (SHA256:base64): an SSH trial could not tell from the SPKI's which key sshd named."""
    from ca.ssh import parse_public_key
    try:
        return parse_public_key(line).sha256
    except Refused:
        return None

class AuditAppend(Protocol):
    async def append(self, event: str, **fields: Any) -> int: ...

    async def checkpoint(self, cosigned: bool = False) -> str | None: ...


class KeyLifecycle:
    def __init__(self, issuance: Issuance, store: Store, audit: AuditAppend,
                 generations: Generations, bundle_path: Path) -> None:
        self.issuance, self.store, self.audit = issuance, store, audit
        self.generations, self.bundle_path = generations, bundle_path

    async def listing(self) -> list[dict[str, Any]]:
        out = key_rows(await self.store.keys(), await self.store.signed_by())
        for key in out:
            # What retiring a previous key (or destroying a retired one) would cut off,
            # for `key retire` and `key destroy` to say before they ask (an SSH trial: said
            # only once retired; a key trial: destroy said it in the daemon's log alone).
            # Only those: each is a count.
            if key["state"] in ("previous", "retired"):
                key["live"], key["live_until"] = await self.live(key["label"])
                key["live_renewed"] = await self.live_renewed(key["label"])
        return out

    async def request(self, action: str, kind: str | None, label: str | None,
                      confirmed: bool | None = None, stage: bool = False,
                      reason: object = None, asker_issuer: str | None = None
                      ) -> ra.KeyRequest:
        """The RA's request, with what the inventory says of the key named (a rotation:
        of the kind's staged key, if it has one)."""
        if label is None:
            staged = next((r.label for r in await self.store.keys()
                           if r.kind == kind and r.state == "next"), None)
            return ra.KeyRequest(action, kind or "", stage=stage, staged=staged)
        record = next((r for r in await self.store.keys() if r.label == label), None)
        behind = (await self._not_handed_over() if action == "retire" and record is not None
                  and record.kind == "audit" else ())
        root_signs = asked_with_it = False
        if action == "revoke" and record is not None and record.cert is not None \
                and record.kind == "issuing":
            issuers = await self.issuance.keys.refresh()
            root_signs = issuers.certifying_root(
                x509.load_der_x509_certificate(record.cert)) is not None
            asked_with_it = asker_issuer is not None and issuers.x509_of(asker_issuer) == label
        return ra.KeyRequest(action, record.kind if record else "", label,
                             record.state if record else None, confirmed, behind,
                             reason=reason, root_signs=root_signs,
                             revoked=record is not None and record.revoked_at is not None,
                             asked_with_its_cert=asked_with_it)

    async def carry_out(self, order: ra.KeyOrder, context: ra.Context,
                        request_id: str | None) -> dict[str, Any]:
        if order.action in ("rotate", "stage"):
            return await self._rotate(order, context, request_id)
        if order.action == "promote":
            return await self._promote(order, request_id)
        assert order.label is not None
        if order.action == "revoke":
            return await self._revoke(order, request_id)
        absent = False  # a destroy that found the key gone from the token already
        if order.action == "retire":
            await self.audit.append("key.retire", label=order.label, kind=order.kind,
                                    actor=order.actor, request_id=request_id)
            at = utcnow()
            if not (await self.store.set_key_state(order.label, "retired", at,
                                                   expect="previous")
                    or await self.store.set_key_state(order.label, "retired", at,
                                                      expect="next")):
                raise Refused(f"{order.label!r} changed meanwhile", Reason.CONFLICT)
        else:
            destroyed = await self.issuance.pipeline.destroy_key(order.label, order.actor,
                                                                 request_id)
            absent = destroyed is None
            half = destroyed[1] if destroyed is not None else None
            if absent:
                # The token no longer holds it: a destroy cut short after C_DestroyObject
                # (its hsm.destroy lines are in the log), or a removal outside hsmca.
                # Either way it is gone; the inventory says so now, and the log why.
                await self.audit.append("key.destroy", label=order.label, kind=order.kind,
                                        result="absent-from-token", actor=order.actor,
                                        request_id=request_id)
            await self.store.set_key_state(order.label, "destroyed", utcnow(),
                                           expect="retired")
        await self._published()  # first: every process must stop using it
        live, until = await self.live(order.label)
        done: dict[str, Any] = {"label": order.label, "kind": order.kind, "state": "retired"
                                if order.action == "retire" else "destroyed",
                                "live": live, "live_until": until,
                                "live_renewed": await self.live_renewed(order.label)}
        if order.action == "destroy":
            try:  # (the destroy is done: a store away now must not fail its answer)
                record = next((r for r in await self.store.keys()
                               if r.label == order.label), None)
            except StoreUnavailable:
                record = None
            if record is not None and record.revoked_at:
                # Its certificates are refused already wherever the root's CRL is
                # checked: the CLI must not say they "work where trusted" (a review).
                done["revoked_at"] = record.revoked_at
        if absent:
            done["absent_from_token"] = True  # no C_DestroyObject: the CLI says so
            done["warnings"] = [f"the token no longer held {order.label!r} (an earlier destroy "
                                "cut short, or a removal outside hsmca); it is recorded as "
                                "destroyed"]
        elif order.action == "destroy" and half is not None:
            # One half gone before this destroy: said, not passed over as a destroy of the
            # pair (a key lifecycle trial deleted the private key with pkcs11-tool, and
            # `key destroy` said only "destroyed")
            gone = "private key" if half == "public" else "public key"
            done["warnings"] = [f"the token held only the {half} half of {order.label!r}: "
                                f"its {gone} was gone before this destroy (an earlier destroy "
                                "cut short, whose hsm.destroy intent is in the audit log, or a "
                                "removal outside hsmca: if neither, find out who removed it)"]
        return done

    async def _revoke(self, order: ra.KeyOrder, request_id: str | None) -> dict[str, Any]:
        """The CA certificate of the issuing key `order.label`, revoked: recorded in the
        log first (a revocation the log does not show never happened), then in the
        inventory; the caller has its root's CRL signed again."""
        assert order.label is not None
        record = next(r for r in await self.store.keys() if r.label == order.label)
        assert record.cert is not None
        cert = x509.load_der_x509_certificate(record.cert)
        seq = await self.audit.append("key.revoke", label=order.label, kind=order.kind,
                                      serial=format(cert.serial_number, "x"),
                                      reason=order.reason, actor=order.actor,
                                      request_id=request_id)
        at = utcnow()
        if not await self.store.revoke_ca_key(order.label, at, order.reason):
            # Another revocation won the race: this line changed nothing, and says so (a
            # review found three key.revoke lines, three reasons, for one revocation).
            await void(self.audit, seq, "key.revoke", "the CA certificate was revoked "
                       "already when this committed", request_id)
            raise Refused(f"the CA certificate of {order.label!r} is revoked already",
                          Reason.ALREADY_REVOKED)
        await self._published()
        issuers = await self.issuance.keys.refresh()
        return {"label": order.label, "kind": order.kind, "state": record.state,
                "serial": format(cert.serial_number, "x"), "reason": order.reason,
                "revoked_at": at.isoformat(), "root": issuers.certifying_root(cert),
                "live": (await self.live(order.label))[0]}

    async def _not_handed_over(self) -> tuple[str, ...]:
        """The logs whose latest checkpoint the active audit key has not signed yet (a
        node hands over at its first checkpoint after the rotation; the `init` log of a
        CA of several nodes, which no node writes, at the root's next rotation): the
        registration authority keeps the previous key until there are none."""
        active = self.issuance.issuers.audit.public_key
        assert isinstance(active, Ed25519PublicKey)
        logs: list[tuple[str, str | None]]
        cluster_logs = getattr(self.store, "audit_logs", None)  # PostgreSQL: every log
        if cluster_logs is not None:
            logs = [(node, note) for node, _, note in await cluster_logs()]
        else:
            logs = [(ra.SINGLE_LOG, await self.audit.checkpoint())]
        behind = []
        for name, note in logs:
            if note is None:
                continue  # its first checkpoint will be the active key's
            try:
                verify_note(note, note.split("\n", 1)[0], active)
            except NoteError:
                behind.append(name)
        return tuple(behind)

    async def live(self, label: str) -> tuple[int | None, str | None]:
        """How many certificates `label` signed are still valid, and until when the last:
        once it is retired, a revocation of one reaches no CRL or OCSP response. (None
        when the inventory cannot say now: the step itself is done.)"""
        now = utcnow()
        try:
            count, until = await self.store.live_signed_by(label, now)
            if label == self.issuance.issuers.first_x509:  # recorded before labels were kept
                more, later = await self.store.live_signed_by(None, now)
                count, until = count + more, max(filter(None, (until, later)), default=None)
        except StoreUnavailable:
            return None, None
        return count, until

    async def live_renewed(self, label: str) -> int | None:
        """How many of `live`'s certificates were replaced by a renewal still valid: an
        operator told to renew them found the count did not move (an operator's trial).
        None when the inventory cannot say now."""
        now = utcnow()
        try:
            count = await self.store.live_renewed_by(label, now)
            if label == self.issuance.issuers.first_x509:  # recorded before labels were kept
                count += await self.store.live_renewed_by(None, now)
        except StoreUnavailable:
            return None
        return count

    async def _rotate(self, order: ra.KeyOrder, context: ra.Context,
                      request_id: str | None) -> dict[str, Any]:
        # As the inventory has it now: a rotation whose publication failed left this
        # process's view behind, and the next one's line named as previous a key two
        # rotations old (a full-disk trial).
        issuers = await self.issuance.keys.refresh()
        current = {"issuing": issuers.current.key,
                   "ssh-user": issuers.ssh[issuers.current_ssh["user"]].key,
                   "ssh-host": issuers.ssh[issuers.current_ssh["host"]].key,
                   "audit": issuers.audit}[order.kind]
        now = utcnow()
        stamp = f"{now:%Y%m%d%H%M%S}-{secrets.token_hex(2)}"
        label = f"{LABEL_PREFIX[order.kind]}-{stamp}"
        try:
            info = await self.issuance.pipeline.generate_key(label, current.key_type)
        except HSMError as exc:
            # A 500 before (a full-disk trial: SoftHSM's token directory was full, and
            # C_GenerateKeyPair failed; a directory that takes no file breaks the session).
            raise NotDone(f"the HSM did not make the new {order.kind} key ({exc}); nothing "
                          f"was rotated (if the token holds {label} now, hsmca never uses "
                          "it: remove it, docs/keys.md). If the HSM is otherwise up (GET "
                          "/health), with SoftHSM this is most often a full disk under its "
                          "token directory: free space there, then rotate again") from None
        staged = order.action == "stage"
        try:
            record = await self._new_record(order, context, issuers, stamp, label, info,
                                            request_id)
            if staged:
                seq = await self.audit.append(
                    "key.stage", kind=order.kind, label=label, active=current.label,
                    fingerprint=info.spki_sha256, actor=order.actor, request_id=request_id)
            else:
                seq = await self.audit.append(
                    "key.rotate", kind=order.kind, label=label, previous=current.label,
                    fingerprint=info.spki_sha256, actor=order.actor, request_id=request_id)
        except BaseException as exc:
            self._orphaned(label, order.kind, exc)
            if isinstance(exc, OSError):
                # What to do, by what failed (a docs trial was told to free space for a
                # directory in the file's place).
                then = ("Free space, then rotate again" if exc.errno in (
                    errno.ENOSPC, errno.EDQUOT) else "Fix that, then rotate again")
                raise NotDone(f"cannot write {exc.filename or 'a file'}: "
                              f"{exc.strerror or exc}; nothing was rotated (the key {label} "
                              "made in the token is recorded nowhere and never used: remove "
                              f"it, docs/keys.md). {then}") from None
            raise
        event = "key.stage" if staged else "key.rotate"
        try:
            # Only if the kind's active key is still `current` (and, staging, the kind has
            # no staged key yet): a review saw two rotations at once both name the same
            # previous key, and four stagings at once leave four staged keys.
            if staged:  # as `next`: published, signing nothing
                taken = await self.store.stage_key(record, current.label)
            else:
                taken = await self.store.rotate_keys(
                    [record], replacing={order.kind: current.label}) is not None
        except Exception as exc:
            await self._not_committed(label, order.kind, seq, event, exc, request_id)
            taken = True  # (it raises unless the commit landed after all)
        if not taken:
            self._orphaned(label, order.kind, RotatedMeanwhile())
            await void(self.audit, seq, event, f"another rotation or staging of the "
                       f"{order.kind} key committed first", request_id)
            if order.kind == "issuing":  # its CA certificate out of the trusted bundle
                with contextlib.suppress(Exception):
                    await write_bundle(self.bundle_path, self.store)
            raise Refused(f"another rotation or staging of the {order.kind} key finished "
                          f"while this one ran; nothing was {'staged' if staged else 'rotated'}"
                          f" by this one (the key {label} it made is recorded nowhere and "
                          "never used: remove it, docs/keys.md). `hsmca key list` shows the "
                          "keys now", Reason.CONFLICT)
        await self._published()
        if staged:
            return {"label": label, "kind": order.kind, "state": "next",
                    "active": current.label, "fingerprint": info.spki_sha256}
        return {"label": label, "kind": order.kind, "previous": current.label,
                "fingerprint": info.spki_sha256}

    @staticmethod
    def _orphaned(label: str, kind: str, exc: BaseException) -> None:
        """The key a rotation made stays in the token, recorded nowhere: named now, when
        the operator can tell why (a full-disk trial found it only at a later start,
        told there it might be the CA's current key from a newer backup)."""
        log.warning("the rotation stopped after it made its key in the token: that key is "
                    "recorded nowhere and never used; remove it with the HSM's own tools "
                    "(docs/keys.md)", label=label, kind=kind,
                    error=str(exc) or type(exc).__name__)

    async def _not_committed(self, label: str, kind: str, seq: int, event: str,
                             exc: Exception, request_id: str | None) -> None:
        """The rotation's line is written and its commit failed. Where the failure is
        known to have committed nothing (SQLite rolls back; a statement's error comes
        before the commit) and the inventory does not hold the key, the line is voided,
        so that no line says a key was put in use that no process uses (a review), and
        the error raised. A PostgreSQL commit whose answer was lost may land after any
        look: that is said, not voided (a review). Returns if the commit landed."""
        definite = not isinstance(exc, StoreUnavailable) or not clustered(self.store)
        try:
            landed = any(r.label == label for r in await self.store.keys())
        except Exception:
            landed = None
        if landed:
            return
        if landed is None or not definite:
            log.warning("a rotation's commit failed, and whether it landed cannot be told "
                        "now: `hsmca key list` says once the inventory answers; if the key "
                        "is not there, it is recorded nowhere and never used (docs/keys.md)",
                        label=label, kind=kind, error=str(exc) or type(exc).__name__)
            raise exc
        self._orphaned(label, kind, exc)
        with contextlib.suppress(Exception):  # best effort: the log may be away too
            await void(self.audit, seq, event, "the inventory did not take the new key",
                       request_id)
        raise exc

    async def _new_record(self, order: ra.KeyOrder, context: ra.Context, issuers: Issuers,
                          stamp: str, label: str, info: Any, request_id: str | None
                          ) -> KeyRecord:
        """The new key's inventory record, its CA certificate signed (an issuing key's),
        and written into the bundle the TLS layer trusts before the rotation is recorded:
        written after, a full disk left a rotation recorded and committed that no process
        took up (a 500, and the daemon issued on with the old key: a full-disk trial)."""
        cert_der = None
        if order.kind == "issuing":
            made = ra.order(context, ra.Local(order.actor), ra.IntermediateRequest(
                info.public_key, issuing_ca_name(ca_name(issuers.root), stamp),
                public_url=self.issuance.public_url))
            cert = await sign_ca_cert(self.issuance.pipeline, issuers.root_key, made,
                                      request_id)
            cert_der = cert.public_bytes(serialization.Encoding.DER)
        # To the microsecond: the inventory lists keys by creation time, and two rotations
        # in one second were otherwise listed by their labels' random suffixes.
        at = dt.datetime.now(dt.UTC).isoformat()
        record = KeyRecord(label, order.kind, "next" if order.action == "stage" else "active",
                           info.key_type, at, info.spki_sha256, info.uri, cert_der, at,
                           ssh_public_key(order.kind, info))
        if cert_der is not None:  # (trusting it early is harmless: it has signed nothing)
            await write_bundle(self.bundle_path, self.store, [record])
        return record

    async def _promote(self, order: ra.KeyOrder, request_id: str | None) -> dict[str, Any]:
        """The kind's staged key, trusted since it was staged, signs from now on; the
        active one becomes previous."""
        assert order.label is not None
        issuers = await self.issuance.keys.refresh()
        cert_type = order.kind.removeprefix("ssh-")
        current = issuers.current_ssh[cert_type]
        staged = issuers.ssh.get(order.label)
        fingerprint = staged.key.spki_sha256 if staged is not None else None
        seq = await self.audit.append("key.rotate", kind=order.kind, label=order.label,
                                      previous=current, fingerprint=fingerprint, staged=True,
                                      actor=order.actor, request_id=request_id)
        if await self.store.promote_key(order.label, order.kind,
                                        dt.datetime.now(dt.UTC).isoformat(),
                                        replacing=current) is None:
            # The line stood for a change that did not happen (a review found it left).
            await void(self.audit, seq, "key.rotate", f"{order.label} or {current} changed "
                       "before this committed", request_id)
            raise Refused(f"{order.label!r} or the active {order.kind} key changed meanwhile "
                          "(another rotation); nothing was rotated by this one. `hsmca key "
                          "list` shows the keys now", Reason.CONFLICT)
        await self._published()
        return {"label": order.label, "kind": order.kind, "previous": current,
                "fingerprint": fingerprint, "staged": True}

    async def _published(self) -> None:
        """Every process picks the change up: this one now, the others at their next
        request or handshake. The bundle the TLS layer trusts is written before the
        counter moves, so a handshake that sees the move finds the new intermediate."""
        await write_bundle(self.bundle_path, self.store)  # (unchanged: not written)
        self.generations.bump("keys")
        issuers = await self.issuance.keys.refresh()
        try:
            await asyncio.to_thread(write_chain_files, self.bundle_path.parent, issuers)
        except OSError as exc:  # copies for people and sshd, written again at every start
            log.warning("cannot write the CA's public files now: they still show the keys "
                        "before this change until the next key change or start",
                        path=str(exc.filename or self.bundle_path.parent),
                        error=exc.strerror or str(exc))


class RotatedMeanwhile(Exception):
    """Why a rotation's key was left unused: another rotation of its kind won."""

    def __str__(self) -> str:
        return "another rotation or staging of the same kind committed first"


def write_chain_files(x509_dir: Path, issuers: Issuers) -> None:
    """The state directory's public files of the keys in use, as the inventory has
    them: x509/issuing.pem and chain.pem (the issuer new certificates come from, and
    its chain, what the daemon's own TLS certificate is served with), root.pem and
    roots.pem (the active root; every root, it first), and ssh/user_ca.pub and
    host_ca.pub (every SSH CA key still trusted, newest first, as /v1/ssh/ca serves
    them: what sshd's TrustedUserCAKeys and known_hosts take). The roots too: a node
    whose host missed the copy of x509/ after a root rotation elsewhere kept the old
    root.pem, and its own admin commands failed once the old root was retired (a
    cluster trial). Each root's certificate is its own key's (Issuers checks)."""
    current = issuers.current
    write_atomic(x509_dir / "issuing.pem", pem(current.cert))
    write_atomic(x509_dir / "chain.pem", current.chain_pem)
    write_atomic(x509_dir / "root.pem", pem(issuers.root))
    write_atomic(x509_dir / "roots.pem", "".join(pem(c) for c in issuers.roots or
                                                 (issuers.root,)))
    ssh_dir = x509_dir.parent / "ssh"
    for cert_type in ("user", "host"):
        lines = issuers.ssh_lines(cert_type, f"hsmca-{cert_type}-ca")
        write_atomic(ssh_dir / f"{cert_type}_ca.pub", "".join(f"{line}\n" for line in lines))


async def write_bundle(path: Path, store: Store, extra: Sequence[KeyRecord] = ()) -> None:
    """Every issuing CA certificate ever made, newest first, then every root: what the
    TLS layer trusts for client certificates (destroyed keys' certificates included:
    what they issued stays valid until it expires or is revoked). Not the roots'
    cross-certificates: among trust anchors, two roots of one name that certify each
    other make a loop OpenSSL follows until the chain is too long."""
    records = [*await store.keys(), *extra]  # `extra`: a key about to be recorded
    issuing = [r.cert for r in reversed(records) if r.kind == "issuing" and r.cert]
    roots = [r.cert for r in reversed(records) if r.kind == "root" and r.cert]
    text = "".join(pem(x509.load_der_x509_certificate(der)) for der in issuing + roots)
    try:
        if path.read_text() == text:
            return  # as it is: nothing to write (a full disk then fails nothing)
    except (OSError, ValueError):
        pass
    await asyncio.to_thread(write_atomic, path, text)  # fsyncs: off the event loop

"""`hsmca audit prove`: that one certificate's signing is in the audit log a checkpoint
commits to, from inclusion proofs, without fetching the whole log.

An auditor trial had to find the certificate's `audit_seq` in the inventory, fetch its
lines and a proof with curl, and write an RFC 9162 verifier to show that a certificate
it was handed is in the checkpoint it had saved. This does that: the certificate's
intent and outcome lines (the outcome naming the certificate's fingerprint) are leaves
of the tree whose root the checkpoint, signed by the pinned audit key, commits to.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding

from ca.errors import CLIError

LOOK_AHEAD = 1000  # lines after the intent in which its outcome is looked for


def add_parser(asub: Any, remote_flags: Any) -> None:
    from ca.commands.args import ssh_serial
    p = asub.add_parser(
        "prove", help="prove one certificate's signing is in the log a checkpoint signs",
        description="Fetch the certificate's intent and outcome lines from the daemon (the "
        "inventory names the first), and their RFC 9162 inclusion proofs against a "
        "checkpoint: the daemon's latest, or one you saved (--checkpoint), verified with the "
        "pinned audit key. Proven: the checkpoint's tree holds both lines, the outcome "
        "succeeded and names this certificate's SHA-256. Exit 0 proven, 1 not.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--cert-file", dest="cert_file", type=Path, metavar="FILE",
                       help="the certificate to prove, X.509 (PEM) or OpenSSH (a -cert.pub "
                       "file): its fingerprint must be the one the outcome line names")
    which.add_argument("--serial", help="the certificate's serial (hex), as the CA lists it")
    which.add_argument("--ssh-serial", dest="ssh_serial", type=ssh_serial, metavar="N",
                       help="an SSH certificate's serial (decimal, as ssh-keygen -L shows "
                       "it); its line is found by the time the inventory says it was issued")
    which.add_argument("--extends", type=Path, metavar="OLD_CHECKPOINT",
                       help="instead of a certificate: prove that the checkpoint (the "
                       "daemon's latest, or --checkpoint) extends this older one you saved, "
                       "by a consistency proof: the log only grew in between")
    p.add_argument("--url", required=True, help="the daemon's URL")
    p.add_argument("--key", "--audit-key", dest="key", required=True, metavar="AUDIT_KEY",
                   help="the pinned audit public key (as for `audit verify`)")
    p.add_argument("--checkpoint", type=Path,
                   help="a checkpoint you saved (a checkpoint file, or checkpoint.cosigned): "
                   "prove against it rather than the daemon's latest")
    p.add_argument("--node", metavar="NAME",
                   help="with --extends, on a CA of several nodes: whose log the checkpoints "
                   "are (GET /v1/audit/logs lists them); a certificate's own is in its record")
    p.add_argument("--state", type=Path,
                   help="the state `audit verify --url --state` keeps: the audit keys the "
                   "log handed over to since it began, to verify a checkpoint signed by one")
    remote_flags(p, key_alias=False)
    p.set_defaults(command_key="audit-prove")


def prove(args: argparse.Namespace) -> int:
    from ca.commands.audit_cmd import _audit_key, _client_context
    ctx, pinned = _client_context(args), _audit_key(args.key)
    if args.extends is not None:
        return asyncio.run(_extends(args, ctx, pinned))
    ssh = _ssh_which(args)
    if ssh is not None:
        return asyncio.run(_prove_ssh(args, ctx, pinned, *ssh))
    serial, der = _which(args)
    return asyncio.run(_prove(args, ctx, pinned, serial, der))


def _ssh_which(args: argparse.Namespace) -> tuple[int, str | None] | None:
    """An SSH certificate's serial and, from a -cert.pub file, the fingerprint its
    outcome line must name (SHA-256 of its `TYPE BASE64`); None for an X.509 one. An
    SSH trial's -cert.pub was refused as "holds no PEM certificate"."""
    from ca.commands.ssh_cmd import _is_ssh_cert, _ssh_cert
    if args.ssh_serial is not None:
        return args.ssh_serial, None
    if args.cert_file is None or not _is_ssh_cert(args.cert_file):
        return None
    cert = _ssh_cert(args.cert_file)  # (its errors say what is wrong with the file)
    return cert.serial, hashlib.sha256(cert.public_bytes()).hexdigest()  # `TYPE BASE64`


def _which(args: argparse.Namespace) -> tuple[str, bytes | None]:
    """The serial (hex, as the inventory has it) and, with --cert-file, the DER."""
    from ca.client import load_certificates
    from ca.commands.client_cmd import parse_serial
    if args.cert_file is None:
        return parse_serial(args.serial), None
    try:
        head = args.cert_file.read_text(errors="replace")[:200].split()
    except OSError:
        head = []  # (load_certificates names the file and why)
    if head and (head[0].startswith(("ssh-", "ecdsa-sha2-", "sk-")) or head[0] == "ssh-dss"):
        # A public key is no certificate (an SSH trial gave id_ed25519.pub: "holds no PEM
        # certificate")
        raise CLIError(f"--cert-file {args.cert_file} is an SSH public key ({head[0]}), "
                       "not a certificate: give its certificate (the -cert.pub file beside "
                       "it), or --ssh-serial with the serial ssh-keygen -L prints")
    cert = load_certificates(args.cert_file, "--cert-file")[0]
    return format(cert.serial_number, "x"), cert.public_bytes(Encoding.DER)


def _verified(text: str, pinned: Any, state: Path | None) -> Any:
    """The checkpoint `text` if it verifies with the pinned audit key (or, with the
    auditor's `state`, a key the log handed over to); NoteError or ValueError if not."""
    from ca.audit.note import NoteError, parse_checkpoint
    from ca.audit.verify import PinnedKey, followed, load_state
    key = PinnedKey(pinned, parse_checkpoint(text).origin)
    saved = load_state(state) if state is not None else None
    if saved is not None:
        key = followed(saved, key)
    try:
        return key.verify(text)
    except NoteError as exc:
        if saved is None:
            raise
        # The keys a state knows are those handed over before it was saved: an auditor
        # trial's state predated the hand-over, and was told to pin the key it had pinned.
        raise NoteError(f"{exc}; or --state {state} (saved at {saved.get('size')} lines) "
                        "predates an audit key hand-over the log made since: `hsmca audit "
                        "verify --url ... --state` follows the log past it and updates the "
                        "state") from None


@asynccontextmanager
async def _log_client(args: argparse.Namespace, ctx: Any, log: str | None
                      ) -> AsyncIterator[Any]:
    import aiohttp

    from ca.audit.remote import LogClient
    from ca.client import TIMEOUT
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        yield LogClient(session, args.url.rstrip("/"), ctx, log)


async def _the_checkpoint(args: argparse.Namespace, api: Any) -> str:
    """--checkpoint's text, or the daemon's latest."""
    return _read_checkpoint(args.checkpoint) if args.checkpoint else await api.checkpoint()


async def _extends(args: argparse.Namespace, ctx: Any, pinned: Any) -> int:
    """The checkpoint extends OLD: both verify with the pinned key (or one it handed
    over to, with --state), and the daemon's consistency proof between them holds."""
    from ca.audit.merkle import Growth, TreeHead, growth, needs_proof
    from ca.audit.note import NoteError
    from ca.audit.remote import DaemonError
    old_text = _read_checkpoint(args.extends)
    async with _log_client(args, ctx, args.node) as api:
        texts = ((f"the older checkpoint {args.extends}", old_text),
                 ("the checkpoint" if args.checkpoint is None
                  else f"the checkpoint {args.checkpoint}", await _the_checkpoint(args, api)))
        checked = []
        for where, text in texts:
            try:
                checked.append(_verified(text, pinned, args.state))
            except (NoteError, ValueError) as exc:
                return _failed(f"{where} does not verify with the pinned audit key: {exc}")
        old, new = checked
        if old.origin != new.origin:
            return _failed(f"the checkpoints are of two logs ({old.origin!r}, {new.origin!r})")
        if new.size < old.size:
            # (or the two given the other way round: an auditor trial was accused of
            # finding a cut log for its own slip)
            return _failed(f"the checkpoint covers {new.size} lines, fewer than the "
                           f"{old.size} of the one given to --extends: the log was cut, "
                           "unless the two were given the other way round (--extends takes "
                           "the older checkpoint, --checkpoint the newer)")
        head, then = TreeHead(new.size, new.root), TreeHead(old.size, old.root)
        try:
            proof = await api.consistency(old.size, new.size) if needs_proof(then, head) \
                else []
        except DaemonError as exc:
            return _failed(str(exc))
    if growth(then, head, proof) not in (Growth.SAME, Growth.EXTENDS):
        return _failed(f"the checkpoint of {new.size} lines does not extend the older one "
                       f"of {old.size} lines: the log was rewritten in between, and the audit "
                       "key signed both histories (keep both notes: they are the evidence)")
    print(f"PROVEN: the checkpoint of {new.size} lines (root "
          f"{base64.b64encode(new.root).decode()}) extends the older one of {old.size} "
          f"lines (root {base64.b64encode(old.root).decode()}): the log only grew in "
          "between, both signed by the pinned audit key")
    return 0


async def _prove(args: argparse.Namespace, ctx: Any, pinned: Any, serial: str,
                 der: bytes | None) -> int:
    from ca.client import ClientError, get_bytes
    async with _log_client(args, ctx, None) as inventory:
        try:
            rec = json.loads(await get_bytes(inventory.session, f"{inventory.base}/v1/"
                                             f"inventory/certificates/{serial}", ctx))
        except ClientError as exc:
            if exc.status == 404:
                # The CA's own certificates (root, intermediates) are signed in the log
                # too but are not in the inventory that names their lines (an
                # auditor's trial asked of issuing.pem).
                raise CLIError(f"the CA's inventory has no certificate {serial}: `audit "
                               "prove` proves the certificates the CA issued to its clients "
                               "and itself (its listener's, its admin's); the CA "
                               "certificates' signatures (purpose x509-ca) are checked with "
                               "the whole log by `hsmca audit verify`") from None
            raise
    seq, node = rec.get("audit_seq"), rec.get("audit_log")
    if not isinstance(seq, int):
        raise CLIError(f"the inventory names no audit line for certificate {serial} (one "
                       "recorded by an hsmca before 0.4, or adopted after a restore): "
                       "`hsmca audit verify` covers it with the whole log")
    async with _log_client(args, ctx, node) as api:
        cp, where, failed = await _checkpoint(args, api, pinned)
        if failed is not None:
            return failed
        if seq >= cp.size:
            return _failed(f"{where} covers {cp.size} lines, and the certificate's intent is "
                           f"at seq {seq}: not covered yet (the daemon signs a checkpoint "
                           "within seconds of new lines; give a later one)")
        lines = (await api.entries(seq, min(seq + LOOK_AHEAD, cp.size))).split(b"\n")[:-1]
        found = _pair(lines, seq, serial)
        if isinstance(found, str):
            return _failed(found)
        failed = await _included(api, cp, where, found)
        if failed is not None:
            return failed
    (intent_seq, intent), (outcome_seq, outcome) = found
    want = hashlib.sha256(der).hexdigest() if der is not None else rec.get("fingerprint")
    given = f"the certificate in {args.cert_file}" if der is not None else \
        "the inventory's record"
    failed = _outcome_names(outcome, outcome_seq, f"certificate {serial}", want, given)
    if failed is not None:
        return failed
    names = ", ".join(json.loads(intent).get("names") or []) or "-"
    print(f"PROVEN: certificate {serial} ({names}), SHA-256 {want}: its intent (seq "
          f"{intent_seq}) and successful outcome (seq {outcome_seq}) are in {where}, "
          f"{cp.size} lines, root {base64.b64encode(cp.root).decode()}, signed by the pinned "
          "audit key" + (f" (log {node})" if node else ""))
    return 0


async def _checkpoint(args: argparse.Namespace, api: Any, pinned: Any, quiet: bool = False
                      ) -> tuple[Any, str, Any]:
    """The checkpoint to prove against, verified, what to call it, and None; or None,
    that, and the failure (said, with its exit status; only its words, `quiet`)."""
    from ca.audit.note import NoteError
    from ca.audit.remote import DaemonError
    from ca.client import ClientError
    where = f"the checkpoint {args.checkpoint}" if args.checkpoint else \
        "the daemon's latest checkpoint"
    try:
        return _verified(await _the_checkpoint(args, api), pinned, args.state), where, None
    except (NoteError, ValueError, DaemonError, ClientError) as exc:
        why = f"the checkpoint does not verify with the pinned audit key: {exc}" \
            if isinstance(exc, NoteError | ValueError) else str(exc)
        if args.state is None and "it is signed by key id" in why:
            # The hint above is `verify`'s, which follows hand-overs through the log's
            # lines; a proof reads none of them (a key trial pinned the first key, as the
            # hint said, and failed again).
            why += ("; `audit prove` follows a hand-over of the audit key only with "
                    "--state FILE, as `hsmca audit verify --url URL --key KEY --state FILE` "
                    "saves it (it follows every one); or pin the current audit key, once "
                    "you have it from the CA's operator by a channel you trust (not from "
                    "the daemon you are checking)")
        return None, where, why if quiet else _failed(why)


async def _included(api: Any, cp: Any, where: str,
                    found: tuple[tuple[int, bytes], tuple[int, bytes]]) -> int | None:
    """None if both lines are in the checkpoint's tree; else the failure."""
    from ca.audit.merkle import leaf_hash, verify_inclusion
    from ca.audit.remote import DaemonError
    for at, line in found:
        try:
            proof = await api.inclusion(at, cp.size)
        except DaemonError as exc:
            return _failed(str(exc))
        if not verify_inclusion(leaf_hash(line), at, cp.size, proof, cp.root):
            return _failed(f"line {at} as the daemon served it is not in {where} (its "
                           "inclusion proof does not lead to the checkpoint's root): "
                           "the log was changed since, or the daemon serves another")
    return None


def _outcome_names(outcome: bytes, seq: int, what: str, want: str | None, given: str
                   ) -> int | None:
    """None if the outcome succeeded and names the fingerprint `want`; else the failure."""
    fields = json.loads(outcome)
    if fields.get("result") != "ok":
        return _failed(f"the signing of {what} failed (outcome at seq {seq}: "
                       f"{fields.get('result')})")
    if fields.get("fingerprint") != want:
        return _failed(f"the outcome at seq {seq} names the certificate "
                       f"{fields.get('fingerprint')}, not {given} ({want}): a certificate of "
                       "that serial this CA did not sign here")
    return None


# An SSH certificate's intent is found by the time the inventory says it was issued:
# written as that time is taken, it is within seconds of it (a minute for a slow disk).
# (The inventory keeps no seq for an SSH certificate, as it does for an X.509 one.)
SSH_WINDOW = 60


async def _prove_ssh(args: argparse.Namespace, ctx: Any, pinned: Any, serial: int,
                     want: str | None) -> int:
    import datetime as dt

    from ca.audit.remote import DaemonError, list_logs
    from ca.client import ClientError, get_bytes
    async with _log_client(args, ctx, None) as inventory:
        found = json.loads(await get_bytes(
            inventory.session, f"{inventory.base}/v1/inventory/ssh-certificates?q={serial}"
            "&limit=500", ctx))
    rec = next((r for r in found["certificates"] if r["serial"] == str(serial)), None)
    if rec is None:
        raise CLIError(f"the CA's inventory has no SSH certificate {serial} (`hsmca ssh "
                       "list` lists them)")
    try:
        at = dt.datetime.fromisoformat(rec["issued_at"])
    except (TypeError, ValueError):
        raise CLIError(f"the inventory keeps no issue time for SSH certificate {serial}, by "
                       "which its line is found: `hsmca audit verify` covers it with the "
                       "whole log") from None
    at = at if at.tzinfo is not None else at.replace(tzinfo=dt.UTC)
    try:
        logs = await list_logs(args.url, ctx)
    except ClientError as exc:
        raise CLIError(str(exc)) from None
    # A saved checkpoint is of one log, the one whose origin it has (a review's proof
    # against another node's log ended in a 400)
    saved = _origin(_read_checkpoint(args.checkpoint)) if args.checkpoint else None
    problems: list[str] = []  # a log that cannot be checked: said if no log has it
    for log in logs:
        async with _log_client(args, ctx, log) as api:
            where = f"log {log}: " if log else ""
            try:
                if saved is not None and len(logs) > 1 and \
                        _origin(await api.checkpoint()) != saved:
                    continue
            except (ClientError, CLIError, DaemonError) as exc:
                problems.append(f"{where}{exc}")
                continue
            cp, place, failed = await _checkpoint(args, api, pinned, quiet=True)
            if cp is None:
                problems.append(f"{where}{failed}")
                continue
            try:
                pair = await _ssh_pair(api, cp.size, str(serial), at)
                if isinstance(pair, str):
                    return _failed(f"{where}{pair}")
                if pair is None:
                    continue
                failed = await _included(api, cp, place, pair)
            except (ClientError, DaemonError) as exc:
                problems.append(f"{where}{exc}")
                continue
            if failed is not None:
                return failed
        (intent_seq, intent), (outcome_seq, outcome) = pair
        obj = json.loads(intent)
        said = {"key id": (obj.get("key_id"), rec.get("key_id")),
                "principals": (obj.get("principals"), rec.get("principals")),
                "type": (obj.get("purpose"), f"ssh-{rec.get('type')}")}
        differ = [k for k, (log_says, inventory_says) in said.items()
                  if log_says != inventory_says]
        if differ:
            return _failed(f"the intent at seq {intent_seq} and the inventory disagree on "
                           f"SSH certificate {serial}'s {', '.join(differ)}: `hsmca audit "
                           "verify` checks the whole log")
        if want is not None:  # a file: its fingerprint must be the outcome's
            failed = _outcome_names(outcome, outcome_seq, f"SSH certificate {serial}", want,
                                    f"the certificate in {args.cert_file}")
            if failed is not None:
                return failed
        elif json.loads(outcome).get("result") != "ok":
            return _failed(f"the signing of SSH certificate {serial} failed (outcome at seq "
                           f"{outcome_seq}: {json.loads(outcome).get('result')})")
        print(f"PROVEN: SSH certificate {serial} ({obj.get('purpose')}, key id "
              f"{obj.get('key_id')}, principals {', '.join(obj.get('principals') or [])}"
              + (f", SHA-256 {want}" if want else "") + f"): its intent (seq {intent_seq}) "
              f"and successful outcome (seq {outcome_seq}) are in {place}, {cp.size} lines, "
              f"root {base64.b64encode(cp.root).decode()}, signed by the pinned audit key"
              + (f" (log {log})" if log else ""))
        return 0
    return _failed("; ".join([f"no hsm.sign intent for SSH certificate {serial} within "
                              f"{SSH_WINDOW} s of its issuance ({rec['issued_at']}) in the "
                              "lines the checkpoint covers: give a later checkpoint, or "
                              "`hsmca audit verify` the whole log", *problems]))


def _origin(checkpoint: str) -> str:
    from ca.audit.note import NoteError, parse_checkpoint
    try:
        return parse_checkpoint(checkpoint).origin
    except NoteError as exc:
        raise CLIError(f"not a checkpoint: {exc}") from None


async def _ssh_pair(api: Any, size: int, serial: str, at: Any
                    ) -> tuple[tuple[int, bytes], tuple[int, bytes]] | str | None:
    """The intent and outcome of SSH certificate `serial` among the first `size` lines,
    its intent found near `at`, a time with its zone; None if this log has no such
    intent."""
    import datetime as dt

    from ca.audit.timeline import first_after, parse, time_of
    window = dt.timedelta(seconds=SSH_WINDOW)

    async def line(seq: int) -> bytes | None:
        got = (await api.entries(seq, seq + 1)).split(b"\n")
        return got[0] if got[0] else None
    seq = await first_after(line, size, at - window)
    while seq < size:
        lines = (await api.entries(seq, min(seq + LOOK_AHEAD, size))).split(b"\n")[:-1]
        for k, raw in enumerate(lines):
            obj = parse(raw) or {}
            if obj.get("event") == "hsm.sign" and obj.get("phase") == "intent" and \
                    str(obj.get("purpose", "")).startswith("ssh-") and \
                    obj.get("serial") == serial:
                rest = (await api.entries(seq + k, min(seq + k + LOOK_AHEAD, size))
                        ).split(b"\n")[:-1]
                return _pair(rest, seq + k, serial)
            if (when := time_of(obj)) is not None and when > at + window:
                return None
        if not lines:
            break
        seq += len(lines)
    return None


def _read_checkpoint(path: Path) -> str:
    try:
        return path.read_text("utf-8")
    except OSError as exc:
        raise CLIError(f"cannot read the checkpoint {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CLIError(f"{path} is not a checkpoint (not UTF-8 text)") from None


def _pair(lines: list[bytes], first: int, serial: str
          ) -> tuple[tuple[int, bytes], tuple[int, bytes]] | str:
    """The certificate's intent (the first line) and its outcome among `lines`."""
    try:
        intent = json.loads(lines[0]) if lines else {}
    except ValueError:
        intent = {}
    if intent.get("event") != "hsm.sign" or intent.get("phase") != "intent" or \
            intent.get("serial") != serial:
        return (f"line {first}, which the inventory names as the certificate's intent, is "
                f"not the intent to sign certificate {serial}: the inventory and the log "
                "disagree (`hsmca audit verify` checks the whole log)")
    for k, line in enumerate(lines[1:], start=1):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if obj.get("event") == "hsm.sign" and obj.get("phase") == "outcome" and \
                obj.get("op_id") == intent.get("op_id"):
            return (first, lines[0]), (first + k, line)
    return (f"no outcome for the intent at seq {first} within the {len(lines)} lines after "
            "it that the checkpoint covers: give a later checkpoint")


def _failed(why: str) -> int:
    import sys
    print(f"NOT PROVEN: {why}", file=sys.stderr)
    return 1

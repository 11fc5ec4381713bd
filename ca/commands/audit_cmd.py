"""`hsmca audit verify` and `hsmca audit show`."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import ssl
import sys
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from ca.audit.note import parse_checkpoint
from ca.audit.verify import load_state, save_state, verify_log
from ca.audit.witnessed import Witnessed, cosigners
from ca.errors import CLIError


def _audit_key(text: str | Path) -> ed25519.Ed25519PublicKey:
    """The pinned audit key: a PEM file (audit/audit_key.pem), the JSON that `GET
    /v1/audit/key` answers (its `pem`), or the signed-note verifier key itself
    (`name+keyid+base64`, as it answers and as witnesses are given it). Taken as the
    text given: a verifier key's base64 may end in "/", which a Path drops (one key in
    64 was refused as "no such file")."""
    from ca.audit.cosignature import ALG_NOTE, parse_verifier_key
    path = Path(text)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        try:
            given = parse_verifier_key(str(text), ALG_NOTE)
        except ValueError:
            raise CLIError(f"cannot read the audit key {path}: no such file (give the PEM "
                           "file, the JSON of GET /v1/audit/key, or its verifier_key)") from None
        return given.public_key  # type: ignore[no-any-return]
    except OSError as exc:
        raise CLIError(f"cannot read the audit key {path}: {exc.strerror}") from None
    if data.lstrip().startswith(b"{"):
        try:
            data = json.loads(data)["pem"].encode()
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CLIError(f"{path} is JSON but not the answer of GET /v1/audit/key (a "
                           "\"pem\" field)") from None
    if b"PRIVATE KEY" in data:
        raise CLIError(f"{path} is a private key: the audit key to pin is the CA's audit "
                       "public key (audit/audit_key.pem); a client key goes in --client-key")
    try:
        key = load_pem_public_key(data)
    except ValueError:
        raise CLIError(f"{path} is not a PEM public key") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise CLIError(f"{path} is not an Ed25519 key (the audit key is Ed25519)")
    return key


def _origin(args: argparse.Namespace, latest: str | None, data: bytes,
            state: dict[str, Any] | None) -> str | None:
    """The log's origin: --origin, else the one its own first checkpoint names, else
    the saved state's or the checkpoint file's (a log without any checkpoint yet)."""
    if args.origin:
        return str(args.origin)
    marker = b'"checkpoint":"'
    at = data.find(marker)
    if at >= 0:
        return data[at + len(marker):data.find(b"\\n", at)].decode("utf-8", "replace")
    for note in (latest, (state or {}).get("checkpoint")):
        if isinstance(note, str) and note:
            return note.split("\n", 1)[0]
    return None


def _checkpoint_file(args: argparse.Namespace) -> tuple[Path, str | None]:
    """The latest checkpoint's path and text: --checkpoint must exist; the default, the
    daemon's `checkpoint` beside the log, may be missing (a copy of the log alone)."""
    path = args.checkpoint or args.log.parent / (
        "checkpoint.cosigned" if args.witness_key else "checkpoint")
    if args.checkpoint is None and not path.exists():
        if args.witness_key:  # the cosignatures are in that file or nowhere
            raise CLIError(f"--witness-key checks the cosignatures on the latest checkpoint, "
                           f"and there is no {path}: the daemon writes it beside the log "
                           "once a witness has cosigned; give the cosigned checkpoint you "
                           "hold with --checkpoint")
        return path, None
    text = _read_checkpoint(path)
    if text is None:
        raise CLIError(f"--checkpoint {path}: no such file")
    return path, text


def _read_checkpoint(path: Path) -> str | None:
    """The checkpoint note at `path`; None if there is no such file. One that cannot be
    read, or is not a checkpoint note, is a one-line error naming it."""
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CLIError(f"cannot read the checkpoint {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CLIError(f"the checkpoint {path} is not UTF-8 text: not a checkpoint "
                       "(a signed note)") from None
    from ca.audit.note import NoteError, parse_checkpoint
    try:
        parse_checkpoint(text)
    except NoteError as exc:
        raise CLIError(f"the checkpoint {path} is not a checkpoint note: {exc}") from None
    return text


def _plain_checkpoint(args: argparse.Namespace) -> str | None:
    """The daemon's latest checkpoint beside the log, when the cosigned one was taken
    by default (--witness-key without --checkpoint); None if there is none. One that
    is there and not a checkpoint is refused, as without --witness-key."""
    if not args.witness_key or args.checkpoint is not None:
        return None
    return _read_checkpoint(args.log.parent / "checkpoint")


def _witness_keys(texts: list[str]) -> list[Any]:
    from ca.audit.cosignature import ALG_COSIGNATURE, parse_verifier_key
    keys = []
    for text in texts:
        try:
            keys.append(parse_verifier_key(text, ALG_COSIGNATURE))
        except ValueError as exc:
            raise CLIError(f"--witness-key: {exc}") from None
    return keys


def _client_context(args: argparse.Namespace) -> ssl.SSLContext:
    if args.client_cert is None or args.client_key is None:
        # In `audit verify`, --key is the pinned audit key: a client key given as --key
        # lands there, and the missing one is --client-key.
        clash = (" (here --key is the pinned audit public key, so the client's private key "
                 "goes in --client-key)" if args.command_key == "audit-verify" else "")
        raise CLIError("--url needs --client-cert and --client-key (a certificate of role "
                       f"auditor or admin){clash}")
    from ca.client import ssl_context
    return ssl_context(args.ca, args.client_cert, args.client_key)


def _verify_remote(args: argparse.Namespace) -> int:
    if args.state is None:
        raise CLIError("--url needs --state FILE: it remembers what was verified, so that the "
                       "next run fetches only new lines and detects a rewrite")
    if args.checkpoint is not None:
        raise CLIError("--checkpoint is for --log; with --url the daemon serves the checkpoint")
    if args.allow_unsigned:
        raise CLIError("--allow-unsigned is for --log; with --url only lines a checkpoint "
                       "covers are fetched")
    from ca.audit.cluster import log_origin
    from ca.audit.remote import list_logs, log_state_path, logs_gone, verify_remote
    ctx = _client_context(args)
    key = _audit_key(args.key)
    witnesses = _witness_keys(args.witness_key)
    names = asyncio.run(list_logs(args.url, ctx))
    if names == [None]:
        return _report(asyncio.run(verify_remote(args.url, ctx, key, args.state,
                                                 origin=args.origin, witness_keys=witnesses)),
                       "", witnesses, key)
    # A cluster: every node's log, each with a state of its own beside --state.
    if missing := logs_gone(args.state, names):
        print(f"FAILED: {missing}", file=sys.stderr)
        return 1
    _carry_single_state(args.state, names)
    failed = 0
    for name in names:
        assert name is not None
        result = asyncio.run(verify_remote(args.url, ctx, key, log_state_path(args.state, name),
                                           log=name, witness_keys=witnesses,
                                           origin=log_origin(args.origin, name)))
        failed += _report(result, f"log {name}: ", witnesses, key)
    return 1 if failed else 0


def _carry_single_state(state: Path, names: list[str | None]) -> None:
    """--state itself is a single log's state (a single node's, verified before `hsmca
    store move`): on a cluster it would be read by nothing, and what it remembers
    checked by nothing. That log is the cluster's `init` log now, so its state goes on
    as init's; if init has a state of its own already, say that --state is not read."""
    from ca.audit.cluster import CEREMONIES
    from ca.audit.remote import log_state_path
    if not state.is_file():
        return
    init = log_state_path(state, CEREMONIES)
    if CEREMONIES in names and not init.exists():
        shutil.copy2(state, init)
        print(f"note: {state} is the state of a single log: log {CEREMONIES}, which a single "
              f"node's log becomes in PostgreSQL, continues it ({init})")
    else:
        print(f"note: {state} itself is not read on a CA of several nodes: each log's state "
              f"is a file beside it ({log_state_path(state, 'NODE')})", file=sys.stderr)


def _report(result: Any, prefix: str, witnesses: list[Any],
            key: ed25519.Ed25519PublicKey) -> int:
    if not result.ok:
        where = f"at seq {result.bad_seq}" if result.bad_seq is not None else "(no line)"
        print(f"{prefix}FAILED {where}: {result.reason}", file=sys.stderr)
        return 1
    seen = result.witnessed
    if witnesses and seen is not None and (missing := seen.missing(witnesses)):
        why = seen.problem or ("no witness has cosigned a checkpoint of this log"
                               if seen.size is None else f"its cosigned checkpoint of "
                               f"{seen.size} lines")
        print(f"{prefix}FAILED (no line): no cosignature by {', '.join(missing)} on a "
              f"checkpoint of the verified log ({why}); the log itself verified, "
              f"{result.lines} lines", file=sys.stderr)
        return 1
    print(f"{prefix}OK: {result.lines} lines, {result.checkpoints} checkpoint"
          f"{'' if result.checkpoints == 1 else 's'} verified "
          f"(fetched {result.fetched} new lines)")
    if result.new_state and isinstance(result.new_state.get("checkpoint"), str):
        print(f"{prefix}" + _checkpoint_line(result.new_state["checkpoint"],
                                             "the daemon's latest checkpoint", key))
    if seen is not None:
        print(f"{prefix}{_witnessed_line(seen, result.lines)}")
    for trouble in result.witness_trouble:  # the daemon's own words: why not newer
        print(f"{prefix}witness not cosigning: {trouble}")
    if result.note:
        print(f"{prefix}note: {result.note}")
    return 0


def _checkpoint_line(text: str, where: str, pinned: ed25519.Ed25519PublicKey) -> str:
    """Which checkpoint the lines were verified against, and with which pinned key (an
    auditor trial got the same OK line whichever checkpoint it gave)."""
    import base64

    from ca.audit.note import key_id, parse_checkpoint
    cp = parse_checkpoint(text)
    return (f"checkpoint: {where}, {cp.size} lines, root {base64.b64encode(cp.root).decode()}"
            f"; pinned audit key {cp.origin}+{key_id(cp.origin, pinned).hex()}")


def _witnessed_line(seen: Any, lines: int) -> str:
    """How much of the verified log the witnesses vouch for, and since when (an auditor
    trial read "cosigned" as all of it while every witness had been down)."""
    if seen.size is None:
        return "witnessed: no witness has cosigned a checkpoint of this log" + (
            f" ({seen.problem})" if seen.problem else "")
    if not seen.count:
        return (f"witnessed: not by a pinned witness (--witness-key): the cosigned checkpoint "
                f"of {seen.size} lines has {len(seen.cosigners)} cosignature"
                f"{'' if len(seen.cosigners) == 1 else 's'}"
                + (f"; {seen.problem}" if seen.problem else ""))
    names = sorted({c.name for c in seen.cosigners if c.verified})
    when = f", latest cosignature {seen.newest:%Y-%m-%d %H:%M:%S} UTC" if seen.newest else ""
    return (f"witnessed: up to {seen.size} of the {lines} lines, by {len(names)} pinned "
            f"witness{'' if len(names) == 1 else 'es'} ({', '.join(names)}){when}")


def verify(args: argparse.Namespace) -> int:
    if args.url is not None:
        return _verify_remote(args)
    if args.client_cert or args.client_key or args.ca:
        raise CLIError("--client-cert, --client-key and --ca are for --url")
    key = _audit_key(args.key)
    witnesses = _witness_keys(args.witness_key)
    try:
        data = args.log.read_bytes()
    except OSError as exc:
        raise CLIError(f"cannot read the log {args.log}: {exc.strerror}") from None
    cp_path, latest = _checkpoint_file(args)
    try:
        state = load_state(args.state) if args.state and args.state.exists() else None
    except (ValueError, OSError) as exc:
        raise CLIError(f"--state {args.state}: {exc}") from None
    origin = _origin(args, latest, data, state)
    if origin is None:
        raise CLIError("the log holds no checkpoint and no --origin was given; nothing can be "
                       "checked against the audit key")
    for what, note in ((f"the checkpoint {cp_path}", latest),
                       (f"the state {args.state}", (state or {}).get("checkpoint"))):
        named = note.split("\n", 1)[0] if isinstance(note, str) else None
        if named is not None and named != origin:
            raise CLIError(f"{what} is for the log {named[:100]!r}, not this one ({origin!r}, "
                           "as its own checkpoints say): another CA's, or another log's?")
    try:
        # With --witness-key the cosigned checkpoint is the one whose cosignatures count,
        # but the daemon's newer one beside it still says how long the log must be: the
        # longer of the two is the latest, the other vouches for its prefix (a review: an
        # older `checkpoint` put there hid the cosigned one's size)
        plain = _plain_checkpoint(args) if latest is not None else None
        pair = [latest, plain] if plain is not None else [latest]
        pair.sort(key=lambda note: parse_checkpoint(note).size if note else -1)
        result = verify_log(data, key, origin, origin=origin, latest_checkpoint=pair[-1],
                            state=state, open_allowed=args.allow_unsigned,
                            cosigned_checkpoint=pair[0] if len(pair) == 2 else None)
    except ValueError as exc:  # the state file's fault, never the log's (verify_log)
        raise CLIError(f"--state {args.state}: {exc}") from None
    if not result.ok:
        where = "(no line)" if result.bad_seq is None else (
            f"at seq {result.bad_seq} (line {result.bad_seq + 1} of the file)")
        print(f"FAILED {where}: {result.reason}", file=sys.stderr)
        return 1
    if result.unsigned:
        unsigned = (f"UNSIGNED: {result.unsigned} lines, no checkpoint covers them (seq "
                    f"{result.signed} to {result.lines - 1}): anyone who can write the log "
                    "could have changed them")
        if not args.allow_unsigned:
            # Not saved either: the auditor has not accepted these lines.
            print(f"{unsigned}. The {result.signed} lines before them and "
                  f"{result.checkpoints} checkpoints verified. Verify again once the daemon "
                  "has signed a checkpoint over them (a running daemon does within seconds), "
                  "or accept them with --allow-unsigned (a copy, such as a backup taken "
                  "while the daemon served, gets no later checkpoint: its restored "
                  "daemon's first one covers them).", file=sys.stderr)
            return 1
        print(f"{unsigned}; accepted (--allow-unsigned)", file=sys.stderr)
    if result.open_at_end:
        print(f"OPEN: {result.open_at_end} signatures have an intent and no outcome yet (under "
              "way when the log was copied, or cut short by a crash); accepted "
              "(--allow-unsigned)", file=sys.stderr)
    # The latest checkpoint, verified consistent with the log above, and its witnesses.
    seen = None if latest is None else Witnessed(
        parse_checkpoint(latest).size, True, cosigners(latest, origin, set(), witnesses))
    if witnesses:
        missing = seen.missing(witnesses) if seen is not None else [
            f"{k.name}+{k.key_id.hex()}" for k in witnesses]
        if missing:
            print(f"FAILED (no line): the checkpoint {cp_path} carries no valid cosignature by "
                  f"{', '.join(missing)}; the log itself verified", file=sys.stderr)
            return 1
    if args.state and result.new_state is not None:
        save_state(args.state, result.new_state)
    closing = (f"; the last {result.closing} lines are the last checkpoint's own signing"
               f"{' and the HSM logout' if result.closing % 2 else ''}, which no checkpoint "
               "can cover" if result.closing else "")
    print(f"OK: {result.lines} lines, {result.checkpoints} checkpoints verified"
          f"{' (extends the state saved last time)' if state else ''}{closing}")
    if latest is not None:
        print(_checkpoint_line(latest, f"the checkpoint file {cp_path}", key))
    if args.state:
        print(f"state: saved in {args.state}, {result.lines} lines")
    if witnesses and seen is not None:
        # How much of the log it vouches for, and since when (an auditor trial read
        # "cosigned" as the whole log while the witnesses had been down).
        when = seen.newest
        print(f"cosigned: the checkpoint {cp_path}, {seen.size} of the {result.lines} lines, "
              f"by {len(witnesses)} witness{'es' if len(witnesses) > 1 else ''} "
              f"({', '.join(k.name for k in witnesses)})"
              + (f", latest cosignature {when:%Y-%m-%d %H:%M:%S} UTC" if when else ""))
    if result.note:
        print(f"note: {result.note}")
    if latest is None:
        print(f"note: there is no checkpoint file {cp_path}, so the log was checked against "
              "the checkpoints it records only: give the latest one you hold (the daemon's, "
              "a witness's) with --checkpoint, or a saved --state, to catch a log cut back to "
              "an earlier checkpoint")
    return 0


def _describe(obj: dict[str, Any]) -> str:
    skip = {"seq", "ts", "event", "prev"}
    rest = " ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in sorted(obj.items())
                    if k not in skip and k != "checkpoint")
    return f"{obj.get('seq'):>7} {obj.get('ts')} {obj.get('event'):<14} {rest}"


def _nothing_from(start: int, lines: int | None) -> None:
    """Said when --from is past the end (an operator trial got nothing, exit 0)."""
    length = f" (it has {lines} lines, seq 0 to {lines - 1})" if lines else ""
    print(f"hsmca: no line from seq {start}: the log ends before it{length}", file=sys.stderr)


async def _show_remote(args: argparse.Namespace) -> int:
    import aiohttp

    from ca.client import TIMEOUT, get_bytes
    ctx = _client_context(args)
    url = args.url.rstrip("/")
    seq = max(args.start, 0)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        listed = json.loads(await get_bytes(session, f"{url}/v1/audit/logs", ctx))["logs"]
        names = [entry["name"] for entry in listed if entry["name"] is not None]
        if args.node is not None and args.node not in names:
            raise CLIError(f"--node {args.node}: the CA at {url} has no such log (its logs: "
                           f"{', '.join(names) or 'one, unnamed: leave --node out'})")
        name = args.node or next((e["name"] for e in listed if e.get("self")), None)
        if name is not None:  # several logs: say whose this is
            print(f"hsmca: log of node {name}", file=sys.stderr, flush=True)
        query = f"&log={name}" if name is not None else ""
        while True:
            page = await get_bytes(
                session, f"{url}/v1/audit/entries?start={seq}&limit=1000{query}", ctx)
            lines = page.split(b"\n")[:-1]  # the daemon serves only complete (durable) lines
            for line in lines:
                print(_describe(json.loads(line)), flush=True)
            seq += len(lines)
            if lines:
                continue
            if not args.follow:
                if seq == args.start > 0:
                    _nothing_from(args.start, None)
                return 0
            # Polling: the API has no push; one request a second is cheap for the daemon.
            await asyncio.sleep(1)


def show(args: argparse.Namespace) -> int:
    if args.node is not None and args.log is not None:
        raise CLIError("--node is for --url or --config (a file holds one node's log: --log "
                       "names it)")
    if args.url is not None:
        return int(asyncio.run(_show_remote(args)))
    path = args.log
    if path is None:
        from ca.config import load
        config = load(args.config)
        if config.cluster:
            nodes = sorted(p.parent.parent.name
                           for p in (config.state_dir / "nodes").glob("*/audit/log.jsonl"))
            here = f" ({', '.join(nodes)} here)" if nodes else ""
        if args.node is not None:
            if not config.cluster:
                raise CLIError(f"{config.path} is a single node's CA: it has no --node")
            config = config.for_node(args.node)
            if not config.audit_log.exists() and args.node not in nodes:
                # As --url says it (a cluster trial got the bare file error).
                raise CLIError(f"no node {args.node!r} keeps a log in "
                               f"{config.state_dir / 'nodes'}{here or ' (no node does yet)'}")
        elif config.cluster:  # the CA's own log, which no node writes: say whose it is
            print(f"hsmca: this is the log of init's ceremonies; a node's own: --node NAME"
                  f"{here}", file=sys.stderr)
        path = config.audit_log
    try:
        fh = open(path, "rb")  # noqa: SIM115 - kept open for --follow
    except OSError as exc:
        raise CLIError(f"cannot read the log {path}: {exc.strerror}") from None
    with fh:
        pending = b""
        number = 0
        while True:
            chunk = fh.readline()
            if chunk:
                pending += chunk
                if not pending.endswith(b"\n"):
                    continue  # a line still being written: wait for its end
                number += 1
                try:
                    obj = json.loads(pending)
                    if not isinstance(obj, dict):
                        raise ValueError
                except (ValueError, RecursionError):
                    raise CLIError(f"line {number} of {path} is not a line of an audit log (a "
                                   "JSON object); `hsmca audit verify` says what is wrong "
                                   "with the log") from None
                pending = b""
                if obj.get("seq", 0) >= args.start:
                    print(_describe(obj), flush=True)
                continue
            if not args.follow:
                if 0 < number <= args.start:
                    _nothing_from(args.start, number)
                return 0
            time.sleep(0.2)  # polling a file: there is nothing to wait on portably

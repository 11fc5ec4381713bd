"""`hsmca audit verify` and `hsmca audit show`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from ca.audit.verify import load_state, save_state, verify_log
from ca.errors import CLIError


def _audit_key(path: Path) -> ed25519.Ed25519PublicKey:
    try:
        key = load_pem_public_key(path.read_bytes())
    except ValueError:
        raise CLIError(f"{path} is not a PEM public key") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise CLIError(f"{path} is not an Ed25519 key (the audit key is Ed25519)")
    return key


def _origin(args: argparse.Namespace, latest: str | None, data: bytes,
            state: dict[str, Any] | None) -> str | None:
    if args.origin:
        return str(args.origin)
    for note in (latest, (state or {}).get("checkpoint")):
        if isinstance(note, str) and note:
            return note.split("\n", 1)[0]
    # The first checkpoint in the log names it; a log without any has no signature to check.
    marker = b'"checkpoint":"'
    at = data.find(marker)
    if at >= 0:
        return data[at + len(marker):data.find(b"\\n", at)].decode("utf-8", "replace")
    return None


def verify(args: argparse.Namespace) -> int:
    key = _audit_key(args.key)
    try:
        data = args.log.read_bytes()
    except OSError as exc:
        raise CLIError(f"cannot read the log {args.log}: {exc.strerror}") from None
    cp_path = args.checkpoint or args.log.parent / "checkpoint"
    latest = cp_path.read_text("utf-8") if cp_path.exists() else None
    state = load_state(args.state) if args.state and args.state.exists() else None
    origin = _origin(args, latest, data, state)
    if origin is None:
        raise CLIError("the log holds no checkpoint and no --origin was given; nothing can be "
                       "checked against the audit key")
    result = verify_log(data, key, origin, origin=origin, latest_checkpoint=latest, state=state)
    if not result.ok:
        print(f"FAILED at seq {result.bad_seq}: {result.reason}", file=sys.stderr)
        return 1
    if args.state and result.new_state is not None:
        save_state(args.state, result.new_state)
    print(f"OK: {result.lines} lines, {result.checkpoints} checkpoints verified"
          f"{' (extends the state saved last time)' if state else ''}")
    return 0


def _describe(obj: dict[str, Any]) -> str:
    skip = {"seq", "ts", "event", "prev"}
    rest = " ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in sorted(obj.items())
                    if k not in skip and k != "checkpoint")
    return f"{obj.get('seq'):>7} {obj.get('ts')} {obj.get('event'):<14} {rest}"


def show(args: argparse.Namespace) -> int:
    path = args.log
    if path is None:
        from ca.config import load
        path = load(args.config).audit_log
    try:
        fh = open(path, "rb")  # noqa: SIM115 - kept open for --follow
    except OSError as exc:
        raise CLIError(f"cannot read the log {path}: {exc.strerror}") from None
    with fh:
        pending = b""
        while True:
            chunk = fh.readline()
            if chunk:
                pending += chunk
                if not pending.endswith(b"\n"):
                    continue  # a line still being written: wait for its end
                obj = json.loads(pending)
                pending = b""
                if obj.get("seq", 0) >= args.start:
                    print(_describe(obj), flush=True)
                continue
            if not args.follow:
                return 0
            time.sleep(0.2)  # polling a file: there is nothing to wait on portably

"""`hsmca witness serve`: a C2SP tlog-witness (c2sp.org/tlog-witness) an auditor runs.

It follows one or more logs, each named by its origin and pinned by its verifier
key, and keeps, durably, the latest checkpoint it cosigned for each. A log submits
each new checkpoint with ``POST /add-checkpoint``: the size of the checkpoint it
believes the witness holds (``old N``), a consistency proof from it, a blank line,
then the checkpoint. The witness cosigns (c2sp.org/tlog-cosignature, Ed25519
cosignature/v1) only a checkpoint signed by the pinned key that extends the one it
holds, and answers as C2SP says:

* 404: an origin it does not follow; 403: no valid signature by the log's key;
* 400: a malformed request, or an old size above the checkpoint's;
* 409 with ``Content-Type: text/x.tlog.size`` and the size it holds: the log's
  idea of that size is wrong (it asks again from there);
* 409 without: the same size as the one held with another root (a rewrite);
* 422: the consistency proof does not verify (the log does not extend what the
  witness saw);
* 200: the cosignature line, once the new checkpoint is on disk.

The first checkpoint of a log is trusted on first use. Checking a request against
the held checkpoint and recording the new one happen with no await between them,
on the one event loop, so two requests cannot both extend the same checkpoint
(C2SP's rollback race); the state file is replaced atomically and flushed before
the answer. A refusal of a checkpoint the log signed is logged (event ``refused``)
with the checkpoint: it is evidence that the log misbehaved. One the log did not sign
is no evidence (anyone can send it): one short line, without the body.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ca.audit.cosignature import VerifierKey, cosign, cosigner_key
from ca.audit.merkle import HASH_SIZE, verify_consistency
from ca.audit.note import NoteError, parse_checkpoint, verify_checkpoint
from ca.decimal_text import is_decimal
from ca.fileutil import write_atomic
from ca.http_body import read_body

log = structlog.get_logger("hsmca.witness")
MAX_BODY = 64 << 10  # a checkpoint and 63 proof lines are ~3 KB
MAX_PROOF = 63
STATE_VERSION = 1


class WitnessStateError(Exception):
    """The witness's own state file cannot be used; the message says why."""


@dataclass(frozen=True)
class Held:
    size: int
    root: bytes
    checkpoint: str  # the note as cosigned, the log's signature included


class WitnessState:
    """The latest cosigned checkpoint of each log, in one JSON file, with a lock file
    beside it so that two witness processes cannot share it."""

    def __init__(self, path: Path, new: bool = False) -> None:
        """`new`: a witness's first run, which makes the file; otherwise it must exist."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_name(self.path.name + ".lock")
        self._lock = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock)
            raise WitnessStateError(f"the witness state {self.path} is in use by another "
                                    "witness process") from None
        self.logs: dict[str, Held] = {}
        try:
            self._first_run(new)
        except WitnessStateError:
            os.close(self._lock)
            raise
        if self.path.exists():
            try:
                raw = json.loads(self.path.read_text("utf-8"))
                if raw.get("version") != STATE_VERSION:
                    raise ValueError(f"version {raw.get('version')!r}")
                for origin, held in raw["logs"].items():
                    cp = parse_checkpoint(held["checkpoint"])
                    if (cp.origin, cp.size) != (origin, held["size"]):
                        raise ValueError(f"the entry of {origin!r} disagrees with its checkpoint")
                    self.logs[origin] = Held(cp.size, cp.root, held["checkpoint"])
            except (OSError, ValueError, KeyError, TypeError, AttributeError, NoteError) as exc:
                os.close(self._lock)
                # Never start over from nothing: that would let a rewritten log through.
                raise WitnessStateError(f"the witness state {self.path} cannot be read ({exc}); "
                                        "it is the evidence of what was witnessed: look at "
                                        "it before anything else") from None

    def _first_run(self, new: bool) -> None:
        """A missing state was taken for a first run: a witness whose file was lost
        started over without a word and cosigned a log rolled back meanwhile (an
        auditor trial). Starting with nothing held is asked for, once."""
        if new and self.path.exists():
            # So that it cannot stay in a unit file, where a lost state would start over.
            raise WitnessStateError(f"the witness state {self.path} exists: --new-state is "
                                    "for a witness's first run only; leave it out")
        if new:
            write_atomic(self.path, json.dumps({"version": STATE_VERSION, "logs": {}},
                                               indent=1) + "\n", 0o600)
        elif not self.path.exists():
            raise WitnessStateError(
                f"the witness state {self.path} does not exist. On this witness's first "
                "run, pass --new-state once: it starts holding no checkpoint and trusts "
                "the first one each log offers. If it ran before, its state is lost: "
                "restore it from a backup (starting over would let a log rewritten "
                "meanwhile through)")

    def record(self, origin: str, held: Held) -> None:
        logs = {**self.logs, origin: held}
        doc = {"version": STATE_VERSION,
               "logs": {o: {"size": h.size, "checkpoint": h.checkpoint}
                        for o, h in sorted(logs.items())}}
        write_atomic(self.path, json.dumps(doc, indent=1) + "\n", 0o600)  # flushed
        self.logs = logs

    def close(self) -> None:
        os.close(self._lock)


@dataclass(frozen=True)
class Answer:
    status: int
    body: str
    content_type: str = "text/plain"


class Witness:
    def __init__(self, name: str, key: Ed25519PrivateKey, logs: Mapping[str, VerifierKey],
                 state: WitnessState) -> None:
        self.name, self.key, self.logs, self.state = name, key, dict(logs), state
        self.verifier_key = cosigner_key(name, key.public_key())

    def add_checkpoint(self, body: bytes) -> Answer:
        """The whole of one add-checkpoint request (synchronous: see the module)."""
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return Answer(400, "the request is not UTF-8 text\n")
        head, sep, note = text.partition("\n\n")
        lines = head.split("\n")
        if not sep or not lines[0].startswith("old "):
            return Answer(400, "expected 'old <size>', proof lines, a blank line, a checkpoint\n")
        size_text = lines[0][4:]
        if not is_decimal(size_text) or (len(size_text) > 1 and size_text[0] == "0") or len(
                size_text) > 20:
            return Answer(400, "the old size is a decimal without leading zeros\n")
        old = int(size_text)
        if len(lines) - 1 > MAX_PROOF:
            return Answer(400, f"more than {MAX_PROOF} consistency proof lines\n")
        try:
            proof = [base64.b64decode(h, validate=True) for h in lines[1:]]
        except (binascii.Error, ValueError):
            return Answer(400, "a consistency proof line is not base64\n")
        if any(len(h) != HASH_SIZE for h in proof):
            return Answer(400, "a consistency proof line is not a SHA-256 hash\n")
        origin = note.split("\n", 1)[0]
        key = self.logs.get(origin)
        if key is None:
            return Answer(404, f"this witness does not follow the log {origin!r}\n")
        try:
            parse_checkpoint(note)
        except NoteError as exc:
            return Answer(400, f"not a checkpoint: {exc}\n")
        try:
            cp = verify_checkpoint(note, key.name, key.public_key, origin)
        except NoteError as exc:
            # Not the log's word, so no evidence against it: anyone may send this. Said
            # in one line without the body, which a stranger could make as big as a
            # request may be, to fill this witness's log.
            log.warning("not signed by the log's key", origin=origin, reason=str(exc)[:200])
            return Answer(403, f"{exc}\n")
        if old > cp.size:
            return Answer(400, f"old size {old} is above the checkpoint's {cp.size}\n")
        held = self.state.logs.get(origin)
        known = held.size if held else 0
        if old != known:
            if cp.size < known:
                # The log signed a tree smaller than one it signed before: cut, or
                # restored from a backup. The answer stays the protocol's (its client
                # learns the size held), and the checkpoint is kept here as evidence.
                self._evidence(origin, cp.size, note, 409, (
                    f"{cp.size} lines, fewer than the {known} of the checkpoint held: the "
                    "log was cut, or restored from a backup"))
            return Answer(409, f"{known}\n", "text/x.tlog.size")
        if held is not None and old == cp.size and cp.root != held.root:
            return self._refuse(409, origin, cp.size, note, (
                f"the same {cp.size} lines as the checkpoint held, with another root"))
        if old == 0 and proof:
            return Answer(400, "a proof from size 0 must be empty\n")
        if held is not None and 0 < old < cp.size and not verify_consistency(
                old, cp.size, held.root, cp.root, proof):
            return self._refuse(422, origin, cp.size, note, (
                f"the consistency proof from the {old} lines held to {cp.size} does not "
                "verify: the log does not extend what this witness saw"))
        if held is None or cp.size > held.size:
            try:
                self.state.record(origin, Held(cp.size, cp.root, note))
            except OSError as exc:
                log.error("cannot record the checkpoint", origin=origin, error=str(exc))
                return Answer(500, "the witness cannot record the checkpoint\n")
        log.info("cosigned", origin=origin, size=cp.size)
        return Answer(200, cosign(cp.body, self.name, self.key, int(time.time())))

    def _refuse(self, status: int, origin: str, size: int | None, note: str,
                reason: str) -> Answer:
        self._evidence(origin, size, note, status, reason)
        return Answer(status, reason + "\n")

    def _evidence(self, origin: str, size: int | None, note: str, status: int,
                  reason: str) -> None:
        """A checkpoint the log signed that this witness will not cosign, logged whole."""
        held = self.state.logs.get(origin)
        log.error("refused", origin=origin, size=size,
                  held=held.size if held else 0, status=status, reason=reason, checkpoint=note)


async def _server_header(_request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = "hsmca-witness"  # not aiohttp's and Python's versions


def application(witness: Witness) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    app.on_response_prepare.append(_server_header)

    async def add_checkpoint(request: web.Request) -> web.Response:
        body = await read_body(request)
        answer = witness.add_checkpoint(body)  # no await inside: atomic on this loop
        # text/x.tlog.size exactly, as C2SP says it MUST be: clients compare the header
        # as a string, and one with "; charset=utf-8" was no size to them (a trial).
        ctype = answer.content_type + ("" if answer.content_type == "text/x.tlog.size"
                                       else "; charset=utf-8")
        return web.Response(status=answer.status, body=answer.body.encode(),
                            headers={"Content-Type": ctype})

    async def index(_request: web.Request) -> web.Response:
        held: dict[str, Any] = {o: h.size for o, h in witness.state.logs.items()}
        # The checkpoints held too, as the log signed them: an auditor checks the log
        # against them directly (`hsmca audit prove --extends`), not through what the
        # CA's daemon says its witnesses answered (an auditor trial).
        notes = {o: h.checkpoint for o, h in witness.state.logs.items()}
        return web.json_response({"name": witness.name,
                                  "verifier_key": str(witness.verifier_key), "logs": held,
                                  "checkpoints": notes})

    app.router.add_post("/add-checkpoint", add_checkpoint)
    app.router.add_get("/", index)
    return app

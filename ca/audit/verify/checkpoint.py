"""Checkpoints as the verifier meets them (docs/audit-log.md, "Checkpoints").

An ``hsm.sign`` outcome with ``result`` "ok" and a ``checkpoint`` field is a
checkpoint: its signed note must verify with the pinned key (and origin), cover
only lines before its own, and have the Merkle root of the lines it covers.
Outside the log, the latest checkpoint file and the auditor's saved state vouch
for a prefix of the log too (`SignedPrefix`); whether the log still starts with
that prefix is `ca.audit.merkle.growth`, the one rule every party uses.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ca.audit.cosignature import ALG_NOTE, parse_verifier_key
from ca.audit.merkle import Growth, MerkleTree, TreeHead, growth
from ca.audit.note import NEXT_KEY, Checkpoint, NoteError, key_id, parse_checkpoint, verify_note
from ca.audit.verify.failure import Failure, LineError, Stage, before
from ca.subject import spki_sha256


class PinnedKey(NamedTuple):
    """What a checkpoint must be signed with: the auditor's pinned audit key, its name
    in the signature lines, and the origin every checkpoint must carry (if given).

    The audit key rotates (docs/keys.md): a checkpoint signed by a trusted key that
    names another key in an extension line, and is signed by that key too, makes it
    trusted for the checkpoints after it. `successors` are those keys with the seq of
    the line that introduced each; a checkpoint is checked with the keys trusted at
    its seq (all of them for one from outside the log)."""

    public_key: Ed25519PublicKey
    name: str
    origin: str | None = None
    successors: tuple[tuple[int, Ed25519PublicKey], ...] = ()

    def trusted(self, seq: int | None = None) -> list[Ed25519PublicKey]:
        return [self.public_key] + [k for at, k in self.successors if seq is None or at < seq]

    def verify(self, text: str, seq: int | None = None) -> Checkpoint:
        """The checkpoint in `text` (logged at `seq`), if its note verifies with a key
        trusted there, and with the key it announces if it announces one; else
        NoteError."""
        cp = parse_checkpoint(text)
        signed_by = {(sig.name, sig.key_id) for sig in cp.signatures}
        by = [k for k in self.trusted(seq) if (self.name, key_id(self.name, k)) in signed_by]
        if not by:
            others = sorted({sig.key_id.hex() for sig in cp.signatures if sig.name == self.name})
            hint = (f"; it is signed by key id {', '.join(others)}: if the audit key was "
                    "rotated, pin the key the log began with (a copy of the first "
                    "audit_key.pem), which follows every hand-over, not the current one "
                    "(docs/keys.md); if not, this log is not the one of the key you "
                    "pinned (another CA's: CAs left at the default origin, "
                    "localhost/hsmca-audit, share the name)") if others else ""
            if not others and cp.origin != self.name:
                # No signature of that name at all: the name (the origin asked for) is
                # what is wrong, not the key, and said first (a web view trial's --origin
                # was read as a key problem)
                raise NoteError(f"this checkpoint's origin is {cp.origin!r}, not "
                                f"{self.name!r} (--origin, or the state's): give --origin "
                                f"{cp.origin} if that is the log you mean to verify (of a "
                                "cluster's node, the part before its name: --origin is the "
                                "CA's [audit] origin)")
            raise NoteError(f"the note has no signature by {self.name!r} with a trusted key "
                            f"(key id {key_id(self.name, self.public_key).hex()}"
                            + (f" or one of {len(self.successors)} it handed over to"
                               if self.successors else "") + ")" + hint)
        for k in by:  # every line of a trusted key must verify
            verify_note(text, self.name, k)
        announced = cp.announced_key()
        if announced is not None:
            try:
                named = parse_verifier_key(announced, ALG_NOTE)
            except ValueError as exc:
                raise NoteError(f"the key this checkpoint hands over to is malformed: "
                                f"{exc}") from None
            if named.name != self.name:
                raise NoteError(f"the checkpoint hands over to a key named {named.name!r}, "
                                f"not {self.name!r}")
            verify_note(text, self.name, named.public_key)  # the new key signs its own arrival
        if self.origin is not None and cp.origin != self.origin:
            raise NoteError(f"the checkpoint origin is {cp.origin!r}, expected {self.origin!r}")
        return cp

    def follow(self, text: str, seq: int) -> PinnedKey:
        """This key, trusting also the key the checkpoint at `seq` hands over to (which
        must verify: NoteError otherwise)."""
        cp = self.verify(text, seq)
        announced = cp.announced_key()
        if announced is None:
            return self
        new = parse_verifier_key(announced, ALG_NOTE).public_key
        if any(new == k for k in self.trusted()):
            return self
        return self._replace(successors=(*self.successors, (seq, new)))

    def discover(self, data: bytes, first: int = 0) -> PinnedKey:
        """This key, following every hand-over logged in `data` (complete log lines from
        seq `first`), in order. A hand-over that does not verify is left to the scan,
        which reports it at its seq."""
        key = self
        for seq, line in lines_holding(data, NEXT_KEY.encode(), first):
            try:
                obj = json.loads(line)
                text = obj.get("checkpoint") if obj.get("event") == "hsm.sign" and \
                    obj.get("result") == "ok" else None
                if isinstance(text, str):
                    key = key.follow(text, seq)
            except (ValueError, NoteError, AttributeError):
                pass
        return key


def lines_holding(data: bytes, marker: bytes, first: int) -> Iterator[tuple[int, bytes]]:
    """(seq, line) of each line of `data` (complete log lines from seq `first`) that
    holds `marker`, in order."""
    at = data.find(marker)
    while at >= 0:
        start = data.rfind(b"\n", 0, at) + 1
        end = data.find(b"\n", at)
        end = len(data) if end < 0 else end
        yield first + data.count(b"\n", 0, start), data[start:end]
        at = data.find(marker, end)


class HandOver(NamedTuple):
    """A checkpoint that hands the audit key over, and whether the log shows the new
    key made in the HSM (an `hsm.keygen` outcome for it, before)."""

    seq: int | None  # the line that logs it; None: the daemon's latest checkpoint
    key_id: str  # hex, as signature lines name it
    made_at: int | None  # the seq of its hsm.keygen outcome; None: not in these lines


def announced(text: str, name: str, made: Mapping[str, int]) -> HandOver | None:
    """The hand-over a checkpoint's text announces, if any, as one not yet logged
    (seq None): the daemon's latest checkpoint, whose own line no checkpoint covers
    yet. A log that no node writes any more (a cluster's init log after a root
    rotation) would otherwise never show it to a remote verifier (a cluster trial)."""
    try:
        text_key = parse_checkpoint(text).announced_key()
        if text_key is None:
            return None
        key = parse_verifier_key(text_key, ALG_NOTE).public_key
    except (NoteError, ValueError):
        return None
    return HandOver(None, key_id(name, key).hex(), made.get(spki_sha256(key)))


_KEYGEN = b'"event":"hsm.keygen"'


def _ok_lines(data: bytes, mark: bytes, first: int) -> Iterator[tuple[int, dict[str, Any]]]:
    for seq, line in lines_holding(data, mark, first):
        try:
            obj = json.loads(line)
        except ValueError:
            continue  # the scan says what is wrong with it
        if isinstance(obj, dict) and obj.get("result") == "ok":
            yield seq, obj


def keygens(data: bytes, first: int) -> dict[str, int]:
    """The keys `data` (complete log lines from seq `first`) shows made in the HSM: the
    SHA-256 of each public key, with the seq of its hsm.keygen outcome."""
    made: dict[str, int] = {}
    for seq, obj in _ok_lines(data, _KEYGEN, first):
        if isinstance(obj.get("public_key_sha256"), str):
            made.setdefault(obj["public_key_sha256"], seq)
    return made


def hand_overs(data: bytes, first: int, name: str,
               made: Mapping[str, int] | None = None) -> list[HandOver]:
    """The hand-overs of the audit key in `data` (complete log lines from seq `first`),
    each with the keygen line that made its key, among `made` (default: the keygens
    of these lines; a remote run adds those an earlier run saw). One HSM signature can
    hand the trust over to a key made anywhere (an auditor trial handed it to a
    software key and every verifier followed in silence), so each is said, with where
    the key came from. On a cluster, the node where `hsmca key rotate audit` ran has
    the keygen; the others hand over at their next checkpoint without it."""
    made = keygens(data, first) if made is None else made
    found: list[HandOver] = []
    for seq, obj in _ok_lines(data, NEXT_KEY.encode(), first):
        text = obj.get("checkpoint") if obj.get("event") == "hsm.sign" else None
        h = announced(text, name, made) if isinstance(text, str) else None
        if h is not None and not any(f.key_id == h.key_id for f in found):  # said once
            at = h.made_at if h.made_at is not None and h.made_at < seq else None
            found.append(h._replace(seq=seq, made_at=at))
    return found


def say_hand_overs(found: list[HandOver]) -> str | None:
    """What an auditor is told about the hand-overs among the lines verified."""
    if not found:
        return None
    parts = []
    for h in found:
        at = (f"at seq {h.seq}" if h.seq is not None else
              "by the daemon's latest checkpoint (its line is covered by the next one)")
        where = (f"made in the HSM at seq {h.made_at} (its hsm.keygen line)"
                 if h.made_at is not None else
                 "no hsm.keygen line among these lines shows it made in the HSM: on a CA of "
                 "several nodes the node where `hsmca key rotate audit` ran shows it; "
                 "otherwise ask how it was made, since a key made outside the HSM signs "
                 "for the log from here on")
        parts.append(f"the audit key was handed over {at} to key id {h.key_id}, {where}")
    return "; ".join(parts)


class LoggedCheckpoint(NamedTuple):
    """A checkpoint line whose note verified; its root is checked once the tree is built."""

    seq: int  # the outcome line that carries it
    size: int
    root: bytes
    text: str


class SignedPrefix(NamedTuple):
    """A signed claim about the log's first `size` lines, from outside the log."""

    size: int
    root: bytes
    text: str  # the checkpoint note that signs it


def check_logged(text: Any, seq: int, key: PinnedKey) -> LoggedCheckpoint:
    """The checkpoint in the outcome line `seq`, if its note holds; else LineError."""
    if type(text) is not str:
        raise LineError(Stage.CHECKPOINT, "the checkpoint field must be a string (a signed note)")
    try:
        cp = key.verify(text, seq)
    except NoteError as exc:
        raise LineError(Stage.CHECKPOINT, f"bad checkpoint: {exc}") from None
    if cp.size > seq:
        raise LineError(Stage.CHECKPOINT, f"the checkpoint covers {cp.size} lines but is "
                                          f"logged at seq {seq}: it can only cover earlier "
                                          "lines")
    return LoggedCheckpoint(seq, cp.size, cp.root, text)


def root_mismatch(seq: int, size: int, good: int = 0, proved: bool = False) -> Failure:
    """The failure of the checkpoint at `seq` whose root is not that of its `size` lines;
    `good`: how many lines before it were vouched for (an earlier checkpoint whose root
    did verify, or a previous run), so the altered line is at or after it (the failure
    names the checkpoint: the line itself cannot be told without the original).
    `proved`: its lines were verified by an earlier run, and only the daemon's
    consistency proof relates the two: either may be what is wrong."""
    if proved:
        return Failure(seq, Stage.CHECKPOINT_ROOT, (
            f"the checkpoint's root is not that of the first {size} lines as a previous "
            "run verified them, by the consistency proof the daemon served: the log was "
            "rewritten since, or the daemon served a bad proof"))
    first = good if 0 < good < size else 0
    earlier = (f" (the {good} lines before it were vouched for by an earlier checkpoint "
               "or run)" if first else "")
    # The hash chain held, so the lines were chained again after the change: which of
    # them changed, only a copy of the log or an auditor's saved state can tell (an
    # auditor's trial read "one of them" as a sentence cut short).
    # With lines vouched for already (by a --state too), a state cannot narrow it more
    # (an auditor trial, --state given, was told a --state would tell).
    tells = ("a copy of the log from before the change" if first else
             "a copy of the log or an auditor's --state saved before")
    return Failure(seq, Stage.CHECKPOINT_ROOT, (
        f"the checkpoint's root is not the Merkle root of the first {size} lines: a line "
        f"from seq {first} to {size - 1} was altered{earlier} and the lines after it "
        f"chained again to hide it; which one, {tells} tells"))


def usable(checkpoints: Iterable[LoggedCheckpoint], failure: Failure | None
           ) -> list[LoggedCheckpoint]:
    """The checkpoints whose root check comes before the first failure."""
    return [cp for cp in checkpoints if before(failure, cp.seq, Stage.CHECKPOINT_ROOT)]


def check_roots(tree: MerkleTree, checkpoints: list[LoggedCheckpoint]
                ) -> tuple[int, Failure | None]:
    """(how many verified, the first that does not) for checkpoints in log order."""
    good = 0
    for verified, cp in enumerate(checkpoints):
        if tree.root(cp.size) != cp.root:
            return verified, root_mismatch(cp.seq, cp.size, good)
        good = max(good, cp.size)
    return len(checkpoints), None


def still_extends(prefix: TreeHead, tree: MerkleTree, size: int) -> bool:
    """Whether the first `size` leaves of `tree` (at least `prefix.size`) start with `prefix`."""
    now = TreeHead(size, tree.root(size))
    return growth(prefix, now, tree.consistency_proof(prefix.size, size)) in (
        Growth.SAME, Growth.EXTENDS)


def check_latest(text: str, key: PinnedKey) -> tuple[SignedPrefix | None, str | None]:
    """The latest checkpoint file: (its prefix, None), or (None, why it does not verify)."""
    try:
        cp = key.verify(text)
    except NoteError as exc:
        return None, f"the latest checkpoint does not verify: {exc}"
    return SignedPrefix(cp.size, cp.root, text), None


MAX_SIGNERS = 2  # audit keys signing one checkpoint: two while the key rotates
CLOSING_MAX = 2 * MAX_SIGNERS + 1  # their intents and outcomes, then the logout


# The closing lines exactly as the daemon writes them: nothing signs them, so nothing
# beyond what the checkpoint's own signing and the logout say may be there.
_INTENT = frozenset({"actor", "event", "key", "mechanism", "op_id", "phase", "prev", "purpose",
                     "request_id", "root", "seq", "size", "ts"})
_OUTCOME = frozenset({"digest", "event", "op_id", "phase", "prev", "result", "seq",
                      "signature_digest", "ts"})
_LOGOUT = frozenset({"event", "pid", "prev", "result", "seq", "token", "ts"})


def closing_lines(tail: list[bytes], signed: int, checkpoints: list[LoggedCheckpoint]) -> bool:
    """Whether `tail`, the lines after the first `signed` (which the largest verified
    checkpoint covers), are the lines with which a daemon ends its log: the intents
    and outcomes that signed that very checkpoint (one pair per audit key signing it:
    two while the key rotates; the last outcome carries the note), then at most an
    ``hsm.logout``.

    No checkpoint can cover its own signing, and the daemon logs out of the HSM after
    its final checkpoint: a log that ends normally always ends with these lines. Each
    intent must name that checkpoint's size and root, each outcome the digest of its
    body, and no line may carry anything else: otherwise they are lines no checkpoint
    covers, which `--allow-unsigned` alone accepts.
    """
    if len(tail) < 2 or len(tail) > CLOSING_MAX:
        return False
    objs = [json.loads(line) for line in tail]  # they passed the scan: JSON objects
    rest = objs[2 * (len(objs) // 2):]
    pairs = [(objs[i], objs[i + 1]) for i in range(0, len(objs) - len(rest), 2)]
    last = signed + 2 * len(pairs) - 1  # the seq of the outcome that carries the note
    cp = next((c for c in checkpoints if c.seq == last and c.size == signed), None)
    if cp is None:
        return False
    body = cp.text[:cp.text.index("\n\n") + 1]  # what each audit key signed
    digest = hashlib.sha256(body.encode()).hexdigest()
    root = base64.b64encode(cp.root).decode()
    for i, (intent, outcome) in enumerate(pairs):
        final = i == len(pairs) - 1
        if (set(intent) != (_INTENT if final else _INTENT | {"co_signer"})
                or intent["event"] != "hsm.sign" or intent["phase"] != "intent"
                or intent["purpose"] != "checkpoint" or intent["size"] != signed
                or intent["actor"] != "local" or intent["mechanism"] != "CKM_EDDSA"
                or intent["request_id"] is not None
                or intent["root"] != root or intent.get("co_signer", True) is not True):
            return False
        if (set(outcome) != (_OUTCOME | {"checkpoint"} if final else _OUTCOME)
                or outcome["event"] != "hsm.sign" or outcome["phase"] != "outcome"
                or outcome["op_id"] != intent["op_id"] or outcome["result"] != "ok"
                or outcome["digest"] != digest
                or (final and outcome["checkpoint"] != cp.text)):
            return False
    return all(set(obj) == _LOGOUT and obj["event"] == "hsm.logout" for obj in rest)

"""What the witnesses vouch for: the daemon's cosigned checkpoint, judged against the
tree an auditor verified. Shared by `hsmca audit verify --url` and the web view.

The cosigned checkpoint is signed by the log's own audit key. If it is not
consistent with the verified tree, that key signed two histories: the log was
rewritten and re-signed, and the witnesses hold the older one. That is a failure
of the log, not a note about witnesses (an auditor trial found the web view green
beside it, and `audit verify --url` never looked).
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ca.audit.cosignature import ALG_NOTE, VerifierKey, parse_verifier_key, valid_cosignatures
from ca.audit.merkle import Growth, TreeHead, growth, needs_proof
from ca.audit.note import SIG_PREFIX, NoteError, key_id, parse_note
from ca.audit.verify import PinnedKey
from ca.errors import ClientError


@dataclass(frozen=True)
class Cosigner:
    """A signature line on the cosigned checkpoint other than the log's own."""

    name: str
    key_id: str  # hex
    at: dt.datetime | None  # the time the witness put in its cosignature
    verified: bool  # it verifies with a witness key the auditor pinned (--witness-key)
    pinned: bool = False  # a pinned key has its name and key id (verified or not)


@dataclass(frozen=True)
class Witnessed:
    """What the witnesses vouch for: the latest checkpoint they cosigned."""

    size: int | None = None  # its tree size; None: no cosigned checkpoint
    consistent: bool | None = None  # with the verified tree (None: not checked)
    cosigners: tuple[Cosigner, ...] = ()
    problem: str | None = None
    text: str = ""

    @property
    def count(self) -> int:
        """Witnesses that count: pinned, verified, on a checkpoint consistent with the
        verified tree."""
        return len({(c.name, c.key_id) for c in self.cosigners if c.verified}) \
            if self.consistent else 0

    @property
    def newest(self) -> dt.datetime | None:
        """The latest time a counted witness put in its cosignature."""
        return max((c.at for c in self.cosigners if c.verified and c.at), default=None)

    def missing(self, keys: list[VerifierKey]) -> list[str]:
        """The pinned witnesses (name+key id) without a counted cosignature."""
        have = {(c.name, c.key_id) for c in self.cosigners if c.verified} \
            if self.consistent else set()
        return [f"{k.name}+{k.key_id.hex()}" for k in keys if (k.name, k.key_id.hex())
                not in have]

    def forked(self, tree: TreeHead) -> str | None:
        """Why the log fails, if the audit key signed this checkpoint and the verified
        tree does not extend it."""
        if self.consistent is not False or self.size is None:
            return None
        return (f"the audit key signed a checkpoint of {self.size} lines that the witnesses "
                f"cosigned (GET /v1/audit/checkpoint.cosigned), and the {tree.size} lines "
                "verified do not extend it: two histories under one key, so the log was "
                "rewritten and signed again; the cosigned checkpoint is the evidence:\n"
                + self.text.rstrip("\n"))


Proofs = Callable[[int, int], Awaitable[list[bytes]]]


def _signed_at(sig: bytes) -> dt.datetime | None:
    """The time a C2SP cosignature carries (its first 8 bytes), if it is one."""
    seconds = int.from_bytes(sig[:8], "big")
    return dt.datetime.fromtimestamp(seconds, dt.UTC) if len(sig) == 72 and \
        seconds < 1 << 40 else None


def cosigners(text: str, name: str, own: set[bytes],
              witness_keys: list[VerifierKey]) -> tuple[Cosigner, ...]:
    """The signature lines of the note `text` other than the log's own (`name` with a
    key id in `own`), each verified or not with the pinned `witness_keys`."""
    valid = set(valid_cosignatures(text, witness_keys))
    found = []
    for sig in parse_note(text).signatures:
        if sig.name == name and sig.key_id in own:
            continue  # the log's own signature
        line = f"{SIG_PREFIX}{sig.name} {base64.b64encode(sig.key_id + sig.sig).decode()}\n"
        pinned = any(k.name == sig.name and k.key_id == sig.key_id for k in witness_keys)
        found.append(Cosigner(sig.name, sig.key_id.hex(), _signed_at(sig.sig), line in valid,
                              pinned))
    return tuple(found)


async def assess(text: str | None, tree: TreeHead, key: PinnedKey,
                 witness_keys: list[VerifierKey], consistency: Proofs,
                 log: str | None = None) -> Witnessed:
    """The cosigned checkpoint `text` (None: no witness cosigned yet) against the
    verified `tree`, verified with the audit keys in force for the verified log:
    after a rotation and the old key's retirement it is signed by the key the log
    handed over to alone, which the pinned (first) key is not. `consistency(old,
    size)` fetches a proof (ClientError when it cannot)."""
    name = key.name
    if text is None:
        return Witnessed()
    served = text.split("\n", 1)[0]
    if log is not None and served != name:
        # Each node keeps its witnesses' cosignatures of its own log.
        return Witnessed(problem=f"the node that answered serves the witnesses' "
                         f"cosignatures of its own log ({served}) only: ask {log}")
    try:
        cp = key.verify(text)
    except NoteError as exc:
        return Witnessed(problem=f"the cosigned checkpoint does not verify with the "
                         f"pinned audit key (or a key the log handed over to): {exc}",
                         text=text)
    head = TreeHead(cp.size, cp.root)
    consistent: bool | None = None
    problem = None
    if cp.size > tree.size:
        problem = (f"it covers {cp.size} lines, more than the {tree.size} verified: "
                   "checked next time")
    else:
        try:
            proof = await consistency(cp.size, tree.size) if needs_proof(head, tree) else []
            consistent = growth(head, tree, proof) in (Growth.SAME, Growth.EXTENDS)
        except ClientError as exc:
            problem = str(exc)
        if consistent is False:
            problem = ("it is not consistent with the verified tree: the witnesses saw "
                       "another log")
    # The log's own signature lines: each audit key's (two during a hand-over).
    own = {key_id(name, k) for k in key.trusted()}
    if (announced := cp.announced_key()) is not None:
        own.add(key_id(name, parse_verifier_key(announced, ALG_NOTE).public_key))
    return Witnessed(cp.size, consistent, cosigners(text, name, own, witness_keys),
                     problem, text)

"""Witness cosignatures (c2sp.org/tlog-cosignature, Ed25519 "cosignature/v1") and the
verifier keys (vkeys, c2sp.org/signed-note) that name logs and witnesses.

A cosignature is a signed-note signature line by a witness over a checkpoint:

    — <witness name> base64(key id || uint64 timestamp || Ed25519 signature)

The key id is ``SHA-256(name || "\\n" || 0x04 || public key)[:4]`` (0x04: a
cosignature, where a log's own note signature uses 0x01), and the signature covers
``cosignature/v1\\ntime <timestamp>\\n`` followed by the checkpoint's text. It says:
as of that time, this is the largest tree the witness has seen for that log, and
every tree it saw before is a prefix of it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ca.audit.note import SIG_PREFIX, NoteError, NoteSignature, parse_note

ALG_NOTE = 0x01  # a log's (or any note signer's) Ed25519 key
ALG_COSIGNATURE = 0x04  # a witness's Ed25519 cosignature/v1 key
_HEADER = "cosignature/v1\n"


@dataclass(frozen=True)
class VerifierKey:
    """A parsed vkey: ``<name>+<hex key id>+<base64(algorithm || public key)>``."""

    name: str
    key_id: bytes
    algorithm: int
    public_key: Ed25519PublicKey

    def __str__(self) -> str:
        raw = self.public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
        material = base64.b64encode(bytes([self.algorithm]) + raw).decode("ascii")
        return f"{self.name}+{self.key_id.hex()}+{material}"


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def make_key_id(name: str, algorithm: int, public_key: Ed25519PublicKey) -> bytes:
    return hashlib.sha256(name.encode("utf-8") + b"\n" + bytes([algorithm])
                          + _raw(public_key)).digest()[:4]


def cosigner_key(name: str, public_key: Ed25519PublicKey) -> VerifierKey:
    """The vkey a witness publishes for its cosignatures."""
    if not name or "+" in name or any(c.isspace() for c in name):
        raise ValueError(f"a witness name must be non-empty, without spaces or '+': {name!r}")
    return VerifierKey(name, make_key_id(name, ALG_COSIGNATURE, public_key), ALG_COSIGNATURE,
                       public_key)


def parse_verifier_key(text: str, algorithm: int) -> VerifierKey:
    """Parse a vkey of the given algorithm (ALG_NOTE for a log, ALG_COSIGNATURE for a
    witness); ValueError saying what is wrong."""
    # The name and the id end at the first two '+'; base64 may hold more of them.
    parts = text.strip().split("+", 2)
    if len(parts) != 3:
        raise ValueError(f"{text!r} is not a verifier key <name>+<hex key id>+<base64 key>")
    name, kid_hex, material = parts
    if not name or any(c.isspace() for c in name):
        raise ValueError(f"the verifier key {text!r} has no name, or spaces in it")
    try:
        kid = bytes.fromhex(kid_hex)
        raw = base64.b64decode(material, validate=True)
    except (ValueError, binascii.Error):
        raise ValueError(f"the verifier key {text!r} is not hex and base64 where it should "
                         "be") from None
    if len(kid) != 4 or len(raw) != 33:
        raise ValueError(f"the verifier key {text!r} is not an Ed25519 key (a 4-byte id, "
                         "one algorithm byte and 32 key bytes)")
    if raw[0] != algorithm:
        what = "a witness's cosignature key (type 0x04)" if algorithm == ALG_COSIGNATURE \
            else "a log's Ed25519 note key (type 0x01)"
        raise ValueError(f"the verifier key {text!r} has type {raw[0]:#04x}; expected {what}")
    key = Ed25519PublicKey.from_public_bytes(raw[1:])
    if make_key_id(name, algorithm, key) != kid:
        raise ValueError(f"the verifier key {text!r} has a key id that does not match its key")
    return VerifierKey(name, kid, algorithm, key)


def _message(body: str, timestamp: int) -> bytes:
    return f"{_HEADER}time {timestamp}\n{body}".encode()


def cosign(body: str, name: str, private_key: Ed25519PrivateKey, timestamp: int) -> str:
    """A cosignature line (with its newline) over a checkpoint's text `body`."""
    key = cosigner_key(name, private_key.public_key())
    if not 0 <= timestamp < 1 << 63:
        raise ValueError("a cosignature's timestamp is a POSIX time below 2**63")
    sig = private_key.sign(_message(body, timestamp))
    blob = base64.b64encode(key.key_id + timestamp.to_bytes(8, "big") + sig).decode("ascii")
    return f"{SIG_PREFIX}{name} {blob}\n"


def valid_cosignatures(note_text: str, keys: list[VerifierKey],
                       not_after: int | None = None) -> list[str]:
    """The signature lines of `note_text` that are cosignatures by one of `keys` and
    verify (lines by other keys are ignored, as C2SP asks), each with its newline: one
    per key, the first, so that one witness never counts twice. With `not_after`, a
    cosignature dated later than that POSIX time does not count (a witness's clock,
    or a witness, that is wrong)."""
    try:
        note = parse_note(note_text)
    except NoteError:
        return []
    found: dict[tuple[str, bytes], str] = {}
    for sig in note.signatures:
        for key in keys:
            if (sig.name == key.name and sig.key_id == key.key_id
                    and (key.name, key.key_id) not in found and _verifies(note.body, sig, key)
                    and (not_after is None or timestamp_of(sig.sig) <= not_after)):
                blob = base64.b64encode(sig.key_id + sig.sig).decode("ascii")
                found[key.name, key.key_id] = f"{SIG_PREFIX}{sig.name} {blob}\n"
                break
    return list(found.values())


def timestamp_of(sig: bytes) -> int:
    """The POSIX time a cosignature (timestamp || signature) says it was made."""
    return int.from_bytes(sig[:8], "big")


def _verifies(body: str, sig: NoteSignature, key: VerifierKey) -> bool:
    if len(sig.sig) != 8 + 64:
        return False
    timestamp = timestamp_of(sig.sig)
    if timestamp >= 1 << 63:  # C2SP tlog-cosignature: MUST NOT exceed 2^63 - 1
        return False
    try:
        key.public_key.verify(sig.sig[8:], _message(body, timestamp))
    except InvalidSignature:
        return False
    return True

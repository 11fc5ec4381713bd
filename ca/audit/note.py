"""C2SP signed notes (c2sp.org/signed-note) and log checkpoints (c2sp.org/tlog-checkpoint).

A signed note is a text ending in a newline, a blank line, then one or more lines
``— <key name> <base64(4-byte key id || signature)>`` (U+2014 EM DASH, space). The
signature covers the text including its final newline. For Ed25519 the key id is
``SHA-256(key name || 0x0A || 0x01 || 32-byte public key)[:4]``.

A checkpoint is a note whose text is three lines: origin, tree size in decimal,
base64 RFC 6962 root; C2SP allows extension lines after those. hsmca writes one only
while its audit key is handed over (`hsmca-audit-key <verifier key>`, docs/keys.md),
and the verifier reads that one.

Parsing is strict, in the manner of Go's golang.org/x/mod/sumdb/note (at most 100
signatures, no control characters, canonical base64), and every failure is a
`NoteError` saying what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

SIG_PREFIX = "\u2014 "  # EM DASH, SPACE
ALG_ED25519 = b"\x01"
MAX_SIGNATURES = 100
MAX_NOTE_BYTES = 1 << 20  # a checkpoint is ~200 bytes; this only bounds hostile input
ED25519_SIG_SIZE = 64
ROOT_SIZE = 32

_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f]")  # every control character except "\n"
_DECIMAL = re.compile(r"0|[1-9][0-9]*")  # [0-9], not \d: \d also matches non-ASCII digits
_MAX_SIZE_DIGITS = 20  # tree sizes are uint64 in the ecosystem


class NoteError(ValueError):
    """A note or checkpoint is malformed or does not verify."""


class NoteSignature(NamedTuple):
    name: str
    key_id: bytes  # 4 bytes
    sig: bytes


@dataclass(frozen=True)
class Note:
    body: str  # the signed text, final newline included
    signatures: tuple[NoteSignature, ...]


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    body: str
    signatures: tuple[NoteSignature, ...]
    extensions: tuple[str, ...] = ()  # lines after the root (C2SP tlog-checkpoint)

    def announced_key(self) -> str | None:
        """The verifier key a rotation of the audit key names (docs/keys.md), if any."""
        for line in self.extensions:
            if line.startswith(NEXT_KEY):
                return line[len(NEXT_KEY):]
        return None


# An extension line of the checkpoint with which the audit key rotates: the verifier key
# of the key that takes over. The checkpoint is signed by the key in force and by that
# key, which is how a verifier pinned to the first learns to trust the second.
NEXT_KEY = "hsmca-audit-key "


# ---- keys ---------------------------------------------------------------------------------


def _raw_public_key(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _check_key_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise NoteError("a key name must be a non-empty string")
    if "+" in name or any(c.isspace() for c in name) or _CONTROL.search(name):
        raise NoteError(f"key name {name!r} must not contain spaces, '+' or control characters")


def key_id(name: str, public_key: Ed25519PublicKey) -> bytes:
    """The 4-byte C2SP key id of an Ed25519 key."""
    _check_key_name(name)
    material = name.encode("utf-8") + b"\n" + ALG_ED25519 + _raw_public_key(public_key)
    return hashlib.sha256(material).digest()[:4]


def verifier_key(name: str, public_key: Ed25519PublicKey) -> str:
    """The verifier key string ``<name>+<hex key id>+<base64(0x01 || public key)>``."""
    kid = key_id(name, public_key)
    material = base64.b64encode(ALG_ED25519 + _raw_public_key(public_key)).decode("ascii")
    return f"{name}+{kid.hex()}+{material}"


# ---- notes --------------------------------------------------------------------------------


def sign_note(body: str, key_name: str, public_key: Ed25519PublicKey,
              sign: Callable[[bytes], bytes]) -> str:
    """Sign `body` with `sign` (an Ed25519 signer, e.g. the HSM) and return the note.

    The signature is verified with `public_key` before the note is returned, so a
    faulty signer cannot publish a checkpoint nobody can verify.
    """
    _check_body(body)
    message = body.encode("utf-8")
    sig = sign(message)
    if not isinstance(sig, bytes) or len(sig) != ED25519_SIG_SIZE:
        got = f"{len(sig)} bytes" if isinstance(sig, bytes) else type(sig).__name__
        raise NoteError(f"the signer returned {got}, not a {ED25519_SIG_SIZE}-byte Ed25519 "
                        "signature")
    try:
        public_key.verify(sig, message)
    except InvalidSignature:
        raise NoteError(f"the signer's signature does not verify with the public key of "
                        f"{key_name!r}: wrong key or faulty signer") from None
    blob = base64.b64encode(key_id(key_name, public_key) + sig).decode("ascii")
    return f"{body}\n{SIG_PREFIX}{key_name} {blob}\n"


def signed_note(body: str, signatures: list[tuple[str, Ed25519PublicKey, bytes]]) -> str:
    """`body` with one signature line per (key name, public key, signature), each
    checked before it is written (a faulty signer publishes nothing)."""
    _check_body(body)
    message = body.encode("utf-8")
    lines = []
    for key_name, public_key, sig in signatures:
        if not isinstance(sig, bytes) or len(sig) != ED25519_SIG_SIZE:
            raise NoteError(f"a signature of {key_name!r} is not a {ED25519_SIG_SIZE}-byte "
                            "Ed25519 signature")
        try:
            public_key.verify(sig, message)
        except InvalidSignature:
            raise NoteError(f"the signer's signature does not verify with the public key of "
                            f"{key_name!r}: wrong key or faulty signer") from None
        blob = base64.b64encode(key_id(key_name, public_key) + sig).decode("ascii")
        lines.append(f"{SIG_PREFIX}{key_name} {blob}\n")
    return f"{body}\n" + "".join(lines)


def parse_note(text: str) -> Note:
    """Split a signed note into its text and signature lines (signatures unverified)."""
    if not isinstance(text, str):
        raise NoteError("a note must be a str")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise NoteError("a note must be valid UTF-8 (it contains a lone surrogate)") from None
    if size > MAX_NOTE_BYTES:
        raise NoteError(f"note is {size} bytes, more than the {MAX_NOTE_BYTES} allowed")
    if _CONTROL.search(text):
        raise NoteError("a note must not contain control characters other than newline")
    if not text.endswith("\n"):
        raise NoteError("a note must end with a newline")
    # The text ends at the last blank line; everything after it is signatures.
    split = text.rfind("\n\n")
    if split < 0:
        raise NoteError("a note needs a blank line between its text and its signatures")
    body, sig_block = text[:split + 1], text[split + 2:]
    lines = sig_block[:-1].split("\n") if sig_block else []
    if not lines:
        if text.rstrip("\n").rsplit("\n", 1)[-1].startswith(SIG_PREFIX):  # then blank
            # (an auditor trial: a checkpoint file with a blank line added at its end
            # was said to have no signature line)
            raise NoteError("a note ends with its last signature line; this one has a "
                            "blank line after its signatures (remove it)")
        raise NoteError("a note needs at least one signature line")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError(f"a note has {len(lines)} signature lines, more than {MAX_SIGNATURES}")
    return Note(body, tuple(_parse_signature_line(line) for line in lines))


def _parse_signature_line(line: str) -> NoteSignature:
    if not line.startswith(SIG_PREFIX):
        raise NoteError(f"signature line {line!r} does not start with an em dash and a space")
    parts = line[len(SIG_PREFIX):].split(" ")
    if len(parts) != 2:
        raise NoteError(f"signature line {line!r} is not '— <key name> <base64 signature>'")
    name, blob = parts
    _check_key_name(name)
    raw = _b64decode(blob, f"the signature of {name!r}")
    if len(raw) < 5:
        raise NoteError(f"the signature of {name!r} is too short to hold a key id and a "
                        "signature")
    return NoteSignature(name, raw[:4], raw[4:])


def _check_body(body: str) -> None:
    if not isinstance(body, str) or not body.endswith("\n"):
        raise NoteError("a note text must be a str ending with a newline")
    if "\n\n" in body or body.startswith("\n"):
        raise NoteError("a note text must not contain blank lines")
    if _CONTROL.search(body):
        raise NoteError("a note text must not contain control characters other than newline")


def verify_note(text: str, key_name: str, public_key: Ed25519PublicKey) -> Note:
    """Parse `text` and check it carries a valid signature by `key_name`/`public_key`.

    As C2SP asks: lines by other keys are ignored, but every line that names this
    key (same name and key id) must verify, and at least one must be there.
    """
    note = parse_note(text)
    kid = key_id(key_name, public_key)
    message = note.body.encode("utf-8")
    found = False
    for sig in note.signatures:
        if sig.name != key_name or sig.key_id != kid:
            continue
        found = True
        if len(sig.sig) != ED25519_SIG_SIZE:
            raise NoteError(f"the signature by {key_name!r} is {len(sig.sig)} bytes, not "
                            f"{ED25519_SIG_SIZE}")
        try:
            public_key.verify(sig.sig, message)
        except InvalidSignature:
            raise NoteError(f"the signature by {key_name!r} (key id {kid.hex()}) does not "
                            "verify: the note was altered or signed by another key") from None
    if not found:
        raise NoteError(f"the note has no signature by {key_name!r} with key id {kid.hex()}")
    return note


# ---- checkpoints --------------------------------------------------------------------------


def checkpoint_body(origin: str, size: int, root: bytes, extensions: tuple[str, ...] = ()) -> str:
    """The checkpoint text: origin, decimal size, base64 root, then extension lines."""
    if not isinstance(origin, str) or not origin or "\n" in origin or _CONTROL.search(origin):
        raise NoteError("the origin must be a non-empty single line without control characters")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise NoteError(f"the tree size must be a non-negative integer, not {size!r}")
    if not isinstance(root, bytes) or len(root) != ROOT_SIZE:
        raise NoteError(f"the root hash must be {ROOT_SIZE} bytes")
    for line in extensions:
        if not line or "\n" in line or _CONTROL.search(line):
            raise NoteError("an extension line must be a non-empty single line")
    return f"{origin}\n{size}\n{base64.b64encode(root).decode('ascii')}\n" + "".join(
        f"{line}\n" for line in extensions)


def sign_checkpoint(origin: str, size: int, root: bytes, key_name: str,
                    public_key: Ed25519PublicKey, sign: Callable[[bytes], bytes]) -> str:
    """A signed checkpoint note; `sign` receives exactly the UTF-8 body bytes."""
    return sign_note(checkpoint_body(origin, size, root), key_name, public_key, sign)


def parse_checkpoint(text: str) -> Checkpoint:
    """Parse a checkpoint note strictly (signatures not verified: see verify_checkpoint)."""
    note = parse_note(text)
    lines = note.body[:-1].split("\n")
    if len(lines) < 3:
        raise NoteError(f"a checkpoint text has at least 3 lines (origin, size, root), "
                        f"this one has {len(lines)}")
    origin, size_text, root_text = lines[:3]
    extensions = tuple(lines[3:])
    if any(not line for line in extensions):
        raise NoteError("a checkpoint's extension lines must not be empty")
    if not origin:
        raise NoteError("the checkpoint origin line is empty")
    if len(size_text) > _MAX_SIZE_DIGITS or not _DECIMAL.fullmatch(size_text):
        raise NoteError(f"the checkpoint size {size_text!r} is not a decimal number without "
                        "leading zeros")
    root = _b64decode(root_text, "the checkpoint root")
    if len(root) != ROOT_SIZE:
        raise NoteError(f"the checkpoint root is {len(root)} bytes, not {ROOT_SIZE}")
    return Checkpoint(origin, int(size_text), root, note.body, note.signatures, extensions)


def verify_checkpoint(text: str, key_name: str, public_key: Ed25519PublicKey,
                      origin: str | None = None) -> Checkpoint:
    """Parse a checkpoint and verify its signature by the pinned key (and its origin,
    when one is given)."""
    checkpoint = parse_checkpoint(text)
    verify_note(text, key_name, public_key)
    if origin is not None and checkpoint.origin != origin:
        raise NoteError(f"the checkpoint origin is {checkpoint.origin!r}, expected {origin!r}")
    return checkpoint


def _b64decode(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise NoteError(f"{what} is not valid base64") from None
    # Reject non-canonical encodings (stray bits in the padding) so one value has one text.
    if base64.b64encode(raw).decode("ascii") != text:
        raise NoteError(f"{what} is not canonical base64")
    return raw

"""OpenSSH certificates and key revocation lists.

Certificates are built with cryptography's SSHCertificateBuilder and signed by the
HSM through the audited path. cryptography has no KRL writer, so the KRL is
written here from OpenSSH's PROTOCOL.krl: a header and one certificate section
per CA (serials and key ids), plus a section of SHA-256 key hashes for keys
revoked outright.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import struct
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from ca.policy import Reason, Refused, check_ed25519, check_rsa

SSH_CURVES = {"secp256r1", "secp384r1", "secp521r1"}


@dataclass(frozen=True)
class SSHPublicKey:
    key: object
    blob: bytes
    line: str  # "<type> <base64>" without a comment

    @property
    def sha256(self) -> str:
        """As `ssh-keygen -l` prints it: SHA256:<unpadded base64>."""
        return "SHA256:" + base64.b64encode(hashlib.sha256(self.blob).digest()).decode().rstrip(
            "=")


def _key_fields(text: object) -> list[str]:
    """The fields of one OpenSSH public key line: type, base64, comment..."""
    if not isinstance(text, str) or not text.strip():
        raise Refused("public_key must be an OpenSSH public key line, e.g. 'ssh-ed25519 AAAA...'")
    if len(text) > 16384 or "\n" in text.strip():
        raise Refused("public_key must be a single OpenSSH public key line")
    fields = text.strip().split()
    if len(fields) < 2:
        raise Refused("public_key must be '<type> <base64> [comment]'")
    if "cert-v01" in fields[0]:
        raise Refused("give the public key itself, not a certificate")
    return fields


def _strict_base64(text: str) -> None:
    """Refused unless `text` is base64 as ssh-keygen reads it: cryptography's loader
    took characters after its padding, and the key before them was revoked while
    ssh-keygen called the line no key (an SSH trial)."""
    try:
        base64.b64decode(text, validate=True)
    except ValueError:
        raise Refused("public_key cannot be parsed as an OpenSSH public key: its key is not "
                      "base64 as OpenSSH writes it (characters after its end?); give the "
                      ".pub file's line as it is", Reason.BAD_KEY) from None


def revocable_key(text: object) -> SSHPublicKey:
    """Any OpenSSH public key of a type sshd knows, for the KRL: a leaked key of a type
    the CA never certifies (DSA, RSA of 1024 bits, a security key) is one sshd's
    RevokedKeys still refuses, for its plain authorized_keys too, and the KRL every
    host fetches is where to list it (an SSH trial was refused it). The key is read
    whole, as sshd reads it, and listed re-encoded as sshd hashes it: a key cut short
    when pasted, or with bytes after it, would list the SHA-256 of no key at all, the
    leaked one still logging in (a review)."""
    fields = _key_fields(text)
    kind = fields[0]
    if kind in _SK_TYPES:
        blob = _sk_blob(kind, fields[1])
        return SSHPublicKey(None, blob, f"{kind} {base64.b64encode(blob).decode()}")
    _strict_base64(fields[1])
    try:
        with warnings.catch_warnings():  # DSA's deprecation, to the daemon's stderr
            warnings.simplefilter("ignore")
            key = serialization.load_ssh_public_key(f"{kind} {fields[1]}".encode())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise Refused(f"public_key cannot be parsed as an OpenSSH public key: {exc}",
                      Reason.BAD_KEY) from None
    return _canonical(key)


def _canonical(key: object) -> SSHPublicKey:
    """`key` as OpenSSH encodes it: the blob sshd hashes, and its line."""
    line = key.public_bytes(serialization.Encoding.OpenSSH,  # type: ignore[attr-defined]
                            serialization.PublicFormat.OpenSSH).decode()
    return SSHPublicKey(key, base64.b64decode(line.split()[1]), line)


# Security keys' public key types (OpenSSH PROTOCOL.u2f), which cryptography does not
# read: their key, and the application string the key was made for.
_SK_TYPES = {"sk-ssh-ed25519@openssh.com": 3, "sk-ecdsa-sha2-nistp256@openssh.com": 4}


def _sk_blob(kind: str, text: str) -> bytes:
    """A security key's public key blob, checked whole: its type, its key (a point of
    its curve) and its application, nothing missing and nothing after."""
    def bad(why: str) -> Refused:
        return Refused(f"public_key cannot be parsed as a {kind} key: {why}", Reason.BAD_KEY)
    try:
        blob = base64.b64decode(text, validate=True)
    except ValueError:
        raise bad("it is not base64") from None
    parts, at = [], 0
    while at < len(blob):
        size = int.from_bytes(blob[at:at + 4], "big")
        if at + 4 > len(blob) or at + 4 + size > len(blob):
            raise bad("it is cut short")
        parts.append(blob[at + 4:at + 4 + size])
        at += 4 + size
    if len(parts) != _SK_TYPES[kind] or parts[0] != kind.encode():
        raise bad("its fields are not those of its type")
    application = parts[-1]
    if not application or not all(0x21 <= c < 0x7f for c in application):
        raise bad("its application is not printable text (such as ssh:)")
    try:
        if kind.startswith("sk-ssh-ed25519"):
            ed25519.Ed25519PublicKey.from_public_bytes(parts[1])
        else:
            if parts[1] != b"nistp256" or parts[2][:1] != b"\x04":  # sshd: uncompressed
                raise ValueError
            ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), parts[2])
    except ValueError:
        raise bad("its key is not a point of its curve") from None
    return blob


def parse_public_key(text: object) -> SSHPublicKey:
    """An OpenSSH public key line of an accepted type (docs/ssh.md): Ed25519, ECDSA
    P-256/384/521, RSA 2048-8192 bits with e = 65537."""
    fields = _key_fields(text)
    kind = fields[0]
    if kind == "ssh-dss":
        raise Refused("DSA keys (ssh-dss) are not accepted; use ssh-ed25519", Reason.BAD_KEY)
    if kind.startswith("sk-"):
        raise Refused(f"{kind} (security key) public keys are not accepted yet", Reason.BAD_KEY)
    _strict_base64(fields[1])
    try:
        key = serialization.load_ssh_public_key(f"{fields[0]} {fields[1]}".encode())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise Refused(f"public_key cannot be parsed: {exc}", Reason.BAD_KEY) from None
    if isinstance(key, rsa.RSAPublicKey):
        check_rsa(key, 2048, 8192)
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in SSH_CURVES:
            raise Refused(f"EC curve {key.curve.name} is not accepted", Reason.BAD_KEY)
    elif isinstance(key, ed25519.Ed25519PublicKey):
        check_ed25519(key)
    else:
        raise Refused(f"key type {kind} is not accepted", Reason.BAD_KEY)
    return _canonical(key)


def source_addresses(value: object) -> str | None:
    """A list of CIDRs for the source-address critical option."""
    if value is None:
        return None
    if not isinstance(value, list) or not value or len(value) > 32:
        raise Refused("source_address must be a list of 1 to 32 addresses or CIDRs")
    out = []
    for item in value:
        try:
            if not isinstance(item, str):  # ip_network reads an integer as an address
                raise TypeError
            if "%" in item:  # a scoped address: sshd matches no zone, the cert is useless
                raise ValueError
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except (ValueError, TypeError):
            raise Refused(f"source_address entry {item!r} is not an address or CIDR (a "
                          "string such as \"10.0.0.0/8\")") from None
    return ",".join(out)


def blob_of(public_key: object) -> bytes:
    return _canonical(public_key).blob


# ---- KRL (OpenSSH PROTOCOL.krl) ----------------------------------------------------------

KRL_MAGIC = b"SSHKRL\n\0"
KRL_FORMAT_VERSION = 1
SECTION_CERTIFICATES = 1
SECTION_FINGERPRINT_SHA256 = 5
CERT_SERIAL_LIST = 0x20
CERT_KEY_ID = 0x23


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


@dataclass(frozen=True)
class RevokedCerts:
    ca_blob: bytes
    serials: Iterable[int]
    key_ids: Iterable[str]


def build_krl(version: int, generated: int, certs: Iterable[RevokedCerts],
              revoked_key_blobs: Iterable[bytes], comment: str = "hsmca") -> bytes:
    out = [KRL_MAGIC, struct.pack(">IQQQ", KRL_FORMAT_VERSION, version, generated, 0),
           _string(b""), _string(comment.encode())]
    for group in certs:
        serials = sorted(set(group.serials))
        key_ids = sorted(set(group.key_ids))
        if not serials and not key_ids:
            continue
        body = [_string(group.ca_blob), _string(b"")]
        if serials:
            body.append(bytes([CERT_SERIAL_LIST]) + _string(
                b"".join(struct.pack(">Q", s) for s in serials)))
        if key_ids:
            body.append(bytes([CERT_KEY_ID]) + _string(
                b"".join(_string(k.encode()) for k in key_ids)))
        out.append(bytes([SECTION_CERTIFICATES]) + _string(b"".join(body)))
    hashes = sorted({hashlib.sha256(b).digest() for b in revoked_key_blobs})
    if hashes:
        out.append(bytes([SECTION_FINGERPRINT_SHA256]) + _string(
            b"".join(_string(h) for h in hashes)))
    return b"".join(out)

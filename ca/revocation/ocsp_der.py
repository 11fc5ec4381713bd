"""An RFC 6960 BasicOCSPResponse with several SingleResponses, in DER.

cryptography's OCSPResponseBuilder puts one SingleResponse in a response; the
lightweight profile (RFC 5019) serves every client from one pre-signed response
per certificate, and clients ask with a SHA-1 CertID (most) or a SHA-256 one, so a
response carries both and one signature serves both. cryptography parses such a
response (tests/test_ocsp.py checks it does, and that openssl accepts it); this
module writes it: a handful of DER types, nothing general.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509 import ocsp

ID_PKIX_OCSP_BASIC = "1.3.6.1.5.5.7.48.1.1"
_HASH_OIDS = {"sha1": "1.3.14.3.2.26", "sha256": "2.16.840.1.101.3.4.2.1"}
_SIG_OIDS = {("ec", "sha256"): "1.2.840.10045.4.3.2", ("ec", "sha384"): "1.2.840.10045.4.3.3",
             ("ed25519", None): "1.3.101.112",
             ("rsa", "sha256"): "1.2.840.113549.1.1.11",
             ("rsa", "sha384"): "1.2.840.113549.1.1.12"}
_REASON_CODES = {"unspecified": 0, "keyCompromise": 1, "cACompromise": 2,
                 "affiliationChanged": 3, "superseded": 4, "cessationOfOperation": 5,
                 "certificateHold": 6, "privilegeWithdrawn": 9, "aACompromise": 10}


def _len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _len(len(body)) + body


def _seq(*parts: bytes) -> bytes:
    return _tlv(0x30, b"".join(parts))


def _oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return _tlv(0x06, bytes(out))


def _int(value: int) -> bytes:
    body = value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True)
    return _tlv(0x02, body)


def _time(t: dt.datetime) -> bytes:
    return _tlv(0x18, t.astimezone(dt.UTC).strftime("%Y%m%d%H%M%SZ").encode())


def _explicit(number: int, body: bytes) -> bytes:
    return _tlv(0xA0 | number, body)


def _algorithm(oid: str, null_params: bool) -> bytes:
    return _seq(_oid(oid), b"\x05\x00" if null_params else b"")


@dataclass(frozen=True)
class CertStatus:
    """good (revoked_at None), or revoked at a time, for a reason (an RFC 5280 name)."""

    revoked_at: dt.datetime | None = None
    reason: str | None = None


def _status(status: CertStatus) -> bytes:
    if status.revoked_at is None:
        return b"\x80\x00"  # good [0] IMPLICIT NULL
    info = _time(status.revoked_at)
    if status.reason is not None:
        info += _explicit(0, _tlv(0x0A, bytes([_REASON_CODES[status.reason]])))
    return _tlv(0xA1, info)  # revoked [1] IMPLICIT RevokedInfo


def _issuer_hashes(issuer: x509.Certificate, algorithm: hashes.HashAlgorithm
                   ) -> tuple[bytes, bytes]:
    """(issuerNameHash, issuerKeyHash) as cryptography's own request builder makes them,
    for a certificate `issuer` issued (a throwaway one: only its issuer name counts)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    probe = (x509.CertificateBuilder().subject_name(issuer.subject)
             .issuer_name(issuer.subject).public_key(key.public_key()).serial_number(1)
             .not_valid_before(now).not_valid_after(now + dt.timedelta(minutes=1))
             .sign(key, hashes.SHA256()))
    req = ocsp.OCSPRequestBuilder().add_certificate(probe, issuer, algorithm).build()
    return req.issuer_name_hash, req.issuer_key_hash


@functools.lru_cache(maxsize=16)
def cert_ids(issuer: x509.Certificate) -> dict[str, tuple[bytes, bytes]]:
    """The issuer's part of a CertID, by hash name: what a request must match."""
    return {"sha1": _issuer_hashes(issuer, hashes.SHA1()),
            "sha256": _issuer_hashes(issuer, hashes.SHA256())}


def response_data(issuer: x509.Certificate, serial: int, status: CertStatus,
                  this_update: dt.datetime, next_update: dt.datetime) -> bytes:
    """tbsResponseData: responder by key hash, one SingleResponse per CertID hash."""
    singles = []
    for name, (name_hash, key_hash) in cert_ids(issuer).items():
        cert_id = _seq(_algorithm(_HASH_OIDS[name], True), _tlv(0x04, name_hash),
                       _tlv(0x04, key_hash), _int(serial))
        singles.append(_seq(cert_id, _status(status), _time(this_update),
                            _explicit(0, _time(next_update))))
    responder = _tlv(0xA2, _tlv(0x04, cert_ids(issuer)["sha1"][1]))  # byKey [2]
    return _seq(responder, _time(this_update), _seq(*singles))


def signature_algorithm(public_key: object, hash_name: str | None) -> bytes:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return _algorithm(_SIG_OIDS[("ec", hash_name or "sha256")], False)
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return _algorithm(_SIG_OIDS[("ed25519", None)], False)
    if isinstance(public_key, rsa.RSAPublicKey):
        return _algorithm(_SIG_OIDS[("rsa", hash_name or "sha256")], True)
    raise TypeError(f"no OCSP signature algorithm for {type(public_key).__name__}")


def sign_response(tbs: bytes, algorithm: bytes, sign: Callable[[bytes], bytes],
                  certs: Sequence[x509.Certificate] = ()) -> ocsp.OCSPResponse:
    """The whole OCSPResponse for `tbs`, signed by `sign`, parsed back by cryptography
    (which also refuses anything this module got wrong)."""
    signature = sign(tbs)
    basic = [tbs, algorithm, _tlv(0x03, b"\x00" + signature)]
    if certs:
        basic.append(_explicit(0, _seq(*(c.public_bytes(serialization.Encoding.DER)
                                         for c in certs))))
    body = _seq(_tlv(0x0A, b"\x00"),  # successful
                _explicit(0, _seq(_oid(ID_PKIX_OCSP_BASIC), _tlv(0x04, _seq(*basic)))))
    return ocsp.load_der_ocsp_response(body)

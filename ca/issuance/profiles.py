"""X.509 profiles: what a root, an issuing CA and a leaf certificate contain.

Pure builders: they return an unsigned `CertificateBuilder`; the issuer signs it
through the signing pipeline (ca/issuance/pipeline.py), which audits the operation.
Nothing from a CSR except its public key is ever copied into a certificate.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

if TYPE_CHECKING:
    from ca.ra import CACertOrder

class _SerialSource:
    """159-bit serials from the OS CSPRNG, drawn 4 KiB at a time: one getrandom()
    per ~200 certificates instead of one per certificate."""

    def __init__(self) -> None:
        self._buf = b""
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            if len(self._buf) < 20:
                self._buf = os.urandom(4096)
            chunk, self._buf = self._buf[:20], self._buf[20:]
        return (int.from_bytes(chunk, "big") >> 1) or 1  # positive, < 2**159 (RFC 5280)


random_serial = _SerialSource().next


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


HASHES: dict[str, hashes.HashAlgorithm] = {
    "sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}


def hash_for(public_key: object) -> hashes.HashAlgorithm | None:
    """The signature hash for a CA key, by its public half (None for EdDSA)."""
    if isinstance(public_key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return None
    if isinstance(public_key, ec.EllipticCurvePublicKey) and public_key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def hash_name(public_key: object) -> str | None:
    h = hash_for(public_key)
    return h.name if h is not None else None


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


@functools.lru_cache(maxsize=4096)
def name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


DEFAULT_CA_NAME = "hsmca"
ROOT_SUFFIX, ISSUING_SUFFIX = " Root CA", " Issuing CA"
# A common name holds 64 characters: NAME, " Issuing CA " and a rotated key's stamp
# (YYYYmmddHHMMSS-xxxx, 19 characters) must fit in one.
MAX_CA_NAME = 32
assert MAX_CA_NAME + len(ISSUING_SUFFIX) + 1 + 19 <= 64


def issuing_ca_name(base: str, stamp: str) -> str:
    """The common name of an issuing CA made by a rotation, `stamp` its key's."""
    return f"{base}{ISSUING_SUFFIX} {stamp}"


def ca_name(root: x509.Certificate) -> str:
    """The name `hsmca init --name` gave the CA, read back from its root's common name
    ('NAME Root CA'; a rotated root keeps its name), for the CA certificates made later."""
    cns = root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(cns[0].value) if cns else DEFAULT_CA_NAME
    return cn.removesuffix(ROOT_SUFFIX) or DEFAULT_CA_NAME


def ca_builder(order: CACertOrder, serial: int) -> x509.CertificateBuilder:
    """A CA certificate exactly as the registration authority ordered it: a root, a
    cross-certificate between two roots of the same name (self-issued, so it does not
    count against the roots' path length, and told apart from the root of that name by
    its key identifiers), or an issuing CA (with its root's CRL address, when the CA
    has a public URL)."""
    builder = (x509.CertificateBuilder()
            .subject_name(order.subject).issuer_name(order.issuer_name)
            .public_key(order.public_key)
            .serial_number(serial)
            .not_valid_before(order.not_before).not_valid_after(order.not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=order.path_length),
                           critical=True)
            .add_extension(_ca_key_usage(), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(order.public_key),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier(order.issuer_key_id, None, None),
                           critical=False))
    if order.crl_url:
        builder = builder.add_extension(x509.CRLDistributionPoints([x509.DistributionPoint(
            [x509.UniformResourceIdentifier(order.crl_url)], None, None, None)]),
            critical=False)
    return builder


@dataclass(frozen=True)
class LeafProfile:
    """What goes into a leaf certificate (the registration authority has decided it)."""

    public_key: object
    common_name: str | None  # None: an empty subject, the SAN carries the names
    dns_names: Sequence[str] = ()
    ip_addresses: Sequence[str] = ()
    uris: Sequence[str] = ()
    emails: Sequence[str] = ()
    serial: int = 0
    crl_url: str | None = None
    ocsp_url: str | None = None
    ski: x509.SubjectKeyIdentifier | None = None  # derived from public_key when not given
    client_only: bool = False  # EKU clientAuth alone (a person's or operator's credential)


# The parts of every leaf that never change, built once (issuance is a hot path).
_LEAF_BC = x509.BasicConstraints(ca=False, path_length=None)
_LEAF_KU, _LEAF_KU_RSA = (x509.KeyUsage(
    digital_signature=True, key_encipherment=rsa_, content_commitment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
    encipher_only=False, decipher_only=False) for rsa_ in (False, True))
_LEAF_EKU = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                   ExtendedKeyUsageOID.CLIENT_AUTH])
_CLIENT_EKU = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])


def common_name_for(names: Sequence[str]) -> str | None:
    """The first name that fits a CN (at most 64 characters, RFC 5280 ub-common-name)."""
    return next((n for n in names if len(n) <= 64), None)


def leaf_builder(p: LeafProfile, issuer: x509.Certificate, not_before: dt.datetime,
                 not_after: dt.datetime) -> x509.CertificateBuilder:
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in p.dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in p.ip_addresses]
    sans += [x509.UniformResourceIdentifier(u) for u in p.uris]
    sans += [x509.RFC822Name(e) for e in p.emails]
    head, aki_, tail = _leaf_extensions(issuer, isinstance(p.public_key, rsa.RSAPublicKey),
                                        p.crl_url, p.ocsp_url, p.client_only)
    ski = p.ski or x509.SubjectKeyIdentifier.from_public_key(p.public_key)  # type: ignore[arg-type]
    extensions = [*head, x509.Extension(ski.oid, False, ski), aki_]
    if sans:  # RFC 5280 4.2.1.6: critical when the subject is empty
        san = x509.SubjectAlternativeName(sans)
        extensions.append(x509.Extension(san.oid, not p.common_name, san))
    extensions += tail
    # The extensions go in whole: add_extension would copy the builder and look for a
    # duplicate at each call, and the fixed ones are built once per issuer and URL.
    return (x509.CertificateBuilder(extensions=extensions)
            .subject_name(name(p.common_name) if p.common_name else x509.Name([]))
            .issuer_name(issuer.subject)
            .public_key(p.public_key)  # type: ignore[arg-type]
            .serial_number(p.serial or random_serial())
            .not_valid_before(not_before).not_valid_after(not_after))


@functools.lru_cache(maxsize=64)
def _leaf_extensions(issuer: x509.Certificate, rsa_key: bool, crl_url: str | None,
                     ocsp_url: str | None, client_only: bool = False
                     ) -> tuple[tuple[x509.Extension[x509.ExtensionType], ...],
                                x509.Extension[x509.ExtensionType],
                                tuple[x509.Extension[x509.ExtensionType], ...]]:
    """The extensions every leaf of `issuer` with these URLs (and for a client alone, or
    not) carries, in their order:
    (those before the subject key identifier, the authority key identifier, those after
    the subject alternative name)."""
    def ext(value: x509.ExtensionType, critical: bool = False
            ) -> x509.Extension[x509.ExtensionType]:
        return x509.Extension(value.oid, critical, value)

    head = (ext(_LEAF_BC, True), ext(_LEAF_KU_RSA if rsa_key else _LEAF_KU, True),
            ext(_CLIENT_EKU if client_only else _LEAF_EKU))
    tail = []
    if crl_url:
        tail.append(ext(x509.CRLDistributionPoints([x509.DistributionPoint(
            [x509.UniformResourceIdentifier(crl_url)], None, None, None)])))
    if ocsp_url:
        tail.append(ext(x509.AuthorityInformationAccess([x509.AccessDescription(
            x509.AuthorityInformationAccessOID.OCSP,
            x509.UniformResourceIdentifier(ocsp_url))])))
    return head, ext(aki(issuer)), tuple(tail)


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                         content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, encipher_only=False,
                         decipher_only=False)


@functools.lru_cache(maxsize=16)
def aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()

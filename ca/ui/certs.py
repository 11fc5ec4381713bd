"""One certificate as its page shows it, every claim checked here rather than taken
from the daemon: the DER must be the one the inventory fingerprints; the chain must
verify up to the root the auditor pinned (--ca); the CRL and the OCSP response must
be signed by its issuer; the audit intent and outcome must be lines of the verified
log (`ca.ui.proofs`) that name this serial and this certificate's SHA-256."""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtensionOID, SignatureAlgorithmOID

from ca.audit.merkle import TreeHead
from ca.chains import issued_by
from ca.client import ClientError
from ca.subject import spki_sha256
from ca.ui import proofs
from ca.ui.ca_api import CA
from ca.x509_reasons import REASON_FLAGS


@dataclass(frozen=True)
class Link:
    """One certificate of the chain, and whether its issuer's signature on it verified."""

    subject: str
    serial: str
    not_after: str
    fingerprint: str
    verified: bool
    how: str


@dataclass(frozen=True)
class Revocation:
    """What a signed revocation source (the CRL, or OCSP) says about the certificate."""

    source: str
    signed: bool  # its signature verified with the issuer's key
    status: str  # good | revoked | not listed | pending | unknown | unavailable
    revoked_at: str | None = None
    reason: str | None = None
    details: tuple[tuple[str, str], ...] = ()
    problem: str | None = None


@dataclass
class AuditEvidence:
    intent: proofs.Line | None = None
    intent_proof: proofs.Proof | None = None
    outcome: proofs.Line | None = None
    outcome_proof: proofs.Proof | None = None
    checks: list[tuple[str, bool]] = field(default_factory=list)
    problem: str | None = None

    @property
    def verified(self) -> bool:
        return (self.intent is not None and self.intent.verified and self.outcome is not None
                and self.outcome.verified and all(ok for _, ok in self.checks))


@dataclass
class RevocationEvidence:
    """The cert.revoke line of a revoked certificate: who revoked it and why, as the log
    has it, checked against what was verified and against the inventory's reason."""

    line: proofs.Line | None = None
    proof: proofs.Proof | None = None
    checks: list[tuple[str, bool]] = field(default_factory=list)
    problem: str | None = None

    @property
    def verified(self) -> bool:
        return self.line is not None and self.line.verified and all(ok for _, ok in self.checks)


async def revocation_evidence(ca: CA, tree: TreeHead | None, rec: dict[str, Any],
                              log: str | None = None) -> RevocationEvidence:
    """The line that revoked the certificate of `rec` (an inventory record), found by
    the time the inventory keeps: a web trial's revoked certificate showed only its
    issuance lines, so nothing said who revoked it, and a rewritten reason left its
    page all ticks."""
    found = RevocationEvidence()
    serial = str(rec["serial"])
    try:
        at = dt.datetime.fromisoformat(str(rec["revoked_at"]))
        located = await proofs.find_revocation(ca, tree, serial, at)
        if located is None:
            found.problem = (f"no cert.revoke line naming {serial} within "
                             f"{proofs.REVOCATION_WINDOW.seconds} s of its revocation time in "
                             "this log")
            return found
        found.line, found.proof = await proofs.proven(ca, tree, *located)
    except (ClientError, ValueError) as exc:
        found.problem = str(exc)
        return found
    said = found.line.get("reason") or "unspecified"
    kept = rec.get("reason") or "unspecified"
    of = f" of log {log}" if log else ""
    found.checks.append((f"line {found.line.seq}{of} is a cert.revoke naming serial {serial}",
                         True))
    if said == kept:
        found.checks.append((f"its reason is the inventory's ({kept})", True))
    elif kept == "keyCompromise":
        # A revocation for another reason turned keyCompromise later keeps its first
        # time (docs/operator.md, section 5): the line found by that time is the first.
        found.checks.append((f"its reason was {said}; the inventory's keyCompromise came "
                             "with a later revocation, which kept this one's time", True))
    else:
        found.checks.append((f"its reason ({said}) is not the inventory's ({kept})", False))
    return found


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _when(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else "-"


def _key(pub: Any) -> str:
    if isinstance(pub, ec.EllipticCurvePublicKey):
        return f"EC {pub.curve.name}"
    if isinstance(pub, rsa.RSAPublicKey):
        return f"RSA {pub.key_size} bits"
    if isinstance(pub, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(pub, ed448.Ed448PublicKey):
        return "Ed448"
    return type(pub).__name__


def describe(cert: x509.Certificate) -> list[tuple[str, str]]:
    """The fields worth reading, as text (escaped by the templates, like all text)."""
    out = [("Serial", format(cert.serial_number, "x")),
           ("Subject", cert.subject.rfc4514_string() or "(empty)"),
           ("Issuer", cert.issuer.rfc4514_string()),
           ("Not before", _when(cert.not_valid_before_utc)),
           ("Not after", _when(cert.not_valid_after_utc)),
           ("Public key", _key(cert.public_key())),
           ("Signature", cert.signature_algorithm_oid._name),
           ("SHA-256", fingerprint(cert))]
    for ext in cert.extensions:
        value = ext.value
        if isinstance(value, x509.SubjectAlternativeName):
            text = ", ".join(str(n.value) for n in value)
        elif isinstance(value, x509.ExtendedKeyUsage):
            text = ", ".join(u._name for u in value)
        elif isinstance(value, x509.KeyUsage):
            text = ", ".join(name for name in ("digital_signature", "key_encipherment",
                                               "key_agreement", "key_cert_sign", "crl_sign")
                             if getattr(value, name))
        elif isinstance(value, x509.BasicConstraints):
            text = f"CA: {value.ca}"
        elif isinstance(value, x509.CRLDistributionPoints):
            text = ", ".join(str(n.value) for p in value for n in (p.full_name or []))
        elif isinstance(value, x509.AuthorityInformationAccess):
            text = ", ".join(f"{d.access_method._name}: {d.access_location.value}"
                             for d in value)
        elif isinstance(value, x509.SubjectKeyIdentifier):
            text = value.digest.hex()
        elif isinstance(value, x509.AuthorityKeyIdentifier):
            text = (value.key_identifier or b"").hex()
        else:
            text = "(present)"
        name = ext.oid._name if ext.oid != ExtensionOID.SUBJECT_ALTERNATIVE_NAME else "SAN"
        out.append((f"{name}{' (critical)' if ext.critical else ''}", text))
    return out


def chain(cert: x509.Certificate, bundle: list[x509.Certificate], root: x509.Certificate
          ) -> tuple[list[Link], x509.Certificate | None]:
    """The chain from `cert` to the pinned `root` through the daemon's bundle, each link
    checked; and the certificate's issuer, if one in the bundle signed it."""
    links: list[Link] = []
    issuer = next((c for c in [*bundle, root] if issued_by(cert, c)), None)
    links.append(Link(cert.subject.rfc4514_string(), format(cert.serial_number, "x"),
                      _when(cert.not_valid_after_utc), fingerprint(cert), issuer is not None,
                      f"signed by {issuer.subject.rfc4514_string()}" if issuer is not None
                      else "no CA certificate the daemon serves signed it"))
    current = issuer
    for _ in range(4):  # a leaf, an intermediate, the root: never deeper
        if current is None:
            break
        if current.public_bytes(serialization.Encoding.DER) == root.public_bytes(
                serialization.Encoding.DER):
            links.append(Link(root.subject.rfc4514_string(), format(root.serial_number, "x"),
                              _when(root.not_valid_after_utc), fingerprint(root), True,
                              "the root you pinned (--ca)"))
            break
        ok = issued_by(current, root)
        links.append(Link(current.subject.rfc4514_string(), format(current.serial_number, "x"),
                          _when(current.not_valid_after_utc), fingerprint(current), ok,
                          "signed by the root you pinned (--ca)" if ok else
                          "NOT signed by the root you pinned (--ca)"))
        current = root if ok else None
    return links, issuer


def _signature_ok(pub: Any, signature: bytes, data: bytes,
                  algorithm: hashes.HashAlgorithm | None, oid: x509.ObjectIdentifier) -> bool:
    try:
        if isinstance(pub, ec.EllipticCurvePublicKey) and algorithm is not None:
            pub.verify(signature, data, ec.ECDSA(algorithm))
        elif isinstance(pub, rsa.RSAPublicKey) and algorithm is not None:
            pad: padding.AsymmetricPadding = padding.PSS(
                padding.MGF1(algorithm), padding.PSS.DIGEST_LENGTH) \
                if oid == SignatureAlgorithmOID.RSASSA_PSS else padding.PKCS1v15()
            pub.verify(signature, data, pad, algorithm)
        elif isinstance(pub, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            pub.verify(signature, data)
        else:
            return False
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


# RFC 5280's names (as the inventory keeps them), not cryptography's snake case.
_RFC_NAMES: dict[x509.ReasonFlags, str] = {}
for _name, _flag in REASON_FLAGS.items():
    _RFC_NAMES.setdefault(_flag, _name)


def _reason(value: x509.ReasonFlags | None) -> str | None:
    return _RFC_NAMES.get(value, value.name) if value is not None else None


async def crl_status(ca: CA, cert: x509.Certificate, issuer: x509.Certificate | None,
                     label: str | None) -> Revocation:
    try:
        der = await ca.get(f"/v1/x509/crl/{label}" if label else "/v1/x509/crl")
        crl = x509.load_der_x509_crl(der)
    except ClientError as exc:
        return Revocation("CRL", False, "unavailable", problem=str(exc))
    except ValueError:
        return Revocation("CRL", False, "unavailable", problem="the daemon's CRL does not parse")
    if issuer is None:
        # Nothing to check it with (a web trial read "does not verify" where no check
        # was made): the daemon serves no CA certificate that signed this one, as for a
        # key retired with its CA certificate revoked. No verdict from an unchecked CRL.
        return Revocation("CRL", False, "unchecked", problem="the daemon serves no CA "
                          "certificate that signed this certificate (its issuing key's CA "
                          "certificate revoked, or this is not the CA's certificate), so "
                          "its CRL cannot be checked")
    signed = crl.issuer == issuer.subject and \
        crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number \
        if any(isinstance(e.value, x509.CRLNumber) for e in crl.extensions) else None
    details = (("CRL number", str(number)), ("This update", _when(crl.last_update_utc)),
               ("Next update", _when(crl.next_update_utc)),
               ("Entries", str(len(crl))))
    entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
    if entry is None:
        return Revocation("CRL", signed, "not listed", details=details,
                          problem=None if signed else "its signature does not verify with "
                          "the certificate's issuer")
    reason = None
    for ext in entry.extensions:
        if isinstance(ext.value, x509.CRLReason):
            reason = _reason(ext.value.reason)
    return Revocation("CRL", signed, "revoked", _when(entry.revocation_date_utc), reason,
                      details, None if signed else "its signature does not verify with the "
                      "certificate's issuer")


async def ocsp_status(ca: CA, cert: x509.Certificate, issuer: x509.Certificate | None
                      ) -> Revocation:
    if issuer is None:
        return Revocation("OCSP", False, "unchecked", problem="the daemon serves no CA "
                          "certificate that signed this certificate, so no OCSP request "
                          "can name it")
    request = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA256()).build()
    try:
        der = await ca.post("/v1/x509/ocsp", request.public_bytes(serialization.Encoding.DER),
                            "application/ocsp-request")
        response = ocsp.load_der_ocsp_response(der)
    except ClientError as exc:
        return Revocation("OCSP", False, "unavailable", problem=str(exc))
    except ValueError:
        return Revocation("OCSP", False, "unavailable",
                          problem="the daemon's OCSP response does not parse")
    if response.response_status == ocsp.OCSPResponseStatus.TRY_LATER:
        # Not a failure: the CA signs a new certificate's responses within seconds (a
        # web trial saw a red cross on a certificate just enrolled).
        return Revocation("OCSP", False, "pending", problem="the responder answered "
                          "try_later: a new certificate's response is signed within "
                          "seconds of its issue (or the CA cannot sign right now); look "
                          "again shortly")
    if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        return Revocation("OCSP", False, "unknown", problem="the responder answered "
                          f"{response.response_status.name.lower()} (unsigned)")
    signed = _signature_ok(issuer.public_key(), response.signature,
                           response.tbs_response_bytes, response.signature_hash_algorithm,
                           response.signature_algorithm_oid)
    if response.serial_number != cert.serial_number:
        return Revocation("OCSP", signed, "unknown",
                          problem="the response is about another serial")
    status = response.certificate_status.name.lower()
    details = (("Produced at", _when(response.produced_at_utc)),
               ("This update", _when(response.this_update_utc)),
               ("Next update", _when(response.next_update_utc)))
    return Revocation("OCSP", signed, status,
                      _when(response.revocation_time_utc) if status == "revoked" else None,
                      _reason(response.revocation_reason), details,
                      None if signed else "its signature does not verify with the "
                      "certificate's issuer")


def san_values(cert: x509.Certificate) -> list[str]:
    """The certificate's names as the intent line lists them: each SAN's value."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(name.value) for name in san]


def intent_matches(intent: dict[str, Any], cert: x509.Certificate) -> list[tuple[str, bool]]:
    """The intent line's decision against the certificate: names, public key, validity."""
    # Each said as it came out, with what differs: "✗ the intent's names are the
    # certificate's" read as the opposite of what it meant (a web view trial)
    names = intent.get("names")
    has = sorted(san_values(cert))
    same_names = isinstance(names, list) and sorted(map(str, names)) == has
    def listed(values: list[Any]) -> str:
        shown = ", ".join(map(str, values[:10])) or "none"
        return shown + (f", ... ({len(values)} in all)" if len(values) > 10 else "")
    said = listed(names) if isinstance(names, list) else repr(names)
    checks = [("the intent's names are the certificate's" if same_names else
               f"the intent's names ({said}) are not the certificate's ({listed(has)})",
               same_names)]
    same_key = intent.get("spki_sha256") == spki_sha256(cert.public_key())
    checks.append(("the intent's public key is the certificate's" if same_key else
                   "the intent's public key is not the certificate's", same_key))
    ends = intent.get("not_after")
    try:
        same_end = isinstance(ends, str) and dt.datetime.fromisoformat(ends) == \
            cert.not_valid_after_utc
    except ValueError:
        same_end = False
    checks.append(("the intent's notAfter is the certificate's" if same_end else
                   f"the intent's notAfter ({ends}) is not the certificate's "
                   f"({cert.not_valid_after_utc.isoformat()})", same_end))
    return checks


async def audit_evidence(ca: CA, tree: TreeHead | None, seq: int | None,
                         cert: x509.Certificate, log: str | None = None) -> AuditEvidence:
    """The intent (at the seq the inventory names, in the log `ca` reads: the one the
    inventory names, `log` on a cluster) and outcome lines of this certificate's
    signature, each proven in `tree`, what was verified of that log, and that they are
    about this certificate."""
    found = AuditEvidence()
    of = f" of log {log}" if log else ""  # a cluster's page shows one log's banner
    if seq is None:
        found.problem = ("the inventory does not say where its signature is in the log (it "
                         "was issued before hsmca recorded that)")
        return found
    try:
        got = await proofs.line(ca, tree, seq)
        if got is None:
            found.problem = f"the daemon serves no line {seq}"
            return found
        found.intent, found.intent_proof = got
        intent = found.intent
        serial = format(cert.serial_number, "x")
        # Each check said as it came out (a web view trial read "✗ line 77 is an
        # hsm.sign intent for serial ..." as the opposite of what it meant)
        is_intent = intent.get("event") == "hsm.sign" and intent.get("phase") == "intent" \
            and intent.get("serial") == serial
        found.checks.append((f"line {seq}{of} is an hsm.sign intent for serial {serial}"
                             if is_intent else f"line {seq}{of} is not an hsm.sign intent "
                             f"for serial {serial}", is_intent))
        # What was decided is what was signed: a line about the serial alone could
        # belong to another request.
        found.checks += intent_matches(intent.obj or {}, cert)
        at = await proofs.find_outcome(ca, intent)
        if at is None:
            found.problem = "no outcome line with its op_id follows it"
            found.checks.append(("its outcome is not in the log", False))
            return found
        found.outcome, found.outcome_proof = await proofs.proven(ca, tree, *at)
    except ClientError as exc:
        found.problem = str(exc)
        return found
    outcome = found.outcome
    ok = outcome.get("result") == "ok"
    found.checks.append((f"line {outcome.seq}{of} is its outcome: result ok" if ok else
                         f"line {outcome.seq}{of} is its outcome, and its result is not ok "
                         f"({outcome.get('result')!r})", ok))
    same = outcome.get("fingerprint") == fingerprint(cert)
    found.checks.append(("the outcome's fingerprint is this certificate's SHA-256" if same
                         else "the outcome's fingerprint is not this certificate's SHA-256",
                         same))
    return found

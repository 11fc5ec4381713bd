"""Who may get which names, keys and lifetimes. Pure functions, no I/O.

Every refusal is a `Refused` with a sentence that says what was refused and why,
which the server turns into a 4xx problem+json.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa

from ca.config import Policy

ROLES = ("service", "host", "user", "auditor", "admin")
_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_TTL = re.compile(r"^([1-9][0-9]{0,7})([smhd])$")
_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_BAD_CHARS = re.compile(r"[\x00-\x20\x7f-\x9f,]")
_PRINCIPAL = re.compile(r"^[\x21-\x2b\x2d-\x7e]{1,256}$")  # printable ASCII, no space or comma


class Refused(ValueError):
    """A request asks for something the policy does not allow."""

    def __init__(self, detail: str, status: int = 400, kind: str = "policy") -> None:
        super().__init__(detail)
        self.detail, self.status, self.kind = detail, status, kind


def parse_ttl(text: str, what: str = "ttl") -> int:
    """'90s', '15m', '8h', '30d' -> seconds."""
    m = _TTL.match(text.strip()) if isinstance(text, str) else None
    if not m:
        raise Refused(f"{what} {text!r} is not a duration like 90s, 15m, 8h or 30d")
    return int(m.group(1)) * _TTL_UNITS[m.group(2)]


def _show(name: str) -> str:
    return repr(name if len(name) <= 80 else name[:80] + "...")


def dns_name(name: str, allow_wildcards: bool = False) -> str:
    if not isinstance(name, str) or not name:
        raise Refused("a DNS name must be a non-empty string")
    if _BAD_CHARS.search(name):
        raise Refused(f"name {_show(name)} contains spaces, commas or control characters")
    if not name.isascii():
        try:
            alabel = name.encode("idna").decode()
            hint = f"; use its A-label form {alabel!r}"
        except UnicodeError:
            hint = ""
        raise Refused(f"name {_show(name)} is not ASCII{hint}")
    lowered = name.lower()
    if lowered != name:
        raise Refused(f"name {_show(name)} must be lower case")
    body = lowered
    if body.startswith("*."):
        if not allow_wildcards:
            raise Refused(f"wildcard name {_show(name)} refused: wildcards are not enabled")
        body = body[2:]
    labels = body.split(".")
    if len(body) > 253 or not all(_LABEL.match(lbl) for lbl in labels):
        raise Refused(f"{_show(name)} is not a valid DNS name (labels of a-z, 0-9 and '-', "
                      "at most 63 characters each, no trailing dot)")
    if all(lbl.isdigit() for lbl in labels):
        raise Refused(f"{_show(name)} looks like an IP address; give it as an IP")
    return lowered


def email(addr: str) -> str:
    if not isinstance(addr, str) or addr.count("@") != 1:
        raise Refused(f"{_show(str(addr))} is not an e-mail address (local@domain)")
    local, domain = addr.split("@")
    if not local or _BAD_CHARS.search(local) or not local.isascii() or len(local) > 64:
        raise Refused(f"e-mail {_show(addr)} has an empty, non-ASCII or invalid local part")
    dns_name(domain)
    return addr


def classify(name: str, allow_wildcards: bool = False) -> tuple[str, str]:
    """('dns'|'ip'|'uri'|'email', normalised value)."""
    if not isinstance(name, str):
        raise Refused("every name must be a string")
    return _classify(name, allow_wildcards)


@functools.lru_cache(maxsize=16384)  # renewals classify the same inventory names again
def _classify(name: str, allow_wildcards: bool) -> tuple[str, str]:
    try:
        return "ip", str(ipaddress.ip_address(name))
    except ValueError:
        pass
    if "://" in name:
        if _BAD_CHARS.search(name) or not name.isascii():
            raise Refused(f"URI {_show(name)} contains spaces, commas, control or non-ASCII "
                          "characters")
        parts = urlsplit(name)
        if not parts.scheme or not (parts.netloc or parts.path):
            raise Refused(f"URI {_show(name)} has no scheme or no authority")
        return "uri", name
    if "@" in name:
        return "email", email(name)
    return "dns", dns_name(name, allow_wildcards)


def _matches(kind: str, value: str, pattern: str) -> bool:
    if kind == "ip":
        try:
            return ipaddress.ip_address(value) in ipaddress.ip_network(pattern, strict=False)
        except ValueError:
            return False
    host = value
    if kind == "email":
        host = value.split("@", 1)[1]
    elif kind == "uri":
        host = urlsplit(value).hostname or ""
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern


def check_allowed(names: Iterable[tuple[str, str]], policy: Policy) -> None:
    for kind, value in names:
        if any(_matches(kind, value, p) for p in policy.deny):
            raise Refused(f"name {_show(value)} is on the CA's deny list", 403)
        if policy.allow and not any(_matches(kind, value, p) for p in policy.allow):
            raise Refused(f"name {_show(value)} is outside the CA's allow list "
                          f"({', '.join(policy.allow)})", 403)


def principal(p: str) -> str:
    if not isinstance(p, str) or not _PRINCIPAL.match(p):
        raise Refused(f"principal {_show(str(p))} must be 1-256 printable ASCII characters "
                      "without spaces or commas")
    return p


@dataclass(frozen=True)
class TokenGrant:
    role: str
    names: tuple[tuple[str, str], ...]  # (kind, value)
    principals: tuple[str, ...]
    ttl_s: int


def token_request(body: object, policy: Policy) -> TokenGrant:
    """Validate `{"role", "names", "principals"?, "ttl"}` for POST /v1/tokens."""
    if not isinstance(body, dict):
        raise Refused("the body must be a JSON object")
    unknown = set(body) - {"role", "names", "principals", "ttl"}
    if unknown:
        raise Refused(f"unknown field(s): {', '.join(sorted(unknown))}")
    role = body.get("role")
    if role not in ROLES:
        raise Refused(f"role must be one of {', '.join(ROLES)}")
    raw_names = body.get("names")
    if not isinstance(raw_names, list) or not raw_names or len(raw_names) > 100:
        raise Refused("names must be a list of 1 to 100 names")
    names = tuple(dict.fromkeys(classify(n, policy.allow_wildcards) for n in raw_names))
    kinds = {k for k, _ in names}
    if role in ("service", "host") and "email" in kinds:
        raise Refused(f"a {role} certificate names DNS names, IP addresses or URIs, not e-mail")
    if role == "host" and "dns" not in kinds:
        raise Refused("a host needs at least one DNS name (its SSH principals)")
    if role == "user" and kinds != {"email"}:
        raise Refused("a user's names are e-mail addresses")
    if role in ("auditor", "admin") and (len(names) != 1 or kinds - {"dns", "email"}):
        raise Refused(f"an {role} has exactly one identity: a DNS name or an e-mail address")
    raw_principals = body.get("principals", [])
    if not isinstance(raw_principals, list) or len(raw_principals) > 100:
        raise Refused("principals must be a list of at most 100 logins")
    if raw_principals and role != "user":
        raise Refused("principals are granted to role user only (a host's principals are its "
                      "DNS names)")
    principals = tuple(dict.fromkeys(principal(p) for p in raw_principals))
    ttl = parse_ttl(body.get("ttl", "1h"), "ttl")
    if ttl > policy.token_max_ttl_s:
        raise Refused(f"token ttl {ttl}s exceeds the maximum {policy.token_max_ttl_s}s")
    check_allowed(names, policy)
    return TokenGrant(role, names, principals, ttl)


def check_subject_key(key: object) -> str:
    """Accept EC P-256/P-384, Ed25519, RSA 2048-8192; return a short description."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1 | ec.SECP384R1):
            return f"ec-{key.curve.name}"
        raise Refused(f"EC curve {key.curve.name} is not accepted (use P-256 or P-384)")
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(key, rsa.RSAPublicKey):
        if not 2048 <= key.key_size <= 8192:
            raise Refused(f"RSA key of {key.key_size} bits refused: use 2048 to 8192 bits")
        return f"rsa-{key.key_size}"
    if isinstance(key, dsa.DSAPublicKey):
        raise Refused("DSA keys are not accepted")
    raise Refused(f"key type {type(key).__name__} is not accepted")


# What cryptography raises for DER it cannot make sense of, lazily, when a part of a
# client's CSR (or OCSP request) is first read: none of these may become a 500.
PARSE_ERRORS: tuple[type[Exception], ...] = (
    ValueError, TypeError, UnsupportedAlgorithm, x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType, x509.InvalidVersion)


def check_csr(csr: x509.CertificateSigningRequest) -> None:
    """Signature valid, key acceptable, no CA:TRUE request."""
    try:
        key = csr.public_key()
    except PARSE_ERRORS as exc:
        raise Refused(f"the CSR's public key cannot be read: {exc}") from None
    check_subject_key(key)
    try:
        valid = csr.is_signature_valid
    except PARSE_ERRORS as exc:  # e.g. an unknown algorithm
        raise Refused(f"the CSR's signature cannot be checked: {exc}") from None
    if not valid:
        raise Refused("the CSR's signature does not verify (was it made with this key?)")
    try:
        bc = csr.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return
    except PARSE_ERRORS as exc:  # e.g. an x400Address in its SAN, validly signed
        raise Refused(f"the CSR's extensions cannot be parsed: {exc}") from None
    if bc.ca:
        raise Refused("the CSR asks for a CA certificate (BasicConstraints CA:TRUE); this CA "
                      "issues leaf certificates only")


def csr_names(csr: x509.CertificateSigningRequest) -> list[str]:
    """Names the CSR asks for (SAN), as strings; the CN is not used."""
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    except PARSE_ERRORS as exc:
        raise Refused(f"the CSR's SAN extension cannot be parsed: {exc}") from None
    out: list[str] = []
    for gn in san:
        if isinstance(gn, x509.IPAddress):
            out.append(str(gn.value))
        elif isinstance(gn, x509.DNSName | x509.RFC822Name | x509.UniformResourceIdentifier):
            out.append(gn.value)
        else:
            raise Refused(f"the CSR asks for a {type(gn).__name__} name, which this CA does "
                          "not issue")
    return out


def names_within(requested: Sequence[str], granted: Sequence[tuple[str, str]],
                 allow_wildcards: bool = False) -> tuple[tuple[str, str], ...]:
    """The requested names, each of which must be granted; none asked means all granted."""
    if not requested:
        return tuple(granted)
    granted_set = set(granted)
    out = []
    for n in requested:
        c = classify(n, allow_wildcards)
        if c not in granted_set:
            raise Refused(f"name {_show(n)} is not among the names this credential may get "
                          f"({', '.join(v for _, v in granted)})", 403)
        out.append(c)
    return tuple(dict.fromkeys(out))

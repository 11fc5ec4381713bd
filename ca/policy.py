"""The rules the registration authority (ca/ra.py) applies: names, keys, lifetimes,
principals. Pure functions, no I/O.

Every refusal is a `Refused` with a typed `Reason` (which the server maps to a
status and a problem type) and a sentence that says what was refused and why.

Name patterns (allow and deny lists, `[policy]` in hsmca.toml): `example.com`
matches that name exactly; `*.example.com` matches every name below it. In a deny
list, `*.example.com` also matches `example.com` itself (denying a subtree denies
its apex: what is denied must not slip through on the bare domain); in an allow
list it does not (allowing `*.example.com` grants the subtree, not its owner's
name). A CIDR matches IP addresses; e-mail addresses and URIs match on their host.
The allow list bounds what the fleet gets (roles service, host and user); the deny
list and the CA's own names bind every role, the operators' own too.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from ca.decimal_text import is_decimal

ROLES = ("service", "host", "user", "auditor", "admin")
_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
# One unit or several, largest first, each once: 90s, 8h, 1h30m, 2d12h (an SSH trial's
# `--ttl 1h30m` was refused). At most 8 digits each.
_TTL = re.compile(r"^(?:([0-9]{1,8})d)?(?:([0-9]{1,8})h)?(?:([0-9]{1,8})m)?"
                  r"(?:([0-9]{1,8})s)?\Z")
_BAD_CHARS = re.compile(r"[\x00-\x20\x7f-\x9f,]")
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = re.compile(rf"{_ATOM}(?:\.{_ATOM})*")
# \Z, not $: "$" also matches before a final newline, and "alice\n" is no principal.
_PRINCIPAL = re.compile(r"^[\x21-\x2b\x2d-\x7e]{1,256}\Z")  # printable ASCII, no space or comma
# RFC 3986 with no userinfo: scheme "://" host [":" port] path-abempty ["?" query] ["#" frag]
_URI = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<host>\[[0-9a-f:.]+\]|[a-z0-9.-]+)"
                  r"(?::(?P<port>[0-9]{1,5}))?(?P<rest>[/?#][\x21-\x7e]*)?$")
_URI_REST_OK = re.compile(r"^[A-Za-z0-9\-._~!$&'()*+,;=:@/?#%\[\]]*\Z")
# The one RSA public exponent accepted (as Boulder does): a huge exponent makes every
# check of a signature by the key cost up to 150 times more (a cheap denial of service).
RSA_EXPONENT = 65537


class Reason(enum.Enum):
    """Why a request is refused: (HTTP status, problem type)."""

    MALFORMED = (400, "bad-request")
    BAD_CSR = (400, "bad-csr")
    BAD_KEY = (400, "bad-key")
    BAD_NAME = (400, "bad-name")
    LIFETIME = (400, "lifetime-too-long")
    NAME_DENIED = (403, "name-denied")
    NAME_NOT_ALLOWED = (403, "name-not-allowed")
    NAME_RESERVED = (403, "name-reserved")
    NAME_NOT_GRANTED = (403, "name-not-granted")
    PRINCIPAL_NOT_GRANTED = (403, "principal-not-granted")
    WRONG_ROLE = (403, "wrong-role")
    REVOKED_KEY = (403, "revoked-key")
    REVOKED = (403, "revoked-certificate")
    REASON_NOT_ALLOWED = (403, "revocation-reason-not-allowed")
    NOT_FOUND = (404, "not-found")
    CONFLICT = (409, "conflict")
    TOKEN_SPENT = (401, "token-spent")  # a spent token's retry not answered again
    # ACME's own kinds of refusal (mapped to urn:ietf:params:acme:error:* at the edge)
    UNSUPPORTED_IDENTIFIER = (400, "unsupported-identifier")
    ORDER_NOT_READY = (403, "order-not-ready")
    UNAUTHORIZED = (403, "unauthorized")
    # (ACME answers it 400 alreadyRevoked, RFC 8555 7.6; the API 409, as a conflict
    # with the state the certificate is in, with a type a client can branch on)
    ALREADY_REVOKED = (409, "already-revoked")

    @property
    def status(self) -> int:
        return self.value[0]

    @property
    def type(self) -> str:
        return self.value[1]


class Refused(ValueError):
    """A request asks for something the policy does not allow."""

    def __init__(self, detail: str, reason: Reason = Reason.MALFORMED, *,
                 subproblems: tuple[tuple[str, Reason, str], ...] = (),
                 operator_detail: str | None = None) -> None:
        super().__init__(detail)
        self.detail, self.reason = detail, reason
        # What only the CA's operator is told (logged, never answered): the rule that
        # refused, when the requester may not learn the CA's lists
        self.operator_detail = operator_detail
        # ("type:value", reason, detail) of each of several identifiers refused at once
        # (ACME's subproblems, RFC 8555 6.7.1)
        self.subproblems = subproblems


@dataclass(frozen=True)
class Policy:
    allow: tuple[str, ...] = ()  # DNS patterns ("*.internal.example", "example.com") and CIDRs
    deny: tuple[str, ...] = ()
    reserved: tuple[str, ...] = ()  # the CA's own names: never in a certificate it issues
    allow_wildcards: bool = False
    x509_default_ttl_s: int = 24 * 3600
    x509_max_ttl_s: int = 30 * 24 * 3600
    ssh_user_default_ttl_s: int = 16 * 3600
    ssh_user_max_ttl_s: int = 24 * 3600
    ssh_host_ttl_s: int = 30 * 24 * 3600
    ssh_user_extensions: tuple[str, ...] = (
        "permit-X11-forwarding", "permit-agent-forwarding", "permit-port-forwarding",
        "permit-pty", "permit-user-rc")
    token_max_ttl_s: int = 7 * 24 * 3600


def settings(policy: Policy) -> dict[str, Any]:
    """The policy's settings by their names in the config file, lists as lists. The
    CA's reserved names are left out: they follow [server], each node's own."""
    values = {f.name: getattr(policy, f.name) for f in dataclasses.fields(Policy)
              if f.name != "reserved"}
    return {name.replace("_", "-"): list(v) if isinstance(v, tuple) else v
            for name, v in values.items()}


# The extensions OpenSSH knows (PROTOCOL.certkeys); any other must be name@domain, a
# vendor's own, which sshd ignores: a misspelt one would quietly take a right away.
SSH_USER_EXTENSIONS = frozenset({
    "no-touch-required", "permit-X11-forwarding", "permit-agent-forwarding",
    "permit-port-forwarding", "permit-pty", "permit-user-rc"})


def name_pattern(text: str) -> str:
    """An allow or deny list entry as the config gives it: a CIDR or an IP address, or
    a DNS name with an optional leading `*.`; Refused says what is wrong with it."""
    try:
        ipaddress.ip_network(text, strict=False)
        return text
    except ValueError:
        pass
    if "/" in text:  # no DNS name has one
        raise Refused(f"{_show(text)} is not a CIDR (like 10.0.0.0/8 or fd00::/8)",
                      Reason.BAD_NAME)
    return dns_name(text, allow_wildcards=True)


def ssh_extension(name: str) -> str:
    if name in SSH_USER_EXTENSIONS or (
            "@" in name and _PRINCIPAL.match(name) and not name.startswith("@")):
        return name
    close = difflib.get_close_matches(name, sorted(SSH_USER_EXTENSIONS), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise Refused(f"{_show(name)} is not an SSH certificate extension OpenSSH knows ({hint}"
                  f"known: {', '.join(sorted(SSH_USER_EXTENSIONS))}; a vendor's own is "
                  "name@domain)", Reason.BAD_NAME)


def parse_ttl(text: object, what: str = "ttl") -> int:
    """'90s', '15m', '8h', '30d', '1h30m' -> seconds."""
    m = _TTL.match(text.strip()) if isinstance(text, str) and text.strip() else None
    if m:
        seconds = sum(int(n) * size for n, size in zip(m.groups(), (86400, 3600, 60, 1),
                                                       strict=True) if n is not None)
        if seconds > 0:
            return seconds
    if isinstance(text, int | float) and not isinstance(text, bool):
        like = f'"{text}s", ' if isinstance(text, int) and text > 0 else ""
        raise Refused(f"{what} {text!r} is a number: give a duration as a string with its "
                      f"unit, like {like}15m, 8h or 30d")
    if m or (isinstance(text, str) and re.fullmatch(r"\s*-\s*[0-9]+\s*[smhd]\s*", text)):
        raise Refused(f"{what} {text!r} must be more than 0 (a duration like 90s, 15m, 8h or "
                      "30d)")
    if isinstance(text, str) and re.fullmatch(r"\s*-?[0-9]+\s*", text):  # `--ttl 0`, `--ttl 90`
        raise Refused(f"{what} {text!r} has no unit: give a duration more than 0 like 90s, "
                      "15m, 8h or 30d")
    raise Refused(f"{what} {text!r} is not a duration like 90s, 15m, 8h, 30d or 1h30m")


def show_ttl(seconds: int) -> str:
    """Seconds as the largest unit parse_ttl takes that divides them: 86400 -> '1d'."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _show(name: str) -> str:
    return repr(name if len(name) <= 80 else name[:80] + "...")


def dns_name(name: str, allow_wildcards: bool = False) -> str:
    if not isinstance(name, str) or not name:
        raise Refused("a DNS name must be a non-empty string", Reason.BAD_NAME)
    if _BAD_CHARS.search(name):
        raise Refused(f"name {_show(name)} contains spaces, commas or control characters",
                      Reason.BAD_NAME)
    if not name.isascii():
        try:
            alabel = name.encode("idna").decode()
            hint = f"; use its A-label form {alabel!r}"
        except UnicodeError:
            hint = ""
        raise Refused(f"name {_show(name)} is not ASCII{hint}", Reason.BAD_NAME)
    lowered = name.lower()
    if lowered != name:
        raise Refused(f"name {_show(name)} must be lower case", Reason.BAD_NAME)
    body = lowered
    if body.startswith("*."):
        if not allow_wildcards:
            raise Refused(f"wildcard name {_show(name)} refused: wildcards are not enabled "
                          "([policy] allow-wildcards)", Reason.BAD_NAME)
        body = body[2:]
    labels = body.split(".")
    if len(lowered) > 253:
        raise Refused(f"{_show(name)} is {len(lowered)} characters long: a DNS name is at "
                      "most 253", Reason.BAD_NAME)
    if not all(_LABEL.match(lbl) for lbl in labels):
        raise Refused(f"{_show(name)} is not a valid DNS name (labels of a-z, 0-9 and '-', "
                      "at most 63 characters each, no trailing dot)", Reason.BAD_NAME)
    if _is_number(labels[-1]):
        # A last label that is a number makes the whole name an IPv4 address to
        # inet_aton, resolvers and browsers (WHATWG URL): 0x7f.1 is 127.0.0.1, 10.1 is
        # 10.0.0.1. As a name it would slip past the CIDR rules of the deny list.
        raise Refused(f"{_show(name)} looks like an IP address (its last label is a "
                      "number, which software reads as IPv4: 0x7f.1 is 127.0.0.1)"
                      f"{AS_IP}", Reason.BAD_NAME)
    for lbl in labels:
        if lbl.startswith("xn--"):
            try:  # an A-label must decode (the standard library's IDNA codec)
                lbl.encode().decode("idna")
            except UnicodeError:
                raise Refused(f"{_show(name)}: {lbl!r} is not a valid A-label (punycode of "
                              "an internationalised name)", Reason.BAD_NAME) from None
    return lowered


AS_IP = "; give an IP as an IP"  # the advice for a name asked for; not for the CA's own


def _is_number(label: str) -> bool:
    """Decimal, or hexadecimal with 0x: the labels inet_aton reads as numbers."""
    if label.startswith("0x"):
        return all(c in "0123456789abcdef" for c in label[2:])
    return is_decimal(label)


def email(addr: str) -> str:
    """An e-mail address as names in the inventory may hold it: one that cryptography
    puts in a certificate (a web view trial's token for `a+<i>@x.example` made every
    enrollment a 500). New names are held to RFC 5321's dot-atom (`new_email`, at token
    creation); this looser rule stays, so that a certificate named before that still
    renews (a review: `first..last@x.example` could not)."""
    if not isinstance(addr, str) or addr.count("@") != 1:
        raise Refused(f"{_show(str(addr))} is not an e-mail address (local@domain)",
                      Reason.BAD_NAME)
    local, domain = addr.split("@")
    if not local or _BAD_CHARS.search(local) or not local.isascii() or len(local) > 64:
        raise Refused(f"e-mail {_show(addr)} has an empty, non-ASCII or invalid local part",
                      Reason.BAD_NAME)
    dns_name(domain)
    try:
        x509.RFC822Name(addr)
    except ValueError:
        raise Refused(f"e-mail {_show(addr)} cannot be put in a certificate: its local "
                      "part must be letters, digits, dots and !#$%&'*+/=?^_`{|}~-",
                      Reason.BAD_NAME) from None
    return addr


def new_email(addr: str) -> str:
    """An e-mail address a new token may name: `email`, with a local part that is RFC
    5321's dot-atom (no quoted local parts, no <>()[]:;"\\, no leading, trailing or
    doubled dots), which every mail and TLS stack reads alike."""
    email(addr)
    if not _DOT_ATOM.fullmatch(addr.split("@")[0]):
        raise Refused(f"e-mail {_show(addr)}: its local part must be letters, digits, "
                      "dots (not first, last or two in a row) and !#$%&'*+/=?^_`{|}~- "
                      "(RFC 5321's dot-atom; quoted local parts are not taken)",
                      Reason.BAD_NAME)
    return addr


MAX_URI = 2048


def uri(name: str) -> str:
    """An RFC 3986 URI with a host and no userinfo: parsers that disagree about where
    the host of `https://a\\@b/` ends must not make an allow list say yes."""
    if _BAD_CHARS.search(name) or not name.isascii() or "\\" in name:
        raise Refused(f"URI {_show(name)} contains spaces, commas, backslashes, control or "
                      "non-ASCII characters", Reason.BAD_NAME)
    if len(name) > MAX_URI:
        raise Refused(f"URI {_show(name)} is longer than {MAX_URI} characters (SPIFFE's limit)",
                      Reason.BAD_NAME)
    m = _URI.match(name)
    if m is None or not _URI_REST_OK.match(m.group("rest") or ""):
        raise Refused(f"URI {_show(name)} is not scheme://host[:port][/path] (lower-case scheme "
                      "and host, no user@ part)", Reason.BAD_NAME)
    host = m.group("host")
    if host.startswith("["):
        try:
            address = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise Refused(f"URI {_show(name)} has an invalid IPv6 host", Reason.BAD_NAME) from None
        _not_mapped(address, name)
    else:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            dns_name(host)
    if m.group("port") and not 0 < int(m.group("port")) < 65536:
        raise Refused(f"URI {_show(name)} has an invalid port", Reason.BAD_NAME)
    return name


def uri_host(value: str) -> str:
    m = _URI.match(value)
    host = m.group("host") if m else ""
    return host[1:-1] if host.startswith("[") else host


def ip(name: str) -> str | None:
    """The normalised address, None if `name` is not an IP address; a scoped IPv6
    address (fe80::1%eth0) is refused: its zone means nothing to anyone else."""
    try:
        addr = ipaddress.ip_address(name)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id is not None:
            raise Refused(f"{_show(name)} is a scoped IPv6 address; give it without its %zone",
                          Reason.BAD_NAME)
        _not_mapped(addr, name)
    return str(addr)


def _not_mapped(addr: ipaddress.IPv6Address, name: str) -> None:
    """An IPv4-mapped IPv6 address (::ffff:10.9.9.9) is refused: Go and others match it
    to the IPv4 address it maps, which an IPv4 allow or deny list never saw."""
    if addr.ipv4_mapped is not None:
        raise Refused(f"{_show(name)} is an IPv4-mapped IPv6 address; give the IPv4 address "
                      f"({addr.ipv4_mapped}) itself", Reason.BAD_NAME)


def classify(name: str, allow_wildcards: bool = False) -> tuple[str, str]:
    """('dns'|'ip'|'uri'|'email', normalised value)."""
    if not isinstance(name, str):
        raise Refused("every name must be a string", Reason.BAD_NAME)
    return _classify(name, allow_wildcards)


def lookup_kind(name: str) -> str | None:
    """What kind of name `name` reads as ('dns', 'ip', ...), or None if none."""
    try:
        return lookup(name)[0]
    except Refused:
        return None


def lookup(name: str) -> tuple[str, str]:
    """`classify`, for finding what was issued to a name (`revoke --identity`): an
    IPv4-mapped IPv6 address, or a DNS name whose last label is a number, is refused
    for new certificates, but ones issued before that carry it must still be found, by
    the form they were stored in."""
    try:
        return classify(name, True)
    except Refused:
        mapped = _mapped_address(name)
        if mapped is not None:
            return "ip", mapped
        labels = name.split(".") if isinstance(name, str) else []
        if labels and all(_LABEL.match(lbl) for lbl in labels) and _is_number(labels[-1]):
            return "dns", name
        raise


def _mapped_address(name: str) -> str | None:
    try:
        addr = ipaddress.ip_address(name)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr)
    return None


@functools.lru_cache(maxsize=16384)  # renewals classify the same inventory names again
def _classify(name: str, allow_wildcards: bool) -> tuple[str, str]:
    address = ip(name)
    if address is not None:
        return "ip", address
    if "://" in name:
        return "uri", uri(name)
    if "@" in name:
        return "email", email(name)
    return "dns", dns_name(name, allow_wildcards)


def _host(kind: str, value: str) -> str:
    if kind == "email":
        return value.split("@", 1)[1]
    if kind == "uri":
        return uri_host(value)
    return value


def _matches(kind: str, value: str, pattern: str, apex: bool) -> bool:
    """Whether a name matches a pattern; `apex`: `*.x` matches `x` too (deny lists)."""
    host = _host(kind, value)
    try:
        network = ipaddress.ip_network(pattern, strict=False)
    except ValueError:
        network = None
    if network is not None:
        try:
            return ipaddress.ip_address(host) in network
        except ValueError:
            return False
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) or (apex and host == pattern[2:])
    return host == pattern


def _covers(kind: str, value: str, pattern: str) -> bool:
    """Whether the wildcard `value` (`*.w`) is valid for a name `pattern` names: the
    pattern's name (without its `*.`) is one label below w. `*.internal.example` is
    valid for `secret.internal.example`, so the deny rule `*.secret.internal.example`
    (which denies that name too) and the CA's own name `ca.internal.example` refuse it;
    `_matches` alone compares the wildcard as a suffix and misses that."""
    if kind != "dns" or not value.startswith("*."):
        return False
    head, _, below = pattern.removeprefix("*.").partition(".")
    return bool(head) and below == value[2:]


FLEET_ROLES = ("service", "host", "user")
# Roles whose certificates are client credentials only (EKU clientAuth, no serverAuth):
# people and operators. An auditor named with a DNS name (which [policy] allow does not
# bind: it binds the fleet) made a certificate a relying party took as that name's TLS
# server (a security review).
CLIENT_ONLY_ROLES = frozenset({"user", "auditor", "admin"})


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """Whether a DNS name matches one of `patterns` as an allow list reads them
    (`*.x` matches the names below x, not x itself)."""
    return any(_matches("dns", name, p, apex=False) for p in patterns)


def check_allowed(names: Iterable[tuple[str, str]], policy: Policy,
                  role: str = "service", *, reveal: bool = True) -> None:
    """Every name is outside the deny list and the CA's own names, and, for the fleet's
    roles, inside the allow list when there is one; the refusal names the rule, or,
    with `reveal` false (a requester outside the fleet: an ACME account), says only
    that the policy refuses it and leaves the rule to the operator's log, since the
    lists name the CA's internal domains."""
    fleet = role in FLEET_ROLES

    def refused(value: str, rule: str, reason: Reason) -> Refused:
        if reveal:
            return Refused(f"name {_show(value)} {rule}", reason)
        return Refused(f"name {_show(value)} is refused by this CA's name policy; ask "
                       "the CA's operator which names you may order", reason,
                       operator_detail=f"name {_show(value)} {rule}")

    for kind, value in names:
        for p in policy.deny:
            if _matches(kind, value, p, apex=True) or _covers(kind, value, p):
                raise refused(value, f"is denied by the rule {p!r} of the CA's deny list "
                              "([policy] deny)", Reason.NAME_DENIED)
        for p in policy.reserved:
            if _matches(kind, value, p, apex=False) or (
                    not p.startswith("*.") and _covers(kind, value, p)):
                raise Refused(f"name {_show(value)} is one of the CA's own names; no "
                              "certificate for it is issued to anyone else",
                              Reason.NAME_RESERVED)
        if fleet and policy.allow and not any(_matches(kind, value, p, apex=False)
                                              for p in policy.allow):
            hint = ""
            if kind in ("email", "uri"):  # (an operator's trial added the address itself)
                hint = (f"; {'e-mail names' if kind == 'email' else 'URIs'} match on their "
                        f"host: allowing {_host(kind, value)!r} allows this one")
            raise refused(value, "is outside the CA's allow list ([policy] allow = "
                          f"{', '.join(policy.allow)}){hint}", Reason.NAME_NOT_ALLOWED)


def principal(p: object) -> str:
    if not isinstance(p, str) or not _PRINCIPAL.match(p):
        raise Refused(f"principal {_show(str(p))} must be 1-256 printable ASCII characters "
                      "without spaces or commas", Reason.BAD_NAME)
    return p


def is_pattern(p: str) -> bool:
    return any(c in p for c in "*?!")


def login(p: object) -> str:
    """A user principal: a login name, never a pattern."""
    p = principal(p)
    if is_pattern(p):
        # An SSH trial's `--principal '*'` was taken, and read as "any login": sshd
        # compares a certificate's principals with the login literally, so it grants
        # nothing, and nobody should think it does.
        raise Refused(f"principal {_show(p)} has a pattern character (*, ? or !): sshd "
                      "takes a certificate's principals literally, not as patterns, so it "
                      "would grant no login; give each login by its name", Reason.BAD_NAME)
    return p


def check_subject_key(key: object) -> str:
    """Accept EC P-256/P-384, Ed25519, RSA 2048-8192 with e = 65537; return a short
    description."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1 | ec.SECP384R1):
            return f"ec-{key.curve.name}"
        raise Refused(f"EC curve {key.curve.name} is not accepted (use P-256 or P-384)",
                      Reason.BAD_KEY)
    if isinstance(key, ed25519.Ed25519PublicKey):
        check_ed25519(key)
        return "ed25519"
    if isinstance(key, rsa.RSAPublicKey):
        check_rsa(key, 2048, 8192)
        return f"rsa-{key.key_size}"
    if isinstance(key, dsa.DSAPublicKey):
        raise Refused("DSA keys are not accepted", Reason.BAD_KEY)
    raise Refused(f"key type {type(key).__name__.removesuffix('PublicKey')} is not accepted "
                  "(use EC P-256 or P-384, Ed25519, or RSA of 2048 to 8192 bits)",
                  Reason.BAD_KEY)


def check_ed25519(key: ed25519.Ed25519PublicKey) -> None:
    """Refuse an Ed25519 "key" anyone can sign for (ca/ed25519_points.py)."""
    from ca.ed25519_points import weakness
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if (why := weakness(raw)) is not None:
        raise Refused(f"this Ed25519 public key {why}: generate a key pair (ssh-keygen -t "
                      "ed25519, openssl genpkey -algorithm ED25519)", Reason.BAD_KEY)


def check_rsa(key: rsa.RSAPublicKey, min_bits: int, max_bits: int) -> None:
    if not min_bits <= key.key_size <= max_bits:
        raise Refused(f"RSA key of {key.key_size} bits refused: use {min_bits} to {max_bits} "
                      "bits", Reason.BAD_KEY)
    e = key.public_numbers().e
    if e != RSA_EXPONENT:
        shown = e if e.bit_length() <= 64 else f"of {e.bit_length()} bits"
        raise Refused(f"RSA key with public exponent {shown} refused: use 65537 (what every "
                      "key generator makes)", Reason.BAD_KEY)


# What cryptography raises for DER it cannot make sense of, lazily, when a part of a
# client's CSR (or OCSP request) is first read: none of these may become a 500.
PARSE_ERRORS: tuple[type[Exception], ...] = (
    ValueError, TypeError, UnsupportedAlgorithm, x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType, x509.InvalidVersion)


_ASN1_ERROR = re.compile(r"error parsing asn1 value: ParseError \{ kind: (\w+)")


def parse_error(exc: Exception) -> str:
    """Why cryptography could not read a client's DER or PEM, in words: its ASN.1 errors
    come as Rust debug text (`ParseError { kind: UnexpectedTag { actual: Tag {...`)."""
    text = str(exc)
    m = _ASN1_ERROR.match(text)
    if m:
        kind = re.sub(r"(?<!^)([A-Z])", r" \1", m.group(1)).lower()
        return f"its DER is not valid ASN.1 ({kind})"
    if text.startswith("Unable to load PEM file"):
        return "its PEM block does not hold valid base64 DER"
    return text[:200]


def check_csr(csr: x509.CertificateSigningRequest) -> None:
    """Signature valid, key acceptable, no CA:TRUE request."""
    if csr.public_key_algorithm_oid == x509.oid.PublicKeyAlgorithmOID.RSASSA_PSS:
        # Read as a plain RSA key, it was certified as one: the certificate dropped the
        # key's restriction to PSS, and its holder's TLS library refused the pair (a
        # relying-party trial; RFC 4055 3.1).
        raise Refused("an RSA-PSS key (id-RSASSA-PSS) is not accepted: the certificate "
                      "would name it as a plain RSA key; make an RSA key (openssl genpkey "
                      "-algorithm RSA) or an EC one", Reason.BAD_KEY)
    try:
        key = csr.public_key()
    except PARSE_ERRORS as exc:
        raise Refused(f"the CSR's public key cannot be read: {parse_error(exc)}",
                      Reason.BAD_CSR) from None
    check_subject_key(key)
    try:
        digest = csr.signature_hash_algorithm
    except PARSE_ERRORS:
        digest = None  # Ed25519 has none; an unknown one is refused just below
    if isinstance(digest, hashes.SHA1 | hashes.MD5):
        # OpenSSL refuses to check it, which read as "does not verify (was it made with
        # this key?)" and sent an API client after the wrong bug.
        raise Refused(f"the CSR is signed with {digest.name.upper()}, which is not accepted: "
                      "sign it with SHA-256 (openssl req -sha256)", Reason.BAD_CSR)
    try:
        valid = csr.is_signature_valid
    except PARSE_ERRORS as exc:  # e.g. an unknown algorithm
        raise Refused(f"the CSR's signature cannot be checked: {parse_error(exc)}",
                      Reason.BAD_CSR) from None
    if not valid:
        raise Refused("the CSR's signature does not verify (was it made with this key?)",
                      Reason.BAD_CSR)
    try:
        extensions = csr.extensions
    except PARSE_ERRORS as exc:  # e.g. an x400Address in its SAN, validly signed
        raise Refused(f"the CSR's extensions cannot be parsed: {parse_error(exc)}",
                      Reason.BAD_CSR) from None
    if any(isinstance(e.value, x509.TLSFeature) for e in extensions):
        # A CSR's extensions are not copied; issuing without it would hand the client a
        # certificate it did not ask for, silently (certbot --must-staple).
        raise Refused("the CSR asks for OCSP Must-Staple (a TLS Feature extension), which "
                      "this CA does not put in certificates: ask without it (certbot: "
                      "leave out --must-staple)", Reason.BAD_CSR)
    try:
        bc = extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return
    if bc.ca:
        raise Refused("the CSR asks for a CA certificate (BasicConstraints CA:TRUE); this CA "
                      "issues leaf certificates only", Reason.BAD_CSR)


def csr_names(csr: x509.CertificateSigningRequest) -> list[str]:
    """Names the CSR asks for (SAN), as strings; the CN is not used."""
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    except PARSE_ERRORS as exc:
        raise Refused(f"the CSR's SAN extension cannot be parsed: {parse_error(exc)}",
                      Reason.BAD_CSR) from None
    out: list[str] = []
    for gn in san:
        kind = _SAN_KINDS.get(type(gn))
        if kind is None:
            raise Refused(f"the CSR asks for a {type(gn).__name__} name, which this CA does "
                          "not issue", Reason.BAD_CSR)
        value = str(gn.value)
        # A name is issued as the kind it reads as: one asked as another kind (an e-mail
        # address 'svc.example', a DNS name '10.0.0.5') was issued as what it read as,
        # and the client got a kind it did not ask for (a security review).
        reads_as = lookup_kind(value)
        if reads_as is not None and reads_as != kind:
            raise Refused(f"the CSR asks for {_show(value)} as {_KIND_WORDS[kind]}, but it is "
                          f"{_KIND_WORDS[reads_as]}; ask for it as one (subjectAltName "
                          f"{_SAN_PREFIX[reads_as]}:{value})", Reason.BAD_NAME)
        out.append(value)
    return out


_SAN_KINDS: dict[type, str] = {x509.DNSName: "dns", x509.IPAddress: "ip",
                               x509.RFC822Name: "email", x509.UniformResourceIdentifier: "uri"}
_KIND_WORDS = {"dns": "a DNS name", "ip": "an IP address", "email": "an e-mail address",
               "uri": "a URI"}
_SAN_PREFIX = {"dns": "DNS", "ip": "IP", "email": "email", "uri": "URI"}


def common_names_within(csr: x509.CertificateSigningRequest,
                        granted: Sequence[tuple[str, str]]) -> None:
    """For a CSR without a SAN, which gets the names granted: its CN, if it names
    something (a DNS name with a dot, an IP address, an e-mail address), must be one of
    them. An EST trial's device B, handed device A's token, asked for CN=b.example and
    got a certificate for a.example without a word; a SAN asking that is refused. A CN
    that names nothing (a serial number, a bare host label) is not read."""
    try:
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except PARSE_ERRORS:
        return  # the subject is not read at all (the CA writes its own)
    for attribute in cns:
        value = str(attribute.value).strip()
        try:
            kind, name = classify(value)
        except Refused:
            try:  # a DNS name in capitals (only a DNS name: an e-mail's local part and a
                # URI's path keep their case, a review's Alice@example.com was refused)
                kind, name = classify(value.lower())
            except Refused:
                continue
            if kind != "dns":
                continue
        if kind == "dns" and "." not in name:
            continue
        if (kind, name) not in set(granted):
            raise Refused(f"the CSR's common name {_show(name)} is not among the names this "
                          f"credential may get ({', '.join(v for _, v in granted)}): without "
                          "a subjectAltName the certificate gets those names; leave the CN "
                          "out, or ask for a token for it", Reason.NAME_NOT_GRANTED)


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
                          f"({', '.join(v for _, v in granted)})", Reason.NAME_NOT_GRANTED)
        out.append(c)
    return tuple(dict.fromkeys(out))

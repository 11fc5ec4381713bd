"""The registration authority decides every request, by the policy in force now:
one test per path and rule, without a daemon (ca/ra.py is pure)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from ca import policy, ra, ssh
from ca.policy import Policy, Reason

NOW = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.UTC)
ISSUER_EXPIRES = NOW + dt.timedelta(days=365)


class Directory:
    previous_root: str | None = None  # a root rotation's hand-over under way

    def x509_issuer(self) -> str:
        return "issuing-ca"

    def x509_not_after(self, issuer: str) -> dt.datetime:
        assert issuer == "issuing-ca"
        return ISSUER_EXPIRES

    def ssh_issuer(self, cert_type: str) -> str:
        return f"ssh-{cert_type}-ca"

    def root_issuer(self) -> str:
        return "root-ca"

    def ssh_ca_key(self, line: str) -> tuple[str, str] | None:
        return ("ssh-user-ca", "user") if line == CA_SSH_KEY.line else None

    def x509_signs_for(self, issuer: str | None) -> str | None:
        # "issuing-ca" and an older "issuing-ca-1" still sign; "issuing-ca-0" is retired.
        return {None: "issuing-ca", "issuing-ca": "issuing-ca",
                "issuing-ca-1": "issuing-ca-1"}.get(issuer)

    def crl_labels(self) -> list[str]:
        return ["issuing-ca", "issuing-ca-1", "root-ca",
                *([self.previous_root] if self.previous_root else [])]


def context(policy: Policy | None = None, revoked_keys: frozenset[str] = frozenset()
            ) -> ra.Context:
    return ra.Context(policy or Policy(), NOW, Directory(), revoked_keys.__contains__)


def holder(role: str, names: tuple[str, ...], principals: tuple[str, ...] = (),
           key: Any = None) -> ra.CertHolder:
    key = key or ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ca")]))
            .public_key(key.public_key()).serial_number(0x1234)
            .not_valid_before(NOW).not_valid_after(NOW + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return ra.CertHolder("1234", "f" * 64, f"CN={names[0]}", role, names, principals,
                         cert.public_bytes(serialization.Encoding.DER))


def admin() -> ra.CertHolder:
    return holder("admin", ("admin.localhost",))


def token(role: str, names: tuple[tuple[str, str], ...],
          principals: tuple[str, ...] = ()) -> ra.TokenHolder:
    return ra.TokenHolder("t1", role, names, principals)


def csr(*names: str, key: Any = None) -> x509.CertificateSigningRequest:
    key = key or ec.generate_private_key(ec.SECP256R1())
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names:
        b = b.add_extension(x509.SubjectAlternativeName([_san(n) for n in names]),
                            critical=False)
    return b.sign(key, hashes.SHA256())


def _san(name: str) -> x509.GeneralName:
    """A name as the kind it reads as (as ca.client.make_csr asks)."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def ssh_key() -> ssh.SSHPublicKey:
    line = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return ssh.parse_public_key(line)


def refused(decision: object, reason: Reason, *words: str) -> None:
    assert isinstance(decision, ra.Refusal), decision
    assert decision.reason is reason, decision
    for w in words:
        assert w in decision.detail, decision.detail


CA_SSH_KEY = ssh_key()  # the CA's own user CA key, as Directory has it
ALLOW = Policy(allow=("*.internal.example", "10.0.0.0/8"))
DENY = Policy(deny=("*.secret.internal.example", "bad.internal.example"))

# ---- tokens ------------------------------------------------------------------------------------


def test_a_token_grant_is_a_decision_with_every_name_normalised() -> None:
    grant = ra.decide(context(ALLOW), admin(), ra.TokenRequest(
        "service", ["svc.internal.example", "10.1.2.3"], [], "15m"))
    assert isinstance(grant, ra.TokenGrant)
    assert grant.names == (("dns", "svc.internal.example"), ("ip", "10.1.2.3"))
    assert grant.ttl_s == 900 and grant.actor == admin().actor
    # A login pattern is granted no more than it is asked for (sshd takes it literally)
    refused(ra.decide(context(), admin(), ra.TokenRequest(
        "user", ["dave@example.com"], ["*"], "15m")), Reason.BAD_NAME, "pattern character")


@pytest.mark.parametrize("name, reason, words", [
    ("x.other.example", Reason.NAME_NOT_ALLOWED, ("allow list", "*.internal.example")),
    ("internal.example", Reason.NAME_NOT_ALLOWED, ("allow list",)),  # the apex is not allowed
    ("192.168.1.1", Reason.NAME_NOT_ALLOWED, ("allow list",)),
    ("https://a.other.example/x", Reason.NAME_NOT_ALLOWED,
     ("URIs match on their host: allowing 'a.other.example' allows this one",)),
    # an operator's trial put the address itself in the list, which refuses it
    ("bob@example.com", Reason.NAME_NOT_ALLOWED,
     ("e-mail names match on their host: allowing 'example.com' allows this one",)),
])
def test_the_allow_list(name: str, reason: Reason, words: tuple[str, ...]) -> None:
    role = "user" if "@" in name else "service"
    refused(ra.decide(context(ALLOW), admin(), ra.TokenRequest(role, [name])),
            reason, *words)


@pytest.mark.parametrize("name", ["a.secret.internal.example", "secret.internal.example",
                                  "bad.internal.example", "svc@secret.internal.example",
                                  "spiffe://secret.internal.example/ns/x"])
def test_the_deny_list_names_its_rule_and_covers_the_apex(name: str) -> None:
    role = "user" if "@" in name else "service"
    refused(ra.decide(context(DENY), admin(), ra.TokenRequest(role, [name])),
            Reason.NAME_DENIED, "deny list", "rule")


def test_names_beside_a_denied_subtree_are_fine() -> None:
    assert isinstance(ra.decide(context(DENY), admin(), ra.TokenRequest(
        "service", ["notsecret.internal.example", "good.internal.example"])), ra.TokenGrant)


def test_wildcards_only_when_configured() -> None:
    refused(ra.decide(context(), admin(), ra.TokenRequest("service", ["*.w.example"])),
            Reason.BAD_NAME, "wildcards are not enabled")
    ok = ra.decide(context(Policy(allow_wildcards=True)), admin(),
                   ra.TokenRequest("service", ["*.w.example"]))
    assert isinstance(ok, ra.TokenGrant) and ok.names == (("dns", "*.w.example"),)


def test_a_wildcard_valid_for_a_denied_or_reserved_name_is_refused() -> None:
    """`*.internal.example` is valid for `secret.internal.example`, which the deny rule
    `*.secret.internal.example` denies, and for the CA's own `ca.internal.example`: a
    service holding it could answer as either (security review). Wildcards that cover
    neither are granted."""
    pol = dataclasses.replace(DENY, allow_wildcards=True, reserved=("ca.pki.example",))
    for name, reason in (("*.internal.example", Reason.NAME_DENIED),  # secret.internal...
                         ("*.secret.internal.example", Reason.NAME_DENIED),
                         ("*.x.secret.internal.example", Reason.NAME_DENIED),
                         ("*.pki.example", Reason.NAME_RESERVED)):
        refused(ra.decide(context(pol), admin(), ra.TokenRequest("service", [name])), reason)
    for name in ("*.other.example", "*.web.internal.example", "*.ca.pki.example"):
        assert isinstance(ra.decide(context(pol), admin(), ra.TokenRequest("service", [name])),
                          ra.TokenGrant), name


def test_an_acme_certificate_is_not_renewed_over_mutual_tls() -> None:
    """Renewed over mTLS, a certificate issued to an ACME account would outlive the
    account and its name patterns, at any lifetime (security review)."""
    acme = dataclasses.replace(holder("service", ("web.internal.example",)),
                               acme_order="order-1")
    refused(ra.decide(context(ALLOW), acme, ra.RenewRequest()), Reason.WRONG_ROLE,
            "issued over ACME", "certbot renew")


@pytest.mark.parametrize("name, words", [
    ("https://evil.example\\@a.internal.example/", ("backslash",)),
    ("https://user@a.internal.example/", ("user@",)),
    ("fe80::1%eth0", ("scoped",)),
    # Go's VerifyHostname("10.9.9.9") accepts a certificate for ::ffff:10.9.9.9: an IPv4
    # deny list must not be stepped around by the mapped form (security review).
    ("::ffff:10.9.9.9", ("IPv4-mapped", "10.9.9.9")),
    ("::ffff:0a09:0909", ("IPv4-mapped", "10.9.9.9")),
    ("https://[::ffff:10.9.9.9]/", ("IPv4-mapped",)),
    ("Svc.internal.example", ("lower case",)),
    ("bücher.example", ("A-label", "xn--")),
    # inet_aton, resolvers and browsers read these as IPv4 (10.0.0.1, 127.0.0.1): as DNS
    # names they passed the CIDR rules of a deny list (security review).
    ("0xa.0.0.1", ("looks like an IP address",)),
    ("0x7f.1", ("looks like an IP address",)),
    ("a.internal.0x7f000001", ("looks like an IP address",)),
    ("svc.internal.1", ("looks like an IP address",)),
    # A URI as long as the body allows made a token.create line longer than an audit
    # line may be (security review).
    ("spiffe://a.internal.example/" + "x" * 2030, ("longer than 2048",)),
    # Every label is fine; the whole is one character too long, and is said so (an ACME
    # trial was told about labels of 63 characters).
    (".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 45]) + ".internal.example",
     ("254 characters long", "at most 253")),
])
def test_names_that_parsers_could_read_two_ways_are_refused(name: str,
                                                            words: tuple[str, ...]) -> None:
    refused(ra.decide(context(ALLOW), admin(), ra.TokenRequest("service", [name])),
            Reason.BAD_NAME, *words)


def test_the_allow_list_bounds_the_fleet_and_the_deny_list_everyone() -> None:
    """An operator's own identity (admin, auditor) is not a fleet name: an allow list for
    the services does not lock the admin out of renewing; a deny list does."""
    for role in ("admin", "auditor"):
        who = holder(role, (f"{role}.localhost",))
        assert isinstance(ra.decide(context(ALLOW), who, ra.RenewRequest()), ra.X509Order)
        refused(ra.decide(context(Policy(deny=(f"{role}.localhost",))), who,
                          ra.RenewRequest()), Reason.NAME_DENIED)


def test_the_cas_own_names_are_reserved() -> None:
    pol = Policy(reserved=("ca.internal.example",))
    refused(ra.decide(context(pol), admin(), ra.TokenRequest("service", ["ca.internal.example"])),
            Reason.NAME_RESERVED)


def test_only_an_admin_grants_tokens_and_only_for_so_long() -> None:
    refused(ra.decide(context(), holder("service", ("s.example",)),
                      ra.TokenRequest("service", ["x.example"])), Reason.WRONG_ROLE, "admin")
    refused(ra.decide(context(Policy(token_max_ttl_s=3600)), admin(),
                      ra.TokenRequest("service", ["x.example"], [], "2h")), Reason.LIFETIME)


# ---- enrollment and renewal ------------------------------------------------------------------


def test_enrollment_is_bounded_by_the_token_and_the_policy() -> None:
    t = token("service", (("dns", "svc.internal.example"), ("dns", "b.internal.example")))
    order = ra.decide(context(ALLOW), t, ra.EnrollRequest(csr("svc.internal.example")))
    assert isinstance(order, ra.X509Order)
    assert order.names == (("dns", "svc.internal.example"),) and order.token_id == "t1"
    assert order.issuer == "issuing-ca" and order.not_before == NOW - ra.BACKDATE
    assert order.not_after == NOW + dt.timedelta(hours=24)
    refused(ra.decide(context(ALLOW), t, ra.EnrollRequest(csr("other.internal.example"))),
            Reason.NAME_NOT_GRANTED)
    # A name granted yesterday and denied today is refused at enrollment too.
    refused(ra.decide(context(Policy(deny=("svc.internal.example",))), t,
                      ra.EnrollRequest(csr("svc.internal.example"))), Reason.NAME_DENIED)


def test_renewal_rechecks_the_names_against_the_lists_in_force_now() -> None:
    svc = holder("service", ("svc.internal.example",))
    assert isinstance(ra.decide(context(ALLOW), svc, ra.RenewRequest()), ra.X509Order)
    refused(ra.decide(context(Policy(deny=("svc.internal.example",))), svc, ra.RenewRequest()),
            Reason.NAME_DENIED, "svc.internal.example")
    refused(ra.decide(context(Policy(allow=("*.elsewhere.example",))), svc, ra.RenewRequest()),
            Reason.NAME_NOT_ALLOWED)


def test_wildcards_turned_off_reach_renewals_and_ssh_host_certificates() -> None:
    """A wildcard granted while wildcards were on does not renew, nor become an SSH host
    principal, once they are off."""
    svc = holder("service", ("*.w.example", "svc.w.example"))
    on = context(Policy(allow_wildcards=True))
    order = ra.decide(on, svc, ra.RenewRequest())
    assert isinstance(order, ra.X509Order) and ("dns", "*.w.example") in order.names
    refused(ra.decide(context(), svc, ra.RenewRequest()), Reason.BAD_NAME,
            "*.w.example", "wildcards are not enabled")
    host = holder("host", ("*.w.example", "web.w.example"))
    order = ra.decide(context(), host, ra.SSHHostRequest(ssh_key()))
    assert isinstance(order, ra.SSHOrder) and order.principals == ("web.w.example",)
    refused(ra.decide(context(), host, ra.SSHHostRequest(ssh_key(), ["*.w.example"])),
            Reason.PRINCIPAL_NOT_GRANTED, "a wildcard is no SSH host principal")
    # A host named only by a wildcard is told why it gets no principal (an SSH trial).
    only = holder("host", ("*.w.example",))
    refused(ra.decide(context(), only, ra.SSHHostRequest(ssh_key())),
            Reason.PRINCIPAL_NOT_GRANTED, "are wildcards: a wildcard is no SSH host principal")


def test_a_certificate_for_the_cas_own_ssh_key_is_refused() -> None:
    """A security trial: POST /v1/ssh/user (and host) with the user CA's own public key,
    from /v1/ssh/ca, had it certified. No one can use such a certificate, and the
    key is the CA's: refused, saying to give one's own key."""
    for who, request in ((holder("user", ("ann@example.com",), ("ann",)),
                          ra.SSHUserRequest(CA_SSH_KEY)),
                         (holder("host", ("web.example",)), ra.SSHHostRequest(CA_SSH_KEY))):
        refused(ra.decide(context(), who, request), Reason.BAD_KEY,
                f"the public key {CA_SSH_KEY.sha256} is one of this CA's own SSH CA keys")
        assert isinstance(ra.decide(context(), who, type(request)(ssh_key())), ra.SSHOrder)


def test_a_wildcard_is_never_an_ssh_host_principal() -> None:
    """A security trial: with wildcards on, a host enrolled as *.prod.w.example got it as
    its host certificate's principal, which OpenSSH 9.2 matched with no host name at
    all; a client matching it as a pattern would take it for db.eu.prod.w.example, which
    the policy denies (X.509's wildcard covers one label)."""
    on = context(Policy(allow_wildcards=True, deny=("db.eu.prod.w.example",)))
    host = holder("host", ("*.prod.w.example", "web.prod.w.example"))
    order = ra.decide(on, host, ra.SSHHostRequest(ssh_key()))
    assert isinstance(order, ra.SSHOrder) and order.principals == ("web.prod.w.example",)
    refused(ra.decide(on, host, ra.SSHHostRequest(ssh_key(), ["*.prod.w.example"])),
            Reason.PRINCIPAL_NOT_GRANTED, "principal *.prod.w.example: a wildcard is no SSH "
            "host principal (OpenSSH matches a host certificate's principals with the exact "
            "name the user typed)")
    refused(ra.decide(on, holder("host", ("*.prod.w.example",)),
                      ra.SSHHostRequest(ssh_key())),
            Reason.PRINCIPAL_NOT_GRANTED, "are wildcards: a wildcard is no SSH host principal",
            "enroll the host with its own names")


def test_renewal_keeps_the_presented_key_unless_a_csr_brings_a_new_one() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    svc = holder("service", ("svc.example",), key=key)
    order = ra.decide(context(), svc, ra.RenewRequest())
    assert isinstance(order, ra.X509Order) and order.subject.public_key == key.public_key()
    new = ec.generate_private_key(ec.SECP256R1())
    order = ra.decide(context(), svc, ra.RenewRequest(csr(key=new)))
    assert isinstance(order, ra.X509Order) and order.subject.public_key == new.public_key()


def test_a_small_order_ed25519_key_certified_before_is_not_renewed() -> None:
    """Certified before the CA refused them, it would renew for good over mutual TLS,
    anyone's with a copy of the certificate (a review): the presented key is checked
    again, and a new key in a CSR is the way on."""
    from cryptography.hazmat.primitives.asymmetric import ed25519
    signer = ec.generate_private_key(ec.SECP256R1())
    identity = ed25519.Ed25519PublicKey.from_public_bytes(bytes([1]) + bytes(31))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "svc.example")]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ca")]))
            .public_key(identity).serial_number(0x1234)
            .not_valid_before(NOW).not_valid_after(NOW + dt.timedelta(days=1))
            .sign(signer, hashes.SHA256()))
    svc = ra.CertHolder("1234", "f" * 64, "CN=svc.example", "service", ("svc.example",), (),
                        cert.public_bytes(serialization.Encoding.DER))
    refused(ra.decide(context(), svc, ra.RenewRequest()), Reason.BAD_KEY, "small order")
    order = ra.decide(context(), svc, ra.RenewRequest(csr("svc.example")))
    assert isinstance(order, ra.X509Order)


def test_a_rekey_csr_names_the_certificates_names_or_none() -> None:
    svc = holder("service", ("svc.example", "10.0.0.7"))
    for names in (("svc.example", "10.0.0.7"), ("10.0.0.7", "SVC.example"), ()):
        assert isinstance(ra.decide(context(), svc, ra.RenewRequest(csr(*names))),
                          ra.X509Order), names
    refused(ra.decide(context(), svc, ra.RenewRequest(csr("svc.example", "more.example"))),
            Reason.BAD_CSR, "a renewal keeps the certificate's names (svc.example, 10.0.0.7)")
    refused(ra.decide(context(), svc, ra.RenewRequest(csr("svc.example"))), Reason.BAD_CSR)


def test_lifetime_caps_apply_now() -> None:
    svc = holder("service", ("svc.example",))
    pol = Policy(x509_max_ttl_s=3600, x509_default_ttl_s=86400)
    order = ra.decide(context(pol), svc, ra.RenewRequest())
    assert isinstance(order, ra.X509Order) and order.not_after == NOW + dt.timedelta(hours=1)
    refused(ra.decide(context(pol), svc, ra.RenewRequest(ttl="2h")), Reason.LIFETIME,
            "the maximum of 1h", "x509-max-ttl-s")
    # What a lifetime that is no duration gets: what is wrong with it.
    for ttl, words in (("0s", "must be more than 0"), ("-1h", "must be more than 0"),
                       (600, 'is a number: give a duration as a string with its unit, like '
                        '"600s"'), ("10x", "is not a duration like 90s"),
                       ("0", "'0' has no unit: give a duration more than 0"),
                       ("90", "'90' has no unit"), ("0h0m", "must be more than 0"),
                       ("30m1h", "is not a duration like 90s, 15m, 8h, 30d or 1h30m"),
                       ("1.5h", "is not a duration")):
        refused(ra.decide(context(pol), svc, ra.RenewRequest(ttl=ttl)),  # type: ignore[arg-type]
                Reason.MALFORMED, words)
    # Several units, largest first (an SSH trial's `--ttl 1h30m` was refused).
    order = ra.decide(context(Policy()), svc, ra.RenewRequest(ttl="1h30m"))
    assert isinstance(order, ra.X509Order) and order.not_after == NOW + dt.timedelta(
        hours=1, minutes=30)
    # No leaf outlives its issuer.
    long = Policy(x509_max_ttl_s=10 * 365 * 86400)
    order = ra.decide(context(long), svc, ra.RenewRequest(ttl="3000d"))
    assert isinstance(order, ra.X509Order) and order.not_after == ISSUER_EXPIRES


def rsa_with_exponent(e: int) -> rsa.RSAPrivateKey:
    """A 2048-bit RSA key with public exponent `e` (cryptography generates only 3 and
    65537): the primes of a fresh key, with `e` where it is invertible."""
    while True:
        numbers = rsa.generate_private_key(65537, 2048).private_numbers()
        p, q = numbers.p, numbers.q
        try:
            d = pow(e, -1, (p - 1) * (q - 1))
        except ValueError:  # e shares a factor with (p-1)(q-1): other primes
            continue
        return rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p),
                                     rsa.RSAPublicNumbers(e, p * q)).private_key()


@pytest.mark.parametrize("make, words", [
    (lambda: rsa.generate_private_key(3, 2048), ("exponent 3",)),
    # Above 65537 too: a 2047-bit e made every signature check 40 times as costly.
    (lambda: rsa_with_exponent(65539), ("exponent 65539", "use 65537")),
    (lambda: rsa.generate_private_key(65537, 1024), ("1024 bits",)),
    (lambda: ec.generate_private_key(ec.SECP521R1()), ("secp521r1",)),
])
def test_key_policy(make: Any, words: tuple[str, ...]) -> None:
    t = token("service", (("dns", "svc.example"),))
    refused(ra.decide(context(), t, ra.EnrollRequest(csr("svc.example", key=make()))),
            Reason.BAD_KEY, *words)


def test_key_types_not_accepted_are_refused_saying_which_are(tmp_path: Any) -> None:
    """A relying-party trial enrolled an RSA-PSS key: read as a plain RSA key, it was
    certified as one, and its holder's TLS library refused the pair (RFC 4055 3.1). An
    Ed448 key's refusal named no type that is accepted."""
    import subprocess

    from tests.conftest import require
    openssl = require("openssl")
    subprocess.run([openssl, "genpkey", "-algorithm", "RSA-PSS", "-pkeyopt",
                    "rsa_keygen_bits:2048", "-out", tmp_path / "pss.key"], check=True,
                   capture_output=True)
    subprocess.run([openssl, "req", "-new", "-key", tmp_path / "pss.key", "-subj",
                    "/CN=svc.example", "-addext", "subjectAltName=DNS:svc.example", "-out",
                    tmp_path / "pss.csr"], check=True, capture_output=True)
    pss = x509.load_pem_x509_csr((tmp_path / "pss.csr").read_bytes())
    t = token("service", (("dns", "svc.example"),))
    refused(ra.decide(context(), t, ra.EnrollRequest(pss)), Reason.BAD_KEY,
            "RSA-PSS key (id-RSASSA-PSS) is not accepted")
    from cryptography.hazmat.primitives.asymmetric import ed448
    ed = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
          .add_extension(x509.SubjectAlternativeName([x509.DNSName("svc.example")]),
                         critical=False)
          .sign(ed448.Ed448PrivateKey.generate(), None))
    refused(ra.decide(context(), t, ra.EnrollRequest(ed)), Reason.BAD_KEY,
            "key type Ed448 is not accepted (use EC P-256 or P-384, Ed25519")


def test_enrollment_needs_a_token_and_renewal_a_certificate() -> None:
    refused(ra.decide(context(), holder("service", ("s.example",)), ra.EnrollRequest(csr())),
            Reason.WRONG_ROLE)
    refused(ra.decide(context(), token("service", (("dns", "s.example"),)), ra.RenewRequest()),
            Reason.WRONG_ROLE)


# ---- SSH --------------------------------------------------------------------------------------


def test_ssh_host_principals_are_the_hosts_names_and_addresses_checked_now() -> None:
    host = holder("host", ("web1.internal.example", "10.0.0.5"))
    order = ra.decide(context(ALLOW), host, ra.SSHHostRequest(ssh_key()))
    assert isinstance(order, ra.SSHOrder)
    # (`ssh 10.0.0.5` checks the address: an SSH trial was refused one it was enrolled
    # with, "not granted; allowed: web1...")
    assert order.principals == ("web1.internal.example", "10.0.0.5")
    assert order.issuer == "ssh-host-ca" and order.identity == "web1.internal.example"
    order = ra.decide(context(ALLOW), host, ra.SSHHostRequest(ssh_key(), ["10.0.0.5"]))
    assert isinstance(order, ra.SSHOrder) and order.principals == ("10.0.0.5",)
    refused(ra.decide(context(Policy(deny=("10.0.0.0/8",))), host,
                      ra.SSHHostRequest(ssh_key(), ["10.0.0.5"])), Reason.NAME_DENIED)
    refused(ra.decide(context(ALLOW), host,
                      ra.SSHHostRequest(ssh_key(), ["web2.internal.example"])),
            Reason.PRINCIPAL_NOT_GRANTED)
    refused(ra.decide(context(Policy(deny=("web1.internal.example",))), host,
                      ra.SSHHostRequest(ssh_key())), Reason.NAME_DENIED)
    refused(ra.decide(context(), holder("service", ("s.example",)), ra.SSHHostRequest(ssh_key())),
            Reason.WRONG_ROLE, "host")


def test_a_certificate_issued_with_a_mapped_address_is_still_found_and_its_host_served(
        ) -> None:
    """IPv4-mapped IPv6 names are refused from now on; one issued before must still be
    revocable by its identity, and its host still get SSH certificates for its DNS
    names (review of the change that refused them)."""
    old = holder("host", ("web1.internal.example", "::ffff:a09:909"))
    order = ra.decide(context(), old, ra.SSHHostRequest(ssh_key()))
    assert isinstance(order, ra.SSHOrder) and order.principals == ("web1.internal.example",)
    revoke = ra.decide(context(), admin(), ra.RevokeIdentityRequest("::ffff:10.9.9.9"))
    assert isinstance(revoke, ra.RevokeOrder) and revoke.identity == "::ffff:a09:909"
    refused(ra.decide(context(), old, ra.RenewRequest()), Reason.BAD_NAME, "IPv4-mapped")


def test_ssh_user_principals_lifetime_and_revoked_keys() -> None:
    alice = holder("user", ("alice@example.com",), ("alice", "deploy"))
    pol = Policy(ssh_user_default_ttl_s=3600, ssh_user_max_ttl_s=7200)
    order = ra.decide(context(pol), alice, ra.SSHUserRequest(ssh_key(), ["alice"]))
    assert isinstance(order, ra.SSHOrder)
    assert order.principals == ("alice",) and order.valid_before - order.valid_after == 3660
    assert order.identity == "alice@example.com" and order.owner_serial == "1234"
    refused(ra.decide(context(pol), alice, ra.SSHUserRequest(ssh_key(), ["root"])),
            Reason.PRINCIPAL_NOT_GRANTED, "root")
    # A pattern is no login: sshd compares principals literally (an SSH trial's '*' was
    # taken, and read as "any login")
    for pattern in ("*", "dep?oy", "!root"):
        refused(ra.decide(context(pol), alice, ra.SSHUserRequest(ssh_key(), [pattern])),
                Reason.BAD_NAME, "pattern character")
    # ...nor carried from a grant made before patterns were refused
    old_grant = dataclasses.replace(alice, principals=("alice", "*"))
    order = ra.decide(context(pol), old_grant, ra.SSHUserRequest(ssh_key()))
    assert isinstance(order, ra.SSHOrder) and order.principals == ("alice",)
    refused(ra.decide(context(pol), alice, ra.SSHUserRequest(ssh_key(), None, "3h")),
            Reason.LIFETIME, "the maximum of 2h")
    # A maximum that is no whole number of hours is said as it is (it was "0h").
    half = Policy(ssh_user_default_ttl_s=1200, ssh_user_max_ttl_s=1800)
    refused(ra.decide(context(half), alice, ra.SSHUserRequest(ssh_key(), None, "45m")),
            Reason.LIFETIME, "the maximum of 30m for user certificates")
    # A login removed from the grant (here: a renewed record without it) is refused.
    fewer = dataclasses.replace(alice, principals=("alice",))
    refused(ra.decide(context(pol), fewer, ra.SSHUserRequest(ssh_key(), ["deploy"])),
            Reason.PRINCIPAL_NOT_GRANTED)
    # A person whose token granted no login is told what to do (an SSH trial: a bare 403)
    none = dataclasses.replace(alice, principals=())
    refused(ra.decide(context(pol), none, ra.SSHUserRequest(ssh_key())),
            Reason.PRINCIPAL_NOT_GRANTED, "ask an admin for a token that grants them")
    key = ssh_key()
    refused(ra.decide(context(pol, frozenset({key.line})), alice, ra.SSHUserRequest(key)),
            Reason.REVOKED_KEY)
    refused(ra.decide(context(Policy(deny=("example.com",))), alice, ra.SSHUserRequest(key)),
            Reason.NAME_DENIED)


# ---- revocation and CRLs ----------------------------------------------------------------------


@pytest.mark.parametrize("given, name", [
    ("keyCompromise", "keyCompromise"), ("key_compromise", "keyCompromise"),
    (1, "keyCompromise"), ("superseded", "superseded"), (0, None), ("unspecified", None),
    (None, None),
])
def test_revocation_reasons_in_every_spelling(given: object, name: str | None) -> None:
    svc = holder("service", ("s.example",))
    order = ra.decide(context(), svc, ra.RevokeRequest(0x1234, given))
    assert isinstance(order, ra.RevokeOrder) and order.reason == name


def test_a_holder_may_not_claim_what_only_an_admin_knows() -> None:
    svc = holder("service", ("s.example",))
    refused(ra.decide(context(), svc, ra.RevokeRequest(0x1234, "privilegeWithdrawn")),
            Reason.REASON_NOT_ALLOWED, "is for an admin")
    assert isinstance(ra.decide(context(), admin(), ra.RevokeRequest(0x1234,
                                                                     "privilegeWithdrawn")),
                      ra.RevokeOrder)


@pytest.mark.parametrize("given", ["cACompromise", "ca_compromise", 2, "aACompromise", 10])
def test_a_leaf_is_never_revoked_for_a_ca_s_reasons(given: object) -> None:
    # pkilint's BR profile flags them on a leaf's CRL entry (a relying-party trial)
    for who in (holder("service", ("s.example",)), admin()):
        refused(ra.decide(context(), who, ra.RevokeRequest(0x1234, given)),
                Reason.REASON_NOT_ALLOWED, "a reason for revoking a CA's certificate")
    refused(ra.decide(context(), admin(), ra.RevokeIdentityRequest("s.example", given)),
            Reason.REASON_NOT_ALLOWED, "keyCompromise if this certificate's own key leaked")


@pytest.mark.parametrize("given", ["removeFromCRL", 8, 99, True])
def test_an_unknown_reason_is_told_the_reasons_a_certificate_is_revoked_for(
        given: object) -> None:
    # A relying-party trial: the list named cACompromise, certificateHold and
    # aACompromise, each then refused for a leaf
    decision = ra.decide(context(), admin(), ra.RevokeRequest(0x1234, given))
    refused(decision, Reason.MALFORMED, "unspecified, keyCompromise, affiliationChanged, "
            "superseded, cessationOfOperation, privilegeWithdrawn")
    assert isinstance(decision, ra.Refusal)
    for named in ("cACompromise", "certificateHold", "aACompromise"):
        assert named not in decision.detail, decision.detail
    # A holder is offered a holder's (privilegeWithdrawn is an admin's: a review)
    held = ra.decide(context(), holder("service", ("s.example",)), ra.RevokeRequest(
        0x1234, given))
    assert isinstance(held, ra.Refusal) and "privilegeWithdrawn" not in held.detail, held
    assert "cessationOfOperation" in held.detail, held


def test_certificate_hold_is_never_offered_and_others_are_for_admins() -> None:
    for who in (holder("service", ("s.example",)), admin()):
        refused(ra.decide(context(), who, ra.RevokeRequest(0x1234, "certificateHold")),
                Reason.REASON_NOT_ALLOWED, "certificateHold is not offered")
    refused(ra.decide(context(), holder("service", ("s.example",)), ra.RevokeRequest(0x99)),
            Reason.WRONG_ROLE)
    refused(ra.decide(context(), admin(), ra.RevokeRequest(0x99, found=False)), Reason.NOT_FOUND)
    # A certificate the inventory lacks, given itself (after a restore): an admin's only,
    # and only one this CA's keys signed; one given that is not the inventory's of its
    # serial is refused
    own = holder("service", ("s.example",))
    refused(ra.decide(context(), own, ra.RevokeRequest(
        int(own.serial, 16), found=False, given=True, proven=True)),
        Reason.WRONG_ROLE, "only an admin may revoke a certificate the inventory")
    refused(ra.decide(context(), admin(), ra.RevokeRequest(0x99, found=False, given=True)),
            Reason.NOT_FOUND, "not signed by any issuing key this CA uses")
    refused(ra.decide(context(), admin(), ra.RevokeRequest(0x99, given=True, matches=False)),
            Reason.CONFLICT, "is another one than the one given")
    assert isinstance(ra.decide(context(), admin(), ra.RevokeRequest(
        0x99, found=False, given=True, proven=True)), ra.RevokeOrder)
    refused(ra.decide(context(), admin(), ra.RevokeRequest(0x99, revoked=True)),
            Reason.ALREADY_REVOKED, "only keyCompromise may be given again")
    refused(ra.decide(context(), admin(), ra.RevokeRequest(
        0x99, "keyCompromise", revoked=True, revoked_reason="keyCompromise")),
        Reason.ALREADY_REVOKED)
    again = ra.decide(context(), admin(), ra.RevokeRequest(
        0x99, "keyCompromise", revoked=True, revoked_reason="cessationOfOperation"))
    assert isinstance(again, ra.RevokeOrder) and again.lineage
    refused(ra.decide(context(), admin(), ra.RevokeRequest(0x99, "nonsense")), Reason.MALFORMED)


def test_ssh_revocation_is_for_admins_and_needs_a_match_unless_it_bans_a_key() -> None:
    for role, principals in (("user", ("alice",)), ("host", ())):
        refused(ra.decide(context(), holder(role, ("h.example",), principals),
                          ra.SSHRevokeRequest(serial=7, matching=1)), Reason.WRONG_ROLE, "admin")
    # not "was issued by this CA": one issued after the backup the CA was restored from
    # is revoked by its key (a restore trial)
    refused(ra.decide(context(), admin(), ra.SSHRevokeRequest(serial=7)), Reason.NOT_FOUND,
            "no SSH certificate with serial 7 is in this CA's inventory",
            "after the backup it was restored from", "`hsmca ssh revoke --pubkey FILE`")
    refused(ra.decide(context(), admin(), ra.SSHRevokeRequest(key_id="bob:1")), Reason.NOT_FOUND,
            "'bob:1'")
    # the identity alone, as a key id (an SSH trial, from the help's example): said how
    refused(ra.decide(context(), admin(), ra.SSHRevokeRequest(key_id="bob@example.com")),
            Reason.NOT_FOUND, "a key id is <identity>:<serial>: `hsmca ssh list --search "
            "bob@example.com` lists", "`hsmca revoke --identity bob@example.com`")
    # A retry, told apart from a typo (an API client's trial).
    refused(ra.decide(context(), admin(), ra.SSHRevokeRequest(serial=7, revoked=1)),
            Reason.ALREADY_REVOKED, "serial 7 is already revoked")
    order = ra.decide(context(), admin(), ra.SSHRevokeRequest(key_id="bob:1", matching=2))
    assert order == ra.SSHRevokeOrder(None, "bob:1", None, admin().actor)
    # A key is banned in the KRL itself, whether or not a certificate was issued for it.
    key = ssh_key()
    order = ra.decide(context(), ra.Local(), ra.SSHRevokeRequest(public_key=key))
    assert isinstance(order, ra.SSHRevokeOrder) and order.public_key == key


def test_crls_are_ordered_by_the_ca_itself() -> None:
    order = ra.decide(context(), ra.Local(), ra.CRLRequest())
    assert isinstance(order, ra.CRLOrder) and order.issuer == "issuing-ca"
    assert order.this_update == NOW - ra.BACKDATE and order.next_update == NOW + ra.CRL_VALIDITY
    refused(ra.decide(context(), admin(), ra.CRLRequest()), Reason.WRONG_ROLE)
    # The root signs one for the CA certificates it issued; a retired issuer, none.
    order = ra.decide(context(), ra.Local(), ra.CRLRequest("root-ca"))
    assert isinstance(order, ra.CRLOrder) and order.issuer == "root-ca"
    refused(ra.decide(context(), ra.Local(), ra.CRLRequest("issuing-ca-0")), Reason.NOT_FOUND)


def test_ocsp_responses_are_ordered_by_the_ca_itself_from_the_issuer_that_still_signs(
        ) -> None:
    order = ra.decide(context(), ra.Local(), ra.OCSPRequest("issuing-ca-1"))
    assert isinstance(order, ra.OCSPOrder) and order.issuer == "issuing-ca-1"
    assert order.this_update == NOW - ra.BACKDATE and order.next_update - NOW == ra.OCSP_VALIDITY
    order = ra.decide(context(), ra.Local(), ra.OCSPRequest(None))  # a record from before
    assert isinstance(order, ra.OCSPOrder) and order.issuer == "issuing-ca"
    refused(ra.decide(context(), ra.Local(), ra.OCSPRequest("issuing-ca-0")), Reason.NOT_FOUND,
            "retired")
    refused(ra.decide(context(), admin(), ra.OCSPRequest("issuing-ca")), Reason.WRONG_ROLE)


def test_the_cas_own_certificates_skip_the_lists_but_only_for_the_ca() -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    request = ra.LocalCertRequest("server", key, ("localhost", "127.0.0.1"), dt.timedelta(days=1))
    order = ra.decide(context(ALLOW), ra.Local(), request)
    assert isinstance(order, ra.X509Order) and order.role == "server"
    refused(ra.decide(context(), admin(), request), Reason.WRONG_ROLE)


# ---- ACME ---------------------------------------------------------------------------------

def acme_account(names: tuple[str, ...] = ("*.test",), status: str = "valid",
                 eab: bool = True, key_spki: str = "a" * 64) -> ra.AcmeAccountHolder:
    return ra.AcmeAccountHolder("acct1", status, names, eab, key_spki)


def dns_ids(*names: str) -> list[dict[str, str]]:
    return [{"type": "dns", "value": n} for n in names]


def acme_csr(names: list[str], key: Any = None,
             cn: str | None = None) -> x509.CertificateSigningRequest:
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if names:  # none: a CSR that names its one identifier in the commonName alone
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
    return builder.sign(key, hashes.SHA256())


def finalize(csr: x509.CertificateSigningRequest, names: tuple[str, ...] = ("a.test",),
             status: str = "ready", authz: tuple[str, ...] = ("valid",),
             account: str = "acct1") -> ra.AcmeFinalizeRequest:
    return ra.AcmeFinalizeRequest("o1", account, status, names, authz, csr)


def test_only_an_admin_makes_eab_keys_for_valid_patterns() -> None:
    grant = ra.decide(context(), admin(), ra.AcmeEABRequest(["*.test", "web.example"], "2h"))
    assert isinstance(grant, ra.AcmeEABGrant)
    assert grant.names == ("*.test", "web.example") and grant.ttl_s == 7200
    refused = ra.decide(context(), holder("service", ("a.test",)), ra.AcmeEABRequest(["*.test"]))
    assert isinstance(refused, ra.Refusal) and refused.reason is Reason.WRONG_ROLE
    for bad in ([], ["Bad Name"], ["*.*.test"], "a.test", [7]):
        r = ra.decide(context(), admin(), ra.AcmeEABRequest(bad))
        assert isinstance(r, ra.Refusal), bad
    # An address is told that ACME here takes none (not "give an IP as an IP")
    ip = ra.decide(context(), admin(), ra.AcmeEABRequest(["127.0.0.1"]))
    assert isinstance(ip, ra.Refusal) and "does not issue over ACME" in ip.detail, ip
    long = ra.decide(context(), admin(), ra.AcmeEABRequest(["*.test"], "90d"))
    assert isinstance(long, ra.Refusal) and long.reason is Reason.LIFETIME

    # Names the lists refuse now are said, not refused (an ACME trial's binding for
    # *.forbidden.trial, denied, made every order fail later without a word).
    denied = ra.decide(context(Policy(deny=("*.forbidden.test", "x.example"))), admin(),
                       ra.AcmeEABRequest(["*.forbidden.test", "x.example", "*.fine.test"]))
    assert isinstance(denied, ra.AcmeEABGrant) and len(denied.warnings) == 2, denied
    assert denied.warnings[0].startswith("*.forbidden.test: names like name.forbidden.test "
                                         "are refused by the CA's policy now")
    assert grant.warnings == ()


def test_an_acme_order_is_bounded_by_the_eab_patterns_and_the_lists() -> None:
    grant = ra.decide(context(), acme_account(), ra.AcmeOrderRequest(dns_ids("a.test",
                                                                             "a.test")))
    assert isinstance(grant, ra.AcmeOrderGrant) and grant.names == ("a.test",)
    assert grant.actor == "acme-account:acct1"
    outside = ra.decide(context(), acme_account(), ra.AcmeOrderRequest(dns_ids("evil.example")))
    assert isinstance(outside, ra.Refusal) and outside.reason is Reason.NAME_NOT_GRANTED
    # "*.test" grants the names below test, not test itself
    apex = ra.decide(context(), acme_account(), ra.AcmeOrderRequest(dns_ids("test")))
    assert isinstance(apex, ra.Refusal)
    denied = ra.decide(context(Policy(deny=("*.bad.test",))), acme_account(),
                       ra.AcmeOrderRequest(dns_ids("x.bad.test")))
    assert isinstance(denied, ra.Refusal) and denied.reason is Reason.NAME_DENIED
    not_allowed = ra.decide(context(Policy(allow=("*.ok.test",))), acme_account(),
                            ra.AcmeOrderRequest(dns_ids("x.other.test")))
    assert isinstance(not_allowed, ra.Refusal) and not_allowed.reason is Reason.NAME_NOT_ALLOWED
    # without EAB the lists alone bound the account
    free = ra.decide(context(), acme_account((), eab=False),
                     ra.AcmeOrderRequest(dns_ids("evil.example")))
    assert isinstance(free, ra.AcmeOrderGrant)
    # any case, ordered in lower case (lego sends -d as typed)
    upper = ra.decide(context(), acme_account(), ra.AcmeOrderRequest(dns_ids("A.Test")))
    assert isinstance(upper, ra.AcmeOrderGrant) and upper.names == ("a.test",), upper


def test_no_acme_certificate_for_a_loopback_name() -> None:
    """An ACME trial bound an EAB key to `localhost` and got a certificate for it: its
    validation reached the CA's own host, whose HTTPS certificate bears that name, so
    every client of a CA at https://localhost would have taken its holder for the CA.
    Refused, and the EAB key that can only order such names is warned of."""
    for name in ("localhost", "x.localhost", "*.localhost"):
        r = ra.decide(context(Policy(allow_wildcards=True)), acme_account((), eab=False),
                      ra.AcmeOrderRequest(dns_ids(name)))
        refused(r, Reason.NAME_RESERVED, f"name {name!r} is a loopback name: its "
                "validation would reach the CA's own host")
    grant = ra.decide(context(), admin(), ra.AcmeEABRequest(["localhost", "*.test"]))
    assert isinstance(grant, ra.AcmeEABGrant), grant
    assert [w.split(":")[0] for w in grant.warnings] == ["localhost"], grant.warnings


@pytest.mark.parametrize("identifiers, reason", [
    ([], Reason.MALFORMED), ("a.test", Reason.MALFORMED), (None, Reason.MALFORMED),
    ([{"type": "ip", "value": "10.0.0.1"}], Reason.UNSUPPORTED_IDENTIFIER),
    # An address as a dns identifier (lego --domains 127.0.0.1) was told to "give an IP
    # as an IP", which ACME here cannot: it is told what can.
    (dns_ids("127.0.0.1"), Reason.UNSUPPORTED_IDENTIFIER),
    ([{"type": "dns"}], Reason.MALFORMED), ([{"type": "dns", "value": 5}], Reason.MALFORMED),
    ([{"type": "dns", "value": "a.test", "x": 1}], Reason.MALFORMED),
    ([{"type": "dns", "value": "b\u00fccher.test"}], Reason.BAD_NAME),  # not its A-label
    ([{"type": "dns", "value": "a..test"}], Reason.BAD_NAME),
    ([{"type": "dns", "value": "*.test"}], Reason.BAD_NAME),
    (dns_ids(*[f"n{i}.test" for i in range(101)]), Reason.MALFORMED),
])
def test_bad_acme_identifiers(identifiers: object, reason: Reason) -> None:
    r = ra.decide(context(), acme_account(), ra.AcmeOrderRequest(identifiers))
    assert isinstance(r, ra.Refusal) and r.reason is reason, r
    if reason is Reason.UNSUPPORTED_IDENTIFIER:
        assert "enroll with a bootstrap token" in r.detail, r.detail


def test_an_identifier_of_another_type_is_not_told_about_ip_addresses() -> None:
    r = ra.decide(context(), acme_account(), ra.AcmeOrderRequest(
        [{"type": "email", "value": "a@b.test"}]))
    assert isinstance(r, ra.Refusal) and r.reason is Reason.UNSUPPORTED_IDENTIFIER
    assert r.detail == "identifier type 'email' is not supported (only dns)", r.detail


def test_an_order_replaces_only_the_accounts_own_certificate_for_a_name_it_had() -> None:
    def order(replaced: ra.ReplacedCert) -> object:
        return ra.decide(context(), acme_account(), ra.AcmeOrderRequest(
            dns_ids("a.test"), replaces=replaced))
    grant = order(ra.ReplacedCert("aki.01", "acct1", ("A.test", "b.test")))
    assert isinstance(grant, ra.AcmeOrderGrant) and grant.replaces == "aki.01"
    refused(order(ra.ReplacedCert("aki.01", "acct2", ("a.test",))), Reason.UNAUTHORIZED,
            "not issued to this account")
    refused(order(ra.ReplacedCert("aki.01", None, ("a.test",))), Reason.UNAUTHORIZED)
    refused(order(ra.ReplacedCert("aki.01", "acct1", ("c.test",))), Reason.MALFORMED,
            "shares no identifier")


def test_wildcards_need_the_policy_and_dns01() -> None:
    p = Policy(allow_wildcards=True)
    no_dns = ra.decide(context(p), acme_account(), ra.AcmeOrderRequest(dns_ids("*.a.test")))
    assert isinstance(no_dns, ra.Refusal) and "dns-01" in no_dns.detail
    ok = ra.decide(context(p), acme_account(), ra.AcmeOrderRequest(dns_ids("*.a.test"), True))
    assert isinstance(ok, ra.AcmeOrderGrant)
    exact = ra.decide(context(p), acme_account(("a.test",)),
                      ra.AcmeOrderRequest(dns_ids("*.a.test"), True))
    assert isinstance(exact, ra.Refusal) and exact.reason is Reason.NAME_NOT_GRANTED
    # The pattern *.a.test grants every name a wildcard *.a.test covers, so the
    # wildcard too, without a.test itself.
    own = ra.decide(context(p), acme_account(("*.a.test",)),
                    ra.AcmeOrderRequest(dns_ids("*.a.test"), True))
    assert isinstance(own, ra.AcmeOrderGrant) and own.names == ("*.a.test",)
    assert isinstance(ra.decide(context(p), acme_account(("*.a.test",)), ra.AcmeOrderRequest(
        dns_ids("*.b.test"), True)), ra.Refusal)


def test_a_deactivated_account_and_other_requesters_order_nothing() -> None:
    r = ra.decide(context(), acme_account(status="deactivated"),
                  ra.AcmeOrderRequest(dns_ids("a.test")))
    assert isinstance(r, ra.Refusal) and r.reason is Reason.WRONG_ROLE
    r = ra.decide(context(), admin(), ra.AcmeOrderRequest(dns_ids("a.test")))
    assert isinstance(r, ra.Refusal) and r.reason is Reason.WRONG_ROLE


def test_finalize_decides_everything_again_and_names_the_account() -> None:
    order = ra.decide(context(), acme_account(), finalize(acme_csr(["a.test"], cn="a.test")))
    assert isinstance(order, ra.X509Order), order
    assert order.names == (("dns", "a.test"),) and order.role == "service"
    assert (order.acme_account, order.acme_order) == ("acct1", "o1")
    assert order.not_after == NOW + dt.timedelta(days=1)
    # RFC 8555 7.4: an identifier in the commonName alone will do (an ACME trial's
    # CSR without a SAN was refused); the certificate names it in its SAN all the same.
    order = ra.decide(context(), acme_account(), finalize(acme_csr([], cn="a.test")))
    assert isinstance(order, ra.X509Order) and order.names == (("dns", "a.test"),), order
    # a name denied since the order was placed
    r = ra.decide(context(Policy(deny=("a.test",))), acme_account(),
                  finalize(acme_csr(["a.test"])))
    assert isinstance(r, ra.Refusal) and r.reason is Reason.NAME_DENIED


@pytest.mark.parametrize("req, reason", [
    (finalize(acme_csr(["a.test"]), status="pending"), Reason.ORDER_NOT_READY),
    (finalize(acme_csr(["a.test"]), authz=("valid", "pending"), names=("a.test", "b.test")),
     Reason.ORDER_NOT_READY),
    (finalize(acme_csr(["a.test", "b.test"])), Reason.BAD_CSR),
    (finalize(acme_csr(["b.test"])), Reason.BAD_CSR),
    (finalize(acme_csr(["a.test"], cn="other.test")), Reason.BAD_CSR),
    (finalize(acme_csr([], cn="a.test"), names=("a.test", "b.test"),
              authz=("valid", "valid")), Reason.BAD_CSR),
    (finalize(acme_csr([])), Reason.BAD_CSR),
    (finalize(acme_csr(["a.test"]), account="acct2"), Reason.NOT_FOUND),
    (finalize(acme_csr(["a.test"], key=ec.generate_private_key(ec.SECP224R1()))),
     Reason.BAD_KEY),
])
def test_finalize_refusals(req: ra.AcmeFinalizeRequest, reason: Reason) -> None:
    r = ra.decide(context(), acme_account(), req)
    assert isinstance(r, ra.Refusal) and r.reason is reason, r


def test_the_certificate_key_is_not_the_account_key() -> None:
    from ca.subject import spki_sha256
    key = ec.generate_private_key(ec.SECP256R1())
    r = ra.decide(context(), acme_account(key_spki=spki_sha256(key.public_key())),
                  finalize(acme_csr(["a.test"], key=key)))
    assert isinstance(r, ra.Refusal) and r.reason is Reason.BAD_CSR


def test_acme_revocation_by_the_account_or_the_certificate_key_only() -> None:
    mine = ra.AcmeRevokeRequest(0xabc, 1, owner_account="acct1", spki_sha256="b" * 64)
    order = ra.decide(context(), acme_account(), mine)
    assert isinstance(order, ra.RevokeOrder) and order.reason == "keyCompromise"
    assert order.lineage and order.actor == "acme-account:acct1"
    theirs = dataclasses.replace(mine, owner_account="acct2")
    r = ra.decide(context(), acme_account(), theirs)
    assert isinstance(r, ra.Refusal) and r.reason is Reason.UNAUTHORIZED
    # One the CA issued otherwise (no account owns it) is not an account's to revoke,
    # whatever names it holds, and the refusal says so (an ACME trial was told only
    # "ones whose names it holds valid authorizations for", and held them)
    r = ra.decide(context(), acme_account(), dataclasses.replace(mine, owner_account=None))
    assert isinstance(r, ra.Refusal) and r.reason is Reason.UNAUTHORIZED
    assert "issued over ACME" in r.detail and "with its own key" in r.detail, r.detail
    by_key = ra.decide(context(), ra.CertKeyHolder("b" * 64), theirs)
    assert isinstance(by_key, ra.RevokeOrder)
    wrong_key = ra.decide(context(), ra.CertKeyHolder("c" * 64), theirs)
    assert isinstance(wrong_key, ra.Refusal) and wrong_key.reason is Reason.UNAUTHORIZED
    # RFC 8555 7.6: a code RFC 5280 lacks is as unsupported as one not offered.
    for reason, why in ((6, Reason.REASON_NOT_ALLOWED), (9, Reason.REASON_NOT_ALLOWED),
                        (7, Reason.REASON_NOT_ALLOWED), (99, Reason.REASON_NOT_ALLOWED)):
        r = ra.decide(context(), acme_account(), dataclasses.replace(mine, reason=reason))
        assert isinstance(r, ra.Refusal) and r.reason is why, reason
    again = ra.decide(context(), acme_account(), dataclasses.replace(
        mine, revoked=True, revoked_reason="keyCompromise"))
    assert isinstance(again, ra.Refusal) and again.reason is Reason.ALREADY_REVOKED
    # Revoked for another reason: it may become keyCompromise, and nothing else.
    upgraded = ra.decide(context(), acme_account(), dataclasses.replace(
        mine, revoked=True, revoked_reason="superseded"))
    assert isinstance(upgraded, ra.RevokeOrder) and upgraded.lineage
    r = ra.decide(context(), acme_account(), dataclasses.replace(
        mine, reason=4, revoked=True, revoked_reason=None))
    assert isinstance(r, ra.Refusal) and r.reason is Reason.ALREADY_REVOKED
    unknown = ra.decide(context(), acme_account(), dataclasses.replace(mine, found=False))
    assert isinstance(unknown, ra.Refusal) and unknown.reason is Reason.UNAUTHORIZED


# ---- the CA's own CA certificates (init, key and root rotation) ----------------------------

def root_cert(key: Any, cn: str = "hsmca Root CA", days: int = 3650,
              not_after: dt.datetime | None = None) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(NOW - dt.timedelta(days=1))
            .not_valid_after(not_after or NOW + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))


def ceremony() -> ra.Context:
    return ra.Context(Policy(), NOW, ra.NoIssuers())


def test_init_orders_a_root_and_its_issuing_ca_and_nobody_else_may() -> None:
    root_key, issuing_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hsmca Root CA")])
    order = ra.decide(ceremony(), ra.Local(), ra.RootRequest("root-ca", root_key.public_key(),
                                                              name))
    assert isinstance(order, ra.CACertOrder)
    assert (order.kind, order.signer, order.subject, order.issuer_name, order.path_length) == (
        "root", "root-ca", name, name, 1)
    assert order.not_after == NOW + ra.ROOT_LIFETIME
    root = root_cert(root_key, days=100)
    issuing = ra.decide(ceremony(), ra.Local(), ra.IntermediateRequest(
        issuing_key.public_key(), "hsmca Issuing CA", signer="root-ca", issuer=root))
    assert isinstance(issuing, ra.CACertOrder) and issuing.path_length == 0
    assert issuing.issuer_name == root.subject and issuing.signer == "root-ca"
    assert issuing.not_after == root.not_valid_after_utc  # never outlives its root
    for who in (admin(), token("admin", ())):
        refused(ra.decide(ceremony(), who, ra.RootRequest("root-ca", root_key.public_key(),
                                                          name)),
                Reason.WRONG_ROLE, "hsmca init")


def test_ca_certificates_that_would_not_chain_are_refused() -> None:
    old_key, new_key, other_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    old, new = root_cert(old_key), root_cert(new_key)
    other = root_cert(other_key, cn="another root")
    expired = root_cert(old_key, not_after=NOW - dt.timedelta(seconds=1))
    leafish = holder("service", ("a.example",))
    leaf_cert = x509.load_der_x509_certificate(leafish.der)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    cases: list[tuple[Any, Reason, str]] = [
        (ra.RootRequest("r", new_key.public_key(), x509.Name([])), Reason.MALFORMED, "subject"),
        (ra.RootRequest("r", new_key.public_key(), name, dt.timedelta(days=4000)),
         Reason.MALFORMED, "3650 days"),
        (ra.CrossRequest("old", old, other), Reason.MALFORMED, "same name"),
        (ra.CrossRequest("old", old, old), Reason.MALFORMED, "different root keys"),
        (ra.CrossRequest("old", expired, new), Reason.CONFLICT, "expired"),
        (ra.CrossRequest("leaf", leaf_cert, new), Reason.MALFORMED, "no basicConstraints"),
        (ra.IntermediateRequest(old_key.public_key(), "hsmca Issuing CA", signer="old",
                                issuer=old), Reason.MALFORMED, "a key of its own"),
        (ra.IntermediateRequest(other_key.public_key(), "hsmca Issuing CA", signer="old"),
         Reason.MALFORMED, "or neither"),
        (ra.IntermediateRequest(other_key.public_key(), "hsmca Issuing CA"),
         Reason.CONFLICT, "no issuers yet"),
    ]
    for request, reason, words in cases:
        refused(ra.decide(ceremony(), ra.Local(), request), reason, words)


def test_a_root_rotations_cross_certificates_outlive_neither_root() -> None:
    old_key, new_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    old, new = root_cert(old_key, days=200), root_cert(new_key, days=3650)
    new_with_old = ra.decide(ceremony(), ra.Local(), ra.CrossRequest("old", old, new))
    old_with_new = ra.decide(ceremony(), ra.Local(), ra.CrossRequest("new", new, old))
    assert isinstance(new_with_old, ra.CACertOrder) and isinstance(old_with_new, ra.CACertOrder)
    assert new_with_old.signer == "old" and old_with_new.signer == "new"
    assert new_with_old.not_after == old_with_new.not_after == old.not_valid_after_utc
    assert new_with_old.subject == new_with_old.issuer_name == old.subject  # self-issued
    ski = x509.SubjectKeyIdentifier.from_public_key
    assert new_with_old.issuer_key_id == ski(old_key.public_key()).digest
    assert old_with_new.issuer_key_id == ski(new_key.public_key()).digest


def test_an_audit_key_is_retired_only_once_every_log_has_handed_over() -> None:
    """Retired while a log's latest checkpoint is signed by it alone, the log would
    verify with neither key: refused, naming the logs and what hands each over."""
    req = ra.KeyRequest("retire", "audit", "audit-old", "previous")
    assert isinstance(ra.decide(context(), admin(), req), ra.KeyOrder)
    refused(ra.decide(context(), admin(), dataclasses.replace(req, not_handed_over=("ca-2",))),
            Reason.CONFLICT, "'audit-old' still signs the latest checkpoint of log(s) ca-2",
            "start it")
    # Both kinds named, both ways on are said (the init log's alone was, and a cluster
    # trial with a removed node's log was left without one).
    refused(ra.decide(context(), admin(), dataclasses.replace(
        req, not_handed_over=("ca-2", "init"))), Reason.CONFLICT, "ca-2, init",
        "hsmca key rotate-root", "start a node of its name once")
    # One node: its own next checkpoint, in its own words (a key trial was told of
    # clusters and PostgreSQL, in a garbled "log(s) this CA's")
    said = ra.decide(context(), admin(), dataclasses.replace(
        req, not_handed_over=(ra.SINGLE_LOG,)))
    refused(said, Reason.CONFLICT, "still signs the audit log's latest checkpoint",
            "Its next checkpoint hands over")
    assert isinstance(said, ra.Refusal) and "node" not in said.detail


def test_the_root_is_rotated_by_the_ceremony_alone_and_once_at_a_time() -> None:
    req = ra.KeyRequest("rotate", "root")
    refused(ra.decide(context(), admin(), req), Reason.MALFORMED, "hsmca key rotate-root")
    assert isinstance(ra.decide(context(), ra.Local(), req), ra.KeyOrder)
    handing_over = context()
    handing_over.issuers.previous_root = "root-ca"  # type: ignore[attr-defined]
    refused(ra.decide(handing_over, ra.Local(), req), Reason.CONFLICT,
            "one root rotation at a time", "hsmca key retire root-ca")


def test_a_refused_key_action_names_the_command_to_run_first() -> None:
    """Each refusal says what to do next (a key lifecycle trial: they did not)."""
    refused(ra.decide(context(), admin(), ra.KeyRequest("destroy", "issuing", "iss-2",
                                                         "previous", True)),
            Reason.CONFLICT, "retire it first (hsmca key retire iss-2)")
    refused(ra.decide(context(), admin(), ra.KeyRequest("retire", "root", "root-ca", "active")),
            Reason.CONFLICT, "rotate first (hsmca key rotate-root, on the CA host)")
    refused(ra.decide(context(), admin(), ra.KeyRequest("retire", "ssh-user", "u", "active")),
            Reason.CONFLICT, "rotate first (hsmca key rotate ssh-user)")
    refused(ra.decide(context(), admin(), ra.KeyRequest("retire", "", "typo", None)),
            Reason.NOT_FOUND, "no key labelled 'typo' (`hsmca key list` lists the labels)")


def test_a_key_the_cli_asked_nothing_about_is_not_retired_unasked() -> None:
    """A review: `key retire` asked nothing of a key it could not retire when it looked
    (active), and a rotation by another admin before its request made it previous: it
    was retired, unasked. Unconfirmed is refused; an API client's retire that says
    nothing goes on, as before."""
    refused(ra.decide(context(), admin(), ra.KeyRequest("retire", "issuing", "iss-1",
                                                         "previous", False)),
            Reason.CONFLICT, "'iss-1' is previous now, but was not when you were asked",
            "ask again (`hsmca key retire`, or \"confirm\": true)")
    for said in (True, None):
        assert isinstance(ra.decide(context(), admin(), ra.KeyRequest(
            "retire", "issuing", "iss-1", "previous", said)), ra.KeyOrder)


@pytest.mark.parametrize("state, said", [
    ("active", "which signs every new user certificate: in the KRL"),
    ("previous", "which signed user certificates still in use"),
    ("next", "staged to sign user certificates from the next rotation")])
def test_this_ca_s_own_ssh_key_is_not_revoked_and_is_said_as_it_is(state: str,
                                                                    said: str) -> None:
    # An SSH trial's staged key, which had signed nothing, was refused as one "which
    # signed user certificates still in use"
    key = ssh_key()
    refused(ra.decide(context(), admin(), ra.SSHRevokeRequest(
        public_key=key, ca_key=("u-next", "user", state))), Reason.CONFLICT,
        "this CA's own SSH user CA key 'u-next'", said)


def test_a_tokens_names_fit_an_audit_line() -> None:
    """100 URIs of 2000 characters each would make a token.create line longer than an
    audit line may be (a 500, after review): refused, saying the limit."""
    many = [f"spiffe://a.internal.example/{i}/" + "x" * 1900 for i in range(10)]
    refused(ra.decide(context(), admin(), ra.TokenRequest("service", many)),
            Reason.MALFORMED, "at most 16384 characters")


def test_names_issued_before_they_were_refused_are_still_found() -> None:
    """`revoke --identity` finds a certificate by a name no longer issued: one whose last
    label is a number, as an IPv4-mapped address before it."""
    from ca import policy
    assert policy.lookup("0x7f.1") == ("dns", "0x7f.1")
    assert policy.lookup("svc.internal.1") == ("dns", "svc.internal.1")
    with pytest.raises(policy.Refused):
        policy.lookup("0x7f.1 ")


@pytest.mark.parametrize("state, said", [
    ("withdrawn", "is withdrawn already"),
    ("expired", "is expired: it can bind no account"),
    ("used", "is used: only one not yet bound can be withdrawn (deactivate the account"),
])
def test_withdrawing_an_eab_key_says_why_by_its_state(state: str, said: str) -> None:
    """Only a key that bound an account is told to deactivate the account (an ACME
    trial was told so for a key withdrawn already, which bound none)."""
    r = ra.decide(context(), admin(), ra.AcmeAdminRequest("withdraw-eab", "eab-1", state))
    assert isinstance(r, ra.Refusal) and r.reason is Reason.CONFLICT and said in r.detail, r
    ok = ra.decide(context(), admin(), ra.AcmeAdminRequest("withdraw-eab", "eab-1", "unused"))
    assert not isinstance(ok, ra.Refusal)


def test_a_spent_token_gets_its_certificate_again_only_released_live_and_for_its_key() -> None:
    """The retry of an enrollment whose answer was lost is decided here, like any other
    issuance question: never for another key, nor a certificate not known released
    (a review's draft handed one out), revoked, expired, or of an issuer gone."""
    from ca.subject import spki_sha256
    key = ec.generate_private_key(ec.SECP256R1())
    now = context().now
    good = ra.EnrollAgainRequest(csr("a.example", key=key), 0x99, released=True,
                                 revoked=False, not_after=now + dt.timedelta(hours=1),
                                 issuer_in_use=True, spki_sha256=spki_sha256(key.public_key()))
    who = token("service", (("dns", "a.example"),))
    assert ra.decide(context(), who, good) == ra.EnrollAgainOrder(0x99)
    # through its notAfter second, as RFC 5280 counts it
    assert ra.decide(context(), who, dataclasses.replace(good, not_after=now)) == (
        ra.EnrollAgainOrder(0x99))
    for change, said in (({"released": False}, "not known to have been released"),
                         ({"revoked": True}, "no longer live"),
                         ({"not_after": now - dt.timedelta(seconds=1)}, "no longer live"),
                         ({"issuer_in_use": False}, "no longer live"),
                         ({"csr": csr("a.example")}, "this CSR's key is another")):
        refused(ra.decide(context(), who, dataclasses.replace(good, **change)),
                Reason.TOKEN_SPENT, said)
    refused(ra.decide(context(), admin(), good), Reason.WRONG_ROLE)
    # A retry asks what the first request could have (a docs trial got the certificate
    # back for a ttl that is 400 at first); a lifetime the first could ask is not used.
    assert ra.decide(context(), who, dataclasses.replace(good, ttl="2h")) == (
        ra.EnrollAgainOrder(0x99))
    refused(ra.decide(context(), who, dataclasses.replace(good, ttl="7 days")),
            Reason.MALFORMED, "is not a duration")
    refused(ra.decide(context(), who, dataclasses.replace(good, ttl="999d")), Reason.LIFETIME)


def test_an_issuing_key_s_ca_certificate_is_revoked_once_retired_for_a_ca_s_reasons() -> None:
    """A relying-party trial: an issuing key feared compromised could be rotated and
    retired, and its CA certificate never revoked, so relying parties went on taking
    what it signed until 2031."""
    def ask(who: Any = None, **kw: Any) -> Any:
        fields: dict[str, Any] = {"kind": "issuing", "label": "iss-1", "state": "retired",
                                  "reason": "cACompromise", "root_signs": True,
                                  "confirmed": True, **kw}
        return ra.decide(context(), who or admin(), ra.KeyRequest("revoke", **fields))

    order = ask()
    assert isinstance(order, ra.KeyOrder) and (order.action, order.label, order.reason) == \
        ("revoke", "iss-1", "cACompromise")
    assert isinstance(ask(state="destroyed", reason=None), ra.KeyOrder)
    assert ask(reason="superseded").reason == "superseded"
    refused(ask(holder("service", ("s.example",))), Reason.WRONG_ROLE)
    refused(ask(state="active"), Reason.CONFLICT, "rotate first")
    refused(ask(state="previous"), Reason.CONFLICT, "retire it (hsmca key retire iss-1)")
    refused(ask(reason="keyCompromise"), Reason.REASON_NOT_ALLOWED, "cACompromise")
    refused(ask(reason="privilegeWithdrawn"), Reason.REASON_NOT_ALLOWED)
    refused(ask(reason="bogus"), Reason.MALFORMED, "a CA certificate is revoked as one of "
            "affiliationChanged, cACompromise, cessationOfOperation, superseded, unspecified")
    refused(ask(revoked=True), Reason.ALREADY_REVOKED, "revoked already")
    refused(ask(root_signs=False), Reason.CONFLICT, "root that certified")
    refused(ask(asked_with_its_cert=True), Reason.CONFLICT, "Renew it first")
    refused(ask(confirmed=False), Reason.MALFORMED, "cannot be undone")
    for kind, said in (("root", "trust stores"), ("ssh-user", "no certificate"),
                       ("audit", "no certificate")):
        refused(ask(kind=kind), Reason.CONFLICT, said)
    refused(ra.decide(context(), admin(), ra.KeyRequest("revoke", "", "nope", None)),
            Reason.NOT_FOUND)


def test_a_user_named_before_e_mail_names_were_dot_atoms_still_renews() -> None:
    """A review: e-mail names became RFC 5321 dot-atoms; applied to the names a
    certificate already holds, `first..last@x.example` (a name 0.3.7 issued) could no
    longer renew, nor get an SSH certificate, and `renew --daemon` ended on it. A new
    token gets the stricter rule; a certificate named before keeps renewing."""
    old = holder("user", ("first..last@x.example",), ("first",))
    assert isinstance(ra.decide(context(), old, ra.RenewRequest()), ra.X509Order)
    assert isinstance(ra.decide(context(), old, ra.SSHUserRequest(ssh_key())), ra.SSHOrder)
    refused(ra.decide(context(), admin(), ra.TokenRequest(
        "user", ["first..last@x.example"], [], "1h")), Reason.BAD_NAME,
        "RFC 5321's dot-atom")


def test_a_csr_without_a_san_whose_cn_names_another_name_is_refused() -> None:
    """An EST trial: device B, handed device A's token, sent a CSR with CN=b.example and
    no SAN, and got a certificate for a.example without a word (a SAN asking for b was
    refused). A CN that names something (a DNS name with a dot, an IP address, an
    e-mail address) must be one of the names granted; one that names nothing (a serial
    number, a bare host label) is not read, nor is any CN beside a SAN."""
    holder_ = token("service", (("dns", "a.example"),))

    def with_cn(cn: str, *sans: str) -> x509.CertificateSigningRequest:
        b = x509.CertificateSigningRequestBuilder().subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName([_san(n) for n in sans]),
                                critical=False)
        return b.sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
    for cn in ("b.example", "10.0.0.9", "b@b.example"):
        refused(ra.decide(context(), holder_, ra.EnrollRequest(with_cn(cn))),
                Reason.NAME_NOT_GRANTED, f"the CSR's common name '{cn}' is not among")
    for cn in ("a.example", "A.Example", "device-0042", "SN 4711"):
        order = ra.decide(context(), holder_, ra.EnrollRequest(with_cn(cn)))
        assert isinstance(order, ra.X509Order) and order.names == (("dns", "a.example"),)
    # an e-mail's local part and a URI's path keep their case (a review: refused)
    for role, name in (("user", "Alice@example.com"), ("service", "spiffe://x.example/ns/Prod")):
        granted = token(role, (policy.classify(name),))
        assert isinstance(ra.decide(context(), granted, ra.EnrollRequest(with_cn(name))),
                          ra.X509Order), name
    order = ra.decide(context(), holder_, ra.EnrollRequest(with_cn("b.example", "a.example")))
    assert isinstance(order, ra.X509Order)


def test_the_order_says_whether_a_certificate_is_a_client_credential_alone() -> None:
    """Which certificates may serve TLS is decided with the names, in the registration
    authority (a read-through moved it out of the issuance profile): users', auditors'
    and admins' are client certificates alone, services' and hosts' not."""
    for role, names, client_only in (("user", ("ann@internal.example",), True),
                                     ("admin", ("admin.localhost",), True),
                                     ("auditor", ("audit@internal.example",), True),
                                     ("service", ("svc.internal.example",), False),
                                     ("host", ("web.internal.example",), False)):
        order = ra.decide(context(), holder(role, names), ra.RenewRequest())
        assert isinstance(order, ra.X509Order) and order.client_only is client_only, role

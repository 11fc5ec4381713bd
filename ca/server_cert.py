"""The daemon's own TLS certificate: renewed at start-up when it is close to expiry
or no longer matches its key (e.g. a crash between the two file writes).

The key is a software key (it must be usable by OpenSSL for every handshake); the
certificate is ordered by the registration authority and signed by the issuing key
in the HSM through the audited path (ca/local_certs.py).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import structlog
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from ca.chains import first_cert, issued_by
from ca.config import CA_SERVER_NAME, Config
from ca.fileutil import write_atomic, write_atomic_together
from ca.issuance.issue import Issuance
from ca.issuance.profiles import fingerprint, pem
from ca.local_certs import local_cert

TLS_DAYS = 365
ADMIN_DAYS = 365  # as `hsmca init` makes it (ra.LOCAL_RENEWAL_MAX caps its renewals)

RENEW_BEFORE = dt.timedelta(days=30)
log = structlog.get_logger("hsmca.tls")
T = TypeVar("T")


class CredentialMissing(ValueError):
    """One of the listener's two files is missing and the other is there: a path
    mistyped in the config, not a credential to replace (a new key would be made at
    the mistyped path, and the certificate at the other overwritten)."""


def one_missing(config: Config) -> None:
    """CredentialMissing if one of the listener's two files is missing and the other
    is there (checked at the start's outset too: the pre-flight `serve` beside the
    running daemon found it only after the stop, an upgrade trial)."""
    cert, key = config.tls_cert.exists(), config.tls_key.exists()
    if cert == key:
        return  # both there (checked below), or both gone: made anew
    gone, there = ((config.tls_key, config.tls_cert) if cert else
                   (config.tls_cert, config.tls_key))
    setting = "tls-key" if gone == config.tls_key else "tls-cert"
    raise CredentialMissing(
        f"[server] {setting} in {config.path} names {gone}, which does not exist, while "
        f"{there} does: correct the path in the config (or remove both files, and the "
        "daemon makes a new key and certificate)")


class NotTheListeners(ValueError):
    """A file `[server] tls-cert` or `tls-key` names that is not the listener's own:
    never replaced. A config trial pointed tls-cert at the inventory and tls-key at the
    admin credential's key, and the start's renewal overwrote both; an operator's
    certificate of another PKI was replaced as silently."""


def _ca_files(config: Config) -> dict[str, Path]:
    return {"the inventory": config.db_path, "the audit log": config.audit_log,
            "the admin credential's certificate": config.admin_cert,
            "the admin credential's key": config.admin_key, "the config": config.path,
            "the CA's root certificate": config.root_pem,
            "the CA's issuing certificate": config.issuing_pem,
            "the CA's chain": config.chain_pem, "the CA's bundle": config.bundle_pem,
            "the CA's roots": config.root_pem.with_name("roots.pem"),
            "the audit log's checkpoint": config.checkpoint_path,
            "the audit public key": config.audit_key_pem}


def _not_the_listeners(config: Config, setting: str, path: Path, why: str,
                       removable: bool = True) -> NotTheListeners:
    """`removable`: the file may be removed for a new pair (not another file of the
    CA's: a restore trial read "remove both files" as the inventory's removal)."""
    return NotTheListeners(
        f"[server] {setting} in {config.path} names {path}, which {why}: the daemon "
        "replaces only its listener's own files. Correct the path (tls/server.pem and "
        "tls/server.key in the state directory by default)"
        + (", or remove both files for a new key and certificate" if removable else ""))


def listener_files(config: Config) -> None:
    """NotTheListeners if either of the listener's paths names another file of the CA,
    or both name one file (checked at the start's outset, before anything reads or
    writes them)."""
    if _same(config.tls_cert, config.tls_key) or config.tls_cert == config.tls_key:
        # The pair's writes went to one path, the key lost to the certificate, and every
        # start after it failed in the workers (a start-guard trial's combined PEM).
        raise _not_the_listeners(config, "tls-key", config.tls_key,
                                 "tls-cert names too: the key and the certificate are kept "
                                 "in two files", removable=False)
    for setting, path in (("tls-cert", config.tls_cert), ("tls-key", config.tls_key)):
        for what, other in _ca_files(config).items():
            if _same(path, other):
                raise _not_the_listeners(config, setting, path, f"is {what}",
                                         removable=False)


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # either missing: not the same file
        return False


def _ours(config: Config, cert: x509.Certificate, issuers: Sequence[x509.Certificate]
          ) -> bool:
    """Whether one of this CA's issuing keys signed `cert`: one the keyring has now, or
    one in the bundle of every issuing CA and root it has had (a file a start writes:
    on a cluster another node's rotation may be missing from it)."""
    try:
        known = x509.load_pem_x509_certificates(config.bundle_pem.read_bytes())
    except (OSError, ValueError):
        known = []
    return any(issued_by(cert, ca) for ca in [*issuers, *known])


def _read(config: Config, setting: str, path: Path, kind: str,
          load: Callable[[bytes], T]) -> T:
    """The listener's file `path` loaded, or NotTheListeners saying why it is not."""
    try:
        return load(path.read_bytes())
    except OSError as exc:
        raise _not_the_listeners(config, setting, path,
                                 f"cannot be read ({exc.strerror or exc})") from None
    except (ValueError, TypeError, IndexError):
        raise _not_the_listeners(config, setting, path, f"holds no {kind}") from None


def listener_cert(config: Config, issuers: Sequence[x509.Certificate]
                  ) -> x509.Certificate | None:
    """The listener's certificate, None when there is none yet; NotTheListeners when
    its file holds none, or one no issuing key of this CA (`issuers`, the keyring's)
    signed. Asked before the start's `daemon.start` line too: a trial's start on
    another CA's pair logged the start, then refused."""
    if not config.tls_cert.exists():
        return None
    cert = _read(config, "tls-cert", config.tls_cert, "PEM certificate",
                 lambda data: x509.load_pem_x509_certificates(data)[0])
    if not _ours(config, cert, issuers):
        # The issuer's name may be this CA's own (two CAs left at the default names): its
        # key's id tells them apart (a re-trial)
        try:
            aki = cert.extensions.get_extension_for_class(
                x509.AuthorityKeyIdentifier).value.key_identifier
        except (x509.ExtensionNotFound, ValueError):  # (none, or extensions malformed)
            aki = None
        whose = f", key id {aki.hex()}" if aki else ""
        raise _not_the_listeners(config, "tls-cert", config.tls_cert, (
            f"holds a certificate this CA did not issue (issuer "
            f"{cert.issuer.rfc4514_string()}{whose}, none of this CA's keys): the "
            "listener presents a certificate of its own issuing CA, which the clients' "
            "--ca root.pem verifies"))
    return cert


def _needs_renewal(config: Config, now: dt.datetime, issuer: x509.Certificate,
                   issuers: Sequence[x509.Certificate] = ()) -> str | None:
    """Why the listener's pair is to be renewed, or None; `issuer` the current issuing
    CA certificate, `issuers` the keyring's others."""
    one_missing(config)
    listener_files(config)
    cert = listener_cert(config, [issuer, *issuers])
    if cert is None:
        return "no certificate yet (both files gone)"  # made anew, as one_missing says
    key = _read(config, "tls-key", config.tls_key, "unencrypted PEM private key",
                lambda data: load_pem_private_key(data, None))
    if cert.public_key() != key.public_key():
        return "certificate and key do not match"
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = x509.SubjectAlternativeName([])
    names = sans.get_values_for_type(x509.DNSName) + [
        str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    if CA_SERVER_NAME not in names:
        # Made by a release before 0.3.0: clients at loopback addresses now check it.
        return f"lacks {CA_SERVER_NAME}, which clients on this host check"
    if config.dns_name not in names:
        # A name given since (docs/operator.md says the start renews for it; a config
        # trial found the old names served until the yearly renewal).
        return f"lacks {config.dns_name}, [server] dns-name"
    if cert.not_valid_after_utc - now < RENEW_BEFORE:
        return f"expires {cert.not_valid_after_utc.isoformat()}"
    if not issued_by(cert, issuer):
        # A root rotation cut short after the inventory changed and before this file was
        # written (a key lifecycle trial): the CA's own root.pem no longer verified it.
        return "not issued by the current issuing CA (a rotation since)"
    return None


async def _revoked(config: Config, issuance: Issuance) -> str | None:
    """Why the listener's certificate must be replaced, with a new key, if it was
    revoked: relying parties that check see it revoked, and one revoked as keyCompromise
    says its key is another's (a relying-party trial: the daemon presented it on,
    through SIGHUPs and restarts)."""
    cert = x509.load_pem_x509_certificates(config.tls_cert.read_bytes())[0]
    rec = await issuance.store.cert_by_fingerprint(fingerprint(cert))
    if rec is None or rec.revoked_at is None:
        return None
    return f"revoked ({rec.reason or 'unspecified'}) at {rec.revoked_at}"


def _follow_chain(config: Config, chain_pem: str) -> None:
    """The chain served after the certificate, as the inventory has it now: after the
    previous root is retired it ends at the new root alone (docs/keys.md)."""
    text = config.tls_cert.read_text()
    end = text.index(_PEM_END) + len(_PEM_END) + 1
    if text[end:] != chain_pem:
        write_atomic(config.tls_cert, text[:end] + chain_pem)
        log.info("the daemon's TLS chain follows the CA's current chain")


_PEM_END = "-----END CERTIFICATE-----"


def server_names(dns_name: str) -> list[str]:
    """The listener's names: its DNS name, loopback for clients on the CA host, and the
    name only the CA's own listener carries, which clients at loopback addresses check
    (CA_SERVER_NAME)."""
    return ([dns_name] + (["localhost"] if dns_name != "localhost" else [])
            + ["127.0.0.1", "::1", CA_SERVER_NAME])


async def ensure_server_cert(config: Config, issuance: Issuance) -> None:
    """Renew the listener's certificate if due, or make it follow the CA's chain (the
    workers' listeners load a changed file: ca/own_certs.py)."""
    keyring = await issuance.keys.refresh()
    current = keyring.current
    why = _needs_renewal(config, dt.datetime.now(dt.UTC), current.cert,
                         [i.cert for i in keyring.x509.values()])
    if why is None:
        why = await _revoked(config, issuance)
    if why is None:
        _follow_chain(config, current.chain_pem)
        return
    # Said louder when the files are not as the daemon left them (both gone, damaged,
    # or not a pair): an operator's doing, which the log should show.
    said = log.info if why.startswith(("expires", "lacks", "not issued")) else log.warning
    # (revoked: a new key as well, as every renewal here makes)
    said("renewing the daemon's TLS certificate", reason=why)
    cert_pem, key_pem, signer = await local_cert(
        issuance, config.policy, role="server", names=server_names(config.dns_name),
        days=TLS_DAYS)
    # The chain of the key that signed it, as the inventory has it now (after a root
    # rotation, with its links). Not the current issuer's: a rotation committed while
    # this was signed left the new leaf served above another issuer's certificate,
    # which no client could verify until the next round (a CI run).
    issuer = (await issuance.keys.refresh()).x509.get(signer)
    if issuer is None:  # retired meanwhile: renewed by the next round
        raise ValueError(f"the issuing key {signer} was retired while it signed the "
                         "daemon's TLS certificate")
    chain = issuer.chain_pem
    replace_pair(config, key_pem, cert_pem + chain)


def superseded_path(config: Config) -> Path:
    """Where the listener's certificates replaced and not yet revoked are kept, for
    the daemon's round to revoke (ca/own_certs.py)."""
    return config.tls_cert.parent / ".superseded.pem"


def noted_certs(noted: Path) -> list[x509.Certificate]:
    """The certificates a note holds, each PEM block alone: a damaged block (or a file
    that is no text) costs itself only, never a start (a review: a start that had to
    renew the pair stopped on a note it could not decode)."""
    try:
        text = noted.read_bytes()
    except FileNotFoundError:
        return []
    certs = []
    for block in text.split(b"-----END CERTIFICATE-----")[:-1]:
        try:
            certs.append(x509.load_pem_x509_certificate(block + b"-----END CERTIFICATE-----\n"))
        except ValueError as exc:
            log.warning("a damaged entry of the daemon's replaced TLS certificates is "
                        "dropped: that certificate is not revoked as superseded",
                        path=str(noted), error=str(exc))
    return certs


def replace_pair(config: Config, key_pem: str, cert_pem: str) -> None:
    """The listener's new key and certificate, the certificate they replace noted
    first: a start's renewal and the root's ceremony left it valid for its year, which
    `key retire` of its issuing key counted and named as the time to wait for (a
    review), as a running daemon's rotations did (a key trial)."""
    old = first_cert(config.tls_cert)
    if old is not None:
        noted = superseded_path(config)
        try:
            before = noted_certs(noted)
        except OSError as exc:  # never the renewal's end: the entries it held are lost
            log.warning("cannot read the daemon's replaced TLS certificates: those it "
                        "held are not revoked as superseded", path=str(noted),
                        error=exc.strerror or str(exc))
            before = []
        write_atomic(noted, "".join(pem(c) for c in [*before, old]), mode=0o644)
    # Key first: a crash between the renames leaves a mismatch, which the next start
    # notices and repairs (above), never a certificate for a key that is gone.
    write_atomic_together([(config.tls_key, key_pem, 0o600), (config.tls_cert, cert_pem, 0o644)])

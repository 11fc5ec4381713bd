"""`hsmca init`: make the keys inside the HSM and lay out a state directory.

The audit log is the first thing created, so every key generation and every CA
signature of the ceremony is in it; the last step signs the first checkpoint, so
a fresh state directory already verifies.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca import x509 as prof
from ca.audit.checkpointer import Checkpointer
from ca.audit.log import AuditLog
from ca.config import KEY_LABELS, render
from ca.fileutil import write_new
from ca.policy import Refused, dns_name
from ca.store import Store
from hsm.keys import KEY_TYPES
from hsm.signers import HSMKey
from hsm.uri import key_uri
from hsm.worker import HSMConfig, HSMWorker

ADMIN_DAYS = 365
TLS_DAYS = 365


class InitError(Exception):
    pass


@dataclass(frozen=True)
class InitOptions:
    state_dir: Path
    module: str
    token: str
    pin_file: Path
    key_type: str = "ec-p256"
    dns_name: str = "localhost"
    softhsm_conf: str | None = None


async def run_init(opts: InitOptions) -> list[Path]:
    """Create everything; return the files written, for the operator to see.

    Every input is checked, and the token logged in to, before a key is made. The
    state is built in a temporary directory beside the target and renamed into
    place at the end, so a failed init leaves no half-made CA behind (and if it
    failed after keys were generated, the record of that is kept and named)."""
    if opts.key_type not in KEY_TYPES:
        raise InitError(f"--key-type must be one of {', '.join(KEY_TYPES)}")
    check_dns_name(opts.dns_name)
    final = opts.state_dir.resolve()
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise InitError(f"{final} already exists and is not empty (an existing CA?); "
                        "refusing to overwrite it")
    if not opts.pin_file.exists():
        raise InitError(f"PIN file not found: {opts.pin_file}")
    final.parent.mkdir(parents=True, exist_ok=True)
    state = Path(tempfile.mkdtemp(prefix=f".{final.name}.init-", dir=final.parent))
    for sub in ("x509", "ssh", "audit", "admin", "tls"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(state / "admin", 0o700)
    os.chmod(state / "tls", 0o700)

    audit = AuditLog.open(state / "audit" / "log.jsonl")
    hsm_cfg = HSMConfig(opts.module, opts.token, "file:" + str(opts.pin_file.resolve()))
    worker = HSMWorker(hsm_cfg, audit)
    written: list[Path] = []
    keys_made = False
    try:
        await audit.append("init.start", state_dir=str(final), key_type=opts.key_type,
                           module=opts.module)
        worker.start()
        # Check every label before generating any, so a refusal leaves the token untouched.
        def existing(session: object) -> list[str]:
            from hsm.keys import find_private
            return [lbl for lbl in KEY_LABELS.values() if find_private(session, lbl, False)]
        taken = await worker.run(existing)  # type: ignore[arg-type]
        if taken:
            raise InitError(f"token {opts.token!r} already holds keys labelled "
                            f"{', '.join(taken)}; refusing to overwrite them (use a fresh "
                            "token)")
        keys: dict[str, HSMKey] = {}
        keys_made = True
        for purpose, label in KEY_LABELS.items():
            kt = "ed25519" if purpose == "audit" else opts.key_type
            keys[purpose] = await worker.generate_key(label, kt)

        root = await _sign_cert(worker, keys["root"],
                                prof.root_builder(keys["root"].public_key(), "hsmca Root CA"),
                                "x509-ca", "root")
        issuing = await _sign_cert(
            worker, keys["root"],
            prof.intermediate_builder(keys["issuing"].public_key(), "hsmca Issuing CA", root),
            "x509-ca", "issuing")
        chain = prof.pem(issuing) + prof.pem(root)

        store = Store(state / "hsmca.sqlite3")
        try:
            tls_pem, tls_key = await software_leaf(
                worker, keys["issuing"], issuing, store, role="server", cn=opts.dns_name,
                dns=[opts.dns_name, "localhost"] if opts.dns_name != "localhost" else
                ["localhost"], ips=["127.0.0.1", "::1"], purpose="tls", days=TLS_DAYS)
            admin_pem, admin_key = await software_leaf(
                worker, keys["issuing"], issuing, store, role="admin", cn="hsmca-admin",
                dns=[f"admin.{opts.dns_name}"], ips=[], purpose="x509", days=ADMIN_DAYS)
        finally:
            store.close()

        files: dict[Path, tuple[bytes | str, int]] = {
            state / "x509" / "root.pem": (prof.pem(root), 0o644),
            state / "x509" / "issuing.pem": (prof.pem(issuing), 0o644),
            state / "x509" / "chain.pem": (chain, 0o644),
            state / "ssh" / "user_ca.pub": (_ssh_line(keys["ssh_user"], "hsmca-user-ca"), 0o644),
            state / "ssh" / "host_ca.pub": (_ssh_line(keys["ssh_host"], "hsmca-host-ca"), 0o644),
            state / "audit" / "audit_key.pem": (_pub_pem(keys["audit"]), 0o644),
            state / "tls" / "server.pem": (tls_pem + chain, 0o644),
            state / "tls" / "server.key": (tls_key, 0o600),
            state / "admin" / "cert.pem": (admin_pem, 0o644),
            state / "admin" / "key.pem": (admin_key, 0o600),
        }
        for path, (data, mode) in files.items():
            write_new(path, data, mode)
            written.append(path)
        origin = f"{opts.dns_name}/hsmca-audit"
        config_text = render(
            module=opts.module, token=opts.token,
            pin_source="file:" + str(opts.pin_file.resolve()),
            softhsm_conf=opts.softhsm_conf,
            keys={p: str(key_uri(opts.token, lbl)) for p, lbl in KEY_LABELS.items()},
            dns_name=opts.dns_name, audit_origin=origin)
        write_new(state / "hsmca.toml", config_text, 0o600)
        written.append(state / "hsmca.toml")
        await audit.append("init.done", files=[str(p.relative_to(state)) for p in written])
        cp = Checkpointer(audit, worker, keys["audit"], origin,  # type: ignore[arg-type]
                          state / "audit" / "checkpoint")
        await cp.checkpoint()
        written.append(state / "audit" / "checkpoint")
    except BaseException as exc:
        worker.close()
        audit.close()
        if not keys_made:
            shutil.rmtree(state, ignore_errors=True)
            raise
        raise InitError(f"{exc} (keys were already generated in token {opts.token!r}; the "
                        f"record of this attempt is kept in {state}; use a fresh token)"
                        ) from exc
    worker.close()
    audit.close()
    if final.exists():
        final.rmdir()  # empty, checked above
    os.rename(state, final)
    return [final / p.relative_to(state) for p in written]


def check_dns_name(name: str) -> None:
    """--dns-name goes into a certificate CN/SAN and the audit key's note name."""
    try:
        dns_name(name)
    except Refused as exc:
        raise InitError(f"--dns-name: {exc.detail}") from None
    if len(name) > 64:
        raise InitError("--dns-name must be at most 64 characters (it is the TLS "
                        "certificate's common name)")


async def _sign_cert(worker: HSMWorker, key: HSMKey, builder: x509.CertificateBuilder,
                     purpose: str, what: str, actor: str = "local") -> x509.Certificate:
    details = _cert_details(builder)
    cert: x509.Certificate = await worker.sign(
        key, lambda k: builder.sign(k, prof.hash_for(k)), purpose=purpose, actor=actor,
        details={"what": what, **details}, hash_name=_hash_name(key),
        describe=lambda c: {"fingerprint": prof.fingerprint(c)})
    return cert


def _cert_details(builder: x509.CertificateBuilder) -> dict[str, object]:
    """What is about to be signed, for the intent line. It is read back from a build
    with a throwaway software key, which also checks that the builder is complete
    before the HSM is used (the Boulder habit: lint before the real signature)."""
    probe = builder.sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
    try:
        san = probe.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n.value) for n in san]
    except x509.ExtensionNotFound:
        names = []
    return {"serial": format(probe.serial_number, "x"), "subject": probe.subject.rfc4514_string(),
            "names": names, "spki_sha256": prof.spki_sha256(probe.public_key()),
            "not_before": probe.not_valid_before_utc.isoformat(),
            "not_after": probe.not_valid_after_utc.isoformat()}


def _hash_name(key: HSMKey) -> str:
    h = prof.hash_for(key)
    return h.name if h is not None else "none"


async def software_leaf(worker: HSMWorker, issuing_key: HSMKey, issuing: x509.Certificate,
                         store: Store, *, role: str, cn: str, dns: list[str], ips: list[str],
                         purpose: str, days: int) -> tuple[str, bytes]:
    """A leaf whose key is made here in software (the daemon's TLS key, the admin key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    profile = prof.LeafProfile(public_key=key.public_key(), common_name=cn, dns_names=dns,
                               ip_addresses=ips, lifetime=dt.timedelta(days=days))
    cert = await _sign_cert(worker, issuing_key, prof.leaf_builder(profile, issuing), purpose,
                            role)
    store.add_cert(serial=cert.serial_number, fingerprint=prof.fingerprint(cert), role=role,
                   subject=cert.subject.rfc4514_string(), names=dns + ips, principals=[],
                   spki_sha256=prof.spki_sha256(key.public_key()),
                   not_before=cert.not_valid_before_utc.isoformat(),
                   not_after=cert.not_valid_after_utc.isoformat(),
                   issued_at=prof.utcnow().isoformat(), der=cert.public_bytes(
                       serialization.Encoding.DER))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return prof.pem(cert), key_pem


def _ssh_line(key: HSMKey, comment: str) -> str:
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).decode()
    return f"{line} {comment}\n"


def _pub_pem(key: HSMKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)

"""`hsmca init`: make the keys inside the HSM and lay out a state directory.

The audit log is the first thing created, so every key generation and every CA
signature of the ceremony is in it; the last step signs the first checkpoint, so
a fresh state directory already verifies.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization

from ca import ra
from ca.audit import cluster
from ca.audit.checkpointer import Checkpointer
from ca.audit.log import AuditLog
from ca.config import KEY_LABELS, render
from ca.daemon.keys import record_init_keys
from ca.fileutil import check_private, write_new
from ca.issuance import issuers
from ca.issuance import profiles as prof
from ca.issuance.issue import Issuance, decision_context, sign_ca_cert
from ca.issuance.pipeline import SigningPipeline
from ca.local_certs import local_cert
from ca.policy import AS_IP, Policy, Refused, dns_name
from ca.server_cert import ADMIN_DAYS, TLS_DAYS, server_names
from ca.store import open_store
from hsm.keys import KEY_TYPES, find_private
from hsm.session import HSMConfig, KeyInfo
from hsm.uri import key_uri

if TYPE_CHECKING:
    from ca.store.postgres import PostgresStore



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
    store_url: str | None = None  # PostgreSQL, several nodes; None: the state dir's SQLite
    name: str = prof.DEFAULT_CA_NAME  # the CA certificates are 'NAME Root CA', 'NAME Issuing CA'


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
    # A --state-dir that is a file system of its own (a volume mounted there, the usual
    # layout) cannot be replaced by a rename: the CA is built inside it, and its entries
    # moved up at the end (a fault trial's init made every key, then failed with a bare
    # "Device or resource busy"). A fresh ext4 volume's lost+found counts as empty.
    inside = final.is_dir() and _mount_point(final)
    ignored = {"lost+found"} if inside else set()
    if inside and final.stat().st_uid != os.geteuid() and os.geteuid() != 0:
        raise InitError(f"--state-dir {final} is a mount point owned by another user, who "
                        "could replace the CA's config: chown it to the user that runs "
                        "hsmca first")
    if final.exists() and (not final.is_dir()
                           or any(p.name not in ignored for p in final.iterdir())):
        held = sorted(p.name for p in final.iterdir()) if final.is_dir() else []
        if "hsmca.toml" in held or not held:
            raise InitError(f"{final} already exists and is not empty (an existing CA?); "
                            "refusing to overwrite it")
        shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
        raise InitError(f"--state-dir {final} is not empty (it holds {shown}): init writes "
                        f"a state directory of its own; give a new one, e.g. --state-dir "
                        f"{final / 'ca'}")
    if not opts.pin_file.exists():
        raise InitError(f"PIN file not found: {opts.pin_file}")
    check_private([opts.pin_file])  # `serve` refuses it too: better said before the keys
    final.parent.mkdir(parents=True, exist_ok=True)
    state = Path(tempfile.mkdtemp(prefix=f".{final.name}.init-",
                                  dir=final if inside else final.parent))
    for sub in ("x509", "ssh", "audit", "admin", "tls"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(state / "admin", 0o700)
    os.chmod(state / "tls", 0o700)

    cluster_store = await _cluster_store(opts.store_url)  # checked before any key is made
    try:
        log_path = state / "audit" / "log.jsonl"
        audit = AuditLog.open(log_path, mirror=None if cluster_store is None
                              else cluster.mirror(cluster_store, cluster.CEREMONIES, log_path))
    except BaseException:
        if cluster_store is not None:
            cluster_store.close()
        shutil.rmtree(state, ignore_errors=True)
        raise
    hsm_cfg = HSMConfig(opts.module, opts.token, "file:" + str(opts.pin_file.resolve()))
    pipeline = SigningPipeline(hsm_cfg, audit)
    written: list[Path] = []
    keys_made = False
    try:
        await audit.append("init.start", state_dir=str(final), key_type=opts.key_type,
                           module=opts.module)
        pipeline.start()
        # Check every label before generating any, so a refusal leaves the token untouched.
        taken = await pipeline.call(lambda hsm: hsm.session_call(lambda session: [
            lbl for lbl in KEY_LABELS.values() if find_private(session, lbl, False)]))
        if taken:
            raise InitError(f"token {opts.token!r} already holds keys labelled "
                            f"{', '.join(taken)}; refusing to overwrite them (use a fresh "
                            "token)")
        keys: dict[str, KeyInfo] = {}
        keys_made = True
        for purpose, label in KEY_LABELS.items():
            kt = "ed25519" if purpose == "audit" else opts.key_type
            keys[purpose] = await pipeline.generate_key(label, kt)

        # The operator decided these by running init; the registration authority
        # still turns them into orders, as it does every other certificate.
        ctx = decision_context(Policy(), ra.NoIssuers())
        root_key = keys["root"]
        root = await sign_ca_cert(pipeline, root_key, ra.order(ctx, ra.Local(), ra.RootRequest(
            root_key.label, root_key.public_key, prof.name(opts.name + prof.ROOT_SUFFIX))))
        issuing = await sign_ca_cert(pipeline, root_key, ra.order(
            ctx, ra.Local(), ra.IntermediateRequest(keys["issuing"].public_key,
                                                    opts.name + prof.ISSUING_SUFFIX,
                                                    signer=root_key.label, issuer=root)))
        chain = prof.pem(issuing) + prof.pem(root)
        # The records made here (keys, CA certificates, the admin and TLS certificates)
        # go where the nodes will find them: PostgreSQL with --store-url.
        store = cluster_store or open_store(state / "hsmca.sqlite3", new=True)
        try:
            await record_init_keys(store, keys, root, issuing)
            # With --store-url this log is the cluster's `init` log: the certificates
            # made here say so, for auditors to find their lines.
            issuance = Issuance(pipeline, store, issuers.Fixed(
                issuers.from_certs(root, issuing, keys)), None,
                None if cluster_store is None else cluster.CEREMONIES)
            policy = Policy()
            tls_pem, tls_key, _ = await local_cert(issuance, policy, role="server",
                                                   names=server_names(opts.dns_name),
                                                   days=TLS_DAYS)
            admin_pem, admin_key, _ = await local_cert(issuance, policy, role="admin",
                                                       names=[f"admin.{opts.dns_name}"],
                                                       days=ADMIN_DAYS)
        finally:
            if cluster_store is None:
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
            dns_name=opts.dns_name, audit_origin=origin, store_url=opts.store_url)
        write_new(state / "hsmca.toml", config_text, 0o600)
        written.append(state / "hsmca.toml")
        await audit.append("init.done", files=[str(p.relative_to(state)) for p in written])
        cp = Checkpointer(audit, pipeline, keys["audit"], origin,
                          state / "audit" / "checkpoint",
                          on_checkpoint=None if cluster_store is None else
                          cluster.publisher(cluster_store, cluster.CEREMONIES))
        await cp.checkpoint()
        written.append(state / "audit" / "checkpoint")
    except BaseException as exc:
        pipeline.close()
        audit.close()
        if cluster_store is not None:
            cluster_store.close()
        if not keys_made:
            shutil.rmtree(state, ignore_errors=True)
            raise
        raise InitError(f"{exc} (keys were already generated in token {opts.token!r}; the "
                        f"record of this attempt is kept in {state}; use a fresh token)"
                        ) from exc
    pipeline.close()
    audit.close()
    if cluster_store is not None:
        cluster_store.close()
    try:
        if inside:
            # hsmca.toml last: a directory holding it is a CA (checked above)
            for entry in sorted(state.iterdir(), key=lambda p: p.name == "hsmca.toml"):
                os.rename(entry, final / entry.name)
            state.rmdir()
            # as a state directory made by rename is: ours, and private (a volume made
            # for another user left it theirs, and they swapped the config; a review)
            os.chown(final, os.geteuid(), os.getegid())
            os.chmod(final, 0o700)
        else:
            if final.exists():
                final.rmdir()  # empty, checked above
            os.rename(state, final)
    except OSError as exc:
        raise InitError(f"cannot move the new CA into {final}: {exc.strerror or exc} (keys "
                        f"were generated in token {opts.token!r}; the CA is complete in "
                        f"{state}: move what it holds into {final})") from None
    return [final / p.relative_to(state) for p in written]


def _mount_point(path: Path) -> bool:
    """Whether something is mounted on `path`: another file system, or a bind mount of
    a directory of the same one (which os.path.ismount does not see)."""
    if os.path.ismount(path):
        return True
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
            points = {line.split()[4] for line in fh if len(line.split()) > 4}
    except OSError:
        return False
    # mountinfo escapes a space, tab, newline and backslash in octal
    shown = str(path).replace("\\", "\\134").replace(" ", "\\040").replace(
        "\t", "\\011").replace("\n", "\\012")
    return shown in points


async def _cluster_store(url: str | None) -> PostgresStore | None:
    """With --store-url, the database the nodes will share: reachable, and holding no
    CA yet (init's audit log would otherwise replace another CA's ceremony log)."""
    if url is None:
        return None
    from ca.store.postgres import PostgresStore
    store = PostgresStore(url)
    try:
        if await store.audit_logs() or await store.keys():
            raise InitError("the database of --store-url already holds a CA (keys and a "
                            "ceremony log); use an empty database")
    except BaseException:
        store.close()
        raise
    return store


def check_dns_name(name: str) -> None:
    """--dns-name goes into a certificate CN/SAN and the audit key's note name."""
    try:
        dns_name(name)
    except Refused as exc:
        # The advice for a name asked for ("give an IP as an IP") does not fit the CA's
        # own name, which clients reach it by: a DNS name.
        raise InitError(f"--dns-name: {exc.detail.removesuffix(AS_IP)}"
                        + ("; the CA's name must be a DNS name" if exc.detail.endswith(AS_IP)
                           else "")) from None
    if len(name) > 64:
        raise InitError("--dns-name must be at most 64 characters (it is the TLS "
                        "certificate's common name)")


def _ssh_line(key: KeyInfo, comment: str) -> str:
    """As Issuers.ssh_lines writes it: the comment, then the key's label."""
    line = key.public_key.public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).decode()
    return f"{line} {comment} {key.label}\n"


def _pub_pem(key: KeyInfo) -> bytes:
    return key.public_key.public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)

"""`hsmca ssh host` and `hsmca ssh user`: SSH certificates over mutual TLS.

`ssh user --agent` loads key and certificate into the running ssh-agent (asyncssh's
agent client) for exactly the certificate's lifetime. `ssh host --install DIR` writes
an sshd drop-in naming every file by its absolute path, and `--renew` keeps the host
certificate, the trusted user CA and the KRL fresh.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import ipaddress
import os
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ca.commands.args import positive, warn
from ca.errors import CLIError

DROP_IN = "hsmca.conf"
DEFAULT_REFRESH_S = 300  # --renew: the KRL and the user CA key fetched every 5 minutes
USER_CA = "hsmca_user_ca.pub"
KRL = "hsmca.krl"


def _cert_path(pubkey: Path) -> Path:
    name = pubkey.name.removesuffix(".pub")
    return pubkey.with_name(f"{name}-cert.pub")


def _not_a_host_certificate(cert: Path) -> None:
    """`ssh user` on a host key (/etc/ssh/ssh_host_*_key.pub, a slip of the finger)
    replaced the host certificate sshd serves with a user certificate, unremarked (an
    SSH trial): a host certificate there is not replaced."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    try:
        held = serialization.load_ssh_public_identity(cert.read_bytes())
    except (OSError, ValueError, UnsupportedAlgorithm):  # (an sk- or dss certificate)
        return
    if isinstance(held, serialization.SSHCertificate) and \
            held.type == serialization.SSHCertificateType.HOST:
        raise CLIError(f"{cert} holds a host certificate (sshd's HostCertificate?): --pubkey "
                       "is a host key, not yours; give your own public key (e.g. "
                       "~/.ssh/id_ed25519.pub)")


def _private_path(pubkey: Path) -> Path:
    return pubkey.with_name(pubkey.name.removesuffix(".pub"))


def read_public_key(path: Path, any_kind: bool = False) -> str:
    """The OpenSSH public key line in `path`, checked here, before any request: a
    private key (the .pub forgotten) must never be sent anywhere. `any_kind`: a key of
    a type the CA does not certify too (DSA, a security key: to revoke one)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        # (a new user's first `ssh user`: the file named, not how to make it)
        raise CLIError(f"--pubkey {path}: no such file: make a key with `mkdir -p -m 700 "
                       f"{path.parent} && ssh-keygen -t ed25519 -f "
                       f"{path.with_name(path.name.removesuffix('.pub'))}`, or give --pubkey "
                       "your key's .pub file") from None
    except OSError as exc:
        raise CLIError(f"--pubkey {path}: {exc.strerror}") from None
    if "PRIVATE KEY" in text:
        pub = path.with_name(path.name + ".pub")
        hint = f" ({pub})" if pub.exists() else ""
        raise CLIError(f"--pubkey {path} holds a private key, which is never sent; give its "
                       f".pub file{hint}")
    if text.lstrip().startswith("-----BEGIN"):  # a certificate, a PEM public key
        what = text.lstrip().split("\n", 1)[0].strip("-").removeprefix("BEGIN ").lower()
        raise CLIError(f"--pubkey {path} is PEM ({what}), not an OpenSSH public key: give "
                       "the key's .pub file, one line like 'ssh-ed25519 AAAA... comment' "
                       "(ssh-keygen -y -f KEY prints it from the private key)")
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    fields = lines[0].split() if len(lines) == 1 else []
    if len(fields) >= 2 and "-cert-v01@openssh.com" in fields[0]:
        raise CLIError(f"--pubkey {path} is an SSH certificate; give the public key it "
                       "certifies")
    if any_kind and len(fields) >= 2:
        return lines[0].strip()  # the daemon reads its type (ca.ssh.revocable_key)
    if fields and fields[0] == "ssh-dss":  # (cryptography would warn it is deprecated)
        raise CLIError(f"--pubkey {path} is a DSA key (ssh-dss), which the CA does not "
                       "certify; make an Ed25519 one: ssh-keygen -t ed25519")
    try:
        if len(fields) < 2:
            raise ValueError
        serialization.load_ssh_public_key(f"{fields[0]} {fields[1]}".encode())
    except (ValueError, UnsupportedAlgorithm):
        raise CLIError(f"--pubkey {path} is not an OpenSSH public key (one line: "
                       "'ssh-ed25519 AAAA... comment')") from None
    return lines[0].strip()


def _revoked_in_krl(krl: Path, cert: Path) -> bool:
    """Whether OpenSSH's own reading of the KRL revokes `cert` (ssh-keygen -Q, which is
    where sshd is); False when ssh-keygen is not there to ask."""
    import shutil
    import subprocess
    keygen = shutil.which("ssh-keygen")
    if keygen is None or not cert.exists():
        return False
    proc = subprocess.run([keygen, "-Q", "-f", str(krl), str(cert)], capture_output=True,
                          text=True, timeout=30)
    return proc.stdout.rstrip().endswith(": REVOKED")  # "<file>: REVOKED" (or ": ok")


def _ssh_cert(path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization
    try:
        cert = serialization.load_ssh_public_identity(path.read_bytes())
    except OSError as exc:  # (its words, not Python's "[Errno 2] ...: 'path'")
        raise CLIError(f"cannot read the SSH certificate {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise CLIError(f"cannot read the SSH certificate {path}: {exc}") from None
    if not isinstance(cert, serialization.SSHCertificate):
        raise CLIError(f"{path} is not an SSH certificate")
    return cert


def _this_cas(path: Path, cas: dict[str, str],
              keys: Callable[[], list[dict[str, Any]]] = list) -> Any:
    """The SSH certificate in `path`, if one of this CA's keys (`cas`, /v1/ssh/ca, or a
    retired one of `keys()`, /v1/keys) signed it; else CLIError. Its key id alone named
    what to revoke, and a certificate of another CA that carried one of this CA's key
    ids revoked that one (an SSH trial: a staging CA's, say)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    cert = _ssh_cert(path)
    try:
        cert.verify_cert_signature()
    except (InvalidSignature, ValueError):
        raise CLIError(f"--ssh-cert {path}: its signature does not verify") from None
    signer = " ".join(cert.signature_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode().split()[:2])
    ours = {" ".join(line.split()[:2]) for kind in ("user", "host")
            for line in cas.get(kind, "").splitlines() if line.strip()}
    if signer in ours:
        return cert
    # A retired SSH CA key of this CA (a key trial was told "another CA's")
    from ca.policy import Refused
    from ca.ssh import parse_public_key
    try:
        fp = parse_public_key(signer).sha256
    except Refused:  # no key type this CA makes
        fp = signer
    if any(k.get("ssh_fingerprint") == fp for k in keys()):
        return cert
    raise CLIError(f"--ssh-cert {path} was not signed by an SSH CA key of this CA (its "
                   f"CA key is {fp}, which `hsmca key list` does not list): another CA's, "
                   "nothing here to revoke")


def _is_ssh_cert(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return b"-cert-v01@openssh.com" in f.read(64).split(b" ", 1)[0]
    except OSError:
        return False  # read_public_key says why


def _ssh_cert_times(path: Path) -> tuple[dt.datetime, dt.datetime]:
    cert = _ssh_cert(path)
    return (dt.datetime.fromtimestamp(cert.valid_after, dt.UTC),
            dt.datetime.fromtimestamp(cert.valid_before, dt.UTC))


def _ssh_cert_identity(path: Path) -> str | None:
    try:
        return f"serial {_ssh_cert(path).serial:x}"
    except CLIError:  # being replaced, this very moment
        return None


async def _issue(args: argparse.Namespace, ctx: ssl.SSLContext, path: str,
                 body: dict[str, Any]) -> dict[str, Any]:
    from ca import client  # aiohttp: not loaded by `serve`, which builds this parser too
    body = {**body, "public_key": read_public_key(args.pubkey)}
    issued: dict[str, Any] = await client.call("POST", f"{args.url}{path}", ctx,
                                               json_body=body, expect=201)
    return issued


# ---- ssh user ------------------------------------------------------------------------

def _agent_key(args: argparse.Namespace) -> Any:
    """The private key to give the agent, loaded before any request (asyncssh reads
    OpenSSH and PEM keys; a passphrase is asked for on the terminal)."""
    import asyncssh
    if not os.environ.get("SSH_AUTH_SOCK"):
        raise CLIError("--agent: SSH_AUTH_SOCK is not set; start ssh-agent first "
                       "(eval \"$(ssh-agent)\")")
    private = _private_path(args.pubkey)
    try:
        return asyncssh.read_private_key(private)
    except asyncssh.KeyImportError as exc:
        if "passphrase" not in str(exc).lower():
            raise CLIError(f"--agent: cannot read the private key {private}: {exc}") from None
    except OSError as exc:
        raise CLIError(f"--agent: cannot read the private key {private} (beside --pubkey): "
                       f"{exc.strerror}") from None
    import getpass
    if not sys.stdin.isatty():
        raise CLIError(f"--agent: {private} is protected by a passphrase, and there is no "
                       "terminal to ask for it on: run this in a terminal, or leave out "
                       "--agent and add the key and its certificate with ssh-add")
    try:
        phrase = getpass.getpass(f"passphrase for {private}: ")
        return asyncssh.read_private_key(private, phrase)
    except asyncssh.KeyEncryptionError:
        raise CLIError(f"--agent: wrong passphrase for {private}") from None
    except (asyncssh.KeyImportError, EOFError) as exc:
        raise CLIError(f"--agent: cannot decrypt {private}: {exc or 'no passphrase'}") from None


async def _agent_reachable() -> None:
    import asyncssh
    try:
        agent = await asyncssh.connect_agent()
    except OSError as exc:
        raise CLIError(f"--agent: cannot reach ssh-agent at {os.environ.get('SSH_AUTH_SOCK')}: "
                       f"{exc.strerror or exc} (nothing was asked of the CA)") from None
    agent.close()


async def _add_to_agent(key: Any, cert_line: str, cert_path: Path) -> int:
    """Add key and certificate to the agent until the certificate expires; the
    lifetime in seconds is returned."""
    import asyncssh
    cert = asyncssh.import_certificate(cert_line)
    _, valid_before = _ssh_cert_times(cert_path)
    lifetime = int((valid_before - dt.datetime.now(dt.UTC)).total_seconds())
    if lifetime <= 0:
        raise CLIError("the certificate has already expired; nothing was added to the agent")
    try:
        agent = await asyncssh.connect_agent()
    except OSError as exc:
        raise CLIError(f"--agent: cannot reach ssh-agent at {os.environ.get('SSH_AUTH_SOCK')}: "
                       f"{exc.strerror or exc}") from None
    try:
        pairs = asyncssh.load_keypairs([(key, cert)])  # the certificate's, then the key's
        # The key alone, if the person had added it already (ssh-add, for git...), stays
        # as they added it: given the certificate's lifetime, it left the agent with the
        # certificate (an SSH trial).
        held = {k.public_data for k in await agent.get_keys()}
        await agent.add_keys([p for p in pairs if p.public_data not in held],
                             lifetime=lifetime)
        try:
            await _drop_earlier(agent, cert_line)
        except ValueError as exc:  # added all the same: said, not an error
            warn(f"--agent: the earlier certificates of this key stay in ssh-agent: {exc}")
    except ValueError as exc:
        raise CLIError(f"--agent: ssh-agent refused the key: {exc}") from None
    finally:
        agent.close()
        await agent.wait_closed()
    return lifetime


async def _drop_earlier(agent: Any, cert_line: str) -> None:
    """Take out the agent's earlier certificates of this key for the same identity (key
    ids <identity>:<serial>, which this CA makes): they piled up until they expired,
    and after a rotation of the user CA ssh offered the old one first (an operator
    trial). Those of the key for another identity are left alone."""
    import struct

    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    def parsed(line: bytes) -> Any:
        try:
            held = serialization.load_ssh_public_identity(line)
        except (ValueError, UnsupportedAlgorithm):
            return None
        return held if isinstance(held, serialization.SSHCertificate) else None

    def key_of(c: Any) -> bytes:
        return c.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    new = parsed(" ".join(cert_line.split()[:2]).encode())
    identity = new.key_id.rpartition(b":")[0] if new is not None else b""
    if not identity:
        return
    stale = []
    for pair in await agent.get_keys():
        blob = bytes(pair.public_data)
        if len(blob) < 4:
            continue
        (n,) = struct.unpack(">I", blob[:4])  # the blob's first string: its type
        held = parsed(blob[4:4 + n] + b" " + base64.b64encode(blob))
        if (held is not None and held.serial != new.serial
                and key_of(held) == key_of(new) and held.key_id.rpartition(b":")[0] == identity):
            stale.append(pair)
    if stale:
        await agent.remove_keys(stale)


def user(args: argparse.Namespace) -> int:
    from ca import client
    read_public_key(args.pubkey)
    key = _agent_key(args) if args.agent else None
    cert = _cert_path(args.pubkey)
    _not_a_host_certificate(cert)
    body: dict[str, Any] = {}
    if args.ttl:
        body["ttl"] = args.ttl
    if args.principal:
        body["principals"] = args.principal
    if args.source_address:
        body["source_address"] = args.source_address

    async def go() -> tuple[dict[str, Any], int | None]:
        if key is not None:  # reachable before anything is signed (an SSH trial: after)
            await _agent_reachable()
        ctx = await client.preflight(args.url, args.ca, args.cert, args.key)
        # The room taken first: a certificate signed and then not written is one spent
        # for nothing (as a one-shot `hsmca renew`, a full-disk trial)
        files = client.Staged({cert: (0o644, False)}, reserve=True).prepare()
        try:
            issued = await _issue(args, ctx, "/v1/ssh/user", body)
        except BaseException:
            files.abort()
            raise
        files.commit({cert: issued["certificate"] + "\n"})
        lifetime = None
        if key is not None:
            lifetime = await _add_to_agent(key, issued["certificate"], cert)
        return issued, lifetime

    issued, lifetime = asyncio.run(go())
    until = dt.datetime.fromtimestamp(int(issued["valid_before"]), dt.UTC).isoformat()
    # ssh finds NAME-cert.pub beside the key it tries, but tries only its default key
    # names (id_ed25519, ...) unless told: say which case this is.
    private = _private_path(args.pubkey)
    # (only in ~/.ssh: an SSH trial's ./k2/id_ecdsa was said to be used automatically)
    default = private.name in _DEFAULT_KEYS and \
        private.resolve().parent == (Path.home() / ".ssh").resolve()
    how = ("ssh uses it automatically with its key" if default else
           f"use it with: ssh -i {private} (ssh finds the certificate beside the key)")
    print(f"wrote {cert} (serial {issued['serial']}, valid until {until}); {how}")
    if lifetime is not None:
        print(f"added {_private_path(args.pubkey)} and its certificate to ssh-agent for "
              f"{lifetime} s (until the certificate expires)")
    if (why := client.ending(args.cert)) is not None:
        warn(why)
    return 0


# ---- ssh host ------------------------------------------------------------------------

@dataclass(frozen=True)
class HostFiles:
    """Every file `ssh host` writes or names, by absolute path: sshd resolves a relative
    path against / (it chdirs there), so `HostKey web1/ssh/key` would load nothing."""

    host_key: Path
    pubkey: Path
    cert: Path
    user_ca: Path
    krl: Path
    drop_in: Path | None

    @classmethod
    def of(cls, pubkey: Path, install: Path | None) -> HostFiles:
        # Normalised (os.path.abspath drops "." and ".."; symbolic links are kept): the
        # drop-in names these paths to sshd, and an operator trial found
        # "/root/../etc/ssh/ssh_host_ed25519_key" written there.
        pub = Path(os.path.abspath(pubkey))
        return cls(host_key=_private_path(pub), pubkey=pub, cert=_cert_path(pub),
                   user_ca=pub.with_name(USER_CA), krl=pub.with_name(KRL),
                   drop_in=Path(os.path.abspath(install)) / DROP_IN
                   if install is not None else None)

    def sshd_lines(self) -> str:
        """The drop-in's lines. Once any HostKey is set, sshd offers only the keys named,
        so every host key it would offer by default (each ssh_host_*_key beside this one,
        with its .pub) is named, not this one alone (an SSH trial: Debian's sshd stopped
        offering its RSA and ECDSA keys), with the certificate of each that has one: a
        second key's --install keeps the first's (it is what each rewrites)."""
        keys = _host_keys(self.host_key)
        certs = [_cert_path(k.with_name(k.name + ".pub")) for k in keys]
        return ("".join(f"HostKey {k}\n" for k in keys)
                + "".join(f"HostCertificate {c}\n" for c in certs
                          if c == self.cert or c.is_file())
                + f"TrustedUserCAKeys {self.user_ca}\nRevokedKeys {self.krl}\n")


def _host_keys(host_key: Path) -> list[Path]:
    """`host_key`, and the other keys sshd offers by default beside it: the
    ssh_host_*_key files of its directory that have their .pub."""
    keys = {host_key}
    if host_key.name.startswith("ssh_host_") and host_key.name.endswith("_key"):
        keys |= {k for k in host_key.parent.glob("ssh_host_*_key")
                 if k.with_name(k.name + ".pub").is_file()}
    return sorted(keys)


async def _fetch_trust(url: str, anon: ssl.SSLContext) -> tuple[dict[str, Any], bytes]:
    from ca import client
    cas = await client.call("GET", f"{url}/v1/ssh/ca", anon)
    krl = await client.get_raw(f"{url}/v1/ssh/krl", anon)
    return cas, krl


KRL_MAGIC = b"SSHKRL\n\0"


def _meaning(data: bytes) -> bytes:
    """What a file says, for deciding whether it changed: a KRL without its version and
    generation time (bytes 12-28 of its header), which differ between two builds of the
    same list, for example by two of the daemon's worker processes."""
    if data.startswith(KRL_MAGIC) and len(data) >= 28:
        return data[:12] + data[28:]
    return data


def _write_if_changed(files: dict[Path, bytes]) -> list[str]:
    """Atomically replace the files whose content differs; the names of those."""
    from ca.client import Staged, not_regular
    for path in files:
        not_regular(path)  # before it is read to compare
    changed = {p: d for p, d in files.items()
               if not p.exists() or _meaning(p.read_bytes()) != _meaning(d)}
    if changed:
        staged = Staged({p: (0o644, False) for p in changed}).prepare()
        staged.commit(dict(changed))
    return [str(p) for p in changed]


def _check_host_paths(f: HostFiles) -> None:
    if f.drop_in is not None:
        directory = f.drop_in.parent
        if not (directory.is_dir() or (not directory.exists() and directory.parent.is_dir())):
            raise CLIError(f"--install {directory} is not a directory (sshd_config "
                           "must Include it, e.g. /etc/ssh/sshd_config.d)")
        if not f.host_key.is_file():
            raise CLIError(f"the host's private key {f.host_key} is missing; the drop-in's "
                           "HostKey must name it (give --pubkey beside its private key)")


def _new_drop_in_dir(f: HostFiles) -> Path | None:
    """The drop-in directory, made now if it is not there (in an existing one, writable
    by its owner only, as sshd expects); None if it was there."""
    if f.drop_in is None or f.drop_in.parent.exists():
        return None
    f.drop_in.parent.mkdir(mode=0o755)
    return f.drop_in.parent


async def _host_once(args: argparse.Namespace, f: HostFiles) -> dict[str, Any]:
    """Certify the host key and write certificate, user CA, KRL and drop-in."""
    from ca import client
    ctx = await client.preflight(args.url, args.ca, args.cert, args.key)
    targets = [f.cert, f.user_ca, f.krl] + ([f.drop_in] if f.drop_in else [])
    made = _new_drop_in_dir(f)
    try:
        staged = client.Staged({p: (0o644, False) for p in targets}, reserve=True).prepare()
        try:
            body = {"principals": args.principal} if args.principal else {}
            issued = await _issue(args, ctx, "/v1/ssh/host", body)
            cas, krl = await _fetch_trust(args.url, client.ssl_context(args.ca))
        except BaseException:
            staged.abort()
            raise
    except BaseException:
        # Not left behind by a run that wrote nothing in it (a trial found the
        # directory of a refused first run, which looked as if it had been set up).
        if made is not None:
            with contextlib.suppress(OSError):
                made.rmdir()
        raise
    if made is not None:
        # sshd reads it only if sshd_config Includes it: said, since a mistyped path
        # would otherwise pass unnoticed.
        print(f"hsmca: made {made}: sshd reads it only if sshd_config has "
              f"`Include {made}/*.conf` (Debian's includes /etc/ssh/sshd_config.d)",
              file=sys.stderr)
    data: dict[Path, bytes | str] = {f.cert: issued["certificate"] + "\n",
                                     f.user_ca: cas["user"] + "\n", f.krl: krl}
    if f.drop_in is not None:
        data[f.drop_in] = ("# Written by `hsmca ssh host --install`; rewritten on renewal.\n"
                           + f.sshd_lines())
    staged.commit(data)
    return {"serial": issued["serial"], "host_ca": cas["host"],
            "valid_before": int(issued["valid_before"])}


def known_hosts(args: argparse.Namespace) -> int:
    """`hsmca ssh known-hosts`: the client side of host certificates. The host CA's
    `@cert-authority` lines for --hosts (every key not retired: during a rotation the
    old and the new), and with --krl the KRL for RevokedHostKeys. Written to files of
    their own, atomically and only when they changed, for a timer to run."""
    from ca import client
    patterns = ",".join(args.hosts)
    if any(c.isspace() for c in patterns) or not patterns:
        raise CLIError(f"--hosts {patterns!r}: known_hosts patterns, without spaces, such "
                       "as '*.example.com' (repeat --hosts for more)")
    for path in (args.out, args.krl):
        if path is not None:
            client.not_regular(path)
    if any(p in ("*", "*.*") for p in args.hosts):
        print(f"hsmca: warning: --hosts {patterns!r} trusts the host CA for every host "
              "name ssh connects to, those of hosts outside this CA too; give your hosts' "
              "domains (e.g. '*.example.com')", file=sys.stderr)
    cas, krl = asyncio.run(_fetch_trust(args.url, client.ssl_context(args.ca)))
    lines = _cert_authority_lines(patterns, str(cas["host"]))
    text = ("# Written by `hsmca ssh known-hosts`: the host CA keys of "
            f"{args.url}, for {patterns}\n" + "".join(f"{line}\n" for line in lines))
    if args.out is None:
        print(text, end="")
    files = {**({args.out: text.encode()} if args.out else {}),
             **({args.krl: krl} if args.krl else {})}
    for changed in _write_if_changed(files):
        # ssh_config's paths as absolute ones: ssh runs from anywhere (an SSH trial got
        # the relative path it had typed)
        where = Path(changed).absolute()
        print(f"wrote {changed}; ssh reads it with " + (
            f"GlobalKnownHostsFile /etc/ssh/ssh_known_hosts {where}"
            if changed == str(args.out) else f"RevokedHostKeys {where}"), file=sys.stderr)
    return 0


def _cert_authority_lines(patterns: str, host_ca: str) -> list[str]:
    """known_hosts lines for the host CA keys /v1/ssh/ca gives, one per key: a key line
    without the marker and pattern is one ssh ignores."""
    return [f"@cert-authority {patterns} {line.strip()}" for line in host_ca.splitlines()
            if line.strip()]


def revoke(args: argparse.Namespace) -> int:
    """`hsmca ssh revoke`: POST /v1/ssh/revoke with the admin credential."""
    from ca import client
    from ca.commands.client_cmd import _admin
    if args.pubkey is not None and _is_ssh_cert(args.pubkey):
        raise CLIError(f"--pubkey {args.pubkey} is an SSH certificate: --ssh-cert "
                       f"{args.pubkey} revokes that certificate; --pubkey with the key it "
                       "certifies revokes every certificate for that key")
    given = [x for x in (args.serial, args.key_id, args.ssh_cert, args.pubkey)
             if x is not None]
    if args.serial_given is not None:
        if given:
            raise CLIError("give the SERIAL alone or one of --serial, --key-id, --ssh-cert "
                           "and --pubkey, not both")
        args.serial = args.serial_given
    elif not given:
        raise CLIError("give the SERIAL to revoke (decimal, as ssh-keygen -L prints it), or "
                       "--key-id ID, --ssh-cert FILE or --pubkey FILE")
    url, ctx = _admin(args)
    body: dict[str, Any] = (
        {"serial": args.serial} if args.serial is not None else
        {"key_id": args.key_id} if args.key_id is not None else
        # By its key id (<identity>:<serial>), not its serial alone, and only once it is
        # known to be this CA's: see _this_cas.
        {"key_id": _this_cas(args.ssh_cert, asyncio.run(client.call(
            "GET", f"{url}/v1/ssh/ca", ctx)), lambda: asyncio.run(client.call(
                "GET", f"{url}/v1/keys", ctx))["keys"]).key_id.decode(errors="replace")}
        if args.ssh_cert is not None else
        {"public_key": read_public_key(args.pubkey, any_kind=True)})
    out = asyncio.run(client.call("POST", f"{url}/v1/ssh/revoke", ctx, json_body=body))
    hit = out["revoked_certificates"]
    committed = out.get("committed", True)
    print(f"revoked {hit} SSH certificate(s)"
          + (f"; the key {out['revoked_key']} (SHA-256) is refused "
             + ("from now on" if committed else "once the inventory takes it")
             if out.get("revoked_key") else "")
          + ("; the KRL lists them now: sshd refuses a user certificate from its host's "
             "next refresh of it (`ssh host --renew --refresh`, 5 minutes by default), and "
             "clients a host certificate from theirs (`ssh known-hosts --krl`); sessions "
             "already open stay open: end them on the hosts" if committed else ""))
    if hit and "public_key" not in body:
        # An SSH trial revoked a host's certificate by serial and believed the host cut
        # off; its `ssh host --renew` had a new one at its next renewal.
        print("note: its holder may ask for another with the credential it has (a host's "
              "`ssh host --renew` does, at its next renewal or restart); to keep it out, "
              "revoke that credential (hsmca revoke --identity NAME) or the key (hsmca ssh "
              "revoke --pubkey FILE)", file=sys.stderr)
    for warning in out.get("warnings", []):
        warn(warning)
    return 0


def list_certs(args: argparse.Namespace) -> int:
    """`hsmca ssh list`: GET /v1/inventory/ssh-certificates with the admin credential."""
    from urllib.parse import urlencode

    from ca.commands.client_cmd import admin_call
    from ca.commands.output import table
    query = {"limit": str(max(1, min(args.limit, 500)))}
    for name, value in (("q", args.search), ("type", args.type), ("status", args.status)):
        if value:
            query[name] = value
    page = admin_call(args, "GET", f"/v1/inventory/ssh-certificates?{urlencode(query)}")
    shown = table(page["certificates"], "no SSH certificate matches", [
        ("SERIAL", 20, lambda c: c["serial"]), ("TYPE", 4, lambda c: c["type"]),
        ("STATUS", 8, lambda c: c["status"]),
        ("CA_KEY", 9, lambda c: c.get("ca_key_state") or "-"),
        ("VALID_BEFORE", 25, lambda c: c["valid_before"]),
        ("KEY_ID", 0, lambda c: f"{c['key_id']}  [{_principals(c['principals'])}]")])
    if page["total"] > len(page["certificates"]):
        print(f"({page['total']} match; the newest {len(page['certificates'])} shown: "
              "narrow with --search, --type or --status, or raise --limit)")
    if any(c.get("ca_key_state") in ("retired", "destroyed") and c["status"] in (
            "valid", "expiring") for c in page["certificates"]):
        print("(CA_KEY retired or destroyed: valid by its dates, and refused by the hosts "
              "and clients that refreshed the SSH CA keys they trust from /v1/ssh/ca)")
    return shown


PRINCIPALS_SHOWN = 120  # characters of a row's principals


def _principals(names: list[str]) -> str:
    """A row's principals, cut short with their count past PRINCIPALS_SHOWN characters:
    61 principals of 256 characters made one row of 15 KB (an SSH trial); `ssh list
    --search` finds a certificate by any of them, and the API lists them all."""
    shown = ",".join(names)
    if len(shown) <= PRINCIPALS_SHOWN:
        return shown
    return f"{shown[:PRINCIPALS_SHOWN]}... ({len(names)} in all)"


def host(args: argparse.Namespace) -> int:
    read_public_key(args.pubkey)
    f = HostFiles.of(args.pubkey, args.install)
    _check_host_paths(f)
    if args.exec and not args.renew:
        raise CLIError("--exec runs after each renewal: it needs --renew")
    if args.refresh is not None and not args.renew:
        raise CLIError("--refresh says how often --renew fetches the KRL and the user CA "
                       "key: it needs --renew")
    args.refresh = args.refresh or DEFAULT_REFRESH_S
    if args.renew:
        from ca.commands.renewal import hold_sighup
        hold_sighup()
    from ca.client import ClientError
    try:
        out = asyncio.run(_host_once(args, f))
    except ClientError as exc:
        # --renew on a host whose X.509 credential expired (off for a weekend): its SSH
        # certificate may still be good for weeks, and sshd must keep getting the KRL.
        valid_before = _ssh_cert_times(f.cert)[1] if args.renew and f.cert.exists() else None
        if valid_before is None or valid_before <= dt.datetime.now(dt.UTC):
            if args.renew and not exc.retryable:
                # What retrying cannot fix (a refusal; a revoked, expired or foreign
                # credential): exit 3, which the documented unit does not restart, as
                # `renew --daemon` (an SSH trial: exit 1, restarted every minute).
                from ca.errors import GaveUp
                raise GaveUp(str(exc)) from None
            raise
        # When: at its time (two thirds into its life), which may be weeks away; the
        # warning said "every 10 minutes", which only a refusal gets, once it is due
        # (a trial waited for a retry that the log had scheduled days later).
        again = ("with back-off while the CA cannot be reached" if exc.retryable else
                 "every 10 minutes while the CA refuses")
        print(f"hsmca: warning: {exc}; {f.cert} is valid until {valid_before.isoformat()}: "
              "keeping the KRL and the user CA fresh, and renewing the certificate when it "
              f"is due (the ssh.host.renew.scheduled line says when), {again}",
              file=sys.stderr, flush=True)
        return _keep_host_fresh(args, f, refresh_now=True)
    wrote = [f.cert, f.user_ca, f.krl] + ([f.drop_in] if f.drop_in else [])
    print(f"wrote {', '.join(map(str, wrote))} (serial {out['serial']}).")
    if f.drop_in is not None:
        print(f"{f.drop_in} holds these lines; sshd reads it if sshd_config has "
              f"'Include {f.drop_in.parent}/*.conf' (check with sshd -t, then reload sshd):")
    else:
        print("Add to sshd_config:")
    print("".join(f"  {line}\n" for line in f.sshd_lines().splitlines()), end="")
    # One line per host CA key: during a rotation /v1/ssh/ca lists two, and a key on a
    # line without the marker and pattern is one ssh ignores.
    pattern = _known_hosts_pattern(f.cert)
    print("and to clients' known_hosts (the host CA vouches only for the names it "
          "certifies, but a pattern as narrow as your hosts' keeps it so):\n" + "".join(
              f"  {line}\n" for line in _cert_authority_lines(pattern, str(out["host_ca"]))),
          end="",
          flush=True)
    if args.renew:  # sshd loads the certificate just written only when reloaded
        return _keep_host_fresh(args, f, written=True)
    return 0


# The keys ssh tries without -i or IdentityFile (ssh(1), -i).
_DEFAULT_KEYS = frozenset({"id_rsa", "id_ecdsa", "id_ecdsa_sk", "id_ed25519", "id_ed25519_sk",
                           "id_dsa", "id_xmss"})


def _known_hosts_pattern(cert_path: Path) -> str:
    """The known_hosts pattern for the host CA from this host's names: *.example.com
    for web1.example.com, the name itself for a single-label one (localhost)."""
    from cryptography.hazmat.primitives import serialization
    cert = serialization.load_ssh_public_identity(cert_path.read_bytes())
    names = [p.decode() for p in getattr(cert, "valid_principals", [])]
    return ",".join(sorted({_pattern(n) for n in names})) or "*"


def _pattern(name: str) -> str:
    """web1.example.com -> *.example.com; a name of one or two labels, or an address,
    stays itself (*.com would trust the host CA for a whole top-level domain)."""
    try:
        ipaddress.ip_address(name)
        return name
    except ValueError:
        pass
    return f"*.{name.split('.', 1)[1]}" if name.count(".") >= 2 else name


def _keep_host_fresh(args: argparse.Namespace, f: HostFiles, refresh_now: bool = False,
                     written: bool = False) -> int:
    """--renew: the host certificate at two thirds of its lifetime; the user CA and the
    KRL every --refresh (sshd reads both at each login, so no reload is needed for
    them; --exec runs after a new host certificate, which sshd loads on reload)."""
    from ca import client
    from ca.commands.renewal import Job, now, renew_time, run_forever
    schedule: dict[tuple[dt.datetime, dt.datetime], dt.datetime] = {}
    next_refresh = [now() + dt.timedelta(seconds=0 if refresh_now else args.refresh)]

    # A host certificate the KRL revokes is renewed at once once the host is enrolled
    # again, as the warning says (its credential is another, and the CA takes it), not
    # weeks later at its time: an SSH trial kept serving the revoked one until a
    # restart. Not at once with the credential it had (docs/ssh.md: revoking a host
    # certificate does not keep the host out; a SIGHUP, forcing a renewal, does renew
    # it with that credential: revoke the credential to keep the host out).
    revoked_span: list[tuple[dt.datetime, dt.datetime] | None] = [None]
    revoked_under: dict[tuple[dt.datetime, dt.datetime], int | None] = {}
    renew_now = asyncio.Event()

    def credential() -> int | None:
        try:
            return int(client.load_certificates(args.cert, "--cert")[0].serial_number)
        except client.ClientError:
            return None

    def cert_due() -> dt.datetime:
        span = _ssh_cert_times(f.cert)
        if span == revoked_span[0]:
            return now()
        if span not in schedule:
            schedule.clear()
            schedule[span] = renew_time(*span)
        return schedule[span]

    async def renew_cert() -> dict[str, Any]:
        out = await _host_once(args, f)
        return {"serial": out["serial"], "valid_before": out["valid_before"]}

    def cert_left() -> float | None:
        return (_ssh_cert_times(f.cert)[1] - now()).total_seconds()

    said: dict[str, object] = {}  # what was warned of, so each is said once a change

    def warn_once(what: str, state: object, event: str, **fields: Any) -> None:
        if said.get(what) != state and state:
            import structlog
            structlog.get_logger().bind(command="ssh host", cert=str(f.cert)).warning(
                event, **fields)
        said[what] = state

    async def refresh() -> dict[str, Any]:
        cas, krl = await _fetch_trust(args.url, client.ssl_context(args.ca))
        changed = _write_if_changed({f.user_ca: (cas["user"] + "\n").encode(), f.krl: krl})
        next_refresh[0] = now() + dt.timedelta(seconds=args.refresh)
        fields: dict[str, Any] = {"changed": changed}
        # A revocation of this host reaches it only as a KRL line and a refusal at its
        # next renewal, weeks away: say so now, once, where the operator looks.
        checked = _ssh_cert_times(f.cert)
        revoked = await asyncio.to_thread(_revoked_in_krl, f.krl, f.cert)
        try:
            await client.call("GET", f"{args.url}/v1/whoami",
                              client.ssl_context(args.ca, args.cert, args.key))
            standing = None
        except client.ClientError as exc:
            standing = str(exc) if exc.status in (401, 403) else None
        if revoked and _ssh_cert_times(f.cert) != checked:
            # The renewal job replaced the certificate meanwhile: ask about the new one
            # (an SSH trial's log said "revoked" just after the revoked one was replaced)
            revoked = await asyncio.to_thread(_revoked_in_krl, f.krl, f.cert)
        if revoked:
            fields["host_certificate"] = "revoked"
        warn_once("host", revoked and _ssh_cert_times(f.cert), "ssh.host.revoked",
                  detail=f"{f.cert} is in the KRL: clients that check the KRL refuse this "
                  "host. Ask an admin why: if its host key leaked, make a new host key and "
                  "certify it; else enroll the host again (a new credential), and the next "
                  "refresh renews the host certificate")
        warn_once("credential", standing, "ssh.host.credential.refused", error=standing,
                  detail=f"the CA no longer takes {args.cert}: the host certificate cannot "
                  "be renewed until the host is enrolled again")
        span, holder = _ssh_cert_times(f.cert), credential()
        first = revoked_under.setdefault(span, holder) if revoked else None
        was = revoked_span[0]
        revoked_span[0] = span if (revoked and standing is None
                                   and holder not in (first, None)) else None
        if revoked_span[0] is not None and revoked_span[0] != was:
            # Once, when it becomes so: a wake ends a refused renewal's pause too, and a
            # renewal refused again would otherwise be tried at every refresh (a review).
            renew_now.set()
        return fields

    # The host certificate's job keeps going when it cannot renew (an expired X.509
    # credential needs a person): the KRL and the user CA must still come.
    jobs = [Job("ssh.host.renew", cert_due, renew_cert, cert_left, hook=args.exec,
                hook_env=lambda: {"HSMCA_SSH_CERT": str(f.cert)},
                hook_timeout_s=args.exec_timeout, keeps_going=True, hook_at_start=written,
                wake=renew_now, identity=lambda: _ssh_cert_identity(f.cert),
                # (not "enroll again": the X.509 credential may be good, and the next try
                # renew it by itself once the CA answers, as an SSH trial's did)
                expired=f"the host certificate {f.cert} has expired while it could not "
                "be renewed: clients refuse this host until it is; the next try renews it "
                f"with {args.cert} (if the CA refuses that, enroll the host again)"),
            # Its back-off at most --refresh: after an outage the KRL came minutes after
            # the CA was back (an SSH trial), where an operator asked for it every minute
            Job("ssh.refresh", lambda: next_refresh[0], refresh, lambda: None,
                max_backoff_s=args.refresh)]
    return run_forever(jobs, command="ssh host", cert=str(f.cert))


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from ca.commands.args import duration, exec_timeout_flag, ssh_serial
    from ca.commands.client_cmd import admin_flags, credential_flags
    from ca.inventory_terms import CERT_STATUSES
    s = sub.add_parser("ssh", help="SSH host and user certificates")
    ssub = s.add_subparsers(dest="ssh_command", metavar="SUBCOMMAND", required=True)

    def common(p: argparse.ArgumentParser, default_pub: str) -> None:
        p.add_argument("--url", required=True, help="daemon URL, e.g. https://ca.example:8443")
        credential_flags(p, "your hsmca client certificate (from `hsmca enroll`)")
        p.add_argument("--ca", type=Path, help="root CA PEM to trust the daemon with "
                       "(default: the system's CAs)")
        p.add_argument("--pubkey", type=Path, default=Path(default_pub).expanduser(),
                       help=f"SSH public key to certify (default {default_pub}); the "
                       "certificate is written beside it as <key>-cert.pub. A private key "
                       "is refused before anything is sent")
        p.add_argument("--principal", nargs="+", action="extend", metavar="PRINCIPAL",
                       help="principals to ask for (default: all you may get)")

    h = ssub.add_parser("host", help="certify this host's SSH key (role host)",
                        description="Get an SSH host certificate for the host's enrolled "
                        "DNS names and addresses, the SSH user CA key and the KRL, write them "
                        "beside the host key and print the sshd_config lines to use them, "
                        "with absolute "
                        "paths. --install writes those lines as an sshd drop-in; --renew "
                        "then keeps running to keep all of it fresh.")
    common(h, "/etc/ssh/ssh_host_ed25519_key.pub")
    h.add_argument("--install", type=Path, metavar="DIR",
                   help=f"write the sshd_config lines to DIR/{DROP_IN} (e.g. "
                   "/etc/ssh/sshd_config.d, which Debian's sshd_config includes)")
    h.add_argument("--renew", action="store_true",
                   help="keep running: renew the host certificate at two thirds of its "
                   "lifetime and refresh the user CA key and the KRL every --refresh; "
                   "SIGHUP does all three at once, SIGTERM stops it")
    h.add_argument("--refresh", type=duration, metavar="DURATION",
                   help="with --renew: how often to fetch the KRL and the user CA key "
                   "(default 5m)")
    h.add_argument("--exec", metavar="CMD",
                   help="with --renew: shell command after each new host certificate (the "
                   "one written at start too), e.g. "
                   "'systemctl reload ssh'")
    exec_timeout_flag(h)
    h.set_defaults(command_key="ssh-host")
    u = ssub.add_parser("user", help="get a short-lived SSH user certificate (role user)",
                        description="Get an SSH user certificate for the key in --pubkey, "
                        "for the logins granted to you, and write it beside the key. With "
                        "--agent, also load key and certificate into ssh-agent until the "
                        "certificate expires.")
    common(u, "~/.ssh/id_ed25519.pub")
    u.add_argument("--ttl", help="lifetime to ask for, e.g. 8h (default: the CA's "
                   "policy.ssh-user-default-ttl-s, 16h unless configured; at most "
                   "policy.ssh-user-max-ttl-s, 24h unless configured)")
    u.add_argument("--agent", action="store_true",
                   help="add the private key beside --pubkey and the new certificate to the "
                   "running ssh-agent (SSH_AUTH_SOCK), for the certificate's lifetime, in "
                   "place of earlier ones this CA made for the key and identity")
    u.add_argument("--source-address", dest="source_address", action="append",
                   metavar="CIDR", help="log in only from this address or network "
                   "(the certificate's source-address option); repeat for more")
    u.set_defaults(command_key="ssh-user")
    k = ssub.add_parser(
        "known-hosts", help="the host CA keys for clients' known_hosts, and the KRL",
        description="For SSH clients: fetch the host CA keys (GET /v1/ssh/ca) and write "
        "one @cert-authority line per key not retired for the --hosts patterns, to --out "
        "(a file of its own, for ssh_config's GlobalKnownHostsFile or UserKnownHostsFile) "
        "or stdout; with --krl, also the KRL (GET /v1/ssh/krl) for RevokedHostKeys. "
        "Needs no client certificate. Files are replaced atomically and only when they "
        "changed: run it from a timer, as hosts run ssh host --renew.")
    k.add_argument("--url", required=True, help="daemon URL, e.g. https://ca.example:8443")
    k.add_argument("--ca", type=Path, help="root CA PEM to trust the daemon with "
                   "(default: the system's CAs)")
    k.add_argument("--hosts", action="append", required=True, metavar="PATTERN",
                   help="the hosts whose certificates the host CA vouches for, as a "
                   "known_hosts pattern, e.g. '*.example.com'; repeat for more")
    k.add_argument("--out", type=Path, metavar="FILE",
                   help="write the lines to FILE (default: print them)")
    k.add_argument("--krl", type=Path, metavar="FILE",
                   help="also write the KRL to FILE, for ssh_config's RevokedHostKeys")
    k.set_defaults(command_key="ssh-known-hosts")
    v = ssub.add_parser("revoke", help="revoke SSH certificates (admin)",
                        description="Revoke SSH certificates with the admin credential of "
                        "--config: one by its serial, its key id or its file, or every one for "
                        "a public key (that key is then refused in every later certificate too). "
                        "This does not stop the holder from asking for another: to cut a "
                        "person or host off, revoke its X.509 credential (hsmca revoke "
                        "--identity NAME), which revokes its SSH certificates too. The KRL "
                        "(/v1/ssh/krl) lists them at once; hosts that run `hsmca ssh host "
                        "--renew` fetch it every --refresh.")
    # The serial alone works too, as `hsmca revoke SERIAL` takes it (a new user's trial
    # typed `hsmca ssh revoke 1094...` and was told a flag was required)
    v.add_argument("serial_given", nargs="?", type=ssh_serial, metavar="SERIAL",
                   help="the certificate's serial, as --serial")
    which = v.add_mutually_exclusive_group()
    which.add_argument("--serial", type=ssh_serial, metavar="N",
                       help="the certificate's serial (decimal, as ssh-keygen -L prints it)")
    which.add_argument("--key-id", metavar="ID",
                       help="its key id (<identity>:<its serial>, as ssh-keygen -L and "
                       "sshd's log print it)")
    which.add_argument("--ssh-cert", type=Path, metavar="FILE",
                       help="an SSH certificate file (<key>-cert.pub): that certificate")
    which.add_argument("--pubkey", type=Path, metavar="FILE",
                       help="an SSH public key: every certificate for it, and any later one")
    admin_flags(v)
    v.set_defaults(command_key="ssh-revoke")
    ls = ssub.add_parser(
        "list", help="the SSH certificates the CA issued (admin)",
        description="List SSH certificates from the inventory, newest first: serial "
        "(decimal, as ssh-keygen -L prints it), type, status, the state of the CA key "
        "that signed it (a retired key's certificates are refused wherever the trusted "
        "CA keys were refreshed), validBefore, key id, principals. --search matches key "
        "ids, principals, serials and the key's SHA256: fingerprint (ssh-keygen -l).")
    ls.add_argument("--search", metavar="TEXT",
                    help="a key id, a principal, part of one, a serial, or a public key's "
                    "fingerprint (SHA256:..., as ssh-keygen -l prints it)")
    ls.add_argument("--type", choices=("host", "user"), help="only host or user certificates")
    ls.add_argument("--status", choices=CERT_STATUSES,
                    help="only these (expiring: in its last 7 days, or in its last third "
                    "when that is shorter)")
    ls.add_argument("--limit", type=positive, default=50, help="at most this many (default 50)")
    admin_flags(ls)
    ls.set_defaults(command_key="ssh-list")

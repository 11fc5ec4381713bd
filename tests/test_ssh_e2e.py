"""SSH host and user certificates used by real OpenSSH, and revocation sshd enforces."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tests.conftest import Daemon, hsmca, require
from tests.helpers import enroll, http, whole_lines
from tests.ports import free_port

pytestmark = pytest.mark.asyncio(loop_scope="session")


def keygen(path: Path) -> Path:
    subprocess.run([require("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f", path],
                   check=True)
    return path.with_name(path.name + ".pub")


class SSHD:
    def __init__(self, tmp: Path, host_key: Path, host_cert: Path, user_ca: Path,
                 krl: Path) -> None:
        self.port = free_port()
        cfg = tmp / "sshd_config"
        cfg.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
            f"HostCertificate {host_cert}\nTrustedUserCAKeys {user_ca}\nRevokedKeys {krl}\n"
            "UsePAM no\nStrictModes no\nAuthorizedKeysFile none\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
            f"PidFile {tmp / 'sshd.pid'}\nLogLevel VERBOSE\n")
        os.makedirs("/run/sshd", exist_ok=True)
        self.proc = subprocess.Popen([require("sshd"), "-D", "-e", "-f", cfg],
                                     stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        ready = threading.Event()

        def drain() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.log.append(line)
                if "Server listening on" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(30) or self.proc.poll() is not None:
            raise AssertionError("sshd did not start:\n" + "".join(self.log))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture
def sshd_factory() -> Iterator[list[SSHD]]:
    started: list[SSHD] = []
    yield started
    for s in started:
        s.stop()


def ssh_login(port: int, known_hosts: Path, identity: Path,
              cert: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require("ssh"), "-F", "/dev/null", "-p", str(port), "-o", "BatchMode=yes",
         "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes",
         "-o", "AddressFamily=inet", "-o", "IdentitiesOnly=yes", "-o", f"IdentityFile={identity}",
         "-o", f"CertificateFile={cert}", "-o", "ConnectTimeout=20",
         "root@localhost", "echo", "logged-in-with-cert"],
        capture_output=True, text=True, timeout=60)


def krl_check(krl: Path, *files: Path) -> dict[Path, str]:
    """What `ssh-keygen -Q` says of each certificate or key: "ok" or "REVOKED"."""
    proc = subprocess.run([require("ssh-keygen"), "-Q", "-f", krl, *files],
                          capture_output=True, text=True)
    lines = proc.stdout.splitlines()  # "<file>[ (<comment>)]: <verdict>", one per file
    assert len(lines) == len(files), proc.stdout + proc.stderr
    verdicts = {}
    for f, line in zip(files, lines, strict=True):
        assert line.startswith((f"{f}: ", f"{f} (")), (f, line)
        verdicts[f] = line.rsplit(": ", 1)[1]
    return verdicts


async def test_host_and_user_certificates_with_real_openssh(
        own_daemon: Daemon, tmp_path: Path, sshd_factory: list[SSHD]) -> None:
    daemon = own_daemon  # it revokes a certificate
    # The host enrolls, then certifies its SSH host key with the CLI.
    host_cert, host_key = enroll(daemon, tmp_path, "host", ["localhost"])
    host_pub = keygen(tmp_path / "ssh_host_ed25519_key")
    proc = hsmca("ssh", "host", "--url", daemon.url, "--ca", daemon.root, "--cert", host_cert,
                 "--key", host_key, "--pubkey", host_pub)
    ssh_host_cert = tmp_path / "ssh_host_ed25519_key-cert.pub"
    assert f"HostCertificate {ssh_host_cert}" in proc.stdout
    listing = subprocess.run([require("ssh-keygen"), "-L", "-f", ssh_host_cert],
                             capture_output=True, text=True, check=True).stdout
    assert "host certificate" in listing and "localhost" in listing

    # A person enrolls with the logins they may use and gets a short-lived certificate.
    user_cert, user_key = enroll(daemon, tmp_path, "user", ["alice@example.com"],
                                         ["root"])
    serials = []
    for name in ("id_ed25519", "other_ed25519"):  # the second is never revoked: a control
        pub = keygen(tmp_path / name)
        hsmca("ssh", "user", "--url", daemon.url, "--ca", daemon.root, "--cert", user_cert,
              "--key", user_key, "--pubkey", pub, "--ttl", "1h")
        listing = subprocess.run([require("ssh-keygen"), "-L", "-f",
                                  tmp_path / f"{name}-cert.pub"],
                                 capture_output=True, text=True, check=True).stdout
        assert 'Key ID: "alice@example.com:' in listing
        serials.append(listing.split("Serial: ")[1].split()[0])
        # What it permits is in its intent line too, as ssh-keygen reads it from the
        # certificate: a reload may change them (an SSH trial's auditor could not tell)
        [intent] = [e for e in map(json.loads, whole_lines(
            (daemon.state / "audit" / "log.jsonl").read_bytes()))
            if e.get("purpose") == "ssh-user" and e.get("phase") == "intent"
            and e.get("serial") == serials[-1]]
        permits = listing.split("Extensions:")[1].split()
        assert permits and intent["extensions"] == sorted(permits), (intent, listing)
    serial = serials[0]
    ssh_user_cert = tmp_path / "id_ed25519-cert.pub"
    other_cert = tmp_path / "other_ed25519-cert.pub"

    krl = tmp_path / "revoked.krl"
    status, _, body = await http("GET", f"{daemon.url}/v1/ssh/krl", daemon.ssl())
    assert status == 200
    krl.write_bytes(body)
    status, _, body = await http("GET", f"{daemon.url}/v1/ssh/ca", daemon.ssl())
    cas = json.loads(body)
    known_hosts = tmp_path / "known_hosts"
    sshd = SSHD(tmp_path, tmp_path / "ssh_host_ed25519_key", ssh_host_cert,
                tmp_path / "hsmca_user_ca.pub", krl)
    sshd_factory.append(sshd)
    known_hosts.write_text(f"@cert-authority [localhost]:{sshd.port} {cas['host']}\n")

    assert krl_check(krl, ssh_user_cert, other_cert) == {ssh_user_cert: "ok",
                                                         other_cert: "ok"}
    login = ssh_login(sshd.port, known_hosts, tmp_path / "id_ed25519", ssh_user_cert)
    assert login.returncode == 0 and "logged-in-with-cert" in login.stdout, (
        login.stderr + "".join(sshd.log))
    assert f'ID alice@example.com:{serial}' in "".join(sshd.log)  # sshd logs the key id

    # Revoke the user certificate; the refreshed KRL makes sshd refuse the same login.
    status, _, body = await http("POST", f"{daemon.url}/v1/ssh/revoke", daemon.admin_ssl(),
                                 body={"serial": serial})
    assert status == 200 and json.loads(body)["revoked_certificates"] == 1
    # Again (a retry): already revoked, told apart from a serial never issued.
    for asked, status_, kind in ((serial, 409, "already-revoked"), ("1", 404, "not-found")):
        status, _, body = await http("POST", f"{daemon.url}/v1/ssh/revoke",
                                     daemon.admin_ssl(), body={"serial": asked})
        assert status == status_ and json.loads(body)["type"].endswith(kind), body
    status, _, body = await http("GET", f"{daemon.url}/v1/ssh/krl", daemon.ssl())
    krl.write_bytes(body)
    assert krl_check(krl, ssh_user_cert, other_cert) == {ssh_user_cert: "REVOKED",
                                                         other_cert: "ok"}
    login = ssh_login(sshd.port, known_hosts, tmp_path / "id_ed25519", ssh_user_cert)
    assert login.returncode == 255 and "Permission denied" in login.stderr, login.stderr
    # The same sshd, with the same KRL, still lets the certificate that was not revoked in.
    login = ssh_login(sshd.port, known_hosts, tmp_path / "other_ed25519", other_cert)
    assert login.returncode == 0 and "logged-in-with-cert" in login.stdout, (
        login.stderr + "".join(sshd.log))


async def test_ssh_revoke_takes_the_serial_alone(daemon: Daemon, tmp_path: Path) -> None:
    """A new user's trial typed `hsmca ssh revoke 1094...`, as `hsmca revoke SERIAL`
    takes it, and was told a flag was required."""
    user_cert, user_key = enroll(daemon, tmp_path, "user", ["sal@example.com"], ["sal"])
    pub = keygen(tmp_path / "k").read_text()
    status, _, body = await http("POST", f"{daemon.url}/v1/ssh/user",
                                 daemon.ssl(user_cert, user_key), body={"public_key": pub})
    assert status == 201, body
    serial = str(json.loads(body)["serial"])
    admin = ("--config", daemon.state / "hsmca.toml", "--url", daemon.url)
    both = hsmca("ssh", "revoke", serial, "--serial", serial, *admin, check=False)
    assert both.returncode == 1 and "not both" in both.stderr, both.stderr
    proc = hsmca("ssh", "revoke", serial, *admin)
    assert proc.stdout.startswith("revoked 1 SSH certificate(s)"), proc.stdout
    listed = hsmca("ssh", "list", "--search", "sal@example.com", *admin).stdout.splitlines()
    assert [line.split()[2] for line in listed[1:]] == ["revoked"], listed


async def test_revocation_by_key_id_and_public_key(own_daemon: Daemon, tmp_path: Path) -> None:
    daemon = own_daemon  # it revokes certificates and a key
    user_cert, user_key = enroll(daemon, tmp_path, "user", ["bob@example.com"], ["bob"])
    ctx = daemon.ssl(user_cert, user_key)
    pubs = []
    for i in range(4):  # k0 revoked by key id, k1 by public key, k2 not at all, k3 by file
        pub = keygen(tmp_path / f"k{i}").read_text()
        status, _, body = await http("POST", f"{daemon.url}/v1/ssh/user", ctx,
                                     body={"public_key": pub})
        assert status == 201, body
        issued = json.loads(body)
        (tmp_path / f"k{i}-cert.pub").write_text(issued["certificate"])
        pubs.append((pub, issued))
    # As an operator does it: `hsmca ssh revoke` with the admin credential.
    key_id = f"bob@example.com:{pubs[0][1]['serial']}"
    admin = ("--config", daemon.state / "hsmca.toml", "--url", daemon.url)
    proc = hsmca("ssh", "revoke", "--key-id", key_id, *admin)
    assert proc.stdout.startswith("revoked 1 SSH certificate(s)"), proc.stdout
    proc = hsmca("ssh", "revoke", "--pubkey", tmp_path / "k1.pub", *admin)
    assert "is refused from now on" in proc.stdout, proc.stdout
    refused = hsmca("ssh", "revoke", "--pubkey", tmp_path / "k1", *admin, check=False)
    assert refused.returncode == 1 and "holds a private key" in refused.stderr
    # The certificate file given as the key: said which flag does which, nothing revoked
    refused = hsmca("ssh", "revoke", "--pubkey", tmp_path / "k3-cert.pub", *admin, check=False)
    assert refused.returncode == 1 and f"--ssh-cert {tmp_path / 'k3-cert.pub'} revokes that " \
        "certificate" in refused.stderr, refused.stderr
    proc = hsmca("ssh", "revoke", "--ssh-cert", tmp_path / "k3-cert.pub", *admin)
    assert proc.stdout.startswith("revoked 1 SSH certificate(s)"), proc.stdout
    # Another CA's certificate carrying k2's key id (a staging CA's, say) revoked k2's
    # by that key id (an SSH trial): refused, nothing revoked
    other_ca = keygen(tmp_path / "other-ca").with_suffix("")
    forged = tmp_path / "forged.pub"
    forged.write_text(pubs[2][0])
    subprocess.run([require("ssh-keygen"), "-q", "-s", other_ca, "-I",
                    f"bob@example.com:{pubs[2][1]['serial']}", "-z",
                    str(pubs[2][1]["serial"]), "-n", "bob", forged], check=True)
    refused = hsmca("ssh", "revoke", "--ssh-cert", tmp_path / "forged-cert.pub", *admin,
                    check=False)
    assert refused.returncode == 1 and "was not signed by an SSH CA key of this CA" in \
        refused.stderr, refused.stderr
    # A leaked key of a kind the CA never certifies, which sshd still takes from plain
    # authorized_keys: listed in the KRL all the same (an SSH trial was refused it)
    legacy = []
    for name, kind in (("dsa", ["-t", "dsa"]), ("rsa1024", ["-t", "rsa", "-b", "1024"])):
        subprocess.run([require("ssh-keygen"), "-q", *kind, "-N", "", "-f",
                        tmp_path / name], check=True)
        legacy.append(tmp_path / f"{name}.pub")
        proc = hsmca("ssh", "revoke", "--pubkey", legacy[-1], *admin)
        assert "is refused from now on" in proc.stdout, proc.stdout
    status, _, krl = await http("GET", f"{daemon.url}/v1/ssh/krl", daemon.ssl())
    (tmp_path / "krl").write_bytes(krl)
    assert krl_check(tmp_path / "krl", *legacy) == {k: "REVOKED" for k in legacy}
    cert, key = (lambda i: tmp_path / f"k{i}-cert.pub"), (lambda i: tmp_path / f"k{i}.pub")
    assert krl_check(tmp_path / "krl", *(f(i) for i in range(4) for f in (cert, key))) == {
        cert(0): "REVOKED", key(0): "ok",  # by key id: the certificate, not its key
        cert(1): "REVOKED", key(1): "REVOKED",  # by key: the key and all it certifies
        cert(2): "ok", key(2): "ok",
        cert(3): "REVOKED", key(3): "ok"}  # by its file: the certificate, not its key
    # What the operator then sees of bob's certificates: `hsmca ssh list`
    listed = hsmca("ssh", "list", "--search", "bob@example.com", *admin).stdout.splitlines()
    assert listed[0].split() == ["SERIAL", "TYPE", "STATUS", "CA_KEY", "VALID_BEFORE",
                                 "KEY_ID"]
    status_of = {line.split()[0]: line.split()[2] for line in listed[1:]}
    assert {line.split()[3] for line in listed[1:]} == {"active"}, listed
    assert status_of == {str(issued["serial"]): "revoked" if i != 2 else "valid"
                         for i, (_, issued) in enumerate(pubs)}, listed
    assert all(line.endswith("[bob]") for line in listed[1:]), listed
    valid = hsmca("ssh", "list", "--status", "valid", "--type", "user", *admin).stdout
    assert str(pubs[2][1]["serial"]) in valid and str(pubs[3][1]["serial"]) not in valid
    none = hsmca("ssh", "list", "--type", "host", *admin).stdout
    assert none == "no SSH certificate matches\n"


def _line(key: Any) -> str:
    return key.public_bytes(serialization.Encoding.OpenSSH,
                            serialization.PublicFormat.OpenSSH).decode()


async def test_ssh_refusals(daemon: Daemon, tmp_path: Path) -> None:
    host_cert, host_key = enroll(daemon, tmp_path, "host", ["web1.internal.example"])
    user_cert, user_key = enroll(daemon, tmp_path, "user", ["carol@example.com"],
                                         ["carol"])
    svc_cert, svc_key = enroll(daemon, tmp_path, "service", ["svc9.internal.example"])
    good = _line(ed25519.Ed25519PrivateKey.generate().public_key())
    weak = _line(rsa.generate_private_key(65537, 1024).public_key())
    host = daemon.ssl(host_cert, host_key)
    user = daemon.ssl(user_cert, user_key)
    cases: list[tuple[str, str, Any, dict[str, Any], int, str]] = [
        ("host name not owned", "/v1/ssh/host", host,
         {"public_key": good, "principals": ["db1.internal.example"]}, 403, "not granted"),
        ("user principal not granted", "/v1/ssh/user", user,
         {"public_key": good, "principals": ["root"]}, 403, "not granted"),
        ("ttl over max", "/v1/ssh/user", user, {"public_key": good, "ttl": "48h"}, 400,
         "exceeds the maximum"),
        # ended before the agent took it, after replacing a working one (an SSH trial)
        ("ttl under a minute", "/v1/ssh/user", user, {"public_key": good, "ttl": "1s"}, 400,
         "under a minute"),
        ("weak RSA", "/v1/ssh/user", user, {"public_key": weak}, 400, "1024 bits"),
        ("DSA", "/v1/ssh/user", user, {"public_key": "ssh-dss AAAAB3NzaC1kc3MAAACBAP"}, 400,
         "DSA keys"),
        ("malformed key", "/v1/ssh/user", user, {"public_key": "ssh-ed25519 !!!"}, 400,
         "cannot be parsed"),
        ("comma principal", "/v1/ssh/user", user,
         {"public_key": good, "principals": ["carol,root"]}, 400, "without spaces or commas"),
        ("newline principal", "/v1/ssh/user", user,
         {"public_key": good, "principals": ["carol\nroot"]}, 400, "without spaces or commas"),
        ("service asks for user cert", "/v1/ssh/user", daemon.ssl(svc_cert, svc_key),
         {"public_key": good}, 403, "role user"),
        ("user asks for host cert", "/v1/ssh/host", user, {"public_key": good}, 403,
         "role host"),
        ("P-224 key", "/v1/ssh/user", user,
         {"public_key": "ecdsa-sha2-nistp224 AAAA"}, 400, "cannot be parsed"),
    ]
    for what, path, ctx, body, want, message in cases:
        status, ctype, raw = await http("POST", f"{daemon.url}{path}", ctx, body=body)
        assert status == want and ctype == "application/problem+json", (what, status, raw)
        assert message in json.loads(raw)["detail"], (what, raw)
    # ECDSA P-384 subject keys are fine.
    p384 = _line(ec.generate_private_key(ec.SECP384R1()).public_key())
    status, _, raw = await http("POST", f"{daemon.url}/v1/ssh/user", user,
                                body={"public_key": p384})
    assert status == 201, raw


async def test_a_revoked_key_gets_no_new_certificate(own_daemon: Daemon,
                                                      tmp_path: Path) -> None:
    daemon = own_daemon  # it revokes a key
    user_cert, user_key = enroll(daemon, tmp_path, "user", ["dave@example.com"],
                                         ["dave"])
    pub = keygen(tmp_path / "lost").read_text()
    status, _, body = await http("POST", f"{daemon.url}/v1/ssh/revoke", daemon.admin_ssl(),
                                 body={"public_key": pub})
    assert status == 200, body
    status, ctype, body = await http("POST", f"{daemon.url}/v1/ssh/user",
                                     daemon.ssl(user_cert, user_key), body={"public_key": pub})
    assert status == 403 and ctype == "application/problem+json"
    assert "has been revoked" in json.loads(body)["detail"]


async def test_the_cas_own_ssh_ca_keys_are_not_put_in_the_krl(own_daemon: Daemon,
                                                               tmp_path: Path) -> None:
    """A security trial revoked the user CA's own key: every sshd reading the KRL then
    refused every user certificate, those issued after it too, and nothing could take
    it out again. Both CA keys are refused, saying how to stop trusting one, and a user
    certificate issued afterwards passes the KRL."""
    daemon = own_daemon
    admin = ("--config", daemon.state / "hsmca.toml", "--url", daemon.url)
    refused = hsmca("ssh", "revoke", "--pubkey", daemon.state / "ssh" / "user_ca.pub", *admin,
                    check=False)
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1, \
        refused.stderr
    assert "this CA's own SSH user CA key" in refused.stderr and \
        "hsmca key rotate ssh-user" in refused.stderr, refused.stderr
    host_ca = (daemon.state / "ssh" / "host_ca.pub").read_text().split()
    status, _, body = await http("POST", f"{daemon.url}/v1/ssh/revoke", daemon.admin_ssl(),
                                 body={"public_key": " ".join(host_ca[:2])})
    assert status == 409 and json.loads(body)["type"].endswith("/conflict"), body
    assert "own SSH host CA key" in json.loads(body)["detail"], body
    user_cert, user_key = enroll(daemon, tmp_path, "user", ["erin@example.com"], ["erin"])
    pub = keygen(tmp_path / "erin").read_text()
    status, _, body = await http("POST", f"{daemon.url}/v1/ssh/user",
                                 daemon.ssl(user_cert, user_key), body={"public_key": pub})
    assert status == 201, body
    (tmp_path / "erin-cert.pub").write_text(json.loads(body)["certificate"])
    status, _, krl = await http("GET", f"{daemon.url}/v1/ssh/krl", daemon.ssl())
    (tmp_path / "krl").write_bytes(krl)
    assert krl_check(tmp_path / "krl", tmp_path / "erin-cert.pub") == {
        tmp_path / "erin-cert.pub": "ok"}

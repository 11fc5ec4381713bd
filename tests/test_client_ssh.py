"""`hsmca ssh user --agent`, `hsmca ssh host --install DIR [--renew]`, against a real
ssh-agent, a real sshd and a real daemon."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from ca.config import Policy
from tests.conftest import (
    HSMCA,
    Daemon,
    hsmca,
    init_ca,
    require,
    set_config,
    start_daemon,
)
from tests.helpers import Running, bootstrap_token, cert_serial, enroll, http
from tests.ports import free_port

ROOT = Path(__file__).resolve().parent.parent


def keygen(path: Path) -> Path:
    subprocess.run([require("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f", path],
                   check=True)
    return path.with_name(path.name + ".pub")


def ssh_cert(path: Path) -> serialization.SSHCertificate:
    cert = serialization.load_ssh_public_identity(path.read_bytes())
    assert isinstance(cert, serialization.SSHCertificate)
    return cert


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A real ssh-agent in the foreground; it prints its socket once it listens."""
    sock = tmp_path / "agent.sock"
    proc = subprocess.Popen([require("ssh-agent"), "-D", "-a", str(sock)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    timer = threading.Timer(30, proc.kill)  # a watchdog, not a sleep
    timer.start()
    first = proc.stdout.readline()
    timer.cancel()
    assert f"SSH_AUTH_SOCK={sock}" in first, first
    yield {**os.environ, "SSH_AUTH_SOCK": str(sock)}
    proc.terminate()
    proc.wait(timeout=30)


def test_ssh_user_agent_adds_key_and_certificate(daemon: Daemon, tmp_path: Path,
                                                 agent: dict[str, str]) -> None:
    cert, key = enroll(daemon, tmp_path, "user", ["ann@example.com"], ["ann"])
    pub = keygen(tmp_path / "id_ed25519")
    proc = hsmca("ssh", "user", "--url", daemon.url, "--ca", daemon.root, "--cert", cert,
                 "--key", key, "--pubkey", pub, "--ttl", "1h", "--agent", env=agent)
    assert "to ssh-agent for" in proc.stdout
    listed = subprocess.run([require("ssh-add"), "-L"], env=agent, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    cert_line = (tmp_path / "id_ed25519-cert.pub").read_text().split()[:2]
    key_line = pub.read_text().split()[:2]
    assert [ln.split()[:2] for ln in listed] == [cert_line, key_line]
    # The lifetime given to the agent is the certificate's (printed, at most 1 h).
    lifetime = int(proc.stdout.split("to ssh-agent for ")[1].split()[0])
    c = ssh_cert(tmp_path / "id_ed25519-cert.pub")
    assert 0 < lifetime <= c.valid_before - c.valid_after - 60
    # Again (the next morning, or after a rotation of the user CA): the new certificate
    # replaces the earlier one in the agent instead of piling up beside it, which ssh
    # then offered first (an operator trial)
    hsmca("ssh", "user", "--url", daemon.url, "--ca", daemon.root, "--cert", cert,
          "--key", key, "--pubkey", pub, "--ttl", "1h", "--agent", env=agent)
    listed = subprocess.run([require("ssh-add"), "-L"], env=agent, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    newer = (tmp_path / "id_ed25519-cert.pub").read_text().split()[:2]
    assert newer != cert_line
    assert sorted(ln.split()[:2] for ln in listed) == sorted([newer, key_line]), listed


def test_a_key_already_in_the_agent_keeps_its_own_lifetime(daemon: Daemon,
                                                            tmp_path: Path) -> None:
    """An SSH trial: a person who had `ssh-add`ed their key (no lifetime: git, other
    hosts) found it gone from the agent when a one-minute certificate expired, since
    `--agent` added the key again with the certificate's lifetime. The certificate
    alone is added then. (ssh-agent -d says what each addition asked for.)"""
    sock, said = tmp_path / "debug-agent.sock", tmp_path / "agent.log"
    with said.open("w") as log:
        proc = subprocess.Popen([require("ssh-agent"), "-d", "-a", str(sock)],
                                stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert proc.stdout is not None
        timer = threading.Timer(30, proc.kill)  # a watchdog, not a sleep
        timer.start()
        assert f"SSH_AUTH_SOCK={sock}" in proc.stdout.readline()
        timer.cancel()
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        cert, key = enroll(daemon, tmp_path, "user", ["kim@example.com"], ["kim"])
        pub = keygen(tmp_path / "id_ed25519")
        subprocess.run([require("ssh-add"), "-q", tmp_path / "id_ed25519"], env=env,
                       check=True)
        hsmca("ssh", "user", "--url", daemon.url, "--ca", daemon.root, "--cert", cert,
              "--key", key, "--pubkey", pub, "--ttl", "1h", "--agent", env=env)
        added = [line.split("process_add_identity: add ", 1)[1]
                 for line in said.read_text().splitlines()
                 if "process_add_identity: add " in line]
        assert len(added) == 2, added
        assert added[0].startswith("ssh-ed25519 SHA256:") and "(life: 0)" in added[0], added
        assert added[1].startswith("ssh-ed25519-cert-v01@openssh.com ") and \
            "(life: 0)" not in added[1], added
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def on_terminal(argv: list[str], env: dict[str, str], answer: str) -> tuple[int, str]:
    """Run `argv` on a terminal of its own (a pty), type `answer` at its passphrase
    prompt; its exit status and all it wrote there."""
    import pty
    import select
    pid, fd = pty.fork()
    if pid == 0:  # the child: the command, on the pty
        os.execve(HSMCA[0], [*HSMCA, *argv], {**env, "PYTHONPATH": str(ROOT)})
    said, typed = b"", False
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], 60)
            assert ready, f"no output within 60 s: {said!r}"  # a watchdog, not a sleep
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the command ended, its terminal closed
                break
            if not chunk:
                break
            said += chunk
            if not typed and b"passphrase for" in said:
                os.write(fd, answer.encode() + b"\n")
                typed = True
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), said.decode(errors="replace")


def test_ssh_user_agent_asks_the_passphrase_of_a_key_ssh_keygen_made(
        daemon: Daemon, tmp_path: Path, agent: dict[str, str]) -> None:
    """ssh-keygen's own format, its default: the right passphrase failed like a wrong
    one (bcrypt was missing: an SSH trial), and without a terminal the reason was empty."""
    cert, key = enroll(daemon, tmp_path, "user", ["pat@example.com"], ["pat"])
    subprocess.run([require("ssh-keygen"), "-q", "-t", "ed25519", "-N", "secret phrase",
                    "-f", tmp_path / "id_pp"], check=True)
    argv = ["ssh", "user", "--url", daemon.url, "--ca", str(daemon.root), "--cert", str(cert),
            "--key", str(key), "--pubkey", str(tmp_path / "id_pp.pub"), "--ttl", "10m",
            "--agent"]
    status, said = on_terminal(argv, agent, "not it")
    assert status == 1 and "wrong passphrase for" in said, said
    proc = subprocess.run([*HSMCA, *argv], env=agent, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 1 and "no terminal to ask for it on" in proc.stderr, proc.stderr
    status, said = on_terminal(argv, agent, "secret phrase")
    assert status == 0 and "to ssh-agent for" in said, said
    listed = subprocess.run([require("ssh-add"), "-L"], env=agent, capture_output=True,
                            text=True, check=True).stdout
    assert (tmp_path / "id_pp-cert.pub").read_text().split()[1] in listed


def test_an_agent_that_cannot_be_reached_is_said_before_anything_is_signed(
        daemon: Daemon, tmp_path: Path) -> None:
    """An SSH trial: the certificate was signed and written, then the agent found away."""
    cert, key = enroll(daemon, tmp_path, "user", ["noagent@example.com"], ["noagent"])
    pub = keygen(tmp_path / "id_ed25519")
    env = {**os.environ, "SSH_AUTH_SOCK": str(tmp_path / "no-such.sock")}
    proc = hsmca("ssh", "user", "--url", daemon.url, "--ca", daemon.root, "--cert", cert,
                 "--key", key, "--pubkey", pub, "--agent", env=env, check=False)
    assert proc.returncode == 1 and "cannot reach ssh-agent" in proc.stderr, proc.stderr
    assert "nothing was asked of the CA" in proc.stderr
    assert not (tmp_path / "id_ed25519-cert.pub").exists()


def test_refresh_without_renew_is_refused(tmp_path: Path) -> None:
    pub = keygen(tmp_path / "ssh_host_ed25519_key")
    proc = hsmca("ssh", "host", "--url", "https://127.0.0.1:1", "--cert", tmp_path / "c",
                 "--key", tmp_path / "k", "--pubkey", pub, "--refresh", "1m", check=False)
    assert proc.returncode == 1 and "--refresh says how often --renew" in proc.stderr


def test_ssh_user_agent_needs_an_agent_before_any_request(tmp_path: Path) -> None:
    pub = keygen(tmp_path / "id_ed25519")
    env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    proc = hsmca("ssh", "user", "--url", "https://127.0.0.1:1", "--cert", tmp_path / "c",
                 "--key", tmp_path / "k", "--pubkey", pub, "--agent", env=env, check=False)
    assert proc.returncode == 1 and "SSH_AUTH_SOCK is not set" in proc.stderr


def test_ssh_user_without_a_key_says_how_to_make_one(tmp_path: Path) -> None:
    """A new user's first `ssh user`: "No such file or directory", and no word of
    ssh-keygen (a docs trial)."""
    home = tmp_path / "home"
    home.mkdir()
    proc = hsmca("ssh", "user", "--url", "https://127.0.0.1:1", "--cert", tmp_path / "c",
                 "--key", tmp_path / "k", env={**os.environ, "HOME": str(home)}, check=False)
    ssh_dir = home / ".ssh"
    assert proc.returncode == 1 and proc.stderr == (
        f"hsmca: error: --pubkey {ssh_dir / 'id_ed25519.pub'}: no such file: make a key with "
        f"`mkdir -p -m 700 {ssh_dir} && ssh-keygen -t ed25519 -f {ssh_dir / 'id_ed25519'}`, "
        "or give --pubkey your key's .pub file\n"), proc.stderr


def test_ssh_user_default_lifetime_is_the_servers(daemon: Daemon, tmp_path: Path) -> None:
    cert, key = enroll(daemon, tmp_path, "user", ["bob@example.com"], ["bob"])
    pub = keygen(tmp_path / "id_ed25519")
    hsmca("ssh", "user", "--url", daemon.url, "--ca", daemon.root, "--cert", cert,
          "--key", key, "--pubkey", pub)
    c = ssh_cert(tmp_path / "id_ed25519-cert.pub")
    backdate = 60
    assert c.valid_before - c.valid_after - backdate == Policy().ssh_user_default_ttl_s


class SSHD:
    """sshd run from / with a main config that only includes the drop-in's directory and
    sets what a test sshd needs; the host key, certificate, CA and KRL come from the
    drop-in alone."""

    def __init__(self, tmp: Path, drop_in_dir: Path) -> None:
        self.port = free_port()
        self.config = tmp / "sshd_config"
        self.config.write_text(
            f"Include {drop_in_dir}/*.conf\n"
            f"Port {self.port}\nListenAddress 127.0.0.1\nPidFile {tmp / 'sshd.pid'}\n"
            "UsePAM no\nStrictModes no\nAuthorizedKeysFile none\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nLogLevel VERBOSE\n")
        self.proc: subprocess.Popen[str] | None = None

    def check(self) -> subprocess.CompletedProcess[str]:
        # sshd -t wants its privilege separation directory too; on a fresh machine
        # nothing has made it yet (systemd's tmpfiles would, at boot)
        os.makedirs("/run/sshd", exist_ok=True)
        return subprocess.run([require("sshd"), "-t", "-f", self.config], capture_output=True,
                              text=True, cwd="/")

    def start(self) -> None:
        os.makedirs("/run/sshd", exist_ok=True)
        self.proc = subprocess.Popen([require("sshd"), "-D", "-e", "-f", self.config],
                                     stderr=subprocess.PIPE, text=True, cwd="/")
        ready = threading.Event()
        self.log: list[str] = []

        def drain() -> None:
            assert self.proc is not None and self.proc.stderr is not None
            for line in self.proc.stderr:
                self.log.append(line)
                if "Server listening on" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(30) or self.proc.poll() is not None:
            raise AssertionError("sshd did not start:\n" + "".join(self.log))

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def test_ssh_host_install_writes_an_absolute_drop_in_sshd_uses(daemon: Daemon,
                                                               tmp_path: Path) -> None:
    cert, key = enroll(daemon, tmp_path, "host", ["localhost"])
    (tmp_path / "web1" / "ssh").mkdir(parents=True)
    keygen(tmp_path / "web1" / "ssh" / "ssh_host_ed25519_key")
    # Relative paths, run from tmp_path, as the README tour does, with "." and ".."
    # (written into the drop-in as given, before: an operator trial). The drop-in
    # directory is new: made, and the operator told that sshd_config must Include it.
    proc = hsmca("ssh", "host", "--url", daemon.url, "--ca", daemon.root, "--cert", cert,
                 "--key", key, "--pubkey", "web1/ssh/../ssh/ssh_host_ed25519_key.pub",
                 "--install", "./sshd_config.d", cwd=tmp_path)
    assert "sshd reads it only if sshd_config has `Include" in proc.stderr, proc.stderr
    base = tmp_path / "web1" / "ssh"
    expected = {"HostKey": base / "ssh_host_ed25519_key",
                "HostCertificate": base / "ssh_host_ed25519_key-cert.pub",
                "TrustedUserCAKeys": base / "hsmca_user_ca.pub",
                "RevokedKeys": base / "hsmca.krl"}
    drop_in = (tmp_path / "sshd_config.d" / "hsmca.conf").read_text()
    for word, path in expected.items():
        assert f"{word} {path}\n" in drop_in and f"  {word} {path}\n" in proc.stdout, word
        assert path.is_file(), path
    sshd = SSHD(tmp_path, tmp_path / "sshd_config.d")
    checked = sshd.check()
    assert checked.returncode == 0, checked.stderr

    # And it works: a user certificate logs in to this sshd, whose host cert is trusted.
    ucert, ukey = enroll(daemon, tmp_path, "user", ["root@example.com"], ["root"])
    upub = keygen(tmp_path / "id_ed25519")
    hsmca("ssh", "user", "--url", daemon.url, "--ca", daemon.root, "--cert", ucert, "--key",
          ukey, "--pubkey", upub, "--ttl", "10m")
    known = tmp_path / "known_hosts"
    printed = next(x for x in proc.stdout.splitlines() if "@cert-authority " in x).split()
    assert printed[1] == "localhost"  # the host's own names, not every host there is
    # The client's side from the CA itself (this sshd listens on another port, which
    # known_hosts patterns name apart), with the KRL ssh checks the host against.
    krl = tmp_path / "client.krl"
    # (relative paths, as typed; the ssh_config lines it suggests name them absolutely,
    # since ssh runs from anywhere)
    said = hsmca("ssh", "known-hosts", "--url", daemon.url, "--ca", daemon.root, "--hosts",
                 f"[localhost]:{sshd.port}", "--out", known.name, "--krl", krl.name,
                 cwd=tmp_path).stderr
    assert f"RevokedHostKeys {krl}\n" in said and f"ssh_known_hosts {known}\n" in said, said
    assert [ln.split()[2:4] for ln in known.read_text().splitlines()
            if ln.startswith("@cert-authority ")] == [printed[2:4]]
    def log_in() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [require("ssh"), "-F", "/dev/null", "-p", str(sshd.port), "-o", "BatchMode=yes",
             "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
             "-o", f"RevokedHostKeys={krl}",
             "-o", "IdentitiesOnly=yes", "-o", f"IdentityFile={tmp_path / 'id_ed25519'}",
             "-o", f"CertificateFile={tmp_path / 'id_ed25519-cert.pub'}",
             "root@localhost", "echo", "in-via-drop-in"],
            capture_output=True, text=True, timeout=60)

    sshd.start()
    try:
        login = log_in()
        assert "in-via-drop-in" in login.stdout, login.stderr + "".join(sshd.log)
        # The host certificate revoked: the client's next known-hosts run brings the KRL
        # that makes ssh refuse the host.
        host_serial = ssh_cert(base / "ssh_host_ed25519_key-cert.pub").serial
        status, _, raw = asyncio.run(http("POST", f"{daemon.url}/v1/ssh/revoke",
                                          daemon.admin_ssl(), body={"serial": str(host_serial)}))
        assert status == 200, raw
        again = hsmca("ssh", "known-hosts", "--url", daemon.url, "--ca", daemon.root,
                      "--hosts", f"[localhost]:{sshd.port}", "--out", known, "--krl", krl)
        assert f"wrote {krl}" in again.stderr and f"wrote {known}" not in again.stderr
        refused = log_in()
        assert refused.returncode != 0 and "revoked" in refused.stderr, refused.stderr
    finally:
        sshd.stop()


def test_the_drop_in_keeps_every_host_key_sshd_offered_and_each_ones_certificate(
        daemon: Daemon, tmp_path: Path) -> None:
    """Once any HostKey is set sshd offers only those named: a drop-in naming one key
    made a Debian sshd stop offering its others, and a second key's --install replaced
    the first key's certificate line (an SSH trial)."""
    cert, key = enroll(daemon, tmp_path, "host", ["localhost"])
    base = tmp_path / "ssh"
    base.mkdir()
    for kind in ("ecdsa", "ed25519", "rsa"):
        subprocess.run([require("ssh-keygen"), "-q", "-t", kind, "-N", "", "-f",
                        base / f"ssh_host_{kind}_key"], check=True)
    for kind in ("ecdsa", "ed25519"):  # certified one after the other; rsa is not
        hsmca("ssh", "host", "--url", daemon.url, "--ca", daemon.root, "--cert", cert,
              "--key", key, "--pubkey", base / f"ssh_host_{kind}_key.pub", "--install",
              tmp_path / "sshd_config.d")
    sshd = SSHD(tmp_path, tmp_path / "sshd_config.d")
    assert sshd.check().returncode == 0
    shown = subprocess.run([require("sshd"), "-T", "-f", sshd.config], capture_output=True,
                           text=True, cwd="/", check=True).stdout.splitlines()
    assert sorted(x.split()[1] for x in shown if x.startswith("hostkey ")) == [
        str(base / f"ssh_host_{kind}_key") for kind in ("ecdsa", "ed25519", "rsa")]
    assert sorted(x.split()[1] for x in shown if x.startswith("hostcertificate ")) == [
        str(base / f"ssh_host_{kind}_key-cert.pub") for kind in ("ecdsa", "ed25519")]


def test_ssh_host_renew_refused_at_its_start_exits_3(daemon: Daemon, tmp_path: Path) -> None:
    """As renew --daemon: a refusal retrying cannot fix exits 3, which the documented
    unit (RestartPreventExitStatus=3) does not restart every minute for good."""
    cert, key = enroll(daemon, tmp_path, "host", ["gone-host.example.com"])
    pub = keygen(tmp_path / "ssh_host_ed25519_key")
    status, _, raw = revoke_as_admin(daemon, cert)
    assert status == 200, raw
    proc = hsmca("ssh", "host", "--url", daemon.url, "--ca", daemon.root, "--cert", cert,
                 "--key", key, "--pubkey", pub, "--renew", check=False)
    assert proc.returncode == 3 and "has been revoked" in proc.stderr, proc.stderr


def revoke_as_admin(d: Daemon, cert: Path) -> tuple[int, str, bytes]:
    """Revoke `cert` as the admin."""
    return asyncio.run(http("POST", f"{d.url}/v1/x509/revoke", d.admin_ssl(), body={
        "serial": cert_serial(cert), "reason": "cessationOfOperation"}))


def test_ssh_host_install_refuses_a_missing_host_key_or_directory(tmp_path: Path) -> None:
    pub = keygen(tmp_path / "k")
    (tmp_path / "k").unlink()
    (tmp_path / "d").mkdir()
    base = ("ssh", "host", "--url", "https://127.0.0.1:1", "--cert", tmp_path / "c",
            "--key", tmp_path / "k2", "--pubkey", pub)
    proc = hsmca(*base, "--install", tmp_path / "d", check=False)
    assert proc.returncode == 1 and f"private key {tmp_path / 'k'} is missing" in proc.stderr
    proc = hsmca(*base, "--install", tmp_path / "none" / "deeper", check=False)
    assert proc.returncode == 1 and "is not a directory" in proc.stderr
    assert not (tmp_path / "none").exists()  # nothing made on the way to a refusal


def test_ssh_host_install_leaves_no_directory_when_the_ca_refuses(
        own_daemon: Daemon, tmp_path: Path) -> None:
    """A trial's first run was refused (a principal it may not have), and the new drop-in
    directory stayed behind, as if the host had been set up."""
    cert, key = enroll(own_daemon, tmp_path, "host", ["localhost"])
    pub = keygen(tmp_path / "ssh_host_ed25519_key")
    proc = hsmca("ssh", "host", "--url", own_daemon.url, "--ca", own_daemon.root, "--cert",
                 cert, "--key", key, "--pubkey", pub, "--principal", "db9.example.net",
                 "--install", tmp_path / "sshd_config.d", check=False)
    assert proc.returncode == 1 and "403" in proc.stderr, proc.stderr
    assert not (tmp_path / "sshd_config.d").exists()
    assert "made" not in proc.stderr, proc.stderr


def test_ssh_host_renew_keeps_certificate_user_ca_and_krl_fresh(tmp_path: Path) -> None:
    ca = init_ca(tmp_path)
    set_config(ca.state, "policy", "ssh-host-ttl-s", 30)  # renewed ~20 s after issue
    d = start_daemon(ca.state)
    runner = None
    try:
        cert, key = enroll(d, tmp_path, "host", ["localhost"])
        (tmp_path / "keys").mkdir()
        pub = keygen(tmp_path / "keys" / "ssh_host_ed25519_key")
        (tmp_path / "dropin").mkdir()
        hook = tmp_path / "hook.log"
        runner = Running.start("ssh", "host", "--url", d.url, "--ca", d.root, "--cert", cert,
                               "--key", key, "--pubkey", pub, "--install", tmp_path / "dropin",
                               "--renew", "--refresh", "1s",
                               "--exec", f'echo "$HSMCA_SSH_CERT" >> {hook}')
        runner.wait("ssh.refresh.scheduled")
        host_cert = tmp_path / "keys" / "ssh_host_ed25519_key-cert.pub"
        krl = tmp_path / "keys" / "hsmca.krl"
        first = ssh_cert(host_cert).serial
        # The certificate it wrote when it started is new to sshd too: the hook ran
        # for it (an SSH trial: only for later renewals, so sshd went on without it).
        runner.wait("ssh.host.renew.hook.done")
        assert hook.read_text() == f"{host_cert}\n"

        # A user certificate is revoked: the next refresh brings the KRL that lists it.
        ucert, ukey = enroll(d, tmp_path, "user", ["eve@example.com"], ["eve"])
        upub = keygen(tmp_path / "id_ed25519")
        hsmca("ssh", "user", "--url", d.url, "--ca", d.root, "--cert", ucert, "--key", ukey,
              "--pubkey", upub, "--ttl", "10m")
        serial = ssh_cert(tmp_path / "id_ed25519-cert.pub").serial
        mark = runner.mark()
        status, _, raw = asyncio.run(http("POST", f"{d.url}/v1/ssh/revoke", d.admin_ssl(),
                                          body={"serial": str(serial)}))
        assert status == 200, raw
        # Said in the operator's log as well as the audit log (it was the audit log only).
        assert d.wait_stderr(lambda: any(
            '"event": "ssh revoked"' in x and f'"serial": "{serial}"' in x
            and '"certificates": 1' in x for x in d.stderr)), d.stderr[-5:]
        runner.wait("ssh.refresh.done", since=mark, changed=[str(krl)])
        query = subprocess.run([require("ssh-keygen"), "-Q", "-f", krl,
                                tmp_path / "id_ed25519-cert.pub"], capture_output=True,
                               text=True)
        assert "REVOKED" in query.stdout + query.stderr, query.stdout + query.stderr

        done = runner.wait("ssh.host.renew.done")
        assert int(done["serial"]) == ssh_cert(host_cert).serial != first
        runner.wait("ssh.host.renew.hook.done", count=2)
        assert hook.read_text() == f"{host_cert}\n" * 2
        assert runner.stop() == 0
    finally:
        if runner is not None:
            runner.stop()
        d.stop()
    assert json.dumps(runner.lines).count("Traceback") == 0


def test_ssh_host_renew_keeps_the_krl_fresh_when_its_credential_no_longer_works(
        own_daemon: Daemon, tmp_path: Path) -> None:
    """A host whose X.509 credential the CA no longer takes (expired over a long
    weekend; here revoked) still has a good SSH certificate: `--renew` starts, says why
    it cannot renew, and keeps sshd's KRL coming, rather than failing every minute."""
    d = own_daemon
    cert, key = enroll(d, tmp_path, "host", ["localhost"])
    (tmp_path / "keys").mkdir()
    pub = keygen(tmp_path / "keys" / "ssh_host_ed25519_key")
    args = ("ssh", "host", "--url", d.url, "--ca", d.root, "--cert", cert, "--key", key,
            "--pubkey", pub)
    hsmca(*args)
    krl = tmp_path / "keys" / "hsmca.krl"
    krl.unlink()
    status, _, raw = asyncio.run(http("POST", f"{d.url}/v1/x509/revoke", d.admin_ssl(),
                                      body={"serial": cert_serial(cert)}))
    assert status == 200, raw
    runner = Running.start(*args, "--renew", "--refresh", "1s")
    try:
        runner.wait("ssh.refresh.done")
        assert krl.exists()
        told = "".join(runner.raw)
        assert "has been revoked" in told and "keeping the KRL and the user CA fresh" in told
        # Not "every 10 minutes" from now: the certificate is tried again at its time.
        assert "renewing the certificate when it is due" in told, told
        scheduled = runner.wait("ssh.host.renew.scheduled")
        assert scheduled["in_s"] > 600, scheduled
        # The KRL it fetched lists the host certificate, revoked with its credential.
        query = subprocess.run([require("ssh-keygen"), "-Q", "-f", krl,
                                tmp_path / "keys" / "ssh_host_ed25519_key-cert.pub"],
                               capture_output=True, text=True)
        assert "REVOKED" in query.stdout + query.stderr, query.stdout + query.stderr
        # And it says so, once each, where the operator looks: the host certificate is
        # in the KRL (an SSH trial: it logged only `"changed": [".../hsmca.krl"]`) and
        # the CA refuses its credential.
        revoked = runner.wait("ssh.host.revoked")
        assert "is in the KRL" in revoked["detail"], revoked
        refused = runner.wait("ssh.host.credential.refused")
        assert "has been revoked" in refused["error"], refused
        for _ in range(2):  # two more refreshes: nothing said again
            runner.wait("ssh.refresh.done", since=runner.mark())
        assert len(runner.events("ssh.host.revoked")) == 1
        assert len(runner.events("ssh.host.credential.refused")) == 1
        assert runner.proc.poll() is None
        # Enrolled again, as the warning says: the running --renew renews the host
        # certificate at once, not weeks later at its time (an SSH trial: only a
        # restart did).
        revoked_serial = ssh_cert(tmp_path / "keys" / "ssh_host_ed25519_key-cert.pub").serial
        token = tmp_path / "again.token"
        token.write_text(asyncio.run(bootstrap_token(d, "host", ["localhost"])) + "\n")
        token.chmod(0o600)
        hsmca("enroll", "--url", d.url, "--ca", d.root, "--token-file", token, "--name",
              "localhost", "--out", cert.parent, "--force")
        done = runner.wait("ssh.host.renew.done")
        renewed = tmp_path / "keys" / "ssh_host_ed25519_key-cert.pub"
        assert int(done["serial"]) == ssh_cert(renewed).serial != revoked_serial
        runner.wait("ssh.refresh.done", since=runner.mark())
        query = subprocess.run([require("ssh-keygen"), "-Q", "-f", krl, renewed],
                               capture_output=True, text=True)
        assert "REVOKED" not in query.stdout + query.stderr, query.stdout
    finally:
        runner.stop()


def test_a_user_token_without_a_login_is_warned_about_when_made(daemon: Daemon) -> None:
    """The person found out at their first `hsmca ssh user`, their token spent."""
    made = hsmca("token", "create", "--config", daemon.state / "hsmca.toml", "--url",
                 daemon.url, "--role", "user", "--name", "nologin@example.com")
    assert made.stdout.startswith("hsmca-")
    assert "no --principal: the credential this token gives gets no SSH" in made.stderr
    granted = hsmca("token", "create", "--config", daemon.state / "hsmca.toml", "--url",
                    daemon.url, "--role", "user", "--name", "login@example.com",
                    "--principal", "login")
    assert "warning" not in granted.stderr


def test_ssh_user_source_address_is_asked_for_from_the_cli(daemon: Daemon,
                                                           tmp_path: Path) -> None:
    """It could be asked for only with curl (an SSH trial)."""
    cert, key = enroll(daemon, tmp_path, "user", ["src@example.com"], ["src"])
    pub = keygen(tmp_path / "id_ed25519")
    hsmca("ssh", "user", "--url", daemon.url, "--ca", daemon.root, "--cert", cert, "--key",
          key, "--pubkey", pub, "--ttl", "10m", "--source-address", "10.0.0.0/8",
          "--source-address", "192.0.2.7")
    options = ssh_cert(tmp_path / "id_ed25519-cert.pub").critical_options
    assert options == {b"source-address": b"10.0.0.0/8,192.0.2.7/32"}, options


@pytest.mark.parametrize("kind", ["user", "host"])
def test_ssh_with_no_room_for_its_files_asks_the_ca_nothing(daemon: Daemon, tmp_path: Path,
                                                            kind: str) -> None:
    """As `hsmca renew` (a full-disk trial): a certificate the CA signs and the client
    cannot write is thrown away. The room for the files is taken before the request. (A
    file size limit stands for the full disk.)"""
    cert, key = enroll(daemon, tmp_path, kind, ["localhost" if kind == "host"
                                                else "ann@example.com"],
                       [] if kind == "host" else ["ann"])
    pub = keygen(tmp_path / "id_ed25519")
    listed = [*HSMCA, "ssh", "list", "--config", daemon.state / "hsmca.toml", "--url",
              daemon.url]
    before = subprocess.run(listed, capture_output=True, text=True, check=True).stdout
    proc = subprocess.run(["prlimit", "--fsize=600", *HSMCA, "ssh", kind, "--url", daemon.url,
                           "--ca", daemon.root, "--cert", cert, "--key", key, "--pubkey",
                           pub], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr == (
        f"hsmca: error: cannot write to {tmp_path}: File too large (checked before "
        "contacting the CA: nothing was spent)\n"), proc.stderr
    assert subprocess.run(listed, capture_output=True, text=True,
                          check=True).stdout == before
    assert not (tmp_path / "id_ed25519-cert.pub").exists()


async def test_the_cas_own_ssh_key_is_not_certified(daemon: Daemon, tmp_path: Path) -> None:
    """A security trial had the user CA's and the host CA's own keys certified."""
    status, _, raw = await http("GET", f"{daemon.url}/v1/ssh/ca", daemon.ssl())
    assert status == 200, raw
    cas = json.loads(raw)
    for kind, name, principals in (("user", "ann@example.com", ["ann"]),
                                   ("host", "localhost", [])):
        cert, key = enroll(daemon, tmp_path, kind, [name], principals)
        line = " ".join(cas[kind].splitlines()[0].split()[:2])
        status, _, raw = await http("POST", f"{daemon.url}/v1/ssh/{kind}",
                                    daemon.ssl(cert, key), body={"public_key": line})
        assert status == 400, raw
        said = json.loads(raw)
        assert said["type"].endswith("/bad-key") and "is one of this CA's own SSH CA keys" \
            in said["detail"], said


def test_ssh_user_does_not_replace_a_host_certificate(daemon: Daemon, tmp_path: Path) -> None:
    """An SSH trial's `ssh user --pubkey` of a host key replaced the host certificate
    sshd served with a user certificate, and nothing said so."""
    hcert, hkey = enroll(daemon, tmp_path, "host", ["localhost"])
    host_pub = keygen(tmp_path / "ssh_host_ed25519_key")
    hsmca("ssh", "host", "--url", daemon.url, "--ca", daemon.root, "--cert", hcert, "--key",
          hkey, "--pubkey", host_pub)
    served = (tmp_path / "ssh_host_ed25519_key-cert.pub").read_bytes()
    ucert, ukey = enroll(daemon, tmp_path, "user", ["ann@example.com"], ["ann"])
    proc = hsmca("ssh", "user", "--url", daemon.url, "--ca", daemon.root, "--cert", ucert,
                 "--key", ukey, "--pubkey", host_pub, check=False)
    assert proc.returncode == 1 and proc.stderr == (
        f"hsmca: error: {tmp_path / 'ssh_host_ed25519_key-cert.pub'} holds a host "
        "certificate (sshd's HostCertificate?): --pubkey is a host key, not yours; give "
        "your own public key (e.g. ~/.ssh/id_ed25519.pub)\n"), proc.stderr
    assert (tmp_path / "ssh_host_ed25519_key-cert.pub").read_bytes() == served


def test_a_long_list_of_principals_is_cut_short_in_the_listing() -> None:
    """61 principals of 256 characters made one `ssh list` row of 15 KB (an SSH
    trial): the row shows the first of them and how many there are."""
    from ca.commands.ssh_cmd import PRINCIPALS_SHOWN, _principals
    assert _principals(["alice", "deploy"]) == "alice,deploy"
    many = [f"p{i:03d}" + "x" * 250 for i in range(61)]
    shown = _principals(many)
    assert shown.startswith("p000") and shown.endswith("... (61 in all)")
    assert len(shown) < PRINCIPALS_SHOWN + 20, len(shown)


def test_a_security_keys_public_key_is_read_whole_for_the_krl() -> None:
    """Revocable (an SSH trial could not list a leaked one), and read whole: a blob cut
    short, or with bytes after it, lists no key at all (a review)."""
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    from ca.policy import Refused
    from ca.ssh import revocable_key

    def string(b: bytes) -> bytes:
        return len(b).to_bytes(4, "big") + b
    point = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    kind = b"sk-ssh-ed25519@openssh.com"
    blob = string(kind) + string(point) + string(b"ssh:")
    got = revocable_key(f"{kind.decode()} {base64.b64encode(blob).decode()} yubikey")
    assert got.blob == blob and got.line == f"{kind.decode()} {base64.b64encode(blob).decode()}"
    ecdsa = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    kind2 = b"sk-ecdsa-sha2-nistp256@openssh.com"
    blob2 = string(kind2) + string(b"nistp256") + string(ecdsa) + string(b"ssh:")
    assert revocable_key(f"{kind2.decode()} {base64.b64encode(blob2).decode()}").blob == blob2
    for bad in (blob + b"x", blob[:-2], string(kind) + string(point) + string(b""),
                string(kind2) + string(b"nistp256") + string(b"\x04" + bytes(64))
                + string(b"ssh:")):
        name = (kind if bad.startswith(string(kind)) else kind2).decode()
        with pytest.raises(Refused, match="cannot be parsed as a sk-"):
            revocable_key(f"{name} {base64.b64encode(bad).decode()}")

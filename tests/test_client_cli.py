"""The client commands as a new user meets them: what they check before spending a
token or connecting, how they take a token, and what their errors say."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import os
import re
import resource
import shlex
import signal
import socket
import sqlite3
import ssl
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca.cli import EPILOG, build_parser
from ca.commands.client_cmd import parse_serial
from tests.conftest import HSMCA, Daemon, InitialisedCA, hsmca, init_ca, require, start_daemon
from tests.helpers import (
    Running,
    bootstrap_token,
    cert_serial,
    enroll,
    gone,
    log_lines,
    other_ca,
    token_file,
)
from tests.ports import free_port

NAME = "cli.internal.example"


def one_line_error(proc: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def enroll_cmd(d: Daemon, token: Path, out: Path, *extra: str | Path,
               **kw: object) -> subprocess.CompletedProcess[str]:
    return hsmca("enroll", "--url", d.url, "--ca", d.root, "--token-file", token,
                 "--name", NAME, "--out", out, *extra, check=False, **kw)


# ---- enroll checks everything before it spends the token (item 4) ---------------------

def test_enroll_checks_the_output_before_spending_the_token(daemon: Daemon,
                                                            tmp_path: Path) -> None:
    token = token_file(daemon, tmp_path, "service", [NAME])

    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory\n")
    msg = one_line_error(enroll_cmd(daemon, token, a_file))
    assert f"--out {a_file} exists and is not a directory" in msg

    full = tmp_path / "full"
    full.mkdir()
    (full / "key.pem").write_text("an older key\n")
    msg = one_line_error(enroll_cmd(daemon, token, full))
    assert "already exists and is not empty; pass --force" in msg
    assert (full / "key.pem").read_text() == "an older key\n"

    # A directory nobody may write to, even root (the immutable attribute).
    locked = tmp_path / "locked"
    locked.mkdir()
    chattr = require("chattr")
    proc = subprocess.run([chattr, "+i", locked], capture_output=True, text=True)
    assert proc.returncode == 0, f"needs a filesystem with chattr +i: {proc.stderr}"
    try:
        msg = one_line_error(enroll_cmd(daemon, token, locked / "out"))
    finally:
        subprocess.run([chattr, "-i", locked], check=True)
    assert f"cannot create --out {locked / 'out'}" in msg and "still valid" in msg
    # said in the directory named, not in the staging directory's hidden name (an
    # operator trial read ".o1.enroll-267713fb")
    assert f": Operation not permitted in {locked} (checked" in msg and ".enroll-" not in msg, \
        msg

    # The token was never spent: it enrolls now, into a directory made whole at once.
    fresh = tmp_path / "deep" / "fresh"
    proc = enroll_cmd(daemon, token, fresh)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in fresh.iterdir()) == ["cert.pem", "chain.pem", "key.pem"]
    assert sorted(p.name for p in fresh.parent.iterdir()) == ["fresh"]  # no staging left
    assert (fresh / "key.pem").stat().st_mode & 0o777 == 0o600

    # --force replaces the credential in an existing directory.
    again = token_file(daemon, tmp_path, "service", [NAME])
    proc = enroll_cmd(daemon, again, full, "--force")
    assert proc.returncode == 0, proc.stderr
    assert "PRIVATE KEY" in (full / "key.pem").read_text()
    # The replaced file was 0644: its group keeps access (a service's group may read its
    # key), others lose it.
    assert (full / "key.pem").stat().st_mode & 0o777 == 0o640


def tls_front(daemon: Daemon, handler: type[Any]) -> Any:
    """An HTTPS server on 127.0.0.1 with the daemon's own TLS credential (what a proxy
    or a faulty node in front of it presents), answering with `handler`; shut it down."""
    import http.server
    import threading
    front = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(daemon.state / "tls" / "server.pem", daemon.state / "tls" / "server.key")
    front.socket = tls.wrap_socket(front.socket, server_side=True)
    threading.Thread(target=front.serve_forever, daemon=True).start()
    return front


def test_status_says_how_the_daemon_is(daemon: Daemon) -> None:
    """An operator trial found no command for the daemon's health, only curl."""
    config = ("--config", daemon.state / "hsmca.toml")
    proc = hsmca("status", *config, "--url", daemon.url)
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{daemon.url}: ok" and "  hsm: ok" in lines and "  audit: ok" in \
        lines and "  store: ok" in lines and any(x.startswith("  workers: ") for x in lines), \
        proc.stdout
    assert json.loads(hsmca("status", *config, "--url", daemon.url, "--json").stdout)[
        "status"] == "ok"
    # on a client host, with no hsmca.toml: --url and --ca (an upgrade trial)
    elsewhere = hsmca("status", "--url", daemon.url, "--ca", daemon.root, cwd=daemon.state.parent)
    assert elsewhere.stdout.splitlines()[0] == f"{daemon.url}: ok", elsewhere.stdout
    gone = f"https://127.0.0.1:{free_port()}"
    said = one_line_error(hsmca("status", *config, "--url", gone, check=False))
    assert gone in said and "is `hsmca serve` running there" in said, said
    # --json still gives a monitor a document to read (a trial's got nothing on stdout)
    down = hsmca("status", *config, "--url", gone, "--json", check=False)
    assert down.returncode == 1 and json.loads(down.stdout) == {
        "status": "unreachable", "url": gone, "error": said.removeprefix("hsmca: error: ")
    }, down.stdout

    # A load balancer's own 503 page in front: one line, not a traceback (a review)
    import http.server

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<html><body>503 Service Unavailable</body></html>"
            self.send_response(503)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass
    front = tls_front(daemon, Page)
    try:
        said = one_line_error(hsmca("status", *config, "--url",
                                    f"https://127.0.0.1:{front.server_address[1]}",
                                    check=False))
        page = hsmca("status", *config, "--url", f"https://127.0.0.1:{front.server_address[1]}",
                     "--json", check=False)
        assert page.returncode == 1 and json.loads(page.stdout)["status"] == "unknown", \
            page.stdout  # something answered: not "unreachable" (a review)
    finally:
        front.shutdown()
        front.server_close()
    assert "the answer is not the daemon's health (a proxy or load balancer in front?)" \
        in said, said


def test_a_token_file_saved_by_notepad_is_read(daemon: Daemon, tmp_path: Path) -> None:
    """An operator trial: a token file saved as "UTF-8 with BOM", CRLF, was an unknown
    token (401)."""
    token = token_file(daemon, tmp_path, "service", [NAME])
    token.write_bytes(b"\xef\xbb\xbf" + token.read_bytes().strip() + b"\r\n")
    proc = enroll_cmd(daemon, token, tmp_path / "svc")
    assert proc.returncode == 0 and (tmp_path / "svc" / "cert.pem").is_file(), proc.stderr


def test_enroll_interrupted_says_how_to_go_on(daemon: Daemon, tmp_path: Path) -> None:
    """An operator trial: Ctrl-C during an enroll exited 130 with nothing said, the token
    spent, and the next try, from elsewhere, sent its user to an admin for a new token."""
    token = token_file(daemon, tmp_path, "service", [NAME])
    with socket.socket() as listener:  # a CA that never answers: the enroll waits on it
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(60)
        proc = subprocess.Popen(
            [*HSMCA, "enroll", "--url", f"https://127.0.0.1:{listener.getsockname()[1]}",
             "--ca", daemon.root, "--token-file", token, "--name", NAME, "--out",
             tmp_path / "svc"], stderr=subprocess.PIPE, text=True)
        conn, _ = listener.accept()  # it is connected and waits for the handshake
        with conn:
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == (
        "hsmca: interrupted: if the CA took the token already, run the same enroll again "
        "with the same --out: it uses the key it kept beside it, and the token lets that "
        "key in again\n"), err


def test_enroll_into_an_existing_empty_directory(daemon: Daemon, tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir(mode=0o750)
    proc = enroll_cmd(daemon, token_file(daemon, tmp_path, "service", [NAME]), out)
    assert proc.returncode == 0, proc.stderr
    assert (out / "cert.pem").is_file() and out.stat().st_mode & 0o777 == 0o750


def _file_size_limit(limit: int) -> Callable[[], None]:
    """For a child process: files of at most `limit` bytes, as a disk filling up gives
    (writes past it fail with EFBIG rather than killing the process)."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_an_enrollment_whose_files_cannot_be_written_keeps_its_key_for_the_next_run(
        daemon: Daemon, tmp_path: Path) -> None:
    """A client trial on a full disk: the CA answered, the files could not be written,
    and the key went with the staging directory: the token spent, a certificate live
    for a key nobody had, and a bare "[Errno 28] No space left on device". The key is
    written before the request and kept; the same command again gets the certificate."""
    token = token_file(daemon, tmp_path, "service", [NAME])
    out = tmp_path / "svc"
    # Room for the key (about 240 bytes), not for the certificate (about 1.5 KB)
    msg = one_line_error(enroll_cmd(daemon, token, out, preexec_fn=_file_size_limit(600)))
    assert "the CA issued certificate" in msg and "File too large" in msg, msg
    assert "The token is spent on it" in msg and "run the same enrollment again" in msg, msg
    kept = next(tmp_path.glob(".svc.hsmca-enroll-key-*.pem"))
    assert str(kept) in msg and kept.stat().st_mode & 0o777 == 0o600 and not out.exists()
    # Another enrollment (another token) does not take it up
    other = token_file(daemon, tmp_path, "service", [NAME])
    proc = enroll_cmd(daemon, other, tmp_path / "other")
    assert proc.returncode == 0 and "earlier enrollment" not in proc.stderr, proc.stderr
    # Nor a key someone else could have put there: readable by others, it is refused
    kept.chmod(0o644)
    refusal = one_line_error(enroll_cmd(daemon, token, out))
    assert "is not a key an enrollment of yours kept" in refusal, refusal
    kept.chmod(0o600)
    proc = enroll_cmd(daemon, token, out)
    assert proc.returncode == 0, proc.stderr
    assert "using the key an earlier enrollment kept" in proc.stderr, proc.stderr
    cert = x509.load_pem_x509_certificate((out / "cert.pem").read_bytes())
    key = serialization.load_pem_private_key((out / "key.pem").read_bytes(), None)
    assert cert.public_key() == key.public_key() and format(cert.serial_number, "x") in msg
    assert not kept.exists() and sorted(p.name for p in tmp_path.iterdir()
                                        if p.name.startswith(".svc")) == []
    # A key too large for the disk is said before the token is used
    again = token_file(daemon, tmp_path, "service", [NAME])
    msg = one_line_error(enroll_cmd(daemon, again, tmp_path / "none",
                                    preexec_fn=_file_size_limit(100)))
    assert "cannot write the new key" in msg and "it is still valid" in msg, msg
    assert enroll_cmd(daemon, again, tmp_path / "none").returncode == 0


# ---- the token stays off argv (issue 13, item 5) ---------------------------------------

def test_token_from_a_file_stdin_or_the_environment(daemon: Daemon, tmp_path: Path) -> None:
    secret = token_file(daemon, tmp_path, "service", [NAME]).read_text().strip()
    via_file = token_file(daemon, tmp_path, "service", [NAME])
    proc = enroll_cmd(daemon, via_file, tmp_path / "f")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr

    via_stdin = token_file(daemon, tmp_path, "service", [NAME]).read_text()
    proc = enroll_cmd(daemon, Path("-"), tmp_path / "s", input=via_stdin)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr

    env = {**os.environ, "HSMCA_TOKEN": secret}
    proc = hsmca("enroll", "--url", daemon.url, "--ca", daemon.root, "--name", NAME,
                 "--out", tmp_path / "e", env=env, check=False)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    for proc_out in (proc.stdout, proc.stderr):
        assert secret not in proc_out

    # In argv it still works, with a warning that never repeats the token.
    argv_token = token_file(daemon, tmp_path, "service", [NAME]).read_text().strip()
    proc = hsmca("enroll", "--url", daemon.url, "--ca", daemon.root, "--token", argv_token,
                 "--name", NAME, "--out", tmp_path / "a", check=False)
    assert proc.returncode == 0
    assert "warning: --token puts the token in the process list" in proc.stderr
    assert argv_token not in proc.stderr + proc.stdout

    env = {k: v for k, v in os.environ.items() if k != "HSMCA_TOKEN"}
    msg = one_line_error(hsmca("enroll", "--url", daemon.url, "--name", NAME, "--out",
                               tmp_path / "n", env=env, check=False))
    assert "--token-file" in msg and "HSMCA_TOKEN" in msg
    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    assert "must hold the token" in one_line_error(enroll_cmd(daemon, empty, tmp_path / "x"))


# ---- --url and --ca mistakes (item 7) ---------------------------------------------------

def test_url_and_ca_mistakes_are_one_clear_line(daemon: Daemon, tmp_path: Path) -> None:
    token = token_file(daemon, tmp_path, "service", [NAME])
    plain = daemon.url.replace("https://", "http://")
    msg = one_line_error(hsmca("enroll", "--url", plain, "--token-file", token, "--name", NAME,
                               "--out", tmp_path / "o", check=False), code=2)
    assert "serves HTTPS only; use https://" in msg
    bare = daemon.url.removeprefix("https://")
    msg = one_line_error(hsmca("enroll", "--url", bare, "--token-file", token, "--name", NAME,
                               "--out", tmp_path / "o", check=False), code=2)
    assert f"has no scheme; write https://{bare}" in msg
    msg = one_line_error(hsmca("enroll", "--url", "https://127.0.0.1:99999", "--token-file",
                               token, "--name", NAME, "--out", tmp_path / "o", check=False),
                         code=2)
    assert "the port 99999 is not between 1 and 65535" in msg
    # the API's own path given as the base (a client trial was told "no such endpoint:
    # /v1/v1/x509/enroll", its token kept, but no word of what to give)
    msg = one_line_error(hsmca("enroll", "--url", f"{daemon.url}/v1", "--token-file", token,
                               "--name", NAME, "--out", tmp_path / "o", check=False), code=2)
    assert f"give the daemon's base URL, {daemon.url}: hsmca adds the API's paths" in msg

    missing = tmp_path / "nowhere" / "root.pem"
    msg = one_line_error(hsmca("enroll", "--url", daemon.url, "--ca", missing, "--token-file",
                               token, "--name", NAME, "--out", tmp_path / "o", check=False))
    assert f"--ca {missing}: no such file" in msg

    other = other_ca(tmp_path)
    msg = one_line_error(hsmca("enroll", "--url", daemon.url, "--ca", other.root_pem,
                               "--token-file", token, "--name", NAME, "--out", tmp_path / "o",
                               check=False))
    assert f"does not verify against --ca {other.root_pem}" in msg
    # None of these reached the daemon's enroll: the token still works.
    assert enroll_cmd(daemon, token, tmp_path / "ok").returncode == 0


def test_a_host_whose_clock_is_days_off_is_told_to_check_its_clock(daemon: Daemon) -> None:
    """By a clock two days behind (or ahead), the daemon's certificate is not valid yet
    (or expired): the client says to check this host's clock, not the --ca file (a
    client trial was sent to its root file). The host's clock is set with libfaketime,
    for this one process."""
    for offset, said in (("-2d", "not valid yet"), ("+400d", "expired")):
        proc = subprocess.run(["faketime", "-f", offset, *HSMCA, "status", "--url",
                               daemon.url, "--ca", daemon.root], capture_output=True,
                              text=True, timeout=120)
        msg = one_line_error(proc)
        assert msg.startswith(f"hsmca: error: cannot connect to {daemon.url}/health: by this "
                              "host's clock (now ") and f"the server's certificate chain is " \
            f"{said}" in msg and msg.endswith("is this host's clock right?"), msg


def test_a_stopped_cas_admin_commands_do_not_talk_to_another_cas_daemon(
        daemon: Daemon, tmp_path: Path) -> None:
    """A new user's trial: every `init` writes the same default listen address, and
    with this CA's daemon stopped, its admin commands reached another CA's daemon
    there and blamed this CA's root.pem; `key list` did not read the inventory. A
    stopped single node says so; `key list` reads its inventory."""
    from tests.conftest import set_config
    ca = init_ca(tmp_path)
    set_config(ca.state, "server", "listen", daemon.url.removeprefix("https://"))
    config = ca.state / "hsmca.toml"
    for args in (("status",), ("token", "create", "--role", "service", "--name",
                               "q.example")):
        msg = one_line_error(hsmca(*args, "--config", config, check=False))
        assert msg == (f"hsmca: error: the daemon of {config} is not running (it writes "
                       f"{ca.state / 'serve.url'} while it runs), and something else "
                       f"answers at {daemon.url}: another CA's daemon? Start this one "
                       f"(`hsmca serve --config {config}`), or give --url"), msg
    listed = hsmca("key", "list", "--config", config)
    assert listed.stderr.startswith(f"hsmca: note: the daemon of {config} is not running: "
                                    "read from the inventory "), listed.stderr
    assert "issuing-ca" in listed.stdout


# ---- credentials checked before the handshake (item 6) --------------------------------

def test_renew_names_an_expired_certificate_or_one_from_another_ca(daemon: Daemon,
                                                                   tmp_path: Path) -> None:
    other = other_ca(tmp_path)
    now = dt.datetime.now(dt.UTC)
    base = ("renew", "--url", daemon.url, "--ca", daemon.root)
    cert, key = other.leaf(tmp_path, "expired.example", now - dt.timedelta(days=2),
                           now - dt.timedelta(days=1))
    msg = one_line_error(hsmca(*base, "--cert", cert, "--key", key, check=False))
    assert f"--cert {cert} expired at" in msg and "enroll again" in msg
    # by this host's clock, which may be the wrong one (a client trial's clock two days
    # ahead was sent for a new token alone)
    assert "(this host's clock says 20" in msg and "if this host's clock is wrong, set it " \
        "right first" in msg, msg
    # revoking it: not told to enroll again (an operator trial), but where the CRL is
    msg = one_line_error(hsmca("revoke", "--url", daemon.url, "--ca", daemon.root, "--cert",
                               cert, "--key", key, check=False))
    assert f"--cert {cert} expired at" in msg and "cannot authenticate to revoke itself" in \
        msg and "--reason keyCompromise --config" in msg and "enroll" not in msg, msg
    # an expired credential revoking another serial is not told to revoke itself (a
    # review)
    msg = one_line_error(hsmca("revoke", "1234", "--url", daemon.url, "--ca", daemon.root,
                               "--cert", cert, "--key", key, check=False))
    assert f"--cert {cert} expired at" in msg and "revoke itself" not in msg, msg

    cert, key = other.leaf(tmp_path, "foreign.example", now - dt.timedelta(hours=1),
                           now + dt.timedelta(days=1))
    msg = one_line_error(hsmca(*base, "--cert", cert, "--key", key, check=False))
    assert "was issued by 'CN=Other Root CA', not by the CA at" in msg
    assert "'CN=hsmca Issuing CA'" in msg
    # Another CA of the very same name (another hsmca: staging, say): said so, rather
    # than "issued by X, not by the CA that issues as X".
    (tmp_path / "twin").mkdir()
    twin = other_ca(tmp_path / "twin", cn="hsmca Issuing CA")
    twin_cert, twin_key = twin.leaf(tmp_path / "twin", "twin.example",
                                    now - dt.timedelta(hours=1), now + dt.timedelta(days=1))
    msg = one_line_error(hsmca(*base, "--cert", twin_cert, "--key", twin_key, check=False))
    assert "whose key is not one of the CA at" in msg and "has that name too" in msg

    mine, mine_key = enroll(daemon, tmp_path, "service", [NAME])
    msg = one_line_error(hsmca(*base, "--cert", mine, "--key", key, check=False))
    assert f"--key {key} is not the private key of --cert {mine}" in msg
    # The same checks guard the SSH commands.
    msg = one_line_error(hsmca("ssh", "user", "--url", daemon.url, "--ca", daemon.root,
                               "--cert", cert, "--key", key, "--pubkey",
                               daemon.state / "ssh/user_ca.pub", check=False))
    assert "was issued by 'CN=Other Root CA'" in msg
    assert one_line_error(hsmca(*base, "--cert", mine, "--key", mine_key, "--ca",
                                tmp_path / "no.pem", check=False)).endswith("no such file")


# ---- --pubkey never sends a private key (item 5) ---------------------------------------

@pytest.mark.parametrize("command", ["user", "host"])
def test_pubkey_holding_a_private_key_is_refused_before_any_request(tmp_path: Path,
                                                                   command: str) -> None:
    keygen = require("ssh-keygen")
    private = tmp_path / "id_ed25519"
    subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", private], check=True)
    # Port 1: nothing listens; the refusal must come before any connection is tried.
    proc = hsmca("ssh", command, "--url", "https://127.0.0.1:1", "--cert", tmp_path / "c.pem",
                 "--key", tmp_path / "k.pem", "--pubkey", private, check=False)
    msg = one_line_error(proc)
    assert f"--pubkey {private} holds a private key" in msg and f"{private}.pub" in msg
    assert "OPENSSH" not in proc.stderr + proc.stdout


def test_a_pem_certificate_as_pubkey_is_not_called_a_private_key(tmp_path: Path) -> None:
    """An SSH trial gave cert.pem as --pubkey and was told it held a private key."""
    pem = tmp_path / "cert.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    proc = hsmca("ssh", "host", "--url", "https://127.0.0.1:1", "--cert", tmp_path / "c.pem",
                 "--key", tmp_path / "k.pem", "--pubkey", pem, check=False)
    msg = one_line_error(proc)
    assert f"--pubkey {pem} is PEM (certificate), not an OpenSSH public key" in msg, msg
    assert "holds a private key" not in msg


def test_a_dsa_pubkey_is_refused_in_one_line_without_a_python_warning(tmp_path: Path) -> None:
    """An SSH trial: cryptography's deprecation warning for DSA came first, with a
    source path, before the refusal."""
    dsa = tmp_path / "dsa.pub"
    dsa.write_text("ssh-dss AAAAB3NzaC1kc3MAAACBAP user@host\n")
    proc = hsmca("ssh", "user", "--url", "https://127.0.0.1:1", "--cert", tmp_path / "c.pem",
                 "--key", tmp_path / "k.pem", "--pubkey", dsa, check=False)
    assert "is a DSA key (ssh-dss)" in one_line_error(proc) and "ed25519" in proc.stderr
    assert "Warning" not in proc.stderr


# ---- one pair of credential flags (item 8) ---------------------------------------------

def test_credential_flags_have_one_name_and_accept_the_other(daemon: Daemon,
                                                             tmp_path: Path) -> None:
    cert, key = enroll(daemon, tmp_path, "service", [NAME])
    before = cert_serial(cert)
    hsmca("renew", "--url", daemon.url, "--ca", daemon.root, "--client-cert", cert,
          "--client-key", key)
    assert cert_serial(cert) != before
    admin = daemon.state / "admin"
    shown = hsmca("audit", "show", "--url", daemon.url, "--ca", daemon.root,
                  "--cert", admin / "cert.pem", "--key", admin / "key.pem")
    assert "init.start" in shown.stdout
    # --key is the client's private key here, the audit public key in `audit verify`:
    # the one given where the other is meant is named (a docs trial mixed them up)
    mixed = hsmca("audit", "show", "--url", daemon.url, "--ca", daemon.root, "--cert",
                  admin / "cert.pem", "--key", daemon.state / "audit/audit_key.pem",
                  check=False)
    assert mixed.returncode == 1 and "it is a public key (such as the audit key" in \
        mixed.stderr, mixed.stderr
    for argv in (["renew"], ["ssh", "user"], ["ssh", "host"], ["audit", "show"],
                 ["audit", "verify"]):
        text = hsmca(*argv, "--help").stdout
        assert "--client-cert" in text and "--cert" in text and "same flag" in text, argv
    # --from past the end says so, here and offline (an operator trial got nothing)
    past = hsmca("audit", "show", "--url", daemon.url, "--ca", daemon.root, "--cert",
                 admin / "cert.pem", "--key", admin / "key.pem", "--from", "1000000")
    assert past.stdout == "" and past.stderr == (
        "hsmca: no line from seq 1000000: the log ends before it\n"), past.stderr
    lines = len((daemon.state / "audit" / "log.jsonl").read_bytes().splitlines())
    past = hsmca("audit", "show", "--log", daemon.state / "audit" / "log.jsonl", "--from",
                 "1000000")
    assert past.stdout == "" and re.fullmatch(
        r"hsmca: no line from seq 1000000: the log ends before it \(it has (\d+) lines, seq "
        r"0 to \d+\)\n", past.stderr) and int(past.stderr.split("has ")[1].split()[0]) >= \
        lines, past.stderr
    # and a --limit that shows nothing is refused (0 and -3 showed one row)
    for bad in ("0", "-3"):
        said = one_line_error(hsmca("cert", "list", "--config", daemon.state / "hsmca.toml",
                                    "--limit", bad, check=False), 2)
        assert f"must be a whole number of 1 or more, not '{bad}'" in said, said


# ---- CLI polish (item 12) --------------------------------------------------------------

def test_version_and_the_help_epilog() -> None:
    from ca import __version__
    # the code's version, as daemon.start logs it (an updated checkout's said the one
    # pip had installed first)
    assert hsmca("--version").stdout == f"hsmca {__version__}\n"
    out = hsmca("--help").stdout
    # Every example line that continues ends with a backslash, kept in the output.
    assert "--client-cert a/cert.pem \\\n      --client-key" in out
    assert out.count("\\\n") == EPILOG.count("\\\n") >= 4


def _subparser(path: list[str]) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = build_parser()
    for name in path:
        action = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
        p = action.choices[name]
    return p


@pytest.mark.parametrize("path", [["renew"], ["ssh", "user"], ["ssh", "host"],
                                  ["audit", "show"], ["revoke"], ["enroll"]])
def test_every_flag_has_help(path: list[str]) -> None:
    missing = [a.option_strings or a.dest for a in _subparser(path)._actions
               if not a.help]
    assert not missing, missing


def test_every_command_has_examples_its_own_parser_takes() -> None:
    """A docs trial found examples only in `hsmca --help`. Each command's help ends with
    some now, as written (continuation lines kept), and each parses with that command's
    flags: an example naming a flag the command lacks fails here, not for a reader."""
    from ca.commands.examples import EXAMPLES, commands
    found = commands(build_parser())
    assert sorted(found) == sorted(EXAMPLES), set(found) ^ set(EXAMPLES)
    for name, shown in EXAMPLES.items():
        assert shown, name
        for example in shown:
            argv = shlex.split(example.replace("\\\n", " "))
            if "--" in argv:  # runuser -u hsmca -- hsmca ...
                argv = argv[argv.index("--") + 1:]
            if argv[0] == "(umask":  # (umask 077 && hsmca ... > file)
                argv = argv[argv.index("&&") + 1:argv.index(">")]
            assert argv[0] == "hsmca", example
            assert " ".join(argv[1:1 + len(name.split())]) == name, (name, example)
            build_parser().parse_args(argv[1:])  # exits 2 on a flag the command lacks
        text = hsmca(*name.split(), "--help").stdout
        assert "\nexamples:\n  " in text, (name, text[-300:])
        assert all(line in text for e in shown for line in e.splitlines()), name


@pytest.mark.parametrize(("given", "expected"), [
    ("1A2B", "1a2b"), ("0x1a2b", "1a2b"), ("0X001A2B", "1a2b"),
    ("1a:2b", "1a2b"), ("  00:9f:3c:0a  ", "9f3c0a"), ("7", "7")])
def test_revoke_reads_serials_as_people_copy_them(given: str, expected: str) -> None:
    assert parse_serial(given) == expected


@pytest.mark.parametrize("bad", ["", "0", "xyz", "1a::2b", "1a:2b3", "0x", "12 34"])
def test_revoke_refuses_what_is_not_a_serial(bad: str) -> None:
    from ca.errors import CLIError
    with pytest.raises(CLIError):
        parse_serial(bad)


@pytest.mark.parametrize("bad", ["0x12", "0", "18446744073709551616", "-5", "1e3"])
def test_an_ssh_serial_is_decimal_as_ssh_keygen_shows_it(bad: str) -> None:
    """argparse's int said "invalid int value: '0x12'" to an SSH trial."""
    proc = hsmca("ssh", "revoke", "--serial", bad, "--config", "hsmca.toml", check=False)
    assert proc.returncode == 2 and f"{bad!r} is not an SSH certificate serial: a decimal " \
        "number from 1 to 2^64-1" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


@pytest.mark.parametrize(("given", "said"), [
    ("0s", "'0s' must be more than 0"), ("90", "'90' has no unit"),
    ("1.5h", "'1.5h' is not a duration like 90s, 15m, 8h, 30d or 1h30m")])
def test_a_duration_flag_says_what_is_wrong_with_it_in_one_line(given: str, said: str) -> None:
    """Read as the CA reads a requested lifetime (an SSH trial: `--refresh 0s` was "not a
    duration", and `--ttl 1h30m` refused while the flags took it)."""
    proc = hsmca("renew", "--exec-timeout", given, check=False)
    assert proc.returncode == 2 and said in proc.stderr and proc.stderr.count("\n") <= 2, \
        proc.stderr


def test_a_serial_with_a_digit_too_many_is_said_too_long_not_not_hex() -> None:
    from ca.errors import CLIError
    with pytest.raises(CLIError, match="has 41 hex digits: a certificate serial has at most "
                       "40"):
        parse_serial("1" + "75e629" * 6 + "abcd")
    # openssl pads a serial to whole bytes: its leading zeros are no digits of it
    assert parse_serial("00" + "8" + "1" * 39) == "8" + "1" * 39
    # zero is hex, and no serial (a web trial's '00' was told "not ... in hex")
    with pytest.raises(CLIError, match="serial '00' is zero, which no certificate has"):
        parse_serial("00")


def test_a_path_given_as_the_token_itself_is_told_to_be_a_token_file(
        tmp_path: Path) -> None:
    """An operator trial gave --token ../fleet/api.token: sent as the token, the CA said
    "unknown bootstrap token"."""
    token = tmp_path / "api.token"
    token.write_text("hsmca-0123-abc\n")
    proc = hsmca("enroll", "--url", "https://127.0.0.1:9", "--token", str(token), "--name",
                 "x.example", "--out", tmp_path / "out", check=False)
    assert one_line_error(proc).endswith(
        f"--token takes the token itself; {token} is a file: give it as --token-file "
        f"{token}"), proc.stderr
    assert "hsmca-0123-abc" not in proc.stderr


def test_what_to_check_follows_why_the_connection_failed(tmp_path: Path) -> None:
    """The connection-limit hint was given for a host name that does not resolve too."""
    token = tmp_path / "t"
    token.write_text("hsmca-0123-abc\n")
    for url, hint in (("https://no-such-host.invalid:8443", "check the host name in --url"),
                      (f"https://127.0.0.1:{free_port()}",
                       "is `hsmca serve` running there, on that port?")):
        proc = hsmca("enroll", "--url", url, "--token-file", token, "--name", "x.example",
                     "--out", tmp_path / "out", check=False)
        assert proc.returncode != 0 and hint in proc.stderr, proc.stderr
        assert "connection limit" not in proc.stderr
    # An https URL at a port that speaks plain HTTP: said so, not OpenSSL's
    # "WRONG_VERSION_NUMBER" beside a hint about the connection limit (an operator trial)
    import http.server
    import threading
    plain = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=plain.serve_forever, daemon=True).start()
    try:
        proc = hsmca("enroll", "--url", f"https://127.0.0.1:{plain.server_address[1]}",
                     "--token-file", token, "--name", "x.example", "--out", tmp_path / "out",
                     check=False)
    finally:
        plain.shutdown()
        plain.server_close()
    assert "the server there does not speak TLS" in one_line_error(proc), proc.stderr
    assert "WRONG_VERSION" not in proc.stderr


def test_revoke_with_the_openssl_colon_form_and_self_revocation(own_daemon: Daemon,
                                                                tmp_path: Path) -> None:
    daemon = own_daemon  # it revokes certificates
    kept, _ = enroll(daemon, tmp_path, "service", [NAME])  # never revoked: a control
    cert, _ = enroll(daemon, tmp_path, "service", [NAME])
    text = subprocess.run([require("openssl"), "x509", "-in", cert, "-noout", "-serial"],
                          capture_output=True, text=True, check=True).stdout
    hexserial = text.strip().split("=", 1)[1].lower()
    colon = ":".join(hexserial[i:i + 2] for i in range(0, len(hexserial), 2))
    proc = hsmca("revoke", colon, "--reason", "keyCompromise", "--config",
                 daemon.state / "hsmca.toml", "--url", daemon.url)
    assert f"revoked {cert_serial(cert)}" in proc.stdout

    # A service revokes its own certificate with its own credential, no serial needed.
    own, own_key = enroll(daemon, tmp_path, "service", [NAME])
    proc = hsmca("revoke", "--url", daemon.url, "--ca", daemon.root, "--cert", own,
                 "--key", own_key, "--reason", "superseded")
    assert f"revoked {cert_serial(own)}" in proc.stdout
    serials = {c.serial_number for c in x509.load_der_x509_crl(
        subprocess.run(["curl", "-sSf", "--cacert", daemon.root, f"{daemon.url}/v1/x509/crl"],
                       capture_output=True, check=True).stdout)}
    assert serials == {int(cert_serial(cert), 16), int(cert_serial(own), 16)}
    assert int(cert_serial(kept), 16) not in serials


def test_revoking_a_long_lineage_names_a_few_and_counts_the_rest(own_daemon: Daemon,
                                                                  tmp_path: Path) -> None:
    """A lineage of 12 revoked for keyCompromise: the line names 8 of the 11 renewals
    and counts the rest, instead of a line of every serial (a fleet trial's 390)."""
    import json

    from tests.helpers import http
    daemon = own_daemon
    cert, key = enroll(daemon, tmp_path, "service", [NAME])
    first = cert
    for i in range(11):
        status, _, raw = asyncio.run(http("POST", f"{daemon.url}/v1/x509/renew",
                                          daemon.ssl(cert, key), body={}))
        assert status == 201, raw
        cert = tmp_path / f"renewed-{i}.pem"
        cert.write_text(json.loads(raw)["certificate"])
    proc = hsmca("revoke", cert_serial(first), "--reason", "keyCompromise", "--config",
                 daemon.state / "hsmca.toml", "--url", daemon.url)
    assert proc.stdout.count("\n") == 1, proc.stdout
    named = proc.stdout.split("with it its lineage: ", 1)[1].split(" and ", 1)[0]
    assert len(named.split(", ")) == 8, proc.stdout
    assert "and 3 more (the audit log's cert.revoke line lists them all)" in proc.stdout
    status, _, _ = asyncio.run(http("POST", f"{daemon.url}/v1/x509/renew",
                                    daemon.ssl(cert, key), body={}))
    assert status == 403


def test_init_with_a_missing_token_hints_at_softhsm2_conf(tmp_path: Path,
                                                          ca: InitialisedCA) -> None:
    pin = tmp_path / "pin"
    pin.write_text("1234\n")
    pin.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    env["SOFTHSM2_CONF"] = str(tmp_path / "elsewhere.conf")
    (tmp_path / "tokens").mkdir()
    (tmp_path / "elsewhere.conf").write_text(f"directories.tokendir = {tmp_path / 'tokens'}\n")
    proc = subprocess.run([*HSMCA, "init", "--state-dir", tmp_path / "s", "--module",
                           ca.token.module, "--token", ca.token.label, "--pin-file", pin],
                          capture_output=True, text=True, env=env, timeout=120)
    msg = one_line_error(proc)
    assert f"no token labelled {ca.token.label!r}" in msg
    assert f"SOFTHSM2_CONF={tmp_path / 'elsewhere.conf'}" in msg and "export SOFTHSM2_CONF" in msg


def test_an_hsm_error_at_the_start_names_the_setting_behind_it(tmp_path: Path) -> None:
    """A docs trial read "PKCS#11 module not found: ..." and "wrong PIN ..." with nothing
    on where the path or the PIN came from: the start names the [hsm] setting and the
    config file now (hsm/ knows nothing of either)."""
    ca = init_ca(tmp_path)
    config = ca.state / "hsmca.toml"
    text = config.read_text()
    assert f'module = "{ca.token.module}"' in text
    d = start_daemon(ca.state)  # and found by the pre-flight beside the running daemon
    try:                        # (an upgrade trial's ended at the audit log's lock)
        config.write_text(text.replace(f'module = "{ca.token.module}"',
                                       'module = "/usr/lib/softhsm/libsofthsm.so"'))
        msg = one_line_error(hsmca("serve", "--config", config, "--listen", "127.0.0.1:0",
                                   check=False))
    finally:
        assert d.stop() == 0
    assert msg == ("hsmca: error: PKCS#11 module not found: /usr/lib/softhsm/libsofthsm.so "
                   f"(check [hsm] module in {config})"), msg
    wrong = tmp_path / "wrong-pin"
    wrong.write_text("000000\n")
    wrong.chmod(0o600)
    config.write_text(re.sub(r'pin-source = ".*"', f'pin-source = "file:{wrong}"', text))
    msg = one_line_error(hsmca("serve", "--config", config, "--listen", "127.0.0.1:0",
                               check=False))
    assert msg.startswith(f"hsmca: error: wrong PIN for token {ca.token.label!r} (PIN from "
                          f"file {wrong})"), msg
    assert msg.endswith(f"(check [hsm] pin-source: the file or variable it names in {config})")
    assert "000000" not in msg


def test_hsmca_module_runs_without_an_installed_entry_point() -> None:
    proc = subprocess.run([sys.executable, "-m", "ca.cli", "--version"], capture_output=True,
                          text=True, check=True)
    assert proc.stdout.startswith("hsmca ")


@pytest.mark.parametrize("command", ["help", "verify"])
def test_a_command_loads_only_the_libraries_it_uses(tmp_path: Path, command: str) -> None:
    """Every `hsmca` call paid for the HTTP client and the PKCS#11 bindings whether it
    used them or not: `--help` took 0.28 s of CPU and an offline `audit verify` 0.43 s,
    0.13 and 0.22 s once each loads what it uses (scripts, hooks and CI call it often)."""
    if command == "help":
        args = ["--help"]
    else:  # a log nothing writes meanwhile (a served one's may be mid-line)
        state = init_ca(tmp_path).state
        args = ["audit", "verify", "--log", str(state / "audit" / "log.jsonl"), "--key",
                str(state / "audit" / "audit_key.pem")]
    script = ("import sys\nfrom ca.cli import main\n"
              "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as exc:\n"
              "    code = exc.code\n"
              "print(code, sorted({m.split('.')[0] for m in sys.modules}), file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                          text=True, timeout=60)
    code, _, loaded = (proc.stderr.strip().splitlines() or [""])[-1].partition(" ")
    assert code == "0", proc.stderr
    for heavy in ("aiohttp", "pkcs11", "psycopg", "asyncssh", "jinja2", "josepy"):
        assert f"'{heavy}'" not in loaded, f"`hsmca {' '.join(args[:2])}` loads {heavy}"



# ---- renew keeps the files as the service has them, all replaced or none -----------------

def _renew(d: Daemon, cert: Path, key: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return hsmca("renew", "--url", d.url, "--ca", d.root, "--cert", cert, "--key", key,
                 *extra, check=False)


def _pem_blocks(path: Path) -> list[str]:
    return [line.removeprefix("-----BEGIN ").removesuffix("-----")
            for line in path.read_text().splitlines() if line.startswith("-----BEGIN ")]


def _pair(cert: Path, key: Path) -> bool:
    from ca.client import check_credential
    check_credential(cert, key)  # raises if the key is not the certificate's
    return True


def test_renew_keeps_a_combined_file_a_full_chain_and_a_symlink(daemon: Daemon,
                                                                tmp_path: Path) -> None:
    cert, key = enroll(daemon, tmp_path, "service", [NAME])
    issuing = x509.load_pem_x509_certificate((daemon.state / "x509/issuing.pem").read_bytes())
    # enroll writes the leaf and its issuing CA, what a TLS peer sends (a relying party
    # then needs only the root, across an issuing-key rotation too)
    assert x509.load_pem_x509_certificates(cert.read_bytes())[1:] == [issuing]
    leaf = cert.read_text().split("-----END CERTIFICATE-----")[0] + \
        "-----END CERTIFICATE-----\n"
    # haproxy's one file: certificate, then key. Renewed, and renewed with a new key.
    both = tmp_path / "haproxy.pem"
    both.write_text(leaf + key.read_text())
    both.chmod(0o600)
    for extra in ((), ("--rekey",), ()):
        before = cert_serial(both)
        proc = _renew(daemon, both, both, *extra)
        assert proc.returncode == 0, proc.stderr
        assert _pem_blocks(both) == ["CERTIFICATE", "PRIVATE KEY"] and _pair(both, both)
        assert cert_serial(both) != before and both.stat().st_mode & 0o777 == 0o600
    # A full chain stays a full chain: the leaf, then the issuing CA; a leaf alone stays
    # alone (a file made by hand, for a service that wants only the leaf).
    assert _renew(daemon, cert, key).returncode == 0
    assert _pem_blocks(cert) == ["CERTIFICATE", "CERTIFICATE"]
    assert x509.load_pem_x509_certificates(cert.read_bytes())[1] == issuing
    alone = tmp_path / "leaf.pem"
    alone.write_text(cert.read_text().split("-----END CERTIFICATE-----")[0]
                     + "-----END CERTIFICATE-----\n")
    assert _renew(daemon, alone, key).returncode == 0
    assert _pem_blocks(alone) == ["CERTIFICATE"]
    # certbot's layout: live/ links to archive/; the link stays, its target is renewed.
    (tmp_path / "archive").mkdir()
    (tmp_path / "live").mkdir()
    real = tmp_path / "archive" / "cert1.pem"
    real.write_text(alone.read_text())
    link = tmp_path / "live" / "cert.pem"
    link.symlink_to(real)
    before = cert_serial(real)
    assert _renew(daemon, link, key).returncode == 0, "renewal through a symlink"
    assert link.is_symlink() and cert_serial(real) != before


def test_a_ca_bundle_with_a_certificate_cryptography_warns_of_is_still_one_line(
        daemon: Daemon, tmp_path: Path) -> None:
    """A service team's trial gave Debian's CA bundle as --ca: one of its roots has a
    negative serial, and two lines of a Python warning came before the one-line error."""
    cert, key = enroll(daemon, tmp_path, "service", [NAME])
    odd = tmp_path / "bundle.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", tmp_path / "odd.key",
                    "-subj", "/CN=a root with a negative serial", "-set_serial", "-5",
                    "-days", "1", "-out", odd], check=True, capture_output=True)
    msg = one_line_error(hsmca("renew", "--url", daemon.url, "--ca", odd, "--cert", cert,
                               "--key", key, check=False))
    assert "does not verify against --ca" in msg, msg


def test_an_admin_lists_and_shows_certificates_by_name_and_by_openssls_serial(
        daemon: Daemon, tmp_path: Path) -> None:
    """A service team's trial: "what does web1 have?" and "which certificate is this
    serial from openssl x509 -serial?" needed curl and the admin credential by hand."""
    cert, _ = enroll(daemon, tmp_path, "service", [NAME])
    config = daemon.state / "hsmca.toml"
    serial = cert_serial(cert)
    listed = hsmca("cert", "list", "--config", config, "--search", NAME).stdout.splitlines()
    assert listed[0].split() == ["SERIAL", "STATUS", "ROLE", "KIND", "NOT_AFTER", "NAMES"], \
        listed
    assert any(line.split()[:4] == [serial, "valid", "service", "x509"]
               and line.endswith(NAME) for line in listed), listed
    assert hsmca("cert", "list", "--config", config, "--search", "no-such.example"
                 ).stdout == "no certificate matches\n"
    printed = subprocess.run(["openssl", "x509", "-in", cert, "-noout", "-serial"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert printed.startswith("serial=") and printed[7:] != serial  # upper case, zeros
    shown = hsmca("cert", "show", printed, "--config", config).stdout
    assert f"serial      {serial}" in shown and "status      valid" in shown, shown
    assert "audit       line " in shown
    pem = hsmca("cert", "show", serial, "--config", config, "--pem").stdout
    assert x509.load_pem_x509_certificate(pem.encode()).serial_number == int(serial, 16)
    hsmca("revoke", serial, "--config", config, "--reason", "superseded")
    assert "revoked     " in hsmca("cert", "show", serial, "--config", config).stdout
    assert any(line.split()[:2] == [serial, "revoked"] for line in hsmca(
        "cert", "list", "--config", config, "--status", "revoked").stdout.splitlines())
    missing = one_line_error(hsmca("cert", "show", "0x1234", "--config", config, check=False))
    assert "404" in missing and "no certificate with that serial" in missing, missing


def test_a_lifetime_cut_to_the_issuing_cas_end_is_said(tmp_path: Path) -> None:
    """A service team's trial: with x509-max-ttl-s raised to 10 years, `--ttl 3650d`
    gave the issuing CA's remaining 5 years without a word."""
    from tests.conftest import init_ca, set_config, start_daemon
    ca = init_ca(tmp_path)
    set_config(ca.state, "policy", "x509-max-ttl-s", 10 * 365 * 86400)
    d = start_daemon(ca.state)
    try:
        issuing = x509.load_pem_x509_certificate((ca.state / "x509/issuing.pem").read_bytes())
        proc = enroll_cmd(d, token_file(d, tmp_path, "service", [NAME]), tmp_path / "long",
                          "--ttl", "3650d")
        assert proc.returncode == 0, proc.stderr
        day = f"{issuing.not_valid_after_utc:%Y-%m-%d}"
        assert proc.stderr.startswith("hsmca: warning: the lifetime was cut to the issuing "
                                      f"CA's expiry ({day}"), proc.stderr
        leaf = x509.load_pem_x509_certificate((tmp_path / "long/cert.pem").read_bytes())
        assert leaf.not_valid_after_utc == issuing.not_valid_after_utc
        proc = enroll_cmd(d, token_file(d, tmp_path, "service", [NAME]), tmp_path / "short",
                          "--ttl", "30d")
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    finally:
        assert d.stop() == 0


def test_a_new_key_at_renew_is_of_the_kind_and_size_of_the_old(daemon: Daemon,
                                                                tmp_path: Path) -> None:
    """A service team's trial: `renew --rekey` turned an RSA key into P-256 silently,
    and a service whose peers need RSA broke at its key rotation."""
    import asyncio
    import json

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    from tests.helpers import bootstrap_token, csr_pem, http
    for old in (rsa.generate_private_key(public_exponent=65537, key_size=3072),
                ec.generate_private_key(ec.SECP384R1())):
        async def issue(key: object = old) -> str:
            token = await bootstrap_token(daemon, "service", [NAME])
            status, _, raw = await http("POST", f"{daemon.url}/v1/x509/enroll", daemon.ssl(),
                                        body={"csr": csr_pem([NAME], key)},
                                        headers={"Authorization": f"Bearer {token}"})
            assert status == 201, raw
            return str(json.loads(raw)["certificate"])
        cert, key = tmp_path / f"{type(old).__name__}.pem", tmp_path / f"{id(old)}.key"
        cert.write_text(asyncio.run(issue()))
        key.write_bytes(old.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
        key.chmod(0o600)
        proc = _renew(daemon, cert, key, "--rekey")
        assert proc.returncode == 0, proc.stderr
        new = serialization.load_pem_private_key(key.read_bytes(), None)
        if isinstance(old, rsa.RSAPrivateKey):
            assert isinstance(new, rsa.RSAPrivateKey) and new.key_size == 3072
        else:
            assert isinstance(new, ec.EllipticCurvePrivateKey)
            assert new.curve.name == "secp384r1"
        assert new.public_key() != old.public_key()


def test_renew_with_no_room_for_its_files_asks_the_ca_nothing(daemon: Daemon,
                                                                tmp_path: Path) -> None:
    """A full-disk trial: each `hsmca renew` on a full disk had a certificate issued,
    then failed to write it and threw it away (four for nobody). The room for the files
    is taken first: no room, nothing asked. (A file size limit stands for the disk.)"""
    cert, key = enroll(daemon, tmp_path, "service", [NAME])
    files = {p: p.read_bytes() for p in (cert, key)}
    before = daemon_serials(daemon)
    proc = subprocess.run(["prlimit", "--fsize=600", *HSMCA, "renew", "--url", daemon.url,
                           "--ca", daemon.root, "--cert", cert, "--key", key, "--rekey"],
                          capture_output=True, text=True, timeout=120)
    msg = one_line_error(proc)
    assert msg == (f"hsmca: error: cannot write to {cert.parent}: File too large (checked "
                   "before contacting the CA: nothing was spent)"), msg
    assert daemon_serials(daemon) == before
    assert {p: p.read_bytes() for p in (cert, key)} == files


def test_renew_if_due_asks_the_ca_nothing_before_two_thirds(daemon: Daemon,
                                                              tmp_path: Path) -> None:
    """An SSH trial followed docs/ssh.md ("renew before `ssh user`: it renews from two
    thirds of its lifetime") and each run renewed, piling up live credentials of one
    key. With --if-due a run before two thirds says when, and asks nothing."""
    cert, key = enroll(daemon, tmp_path, "service", [NAME])
    before, pem = daemon_serials(daemon), cert.read_bytes()
    proc = hsmca("renew", "--if-due", "--url", daemon.url, "--ca", daemon.root, "--cert",
                 cert, "--key", key)
    made = x509.load_pem_x509_certificate(cert.read_bytes())
    due = made.not_valid_before_utc + (made.not_valid_after_utc
                                       - made.not_valid_before_utc) * 2 / 3
    said = re.fullmatch(r"not renewed: not due until (\S+) \(two thirds of its lifetime; "
                        r"--if-due\)\n", proc.stdout)
    assert said and abs(dt.datetime.fromisoformat(said[1]) - due) < dt.timedelta(minutes=2), \
        proc.stdout
    assert daemon_serials(daemon) == before and cert.read_bytes() == pem
    # without it, a renewal as before
    assert hsmca("renew", "--url", daemon.url, "--ca", daemon.root, "--cert", cert, "--key",
                 key).stdout.startswith("renewed: serial ")
    assert len(daemon_serials(daemon) - before) == 1


def test_a_hook_that_failed_runs_again_at_the_next_if_due_run(daemon: Daemon,
                                                               tmp_path: Path) -> None:
    """A client trial: the documented hourly timer (`renew --if-due --exec 'systemctl
    reload nginx'`) whose reload failed once never ran it again: each later run said
    "not due", and nginx served the old certificate until it expired. The hook is owed
    until it succeeds (a marker beside the certificate, as for `--daemon`), and the next
    run runs it, due or not."""
    cert, key = enroll(daemon, tmp_path, "service", [NAME])
    reloaded = tmp_path / "reloaded"
    common = ("--url", daemon.url, "--ca", daemon.root, "--cert", cert, "--key", key)
    proc = hsmca("renew", *common, "--exec", "exit 1", check=False)
    assert proc.stdout.startswith("renewed: serial ")
    assert one_line_error(proc) == "hsmca: error: renewed, but --exec 'exit 1' exited with " \
        "status 1 (owed: the next run with --if-due runs it again)", proc.stderr
    before = daemon_serials(daemon)
    proc = hsmca("renew", *common, "--if-due", "--exec", f"touch {reloaded}")
    assert "not renewed: not due until" in proc.stdout and "running --exec again: it did not " \
        "succeed after the last renewal" in proc.stdout, proc.stdout
    assert reloaded.exists() and daemon_serials(daemon) == before
    # Done once it succeeded: the next run has nothing owed
    reloaded.unlink()
    proc = hsmca("renew", *common, "--if-due", "--exec", f"touch {reloaded}")
    assert "running --exec" not in proc.stdout and not reloaded.exists(), proc.stdout
    # One that fails again is said so, and owed still
    proc = hsmca("renew", *common, "--exec", "exit 1", check=False)
    proc = hsmca("renew", *common, "--if-due", "--exec", "exit 2", check=False)
    assert one_line_error(proc) == "hsmca: error: the last renewal was installed, but --exec " \
        "'exit 2' exited with status 2 (owed: the next run with --if-due runs it again)", \
        proc.stderr
    hsmca("renew", *common, "--if-due", "--exec", f"touch {reloaded}")
    assert reloaded.exists()


def test_a_flag_given_twice_adds_to_the_first(daemon: Daemon, tmp_path: Path) -> None:
    """An operator trial: `--name a --name b` (and `--principal`) kept the last alone,
    and the certificate carried one of the two names, with nothing said."""
    config = ("--config", daemon.state / "hsmca.toml", "--url", daemon.url)
    names = ["m1.internal.example", "m2.internal.example"]
    token = tmp_path / "m.token"
    token.write_text(hsmca("token", "create", *config, "--role", "service", "--name",
                           names[0], "--name", names[1]).stdout)
    hsmca("enroll", "--url", daemon.url, "--ca", daemon.root, "--token-file", token,
          "--name", names[0], "--name", names[1], "--out", tmp_path / "m")
    cert = x509.load_pem_x509_certificate((tmp_path / "m" / "cert.pem").read_bytes())
    assert cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == names
    hsmca("token", "create", *config, "--role", "user", "--name", "ann@example.com",
          "--principal", "ann", "--principal", "deploy")
    grant = [e for e in log_lines(daemon.state) if e.get("event") == "token.create"][-1]
    assert grant["principals"] == ["ann", "deploy"], grant


def daemon_serials(d: Daemon) -> set[str]:
    """The serials the CA has issued, as `hsmca cert list` shows them: all of them (the
    session's daemon holds more than a page of 50, whose "(N more...)" line was read as a
    serial, and a renewal fell outside the page)."""
    listed = subprocess.run([*HSMCA, "cert", "list", "--config", d.state / "hsmca.toml",
                             "--url", d.url, "--limit", "500"], capture_output=True,
                            text=True, check=True).stdout.splitlines()[1:]
    serials = {line.split()[0] for line in listed if line.strip()}
    assert serials and all(re.fullmatch(r"[0-9a-f]+", s) for s in serials), listed
    assert len(serials) < 500, "more than one page (500, the most it lists)"
    return serials


def test_renew_replaces_all_files_or_none_and_mends_one_cut_short(daemon: Daemon,
                                                                  tmp_path: Path) -> None:
    cert, key = enroll(daemon, tmp_path, "service", [NAME])
    # A certificate file that cannot be replaced (immutable, as a bind-mounted file
    # would be): a new key is not left beside the old certificate, nor any debris.
    files = {p: p.read_bytes() for p in (cert, key)}
    subprocess.run(["chattr", "+i", cert], check=True)
    try:
        msg = one_line_error(_renew(daemon, cert, key, "--rekey"))
    finally:
        subprocess.run(["chattr", "-i", cert], check=True)
    # The new key was renamed into place, then the certificate could not be: the key
    # is put back (what it held was kept beside it), and the message names the file.
    assert f"cannot replace {cert}: Operation not permitted; every file is as it was" in msg
    assert {p: p.read_bytes() for p in (cert, key)} == files
    assert sorted(p.name for p in cert.parent.iterdir()) == ["cert.pem", "chain.pem",
                                                              "key.pem"]
    # A renewal killed between its renames: the new key is in place, the certificate
    # still the old one, and what each held before kept beside it (as commit leaves
    # them). The next run puts the pair back together, then renews.
    os.link(key, key.parent / ".key.pem.hsmca-previous")
    os.link(cert, cert.parent / ".cert.pem.hsmca-previous")
    other = tmp_path / "other"
    other.mkdir()
    _, stray = enroll(daemon, other, "service", [NAME])
    key.unlink()
    key.write_bytes(stray.read_bytes())
    proc = _renew(daemon, cert, key)
    assert proc.returncode == 0, proc.stderr
    assert "was interrupted between replacing its files" in proc.stderr
    assert _pair(cert, key) and key.read_bytes() == files[key]
    assert not list(cert.parent.glob(".*"))
    # `renew --daemon`, which a unit restarts after such a crash, mends it before it
    # judges the pair (else it would refuse it, at every restart).
    os.link(key, key.parent / ".key.pem.hsmca-previous")
    os.link(cert, cert.parent / ".cert.pem.hsmca-previous")
    kept = key.read_bytes()
    key.unlink()
    key.write_bytes(stray.read_bytes())
    runner = Running.start("renew", "--daemon", "--url", daemon.url, "--ca", daemon.root,
                           "--cert", cert, "--key", key)
    try:
        runner.wait("renew.scheduled")
        assert key.read_bytes() == kept and _pair(cert, key)
    finally:
        assert runner.stop() == 0
    # But not while another renewal holds the directory (a timer's, half-way through
    # its renames): mending then would undo that one's work (review of the change).
    for left in cert.parent.glob(".*.hsmca-previous"):
        left.unlink()
    os.link(key, key.parent / ".key.pem.hsmca-previous")
    os.link(cert, cert.parent / ".cert.pem.hsmca-previous")
    key.unlink()
    key.write_bytes(stray.read_bytes())
    busy = os.open(cert.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        import fcntl
        fcntl.flock(busy, fcntl.LOCK_EX)
        proc = hsmca("renew", "--daemon", "--url", daemon.url, "--ca", daemon.root,
                     "--cert", cert, "--key", key, check=False)
    finally:
        os.close(busy)
    assert f"another renewal in {cert.parent} is under way" in proc.stderr, proc.stderr
    assert key.read_bytes() == stray.read_bytes()  # left to the renewal under way
    assert (key.parent / ".key.pem.hsmca-previous").exists()
    assert _renew(daemon, cert, key).returncode == 0 and _pair(cert, key)


def test_a_hook_that_hangs_is_killed_and_said(daemon: Daemon, tmp_path: Path) -> None:
    cert, key = enroll(daemon, tmp_path, "service", [NAME])
    child = tmp_path / "hook-child.pid"
    proc = subprocess.run(
        [*HSMCA, "renew", "--url", daemon.url, "--ca", daemon.root, "--cert", cert, "--key",
         key, "--exec", f"sleep 600 & echo $! > {child}; wait", "--exec-timeout", "1s"],
        capture_output=True, text=True, timeout=120)
    msg = one_line_error(proc)
    assert msg.startswith("hsmca: error: renewed, but --exec") and msg.endswith(
        "was killed (SIGKILL): it did not finish within --exec-timeout (1 s), or something "
        "else killed it (owed: the next run with --if-due runs it again)"), msg
    assert proc.stdout.startswith("renewed: serial ")
    # What the hook started went with it (its process group), not only the shell.
    assert gone(child.read_text().strip())


def test_renew_daemon_names_a_wrong_ca_or_a_revoked_certificate_at_start(
        own_daemon: Daemon, tmp_path: Path) -> None:
    d = own_daemon
    cert, key = enroll(d, tmp_path, "service", [NAME])
    other = other_ca(tmp_path)
    base = ("renew", "--daemon", "--url", d.url, "--cert", cert, "--key", key)
    # Exit 3: what retrying cannot fix, which the docs' unit does not restart every minute.
    msg = one_line_error(hsmca(*base, "--ca", other.root_pem, check=False), 3)
    assert "does not verify against --ca" in msg, msg
    # A directory every user can write (an older enroll under umask 000 made them) is
    # refused now, not at the first renewal hours later (an upgrade trial).
    cert.parent.chmod(0o777)
    msg = one_line_error(hsmca(*base, "--ca", d.root, check=False), 3)
    assert f"{cert.parent} is writable by every user" in msg, msg
    cert.parent.chmod(0o755)
    hsmca("revoke", "--config", d.state / "hsmca.toml", cert_serial(cert))
    msg = one_line_error(hsmca(*base, "--ca", d.root, check=False), 3)
    assert "has been revoked" in msg and "enroll again with a new bootstrap token" in msg, msg


def test_what_a_killed_run_left_is_swept_by_the_next(daemon: Daemon, tmp_path: Path) -> None:
    cert, key = enroll(daemon, tmp_path, "service", [NAME])
    old, fresh = cert.parent / ".cert.pem.k1ll3d00", cert.parent / ".cert.pem.runn1ng0"
    for leftover in (old, fresh):
        leftover.write_text("half a certificate")
    os.utime(old, (0, 0))  # long ago: no run is still writing it
    assert _renew(daemon, cert, key).returncode == 0
    assert not old.exists() and fresh.exists()  # a run under way keeps its file
    (tmp_path / ".out.enroll-deadbeef").mkdir()  # a killed enroll's empty staging directory
    token = token_file(daemon, tmp_path, "service", [NAME])
    assert enroll_cmd(daemon, token, tmp_path / "out").returncode == 0
    assert not (tmp_path / ".out.enroll-deadbeef").exists()


def test_one_renewal_at_a_time_in_a_directory(daemon: Daemon, tmp_path: Path) -> None:
    """A timer's renew and a daemon's, at once: the second waits its turn rather than
    mend the first's files half-way through its renames."""
    import fcntl
    cert, key = enroll(daemon, tmp_path, "service", [NAME])
    fd = os.open(cert.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a renewal under way holds it
        msg = one_line_error(_renew(daemon, cert, key))
        assert f"another renewal in {cert.parent} is under way" in msg, msg
    finally:
        os.close(fd)
    assert _renew(daemon, cert, key).returncode == 0


def test_a_certificate_is_valid_through_its_not_after_second(daemon: Daemon,
                                                            tmp_path: Path) -> None:
    """RFC 5280: validity runs through notAfter inclusive (whole seconds), as OpenSSL's
    handshake judges it; the client (and the daemon, through the same ca.validity)
    refused a renewal from the notAfter second itself."""
    from ca.client import ClientError, check_credential
    cert, key = enroll(daemon, tmp_path, "service", [NAME])
    end = x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc
    check_credential(cert, key, now=end + dt.timedelta(milliseconds=999))
    with pytest.raises(ClientError, match="expired at"):
        check_credential(cert, key, now=end + dt.timedelta(seconds=1))


@pytest.mark.asyncio(loop_scope="session")
async def test_an_enrollment_whose_answer_is_lost_is_retried_and_gets_its_certificate(
        daemon: Daemon, tmp_path: Path) -> None:
    """An API client's trial: an enrollment whose 201 was lost left a spent token and a
    certificate nobody could fetch. `hsmca enroll` sends the same CSR again when the
    answer did not arrive, and gets that certificate (the daemon answers the holder of
    its key again). Here a front on 127.0.0.1 forwards the request to the daemon and,
    the first time, drops the connection instead of passing the answer on."""
    # The front holds the daemon's own TLS key: at a loopback address a client talks only
    # to a server that proves it is the CA's (test_a_host_certified_for_loopback_...).
    front = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    front.load_cert_chain(daemon.state / "tls" / "server.pem", daemon.state / "tls" / "server.key")
    statuses: list[int] = []

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *lines = head.decode().split("\r\n")
        method, path, _ = request_line.split(" ")
        headers = dict(line.split(": ", 1) for line in lines if line)
        kept = {k: v for k, v in headers.items()
                if k.lower() in ("authorization", "content-type")}
        body = await reader.readexactly(int(headers.get("Content-Length", "0")))
        async with aiohttp.ClientSession() as s, s.request(
                method, f"{daemon.url}{path}", data=body, headers=kept,
                ssl=daemon.ssl()) as r:
            status, payload, ctype = r.status, await r.read(), r.headers["Content-Type"]
        statuses.append(status)
        if len(statuses) == 1:
            writer.transport.abort()  # the answer is lost on the way back
            return
        writer.write(f"HTTP/1.1 {status} -\r\nContent-Type: {ctype}\r\nContent-Length: "
                     f"{len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(forward, "127.0.0.1", 0, ssl=front)
    try:
        url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        token = await bootstrap_token(daemon, "service", ["lost.internal.example"])
        out = tmp_path / "lost"
        proc = await asyncio.to_thread(
            hsmca, "enroll", "--url", url, "--ca", daemon.root, "--token", token,
            "--name", "lost.internal.example", "--out", out, check=False)
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr
    assert statuses == [201, 200]  # issued once, then answered again
    serial = x509.load_pem_x509_certificate((out / "cert.pem").read_bytes()).serial_number
    assert f"enrolled: serial {serial:x}" in proc.stdout
    with sqlite3.connect(daemon.state / "hsmca.sqlite3") as db:
        names = [json.loads(n) for (n,) in db.execute("SELECT names FROM certs")]
    assert names.count(["lost.internal.example"]) == 1


def test_renew_refuses_a_link_planted_by_another_user_and_enroll_ignores_a_loose_umask(
        daemon: Daemon, tmp_path: Path) -> None:
    """A review: a renewal run as root in a directory a service account can write
    replaced whatever file that account linked chain.pem to (a root-only file here);
    and `enroll` under umask 000 made its --out writable by every user. The link is
    refused, naming it, before the CA is asked; --out is never group or world
    writable."""
    out = tmp_path / "loose"
    token = token_file(daemon, tmp_path, "service", [NAME])
    proc = subprocess.run([*map(str, HSMCA), "enroll", "--url", daemon.url, "--ca",
                           str(daemon.root), "--token-file", str(token), "--name", NAME,
                           "--out", str(out)],
                          capture_output=True, text=True, preexec_fn=lambda: os.umask(0))
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    victim = tmp_path / "root-only"
    victim.mkdir(mode=0o700)
    (victim / "secret.conf").write_text("root:secret-line\n")
    nobody = 65534
    os.chown(out, nobody, nobody)
    (out / "chain.pem").unlink()
    (out / "chain.pem").symlink_to(victim / "secret.conf")
    os.lchown(out / "chain.pem", nobody, nobody)  # the service account's link
    before = cert_serial(out / "cert.pem")
    proc = _renew(daemon, out / "cert.pem", out / "key.pem")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{out / 'chain.pem'} leads to {victim / 'secret.conf'} through the symlink " \
           f"{out / 'chain.pem'}, made by uid {nobody}:" in proc.stderr, proc.stderr
    assert (victim / "secret.conf").read_text() == "root:secret-line\n"
    assert cert_serial(out / "cert.pem") == before  # nothing was asked of the CA
    # Nor through a link of root's that leads to one of the account's (a second review).
    svc = tmp_path / "svc-owned"
    svc.mkdir()
    os.chown(svc, nobody, nobody)
    (svc / "chain.pem").symlink_to(victim / "secret.conf")
    os.lchown(svc / "chain.pem", nobody, nobody)
    (out / "chain.pem").unlink()
    (out / "chain.pem").symlink_to(svc / "chain.pem")  # root's
    proc = _renew(daemon, out / "cert.pem", out / "key.pem")
    assert proc.returncode == 1 and f"through the symlink {svc / 'chain.pem'}, made by uid " \
        f"{nobody}" in proc.stderr, proc.stderr
    assert (victim / "secret.conf").read_text() == "root:secret-line\n"
    # The same link made by its file's owner is followed, as before.
    (out / "chain.pem").unlink()
    (out / "chain.pem").symlink_to(victim / "secret.conf")
    assert _renew(daemon, out / "cert.pem", out / "key.pem").returncode == 0
    assert (victim / "secret.conf").read_text().startswith("-----BEGIN CERTIFICATE-----")


def test_a_service_renewing_its_own_files_follows_roots_links(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A review: links that configuration management made as root, to files a service
    account owns, were refused to that account's own renewal. Root's links are followed
    whoever renews; the account's own too; another user's to a file of root's not."""
    from ca.client import ClientError, followed
    svc = 54321
    mine = tmp_path / "var-svc" / "cert.pem"
    mine.parent.mkdir()
    mine.write_text("x")
    os.chown(mine, svc, svc)
    link = tmp_path / "etc-svc-cert.pem"
    link.symlink_to(mine)  # root's
    monkeypatch.setattr(os, "geteuid", lambda: svc)  # the service renews
    assert followed(link) == mine
    os.lchown(link, svc, svc)
    assert followed(link) == mine
    # Through a directory's link and back up from its target, as the kernel goes.
    (tmp_path / "deep" / "er").mkdir(parents=True)
    (tmp_path / "deep" / "cert.pem").write_text("z")
    up = tmp_path / "up"
    up.symlink_to(tmp_path / "deep" / "er")
    os.lchown(up, 65534, 65534)
    with pytest.raises(ClientError, match=f"through the symlink {up}, made by uid 65534"):
        followed(up / ".." / "cert.pem")
    root_file = tmp_path / "root-only.conf"
    root_file.write_text("y")
    planted = tmp_path / "planted.pem"
    planted.symlink_to(root_file)
    os.lchown(planted, 65534, 65534)
    with pytest.raises(ClientError, match="made by uid 65534"):
        followed(planted)


def test_links_swapped_in_while_the_ca_answers_redirect_nothing(tmp_path: Path) -> None:
    """A review (M2): a renewal checked the links on the way to its files, then, after
    the CA's answer, wrote and renamed by name, so whoever owns the directory could swap
    in links meanwhile: its temporary file for a link to a root-only file (which was
    truncated, overwritten with the certificate and given to that account), or the
    directory for a link to another. Everything after the check now goes through the
    directory and the file opened at it; a swapped name is refused, and nothing outside
    the checked directory is touched."""
    from ca.client import ClientError, Staged
    nobody = 65534
    victim = tmp_path / "root-only"
    victim.mkdir(mode=0o700)
    secret = victim / "secret.conf"
    secret.write_text("root:secret-line\n")
    home = tmp_path / "home"  # the service account's
    (home / "certs").mkdir(parents=True)
    target = home / "certs" / "chain.pem"
    target.write_text("old\n")
    for p in (home, home / "certs", target):
        os.chown(p, nobody, nobody)

    staged = Staged({target: (0o644, False)}).prepare()
    (tmp,) = [p for p in target.parent.iterdir() if p.name.startswith(".chain.pem.")]
    tmp.unlink()  # the account, while the CA answers
    tmp.symlink_to(secret)
    with pytest.raises(ClientError, match=f"{target}: .*changed while the CA answered"):
        staged.commit({target: "new\n"})
    assert secret.read_text() == "root:secret-line\n" and secret.stat().st_uid == 0
    assert target.read_text() == "old\n" and not target.is_symlink()
    tmp.unlink()

    staged = Staged({target: (0o644, False)}).prepare()
    (home / "certs").rename(home / "certs.kept")
    (home / "certs").symlink_to(victim)
    os.lchown(home / "certs", nobody, nobody)
    staged.commit({target: "new\n"})  # into the directory that was checked
    assert sorted(p.name for p in victim.iterdir()) == ["secret.conf"]
    assert secret.read_text() == "root:secret-line\n"
    assert (home / "certs.kept" / "chain.pem").read_text() == "new\n"

    # enroll's new --out, built beside its place: its staging directory swapped for a
    # link to a root-only one got the credentials and had its mode opened to 0755.
    from ca.client import OutputDir
    out = OutputDir(home / "fresh").prepare()
    (staging,) = [p for p in home.iterdir() if p.name.startswith(".fresh.enroll-")]
    staging.rename(home / "moved")
    staging.symlink_to(victim)
    with pytest.raises(ClientError, match="was replaced while the CA answered"):
        out.commit({"key.pem": "k\n", "cert.pem": "c\n", "chain.pem": "c\n"})
    out.abort()
    assert sorted(p.name for p in victim.iterdir()) == ["secret.conf"]
    assert stat.S_IMODE(victim.stat().st_mode) == 0o700
    assert not (home / "fresh").exists()


async def test_a_host_certified_for_a_loopback_name_cannot_answer_in_the_cas_place(
        daemon: Daemon, tmp_path: Path) -> None:
    """An SSH trial: fleet hosts are certified for `localhost` or 127.0.0.1, and a client
    of the CA at a loopback address (the quickstart's URL, the admin CLI's on the CA
    host) took any certificate of the CA with that name for the daemon. A host's own
    credential answered `hsmca ssh known-hosts` with a CA key never in the HSM, and
    `hsmca ssh revoke` with "revoked". At a loopback address the server must prove
    ca-server.hsmca.invalid, a name only the daemon's listener carries and no one else
    can be certified for."""
    cert, key = enroll(daemon, tmp_path, "host", ["127.0.0.1", "localhost"])
    rogue = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    rogue.load_cert_chain(cert, key)
    asked: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        asked.append(await reader.readuntil(b"\r\n\r\n"))
        body = b'{"host": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGNvdW50ZmVpdGNvdW50ZmVpdA"]}'
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=rogue)
    out = tmp_path / "known_hosts"
    try:
        port = server.sockets[0].getsockname()[1]
        for host in ("127.0.0.1", "localhost"):
            proc = await asyncio.to_thread(
                hsmca, "ssh", "known-hosts", "--url", f"https://{host}:{port}", "--ca",
                daemon.root, "--hosts", "*.internal.example", "--out", out, check=False)
            line = one_line_error(proc)
            assert "the server there is not this CA's daemon" in line, line
            assert "lacks ca-server.hsmca.invalid" in line, line
        # The same with the CA's root among the system's CAs, and no --ca (a review).
        proc = await asyncio.to_thread(
            hsmca, "ssh", "known-hosts", "--url", f"https://localhost:{port}", "--hosts",
            "*.internal.example", "--out", out, check=False,
            env={**os.environ, "SSL_CERT_FILE": str(daemon.root)})
        line = one_line_error(proc)
        assert "verifies against the system's CAs but lacks ca-server.hsmca.invalid" in line
    finally:
        server.close()
    assert not asked and not out.exists()  # nothing was sent, nothing written
    # The daemon itself, at the same kind of address, proves it.
    assert daemon.url.startswith("https://127.0.0.1:")
    proc = await asyncio.to_thread(hsmca, "ssh", "known-hosts", "--url", daemon.url, "--ca",
                                   daemon.root, "--hosts", "*.internal.example", "--out", out,
                                   check=False)
    assert proc.returncode == 0, proc.stderr
    assert "@cert-authority *.internal.example" in out.read_text()
    # Nobody else can be certified for that name.
    proc = await asyncio.to_thread(
        hsmca, "token", "create", "--config", daemon.state / "hsmca.toml", "--role", "host",
        "--name", "ca-server.hsmca.invalid", check=False)
    assert "is one of the CA's own names" in one_line_error(proc)


def test_known_hosts_out_to_a_pipe_is_refused_and_a_star_is_warned_about(
        daemon: Daemon, tmp_path: Path) -> None:
    """An operator trial: `ssh known-hosts --out` on a pipe hung for ever (it read the
    file to compare), on a device node replaced the node with a file, and --hosts '*'
    trusted the host CA for every host unremarked."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    proc = subprocess.run([*HSMCA, "ssh", "known-hosts", "--url", daemon.url, "--ca",
                           daemon.root, "--hosts", "*.internal.example", "--out", fifo],
                          capture_output=True, text=True, timeout=60)
    assert one_line_error(proc) == (f"hsmca: error: {fifo} is not a regular file (a device, "
                                    "a pipe or a socket); give the path of a file to write")
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    proc = hsmca("ssh", "known-hosts", "--url", daemon.url, "--ca", daemon.root, "--hosts",
                 "*")
    assert "@cert-authority * " in proc.stdout and "trusts the host CA for every host name" \
        in proc.stderr, proc.stderr


def test_a_listener_certificate_of_an_older_release_is_renewed_at_start(
        daemon: Daemon, tmp_path: Path) -> None:
    """0.2.0's listener certificate lacks ca-server.hsmca.invalid, which clients at
    loopback addresses now check: a start renews it."""
    from ca.config import load
    from ca.server_cert import _needs_renewal
    config = load(daemon.state / "hsmca.toml")
    issuer = x509.load_pem_x509_certificate((daemon.state / "x509" / "issuing.pem").read_bytes())
    assert _needs_renewal(config, dt.datetime.now(dt.UTC), issuer) is None
    cert, key = enroll(daemon, tmp_path, "host", ["localhost", "127.0.0.1"])
    config = dataclasses.replace(config, tls_cert=cert, tls_key=key)  # as 0.2.0 made it
    assert _needs_renewal(config, dt.datetime.now(dt.UTC), issuer) == (
        "lacks ca-server.hsmca.invalid, which clients on this host check")


def test_revoking_one_certificate_names_the_same_keys_others_still_live(
        daemon: Daemon, tmp_path: Path) -> None:
    """An SSH trial: an admin revoked a person's current certificate by its serial; the
    one it was renewed from (the same key) stayed live, renewed and got SSH certificates,
    and nothing said so. Renewals overlap by design: the admin is told which are left,
    and how to cut the holder off."""
    name = "same-key-left@example.com"
    cert, key = enroll(daemon, tmp_path, "user", [name])
    first, before = tmp_path / "first.pem", tmp_path / "before.pem"
    first.write_bytes(cert.read_bytes())
    assert _renew(daemon, cert, key).returncode == 0  # the same key
    before.write_bytes(cert.read_bytes())
    assert _renew(daemon, cert, key).returncode == 0
    admin = ("--config", daemon.state / "hsmca.toml", "--url", daemon.url)
    # Superseded: the one that replaced it is meant to stay live; nothing to warn of.
    proc = hsmca("revoke", cert_serial(first), "--reason", "superseded", *admin)
    assert f"revoked {cert_serial(first)}" in proc.stdout and not proc.stderr, proc.stderr
    proc = hsmca("revoke", cert_serial(cert), *admin)
    assert f"revoked {cert_serial(cert)}" in proc.stdout
    assert f"1 other live certificate(s) of the same key ({cert_serial(before)}) still " \
        "authenticate its holder" in proc.stderr, proc.stderr
    assert "--identity NAME" in proc.stderr
    proc = hsmca("revoke", "--identity", name, *admin)
    assert "same key" not in proc.stderr, proc.stderr
    assert _renew(daemon, before, key).returncode == 1  # the holder is cut off


def test_a_credential_in_its_last_third_is_announced(daemon: Daemon, tmp_path: Path) -> None:
    """An SSH trial: a person's credential (24 h) ended the day after enrollment, and
    `ssh user` had said nothing the evening before; past its end only a new token helps.
    From two thirds of its lifetime (when `renew` renews it) the commands warn."""
    from ca.client import ending
    cert, _ = enroll(daemon, tmp_path, "user", ["ending@example.com"])
    leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    assert ending(cert, start + (end - start) / 2) is None
    said = ending(cert, end - dt.timedelta(minutes=90))
    assert said is not None and said.startswith(
        f"--cert {cert} ends at {end.isoformat()} (in 1 h 30 min): renew it before then"), said
    # The last minute in seconds (it was "in 0 h 0 min")
    said = ending(cert, end - dt.timedelta(seconds=41))
    assert said is not None and "(in 41 s)" in said, said


def test_argument_mistakes_are_said_as_what_to_do(tmp_path: Path) -> None:
    """An operator's trial: a mistyped flag was sent to `hsmca --help`, not the
    command's; `hsmca stop` did not say how a daemon stops; a revoke given a serial and
    --identity read as if given nothing; an empty token file was said to hold more than
    the token."""
    said = one_line_error(hsmca("key", "rotate", "issuing", "--tokn-file", "y", check=False), 2)
    assert said.endswith("unrecognized arguments: --tokn-file y (see `hsmca key rotate "
                         "--help`)"), said
    said = one_line_error(hsmca("stop", check=False), 2)
    assert "stops on SIGTERM" in said, said
    config = tmp_path / "hsmca.toml"
    said = one_line_error(hsmca("revoke", "1234", "--identity", "a.example", "--config",
                                config, check=False))
    assert said.endswith("give only one of the SERIAL to revoke, --identity NAME and "
                         "--cert-file FILE"), said
    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    said = one_line_error(hsmca("enroll", "--url", "https://127.0.0.1:9", "--token-file", empty,
                                "--name", "x.example", "--out", tmp_path / "out", check=False))
    assert said.endswith(f"--token-file {empty} is empty: it must hold the token"), said


def test_a_key_every_user_can_read_is_said_at_renewal(daemon: Daemon, tmp_path: Path) -> None:
    """A client trial: a key.pem of mode 0644 went unremarked by every renewal. It is said
    (and left as it is: its owner chooses its group's access)."""
    cert, key = enroll(daemon, tmp_path, "service", [NAME])
    key.chmod(0o644)
    proc = hsmca("renew", "--url", daemon.url, "--ca", daemon.root, "--cert", cert, "--key", key)
    assert f"--key {key} is readable by every user (mode 0644): `chmod o-rwx" in proc.stderr
    key.chmod(0o640)
    proc = hsmca("renew", "--url", daemon.url, "--ca", daemon.root, "--cert", cert, "--key", key)
    assert "readable by every user" not in proc.stderr, proc.stderr
    # the certificate given as --key (0644, as certificates are): refused in one line, no
    # warning about a key before it (an operator trial read two lines)
    said = one_line_error(hsmca("renew", "--url", daemon.url, "--ca", daemon.root, "--cert",
                                cert, "--key", cert, check=False))
    assert "readable by every user" not in said, said


@pytest.mark.parametrize("given, base", [
    ("https://ca.example/v1", "https://ca.example"),
    ("https://ca.example:8443/v1/", "https://ca.example:8443"),
    ("https://ca.example/ca/v1/x509", "https://ca.example/ca"),
    ("https://ca.example/v1//x509", "https://ca.example"),  # a review: a bare ValueError
    ("https://ca.example/.well-known/est", "https://ca.example"),
])
def test_a_url_with_the_api_s_own_path_names_the_base_to_give(given: str, base: str) -> None:
    from ca.commands.args import check_url
    with pytest.raises(ValueError, match=f"give the daemon's base URL, {re.escape(base)}:"):
        check_url(given)


@pytest.mark.parametrize("given", ["https://ca.example/ca", "https://ca.example/api/v1/hsmca"])
def test_a_proxy_s_prefix_is_taken_as_the_base(given: str) -> None:
    from ca.commands.args import check_url
    assert check_url(given) == given


def test_an_answer_that_is_not_the_keys_certificate_is_not_installed(
        daemon: Daemon, tmp_path: Path) -> None:
    """An enrollment trial put a fake CA (on the daemon's own TLS credential) in front:
    `renew` installed another key's certificate, ran its --exec hook and exited 0, and
    every renewal after it failed on the mismatch; `enroll` wrote a self-signed one. The
    answer is checked before anything is written, and said in one line."""
    import http.server

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    cert, key = enroll(daemon, tmp_path, "service", [NAME])
    bundle = daemon.state.joinpath("x509", "bundle.pem").read_bytes()
    chain = (daemon.state / "x509" / "chain.pem").read_text()
    stranger = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "ss")])
    now = dt.datetime.now(dt.UTC)
    selfsigned = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                  .public_key(stranger.public_key()).serial_number(1).not_valid_before(now)
                  .not_valid_after(now + dt.timedelta(days=1)).sign(stranger, hashes.SHA256())
                  ).public_bytes(serialization.Encoding.PEM).decode()
    answers = {"/v1/x509/renew": {"serial": "1", "certificate": selfsigned, "chain": chain,
                                  "not_after": "2030-01-01T00:00:00Z"},
               "/v1/x509/enroll": {"serial": "1", "certificate": "not a pem", "chain": chain,
                                   "not_after": "2030-01-01T00:00:00Z"}}

    class FakeCA(http.server.BaseHTTPRequestHandler):
        def reply(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # the client's look at the CA's issuers
            self.reply(200, bundle, "application/pem-certificate-chain")

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.reply(201, json.dumps(answers[self.path]).encode(), "application/json")

        def log_message(self, *_: object) -> None:
            pass
    fake = tls_front(daemon, FakeCA)
    url = f"https://127.0.0.1:{fake.server_address[1]}"
    try:
        before = cert.read_bytes()
        hook = tmp_path / "hook-ran"
        said = one_line_error(hsmca("renew", "--url", url, "--ca", daemon.root, "--cert", cert,
                                    "--key", key, "--exec", f"touch {hook}", check=False))
        assert said == (f"hsmca: error: the CA's answer at {url} is a certificate of another "
                        "key (serial 1), not of the key sent: nothing was written (a retry "
                        "asks again)"), said
        assert cert.read_bytes() == before and not hook.exists()
        # The key's certificate, by another CA, with this CA's chain after that CA's: a
        # check that some certificate of the chain is this CA's took it (a review)
        other_ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                    .public_key(stranger.public_key()).serial_number(2)
                    .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
                    .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                    .sign(stranger, hashes.SHA256()))
        mine = serialization.load_pem_private_key(key.read_bytes(), None).public_key()
        leaf = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(mine).serial_number(3).not_valid_before(now)  # type: ignore[arg-type]
                .not_valid_after(now + dt.timedelta(days=1)).sign(stranger, hashes.SHA256()))
        answers["/v1/x509/renew"] = {
            **answers["/v1/x509/renew"],
            "certificate": leaf.public_bytes(serialization.Encoding.PEM).decode(),
            "chain": other_ca.public_bytes(serialization.Encoding.PEM).decode() + chain}
        said = one_line_error(hsmca("renew", "--url", url, "--ca", daemon.root, "--cert", cert,
                                    "--key", key, "--exec", f"touch {hook}", check=False))
        assert said.endswith(f"has a chain that leads to no root of --ca {daemon.root}: "
                             "nothing was written (a retry asks again)"), said
        assert cert.read_bytes() == before and not hook.exists()
        token = token_file(daemon, tmp_path, "service", [NAME])
        out = tmp_path / "fresh"
        said = one_line_error(enroll_cmd(Daemon(url, daemon.proc, daemon.state, []), token,
                                         out))
        assert said.startswith(f"hsmca: error: the CA's answer at {url} holds no PEM "
                               "certificate and chain"), said
        assert not (out / "cert.pem").exists()
    finally:
        fake.shutdown()
        fake.server_close()
    # The real CA answers as ever, to the same credential and the kept key alike.
    assert hsmca("renew", "--url", daemon.url, "--ca", daemon.root, "--cert", cert, "--key",
                 key).stdout.startswith("renewed: serial ")

"""File modes: `init` sets them explicitly whatever the umask, and `serve` refuses a
PIN or private key file that group or others can read."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from ca.commands.init_cmd import STATE_MODES
from tests.conftest import hsmca, init_ca, new_softhsm_token


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_init_under_umask_000_creates_everything_with_explicit_modes(tmp_path: Path) -> None:
    token = new_softhsm_token()
    state = tmp_path / "ca"
    hsmca("init", "--state-dir", state, "--module", token.module, "--token", token.label,
          "--pin-file", token.pin_file, umask=0)
    seen = {p.relative_to(state).as_posix(): mode(p) for p in state.rglob("*")}
    assert mode(state) == 0o700
    for rel, expected in STATE_MODES.items():
        assert seen.pop(rel) == expected, rel
    # Everything else (admin/, tls/, the keys, the config, the inventory) is private.
    assert seen.pop("hsmca.sqlite3") == 0o600
    for rel in ("admin", "tls"):
        assert seen.pop(rel) == 0o700, rel
    for rel in ("hsmca.toml", "tls/server.key", "admin/key.pem"):
        assert seen.pop(rel) == 0o600, rel
    assert all(m & 0o077 == 0 for m in seen.values()), seen


@pytest.mark.parametrize(("which", "bad_mode"), [("pin", 0o644), ("tls/server.key", 0o640),
                                                 ("admin/key.pem", 0o604),
                                                 ("tls/server.key", 0o620)])
def test_serve_refuses_a_pin_or_key_file_others_can_read(tmp_path: Path, which: str,
                                                         bad_mode: int) -> None:
    ca = init_ca(tmp_path)
    path = ca.token.pin_file if which == "pin" else ca.state / which
    assert "chmod 600" in serve_refused(ca.state, path, bad_mode)


def serve_refused(state: Path, path: Path, bad_mode: int) -> str:
    """`serve`'s one line when `path` has `bad_mode`: it names the file and the mode."""
    good = mode(path)
    os.chmod(path, bad_mode)
    try:
        proc = hsmca("serve", "--config", state / "hsmca.toml", "--listen", "127.0.0.1:0",
                     check=False)
    finally:
        os.chmod(path, good)
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and f"{bad_mode:04o}" in lines[0], lines
    return lines[0]


@pytest.mark.parametrize(("which", "bad_mode"), [
    ("hsmca.toml", 0o666), (".", 0o777), ("audit", 0o775), ("audit/log.jsonl", 0o664),
    ("hsmca.sqlite3", 0o646)])
def test_serve_refuses_a_config_state_or_log_others_can_write(tmp_path: Path, which: str,
                                                              bad_mode: int) -> None:
    """Whoever can write the config picks the PKCS#11 module the daemon hands its PIN
    to; whoever can write the state, the log or the inventory rewrites what it records."""
    ca = init_ca(tmp_path)
    line = serve_refused(ca.state, ca.state / which if which != "." else ca.state, bad_mode)
    assert "writable by group or others" in line and "chmod go-w" in line


@pytest.mark.parametrize("which", ["hsmca.toml", ".", "audit/log.jsonl", "pin"])
def test_serve_refuses_a_file_it_trusts_that_another_user_owns(tmp_path: Path,
                                                               which: str) -> None:
    """A review: the checks looked at modes only, so the owner of a state directory (a
    volume made for another user) swapped in a config of theirs, mode 0600, naming the
    PKCS#11 module the PIN is handed to, and serve started on it. Its owner can change
    a file whatever its mode: the daemon's user or root must own it."""
    ca = init_ca(tmp_path)
    path = ca.token.pin_file if which == "pin" else (
        ca.state / which if which != "." else ca.state)
    os.chown(path, 65534, 65534)
    try:
        proc = hsmca("serve", "--config", ca.state / "hsmca.toml", "--listen", "127.0.0.1:0",
                     check=False)
    finally:
        os.chown(path, 0, 0)
    assert proc.returncode == 1 and proc.stdout == "", proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert f"{path} is owned by nobody, not by root: its owner can change it" in line, line
    assert (f"run hsmca as nobody, the daemon's user (runuser -u nobody -- hsmca ...), or, "
            f"if the daemon runs as root, give it to root (chown root {path})") in line, line


def test_a_key_and_its_certificate_are_replaced_together_or_not_at_all(
        tmp_path: Path) -> None:
    """The daemon renews its admin credential and its TLS certificate as a key and a
    certificate file. A full disk while the second was written left the new key beside
    the old certificate, a credential that no longer matched (a review). Now neither is
    replaced unless both were written."""
    import subprocess
    import sys
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    key.write_text("old key\n")
    key.chmod(0o600)
    cert.write_text("old certificate\n")
    # The file size limit stands in for a full disk: the small key fits, the
    # certificate does not (EFBIG, with SIGXFSZ ignored).
    script = (
        "import resource, signal, sys\n"
        "from pathlib import Path\n"
        "from ca.fileutil import write_atomic_together\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))\n"
        "try:\n"
        "    write_atomic_together([(Path(sys.argv[1]), 'new key\\n', 0o600),\n"
        "                           (Path(sys.argv[2]), 'c' * 1000, 0o644)])\n"
        "except OSError as exc:\n"
        "    print(exc.strerror)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(key), str(cert)],
                          capture_output=True, text=True, timeout=60, check=True)
    assert proc.stdout.strip() == "File too large", proc.stdout + proc.stderr
    assert key.read_text() == "old key\n" and cert.read_text() == "old certificate\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cert.pem", "key.pem"]
    assert mode(key) == 0o600
    # A rename that fails (a directory where the certificate was) leaves no temporary
    # file behind, the key's bytes in it.
    cert.rename(tmp_path / "old-cert.pem")
    cert.mkdir()
    from ca.fileutil import write_atomic_together
    with pytest.raises(IsADirectoryError) as failed:
        write_atomic_together([(key, "new key\n", 0o600), (cert, "c", 0o644)])
    # said of the file, not of the temporary one beside it (an operator's trial)
    assert str(failed.value) == f"cannot replace {cert}: Is a directory"
    with pytest.raises(FileNotFoundError) as failed:
        write_atomic_together([(tmp_path / "gone" / "c.pem", "c", 0o644)])
    assert str(failed.value) == (f"cannot write {tmp_path / 'gone' / 'c.pem'}: its "
                                 f"directory {tmp_path / 'gone'} does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cert.pem", "key.pem",
                                                         "old-cert.pem"]
    cert.rmdir()
    (tmp_path / "old-cert.pem").rename(cert)
    # Written whole, both are replaced, each with its own mode.
    write_atomic_together([(key, "new key\n", 0o600), (cert, "new certificate\n", 0o644)])
    assert (key.read_text(), mode(key)) == ("new key\n", 0o600)
    assert (cert.read_text(), mode(cert)) == ("new certificate\n", 0o644)


@pytest.mark.parametrize("setting", ["tls-key", "tls-cert"])
def test_serve_refuses_a_listener_credential_path_that_names_nothing(
        tmp_path: Path, setting: str) -> None:
    """An operator's trial mistyped `tls-key`: the daemon made a new key at that path
    and overwrote tls/server.pem with a certificate for it, saying so only at info
    level. One of the pair missing is a path mistyped: refused in one line, naming the
    setting, and neither file is touched; and (an upgrade trial) by the pre-flight
    `serve` beside the running daemon, which found it only once the daemon was
    stopped."""
    from tests.conftest import set_config, start_daemon
    ca = init_ca(tmp_path)
    tls = ca.state / "tls"
    d = start_daemon(ca.state)
    try:
        before = {p.name: p.read_bytes() for p in tls.iterdir()}
        set_config(ca.state, "server", setting, "tls/sever.pem" if setting == "tls-cert"
                   else "tls/sever.key")
        proc = hsmca("serve", "--config", ca.state / "hsmca.toml", "--listen",
                     "127.0.0.1:0", check=False)
    finally:
        assert d.stop() == 0
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"[server] {setting} in {ca.state / 'hsmca.toml'} names " \
        in lines[0] and "which does not exist" in lines[0], proc.stderr
    assert {p.name: p.read_bytes() for p in tls.iterdir()} == before


def test_serve_never_overwrites_a_file_the_listener_paths_name_that_is_not_its_own(
        tmp_path: Path) -> None:
    """A config trial pointed `tls-cert` at the inventory and `tls-key` at the admin
    credential's key: the start's renewal replaced the inventory with a certificate
    (every certificate and revocation gone) and the admin key with a TLS key; a text
    file, and an operator's own pair of another PKI, were replaced as silently. Each is
    refused in one line that names the setting and what the file is, and no file
    changes."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from tests.conftest import set_config, start_daemon
    ca = init_ca(tmp_path)
    own_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ca.example")])
    now = dt.datetime.now(dt.UTC)
    own_cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(own_key.public_key()).serial_number(1).not_valid_before(now)
                .not_valid_after(now + dt.timedelta(days=90))
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    own_key.public_key()), critical=False)
                .sign(own_key, hashes.SHA256()))
    own_kid = x509.AuthorityKeyIdentifier.from_issuer_public_key(
        own_key.public_key()).key_identifier.hex()
    (tmp_path / "own.pem").write_bytes(own_cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "own.key").write_bytes(own_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (tmp_path / "own.key").chmod(0o600)
    (tmp_path / "notes.txt").write_text("not a certificate\n")
    (tmp_path / "combined.pem").write_bytes((ca.state / "tls" / "server.pem").read_bytes()
                                            + (ca.state / "tls" / "server.key").read_bytes())
    (tmp_path / "combined.pem").chmod(0o600)
    cases = [
        ({"tls-cert": ca.state / "hsmca.sqlite3"}, "tls-cert", "which is the inventory"),
        ({"tls-key": ca.state / "admin" / "key.pem"}, "tls-key",
         "which is the admin credential's key"),
        ({"tls-cert": tmp_path / "notes.txt"}, "tls-cert", "which holds no PEM certificate"),
        # (a review: x509/roots.pem holds this CA's own certificates, and was missed)
        ({"tls-cert": ca.state / "x509" / "root.pem", "tls-key": tmp_path / "own.key"},
         "tls-cert", "which is the CA's root certificate"),
        ({"tls-cert": tmp_path / "own.pem", "tls-key": tmp_path / "own.key"}, "tls-cert",
         # (its key's id: the name may be this CA's own, left at the defaults: a re-trial)
         f"which holds a certificate this CA did not issue (issuer CN=ca.example, key id "
         f"{own_kid}, none of this CA's keys)"),
        # one file for both: the key was lost to the certificate (a start-guard trial)
        ({"tls-cert": tmp_path / "combined.pem", "tls-key": tmp_path / "combined.pem"},
         "tls-key", "which tls-cert names too"),
    ]
    files = [ca.state / "admin" / "key.pem", tmp_path / "notes.txt", tmp_path / "own.pem",
             tmp_path / "own.key", tmp_path / "combined.pem",
             *sorted((ca.state / "tls").iterdir())]
    before = {f: f.read_bytes() for f in files}

    def certificates() -> list[tuple[str, ...]]:  # (a start writes to it: its rows, then)
        with sqlite3.connect(ca.state / "hsmca.sqlite3") as db:
            return db.execute("SELECT serial, role FROM certs ORDER BY serial").fetchall()
    issued = certificates()

    def starts() -> int:  # a refused start logs none (one on another CA's pair did)
        return (ca.state / "audit" / "log.jsonl").read_text().count('"daemon.start"')
    started = starts()
    for settings, setting, why in cases:
        for key in ("tls-cert", "tls-key"):
            set_config(ca.state, "server", key, str(settings.get(
                key, ca.state / "tls" / ("server.pem" if key == "tls-cert" else "server.key"))))
        proc = hsmca("serve", "--config", ca.state / "hsmca.toml", "--listen",
                     "127.0.0.1:0", check=False)
        said = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
        assert proc.returncode == 1 and said.startswith(
            f"hsmca: error: [server] {setting} in {ca.state / 'hsmca.toml'} names ") \
            and why in said and "Traceback" not in proc.stderr, (settings, proc.stderr)
        # "remove both files" only where that is the way on: never for the CA's own
        assert ("remove both files" in said) == ("this CA did not issue" in why or
                                                  "holds no" in why), said
        assert {f: f.read_bytes() for f in files} == before, settings
        assert certificates() == issued and starts() == started, settings
    # The listener's own files again: it serves, and the inventory is whole.
    set_config(ca.state, "server", "tls-cert", str(ca.state / "tls" / "server.pem"))
    set_config(ca.state, "server", "tls-key", str(ca.state / "tls" / "server.key"))
    d = start_daemon(ca.state)
    assert d.stop() == 0


def test_serve_refuses_an_audit_origin_other_than_its_logs(tmp_path: Path) -> None:
    """A config trial changed `[audit] origin`: the start signed checkpoints of the new
    origin into the log, which then failed verification whichever origin was given,
    even once the setting was put back. Refused in one line, the log untouched."""
    from tests.conftest import set_config, start_daemon
    from tests.helpers import audit_verify
    ca = init_ca(tmp_path)
    log = ca.state / "audit" / "log.jsonl"
    before = log.read_bytes()
    set_config(ca.state, "audit", "origin", "other.example/hsmca-audit")
    proc = hsmca("serve", "--config", ca.state / "hsmca.toml", "--listen", "127.0.0.1:0",
                 check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"hsmca: error: [audit] origin in {ca.state / 'hsmca.toml'} "
                               "is 'other.example/hsmca-audit', but this audit log's "
                               "checkpoints are signed as 'localhost/hsmca-audit'") and \
        "Set origin back to 'localhost/hsmca-audit'" in lines[0], proc.stderr
    assert log.read_bytes() == before
    set_config(ca.state, "audit", "origin", "localhost/hsmca-audit")
    d = start_daemon(ca.state)
    assert d.stop() == 0
    audit_verify(ca.state, ok=True)

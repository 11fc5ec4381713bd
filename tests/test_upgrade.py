"""A CA set up and run by the first release keeps working under this one.

tests/fixtures/wave1 is a CA made and run by hsmca at dc1a63b (its README says how):
its SoftHSM token, state directory, audit log, an auditor's saved state, and the
credentials its clients hold. An operator who upgrades starts the new daemon on it
as it is. Their clients must go on renewing, a revocation made before the upgrade
must still show in the CRL and OCSP, and the auditor's next run must find the old
log extended, not replaced.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp

from ca import __version__
from ca.store.sqlite import MIGRATIONS
from hsm import softhsm
from tests.conftest import HSMCA, Daemon, hsmca, init_ca, require, start_daemon
from tests.helpers import (
    _get,
    audit_verify,
    bootstrap_token,
    cert_serial,
    csr_pem,
    http,
    load,
    log_lines,
    signed,
)

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "wave1"


@pytest.fixture(scope="module")
def upgraded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Path]]:
    root = tmp_path_factory.mktemp("upgrade") / "wave1"
    shutil.copytree(FIXTURE, root)
    (root / "softhsm2.conf").write_text(
        f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\n"
        "log.level = ERROR\nslots.removable = false\n")
    config = root / "ca" / "hsmca.toml"
    text = config.read_text().replace("@WAVE1@", str(root))
    config.write_text(text.replace('"/usr/lib/softhsm/libsofthsm2.so"',
                                   f'"{softhsm.module_path()}"'))
    for path in [root, *root.rglob("*")]:  # as init left them: git keeps no modes
        path.chmod(path.stat().st_mode & 0o700)
    inventory = root / "ca" / "hsmca.sqlite3"
    inventory.chmod(0o644)  # as the first release made it
    d = start_daemon(root / "ca")
    # The upgrade is said (it was silent on SQLite: an upgrade trial).
    said = [line for line in d.stderr if '"inventory migrated"' in line]
    assert said and f'"schema_to": {len(MIGRATIONS)}' in said[0], d.stderr
    # The inventory is made owner-only, as docs/operator.md says it is, and said.
    assert inventory.stat().st_mode & 0o777 == 0o600
    assert any("the inventory was readable by others" in line and '"mode_was": "0o644"'
               in line for line in d.stderr), d.stderr
    yield d, root
    assert d.stop() == 0


def client(root: Path, name: str) -> tuple[Path, Path]:
    return root / "clients" / name / "cert.pem", root / "clients" / name / "key.pem"


def test_a_renewal_chain_begun_before_the_upgrade_goes_on(
        upgraded: tuple[Daemon, Path]) -> None:
    d, root = upgraded
    cert, key = client(root, "svc")
    before = cert_serial(cert)
    out = hsmca("renew", "--url", d.url, "--ca", d.root, "--cert", cert, "--key", key).stdout
    assert out.startswith("renewed: serial ") and cert_serial(cert) != before
    proc = hsmca("renew", "--url", d.url, "--ca", d.root, "--cert", cert, "--key", key)
    assert proc.stdout.startswith("renewed: serial ")


def test_a_revocation_made_before_the_upgrade_still_holds(
        upgraded: tuple[Daemon, Path]) -> None:
    d, root = upgraded
    cert, key = client(root, "gone")
    proc = hsmca("renew", "--url", d.url, "--ca", d.root, "--cert", cert, "--key", key,
                 check=False)
    assert proc.returncode == 1 and "has been revoked" in proc.stderr
    status, _, der, _ = asyncio.run(_get(f"{d.url}/v1/x509/crl", d))
    assert status == 200
    listed = x509.load_der_x509_crl(der).get_revoked_certificate_by_serial_number(
        load(cert).serial_number)
    assert listed is not None
    revoked = asyncio.run(signed(d, load(cert), ocsp.OCSPCertStatus.REVOKED))
    assert revoked.revocation_reason is not None
    assert revoked.revocation_reason.name == "key_compromise"
    good = asyncio.run(signed(d, load(client(root, "web1")[0]), ocsp.OCSPCertStatus.GOOD))
    assert good.serial_number == load(client(root, "web1")[0]).serial_number
    # Its key stays barred: a new token does not certify it again (the first release
    # wrote the reason as key_compromise, which the bar did not read as such).
    token = asyncio.run(bootstrap_token(d, "service", ["gone.internal.example"]))
    csr = csr_pem(["gone.internal.example"], serialization.load_pem_private_key(
        key.read_bytes(), None))
    status, _, raw = asyncio.run(http("POST", f"{d.url}/v1/x509/enroll", d.ssl(),
                                      body={"csr": csr},
                                      headers={"Authorization": f"Bearer {token}"}))
    assert status == 403 and json.loads(raw)["type"].endswith("revoked-key"), raw


def test_ssh_certificates_are_signed_on_credentials_from_before(
        upgraded: tuple[Daemon, Path]) -> None:
    d, root = upgraded
    cert, key = client(root, "alice")
    pub = root / "clients" / "alice" / "id_ed25519.pub"
    out = hsmca("ssh", "user", "--url", d.url, "--ca", d.root, "--cert", cert, "--key", key,
                "--pubkey", pub, "--ttl", "1h").stdout
    assert out.startswith("wrote ")
    shown = ssh_keygen_list(root / "clients" / "alice" / "id_ed25519-cert.pub")
    assert "alice" in shown and "ecdsa-sha2-nistp256" in shown
    cert, key = client(root, "web1")
    pub = root / "clients" / "web1" / "ssh_host_ed25519_key.pub"
    out = hsmca("ssh", "host", "--url", d.url, "--ca", d.root, "--cert", cert, "--key", key,
                "--pubkey", pub).stdout
    assert "web1.internal.example" in ssh_keygen_list(
        root / "clients" / "web1" / "ssh_host_ed25519_key-cert.pub")


def ssh_keygen_list(path: Path) -> str:
    return subprocess.run([require("ssh-keygen"), "-L", "-f", str(path)], check=True,
                          capture_output=True, text=True).stdout


def test_the_auditor_finds_the_old_log_extended_after_a_stop(
        upgraded: tuple[Daemon, Path], tmp_path: Path) -> None:
    d, root = upgraded
    hsmca("renew", "--url", d.url, "--ca", d.root, *_flags(client(root, "svc")))
    old = sum(1 for _ in (FIXTURE / "ca" / "audit" / "log.jsonl").open("rb"))
    state = tmp_path / "auditor.state"
    shutil.copy(root / "auditor.state", state)
    assert d.stop() == 0  # the last test of the file: the module's daemon stops here
    lines = log_lines(d.state)
    assert len(lines) > old and lines[old - 1]["seq"] == old - 1
    # An auditor sees the upgrade in the log: the new start names a newer release and the
    # inventory's schema after its migrations (every release said 0.1.0: upgrade trial).
    # and the schema it was migrated from, which a start cut short and finished by the
    # next would otherwise hide (an upgrade trial).
    starts = [(line.get("version"), line.get("schema"), line.get("schema_from"))
              for line in lines if line["event"] == "daemon.start"]
    assert starts[0] == ("0.1.0", None, None) and \
        starts[-1] == (__version__, len(MIGRATIONS), 0), starts
    proc = audit_verify(d.state, "--state", state, ok=True)
    assert "extends the state saved last time" in proc.stdout
    d2 = start_daemon(d.state)  # and it starts again on what it wrote itself
    try:
        out = hsmca("renew", "--url", d2.url, "--ca", d2.root, *_flags(client(root, "svc")))
        assert out.stdout.startswith("renewed: serial ")
    finally:
        assert d2.stop() == 0
    again = [line for line in log_lines(d2.state) if line["event"] == "daemon.start"][-1]
    assert again["schema"] == len(MIGRATIONS) and "schema_from" not in again, again


def _flags(cred: tuple[Path, Path]) -> list[str | Path]:
    return ["--cert", cred[0], "--key", cred[1]]


def test_an_inventory_newer_than_hsmca_is_refused_in_one_line(tmp_path: Path) -> None:
    """An upgrade trial went back to the older release on a migrated inventory: refused,
    rightly, but as a traceback. Any hsmca meeting a newer schema says it in one line."""
    ca = init_ca(tmp_path)
    with sqlite3.connect(ca.state / "hsmca.sqlite3") as db:
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    proc = hsmca("serve", "--config", ca.state / "hsmca.toml", "--listen", "127.0.0.1:0",
                 check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "newer than this hsmca knows" in proc.stderr and "Traceback" not in proc.stderr


# What a start killed before its daemon.start line leaves: the log is opened (a torn
# tail cut, its checkpoint checked) and the HSM session logged in, both recorded, and
# the process dies (kill -9 during the first start's migrations, in an upgrade trial).
_KILLED_START = """
import os, sys
from pathlib import Path
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from ca.audit.log import AuditLog
from ca.config import load
from ca.issuance.pipeline import SigningPipeline
config = load(Path(sys.argv[1]))
log = AuditLog.open(config.audit_log, config.checkpoint_path,
                    load_pem_public_key(config.audit_key_pem.read_bytes()))
SigningPipeline(config.hsm, log).start()
log.close()  # its writer thread writes what is queued (the open and the login), then ends
os._exit(9)
"""


def test_a_start_killed_before_it_was_under_way_is_said_at_the_next(tmp_path: Path) -> None:
    """An upgrade trial killed a first start mid-migration: the next start said nothing
    of it, as if the run before had stopped cleanly (its daemon.stop was the last start
    or stop in the log). Its HSM login without a logout now says it was cut."""
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state)
    assert d.stop() == 0
    # A start refused its login (a wrong PIN) opened no session: nothing to say either.
    pin = ca.token.pin_file.read_text()
    ca.token.pin_file.write_text("0" * 12)
    refused = subprocess.run([*HSMCA, "serve", "--config", ca.state / "hsmca.toml",
                              "--listen", "127.0.0.1:0"], capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode != 0 and "wrong PIN" in refused.stderr, refused.stderr
    ca.token.pin_file.write_text(pin)
    assert log_lines(ca.state)[-1]["event"] == "hsm.login"  # its refusal
    d = start_daemon(ca.state)  # a clean stop before: nothing to say
    try:
        assert not [x for x in d.stderr if "did not stop cleanly" in x], d.stderr
    finally:
        assert d.stop() == 0
    proc = subprocess.run([sys.executable, "-c", _KILLED_START, ca.state / "hsmca.toml"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    events = [e["event"] for e in log_lines(ca.state)]
    assert events[-2:] == ["hsm.open", "hsm.login"] and "daemon.start" not in \
        events[events.index("daemon.stop", len(events) - 8):], events[-8:]
    d = start_daemon(ca.state)
    try:
        assert [x for x in d.stderr if "did not stop cleanly" in x], "".join(d.stderr)
    finally:
        assert d.stop() == 0
    audit_verify(ca.state, ok=True)

"""A revocation the audit log records and the inventory lacks is completed at start.

A revocation writes its `cert.revoke` line before it commits. An inventory that lacks
the commit (a stop between the two, or a backup whose inventory was copied between
them, as a recovery trial caught 5 times in 476 backups taken during revocations)
served the revoked certificate as good and renewed it. The log is the record: the
daemon completes what it says before it serves.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from tests.conftest import hsmca, init_ca, start_daemon
from tests.helpers import enroll, http


def _copy_inventory(db: Path, to: Path) -> None:
    with sqlite3.connect(db) as live, sqlite3.connect(to) as copy:
        live.backup(copy)


def _put_back(saved: Path, db: Path) -> None:
    """The inventory as it was when saved (its journal files gone with it)."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    _copy_inventory(saved, db)


async def test_an_inventory_without_a_logged_revocation_gets_it_before_serving(
        tmp_path: Path) -> None:
    ca = init_ca(tmp_path)
    db = ca.state / "hsmca.sqlite3"
    d = start_daemon(ca.state)
    revoked = enroll(d, tmp_path, "service", ["gone.internal.example"])
    kept = enroll(d, tmp_path, "service", ["kept.internal.example"])
    assert d.stop() == 0
    _copy_inventory(db, tmp_path / "before.sqlite3")  # the inventory before the commit
    d = start_daemon(ca.state)
    serial = hsmca("revoke", "--config", ca.state / "hsmca.toml", "--url", d.url,
                   "--reason", "keyCompromise", _serial(revoked[0])).stdout
    assert "revoked" in serial
    signed_since = await _crl_number(d)  # a CRL signed after the copied inventory
    assert d.stop() == 0
    # The log has the cert.revoke line; the inventory is the one from before it.
    _put_back(tmp_path / "before.sqlite3", db)  # as a stop between line and commit
    d = start_daemon(ca.state)
    try:
        said = [json.loads(line) for line in d.stderr if "completed revocations" in line]
        assert said and said[0]["serials"] == [_serial(revoked[0]).lower()], said
        status, _, body = await http("POST", f"{d.url}/v1/x509/renew", d.ssl(*revoked),
                                     body={})
        assert status == 403 and json.loads(body)["type"].endswith("revoked-certificate")
        status, _, _ = await http("POST", f"{d.url}/v1/x509/renew", d.ssl(*kept), body={})
        assert status == 201
        # And its CRL numbers go on past those the log shows signed: the older
        # inventory's counter would sign number 2 again, with other contents, and a
        # relying party holding the first keeps it (RFC 5280: numbers only grow).
        assert await _crl_number(d) > signed_since
        # Completed once: the next start has nothing to complete.
    finally:
        assert d.stop() == 0
    d = start_daemon(ca.state)
    try:
        assert not [line for line in d.stderr if "completed revocations" in line]
        # and a start after a clean stop says nothing of a kill
        assert not [line for line in d.stderr if "did not stop cleanly" in line]
    finally:
        assert d.stop() == 0


async def test_a_logged_change_of_reason_to_keycompromise_is_completed_too(
        tmp_path: Path) -> None:
    """Revoked as superseded, then again as keyCompromise, and the inventory put back to
    before the second commit: the start makes the reason keyCompromise, so the key is
    barred (the inventory had it revoked already, which the completion took as done)."""
    from cryptography.hazmat.primitives import serialization

    from tests.helpers import bootstrap_token, csr_pem
    ca = init_ca(tmp_path)
    db = ca.state / "hsmca.sqlite3"
    d = start_daemon(ca.state)
    cred = enroll(d, tmp_path, "service", ["leak.internal.example"])
    config = ["--config", ca.state / "hsmca.toml", "--url", d.url]
    hsmca("revoke", *config, "--reason", "superseded", _serial(cred[0]))
    assert d.stop() == 0
    _copy_inventory(db, tmp_path / "before.sqlite3")
    d = start_daemon(ca.state)
    hsmca("revoke", *config[:2], "--url", d.url, "--reason", "keyCompromise",
          _serial(cred[0]))
    assert d.stop() == 0
    _put_back(tmp_path / "before.sqlite3", db)
    d = start_daemon(ca.state)
    try:
        token = await bootstrap_token(d, "service", ["leak.internal.example"])
        key = serialization.load_pem_private_key(cred[1].read_bytes(), None)
        status, _, raw = await http("POST", f"{d.url}/v1/x509/enroll", d.ssl(),
                                    body={"csr": csr_pem(["leak.internal.example"], key)},
                                    headers={"Authorization": f"Bearer {token}"})
        assert status == 403 and json.loads(raw)["type"].endswith("revoked-key"), raw
    finally:
        assert d.stop() == 0


async def test_a_live_certificate_of_a_key_revoked_for_compromise_is_revoked_at_start(
        tmp_path: Path) -> None:
    """As an older release left it (the first recorded no lineage, and none revoked
    other certificates of the key): one certificate of a key revoked for keyCompromise,
    another of the same key still live. The start revokes it, logged and said."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from tests.helpers import audit_verify, bootstrap_token, csr_pem, log_lines
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state)
    cred = enroll(d, tmp_path, "service", ["old.internal.example"])
    key = serialization.load_pem_private_key(cred[1].read_bytes(), None)
    token = await bootstrap_token(d, "service", ["old.internal.example"])
    status, _, raw = await http("POST", f"{d.url}/v1/x509/enroll", d.ssl(),
                                body={"csr": csr_pem(["old.internal.example"], key)},
                                headers={"Authorization": f"Bearer {token}"})
    assert status == 201, raw
    left = x509.load_pem_x509_certificate(json.loads(raw)["certificate"].encode())
    assert d.stop() == 0
    with sqlite3.connect(ca.state / "hsmca.sqlite3") as db:  # what the old release did
        db.execute("UPDATE certs SET revoked_at = ?, reason = 'keyCompromise' WHERE serial = ?",
                   ("2026-12-01T00:00:00+00:00", _serial(cred[0]).lower()))
    d = start_daemon(ca.state)
    try:
        said = [json.loads(line) for line in d.stderr
                if "revoked live certificates of keys revoked for keyCompromise" in line]
        assert said and said[0]["serials"] == [format(left.serial_number, "x")], said
        (tmp_path / "left.pem").write_bytes(left.public_bytes(serialization.Encoding.PEM))
        status, _, body = await http("POST", f"{d.url}/v1/x509/renew",
                                     d.ssl(tmp_path / "left.pem", cred[1]), body={})
        assert status == 403 and json.loads(body)["type"].endswith("revoked-certificate")
        [line] = [e for e in log_lines(ca.state) if e.get("event") == "cert.revoke"]
        assert line["serials"] == [format(left.serial_number, "x")]
        assert line["reason"] == "keyCompromise" and line["actor"] == "local"
    finally:
        assert d.stop() == 0
    assert audit_verify(ca.state).returncode == 0


def _serial(cert: Path) -> str:
    from cryptography import x509
    return format(x509.load_pem_x509_certificate(cert.read_bytes()).serial_number, "X")


async def _crl_number(d: object) -> int:
    """The number of the CRL the daemon serves now, once it lists what it should."""
    from cryptography import x509
    status, _, body = await http("GET", f"{d.url}/v1/x509/crl", d.ssl())  # type: ignore[attr-defined]
    assert status == 200
    crl = x509.load_der_x509_crl(body)
    return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)


async def test_a_move_to_postgresql_takes_a_logged_revocation_the_inventory_lacked(
        tmp_path: Path, postgres_server: Any) -> None:
    """After `store move` the single node's log is the cluster's `init` log, which no
    node's start reads: a revocation it records and the inventory lacked was lost for
    good (a review). The move completes it before it copies the inventory."""
    from tests.cluster_kit import call
    ca = init_ca(tmp_path)
    db = ca.state / "hsmca.sqlite3"
    d = start_daemon(ca.state)
    gone = enroll(d, tmp_path, "service", ["gone.internal.example"])
    assert d.stop() == 0
    _copy_inventory(db, tmp_path / "before.sqlite3")
    d = start_daemon(ca.state)
    hsmca("revoke", "--config", ca.state / "hsmca.toml", "--url", d.url, _serial(gone[0]))
    assert d.stop() == 0
    _put_back(tmp_path / "before.sqlite3", db)  # as a stop between line and commit
    moved = hsmca("store", "move", "--config", ca.state / "hsmca.toml", "--yes",
                  "--store-url", postgres_server.new_database())
    assert "completed 1 revocation(s) the audit log records" in moved.stderr, moved.stderr
    node = start_daemon(ca.state, "--node", "ca-1")
    try:
        status, _, body = await call("POST", f"{node.url}/v1/x509/renew", node.ssl(*gone), {})
        assert status == 403 and json.loads(body)["type"].endswith("revoked-certificate")
    finally:
        assert node.stop() == 0


def test_a_start_reads_the_log_from_the_inventorys_mark_only(tmp_path: Path) -> None:
    """Each start reads only what was written since the inventory's mark (a whole log
    was a second a gigabyte at every start, a review measured); a mark the file does
    not fit (a shorter or replaced log) is read from the beginning."""
    from ca.revocation.from_log import scan
    lines = [
        '{"event":"cert.revoke","reason":"superseded","seq":0,"serials":["a1"],'
        '"ts":"2026-12-04T10:00:00+00:00"}',
        '{"crl_number":7,"event":"hsm.sign","phase":"intent","purpose":"crl","seq":1}',
        '{"event":"cert.revoke","reason":"keyCompromise","lineage":true,"seq":2,'
        '"serials":["b2"],"ts":"2026-12-04T11:00:00+00:00"}',
        '{"event":"cert.revoke","seq":3,"serials":["c3"],"ts":"2026-12-04T12:00:00+00:00"}']
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(lines) + "\n" + '{"event":"cert.revoke","seq":4,"serials":["d')
    whole = scan(log, 0)
    assert [e.seq for e in whole.revocations] == [0, 2, 3]  # the torn last line is not
    assert whole.highest_crl_number == 7 and whole.end == log.read_bytes().rindex(b"\n") + 1
    assert whole.revocations[1].lineage and whole.revocations[1].serials == (0xb2,)
    after_two = len("\n".join(lines[:2])) + 1
    since = scan(log, after_two)
    assert [e.seq for e in since.revocations] == [2, 3] and since.highest_crl_number == 0
    for unfit in (after_two - 5, whole.end + 100):  # mid-line, or past the end
        assert [e.seq for e in scan(log, unfit).revocations] == [0, 2, 3]


def test_a_start_does_not_complete_a_revocation_a_later_line_voids(tmp_path: Path) -> None:
    """Two revocations of one certificate at once both write their line; the one whose
    commit lost writes `record.void` (a security trial). A start completing from the log
    (a restored inventory) must take the winner's reason and time, not the loser's,
    which may be the earlier line; nor a certificate a partial void says was revoked
    already."""
    from ca.revocation.from_log import scan
    lines = [
        '{"event":"cert.revoke","reason":"superseded","seq":0,"serials":["a1"],'
        '"ts":"2026-12-04T10:00:00+00:00"}',
        '{"event":"cert.revoke","reason":"cessationOfOperation","seq":1,"serials":["a1"],'
        '"ts":"2026-12-04T10:00:00+00:00"}',
        '{"event":"record.void","seq":2,"voided":"cert.revoke","voids":0,'
        '"why":"already revoked when this revocation was committed"}',
        '{"event":"cert.revoke","reason":"keyCompromise","lineage":true,"seq":3,'
        '"serials":["b2","c3"],"ts":"2026-12-04T11:00:00+00:00"}',
        '{"event":"record.void","seq":4,"serials":["c3"],"voided":"cert.revoke","voids":3,'
        '"why":"already revoked when this revocation was committed"}',
        '{"event":"record.void","seq":5,"voided":"acme.account.create","voids":1}']
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(lines) + "\n")
    found = scan(log, 0).revocations
    assert [(e.seq, e.reason, e.serials) for e in found] == [
        (1, "cessationOfOperation", (0xa1,)), (3, "keyCompromise", (0xb2,))], found
    # An SSH revocation that lost its race is voided likewise (a review: a start took
    # the loser's, whose line may come first)
    log.write_text("\n".join([
        '{"event":"ssh.revoke","serial":"7","seq":0,"ts":"2026-12-04T10:00:00+00:00"}',
        '{"event":"ssh.revoke","serial":"7","seq":1,"ts":"2026-12-04T10:00:01+00:00"}',
        '{"event":"record.void","seq":2,"voided":"ssh.revoke","voids":0,'
        '"why":"already revoked when this revocation was committed"}']) + "\n")
    assert [e.seq for e in scan(log, 0).ssh_revocations] == [1]


async def test_an_ssh_key_revocation_the_inventory_lacks_is_completed_too(
        tmp_path: Path) -> None:
    """The same for `ssh.revoke`: its line now holds the revoked public key itself, so a
    start completes it, the certificate in the KRL and the key barred."""
    import subprocess

    from tests.test_revocation import krl_says, ssh_user_cert
    ca = init_ca(tmp_path)
    db = ca.state / "hsmca.sqlite3"
    d = start_daemon(ca.state)
    user = enroll(d, tmp_path, "user", ["eve@example.org"], ["eve"])
    cert = ssh_user_cert(d, tmp_path, user, "id_eve")
    assert d.stop() == 0
    _copy_inventory(db, tmp_path / "before.sqlite3")
    d = start_daemon(ca.state)
    hsmca("ssh", "revoke", "--pubkey", tmp_path / "id_eve.pub", "--config",
          ca.state / "hsmca.toml", "--url", d.url)
    assert d.stop() == 0
    _put_back(tmp_path / "before.sqlite3", db)  # as a stop between line and commit
    d = start_daemon(ca.state)
    try:
        assert krl_says(d, tmp_path, cert) == "REVOKED"
        again = subprocess.run([*map(str, _hsmca_ssh_user(d, user, tmp_path / "id_eve.pub"))],
                               capture_output=True, text=True)
        assert again.returncode == 1 and "has been revoked" in again.stderr, again.stderr
    finally:
        assert d.stop() == 0


def _hsmca_ssh_user(d: object, user: tuple[Path, Path], pub: Path) -> list[object]:
    from tests.conftest import HSMCA
    return [*HSMCA, "ssh", "user", "--url", d.url, "--ca", d.root,  # type: ignore[attr-defined]
            "--cert", user[0], "--key", user[1], "--pubkey", pub]

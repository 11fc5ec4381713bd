"""`hsmca store move`: a single node's CA, with what it issued and revoked and its
audit log, moves into PostgreSQL, and two nodes carry on from it (docs/cluster.md,
"Growing from one node"). A real PostgreSQL server, real daemons, the real CLI."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
from cryptography import x509
from cryptography.x509 import ocsp

from tests.cluster_kit import call
from tests.conftest import hsmca, init_ca, start_daemon
from tests.helpers import ask_ocsp, enroll, issuing, load, request_for, signed


def _serial(cert: Path) -> str:
    return format(load(cert).serial_number, "x")


async def _crl(d: Any) -> x509.CertificateRevocationList:
    status, _, body = await call("GET", f"{d.url}/v1/x509/crl", d.ssl())
    assert status == 200
    return x509.load_der_x509_crl(body)


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


async def test_a_single_node_ca_moves_into_postgresql_and_two_nodes_carry_on(
        tmp_path: Path, postgres_server: Any) -> None:
    ca = init_ca(tmp_path)
    config = ca.state / "hsmca.toml"
    url = postgres_server.new_database()
    move = ("store", "move", "--config", config, "--yes")
    d = start_daemon(ca.state)
    try:
        kept, kept_key = await asyncio.to_thread(enroll, d, tmp_path, "service", ["kept.test"])
        gone, _ = await asyncio.to_thread(enroll, d, tmp_path, "service", ["gone.test"])
        status, _, body = await call("POST", f"{d.url}/v1/x509/revoke", d.admin_ssl(),
                                     {"serial": _serial(gone), "reason": "superseded"})
        assert status == 200, body
        await signed(d, load(gone), ocsp.OCSPCertStatus.REVOKED)
        before = _crl_number(await _crl(d))
        async with aiohttp.ClientSession() as s:  # a line per token: past one tile's 256
            for _ in range(260):
                async with s.post(f"{d.url}/v1/tokens", ssl=d.admin_ssl(), json={
                        "role": "service", "names": ["more.test"], "ttl": "5m"}) as r:
                    assert r.status == 201
        # Not beside the running daemon: the audit log's lock says so, in one line.
        running = await asyncio.to_thread(hsmca, *move, "--store-url", url, check=False)
        assert running.returncode == 1 and running.stderr.count("\n") == 1, running.stderr
        assert "lock" in running.stderr and "Traceback" not in running.stderr
        asked = await asyncio.to_thread(hsmca, *move[:-1], "--store-url", url, check=False,
                                        input="yes\n")  # said before asking for a yes
        assert "lock" in asked.stderr and "Type yes" not in asked.stderr, asked.stderr
    finally:
        assert d.stop() == 0
    history = (ca.state / "audit" / "log.jsonl").read_bytes().count(b"\n")
    # An auditor verified the single node's log and keeps the state of what they saw.
    seen = await asyncio.to_thread(
        hsmca, "audit", "verify", "--log", ca.state / "audit" / "log.jsonl", "--key",
        ca.state / "audit" / "audit_key.pem", "--state", tmp_path / "a.json", check=False)
    assert seen.returncode == 0, seen.stdout + seen.stderr

    # The URL from the environment keeps a password off the command line (the server
    # trusts loopback, so any password does); a '#' in it is libpq's to read.
    secret = "n0t#a-secret"
    with_password = url.replace("hsmca@", f"hsmca:{secret}@")
    original = config.read_text()
    proc = await asyncio.to_thread(hsmca, *move, env={**os.environ,
                                                      "HSMCA_STORE_URL": with_password})
    out = proc.stdout
    # Looked for whole, as a URL quotes it, and cut at its '#' after the user name: "n0t"
    # alone turns up in the base64 of a checkpoint signature about one run in twenty.
    shown = (secret, secret.replace("#", "%23"), "hsmca:n0t")
    assert not any(s in out + proc.stderr for s in shown) and "Traceback" not in proc.stderr
    # Every row of every table, as SQLite held it and as PostgreSQL has it now.
    counts = dict(item.rsplit(" ", 1) for item in out.split("\n")[0].split(": ", 1)[1]
                  .split(", "))
    sqlite_file = ca.state / "hsmca.sqlite3.moved-to-postgresql"
    assert not (ca.state / "hsmca.sqlite3").exists() and sqlite_file.exists()
    db = url.rsplit("/", 1)[1]
    with sqlite3.connect(sqlite_file) as lite:
        tables = [r[0] for r in lite.execute("SELECT name FROM sqlite_master WHERE type = "
                                             "'table' AND name NOT LIKE 'sqlite_%'")]
        for table in tables:
            n = lite.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone()[0]
            assert int(counts.get(table, 0)) == n == int(postgres_server.psql(
                f'SELECT COUNT(*) FROM "{table}"', db=db)), table
    assert int(counts["certs"]) == 4  # the two services', init's admin and TLS certificates
    moved = (ca.state / "audit" / "log.jsonl").read_bytes().split(b"\n")[:-1]
    assert f"({len(moved)} lines" in out and int(counts["audit_lines"]) == len(moved)
    # The log records the move (the database, not who logs in), under a checkpoint.
    [line] = [json.loads(raw) for raw in moved[history:] if b'"store.move"' in raw]
    assert line["to"] == url.replace("hsmca@", "")
    assert not any(s.encode() in raw for s in shown for raw in moved)
    assert 'url = "' in config.read_text() and config.read_text().startswith(original)

    n1 = start_daemon(ca.state, "--node", "ca-1")
    n2 = start_daemon(ca.state, "--node", "ca-2")
    try:
        # What the single node issued is known to every node: its certificate renews.
        status, _, body = await call("POST", f"{n2.url}/v1/x509/renew",
                                     n2.ssl(kept, kept_key), {})
        assert status in (200, 201), body
        # What it revoked stays revoked: OCSP answers from the responses it had signed,
        # and the CRL lists it, its number following the single node's last.
        resp, _ = await ask_ocsp(n2, request_for(load(gone), issuing(n2)))
        assert resp.certificate_status == ocsp.OCSPCertStatus.REVOKED
        crl = await _crl(n1)
        assert _crl_number(crl) == before  # nothing revoked since: the same CRL
        assert crl.get_revoked_certificate_by_serial_number(load(gone).serial_number)
        # A revocation now makes a new CRL whose number follows the single node's last
        # (RFC 5280: CRL numbers only grow).
        renewed = json.loads(body)["serial"]
        status, _, answer = await call("POST", f"{n1.url}/v1/x509/revoke", n1.admin_ssl(),
                                       {"serial": renewed, "reason": "superseded"})
        assert status == 200, answer
        crl = await _crl(n1)
        assert _crl_number(crl) > before
        for serial in (load(gone).serial_number, int(renewed, 16)):
            assert crl.get_revoked_certificate_by_serial_number(serial)
        # Its audit log is the CA's `init` log, ending with the move, and an auditor
        # verifies it and both nodes' logs through either node.
        status, _, body = await call("GET", f"{n1.url}/v1/audit/logs", n1.ssl())
        logs = {e["name"]: e for e in json.loads(body)["logs"]}
        assert set(logs) == {"init", "ca-1", "ca-2"} and logs["init"]["size"] == len(moved)
        status, _, served = await call("GET", f"{n2.url}/v1/audit/entries?log=init&start=0"
                                       f"&limit={len(moved)}", n2.admin_ssl())
        assert status == 200 and served.split(b"\n")[:-1] == moved  # byte for byte
        # The single node's certificates point auditors at that log.
        status, _, body = await call("GET", f"{n2.url}/v1/inventory/certificates/"
                                     f"{_serial(kept)}", n2.admin_ssl())
        rec = json.loads(body)
        assert rec["audit_log"] == "init"
        intent = json.loads(moved[rec["audit_seq"]])
        assert (intent["phase"], intent["serial"]) == ("intent", _serial(kept))
        # Its Merkle tiles went along: nodes prove it from them, not from all its lines.
        db = url.rsplit("/", 1)[1]
        heads = "SELECT bundles FROM audit_tile_heads WHERE node = 'init'"
        assert int(postgres_server.psql(heads, db=db)) == len(moved) // 256 >= 1
        status, _, tile = await call("GET", f"{n1.url}/v1/audit/logs/init/tile/0/000",
                                     n1.admin_ssl())
        assert status == 200 and tile == b"".join(
            hashlib.sha256(b"\x00" + line).digest() for line in moved[:256])
        proc = await asyncio.to_thread(
            hsmca, "audit", "verify", "--url", n2.url, "--ca", n2.root, "--client-cert",
            ca.state / "admin" / "cert.pem", "--client-key", ca.state / "admin" / "key.pem",
            "--key", ca.state / "audit" / "audit_key.pem", "--state", tmp_path / "a.json",
            check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        for name in ("init", "ca-1", "ca-2"):
            assert f"log {name}: OK:" in proc.stdout
        # What the auditor saw before the move is what the init log is checked against:
        # only the lines since are fetched.
        assert f"{tmp_path / 'a.json'} is the state of a single log: log init" in proc.stdout
        [(lines, fetched)] = re.findall(r"log init: OK: (\d+) lines, \d+ checkpoints? "
                                        r"verified \(fetched (\d+) new lines\)", proc.stdout)
        assert int(lines) - int(fetched) > 256, proc.stdout  # without it, all would be
    finally:
        assert n1.stop() == 0 and n2.stop() == 0
    # A move that stopped after PostgreSQL committed, before the config was written:
    # the daemon refuses to start on SQLite (it would begin an empty inventory and
    # forget the revocations), and running the move again finishes it.
    config.write_text(original)
    refused = await asyncio.to_thread(hsmca, "serve", "--config", config, "--listen",
                                      "127.0.0.1:0", check=False)
    assert refused.returncode == 1 and "store move" in refused.stderr, refused.stderr
    assert refused.stderr.count("\n") == 1 and not (ca.state / "hsmca.sqlite3").exists()
    finished = await asyncio.to_thread(hsmca, *move, "--store-url", url)
    assert "finished the move" in finished.stdout
    assert f'url = "{url}"' in config.read_text()
    # Moved once: a second move is refused, in one line, without touching anything.
    again = await asyncio.to_thread(hsmca, *move, "--store-url", url, check=False)
    assert again.returncode == 1 and "PostgreSQL already" in again.stderr, again.stderr


def test_the_log_and_the_output_name_the_database_without_credentials() -> None:
    from ca.store_move import database_name
    assert database_name("postgresql://hsmca:s3cret@db.example:5433/hsmca?sslmode=verify-full"
                         ) == "postgresql://db.example:5433/hsmca"


def test_a_move_without_a_database_or_to_another_kind_says_what_to_give(
        tmp_path: Path) -> None:
    config = tmp_path / "hsmca.toml"  # never read: the URL is checked first
    for extra, words in (((), "HSMCA_STORE_URL"),
                         (("--store-url", "mysql://db/ca"), "postgresql://")):
        env = {k: v for k, v in os.environ.items() if k != "HSMCA_STORE_URL"}
        proc = hsmca("store", "move", "--config", config, "--yes", *extra, check=False, env=env)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
        assert words in proc.stderr


async def test_a_move_into_a_database_with_tables_of_hsmcas_names_writes_nothing(
        tmp_path: Path, postgres_server: Any) -> None:
    """A cluster trial: a database that already had an application's `certs` table got
    half of hsmca's schema, and the move printed a traceback. It is refused in one
    line, before anything is written; a database with other tables is fine."""
    ca = init_ca(tmp_path)
    config = ca.state / "hsmca.toml"
    url = postgres_server.new_database()
    db = url.rsplit("/", 1)[1]
    postgres_server.psql("SET ROLE hsmca; CREATE TABLE app_stuff (id int); "
                         "CREATE TABLE certs (x int)", db=db)
    proc = await asyncio.to_thread(hsmca, "store", "move", "--config", config, "--yes",
                                   "--store-url", url, check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"the database '{db}' already has tables hsmca would make" in proc.stderr
    assert "(certs)" in proc.stderr and "nothing was written" in proc.stderr
    assert postgres_server.psql("SELECT string_agg(tablename, ',' ORDER BY tablename) FROM "
                                "pg_tables WHERE schemaname = 'public'", db=db) == \
        "app_stuff,certs"
    postgres_server.psql("DROP TABLE certs", db=db)
    moved = await asyncio.to_thread(hsmca, "store", "move", "--config", config, "--yes",
                                    "--store-url", url)
    assert "moved into" in moved.stdout


async def test_a_move_cut_short_keeps_the_daemon_off_sqlite_until_it_is_finished(
        tmp_path: Path, postgres_server: Any) -> None:
    """Killed after PostgreSQL committed and before the SQLite inventory was set aside,
    a move left a CA whose `serve` started on SQLite, issued there, and left the
    database behind for good (fault review). The move leaves a marker until it is done;
    `serve` refuses while it is there, and the move run again finishes."""
    ca = init_ca(tmp_path)
    config = ca.state / "hsmca.toml"
    url = postgres_server.new_database()
    marker = ca.state / "store-move-under-way"
    marker.write_text("hsmca@somewhere/db\n")  # what a move killed mid-way leaves
    proc = await asyncio.to_thread(
        hsmca, "serve", "--config", config, "--listen", "127.0.0.1:0", check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "was cut short: run it again to finish" in proc.stderr
    assert str(marker) in proc.stderr  # and how to stay on SQLite instead
    moved = await asyncio.to_thread(hsmca, "store", "move", "--config", config, "--yes",
                                    "--store-url", url)
    assert "moved into" in moved.stdout and not marker.exists()
    d = start_daemon(ca.state, "--node", "after")
    assert d.stop() == 0

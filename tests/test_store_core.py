"""The Store's core verbs, as any implementation must keep them (the `store` fixture of
tests/conftest.py runs each against SQLite and a real PostgreSQL): a token spent
once, certificates found by serial and fingerprint, revocation reaching SSH
certificates, CRL numbers that only grow, the CA's keys (pre-signed OCSP:
tests/test_store_ocsp.py). And what only PostgreSQL promises, with two stores on one
database as two nodes have them: exactly one of concurrent token uses wins, migrations
run once when nodes start together, a schema newer than the code is refused, and a
node's group of audit lines that timed out never lands after the group that replaced
it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ca.store import (
    CRLRecord,
    CrossCert,
    KeyRecord,
    NewCert,
    NewSSHCert,
    NewToken,
    SSHCertQuery,
    SSHSelector,
    Store,
)

NOW = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.UTC)
LATER = (NOW + dt.timedelta(hours=1)).isoformat()
LATER_DT = NOW + dt.timedelta(hours=1)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def token(tid: str = "tok1") -> NewToken:
    return NewToken(id=tid, secret_sha256=f"{tid:0>64}", role="service",
                    names=(("dns", "a.test"),), principals=(), expires=(
                        NOW + dt.timedelta(minutes=15)).isoformat(),
                    created_at=NOW.isoformat(), created_by="admin")


def cert(serial: int, token_id: str | None = None, renewed_from: int | None = None) -> NewCert:
    return NewCert(serial=serial, fingerprint=f"{serial:064x}", role="service",
                   subject="CN=a.test", names=("a.test",), principals=(), spki_sha256="e" * 64,
                   not_before=NOW.isoformat(),
                   not_after=(NOW + dt.timedelta(days=1)).isoformat(),
                   issued_at=NOW.isoformat(), der=b"DER%d" % serial, issuer="issuing-ca",
                   token_id=token_id,
                   renewed_from=format(renewed_from, "x") if renewed_from else None)


def test_a_token_is_spent_once_and_released_only_if_nothing_was_issued(store: Store) -> None:
    run(store.add_token(token()))
    rec = run(store.token_by_secret("tok1".rjust(64, "0")))
    assert rec is not None and rec.used_at is None and rec.names == (("dns", "a.test"),)
    assert run(store.consume_token("tok1", NOW)) is True
    assert run(store.consume_token("tok1", NOW)) is False
    run(store.release_token("tok1"))  # nothing issued: usable again
    assert run(store.consume_token("tok1", NOW)) is True
    store.add_cert(cert(0x10, token_id="tok1")).result(timeout=10)
    spent = run(store.token_by_secret("tok1".rjust(64, "0")))
    assert spent is not None and spent.used_serial == "10"  # for a retry of its key
    run(store.release_token("tok1"))  # a certificate was issued with it: stays spent
    assert run(store.consume_token("tok1", NOW)) is False
    # ... unless that certificate was never released (and is revoked for it)
    assert run(store.release_token_spent_on(0x11)) is None
    assert run(store.release_token_spent_on(0x10)) == "tok1"
    assert run(store.consume_token("tok1", NOW)) is True
    store.add_cert(cert(0x12, token_id="tok1")).result(timeout=10)
    assert run(store.release_token_spent_on(0x10)) is None  # spent on another one now
    assert run(store.consume_token("tok1", NOW)) is False


def test_a_certificate_whose_row_cannot_be_written_leaves_nothing_behind(
        store: Store) -> None:
    """A certificate's row and its spent token are one transaction: a serial taken
    already fails the whole of it, the token stays unspent on it, and the next
    certificate is written as usual (the connection is not left in a failed
    transaction)."""
    for tid in ("tok1", "tok2"):
        run(store.add_token(token(tid)))
    store.add_cert(cert(0x30, token_id="tok1")).result(timeout=10)
    with pytest.raises((sqlite3.IntegrityError, psycopg.errors.UniqueViolation)):
        store.add_cert(cert(0x30, token_id="tok2")).result(timeout=10)
    spent = run(store.token_by_secret("tok2".rjust(64, "0")))
    assert spent is not None and spent.used_serial is None
    store.add_cert(cert(0x31, token_id="tok2")).result(timeout=10)
    got = run(store.cert(0x31))
    assert got is not None and got.fingerprint == f"{0x31:064x}"
    assert run(store.token_by_secret("tok2".rjust(64, "0"))).used_serial == "31"


def test_tokens_a_kill_left_spent_are_settled(store: Store) -> None:
    for tid in ("before", "nothing", "issued", "other"):
        run(store.add_token(token(tid)))
    assert run(store.consume_token("before", NOW - dt.timedelta(hours=1))) is True
    for tid in ("nothing", "issued", "other"):
        assert run(store.consume_token(tid, NOW)) is True
    store.add_cert(cert(0x20, token_id="issued")).result(timeout=10)
    store.add_cert(cert(0x21, token_id="other")).result(timeout=10)
    # 0x20 released by the killed run; nothing recorded on "nothing" since it started;
    # "before" was spent before that run, and stays spent
    assert run(store.settle_tokens(["20", "ff"], NOW - dt.timedelta(minutes=1), LATER_DT)) \
        == (1, 1)
    by = {t: run(store.token_by_secret(t.rjust(64, "0"))) for t in
          ("before", "nothing", "issued", "other")}
    assert by["nothing"].used_at is None and by["before"].used_at is not None  # type: ignore[union-attr]
    assert by["issued"].released_at == LATER_DT.isoformat()  # type: ignore[union-attr]
    assert by["other"].released_at is None  # type: ignore[union-attr]
    assert run(store.settle_tokens([], None, LATER_DT)) == (0, 0)
    # An inventory copied before its row (a backup taken mid-enrollment), while the log
    # says the token's certificate was released: it stays spent (a review).
    run(store.add_token(token("copied")))
    assert run(store.consume_token("copied", NOW)) is True
    assert run(store.settle_tokens([], NOW - dt.timedelta(minutes=1), LATER_DT,
                                   ["copied"])) == (0, 0)
    assert run(store.token_by_secret("copied".rjust(64, "0"))).used_at is not None  # type: ignore[union-attr]


def test_certificates_are_found_and_revocation_reaches_their_ssh_certificates(
        store: Store) -> None:
    store.add_cert(cert(0xa)).result(timeout=10)
    store.add_cert(cert(0xb, renewed_from=0xa)).result(timeout=10)
    store.add_ssh_cert(NewSSHCert(serial=7, key_id="a.test:7", cert_type="host",
                                  key_sha256="k" * 64, public_key="ssh-ed25519 AAAA",
                                  principals=("a.test",), valid_after=0, valid_before=2**40,
                                  owner_serial="a", issued_at=NOW.isoformat(),
                                  issuer="ssh-host-ca")).result(timeout=10)
    assert run(store.cert(0xa)).names == ("a.test",)
    assert run(store.cert_by_fingerprint(f"{0xb:064x}")).renewed_from == "a"
    assert run(store.lineage(0xb, NOW)) == [0xa, 0xb]
    assert run(store.live_certs_named("a.test", NOW)) == [0xa, 0xb]
    # Not the daemon's own listener certificate, named as hosts may be (localhost)
    store.add_cert(dataclasses.replace(cert(0xc), role="server")).result(timeout=10)
    assert run(store.live_certs_named("a.test", NOW)) == [0xa, 0xb]
    # Both expired a day later; 0xa still has a live SSH certificate issued on it, which
    # an offboarding by name must reach (SSH trial: it still logged in)
    assert run(store.live_certs_named("a.test", NOW + dt.timedelta(days=2))) == [0xa]
    assert run(store.count_ssh_certs(SSHSelector(key_id="a.test:7"))) == 1
    done = run(store.revoke_certs([0xa], NOW, "keyCompromise"))
    assert done.serials == (0xa,) and done.ssh_certs == 1
    assert run(store.revoke_certs([0xa], NOW, "keyCompromise")).serials == ()
    assert [(s, r) for s, _, r, _ in run(store.revoked_certs())] == [(0xa, "keyCompromise")]
    # By name, not by text (a name containing "a.test" is not it), until it expires
    assert run(store.revoked_certs_named("a.test", NOW)) == [(0xa, "keyCompromise")]
    assert run(store.revoked_certs_named("test", NOW)) == []
    assert run(store.revoked_certs_named("a.test", NOW + dt.timedelta(days=2))) == []
    assert run(store.revoked_ssh_certs()) == [("host", 7, "ssh-host-ca")]
    assert run(store.lineage(0xb, NOW)) == [0xb]
    assert run(store.revoke_ssh(SSHSelector(key_sha256="z" * 64), NOW,
                                revoke_key="ssh-ed25519 BBBB")) == 0
    assert run(store.revoked_ssh_keys()) == ["ssh-ed25519 BBBB"]


def test_ssh_certificates_are_found_by_principal_key_id_serial_status_and_type(
        store: Store) -> None:
    base = int(NOW.timestamp())

    def ssh(serial: int, kind: str, key_id: str, principals: tuple[str, ...],
            hours: int, at: int, lived: int = 60, owner: str = "a") -> NewSSHCert:
        return NewSSHCert(serial=serial, key_id=key_id, cert_type=kind,
                          key_sha256=f"SHA256:Key{serial}", public_key="ssh-ed25519 AAAA",
                          principals=principals, valid_after=base - lived,
                          valid_before=base + hours * 3600, owner_serial=owner,
                          issued_at=(NOW + dt.timedelta(seconds=at)).isoformat(),
                          issuer=f"ssh-{kind}-ca")
    for c in [ssh(11, "host", "web01.test", ("web01.test",), 24 * 30, 1),
              # 2 h left of 16: its last third, expiring
              ssh(12, "user", "alice@laptop", ("alice", "deploy"), 2, 2, lived=14 * 3600),
              ssh(130, "user", "bob@laptop", ("bob",), -1, 3),
              ssh(14, "host", "db_1.test", ("db_1.test",), 24 * 30, 4),
              ssh(15, "user", "carol@laptop", ("carol",), 3, 5, owner="1b")]:
        store.add_ssh_cert(c).result(timeout=10)
    run(store.revoke_ssh(SSHSelector(serial=14), NOW))
    soon = NOW + dt.timedelta(days=7)

    def find(**q: Any) -> list[int]:
        return [c.serial for c in run(store.find_ssh_certs(SSHCertQuery(**q), NOW, soon)).certs]
    assert find() == [15, 14, 130, 12, 11]  # newest first
    assert find(text="DEPLOY") == [12] and find(text="web01") == [11]
    assert find(text="13") == [130]  # a serial starts with it
    assert find(text="db_") == [14] and find(text="db%") == []  # LIKE's wildcards are text
    # by the key's fingerprint, whole, as ssh-keygen -l prints it (an SSH trial's leaked key)
    assert find(text="SHA256:Key12") == [12] and find(text="SHA256:key12") == []
    assert find(status="revoked") == [14] and find(status="expired") == [130]
    # 15 has 3 h left of 3 h: not yet two thirds of its life, so valid, not expiring
    assert find(status="expiring") == [12] and find(status="valid") == [15, 11]
    assert find(cert_type="host") == [14, 11]
    assert find(owner=0x1b) == [15] and find(owner=0xa) == [14, 130, 12, 11]
    assert find(sort="serial", descending=False) == [11, 12, 14, 15, 130]
    assert find(sort="expires", descending=False) == [130, 12, 15, 11, 14]
    page = run(store.find_ssh_certs(SSHCertQuery(limit=1, offset=2), NOW, soon))
    assert page.total == 5 and [c.serial for c in page.certs] == [130]
    rec = page.certs[0]
    assert (rec.key_id, rec.cert_type, rec.principals, rec.valid_before, rec.revoked_at,
            rec.issuer) == ("bob@laptop", "user", ("bob",), base - 3600, None, "ssh-user-ca")


def test_a_revocation_s_reason_becomes_keycompromise_and_keeps_its_time(store: Store) -> None:
    store.add_cert(cert(0xc)).result(timeout=10)
    assert run(store.revoke_certs([0xc], NOW, "superseded")).serials == (0xc,)
    assert run(store.compromised_keys()) == []
    later = NOW + dt.timedelta(days=7)
    assert run(store.revoke_certs([0xc], later, "superseded")).serials == ()
    assert run(store.revoke_certs([0xc], later, "keyCompromise")).serials == (0xc,)
    assert [(s, at, r) for s, at, r, _ in run(store.revoked_certs())] == [
        (0xc, NOW, "keyCompromise")]
    assert run(store.compromised_keys()) == ["e" * 64]
    assert run(store.revoke_certs([0xc], later, "keyCompromise")).serials == ()


def test_one_revocation_of_many_revokes_each_once_in_the_order_asked(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    # PostgreSQL revokes in chunks of set statements; small chunks here, so that a
    # serial's fate must not depend on which chunk it fell in
    monkeypatch.setattr("ca.store.postgres._REVOKE_CHUNK", 2)
    for serial in range(0x20, 0x27):
        store.add_cert(cert(serial)).result(timeout=10)
        store.add_ssh_cert(NewSSHCert(
            serial=serial, key_id=f"k{serial}", cert_type="user", key_sha256=f"k{serial}",
            public_key="ssh-ed25519 AAAA", principals=("a",), valid_after=0,
            valid_before=2**40, owner_serial=format(serial, "x"), issued_at=NOW.isoformat(),
            issuer="ssh-user-ca")).result(timeout=10)
    run(store.revoke_certs([0x22], NOW, "superseded"))
    run(store.revoke_certs([0x25], NOW, "keyCompromise"))
    asked = [0x26, 0x21, 0x99, 0x22, 0x25, 0x21, 0x20, 0x24]  # unknown, twice, revoked
    done = run(store.revoke_certs(asked, LATER_DT, "keyCompromise"))
    # 0x22 takes the reason (keeping its time); 0x25 had it; 0x99 is no certificate;
    # the SSH certificates of those revoked before went with them then
    assert done.serials == (0x26, 0x21, 0x22, 0x20, 0x24) and done.ssh_certs == 4
    assert {s: (at, r) for s, at, r, _ in run(store.revoked_certs())} == {
        0x20: (LATER_DT, "keyCompromise"), 0x21: (LATER_DT, "keyCompromise"),
        0x22: (NOW, "keyCompromise"), 0x24: (LATER_DT, "keyCompromise"),
        0x25: (NOW, "keyCompromise"), 0x26: (LATER_DT, "keyCompromise")}
    assert run(store.lineage(0x23, NOW)) == [0x23]  # not asked, still live
    assert sorted(s for _, s, _ in run(store.revoked_ssh_certs())) == [
        0x20, 0x21, 0x22, 0x24, 0x25, 0x26]
    assert run(store.revoke_certs(asked, LATER_DT, "keyCompromise")) == (
        run(store.revoke_certs([], LATER_DT, "keyCompromise")))  # nothing left to do


def test_crl_numbers_only_grow_and_the_latest_crl_is_served(store: Store) -> None:
    taken = [run(store.next_crl_number(lead=dt.timedelta(minutes=1))) for _ in range(3)]
    numbers = [n for n, _ in taken]
    assert numbers == sorted(set(numbers)) and numbers[0] >= 1
    # and when: a later number, a later time, in whole seconds, at most the lead ahead
    # (a CRL's thisUpdate comes from it; OpenSSL keeps the first of equal ones)
    times = [at for _, at in taken]
    now = dt.datetime.now(dt.UTC)
    assert times == sorted(set(times)) and all(t.microsecond == 0 for t in times)
    assert times[-1] <= now + dt.timedelta(minutes=1)
    # without a lead, never ahead of now
    assert run(store.next_crl_number())[1] <= dt.datetime.now(dt.UTC)
    for n in numbers:
        run(store.add_crl(CRLRecord(n, 0, NOW.isoformat(), b"CRL%d" % n, "issuing-ca")))
    latest = run(store.latest_crl("issuing-ca"))
    assert latest.number == numbers[-1] and latest.der == b"CRL%d" % numbers[-1]
    assert run(store.latest_crl(None)) is None


def test_keys_rotate_and_change_state_once(store: Store) -> None:
    def key(label: str, state: str = "active") -> KeyRecord:
        return KeyRecord(label, "issuing", state, "ec-p256", NOW.isoformat(), "f" * 64,
                         f"pkcs11:object={label}", b"CERT", NOW.isoformat())
    run(store.add_keys([key("issuing-ca")]))
    run(store.add_keys([key("issuing-ca")]))  # already recorded: left alone
    assert run(store.rotate_keys([key("issuing-2")])) == ["issuing-ca"]
    states = {k.label: k.state for k in run(store.keys())}
    assert states == {"issuing-ca": "previous", "issuing-2": "active"}
    assert run(store.set_key_state("issuing-ca", "retired", NOW, "previous")) is True
    assert run(store.set_key_state("issuing-ca", "retired", NOW, "previous")) is False
    # A rotation that would replace a key no longer active (another rotation committed
    # first) changes nothing (a review: both lines named the same key as replaced)
    assert run(store.rotate_keys([key("issuing-3")], replacing={"issuing": "issuing-ca"})) \
        is None
    assert {k.label: k.state for k in run(store.keys())} == {
        "issuing-ca": "retired", "issuing-2": "active"}
    assert run(store.rotate_keys([key("issuing-3")], replacing={"issuing": "issuing-2"})) \
        == ["issuing-2"]


def test_a_staged_ssh_key_is_promoted_once_and_the_active_one_becomes_previous(
        store: Store) -> None:
    def key(label: str) -> KeyRecord:
        return KeyRecord(label, "ssh-user", "active", "ed25519", NOW.isoformat(), "f" * 64,
                         f"pkcs11:object={label}", None, NOW.isoformat(), "ssh-ed25519 AAAA")
    run(store.add_keys([key("ssh-user-ca")]))
    run(store.add_keys([dataclasses.replace(key("ssh-user-2"), state="next")]))
    assert {k.label: k.state for k in run(store.keys())} == {
        "ssh-user-ca": "active", "ssh-user-2": "next"}
    assert run(store.promote_key("ssh-user-2", "ssh-host", LATER)) is None  # another kind
    assert run(store.promote_key("ssh-user-2", "ssh-user", LATER, replacing="ssh-user-0")) \
        is None  # the active key is another than the one it would replace
    # a second staging, or one whose active key changed, is not taken
    assert run(store.stage_key(dataclasses.replace(key("ssh-user-3"), state="next"),
                               "ssh-user-ca")) is False
    assert run(store.promote_key("ssh-user-2", "ssh-user", LATER)) == ["ssh-user-ca"]
    assert run(store.promote_key("ssh-user-2", "ssh-user", LATER)) is None  # done already
    assert {k.label: (k.state, k.changed_at) for k in run(store.keys())} == {
        "ssh-user-ca": ("previous", LATER), "ssh-user-2": ("active", LATER)}
    third = dataclasses.replace(key("ssh-user-3"), state="next")
    assert run(store.stage_key(third, "ssh-user-ca")) is False  # not the active one now
    assert run(store.stage_key(third, "ssh-user-2")) is True
    assert {k.label: k.state for k in run(store.keys())}["ssh-user-3"] == "next"
    # a rotation that read no staged key, one staged since (another node's): it would
    # have promoted that one, so nothing changes (a cluster trial had both take)
    assert run(store.rotate_keys([key("ssh-user-4")], replacing={"ssh-user": "ssh-user-2"})) \
        is None


def test_a_root_ceremonys_records_land_together_or_not_at_all(store: Store) -> None:
    def key(label: str, kind: str) -> KeyRecord:
        return KeyRecord(label, kind, "active", "ec-p256", NOW.isoformat(), "f" * 64,
                         f"pkcs11:object={label}", b"CERT", NOW.isoformat())
    run(store.add_keys([key("root-ca", "root"), key("issuing-ca", "issuing")]))
    cross = [CrossCert("root-2", "root-ca", b"NEW-BY-OLD", NOW.isoformat()),
             CrossCert("root-ca", "root-2", b"OLD-BY-NEW", NOW.isoformat())]
    # The issuing key's label is taken: the insert fails after the root's went in, and
    # the whole ceremony is undone (a kill at that point does the same).
    with pytest.raises((sqlite3.IntegrityError, psycopg.errors.UniqueViolation)):
        run(store.rotate_keys([key("root-2", "root"), key("issuing-ca", "issuing")], cross))
    assert {k.label: k.state for k in run(store.keys())} == {
        "root-ca": "active", "issuing-ca": "active"}
    assert run(store.cross_certs()) == []
    assert run(store.rotate_keys([key("root-2", "root"), key("issuing-2", "issuing")],
                                 cross)) == ["root-ca", "issuing-ca"]
    assert {k.label: k.state for k in run(store.keys())} == {
        "root-ca": "previous", "issuing-ca": "previous", "root-2": "active",
        "issuing-2": "active"}
    assert [c.der for c in run(store.cross_certs())] == [b"NEW-BY-OLD", b"OLD-BY-NEW"]


# ---- PostgreSQL: several nodes on one database ---------------------------------------------


def test_two_nodes_racing_for_one_token_issue_exactly_once(postgres_server: Any) -> None:
    from ca.store.postgres import PostgresStore
    url = postgres_server.new_database()
    # Two stores start at once on a new database: each migration runs exactly once.
    with ThreadPoolExecutor(2) as pool:
        nodes = list(pool.map(lambda _: PostgresStore(url), range(2)))
    try:
        run(nodes[0].add_token(token()))

        async def race() -> list[bool]:
            return await asyncio.gather(*(nodes[i % 2].consume_token("tok1", NOW)
                                          for i in range(40)))
        assert sorted(run(race())) == [False] * 39 + [True]
        # A number handed out on one node is never handed out on the other; taken at once
        # on both, a larger number has a later time (a review saw nextval's order and
        # clock_timestamp()'s differ)
        async def numbers() -> list[tuple[int, dt.datetime]]:
            return await asyncio.gather(*(nodes[i % 2].next_crl_number(
                lead=dt.timedelta(minutes=1)) for i in range(24)))
        taken = sorted(run(numbers()))
        assert len({n for n, _ in taken}) == 24
        times = [at for _, at in taken]
        assert times == sorted(set(times)) and all(t.utcoffset() == dt.timedelta(0)
                                                   for t in times), times
        # Rotations of one kind on both nodes at once, each replacing the key it read as
        # active: one commits, the others change nothing
        run(nodes[0].add_keys([KeyRecord("ssh-user-ca", "ssh-user", "active", "ed25519",
                                         NOW.isoformat(), "f" * 64, "pkcs11:object=a", None,
                                         NOW.isoformat())]))

        async def rotations() -> list[list[str] | None]:
            return await asyncio.gather(*(nodes[i % 2].rotate_keys(
                [KeyRecord(f"ssh-user-{i}", "ssh-user", "active", "ed25519", NOW.isoformat(),
                           "f" * 64, f"pkcs11:object={i}", None, NOW.isoformat())],
                replacing={"ssh-user": "ssh-user-ca"}) for i in range(8)))
        done = [r for r in run(rotations()) if r is not None]
        assert done == [["ssh-user-ca"]], done
        assert sorted(k.state for k in run(nodes[1].keys())) == ["active", "previous"]
    finally:
        for n in nodes:
            n.close()


def test_a_nodes_busy_sessions_are_found_however_long_its_name(postgres_server: Any) -> None:
    """A review: PostgreSQL keeps 63 bytes of an application name, and a node named by a
    long host name matched no pattern, its killed run's busy sessions unseen."""
    import threading

    import psycopg

    from ca.store.postgres import PostgresStore
    url = postgres_server.new_database()
    store = PostgresStore(url)
    node = "node-" + "x" * 50 + ".example"  # 63 characters, as NODE_NAME allows
    held = psycopg.connect(url, application_name=f"hsmca {node} worker 1")
    pid = held.info.backend_pid

    def sleep() -> None:
        with contextlib.suppress(psycopg.errors.AdminShutdown):  # (ended below)
            held.execute("SELECT pg_sleep(300)")
    busy = threading.Thread(target=sleep, daemon=True)
    try:
        assert run(store.node_sessions_busy(node)) == 0  # connected, idle
        busy.start()
        with psycopg.connect(url) as conn:
            deadline = time.monotonic() + 60  # a watchdog, not a wait
            while conn.execute("SELECT state FROM pg_stat_activity WHERE pid = %s",
                               (pid,)).fetchone()[0] != "active":
                assert time.monotonic() < deadline, "the session never ran its statement"
                conn.execute("SELECT pg_stat_clear_snapshot()")
        assert run(store.node_sessions_busy(node)) == 1
        assert run(store.node_sessions_busy("node-y")) == 0
    finally:
        with psycopg.connect(url) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        busy.join(60)
        held.close()
        store.close()


def test_a_database_newer_than_the_code_is_refused_in_one_line(postgres_server: Any) -> None:
    from ca.store.errors import SchemaTooNew
    from ca.store.postgres import PG_MIGRATIONS, PostgresStore
    url = postgres_server.new_database()
    PostgresStore(url).close()
    postgres_server.psql(f"UPDATE schema_version SET version = {len(PG_MIGRATIONS) + 1}",
                         db=url.rsplit("/", 1)[1])
    with pytest.raises(SchemaTooNew, match="newer than this hsmca knows") as info:
        PostgresStore(url)
    assert "\n" not in str(info.value)



def test_every_node_s_log_is_listed_with_its_size_and_latest_checkpoint(
        postgres_server: Any) -> None:
    from ca.store.postgres import PostgresStore
    store = PostgresStore(postgres_server.new_database())
    try:
        assert run(store.audit_logs()) == []
        for node, lines in (("n2", 1), ("n1", 3), ("n10", 2)):
            store.append_audit(node, 0, [b"x"] * lines).result(timeout=60)
        run(store.put_audit_checkpoint("n1", 3, "note of n1", NOW))
        assert run(store.audit_logs()) == [("n1", 3, "note of n1"), ("n10", 2, None),
                                           ("n2", 1, None)]
    finally:
        store.close()


def test_an_audit_group_its_node_gave_up_on_writes_nothing_when_it_comes(
        postgres_server: Any) -> None:
    """A node that waited too long for PostgreSQL cuts the group from its file and
    writes the next group at the same seqs. Had the late group's transaction gone on
    (a connection that hung, then woke), its DELETE would remove the next group's
    acknowledged lines: so once its node gave up on it, it writes nothing."""
    import threading

    import psycopg

    from ca.store.postgres import AUDIT_LOCK_CLASS, AuditGroupAbandoned, PostgresStore
    url = postgres_server.new_database()
    store = PostgresStore(url)
    try:
        store.append_audit("n1", 0, [b"line 0"]).result(timeout=60)
        gave_up = threading.Event()
        with psycopg.connect(url) as other:
            # The late group is held up before it may write (it waits for its node's
            # lock), and its node gives up meanwhile.
            other.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))",
                          (AUDIT_LOCK_CLASS, "n1"))
            late = store.append_audit("n1", 1, [b"late 1", b"late 2"], gave_up, wait_s=60)
            gave_up.set()
        with pytest.raises(AuditGroupAbandoned, match="came too late"):
            late.result(timeout=60)
        assert store.audit_lines_sync("n1", 0, 10) == [b"line 0"]
        store.append_audit("n1", 1, [b"next 1"]).result(timeout=60)
        assert store.audit_lines_sync("n1", 0, 10) == [b"line 0", b"next 1"]
    finally:
        store.close()


def test_an_audit_group_not_committed_in_time_fails_in_one_line_and_is_given_up(
        postgres_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The node's side: a group PostgreSQL does not commit within the commit timeout
    fails (the log then cuts it), with one line saying so, and is given up: it does
    not land when PostgreSQL lets it go on a moment later."""
    import psycopg

    from ca.audit import cluster
    from ca.store.postgres import AUDIT_LOCK_CLASS, PostgresStore
    url = postgres_server.new_database()
    store = PostgresStore(url)
    lock = "SELECT pg_advisory_xact_lock(%s, hashtext(%s))"
    try:
        cluster.commit_group(store, "n1", 0, [b"line 0"])
        monkeypatch.setattr(cluster, "COMMIT_TIMEOUT_S", 1.0)
        with psycopg.connect(url) as other:
            other.execute(lock, (AUDIT_LOCK_CLASS, "n1"))  # holds the group up
            with pytest.raises(OSError) as info:
                cluster.commit_group(store, "n1", 1, [b"late 1", b"late 2"])
            assert str(info.value) == "PostgreSQL did not commit the audit lines within 1 s"
            other.commit()  # lets it go on (it waits for the lock up to twice as long)
            # Once this has the lock again, the late group, waiting before it, is over.
            other.execute(lock, (AUDIT_LOCK_CLASS, "n1"))
            assert store.audit_lines_sync("n1", 0, 10) == [b"line 0"]
    finally:
        store.close()


def test_a_group_committed_after_its_node_cut_it_comes_back_as_never_released(
        postgres_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A group whose commit the node gave up on, already writing, commits late; the
    node stops before its next group would have replaced it. At the next start that
    group is not written back into the file as if acknowledged: the outcome comes
    back marked never released, exactly as the next group would have written it, and
    file and PostgreSQL agree."""
    import psycopg

    from ca.audit import cluster
    from ca.audit.log import AuditLog
    from ca.store.postgres import AUDIT_LOCK_CLASS, PostgresStore
    url = postgres_server.new_database()
    store = PostgresStore(url)
    path = tmp_path / "audit" / "log.jsonl"
    # (The group's own lock wait is twice this: room to let it go on after the give-up.)
    monkeypatch.setattr(cluster, "COMMIT_TIMEOUT_S", 3.0)
    outcome = {"phase": "outcome", "op_id": "0a", "result": "ok", "fingerprint": "ff"}
    try:
        audit = AuditLog.open(path, mirror=cluster.mirror(store, "n1", path))
        [intent] = audit.append_durable([("hsm.sign", {"phase": "intent", "op_id": "0a"})])
        assert intent.result() == 0
        with psycopg.connect(url) as other:
            # An uncommitted row at the outcome's seq: the group, past its look at
            # whether it was given up, waits in its INSERT until the node gives up.
            other.execute("INSERT INTO audit_lines (node, seq, line) VALUES ('n1', 1, 'x')")
            [failed] = audit.append_durable([("hsm.sign", outcome)])
            assert "did not commit the audit lines within 3 s" in str(failed.exception())
            # The node's next group (its retry, owing that outcome) waits for the first
            # one's lock and is given up too: the first is still the one to land (a
            # trial: the marker named only the last group cut, and the first came back
            # into the file at the next start as released)
            # (given up on sooner, so that the first group's own lock wait, twice 3 s
            # from its start, has not run out when it goes on)
            monkeypatch.setattr(cluster, "COMMIT_TIMEOUT_S", 1.0)
            # Any other line is refused at once meanwhile, for the reason of the group
            # given up on, without a wait of its own (a trial's clients waited 20-50 s
            # for their 503 as each group waited its own timeout); the retry is tried.
            [refused] = audit.append_durable([("token.create", {"id": "t1"})])
            assert "did not commit the audit lines within 3 s" in str(refused.exception())
            [again] = audit.append_durable([("log.resume", {})])
            assert "did not commit the audit lines within 1 s" in str(again.exception())
            other.rollback()  # the late group goes on and commits
            other.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))",
                          (AUDIT_LOCK_CLASS, "n1"))  # held until that commit is over
        assert store.audit_size_sync("n1") == 2
        audit.close()  # the node stops before its next group

        cluster.sync_local_log(path, tmp_path / "checkpoint", store, "n1")
        # The owed outcome is in both before the log even opens: a start that fails
        # right after loses nothing.
        assert b'"released":false' in path.read_bytes().splitlines()[-1]
        assert store.audit_lines_sync("n1", 0, 10) == path.read_bytes().splitlines()
        audit = AuditLog.open(path, mirror=cluster.mirror(store, "n1", path))
        audit.append_durable([("daemon.start", {})])
        audit.close()
        lines = path.read_bytes().splitlines()
        said = [json.loads(line) for line in lines]
        assert [(e["event"], e.get("phase"), e.get("released")) for e in said] == [
            ("hsm.sign", "intent", None), ("hsm.sign", "outcome", False),
            ("daemon.start", None, None)]
        assert {k: said[1][k] for k in outcome} == outcome
        assert store.audit_lines_sync("n1", 0, 10) == lines
        assert not (tmp_path / "audit" / "log.jsonl.uncommitted").exists()
    finally:
        store.close()


def test_a_database_found_behind_while_running_holds_the_node_until_it_is_put_right(
        postgres_server: Any, tmp_path: Path) -> None:
    """PostgreSQL lost a node's last lines under it (a restore): the next group is not
    committed after the hole, the node remembers why, and it refuses to start until
    the database holds the missing line again (a restore to the latest point), when
    it starts as before and forgets the finding."""
    from ca.audit import cluster
    from ca.audit.log import AuditLog, AuditLogError
    from ca.store.postgres import PostgresStore
    url = postgres_server.new_database()
    store = PostgresStore(url)
    path = tmp_path / "audit" / "log.jsonl"
    marker = tmp_path / "audit" / "log.jsonl.database-went-back"
    try:
        audit = AuditLog.open(path, mirror=cluster.mirror(store, "n1", path))
        for i in range(3):
            assert audit.append_durable([("test.line", {"n": i})])[0].result() == i
        postgres_server.psql("DELETE FROM audit_lines WHERE node = 'n1' AND seq >= 1",
                             db=url.rsplit("/", 1)[1])
        [refused] = audit.append_durable([("test.line", {"n": 3})])
        assert "PostgreSQL lacks line 2 of the audit log of node 'n1'" in str(
            refused.exception())
        assert store.audit_size_sync("n1") == 1 and marker.exists()
        audit.close()
        with pytest.raises(AuditLogError, match="found, while it ran, that PostgreSQL "
                           "lacked line 2 of its audit log"):
            cluster.sync_local_log(path, tmp_path / "checkpoint", store, "n1")
        lines = path.read_bytes().splitlines()
        assert len(lines) == 3  # the refused group was cut
        store.append_audit("n1", 1, lines[1:]).result()  # put right: it holds line 2
        cluster.sync_local_log(path, tmp_path / "checkpoint", store, "n1")
        assert not marker.exists()
    finally:
        store.close()


def test_node_names_whose_32_bit_hashes_collide_each_hold_their_own_lease(
        postgres_server: Any) -> None:
    """hashtext('lease:node:ca-84979') = hashtext('lease:node:ca-86405'): with a 32-bit
    lock key the second node would be told the name is already running."""
    from ca.store.postgres import PostgresStore
    url = postgres_server.new_database()
    store = PostgresStore(url)
    a, b = store.lease("node:ca-84979"), store.lease("node:ca-86405")
    try:
        assert postgres_server.psql("SELECT hashtext('lease:node:ca-84979') = "
                                    "hashtext('lease:node:ca-86405')") == "t"

        async def take() -> tuple[bool, bool]:
            return await a.try_take(), await b.try_take()
        assert asyncio.run(take()) == (True, True)
    finally:
        a.close()
        b.close()
        store.close()


def test_crl_numbers_move_past_a_floor_and_never_back(store: Store) -> None:
    """The start moves the CRL counter past every number its log shows signed (a
    restored inventory signed a number again); never backwards, whatever it is given."""
    first = run(store.next_crl_number())[0]
    run(store.keep_crl_numbers_above(first + 5))
    assert run(store.next_crl_number())[0] == first + 6
    run(store.keep_crl_numbers_above(first + 2))  # behind the counter: nothing moves
    assert run(store.next_crl_number())[0] == first + 7
    assert run(store.log_scanned("n1")) == 0
    run(store.set_log_scanned("n1", 4096))
    assert run(store.log_scanned("n1")) == 4096 and run(store.log_scanned("n2")) == 0

"""The Store's read verbs for auditors and operators, as any implementation must keep
them (the `store` fixture of tests/conftest.py runs each against SQLite and a real
PostgreSQL): search by name, principal, subject, serial or role, with disjoint statuses,
kinds, sorting and paging; one certificate with its DER; the renewal family whatever
its state; counts by kind and hour."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest

from ca.store import CertPage, CertQuery, IssuedCert, NewCert, NewSSHCert, Store

NOW = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.UTC)
SOON = NOW + dt.timedelta(days=7)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def add(store: Store, serial: int, names: tuple[str, ...], *, role: str = "service",
        issued: dt.datetime = NOW, ends: dt.timedelta = dt.timedelta(days=30),
        principals: tuple[str, ...] = (), renewed_from: int | None = None,
        audit_seq: int | None = None, acme: str | None = None,
        audit_log: str | None = None) -> None:
    store.add_cert(NewCert(
        serial=serial, fingerprint=f"{serial:064x}", role=role, subject=f"CN={names[0]}",
        names=names, principals=principals, spki_sha256="e" * 64,
        not_before=issued.isoformat(), not_after=(issued + ends).isoformat(),
        issued_at=issued.isoformat(), der=f"DER{serial}".encode(), issuer="issuing-ca",
        renewed_from=format(renewed_from, "x") if renewed_from else None,
        acme_account="acc" if acme else None, acme_order=acme,
        audit_seq=audit_seq, audit_log=audit_log)).result(timeout=10)


def serials(page: CertPage) -> list[str]:
    return [c.serial for c in page.certs]


def find(store: Store, **kw: Any) -> CertPage:
    page = run(store.find_certs(CertQuery(**kw), NOW, SOON))
    assert isinstance(page, CertPage)
    return page


def test_text_matches_names_principals_subjects_serials_and_roles(store: Store) -> None:
    add(store, 0xa1, ("web.example", "api.example"))
    add(store, 0xa2, ("alice@example.com",), role="user", principals=("alice", "ops"))
    add(store, 0xb3, ("100%_under\\score.example",))
    add(store, 0x0c4, ("<script>alert(1)</script>.example",))
    assert serials(find(store, text="API.EXAMPLE")) == ["a1"]  # ASCII case-insensitive
    assert serials(find(store, text="ops")) == ["a2"]  # a principal
    assert serials(find(store, text="user")) == ["a2"]  # a role, exactly
    assert serials(find(store, text="CN=web")) == ["a1"]  # the subject
    assert sorted(serials(find(store, text="b"))) == ["a1", "b3"]  # "web"; a serial prefix
    assert serials(find(store, text="0c")) == ["c4"]  # leading zeros ignored
    assert serials(find(store, text="00:A1")) == ["a1"]  # as openssl prints it
    assert serials(find(store, text="%_under\\")) == ["b3"]  # LIKE's wildcards are literal
    assert serials(find(store, text="_")) == ["b3"]
    assert serials(find(store, text="<script>")) == ["c4"]
    assert find(store, text="nothing.example").total == 0


def test_statuses_are_disjoint_and_kinds_split_acme(store: Store) -> None:
    add(store, 1, ("live.example",))
    add(store, 2, ("soon.example",), issued=NOW - dt.timedelta(days=20),
        ends=dt.timedelta(days=23))  # its last 7 days
    add(store, 3, ("old.example",), issued=NOW - dt.timedelta(days=40))
    add(store, 4, ("gone.example",), acme="order-1")
    run(store.revoke_certs([4], NOW, "superseded"))
    # A day's certificate is expiring in its last third (8 h), not all its life
    # long as "within 7 days" had it (an ACME trial: every one of them was expiring).
    day = dt.timedelta(hours=24)
    add(store, 5, ("fresh.example",), issued=NOW - dt.timedelta(hours=1), ends=day)
    add(store, 6, ("late.example",), issued=NOW - dt.timedelta(hours=17), ends=day)
    assert [sorted(serials(find(store, status=s)))
            for s in ("valid", "expiring", "expired", "revoked")
            ] == [["1", "5"], ["2", "6"], ["3"], ["4"]]
    assert serials(find(store, kind="acme")) == ["4"]
    assert sorted(serials(find(store, kind="x509"))) == ["1", "2", "3", "5", "6"]
    assert serials(find(store, account="acc")) == ["4"]  # what one ACME account got
    assert find(store, account="another").total == 0
    [revoked] = find(store, status="revoked").certs
    assert (revoked.reason, revoked.acme_order, revoked.acme_account) == (
        "superseded", "order-1", "acc")
    with pytest.raises(ValueError):
        find(store, status="sideways")


def test_sorting_and_paging(store: Store) -> None:
    for i in range(1, 8):
        add(store, 0x10 * i, (f"n{i}.example",), issued=NOW - dt.timedelta(hours=i),
            role="service" if i % 2 else "host")
    newest = find(store, limit=3)
    assert (newest.total, serials(newest)) == (7, ["10", "20", "30"])
    assert serials(find(store, limit=3, offset=3)) == ["40", "50", "60"]
    assert serials(find(store, limit=3, offset=6)) == ["70"]
    assert serials(find(store, sort="issued", descending=False, limit=2)) == ["70", "60"]
    assert serials(find(store, sort="serial", descending=True, limit=2)) == ["70", "60"]
    hosts = find(store, role="host", sort="subject", descending=False)
    assert (hosts.total, serials(hosts)) == (3, ["20", "40", "60"])
    add(store, 0x100, ("wide.example",))
    assert serials(find(store, sort="serial", descending=True, limit=1)) == ["100"]  # numeric


def test_one_certificate_with_its_der_and_audit_seq(store: Store) -> None:
    add(store, 0xabc, ("one.example",), audit_seq=41)
    found = run(store.issued_cert(0xabc))
    assert isinstance(found, IssuedCert)
    assert (found.der, found.record.audit_seq, found.record.issued_at) == (
        b"DER2748", 41, NOW.isoformat())
    assert run(store.issued_cert(0xabd)) is None
    # In cluster mode the seq is in the issuing node's log, which the record names.
    add(store, 0xabe, ("two.example",), audit_seq=7, audit_log="ca-2")
    two = run(store.issued_cert(0xabe))
    assert (two.record.audit_seq, two.record.audit_log) == (7, "ca-2")
    assert found.record.audit_log is None


def test_the_renewal_family_keeps_revoked_and_expired_members(store: Store) -> None:
    add(store, 1, ("f.example",), issued=NOW - dt.timedelta(days=60))
    add(store, 2, ("f.example",), issued=NOW - dt.timedelta(days=20), renewed_from=1)
    add(store, 3, ("f.example",), issued=NOW - dt.timedelta(days=1), renewed_from=2)
    add(store, 4, ("f.example",), issued=NOW, renewed_from=3)
    add(store, 5, ("other.example",))
    run(store.revoke_certs([2], NOW, "superseded"))
    for member in (1, 2, 3, 4):
        assert [r.serial for r in run(store.renewal_family(member))] == ["1", "2", "3", "4"]
    assert [r.serial for r in run(store.renewal_family(5))] == ["5"]
    assert run(store.renewal_family(99)) == []
    assert run(store.lineage(3, NOW)) == [3, 4]  # the live lineage is unchanged


def test_issuance_counts_by_kind_and_hour(store: Store) -> None:
    hour = NOW.replace(minute=0)
    add(store, 1, ("a.example",), issued=hour + dt.timedelta(minutes=5))
    add(store, 2, ("b.example",), issued=hour + dt.timedelta(minutes=50))
    add(store, 3, ("c.example",), issued=hour - dt.timedelta(minutes=10), role="host")
    add(store, 4, ("d.example",), issued=hour + dt.timedelta(minutes=1), acme="o")
    add(store, 5, ("e.example",), issued=hour - dt.timedelta(days=9))  # outside the window
    for serial, kind in ((11, "host"), (12, "user"), (13, "user")):
        store.add_ssh_cert(NewSSHCert(
            serial=serial, key_id=f"k{serial}", cert_type=kind, key_sha256="SHA256:x",
            public_key="ssh-ed25519 AAAA", principals=("p",), valid_after=0,
            valid_before=1, owner_serial="1",
            issued_at=(hour + dt.timedelta(minutes=serial)).isoformat())).result(timeout=10)
    counts = run(store.issuance_counts(hour - dt.timedelta(days=7), hour + dt.timedelta(hours=1)))
    got = {(c.kind, c.hour): c.count for c in counts}
    this, before = hour.isoformat()[:13], (hour - dt.timedelta(hours=1)).isoformat()[:13]
    assert got == {("x509-service", this): 2, ("x509-host", before): 1, ("acme", this): 1,
                   ("ssh-host", this): 1, ("ssh-user", this): 2}


def test_what_an_issuer_signed_that_is_still_live(store: Store) -> None:
    """What retiring a key leaves behind: its certificates neither expired nor revoked,
    and when the last of them ends."""
    add(store, 0x501, ("live.example",), ends=dt.timedelta(days=3))
    add(store, 0x502, ("later.example",), ends=dt.timedelta(days=9))
    add(store, 0x503, ("gone.example",), ends=dt.timedelta(days=20))
    add(store, 0x504, ("old.example",), issued=NOW - dt.timedelta(days=40))
    run(store.revoke_certs([0x503], NOW, None))
    count, until = run(store.live_signed_by("issuing-ca", NOW))
    assert count == 2 and until == (NOW + dt.timedelta(days=9)).isoformat()
    assert run(store.live_signed_by("another-ca", NOW)) == (0, None)
    # Of those, the ones whose holders renewed them (a live renewal): renewing again
    # does not end them (an operator's trial was told the same count after renewing
    # everything). A renewal revoked replaces nothing.
    assert run(store.live_renewed_by("issuing-ca", NOW)) == 0
    add(store, 0x505, ("live.example",), renewed_from=0x501)
    add(store, 0x506, ("later.example",), renewed_from=0x502)
    run(store.revoke_certs([0x506], NOW, None))
    assert run(store.live_renewed_by("issuing-ca", NOW)) == 1
    assert run(store.live_renewed_by("another-ca", NOW)) == 0
    # SSH certificates count too (their validBefore is Unix seconds): one live, the
    # later end; one expired.
    for serial, ends in ((11, dt.timedelta(days=12)), (12, -dt.timedelta(hours=1))):
        store.add_ssh_cert(NewSSHCert(
            serial=serial, key_id=f"k{serial}", cert_type="user", key_sha256=f"SHA256:{serial}",
            public_key="ssh-ed25519 AAAA", principals=("alice",),
            valid_after=int((NOW - dt.timedelta(days=1)).timestamp()),
            valid_before=int((NOW + ends).timestamp()), owner_serial="501",
            issued_at=NOW.isoformat(), issuer="ssh-user-ca")).result(timeout=10)
    assert run(store.live_signed_by("ssh-user-ca", NOW)) == (
        1, (NOW + dt.timedelta(days=12)).isoformat())
    # A host certificate replaced by a later live one for the same host key (renewed,
    # from the old CA key or the new) is in nobody's use: sshd presents the newest. An
    # SSH trial's rotation waited 30 days for the old key's retirement on those.
    for serial, issuer, issued in ((21, "old-host-ca", NOW - dt.timedelta(hours=2)),
                                   (22, "old-host-ca", NOW - dt.timedelta(hours=1)),
                                   (23, "new-host-ca", NOW), (24, "old-host-ca", NOW)):
        store.add_ssh_cert(NewSSHCert(
            serial=serial, key_id=f"h{serial}", cert_type="host",
            key_sha256="SHA256:host-a" if serial < 24 else "SHA256:host-b",
            public_key="ssh-ed25519 AAAA", principals=("a.example",),
            valid_after=int((NOW - dt.timedelta(days=1)).timestamp()),
            valid_before=int((NOW + dt.timedelta(days=30)).timestamp()), owner_serial="501",
            issued_at=issued.isoformat(), issuer=issuer)).result(timeout=10)
    assert run(store.live_signed_by("old-host-ca", NOW))[0] == 1  # host-b's alone
    assert run(store.live_signed_by("new-host-ca", NOW))[0] == 1


def test_a_search_leaves_the_event_loop_to_other_requests(store: Store) -> None:
    """A soak trial: searches slowed as the inventory grew (a text reads the whole
    table: 0.4 s at 200,000 certificates here), and they ran on the worker's event
    loop, so every renewal that worker had in hand waited for each search of the web
    view or `cert list`. While a search reads, the loop goes on serving others."""
    for serial in range(0xd1, 0xd6):
        add(store, serial, (f"s{serial}.search.example",))

    async def main() -> tuple[int, CertPage]:
        ticks = 0
        stop = False

        async def another_request() -> None:
            nonlocal ticks
            while not stop:
                ticks += 1
                await asyncio.sleep(0)

        other = asyncio.create_task(another_request())
        await asyncio.sleep(0)  # it has started
        before = ticks
        page = await store.find_certs(CertQuery(text="search.example"), NOW, SOON)
        during = ticks - before
        stop = True
        await other
        return during, page

    during, page = run(main())
    assert page.total == 5 and len(page.certs) == 5
    assert during >= 1  # 0: the loop was held for the whole search

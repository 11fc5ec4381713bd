"""The Store's OCSP due list, as any implementation must keep it: a new certificate is
due at once, a signed one when its refresh time comes, a revoked one at once again; an
expired certificate or a retired issuer's leaves the list for good; a 'good' response
signed before a revocation never replaces the revoked row, and is not served once the
certificate is revoked. The refresher reads this
list every second, so it is an index of what is due, not a scan of the inventory."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

from ca.store import NewCert, OCSPRecord, Store

NOW = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def add(store: Store, serial: int, *, issuer: str = "issuing-ca",
        ends: dt.timedelta = dt.timedelta(days=30)) -> None:
    store.add_cert(NewCert(
        serial=serial, fingerprint=f"{serial:064x}", role="service", subject=f"CN=s{serial}",
        names=(f"s{serial}.example",), principals=(), spki_sha256="e" * 64,
        not_before=NOW.isoformat(), not_after=(NOW + ends).isoformat(),
        issued_at=NOW.isoformat(), der=b"DER", issuer=issuer)).result(timeout=10)


def due(store: Store, at: dt.datetime = NOW, issuers: tuple[str, ...] = ("issuing-ca",)
        ) -> list[int]:
    return [d.serial for d in run(store.ocsp_due(at, 100, list(issuers)))]


def signed(serial: int, status: str = "good", refresh: dt.datetime | None = NOW + 12 * HOUR,
           at: dt.datetime = NOW) -> OCSPRecord:
    return OCSPRecord(serial, status, at.isoformat(), (at + 24 * HOUR).isoformat(),
                      b"sha1-" + status.encode(), b"sha256-" + status.encode(),
                      refresh.isoformat() if refresh else None)


def test_a_new_certificate_is_due_at_once_and_unanswered_until_signed(store: Store) -> None:
    add(store, 1)
    assert due(store) == [1]
    assert run(store.ocsp(1)) is None  # the placeholder row is never served
    run(store.put_ocsp([signed(1)]))
    assert due(store) == []
    assert due(store, NOW + 12 * HOUR) == [1]  # its refresh time has come
    assert run(store.ocsp(1)).der_sha1 == b"sha1-good"


def test_revocation_makes_a_signed_certificate_due_and_good_cannot_overwrite_it(
        store: Store) -> None:
    add(store, 1)
    add(store, 2)
    run(store.put_ocsp([signed(1), signed(2)]))
    run(store.revoke_certs([1], NOW, "keyCompromise"))
    assert run(store.ocsp(1)) is None  # its 'good' is never served again
    assert run(store.ocsp(2)).status == "good"
    [d] = run(store.ocsp_due(NOW, 100, ["issuing-ca"]))
    assert (d.serial, d.reason) == (1, "keyCompromise") and d.revoked_at
    # the refresher's 'good', signed before the revocation, arrives late: refused
    run(store.put_ocsp([signed(1)]))
    assert due(store) == [1]
    run(store.put_ocsp([signed(1, "revoked")]))
    assert due(store) == []
    assert run(store.ocsp(1)).status == "revoked"
    run(store.put_ocsp([signed(1)]))
    assert run(store.ocsp(1)).status == "revoked"


def test_expired_certificates_and_retired_issuers_leave_the_list(store: Store) -> None:
    add(store, 1, ends=HOUR)
    add(store, 2, issuer="old-issuing-ca")
    add(store, 3)
    later = NOW + 2 * HOUR
    assert due(store, later, ("issuing-ca",)) == [3]  # never one that expired
    assert run(store.ocsp_settle(later, ["issuing-ca"])) == 2  # 1 expired, 2's issuer gone
    assert due(store, later, ("issuing-ca", "old-issuing-ca")) == [3]


def test_a_response_that_outlives_its_certificate_is_never_due_again(store: Store) -> None:
    add(store, 1)
    run(store.put_ocsp([signed(1, refresh=None)]))
    assert due(store, NOW + 365 * 24 * HOUR) == []
    assert run(store.ocsp(1)).status == "good"


def test_the_longest_due_come_first(store: Store) -> None:
    for serial in (1, 2, 3):
        add(store, serial)
    run(store.put_ocsp([signed(1, refresh=NOW + 2 * HOUR), signed(2, refresh=NOW + HOUR)]))
    assert due(store, NOW + 3 * HOUR) == [3, 2, 1]
    assert [d.serial for d in run(store.ocsp_due(NOW + 3 * HOUR, 2, ["issuing-ca"]))] == [3, 2]


def test_the_refresher_says_an_outage_once_while_it_lasts() -> None:
    """A cluster trial: through a 10-minute database outage, the node that pre-signs
    OCSP logged "OCSP refresh failed" every few seconds (154 lines). Each error is said
    once while it lasts. (The refresher's own rounds, against issuers that cannot be
    read for 20 rounds.)"""
    import types

    from structlog.testing import capture_logs

    from ca.revocation.ocsp import OCSPRefresher
    from ca.store.errors import StoreUnavailable
    rounds = {"n": 0}

    async def refresh() -> object:
        rounds["n"] += 1
        if rounds["n"] <= 20:
            raise StoreUnavailable("the inventory (PostgreSQL) is unavailable: refused")
        raise asyncio.CancelledError  # the 21st round: the outage is over, stop here

    keys = types.SimpleNamespace(refresh=refresh)
    signer = types.SimpleNamespace(issuance=types.SimpleNamespace(keys=keys))
    refresher = OCSPRefresher(signer, interval=0)  # type: ignore[arg-type]
    with capture_logs() as logs:
        try:
            asyncio.run(refresher.run())
        except asyncio.CancelledError:
            pass
    said = [e for e in logs if e["event"] == "OCSP refresh failed"]
    assert rounds["n"] == 21 and len(said) == 1, logs

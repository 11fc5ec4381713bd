"""The Store's ACME verbs, as any implementation must keep them (the `store`
fixture of tests/conftest.py runs each against SQLite and a real PostgreSQL): EAB keys spent
once and erased, accounts unique by key, the challenge -> authorization -> order
cascade, one finalizer, the certificate linked to its account, nonces used once,
rate counts, shared secrets."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt

from ca.store import (
    AcmeAccount,
    AcmeAuthz,
    AcmeChallenge,
    AcmeEAB,
    AcmeOrder,
    NewCert,
    Store,
)
from ca.store.errors import TooManyPending

NOW = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.UTC)
LATER = (NOW + dt.timedelta(hours=1)).isoformat()
EARLIER = NOW - dt.timedelta(minutes=1)


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def account(id_: str, thumb: str, eab: str | None = None) -> AcmeAccount:
    return AcmeAccount(id_, thumb, "{}", "valid", ("mailto:a@b.test",), ("*.test",), eab,
                       NOW.isoformat())


def authzs_for(order_id: str, names: tuple[str, ...], account_id: str = "acc"
               ) -> list[AcmeAuthz]:
    return [AcmeAuthz(f"{order_id}-{i}", order_id, account_id, n, False, "pending", LATER,
                        (AcmeChallenge(f"{order_id}-{i}-h", f"{order_id}-{i}", "http-01", "tok",
                                       "pending"),
                         AcmeChallenge(f"{order_id}-{i}-t", f"{order_id}-{i}", "tls-alpn-01",
                                       "tok", "pending")))
              for i, n in enumerate(names)]


def order_with(store: Store, order_id: str, names: tuple[str, ...],
               account_id: str = "acc") -> list[AcmeAuthz]:
    authzs = authzs_for(order_id, names, account_id)
    run(store.add_acme_order(AcmeOrder(order_id, account_id, "pending", names, LATER,
                                       NOW.isoformat()), authzs))
    return authzs


def test_an_eab_key_binds_one_account_and_is_erased(store: Store) -> None:
    run(store.add_acme_eab(AcmeEAB("k1", b"secret", ("*.test",), LATER, NOW.isoformat(), "me")))
    got = run(store.acme_eab("k1"))
    assert isinstance(got, AcmeEAB) and got.mac_key == b"secret" and got.used_at is None
    assert run(store.add_acme_account(account("a1", "t1", "k1"), NOW)) is True
    assert run(store.add_acme_account(account("a2", "t2", "k1"), NOW)) is False
    spent = run(store.acme_eab("k1"))
    assert isinstance(spent, AcmeEAB)
    assert spent.mac_key is None and spent.account_id == "a1" and spent.used_at
    assert run(store.acme_account("a2")) is None


def test_eab_keys_are_listed_without_secrets_and_withdrawn_only_unbound(
        store: Store) -> None:
    run(store.add_acme_eab(AcmeEAB("w1", b"secret1", ("a.test",), LATER, NOW.isoformat(),
                                   "me")))
    run(store.add_acme_eab(AcmeEAB("w2", b"secret2", ("b.test",), LATER,
                                   (NOW + dt.timedelta(seconds=1)).isoformat(), "me")))
    assert run(store.add_acme_account(account("a1", "t1", "w2"), NOW)) is True
    listed = run(store.acme_eabs(10))
    assert [e.kid for e in listed] == ["w2", "w1"]  # newest first
    assert [e.mac_key for e in listed] == [None, b""]  # held or erased, never shown
    assert run(store.withdraw_acme_eab("w2", NOW)) is False  # bound: not withdrawn
    assert run(store.withdraw_acme_eab("w1", NOW)) is True
    assert run(store.withdraw_acme_eab("w1", NOW)) is False
    assert run(store.withdraw_acme_eab("nope", NOW)) is False
    gone = run(store.acme_eab("w1"))
    assert isinstance(gone, AcmeEAB) and gone.mac_key is None and gone.used_at is None
    assert gone.expires == NOW.isoformat()
    assert run(store.add_acme_account(account("a2", "t2", "w1"), NOW)) is False
    # A binding that checked the MAC before the withdrawal, and binds after it with its
    # earlier time, binds nothing (a review found it did: expires was still later).
    run(store.add_acme_eab(AcmeEAB("w3", b"secret3", ("c.test",), LATER, NOW.isoformat(),
                                   "me")))
    assert run(store.withdraw_acme_eab("w3", NOW + dt.timedelta(seconds=5))) is True
    assert run(store.add_acme_account(account("a3", "t3", "w3"), NOW)) is False
    assert [a.id for a in run(store.acme_accounts(10))] == ["a1"]


def test_an_expired_eab_key_binds_nothing(store: Store) -> None:
    run(store.add_acme_eab(AcmeEAB("k2", b"s", (), NOW.isoformat(), NOW.isoformat(), "me")))
    assert run(store.add_acme_account(account("a1", "t1", "k2"), NOW)) is False


def test_the_mac_key_of_an_eab_key_that_expired_unbound_is_erased(store: Store) -> None:
    run(store.add_acme_eab(AcmeEAB("e1", b"old", (), NOW.isoformat(), NOW.isoformat(), "me")))
    run(store.add_acme_eab(AcmeEAB("e2", b"live", (), LATER, NOW.isoformat(), "me")))
    run(store.add_acme_eab(AcmeEAB("e3", b"spent", (), NOW.isoformat(),
                                   EARLIER.isoformat(), "me")))
    assert run(store.add_acme_account(account("a1", "t1", "e3"), EARLIER)) is True
    assert run(store.erase_expired_acme_eab_keys(NOW)) == ["e1"]
    assert run(store.erase_expired_acme_eab_keys(NOW)) == []  # once
    erased, live = run(store.acme_eab("e1")), run(store.acme_eab("e2"))
    assert isinstance(erased, AcmeEAB) and isinstance(live, AcmeEAB)
    # Empty, not NULL: it still reads as expired, not as withdrawn by an admin
    assert erased.mac_key == b"" and erased.used_at is None and live.mac_key == b"live"
    assert run(store.withdraw_acme_eab("e1", NOW)) is False
    assert run(store.add_acme_account(account("a2", "t2", "e1"), EARLIER)) is False


def test_one_account_per_key_and_a_refused_account_leaves_its_eab_key_unspent(
        store: Store) -> None:
    assert run(store.add_acme_account(account("a1", "t1"), NOW)) is True
    run(store.add_acme_eab(AcmeEAB("k3", b"s", (), LATER, NOW.isoformat(), "me")))
    assert run(store.add_acme_account(account("a2", "t1", "k3"), NOW)) is False
    eab = run(store.acme_eab("k3"))
    assert isinstance(eab, AcmeEAB) and eab.used_at is None and eab.mac_key == b"s"
    found = run(store.acme_account_by_thumbprint("t1"))
    assert isinstance(found, AcmeAccount) and found.id == "a1"


def test_key_change_contact_and_deactivation(store: Store) -> None:
    run(store.add_acme_account(account("a1", "t1"), NOW))
    run(store.add_acme_account(account("a2", "t2"), NOW))
    assert run(store.change_acme_key("a1", "t1", "t2", "{}")) is False  # a2's key
    assert run(store.change_acme_key("a1", "tX", "t3", "{}")) is False  # not its key now
    assert run(store.change_acme_key("a1", "t1", "t3", '{"k": 1}')) is True
    run(store.set_acme_contact("a1", ["mailto:x@y.test"]))
    authzs = order_with(store, "o1", ("a.test",), "a1")
    run(store.deactivate_acme_account("a1"))
    a1 = run(store.acme_account_by_thumbprint("t3"))
    assert isinstance(a1, AcmeAccount)
    assert (a1.status, a1.contact, a1.jwk) == ("deactivated", ("mailto:x@y.test",), '{"k": 1}')
    authz = run(store.acme_authz(authzs[0].id))
    assert isinstance(authz, AcmeAuthz) and authz.status == "deactivated"


def test_orders_keep_their_authorizations_and_challenges_in_order(store: Store) -> None:
    authzs = order_with(store, "o1", ("a.test", "b.test"))
    order = run(store.acme_order("o1"))
    assert isinstance(order, AcmeOrder)
    assert order.authz_ids == tuple(a.id for a in authzs) and order.names == ("a.test", "b.test")
    authz = run(store.acme_authz(authzs[1].id))
    assert isinstance(authz, AcmeAuthz) and authz.name == "b.test"
    assert [c.type for c in authz.challenges] == ["http-01", "tls-alpn-01"]
    assert run(store.acme_order("nope")) is None and run(store.acme_authz("nope")) is None


def test_the_order_is_ready_once_every_authorization_is_valid(store: Store) -> None:
    authzs = order_with(store, "o1", ("a.test", "b.test"))
    first, second = (a.challenges[0].id for a in authzs)
    assert run(store.start_acme_challenge(first, NOW, EARLIER)) is True
    assert run(store.start_acme_challenge(first, NOW, EARLIER)) is False  # once
    run(store.finish_acme_challenge(first, True, None, NOW))
    order = run(store.acme_order("o1"))
    assert isinstance(order, AcmeOrder) and order.status == "pending"
    assert run(store.start_acme_challenge(second, NOW, EARLIER)) is True
    run(store.finish_acme_challenge(second, True, None, NOW))
    order = run(store.acme_order("o1"))
    assert isinstance(order, AcmeOrder) and order.status == "ready"
    ch = run(store.acme_challenge(first))
    assert isinstance(ch, AcmeChallenge) and ch.status == "valid" and ch.validated
    # an authorization that is valid takes no more validations
    assert run(store.start_acme_challenge(authzs[0].challenges[1].id, NOW, EARLIER)) is False


def test_a_validation_whose_worker_went_away_starts_again(store: Store) -> None:
    authzs = order_with(store, "o1", ("a.test",))
    ch = authzs[0].challenges[0].id
    assert run(store.start_acme_challenge(ch, NOW, EARLIER)) is True
    later = NOW + dt.timedelta(seconds=10)
    # under way since NOW: not stale for a caller who counts from before NOW
    assert run(store.start_acme_challenge(ch, later, EARLIER)) is False
    assert run(store.start_acme_challenge(ch, later, NOW + dt.timedelta(seconds=1))) is True
    again = run(store.acme_challenge(ch))
    assert isinstance(again, AcmeChallenge) and again.started == later.isoformat()


def test_one_failed_challenge_makes_the_order_invalid(store: Store) -> None:
    authzs = order_with(store, "o1", ("a.test", "b.test"))
    ch = authzs[0].challenges[0].id
    run(store.start_acme_challenge(ch, NOW, EARLIER))
    run(store.finish_acme_challenge(ch, False, '{"type": "x"}', NOW))
    order = run(store.acme_order("o1"))
    assert isinstance(order, AcmeOrder) and order.status == "invalid"
    assert order.error == '{"type": "x"}'
    authz = run(store.acme_authz(authzs[0].id))
    assert isinstance(authz, AcmeAuthz) and authz.status == "invalid"


def test_orders_that_never_became_valid_are_deleted_once_expired(store: Store) -> None:
    """A security trial: an account's unvalidated orders were kept for good, and filled
    the inventory. Those expired before the cut-off go, with their authorizations and
    challenges, a batch at a time; one being finalized stays; an account's pending
    authorizations are counted while they live."""
    waiting = order_with(store, "pending", ("a.test", "b.test"))
    failed = order_with(store, "failed", ("c.test",))
    run(store.start_acme_challenge(failed[0].challenges[0].id, NOW, EARLIER))
    run(store.finish_acme_challenge(failed[0].challenges[0].id, False, '{"type": "x"}', NOW))
    busy = order_with(store, "busy", ("d.test",))
    run(store.start_acme_challenge(busy[0].challenges[0].id, NOW, EARLIER))
    run(store.finish_acme_challenge(busy[0].challenges[0].id, True, None, NOW))
    assert run(store.begin_acme_finalize("busy")) is True
    assert run(store.acme_pending_authzs("acc", NOW.isoformat())) == 2  # a.test, b.test
    assert run(store.deactivate_acme_authz(waiting[0].id)) is True
    assert run(store.acme_pending_authzs("acc", NOW.isoformat())) == 2  # its row stays
    assert run(store.acme_pending_authzs("acc", LATER)) == 0  # expired: they wait no more
    assert run(store.purge_acme_orders(LATER)) == 0  # not expired before it
    after = (NOW + dt.timedelta(days=2)).isoformat()
    assert run(store.purge_acme_orders(after, batch=1)) == 1
    assert run(store.purge_acme_orders(after, batch=1)) == 1
    assert run(store.purge_acme_orders(after, batch=1)) == 0
    assert run(store.acme_order("pending")) is None and run(store.acme_order("failed")) is None
    assert run(store.acme_authz("pending-0")) is None
    assert run(store.acme_challenge(failed[0].challenges[0].id)) is None
    kept = run(store.acme_order("busy"))
    assert isinstance(kept, AcmeOrder) and kept.status == "processing"
    assert run(store.acme_authz(busy[0].id)) is not None


def test_finalizes_cut_short_are_ready_again(store: Store) -> None:
    """A kill while finalizing left orders `processing` for ever, and their `replaces`
    taken (fault review): a single node's start puts them back to `ready`."""
    for order_id in ("o1", "o2"):
        authzs = order_with(store, order_id, ("a.test",))
        ch = authzs[0].challenges[0].id
        run(store.start_acme_challenge(ch, NOW, EARLIER))
        run(store.finish_acme_challenge(ch, True, None, NOW))
    assert run(store.begin_acme_finalize("o1")) is True
    assert run(store.reopen_acme_finalizes()) == 1
    statuses = {o: run(store.acme_order(o)).status for o in ("o1", "o2")}  # type: ignore[union-attr]
    assert statuses == {"o1": "ready", "o2": "ready"}
    assert run(store.begin_acme_finalize("o1")) is True  # its client finalizes again
    assert run(store.reopen_acme_finalizes()) == 1


def test_one_finalizer_and_a_released_certificate_make_the_order_valid(store: Store) -> None:
    """The certificate's row names it while the order stays `processing`; the order is
    valid, offering it, only once it was released (a review: a client polling beside
    its finalize could fetch a certificate whose outcome line was not yet durable)."""
    authzs = order_with(store, "o1", ("a.test",))
    ch = authzs[0].challenges[0].id
    run(store.start_acme_challenge(ch, NOW, EARLIER))
    run(store.finish_acme_challenge(ch, True, None, NOW))
    assert run(store.begin_acme_finalize("o1")) is True
    assert run(store.begin_acme_finalize("o1")) is False
    run(store.fail_acme_finalize("o1", "ready", None))  # nothing issued: ready again
    assert run(store.begin_acme_finalize("o1")) is True

    def issue(serial: int, log: str | None = None) -> None:
        store.add_cert(NewCert(
            serial=serial, fingerprint=f"{serial:064x}", role="service", subject="",
            names=("a.test",), principals=(), spki_sha256="e" * 64,
            not_before=NOW.isoformat(), not_after=LATER, issued_at=NOW.isoformat(),
            der=b"DER", issuer="issuing-ca", acme_account="acc", acme_order="o1",
            audit_log=log)).result(timeout=10)

    def state() -> tuple[str, str | None]:
        order = run(store.acme_order("o1"))
        assert isinstance(order, AcmeOrder)
        return order.status, order.cert_serial

    issue(0xabc)
    assert state() == ("processing", "abc")
    run(store.release_acme_order("o1"))
    assert state() == ("valid", "abc")
    cert = run(store.acme_cert(0xabc))
    assert cert is not None and (cert.account_id, cert.order_id, bytes(cert.der)) == (
        "acc", "o1", b"DER")
    assert run(store.acme_cert(0xabd)) is None
    # Signed and never released (revoked at a start): the order is ready again, without it
    assert run(store.reopen_acme_order_of(0xabc)) == "o1"
    assert state() == ("ready", None)
    assert run(store.reopen_acme_order_of(0xabc)) is None
    assert run(store.begin_acme_finalize("o1")) is True  # its client finalizes anew
    issue(0xabd)  # ... and this one is never released either: reopened from processing
    assert run(store.reopen_acme_order_of(0xabd)) == "o1"
    assert state() == ("ready", None)
    # A stop between the release and the order's update: the start completes the
    # orders of its own log's certificates, and leaves another node's.
    assert run(store.begin_acme_finalize("o1")) is True
    issue(0xabe, "node-b")
    assert run(store.reopen_acme_finalizes()) == 0  # it has a certificate: not reopened
    assert run(store.complete_acme_finalizes("node-a")) == 0
    assert state() == ("processing", "abe")
    assert run(store.complete_acme_finalizes("node-b")) == 1
    assert state() == ("valid", "abe")


def test_a_deactivated_authorization_ends_its_order(store: Store) -> None:
    authzs = order_with(store, "o1", ("a.test", "b.test"))
    assert run(store.deactivate_acme_authz(authzs[0].id)) is True
    assert run(store.deactivate_acme_authz(authzs[0].id)) is False
    order = run(store.acme_order("o1"))
    assert isinstance(order, AcmeOrder) and order.status == "invalid"
    assert run(store.start_acme_challenge(authzs[0].challenges[0].id, NOW, EARLIER)) is False


def test_a_nonce_is_used_once(store: Store) -> None:
    assert run(store.redeem_acme_nonce("n1", NOW + dt.timedelta(minutes=30), NOW)) is True
    assert run(store.redeem_acme_nonce("n1", NOW + dt.timedelta(minutes=30), NOW)) is False


def test_rate_counts_per_key_within_the_window(store: Store) -> None:
    since = NOW - dt.timedelta(hours=1)
    keys = ["account:a", "ip:1"]
    assert run(store.acme_rate_take("k", keys, NOW, since, 2)) is None
    assert run(store.acme_rate_take("k", keys, NOW, since, 2)) is None
    assert run(store.acme_rate_take("k", keys, NOW, since, 2)) == "account:a"
    assert run(store.acme_rate_over("k", ["ip:1"], since, 2)) == "ip:1"
    assert run(store.acme_rate_over("k", ["ip:2"], since, 2)) is None
    assert run(store.acme_rate_over("k", keys, NOW + dt.timedelta(seconds=1), 1)) is None
    assert run(store.acme_rate_take("other", ["ip:1"], NOW, since, None)) is None


def test_a_shared_secret_is_made_once(store: Store) -> None:
    first = run(store.acme_secret("nonce-mac", b"a" * 32))
    assert first == b"a" * 32 and run(store.acme_secret("nonce-mac", b"b" * 32)) == first


def test_an_accounts_order_list_leaves_out_invalid_and_expired_orders(store: Store) -> None:
    order_with(store, "live", ("a.test",))
    failed = order_with(store, "failed", ("b.test",))
    order_with(store, "elsewhere", ("c.test",), account_id="other")
    run(store.start_acme_challenge(failed[0].challenges[0].id, NOW, EARLIER))
    run(store.finish_acme_challenge(failed[0].challenges[0].id, False, "{}", NOW))
    assert run(store.acme_order_ids("acc", NOW.isoformat(), 10)) == ["live"]
    # Past its expiry a pending order is invalid too, and drops out.
    assert run(store.acme_order_ids("acc", LATER, 10)) == []
    assert run(store.acme_order_ids("other", NOW.isoformat(), 10)) == ["elsewhere"]


def test_orders_inserted_at_once_stay_within_the_pending_bound(store: Store) -> None:
    """The bound on an account's names waiting for validation was counted before the
    order was inserted, so orders sent at once each passed a count that none of the
    others had reached yet. Counted where the order is inserted, six orders of two names
    at once against a bound of five: two are inserted, four refused with what waits."""
    assert run(store.add_acme_account(account("acc", "t1"), NOW)) is True

    async def at_once() -> list[object]:
        return await asyncio.gather(*(
            store.add_acme_order(AcmeOrder(f"o{i}", "acc", "pending", ("a.test", "b.test"),
                                           LATER, NOW.isoformat()),
                                 authzs_for(f"o{i}", ("a.test", "b.test")), pending_cap=5)
            for i in range(6)), return_exceptions=True)

    results = run(at_once())
    assert isinstance(results, list)
    assert results.count(True) == 2, results
    refused = [r for r in results if isinstance(r, TooManyPending)]
    assert len(refused) == 4 and {r.waiting for r in refused} == {4}, results
    assert run(store.acme_pending_authzs("acc", NOW.isoformat())) == 4
    assert run(store.add_acme_order(AcmeOrder("o9", "acc", "pending", ("c.test",), LATER,
                                              NOW.isoformat()),
                                    authzs_for("o9", ("c.test",)), pending_cap=5)) is True


def test_an_account_is_authorized_for_names_its_valid_authorizations_cover(
        store: Store) -> None:
    """What lets another account revoke a certificate (RFC 8555 7.6): a valid,
    unexpired authorization for each name, a wildcard name's being a wildcard one."""
    plain = authzs_for("o1", ("a.test",))
    wild = [dataclasses.replace(a, wildcard=True) for a in authzs_for("o2", ("b.test",))]
    for order_id, authzs in (("o1", plain), ("o2", wild)):
        run(store.add_acme_order(AcmeOrder(order_id, "acc", "pending", tuple(
            a.name for a in authzs), LATER, NOW.isoformat()), authzs))
    now = NOW.isoformat()
    assert run(store.acme_authorized("acc", ["a.test"], now)) is False  # pending yet
    for authz in (*plain, *wild):
        run(store.start_acme_challenge(authz.challenges[0].id, NOW, EARLIER))
        run(store.finish_acme_challenge(authz.challenges[0].id, True, None, NOW))
    assert run(store.acme_authorized("acc", ["a.test", "*.b.test"], now)) is True
    assert run(store.acme_authorized("acc", ["a.test", "b.test"], now)) is False
    assert run(store.acme_authorized("other", ["a.test"], now)) is False
    assert run(store.acme_authorized("acc", ["a.test"], LATER)) is False  # expired
    assert run(store.acme_authorized("acc", [], now)) is False

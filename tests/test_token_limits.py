"""The failed-token limiter's bounds (a security trial): an IPv6 client is counted by
its /64, which one host is given whole, and a flood of other addresses no longer frees
the clients being held back."""

from __future__ import annotations

from ca.daemon.ratelimit import FailureLimiter, client_key


def test_ipv6_clients_are_counted_by_their_64() -> None:
    assert client_key("2001:db8:1:2::a") == client_key("2001:db8:1:2:ffff::1") == \
        "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::a") != client_key("2001:db8:1:2::a")
    assert client_key("::ffff:10.9.9.9") == client_key("10.9.9.9") == "10.9.9.9"
    assert client_key("fe80::1%eth0") == "fe80::/64"
    assert client_key("-") == "-"  # a request whose peer is unknown


def test_a_flood_of_addresses_does_not_free_a_client_held_back() -> None:
    """At its bound the table drops the oldest windows, not every one: before, 10,000
    addresses cleared it, and a client held back could guess again at once."""
    held = FailureLimiter(max_failures=3, window_s=60, max_clients=100)
    for n in range(50):
        held.failed(f"10.1.0.{n}")
    for _ in range(3):
        held.failed("10.0.0.1")
    assert held.retry_after("10.0.0.1") > 0
    for n in range(60):  # 10 more than the table holds
        held.failed(f"10.3.0.{n}")
    assert held.retry_after("10.0.0.1") > 0  # newer than the 10 dropped: still held back
    assert held.retry_after("10.1.0.0") == 0 and held.retry_after("10.3.0.59") == 0


def test_the_limiter_holds_back_the_whole_64() -> None:
    held = FailureLimiter(max_failures=3, window_s=60, max_clients=100)
    for n in range(3):  # three addresses of one host's /64
        held.failed(f"2001:db8:1:2::{n + 1}")
    assert held.retry_after("2001:db8:1:2::99") > 0
    assert held.retry_after("2001:db8:1:3::1") == 0

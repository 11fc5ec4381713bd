"""One ACME client cannot crowd out the others.

An account that asks for many validations against a host that accepts connections
and never answers used to fill every validation slot of a worker, and every other
account's validation waited behind all of them (190 s in a resource review, for a
validation that fails in a millisecond). Now each account has a lane of its own.
And where accounts need no binding, one address cannot make them without end.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from tests.acme_kit import Client, start_acme_ca

ATTACKER = tuple(f"slow{i}.test" for i in range(12))


class Tarpit:
    """Accepts connections on `port` and never answers (until closed)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", port))
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def crowded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, Tarpit]]:
    # One worker, so both accounts meet at the same slots; two slots. The victim's
    # whole flow must be over while the attacker's validations still wait: 5 s each,
    # and 15 s before a waiting one gives up, leave a loaded machine room.
    ca = start_acme_ca(tmp_path_factory.mktemp("crowded"), (*ATTACKER, "victim.test"),
                       workers=1, **{"max-validations": 2, "validation-timeout-s": 5,
                                     "eab-required": False, "accounts-per-hour": 3})
    tarpit = Tarpit(ca.http_port)
    yield ca, tarpit
    tarpit.close()
    assert ca.daemon.stop() == 0


def test_an_account_flooding_a_tarpit_does_not_delay_another_accounts_validation(
        crowded: tuple[object, Tarpit]) -> None:
    ca, _ = crowded
    attacker = Client(ca)  # type: ignore[arg-type]
    assert attacker.register(ca.eab("*.test")).status == 201  # type: ignore[attr-defined]
    order = attacker.order(*ATTACKER)
    for ch in attacker.answer(order, "http-01"):
        assert attacker.post(ch["url"], {}).status == 200
    victim = Client(ca)  # type: ignore[arg-type]
    assert victim.register(ca.eab("victim.test")).status == 201  # type: ignore[attr-defined]
    mine = victim.order("victim.test")
    # Nothing listens on the tls-alpn-01 port: the victim's validation fails at once,
    # once it runs; when it has, the attacker's are still waiting their turn.
    ch = victim.answer(mine, "tls-alpn-01")[0]
    assert victim.post(ch["url"], {}).status == 200
    authz = victim.wait_authz(mine.json["authorizations"][0])
    assert authz["status"] == "invalid"
    failed = next(c for c in authz["challenges"] if c["type"] == "tls-alpn-01")
    assert failed["error"]["type"].endswith(":connection"), failed
    waiting = [attacker.post(url).json["status"] for url in order.json["authorizations"]]
    assert waiting.count("pending") >= len(ATTACKER) // 2, waiting


def test_without_bindings_one_address_makes_so_many_accounts_an_hour(
        crowded: tuple[object, Tarpit]) -> None:
    ca, _ = crowded
    for _ in range(3):
        assert Client(ca).register(None).status == 201  # type: ignore[arg-type]
    again = Client(ca).register(None)  # type: ignore[arg-type]
    assert again.status == 429 and again.problem == "rateLimited", again.body
    assert "3 per hour" in again.json["detail"] and again.headers["Retry-After"]
    # An account the operator bound is theirs to hand out: not counted.
    bound = Client(ca)  # type: ignore[arg-type]
    assert bound.register(ca.eab("x.test")).status == 201  # type: ignore[attr-defined]


def test_with_bindings_optional_a_bound_account_is_not_held_by_its_addresss_failures(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """With eab-required = false, failed validations count per client address too, for
    the accounts anyone may open; an ACME trial's account bound to an EAB key (one the
    operator handed out, as a fleet behind one NAT has) was refused for failures of
    other accounts at its address."""
    ca = start_acme_ca(tmp_path_factory.mktemp("mixed"), ("a.test", "b.test", "c.test"),
                       **{"eab-required": False, "failed-validations-per-hour": 2})
    try:
        def ready(client: Client, name: str) -> int:
            """The client says it is ready for tls-alpn-01 on `name` (nothing listens
            there, so it fails at once): the status of that request."""
            order = client.order(name)
            authz = client.post(order.json["authorizations"][0]).json
            ch = next(c for c in authz["challenges"] if c["type"] == "tls-alpn-01")
            status = client.post(ch["url"], {}).status
            if status == 200:
                assert client.wait_authz(order.json["authorizations"][0])["status"] == \
                    "invalid"
            return status

        bound = Client(ca)
        assert bound.register(ca.eab("*.test")).status == 201
        # its failures are its own, and count for nobody else at its address (a review)
        assert [ready(bound, "c.test") for _ in range(3)] == [200, 200, 429]
        anyone = Client(ca)
        assert anyone.register(None).status == 201
        assert [ready(anyone, "a.test") for _ in range(3)] == [200, 200, 429]
        other = Client(ca)  # another account anyone may open, at the same address
        assert other.register(None).status == 201
        assert ready(other, "b.test") == 429
        again = Client(ca)  # and another bound one: its own count only
        assert again.register(ca.eab("*.test")).status == 201
        assert ready(again, "c.test") == 200
    finally:
        assert ca.daemon.stop() == 0

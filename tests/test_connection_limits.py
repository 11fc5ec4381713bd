"""One client holding many connections: it keeps only a bounded number, its others are
reset at once, and everyone else is still served.

Without these bounds one address could hold every connection a worker can accept.
Once the worker ran out of descriptors, asyncio logged an error with a traceback for
each connection still waiting, 8,000 lines a second. It also took the descriptors the
HSM session needs: SoftHSM opens the key's file at every signature.

The connections here are plain TCP connections that never start TLS: the cheapest a
client can hold.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import datetime as dt
import gc
import http.client
import select
import socket
import ssl
import time
from pathlib import Path

from ca.listener import Listener, Places, listening_sockets
from ca.server.app import tls_context
from tests.conftest import Daemon, init_ca, set_config, start_daemon
from tests.helpers import enroll, log_lines, metric_samples, other_ca
from tests.ports import free_port
from tests.test_operator_logs import events

BOUND_S = 60.0  # generous: each wait ends at the event it waits for, long before


def _address(d: Daemon) -> tuple[str, int]:
    host, port = d.url.removeprefix("https://").rstrip("/").rsplit(":", 1)
    return host, int(port)


def _get(d: Daemon, path: str, source: str) -> tuple[int, bytes]:
    """GET `path` as the admin, from the loopback address `source`."""
    host, port = _address(d)
    conn = http.client.HTTPSConnection(host, port, context=d.admin_ssl(), timeout=BOUND_S,
                                       source_address=(source, 0))
    try:
        conn.request("GET", path)
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def _metrics(d: Daemon, source: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = _get(d, "/metrics", source)
    assert status == 200, body
    return metric_samples(body.decode())


def _refused(d: Daemon, source: str) -> dict[str, float]:
    """hsmca_connections_refused_total by reason, read from `source`."""
    return {dict(labels)["reason"]: v for (name, labels), v in _metrics(d, source).items()
            if name == "hsmca_connections_refused_total"}


def _open(d: Daemon, source: str) -> float:
    """hsmca_connections_open: the connections the workers hold, this look's included."""
    return _metrics(d, source)["hsmca_connections_open", ()]


def _until_let_go(d: Daemon) -> None:
    """Until the workers hold no connection but the look's own (and perhaps the last
    look's, closed by the client but not yet seen by the worker that held it)."""
    deadline = time.monotonic() + BOUND_S
    held = float("inf")
    while held > 2 and time.monotonic() < deadline:
        try:  # each look is a request's round trip: it paces the wait
            held = _open(d, "127.0.0.2")
        except (ConnectionResetError, ssl.SSLError):
            # The look itself was reset: the worker that took it still had no place
            # left, the flood's connections not yet seen closed (a fresh-clone run).
            continue
    assert held <= 2, held


class Flood:
    """`count` connections from 127.0.0.1; `early` of them reset before connect()
    returned (the daemon accepts and resets them that fast)."""

    def __init__(self, d: Daemon, count: int, to: tuple[str, int] | None = None) -> None:
        self.socks: list[socket.socket] = []
        self.early = 0
        for _ in range(count):
            try:
                self.socks.append(socket.create_connection(to or _address(d),
                                                           timeout=BOUND_S))
            except ConnectionResetError:
                self.early += 1

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


def _reset(flood: Flood, at_least: int) -> int:
    """How many of the flood's connections the daemon reset, waiting on their events
    until `at_least` have been. A connection the daemon keeps sends nothing: it waits
    for a TLS hello, up to request-timeout-s (set far above this test's length), and
    would then be closed, not reset."""
    socks = flood.socks
    closed: set[socket.socket] = set()
    at_least -= flood.early
    deadline = time.monotonic() + BOUND_S
    while len(closed) < at_least and time.monotonic() < deadline:
        ready, _, _ = select.select([s for s in socks if s not in closed], [], [],
                                    max(0.0, deadline - time.monotonic()))
        for sock in ready:
            try:
                assert sock.recv(1) == b"", "the daemon sent bytes before a TLS hello"
            except ConnectionResetError:
                closed.add(sock)
            else:
                raise AssertionError("a flood connection was closed, not reset")
    return flood.early + len(closed)


def _refusal_lines(d: Daemon, reason: str) -> list[dict[str, object]]:
    return [e for e in events(d, "refused a connection") if e.get("reason") == reason]


def test_one_address_holds_a_bounded_number_of_connections_and_others_are_served(
        tmp_path: Path) -> None:
    ca = init_ca(tmp_path)
    set_config(ca.state, "server", "max-connections-per-address", 8)
    set_config(ca.state, "server", "request-timeout-s", 300)  # kept ones stay kept
    d = start_daemon(ca.state, "--workers", "2")
    flood: Flood | None = None
    try:
        flood = Flood(d, 60)
        # Two workers keep at most 8 each; the other 44 or more are reset at once.
        assert _reset(flood, 44) >= 44
        refused = _refused(d, "127.0.0.2")
        assert refused["per-address"] >= 44 and refused["capacity"] == 0, refused
        # Said once per worker, not once per connection, naming the client and the setting.
        said = _refusal_lines(d, "per-address")
        assert 1 <= len(said) <= 2, said
        assert said[0]["client"] == "127.0.0.1"
        assert "max-connections-per-address" in str(said[0]["why"])
        # Another address is served while the flood holds its places; the flooding
        # address is not (each worker holds 8 of its 60 connections already).
        assert _get(d, "/v1/whoami", "127.0.0.3")[0] == 200
        try:
            status: object = _get(d, "/health", "127.0.0.1")[0]
        except (ConnectionResetError, ssl.SSLError) as exc:
            status = exc
        assert isinstance(status, (ConnectionResetError, ssl.SSLError)), status
        # Once it lets go, its places are given back.
        flood.close()
        _until_let_go(d)
        enroll(d, tmp_path, "service", ["svc.limits.example"])
    finally:
        if flood is not None:
            flood.close()
        assert d.stop() == 0
    assert not [line for line in d.stderr if "Traceback" in line]


def test_a_worker_out_of_places_resets_connections_and_says_so_once(tmp_path: Path) -> None:
    """With no bound per address, a flood fills what a worker's descriptors allow (300
    here, less 128 kept for the HSM, the inventory and the log: 172 connections). Each
    connection beyond is reset at once, and the log says so once per worker. It used to
    be a traceback per waiting connection, thousands a second, for as long as the flood
    lasted. Once the flood goes, the daemon serves and signs again."""
    ca = init_ca(tmp_path)
    set_config(ca.state, "server", "max-connections-per-address", 0)
    set_config(ca.state, "server", "request-timeout-s", 300)  # kept ones stay kept
    d = start_daemon(ca.state, "--workers", "2", wrapper=("prlimit", "--nofile=300:300"))
    flood: Flood | None = None
    try:
        flood = Flood(d, 600)
        assert _reset(flood, 600 - 2 * 172) >= 600 - 2 * 172
        said = _refusal_lines(d, "capacity")
        assert 1 <= len(said) <= 2, said
        assert "LimitNOFILE" in str(said[0]["why"])
        flood.close()
        _until_let_go(d)
        assert _refused(d, "127.0.0.2")["capacity"] >= 600 - 2 * 172
        enroll(d, tmp_path, "service", ["svc.places.example"])
    finally:
        if flood is not None:
            flood.close()
        assert d.stop() == 0
    assert not [line for line in d.stderr if "Traceback" in line
                or "out of system resource" in line]


def test_the_plain_http_port_shares_the_places_of_the_https_one(tmp_path: Path) -> None:
    """A review: each port counted its own connections, so a client that filled the
    plain-HTTP port (`[server] http-listen`) and then the HTTPS one took the descriptors
    kept for the HSM: signatures failed with 503 and the audit log got hsm.error lines.
    One worker, 300 descriptors: 172 places for both ports together."""
    ca = init_ca(tmp_path)
    port = free_port()
    set_config(ca.state, "server", "http-listen", f"127.0.0.1:{port}")
    set_config(ca.state, "server", "max-connections-per-address", 0)
    set_config(ca.state, "server", "request-timeout-s", 300)  # kept ones stay kept
    d = start_daemon(ca.state, "--workers", "1", wrapper=("prlimit", "--nofile=300:300"))
    floods: list[Flood] = []
    try:
        floods.append(Flood(d, 170, ("127.0.0.1", port)))
        deadline = time.monotonic() + BOUND_S
        while _open(d, "127.0.0.2") < 171:  # all taken (and the look's own)
            assert time.monotonic() < deadline
        floods.append(Flood(d, 40))  # the HTTPS port: two places left, at most
        assert _reset(floods[1], 38) >= 38
        for flood in floods:
            flood.close()
        _until_let_go(d)
        assert _refused(d, "127.0.0.2")["capacity"] >= 38
        enroll(d, tmp_path, "service", ["svc.places.example"])
    finally:
        for flood in floods:
            flood.close()
        assert d.stop() == 0
    assert not [e for e in log_lines(ca.state) if e["event"].startswith("hsm.error")]


def test_connections_that_fail_their_handshake_are_freed_when_they_close(
        tmp_path: Path) -> None:
    """A port scan (connect, close) or plain HTTP sent to the TLS port: each connection
    holds asyncio's TLS layer and its 256 KiB read buffer. A failed handshake used to
    leave them in a reference cycle (CPython gh-109534) that only the garbage collector
    frees, and the daemon runs it rarely (ca/process.py): each worker grew by 45-280 MB
    under a few thousand probes. With the collector off here, every one of them must be
    freed when its connection closes."""
    ca = other_ca(tmp_path)
    cert, key = ca.leaf(tmp_path, "listener.test", dt.datetime.now(dt.UTC) - dt.timedelta(1),
                        dt.datetime.now(dt.UTC) + dt.timedelta(1))
    context = tls_context(cert, key, ca.root_pem)

    class Unheard(asyncio.Protocol):
        """What a connection would be served by: none gets that far."""

    def tls_layers() -> int:
        return sum(isinstance(o, asyncio.sslproto.SSLProtocol) for o in gc.get_objects())

    async def probe() -> int:
        let_go = asyncio.Event()
        places = Places(on_open=lambda held: let_go.set() if held == 0 else let_go.clear())
        listener = Listener(listening_sockets("127.0.0.1", 0, 64), Unheard, context,
                            BOUND_S, places)
        port = listener.sockets[0].getsockname()[1]
        before = tls_layers()
        for hello in [b"", b"GET / HTTP/1.1\r\nHost: ca\r\n\r\n"] * 10:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(hello)
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), BOUND_S) == b"", \
                "the daemon answered bytes that are not TLS"
            writer.close()
            await asyncio.wait_for(let_go.wait(), BOUND_S)  # the listener let it go
        listener.close()
        return tls_layers() - before

    gc.disable()
    try:
        assert asyncio.run(probe()) <= 0  # (another test's may go meanwhile)
    finally:
        gc.enable()

"""Clients that take their time: a request trickled byte by byte, a body that stops
halfway, a connection that never asks, a TLS handshake never finished. Each holds
memory and a descriptor in the daemon; a few thousand of them, from anyone who can
reach the port, used to hold them for an hour. The daemon (with `request-timeout-s`
set to 2 s here) answers the first two with a 408 problem and closes all four, while
it goes on serving everyone else.

Each test waits for the daemon's answer with a generous bound (30 s, fifteen times the
setting), so it measures that the daemon closes the connection, not how fast.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Iterator

import pytest

from tests.conftest import Daemon, init_ca, set_config, start_daemon

BOUND_S = 30.0  # without the timeout, these connections stay open for an hour


@pytest.fixture(scope="module")
def patient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    ca = init_ca(tmp_path_factory.mktemp("slow"))
    set_config(ca.state, "server", "request-timeout-s", 2)
    config = ca.state / "hsmca.toml"  # ACME on: its routes read bodies their own way
    config.write_text(config.read_text() + "\n[acme]\n")
    d = start_daemon(ca.state)
    yield d
    assert d.stop() == 0
    # Slow clients are the clients' doing: nothing in the daemon's log looks like a fault.
    # (By level: a refusal's line names the problem type its client got, and ACME's
    # types read urn:ietf:params:acme:error:...)
    assert not [line for line in d.stderr if "Traceback" in line or _level(line) in (
        "error", "critical", "warning")]


def _level(line: str) -> str | None:
    import json
    try:
        return json.loads(line).get("level")
    except ValueError:
        return "unparsed"


def _address(d: Daemon) -> tuple[str, int]:
    host, port = d.url.removeprefix("https://").rstrip("/").rsplit(":", 1)
    return host, int(port)


def _tls(d: Daemon) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(d.root))
    ctx.check_hostname = False
    sock = ctx.wrap_socket(socket.create_connection(_address(d), timeout=BOUND_S))
    sock.settimeout(BOUND_S)
    return sock


def _until_closed(sock: socket.socket) -> bytes:
    """Everything the daemon sends until it closes the connection (a timeout here is
    the failure: the daemon kept the connection)."""
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except (ssl.SSLEOFError, ConnectionResetError):
        pass
    return got


def _problem(answer: bytes) -> tuple[str, dict[str, object]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert any(x.lower().startswith("content-type: application/problem+json")
               for x in lines), lines
    return lines[0], json.loads(body)


def _health(d: Daemon) -> str:
    with _tls(d) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        return _until_closed(sock).split(b"\r\n", 1)[0].decode()


def test_a_trickled_request_head_gets_a_408_and_the_connection_closes(patient: Daemon) -> None:
    with _tls(patient) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        sock.sendall(b"Host: local")  # and nothing more, as a slow-loris client
        # Meanwhile others are served.
        assert _health(patient) == "HTTP/1.1 200 OK"
        status, body = _problem(_until_closed(sock))
    assert status == "HTTP/1.1 408 Request Timeout"
    assert body["status"] == 408
    assert "head did not arrive within 2 s" in str(body["detail"])


@pytest.mark.parametrize("path", ["/v1/x509/ocsp", "/acme/new-account"])
def test_a_body_that_stops_halfway_gets_a_408_and_the_connection_closes(
        patient: Daemon, path: str) -> None:
    with _tls(patient) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: localhost\r\n".encode()
                     + b"Content-Type: application/octet-stream\r\nContent-Length: 100\r\n"
                     b"\r\n0123456789")
        status, body = _problem(_until_closed(sock))
    assert status == "HTTP/1.1 408 Request Timeout"
    assert "body did not arrive within 2 s" in str(body["detail"])
    assert _health(patient) == "HTTP/1.1 200 OK"


def test_a_kept_alive_connection_is_bounded_for_its_next_request_too(patient: Daemon) -> None:
    with _tls(patient) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        first = sock.recv(65536)
        while b"\r\n\r\n" not in first:
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 OK"), first
        head, _, body = first.partition(b"\r\n\r\n")
        length = int(next(x.split(b":")[1] for x in head.split(b"\r\n")
                          if x.lower().startswith(b"content-length:")))
        while len(body) < length:
            body += sock.recv(65536)
        sock.sendall(b"GET /health HT")  # the next request, trickled
        status, body = _problem(_until_closed(sock))
    assert status == "HTTP/1.1 408 Request Timeout"


def test_a_connection_that_never_asks_is_closed(patient: Daemon) -> None:
    with _tls(patient) as sock:
        assert _until_closed(sock) == b""


def test_a_tls_handshake_never_finished_is_closed(patient: Daemon) -> None:
    with socket.create_connection(_address(patient), timeout=BOUND_S) as sock:
        sock.sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello, and no more
        assert _until_closed(sock) == b""



@pytest.mark.parametrize("path", ["/v1/x509/ocsp", "/acme/new-account"])
def test_a_client_that_leaves_halfway_through_its_body_is_no_fault(patient: Daemon,
                                                                   path: str) -> None:
    before = sum("closed the connection before" in line for line in patient.stderr)
    with _tls(patient) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: localhost\r\n".encode()
                     + b"Content-Type: application/octet-stream\r\nContent-Length: 100\r\n"
                     b"\r\n0123456789")
    # The daemon notes it (the module's end checks that nothing looks like a fault).
    assert patient.wait_stderr(lambda: sum(
        "closed the connection before its request arrived whole" in line
        for line in patient.stderr) > before, within=BOUND_S), "".join(patient.stderr[-20:])
    assert _health(patient) == "HTTP/1.1 200 OK"

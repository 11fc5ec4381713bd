"""A graceful stop of hsmca's HTTPS servers (ca/http_server.py), as a client sees it.

A worker stops in this order: its runner's cleanup (stop listening; the requests under
way are answered), then the parts those requests use (inventory, HSM thread, link to
the audit log) close. aiohttp's cleanup waits only for the connections it knows of,
those whose TLS handshake is done: one accepted just before the listener closed, its
handshake still under way, used to be served after the cleanup, by closed parts,
and its client got a 500 (or a 503) from a daemon that was stopping cleanly. Such a
connection is now closed unanswered, as one still in the listen backlog is.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import sqlite3
import ssl
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ca.http_server import app_runner, tcp_site

pytestmark = pytest.mark.asyncio(loop_scope="session")
BOUND_S = 30.0  # a bound on a server that never closes the connection, not a pace


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def _served(app: web.Application, tmp: Path, grace: float
                  ) -> tuple[web.AppRunner, str, int, Path]:
    """`app` served over TLS on 127.0.0.1 as a worker serves (ca/http_server.py), with
    `grace` seconds for a stop: its runner, host, port and certificate."""
    cert, key = _self_signed(tmp)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    runner = app_runner(app, shutdown_timeout=grace)
    await runner.setup()
    await tcp_site(runner, "127.0.0.1", 0, ssl_context=server_ctx).start()
    host, port = runner.addresses[0][:2]
    return runner, host, port, cert


def _closed_after(tls: ssl.SSLObject, incoming: ssl.MemoryBIO, data: bytes,
                  answer: bytearray) -> bool:
    """Take `data` from the server into `answer`; whether the server has closed the
    connection (TLS close_notify, or TCP)."""
    if not data:
        return True
    incoming.write(data)
    while True:
        try:
            chunk = tls.read(65536)
        except ssl.SSLWantReadError:
            return False
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return True
        if not chunk:  # close_notify
            return True
        answer += chunk


async def test_a_tls_handshake_finished_after_the_stop_gets_no_error_answer(
        tmp_path: Path) -> None:
    # A server like a worker: its handlers read a database that closes with it.
    db = sqlite3.connect(":memory:")

    async def handler(_request: web.Request) -> web.Response:
        return web.Response(text=str(db.execute("SELECT 1").fetchone()))

    async def close_db(_app: web.Application) -> None:
        db.close()

    app = web.Application()
    app.router.add_get("/", handler)
    app.on_cleanup.append(close_db)
    runner, host, port, cert = await _served(app, tmp_path, 5.0)

    loop = asyncio.get_running_loop()
    client_ctx = ssl.create_default_context(cafile=str(cert))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    sock = socket.socket()
    sock.setblocking(False)
    try:
        async with asyncio.timeout(BOUND_S):
            await loop.sock_connect(sock, (host, port))
            # The client's side of the handshake, up to its last message: the server has
            # accepted the connection and answered (its whole flight came back), and
            # waits for the client's Finished to complete its own side.
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                pass
            await loop.sock_sendall(sock, outgoing.read())
            while True:
                data = await loop.sock_recv(sock, 65536)
                assert data, "the server closed the connection during the handshake"
                incoming.write(data)
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    continue
            finished = outgoing.read()
            # The server stops meanwhile: its listener closes, its parts close.
            await runner.cleanup()
            # The handshake completes after the stop, and a request follows at once.
            tls.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            await loop.sock_sendall(sock, finished + outgoing.read())
            answer = bytearray()
            while not _closed_after(tls, incoming, await loop.sock_recv(sock, 65536), answer):
                pass
    finally:
        sock.close()
    # Closed without an answer, as if it had come a moment later: nothing was done for
    # it, and the client may ask another server. Never an error from a stopped server.
    assert not answer, bytes(answer[:300])


async def test_a_request_whose_body_arrives_during_the_stop_is_answered(
        tmp_path: Path) -> None:
    """An SRE trial sent SIGTERM while a request's body was still arriving: its last
    byte came half a second later and the client got nothing, 10 s after (aiohttp's
    stop closes the connections it knows, and stops reading them, before it waits for
    the requests under way). The body is now read to its end, the request answered,
    and the connection closed after it."""
    started = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        started.set()
        return web.Response(body=b"got " + await request.read())

    app = web.Application()
    app.router.add_post("/", handler)
    runner, host, port, cert = await _served(app, tmp_path, 5.0)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    async with asyncio.timeout(BOUND_S):
        reader, writer = await asyncio.open_connection(host, port, ssl=client_ctx,
                                                       server_hostname="localhost")
        try:
            writer.write(b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{")
            await writer.drain()
            await started.wait()  # handled, and reading its body
            server = runner.server
            stopping = asyncio.create_task(runner.cleanup())
            while not getattr(server, "stopping", False):  # the stop has begun
                await asyncio.sleep(0)
            writer.write(b"}")
            await writer.drain()
            answer = await reader.read()  # to the end: the server closes after it
            await stopping
        finally:
            writer.close()
    # (read to the end: the server closed the connection once it had answered)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == b"got {}", answer


@pytest.mark.parametrize("then", ["the client goes", "the handler answers first"])
async def test_a_stop_waits_for_no_body_that_will_not_come(tmp_path: Path, then: str) -> None:
    """A review: a stop waiting for a request's body must end once the client has gone,
    or once the handler has answered without reading it (a 403 before the body), not at
    the end of the grace period (60 s here; the bound below is half of it)."""
    started, go = asyncio.Event(), asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        started.set()
        if then == "the handler answers first":
            await go.wait()
            return web.Response(status=403)
        return web.Response(body=await request.read())

    app = web.Application()
    app.router.add_post("/", handler)
    runner, host, port, cert = await _served(app, tmp_path, 60.0)
    reader, writer = await asyncio.open_connection(
        host, port, ssl=ssl.create_default_context(cafile=str(cert)),
        server_hostname="localhost")
    try:
        writer.write(b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 9\r\n\r\n{")
        await writer.drain()
        async with asyncio.timeout(BOUND_S):
            await started.wait()
            stopping = asyncio.create_task(runner.cleanup())
            while not getattr(runner.server, "stopping", False):  # the stop has begun
                await asyncio.sleep(0)
            if then == "the client goes":
                writer.transport.abort()
            else:
                go.set()
                assert (await reader.readline()).startswith(b"HTTP/1.1 403")
            await stopping  # within the bound: nothing left to wait for
    finally:
        writer.close()

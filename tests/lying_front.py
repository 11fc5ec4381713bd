"""A daemon that lies, for the tests of those who must catch it: an HTTPS front on
127.0.0.1 that forwards GETs to a real daemon (with a client certificate of its own)
and, when told to, leaves a line out of `/v1/audit/entries` or changes one.

It stands where a compromised or broken daemon would: the bytes a page receives are
not the bytes the auditor verified.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
from pathlib import Path

import aiohttp
from aiohttp import web


class LyingFront:
    def __init__(self, upstream: str, root: Path, client: tuple[Path, Path],
                 server: tuple[Path, Path]) -> None:
        self.upstream = upstream.rstrip("/")
        self.drop: int | None = None  # leave out the line with this seq
        self.alter: int | None = None  # change a byte of the line with this seq
        self.refuse_from: int | None = None  # answer 500 to entries from this seq
        self._up = ssl.create_default_context(cafile=str(root))
        self._up.load_cert_chain(*map(str, client))
        self._down = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._down.load_cert_chain(*map(str, server))
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._started.wait(30):
            raise RuntimeError("the lying front did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._started.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._down)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"https://127.0.0.1:{port}"
        self._session = aiohttp.ClientSession()

    async def _forward(self, request: web.Request) -> web.Response:
        if request.path == "/v1/audit/entries" and self.refuse_from is not None \
                and request.query.get("start") == str(self.refuse_from):
            return web.Response(status=500, text="refused by the lying front")
        async with self._session.get(self.upstream + request.path_qs, ssl=self._up) as up:
            body = await up.read()
            status, ctype = up.status, up.headers.get("Content-Type", "")
        if request.path == "/v1/audit/entries" and status == 200:
            body = self._lie(body)
        return web.Response(status=status, body=body, headers={"Content-Type": ctype})

    def _lie(self, body: bytes) -> bytes:
        out = []
        for line in body.splitlines(keepends=True):
            seq = json.loads(line).get("seq")
            if seq == self.drop:
                continue
            if seq == self.alter:
                line = line.replace(b'"ts":"', b'"ts":"1', 1)
            out.append(line)
        return b"".join(out)

    def close(self) -> None:
        async def stop() -> None:
            await self._session.close()
            await self._runner.cleanup()
        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)

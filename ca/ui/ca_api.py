"""The daemon's API as the web view reads it: one aiohttp session, mutual TLS with the
auditor's (or admin's) certificate. Every failure is a `ca.client.ClientError` whose
message says what was asked and why it failed; the pages show that message."""

from __future__ import annotations

import base64
import binascii
import json
import ssl
from typing import Any
from urllib.parse import urlencode

import aiohttp

from ca import client
from ca.client import ClientError

PAGE = 1000  # the most lines /v1/audit/entries returns per request


class CA:
    """`log`: on a cluster, the node whose audit log the audit calls read (any node
    serves every node's log, `?log=`); None for the daemon's own, a single node's one."""

    def __init__(self, url: str, ctx: ssl.SSLContext, log: str | None = None) -> None:
        self.url, self.ctx, self.log = url.rstrip("/"), ctx, log
        self._session: aiohttp.ClientSession | None = None
        self._shared = self  # whose session this one uses (for_log's views share it)

    def for_log(self, log: str | None) -> CA:
        """The same daemon and session, reading `log`'s audit lines and proofs."""
        view = CA(self.url, self.ctx, log)
        view._shared = self._shared
        return view

    @property
    def session(self) -> aiohttp.ClientSession:
        owner = self._shared
        if owner._session is None or owner._session.closed:
            owner._session = aiohttp.ClientSession(timeout=client.TIMEOUT)
        return owner._session

    async def close(self) -> None:
        if self._shared._session is not None:
            await self._shared._session.close()

    async def get(self, path: str, **query: Any) -> bytes:
        q = {k: v for k, v in query.items() if v is not None and v != ""}
        url = self.url + path + (f"?{urlencode(q)}" if q else "")
        return await client.get_bytes(self.session, url, self.ctx)

    async def json(self, path: str, **query: Any) -> Any:
        raw = await self.get(path, **query)
        try:
            return json.loads(raw)
        except ValueError:
            raise ClientError(f"GET {path}: the daemon's answer is not JSON") from None

    async def health(self) -> dict[str, Any]:
        """/health, which answers 503 with the same body when a part is down."""
        try:
            async with self.session.get(self.url + "/health", ssl=self.ctx) as r:
                body = await r.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ClientError(f"GET /health: cannot reach the daemon "
                              f"({client.unreachable(exc)})") from None
        try:
            found = json.loads(body)
        except ValueError:
            raise ClientError(f"GET /health: {r.status}, not JSON") from None
        return found if isinstance(found, dict) else {}

    async def metrics(self) -> str:
        return (await self.get("/metrics")).decode("utf-8", "replace")

    async def entries(self, start: int, limit: int) -> list[bytes]:
        """Lines [start, start+limit) as stored (fewer at the log's end), without their
        newlines; a torn last line is dropped."""
        out: list[bytes] = []
        while limit > 0:
            n = min(PAGE, limit)
            page = await self.get("/v1/audit/entries", start=start, limit=n, log=self.log)
            lines = page.split(b"\n")[:-1]  # complete lines only
            out += lines[:n]
            if len(lines) < n:
                break
            start, limit = start + n, limit - n
        return out

    async def inclusion(self, index: int, size: int) -> list[bytes]:
        return _hashes(await self.json("/v1/audit/proof/inclusion", index=index, size=size,
                                         log=self.log),
                       "inclusion")

    async def consistency(self, old: int, size: int) -> list[bytes]:
        return _hashes(await self.json("/v1/audit/proof/consistency", old=old, size=size,
                                         log=self.log),
                       "consistency")

    async def cosigned(self) -> str | None:
        """The latest checkpoint witnesses cosigned; None before any did. A node serves
        only its own log's (whatever `log` is)."""
        try:
            return (await self.get("/v1/audit/checkpoint.cosigned")).decode("utf-8", "replace")
        except ClientError as exc:
            if exc.status == 404:
                return None
            raise

    async def post(self, path: str, body: bytes, content_type: str) -> bytes:
        try:
            async with self.session.post(self.url + path, data=body, ssl=self.ctx,
                                         headers={"Content-Type": content_type}) as r:
                data = await r.read()
                if r.status != 200:
                    raise ClientError(f"POST {path}: {r.status} {r.reason}", status=r.status)
                return data
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ClientError(f"POST {path}: cannot reach the daemon "
                              f"({client.unreachable(exc)})") from None


def _hashes(body: Any, what: str) -> list[bytes]:
    try:
        return [base64.b64decode(h, validate=True) for h in body["proof"]]
    except (KeyError, TypeError, ValueError, binascii.Error):
        raise ClientError(f"the daemon's {what} proof is malformed") from None

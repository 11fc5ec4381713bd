"""Replay nonces (RFC 8555 6.5) that every worker process accepts.

A nonce is minted without any I/O: 16 random bytes and the time, MACed with a key
all workers share (kept in the inventory). Redeeming one checks the MAC and its age
and then records it in the inventory, so it is used once whichever worker a client's
requests reach; redeemed nonces are kept only until they would have expired anyway.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import hashlib
import hmac
import os
import secrets
import struct

from ca.store import Store

LIFETIME = dt.timedelta(minutes=30)
_RAND, _TIME, _MAC = 16, 8, 16


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class Nonces:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._key: bytes | None = None
        self._lock = asyncio.Lock()

    async def key(self) -> bytes:
        if self._key is None:
            async with self._lock:
                if self._key is None:
                    self._key = await self.store.acme_secret("nonce-mac", os.urandom(32))
        return self._key

    async def new(self) -> str:
        body = secrets.token_bytes(_RAND) + struct.pack(">q", int(
            dt.datetime.now(dt.UTC).timestamp()))
        mac = hmac.new(await self.key(), body, hashlib.sha256).digest()[:_MAC]
        return _b64(body + mac)

    async def redeem(self, nonce: bytes) -> bool:
        """`nonce` as decoded from the JWS header (josepy decodes it for us)."""
        if len(nonce) != _RAND + _TIME + _MAC:
            return False
        body, mac = nonce[:-_MAC], nonce[-_MAC:]
        if not hmac.compare_digest(mac, hmac.new(await self.key(), body,
                                                 hashlib.sha256).digest()[:_MAC]):
            return False
        try:
            minted = dt.datetime.fromtimestamp(struct.unpack(">q", body[_RAND:])[0], dt.UTC)
        except (OverflowError, OSError, ValueError):
            return False
        now = dt.datetime.now(dt.UTC)
        if not now - LIFETIME <= minted <= now + dt.timedelta(minutes=1):
            return False
        return await self.store.redeem_acme_nonce(_b64(body), minted + LIFETIME, now)


def decode(text: str) -> bytes | None:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None

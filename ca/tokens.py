"""Bootstrap tokens: made for what the registration authority granted, spent once.

Only the SHA-256 of a token's secret is stored, and the audit log records the
token's id, role, names and expiry, never the secret.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass
from typing import Any, Protocol

from ca.issuance.profiles import utcnow
from ca.ra import TokenGrant
from ca.store import NewToken, Store, TokenRecord


class AuditAppend(Protocol):
    async def append(self, event: str, **fields: Any) -> int: ...


@dataclass(frozen=True)
class CreatedToken:
    secret: str  # shown once
    id: str
    expires: str


class Tokens:
    def __init__(self, store: Store, audit: AuditAppend) -> None:
        self.store, self.audit = store, audit

    async def create(self, grant: TokenGrant) -> CreatedToken:
        token_id = secrets.token_hex(8)
        secret = f"hsmca-{token_id}-{secrets.token_urlsafe(32)}"
        now = utcnow()
        expires = (now + dt.timedelta(seconds=grant.ttl_s)).isoformat()
        # The record first: a token the log cannot show (a line too long, the disk full)
        # is never stored. One recorded and then not stored is harmless: its secret was
        # never handed out.
        await self.audit.append("token.create", id=token_id, role=grant.role,
                                names=[v for _, v in grant.names],
                                principals=list(grant.principals), expires=expires,
                                actor=grant.actor)
        await self.store.add_token(NewToken(
            token_id, _digest(secret), grant.role, grant.names, grant.principals, expires,
            now.isoformat(), grant.actor))
        return CreatedToken(secret, token_id, expires)

    async def find(self, secret: str) -> TokenRecord | None:
        return await self.store.token_by_secret(_digest(secret))

    async def spend(self, token: TokenRecord) -> bool:
        """Mark a token used: True for exactly one of concurrent callers."""
        return await self.store.consume_token(token.id, utcnow())

    async def released(self, token: TokenRecord) -> None:
        """The certificate it enrolled was released: a retry of its key may have it."""
        await self.store.token_released(token.id, utcnow())

    async def give_back(self, token: TokenRecord) -> None:
        """Issuance failed before anything was issued (HSM or log unavailable): the
        token is usable again, so the service can retry once the CA recovers."""
        await self.store.release_token(token.id)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()

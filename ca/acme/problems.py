"""ACME problem documents (RFC 8555 6.7): urn:ietf:params:acme:error:* types, and the
registration authority's refusals mapped onto them at the edge."""

from __future__ import annotations

import json
from collections.abc import Iterable

from acme import messages

from ca.policy import Reason, Refused

PREFIX = messages.ERROR_PREFIX  # urn:ietf:params:acme:error:
# RFC 8555's types (as certbot's acme knows them) and RFC 9773's.
KINDS = frozenset(messages.ERROR_CODES) | {"alreadyReplaced"}


class AcmeProblem(Exception):
    """Raise from an ACME route to answer with a problem document."""

    def __init__(self, kind: str, detail: str, status: int = 400,
                 headers: dict[str, str] | None = None,
                 members: dict[str, object] | None = None) -> None:
        assert kind in KINDS, kind
        super().__init__(detail)
        self.kind, self.detail, self.status = kind, detail, status
        self.headers = headers or {}
        self.members = members or {}  # RFC 9457 extension members, e.g. `algorithms`

    def document(self) -> dict[str, object]:
        return {"type": PREFIX + self.kind, "detail": self.detail, "status": self.status,
                **self.members}

    def body(self) -> str:
        return json.dumps(self.document())


# The RA's reasons as ACME error types (and statuses, as Boulder answers them).
_FROM_REASON: dict[Reason, tuple[str, int]] = {
    Reason.MALFORMED: ("malformed", 400),
    Reason.BAD_CSR: ("badCSR", 400),
    Reason.BAD_KEY: ("badCSR", 400),
    Reason.BAD_NAME: ("rejectedIdentifier", 400),
    Reason.LIFETIME: ("malformed", 400),
    Reason.NAME_DENIED: ("rejectedIdentifier", 400),
    Reason.NAME_NOT_ALLOWED: ("rejectedIdentifier", 400),
    Reason.NAME_RESERVED: ("rejectedIdentifier", 400),
    Reason.NAME_NOT_GRANTED: ("rejectedIdentifier", 400),
    Reason.PRINCIPAL_NOT_GRANTED: ("unauthorized", 403),
    Reason.WRONG_ROLE: ("unauthorized", 403),
    # Over ACME only the CSR's key is ever barred; badPublicKey is the JWS key's (RFC 8555
    # 6.7), and certbot explained it as "The JWS was signed by..." (an ACME trial).
    Reason.REVOKED_KEY: ("badCSR", 400),
    Reason.REASON_NOT_ALLOWED: ("badRevocationReason", 400),
    Reason.NOT_FOUND: ("malformed", 404),
    Reason.CONFLICT: ("malformed", 409),
    Reason.UNSUPPORTED_IDENTIFIER: ("unsupportedIdentifier", 400),
    Reason.ORDER_NOT_READY: ("orderNotReady", 403),
    Reason.UNAUTHORIZED: ("unauthorized", 403),
    Reason.ALREADY_REVOKED: ("alreadyRevoked", 400),
}


def bad_algorithm(detail: str, algorithms: Iterable[str]) -> AcmeProblem:
    """RFC 8555 6.2: the problem MUST list the algorithms the server accepts."""
    return AcmeProblem("badSignatureAlgorithm", detail, members={"algorithms": list(algorithms)})


def _identifier(typed: str) -> dict[str, str]:
    """An identifier as it was sent ("type:value", as the RA names a subproblem's)."""
    kind, _, value = typed.partition(":")
    return {"type": kind[:20], "value": value[:255]}


def from_refusal(refused: Refused) -> AcmeProblem:
    kind, status = _FROM_REASON.get(refused.reason, ("malformed", 400))
    members: dict[str, object] = {}
    if refused.subproblems:  # RFC 8555 6.7.1: each identifier's own type and detail
        members["subproblems"] = [
            {"type": PREFIX + _FROM_REASON.get(reason, ("malformed", 400))[0],
             "detail": detail, "identifier": _identifier(name)}
            for name, reason, detail in refused.subproblems]
    return AcmeProblem(kind, refused.detail, status, members=members)

"""`record.void`: a line that says an earlier line's change did not happen.

A change is recorded before it is committed (a change the log does not show never
happened), so two requests racing for one change both write their line, and the
inventory's commit then lets one win. The loser's request gets a 4xx, and its line
would stand in the log as a change that was made: a security trial read eight
`cert.revoke` lines, three reasons, for one certificate revoked once, and five
`acme.account.create` lines for one single-use EAB key. The loser's request writes
this line after its commit lost, naming the line (`voids`, its seq) and, when only
part of it lost (a revocation of several certificates), which serials.
"""

from __future__ import annotations

from typing import Any, Protocol

EVENT = "record.void"


class _Append(Protocol):
    async def append(self, event: str, **fields: Any) -> int: ...


async def void(audit: _Append, seq: int, event: str, why: str, request_id: str | None,
               **fields: Any) -> None:
    """Say that the `event` line at `seq` changed nothing (or, with `serials`, nothing
    for those); `why` in words an auditor reads."""
    await audit.append(EVENT, voids=seq, voided=event, why=why, request_id=request_id,
                       **fields)

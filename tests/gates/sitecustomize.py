"""Gates that hold a daemon under test at one point of a request, so that a test can
put two requests in an order chance would rarely give (tests/test_revocation_race.py).
Loaded by Python at start-up when this directory is on PYTHONPATH and HSMCA_TEST_GATES
names a directory; the daemon's decisions are unchanged, only when it takes a step.

    renew   a renewal of a certificate naming `gate-renew.*` stops before it is signed
    revoke  a revocation stops after its audit line (the lineage read), before its
            commit, while the file `hold-revoke` exists
    crl     a CRL refresh stops as it asks for its CRL number, while the file
            `hold-crl` exists
    crl-numbered  the same, just after it got its number, while `hold-crl-numbered`
            exists

At a gate the process connects to the test's Unix socket `gate.sock`, says the gate's
name on a line, and goes on when the test answers: no polling on either side.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

_GATES = os.environ.get("HSMCA_TEST_GATES")


async def _wait(gates: Path, gate: str) -> None:
    reader, writer = await asyncio.open_unix_connection(str(gates / "gate.sock"))
    try:
        writer.write(f"{gate}\n".encode())
        await writer.drain()
        await reader.readline()  # the test's release
    finally:
        writer.close()


def _install(gates: Path) -> None:
    from ca.issuance.issue import Issuance
    from ca.revocation import Revocations

    real_x509 = Issuance.x509

    async def x509(self: Any, order: Any, request_id: str | None = None) -> Any:
        if order.renewed_from and any(v.startswith("gate-renew.") for _, v in order.names):
            await _wait(gates, "renew")
        return await real_x509(self, order, request_id)

    Issuance.x509 = x509  # type: ignore[method-assign]
    real_record = Revocations._record

    async def record(self: Any, order: Any, serials: Any, request_id: Any,
                     swept: bool = False) -> Any:
        written = await real_record(self, order, serials, request_id, swept)
        if not swept and (gates / "hold-revoke").exists():
            await _wait(gates, "revoke")
        return written  # (the lines' seqs: the revocation names them)

    Revocations._record = record  # type: ignore[method-assign]
    from ca.store.postgres import PostgresStore
    from ca.store.sqlite import SQLiteStore

    for store in (PostgresStore, SQLiteStore):
        def numbered(real: Any) -> Any:
            async def next_crl_number(self: Any, *args: Any, **kw: Any) -> Any:
                if (gates / "hold-crl").exists():
                    await _wait(gates, "crl")
                taken = await real(self, *args, **kw)
                if (gates / "hold-crl-numbered").exists():
                    await _wait(gates, "crl-numbered")
                return taken
            return next_crl_number

        store.next_crl_number = numbered(store.next_crl_number)  # type: ignore[method-assign]


if _GATES:
    _install(Path(_GATES))

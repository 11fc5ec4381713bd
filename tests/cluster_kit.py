"""What the cluster tests share: a CA made by `hsmca init --store-url` on a database of
a real PostgreSQL server, nodes started as operators start them (`hsmca serve --node`
on one config and one SoftHSM token), and the audit records every node made,
read back from PostgreSQL."""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import Daemon, hsmca, new_softhsm_token, start_daemon


@dataclass
class Cluster:
    state: Path
    url: str  # the PostgreSQL database
    nodes: dict[str, Daemon] = field(default_factory=dict)

    def start(self, name: str, workers: int = 1) -> Daemon:
        self.nodes[name] = start_daemon(self.state, "--node", name, "--workers", str(workers))
        return self.nodes[name]

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()

    @property
    def admin(self) -> tuple[Path, Path]:
        return self.state / "admin" / "cert.pem", self.state / "admin" / "key.pem"


def make_cluster(tmp: Path, db_url: str) -> Cluster:
    token = new_softhsm_token("cl")
    state = tmp / "ca"
    hsmca("init", "--state-dir", state, "--module", token.module, "--token", token.label,
          "--pin-file", token.pin_file, "--dns-name", "localhost", "--store-url", db_url)
    return Cluster(state, db_url)


async def call(method: str, url: str, ctx: Any, body: Any = None
               ) -> tuple[int, str, bytes]:
    async with aiohttp.ClientSession() as s, s.request(method, url, json=body, ssl=ctx) as r:
        return r.status, r.content_type, await r.read()


def client_ctx(d: Daemon, cert: Path, key: Path) -> ssl.SSLContext:
    return d.ssl(cert, key)  # type: ignore[return-value]


def signed_records(db_url: str) -> dict[str, tuple[dict[str, Any], dict[str, Any] | None]]:
    """Every X.509 signature any node recorded, by serial: (intent, outcome or None),
    from the audit lines the nodes committed to PostgreSQL."""
    from ca.store.postgres import PostgresStore
    store = PostgresStore(db_url)
    try:
        intents: dict[str, dict[str, Any]] = {}
        outcomes: dict[str, dict[str, Any]] = {}
        for node in _nodes(store):
            seq = 0
            while page := store.audit_lines_sync(node, seq, 5000):
                seq += len(page)
                for raw in page:
                    line = json.loads(raw)
                    if line.get("event") != "hsm.sign":
                        continue
                    if line.get("phase") == "intent" and line.get("purpose") in ("x509", "tls"):
                        intents[f"{node}/{line['op_id']}"] = line
                    elif line.get("phase") == "outcome":
                        outcomes[f"{node}/{line['op_id']}"] = line
        return {i["serial"]: (i, outcomes.get(op)) for op, i in intents.items()}
    finally:
        store.close()


def _nodes(store: Any) -> list[str]:
    import asyncio
    return [name for name, _, _ in asyncio.run(store.audit_logs())]

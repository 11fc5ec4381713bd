"""Several nodes on PostgreSQL (docs/cluster.md), as operators run them: `hsmca init
--store-url` on a real PostgreSQL, three `hsmca serve --node` on one config and one
SoftHSM token, on 127.0.0.1 ephemeral ports, talked to by real clients. A token
spread over the nodes issues one certificate; a revocation through node 1 is refused
by nodes 2 and 3; every node serves every node's log and `hsmca audit verify --url`
verifies them all through one node. (Faults, kill -9 and PostgreSQL stopped:
tests/test_cluster_faults.py.)"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.cluster_kit import Cluster, call, make_cluster
from tests.conftest import HSMCA, hsmca, new_softhsm_token
from tests.helpers import Running, bootstrap_token, csr_pem, enroll

NODES = ("node-1", "node-2", "node-3")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, postgres_server: Any
            ) -> Iterator[Cluster]:
    c = make_cluster(tmp_path_factory.mktemp("cluster"), postgres_server.new_database())
    try:
        for name in NODES:
            c.start(name)
        yield c
    finally:
        c.stop()


def test_init_puts_the_ca_in_postgresql_and_each_node_keeps_its_own_files(
        cluster: Cluster, postgres_server: Any) -> None:
    db = cluster.url.rsplit("/", 1)[1]
    assert 'url = "postgresql://' in (cluster.state / "hsmca.toml").read_text()
    # What init made is in the database: the admin and TLS certificates, the keys.
    assert int(postgres_server.psql("SELECT count(*) FROM certs", db=db)) >= 2
    assert int(postgres_server.psql("SELECT count(*) FROM ca_keys", db=db)) == 5
    assert not (cluster.state / "hsmca.sqlite3").exists()
    # A second CA on the same database is refused before it makes any key.
    token = new_softhsm_token("again")
    proc = hsmca("init", "--state-dir", cluster.state.parent / "again", "--module",
                 token.module, "--token", token.label, "--pin-file", token.pin_file,
                 "--store-url", cluster.url, check=False)
    assert proc.returncode == 1 and "already holds a CA" in proc.stderr, proc.stderr
    assert not (cluster.state.parent / "again").exists()
    # A misspelt database is a mistake to fix in the URL, not an outage to wait out.
    proc = hsmca("init", "--state-dir", cluster.state.parent / "again", "--module",
                 token.module, "--token", token.label, "--pin-file", token.pin_file,
                 "--store-url", cluster.url + "-misspelt", check=False)
    assert proc.returncode == 1 and "does not exist: check the database" in proc.stderr, \
        proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for name in NODES:
        local = cluster.state / "nodes" / name
        assert (local / "audit" / "log.jsonl").stat().st_size > 0
        assert (local / "audit" / "checkpoint").read_text().split("\n")[0].endswith("/" + name)
        assert (local / "serve.url").read_text().strip() == cluster.nodes[name].url


async def test_one_token_spread_over_three_nodes_issues_one_certificate(
        cluster: Cluster) -> None:
    n1 = cluster.nodes["node-1"]
    token = await bootstrap_token(n1, "service", ["race.test"])
    csr = csr_pem(["race.test"])
    nodes = [cluster.nodes[n] for n in NODES]
    answers = await asyncio.gather(*(_enroll(nodes[i % 3], token, csr) for i in range(24)))
    statuses = [status for status, _, _ in answers]
    assert statuses.count(201) == 1, statuses
    # The others were told to retry in a second while it was signed (409), or (the same
    # CSR, so the same key) got that one certificate again once it was released, on
    # whichever node.
    assert set(statuses) <= {201, 200, 409}, statuses
    assert len({json.loads(body)["serial"] for status, _, body in answers
                if status in (200, 201)}) == 1


async def _enroll(node: Any, token: str, csr: str) -> tuple[int, str, bytes]:
    import aiohttp
    async with aiohttp.ClientSession() as s, s.post(
            f"{node.url}/v1/x509/enroll", json={"csr": csr}, ssl=node.ssl(),
            headers={"Authorization": f"Bearer {token}"}) as r:
        return r.status, r.content_type, await r.read()


async def test_a_revocation_through_node_1_is_refused_by_nodes_2_and_3(
        cluster: Cluster, tmp_path: Path) -> None:
    n1, n2, n3 = (cluster.nodes[n] for n in NODES)
    cert, key = await asyncio.to_thread(enroll, n1, tmp_path, "service", ["rev.test"])
    for node in (n2, n3):  # known and good everywhere first
        status, _, body = await call("POST", f"{node.url}/v1/x509/renew",
                                     node.ssl(cert, key), {})
        assert status in (200, 201), body
    serial = _serial(cert)
    status, _, body = await call("POST", f"{n1.url}/v1/x509/revoke", n1.admin_ssl(),
                                 {"serial": serial, "reason": "superseded"})
    assert status == 200, body
    for node in (n2, n3):
        status, ctype, body = await _until_refused(node, cert, key)
        assert status == 403 and ctype == "application/problem+json", body
        assert json.loads(body)["type"].endswith("revoked-certificate")


async def test_a_certificate_names_the_log_its_signature_is_in(cluster: Cluster,
                                                              tmp_path: Path) -> None:
    """Each node keeps a log of its own: the inventory records whose log holds a
    certificate's intent line, so any node points an auditor at it."""
    n2, n3 = cluster.nodes["node-2"], cluster.nodes["node-3"]
    cert, _ = await asyncio.to_thread(enroll, n2, tmp_path, "service", ["where.test"])
    serial = _serial(cert)
    status, _, body = await call("GET", f"{n3.url}/v1/inventory/certificates/{serial}",
                                 n3.admin_ssl())
    rec = json.loads(body)
    assert status == 200 and rec["audit_log"] == "node-2"
    status, _, line = await call("GET", f"{n3.url}/v1/audit/entries?log=node-2&start="
                                 f"{rec['audit_seq']}&limit=1", n3.admin_ssl())
    intent = json.loads(line)
    assert (intent["event"], intent["phase"], intent["serial"]) == ("hsm.sign", "intent", serial)
    # What `init --store-url` issued (the admin credential) is in its ceremony log.
    status, _, body = await call("GET", f"{n3.url}/v1/inventory/certificates/"
                                 f"{_serial(cluster.admin[0])}", n3.admin_ssl())
    assert status == 200 and json.loads(body)["audit_log"] == "init"


def test_the_web_view_verifies_every_nodes_log_through_any_node(cluster: Cluster,
                                                                tmp_path: Path) -> None:
    """`hsmca ui` on a cluster follows each node's log with a state of its own, so it
    stays green whichever node answers (a load balancer's), and a certificate's page
    proves its audit lines in the log of the node that issued it."""
    n1, n2, n3 = (cluster.nodes[n] for n in NODES)
    cert, _ = enroll(n2, tmp_path, "service", ["seen.test"])
    serial = _serial(cert)
    state = tmp_path / "auditor.state"
    # Node 2 signs the checkpoint that covers the new lines within a second or so: an
    # auditor (and the view) can prove them from then on, not before.
    written = len((cluster.state / "nodes" / "node-2" / "audit" / "log.jsonl")
                  .read_bytes().splitlines())  # its outcome line included
    deadline = time.monotonic() + 30
    while True:  # paced by each request's round trip
        _, _, note = asyncio.run(call("GET", f"{n3.url}/v1/audit/checkpoint?log=node-2",
                                      n3.admin_ssl()))
        if int(note.decode().splitlines()[1]) >= written or time.monotonic() > deadline:
            break

    def view(node: Any) -> Running:
        return Running.start("ui", "--url", node.url, "--ca", node.root, "--cert",
                             cluster.admin[0], "--key", cluster.admin[1], "--audit-key",
                             cluster.state / "audit" / "audit_key.pem", "--state", state,
                             "--listen", "127.0.0.1:0")

    ui = view(n3)
    try:
        base = ui.listening_url()
        status, page = _get(base + f"/certificates/{serial}")
        assert status == 200 and 'data-status="ok"' in page, page[:2000]
        assert "✓ the intent and outcome of this certificate" in page, page
        rec_seq = json.loads(asyncio.run(call(
            "GET", f"{n3.url}/v1/inventory/certificates/{serial}", n3.admin_ssl()))[2]
        )["audit_seq"]
        assert f'href="/audit/{rec_seq}?log=node-2"' in page
        # Its checks name the log, which the banner (another node's) does not
        assert f"line {rec_seq} of log node-2 is an hsm.sign intent" in page, page
        status, page = _get(base + "/audit?log=node-2")
        assert status == 200 and "log node-2: verified up to seq" in page
        assert "other logs: " in page and "node-1 verified" in page
        status, page = _get(base + f"/audit/{rec_seq}?log=node-2")
        assert status == 200 and "hsm.sign" in page and "In the audit log of" in page
        status, page = _get(base + "/audit?log=node-9")
        assert status == 404 and "serves no audit log named" in page and "node-1" in page
    finally:
        ui.stop()
    for name in NODES:
        assert (tmp_path / f"auditor.{name}.state").exists(), name
    # The same auditor's state through another node: still the same logs, still green.
    ui = view(n1)
    try:
        status, page = _get(ui.listening_url() + "/")
        assert status == 200 and 'data-status="ok"' in page, page[:2000]
        assert "FAILED" not in page
    finally:
        ui.stop()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=60) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _serial(cert: Path) -> str:
    from cryptography import x509
    return format(x509.load_pem_x509_certificate(cert.read_bytes()).serial_number, "x")


async def _until_refused(node: Any, cert: Path, key: Path) -> tuple[int, str, bytes]:
    """Renew until the node refuses: the revocation reaches it by NOTIFY within
    milliseconds; the deadline is a timeout for a broken notification path, not a
    measurement (docs/cluster.md gives the figure)."""
    deadline = time.monotonic() + 10
    while True:
        answer = await call("POST", f"{node.url}/v1/x509/renew", node.ssl(cert, key), {})
        if answer[0] not in (200, 201) or time.monotonic() > deadline:
            return answer


async def test_every_node_serves_every_log_and_one_node_verifies_them_all(
        cluster: Cluster, tmp_path: Path) -> None:
    n3 = cluster.nodes["node-3"]
    status, _, body = await call("GET", f"{n3.url}/v1/audit/logs", n3.ssl())
    assert status == 200
    logs = {entry["name"]: entry for entry in json.loads(body)["logs"]}
    assert set(logs) == {*NODES, "init"}  # init's own log: the key ceremony
    assert logs["node-3"]["self"] and not logs["node-2"]["self"]
    # Node 2's checkpoint and lines, served by node 3, are node 2's own, byte for byte;
    # the same checkpoint under the prefix URL tlog tooling takes (asked twice if node 2
    # signed its heartbeat checkpoint in between: a minute apart)
    for _ in range(2):
        status, _, note = await call("GET", f"{n3.url}/v1/audit/checkpoint?log=node-2",
                                     n3.ssl())
        assert status == 200 and note.decode().split("\n")[0].endswith("/node-2")
        status, _, same = await call("GET", f"{n3.url}/v1/audit/logs/node-2/checkpoint",
                                     n3.ssl())
        if status == 200 and same == note:
            break
    assert status == 200 and same == note
    size = int(note.decode().split("\n")[1])
    status, ctype, lines = await call("GET", f"{n3.url}/v1/audit/entries?log=node-2&start=0"
                                      f"&limit={size}", n3.admin_ssl())
    assert status == 200 and ctype == "application/jsonl"
    local = (cluster.state / "nodes" / "node-2" / "audit" / "log.jsonl").read_bytes()
    assert local.startswith(lines) and lines.count(b"\n") == size
    status, ctype, body = await call("GET", f"{n3.url}/v1/audit/checkpoint?log=no-such-node",
                                     n3.ssl())
    assert status == 404 and ctype == "application/problem+json"
    assert b"this CA has no log named 'no-such-node'" in body, body
    status, ctype, _ = await call("GET", f"{n3.url}/v1/audit/checkpoint?log=../x", n3.ssl())
    assert status == 400 and ctype == "application/problem+json"
    # A path and a query that name two logs are refused.
    status, ctype, body = await call(
        "GET", f"{n3.url}/v1/audit/logs/node-2/checkpoint?log=node-1", n3.ssl())
    assert status == 400 and b"name one" in body
    # Node 2's verifier key, asked of node 3, is the one node 2 gives: one audit key,
    # named after node 2's origin (a witness of node 2's log needs it). The witnesses'
    # cosignatures of node 2's log are node 2's to give, and node 3 says so.
    status, _, own = await call("GET", f"{cluster.nodes['node-2'].url}/v1/audit/key",
                                n3.ssl())
    for url in (f"{n3.url}/v1/audit/key?log=node-2", f"{n3.url}/v1/audit/logs/node-2/key"):
        status, _, body = await call("GET", url, n3.ssl())
        assert status == 200 and json.loads(body) == json.loads(own), body
    assert json.loads(own)["name"].endswith("/node-2")
    status, _, body = await call("GET", f"{n3.url}/v1/audit/checkpoint.cosigned?log=node-2",
                                 n3.ssl())
    assert status == 404 and b"kept by node node-2 only" in body, body
    # `audit show` through node 3 names the log it shows: node 3's own by default,
    # node 2's with --node, and a name that is no log is refused in one line.
    admin_cert, admin_key = cluster.admin
    show = ["audit", "show", "--url", n3.url, "--ca", n3.root, "--client-cert", admin_cert,
            "--client-key", admin_key]
    proc = await asyncio.to_thread(hsmca, *show, "--node", "node-2")
    assert proc.stderr == "hsmca: log of node node-2\n", proc.stderr
    assert len(proc.stdout.splitlines()) >= size
    proc = await asyncio.to_thread(hsmca, *show)
    assert proc.stderr == "hsmca: log of node node-3\n", proc.stderr
    proc = await asyncio.to_thread(hsmca, *show, "--node", "nope", check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "--node nope: the CA at" in proc.stderr and "has no such log" in proc.stderr
    # On the CA host, from the files: --config alone is init's log, and says so (the
    # docs review read it as a node's); --node picks a node's.
    local = ["audit", "show", "--config", cluster.state / "hsmca.toml"]
    proc = await asyncio.to_thread(hsmca, *local)
    assert "log of init's ceremonies" in proc.stderr and "node-2" in proc.stderr
    proc = await asyncio.to_thread(hsmca, *local, "--node", "node-2")
    assert proc.stderr == "" and len(proc.stdout.splitlines()) >= size
    proc = await asyncio.to_thread(hsmca, *local, "--node", "nope", check=False)
    assert proc.returncode == 1 and proc.stderr == (  # not "No such file or directory"
        f"hsmca: error: no node 'nope' keeps a log in {cluster.state / 'nodes'} "
        f"({', '.join(NODES)} here)\n"), proc.stderr
    # An auditor verifies all three logs through node 1, keeping one state per log,
    # and a second run continues from those states (consistency proofs, for node 2's
    # and 3's logs computed by node 1 from PostgreSQL).
    n1 = cluster.nodes["node-1"]
    admin_cert, admin_key = cluster.admin
    args = ["audit", "verify", "--url", n1.url, "--ca", n1.root, "--client-cert", admin_cert,
            "--client-key", admin_key, "--key", cluster.state / "audit" / "audit_key.pem",
            "--state", tmp_path / "auditor.json"]
    for _ in range(2):
        proc = await asyncio.to_thread(hsmca, *args, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        for name in (*NODES, "init"):
            assert f"log {name}: OK:" in proc.stdout
            assert (tmp_path / f"auditor.{name}.json").exists()
        # What another node's witnesses answered it, node 1 cannot say: said, not an OK
        # that looks like it was checked (a review: read as a daemon without witnesses)
        assert "log node-2: note: whether this log's witnesses refused it is not " \
            "checked: the witnesses of log 'node-2' answer node node-2 only" in \
            proc.stdout, proc.stdout
        assert "log node-1: note: whether" not in proc.stdout, proc.stdout
        await call("POST", f"{n1.url}/v1/tokens", n1.admin_ssl(),  # more lines for run 2
                   {"role": "service", "names": ["more.test"], "ttl": "5m"})
    # --origin is the CA's [audit] origin, each node's log signed as ORIGIN/NODE: checked
    # on every log (a cluster trial's wrong one was ignored, and said OK)
    import tomllib
    origin = tomllib.loads((cluster.state / "hsmca.toml").read_text())["audit"]["origin"]
    fresh = [*args[:-1], tmp_path / "fresh.json"]
    proc = await asyncio.to_thread(hsmca, *fresh, "--origin", origin, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wrong = [*args[:-1], tmp_path / "wrong.json"]
    proc = await asyncio.to_thread(hsmca, *wrong, "--origin", "other.example/log", check=False)
    assert proc.returncode == 1 and "other.example/log/node-1" in proc.stdout + proc.stderr, \
        proc.stdout + proc.stderr




def _expected_tiles(lines: list[bytes], size: int) -> dict[str, bytes]:
    """C2SP tiles and an entry bundle of a log of `size` lines (512 < size < 768), worked
    out here from the lines (RFC 6962 hashes), not by the daemon's code."""
    def leaf(line: bytes) -> bytes:
        return hashlib.sha256(b"\x00" + line).digest()

    def root(hashes: list[bytes]) -> bytes:  # of a power of two
        while len(hashes) > 1:
            hashes = [hashlib.sha256(b"\x01" + a + b).digest()
                      for a, b in zip(hashes[::2], hashes[1::2], strict=True)]
        return hashes[0]
    leaves = [leaf(line) for line in lines[:size]]
    return {"tile/0/000": b"".join(leaves[:256]), "tile/0/001": b"".join(leaves[256:512]),
            f"tile/0/002.p/{size - 512}": b"".join(leaves[512:size]),
            "tile/1/000.p/2": root(leaves[:256]) + root(leaves[256:512]),
            f"tile/entries/002.p/{size - 512}": b"".join(
                len(line).to_bytes(2, "big") + line for line in lines[512:size])}


async def _served(node: Any, paths: Any, log: str, prefix: bool = False
                  ) -> dict[str, bytes | int]:
    """Tiles of `log` as `node` serves them: by `?log=`, or under the log's prefix URL."""
    got: dict[str, bytes | int] = {}
    for path in paths:
        url = (f"{node.url}/v1/audit/logs/{log}/{path}" if prefix
               else f"{node.url}/v1/audit/{path}?log={log}")
        status, _, body = await call("GET", url, node.admin_ssl())
        got[path] = body if status == 200 else status
    return got


async def test_any_node_serves_another_nodes_tiles_and_proofs_from_the_tiles_it_copied(
        cluster: Cluster, postgres_server: Any) -> None:
    """C2SP tiles, entry bundles and proofs of node 2's log, through node 3 (?log=),
    with node 2 stopped, are those of node 2's lines. Node 2 copied its tiles to
    PostgreSQL (so node 3 reads a few rows, not the whole log); without them node 3
    works from the lines, and node 2, started again, copies them before it serves."""
    import aiohttp

    from ca.audit.merkle import MerkleTree, leaf_hash
    n2, n3 = cluster.nodes["node-2"], cluster.nodes["node-3"]
    _, _, body = await call("GET", f"{n3.url}/v1/audit/logs", n3.ssl())
    size = next(e["size"] for e in json.loads(body)["logs"] if e["name"] == "node-2")
    async with aiohttp.ClientSession() as s:  # one audit line per token: to ~560 lines
        for _ in range(560 - size):
            async with s.post(f"{n2.url}/v1/tokens", ssl=n2.admin_ssl(), json={
                    "role": "service", "names": ["tiles.test"], "ttl": "5m"}) as r:
                assert r.status == 201
    db = cluster.url.rsplit("/", 1)[1]
    heads = "SELECT bundles FROM audit_tile_heads WHERE node = 'node-2'"
    assert n2.stop() == 0  # a last checkpoint; the stop waits for the tiles' copy
    try:
        _, _, note = await call("GET", f"{n3.url}/v1/audit/checkpoint?log=node-2", n3.ssl())
        size = int(note.decode().split("\n")[1])
        assert 512 < size < 768  # two full entry bundles and a partial one
        lines = (cluster.state / "nodes" / "node-2" / "audit" / "log.jsonl"
                 ).read_bytes().split(b"\n")
        expected = _expected_tiles(lines, size)
        assert await _served(n3, expected, "node-2") == expected
        assert await _served(n3, expected, "node-2", prefix=True) == expected
        assert int(postgres_server.psql(heads, db=db)) >= size // 256  # copied
        tree = MerkleTree()
        for line in lines[:size]:
            tree.append(leaf_hash(line))
        status, _, body = await call(
            "GET", f"{n3.url}/v1/audit/proof/consistency?old=300&size={size}&log=node-2",
            n3.admin_ssl())
        assert status == 200 and json.loads(body)["proof"] == [
            base64.b64encode(h).decode() for h in tree.consistency_proof(300, size)]
        # Nothing past the checkpoint: its lines are not signed for yet.
        past = f"tile/0/002.p/{size - 511}"
        assert await _served(n3, [past], "node-2") == {past: 404}
        postgres_server.psql("DELETE FROM audit_tiles WHERE node = 'node-2'; "
                             "DELETE FROM audit_tile_heads WHERE node = 'node-2'", db=db)
        assert await _served(n3, expected, "node-2") == expected  # from the lines
    finally:
        cluster.start("node-2")
    assert int(postgres_server.psql(heads, db=db)) >= size // 256  # copied at start
    assert await _served(n3, expected, "node-2") == expected
    # Node 3 works from the tiles: with the lines of the full bundles gone from
    # PostgreSQL, it still serves the same tiles and proof (and then they come back).
    import psycopg
    with psycopg.connect(cluster.url) as conn:
        conn.execute("DELETE FROM audit_lines WHERE node = 'node-2' AND seq < 512")
        conn.commit()
        try:
            full = {p: v for p, v in expected.items() if not p.startswith("tile/entries")}
            assert await _served(n3, full, "node-2") == full
            status, _, again = await call(
                "GET", f"{n3.url}/v1/audit/proof/consistency?old=300&size={size}&log=node-2",
                n3.admin_ssl())
            assert status == 200 and again == body
        finally:
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO audit_lines (node, seq, line) VALUES "
                                "('node-2', %s, %s)", list(enumerate(lines[:512])))
            conn.commit()


def refused_start(state: Path, node: str, listen: str = "127.0.0.1:0") -> tuple[str, str]:
    """`hsmca serve --node NODE` that must refuse to start: its one error line, and its
    whole stderr."""
    import subprocess
    proc = subprocess.run([*HSMCA, "serve", "--config", str(state / "hsmca.toml"),
                           "--listen", listen, "--node", node], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and proc.stdout == ""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hsmca: error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0], proc.stderr


def test_a_node_on_a_copy_of_another_nodes_directory_is_told_whose_log_it_holds(
        cluster: Cluster) -> None:
    """A cluster trial copied node-2's directory to start another node on it, and was
    told the database went back in time: it went looking for a restore. The refusal
    now names the node whose log the directory holds."""
    import shutil
    mine = cluster.state / "nodes" / "node-9"
    shutil.copytree(cluster.state / "nodes" / "node-2", mine)
    try:
        error, stderr = refused_start(cluster.state, "node-9")
        assert "holds the audit log of node 'node-2', not node 'node-9''s" in error, error
        assert "went back in time" not in error and "Traceback" not in stderr
        # init's own log (STATE_DIR/audit), copied in as a node's
        shutil.rmtree(mine)
        shutil.copytree(cluster.state / "audit", mine / "audit")
        error, _ = refused_start(cluster.state, "node-9")
        assert "holds the CA's init log" in error, error
    finally:
        shutil.rmtree(mine)


def test_a_second_node_of_the_same_name_is_refused_in_one_line(cluster: Cluster) -> None:
    """Two nodes of one name would write one log from two places (two hosts whose
    host names are alike, say): the second is refused, and the first goes on."""
    log = cluster.state / "nodes" / "node-1" / "audit" / "log.jsonl"
    before = log.read_bytes()
    error, _ = refused_start(cluster.state, "node-1")
    assert "already running" in error
    assert log.read_bytes().startswith(before)
    status, _, _ = asyncio.run(call("GET", f"{cluster.nodes['node-1'].url}/health",
                                    cluster.nodes["node-1"].ssl()))
    assert status == 200


def test_a_node_whose_policy_differs_is_named_in_every_nodes_health_and_log(
        cluster: Cluster) -> None:
    """Each node reads [policy] from its own hsmca.toml: a `deny` reloaded on one host
    only off-boarded a service on that node alone, and no node said so (a cluster
    trial). Now the node reloaded logs which nodes differ, and every node's /health
    names them, until the nodes agree (a difference is said, not an outage: 200)."""
    from tests.conftest import start_daemon
    from tests.test_policy_e2e import set_policy
    own = cluster.state / "node-p.toml"
    own.write_bytes((cluster.state / "hsmca.toml").read_bytes())
    own.chmod(0o600)
    first = cluster.nodes["node-1"]

    def health() -> dict[str, Any]:
        status, _, raw = asyncio.run(call("GET", f"{first.url}/health", first.ssl()))
        assert status == 200, raw
        return json.loads(raw)
    assert re.fullmatch(r"the same on \d running nodes", health()["policy"])
    node = start_daemon(cluster.state, "--node", "node-p", "--config", str(own))
    try:
        seen = len(first.stderr)
        set_policy(own, "deny", '["gone.example"]')
        node.proc.send_signal(signal.SIGHUP)
        assert node.wait_stderr(lambda: any("differs from other running nodes" in x
                                            for x in node.stderr)), "".join(node.stderr)
        assert '"node-1": "deny"' in "".join(node.stderr)
        # The nodes not reloaded say it too, once
        assert first.wait_stderr(lambda: any("differs from other running nodes" in x
                                             for x in first.stderr[seen:]), 60), \
            "".join(first.stderr[seen:])
        assert '"node-p": "deny"' in "".join(first.stderr[seen:])
        said = health()["policy"]
        assert said.startswith("differs from node node-p in deny: give every node's "
                               "hsmca.toml the same [policy]"), said
        set_policy(own, "deny", "[]")  # put right, and said so at the reload
        said_before = len(node.stderr)
        node.proc.send_signal(signal.SIGHUP)
        assert node.wait_stderr(lambda: any("the same on every running node" in x
                                            for x in node.stderr[said_before:])), \
            "".join(node.stderr)
        assert health()["policy"].startswith("the same on ")
        # and so does every other node: its log no longer ends on the difference (a
        # cluster trial)
        assert first.wait_stderr(lambda: any("the same on every running node" in x
                                             for x in first.stderr[seen:]), 60), \
            "".join(first.stderr[seen:])
        assert sum("differs from other running nodes" in x for x in first.stderr[seen:]) == 1
        # Apart again, then stopped: the others say they agree once it is gone (their
        # logs ended on the difference: a review)
        set_policy(own, "deny", '["gone.example"]')
        node.proc.send_signal(signal.SIGHUP)
        assert first.wait_stderr(lambda: sum("differs from other running nodes" in x
                                             for x in first.stderr[seen:]) == 2, 60), \
            "".join(first.stderr[seen:])
        agreed = sum("the same on every running node" in x for x in first.stderr[seen:])
    finally:
        assert node.stop() == 0
    # and its stop says nothing of its own machinery (a trial saw asyncio's complaints
    # after "stopped" in 3 of 7 stops)
    assert node.stderr_ended.wait(30)
    assert not [x for x in node.stderr if "Task was destroyed" in x
                or "Event loop is closed" in x], "".join(node.stderr[-10:])
    assert first.wait_stderr(lambda: sum("the same on every running node" in x
                                         for x in first.stderr[seen:]) == agreed + 1, 60), \
        "".join(first.stderr[seen:])
    assert "node-p" not in health()["policy"]  # a stopped node is not compared


def test_a_node_whose_port_is_taken_says_so_in_one_line_and_nothing_else(
        cluster: Cluster) -> None:
    """The PostgreSQL pool's tasks outlived a start refused after the log was opened:
    three "Task was destroyed but it is pending!" blocks followed the error line, and
    `2>&1 | tail -1` showed only them (docs review)."""
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        error, stderr = refused_start(cluster.state, "busy", f"127.0.0.1:{port}")
    assert "cannot listen on" in error
    assert stderr.strip() == error, stderr


def test_a_node_refuses_a_database_newer_than_its_code_in_one_line(
        tmp_path: Path, postgres_server: Any) -> None:
    from ca.store.postgres import PG_MIGRATIONS
    c = make_cluster(tmp_path, postgres_server.new_database())
    postgres_server.psql(f"UPDATE schema_version SET version = {len(PG_MIGRATIONS) + 1}",
                         db=c.url.rsplit("/", 1)[1])
    error, stderr = refused_start(c.state, "late")
    assert "newer than this hsmca knows" in error
    assert "Traceback" not in stderr


def test_a_node_pointed_at_a_database_without_the_ca_is_refused_and_writes_nothing(
        tmp_path: Path, postgres_server: Any) -> None:
    """A [store] url naming another, empty database (a typo in its name): the node
    says so in one line before it writes anything there, so that database can still
    take `hsmca init --store-url`."""
    c = make_cluster(tmp_path, postgres_server.new_database())
    config = c.state / "hsmca.toml"
    other = postgres_server.new_database()
    config.write_text(config.read_text().replace(c.url, other))
    error, _ = refused_start(c.state, "typo")
    from ca.store_move import database_name
    other_name = other.rsplit("/", 1)[1]
    assert "hsmca@" in other and "hsmca@" not in database_name(other)  # no user shown
    assert error == (f"hsmca: error: the database {database_name(other)} holds no hsmca "
                     "inventory: is it the one `hsmca init --store-url` made the CA in? "
                     "(nothing was written to it)")
    # Not even the schema: the typo'd database is as it was.
    assert postgres_server.psql("SELECT COUNT(*) FROM pg_tables WHERE schemaname = 'public'",
                                db=other_name) == "0"
    # One that has the schema but no CA (an init cut short) is refused as before.
    from ca.store.postgres import PostgresStore
    PostgresStore(other).close()
    error, _ = refused_start(c.state, "typo")
    assert error == (f"hsmca: error: the database {database_name(other)} holds no CA (no "
                     "keys): is "
                     f"[store] url in {config} the database `hsmca init --store-url` made "
                     "the CA in?")
    assert postgres_server.psql("SELECT COUNT(*) FROM audit_lines", db=other_name) == "0"


def test_an_admin_command_where_no_node_runs_says_to_give_another_nodes_url(
        tmp_path: Path, postgres_server: Any) -> None:
    """A cluster trial: `hsmca token create --config` on a host whose node was stopped
    said "is hsmca serve running there?" of the config's default address."""
    c = make_cluster(tmp_path, postgres_server.new_database())
    proc = hsmca("token", "create", "--config", c.state / "hsmca.toml", "--role", "service",
                 "--name", "x.internal.example", check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"no node of this CA runs from {c.state}" in proc.stderr
    assert "give --url with another node's address" in proc.stderr


def test_a_node_pointed_at_another_cas_database_is_refused_and_writes_nothing(
        tmp_path: Path, postgres_server: Any) -> None:
    """A cluster trial: a node whose [store] url named another CA's database wrote three
    lines of its HSM session there as a node log no checkpoint ever signed, then refused
    with "a swapped token?"; every auditor of that CA failed on that log from then on.
    It is refused before it writes, saying whose database it is."""
    ours = make_cluster(tmp_path / "ours", postgres_server.new_database())
    theirs_url = postgres_server.new_database()
    make_cluster(tmp_path / "theirs", theirs_url)
    theirs_db = theirs_url.rsplit("/", 1)[1]
    lines = "SELECT COUNT(*) FROM audit_lines"
    before = postgres_server.psql(lines, db=theirs_db)
    config = ours.state / "hsmca.toml"
    config.write_text(config.read_text().replace(ours.url, theirs_url))
    error, _ = refused_start(ours.state, "stray")
    from ca.store_move import database_name
    assert error.startswith(f"hsmca: error: the database {database_name(theirs_url)} holds "
                            "another CA (its root is 'CN="), error
    assert "nothing was written to it" in error and str(config) in error
    assert postgres_server.psql(lines, db=theirs_db) == before
    assert postgres_server.psql("SELECT COUNT(*) FROM audit_lines WHERE node = 'stray'",
                                db=theirs_db) == "0"


async def test_ocsp_and_a_key_rotation_reach_every_node(cluster: Cluster,
                                                         tmp_path: Path) -> None:
    """A certificate issued on node 1 gets its pre-signed OCSP response from whichever
    node holds the refresher's lease, and node 3 serves it; an issuing key rotated
    through node 1 issues on node 2, and node 3 accepts its certificates."""
    from cryptography import x509
    from cryptography.x509 import ocsp

    from tests.test_revocation import request_for
    n1, n2, n3 = (cluster.nodes[n] for n in NODES)
    cert, _ = await asyncio.to_thread(enroll, n1, tmp_path, "service", ["ocsp.test"])
    leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    issuer = x509.load_pem_x509_certificate((cluster.state / "x509" / "issuing.pem")
                                            .read_bytes())
    deadline = time.monotonic() + 30  # the refresher signs within seconds
    while True:
        status, _, raw = await _post(n3, "/v1/x509/ocsp", request_for(leaf, issuer))
        answer = ocsp.load_der_ocsp_response(raw)
        if answer.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL or \
                time.monotonic() > deadline:
            break
    assert answer.certificate_status == ocsp.OCSPCertStatus.GOOD
    # Which node signs them is in the logs: exactly one holds the lease now.
    def holds(node: Any) -> bool:
        said = "".join(node.stderr)
        return said.count("pre-signs the OCSP responses now") > said.count(
            "no longer pre-signs the OCSP responses")
    assert sum(holds(n) for n in (n1, n2, n3)) == 1
    proc = await asyncio.to_thread(hsmca, "key", "rotate", "issuing", "--config",
                                   cluster.state / "hsmca.toml", "--url", n1.url)
    assert "rotated issuing" in proc.stdout
    new_cert, new_key = await asyncio.to_thread(enroll, n2, tmp_path, "service", ["new.test"])
    new_leaf = x509.load_pem_x509_certificate(new_cert.read_bytes())
    assert _aki(new_leaf) != _aki(leaf)  # issued on node 2 by the key node 1 made
    status, _, body = await call("POST", f"{n3.url}/v1/x509/renew", n3.ssl(new_cert, new_key),
                                 {})
    assert status in (200, 201), body


def _aki(cert: Any) -> bytes:
    from cryptography import x509
    return cert.extensions.get_extension_for_class(  # type: ignore[no-any-return]
        x509.AuthorityKeyIdentifier).value.key_identifier


async def _post(node: Any, path: str, der: bytes) -> tuple[int, str, bytes]:
    import aiohttp
    async with aiohttp.ClientSession() as s, s.post(
            f"{node.url}{path}", data=der, ssl=node.ssl(),
            headers={"Content-Type": "application/ocsp-request"}) as r:
        return r.status, r.content_type, await r.read()


async def test_token_guessing_is_limited_for_the_whole_cluster(cluster: Cluster) -> None:
    """Twenty wrong tokens from one client, spread over the three nodes, use up its
    budget on all of them: a load balancer does not multiply it."""
    nodes = [cluster.nodes[n] for n in NODES]
    csr = csr_pem(["guess.test"])
    statuses = [(await _enroll(nodes[i % 3], f"guess-{i}", csr))[0] for i in range(20)]
    assert statuses == [401] * 20
    for node in nodes:
        status, ctype, body = await _enroll(node, "guess-more", csr)
        assert status == 429 and ctype == "application/problem+json", body


def test_the_roots_rotation_waits_for_every_node_to_stop(tmp_path: Path,
                                                         postgres_server: Any) -> None:
    """The ceremony's lock on a single node is the audit log the daemon holds; on a
    cluster no node holds init's log, so the ceremony takes every node's name: a node
    that serves is named in one line and nothing is made; once the nodes are stopped
    it runs, and a node started afterwards serves the new chain."""
    c = make_cluster(tmp_path, postgres_server.new_database())
    config = c.state / "hsmca.toml"
    try:
        c.start("r1")
        c.start("r2")
        c.nodes["r2"].stop()
        before = (c.state / "x509" / "root.pem").read_bytes()
        proc = hsmca("key", "rotate-root", "--config", config, "--yes", check=False)
        assert proc.returncode == 1 and proc.stderr == (
            "hsmca: error: node 'r1' is running: stop every node before the root's rotation "
            "(docs/keys.md), then start them again\n"), proc.stderr
        assert (c.state / "x509" / "root.pem").read_bytes() == before
        # said before the "yes" is asked for (a cluster trial was told after it)
        proc = hsmca("key", "rotate-root", "--config", config, input="yes\n", check=False)
        assert proc.returncode == 1 and "node 'r1' is running" in proc.stderr, proc.stderr
        assert "Make a new root" not in proc.stderr, proc.stderr
        c.nodes["r1"].stop()
        # The ceremony's first step lists the keys: with every node stopped, from
        # PostgreSQL (a cluster trial was told to give another node's --url).
        listed = hsmca("key", "list", "--config", config, check=False)
        assert listed.returncode == 0, listed.stderr
        assert "read from the inventory in PostgreSQL (database " in listed.stderr
        assert "issuing-ca " in listed.stdout and "root" in listed.stdout, listed.stdout
        proc = hsmca("key", "rotate-root", "--config", config, "--yes", check=False)
        assert proc.returncode == 0 and "new root" in proc.stdout, proc.stderr
        assert "Warning" not in proc.stderr, proc.stderr
        # Every line of the ceremony, the HSM's logout last, is in PostgreSQL too.
        lines = (c.state / "audit" / "log.jsonl").read_bytes().splitlines()
        assert b'"hsm.logout"' in lines[-1]
        held = postgres_server.psql("SELECT COUNT(*) FROM audit_lines WHERE node = 'init'",
                                    db=c.url.rsplit("/", 1)[1])
        assert int(held) == len(lines)
        new_root = x509.load_pem_x509_certificate((c.state / "x509" / "root.pem").read_bytes())
        node = c.start("r1")
        status, _, body = asyncio.run(call("GET", f"{node.url}/v1/x509/chain", node.ssl()))
        chain = x509.load_pem_x509_certificates(body)
        assert status == 200 and chain[-1].issuer == new_root.subject
    finally:
        c.stop()


def test_the_old_audit_key_is_not_retired_while_a_log_has_not_handed_over(
        tmp_path: Path, postgres_server: Any) -> None:
    """Rotated on a cluster, the audit key signs each node's next checkpoint with the
    old one; the init log, which no node writes, hands over only at a root ceremony.
    Retired before that, the old key would leave init's log verifiable with neither:
    the retirement is refused, naming the log and what hands it over."""
    import re
    c = make_cluster(tmp_path, postgres_server.new_database())
    config = c.state / "hsmca.toml"
    try:
        node = c.start("k1")
        listing = hsmca("key", "list", "--config", config, "--url", node.url).stdout
        old = re.search(r"^(\S+)\s+audit\s+active", listing, re.M)
        assert old, listing
        out = hsmca("key", "rotate", "audit", "--config", config, "--url", node.url).stdout
        assert "rotated audit" in out
        proc = hsmca("key", "retire", old.group(1), "--yes", "--config", config, "--url", node.url,
                     check=False)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
        assert f"{old.group(1)!r} still signs the latest checkpoint of log(s)" in proc.stderr
        assert "init" in proc.stderr and "hsmca key rotate-root" in proc.stderr, proc.stderr
        listing = hsmca("key", "list", "--config", config, "--url", node.url).stdout
        assert re.search(rf"^{re.escape(old.group(1))}\s+audit\s+previous", listing, re.M)
    finally:
        c.stop()


def test_a_node_refuses_a_database_restored_from_an_older_backup(
        tmp_path: Path, postgres_server: Any) -> None:
    """PostgreSQL restored from a dump older than the nodes' checkpoints has lost what
    the commits since did: a certificate issued, its token spent (a fleet trial also
    saw revocations undone and CRL numbers signed twice). The node used to send its
    lines up again as after a crash and serve. It now refuses to start, in one line that
    says the database went back in time and where the docs say what to do."""
    c = make_cluster(tmp_path, postgres_server.new_database())
    db = c.url.rsplit("/", 1)[1]
    try:
        enroll(c.start("node-1"), tmp_path, "service", ["before.restore.example"])
        c.nodes["node-1"].stop()
        postgres_server.dump(db, tmp_path / "hsmca.dump")
        enroll(c.start("node-1"), tmp_path, "service", ["after.restore.example"])
        c.nodes["node-1"].stop()
    finally:
        c.stop()
    postgres_server.restore(db, tmp_path / "hsmca.dump")
    log = c.state / "nodes" / "node-1" / "audit" / "log.jsonl"
    before = log.read_bytes()
    error, stderr = refused_start(c.state, "node-1")
    assert "went back in time" in error and "'Restoring PostgreSQL'" in error, error
    assert "Traceback" not in stderr
    assert log.read_bytes() == before  # nothing written, nothing sent up
    held = int(postgres_server.psql("SELECT COUNT(*) FROM audit_lines WHERE node = 'node-1'",
                                    db=db))
    assert f"PostgreSQL holds {held} lines of node 'node-1'" in error


def test_a_running_node_signs_nothing_once_its_database_went_back(
        tmp_path: Path, postgres_server: Any) -> None:
    """PostgreSQL restored under a running node lacks the node's last lines. The
    node's next group was committed after the hole and it served on, what the lost
    commits did (here a certificate and its spent token) undone. Now each group is
    refused: a renewal gets a 503, /health says the database went back in time and
    where the docs say what to do, nothing is committed after the hole, and the node
    refuses to start until its log is moved aside (or the database holds the line)."""
    c = make_cluster(tmp_path, postgres_server.new_database())
    db = c.url.rsplit("/", 1)[1]

    def count(sql: str) -> int:
        return int(postgres_server.psql(sql, db=db))
    try:
        node = c.start("node-1")
        cert, key = enroll(node, tmp_path, "service", ["kept.restore.example"])
        postgres_server.dump(db, tmp_path / "hsmca.dump")
        enroll(node, tmp_path, "service", ["lost.restore.example"])
        postgres_server.restore(db, tmp_path / "hsmca.dump")
        held = count("SELECT COUNT(*) FROM audit_lines WHERE node = 'node-1'")
        certs = count("SELECT COUNT(*) FROM certs")
        statuses, audit = [], ""
        for _ in range(10):  # the restore ended the pool's connections: one may fail so
            status, _, _ = asyncio.run(call("POST", f"{node.url}/v1/x509/renew",
                                            node.ssl(cert, key), {}))
            statuses.append(status)
            status, _, body = asyncio.run(call("GET", f"{node.url}/health", node.ssl()))
            audit = json.loads(body)["audit"]
            if "went back in time" in audit:
                break
        assert statuses and all(s == 503 for s in statuses), statuses
        assert status == 503 and "PostgreSQL lacks line " in audit, audit
        assert "of the audit log of node 'node-1', which it had committed" in audit, audit
        assert "'Restoring PostgreSQL'" in audit, audit
        assert count("SELECT COUNT(*) FROM audit_lines WHERE node = 'node-1'") == held
        assert count("SELECT MAX(seq) FROM audit_lines WHERE node = 'node-1'") == held - 1
        assert count("SELECT COUNT(*) FROM certs") == certs
        # Stopped, it refuses to start, whatever its checkpoint covers; moved aside as
        # docs/cluster.md says, its log comes back from the database and it serves.
        node.stop()
        error, stderr = refused_start(c.state, "node-1")
        assert "found, while it ran, that PostgreSQL lacked line" in error, error
        assert "'Restoring PostgreSQL'" in error and "Traceback" not in stderr
        audit_dir = c.state / "nodes" / "node-1" / "audit"
        audit_dir.rename(audit_dir.with_name("audit.before-restore"))
        node = c.start("node-1")
        status, _, body = asyncio.run(call("POST", f"{node.url}/v1/x509/renew",
                                           node.ssl(cert, key), {}))
        assert status in (200, 201), body
    finally:
        c.stop()


def test_a_command_on_the_shared_state_directory_finds_a_node_that_runs(
        tmp_path: Path, postgres_server: Any) -> None:
    """Two nodes on one state directory, the first by name killed (-9): its serve.url
    stays behind. `hsmca token create --config` took the first URL it found and failed
    ("is hsmca serve running there?") while the other node served; it now asks a node
    that takes the connection."""
    c = make_cluster(tmp_path, postgres_server.new_database())
    try:
        dead, alive = c.start("a-node"), c.start("b-node")
        dead.proc.kill()
        dead.proc.wait()
        assert (c.state / "nodes" / "a-node" / "serve.url").exists()
        # Its workers die with it (PDEATHSIG), a moment later: until its port refuses.
        import socket
        host, port = dead.url.removeprefix("https://").rstrip("/").rsplit(":", 1)
        for _ in range(1000):  # each attempt's round trip paces it
            try:
                socket.create_connection((host, int(port)), timeout=5).close()
            except ConnectionRefusedError:
                break
            except ConnectionResetError:
                continue  # a worker on its way out
        else:
            raise AssertionError("the killed node's workers still listen")
        made = hsmca("token", "create", "--config", c.state / "hsmca.toml", "--role",
                     "service", "--name", "svc.alive.example", check=False)
        assert made.returncode == 0 and made.stdout.strip(), made.stderr
        assert alive.proc.poll() is None
    finally:
        c.stop()


def test_a_dba_sees_which_node_and_process_holds_each_connection(
        cluster: Cluster, postgres_server: Any) -> None:
    """pg_stat_activity names each connection's node and process (it said nothing, so a
    DBA could not tell a node's connections from another's)."""
    names = set(postgres_server.psql(
        "SELECT application_name FROM pg_stat_activity WHERE datname = "
        f"'{cluster.url.rsplit('/', 1)[1]}'").splitlines())
    for node in NODES:
        assert f"hsmca {node} primary" in names and f"hsmca {node} worker 0" in names, names


def test_a_node_stopped_during_the_audit_keys_rotation_starts_and_hands_over(
        tmp_path: Path, postgres_server: Any) -> None:
    """Two nodes on one state directory, k2 stopped; the audit key rotated through k1,
    whose hand-over makes the new key the directory's audit_key.pem. k2's log still
    ends with a checkpoint of the old key alone: its start was refused ("not a valid
    checkpoint of this CA ... an operator must look"). It now checks that checkpoint
    with the previous key too, which the inventory still lists as in use, starts, and
    hands over at its first checkpoint: only init's log is then left to hand over."""
    import re

    from ca.audit.note import parse_checkpoint
    c = make_cluster(tmp_path, postgres_server.new_database())
    config = c.state / "hsmca.toml"
    key_file = c.state / "audit" / "audit_key.pem"
    try:
        k1, k2 = c.start("k1"), c.start("k2")
        assert k2.stop() == 0
        first = key_file.read_bytes()
        listing = hsmca("key", "list", "--config", config, "--url", k1.url).stdout
        old = re.search(r"^(\S+)\s+audit\s+active", listing, re.M)
        assert old, listing
        hsmca("key", "rotate", "audit", "--config", config, "--url", k1.url)

        def signatures(node: Any) -> int:
            status, _, body = asyncio.run(call("GET", f"{node.url}/v1/audit/checkpoint",
                                               node.ssl()))
            assert status == 200, body
            return len(parse_checkpoint(body.decode()).signatures)

        for _ in range(1000):  # each look's round trip paces it
            if signatures(k1) == 2 and key_file.read_bytes() != first:
                break
        else:
            raise AssertionError("k1 never handed over")
        k2 = c.start("k2")
        for _ in range(1000):
            if signatures(k2) == 2:
                break
        else:
            raise AssertionError("k2 never handed over")
        proc = hsmca("key", "retire", old.group(1), "--yes", "--config", config, "--url", k1.url,
                     check=False)
        assert "still signs the latest checkpoint of log(s) init," in proc.stderr, proc.stderr
    finally:
        c.stop()


def test_a_rotation_killed_on_a_node_before_its_commit_is_voided_at_that_nodes_start(
        tmp_path: Path, postgres_server: Any) -> None:
    """A cluster trial: a rotation killed on a node between its key.rotate line and its
    PostgreSQL commit stood in that node's log for good (voided on one node only), and
    every start spoke of backups. The node's own next start voids it, once no session of
    its previous run is still running a statement."""
    import psycopg

    from tests.helpers import log_lines
    from tests.test_rotation import key_cmd
    c = make_cluster(tmp_path, postgres_server.new_database())
    try:
        node = c.start("ca-1")
        key_cmd(node, "rotate", "ssh-user")
        node.stop()
        with psycopg.connect(c.url) as conn:  # as the kill left it: the commit never came
            new = conn.execute("SELECT label FROM ca_keys WHERE kind = 'ssh-user' AND "
                               "state = 'active'").fetchone()[0]
            conn.execute("DELETE FROM ca_keys WHERE label = %s", (new,))
            conn.execute("UPDATE ca_keys SET state = 'active' WHERE label = 'ssh-user-ca'")
        node = c.start("ca-1")
        assert node.wait_stderr(lambda: any(
            "a rotation stopped between its audit line and its inventory commit" in x
            and new in x for x in node.stderr)), node.stderr
        node.stop()
        lines = log_lines(c.state / "nodes" / "ca-1")
        [rotate] = [e for e in lines if e["event"] == "key.rotate"]
        assert rotate["label"] == new
        assert [e["voids"] for e in lines if e["event"] == "record.void"] == [rotate["seq"]]
    finally:
        c.stop()


def test_a_rotation_whose_commit_may_still_land_is_not_voided(
        tmp_path: Path, postgres_server: Any) -> None:
    """The void above waits while a session named for the node (its killed run's, whose
    COMMIT may be under way) still runs a statement: said, and settled by a later start."""
    import contextlib
    import threading

    import psycopg

    from tests.helpers import log_lines
    from tests.test_rotation import key_cmd
    c = make_cluster(tmp_path, postgres_server.new_database())
    try:
        node = c.start("ca-1")
        key_cmd(node, "rotate", "ssh-user")
        node.stop()
        with psycopg.connect(c.url) as conn:
            new = conn.execute("SELECT label FROM ca_keys WHERE kind = 'ssh-user' AND "
                               "state = 'active'").fetchone()[0]
            conn.execute("DELETE FROM ca_keys WHERE label = %s", (new,))
            conn.execute("UPDATE ca_keys SET state = 'active' WHERE label = 'ssh-user-ca'")
        # the killed run's session, still at work
        held = psycopg.connect(c.url, application_name="hsmca ca-1 worker 0")
        pid = held.info.backend_pid
        def sleep() -> None:
            with contextlib.suppress(psycopg.errors.AdminShutdown):  # (ended below)
                held.execute("SELECT pg_sleep(300)")
        busy = threading.Thread(target=sleep, daemon=True)
        busy.start()
        with psycopg.connect(c.url) as conn:  # it runs before the node starts
            deadline = time.monotonic() + 60  # a watchdog, not a wait
            while conn.execute("SELECT state FROM pg_stat_activity WHERE pid = %s",
                               (pid,)).fetchone()[0] != "active":
                assert time.monotonic() < deadline, "the session never ran its statement"
                conn.execute("SELECT pg_stat_clear_snapshot()")
        try:
            node = c.start("ca-1")
            assert node.wait_stderr(lambda: any(
                "whether it commits cannot be told yet" in x and new in x
                for x in node.stderr)), node.stderr
            node.stop()
            assert not [e for e in log_lines(c.state / "nodes" / "ca-1")
                        if e["event"] == "record.void"]
        finally:
            with psycopg.connect(c.url) as conn:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            busy.join(60)
            held.close()
        node = c.start("ca-1")
        assert node.wait_stderr(lambda: any("its line is voided" in x and new in x
                                            for x in node.stderr)), node.stderr
    finally:
        c.stop()


def test_a_new_node_named_after_the_host_says_so(tmp_path: Path, postgres_server: Any) -> None:
    """A cluster trial: `serve` without --node on a cluster made a node named after the
    host, for good (its log listed, followed and verified from then on), and said
    nothing. Its first run says so, and what to do; a later run of it does not."""
    import socket

    from tests.conftest import start_daemon
    c = make_cluster(tmp_path, postgres_server.new_database())
    said = "a new node, named after this host as no --node was given"
    first = start_daemon(c.state)
    try:
        assert first.wait_stderr(lambda: any(said in x for x in first.stderr)), \
            "".join(first.stderr[-10:])
        [line] = [json.loads(x) for x in first.stderr if said in x]
        assert line["node"] == socket.gethostname() and line["level"] == "warning", line
    finally:
        assert first.stop() == 0
    again = start_daemon(c.state)
    try:
        assert not any(said in x for x in again.stderr)
        # A reload of the unchanged file has nothing to say about a restart (a review:
        # every SIGHUP named a setting "node-from-host", which no file has)
        again.proc.send_signal(signal.SIGHUP)
        assert again.wait_stderr(lambda: any("reloaded" in x for x in again.stderr))
        assert not any("only at the next start" in x for x in again.stderr), again.stderr
    finally:
        assert again.stop() == 0
    named = start_daemon(c.state, "--node", "named-1")
    try:
        assert not any(said in x for x in named.stderr)  # a name given: nothing to say
    finally:
        assert named.stop() == 0

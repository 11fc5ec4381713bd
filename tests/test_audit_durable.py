"""The audit log's promise, watched in a real daemon's processes: nothing is signed
before its intent line is on disk, and nothing signed leaves before its outcome line
is (docs/audit-log.md, docs/design.md).

A line is on disk once an fsync or fdatasync of the log file has returned after it
was written; the other tests cannot see a flush that is missing or late (the log
reads back the same from the page cache). So the daemon runs with an observer
(tests/observer/sitecustomize.py) that records, in one file shared by the primary
and its workers, every flush of a file with the size it covered, every signature
the HSM layer is asked for with its intent's seq, and every C_Sign; the client adds
a record when it has a certificate in hand. The order of that file is the order in
which things happened.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from tests.conftest import init_ca, start_daemon
from tests.helpers import enroll, http

pytestmark = pytest.mark.asyncio(loop_scope="session")
OBSERVER = Path(__file__).resolve().parent / "observer"
RENEWALS = 12


def observed_env(trace: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(OBSERVER), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "HSMCA_TEST_TRACE": str(trace)}


async def test_intents_are_flushed_before_c_sign_and_outcomes_before_release(
        tmp_path: Path) -> None:
    ca = init_ca(tmp_path)
    trace = tmp_path / "trace"
    d = start_daemon(ca.state, "--workers", "1", env=observed_env(trace))
    try:
        cert, key = enroll(d, tmp_path, "service", ["durable.internal.example"])
        ctx = d.ssl(cert, key)
        client = os.open(trace, os.O_WRONLY | os.O_APPEND)

        async def renew() -> None:
            status, _, body = await http("POST", f"{d.url}/v1/x509/renew", ctx, body={})
            assert status == 201, body
            # Recorded once the client holds the certificate: the release.
            os.write(client, f"released {os.getpid()} {json.loads(body)['serial']}\n".encode())

        try:  # at once, so that their lines share group commits
            await asyncio.gather(*(renew() for _ in range(RENEWALS)))
        finally:
            os.close(client)
    finally:
        assert d.stop() == 0

    log_path = ca.state / "audit" / "log.jsonl"
    raw = log_path.read_bytes().splitlines(keepends=True)
    lines = [json.loads(line) for line in raw]
    ends = []  # the byte each line ends at, its newline included
    for line in raw:
        ends.append((ends[-1] if ends else 0) + len(line))
    outcome_of = {e["op_id"]: e["seq"] for e in lines if e.get("phase") == "outcome"}
    renewed = {e["serial"]: e for e in lines
               if e.get("phase") == "intent" and e.get("purpose") == "x509"}
    log_file = os.path.realpath(log_path)

    flushed = 0  # bytes of the log known to be on disk, at this point of the trace
    asked: dict[str, int] = {}  # pid -> the intent its HSM was last asked to sign for
    signed: set[int] = set()  # the intents a C_Sign was made for
    released = 0
    events = trace.read_text().splitlines()
    for n, event in enumerate(events):
        kind, pid, *rest = event.split(" ", 3)
        where = f"trace line {n + 1} ({event!r})"
        if kind == "flush":
            if os.path.realpath(rest[1]) == log_file:
                flushed = max(flushed, int(rest[0]))
        elif kind == "sign-for":
            asked[pid] = int(rest[0])
        elif kind == "C_Sign":
            assert pid in asked, f"{where}: C_Sign with no signature asked of the HSM layer"
            seq = asked[pid]
            assert lines[seq].get("phase") == "intent", f"{where}: seq {seq} is no intent"
            assert ends[seq] <= flushed, (
                f"{where}: C_Sign for the intent at seq {seq} (bytes up to {ends[seq]}), "
                f"but only {flushed} bytes of the audit log had been flushed to disk")
            signed.add(seq)
        elif kind == "released":
            intent = renewed[rest[0]]
            seq = outcome_of[intent["op_id"]]
            assert lines[seq]["result"] == "ok"
            assert ends[seq] <= flushed, (
                f"{where}: certificate {rest[0]} in the client's hands, its outcome line at "
                f"seq {seq} (bytes up to {ends[seq]}), but only {flushed} bytes of the "
                "audit log had been flushed to disk")
            released += 1
        else:
            raise AssertionError(f"{where}: an unknown record")
    assert released == RENEWALS
    # Every signature of the run was watched: the renewals, and the daemon's own (its
    # TLS certificate, OCSP responses, checkpoints); `hsmca init` signed before it.
    started = next(i for i, e in enumerate(lines) if e["event"] == "daemon.start")
    assert signed == {e["seq"] for e in lines[started:] if e.get("phase") == "intent"}
    assert len(signed) > RENEWALS

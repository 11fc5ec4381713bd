"""The primary's recorder, driven over real socketpairs as a worker drives it: lines
from several workers land in one valid log, a worker that dies between an intent and
its outcome leaves a log that still verifies, and bad requests are refused."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from ca import ipc
from ca.audit import wire
from ca.audit.log import AuditLog
from ca.audit.recorder import Recorder
from ca.audit.verify import verify_log

WATCHDOG_S = 30


class Harness:
    def __init__(self, tmp: Path) -> None:
        self.log = AuditLog.open(tmp / "log.jsonl")
        self.lost: dict[int, int] = {}
        self.lost_event = threading.Event()
        self.recorder = Recorder(self.log, lambda: "a checkpoint", self._lost)

    def _lost(self, worker: int, closed: int) -> None:
        self.lost[worker] = closed
        self.lost_event.set()

    def worker(self, wid: int) -> tuple[socket.socket, socket.socket]:
        pairs = [socket.socketpair() for _ in range(2)]
        self.recorder.attach(wid, [ours for ours, _ in pairs])
        return pairs[0][1], pairs[1][1]

    def close(self) -> None:
        self.recorder.close()
        self.log.close()


_replies: ipc.Decoder[wire.Reply] = ipc.Decoder(wire.Reply)


def ask(sock: socket.socket, message: Any) -> Any:
    sock.settimeout(WATCHDOG_S)
    ipc.send_frame(sock, ipc.encode(message))
    return _replies.recv(sock)


def append(sock: socket.socket, req_id: int, *lines: wire.Line) -> wire.Appended:
    reply = ask(sock, wire.Append(req_id, list(lines)))
    assert isinstance(reply, wire.Appended) and reply.id == req_id
    return reply


def sign_line(phase: str, op_id: str) -> wire.Line:
    fields: dict[str, Any] = {"phase": phase, "op_id": op_id}
    if phase == "outcome":
        fields["result"] = "ok"
    return wire.Line("hsm.sign", fields)


def test_a_worker_lost_mid_signature_leaves_a_log_that_verifies(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    try:
        a_sign, a_chan = h.worker(1)
        b_sign, _b_chan = h.worker(2)
        reply = append(a_sign, 1, sign_line("intent", "done"), sign_line("outcome", "done"),
                       sign_line("intent", "open-1"), sign_line("intent", "open-2"))
        assert reply.errors == [None] * 4 and reply.seqs == [0, 1, 2, 3]
        assert append(b_sign, 1, sign_line("intent", "b")).seqs == [4]
        a_sign.close()
        a_chan.close()  # worker 1 dies with two signatures under way
        assert h.lost_event.wait(WATCHDOG_S)
        assert h.lost == {1: 2}
        append(b_sign, 2, sign_line("outcome", "b"))
    finally:
        h.close()
    data = (tmp_path / "log.jsonl").read_bytes()
    lines = [json.loads(line) for line in data.splitlines()]
    lost = [e for e in lines if e.get("result") == "WorkerLost"]
    assert [(e["op_id"], e["released"], e["worker"]) for e in lost] == [
        ("open-1", False, 1), ("open-2", False, 1)]
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    result = verify_log(data, key, "test")
    assert result.ok, result.reason


def test_an_open_intent_without_the_recorder_closing_it_fails_verification(
        tmp_path: Path) -> None:
    """The check above means something: the same log without the WorkerLost outcome
    is refused by the verifier."""
    log = AuditLog.open(tmp_path / "log.jsonl")
    try:
        line = sign_line("intent", "open-1")
        log.record(line.event, line.fields).result()
    finally:
        log.close()
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    result = verify_log((tmp_path / "log.jsonl").read_bytes(), key, "test")
    assert not result.ok and "intent without an outcome" in (result.reason or "")


def test_questions_and_bad_requests(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    try:
        sign, chan = h.worker(1)
        append(sign, 1, *(wire.Line("test.line", {"i": i}) for i in range(5)))
        assert ask(chan, wire.AskHealth(7)) == wire.Health(7, True, None, 5)
        page = ask(chan, wire.ReadLines(8, 1, 2)).data
        assert [json.loads(x)["i"] for x in page.splitlines()] == [1, 2]
        assert ask(chan, wire.AskCheckpoint(9)).text == "a checkpoint"
        assert len(ask(chan, wire.InclusionProof(10, 1, 5)).hashes) == 3
        assert "size <= 5" in ask(chan, wire.ConsistencyProof(11, 2, 6)).reason
        # A line that is not JSON is refused alone; the others of its batch are written.
        reply = append(sign, 2, wire.Line("test.line", {"x": float("nan")}),
                       wire.Line("test.line", {"i": 5}))
        assert reply.seqs == [None, 5] and reply.errors[0] is not None
        assert reply.errors[0].kind == "invalid"
        # Something that is not a message of the channel closes it: the worker is gone.
        chan.sendall(ipc.encode({"op": "nope"}))
        assert chan.recv(1) == b""
    finally:
        h.close()


def test_the_link_refuses_what_it_cannot_send_and_notices_the_primary_gone(
        tmp_path: Path) -> None:
    """The worker's end: a line that is not plain data is refused alone (the link
    keeps working), and once the primary is gone every append fails as
    AuditUnavailable, with the loss reported, instead of waiting forever."""
    from ca.audit.link import AuditLink
    from hsm.errors import AuditUnavailable

    h = Harness(tmp_path)
    lost: list[str] = []
    try:
        sign, chan = h.worker(1)
        link = AuditLink(sign, chan, lost.append)
        bad = link.append_durable([("test.line", {"huge": 2**70})])
        assert isinstance(bad[0].exception(), OverflowError)
        assert isinstance(link.record("test.line", {"x": object()}).exception(WATCHDOG_S),
                          TypeError)
        good = link.append_durable([("test.line", {"i": 1})])
        assert good[0].result() == 0 and link.record("test.line", {"i": 2}).result(
            WATCHDOG_S) == 1
    finally:
        h.close()  # the primary's end goes away
    gone = link.append_durable([("test.line", {"i": 3})])
    assert isinstance(gone[0].exception(), AuditUnavailable)
    assert lost and "lost the primary process" in link.problem
    link.close()


def test_a_restarted_worker_is_not_taken_for_the_one_it_replaces(tmp_path: Path) -> None:
    """A new worker may take its slot before the old one's channels are drained: the
    old one's open signature is closed as lost, the new one's is left alone, and the
    new one's outcome is its only one."""
    h = Harness(tmp_path)
    try:
        old_sign, old_chan = h.worker(1)
        append(old_sign, 1, sign_line("intent", "old"))
        new_sign, new_chan = h.worker(1)  # the same slot, old channels still open
        append(new_sign, 1, sign_line("intent", "new"))
        old_sign.close()
        old_chan.close()
        assert h.lost_event.wait(WATCHDOG_S) and h.lost == {1: 1}
        assert append(new_sign, 2, sign_line("outcome", "new")).errors == [None]
        assert ask(new_chan, wire.AskHealth(3)).healthy
    finally:
        h.close()
    data = (tmp_path / "log.jsonl").read_bytes()
    outcomes = [(e["op_id"], e["result"]) for e in map(json.loads, data.splitlines())
                if e.get("phase") == "outcome"]
    assert outcomes == [("old", "WorkerLost"), ("new", "ok")]
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    result = verify_log(data, key, "test")
    assert result.ok, result.reason

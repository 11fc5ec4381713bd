"""The audit log as operators and auditors meet it: verify, recovery, locking,
crashes, and failing closed when the disk refuses."""

from __future__ import annotations

import asyncio
import json
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from ca.audit.log import AuditLog
from ca.audit.note import parse_checkpoint
from ca.audit.verify import verify_log
from ca.issuance.pipeline import SigningPipeline
from tests.conftest import InitialisedCA, hsmca, init_ca, start_daemon
from tests.helpers import audit_verify, rechain


def test_fresh_ca_log_verifies_and_records_the_ceremony(ca: InitialisedCA) -> None:
    proc = audit_verify(ca.state)
    assert proc.returncode == 0 and proc.stdout.startswith("OK:"), proc.stdout + proc.stderr
    events = [json.loads(line) for line in (ca.state / "audit/log.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "init.start" and "hsm.login" in kinds
    purposes = [e.get("purpose") for e in events
                if e.get("phase") == "intent" and e["event"] == "hsm.sign"]
    assert purposes[:2] == ["x509-ca", "x509-ca"] and purposes[-1] == "checkpoint"
    # Each key announced (intent) before it is made, then its outcome, before any use.
    keygens = [(i, e) for i, e in enumerate(events) if e["event"] == "hsm.keygen"]
    intents = {e["op_id"]: i for i, e in keygens if e["phase"] == "intent"}
    outcomes = [(i, e) for i, e in keygens if e["phase"] == "outcome"]
    assert len(intents) == len(outcomes) == 5
    for i, e in outcomes:
        assert intents[e["op_id"]] < i and e["result"] == "ok"
        assert e["attributes"]["extractable"] is False
        assert e["attributes"]["never_extractable"] is True
        used = [j for j, u in enumerate(events) if u["event"] == "hsm.sign"
                and u.get("key") == e["key"]]
        assert all(j > i for j in used), (e["key"], i, used)


def test_state_catches_truncation_and_rewrite(ca: InitialisedCA, tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    shutil.copy(ca.state / "audit/log.jsonl", log)
    state = tmp_path / "state.json"
    cp = ["--checkpoint", ca.state / "audit/checkpoint"]
    assert audit_verify(ca.state, "--state", state, *cp, log=log).returncode == 0
    assert state.exists()

    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:-5]))
    proc = audit_verify(ca.state, "--state", state, log=log)
    assert proc.returncode == 1
    bad = len(lines) - 5
    assert f"FAILED at seq {bad} (line {bad + 1} of the file)" in proc.stderr, proc.stderr

    # A rewrite that keeps the chain intact (rehash everything after a change) is caught
    # by the signed checkpoints and the saved state.
    raw = [line.rstrip(b"\n") for line in lines]
    raw[3] = json.dumps({**json.loads(raw[3]), "event": "hsm.tampered"}).encode()
    log.write_bytes(b"".join(line + b"\n" for line in rechain(raw, 3)))
    proc = audit_verify(ca.state, "--state", state, log=log)
    assert proc.returncode == 1 and "FAILED at seq" in proc.stderr


def test_offline_verify_misses_no_line_of_a_stopped_daemons_log(tmp_path: Path) -> None:
    """A stopped daemon's log ends with lines no checkpoint covers: the final
    checkpoint's own intent and outcome, then the HSM logout. They pass as the lines
    that close the log, the state records them, and cutting or altering them is caught
    (the state used to hold only the last checkpoint, so they could be cut unnoticed).
    Other lines no checkpoint covers are UNSIGNED: exit 1 unless --allow-unsigned."""
    ca = init_ca(tmp_path)
    assert start_daemon(ca.state).stop() == 0
    copy = tmp_path / "copy"
    copy.mkdir()
    log = copy / "log.jsonl"
    shutil.copy(ca.state / "audit/log.jsonl", log)
    shutil.copy(ca.state / "audit/checkpoint", copy / "checkpoint")
    lines = log.read_bytes().splitlines(keepends=True)
    n = len(lines)
    assert [json.loads(line)["event"] for line in lines[-4:]] == [
        "daemon.stop", "hsm.sign", "hsm.sign", "hsm.logout"]
    state = tmp_path / "auditor.state"

    proc = audit_verify(ca.state, "--state", state, log=log)
    assert proc.returncode == 0, proc.stderr
    # It says which checkpoint the lines were checked against, and what it saved (an
    # auditor trial got the same line whichever checkpoint it gave).
    size = parse_checkpoint((log.parent / "checkpoint").read_text()).size
    assert re.fullmatch(f"OK: {n} lines, [0-9]+ checkpoints verified; the last 3 lines are the "
                        "last checkpoint's own signing and the HSM logout, which no "
                        "checkpoint can cover\n"
                        f"checkpoint: the checkpoint file {re.escape(str(log.parent))}/"
                        f"checkpoint, {size} lines, root \\S+; pinned audit key "
                        "\\S+\\+[0-9a-f]{8}\n"
                        f"state: saved in {re.escape(str(state))}, {n} lines\n",
                        proc.stdout), proc.stdout
    assert json.loads(state.read_text())["size"] == n

    log.write_bytes(b"".join(lines[:-3]))  # the three closing lines cut
    proc = audit_verify(ca.state, "--state", state, log=log)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"FAILED at seq {n - 3} (line {n - 2} of the file): "
                                  f"truncated: the log had {n} lines at "
                                  "the last verification, now it has"), proc.stderr
    logout = lines[-1].replace(b'"result":"ok"', b'"result":"CKR_GENERAL_ERROR"')
    assert logout != lines[-1]
    log.write_bytes(b"".join([*lines[:-1], logout]))  # the last line altered
    proc = audit_verify(ca.state, "--state", state, log=log)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"FAILED at seq {n - 1} (line {n} of the file): "
                                  f"rewritten: the first {n} lines no "
                                  "longer match those verified last time"), proc.stderr

    # Without a state, the checkpoint file beside the log says it was cut: the daemon
    # writes it only once its signing is in the log (auditor trial: this said OK, while
    # the daemon refused to start on the same log).
    log.write_bytes(b"".join(lines[:-3]))
    proc = audit_verify(ca.state, log=log)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith(f"FAILED at seq {n - 3} (line {n - 2} of the file): cut: "
                                  f"the latest checkpoint covers {n - 3} lines, and the lines "
                                  "that signed it"), proc.stderr
    assert "the log ends at" in proc.stderr and "its end was cut" in proc.stderr

    # A copy cut before the daemon.stop line's checkpoint, with no checkpoint file beside
    # it: the checkpoint before covers neither its own signing nor the daemon.stop.
    (copy / "checkpoint").unlink()
    log.write_bytes(b"".join(lines[:-3]))
    notes = [json.loads(line)["checkpoint"] for line in lines[:-3] if b'"checkpoint":"' in line]
    signed = int(notes[-1].split("\n")[1])  # the size line of the last checkpoint logged
    fresh = tmp_path / "fresh.state"
    proc = audit_verify(ca.state, "--state", fresh, log=log)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith(f"UNSIGNED: {n - 3 - signed} lines, no checkpoint covers "
                                  f"them (seq {signed} to {n - 4})"), proc.stderr
    assert not fresh.exists()  # not accepted, not recorded
    proc = audit_verify(ca.state, "--state", fresh, "--allow-unsigned", log=log)
    assert proc.returncode == 0 and proc.stdout.startswith(f"OK: {n - 3} lines"), proc.stderr
    assert proc.stderr.startswith(f"UNSIGNED: {n - 3 - signed} lines, no checkpoint covers")
    assert json.loads(fresh.read_text())["size"] == n - 3  # accepted: recorded
    log.write_bytes(b"".join(lines[:-4]))
    proc = audit_verify(ca.state, "--state", fresh, "--allow-unsigned", log=log)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"FAILED at seq {n - 4} (line {n - 3} of the file): "
                                  "truncated"), proc.stderr


@pytest.mark.parametrize("line, change", [
    (-3, {"size": 5}), (-3, {"root": "AAAA"}), (-3, {"actor": "cert:ab:CN=x"}),
    (-2, {"note": "forged"}), (-2, {"digest": "00" * 32}), (-1, {"note": "forged"})])
def test_closing_lines_are_only_what_the_daemon_writes(
        stopped_log: tuple[InitialisedCA, list[bytes]], tmp_path: Path, line: int,
        change: dict[str, Any]) -> None:
    """The closing lines pass unsigned only as the daemon writes them: the intent names
    the checkpoint it signs, the outcome its digest, and no line says more. Anything
    else, hash chain and all, is lines that no checkpoint covers."""
    ca, lines = stopped_log
    raw = [x.rstrip(b"\n") for x in lines]
    raw[line] = json.dumps({**json.loads(raw[line]), **change}, separators=(",", ":"),
                           sort_keys=True).encode()
    log = tmp_path / "log.jsonl"
    log.write_bytes(b"".join(x + b"\n" for x in rechain(raw, len(raw) + line)))
    proc = audit_verify(ca.state, log=log)
    assert proc.returncode == 1, proc.stdout
    assert proc.stderr.startswith(f"UNSIGNED: 3 lines, no checkpoint covers them (seq "
                                  f"{len(raw) - 3} to {len(raw) - 1})"), proc.stderr


def test_verify_names_the_file_that_is_wrong(stopped_log: tuple[InitialisedCA, list[bytes]],
                                             tmp_path: Path) -> None:
    """A checkpoint or state file that is missing, unreadable, not a checkpoint or
    another log's is named as such in one line, never blamed on the log or passed over
    (auditor trial: a mistyped --checkpoint was ignored and the log passed)."""
    ca, lines = stopped_log
    log = tmp_path / "log.jsonl"
    log.write_bytes(b"".join(lines))

    def refused(*extra: str | Path) -> str:
        proc = audit_verify(ca.state, *extra, log=log)
        assert proc.returncode != 0 and proc.stderr.count("\n") == 1, proc.stderr
        assert "Traceback" not in proc.stderr and not proc.stdout, proc.stdout
        return proc.stderr

    assert "--checkpoint /nonexistent/cp: no such file" in refused("--checkpoint",
                                                                   "/nonexistent/cp")
    bad = tmp_path / "bad"
    bad.write_bytes(b"\xff\xfe")
    assert f"the checkpoint {bad} is not UTF-8 text" in refused("--checkpoint", bad)
    bad.write_text("hello\n")
    assert f"the checkpoint {bad} is not a checkpoint note" in refused("--checkpoint", bad)
    assert f"cannot read the checkpoint {tmp_path}" in refused("--checkpoint", tmp_path)
    from ca.audit.note import sign_checkpoint
    from tests.test_verify import KEY
    bad.write_text(sign_checkpoint("other.example/log", 1, b"\0" * 32, "other.example/log",
                                   KEY.public_key(), KEY.sign))
    assert f"the checkpoint {bad} is for the log 'other.example/log', not this one" in \
        refused("--checkpoint", bad)
    state = tmp_path / "state.json"
    state.write_text('{"size": "x"}')
    assert refused("--state", state).startswith(f"hsmca: error: --state {state}: ")

    ok = audit_verify(ca.state, log=log)
    assert ok.returncode == 0 and "note: there is no checkpoint file" in ok.stdout, ok.stdout

    # A copy taken while the final checkpoint was being signed: its intent, no outcome.
    log.write_bytes(b"".join(lines[:-2]))
    proc = audit_verify(ca.state, log=log)
    assert proc.returncode == 1 and "--allow-unsigned accepts that" in proc.stderr, proc.stderr
    proc = audit_verify(ca.state, "--allow-unsigned", log=log)
    assert proc.returncode == 0 and proc.stdout.startswith("OK:"), proc.stdout + proc.stderr
    assert "OPEN: 1 signatures have an intent and no outcome yet" in proc.stderr

    log.write_bytes(b"".join(lines) + b"[" * 100000 + b"]" * 100000 + b"\n")
    proc = hsmca("audit", "show", "--log", log, check=False)
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"line {len(lines) + 1} of {log} is not a line of an audit log" in proc.stderr


@pytest.fixture(scope="module")
def stopped_log(tmp_path_factory: pytest.TempPathFactory) -> tuple[InitialisedCA, list[bytes]]:
    ca = init_ca(tmp_path_factory.mktemp("stopped"))
    assert start_daemon(ca.state).stop() == 0
    lines = (ca.state / "audit/log.jsonl").read_bytes().splitlines(keepends=True)
    alone = tmp_path_factory.mktemp("stopped-log") / "log.jsonl"  # no checkpoint file beside
    alone.write_bytes(b"".join(lines))
    proc = audit_verify(ca.state, log=alone)
    assert proc.returncode == 0 and "the last 3 lines are the last checkpoint's own signing " \
        "and the HSM logout" in proc.stdout, proc.stdout + proc.stderr
    return ca, lines


def test_torn_tail_is_cut_and_recorded(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    log = AuditLog.open(path)
    for i in range(5):
        log.record("test.line", {"i": i}).result()
    log.close()
    with open(path, "ab") as fh:
        fh.write(b'{"event":"test.line","i":5,"prev":"ab')  # the crash hit mid-write
    log = AuditLog.open(path)
    log.close()
    lines = path.read_bytes().splitlines()
    last = json.loads(lines[-1])
    assert last["event"] == "log.recover" and last["seq"] == 5
    assert last["cut_bytes"] == len(b'{"event":"test.line","i":5,"prev":"ab')
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    result = verify_log(path.read_bytes(), key, "x")
    assert result.ok, result.reason


def test_one_writer_only_and_refusal_of_a_shorter_or_rewritten_log(tmp_path: Path) -> None:
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state)
    try:
        second = hsmca("serve", "--config", ca.state / "hsmca.toml", "--listen", "127.0.0.1:0",
                       check=False)
        assert second.returncode == 1
        # naming the daemon that holds it (an operator trial was left to guess)
        assert f"locked by another process (an hsmca serve runs on this state directory, " \
            f"at {d.url})" in second.stderr, second.stderr
        assert second.stderr.count("\n") == 1
    finally:
        assert d.stop() == 0
    log = ca.state / "audit/log.jsonl"
    original = log.read_bytes()
    lines = original.splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:3]))
    proc = hsmca("serve", "--config", ca.state / "hsmca.toml", "--listen", "127.0.0.1:0",
                 check=False)
    # (The inventory's certificates name lines past the cut: that is said first.)
    assert proc.returncode == 1 and "the log was cut or replaced" in proc.stderr, proc.stderr
    tampered = original.replace(b'"event":"init.start"', b'"event":"init.strat"', 1)
    log.write_bytes(tampered)
    proc = hsmca("serve", "--config", ca.state / "hsmca.toml", "--listen", "127.0.0.1:0",
                 check=False)
    assert proc.returncode == 1 and "rewritten" in proc.stderr, proc.stderr
    # A line past the last checkpoint (the intent of the checkpoint that closes the
    # log: it cannot cover itself), altered: start-up reads it, and refuses too.
    at = max(i for i, line in enumerate(lines)
             if b'"purpose":"checkpoint"' in line and b'"phase":"intent"' in line)
    assert b'"actor":"local"' in lines[at]
    altered = list(lines)
    altered[at] = lines[at].replace(b'"actor":"local"', b'"actor":"lokal"')
    log.write_bytes(b"".join(altered))
    proc = hsmca("serve", "--config", ca.state / "hsmca.toml", "--listen", "127.0.0.1:0",
                 check=False)
    assert proc.returncode == 1 and "was rewritten: the prev recorded in line seq " \
        f"{at + 1} is not the SHA-256 of the line before it" in proc.stderr, proc.stderr
    log.write_bytes(original)
    assert audit_verify(ca.state).returncode == 0


def test_nothing_of_consequence_may_follow_a_clean_stop(tmp_path: Path) -> None:
    """A stopped daemon's log ends in daemon.stop, which its final checkpoint covers,
    then that checkpoint's own lines and the HSM logout. A line appended after them by
    anyone with write access would be signed over by the next start's first checkpoint
    and then pass every verification (auditor trial): the start refuses it, whatever
    was done to the closing lines, and however many lines were added (a review found
    both ways round a first version). What a start or a ceremony cut short leaves is let
    through; a log whose closing lines were cut is refused, since the checkpoint file is
    written after them."""
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state)
    assert d.stop() == 0
    log = ca.state / "audit/log.jsonl"
    lines = log.read_bytes().splitlines()
    assert json.loads(lines[-1])["event"] == "hsm.logout"
    last = json.loads(lines[-1])
    opened = [json.loads(line) for line in lines
              if json.loads(line)["event"] in ("hsm.open", "hsm.login")][:2]

    def serve() -> subprocess.CompletedProcess[str]:
        return hsmca("serve", "--config", ca.state / "hsmca.toml", "--listen", "127.0.0.1:0",
                     check=False)

    def appended(keep: list[bytes], *objs: dict[str, Any]) -> int:
        """`keep`, then `objs` numbered and chained after them; the seq of the first."""
        added = [json.dumps(o | {"seq": len(keep) + i, "ts": last["ts"]}).encode()
                 for i, o in enumerate(objs)]
        log.write_bytes(b"\n".join(rechain([*keep, *added], len(keep))) + b"\n")
        return len(keep)

    forged = {"event": "cert.revoke", "actor": "cert:00:CN=forged", "reason": "keyCompromise",
              "serial": "deadbeef", "serials": ["deadbeef"]}
    checkpoint = ca.state / "audit/checkpoint"
    final = checkpoint.read_text()
    older = [json.loads(line)["checkpoint"] for line in lines
             if b'"checkpoint":"' in line][-2]  # the one signed before daemon.stop
    for keep, before, cp in (
            (lines, [], final),                # after the logout
            (lines[:-1], [], final),           # the logout dropped first
            # a crashed start's lines first, more than a bundle of them, and the tiles
            # built again from the whole log
            (lines, [opened[0]] * 600, final),
            (lines, [], older),                # an older checkpoint file put in place
            # the final checkpoint's lines and the logout cut, that file too: the
            # daemon.stop is no checkpoint's last line any more
            (lines[:-3], [], older)):
        checkpoint.write_text(cp)
        at = appended(keep, *before, forged) + len(before)
        proc = serve()
        assert proc.returncode == 1 and proc.stderr.count("\n") <= 2, proc.stderr
        assert f"seq {at} after it is 'cert.revoke'" in proc.stderr, proc.stderr
        assert "lines were appended to the stopped log" in proc.stderr
        shutil.rmtree(ca.state / "audit/tiles")  # built again from the whole log next
    checkpoint.write_text(final)

    log.write_bytes(b"\n".join(lines[:-3]) + b"\n")  # the closing lines cut
    proc = serve()
    assert proc.returncode == 1 and "the end of the log was cut" in proc.stderr, proc.stderr

    # A root rotation cut short after its key was made (the HSM failed, or ^C): its
    # session, its start and the key's generation, then its logout.
    keygen = next(json.loads(line) for line in lines if b'"hsm.keygen"' in line)
    appended(lines, *opened, {"event": "key.ceremony", "what": "root rotation",
                              "phase": "start", "previous": "root-ca"},
             keygen, {**last})
    d = start_daemon(ca.state)
    assert d.stop() == 0
    assert audit_verify(ca.state).returncode == 0


CHILD = textwrap.dedent("""
    import sys, threading, uuid
    from pathlib import Path
    from ca.audit.log import AuditLog
    log = AuditLog.open(Path(sys.argv[1]))
    log.record("daemon.start", {}).result()
    out_lock = threading.Lock()
    def writer(t):
        while True:
            op = uuid.uuid4().hex
            log.record("hsm.sign", {"phase": "intent", "op_id": op}).result()
            seq = log.record("hsm.sign", {"phase": "outcome", "op_id": op,
                                          "result": "ok"}).result()
            with out_lock:
                print(seq, op, flush=True)
    for t in range(8):
        threading.Thread(target=writer, args=(t,), daemon=True).start()
    threading.Event().wait()
""")


def test_sigkill_under_load_never_loses_a_durable_line(tmp_path: Path) -> None:
    """A child appends from 8 threads; it is killed at random points, 8 rounds."""
    path = tmp_path / "log.jsonl"
    rng = random.Random(1234)
    reported: dict[int, str] = {}
    for _ in range(8):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        want = rng.randint(1, 400)
        for _ in range(want):
            line = child.stdout.readline()
            assert line, "child died before reporting"
            seq, op = line.split()
            reported[int(seq)] = op
        child.send_signal(signal.SIGKILL)
        child.wait()
    log = AuditLog.open(path)  # recovery, as a restart would do
    log.record("daemon.start", {}).result()
    log.close()
    data = path.read_bytes()
    result = verify_log(data, ed25519.Ed25519PrivateKey.generate().public_key(), "x")
    assert result.ok, (result.bad_seq, result.reason)
    lines = data.splitlines()
    for seq, op in reported.items():
        obj = json.loads(lines[seq])
        assert obj["op_id"] == op and obj["phase"] == "outcome"


# A child process with its own audit log and HSM worker on the CA's token, which
# has signed once; the scripts below continue its main() and play with RLIMIT_FSIZE.
CHILD_SIGNER = textwrap.dedent("""
    import asyncio, json, os, resource, signal, sys
    from pathlib import Path
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from ca.audit.log import AuditLog
    from hsm.errors import AuditUnavailable
    from ca.issuance.pipeline import SigningPipeline
    from hsm.session import HSMConfig
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    path, module, token, pin = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]

    async def main():
        log = AuditLog.open(path)
        worker = SigningPipeline(HSMConfig(module, token, "file:" + pin), log)
        worker.start()
        key = await worker.load_key("issuing-ca")
        sign = lambda: worker.sign(key.label, lambda k: k.sign(b"m", ec.ECDSA(hashes.SHA256())),
                                   purpose="x509", actor="local")
        await sign()
""")
FAIL_CLOSED = CHILD_SIGNER + textwrap.dedent("""
        size = os.path.getsize(path)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 50, hard))
        before = worker.hsm.sign_calls
        results = []
        for _ in range(3):
            try:
                await sign()
                results.append("signed")
            except AuditUnavailable as exc:
                results.append("refused")
        refused_health = log.healthy
        signed_while_full = worker.hsm.sign_calls - before
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        await sign()
        print(json.dumps({"results": results, "signed_while_full": signed_while_full,
                          "healthy_while_full": refused_health, "healthy_after": log.healthy,
                          "problem": str(log.problem)}))
        worker.close(); log.close()
    asyncio.run(main())
""")


# The log's disk fills once the intent is durable, so the outcome cannot be written, and
# the inventory's commit is given up on (a database that stopped answering).
OUTCOME_AND_ROW_FAIL = CHILD_SIGNER + textwrap.dedent("""
        import concurrent.futures as cf
        from ca.issuance.pipeline import SigningJob
        from ca.store.errors import StoreUnavailable
        handed = []
        worker.on_unreleased = lambda purpose, serial, seq: handed.append([purpose, serial])
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

        def build(k):
            out = k.sign(b"m", ec.ECDSA(hashes.SHA256()))
            resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path), hard))
            return out

        def record(out):
            given_up = cf.Future()
            given_up.set_exception(StoreUnavailable("no answer within 10 s"))
            return given_up
        try:
            await worker.submit(SigningJob(key.label, "x509", "local", build,
                                           {"serial": "5e771ed"}, record=record))
            result = "released"
        except Exception as exc:
            result = type(exc).__name__
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        print(json.dumps({"result": result, "handed": handed}))
        worker.close(); log.close()
    asyncio.run(main())
""")


def test_a_certificate_whose_outcome_and_row_both_failed_goes_to_the_check(
        ca: InitialisedCA, tmp_path: Path) -> None:
    """A trial lost PostgreSQL's synchronous standby: a certificate's outcome line and its
    inventory row were both given up on, so neither the 'outcome not written' path (which
    waited for a row that committed) nor the 'row not committed' one (which needs the
    outcome written) ran; the row landed later, live and OCSP-good, held by nobody. It is
    handed to the check for certificates signed and never released, which waits for a
    commit that may still land."""
    out = run_signer_child(OUTCOME_AND_ROW_FAIL, ca, tmp_path / "log.jsonl")
    assert out["result"] == "AuditUnavailable", out  # never released
    assert out["handed"] == [["x509", "5e771ed"]], out


def run_signer_child(script: str, ca: InitialisedCA, path: Path) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", script, str(path), ca.token.module,
                           ca.token.label, str(ca.token.pin_file)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def test_fail_closed_when_the_log_cannot_grow(ca: InitialisedCA, tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    out = run_signer_child(FAIL_CLOSED, ca, path)
    assert out["results"] == ["refused"] * 3
    assert out["signed_while_full"] == 0, "the HSM signed while the log could not be written"
    assert out["healthy_while_full"] is False and out["healthy_after"] is True
    result = verify_log(path.read_bytes(), ed25519.Ed25519PrivateKey.generate().public_key(),
                        "x")
    assert result.ok, result.reason


def test_daemon_pushes_checkpoints_to_a_file_witness(tmp_path: Path) -> None:
    ca = init_ca(tmp_path)
    cfg = ca.state / "hsmca.toml"
    witness = tmp_path / "witness" / "checkpoint"
    witness.parent.mkdir()
    cfg.write_text(cfg.read_text().replace("witnesses = []", f'witnesses = ["{witness}"]'))
    d = start_daemon(ca.state)
    assert d.stop() == 0
    held = witness.read_text()
    assert held == (ca.state / "audit/checkpoint").read_text()
    size = int(held.splitlines()[1])
    lines = (ca.state / "audit/log.jsonl").read_bytes().splitlines()
    assert json.loads(lines[size - 1])["event"] == "daemon.stop"  # the last checkpoint covers it


def test_missing_checkpoint_file_does_not_switch_the_start_check_off(tmp_path: Path) -> None:
    ca = init_ca(tmp_path)
    (ca.state / "audit/checkpoint").unlink()
    log = ca.state / "audit/log.jsonl"
    # A careful forger repairs the hash chain after the line they change: what catches
    # them is the checkpoint the log itself records.
    lines = log.read_bytes().replace(b'"event":"init.start"', b'"event":"init.strat"',
                                     1).split(b"\n")[:-1]
    log.write_bytes(b"".join(line + b"\n" for line in rechain(lines, 0)))
    proc = hsmca("serve", "--config", ca.state / "hsmca.toml", "--listen", "127.0.0.1:0",
                 check=False)
    assert proc.returncode == 1 and "the checkpoint recorded at seq" in proc.stderr, proc.stderr


OWED = CHILD_SIGNER + textwrap.dedent("""
        # The last intent, wherever the HSM's open and login lines fell around it.
        intent_len = max(len(line) for line in path.read_bytes().splitlines()
                         if b'"phase":"intent"' in line) + 1
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        # Room for the next intent, not for its outcome: the HSM signs, the outcome
        # cannot be written, the signature must not be released.
        resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) + intent_len + 20,
                                                   hard))
        before = worker.hsm.sign_calls
        try:
            await sign()
            outcome = "released"
        except AuditUnavailable:
            outcome = "withheld"
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        await sign()
        print(json.dumps({"outcome": outcome, "signed": worker.hsm.sign_calls - before}))
        worker.close(); log.close()
    asyncio.run(main())
""")


def test_outcome_owed_after_a_failed_write_is_written_first(ca: InitialisedCA,
                                                            tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    out = run_signer_child(OWED, ca, path)
    assert out == {"outcome": "withheld", "signed": 2}
    result = verify_log(path.read_bytes(), ed25519.Ed25519PrivateKey.generate().public_key(),
                        "x")
    assert result.ok, result.reason  # no intent left open without a crash to excuse it
    lines = [json.loads(line) for line in path.read_bytes().splitlines()]
    late = [i for i, e in enumerate(lines) if e.get("released") is False]
    assert len(late) == 1 and lines[late[0]]["phase"] == "outcome"
    assert lines[late[0]]["result"] == "ok"
    # The first batch written again begins with log.resume, saying why writes failed,
    # though nothing but the next signature wrote it.
    resume = lines[late[0] - 1]
    assert resume["event"] == "log.resume", resume
    assert resume["after"].startswith(f"cannot write the audit log {path}: "), resume


@pytest.mark.asyncio(loop_scope="session")
async def test_the_checkpointer_outlives_a_failure_it_did_not_expect(
        worker: SigningPipeline, tmp_path: Path) -> None:
    """A failure that is neither the HSM's nor the log's (the inventory the audit keys
    are read from, busy for a moment) is logged and tried again at the next tick: the
    log keeps getting checkpoints. (Before, the task died with it, silently, and the
    log went without checkpoints until a restart.)"""
    from ca.audit.checkpointer import Checkpointer
    audit = worker._audit
    key = await worker.load_key("audit")
    asked: list[int] = []

    async def keys() -> list[Any]:
        asked.append(1)
        if len(asked) == 1:
            raise RuntimeError("database is locked")
        return [key]

    written = asyncio.Event()

    async def on_checkpoint(_size: int, _text: str) -> None:
        written.set()

    checkpointer = Checkpointer(audit, worker, keys, "test.example/audit",  # type: ignore[arg-type]
                                tmp_path / "checkpoint", min_interval=0.01,
                                on_checkpoint=on_checkpoint)
    task = asyncio.create_task(checkpointer.run())
    try:
        await audit.append("test.line")  # something to checkpoint
        await asyncio.wait_for(written.wait(), 30)
        alive = not task.done()
    finally:
        task.cancel()
    assert alive and len(asked) >= 2  # the first try failed, a later one signed
    assert (tmp_path / "checkpoint").read_text().startswith("test.example/audit\n")


def test_a_log_cut_with_its_tiles_and_checkpoint_is_refused_by_the_inventory(
        tmp_path: Path) -> None:
    """Cut the log and remove what start-up checks it against (tiles, checkpoint), and
    the log alone looks whole: the inventory's certificates still name the lines they
    were signed at, and the start refuses a log shorter than that."""
    from tests.helpers import enroll
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state)
    try:
        enroll(d, tmp_path, "service", ["cut.test"])
    finally:
        assert d.stop() == 0
    log = ca.state / "audit/log.jsonl"
    original = log.read_bytes()
    lines = original.splitlines(keepends=True)
    signed = max(i for i, line in enumerate(lines)
                 if b'"purpose":"x509"' in line and b'"phase":"intent"' in line)
    log.write_bytes(b"".join(lines[:signed]))
    shutil.move(ca.state / "audit/tiles", tmp_path / "tiles")
    shutil.move(ca.state / "audit/checkpoint", tmp_path / "checkpoint")
    said = f"hsmca: error: the audit log {log} has {signed} lines, but the inventory " \
           f"({ca.state / 'hsmca.sqlite3'}) "
    cut = (": the log was cut or replaced (tampering or loss). Refusing to start; restore "
           "the log and run `hsmca audit verify`\n")
    # The message says which evidence it is: the last checkpoint, as the daemon noted
    # it (a trial could not tell it from a certificate's line)...
    proc = hsmca("serve", "--config", ca.state / "hsmca.toml", "--listen", "127.0.0.1:0",
                 check=False)
    assert proc.returncode == 1 and proc.stderr == (
        f"{said}noted a checkpoint of the log's first "
        f"{parse_checkpoint((tmp_path / 'checkpoint').read_text()).size} lines{cut}"), proc.stderr
    assert not (ca.state / "audit/tiles").exists()  # refused before building anything
    # ...and without that note, the certificate's own line.
    with sqlite3.connect(ca.state / "hsmca.sqlite3") as db:
        db.execute("DELETE FROM meta WHERE k = 'audit_seen'")
    proc = hsmca("serve", "--config", ca.state / "hsmca.toml", "--listen", "127.0.0.1:0",
                 check=False)
    assert proc.returncode == 1 and proc.stderr == (
        f"{said}records a certificate whose intent is the log's line {signed} (seq, "
        f"from 0){cut}"), proc.stderr
    log.write_bytes(original)
    shutil.move(tmp_path / "tiles", ca.state / "audit/tiles")
    shutil.move(tmp_path / "checkpoint", ca.state / "audit/checkpoint")
    assert audit_verify(ca.state).returncode == 0


def test_a_log_cut_back_past_ssh_certificates_is_refused_by_the_inventory(
        tmp_path: Path) -> None:
    """An auditor trial put back an older copy of the log, its checkpoint and tiles,
    cut before 150 SSH certificates (which name no line in the inventory) and after the
    last X.509 one: the daemon started, and signed the shorter, forked history. The
    inventory notes the size each checkpoint covered, and the start refuses a log
    shorter than that."""
    import subprocess

    from tests.helpers import enroll
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state)
    try:
        cred = enroll(d, tmp_path, "user", ["carol@example.com"], ("--principal", "carol"))
    finally:
        assert d.stop() == 0
    older = tmp_path / "older"
    shutil.copytree(ca.state / "audit", older)
    d = start_daemon(ca.state)
    try:
        key = tmp_path / "id_carol"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True)
        for _ in range(3):
            hsmca("ssh", "user", "--url", d.url, "--ca", d.root, "--cert", cred[0], "--key",
                  cred[1], "--pubkey", f"{key}.pub")
    finally:
        assert d.stop() == 0
    newer = tmp_path / "newer"
    shutil.move(ca.state / "audit", newer)
    shutil.copytree(older, ca.state / "audit")
    proc = hsmca("serve", "--config", ca.state / "hsmca.toml", "--listen", "127.0.0.1:0",
                 check=False)
    assert proc.returncode == 1 and "but the inventory" in proc.stderr and \
        "noted a checkpoint of the log's first" in proc.stderr and \
        "the log was cut or replaced" in proc.stderr, proc.stderr
    shutil.rmtree(ca.state / "audit")
    shutil.move(newer, ca.state / "audit")
    d = start_daemon(ca.state)
    assert d.stop() == 0


def test_a_state_file_in_a_directory_that_does_not_exist_is_named(ca: InitialisedCA,
                                                                   tmp_path: Path) -> None:
    """Said before any work, in one line: by `audit verify`, and by the web view, which
    started, verified the whole log and then said "the verification crashed:
    FileNotFoundError" on every page (a web trial)."""
    state = tmp_path / "no-such-dir" / "auditor.json"
    key = ca.state / "audit/audit_key.pem"
    for command in (["audit", "verify", "--log", ca.state / "audit/log.jsonl", "--key", key],
                    ["ui", "--url", "https://127.0.0.1:1", "--ca", ca.state / "x509/root.pem",
                     "--cert", ca.state / "admin/cert.pem", "--key",
                     ca.state / "admin/key.pem", "--audit-key", key]):
        proc = hsmca(*command, "--state", state, check=False)
        assert proc.returncode == 2 and proc.stdout == "", proc
        assert proc.stderr.count("\n") == 1 and f"argument --state: {state}: the directory " \
            f"{state.parent} does not exist" in proc.stderr, proc.stderr


def test_make_audit_log_grows_a_ca_log_twice_and_a_new_directory_once(tmp_path: Path) -> None:
    """scripts/make-audit-log, which docs/performance.md uses for big logs: run twice on
    one CA, its op_ids began at 0 again and the log failed verification from the second
    run on (duplicate intent; auditor trial); its standalone mode did not run at all."""
    ca = init_ca(tmp_path)
    script = Path(__file__).resolve().parents[1] / "scripts" / "make-audit-log"
    for lines in (1500, 3000):
        run = subprocess.run([sys.executable, script, "--config", ca.state / "hsmca.toml",
                              "--lines", str(lines), "--checkpoint-every", "1000"],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)["lines"] == lines
    audit_verify(ca.state, ok=True)
    out = tmp_path / "standalone"
    for expect in (0, 1):
        run = subprocess.run([sys.executable, script, "--out", out, "--lines", "700"],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == expect, run.stderr
    assert "already holds a log; give a new --out directory" in run.stderr
    proc = hsmca("audit", "verify", "--log", out / "log.jsonl", "--key", out / "audit_key.pem",
                 check=False)
    assert proc.returncode == 0 and proc.stdout.startswith("OK: 700 lines"), proc.stderr


def test_a_checkpoint_failure_whose_wording_alternates_is_said_once_per_wording() -> None:
    """PostgreSQL away: its error alternated between two wordings from one retry to the
    next, and each retry was logged again (a cluster trial saw six lines in 12 s). Each
    wording is said once while the outage lasts; a new outage says them again."""
    from ca.audit.checkpointer import Checkpointer
    c = Checkpointer.__new__(Checkpointer)
    c._failing, c._said_errors = None, set()
    said = [c._failed(e) for e in ("cannot connect: refused", "connection failed: refused",
                                   "cannot connect: refused", "connection failed: refused")]
    assert said == [True, True, False, False]
    c._failing = None  # a checkpoint was signed: the outage is over
    assert c._failed("connection failed: refused")

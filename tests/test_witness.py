"""Witnesses over HTTP (C2SP tlog-witness): `hsmca witness serve` as an auditor runs
it, answered request by request; and two of them following a real daemon, which
publishes their cosignatures, until the log is rewritten on the CA host and
re-signed with the real key, which both refuse; and one that follows the audit key's
rotation, whose cosignatures `hsmca ui` still counts, beside one that is not given the
new key and refuses. Each refusal is in the daemon's /metrics, by witness and reason.

Cosignatures are checked here from c2sp.org/tlog-cosignature's text, not with
ca/audit/cosignature.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import shutil
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from ca.audit.note import parse_checkpoint, sign_checkpoint, verifier_key
from ca.audit.witnessing import REASONS, HTTPWitness, WitnessError
from tests.conftest import Daemon, InitialisedCA, hsmca, init_ca, set_config
from tests.helpers import Running, audit_verify, enroll, log_lines, metric_samples
from tests.ports import free_port
from tests.test_audit_remote import (
    _ATTACKER_SIGNS,
    REPO,
    mth,
    proof,
    rewrite_line,
)

# ---- from the specifications, independently ------------------------------------------------


def cosigner_key_id(name: str, pub: bytes) -> bytes:
    """tlog-cosignature: SHA-256(<name> || "\\n" || 0x04 || 32-byte public key)[:4]."""
    return hashlib.sha256(name.encode() + b"\n\x04" + pub).digest()[:4]


def cosignatures_by(note: str, name: str, pub: bytes) -> list[int]:
    """The timestamps of the valid Ed25519 cosignatures by (name, pub) on `note`."""
    body = note[:note.index("\n\n") + 1]
    found = []
    for line in note[note.index("\n\n") + 2:].splitlines():
        dash, signer, blob = line.split(" ")
        raw = base64.b64decode(blob)
        if dash != "\u2014" or signer != name or raw[:4] != cosigner_key_id(name, pub):
            continue
        timestamp = int.from_bytes(raw[4:12], "big")
        message = f"cosignature/v1\ntime {timestamp}\n{body}".encode()
        ed25519.Ed25519PublicKey.from_public_bytes(pub).verify(raw[12:], message)
        found.append(timestamp)
    return found


# ---- a witness process -----------------------------------------------------------------------


class WitnessProcess:
    def __init__(self, tmp: Path, name: str, logs: dict[str, str]) -> None:
        self.name = name
        self.dir = tmp / name.replace("/", "_")
        self.dir.mkdir()
        self.key = ed25519.Ed25519PrivateKey.generate()
        self.pub = self.key.public_key().public_bytes(serialization.Encoding.Raw,
                                                      serialization.PublicFormat.Raw)
        key_file = self.dir / "witness.key"
        key_file.write_bytes(self.key.private_bytes(serialization.Encoding.PEM,
                                                    serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
        key_file.chmod(0o600)
        # A port of this test worker's block: pin() restarts it on the same one, which a
        # kernel-chosen port may meanwhile be given to another worker's server.
        self.args = ["witness", "serve", "--key-file", key_file, "--name", name,
                     "--listen", f"127.0.0.1:{free_port()}"]
        for origin, vkey in logs.items():
            self.args += ["--log", f"{origin}={vkey}"]
        self.start(new=True)

    def start(self, new: bool = False) -> None:
        """`new`: its first run, which makes its state file."""
        self.run = Running.start(*self.args, *(["--new-state"] if new else []))
        with self.run.cond:
            self.run.cond.wait_for(lambda: len(self.run.stdout) >= 2
                                   or self.run.proc.poll() is not None, timeout=60)
        assert len(self.run.stdout) >= 2, "".join(self.run.raw)
        listening, vkey = self.run.stdout[:2]
        assert listening.startswith("listening on http://127.0.0.1:"), listening
        self.url = listening.split()[-1]
        assert vkey.startswith("verifier key: ")
        self.vkey = vkey.split()[-1]
        # The vkey is name + key id + base64(0x04 || key): what a CA configures.
        assert self.vkey == (f"{self.name}+{cosigner_key_id(self.name, self.pub).hex()}+"
                             + base64.b64encode(b"\x04" + self.pub).decode())

    def pin(self, logs: dict[str, str]) -> None:
        """Restart at the same address following `logs`: what an auditor does to give
        the witness a log's new key (docs/keys.md)."""
        assert self.run.stop() == 0
        url, port = self.url, self.url.rsplit(":", 1)[1]
        self.args = [*self.args[:self.args.index("--listen")], "--listen", f"127.0.0.1:{port}"]
        for origin, vkey in logs.items():
            self.args += ["--log", f"{origin}={vkey}"]
        self.start()
        assert self.url == url

    @property
    def state(self) -> dict[str, int]:
        doc = json.loads((self.dir / "witness-state.json").read_text())
        return {origin: held["size"] for origin, held in doc["logs"].items()}

    def add(self, old: int | str, hashes: list[bytes], checkpoint: str) -> tuple[int, str, str]:
        body = f"old {old}\n" + "".join(base64.b64encode(h).decode() + "\n"
                                         for h in hashes) + "\n" + checkpoint
        request = urllib.request.Request(f"{self.url}/add-checkpoint", data=body.encode(),
                                         method="POST")
        try:
            # The header whole: C2SP's clients (Tessera's) compare it as a string, and
            # "text/x.tlog.size; charset=utf-8" was no size to them (a witness trial).
            with urllib.request.urlopen(request, timeout=30) as resp:
                return resp.status, resp.headers["Content-Type"], resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers["Content-Type"], exc.read().decode()


def log_key(state: Path) -> tuple[str, str]:
    """The CA's checkpoint origin and its log's verifier key: what a witness is given."""
    origin = parse_checkpoint((state / "audit" / "checkpoint").read_text()).origin
    audit_pub = serialization.load_pem_public_key((state / "audit" / "audit_key.pem")
                                                  .read_bytes())
    assert isinstance(audit_pub, ed25519.Ed25519PublicKey)
    return origin, verifier_key(origin, audit_pub)


def serve(cfg: Path) -> tuple[Running, str]:
    """`hsmca serve`, its stderr read as it comes; and its URL."""
    d = Running.start("serve", "--config", cfg, "--listen", "127.0.0.1:0")
    with d.cond:
        d.cond.wait_for(lambda: d.stdout or d.proc.poll() is not None, timeout=90)
    assert d.stdout and d.stdout[0].startswith("listening on "), "".join(d.raw)
    return d, d.stdout[0].split()[-1]


def cosigned_from_here(d: Running, handle: Daemon, witnesses: list[WitnessProcess]) -> int:
    """A line written now (a token's creation), then the wait until each of `witnesses`
    has cosigned a checkpoint that covers it, and so everything written before it. The
    size of the largest of those checkpoints."""
    request = urllib.request.Request(
        f"{handle.url}/v1/tokens", headers={"Content-Type": "application/json"},
        data=json.dumps({"role": "service", "names": ["mark.witness.example"],
                         "ttl": "15m"}).encode())
    with urllib.request.urlopen(request, context=handle.admin_ssl(), timeout=60) as answer:
        assert answer.status == 201
    mark = max(line["seq"] for line in log_lines(handle.state)
               if line["event"] == "token.create")

    def cosigned() -> dict[str, int]:
        return {e["witness"]: e["size"] for e in d.lines
                if e.get("event") == "witness cosigned the checkpoint" and e["size"] > mark}

    with d.cond:
        d.cond.wait_for(lambda: all(w.url in cosigned() for w in witnesses)
                        or d.proc.poll() is not None, timeout=150)
        found = cosigned()
    assert all(w.url in found for w in witnesses), "".join(d.raw[-40:])
    return max(found.values())


def witness_metrics(handle: Daemon) -> dict[tuple[str, ...], float]:
    """The daemon's hsmca_witness_* samples: (name, witness) or (name, witness, reason)
    -> value."""
    with urllib.request.urlopen(f"{handle.url}/metrics", context=handle.ssl(),
                                timeout=60) as answer:
        samples = metric_samples(answer.read().decode())
    return {(name, labels["witness"], *([labels["reason"]] if "reason" in labels else [])): v
            for (name, pairs), v in samples.items() if name.startswith("hsmca_witness_")
            for labels in [dict(pairs)]}


def test_witness_answers_as_c2sp_says_and_keeps_its_state(tmp_path: Path) -> None:
    origin = "witness.test/audit"
    log_key = ed25519.Ed25519PrivateKey.generate()
    lines = [f'{{"seq":{i}}}'.encode() for i in range(40)]
    forked = [*lines[:5], b'{"seq":5,"hidden":true}', *lines[6:]]

    def cp(d: list[bytes], size: int, key: ed25519.Ed25519PrivateKey = log_key) -> str:
        return sign_checkpoint(origin, size, mth(d[:size]), origin, key.public_key(), key.sign)

    w = WitnessProcess(tmp_path, "witness.test/w1",
                       {origin: verifier_key(origin, log_key.public_key())})
    try:
        status, _, body = w.add(0, [], cp(lines, 10))  # trusted on first use
        assert status == 200, body
        with urllib.request.urlopen(f"{w.url}/", timeout=30) as resp:  # (a security trial)
            assert resp.headers["Server"] == "hsmca-witness", resp.headers
        assert cosignatures_by(cp(lines, 10) + body, w.name, w.pub)
        assert w.state == {origin: 10}

        assert w.add(0, [], cp(lines, 20)) == (409, "text/x.tlog.size", "10\n")
        assert w.add(12, proof(12, lines[:20]), cp(lines, 20))[:2] == (
            409, "text/x.tlog.size")
        status, ctype, _ = w.add(10, [], cp(forked, 10))  # same size, another root
        assert status == 409 and ctype != "text/x.tlog.size"
        assert w.add(10, proof(10, forked[:20]), cp(forked, 20))[0] == 422
        assert w.add(10, proof(10, lines[:20])[1:], cp(lines, 20))[0] == 422
        # A smaller tree than the one held (a log cut, or restored from a backup): the
        # protocol's answer, and the checkpoint kept as evidence (a docs trial: nothing).
        assert w.add(0, [], cp(lines, 5)) == (409, "text/x.tlog.size", "10\n")
        cut = w.run.wait("refused", size=5)  # its log line may come after its answer
        assert cut["checkpoint"] == cp(lines, 5) and "restored from a backup" in cut["reason"]
        assert w.add(30, [], cp(lines, 20))[0] == 400  # old above the new size
        assert w.add("\u00b2", [], cp(lines, 20))[0] == 400  # a digit only to isdigit()
        assert w.add(10, [b"\x00" * 5], cp(lines, 20))[0] == 400
        other = ed25519.Ed25519PrivateKey.generate()
        assert w.add(10, proof(10, lines[:20]), cp(lines, 20, other))[0] == 403
        stranger = sign_checkpoint("other.test/log", 3, mth(lines[:3]), "other.test/log",
                                   other.public_key(), other.sign)
        assert w.add(0, [], stranger)[0] == 404
        assert w.state == {origin: 10}  # nothing refused moved it
        # the cut, 409 root, 422 twice: evidence, with the checkpoint; the 403 (signed by
        # another key: anyone could send it) is no evidence, and its body is not logged.
        w.run.wait("refused", count=4)  # its log lines may come after its answers
        assert len(w.run.events("refused")) == 4
        stranger_said = w.run.wait("not signed by the log's key")
        assert "checkpoint" not in stranger_said and stranger_said["origin"] == origin

        status, _, body = w.add(10, proof(10, lines[:20]), cp(lines, 20))
        assert status == 200 and cosignatures_by(cp(lines, 20) + body, w.name, w.pub)
        assert w.state == {origin: 20}
        assert w.add(20, [], cp(lines, 20))[0] == 200  # the same tree again

        # Durable: a restarted witness remembers what it cosigned.
        assert w.run.stop() == 0
        w.start()
        assert w.add(0, [], cp(lines, 40)) == (409, "text/x.tlog.size", "20\n")
        second = hsmca(*w.args, check=False)  # one process per state file
        assert second.returncode == 1 and "in use by another witness" in second.stderr
        assert w.run.stop() == 0
        # --new-state left in a unit file would start over once the state is lost:
        # refused while the state exists
        again = hsmca(*w.args, "--new-state", check=False)
        assert again.returncode == 1 and "--new-state is for a witness's first run only" \
            in again.stderr, again.stderr
        # A lost state (an auditor trial: the witness started over without a word and
        # cosigned a log rolled back meanwhile) stops it, saying what to do.
        state = w.dir / "witness-state.json"
        state.rename(w.dir / "elsewhere.json")
        lost = hsmca(*w.args, check=False)
        assert lost.returncode == 1 and lost.stderr.count("\n") == 1, lost.stderr
        assert f"the witness state {state} does not exist" in lost.stderr and \
            "restore it from a backup" in lost.stderr and "--new-state" in lost.stderr
        assert not state.exists()
    finally:
        w.run.stop()


def test_daemon_feeds_two_witnesses_which_refuse_a_rewritten_re_signed_log(
        tmp_path: Path) -> None:
    ca = init_ca(tmp_path)
    cfg = ca.state / "hsmca.toml"
    origin, log_vkey = log_key(ca.state)
    witnesses = [WitnessProcess(tmp_path, f"w{i}.test/witness", {origin: log_vkey})
                 for i in (1, 2)]
    set_config(ca.state, "audit", "witnesses", [w.url for w in witnesses])
    set_config(ca.state, "audit", "witness-keys", [w.vkey for w in witnesses])
    daemons: list[Running] = []

    try:
        d, url = serve(cfg)
        daemons.append(d)
        for w in witnesses:
            w.run.wait("cosigned")  # the checkpoint signed at start
        early = (ca.state / "audit" / "checkpoint.cosigned").read_text()
        handle = Daemon(url, d.proc, ca.state, [])
        enroll(handle, tmp_path, "service", ["svc.witness.example"])
        assert d.stop() == 0
        final = (ca.state / "audit" / "checkpoint").read_text()
        size = parse_checkpoint(final).size
        for w in witnesses:  # the final checkpoint reached both before the daemon exited
            assert w.state == {origin: size}
        cosigned = (ca.state / "audit" / "checkpoint.cosigned").read_text()
        assert cosigned.startswith(final)
        for w in witnesses:
            assert len(cosignatures_by(cosigned, w.name, w.pub)) == 1
        # An auditor checks the cosignatures offline (checkpoint.cosigned by default).
        keys = [a for w in witnesses for a in ("--witness-key", w.vkey)]
        proc = audit_verify(ca.state, *keys)
        lines = len((ca.state / "audit" / "log.jsonl").read_bytes().splitlines())
        # ...and is told how much of the log they vouch for, and since when
        assert proc.returncode == 0 and re.search(
            f"cosigned: the checkpoint .*, {size} of the {lines} lines, by 2 witnesses "
            r"\(w1.test/witness, w2.test/witness\), latest cosignature 20\d\d-", proc.stdout), \
            proc.stdout
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from ca.audit.cosignature import cosigner_key
        stranger = str(cosigner_key("w3.test/witness",
                                    Ed25519PrivateKey.generate().public_key()))
        proc = audit_verify(ca.state, *keys, "--witness-key", stranger)
        assert proc.returncode == 1 and proc.stderr.startswith(
            "FAILED (no line): the checkpoint") and "no valid cosignature by w3.test/witness+" \
            in proc.stderr, proc.stderr
        # The log cut back to an older cosigned checkpoint, the daemon's newer checkpoint
        # beside it: still cut (an auditor trial: with --witness-key, the cosigned file
        # alone was checked, and the cut log passed)
        cut = tmp_path / "cut"
        cut.mkdir()
        kept = (ca.state / "audit" / "log.jsonl").read_bytes().splitlines(keepends=True)
        (cut / "log.jsonl").write_bytes(b"".join(kept[:parse_checkpoint(early).size + 2]))
        (cut / "checkpoint.cosigned").write_text(early)
        shutil.copy(ca.state / "audit" / "checkpoint", cut / "checkpoint")
        assert parse_checkpoint(early).size + 2 < size
        proc = audit_verify(ca.state, *keys, log=cut / "log.jsonl")
        assert proc.returncode == 1 and f"latest checkpoint covers {size} lines" in \
            proc.stderr, proc.stdout + proc.stderr
        # ...and the other way round: an older `checkpoint` put there (every one is in the
        # log) does not hide the cosigned one's size (a review)
        (cut / "checkpoint.cosigned").write_text(cosigned)
        (cut / "checkpoint").write_text(early)
        proc = audit_verify(ca.state, *keys, log=cut / "log.jsonl")
        assert proc.returncode == 1 and f"latest checkpoint covers {size} lines" in \
            proc.stderr, proc.stdout + proc.stderr
        # and one that is not a checkpoint is refused, as without --witness-key
        (cut / "checkpoint").write_text("not a note\n")
        proc = audit_verify(ca.state, *keys, log=cut / "log.jsonl")
        assert proc.returncode == 1 and "is not a checkpoint note" in proc.stderr, proc.stderr
        # A copy of the log alone: the cosignatures are nowhere, and that is what is said
        # (it blamed a checkpoint.cosigned that did not exist, as if it had been checked).
        alone = tmp_path / "copy"
        alone.mkdir()
        shutil.copy(ca.state / "audit" / "log.jsonl", alone / "log.jsonl")
        proc = audit_verify(ca.state, *keys, log=alone / "log.jsonl")
        assert proc.returncode != 0 and proc.stderr == (
            f"hsmca: error: --witness-key checks the cosignatures on the latest checkpoint, "
            f"and there is no {alone / 'checkpoint.cosigned'}: the daemon writes it beside "
            "the log once a witness has cosigned; give the cosigned checkpoint you hold with "
            "--checkpoint\n"), proc.stderr

        # The attacker, root on the CA host, hides a line both witnesses have seen and
        # signs a checkpoint over the result with the real key in the HSM.
        log = ca.state / "audit" / "log.jsonl"
        victim = next(i for i, line in enumerate(log.read_bytes().splitlines())
                      if b'"svc.witness.example"' in line)
        rewrite_line(log, victim, {"names": ["innocent.example"]})
        (ca.state / "audit" / "checkpoint").unlink()
        signer = subprocess.run([sys.executable, "-c", _ATTACKER_SIGNS, cfg], cwd=REPO,
                                capture_output=True, text=True, timeout=60)
        assert signer.returncode == 0, signer.stderr

        d, url = serve(cfg)  # the daemon takes the forged log: it matches "its" checkpoint
        daemons.append(d)
        for w in witnesses:
            refused = w.run.wait("refused")
            assert refused["status"] == 422 and refused["held"] == size, refused
            assert w.state == {origin: size}  # still the honest checkpoint
        for w in witnesses:
            refusal = d.wait("witness refused the checkpoint", witness=w.url)
            assert "does not extend" in refusal["reason"]
        # And counted, for an operator's alert (this run's: each start counts from 0).
        seen = witness_metrics(Daemon(url, d.proc, ca.state, []))
        for w in witnesses:
            assert seen["hsmca_witness_refused_total", w.url, "inconsistent"] >= 1, seen
            assert seen["hsmca_witness_cosigned_total", w.url] == 0, seen
            assert seen["hsmca_witness_refused_total", w.url, "fork"] == 0, seen
        # What was cosigned stays published: the honest checkpoint.
        assert (ca.state / "audit" / "checkpoint.cosigned").read_text() == cosigned
    finally:
        for daemon in daemons:
            daemon.stop()
        for w in witnesses:
            w.run.stop()


def settled_status(base: str) -> dict[str, Any]:
    """The web view's banner once no verification is under way (each answer waits for
    the one under way, up to 20 s)."""
    for _ in range(10):
        with urllib.request.urlopen(f"{base}/status.json", timeout=60) as answer:
            status: dict[str, Any] = json.loads(answer.read())
        if "under way" not in status["detail"]:
            break
    return status


def with_one_witness(tmp_path: Path) -> tuple[InitialisedCA, Path, str, WitnessProcess]:
    """A CA whose [audit] names one witness, running and following its log, with its
    key: the CA, its config, its log's origin, the witness."""
    ca = init_ca(tmp_path)
    origin, log_vkey = log_key(ca.state)
    witness = WitnessProcess(tmp_path, "w1.test/witness", {origin: log_vkey})
    set_config(ca.state, "audit", "witnesses", [witness.url])
    set_config(ca.state, "audit", "witness-keys", [witness.vkey])
    return ca, ca.state / "hsmca.toml", origin, witness


def with_a_witness_at(tmp_path: Path, url: str) -> tuple[InitialisedCA, str]:
    """A CA whose [audit] names `url` as its witness, with a key of its own that no
    witness there holds: the CA and that key (what an auditor would pin)."""
    ca = init_ca(tmp_path)
    pub = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    vkey = (f"w1.test/witness+{cosigner_key_id('w1.test/witness', pub).hex()}+"
            + base64.b64encode(b"\x04" + pub).decode())
    set_config(ca.state, "audit", "witnesses", [url])
    set_config(ca.state, "audit", "witness-keys", [vkey])
    return ca, vkey


def test_a_log_cut_and_grown_again_fails_against_its_own_cosigned_checkpoint(
        tmp_path: Path) -> None:
    """An auditor trial: the operator cut the log back behind what a witness cosigned and
    let it grow again, every checkpoint of the new history signed by the real audit key.
    A fresh auditor has nothing saved to compare with, but the daemon itself serves the
    cosigned checkpoint of the first history (the witness keeps refusing the second):
    the audit key signed two histories. `audit verify --url` said OK, and the web view
    was green; both fail now, whether or not a witness key is pinned."""
    ca, cfg, _, witness = with_one_witness(tmp_path)
    daemons: list[Running] = []
    try:
        d, url = serve(cfg)
        daemons.append(d)
        handle = Daemon(url, d.proc, ca.state, [])
        enroll(handle, tmp_path, "service", ["first.witness.example"])
        assert d.stop() == 0
        cosigned = (ca.state / "audit" / "checkpoint.cosigned").read_text()
        size = parse_checkpoint(cosigned).size
        # The cut: back to just after the last certificate's lines (the inventory names
        # them), the checkpoint and tiles removed; the daemon starts on it.
        log = ca.state / "audit" / "log.jsonl"
        lines = log.read_bytes().splitlines(keepends=True)
        keep = max(i for i, raw in enumerate(lines)
                   if json.loads(raw).get("purpose") in ("x509", "ocsp")) + 1
        assert keep < size
        log.write_bytes(b"".join(lines[:keep]))
        (ca.state / "audit" / "checkpoint").unlink()
        shutil.rmtree(ca.state / "audit" / "tiles")
        # The inventory noted what the checkpoints covered: the start refuses the cut...
        refused = hsmca("serve", "--config", cfg, "--listen", "127.0.0.1:0", check=False)
        assert refused.returncode == 1 and "the log was cut or replaced" in refused.stderr, \
            refused.stderr
        # ...unless the operator rewrites that note too, as one who cuts logs would.
        with sqlite3.connect(ca.state / "hsmca.sqlite3") as db:
            db.execute("DELETE FROM meta WHERE k = 'audit_seen'")
        d, url = serve(cfg)
        daemons.append(d)
        handle = Daemon(url, d.proc, ca.state, [])
        auditor = enroll(handle, tmp_path, "auditor", ["auditor@witness.example"])
        while True:  # grown past the cosigned size, with a checkpoint over it
            enroll(handle, tmp_path, "service", ["again.witness.example"])
            if parse_checkpoint((ca.state / "audit" / "checkpoint").read_text()).size > size:
                break
        witness.run.wait("refused")
        assert (ca.state / "audit" / "checkpoint.cosigned").read_text() == cosigned
        for extra in ((), ("--witness-key", witness.vkey)):
            proc = audit_verify(ca.state, "--state", tmp_path / f"fresh{len(extra)}.state",
                                *extra, served=(handle, auditor))
            assert proc.returncode == 1 and proc.stderr.startswith(
                f"FAILED at seq {size - 1}: the audit key signed a checkpoint of {size} "
                "lines that the witnesses cosigned") and "two histories under one key" in \
                proc.stderr, proc.stdout + proc.stderr
        # The web view, pinned the same way, is red with the same reason.
        ui = Running.start("ui", "--url", url, "--ca", handle.root, "--cert", auditor[0],
                           "--key", auditor[1], "--audit-key",
                           ca.state / "audit" / "audit_key.pem", "--state",
                           tmp_path / "ui.state", "--witness-key", witness.vkey,
                           "--listen", "127.0.0.1:0")
        daemons.append(ui)
        base = ui.listening_url()
        status = settled_status(base)
        assert status["status"] == "failed" and status["banner"].startswith(
            f"FAILED at seq {size - 1}: the audit key signed a checkpoint"), status
    finally:
        for daemon in daemons:
            daemon.stop()
        witness.run.stop()


def witness_report(handle: Daemon) -> list[dict[str, Any]]:
    """GET /v1/audit/witnesses, as the admin."""
    with urllib.request.urlopen(f"{handle.url}/v1/audit/witnesses", context=handle.admin_ssl(),
                                timeout=60) as answer:
        assert answer.headers["Content-Type"].startswith("application/json")
        found: list[dict[str, Any]] = json.loads(answer.read())["witnesses"]
    return found


def ui_status(handle: Daemon, auditor: tuple[Path, Path], tmp: Path,
              witness_key: str | None = None) -> dict[str, Any]:
    """The web view's settled banner (pinned to `witness_key`, if given), from a view
    started for it, with a state of its own."""
    ui = Running.start("ui", "--url", handle.url, "--ca", handle.root, "--cert", auditor[0],
                       "--key", auditor[1], "--audit-key",
                       handle.state / "audit" / "audit_key.pem", "--state",
                       tmp / f"ui-{len(list(tmp.glob('ui-*.state')))}.state",
                       *(("--witness-key", witness_key) if witness_key else ()),
                       "--listen", "127.0.0.1:0")
    try:
        return settled_status(ui.listening_url())
    finally:
        ui.stop()


def test_a_log_put_back_from_a_backup_is_refused_by_its_witness_and_its_auditors_told(
        tmp_path: Path) -> None:
    """A CA put back from a copy of its state directory: its log is shorter than the one
    the witness cosigned, and the witness refuses every checkpoint ("cut"). The
    cosigned checkpoint beside the log is the copy's, which the log extends, so nothing
    an auditor fetched disagreed: `audit verify --url` said OK and the web view was
    green, the refusal in /metrics alone. The daemon now serves where its witnesses
    stand (GET /v1/audit/witnesses), and both fail on the refusal of a witness the
    auditor pins, whose key the daemon keeps across restarts."""
    ca, cfg, origin, witness = with_one_witness(tmp_path)
    daemons: list[Running] = []
    try:
        d, url = serve(cfg)
        daemons.append(d)
        handle = Daemon(url, d.proc, ca.state, [])
        auditor = enroll(handle, tmp_path, "auditor", ["auditor@witness.example"])
        assert d.stop() == 0
        backup = tmp_path / "backup"
        shutil.copytree(ca.state, backup, symlinks=True)
        d, url = serve(cfg)
        daemons.append(d)
        enroll(Daemon(url, d.proc, ca.state, []), tmp_path, "service",
               ["later.witness.example"])
        assert d.stop() == 0
        held = witness.state[origin]
        shutil.rmtree(ca.state)
        shutil.copytree(backup, ca.state, symlinks=True)  # put back

        d, url = serve(cfg)
        daemons.append(d)
        handle = Daemon(url, d.proc, ca.state, [])
        refusal = d.wait("witness refused the checkpoint", witness=witness.url)
        assert f"holds a checkpoint of {held} lines" in refusal["reason"], refusal
        [standing] = witness_report(handle)
        # (the key it cosigns with, seen in the first run, kept beside checkpoint.cosigned)
        assert standing["witness"] == witness.url and standing["state"] == "refused" and \
            standing["reason"] == "cut" and standing["failures"] >= 1 and \
            standing["signer"] == "+".join(witness.vkey.split("+")[:2]), standing
        proc = audit_verify(ca.state, "--state", tmp_path / "pinned.state", "--witness-key",
                            witness.vkey, served=(handle, auditor))
        assert proc.returncode == 1 and proc.stderr.startswith(
            f"FAILED (no line): witness {witness.url} refused the checkpoint of ") and \
            f"the witness holds a checkpoint of {held} lines" in proc.stderr and \
            "put back from a backup" in proc.stderr, proc.stdout + proc.stderr
        # Not pinned, the refusal is the daemon's word for a witness the auditor does not
        # trust: said beside the OK, as a claim (amber in the view), not a failure
        proc = audit_verify(ca.state, "--state", tmp_path / "unpinned.state",
                            served=(handle, auditor))
        assert proc.returncode == 0 and re.search(
            f"^witness not cosigning: witness {re.escape(witness.url)} refused the "
            r"checkpoint .* \(a claim: not a witness you pin with --witness-key; it cosigns "
            "as w1.test/witness\\+", proc.stdout, re.MULTILINE), proc.stdout
        status = ui_status(handle, auditor, tmp_path, witness.vkey)
        assert status["status"] == "failed" and status["banner"].startswith(
            f"FAILED: witness {witness.url} refused the checkpoint"), status
        # The auditor's own check, which asks the daemon nothing about its witnesses: the
        # checkpoint their witness holds (its GET /), which the log must extend
        with urllib.request.urlopen(f"{witness.url}/", timeout=60) as answer:
            held_note = json.loads(answer.read())["checkpoints"][origin]
        assert parse_checkpoint(held_note).size == held
        (tmp_path / "held.checkpoint").write_text(held_note)
        proc = hsmca("audit", "prove", "--url", handle.url, "--ca", handle.root,
                     "--client-cert", auditor[0], "--client-key", auditor[1], "--key",
                     ca.state / "audit" / "audit_key.pem", "--extends",
                     tmp_path / "held.checkpoint", check=False)
        assert proc.returncode == 1 and "NOT PROVEN" in proc.stdout + proc.stderr, \
            proc.stdout + proc.stderr
        # A restart with the witness out of reach (stopped by its operator, or its
        # traffic blocked) keeps the refusal: it stands until the witness cosigns (an
        # auditor trial's restart turned it into "unreachable", and runs said OK)
        assert d.stop() == 0
        witness.run.stop()
        d, url = serve(cfg)
        daemons.append(d)
        handle = Daemon(url, d.proc, ca.state, [])
        d.wait("witness not updated", witness=witness.url)
        [standing] = witness_report(handle)
        assert standing["state"] == "refused" and standing["reason"] == "cut", standing
        proc = audit_verify(ca.state, "--state", tmp_path / "after-restart.state",
                            "--witness-key", witness.vkey, served=(handle, auditor))
        assert proc.returncode == 1 and f"witness {witness.url} refused" in proc.stderr, \
            proc.stdout + proc.stderr
    finally:
        for daemon in daemons:
            daemon.stop()
        witness.run.stop()


def test_a_witness_not_pinned_that_claims_a_cut_fails_no_auditor(tmp_path: Path) -> None:
    """An auditor trial: a witness URL in `[audit] witnesses` that nobody pins (a typo,
    another party's, or anyone in the middle of plain HTTP) answered every checkpoint
    "409, I hold 1000000 lines", and every auditor's run failed on that unchecked
    word. A refusal fails a run only when the witness cosigns with a key the auditor
    pins; this one is said beside the OK, and the view is amber."""
    import http.server
    import threading

    class Liar(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(409)
            self.send_header("Content-Type", "text/x.tlog.size")
            self.end_headers()
            self.wfile.write(b"1000000\n")

        def log_message(self, *args: Any) -> None:
            pass

    liar = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Liar)
    threading.Thread(target=liar.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{liar.server_address[1]}"
    ca, vkey = with_a_witness_at(tmp_path, url)
    d, daemon_url = serve(ca.state / "hsmca.toml")
    try:
        handle = Daemon(daemon_url, d.proc, ca.state, [])
        d.wait("witness refused the checkpoint", witness=url)
        [standing] = witness_report(handle)
        assert standing["state"] == "refused" and standing["signer"] is None, standing
        auditor = enroll(handle, tmp_path, "auditor", ["auditor@liar.example"])
        proc = audit_verify(ca.state, "--state", tmp_path / "auditor.state",
                            "--witness-key", vkey, served=(handle, auditor))
        # (the pinned witness never cosigned: that fails, as before, in its own words)
        assert "refused the checkpoint" not in proc.stderr, proc.stderr
        proc = audit_verify(ca.state, "--state", tmp_path / "auditor2.state",
                            served=(handle, auditor))
        assert proc.returncode == 0 and "holds a checkpoint of 1000000 lines" in \
            proc.stdout and "the key it cosigns with is not known" in proc.stdout, \
            proc.stdout + proc.stderr
        status = ui_status(handle, auditor, tmp_path)
        assert status["status"] == "unwitnessed" and "a claim" in status["banner"], status
    finally:
        d.stop()
        liar.shutdown()


def test_a_witness_that_cannot_be_reached_is_named_to_the_auditor(tmp_path: Path) -> None:
    """A witness that is down is no verdict on the log, but the newest lines are not
    witnessed: `audit verify --url` still says OK and names it, with the daemon's reason
    and since when; the web view is amber, not green."""
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    ca, vkey = with_a_witness_at(tmp_path, down)
    d, url = serve(ca.state / "hsmca.toml")
    try:
        handle = Daemon(url, d.proc, ca.state, [])
        d.wait("witness not updated", witness=down)
        [standing] = witness_report(handle)
        assert standing["state"] == "failing" and standing["reason"] == "unreachable" and \
            standing["cosigned"] is None and standing["since"].startswith("20"), standing
        auditor = enroll(handle, tmp_path, "auditor", ["auditor@witness.example"])
        proc = audit_verify(ca.state, "--state", tmp_path / "auditor.state",
                            served=(handle, auditor))
        assert proc.returncode == 0 and proc.stdout.startswith("OK:") and re.search(
            f"^witness not cosigning: witness {re.escape(down)} did not cosign the checkpoint "
            r"of \d+ lines \(unreachable: cannot reach the witness: .*\), \d+ times? since "
            r"20\d\d-.*; it has not cosigned since the daemon started$", proc.stdout,
            re.MULTILINE), proc.stdout
        status = ui_status(handle, auditor, tmp_path, vkey)
        assert status["status"] == "unwitnessed" and \
            f"NOT WITNESSED lately: witness {down} did not cosign" in status["banner"], status
    finally:
        d.stop()


def test_a_witness_key_that_is_not_the_witnesss_is_named_beside_the_one_it_used(
        tmp_path: Path) -> None:
    """[audit] witness-keys holding another witness's key (a copy-paste slip): the
    daemon's error names the key the witness signed with and the keys it expected, so
    the operator sees which one to fix."""
    ca = init_ca(tmp_path)
    origin, log_vkey = log_key(ca.state)
    witness = WitnessProcess(tmp_path, "w1.test/witness", {origin: log_vkey})
    other = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    wrong = (f"w9.test/witness+{cosigner_key_id('w9.test/witness', other).hex()}+"
             + base64.b64encode(b"\x04" + other).decode())
    set_config(ca.state, "audit", "witnesses", [witness.url])
    set_config(ca.state, "audit", "witness-keys", [wrong])
    d, url = serve(ca.state / "hsmca.toml")
    try:
        said = d.wait("the witness answered without a cosignature by a configured witness "
                      "key, dated no later than now")
        # name+keyid: the vkey's first two fields (its base64 key may hold '+' too)
        assert said["signed_as"] == ["+".join(witness.vkey.split("+")[:2])], said
        assert said["configured"] == ["+".join(wrong.split("+")[:2])], said
        seen = witness_metrics(Daemon(url, d.proc, ca.state, []))
        assert seen["hsmca_witness_refused_total", witness.url, "bad-cosignature"] >= 1, seen
        assert seen["hsmca_witness_cosigned_total", witness.url] == 0, seen
    finally:
        d.stop()
        witness.run.stop()


def test_after_an_audit_key_rotation_the_view_still_counts_the_witness(tmp_path: Path) -> None:
    """docs/keys.md's rotation of the audit key, with a witness the auditor pins: once
    the old key is retired, the checkpoints the witness cosigns are signed by the new
    key alone. `hsmca ui`, pinned to the key the log began with as the docs say,
    verifies them with the key the log handed over to and counts the witness (it used
    to check them with the first key alone: "0 witnesses", and "does not verify with
    the pinned audit key"). A second witness, never given the new key, refuses them
    from then on: /metrics counts it for an alert (it used to be a stderr line only)."""
    ca = init_ca(tmp_path)
    cfg = ca.state / "hsmca.toml"
    first_key = tmp_path / "first-audit-key.pem"
    first_key.write_bytes((ca.state / "audit" / "audit_key.pem").read_bytes())
    origin, first_vkey = log_key(ca.state)
    witness = WitnessProcess(tmp_path, "w1.rotation.test/witness", {origin: first_vkey})
    forgotten = WitnessProcess(tmp_path, "w2.rotation.test/witness", {origin: first_vkey})
    set_config(ca.state, "audit", "witnesses", [witness.url, forgotten.url])
    set_config(ca.state, "audit", "witness-keys", [witness.vkey, forgotten.vkey])
    # Checkpoints only as the log grows: the one the witness cosigned last is still the
    # latest when the view looks.
    set_config(ca.state, "audit", "heartbeat-s", 86400)
    d, url = serve(cfg)
    handle = Daemon(url, d.proc, ca.state, [])
    ui: Running | None = None
    try:
        auditor = enroll(handle, tmp_path, "auditor", ["auditor@rotation.test"])
        cosigned_from_here(d, handle, [witness, forgotten])
        listing = hsmca("key", "list", "--config", cfg).stdout
        old_label = re.search(r"^(\S+)\s+audit\s+active", listing, re.M)
        assert old_label, listing
        assert "rotated audit" in hsmca("key", "rotate", "audit", "--config", cfg).stdout
        # A hand-over checkpoint, signed by both keys: both witnesses cosign it.
        cosigned_from_here(d, handle, [witness, forgotten])
        new_origin, new_vkey = log_key(ca.state)  # audit_key.pem: the new key now
        assert (new_origin, "hsmca-audit-key " + new_vkey) == (
            origin, (ca.state / "audit" / "checkpoint").read_text().split("\n")[3])
        witness.pin({origin: new_vkey})  # before the retirement, as docs/keys.md says
        mark = d.mark()
        hsmca("key", "retire", old_label.group(1), "--yes", "--config", cfg)
        size = cosigned_from_here(d, handle, [witness])
        d.wait("witness not updated", since=mark, witness=forgotten.url)  # 403
        seen = witness_metrics(handle)
        assert seen["hsmca_witness_refused_total", forgotten.url, "untrusted-key"] >= 1, seen
        assert seen["hsmca_witness_cosigned_total", forgotten.url] >= 2, seen
        assert seen["hsmca_witness_last_cosigned_size", witness.url] == size, seen
        assert seen["hsmca_witness_cosigned_total", witness.url] >= 3, seen
        assert all(seen["hsmca_witness_refused_total", witness.url, reason] == 0
                   for reason in REASONS), seen
        latest = (ca.state / "audit" / "checkpoint").read_text()
        assert parse_checkpoint(latest).size == size and "hsmca-audit-key" not in latest
        assert latest.count("\n\u2014 ") == 1  # the new key's signature alone

        state = tmp_path / "auditor.state"
        ui = Running.start("ui", "--url", url, "--ca", handle.root, "--cert", auditor[0],
                           "--key", auditor[1], "--audit-key", first_key, "--state", state,
                           "--witness-key", witness.vkey, "--listen", "127.0.0.1:0")
        base = ui.listening_url()
        status = settled_status(base)
        # Counted, and amber: the witness never given the new key cosigns no more, and
        # the daemon says why (it was in /metrics alone)
        assert status["status"] == "unwitnessed", status
        assert f"checkpoint {size}, 1 witness; NOT WITNESSED lately: witness " \
            f"{forgotten.url} did not cosign the checkpoint of {size} lines (untrusted-key: " \
            in status["banner"], status
        with urllib.request.urlopen(f"{base}/", timeout=60) as answer:
            overview = answer.read().decode()
        assert "does not verify" not in overview and witness.name in overview
        # Signed by the key handed over to, and said so (a web trial read "the pinned
        # audit key" on a checkpoint that key never signed).
        handed = (f"the audit key {new_vkey.split('+')[1]}, which the pinned key handed "
                  "the log over to")
        assert f"✓ {handed}" in overview, overview
        with urllib.request.urlopen(f"{base}/audit", timeout=60) as answer:
            audit_page = answer.read().decode()
        # The latest checkpoint, the new key's alone, verifies with the keys followed.
        assert "does not verify" not in audit_page and "no signature by" not in audit_page
        assert f"signature verified with {handed}" in audit_page, audit_page
    finally:
        if ui is not None:
            ui.stop()
        d.stop()
        witness.run.stop()
        forgotten.run.stop()


def test_a_witness_urls_password_is_in_no_log_line_or_label() -> None:
    """A witness URL may carry credentials (https://user:password@host/): log lines and
    /metrics name the witness by its URL without them."""
    from ca.audit.witnessing import HTTPWitness
    witness = HTTPWitness("https://ca:s3cret@witness.example:8443/w/")
    assert str(witness) == "https://witness.example:8443/w"
    assert witness.url == "https://ca:s3cret@witness.example:8443/w"  # still used to post
    assert str(HTTPWitness("http://127.0.0.1:9/")) == "http://127.0.0.1:9"


def test_a_witness_that_is_down_is_said_once_and_its_return_says_how_much_it_missed(
        tmp_path: Path) -> None:
    """While the log grows a checkpoint is signed every second, and a witness that is
    down fails each one. The daemon says so once (again only after REPEAT_LOG_S, with
    how many went unsaid), /metrics counts every failure, and the witness's next
    cosignature, once it is back, says how many checkpoints in a row it missed. It
    used to be one warning a second for as long as the witness was down."""
    ca = init_ca(tmp_path)
    origin, log_vkey = log_key(ca.state)
    witness = WitnessProcess(tmp_path, "w1.down.test/witness", {origin: log_vkey})
    set_config(ca.state, "audit", "witnesses", [witness.url])
    set_config(ca.state, "audit", "witness-keys", [witness.vkey])
    d, url = serve(ca.state / "hsmca.toml")
    handle = Daemon(url, d.proc, ca.state, [])
    token = urllib.request.Request(
        f"{handle.url}/v1/tokens", headers={"Content-Type": "application/json"},
        data=json.dumps({"role": "service", "names": ["down.witness.example"],
                         "ttl": "15m"}).encode())
    try:
        witness.run.wait("cosigned")  # the checkpoint signed at start
        # Marked before the stop: the start's second checkpoint may fail as it stops, or
        # be cosigned while it does; the return is found after the first failure.
        mark = d.mark()
        assert witness.run.stop() == 0
        failed = 0.0
        for _ in range(2000):  # the log grows by a line a request: a checkpoint a second
            with urllib.request.urlopen(token, context=handle.admin_ssl(), timeout=60) as a:
                assert a.status == 201
            failed = witness_metrics(handle)[
                "hsmca_witness_refused_total", witness.url, "unreachable"]
            if failed >= 4:
                break
        assert failed >= 4, "".join(d.raw[-40:])
        said = [e for e in d.lines[mark:] if e.get("event") == "witness not updated"]
        assert len(said) == 1 and said[0]["witness"] == witness.url, said
        assert "unsaid" not in said[0]

        witness.pin({origin: log_vkey})  # back, at the same address
        cosigned_from_here(d, handle, [witness])
        # The first cosignature since it went down says so; a later one (the checkpoint
        # that covers the line written just now may come second) no longer does.
        down = next(i for i in range(mark, len(d.lines))
                    if d.lines[i].get("event") == "witness not updated")
        back = next(e for e in d.lines[down:]
                    if e.get("event") == "witness cosigned the checkpoint")
        assert back["witness"] == witness.url and back["after_failures"] >= failed, back
    finally:
        d.stop()
        witness.run.stop()


async def fake_witness(add_checkpoint: Any) -> tuple[web.AppRunner, int]:
    """A witness on 127.0.0.1 whose add-checkpoint is `add_checkpoint`: its runner (for
    cleanup) and port."""
    app = web.Application()
    app.router.add_post("/add-checkpoint", add_checkpoint)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


async def test_a_witness_that_does_not_answer_is_said_to_time_out() -> None:
    """A witness that never answers fails its submission as unreachable with a reason
    (the trial's log line read `cannot reach the witness: ` and nothing else: a
    timeout's text is empty)."""
    never = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await never.wait()
        return web.Response()

    runner, port = await fake_witness(hang)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5)) as s:
            with pytest.raises(WitnessError) as err:
                await HTTPWitness(f"http://127.0.0.1:{port}").add_checkpoint(
                    s, "origin\n1\nAAAA\n\n— x y\n", 1, None)  # type: ignore[arg-type]
        assert err.value.kind == "unreachable"
        assert str(err.value) == "cannot reach the witness: no answer within 10 s"
    finally:
        never.set()
        await runner.cleanup()


async def test_a_witness_s_answer_is_read_up_to_a_bound() -> None:
    """A witness trial: a witness answering 150 MB took the primary, the audit log's one
    writer, from 70 MB to 950 MB of memory (its answer was read whole). A cosignature
    is a few lines: more than 64 KiB is not read, and the submission fails saying so."""
    async def flood(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(64):  # 4 MiB, but the reader stops at its bound
            try:
                await resp.write(b"x" * (64 << 10))
            except ConnectionError:
                break
        return resp

    runner, port = await fake_witness(flood)
    try:
        async with aiohttp.ClientSession() as s:
            with pytest.raises(WitnessError) as err:
                await HTTPWitness(f"http://127.0.0.1:{port}").add_checkpoint(
                    s, "origin\n1\nAAAA\n\n— x y\n", 1, None)  # type: ignore[arg-type]
        assert str(err.value) == ("the witness answered 200 with more than 64 KiB (a "
                                  "cosignature is a few lines): not read"), err.value
    finally:
        await runner.cleanup()


async def test_each_new_way_a_witness_fails_is_said_and_one_contradicting_itself_named(
        tmp_path: Path) -> None:
    """A witness trial: a witness answering 500, then a 409 whose size is no number, then
    409s holding the very size it was sent as its own, was said once, as the 500, for
    ten minutes (the three were all "error"s); and the last was told as a witness whose
    size "changed" three times in a row. Each new wording is said, and the last is
    named for what it is."""
    import structlog

    from ca.audit.witnessing import Witnessing
    answers = [(500, "text/plain", "internal error"), (409, "text/x.tlog.size", "banana"),
               (409, "text/x.tlog.size", "1\n")]
    now = [answers[0]]

    async def add(request: web.Request) -> web.Response:
        status, ctype, body = now[0]
        return web.Response(status=status, body=body.encode(),
                            headers={"Content-Type": ctype})

    runner, port = await fake_witness(add)
    witnessing = Witnessing([HTTPWitness(f"http://127.0.0.1:{port}")], [],
                            lambda old, size: [], tmp_path / "cosigned")
    try:
        with structlog.testing.capture_logs() as logs:
            for answer in answers:
                now[0] = answer
                witnessing.submit("origin\n2\nAAAA\n\n— x y\n", 2)
                await witnessing.drain(30)
    finally:
        await witnessing.close()
        await runner.cleanup()
    said = [e["error"] for e in logs if e["event"] == "witness not updated"]
    assert said == [
        "the witness answered 500: internal error",
        "the witness answered 409 with a size that is not a number: 'banana'",
        "the witness answered 409 saying it holds 1 lines, the size it was sent as its "
        "own (old 1): it contradicts itself"], said


def test_a_refusal_stands_until_the_witness_cosigns_again() -> None:
    """A review: a refusal followed by the witness going away (its operator stopped it
    to look into the refusal) showed the witness as merely failing, and auditors' runs
    said OK. A refusal stands, counted on, until the witness cosigns again."""
    from ca.audit.witnessing import _Standing
    standing = _Standing("https://w1.example/witness")
    assert standing.doc()["state"] == "not-asked"
    standing.answer("cosigned", 100, None)
    standing.answer("inconsistent", 120, "the consistency proof ... does not verify")
    standing.answer("unreachable", 130, "cannot reach the witness: refused")
    doc = standing.doc()
    assert (doc["state"], doc["reason"], doc["checkpoint"], doc["failures"],
            doc["cosigned"]) == ("refused", "inconsistent", 120, 2, 100), doc
    standing.answer("cosigned", 140, None)
    doc = standing.doc()
    assert (doc["state"], doc["failures"], doc["since"]) == ("cosigning", 0, None), doc
    standing.answer("unreachable", 150, "cannot reach the witness: refused")
    assert standing.doc()["state"] == "failing"


def test_a_log_given_twice_to_a_witness_is_refused(tmp_path: Path) -> None:
    """An auditor trial gave `hsmca witness serve` a log's old and new keys (`--log O=OLD
    --log O=NEW`) after a rotation, and it kept the last silently. Said, in one line."""
    key = tmp_path / "witness.key"
    key.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    key.chmod(0o600)
    ca = init_ca(tmp_path)
    origin, vkey = log_key(ca.state)
    proc = hsmca("witness", "serve", "--key-file", key, "--log", f"{origin}={vkey}",
                 "--log", f"{origin}={vkey}", "--listen", "127.0.0.1:0", "--new-state",
                 check=False)
    assert proc.returncode == 1 and proc.stderr == (
        f"hsmca: error: --log {origin} is given twice: a witness follows a log by one key; "
        "after a rotation of the log's audit key, give the new one alone (docs/keys.md)\n"), \
        proc.stderr
    assert not (tmp_path / "witness-state.json").exists()  # refused before anything

"""Remote auditing against the real daemon: entries and Merkle proofs over mutual TLS,
incremental `hsmca audit verify --url`, and the file witness.

The proofs are checked with an RFC 9162 implementation written here from the RFC's
text (section 2.1), not with ca/audit/merkle.py, so that a shared misreading of the
RFC cannot make both sides agree.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from ca.audit.note import (
    NEXT_KEY,
    checkpoint_body,
    parse_checkpoint,
    sign_checkpoint,
    signed_note,
    verifier_key,
)
from ca.audit.witness import FileWitness, WitnessRefused
from tests.conftest import Daemon, hsmca, init_ca, start_daemon
from tests.helpers import audit_verify, enroll, health_until, http, rechain
from tests.lying_front import LyingFront

REPO = Path(__file__).resolve().parents[1]

# ---- RFC 9162 section 2.1, independently ------------------------------------------------


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _k(n: int) -> int:
    """The largest power of two smaller than n (n > 1)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def mth(d: Sequence[bytes]) -> bytes:
    """2.1.1: MTH({}) = SHA-256(), MTH({d0}) = SHA-256(0x00 || d0), else split at k."""
    n = len(d)
    if n == 0:
        return _h(b"")
    if n == 1:
        return _h(b"\x00" + d[0])
    k = _k(n)
    return _h(b"\x01" + mth(d[:k]) + mth(d[k:]))


def path(m: int, d: Sequence[bytes]) -> list[bytes]:
    """2.1.3.1: PATH(m, D[n])."""
    n = len(d)
    if n == 1:
        return []
    k = _k(n)
    if m < k:
        return [*path(m, d[:k]), mth(d[k:])]
    return [*path(m - k, d[k:]), mth(d[:k])]


def proof(m: int, d: Sequence[bytes]) -> list[bytes]:
    """2.1.4.1: PROOF(m, D[n]) = SUBPROOF(m, D[n], true)."""
    return _subproof(m, d, True)


def _subproof(m: int, d: Sequence[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [mth(d)]
    k = _k(n)
    if m <= k:
        return [*_subproof(m, d[:k], b), mth(d[k:])]
    return [*_subproof(m - k, d[k:], False), mth(d[:k])]


def verify_inclusion(leaf_index: int, tree_size: int, leaf_hash: bytes,
                     inclusion_path: Sequence[bytes], root_hash: bytes) -> bool:
    """2.1.3.2, step by step."""
    if leaf_index >= tree_size:
        return False
    fn, sn = leaf_index, tree_size - 1
    r = leaf_hash
    for p in inclusion_path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = _h(b"\x01" + p + r)
            if not fn & 1:
                while not (fn & 1 or fn == 0):
                    fn >>= 1
                    sn >>= 1
        else:
            r = _h(b"\x01" + r + p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root_hash


def verify_consistency(first: int, second: int, first_hash: bytes, second_hash: bytes,
                       consistency_path: Sequence[bytes]) -> bool:
    """2.1.4.2, step by step (for 0 < first < second, where a proof is non-empty)."""
    if not consistency_path:
        return False
    path_ = list(consistency_path)
    if first & (first - 1) == 0:
        path_.insert(0, first_hash)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path_[0]
    for c in path_[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = _h(b"\x01" + c + fr)
            sr = _h(b"\x01" + c + sr)
            if not fn & 1:
                while not (fn & 1 or fn == 0):
                    fn >>= 1
                    sn >>= 1
        else:
            sr = _h(b"\x01" + sr + c)
        fn >>= 1
        sn >>= 1
    return fr == first_hash and sr == second_hash and sn == 0


def test_the_independent_rfc_code_agrees_with_itself() -> None:
    """The test's own RFC code: every PATH and PROOF it makes verifies, and a wrong root
    does not (so a daemon proof that passes it means something)."""
    d = [f"entry {i}".encode() for i in range(13)]
    for n in range(1, len(d) + 1):
        root = mth(d[:n])
        for m in range(n):
            leaf = _h(b"\x00" + d[m])
            assert verify_inclusion(m, n, leaf, path(m, d[:n]), root)
            assert not verify_inclusion(m, n, leaf, path(m, d[:n]), _h(b"x"))
        for m in range(1, n):
            assert verify_consistency(m, n, mth(d[:m]), root, proof(m, d[:n]))
            assert not verify_consistency(m, n, _h(b"x"), root, proof(m, d[:n]))


# ---- helpers ----------------------------------------------------------------------------


def no_proof(old: int, size: int) -> list[bytes]:
    """For a witness push that needs no consistency proof (the first, or the same tree)."""
    raise AssertionError(f"a proof from {old} to {size} lines was asked for")


def given(hashes: list[bytes]) -> Callable[[int, int], list[bytes]]:
    """A witness's `prove` that answers with `hashes`, whatever it is asked."""
    return lambda _old, _size: hashes


async def get(d: Daemon, path_: str, cred: tuple[Path, Path] | None = None
              ) -> tuple[int, str, bytes]:
    return await http("GET", f"{d.url}{path_}", d.ssl(*cred) if cred else d.ssl())


async def latest_checkpoint(d: Daemon) -> tuple[int, bytes, str]:
    status, _, raw = await get(d, "/v1/audit/checkpoint")
    assert status == 200, raw
    cp = parse_checkpoint(raw.decode())
    return cp.size, cp.root, raw.decode()


async def fetched_lines(d: Daemon, cred: tuple[Path, Path], size: int) -> list[bytes]:
    status, ctype, raw = await get(d, f"/v1/audit/entries?start=0&limit={size}", cred)
    assert status == 200 and ctype == "application/jsonl", raw
    lines = raw.split(b"\n")
    assert lines.pop() == b"" and len(lines) == size
    return lines


def remote_verify(d: Daemon, cred: tuple[Path, Path], state: Path
                  ) -> subprocess.CompletedProcess[str]:
    return audit_verify(d.state, "--state", state, served=(d, cred))


def ok_counts(proc: subprocess.CompletedProcess[str]) -> tuple[int, int]:
    """(lines, fetched) from `OK: N lines, M checkpoints verified (fetched K new lines)`
    and the line on what the witnesses vouch for (none here)."""
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = re.fullmatch(r"OK: (\d+) lines, (\d+) checkpoints? verified \(fetched (\d+) new "
                     r"lines\)\ncheckpoint: the daemon's latest checkpoint, \d+ lines, root "
                     r"\S+; pinned audit key \S+\+[0-9a-f]{8}\n"
                     r"witnessed: no witness has cosigned a checkpoint of this log\n",
                     proc.stdout)
    assert m, proc.stdout
    return int(m[1]), int(m[3])


# ---- (a) entries, byte for byte, for auditors only ---------------------------------------


async def test_entries_are_the_stored_bytes_and_only_for_auditors(daemon: Daemon,
                                                                  tmp_path: Path) -> None:
    auditor = enroll(daemon, tmp_path, "auditor", ["auditor@example.com"])
    service = enroll(daemon, tmp_path, "service", ["svc.audit.example"])

    status, ctype, body = await get(daemon, "/v1/audit/entries?start=0&limit=1000", auditor)
    assert status == 200 and ctype == "application/jsonl"
    on_disk = (daemon.state / "audit" / "log.jsonl").read_bytes()  # read after: only grows
    assert body and body.endswith(b"\n") and on_disk.startswith(body)
    lines = body.split(b"\n")[:-1]
    status, _, page = await get(daemon, "/v1/audit/entries?start=2&limit=3", auditor)
    assert status == 200 and page == b"".join(line + b"\n" for line in lines[2:5])

    for path_ in ("/v1/audit/entries?start=0&limit=10",
                  "/v1/audit/proof/consistency?old=1&size=2",
                  "/v1/audit/proof/inclusion?index=0&size=2"):
        status, ctype, raw = await get(daemon, path_, service)
        assert status == 403 and ctype == "application/problem+json", (path_, raw)
        problem = json.loads(raw)
        assert problem["status"] == 403 and "auditor" in problem["detail"]
        status, ctype, _ = await get(daemon, path_)  # no client certificate at all
        assert status == 403 and ctype == "application/problem+json"


async def test_the_audit_key_is_pinned_as_get_v1_audit_key_gives_it(daemon: Daemon,
                                                                     tmp_path: Path) -> None:
    """docs/audit-log.md: pin the key from `GET /v1/audit/key`. It answers JSON, which
    `--key` refused as "not a PEM public key", as it refused the verifier key it holds
    (auditor trial): both are taken now, and verify as the PEM file does."""
    auditor = enroll(daemon, tmp_path, "auditor", ["auditor@example.com"])
    status, ctype, raw = await get(daemon, "/v1/audit/key")
    assert status == 200 and ctype == "application/json"
    answer = tmp_path / "key.json"
    answer.write_bytes(raw)
    cred = ["--url", daemon.url, "--ca", daemon.root, "--client-cert", auditor[0],
            "--client-key", auditor[1]]
    for n, key in enumerate((daemon.state / "audit" / "audit_key.pem", answer,
                             json.loads(raw)["verifier_key"])):
        proc = hsmca("audit", "verify", *cred, "--key", key, "--state", tmp_path / f"{n}.state",
                     check=False)
        assert proc.returncode == 0 and proc.stdout.startswith("OK: "), proc.stderr
    (tmp_path / "other.json").write_text('{"name": "x"}')
    proc = hsmca("audit", "verify", *cred, "--key", tmp_path / "other.json", "--state",
                 tmp_path / "x.state", check=False)
    assert proc.returncode != 0 and "is JSON but not the answer of GET /v1/audit/key" in \
        proc.stderr, proc.stderr


# ---- (b) the daemon's proofs, checked by the RFC's own algorithms -------------------------


async def prove_command(daemon: Daemon, auditor: tuple[Path, Path], outcome: int
                        ) -> list[str | Path]:
    """`hsmca audit prove`'s arguments as an auditor gives them, once a checkpoint
    covers line `outcome`."""
    deadline = asyncio.get_running_loop().time() + 30
    while (await latest_checkpoint(daemon))[0] <= outcome:  # a checkpoint covers both
        assert asyncio.get_running_loop().time() < deadline, "no checkpoint covers it"
    return ["audit", "prove", "--url", daemon.url, "--ca", daemon.root, "--client-cert",
            auditor[0], "--client-key", auditor[1], "--key",
            daemon.state / "audit" / "audit_key.pem"]


async def test_audit_prove_shows_a_certificate_is_in_a_signed_checkpoint(
        daemon: Daemon, tmp_path: Path) -> None:
    """An auditor trial had to write its own RFC 9162 verifier to show that a
    certificate it was handed is in the checkpoint it had saved. `hsmca audit prove`
    does it; a certificate of that serial the CA did not sign, and a checkpoint from
    before the certificate, are not proven."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding
    auditor = enroll(daemon, tmp_path, "auditor", ["auditor@prove.example"])
    before = tmp_path / "before.checkpoint"
    before.write_text((await latest_checkpoint(daemon))[2])
    cert, _ = enroll(daemon, tmp_path, "service", ["proven.internal.example"])
    issued = x509.load_pem_x509_certificate(cert.read_bytes())
    serial = format(issued.serial_number, "x")
    status, _, raw = await get(daemon, f"/v1/inventory/certificates/{serial}", auditor)
    assert status == 200, raw
    intent = json.loads(raw)["audit_seq"]
    status, _, raw = await get(daemon, f"/v1/audit/entries?start={intent}&limit=100", auditor)
    assert status == 200, raw
    op = json.loads(raw.split(b"\n")[0])["op_id"]
    outcome = intent + next(k for k, line in enumerate(raw.split(b"\n")[:-1])
                            if json.loads(line).get("op_id") == op and k)
    base = await prove_command(daemon, auditor, outcome)
    proc = hsmca(*base, "--cert-file", cert, check=False)
    fingerprint = hashlib.sha256(issued.public_bytes(Encoding.DER)).hexdigest()
    assert proc.returncode == 0 and proc.stdout.startswith(
        f"PROVEN: certificate {serial} (proven.internal.example), SHA-256 {fingerprint}: "
        f"its intent (seq {intent}) and successful outcome (seq {outcome})"), \
        proc.stdout + proc.stderr
    # The CA's own issuing certificate: not in the inventory, and said where its
    # signature is checked (an auditor's trial was told only "no certificate")
    proc = hsmca(*base, "--cert-file", daemon.state / "x509" / "issuing.pem", check=False)
    assert proc.returncode == 1 and "proves the certificates the CA issued to its " \
        "clients" in proc.stderr and "`hsmca audit verify`" in proc.stderr, proc.stderr
    # A certificate of the same serial that the CA did not sign
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "proven.internal.example")])
    forged = x509.CertificateBuilder().subject_name(name).issuer_name(issued.issuer) \
        .public_key(key.public_key()).serial_number(issued.serial_number) \
        .not_valid_before(issued.not_valid_before_utc) \
        .not_valid_after(issued.not_valid_after_utc).sign(key, hashes.SHA256())
    fake = tmp_path / "forged.pem"
    fake.write_bytes(forged.public_bytes(Encoding.PEM))
    proc = hsmca(*base, "--cert-file", fake, check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("NOT PROVEN: the outcome at seq ") \
        and "did not sign" in proc.stderr, proc.stderr
    # A checkpoint saved before the certificate was signed
    proc = hsmca(*base, "--serial", serial, "--checkpoint", before, check=False)
    assert proc.returncode == 1 and "not covered yet" in proc.stderr, proc.stderr
    # ...which the daemon's latest extends: the log only grew in between
    proc = hsmca(*base, "--extends", before, check=False)
    old_size = parse_checkpoint(before.read_text()).size
    assert proc.returncode == 0 and re.fullmatch(
        r"PROVEN: the checkpoint of \d+ lines \(root \S+\) extends the older one of "
        f"{old_size} lines \\(root \\S+\\): the log only grew in between, both signed by "
        "the pinned audit key\n", proc.stdout), proc.stdout + proc.stderr
    # The two the other way round: said as the slip it likely is, not only as a cut log
    # (an auditor trial was accused of finding a cut log)
    latest = tmp_path / "latest.checkpoint"
    latest.write_text((daemon.state / "audit" / "checkpoint").read_text())
    proc = hsmca(*base, "--extends", latest, "--checkpoint", before, check=False)
    assert proc.returncode == 1 and "unless the two were given the other way round" in \
        proc.stderr, proc.stderr
    # A checkpoint of another history, signed by the real key, does not
    forged = tmp_path / "other-history.checkpoint"
    forged.write_text(_resigned(daemon, before.read_text()))
    proc = hsmca(*base, "--extends", forged, check=False)
    assert proc.returncode == 1 and "does not extend the older one" in proc.stderr, \
        proc.stderr


async def test_audit_prove_shows_an_ssh_certificate_is_in_a_signed_checkpoint(
        daemon: Daemon, tmp_path: Path) -> None:
    """An SSH trial's auditor, handed a -cert.pub, was told it "holds no PEM
    certificate", and by serial that the inventory had no such certificate (`hsmca ssh
    list` listed it). Its line is found by the time it was issued, and proven; a file
    of that serial the CA did not sign is not."""
    from cryptography.hazmat.primitives import serialization

    from tests.helpers import log_lines
    from tests.test_revocation import ssh_user_cert
    auditor = enroll(daemon, tmp_path, "auditor", ["auditor@ssh-prove.example"])
    user = enroll(daemon, tmp_path, "user", ["proven@ssh-prove.example"], ["provenssh"])
    cert_file = ssh_user_cert(daemon, tmp_path, user, "id_proven")
    line = cert_file.read_text().split()
    cert = serialization.load_ssh_public_identity(f"{line[0]} {line[1]}".encode())
    assert isinstance(cert, serialization.SSHCertificate)
    [intent] = [e for e in log_lines(daemon.state) if e.get("serial") == str(cert.serial)
                and e.get("phase") == "intent"]
    outcome = next(e["seq"] for e in log_lines(daemon.state)
                   if e.get("op_id") == intent["op_id"] and e.get("phase") == "outcome")
    base = await prove_command(daemon, auditor, outcome)
    fingerprint = hashlib.sha256(f"{line[0]} {line[1]}".encode()).hexdigest()
    proc = hsmca(*base, "--cert-file", cert_file, check=False)
    assert proc.returncode == 0 and proc.stdout.startswith(
        f"PROVEN: SSH certificate {cert.serial} (ssh-user, key id {intent['key_id']}, "
        f"principals provenssh, SHA-256 {fingerprint}): its intent (seq {intent['seq']}) "
        f"and successful outcome (seq {outcome})"), proc.stdout + proc.stderr
    proc = hsmca(*base, "--ssh-serial", str(cert.serial), check=False)
    assert proc.returncode == 0 and proc.stdout.startswith(
        f"PROVEN: SSH certificate {cert.serial} (ssh-user"), proc.stdout + proc.stderr
    # The same serial, signed by a key that is not the CA's
    other = ed25519.Ed25519PrivateKey.generate()
    forged = serialization.SSHCertificateBuilder().public_key(cert.public_key()) \
        .serial(cert.serial).type(serialization.SSHCertificateType.USER) \
        .key_id(cert.key_id).valid_principals(cert.valid_principals) \
        .valid_after(cert.valid_after).valid_before(cert.valid_before).sign(other)
    fake = tmp_path / "forged-cert.pub"
    fake.write_bytes(forged.public_bytes())
    proc = hsmca(*base, "--cert-file", fake, check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("NOT PROVEN: the outcome at seq ") \
        and "did not sign" in proc.stderr, proc.stderr
    proc = hsmca(*base, "--ssh-serial", "12345", check=False)
    assert proc.returncode == 1 and "has no SSH certificate 12345" in proc.stderr, proc.stderr
    # The public key instead of its certificate: said so, not "holds no PEM certificate"
    pub = cert_file.with_name(cert_file.name.replace("-cert.pub", ".pub"))
    assert pub.exists()
    proc = hsmca(*base, "--cert-file", pub, check=False)
    assert proc.returncode == 1 and f"--cert-file {pub} is an SSH public key (ssh-ed25519)" \
        ", not a certificate: give its certificate (the -cert.pub" in proc.stderr, proc.stderr


async def test_daemon_proofs_verify_with_an_independent_rfc9162(daemon: Daemon,
                                                                tmp_path: Path) -> None:
    auditor = enroll(daemon, tmp_path, "auditor", ["auditor@example.com"])
    size, root, _ = await latest_checkpoint(daemon)
    lines = await fetched_lines(daemon, auditor, size)
    assert mth(lines) == root  # the signed root is RFC 9162's MTH of the lines as served

    sizes = sorted({1, 2, 3, 4, 5, 7, 8, 9, size // 2, size - 1, size} - {0})
    for n in sizes:
        tree_root = mth(lines[:n])
        for index in sorted({0, n // 2, n - 1}):
            status, _, raw = await get(
                daemon, f"/v1/audit/proof/inclusion?index={index}&size={n}", auditor)
            assert status == 200, raw
            got = json.loads(raw)
            assert (got["index"], got["size"]) == (index, n)
            hashes = [base64.b64decode(h) for h in got["proof"]]
            leaf = _h(b"\x00" + lines[index])
            assert verify_inclusion(index, n, leaf, hashes, tree_root), (index, n)
            assert hashes == path(index, lines[:n])
        for old in sorted({1, 2, 3, 4, n // 2, n - 1} - {0}):
            if old >= n:
                continue
            status, _, raw = await get(
                daemon, f"/v1/audit/proof/consistency?old={old}&size={n}", auditor)
            assert status == 200, raw
            got = json.loads(raw)
            assert (got["old"], got["size"]) == (old, n)
            hashes = [base64.b64decode(h) for h in got["proof"]]
            assert verify_consistency(old, n, mth(lines[:old]), tree_root, hashes), (old, n)
            assert hashes == proof(old, lines[:n])
            # A proof of another old tree must not pass for this one.
            assert not verify_consistency(old, n, mth(lines[1:old + 1]), tree_root, hashes)


# ---- (c) incremental remote verification, and a rewrite on the CA host --------------------

# What a root attacker on the CA host can do without the key leaving the HSM: run the
# daemon's own code with the PIN file to sign a checkpoint over whatever log is there.
_ATTACKER_SIGNS = """
import asyncio, os, sys
from pathlib import Path
from ca.audit.checkpointer import Checkpointer
from ca.audit.log import AuditLog
from ca.config import load
from ca.issuance.pipeline import SigningPipeline

async def main() -> None:
    cfg = load(Path(sys.argv[1]))
    if cfg.softhsm_conf:
        os.environ["SOFTHSM2_CONF"] = cfg.softhsm_conf
    audit = AuditLog.open(cfg.audit_log)  # no checkpoint to check against: it was removed
    worker = SigningPipeline(cfg.hsm, audit)
    worker.start()
    try:
        key = await worker.load_key(cfg.key_label("audit"))
        await Checkpointer(audit, worker, key, cfg.audit_origin,
                           cfg.checkpoint_path).checkpoint()
    finally:
        worker.close()
        audit.close()

asyncio.run(main())
"""


# A checkpoint of the same size as one given and another root, signed by the real audit
# key in the HSM (as a root attacker on the CA host can: run the daemon's code with the
# PIN file), its signature recorded in a scratch log of its own.
_FORGES_CHECKPOINT = """
import asyncio, os, sys
from pathlib import Path
from ca.audit.log import AuditLog
from ca.audit.note import checkpoint_body, parse_checkpoint, signed_note
from ca.config import load
from ca.issuance.pipeline import SigningPipeline

async def main() -> None:
    cfg = load(Path(sys.argv[1]))
    if cfg.softhsm_conf:
        os.environ["SOFTHSM2_CONF"] = cfg.softhsm_conf
    old = parse_checkpoint(Path(sys.argv[2]).read_text())
    scratch = AuditLog.open(Path(sys.argv[3]))
    worker = SigningPipeline(cfg.hsm, scratch)
    worker.start()
    try:
        key = await worker.load_key(cfg.key_label("audit"))
        body = checkpoint_body(old.origin, old.size, bytes(32), ())
        text = await worker.sign(key.label, lambda k: signed_note(
            body, [(old.origin, key.public_key, k.sign(body.encode()))]),
            purpose="checkpoint", actor="attacker", hash_name=None)
        Path(sys.argv[2]).with_suffix(".forged").write_text(text)
    finally:
        worker.close()
        scratch.close()

asyncio.run(main())
"""


def _resigned(d: Daemon, text: str) -> str:
    """A checkpoint of `text`'s size over another tree, signed by the CA's audit key."""
    work = d.state.parent / "forge"
    work.mkdir(exist_ok=True)
    (work / "old.checkpoint").write_text(text)
    proc = subprocess.run([sys.executable, "-c", _FORGES_CHECKPOINT, d.state / "hsmca.toml",
                           work / "old.checkpoint", work / "scratch.jsonl"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return (work / "old.forged").read_text()


def rewrite_line(log: Path, seq: int, change: dict[str, Any]) -> None:
    """Change line `seq` and re-chain every later line, keeping all of them canonical."""
    lines = log.read_bytes().splitlines()
    lines[seq] = json.dumps({**json.loads(lines[seq]), **change}).encode()
    log.write_bytes(b"".join(line + b"\n" for line in rechain(lines, seq)))


async def test_remote_verify_is_incremental_and_catches_a_rewrite(tmp_path: Path) -> None:
    ca = init_ca(tmp_path)
    log = ca.state / "audit" / "log.jsonl"
    state = tmp_path / "auditor-state.json"
    daemons: list[Daemon] = []
    try:
        d = start_daemon(ca.state)
        daemons.append(d)
        auditor = enroll(d, tmp_path, "auditor", ["auditor@example.com"])

        first_lines, fetched = ok_counts(remote_verify(d, auditor, state))
        assert fetched == first_lines > 0  # the first run fetches everything
        saved = json.loads(state.read_text())
        assert (saved["version"], saved["size"]) == (2, first_lines)
        assert saved["head"] == hashlib.sha256(
            log.read_bytes().splitlines()[first_lines - 1]).hexdigest()
        first_checkpoint = saved["checkpoint"]
        # Another log's state (its origin another CA's): said so, as offline, not as a
        # checkpoint that does not verify with a hint about rotated keys (a trial)
        other = tmp_path / "other-state.json"
        other.write_text(json.dumps({**saved, "checkpoint": "other.example/hsmca-audit\n"
                                     + first_checkpoint.split("\n", 1)[1]}))
        proc = remote_verify(d, auditor, other)
        assert proc.returncode == 1 and "is for the log 'other.example/hsmca-audit', not " \
            "this one" in proc.stderr and "rotated" not in proc.stderr, proc.stderr

        for i in range(3):
            enroll(d, tmp_path, "service", [f"svc{i}.audit.example"])
        # A graceful stop signs a final checkpoint covering the issuances; the restarted
        # daemon serves it (or its own start-up checkpoint, which covers even more).
        assert d.stop() == 0
        d = start_daemon(ca.state)
        daemons.append(d)

        second_lines, fetched = ok_counts(remote_verify(d, auditor, state))
        assert second_lines > first_lines
        assert fetched == second_lines - first_lines  # only the new lines were fetched
        saved = json.loads(state.read_text())
        assert saved["size"] == second_lines
        issued = [json.loads(line) for line in log.read_bytes().splitlines()[
            first_lines:second_lines]]
        intents = [e for e in issued if e.get("purpose") == "x509" and e["phase"] == "intent"
                   and e["role"] == "service"]
        assert len(intents) == 3  # the three service certificates are among the new lines

        shown = hsmca("audit", "show", "--url", d.url, "--ca", d.root, "--client-cert",
                      auditor[0], "--client-key", auditor[1], "--from", first_lines)
        assert shown.stdout.splitlines()[0].split()[0] == str(first_lines)
        assert "svc2.audit.example" in shown.stdout

        # The file witness follows the honest log with the daemon's own proofs.
        key = _audit_key(ca.state)
        origin = first_checkpoint.split("\n", 1)[0]
        witness = FileWitness(tmp_path / "witness", key, origin)
        witness.push(first_checkpoint, no_proof)
        status, _, raw = await get(
            d, f"/v1/audit/proof/consistency?old={first_lines}&size={second_lines}", auditor)
        assert status == 200
        witness.push(saved["checkpoint"],
                     given([base64.b64decode(h) for h in json.loads(raw)["proof"]]))
        assert d.stop() == 0
        daemons.pop()

        # The attacker hides one issuance: a line covered by the checkpoint verified last
        # time, rewritten with every later prev re-chained, then a fresh checkpoint signed
        # by the real HSM key over the result.
        victim = intents[0]["seq"]
        rewrite_line(log, victim, {"names": ["innocent.example"]})
        (ca.state / "audit" / "checkpoint").unlink()
        signer = subprocess.run([sys.executable, "-c", _ATTACKER_SIGNS,
                                 ca.state / "hsmca.toml"], cwd=REPO, capture_output=True,
                                text=True, timeout=60)
        assert signer.returncode == 0, signer.stderr
        d = start_daemon(ca.state)  # the daemon accepts the log: it matches "its" checkpoint
        daemons.append(d)

        before = state.read_bytes()
        # A daemon that refuses the read of its lines from the first, which locating the
        # change takes, still fails the run as rewritten (a review: the run said the
        # daemon could not be reached, and the web view stayed green)
        front = LyingFront(d.url, d.root, auditor, (ca.state / "tls" / "server.pem",
                                                    ca.state / "tls" / "server.key"))
        try:
            front.refuse_from = 0
            proc = hsmca("audit", "verify", "--url", front.url, "--ca", d.root,
                         "--client-cert", auditor[0], "--client-key", auditor[1], "--key",
                         ca.state / "audit" / "audit_key.pem", "--state", state, check=False)
        finally:
            front.close()
        assert proc.returncode == 1 and proc.stderr.startswith(
            f"FAILED at seq {second_lines - 1}: the log was cut or rewritten since it was "
            "verified last time") and "where, this run cannot tell: reading those lines " \
            "again failed" in proc.stderr, proc.stderr
        assert state.read_bytes() == before
        proc = remote_verify(d, auditor, state)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "the log was cut or rewritten since it was verified last time" in proc.stderr
        # and where: not the last line verified last time, but the span the first
        # checkpoint that no longer verifies shows the change in, the victim among it, as
        # a first run (or the offline verifier) names it (a review)
        named = re.match(r"FAILED at seq (\d+): ", proc.stderr)
        span = re.search(r"a line from seq (\d+) to (\d+) was altered", proc.stderr)
        assert named and span and int(named[1]) < second_lines - 1, proc.stderr
        assert int(named[1]) == int(span[1]) <= victim <= int(span[2]), (victim, proc.stderr)
        assert state.read_bytes() == before  # nothing is saved from a failed run

        # The witness refuses the attacker's checkpoint and keeps the honest one.
        size, _, text = await latest_checkpoint(d)
        status, _, raw = await get(
            d, f"/v1/audit/proof/consistency?old={second_lines}&size={size}", auditor)
        assert status == 200
        with pytest.raises(WitnessRefused, match="does not extend"):
            witness.push(text, given([base64.b64decode(h) for h in json.loads(raw)["proof"]]))
        assert (tmp_path / "witness").read_text() == saved["checkpoint"]
    finally:
        for daemon in daemons:
            daemon.stop()


async def test_a_ca_restored_from_an_older_backup_is_named_where_its_log_forked(
        tmp_path: Path) -> None:
    """An auditor's trial: a CA restored from a backup older than lines an auditor had
    verified signs new checkpoints over its new lines; the remote run failed it rightly,
    but named the restored run's first checkpoint as the place, 20 lines after the
    first changed line. The span named comes from the state file's own record of the
    lines verified (its frontier), and holds the first line the restored run wrote."""
    ca = init_ca(tmp_path)
    log = ca.state / "audit" / "log.jsonl"
    state, backup = tmp_path / "auditor-state.json", tmp_path / "backup"
    d = start_daemon(ca.state)
    try:
        auditor = enroll(d, tmp_path, "auditor", ["auditor@example.com"])
    finally:
        assert d.stop() == 0
    shutil.copytree(ca.state, backup, symlinks=True)  # the backup, of a stopped CA
    forked_at = len(log.read_bytes().splitlines())  # the restored run's first line
    d = start_daemon(ca.state)
    try:
        for i in range(4):
            enroll(d, tmp_path, "service", [f"lost{i}.audit.example"])
        verified, _ = ok_counts(remote_verify(d, auditor, state))
    finally:
        assert d.stop() == 0
    shutil.rmtree(ca.state)
    shutil.copytree(backup, ca.state, symlinks=True)
    d = start_daemon(ca.state)
    try:
        i = 0
        while len(log.read_bytes().splitlines()) < verified + 20:  # past what was verified
            enroll(d, tmp_path, "service", [f"after{i}.audit.example"])
            i += 1
        proc = remote_verify(d, auditor, state)
    finally:
        d.stop()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    named = re.match(r"FAILED at seq (\d+): ", proc.stderr)
    span = re.search(r"a line from seq (\d+) to (\d+) was altered", proc.stderr)
    assert named and span, proc.stderr
    assert int(named[1]) == int(span[1]) <= forked_at <= int(span[2]), (forked_at,
                                                                          proc.stderr)


async def refused_once_rewritten(d: Daemon, auditor: tuple[Path, Path], log: Path, at: int,
                                 victim: int, forged: bytes) -> None:
    """Line `victim` (at byte `at`) rewritten as `forged` while the daemon runs: asked
    for, it is not handed out, and /health names it."""
    with log.open("r+b") as f:
        f.seek(at)
        f.write(forged)
    status, _, body = await get(d, f"/v1/audit/entries?start={victim}&limit=1", auditor)
    assert status == 503 and forged not in body, body
    assert f"line {victim} of the audit log" in json.loads(body)["detail"], body
    status, _, raw = await http("GET", f"{d.url}/health", d.ssl())
    assert status == 503 and json.loads(raw)["audit_damaged_seq"] == victim, raw


async def test_a_line_among_the_newest_rewritten_in_place_is_not_served(
        tmp_path: Path) -> None:
    """An auditor trial: a line after the last full bundle of 256 (in a young log, any
    line), rewritten in place while the daemon ran, was served as the log's: only full
    bundles were checked against their leaves. It is checked against the leaf hashes
    the daemon holds in memory: not handed out, signing stops and /health says which
    line, until it is put back."""
    ca = init_ca(tmp_path)
    log = ca.state / "audit" / "log.jsonl"
    d = start_daemon(ca.state)
    try:
        auditor = enroll(d, tmp_path, "auditor", ["auditor@example.com"])
        svc = enroll(d, tmp_path, "service", ["svc3.rewrite.example"])
        lines = log.read_bytes().splitlines()
        assert len(lines) < 256  # all of it the edge
        victim = next(i for i, line in enumerate(lines) if b"svc3.rewrite.example" in line
                      and b'"phase":"intent"' in line)
        at = log.read_bytes().index(lines[victim])
        forged = lines[victim].replace(b"svc3.rewrite.example", b"svc9.rewrite.example")
        await refused_once_rewritten(d, auditor, log, at, victim, forged)
        status, _, body = await http("POST", f"{d.url}/v1/x509/renew", d.ssl(*svc), body={})
        assert status == 503, body
        with log.open("r+b") as f:  # put back
            f.seek(at)
            f.write(lines[victim])
        await health_until(d, lambda h: h["code"] == 200)
        status, _, body = await get(d, f"/v1/audit/entries?start={victim}&limit=3", auditor)
        assert status == 200 and lines[victim] in body, body
    finally:
        assert d.stop() == 0
    audit_verify(ca.state, ok=True)


async def test_a_log_file_moved_cut_or_written_to_under_the_daemon_fails_the_auditor(
        tmp_path: Path) -> None:
    """A web view trial: the log file cut, or a line appended to it, while the daemon
    ran. /health said so (503) and nothing was signed, but the daemon serves the lines
    it wrote, which verify: `audit verify --url` said OK and the view stayed green.
    /health marks it (`audit_file_changed`), and an auditor's run fails on it until the
    file is as hsmca wrote it again. (Each change is made while the file is moved
    aside, when the daemon writes nothing, and put in place whole.)"""
    from tests.test_witness import ui_status
    ca = init_ca(tmp_path)
    log = ca.state / "audit" / "log.jsonl"
    aside = log.with_name("aside.jsonl")
    state = tmp_path / "auditor.state"
    d = start_daemon(ca.state)
    try:
        auditor = enroll(d, tmp_path, "auditor", ["auditor@example.com"])
        ok_counts(remote_verify(d, auditor, state))

        async def fails(said: str) -> None:
            found = await health_until(d, lambda h: h["code"] == 503 and said in h["audit"])
            assert found["audit_file_changed"] is True, found
            proc = remote_verify(d, auditor, state)
            assert proc.returncode == 1 and proc.stderr.startswith(
                "FAILED (no line): the daemon reports its log file changed by something "
                f"other than hsmca: {log} {said}") and "hsmca audit verify --log" in \
                proc.stderr, proc.stdout + proc.stderr

        log.rename(aside)
        await fails("was moved or deleted while hsmca ran")
        whole = aside.read_bytes()
        with aside.open("ab") as f:
            f.write(whole.splitlines(keepends=True)[-1])  # a line appended
        aside.rename(log)
        await fails("was cut or written to by something other than hsmca")
        status = ui_status(d, auditor, tmp_path)
        assert status["status"] == "failed" and status["banner"].startswith(
            "FAILED: the daemon reports its log file changed"), status
        os.truncate(log, len(whole))  # as hsmca wrote it: it writes again
        await health_until(d, lambda h: h["code"] == 200)
        ok_counts(remote_verify(d, auditor, state))

        log.rename(aside)
        whole = aside.read_bytes()
        os.truncate(aside, whole.rindex(b"\n", 0, len(whole) - 1) + 1)  # the last line cut
        aside.rename(log)
        await fails("was cut or written to by something other than hsmca")
        with log.open("ab") as f:
            f.write(whole[os.path.getsize(log):])
        await health_until(d, lambda h: h["code"] == 200)
        ok_counts(remote_verify(d, auditor, state))
    finally:
        assert d.stop() == 0
    audit_verify(ca.state, ok=True)


async def test_health_names_the_hosts_files_only_to_its_monitoring_and_this_cas_clients(
        tmp_path: Path) -> None:
    """A security review: /health told anyone who reached the port where the CA's files
    are (`/srv/.../audit/log.jsonl was cut ... (it has N bytes)`). Outside `metrics-allow`
    and without a client certificate of this CA, it says what is wrong, not where."""
    from tests.conftest import set_config
    ca = init_ca(tmp_path)
    set_config(ca.state, "server", "metrics-allow", ["192.0.2.1/32"])  # not loopback
    log = ca.state / "audit" / "log.jsonl"
    d = start_daemon(ca.state)
    try:
        auditor = enroll(d, tmp_path, "auditor", ["auditor@example.com"])
        log.rename(log.with_name("aside.jsonl"))
        try:
            anonymous = await health_until(d, lambda h: h["code"] == 503)
            assert "cannot write the audit log: .../log.jsonl was moved or deleted while " \
                "hsmca ran; put it back" in anonymous["audit"], anonymous
            assert str(tmp_path) not in json.dumps(anonymous), anonymous
            status, _, raw = await http("GET", f"{d.url}/health", d.ssl(*auditor))
            assert status == 503 and f"{log} was moved or deleted" in \
                json.loads(raw)["audit"], raw
        finally:
            log.with_name("aside.jsonl").rename(log)
        await health_until(d, lambda h: h["code"] == 200)
    finally:
        assert d.stop() == 0


async def test_a_line_rewritten_in_place_stops_signing_and_fails_the_incremental_run(
        tmp_path: Path) -> None:
    """A line under the tiles, rewritten in place at the same length while the daemon
    was stopped: the start reads only the last full bundle and passed it, the tiles
    (whence every proof) still hold the old line's hash, and an auditor's run with a
    saved state, which reads only new lines, said OK (auditor trial, H3). Now the
    daemon reads its old lines again in the background: it stops signing and says
    which line, the auditor's incremental run fails on it, and all is well again
    once the line is put back."""
    ca = init_ca(tmp_path)
    log = ca.state / "audit" / "log.jsonl"
    state = tmp_path / "auditor-state.json"
    daemons: list[Daemon] = []
    try:
        d = start_daemon(ca.state)
        daemons.append(d)
        auditor = enroll(d, tmp_path, "auditor", ["auditor@example.com"])
        svc = enroll(d, tmp_path, "service", ["svc2.rewrite.example"])
        while len(log.read_bytes().splitlines()) < 800:  # three full bundles of 256
            await asyncio.gather(*(http("POST", f"{d.url}/v1/x509/renew", d.ssl(*svc),
                                        body={}) for _ in range(8)))
        ok_counts(remote_verify(d, auditor, state))
        assert daemons.pop().stop() == 0

        lines = log.read_bytes().splitlines()
        victim = next(i for i, line in enumerate(lines) if b"svc2.rewrite.example" in line
                      and b'"phase":"intent"' in line)
        assert victim < 512  # under the tiles, before the last full bundle
        at = log.read_bytes().index(lines[victim])
        forged = lines[victim].replace(b"svc2.rewrite.example", b"svc9.rewrite.example")
        with log.open("r+b") as f:
            f.seek(at)
            f.write(forged)

        d = start_daemon(ca.state)  # the start does not read that far back
        daemons.append(d)
        found = await health_until(d, lambda h: h["code"] == 503)
        assert found["audit_damaged_seq"] == victim, found
        assert f"line {victim} of the audit log" in found["audit"], found
        assert "rewritten on disk" in found["audit"], found
        status, ctype, body = await http("POST", f"{d.url}/v1/x509/renew", d.ssl(*svc),
                                         body={})
        assert status == 503 and ctype == "application/problem+json", body
        assert "the audit log is unavailable, so nothing can be signed" in body.decode(), body

        before = state.read_bytes()
        proc = remote_verify(d, auditor, state)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert proc.stderr.startswith(f"FAILED at seq {victim}: the daemon reports its log "
                                      f"file damaged at line {victim}: line {victim} of the "
                                      "audit log"), proc.stderr
        assert "no longer hashes to its leaf" in proc.stderr, proc.stderr
        assert state.read_bytes() == before  # nothing is saved from a failed run

        with log.open("r+b") as f:  # put back in place, the daemon running
            f.seek(at)
            f.write(lines[victim])
        await health_until(d, lambda h: h["code"] == 200)
        status, _, body = await http("POST", f"{d.url}/v1/x509/renew", d.ssl(*svc), body={})
        assert status == 201, body
        ok_counts(remote_verify(d, auditor, state))
        # Rewritten again while it runs, after the start's pass: the next pass is an
        # hour away, and the line was served as the log's meanwhile (an auditor trial).
        # Asked for now, it is checked against its leaf: the damage is said at once, and
        # the forged line is not handed out (it was, as the log's: a later trial).
        await refused_once_rewritten(d, auditor, log, at, victim, forged)
        with log.open("r+b") as f:
            f.seek(at)
            f.write(lines[victim])
        await health_until(d, lambda h: h["code"] == 200)
        assert daemons.pop().stop() == 0
        audit_verify(ca.state, ok=True)
        resumed = [json.loads(line) for line in log.read_bytes().splitlines()
                   if b'"event":"log.resume"' in line]
        assert any(f"line {victim}" in r["after"] for r in resumed), resumed

        # A tile damaged instead (a byte of tile 0 flipped): signing goes on, and a proof
        # that needs the tile says so, not "nothing can be signed" (auditor trial, M6).
        level0 = ca.state / "audit" / "tiles" / "level-0"
        tiles = bytearray(level0.read_bytes())
        tiles[100] ^= 1
        level0.write_bytes(bytes(tiles))
        d = start_daemon(ca.state)
        daemons.append(d)
        size = (await latest_checkpoint(d))[0]
        status, _, body = await get(d, f"/v1/audit/proof/inclusion?index=10&size={size}",
                                    auditor)
        assert status == 503, body
        assert json.loads(body)["detail"].startswith(
            "the audit log cannot answer this: tile 0/0 does not hash to the entry its parent "
            "tile 1/0 holds for it"), body
        assert (await health_until(d, lambda h: True))["code"] == 200
        status, _, body = await http("POST", f"{d.url}/v1/x509/renew", d.ssl(*svc), body={})
        assert status == 201, body
    finally:
        for daemon in daemons:
            daemon.stop()


async def test_remote_verify_continues_from_an_offline_state_and_misses_no_line(
        tmp_path: Path) -> None:
    """An offline run on a stopped daemon's log records every line, the closing lines
    after its final checkpoint included. A remote run continues from that state; and
    once those lines are cut on the CA host, the restarted daemon signs a log without
    them, which the remote run refuses (the state used to hold only the checkpoint, so
    the cut went unnoticed)."""
    ca = init_ca(tmp_path)
    log = ca.state / "audit" / "log.jsonl"
    state = tmp_path / "auditor.state"

    def offline() -> int:
        audit_verify(ca.state, "--state", state, ok=True)
        seen = json.loads(state.read_text())["size"]
        assert seen == len(log.read_bytes().splitlines())
        return int(seen)

    daemons: list[Daemon] = []
    try:
        d = start_daemon(ca.state)
        daemons.append(d)
        auditor = enroll(d, tmp_path, "auditor", ["auditor@example.com"])
        assert daemons.pop().stop() == 0
        seen = offline()

        d = start_daemon(ca.state)
        daemons.append(d)
        lines, fetched = ok_counts(remote_verify(d, auditor, state))
        assert lines > seen and fetched == lines - seen  # on from the offline state
        assert daemons.pop().stop() == 0
        seen = offline()  # now up to the second stop's closing lines

        log.write_bytes(b"".join(log.read_bytes().splitlines(keepends=True)[:-3]))
        # The start sees the cut: its checkpoint file was written after the lines cut.
        proc = hsmca("serve", "--config", ca.state / "hsmca.toml", "--listen", "127.0.0.1:0",
                     check=False)
        assert proc.returncode == 1 and "the end of the log was cut" in proc.stderr, \
            proc.stderr
        # One who also deletes that file gets a start (on the checkpoint the log records),
        # and the auditor's state catches it.
        (ca.state / "audit" / "checkpoint").unlink()
        d = start_daemon(ca.state)
        daemons.append(d)
        before = state.read_bytes()
        proc = remote_verify(d, auditor, state)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        # named from where the lines verified may differ: after the last checkpoint among
        # them, the first line cut within it
        named = re.match(r"FAILED at seq (\d+): the log was cut or rewritten since it was "
                         r"verified last time", proc.stderr)
        span = re.search(r"a line from seq (\d+) to (\d+) was altered", proc.stderr)
        assert named and span and int(named[1]) == int(span[1]) <= seen - 3 <= int(span[2]) \
            <= seen - 1, proc.stderr
        assert state.read_bytes() == before
    finally:
        for daemon in daemons:
            daemon.stop()


def _audit_key(state: Path) -> ed25519.Ed25519PublicKey:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key
    key = load_pem_public_key((state / "audit" / "audit_key.pem").read_bytes())
    assert isinstance(key, ed25519.Ed25519PublicKey)
    return key


def test_remote_verify_needs_a_state_and_a_client_certificate(tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    base = ("audit", "verify", "--url", "https://127.0.0.1:1", "--key", key)
    proc = hsmca(*base, "--client-cert", key, "--client-key", key, check=False)
    assert proc.returncode == 1 and "--url needs --state" in proc.stderr
    proc = hsmca(*base, "--state", tmp_path / "s.json", check=False)
    assert proc.returncode == 1 and "--client-cert and --client-key" in proc.stderr
    # The usual slip: the client key given as --key, which is the audit key here.
    proc = hsmca(*base, "--state", tmp_path / "s.json", "--cert", key, check=False)
    assert proc.returncode == 1 and "goes in --client-key" in proc.stderr
    proc = hsmca("audit", "verify", "--url", "u", "--log", key, "--key", key, check=False)
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr
    proc = hsmca(*base, "--state", tmp_path / "s.json", "--client-cert", key, "--client-key",
                 key, "--allow-unsigned", check=False)
    assert proc.returncode == 1 and "--allow-unsigned is for --log" in proc.stderr


# ---- (d) the file witness ------------------------------------------------------------------


def test_file_witness_accepts_extensions_and_refuses_anything_else(tmp_path: Path) -> None:
    origin = "witness.test/audit"
    priv = ed25519.Ed25519PrivateKey.generate()
    pub = priv.public_key()
    entries = [f'{{"seq":{i}}}'.encode() for i in range(24)]
    forked = [*entries[:3], b'{"seq":3,"hidden":true}', *entries[4:]]

    def cp(d: Sequence[bytes], size: int, signer: ed25519.Ed25519PrivateKey = priv) -> str:
        return sign_checkpoint(origin, size, mth(d[:size]), origin, signer.public_key(),
                               signer.sign)

    held = tmp_path / "witness" / "checkpoint"
    held.parent.mkdir()
    w = FileWitness(held, pub, origin)
    assert w.held() is None
    w.push(cp(entries, 5), no_proof)  # the first is trusted on first use
    assert held.read_text() == cp(entries, 5)
    w.push(cp(entries, 5), no_proof)  # the same tree again
    w.push(cp(entries, 12), given(proof(5, entries[:12])))
    assert held.read_text() == cp(entries, 12)

    refused = [
        (cp(entries, 8), [], "fewer than"),
        (cp(forked, 12), [], "different root"),
        (cp(forked, 16), proof(12, forked[:16]), "does not extend"),
        (cp(entries, 16), [], "does not extend"),  # a real extension needs its proof
        (cp(entries, 16), proof(11, entries[:16]), "does not extend"),  # from the held size
        (cp(entries, 16, ed25519.Ed25519PrivateKey.generate()), proof(12, entries[:16]),
         "does not verify"),
    ]
    for text, hashes, why in refused:
        with pytest.raises(WitnessRefused, match=why):
            w.push(text, given(hashes))
        assert held.read_text() == cp(entries, 12)  # the held checkpoint is kept

    # push asks for the proof from whatever size is held.
    asked: list[tuple[int, int]] = []

    def prove(old: int, size: int) -> list[bytes]:
        asked.append((old, size))
        return proof(old, entries[:size])

    w.push(cp(entries, 24), prove)
    assert asked == [(12, 24)] and held.read_text() == cp(entries, 24)

    # A damaged held file is evidence: the witness refuses rather than overwrite it.
    held.write_text(cp(entries, 24).replace("24", "25", 1))
    with pytest.raises(WitnessRefused, match="does not verify"):
        w.push(cp(entries, 24), no_proof)


def test_file_witness_follows_a_rotation_of_the_audit_key(tmp_path: Path) -> None:
    """After `key rotate audit` and `key retire`, the file witness refused every
    checkpoint until a restart: it was pinned to the key of the daemon's start (docs
    review). It follows a hand-over as a verifier does, and no other key."""
    origin = "witness.test/audit"
    old, new = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    entries = [f'{{"seq":{i}}}'.encode() for i in range(40)]

    def cp(size: int, *signers: ed25519.Ed25519PrivateKey, names: Any = None) -> str:
        extensions = (f"{NEXT_KEY}{verifier_key(origin, names.public_key())}",) if names \
            else ()
        body = checkpoint_body(origin, size, mth(entries[:size]), extensions)
        return signed_note(body, [(origin, k.public_key(), k.sign(body.encode()))
                                  for k in signers])

    w = FileWitness(tmp_path / "checkpoint", old.public_key(), origin)
    w.push(cp(5, old), no_proof)
    with pytest.raises(WitnessRefused, match="does not verify"):  # not handed over yet
        w.push(cp(8, new), given(proof(5, entries[:8])))
    w.push(cp(10, old, new, names=new), given(proof(5, entries[:10])))  # the hand-over
    w.push(cp(20, new), given(proof(10, entries[:20])))  # the old key retired
    assert str(w) == str(tmp_path / "checkpoint")  # how the daemon's log lines name it
    stranger = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(WitnessRefused, match="does not verify"):
        w.push(cp(30, stranger), given(proof(20, entries[:30])))
    # After a restart the daemon pins the key in force (audit_key.pem), and the held
    # checkpoint verifies with it.
    again = FileWitness(tmp_path / "checkpoint", new.public_key(), origin)
    again.push(cp(30, new), given(proof(20, entries[:30])))


# ---- verify_remote's own checks, against a log server the test controls -----------------


class ScriptedLog:
    """A log signed with a software key, served by a plain aiohttp app that can lie: its
    entries can differ from the tree its checkpoint and proofs come from."""

    origin = "scripted.test/audit"

    def __init__(self) -> None:
        self.key = ed25519.Ed25519PrivateKey.generate()
        self.lines: list[bytes] = []
        self.served: list[bytes] | None = None  # None: serve `lines`
        self.checkpoint = ""
        self.logs: list[Any] = [None]  # what GET /v1/audit/logs names

    def add(self, event: str, **fields: Any) -> None:
        prev = hashlib.sha256(self.lines[-1]).hexdigest() if self.lines else "0" * 64
        obj = {"seq": len(self.lines), "ts": "2026-01-02T03:04:05.000006Z", "event": event,
               "prev": prev, **fields}
        self.lines.append(json.dumps(obj, sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=False).encode())

    def sign(self, size: int | None = None) -> None:
        size = len(self.lines) if size is None else size
        self.checkpoint = sign_checkpoint(self.origin, size, mth(self.lines[:size]),
                                          self.origin, self.key.public_key(), self.key.sign)

    async def serve(self) -> tuple[Any, str]:
        """This log served over plain HTTP on a loopback port: (its runner, its URL)."""
        from aiohttp import web
        runner = web.AppRunner(self.app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return runner, f"http://127.0.0.1:{port}"

    def app(self) -> Any:
        from aiohttp import web

        async def checkpoint(_r: web.Request) -> web.Response:
            return web.Response(text=self.checkpoint)

        async def entries(r: web.Request) -> web.Response:
            start, limit = int(r.query["start"]), int(r.query["limit"])
            lines = (self.lines if self.served is None else self.served)[start:start + limit]
            return web.Response(body=b"".join(line + b"\n" for line in lines),
                                content_type="application/jsonl")

        async def consistency(r: web.Request) -> web.Response:
            old, size = int(r.query["old"]), int(r.query["size"])
            hashes = proof(old, self.lines[:size])
            return web.json_response({"old": old, "size": size,
                                      "proof": [base64.b64encode(h).decode() for h in hashes]})

        async def logs(_r: web.Request) -> web.Response:
            return web.json_response({"logs": [{"name": n} for n in self.logs]})

        app = web.Application()
        app.router.add_get("/v1/audit/logs", logs)
        app.router.add_get("/v1/audit/checkpoint", checkpoint)
        app.router.add_get("/v1/audit/entries", entries)
        app.router.add_get("/v1/audit/proof/consistency", consistency)
        return app


async def test_a_log_name_that_is_not_a_node_name_is_refused(tmp_path: Path) -> None:
    """Each log's state file is named after it (auditor.NODE.state): a daemon that
    names a log with a path in it is refused before any file is named."""
    import ssl

    from ca.audit.remote import list_logs, log_state_path
    from ca.client import ClientError

    log = ScriptedLog()
    runner, url = await log.serve()
    ctx = ssl.create_default_context()
    try:
        log.logs = ["node-1", "init"]
        assert await list_logs(url, ctx) == ["node-1", "init"]
        assert log_state_path(tmp_path / "a.state", "node-1") == tmp_path / "a.node-1.state"
        for bad in ("../../etc/cron.d/x", "a/b", ".hidden", "", "node-2\n"):
            log.logs = ["node-1", bad]
            with pytest.raises(ClientError, match="not a node name"):
                await list_logs(url, ctx)
        log.logs = [None, "node-1"]
        with pytest.raises(ClientError, match="mixes an unnamed log"):
            await list_logs(url, ctx)
    finally:
        await runner.cleanup()


async def test_verify_remote_carries_open_intents_and_catches_a_lying_server(
        tmp_path: Path) -> None:
    import ssl

    from ca.audit.remote import verify_remote
    from ca.audit.verify import verify_log

    log = ScriptedLog()
    runner, url = await log.serve()
    pub, ctx, state = log.key.public_key(), ssl.create_default_context(), tmp_path / "s.json"
    try:
        # A checkpoint that falls between an intent and its outcome, as on a busy CA.
        log.add("init.start")
        log.add("hsm.sign", phase="intent", op_id="in-flight")
        log.sign()
        first = await verify_remote(url, ctx, pub, state)
        assert first.ok and first.fetched == 2, first.reason
        assert json.loads(state.read_text())["open_intents"] == {
            "in-flight": {"seq": 1, "restarted": False}}

        # Its outcome arrives later; a checkpoint logged in the new lines is checked too.
        log.add("hsm.sign", phase="outcome", op_id="in-flight", result="ok")
        log.sign()
        log.add("hsm.sign", phase="intent", op_id="cp", purpose="checkpoint")
        log.add("hsm.sign", phase="outcome", op_id="cp", result="ok", checkpoint=log.checkpoint)
        log.add("hsm.sign", phase="intent", op_id="crashed")
        log.add("daemon.start")
        log.sign()
        second = await verify_remote(url, ctx, pub, state)
        assert second.ok and second.fetched == 5 and second.checkpoints == 2, second.reason
        saved = state.read_bytes()
        assert json.loads(saved)["open_intents"] == {"crashed": {"seq": 5, "restarted": True}}
        # The state is the offline one extended: `audit verify --log` accepts it.
        data = b"".join(line + b"\n" for line in log.lines)
        assert verify_log(data, pub, log.origin, state=json.loads(saved)).ok

        # A server whose entries are not what its checkpoint commits to.
        log.add("cert.revoke", serial="01")
        log.sign()
        log.served = [*log.lines[:-1], log.lines[-1].replace(b'"01"', b'"02"')]
        lied = await verify_remote(url, ctx, pub, state)
        assert not lied.ok and lied.bad_seq == 7 and "not those its latest checkpoint" in (
            lied.reason or "")
        log.served = log.lines[:-1]
        short = await verify_remote(url, ctx, pub, state)
        assert not short.ok and short.bad_seq == 7 and "truncated" in (short.reason or "")
        # An older checkpoint than the one verified: cut.
        log.served = None
        log.sign(5)
        cut = await verify_remote(url, ctx, pub, state)
        assert not cut.ok and cut.bad_seq == 5 and "cut or rewritten" in (cut.reason or "")
        assert state.read_bytes() == saved  # no failed run touched the state

        # A state written by the offline verifier is upgraded by a full pass.
        log.sign()
        offline = {k: json.loads(saved)[k] for k in ("size", "root", "checkpoint")}
        legacy = tmp_path / "offline.json"
        legacy.write_text(json.dumps(offline))
        upgraded = await verify_remote(url, ctx, pub, legacy)
        assert upgraded.ok and upgraded.fetched == 8, upgraded.reason
        assert json.loads(legacy.read_text())["frontier"]
    finally:
        await runner.cleanup()


async def test_verify_remote_from_a_state_ahead_of_the_daemons_checkpoint(
        tmp_path: Path) -> None:
    """A state saved offline may hold lines no checkpoint covered yet. While the daemon's
    latest checkpoint covers fewer lines, the remote run checks that the daemon still
    has them unchanged; a state of the first version still continues."""
    import ssl

    from ca.audit.remote import verify_remote
    from ca.audit.verify import save_state, verify_log

    log = ScriptedLog()
    runner, url = await log.serve()
    pub, ctx, state = log.key.public_key(), ssl.create_default_context(), tmp_path / "s.json"
    try:
        log.add("init.start")
        log.add("hsm.login")
        log.sign()  # covers 2 lines; the next 2 only the auditor's copy of the log has seen
        log.add("cert.revoke", serial="01")
        log.add("hsm.logout")
        offline = verify_log(b"".join(line + b"\n" for line in log.lines), pub, log.origin,
                             origin=log.origin, latest_checkpoint=log.checkpoint)
        assert offline.ok and (offline.signed, offline.unsigned) == (2, 2), offline
        assert offline.new_state is not None
        save_state(state, offline.new_state)  # as `--allow-unsigned --state` records them

        behind = await verify_remote(url, ctx, pub, state)
        assert behind.ok and (behind.lines, behind.fetched) == (4, 0), behind.reason
        assert "covers 2 of the 4 lines verified" in (behind.note or "")
        log.sign(3)
        newer = await verify_remote(url, ctx, pub, state)
        assert newer.ok, newer.reason
        saved = state.read_bytes()
        assert json.loads(saved)["size"] == 4  # no line forgotten,
        assert json.loads(saved)["checkpoint"] == log.checkpoint  # and the newer checkpoint

        log.served = log.lines[:3]  # the daemon lost the last line
        cut = await verify_remote(url, ctx, pub, state)
        assert (cut.ok, cut.bad_seq) == (False, 3) and "has only 3" in (cut.reason or "")
        log.served = None
        original, log.lines[3] = log.lines[3], log.lines[3].replace(b"logout", b"logon")
        rewritten = await verify_remote(url, ctx, pub, state)
        assert (rewritten.ok, rewritten.bad_seq) == (False, 3)
        assert "cut or rewritten" in (rewritten.reason or "")
        log.lines[3] = original
        assert state.read_bytes() == saved  # no failed run touched the state

        log.add("daemon.start")
        log.sign()
        on = await verify_remote(url, ctx, pub, state)
        assert on.ok and on.fetched == 1, on.reason  # from line 4: the lines seen are kept

        # The state the remote verifier of the first version saved goes on as well.
        now = json.loads(state.read_text())
        first_version = {"size": now["size"], "root": now["root"],
                         "checkpoint": now["checkpoint"], "frontier": now["frontier"],
                         "last_hash": now["head"], "last_line": log.lines[-1].decode(),
                         "next_seq": now["size"], "open_intents": now["open_intents"]}
        state.write_text(json.dumps(first_version))
        log.add("cert.revoke", serial="02")
        log.sign()
        migrated = await verify_remote(url, ctx, pub, state)
        assert migrated.ok and migrated.fetched == 1, migrated.reason
        assert json.loads(state.read_text())["version"] == 2
    finally:
        await runner.cleanup()


def test_a_log_verified_before_must_stay_listed(tmp_path: Path) -> None:
    """A server that lists logs under new names is not followed from nothing while a log
    verified before goes unlisted (an auditor trial: a log cut from 6010 lines to 122
    was OK as the log of a node `evil`, in the CLI and the web view)."""
    from ca.audit.remote import log_state_path, logs_gone
    state = tmp_path / "auditor.state"
    assert logs_gone(state, ["ca-1"]) is None  # nothing verified yet: a new cluster
    state.write_text("{}")  # a single node's log, verified
    gone = logs_gone(state, ["evil"])
    assert gone is not None and "the log verified last time is not served" in gone
    assert logs_gone(state, ["init", "ca-1"]) is None  # moved to PostgreSQL: init's
    state.unlink()
    log_state_path(state, "ca-1").write_text("{}")
    log_state_path(state, "ca-2").write_text("{}")
    assert logs_gone(state, ["init", "ca-1", "ca-2", "ca-3"]) is None  # ca-3 joined
    gone = logs_gone(state, ["init", "ca-1", "evil"])
    assert gone is not None and gone.startswith("log ca-2 was verified before"), gone


def test_a_verifier_key_ending_in_a_slash_is_taken_whole() -> None:
    """Its base64 ends in '/' for one key in 64: taken as a path, the slash was dropped
    and the key refused as 'no such file' (a flaky run of the test above found it)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from ca.audit.note import verifier_key
    from ca.commands.audit_cmd import _audit_key
    for _ in range(2000):
        public = Ed25519PrivateKey.generate().public_key()
        text = verifier_key("localhost/hsmca-audit", public)
        if text.endswith("/"):
            break
    assert text.endswith("/")
    assert _audit_key(text).public_bytes_raw() == public.public_bytes_raw()


def test_an_ssh_intent_is_found_by_its_time_whatever_else_the_log_holds() -> None:
    """`audit prove` finds an SSH certificate's intent by bisection on the lines' times,
    reading what a daemon serves as untrusted (a review: a line that is not an object,
    or a time without its zone, ended in a traceback): those lines have no time, and
    the search still finds the intent among thousands of lines of one second."""
    import datetime as dt

    from ca.commands.audit_prove import _ssh_pair
    at = dt.datetime(2026, 12, 6, 8, 0, tzinfo=dt.UTC)

    def line(seq: int, **fields: Any) -> bytes:
        return json.dumps({"seq": seq, **fields}).encode()
    lines = [line(i, ts=(at - dt.timedelta(hours=1)).isoformat()) for i in range(3000)]
    lines += [b"7", b"[]", line(3002, ts=7), line(3003, ts="2026-12-06T07:59:00"),
              line(3004)]  # none of them has a time
    lines += [line(i, ts=at.isoformat()) for i in range(3005, 8000)]
    intent = line(8000, ts=at.isoformat(), event="hsm.sign", phase="intent",
                  purpose="ssh-user", serial="77", op_id="op")
    lines += [intent, line(8001, event="hsm.sign", phase="outcome", op_id="op",
                           ts=at.isoformat(), result="ok")]
    lines += [line(i, ts=(at + dt.timedelta(hours=1)).isoformat()) for i in range(8002, 9000)]

    class Log:
        async def entries(self, start: int, stop: int) -> bytes:
            return b"".join(x + b"\n" for x in lines[start:stop])

    found = asyncio.run(_ssh_pair(Log(), len(lines), "77", at))
    assert found == ((8000, intent), (8001, lines[8001])), found
    assert asyncio.run(_ssh_pair(Log(), len(lines), "78", at)) is None  # not in this log
    assert asyncio.run(_ssh_pair(Log(), 8000, "77", at)) is None  # past what is covered

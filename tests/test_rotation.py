"""Key lifecycle against a real daemon: rotate the issuing and the SSH user CA key
while renewals run, retire and destroy the old ones, and every step is audited
(issue 17; docs/keys.md)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from tests.conftest import Daemon, hsmca, init_ca, require, start_daemon
from tests.helpers import (
    ask_ocsp,
    audit_verify,
    enroll,
    http,
    log_lines,
    request_for,
    token_file,
)
from tests.test_ssh_e2e import SSHD, ssh_login

pytestmark = pytest.mark.asyncio(loop_scope="session")


def aki(cert: x509.Certificate) -> bytes:
    return cert.extensions.get_extension_for_class(
        x509.AuthorityKeyIdentifier).value.key_identifier  # type: ignore[return-value]


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def key_cmd(d: Daemon, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return hsmca("key", *args, "--config", d.state / "hsmca.toml", "--url", d.url,
                 check=check)


def token_labels(ca_state: Path, token: Any) -> list[str]:
    out = subprocess.run([require("pkcs11-tool"), "--module", token.module, "--token-label",
                          token.label, "--login", "--pin",
                          token.pin_file.read_text().strip(), "--list-objects", "--type",
                          "privkey"], capture_output=True, text=True, check=True).stdout
    return re.findall(r"label:\s+(\S+)", out)


def openssl_verify(root: Path, untrusted: Path, leaf: Path, *more: Path,
                   crls: Path | None = None) -> bool:
    """`openssl verify` with `untrusted` and each of `more` as -untrusted files; with
    `crls`, every link of the chain checked against those CRLs."""
    extra = [arg for path in more for arg in ("-untrusted", path)]
    if crls is not None:
        extra += ["-crl_check_all", "-CRLfile", crls]
    return subprocess.run([require("openssl"), "verify", "-CAfile", root, "-untrusted",
                           untrusted, *extra, leaf], capture_output=True,
                          text=True).returncode == 0


def run_openssl(*args: str | Path) -> str:
    return subprocess.run([require("openssl"), *args], capture_output=True, text=True,
                          check=True).stdout


async def test_rotate_issuing_and_ssh_keys_retire_and_destroy_while_renewals_run(
        tmp_path: Path) -> None:
    ca = init_ca(tmp_path, name="Example Corporation staging east")  # the longest name: 32
    config = ca.state / "hsmca.toml"
    config.write_text(config.read_text().replace(
        "[server]\n", '[server]\npublic-url = "https://ca.test"\n', 1))
    d = start_daemon(ca.state)
    try:
        before = enroll(d, tmp_path, "service", ["old.internal.example"])
        looped = enroll(d, tmp_path, "service", ["loop.internal.example"])
        user = enroll(d, tmp_path, "user", ["alice@example.com"], ["root"])
        host = enroll(d, tmp_path, "host", ["localhost"])
        listing = key_cmd(d, "list").stdout
        old_label = re.search(r"^(\S+)\s+issuing\s+active", listing, re.M)
        assert old_label, listing
        old_label_text = old_label.group(1)

        results: list[int] = []
        stop = asyncio.Event()

        async def renew_loop() -> None:
            cert_pem, key_path = looped[0].read_text(), looped[1]
            current = tmp_path / "loop-current.pem"
            while not stop.is_set():
                current.write_text(cert_pem)
                status, _, raw = await http("POST", f"{d.url}/v1/x509/renew",
                                            d.ssl(current, key_path), body={})
                results.append(status)
                if status == 201:
                    cert_pem = json.loads(raw)["certificate"]

        loop = asyncio.create_task(renew_loop())
        out = key_cmd(d, "rotate", "issuing").stdout
        assert "rotated issuing" in out and old_label_text in out
        after = enroll(d, tmp_path, "service", ["new.internal.example"])
        assert aki(load(after[0])) != aki(load(before[0]))
        # The new issuing CA names its root's CRL, for relying parties that fetch what a
        # chain names (a relying-party trial: Java and Windows check the issuing CA too)
        points = load(ca.state / "x509/issuing.pem").extensions.get_extension_for_class(
            x509.CRLDistributionPoints).value
        assert [p.full_name[0].value for p in points] == [  # type: ignore[index]
            "https://ca.test/v1/x509/crl/root-ca"]
        named = "CN=Example Corporation staging east"
        assert load(before[0]).issuer.rfc4514_string() == f"{named} Issuing CA"
        assert re.fullmatch(rf"{named} Issuing CA \d{{14}}-[0-9a-f]{{4}}",
                            load(after[0]).issuer.rfc4514_string())
        assert load(d.root).subject.rfc4514_string() == f"{named} Root CA"
        bundle = tmp_path / "bundle.pem"
        bundle.write_bytes((await http("GET", f"{d.url}/v1/x509/bundle", d.ssl()))[2])
        chain = tmp_path / "chain.pem"
        chain.write_bytes((await http("GET", f"{d.url}/v1/x509/chain", d.ssl()))[2])
        assert openssl_verify(d.root, bundle, before[0])  # the old leaf, with the bundle
        assert openssl_verify(d.root, chain, after[0])
        assert not openssl_verify(d.root, chain, before[0])  # the chain is the new one's

        # The previous key still signs the CRL and OCSP of what it issued.
        old_cert = load(before[0])
        status, _, raw = await http("POST", f"{d.url}/v1/x509/revoke", d.admin_ssl(),
                                    body={"serial": format(old_cert.serial_number, "x")})
        assert status == 200, raw
        dp = old_cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        path = str(dp[0].full_name[0].value).removeprefix("https://ca.test")  # type: ignore[index]
        assert path == f"/v1/x509/crl/{old_label_text}"
        crl = x509.load_der_x509_crl((await http("GET", f"{d.url}{path}", d.ssl()))[2])
        old_inter = next(c for c in x509.load_pem_x509_certificates(bundle.read_bytes())
                         if c.subject == old_cert.issuer)
        assert crl.is_signature_valid(old_inter.public_key())
        assert crl.get_revoked_certificate_by_serial_number(old_cert.serial_number) is not None
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            status, _, raw = await http(
                "POST", f"{d.url}/v1/x509/ocsp", d.ssl(), data=request_for(old_cert, old_inter),
                headers={"Content-Type": "application/ocsp-request"})
            resp = ocsp.load_der_ocsp_response(raw)
            if resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL and \
                    resp.certificate_status == ocsp.OCSPCertStatus.REVOKED:
                break
            assert asyncio.get_running_loop().time() < deadline
        old_inter.public_key().verify(resp.signature, resp.tbs_response_bytes,
                                      ec.ECDSA(resp.signature_hash_algorithm))

        # SSH: both user CA keys are trusted during the overlap, newest first.
        keygen = require("ssh-keygen")
        for name in ("id_before", "id_after", "hostkey"):
            subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", tmp_path / name],
                           check=True)
        hsmca("ssh", "user", "--url", d.url, "--ca", d.root, "--cert", user[0], "--key",
              user[1], "--pubkey", tmp_path / "id_before.pub")
        unstaged = key_cmd(d, "rotate", "ssh-user")
        # signing at once: said whom its certificates are refused by until they refresh
        assert "are refused by hosts (sshd's TrustedUserCAKeys) until they refresh" in \
            unstaged.stderr and "--stage" in unstaged.stderr, unstaged.stderr
        hsmca("ssh", "user", "--url", d.url, "--ca", d.root, "--cert", user[0], "--key",
              user[1], "--pubkey", tmp_path / "id_after.pub")
        hsmca("ssh", "host", "--url", d.url, "--ca", d.root, "--cert", host[0], "--key",
              host[1], "--pubkey", tmp_path / "hostkey.pub")
        cas = json.loads((await http("GET", f"{d.url}/v1/ssh/ca", d.ssl()))[2])
        users = cas["user"].splitlines()
        signer = subprocess.run([keygen, "-L", "-f", tmp_path / "id_after-cert.pub"],
                                capture_output=True, text=True, check=True).stdout
        newest_fp = subprocess.run([keygen, "-l", "-f", "-"], input=users[0] + "\n",
                                   capture_output=True, text=True, check=True).stdout.split()[1]
        assert len(users) == 2 and newest_fp in signer
        # Each line names its key, so the old one can be told from the new by hand.
        assert users[1].endswith(" hsmca-user-ca ssh-user-ca"), users
        assert users[0].split()[-2] == "hsmca-user-ca" and \
            users[0].split()[-1].startswith("ssh-user-ca-"), users
        # The state directory's copy (what docs/ssh.md gives sshd) says the same.
        assert (ca.state / "ssh/user_ca.pub").read_text() == cas["user"] + "\n"
        assert (ca.state / "ssh/host_ca.pub").read_text() == cas["host"] + "\n"
        (tmp_path / "user_cas.pub").write_text(cas["user"] + "\n")
        (tmp_path / "krl").write_bytes((await http("GET", f"{d.url}/v1/ssh/krl", d.ssl()))[2])
        known = tmp_path / "known_hosts"
        sshd = SSHD(tmp_path, tmp_path / "hostkey", tmp_path / "hostkey-cert.pub",
                    tmp_path / "user_cas.pub", tmp_path / "krl")
        try:
            known.write_text(f"@cert-authority [localhost]:{sshd.port} "
                             f"{cas['host'].splitlines()[0]}\n")
            for who in ("id_before", "id_after"):
                proc = ssh_login(sshd.port, known, tmp_path / who,
                                 tmp_path / f"{who}-cert.pub")
                assert "logged-in-with-cert" in proc.stdout, proc.stderr
        finally:
            sshd.stop()

        # Retire, then destroy the old issuing key: issuance goes on with the new one.
        host_cert = load(host[0])
        host_ocsp = request_for(host_cert, old_inter)
        # Renewed with its key (no --rekey): the new one stays live when the old one is
        # revoked below, and the revoker is told (that answer was a 500: a key trial)
        status, _, raw = await http("POST", f"{d.url}/v1/x509/renew", d.ssl(*host), body={})
        assert status == 201, raw
        deadline = asyncio.get_running_loop().time() + 30
        while (resp := (await ask_ocsp(d, host_ocsp))[0]).response_status != \
                ocsp.OCSPResponseStatus.SUCCESSFUL:  # pre-signed within seconds
            assert asyncio.get_running_loop().time() < deadline
        assert resp.certificate_status == ocsp.OCSPCertStatus.GOOD
        # Retiring cannot be undone: asked first, with what the key issued; anything but
        # yes leaves it previous, and the refusal has a line of its own.
        no = hsmca("key", "retire", old_label_text, "--config", d.state / "hsmca.toml",
                   "--url", d.url, input="no\n", check=False)
        assert no.returncode == 1 and f"Retire {old_label_text} (issuing, previous; it " \
            "issued " in no.stderr, no.stderr
        # and how many of them are still valid: what retiring it cuts off, said before
        assert re.search(r"certificate\(s\), \d+ still valid \(the last until ", no.stderr), \
            no.stderr
        # the host's among them, replaced by its renewal: renewing does not end it (an
        # operator's trial renewed everything and was told the same count again)
        assert re.search(r"\), (\d+|all) of them replaced by a renewal already\)\?", no.stderr), \
            no.stderr
        assert "relying parties that check them refuse its certificates" in no.stderr
        assert no.stderr.splitlines()[-1] == \
            "hsmca: error: not retired (confirm with yes, or pass --yes)", no.stderr
        row = next(line for line in key_cmd(d, "list").stdout.splitlines()
                   if line.startswith(old_label_text + " "))
        assert row.split()[2] == "previous", row
        # An active key is refused at once, not after a "yes" (a docs trial)
        active = next(line.split()[0] for line in key_cmd(d, "list").stdout.splitlines()
                      if line.split()[2:3] == ["active"])
        refused = hsmca("key", "retire", active, "--config", d.state / "hsmca.toml",
                        "--url", d.url, input="", check=False)
        assert refused.returncode == 1 and "rotate first" in refused.stderr, refused.stderr
        assert "Retire " not in refused.stderr
        crls_before = (await http("GET", f"{d.url}/v1/x509/crls.pem", d.ssl()))[2]
        retired = hsmca("key", "retire", old_label_text, "--config", d.state / "hsmca.toml",
                        "--url", d.url, input="yes\n")
        # Its last CRL stays in crls.pem while it is valid: relying parties that check
        # every link refused its certificates still valid the moment it was retired
        crls_after = (await http("GET", f"{d.url}/v1/x509/crls.pem", d.ssl()))[2]
        assert crls_after.count(b"BEGIN X509 CRL") == crls_before.count(b"BEGIN X509 CRL")
        assert "signs nothing" in retired.stdout
        # It still has live certificates (the user's, the host's): the operator is told
        # what retiring now means for them.
        assert "certificate(s) it signed are still valid" in retired.stderr, retired.stderr
        assert "relying parties that check them refuse those certificates" in retired.stderr
        assert "of them replaced by a renewal already" in retired.stderr and \
            "lapse at their notAfter" in retired.stderr, retired.stderr
        # A certificate of the retired key, revoked now: no CRL or OCSP response can say
        # so any more. OCSP stops saying good, and the operator is told.
        proc = hsmca("revoke", format(host_cert.serial_number, "x"), "--config",
                     d.state / "hsmca.toml", "--url", d.url)
        assert "revoked" in proc.stdout
        assert "it was issued by a key retired or destroyed" in proc.stderr \
            and old_label_text in proc.stderr and "trust it until it expires" in proc.stderr, \
            proc.stderr
        assert "other live certificate(s) of the same key" in proc.stderr, proc.stderr
        assert f"revoke its CA certificate: hsmca key revoke {old_label_text}" in proc.stderr
        resp, _ = await ask_ocsp(d, host_ocsp)
        assert resp.response_status == ocsp.OCSPResponseStatus.UNAUTHORIZED
        later = enroll(d, tmp_path, "service", ["later.internal.example"])
        assert aki(load(later[0])) == aki(load(after[0]))
        refused = key_cmd(d, "destroy", "not-a-key", "--yes", check=False)
        assert refused.returncode == 1 and "no key labelled" in refused.stderr
        # Without --yes, a key that cannot be destroyed is refused before any question
        # (a key trial typed yes, then was told)
        for label in ("not-a-key", active):
            refused = hsmca("key", "destroy", label, "--config", d.state / "hsmca.toml",
                            "--url", d.url, input="", check=False)
            assert refused.returncode == 1 and "Destroy " not in refused.stderr, \
                refused.stderr
        # the active one told the way to get there (an operator's trial was told only no)
        assert "is active: rotate first (hsmca key rotate ssh-user), then retire and " \
            "destroy the key it replaces" in refused.stderr, refused.stderr
        assert old_label_text in token_labels(ca.state, ca.token)
        # asked first, with what it signed that is still valid (said in the daemon's
        # log alone before: a key trial)
        no = hsmca("key", "destroy", old_label_text, "--config", d.state / "hsmca.toml",
                   "--url", d.url, input="no\n", check=False)
        assert no.returncode == 1 and "certificate(s) it signed are still valid" in \
            no.stderr, no.stderr
        destroyed = key_cmd(d, "destroy", old_label_text, "--yes")
        assert "certificate(s) it signed are still valid" in destroyed.stderr
        assert old_label_text not in token_labels(ca.state, ca.token)
        assert "destroyed" in key_cmd(d, "list").stdout
        stop.set()
        await loop
        assert results and set(results) == {201}, results
    finally:
        assert d.stop() == 0
    lines = log_lines(ca.state)
    destroy = [x for x in lines if x["event"] == "hsm.destroy"]
    assert [x["phase"] for x in destroy] == ["intent", "outcome"]
    assert destroy[0]["op_id"] == destroy[1]["op_id"] and destroy[1]["result"] == "ok"
    assert destroy[0]["label"] == old_label_text
    assert [x["event"] for x in lines if x["event"].startswith("key.")] == [
        "key.rotate", "key.rotate", "key.retire"]
    audit_verify(ca.state, ok=True)
    # The operator's log says each change of the CA's keys too (it said none).
    said = [e for e in (json.loads(x) for x in d.stderr if x.startswith("{"))
            if e.get("event", "").startswith("key ")]
    assert [(e["event"], e["kind"]) for e in said] == [
        ("key rotated", "issuing"), ("key rotated", "ssh-user"), ("key retired", "issuing"),
        ("key destroyed", "issuing")], said
    assert said[2]["label"] == said[3]["label"] == old_label_text
    assert said[2]["live"] and all(e["actor"].startswith("cert:") for e in said), said


async def test_key_list_reads_the_inventory_while_the_daemon_is_stopped(tmp_path: Path) -> None:
    """A key trial could not list the keys during the stops the docs ask for (the root
    ceremony, a token backup): `key list` needed the daemon. With none answering it reads
    the inventory of --config, writing nothing, and says so."""
    import sqlite3
    ca = init_ca(tmp_path)
    config = ("--config", ca.state / "hsmca.toml")
    listed = hsmca("key", "list", *config)
    assert listed.stderr.startswith(f"hsmca: note: the daemon of {ca.state / 'hsmca.toml'} "
                                    "is not running: read from the inventory "), listed.stderr
    rows = {line.split()[0]: line.split()[1:4] for line in listed.stdout.splitlines()[1:]
            if not line.startswith(" ")}
    assert rows["root-ca"] == ["root", "active", "ec-p256"], listed.stdout
    assert rows["issuing-ca"][:2] == ["issuing", "active"], listed.stdout
    assert "admin" not in rows  # keys only
    # An SSH CA key's line also has its fingerprint as sshd logs it and ssh-keygen -l
    # prints it (an SSH trial could not match the SPKI's to sshd's "CA ECDSA SHA256:").
    keygen = subprocess.run([require("ssh-keygen"), "-lf", ca.state / "ssh" / "user_ca.pub"],
                            capture_output=True, text=True, check=True).stdout.split()[1]
    lines = listed.stdout.splitlines()
    uri = lines[next(i for i, line in enumerate(lines) if line.startswith("ssh-user-ca")) + 1]
    assert keygen.startswith("SHA256:") and uri.split()[-1] == keygen, (keygen, uri)
    # An inventory this release has not migrated yet is left as it is, and said
    db = ca.state / "hsmca.sqlite3"
    with sqlite3.connect(db) as conn:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        conn.execute(f"PRAGMA user_version = {version - 1}")
    refused = hsmca("key", "list", *config, check=False)
    assert refused.returncode == 1 and "older than this hsmca reads" in refused.stderr \
        and "start the daemon once" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == version - 1


async def test_what_the_ra_refuses_about_keys(tmp_path: Path) -> None:
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state)
    try:
        svc = enroll(d, tmp_path, "service", ["s.internal.example"])
        cases: list[tuple[str, dict[str, Any], Any, int, str]] = [
            ("rotate", {"kind": "issuing"}, d.ssl(*svc), 403, "wrong-role"),
            ("rotate", {"kind": "root"}, d.admin_ssl(), 400, "bad-request"),
            ("rotate", {"kind": "nonsense"}, d.admin_ssl(), 400, "bad-request"),
            ("retire", {"label": "issuing-ca"}, d.admin_ssl(), 409, "conflict"),
            ("destroy", {"label": "issuing-ca", "confirm": True}, d.admin_ssl(), 409,
             "conflict"),
            ("retire", {"label": "nope"}, d.admin_ssl(), 404, "not-found"),
        ]
        for action, body, ctx, status, kind in cases:
            got, _, raw = await http("POST", f"{d.url}/v1/keys/{action}", ctx, body=body)
            assert got == status and json.loads(raw)["type"].endswith(kind), (action, raw)
        async with aiohttp.ClientSession() as s, s.get(f"{d.url}/v1/keys",
                                                       ssl=d.ssl(*svc)) as r:
            assert r.status == 403
    finally:
        assert d.stop() == 0


async def test_an_audit_key_rotation_is_handed_over_without_waiting_for_the_heartbeat(
        tmp_path: Path) -> None:
    """With a heartbeat of a day and nothing else written, a rotation of the audit key
    is handed over by a checkpoint of both keys, the old key can be retired at once,
    and the next checkpoint is the new key's alone."""
    from ca.audit.note import NEXT_KEY, parse_checkpoint
    from tests.conftest import set_config
    ca = init_ca(tmp_path)
    set_config(ca.state, "audit", "heartbeat-s", 86400)
    (tmp_path / "first_audit_key.pem").write_bytes(
        (ca.state / "audit/audit_key.pem").read_bytes())
    d = start_daemon(ca.state)

    async def served_until(what: str, test: Any) -> Any:
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            cp = parse_checkpoint((await http("GET", f"{d.url}/v1/audit/checkpoint",
                                              d.ssl()))[2].decode())
            if test(cp):
                return cp
            assert asyncio.get_running_loop().time() < deadline, f"no checkpoint {what}"

    try:
        old = re.search(r"^(\S+)\s+audit\s+active", key_cmd(d, "list").stdout,
                        re.M).group(1)  # type: ignore[union-attr]
        admin = ("--url", d.url, "--ca", d.root, "--client-cert", d.state / "admin/cert.pem",
                 "--client-key", d.state / "admin/key.pem", "--key",
                 tmp_path / "first_audit_key.pem")
        before = tmp_path / "before-hand-over.state"
        hsmca("audit", "verify", *admin, "--state", before)
        key_cmd(d, "rotate", "audit")
        handover = await served_until("naming the new key", lambda cp: any(
            e.startswith(NEXT_KEY) for e in cp.extensions))
        assert len(handover.signatures) == 2

        def remote(state: Path = tmp_path / "auditor.state") -> str:
            return hsmca("audit", "verify", "--url", d.url, "--ca", d.root, "--client-cert",
                         d.state / "admin/cert.pem", "--client-key", d.state / "admin/key.pem",
                         "--key", tmp_path / "first_audit_key.pem", "--state", state).stdout
        # The hand-over in the latest checkpoint is said at once (a cluster trial: the
        # init log, which no node writes after a root rotation, never said it), once.
        said = remote()
        assert re.search(r"note: the audit key was handed over by the daemon's latest "
                         r"checkpoint \(its line is covered by the next one\) to key id "
                         r"[0-9a-f]{8}, made in the HSM at seq \d+", said), said
        # A state that has the hand-over's checkpoint but never said it (the release
        # before saved such states): the next run says it (a review).
        unsaid = json.loads((tmp_path / "auditor.state").read_text())
        unsaid.pop("hand_overs_said", None)
        (tmp_path / "unsaid.state").write_text(json.dumps(unsaid))
        key_cmd(d, "retire", old, "--yes")  # refused until a checkpoint hands over
        await served_until("of the new key alone", lambda cp: len(cp.signatures) == 1
                           and cp.size > handover.size)
        # `audit prove` with a state saved before the hand-over knows the first key only:
        # said so, and how to bring the state past it (an auditor trial was told to pin
        # the key it had pinned)
        proc = hsmca("audit", "prove", *admin, "--state", before, "--cert-file",
                     d.state / "admin/cert.pem", check=False)
        assert proc.returncode == 1 and f"or --state {before} (saved at " in proc.stderr \
            and "predates an audit key hand-over" in proc.stderr, proc.stdout + proc.stderr
        assert "handed over" not in remote()
        assert re.search(r"note: the audit key was handed over at seq \d+ to key id "
                         r"[0-9a-f]{8}, made in the HSM", remote(tmp_path / "unsaid.state"))
    finally:
        assert d.stop() == 0


async def test_rotate_the_audit_key_and_verifiers_pinned_to_the_old_one_follow(
        tmp_path: Path) -> None:
    ca = init_ca(tmp_path)
    old_key = tmp_path / "old_audit_key.pem"
    old_key.write_bytes((ca.state / "audit/audit_key.pem").read_bytes())
    d = start_daemon(ca.state)
    remote_state, offline_state = tmp_path / "remote.state", tmp_path / "offline.state"

    def remote() -> subprocess.CompletedProcess[str]:
        return hsmca("audit", "verify", "--url", d.url, "--ca", d.root, "--client-cert",
                     d.state / "admin/cert.pem", "--client-key", d.state / "admin/key.pem",
                     "--key", old_key, "--state", remote_state, check=False)

    async def settled() -> Path:
        """Issue something, then wait for a checkpoint that covers it: the outcome line
        of its signature. (Not every line the file has by then: its last ones may be a
        checkpoint's own, signed meanwhile, which only the heartbeat's next checkpoint
        covers, a minute later, when nothing else is written.)"""
        cert, _ = enroll(d, tmp_path, "service",
                         [f"a{len(list(tmp_path.iterdir()))}.internal.example"])
        serial = format(x509.load_pem_x509_certificate(cert.read_bytes()).serial_number, "x")
        lines = log_lines(ca.state)
        [op_id] = [e["op_id"] for e in lines if e.get("phase") == "intent"
                   and e.get("purpose") == "x509" and e.get("serial") == serial]
        [size] = [e["seq"] + 1 for e in lines if e.get("phase") == "outcome"
                  and e.get("op_id") == op_id]
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            cp = (await http("GET", f"{d.url}/v1/audit/checkpoint", d.ssl()))[2].decode()
            if int(cp.split("\n")[1]) >= size:
                return cert
            assert asyncio.get_running_loop().time() < deadline, (
                f"no checkpoint covers {size} lines within 30 s; the daemon said:\n"
                + "".join(d.stderr[-30:]))

    try:
        await settled()
        assert remote().returncode == 0
        listing = key_cmd(d, "list").stdout
        old_label = re.search(r"^(\S+)\s+audit\s+active", listing, re.M).group(1)  # type: ignore[union-attr]
        out = key_cmd(d, "rotate", "audit").stdout
        assert "rotated audit" in out
        # A checkpoint signed by both, naming the new key, then one covering its line:
        # the verify below checks lines up to the latest checkpoint, and the first one
        # after the rotation may be that one (a loaded CI run found no hand-over said).
        await settled()
        await settled()
        proc = remote()
        assert proc.returncode == 0, proc.stdout + proc.stderr
        # Said, with where the new key was made (an auditor trial: a hand-over to a key
        # made anywhere was followed in silence)
        assert re.search(r"note: the audit key was handed over at seq \d+ to key id "
                         r"[0-9a-f]{8}, made in the HSM at seq \d+", proc.stdout), proc.stdout
        # An auditor whose last run ended after the new key's keygen line and before the
        # hand-over: the next run says the key was made in the HSM, from the state (a
        # trial's said "no hsm.keygen line among these lines ... made outside the HSM").
        lines = (ca.state / "audit/log.jsonl").read_bytes().splitlines(keepends=True)
        made = max(e["seq"] for e in map(json.loads, lines)
                   if e["event"] == "hsm.keygen" and e.get("phase") == "outcome")
        cut = [json.loads(x) for x in lines[:made + 1]]
        signed = [e["checkpoint"] for e in cut if e["event"] == "hsm.sign"
                  and e.get("phase") == "outcome" and e.get("checkpoint")][-1]
        (tmp_path / "cut.jsonl").write_bytes(b"".join(lines[:made + 1]))
        (tmp_path / "cut.checkpoint").write_text(signed)
        step = tmp_path / "step.state"
        hsmca("audit", "verify", "--log", tmp_path / "cut.jsonl", "--checkpoint",
              tmp_path / "cut.checkpoint", "--key", old_key, "--state", step,
              "--allow-unsigned")
        assert json.loads(step.read_text())["size"] == made + 1
        proc = hsmca("audit", "verify", "--url", d.url, "--ca", d.root, "--client-cert",
                     d.state / "admin/cert.pem", "--client-key", d.state / "admin/key.pem",
                     "--key", old_key, "--state", step, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"made in the HSM at seq {made} (its hsm.keygen line)" in proc.stdout, \
            proc.stdout
        # A third key while two sign would give every checkpoint three signatures, and
        # a log stopped then closing lines no verify accepts (fault review): refused.
        again = key_cmd(d, "rotate", "audit", check=False)
        assert again.returncode != 0 and f"retire it first (hsmca key retire {old_label})" \
            in again.stderr, again.stderr
        key_cmd(d, "retire", old_label, "--yes")
        await settled()  # checkpoints of the new key alone
        # A backup checks its copy with the key in force: the log it copies began
        # under the old one.
        backup = hsmca("backup", "--config", d.state / "hsmca.toml", "--out",
                       tmp_path / "backup", check=False)
        assert backup.returncode == 0, backup.stderr
        proc = remote()
        assert proc.returncode == 0, proc.stdout + proc.stderr
        # Said once, by the run that followed it: later runs see more checkpoints that
        # name the key, not their keygen (a review saw each call it not made in the HSM)
        assert "handed over" not in proc.stdout, proc.stdout
        assert json.loads(remote_state.read_text())["successors"]
        # A proof reads no log lines: pinned to the first key, it follows the hand-over
        # through the saved state, and says so when it is not given (a key trial did
        # what the hint said, pinned the first key, and failed again).
        proved = await settled()

        def prove(*extra: str | Path) -> subprocess.CompletedProcess[str]:
            return hsmca("audit", "prove", "--url", d.url, "--ca", d.root, "--client-cert",
                         d.state / "admin/cert.pem", "--client-key",
                         d.state / "admin/key.pem", "--key", old_key, "--cert-file", proved,
                         *extra, check=False)
        proc = prove()
        assert proc.returncode == 1 and "follows a hand-over of the audit key only with " \
            "--state" in proc.stderr, proc.stderr
        proc = prove("--state", remote_state)
        assert proc.returncode == 0 and "PROVEN" in proc.stdout, proc.stdout + proc.stderr
        assert (ca.state / "audit/audit_key.pem").read_bytes() != old_key.read_bytes()
    finally:
        assert d.stop() == 0
    # Offline, pinned to the old key, the whole log verifies across the hand-over.
    proc = hsmca("audit", "verify", "--log", ca.state / "audit/log.jsonl", "--key", old_key,
                 "--state", offline_state, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "made in the HSM at seq" in proc.stdout, proc.stdout
    # Pinned to the current key, the log's beginning does not, and it says what to pin.
    proc = hsmca("audit", "verify", "--log", ca.state / "audit/log.jsonl", "--key",
                 ca.state / "audit/audit_key.pem", check=False)
    assert proc.returncode == 1
    assert "pin the key the log began with" in proc.stdout + proc.stderr, proc.stdout
    # The daemon starts again on its rotated key, and its last checkpoint checks out.
    d = start_daemon(ca.state)
    try:
        await settled()
        assert remote().returncode == 0
    finally:
        assert d.stop() == 0
    lines = [json.loads(x) for x in (ca.state / "audit/log.jsonl").read_bytes().splitlines()]
    assert [x["kind"] for x in lines if x["event"] == "key.rotate"] == ["audit"]
    assert any(x.get("co_signer") for x in lines if x.get("phase") == "intent")


def pems(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


async def test_rotate_the_root_offline_and_relying_parties_of_either_root_follow(
        tmp_path: Path) -> None:
    ca = init_ca(tmp_path)
    config = ca.state / "hsmca.toml"
    old_root = tmp_path / "old-root.pem"
    old_root.write_bytes((ca.state / "x509/root.pem").read_bytes())
    old_root_only = tmp_path / "old-root-only.pem"  # a client that never follows
    old_root_only.write_bytes(old_root.read_bytes())
    d = start_daemon(ca.state)
    try:
        old_cert, old_key = enroll(d, tmp_path, "service", ["old.internal.example"])
        proc = key_cmd(d, "rotate", "root", check=False)
        assert proc.returncode == 1 and "hsmca key rotate-root" in proc.stderr
        # Beside a running daemon the ceremony cannot start: the log is locked.
        proc = hsmca("key", "rotate-root", "--config", config, "--yes", check=False)
        assert proc.returncode == 1 and "rotated with the daemon stopped; stop it" in \
            proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        # And it says so before asking for a "yes" it would not use (docs review).
        proc = hsmca("key", "rotate-root", "--config", config, check=False, input="yes\n")
        assert proc.returncode == 1 and "daemon stopped" in proc.stderr, proc.stderr
        assert "Type yes" not in proc.stderr
    finally:
        assert d.stop() == 0

    tls = [ca.state / "tls/server.pem", ca.state / "tls/server.key"]
    before_tls = [p.read_bytes() for p in tls]
    out = hsmca("key", "rotate-root", "--config", config, "--yes").stdout
    new_root = load(ca.state / "x509/root.pem")
    assert new_root != load(old_root) and new_root.subject == load(old_root).subject
    assert "hsmca key retire root-ca" in out
    # A second rotation before the first one's hand-over is over is refused: it would
    # chain everything to a root no relying party has (a key lifecycle trial).
    proc = hsmca("key", "rotate-root", "--config", config, "--yes", check=False)
    assert proc.returncode == 1 and "one root rotation at a time" in proc.stderr, proc.stderr
    assert "hsmca key retire root-ca" in proc.stderr
    assert load(ca.state / "x509/root.pem") == new_root
    # refused before the HSM was opened: nothing follows the stop's checkpoint, and an
    # auditor's offline check of the stopped CA passes (a key trial's failed, on the
    # refused run's HSM session lines)
    audit_verify(ca.state, ok=True)
    # The ceremony is refused, as `serve` is, on a PIN file others can read
    pin = Path(re.search(r'(?m)^pin-source = "file:(.*)"', config.read_text())[1])
    pin.chmod(0o644)
    proc = hsmca("key", "rotate-root", "--config", config, "--yes", check=False)
    pin.chmod(0o600)
    assert proc.returncode == 1 and "must not be readable" in proc.stderr, proc.stderr
    # As a ceremony killed before it wrote the daemon's TLS certificate leaves it: the
    # start issues one from the new issuing CA (the CA's own root.pem did not verify the
    # old one, and `hsmca key list --config` failed).
    for path, data in zip(tls, before_tls, strict=True):
        path.write_bytes(data)
    # and as a node host that missed the ceremony's x509/ holds it: the old root (a
    # cluster trial's node kept it, and its admin commands failed after the retirement)
    (ca.state / "x509/root.pem").write_bytes(old_root.read_bytes())
    assert len(pems(ca.state / "x509/roots.pem")) == 2
    assert len(pems(ca.state / "x509/cross.pem")) == 2
    assert sum(label.startswith("root-ca") for label in token_labels(ca.state, ca.token)) == 2

    d = start_daemon(ca.state)
    try:
        assert load(ca.state / "x509/root.pem") == new_root  # written from the inventory
        listing = key_cmd(d, "list").stdout
        assert re.search(r"^root-ca-\S+\s+root\s+active", listing, re.M), listing
        assert re.search(r"^root-ca\s+root\s+previous", listing, re.M), listing
        # A relying party that still trusts only the old root enrolls: the daemon's
        # chain carries the new root certified by the old one.
        tok = token_file(d, tmp_path, "service", ["new.internal.example"])
        out_dir = tmp_path / "new-cred"
        hsmca("enroll", "--url", d.url, "--ca", old_root, "--token-file", tok, "--name",
              "new.internal.example", "--out", out_dir)
        new_cert, chain = out_dir / "cert.pem", out_dir / "chain.pem"
        assert aki(load(new_cert)) != aki(load(old_cert))  # from the new issuing key
        assert openssl_verify(old_root, chain, new_cert)
        assert openssl_verify(ca.state / "x509/root.pem", chain, new_cert)
        # cert.pem alone, as a service presents it in mutual TLS: it carries the new root
        # certified by the old one, for relying parties of the old root (a key trial:
        # it held the issuing CA alone, and they refused renewed services).
        assert openssl_verify(old_root, new_cert, new_cert)
        assert openssl_verify(ca.state / "x509/root.pem", new_cert, new_cert)
        # The old root still signs its own CRL while it hands over: relying parties of
        # the old root that check every link (nginx ssl_crl on crls.pem) need it; it was
        # not served, and they refused every certificate, old and new.
        status, _, raw = await http("GET", f"{d.url}/v1/x509/crl/root-ca", d.ssl())
        assert status == 200
        assert x509.load_der_x509_crl(raw).is_signature_valid(load(old_root).public_key())
        crls = tmp_path / "crls.pem"
        crls.write_bytes((await http("GET", f"{d.url}/v1/x509/crls.pem", d.ssl()))[2])
        for root in (old_root, ca.state / "x509/root.pem"):
            assert openssl_verify(root, new_cert, new_cert, crls=crls), root
        # What the old root anchors, a relying party of the new root alone accepts too,
        # as docs/keys.md says: the old chain's issuing CA and cross.pem, not the old
        # chain whole (it ends in the old root, where OpenSSL stops).
        old_chain = old_cert.parent / "chain.pem"
        assert not openssl_verify(ca.state / "x509/root.pem", old_chain, old_cert,
                                  ca.state / "x509/cross.pem")
        old_issuing = tmp_path / "old-issuing.pem"
        old_issuing.write_text(run_openssl("x509", "-in", old_chain))
        assert openssl_verify(ca.state / "x509/root.pem", old_issuing, old_cert,
                              ca.state / "x509/cross.pem")
        pre = tmp_path / "pre-rotation.pem"  # a leaf of the old root, as issued
        pre.write_bytes(old_cert.read_bytes())
        # The credential from before renews over mutual TLS, into the new chain.
        pinned = tmp_path / "pinned-root.pem"  # a renewer's --ca: the old root alone
        pinned.write_bytes(old_root.read_bytes())
        renewed = hsmca("renew", "--url", d.url, "--ca", pinned, "--cert", old_cert, "--key",
                        old_key)
        assert aki(load(old_cert)) == aki(load(new_cert))
        assert openssl_verify(old_root, old_cert, old_cert)  # as it presents itself
        # and it follows the rotation: the new root, on the old root's word, joins its
        # --ca, so that it still connects once the old root is retired (a key trial's
        # renewers all stopped for good then)
        assert [c.public_key() for c in pems(pinned)] == [
            load(old_root).public_key(), new_root.public_key()]
        assert "the CA's root was rotated: --ca" in renewed.stderr, renewed.stderr
        bundle = x509.load_pem_x509_certificates(
            (await http("GET", f"{d.url}/v1/x509/bundle", d.ssl()))[2])
        assert new_root in bundle and load(old_root) in bundle
        # Once relying parties trust the new root: retire the old one, and chains end
        # at the new root alone.
        said_before = len(d.stderr)
        key_cmd(d, "retire", "root-ca", "--yes")
        served = x509.load_pem_x509_certificates(
            (await http("GET", f"{d.url}/v1/x509/chain", d.ssl()))[2])
        assert served[-1] == new_root and len(served) == 2
        # The renewer that followed still connects, once the listener's chain follows
        # the retirement (at once, not at the next start); its renewal presents the
        # issuing CA alone again, and the old root's CRL is gone.
        assert d.wait_stderr(lambda: any("TLS chain follows the CA's current chain" in x
                                         for x in d.stderr[said_before:]), within=60)
        assert pems(ca.state / "tls/server.pem")[1:] == served
        # and the listener presents it: a client that trusts only the old root, and
        # never renewed to follow, is refused now, and told why (a review: the file
        # changed, the listener kept the old chain until a restart)
        assert d.wait_stderr(lambda: any("take the daemon's TLS certificate file anew" in x
                                         for x in d.stderr[said_before:]), within=60)
        refused = hsmca("renew", "--url", d.url, "--ca", old_root_only, "--cert", old_cert,
                        "--key", old_key, check=False)
        assert refused.returncode != 0 and "After a root rotation whose old root is " \
            "retired" in refused.stderr, refused.stderr
        renewed = hsmca("renew", "--url", d.url, "--ca", pinned, "--cert", old_cert, "--key",
                        old_key, check=False)
        assert renewed.returncode == 0, renewed.stderr
        assert len(pems(old_cert)) == 2 and "root was rotated" not in renewed.stderr
        # The old root's last CRL is served while it is valid, as a retired issuing
        # key's: relying parties that trust both roots (roots.pem) and check every link
        # refused the old root's certificates still valid, their CRL gone (a key trial)
        status, _, raw = await http("GET", f"{d.url}/v1/x509/crl/root-ca", d.ssl())
        assert status == 200, raw
        last = x509.load_der_x509_crl(raw)
        assert last.is_signature_valid(load(old_root).public_key())
        assert last.next_update_utc > dt.datetime.now(dt.UTC)
        crls.write_bytes((await http("GET", f"{d.url}/v1/x509/crls.pem", d.ssl()))[2])
        assert last.public_bytes(serialization.Encoding.PEM) in crls.read_bytes()
        assert openssl_verify(ca.state / "x509/roots.pem", old_issuing, pre, crls=crls)
    finally:
        assert d.stop() == 0
    # The daemon's own TLS chain follows at the next start.
    d = start_daemon(ca.state)
    try:
        assert pems(tls[0])[1:] == served
    finally:
        assert d.stop() == 0
    events = [x["event"] for x in log_lines(ca.state)]
    assert events.count("key.ceremony") == 2
    assert audit_verify(ca.state).returncode == 0


async def test_a_log_stopped_while_two_audit_keys_sign_ends_with_their_signings(
        tmp_path: Path) -> None:
    """Stopped mid-rotation (the old audit key not retired yet), the final checkpoint is
    signed by both keys: its two signings and the logout close the log, unsigned by
    nature, and verify as such rather than as UNSIGNED lines."""
    ca = init_ca(tmp_path)
    old_key = tmp_path / "old-audit.pem"
    old_key.write_bytes((ca.state / "audit/audit_key.pem").read_bytes())
    d = start_daemon(ca.state)
    try:
        assert "rotated audit" in key_cmd(d, "rotate", "audit").stdout
    finally:
        assert d.stop() == 0
    tail = [json.loads(x) for x in (ca.state / "audit/log.jsonl").read_bytes().splitlines()[-5:]]
    assert [x.get("co_signer") for x in tail[:4:2]] == [True, None], tail
    proc = hsmca("audit", "verify", "--log", ca.state / "audit/log.jsonl", "--key", old_key,
                 check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "the last 5 lines are the last checkpoint's own signing and the HSM logout" in \
        proc.stdout, proc.stdout


async def test_a_retired_or_destroyed_ssh_ca_key_keeps_its_revoked_certificates_in_the_krl(
        tmp_path: Path) -> None:
    """An SSH operator's trial: a user certificate revoked, its CA key rotated and
    retired, and the next KRL had no section for the retired key. ssh-keygen -Q (and
    sshd, which reads KRLs the same way) took the revoked certificate again on every
    host still trusting the old key. Retired and destroyed keys' revoked certificates
    now stay in the KRL; a CA made before the inventory kept SSH CA public keys gets
    them from the token at start."""
    import sqlite3

    from tests.test_revocation import krl_says, ssh_user_cert
    ca = init_ca(tmp_path)
    with sqlite3.connect(ca.state / "hsmca.sqlite3") as db:  # as before migration 11
        db.execute("UPDATE ca_keys SET ssh_public_key = NULL")
    d = start_daemon(ca.state)
    try:
        user = enroll(d, tmp_path, "user", ["bob@example.org"], ["bob"])
        old_cert = ssh_user_cert(d, tmp_path, user, "id_old")
        revoked = hsmca("ssh", "revoke", "--serial", _ssh_serial(old_cert), "--config",
                        d.state / "hsmca.toml", "--url", d.url)
        assert "revoked" in revoked.stdout
        # One certificate revoked leaves its holder able to ask for another: said, with
        # what keeps them out (an SSH trial believed a host cut off)
        assert "hsmca revoke --identity NAME" in revoked.stderr, revoked.stderr
        assert krl_says(d, tmp_path, old_cert) == "REVOKED"
        kept = ssh_user_cert(d, tmp_path, user, "id_kept")
        key_cmd(d, "rotate", "ssh-user")
        old = re.search(r"^(\S+)\s+ssh-user\s+previous", key_cmd(d, "list").stdout, re.M)
        assert old, key_cmd(d, "list").stdout
        # What retiring it cuts off is said before the yes (after it alone, before: a
        # key trial)
        no = hsmca("key", "retire", old.group(1), "--config", d.state / "hsmca.toml",
                   "--url", d.url, input="no\n", check=False)
        assert no.returncode == 1 and "hosts that refresh their trusted user CA keys from " \
            "it (`hsmca ssh host --renew`) refuse its certificates still valid" in no.stderr, \
            no.stderr
        key_cmd(d, "retire", old.group(1), "--yes")
        # Valid by its dates, its CA key retired: `ssh list` says both (a key trial took
        # `--status valid` at its word while every refreshed host refused it)
        listed = hsmca("ssh", "list", "--status", "valid", "--config", d.state / "hsmca.toml",
                       "--url", d.url).stdout
        row = next(line.split() for line in listed.splitlines()
                   if line.startswith(_ssh_serial(kept) + " "))
        assert row[2:4] == ["valid", "retired"], listed
        assert "refused by the hosts and clients that refreshed" in listed, listed
        # revoked by its file, its CA key retired (a key trial was told "another CA's")
        proc = hsmca("ssh", "revoke", "--ssh-cert", kept, "--config",
                     d.state / "hsmca.toml", "--url", d.url)
        assert proc.stdout.startswith("revoked 1 SSH certificate(s)"), proc.stdout
        assert krl_says(d, tmp_path, kept) == "REVOKED"
        # A revocation after it builds the KRL again: the retired key's section stays.
        new_cert = ssh_user_cert(d, tmp_path, user, "id_new")
        hsmca("ssh", "revoke", "--serial", _ssh_serial(new_cert), "--config",
              d.state / "hsmca.toml", "--url", d.url)
        assert krl_says(d, tmp_path, new_cert) == "REVOKED"
        assert krl_says(d, tmp_path, old_cert) == "REVOKED"
        key_cmd(d, "destroy", old.group(1), "--yes")
        third = ssh_user_cert(d, tmp_path, user, "id_third")
        hsmca("ssh", "revoke", "--serial", _ssh_serial(third), "--config",
              d.state / "hsmca.toml", "--url", d.url)
        assert krl_says(d, tmp_path, third) == "REVOKED"
        assert krl_says(d, tmp_path, old_cert) == "REVOKED"
    finally:
        assert d.stop() == 0


async def test_during_a_host_ca_rotation_ssh_host_prints_a_known_hosts_line_per_key(
        tmp_path: Path) -> None:
    """During a host CA rotation /v1/ssh/ca lists two keys. `hsmca ssh host` printed
    them as one @cert-authority line and a bare key line, which ssh ignores: pasted,
    hosts still serving a certificate of the old key failed host key verification."""
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state)
    try:
        host = enroll(d, tmp_path, "host", ["localhost"])
        subprocess.run([require("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f",
                        tmp_path / "hostkey"], check=True)
        key_cmd(d, "rotate", "ssh-host")
        proc = hsmca("ssh", "host", "--url", d.url, "--ca", d.root, "--cert", host[0],
                     "--key", host[1], "--pubkey", tmp_path / "hostkey.pub")
        cas = json.loads((await http("GET", f"{d.url}/v1/ssh/ca", d.ssl()))[2])
        keys = cas["host"].splitlines()
        printed = [line.strip() for line in proc.stdout.splitlines()
                   if any(k.split()[1] in line for k in keys)]
        assert len(keys) == 2 and printed == [f"@cert-authority localhost {k}" for k in keys]
    finally:
        assert d.stop() == 0


def _ssh_serial(cert: Path) -> str:
    out = subprocess.run([require("ssh-keygen"), "-L", "-f", cert], capture_output=True,
                         text=True, check=True).stdout
    found = re.search(r"Serial: (\d+)", out)
    assert found, out
    return found.group(1)


class _AnswerLost:
    """A TCP proxy to the daemon that forwards everything until the daemon has recorded
    `line` in its audit log, then closes the client's connection instead of forwarding
    the answer: a rotation carried out whose answer never arrives."""

    def __init__(self, d: Daemon, line: bytes) -> None:
        self._log = d.state / "audit" / "log.jsonl"
        self._line = line
        host, port = d.url.removeprefix("https://").rsplit(":", 1)
        self._upstream = (host, int(port))
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._upstream)
            threading.Thread(target=self._pipe, args=(client, upstream, False),
                             daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True),
                             daemon=True).start()

    def _pipe(self, src: Any, dst: Any, answers: bool) -> None:
        try:
            while data := src.recv(65536):
                if answers and self._line in self._log.read_bytes():
                    break  # the daemon did it: its answer is lost on the way
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):  # shutdown wakes the other direction's recv; close alone does not
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self._sock.close()


async def test_a_rotation_whose_answer_is_lost_says_to_look_before_trying_again(
        tmp_path: Path) -> None:
    """The daemon rotated the key and the connection closed before its answer came: the
    command said the client certificate was perhaps refused, and an operator who ran it
    again got a key more (a key lifecycle trial). It says what may have happened now."""
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state)
    proxy = _AnswerLost(d, b'"event":"key.rotate"')
    try:
        proc = hsmca("key", "rotate", "issuing", "--config", d.state / "hsmca.toml",
                     "--url", proxy.url, check=False)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "the connection was closed" in proc.stderr, proc.stderr
        assert proc.stderr.rstrip().endswith(
            "The daemon may have done it before the answer was lost: look with `hsmca key "
            "list` before trying again"), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        listed = key_cmd(d, "list").stdout
        assert listed.count("issuing") >= 2 and "previous" in listed, listed  # it was done
    finally:
        proxy.close()
        assert d.stop() == 0


async def test_after_two_rotations_the_bundle_and_the_key_list_are_newest_first(
        tmp_path: Path) -> None:
    """docs/keys.md and `hsmca key list --help` say newest first; the bundle listed the
    oldest previous issuing CA before the newer one, the list the init keys first (a key
    lifecycle trial)."""
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state)
    try:
        first, second = (key_cmd(d, "rotate", "issuing") for _ in range(2))
        # The second rotation notes the key the first left previous, still signing
        assert "still previous" not in first.stderr, first.stderr
        assert second.stderr.startswith("hsmca: note: issuing-ca is still previous from an "
                                        "earlier rotation (it keeps signing the CRL"), \
            second.stderr
        status, _, raw = await http("GET", f"{d.url}/v1/keys", d.admin_ssl())
        assert status == 200
        listed = [k for k in json.loads(raw)["keys"] if k["kind"] == "issuing"]
        assert [k["state"] for k in listed] == ["active", "previous", "previous"]
        assert listed[-1]["label"] == "issuing-ca"  # the one init made comes last
        assert listed[0]["created_at"] >= listed[1]["created_at"] >= listed[2]["created_at"]
        bundle = (await http("GET", f"{d.url}/v1/x509/bundle", d.ssl()))[2]
        certs = x509.load_pem_x509_certificates(bundle)
        subjects = [c.subject.rfc4514_string() for c in certs]
        assert subjects[2].endswith("Issuing CA") and subjects[3].endswith("Root CA"), subjects
        assert certs[0].not_valid_before_utc >= certs[1].not_valid_before_utc, subjects
        text = key_cmd(d, "list").stdout
        assert text.index(listed[0]["label"]) < text.index(listed[1]["label"]) < \
            text.index("issuing-ca "), text
    finally:
        assert d.stop() == 0


# The issuers as a refresh finds them: `before` at the first look, `after` from the next
# one on (another process's rotation or retire committed meanwhile).
_CHANGED_AFTER_THE_FIRST_LOOK = """
class ChangedAfterTheFirstLook:
    def __init__(self, before, after):
        self.issuers, self._after, self._looked = before, after, False

    async def refresh(self):
        if self._looked:
            self.issuers = self._after
        self._looked = True
        return self.issuers
"""

_RENEW_LISTENER_SCRIPT = """
import asyncio, dataclasses, sys
from pathlib import Path
from ca.audit.log import AuditLog
from ca.config import load
from ca.daemon.keys import load_issuers
from ca.issuance.issue import Issuance
from ca.issuance.pipeline import SigningPipeline
from ca.server_cert import ensure_server_cert
from ca.store import open_store

# (ChangedAfterTheFirstLook)


async def main():
    config = load(Path(sys.argv[1]))
    pipeline = SigningPipeline(config.hsm_session, AuditLog.open(Path(sys.argv[2])))
    pipeline.start()
    store = open_store(config.store_location)
    after = await load_issuers(store, pipeline)
    old = next(i for i in after.x509 if i != after.current_x509)
    source = ChangedAfterTheFirstLook(dataclasses.replace(after, current_x509=old), after)
    await ensure_server_cert(config, Issuance(pipeline, store, source, None))
    print(old)
    store.close()
    pipeline.close()

asyncio.run(main())
"""


async def test_the_listener_renewed_across_a_rotation_is_served_with_its_own_issuer(
        tmp_path: Path) -> None:
    """A CI run: the daemon's certificate, renewed after one rotation while a second
    committed, was written above the newer issuing CA's certificate, and clients that
    trust the root refused the daemon ("unable to get local issuer certificate") until
    the next round. The chain written is the one of the key that signed."""
    ca = rotated_once(tmp_path, "issuing")
    tls = ca.state / "tls"
    for name in ("server.pem", "server.key"):  # gone: made anew
        (tls / name).unlink()
    proc = subprocess.run([sys.executable, "-c", _RENEW_LISTENER_SCRIPT
                           .replace("# (ChangedAfterTheFirstLook)", _CHANGED_AFTER_THE_FIRST_LOOK),
                           ca.state / "hsmca.toml", tmp_path / "scratch.jsonl"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    served = pems(tls / "server.pem")
    assert served[1].subject == served[0].issuer, [c.subject for c in served]
    assert openssl_verify(ca.state / "x509" / "root.pem", tls / "server.pem",
                          tls / "server.pem")


async def test_a_staged_ssh_ca_key_is_trusted_before_it_signs(tmp_path: Path) -> None:
    """An SSH trial: `key rotate ssh-user` signed with the new key at once, and every
    user who got a certificate before the hosts' next refresh (5 min by default) was
    refused everywhere. `--stage` publishes the new key and keeps signing with the
    active one; the next `rotate` puts the staged key in use. A host that fetched the
    list once while it was staged takes certificates from before and after."""
    keygen = require("ssh-keygen")
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state)
    try:
        user = enroll(d, tmp_path, "user", ["carol@example.com"], ["root"])
        host = enroll(d, tmp_path, "host", ["localhost"])
        for name in ("id_before", "id_staged", "id_after", "hostkey"):
            subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", tmp_path / name],
                           check=True)

        def user_cert(name: str) -> str:  # the fingerprint of the CA key that signed it
            hsmca("ssh", "user", "--url", d.url, "--ca", d.root, "--cert", user[0], "--key",
                  user[1], "--pubkey", tmp_path / f"{name}.pub")
            shown = subprocess.run([keygen, "-L", "-f", tmp_path / f"{name}-cert.pub"],
                                   capture_output=True, text=True, check=True).stdout
            return re.search(r"Signing CA: \S+ (\S+)", shown).group(1)  # type: ignore[union-attr]

        def fingerprints(lines: str) -> list[str]:
            return [subprocess.run([keygen, "-l", "-f", "-"], input=line + "\n",
                                   capture_output=True, text=True, check=True).stdout.split()[1]
                    for line in lines.splitlines()]

        old_ca = user_cert("id_before")
        staged = key_cmd(d, "rotate", "ssh-user", "--stage").stdout
        label = re.search(r"^staged ssh-user: (\S+) is published", staged).group(1)  # type: ignore[union-attr]
        assert "signs nothing yet; ssh-user-ca still signs" in staged, staged
        assert "Once hosts trust the new key (`hsmca ssh host --renew`" in staged, staged
        assert re.search(rf"^{label}\s+ssh-user\s+next", key_cmd(d, "list").stdout, re.M)
        cas = json.loads((await http("GET", f"{d.url}/v1/ssh/ca", d.ssl()))[2])
        listed = fingerprints(cas["user"])
        assert len(listed) == 2 and listed[0] == old_ca, listed  # the signing one first
        new_ca = listed[1]
        assert user_cert("id_staged") == old_ca  # still the active key's
        again = key_cmd(d, "rotate", "ssh-user", "--stage", check=False)
        assert again.returncode == 1 and f"{label!r} is staged already" in again.stderr

        # The host fetches the list once, while the key is staged, and never again.
        (tmp_path / "user_cas.pub").write_text(cas["user"] + "\n")
        promoted = key_cmd(d, "rotate", "ssh-user")
        rotated = promoted.stdout
        assert f"rotated ssh-user: {label} is active (staged before), ssh-user-ca is " \
            "previous" in rotated, rotated
        assert "are refused by hosts" not in promoted.stderr  # staged: trusted already
        assert user_cert("id_after") == new_ca
        hsmca("ssh", "host", "--url", d.url, "--ca", d.root, "--cert", host[0], "--key",
              host[1], "--pubkey", tmp_path / "hostkey.pub")
        (tmp_path / "krl").write_bytes((await http("GET", f"{d.url}/v1/ssh/krl", d.ssl()))[2])
        sshd = SSHD(tmp_path, tmp_path / "hostkey", tmp_path / "hostkey-cert.pub",
                    tmp_path / "user_cas.pub", tmp_path / "krl")
        try:
            known = tmp_path / "known_hosts"
            known.write_text(f"@cert-authority [localhost]:{sshd.port} "
                             f"{cas['host'].splitlines()[0]}\n")
            for who in ("id_before", "id_staged", "id_after"):
                proc = ssh_login(sshd.port, known, tmp_path / who, tmp_path / f"{who}-cert.pub")
                assert "logged-in-with-cert" in proc.stdout, (who, proc.stderr)
        finally:
            sshd.stop()
        # Only SSH CA keys are staged; a staged key nobody wants is retired unused.
        issuing = key_cmd(d, "rotate", "issuing", "--stage", check=False)
        assert issuing.returncode == 1 and "only SSH CA keys" in issuing.stderr
        staged = key_cmd(d, "rotate", "ssh-host", "--stage").stdout
        dropped = staged.split()[2]
        # the host CA is the clients' to trust first (known_hosts), not the hosts'
        assert "Once clients trust the new key (`hsmca ssh known-hosts`" in staged, staged
        key_cmd(d, "retire", dropped, "--yes")
        assert re.search(rf"^{dropped}\s+ssh-host\s+retired", key_cmd(d, "list").stdout, re.M)
        events = [(e["event"], e.get("staged")) for e in log_lines(ca.state)
                  if e.get("event", "").startswith("key.")]
        assert events == [("key.stage", None), ("key.rotate", True), ("key.stage", None),
                          ("key.retire", None)], events
    finally:
        assert d.stop() == 0
    audit_verify(ca.state, ok=True)


async def test_a_retired_issuing_key_s_ca_certificate_revoked_is_on_its_root_s_crl(
        tmp_path: Path) -> None:
    """A relying-party trial: an issuing key feared compromised could be rotated and
    retired, which stops hsmca's own use of it, but its CA certificate could not be
    revoked, and relying parties that trust the root went on taking whatever it had
    signed until the certificate's end, five years on. Now the root's CRL lists it, and
    hsmca refuses the client certificates it issued."""
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state)
    try:
        old_leaf = enroll(d, tmp_path, "service", ["before.internal.example"])
        old_admin = enroll(d, tmp_path, "admin", ["ops.localhost"])
        old_issuing = tmp_path / "old-issuing.pem"
        old_issuing.write_bytes((ca.state / "x509/issuing.pem").read_bytes())
        old = re.search(r"^(\S+)\s+issuing\s+active", key_cmd(d, "list").stdout, re.M)
        assert old, key_cmd(d, "list").stdout
        label = old.group(1)
        hosts_admin = load(ca.state / "admin/cert.pem")  # init's, of that key
        refused = key_cmd(d, "revoke", label, "--yes", check=False)
        assert refused.returncode == 1 and "rotate first" in refused.stderr, refused.stderr
        key_cmd(d, "rotate", "issuing")
        new_leaf = enroll(d, tmp_path, "service", ["after.internal.example"])
        refused = key_cmd(d, "revoke", label, "--yes", check=False)
        assert refused.returncode == 1 and f"retire it (hsmca key retire {label})" in \
            refused.stderr, refused.stderr
        key_cmd(d, "retire", label, "--yes")
        # Another admin's credential with --config: its daemon and root are the defaults
        # (a cluster trial's --cert lost them)
        listed = hsmca("key", "list", "--config", d.state / "hsmca.toml", "--cert",
                       old_admin[0], "--key", old_admin[1])
        assert label in listed.stdout
        # An admin credential of that key would lock its holder out: refused
        as_old_admin = ("--url", d.url, "--ca", d.root, "--cert", old_admin[0], "--key",
                        old_admin[1])
        refused = hsmca("key", "revoke", label, "--yes", *as_old_admin, check=False)
        assert refused.returncode == 1 and "Renew it first" in refused.stderr, refused.stderr
        # but not this host's own (init's), which the daemon renews at once
        no = hsmca("key", "revoke", label, "--config", d.state / "hsmca.toml", "--url",
                   d.url, input="no\n", check=False)
        assert no.returncode == 1 and f"Revoke the CA certificate of {label} (cACompromise)" \
            in no.stderr and "must enroll again" in no.stderr, no.stderr
        done = key_cmd(d, "revoke", label, "--yes").stdout
        assert done.startswith(f"revoked the CA certificate of {label} (serial ") and \
            "cACompromise): the CRL of root-ca lists it" in done, done
        # the next admin command at once is not refused: the revoke waited for this
        # host's credential to be renewed (an upgrade trial's was told to enroll again)
        assert label in key_cmd(d, "list").stdout
        assert d.wait_stderr(lambda: any("this host's admin credential is renewed" in line
                                         for line in d.stderr), within=60), d.stderr
        renewed = load(ca.state / "admin/cert.pem")  # from the active key, for its year
        assert aki(renewed) == aki(load(new_leaf[0]))
        assert renewed.not_valid_after_utc - renewed.not_valid_before_utc > \
            dt.timedelta(days=300)

        root_crl = x509.load_der_x509_crl(
            (await http("GET", f"{d.url}/v1/x509/crl/root-ca", d.ssl()))[2])
        entry = root_crl.get_revoked_certificate_by_serial_number(load(old_issuing).serial_number)
        assert entry is not None
        assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == \
            x509.ReasonFlags.ca_compromise
        crls = tmp_path / "crls.pem"
        crls.write_bytes((await http("GET", f"{d.url}/v1/x509/crls.pem", d.ssl()))[2])
        assert not openssl_verify(d.root, old_issuing, old_leaf[0], crls=crls)
        assert openssl_verify(d.root, ca.state / "x509/issuing.pem", new_leaf[0], crls=crls)
        # and /v1/x509/bundle, a trust store to some (Go, Java check no anchor), lacks it
        bundle = x509.load_pem_x509_certificates(
            (await http("GET", f"{d.url}/v1/x509/bundle", d.ssl()))[2])
        assert load(old_issuing) not in bundle and load(ca.state / "x509/issuing.pem") in bundle
        # hsmca takes nothing the revoked CA issued
        status, _, raw = await http("POST", f"{d.url}/v1/x509/renew", d.ssl(*old_leaf), body={})
        assert status == 403 and "was revoked (cACompromise)" in raw.decode(), raw
        # and its holder's client says so, not "another CA" (a docs trial)
        proc = hsmca("renew", "--url", d.url, "--ca", d.root, "--cert", old_leaf[0], "--key",
                     old_leaf[1], check=False)
        assert proc.returncode == 1 and "was revoked (cACompromise)" in proc.stderr, \
            proc.stderr
        status, _, raw = await http("POST", f"{d.url}/v1/x509/renew", d.ssl(*new_leaf), body={})
        assert status == 201, raw
        keys = key_cmd(d, "list").stdout
        assert "its CA certificate revoked" in keys and "not expired yet, refused with its " \
            f"CA certificate: `hsmca cert list --issuer {label}`" in keys, keys
        # who must enroll again: what the key signed that is still valid
        listed = hsmca("cert", "list", "--issuer", label, "--status", "valid", "--config",
                       d.state / "hsmca.toml", "--url", d.url).stdout
        assert format(load(old_leaf[0]).serial_number, "x") in listed, listed
        assert format(load(new_leaf[0]).serial_number, "x") not in listed, listed
        # nor the host's own admin credential the daemon renewed: revoked as superseded
        # (a docs trial found it listed among those to enroll again)
        assert d.wait_stderr(lambda: any("this host's previous admin credential is revoked "
                                         "as superseded" in line for line in d.stderr))
        listed = hsmca("cert", "list", "--issuer", label, "--status", "valid", "--config",
                       d.state / "hsmca.toml", "--url", d.url).stdout
        assert format(hosts_admin.serial_number, "x") not in listed, listed
        # a mistyped label is said, not listed as a key that signed nothing
        typo = hsmca("cert", "list", "--issuer", label + "x", "--config",
                     d.state / "hsmca.toml", "--url", d.url, check=False)
        assert typo.returncode == 1 and f"the CA has no key labelled '{label}x'" in \
            typo.stderr, typo.stderr
        again = key_cmd(d, "revoke", label, "--yes", check=False)
        assert again.returncode == 1 and "revoked already" in again.stderr, again.stderr
        # Destroying it says that what it issued is refused already, not that it "works
        # where it is trusted" (a review)
        no = hsmca("key", "destroy", label, "--config", d.state / "hsmca.toml", "--url",
                   d.url, input="no\n", check=False)
        assert no.returncode == 1 and "refused already where its root's CRL is checked" \
            in no.stderr, no.stderr
        gone = key_cmd(d, "destroy", label, "--yes")
        assert "its CA certificate is revoked: relying parties that check its root's CRL " \
            "refuse them already" in gone.stderr and "work where they are trusted" not in \
            gone.stderr, gone.stderr
    finally:
        assert d.stop() == 0
    audit_verify(ca.state, ok=True)
    assert [e for e in log_lines(ca.state) if e["event"] == "key.revoke"
            and e["label"] == label and e["reason"] == "cACompromise"]
    d = start_daemon(ca.state)  # and after a restart, the root's CRL still lists it
    try:
        root_crl = x509.load_der_x509_crl(
            (await http("GET", f"{d.url}/v1/x509/crl/root-ca", d.ssl()))[2])
        assert root_crl.get_revoked_certificate_by_serial_number(
            load(old_issuing).serial_number) is not None
    finally:
        assert d.stop() == 0


async def test_the_listener_certificate_a_rotation_replaced_is_revoked_as_superseded(
        tmp_path: Path) -> None:
    """A key trial: after each rotation the daemon's previous TLS certificate stayed
    valid for its year, so the previous key's `key retire` counted it still valid and
    named its end, a year on, as the time to wait for. Once replaced, it is revoked as
    superseded."""
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state)
    try:
        old = load(ca.state / "tls/server.pem")
        label = re.search(r"^(\S+)\s+issuing\s+active", key_cmd(d, "list").stdout, re.M)
        assert label
        key_cmd(d, "rotate", "issuing")
        assert d.wait_stderr(lambda: any("revoked as superseded" in line
                                         for line in d.stderr), within=60), d.stderr
        shown = hsmca("cert", "show", format(old.serial_number, "x"), "--config",
                      d.state / "hsmca.toml", "--url", d.url).stdout
        assert re.search(r"(?m)^status\s+revoked", shown) and "superseded" in shown, shown
        # what the old key issued that is still valid: init's admin credential alone
        no = hsmca("key", "retire", label.group(1), "--config", d.state / "hsmca.toml",
                   "--url", d.url, input="no\n", check=False)
        assert "it issued 2 certificate(s), 1 still valid" in no.stderr, no.stderr
        # and `key list` says as much, without starting a retire
        lines = key_cmd(d, "list").stdout.splitlines()
        at = next(i for i, line in enumerate(lines) if line.startswith(label.group(1) + " "))
        assert lines[at + 2].startswith("    1 certificate(s) it issued still valid, the "
                                        "last until "), lines
    finally:
        assert d.stop() == 0


async def test_the_listener_certificates_a_start_and_the_root_ceremony_replaced_are_revoked(
        tmp_path: Path) -> None:
    """A review: only a running daemon's round revoked the listener certificate it
    replaced; one replaced by the root's ceremony, or by a start (here: its key file
    replaced, so the pair no longer matched), stayed valid for its year, and `key
    retire` of its issuing key counted it and named its end as the time to wait for."""
    ca = init_ca(tmp_path)
    first = load(ca.state / "tls/server.pem")
    hsmca("key", "rotate-root", "--config", ca.state / "hsmca.toml", "--yes")
    second = load(ca.state / "tls/server.pem")
    assert second.serial_number != first.serial_number
    # a note damaged past its first block (a review: a start that had to renew the
    # pair stopped on a note it could not decode)
    note = ca.state / "tls/.superseded.pem"
    note.write_bytes(note.read_bytes() + b"\xff\xfe-----BEGIN CERTIFICATE-----\nbroken\n"
                     b"-----END CERTIFICATE-----\n")
    # a start that must make the pair again: the key is not the certificate's
    key = ec.generate_private_key(ec.SECP256R1())
    (ca.state / "tls/server.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    d = start_daemon(ca.state)
    try:
        third = load(ca.state / "tls/server.pem")
        assert third.serial_number not in (first.serial_number, second.serial_number)
        for cert in (first, second):
            serial = format(cert.serial_number, "x")
            assert d.wait_stderr(lambda serial=serial: any(
                "revoked as superseded" in line and serial in line for line in d.stderr),
                within=60), d.stderr
            shown = hsmca("cert", "show", serial, "--config", d.state / "hsmca.toml",
                          "--url", d.url).stdout
            assert re.search(r"(?m)^status\s+revoked", shown) and "superseded" in shown, \
                shown
        shown = hsmca("cert", "show", format(third.serial_number, "x"), "--config",
                      d.state / "hsmca.toml", "--url", d.url).stdout
        assert re.search(r"(?m)^status\s+valid", shown), shown
        # the note goes once both are revoked (its removal comes after the lines)
        assert d.wait_stderr(lambda: not (ca.state / "tls/.superseded.pem").exists(), 60)
    finally:
        assert d.stop() == 0


async def test_a_rotation_that_cannot_write_the_trust_bundle_is_not_recorded(
        tmp_path: Path) -> None:
    """A full-disk trial: `key rotate issuing` answered 500 after its key.rotate line and
    inventory commit, the bundle the TLS layer trusts unwritten: no process took the
    rotation up, the daemon issued on with the old key, and the next rotation's line
    named that old key as previous. Now the bundle is written before the rotation is
    recorded: the rotation is refused (503, saying what to free), nothing is recorded,
    and the key it made is named."""
    ca = init_ca(tmp_path)
    bundle = ca.state / "x509/bundle.pem"
    d = start_daemon(ca.state)
    try:
        kept = bundle.read_bytes()  # (written by the start)
        bundle.unlink()
        bundle.mkdir()  # not writable as a file, even by root (the trial's full disk)
        proc = key_cmd(d, "rotate", "issuing", check=False)
        assert proc.returncode == 1 and "cannot write" in proc.stderr and \
            "nothing was rotated" in proc.stderr and "Traceback" not in proc.stderr, \
            proc.stderr
        # what to do, by what failed: not "free space" for a directory in the way
        assert "Is a directory" in proc.stderr and "Fix that, then rotate again" in \
            proc.stderr, proc.stderr
        orphan = re.search(r"the key (issuing-ca-\S+) made in the token", proc.stderr)
        assert orphan, proc.stderr
        assert d.wait_stderr(lambda: any("the rotation stopped after it made its key" in x
                                         and orphan.group(1) in x for x in d.stderr))
        assert re.search(r"(?m)^issuing-ca\s+issuing\s+active", key_cmd(d, "list").stdout)
        bundle.rmdir()
        bundle.write_bytes(kept)
        out = key_cmd(d, "rotate", "issuing").stdout
        assert "issuing-ca is previous" in out, out
    finally:
        assert d.stop() == 0
    rotations = [e for e in log_lines(ca.state) if e["event"] == "key.rotate"]
    assert [e["previous"] for e in rotations] == ["issuing-ca"], rotations
    audit_verify(ca.state, ok=True)
    # and every start says what that key is: not an older backup's, as it said before
    d = start_daemon(ca.state)
    try:
        assert d.wait_stderr(lambda: any(
            "a rotation made and stopped before it recorded" in x and orphan.group(1) in x
            for x in d.stderr)), d.stderr
    finally:
        assert d.stop() == 0


async def test_a_rotation_the_inventory_does_not_take_is_voided_in_the_log(
        tmp_path: Path) -> None:
    """A review: a rotation whose inventory commit failed after its key.rotate line left
    the line standing, with no process using the key it named, and the key unnamed; the
    next start then took the line for a recorded rotation and spoke of older backups.
    Here a trigger in the inventory refuses the key's row."""
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state)
    try:
        with sqlite3.connect(ca.state / "hsmca.sqlite3") as db:
            db.execute("CREATE TRIGGER no_keys BEFORE INSERT ON ca_keys BEGIN "
                       "SELECT RAISE(ABORT, 'refused for the test'); END")
        proc = key_cmd(d, "rotate", "ssh-user", check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        with sqlite3.connect(ca.state / "hsmca.sqlite3") as db:
            db.execute("DROP TRIGGER no_keys")
        assert d.wait_stderr(lambda: any("the rotation stopped after it made its key" in x
                                         for x in d.stderr))
        orphan = json.loads(next(x for x in d.stderr if "the rotation stopped" in x))["label"]
        assert re.search(r"(?m)^ssh-user-ca\s+ssh-user\s+active", key_cmd(d, "list").stdout)
    finally:
        assert d.stop() == 0
    lines = log_lines(ca.state)
    [rotate] = [e for e in lines if e["event"] == "key.rotate"]
    assert rotate["label"] == orphan
    assert [e for e in lines if e["event"] == "record.void" and e["voids"] == rotate["seq"]]
    audit_verify(ca.state, ok=True)
    d = start_daemon(ca.state)
    try:
        assert d.wait_stderr(lambda: any(
            "a rotation made and stopped before it recorded" in x and orphan in x
            for x in d.stderr)), d.stderr
    finally:
        assert d.stop() == 0


async def test_a_key_the_hsm_cannot_store_is_a_503_that_says_where_to_look(
        tmp_path: Path) -> None:
    """A full-disk trial: with SoftHSM's token directory on the full disk, `key rotate`
    answered 500 (C_GenerateKeyPair: FunctionFailed). It is a 503 that says what most
    often causes it. Here the token's directory takes no new file (immutable)."""
    chattr = require("chattr")
    ca = init_ca(tmp_path, private_hsm=True)
    token_dir = next((tmp_path / "softhsm").rglob("token.object")).parent
    d = start_daemon(ca.state)
    try:
        locked = subprocess.run([chattr, "+i", token_dir], capture_output=True, text=True)
        assert locked.returncode == 0, f"needs a filesystem with chattr +i: {locked.stderr}"
        try:
            proc = key_cmd(d, "rotate", "ssh-user", check=False)
        finally:
            subprocess.run([chattr, "-i", token_dir], check=True)
        assert proc.returncode == 1 and "503" in proc.stderr and \
            "the HSM did not make the new ssh-user key" in proc.stderr and \
            "full disk under its token directory" in proc.stderr, proc.stderr
        key_cmd(d, "rotate", "ssh-user")  # and once there is room, it rotates
    finally:
        assert d.stop() == 0
    audit_verify(ca.state, ok=True)


async def test_revocations_of_one_ca_certificate_at_once_leave_one_standing_line(
        tmp_path: Path) -> None:
    """A review: three `key revoke`s of one key at once answered 200, 409, 409, and the
    log kept three key.revoke lines with three reasons for the one revocation made. The
    lines whose commit lost are voided."""
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state)
    try:
        label = re.search(r"^(\S+)\s+issuing\s+active", key_cmd(d, "list").stdout, re.M)
        assert label
        key_cmd(d, "rotate", "issuing")
        hsmca("renew", "--url", d.url, "--ca", d.root, "--cert", ca.state / "admin/cert.pem",
              "--key", ca.state / "admin/key.pem")
        key_cmd(d, "retire", label.group(1), "--yes")
        reasons = ("cACompromise", "superseded", "cessationOfOperation")
        answers = await asyncio.gather(*(http(
            "POST", f"{d.url}/v1/keys/revoke", d.admin_ssl(),
            body={"label": label.group(1), "reason": r, "confirm": True}) for r in reasons))
        assert sorted(a[0] for a in answers) == [200, 409, 409], answers
    finally:
        assert d.stop() == 0
    lines = log_lines(ca.state)
    revokes = [e for e in lines if e["event"] == "key.revoke"]
    voided = {e["voids"] for e in lines if e["event"] == "record.void"}
    standing = [e for e in revokes if e["seq"] not in voided]
    # (a request that reads the inventory after the first commit is refused before its
    # line: one to three lines, one standing)
    assert len(standing) == 1, revokes
    won = next(r for a, r in zip(answers, reasons, strict=True) if a[0] == 200)
    assert standing[0]["reason"] == won
    audit_verify(ca.state, ok=True)
    # A stop between the line and its commit (a review): the next start completes it,
    # with the standing line's reason, not a voided one's.
    with sqlite3.connect(ca.state / "hsmca.sqlite3") as db:
        db.execute("UPDATE ca_keys SET revoked_at = NULL, revocation_reason = NULL "
                   "WHERE label = ?", (label.group(1),))
    d = start_daemon(ca.state)
    try:
        assert d.wait_stderr(lambda: any("completed revocations the audit log records" in x
                                         and standing[0]["serial"] in x for x in d.stderr))
        status, _, raw = await http("GET", f"{d.url}/v1/keys", d.admin_ssl())
        assert status == 200, raw
        key = next(k for k in json.loads(raw)["keys"] if k["label"] == label.group(1))
        assert key["revocation_reason"] == won and key["revoked_at"], key
        root_crl = x509.load_der_x509_crl(
            (await http("GET", f"{d.url}/v1/x509/crl/root-ca", d.ssl()))[2])
        assert root_crl.get_revoked_certificate_by_serial_number(
            int(standing[0]["serial"], 16)) is not None
    finally:
        assert d.stop() == 0


async def test_a_start_names_the_keys_in_use_and_a_config_naming_a_retired_one(
        tmp_path: Path) -> None:
    """A key trial: no start said which keys sign, while hsmca.toml's [keys] (init's
    keys) named keys retired and destroyed long before, unremarked."""
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state)
    try:
        key_cmd(d, "rotate", "issuing")
        key_cmd(d, "retire", "issuing-ca", "--yes")
        new = re.search(r"^(\S+)\s+issuing\s+active", key_cmd(d, "list").stdout, re.M)
        assert new
    finally:
        assert d.stop() == 0
    d = start_daemon(ca.state)
    try:
        logged = [json.loads(line) for line in d.stderr if line.startswith("{")]
        listening = next(e for e in logged if e["event"] == "listening")
        assert listening["keys"]["issuing"] == new.group(1), listening
        assert listening["keys"]["root"] == "root-ca", listening
        said = [e for e in logged if "names a key that is retired now" in e["event"]]
        assert [(e["label"], e["state"]) for e in said] == [("issuing-ca", "retired")], said
    finally:
        assert d.stop() == 0


async def test_rotations_of_one_kind_at_once_each_standing_line_names_the_key_it_replaced(
        tmp_path: Path) -> None:
    """A review: two rotations of one kind at once both read the same active key, and
    both lines named it as the key replaced, though the second replaced the first's new
    key. A rotation that finds the active key changed when it commits is refused (409),
    its line voided, so the standing lines chain one key to the next."""
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state)
    try:
        first = re.search(r"^(\S+)\s+ssh-user\s+active", key_cmd(d, "list").stdout, re.M)
        assert first
        answers = await asyncio.gather(*(http(
            "POST", f"{d.url}/v1/keys/rotate", d.admin_ssl(), body={"kind": "ssh-user"})
            for _ in range(4)))
        codes = sorted(a[0] for a in answers)
        assert codes[0] == 201 and set(codes) <= {201, 409}, answers
        for status, _, raw in answers:
            if status == 409:
                assert "another rotation or staging of the ssh-user key finished while this " \
                    "one ran" in json.loads(raw)["detail"], raw
        # Stagings at once, of another kind: one staged key, the others refused and voided
        staged = await asyncio.gather(*(http(
            "POST", f"{d.url}/v1/keys/rotate", d.admin_ssl(),
            body={"kind": "ssh-host", "stage": True}) for _ in range(4)))
        assert sorted(a[0] for a in staged)[0] == 201, staged
        keys = json.loads((await http("GET", f"{d.url}/v1/keys", d.admin_ssl()))[2])["keys"]
        assert [k["state"] for k in keys if k["kind"] == "ssh-host"].count("next") == 1, keys
        # A staging and a rotation at once (a cluster trial had both take, the staging's
        # line naming an active key replaced): the second to commit is refused, unless
        # the rotation came after the staging and put that staged key in use
        mixed = await asyncio.gather(*(http(
            "POST", f"{d.url}/v1/keys/rotate", d.admin_ssl(), body=body)
            for body in ({"kind": "ssh-user", "stage": True}, {"kind": "ssh-user"})))
        (st_stage, _, raw_stage), (st_rotate, _, raw_rotate) = mixed
        assert sorted((st_stage, st_rotate)) in ([201, 201], [201, 409]), mixed
        if st_stage == st_rotate == 201:
            assert json.loads(raw_rotate)["label"] == json.loads(raw_stage)["label"] and \
                json.loads(raw_rotate).get("staged") is True, mixed
        listed = key_cmd(d, "list").stdout
    finally:
        assert d.stop() == 0
    lines = log_lines(ca.state)
    voided = {e["voids"] for e in lines if e["event"] == "record.void"}
    standing = [e for e in lines if e["event"] == "key.rotate" and e["kind"] == "ssh-user"
                and e["seq"] not in voided]
    assert len(standing) == codes.count(201) + (st_rotate == 201), (standing, answers)
    assert [e["previous"] for e in standing] == \
        [first.group(1)] + [e["label"] for e in standing[:-1]], standing
    active = re.search(r"^(\S+)\s+ssh-user\s+active", listed, re.M)
    assert active and active.group(1) == standing[-1]["label"], listed
    stages = [e for e in lines if e["event"] == "key.stage" and e["kind"] == "ssh-host"
              and e["seq"] not in voided]
    assert len(stages) == 1 == [a[0] for a in staged].count(201), (stages, staged)
    audit_verify(ca.state, ok=True)


def rotated_once(tmp_path: Path, kind: str) -> Any:
    """A new CA whose `kind` key was rotated once, its daemon stopped."""
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state)
    try:
        key_cmd(d, "rotate", kind)
    finally:
        assert d.stop() == 0
    return ca


def staged_ssh_user_key(d: Daemon) -> str:
    """The label of an SSH user CA key staged now."""
    out = key_cmd(d, "rotate", "ssh-user", "--stage").stdout
    label = re.search(r"(ssh-user-ca-\d{14}-[0-9a-f]{4})", out)
    assert label, out
    return label[1]


def _undo_rotation_in_inventory(state: Path, kind: str) -> str:
    """The inventory as a kill between a rotation's line and its commit leaves it: the
    newest key of `kind` gone, the one it replaced active again. Returns its label."""
    with sqlite3.connect(state / "hsmca.sqlite3") as db:
        new, old = (r[0] for r in db.execute(
            "SELECT label FROM ca_keys WHERE kind = ? ORDER BY created_at DESC LIMIT 2",
            (kind,)))
        db.execute("DELETE FROM ca_keys WHERE label = ?", (new,))
        db.execute("UPDATE ca_keys SET state = 'active' WHERE label = ?", (old,))
    return str(new)


async def test_a_rotation_killed_before_its_commit_is_voided_at_the_next_start(
        tmp_path: Path) -> None:
    """A review: a rotation killed between its key.rotate line and its inventory commit
    left the line standing, saying a key was put in use that no process ever used, and
    each start then spoke of an inventory restored from an older backup. The start
    voids it, on one node, when nothing ever signed with the key; a key that signed
    (an inventory older than the rotation) is left to the operator."""
    from tests.test_revocation import ssh_user_cert
    ca = rotated_once(tmp_path, "ssh-user")
    never = _undo_rotation_in_inventory(ca.state, "ssh-user")
    d = start_daemon(ca.state)
    try:
        assert d.wait_stderr(lambda: any(
            "a rotation stopped between its audit line and its inventory commit: its line "
            "is voided" in x and never in x for x in d.stderr)), d.stderr
        assert re.search(r"(?m)^ssh-user-ca\s+ssh-user\s+active", key_cmd(d, "list").stdout)
        # and a rotation that signed, whose row the inventory then lost, is not voided
        key_cmd(d, "rotate", "ssh-user")
        user = enroll(d, tmp_path, "user", ["bob@example.org"], ["bob"])
        ssh_user_cert(d, tmp_path, user, "id_new")
    finally:
        assert d.stop() == 0
    used = _undo_rotation_in_inventory(ca.state, "ssh-user")
    lines = log_lines(ca.state)
    voids = {e["voids"] for e in lines if e["event"] == "record.void"}
    rotations = {e["label"]: e["seq"] for e in lines if e["event"] == "key.rotate"}
    assert rotations[never] in voids and rotations[used] not in voids
    audit_verify(ca.state, ok=True)
    d = start_daemon(ca.state)
    try:
        assert d.wait_stderr(lambda: any(
            "an inventory restored from a backup older than that rotation" in x and used in x
            for x in d.stderr)), d.stderr
        # the voided one is named as a key a rotation made and never recorded
        assert any("a rotation made and stopped before it recorded" in x and never in x
                   for x in d.stderr), d.stderr
        assert not any("its line is voided" in x for x in d.stderr), d.stderr
    finally:
        assert d.stop() == 0
    lines = log_lines(ca.state)
    assert [e["voids"] for e in lines if e["event"] == "record.void"].count(
        rotations[never]) == 1
    assert rotations[used] not in {e["voids"] for e in lines if e["event"] == "record.void"}
    audit_verify(ca.state, ok=True)


async def test_a_staged_key_retired_is_never_voided_at_start(tmp_path: Path) -> None:
    """A review: a staged key signs nothing, so a start took its key.stage line for a
    rotation killed before its commit and voided it, though the staging committed and
    the key was retired since (its token restored from a backup after a destroy). A
    key the inventory has a row for, or that a later line acted on, is never voided."""
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state)
    try:
        label = staged_ssh_user_key(d)
        key_cmd(d, "retire", label, "--yes")
    finally:
        assert d.stop() == 0
    db = ca.state / "hsmca.sqlite3"
    # the inventory says destroyed, the token still holds it (restored from a backup)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE ca_keys SET state = 'destroyed' WHERE label = ?", (label,))
    for _ in range(2):
        d = start_daemon(ca.state)
        assert d.stop() == 0
        assert not [e for e in log_lines(ca.state) if e["event"] == "record.void"]
        # and with no row at all (an inventory from before the staging), its retire line
        # says the staging committed
        with sqlite3.connect(db) as conn:
            conn.execute("DELETE FROM ca_keys WHERE label = ?", (label,))
    audit_verify(ca.state, ok=True)


async def test_a_promotion_killed_before_its_commit_is_voided_at_the_next_start(
        tmp_path: Path) -> None:
    """A review: a promotion of a staged key killed between its key.rotate line and its
    commit left the line standing (the key put in use) and the key still staged."""
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state)
    try:
        label = staged_ssh_user_key(d)
        key_cmd(d, "rotate", "ssh-user")
    finally:
        assert d.stop() == 0
    with sqlite3.connect(ca.state / "hsmca.sqlite3") as db:  # as the kill left it
        db.execute("UPDATE ca_keys SET state = 'next' WHERE label = ?", (label,))
        db.execute("UPDATE ca_keys SET state = 'active' WHERE label = 'ssh-user-ca'")
    [promoted] = [e for e in log_lines(ca.state) if e["event"] == "key.rotate"]
    assert promoted["label"] == label and promoted["staged"] is True
    said = []
    for _ in range(2):  # voided once, by the first start, which says so
        d = start_daemon(ca.state)
        try:
            listed = key_cmd(d, "list").stdout
            assert re.search(rf"(?m)^{label}\s+ssh-user\s+next", listed), listed
        finally:
            assert d.stop() == 0
        said.append(any("a promotion of a staged key stopped between its audit line" in x
                        and label in x for x in d.stderr))
        voids = [e for e in log_lines(ca.state) if e["event"] == "record.void"]
        assert [e["voids"] for e in voids] == [promoted["seq"]], voids
    assert said == [True, False]
    audit_verify(ca.state, ok=True)
    # A promotion that committed, its key then used, is never voided, though an
    # inventory from before it holds the key as staged (a review)
    from tests.test_revocation import ssh_user_cert
    d = start_daemon(ca.state)
    try:
        key_cmd(d, "rotate", "ssh-user")  # puts the staged key in use
        user = enroll(d, tmp_path, "user", ["bob@example.org"], ["bob"])
        ssh_user_cert(d, tmp_path, user, "id_new")
    finally:
        assert d.stop() == 0
    with sqlite3.connect(ca.state / "hsmca.sqlite3") as db:
        db.execute("UPDATE ca_keys SET state = 'next' WHERE label = ?", (label,))
        db.execute("UPDATE ca_keys SET state = 'active' WHERE label = 'ssh-user-ca'")
    d = start_daemon(ca.state)
    assert d.stop() == 0
    voids = [e["voids"] for e in log_lines(ca.state) if e["event"] == "record.void"]
    assert voids == [promoted["seq"]], voids


_REFRESH_AFTER_RETIRE_SCRIPT = """
import asyncio, dataclasses, sys
from pathlib import Path
from ca.audit.log import AuditLog
from ca.config import load
from ca.daemon.keys import load_issuers
from ca.issuance.issue import Issuance, decision_context
from ca.issuance.pipeline import SigningPipeline
from ca.revocation.ocsp import OCSPRefresher, OCSPSigner
from ca.store import open_store
import ca.issuance.profiles as prof

# (ChangedAfterTheFirstLook)


async def main():
    config = load(Path(sys.argv[1]))
    audit = AuditLog.open(Path(sys.argv[2]))
    pipeline = SigningPipeline(config.hsm_session, audit)
    pipeline.start()
    store = open_store(config.store_location)
    before = await load_issuers(store, pipeline)
    after = dataclasses.replace(before, x509={})
    source = ChangedAfterTheFirstLook(before, after)
    due = await store.ocsp_due(prof.utcnow(), 100, list(before.x509))
    async def context():
        return decision_context(config.policy, await source.refresh())
    refresher = OCSPRefresher(OCSPSigner(Issuance(pipeline, store, source, None), context))
    await refresher.round()
    print(len(due))
    store.close()
    pipeline.close()

asyncio.run(main())
"""


async def test_a_refresher_round_ends_when_its_issuer_was_retired_meanwhile(
        tmp_path: Path) -> None:
    """A review: a key retired between a refresher round's first look at the issuers and
    its signing left that key's due responses passed over at every turn of the round's
    loop, which awaited nothing that waits: the primary's event loop spun for good (no
    checkpoints, no worker restarts, no SIGTERM). The round ends, having signed
    nothing with the retired key; the next one reads the issuers again."""
    ca = init_ca(tmp_path)
    with sqlite3.connect(ca.state / "hsmca.sqlite3") as db:  # every response due now
        db.execute("UPDATE ocsp_responses SET refresh_at = '2000-01-01T00:00:00+00:00'")
    scratch = tmp_path / "scratch.jsonl"
    proc = subprocess.run([sys.executable, "-c", _REFRESH_AFTER_RETIRE_SCRIPT
                           .replace("# (ChangedAfterTheFirstLook)", _CHANGED_AFTER_THE_FIRST_LOOK),
                           ca.state / "hsmca.toml", scratch],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    due = int(proc.stdout.split()[0])
    assert due >= 2, proc.stdout  # the listener's and the admin's certificates
    events = [json.loads(line)["event"] for line in scratch.read_bytes().splitlines()]
    assert "hsm.sign" not in events, events  # nothing signed

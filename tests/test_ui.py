"""What `hsmca ui` stands on, without a browser: the daemon's inventory read API (for
auditors and admins only, as the audit API), and the command's refusal to serve beyond
this machine unless told to, over TLS. The pages themselves are tested in a real
browser (tests/test_ui_browser.py)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from ca.subject import spki_sha256
from ca.ui.certs import intent_matches
from ca.ui.metrics import Latency
from tests.conftest import Daemon, hsmca
from tests.helpers import Running, cert_serial, enroll, http, log_lines


async def test_the_inventory_api_is_for_auditors_and_admins(daemon: Daemon,
                                                            tmp_path: Path) -> None:
    before = dt.datetime.now(dt.UTC).isoformat()[:13]  # the hour it is issued in
    cert, key = enroll(daemon, tmp_path, "service", ["inventory.api.example"])
    serial = cert_serial(cert)
    auditor = enroll(daemon, tmp_path, "auditor", ["inventory-auditor@example.com"])
    base = f"{daemon.url}/v1/inventory"
    for ctx in (daemon.ssl(), daemon.ssl(cert, key)):  # nobody, a service
        for path in ("/certificates", f"/certificates/{serial}", "/issuance",
                     "/ssh-certificates"):
            status, _, _ = await http("GET", base + path, ctx)
            assert status in (401, 403), path

    status, _, raw = await http("GET", f"{base}/certificates?q=inventory.api.example",
                                daemon.ssl(*auditor))
    assert status == 200, raw
    found = json.loads(raw)
    assert found["total"] == 1 and found["certificates"][0]["serial"] == serial
    # A NUL in the search matched every certificate (a web trial): refused, said why.
    status, _, said = await http("GET", f"{base}/certificates?q=%00", daemon.ssl(*auditor))
    assert status == 400 and "q cannot hold control characters" in \
        json.loads(said)["detail"], said
    rec = found["certificates"][0]
    # a day's certificate just issued is valid; expiring only in its last third
    assert (rec["status"], rec["kind"], rec["role"]) == ("valid", "x509", "service")
    # The inventory says where the certificate's signature is in the log: its intent.
    intent = log_lines(daemon.state)[rec["audit_seq"]]
    assert (intent["serial"], intent["phase"]) == (serial, "intent")

    status, _, raw = await http("GET", f"{base}/certificates/{serial}", daemon.admin_ssl())
    assert status == 200, raw
    one = json.loads(raw)
    # the leaf, which cert.pem holds first (then its issuing CA)
    assert cert.read_text().startswith(one["pem"])
    assert [f["serial"] for f in one["family"]] == [serial]

    status, _, raw = await http("GET", f"{base}/issuance?hours=2", daemon.ssl(*auditor))
    assert status == 200, raw
    hours = {before, dt.datetime.now(dt.UTC).isoformat()[:13]}  # one, or two at :00
    assert any(c["kind"] == "x509-service" and c["hour"] in hours and c["count"] >= 1
               for c in json.loads(raw)["counts"])

    for bad in ("/certificates?status=sideways", "/certificates?limit=100000",
                "/certificates?sort=names", "/certificates/zz", "/issuance?hours=-1",
                "/ssh-certificates?type=both", "/ssh-certificates?sort=principal",
                "/ssh-certificates?status=sideways", "/ssh-certificates?owner=zz"):
        status, _, raw = await http("GET", base + bad, daemon.ssl(*auditor))
        assert status == 400, (bad, raw)
        if "owner" in bad:  # the parameter named, not the path's serial
            assert "owner must be the serial" in json.loads(raw)["detail"], raw
    status, _, _ = await http("GET", f"{base}/certificates/abcdef12", daemon.ssl(*auditor))
    assert status == 404

    # `hsmca ui` with the service's certificate: refused at once, saying which role it
    # needs, instead of a view whose every page is a 403.
    ui = hsmca("ui", "--url", daemon.url, "--ca", daemon.root, "--cert", cert, "--key", key,
               "--audit-key", daemon.state / "audit/audit_key.pem", "--listen", "127.0.0.1:0",
               "--state", tmp_path / "ui.state",
               check=False)
    assert ui.returncode == 1 and "role service" in ui.stderr and "auditor" in ui.stderr, \
        ui.stderr
    assert len(ui.stderr.strip().splitlines()) == 1 and "Traceback" not in ui.stderr


def test_ui_serves_beyond_loopback_only_when_told_to_and_over_tls(tmp_path: Path) -> None:
    common = ["ui", "--url", "https://127.0.0.1:1", "--ca", tmp_path / "root.pem", "--cert",
              tmp_path / "c.pem", "--key", tmp_path / "k.pem", "--audit-key",
              tmp_path / "audit.pem"]
    refused = hsmca(*common, "--listen", "0.0.0.0:8480", check=False)
    assert refused.returncode == 1 and "not a loopback address" in refused.stderr
    assert "--listen-public" in refused.stderr
    plain = hsmca(*common, "--listen", "0.0.0.0:8480", "--listen-public", check=False)
    assert plain.returncode == 1 and "needs --tls-cert and --tls-key" in plain.stderr
    # Loopback passes that check and goes on to the credential, which is missing here.
    local = hsmca(*common, "--listen", "[::1]:0", check=False)
    assert local.returncode == 1 and "c.pem" in local.stderr


def test_latency_quantiles_interpolate_as_prometheus_does() -> None:
    # 10 requests: 4 at most 1 ms, 5 more at most 5 ms, 1 over 5 s.
    hist = Latency("/r", ((0.001, 4), (0.005, 9), (5.0, 9), (float("inf"), 10)), 10)
    assert hist.quantile(0.2) == 0.0005  # halfway into the first bucket
    assert abs((hist.quantile(0.5) or 0) - 0.0018) < 1e-12  # a fifth into the second
    assert hist.quantile(0.99) == 5.0  # in +Inf: the largest finite bound
    assert Latency("/r", ((0.001, 0), (float("inf"), 0)), 0).quantile(0.5) is None
    assert [n for _, _, n in hist.per_bucket()] == [4, 5, 0, 1]


async def test_on_a_cluster_a_record_without_a_served_log_is_said_so(tmp_path: Path) -> None:
    """The certificate page proves its lines in the log its record names; a record
    that names none (made before hsmca kept it) or a log the daemon does not serve is
    said so, never checked against another log's line at that seq. No daemon is asked:
    the list of logs is what it last said."""
    import ssl

    from cryptography.hazmat.primitives.asymmetric import ed25519

    from ca.ui.ca_api import CA
    from ca.ui.follow import Logs, Verdict
    from ca.ui.pages import UI, _evidence, environment
    from tests.helpers import other_ca

    other = other_ca(tmp_path)
    cert = other.cert
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    ca = CA("https://127.0.0.1:1", ssl.create_default_context())
    logs = Logs(ca, key, tmp_path / "auditor.state", None, [])
    logs.names = ["node-1", "node-2", "init"]
    ui = UI(ca, logs, cert, key, [], environment())
    verdict = Verdict("ok", None, None, "", dt.datetime.now(dt.UTC), log="node-1")
    try:
        found, log = await _evidence(ui, verdict, {"audit_seq": 5, "audit_log": None}, cert)
        assert log is None and found.intent is None
        assert "does not say which node's log holds its line 5" in (found.problem or "")
        found, log = await _evidence(ui, verdict, {"audit_seq": 5, "audit_log": "node-9"}, cert)
        assert "log of node-9, line 5, which the daemon does not serve" in (found.problem or "")
    finally:
        await ca.close()


def test_the_banner_counts_witnesses_not_their_lines() -> None:
    """A witness that sends its cosignature twice (or a daemon that kept both) is one
    witness; an unpinned or unverified one is none."""
    from ca.audit.witnessed import Cosigner, Witnessed
    twice = Cosigner("w.example", "ab12cd34", None, True)
    other = Cosigner("x.example", "ef56ab78", None, False)
    assert Witnessed(10, True, (twice, twice, other)).count == 1
    assert Witnessed(10, False, (twice,)).count == 0  # on a log the view did not verify


def test_the_banner_says_which_checkpoint_the_witnesses_cosigned_and_since_when() -> None:
    """Cosignatures of an older checkpoint read as if the witnesses had seen the latest
    (an auditor trial: "checkpoint 150018, 1 witness" while every witness had been down
    for minutes). The banner says up to where, and how long ago."""
    from ca.audit.merkle import TreeHead
    from ca.audit.note import Checkpoint
    from ca.audit.witnessed import Cosigner, Witnessed
    from ca.ui.follow import Verdict
    now = dt.datetime.now(dt.UTC)
    w = Cosigner("w.example", "ab12cd34", now - dt.timedelta(minutes=12), True, True)
    cp = Checkpoint("o", 150018, b"\0" * 32, "", ())
    older = Verdict("ok", TreeHead(150018, b"\0" * 32), cp, "", now,
                    witnessed=Witnessed(150010, True, (w,)))
    assert older.banner == ("verified up to seq 150017, checkpoint 150018, witnessed up to "
                            "150010 by 1 witness, 12 min ago"), older.banner
    same = Verdict("ok", TreeHead(150018, b"\0" * 32), cp, "", now,
                   witnessed=Witnessed(150018, True, (w,)))
    assert same.banner == "verified up to seq 150017, checkpoint 150018, 1 witness"
    # A witness pinned (--witness-key) and no cosignature by it: amber, and said (an
    # auditor trial read "0 witnesses" in green as all well)
    alone = Verdict("ok", TreeHead(150018, b"\0" * 32), cp, "", now, witnesses_pinned=1)
    assert alone.overall == "unwitnessed" and alone.banner == (
        "verified up to seq 150017, checkpoint 150018, NOT WITNESSED: no cosignature by the "
        "1 pinned witness"), alone.banner
    assert Verdict("ok", TreeHead(150018, b"\0" * 32), cp, "", now).overall == "ok"


def test_a_daemon_that_is_away_is_named_by_address_not_by_python_objects() -> None:
    """The web view's health banner said `ssl:<ssl.SSLContext object at 0x...>` when the
    daemon was down (auditor trial): it names the address and the reason."""
    import asyncio
    import ssl

    from ca.client import ClientError
    from ca.ui.ca_api import CA
    from tests.ports import free_port

    async def ask() -> str:
        api = CA(f"https://127.0.0.1:{free_port()}", ssl.create_default_context())
        try:
            await api.health()
        except ClientError as exc:
            return str(exc)
        finally:
            await api.close()
        raise AssertionError("a closed port answered")

    said = asyncio.run(ask())
    assert said.startswith("GET /health: cannot reach the daemon (127.0.0.1:") and \
        "SSLContext" not in said and "object at 0x" not in said, said


def test_a_checkpoint_covering_only_old_lines_is_said_to_be_stale() -> None:
    """A checkpoint served frozen for 10 min showed green (auditor trial): the overview
    says the daemon has signed no newer one, past five default heartbeats."""
    from ca.ui.pages import STALE_S, _stale
    now = dt.datetime.now(dt.UTC)
    assert _stale((now - dt.timedelta(seconds=STALE_S + 60)).isoformat().replace("+00:00", "Z"))
    assert not _stale((now - dt.timedelta(seconds=30)).isoformat().replace("+00:00", "Z"))
    assert not _stale(None) and not _stale("not a time")


def test_a_verdict_the_daemon_could_not_renew_does_not_claim_no_new_lines() -> None:
    """The daemon down: the detail read "no new lines; the daemon could not be asked
    again" (auditor trial): whether there are new lines is not known then."""
    from dataclasses import replace

    from ca.audit.merkle import TreeHead
    from ca.ui.follow import Verdict
    ok = Verdict("ok", TreeHead(5, b"\0" * 32), None, "", dt.datetime.now(dt.UTC))
    assert "no new lines" in ok.detail
    away = replace(ok, problem="GET /health: cannot reach the daemon (127.0.0.1:1: refused)")
    assert "no new lines" not in away.detail and "could not be asked again" in away.detail


def test_an_intent_about_another_request_is_not_taken_for_the_certificates() -> None:
    """The certificate page checks the intent's decision against the certificate, not
    only its serial (auditor trial: an intent naming svc9 shown beside svc2's
    certificate as its evidence)."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "svc2.test")]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CA")]))
            .public_key(key.public_key()).serial_number(0x1234)
            .not_valid_before(start).not_valid_after(start + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("svc2.test"), x509.IPAddress(ipaddress.ip_address("10.0.0.2"))]),
                critical=False)
            .sign(key, hashes.SHA256()))
    intent = {"serial": "1234", "names": ["10.0.0.2", "svc2.test"],
              "spki_sha256": spki_sha256(key.public_key()),
              "not_after": (start + dt.timedelta(days=1)).isoformat()}
    assert all(ok for _, ok in intent_matches(intent, cert))
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    wrong = {**intent, "names": ["svc9.test"], "spki_sha256": spki_sha256(other),
             "not_after": (start + dt.timedelta(days=2)).isoformat()}
    assert [ok for _, ok in intent_matches(wrong, cert)] == [False, False, False]
    # a failed check says what differs, not the sentence of a passed one (a web trial)
    said = [text for text, _ in intent_matches(wrong, cert)]
    assert said[0] == "the intent's names (svc9.test) are not the certificate's (10.0.0.2, " \
        "svc2.test)" and said[1] == "the intent's public key is not the certificate's" and \
        said[2].startswith("the intent's notAfter (") and " is not the certificate's (" in \
        said[2], said
    assert [ok for _, ok in intent_matches({"serial": "1234"}, cert)] == [False, False, False]


async def test_a_failed_check_of_the_signatures_lines_says_what_failed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A web view trial's proxy served another line for a certificate's intent and an
    outcome of another fingerprint: the page read "✗ line 77 is an hsm.sign intent for
    serial ..." and "✗ the outcome's fingerprint is this certificate's SHA-256", the
    passed sentences with a cross, which read as the opposite."""
    from ca.ui import certs, proofs
    key = ec.generate_private_key(ec.SECP256R1())
    start = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CA")]))
            .public_key(key.public_key()).serial_number(0x4d56)
            .not_valid_before(start).not_valid_after(start + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    served = {77: {"event": "token.create", "seq": 77},
              78: {"event": "hsm.sign", "phase": "outcome", "result": "ok",
                   "fingerprint": "00" * 32}}

    async def line(_ca: object, _tree: object, seq: int) -> tuple[proofs.Line, None]:
        return proofs.Line(seq, b"{}", served[seq], False, "not covered"), None

    async def find_outcome(_ca: object, _intent: object) -> tuple[int, bytes]:
        return 78, b"{}"

    async def proven(_ca: object, _tree: object, seq: int, _raw: bytes
                     ) -> tuple[proofs.Line, None]:
        return proofs.Line(seq, b"{}", served[seq], False, "not covered"), None
    monkeypatch.setattr(proofs, "line", line)
    monkeypatch.setattr(proofs, "find_outcome", find_outcome)
    monkeypatch.setattr(proofs, "proven", proven)
    found = await certs.audit_evidence(object(), None, 77, cert)  # type: ignore[arg-type]
    said = dict(found.checks)
    assert said["line 77 is not an hsm.sign intent for serial 4d56"] is False, said
    assert said["the outcome's fingerprint is not this certificate's SHA-256"] is False, said
    assert said["line 78 is its outcome: result ok"] is True, said


async def test_an_ocsp_response_not_signed_yet_is_pending_not_a_failure() -> None:
    """A web trial opened a certificate's page right after its enrollment and read a
    red "signature not verified" for OCSP: the responder's unsigned tryLater, which it
    answers until the refresher has signed the new certificate's response."""
    from cryptography.x509 import ocsp

    from ca.ui.certs import ocsp_status

    class Responder:  # the daemon's answer, as the view receives it
        async def post(self, path: str, body: bytes, ctype: str) -> bytes:
            return ocsp.OCSPResponseBuilder.build_unsuccessful(
                ocsp.OCSPResponseStatus.TRY_LATER).public_bytes(serialization.Encoding.DER)

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CA")])
    start = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(0x1234)
            .not_valid_before(start).not_valid_after(start + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    said = await ocsp_status(Responder(), cert, cert)  # type: ignore[arg-type]
    assert said.status == "pending" and "signed within seconds" in (said.problem or ""), said


async def test_a_wrong_audit_key_is_named_on_the_keys_page(daemon: Daemon,
                                                          tmp_path: Path) -> None:
    """A pinned audit key that is none of the CA's is said so on /keys, not only left
    without its ✓ (auditor trial L4); the root pinned right is still marked."""
    auditor = enroll(daemon, tmp_path, "auditor", ["keys-page-auditor@example.com"])
    stranger = tmp_path / "not_the_audit_key.pem"
    stranger.write_bytes(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    ui = Running.start("ui", "--url", daemon.url, "--ca", daemon.root, "--cert", auditor[0],
                       "--key", auditor[1], "--audit-key", stranger, "--state",
                       tmp_path / "ui.state", "--listen", "127.0.0.1:0")
    try:
        base = ui.listening_url()
        with urllib.request.urlopen(f"{base}/keys", timeout=60) as answer:
            text = answer.read().decode()
    finally:
        ui.stop()
    assert "✗ The audit key you pinned (--audit-key) is none of this CA&#39;s keys" in text \
        or "✗ The audit key you pinned (--audit-key) is none of this CA's keys" in text, text
    assert "The root you pinned (--ca) is none" not in text
    assert "✓ the root you pinned (--ca)" in text


async def test_a_certificate_page_shows_the_certificate_s_names_and_its_revoked_issuer(
        tmp_path: Path) -> None:
    """A web trial: names changed in the inventory were shown beside every ✓; a revoked
    issuing CA certificate (`hsmca key revoke`) showed nowhere, its certificates green;
    and a revocation the inventory lost went unremarked beside the signed CRL and OCSP
    saying revoked."""
    import re
    import sqlite3

    from tests.conftest import init_ca, start_daemon
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state)
    try:
        old_cert, _ = enroll(d, tmp_path, "service", ["old-key.internal.example"])
        label = re.search(r"^(\S+)\s+issuing\s+active", hsmca(
            "key", "list", "--config", d.state / "hsmca.toml", "--url", d.url).stdout, re.M)
        assert label
        for step in (("rotate", "issuing"), ("retire", label.group(1), "--yes"),
                     ("revoke", label.group(1), "--yes")):
            hsmca("key", *step, "--config", d.state / "hsmca.toml", "--url", d.url)
        # (the admin credential of the revoked key authenticates no more: renewed first)
        assert d.wait_stderr(lambda: any("this host's admin credential is renewed" in x
                                         for x in d.stderr))
        lost, _ = enroll(d, tmp_path, "service", ["lost.internal.example"])
        lost_serial = cert_serial(lost)
        status, _, raw = await http("POST", f"{d.url}/v1/x509/revoke", d.admin_ssl(),
                                    body={"serial": lost_serial})
        assert status == 200, raw
        changed, _ = enroll(d, tmp_path, "service", ["honest.internal.example"])
        with sqlite3.connect(ca.state / "hsmca.sqlite3") as db:  # a rotation not taken
            db.execute("CREATE TRIGGER no_keys BEFORE INSERT ON ca_keys BEGIN "
                       "SELECT RAISE(ABORT, 'refused for the test'); END")
        hsmca("key", "rotate", "ssh-user", "--config", d.state / "hsmca.toml", "--url",
              d.url, check=False)
        with sqlite3.connect(ca.state / "hsmca.sqlite3") as db:
            db.execute("DROP TRIGGER no_keys")
        [void] = [e for e in log_lines(ca.state) if e["event"] == "record.void"]
        with sqlite3.connect(ca.state / "hsmca.sqlite3") as db:  # someone at the CA host
            db.execute("UPDATE certs SET names = '[\"evil.example\"]' WHERE serial = ?",
                       (cert_serial(changed),))
            db.execute("UPDATE certs SET revoked_at = NULL, reason = NULL WHERE serial = ?",
                       (lost_serial,))
        ui = auditors_view(d, tmp_path, "names-page-auditor@example.com")
        try:
            base = ui.listening_url()

            def page(path: str) -> str:
                try:
                    with urllib.request.urlopen(f"{base}{path}", timeout=60) as answer:
                        return answer.read().decode().replace("&#39;", "'")
                except urllib.error.HTTPError as exc:
                    raise AssertionError(f"{path}: {exc}: {''.join(ui.raw[-30:])}") from None
            shown = page(f"/certificates/{cert_serial(changed)}")
            assert "honest.internal.example" in shown and \
                "✗ the inventory lists other names: evil.example" in shown, shown
            shown = page(f"/certificates/{cert_serial(old_cert)}")
            assert "its CA certificate revoked" in shown and "cACompromise" in shown, shown
            # its CRL cannot be checked (the daemon serves that CA certificate no more):
            # said so, not "does not verify" beside a verdict (a web trial)
            assert "its CRL cannot be checked" in shown and "does not verify" not in shown, \
                shown
            assert "CA certificate revoked" in page("/keys")
            shown = page(f"/certificates/{lost_serial}")
            assert "✗ the inventory says not revoked, but the CA's signed" in shown, shown
            # a voided line says so, and its void names it (a web trial saw it as any)
            shown = page(f"/audit/{void['voids']}")
            assert f"voided: it changed nothing, says: seq {void['seq']}" in shown, shown
            shown = page(f"/audit/{void['seq']}")
            assert f"the line it says changed nothing: seq {void['voids']}" in shown, shown
            # and in the log's list, both rows say it (a web view trial saw the voided
            # row as any other): the void follows its line, on the same page
            shown = page("/audit")
            assert f'voided by <a href="/audit/{void["seq"]}">seq {void["seq"]}</a>' in shown, \
                shown
            assert f'says seq <a href="/audit/{void["voids"]}">{void["voids"]}</a> changed ' \
                "nothing" in shown, shown
        finally:
            ui.stop()
    finally:
        assert d.stop() == 0


def auditors_view(daemon: Daemon, tmp_path: Path, auditor_name: str) -> Running:
    """`hsmca ui` on loopback, as an auditor enrolled now, pinned to the daemon's key."""
    auditor = enroll(daemon, tmp_path, "auditor", [auditor_name])
    return Running.start("ui", "--url", daemon.url, "--ca", daemon.root, "--cert",
                         auditor[0], "--key", auditor[1], "--audit-key",
                         daemon.state / "audit/audit_key.pem", "--state",
                         tmp_path / "ui.state", "--listen", "127.0.0.1:0")


async def test_the_view_serves_only_its_own_user_and_its_own_pages(daemon: Daemon,
                                                                  tmp_path: Path) -> None:
    """It reads with its user's client certificate, which no other user may read: a
    security review fetched the whole inventory through it as `nobody`, and any web page
    could make the auditor's browser load the daemon through it."""
    import subprocess
    ui = auditors_view(daemon, tmp_path, "own-user-auditor@example.com")
    try:
        base = ui.listening_url()
        port = base.rsplit(":", 1)[1]
        with urllib.request.urlopen(f"{base}/certificates.csv", timeout=60) as answer:
            assert answer.status == 200  # its own user (root here)
        # Another local user, over the same loopback address: refused, told why.
        other = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bash", "-c",
             f"exec 3<>/dev/tcp/127.0.0.1/{port}; printf 'GET /certificates.csv HTTP/1.0"
             f"\\r\\nHost: 127.0.0.1:{port}\\r\\n\\r\\n' >&3; cat <&3"],
            capture_output=True, text=True, timeout=60, cwd="/")
        assert other.stdout.startswith("HTTP/1.0 403"), other.stdout + other.stderr
        assert "serves only the user who runs `hsmca ui`" in other.stdout
        assert "serial" not in other.stdout.lower()  # none of the inventory
        # A request another site made the browser send; what a user typed is served.
        for site, status in (("cross-site", 403), ("same-site", 403), ("none", 200),
                             ("same-origin", 200)):
            request = urllib.request.Request(f"{base}/", headers={"Sec-Fetch-Site": site})
            try:
                with urllib.request.urlopen(request, timeout=60) as answer:
                    got = answer.status
            except urllib.error.HTTPError as exc:
                got = exc.code
            assert got == status, site
    finally:
        ui.stop()


async def test_a_filter_the_view_cannot_read_is_refused_not_dropped(daemon: Daemon,
                                                                    tmp_path: Path) -> None:
    """A web trial's `/audit?since=garbage` showed the whole log as if filtered, with the
    field emptied and no word; a seq or page that is no number went to the first page.
    Each is now a 400 page that says what the value must be."""
    ui = auditors_view(daemon, tmp_path, "filters-auditor@example.com")
    try:
        base = ui.listening_url()
        for path, said in (
                ("/audit?since=garbage", "since must be a time such as 2026-12-01T08:00"),
                ("/audit?before=ten", "before must be a line&#39;s seq"),
                ("/audit/go?seq=abc", "no line to open: seq must be a line&#39;s seq"),
                ("/certificates?page=-1", "page must be a page number (1, 2, ...)"),
                ("/ssh?page=abc", "page must be a page number (1, 2, ...)")):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(base + path, timeout=60)
            page = refused.value.read().decode()
            assert refused.value.code == 400 and said in page, (path, page[-600:])
        # What can be read is served as before.
        with urllib.request.urlopen(f"{base}/audit?since=2026-01-01T00:00&page=1",
                                    timeout=60) as answer:
            assert answer.status == 200
        # A path it has no page for is a page that says so, with the menu, not a bare
        # "404: Not Found"; the banner of a page about a log the daemon does not serve
        # refreshes as the page shows it (its 404 turned it to "does not answer").
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{base}/nope", timeout=60)
        page = missing.value.read().decode()
        assert missing.value.code == 404 and "this view has no page &#39;/nope&#39;" in page
        assert '<nav aria-label="pages">' in page
        with urllib.request.urlopen(f"{base}/status.json?log=nope", timeout=60) as answer:
            assert answer.status == 200 and "banner" in json.loads(answer.read())
    finally:
        ui.stop()


def test_the_owner_of_a_loopback_connection_is_found_over_ipv4_and_ipv6() -> None:
    import os
    import socket

    from ca.ui import peer
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.socket(family) as server, socket.socket(family) as client:
            server.bind((host, 0))
            server.listen()
            client.connect(server.getsockname())
            accepted, _ = server.accept()
            with accepted:
                assert peer.owner(accepted.getpeername()[:2],
                                  accepted.getsockname()[:2]) == os.getuid(), host
    # /proc/net/tcp6 writes ::ffff:127.0.0.1 and ::1 in 32-bit little-endian words
    assert peer._address("0000000000000000FFFF00000100007F:1F90") == ("127.0.0.1", 8080)
    assert peer._address("00000000000000000000000001000000:0050") == ("::1", 80)


async def test_a_page_the_daemon_refuses_for_a_damaged_line_is_red_at_once(
        own_daemon: Daemon, tmp_path: Path) -> None:
    """A web view trial rewrote line 150 in place and opened /audit/150 within seconds:
    the page quoted the daemon's 503 ("... was rewritten on disk") under a green banner,
    the verdict of a run a few seconds old. A page the daemon answers 503 asks the
    verification again, now."""
    d = own_daemon
    for i in range(260):  # a full bundle of 256 lines, which the daemon checks as served
        status, _, _ = await http("POST", f"{d.url}/v1/tokens", d.admin_ssl(), body={
            "role": "service", "names": [f"t{i}.ui.example"], "ttl": "5m"})
        assert status == 201
    ui = Running.start("ui", "--url", d.url, "--ca", d.root, "--cert",
                       d.state / "admin" / "cert.pem", "--key", d.state / "admin" / "key.pem",
                       "--audit-key", d.state / "audit" / "audit_key.pem", "--state",
                       tmp_path / "ui.state", "--listen", "127.0.0.1:0")
    log = d.state / "audit" / "log.jsonl"
    line = log.read_bytes().splitlines(keepends=True)[100]
    at = log.read_bytes().index(line)

    def put(text: bytes) -> None:  # in place: the daemon appends meanwhile
        with log.open("r+b") as f:
            f.seek(at)
            f.write(text)
    try:
        base = ui.listening_url()

        def get(path: str) -> str:
            try:
                with urllib.request.urlopen(base + path, timeout=60) as answer:
                    return answer.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.read().decode()
        assert 'data-status="ok"' in get("/")
        assert b'"seq":100,' in line
        put(line.replace(b'"seq":100,', b'"seq":101,'))
        shown = get("/audit/100")
        assert "rewritten on disk" in shown, shown
        assert 'data-status="failed"' in shown, shown
    finally:
        put(line)
        ui.stop()
    # Put back: the daemon signs again (and its stop can be written) once it has seen so.
    deadline = time.monotonic() + 30
    while (await http("GET", f"{d.url}/health", d.ssl()))[0] != 200:
        assert time.monotonic() < deadline, "the daemon did not see the line put back"
    # and the outage is in the log itself, though no write was refused meanwhile (the
    # daemon's retry writes it within a second of seeing the line back)
    while not any(e["event"] == "log.resume" and "line 100" in e["after"]
                  for e in log_lines(d.state)):
        assert time.monotonic() < deadline, "no log.resume line"


def test_the_view_refuses_at_start_a_certificate_the_daemon_refuses(daemon: Daemon,
                                                                      tmp_path: Path) -> None:
    """A web view trial started `hsmca ui` with a revoked certificate: it served amber
    pages that said "the daemon could not be asked", the revocation only in small print,
    where a certificate of another role is refused at once. Both are, in one line."""
    def view(cred: tuple[Path, Path]) -> str:
        proc = hsmca("ui", "--url", daemon.url, "--ca", daemon.root, "--cert", cred[0],
                     "--key", cred[1], "--audit-key",
                     daemon.state / "audit" / "audit_key.pem", "--state",
                     tmp_path / "ui.state", "--listen", "127.0.0.1:0", check=False)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
        return proc.stderr
    user = enroll(daemon, tmp_path, "user", ["view-user@example.com"])
    assert "--cert has role user: the web view reads the audit log" in view(user)
    auditor = enroll(daemon, tmp_path, "auditor", ["view-revoked@example.com"])
    hsmca("revoke", cert_serial(auditor[0]), "--config", daemon.state / "hsmca.toml",
          "--url", daemon.url)
    said = view(auditor)
    assert said.startswith("hsmca: error: the daemon refuses --cert: ") and "revoked" in \
        said, said


def test_the_issuance_chart_says_its_figures_to_a_screen_reader() -> None:
    """Its per-hour numbers were only in each bar's title, which assistive technology
    does not read out (a web view trial): the image's label carries the totals and the
    busiest hour."""
    from ca.ui import charts
    since = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    chart = charts.issuance([("x509", "2026-12-01T03", 4), ("ssh-user", "2026-12-01T03", 2),
                             ("x509", "2026-12-02T10", 1)], since, 168)
    assert chart.label.startswith("certificates issued per hour over the last 7 days, by "
                                  "kind: 7 in all (")
    assert chart.label.endswith("; the busiest hour 2026-12-01T03:00 UTC, with 6"), chart.label


async def test_a_failed_view_whose_daemon_is_away_does_not_say_a_later_check_passed(
        tmp_path: Path) -> None:
    """A re-trial's failed view, its daemon stopped, read "checked <now>; a later check
    passed, but this failure stands": nothing had been checked."""
    import dataclasses

    from ca.ui.follow import Follower, Verdict
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    follower = Follower(object(), key, tmp_path / "s.json", None, [])  # type: ignore[arg-type]
    failed_at = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    follower.latest = Verdict("failed", None, None, "", failed_at, 7, "line 7 was rewritten")
    later = dt.datetime(2026, 12, 2, tzinfo=dt.UTC)

    async def away() -> Verdict:
        return dataclasses.replace(follower.latest, problem="cannot reach the daemon",
                                   answered=False, checked_at=later)

    async def passed() -> Verdict:
        return Verdict("ok", None, None, "", later)
    follower._verify = away  # type: ignore[method-assign]
    verdict = await follower._run()
    assert verdict.status == "failed" and verdict.checked_at == failed_at
    assert "a later check passed" not in verdict.detail, verdict.detail
    assert "the daemon could not be asked again: cannot reach the daemon" in verdict.detail
    follower._verify = passed  # type: ignore[method-assign]
    verdict = await follower._run()
    assert verdict.status == "failed" and "a later check passed" in verdict.detail
    assert "could not be asked" not in verdict.detail, verdict.detail


def test_a_click_on_the_banner_checks_again_now(tmp_path: Path) -> None:
    """A web view trial: a click on the banner ("check again now"), 3 s after the
    daemon stopped, answered the verdict of the last 5 s: green. The click asks for a
    run begun now (`/status.json?fresh=1`), which finds the daemon gone: not checked,
    and without the earlier run's "N new lines fetched" beside it."""
    from tests.conftest import init_ca, start_daemon
    from tests.test_witness import settled_status
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state)
    auditor = enroll(d, tmp_path, "auditor", ["auditor@click.example"])
    ui = Running.start("ui", "--url", d.url, "--ca", d.root, "--cert", auditor[0], "--key",
                       auditor[1], "--audit-key", ca.state / "audit" / "audit_key.pem",
                       "--state", tmp_path / "ui.state", "--listen", "127.0.0.1:0")
    try:
        base = ui.listening_url()
        status = settled_status(base)
        assert status["status"] == "ok" and "new lines fetched and checked" in \
            status["detail"], status
        assert d.stop() == 0
        with urllib.request.urlopen(f"{base}/status.json?fresh=1", timeout=60) as answer:
            now = json.loads(answer.read())
        assert now["status"] == "stale" and now["banner"].startswith("NOT CHECKED since "), now
        assert "the daemon could not be asked" in now["detail"] and "fetched" not in \
            now["detail"], now
    finally:
        ui.stop()
        d.stop()

"""`hsmca ui` in a real browser: Debian's chromium, driven by Selenium through
chromium-driver, against a real daemon (its own CA and SoftHSM token) and the real
`hsmca ui` process.

One daemon, one UI and one browser for the module, in order: every page on a good log
(green banner, no console error, screenshots), a search by name down to a verified
inclusion proof, a revoked certificate's reason, a hostile name shown as text, the
headers and the Host check; last, the log rewritten on the CA host and re-signed with
the real key, which turns the banner red at the seq the auditor's saved state names.

With HSMCA_UI_SCREENSHOTS=DIR the pages' screenshots are written to DIR too (that is
how docs/ui/ is made: `HSMCA_UI_SCREENSHOTS=docs/ui .venv/bin/python -m pytest
tests/test_ui_browser.py`).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import Daemon, hsmca, init_ca, require, set_config, start_daemon
from tests.helpers import Running, cert_serial, enroll, log_lines
from tests.lying_front import LyingFront
from tests.ports import free_port
from tests.test_audit_remote import _ATTACKER_SIGNS, REPO, rewrite_line
from tests.test_witness import WitnessProcess, log_key

# An e-mail name as hostile as the CA takes (RFC 5321's dot-atom: no <>"): a quote that
# would end an attribute, a character reference that would be read as one, a handler.
# (`<script>...@example.com` was taken until a web view trial's `a+<i>@x.example` made
# every enrollment a 500.)
SCRIPT_NAME = "script'&amp'onmouseover=alert`1`@example.com"
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")


@dataclass
class World:
    ca_state: Path
    daemon: Daemon
    port: int  # the daemon's, kept across its restart
    ui: Running
    witness: WitnessProcess
    base: str
    state: Path  # the auditor's saved state
    auditor: tuple[Path, Path]
    web: str  # serial of web.ui.example, renewed once
    renewed: str
    gone: str  # revoked, keyCompromise
    script: str  # the hostile-named user's certificate
    alice: str  # the X.509 certificate that asked for alice's SSH certificate
    alice_ssh: str  # that SSH certificate's serial, as ssh-keygen -L shows it
    shots: Path
    driver: WebDriver


def _admin_post(d: Daemon, path: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(f"{d.url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, context=d.admin_ssl(), timeout=60) as answer:
        return json.loads(answer.read())


def _browser(profile: Path) -> WebDriver:
    chromium, driver = require("chromium"), require("chromedriver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in (*FLAGS, f"--user-data-dir={profile}", "--window-size=1280,900"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=opts, service=Service(driver))


def _ssh_pubkey(path: Path) -> Path:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    path.write_bytes(key.public_bytes(serialization.Encoding.OpenSSH,
                                      serialization.PublicFormat.OpenSSH) + b"\n")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("ui")
    ca = init_ca(tmp)
    # A witness the CA feeds, whose key the auditor pins too.
    origin, log_vkey = log_key(ca.state)
    witness = WitnessProcess(tmp, "w1.ui.example/witness", {origin: log_vkey})
    set_config(ca.state, "audit", "witnesses", [witness.url])
    set_config(ca.state, "audit", "witness-keys", [witness.vkey])
    # Checkpoints only when the log grows: a heartbeat's, cosigned a moment later, would
    # change the banner's witness part while the pages are read.
    set_config(ca.state, "audit", "heartbeat-s", 86400)
    # A port of this test worker's block: the daemon is restarted on it, and a
    # kernel-chosen one may meanwhile be given to another worker's server.
    port = free_port()
    d = start_daemon(ca.state, "--listen", f"127.0.0.1:{port}")
    daemons = [d]
    ui = None
    driver = None
    try:
        auditor = enroll(d, tmp, "auditor", ["auditor@ui.example"])
        web_cert, web_key = enroll(d, tmp, "service", ["web.ui.example"])
        web = cert_serial(web_cert)
        hsmca("renew", "--url", d.url, "--ca", d.root, "--cert", web_cert, "--key", web_key)
        renewed = cert_serial(web_cert)
        gone = cert_serial(enroll(d, tmp, "service", ["gone.ui.example"])[0])
        _admin_post(d, "/v1/x509/revoke", {"serial": gone, "reason": "keyCompromise"})
        # A user whose name is markup, who then acts (a renewal: its subject is in the
        # actor of the audit line).
        script_cert, script_key = enroll(d, tmp, "user", [SCRIPT_NAME])
        hsmca("renew", "--url", d.url, "--ca", d.root, "--cert", script_cert, "--key",
              script_key)
        script = cert_serial(script_cert)
        # SSH certificates, for the counts by kind.
        host = enroll(d, tmp, "host", ["web1.ui.example"])
        hsmca("ssh", "host", "--url", d.url, "--ca", d.root, "--cert", host[0], "--key",
              host[1], "--pubkey", _ssh_pubkey(tmp / "host_key.pub"))
        alice = enroll(d, tmp, "user", ["alice@ui.example"], ["alice"])
        hsmca("ssh", "user", "--url", d.url, "--ca", d.root, "--cert", alice[0], "--key",
              alice[1], "--pubkey", _ssh_pubkey(tmp / "alice.pub"), "--ttl", "1h")
        shown = subprocess.run([require("ssh-keygen"), "-L", "-f", tmp / "alice-cert.pub"],
                               capture_output=True, text=True, check=True).stdout
        alice_ssh = re.search(r"Serial: (\d+)", shown)[1]  # type: ignore[index]
        state = tmp / "auditor.state"
        ui = Running.start("ui", "--url", d.url, "--ca", d.root, "--cert", auditor[0],
                           "--key", auditor[1], "--audit-key",
                           ca.state / "audit" / "audit_key.pem", "--state", state,
                           "--witness-key", witness.vkey, "--listen", "127.0.0.1:0")
        base = ui.listening_url()
        driver = _browser(tmp / "profile")
        shots = tmp / "shots"
        shots.mkdir()
        yield World(ca.state, d, port, ui, witness, base, state, auditor, web, renewed, gone,
                    script, cert_serial(alice[0]), alice_ssh, shots, driver)
    finally:
        if driver is not None:
            driver.quit()
        if ui is not None:
            ui.stop()
        for daemon in daemons:
            daemon.stop()
        for daemon in world_daemon:
            daemon.stop()
        world_daemon.clear()
        witness.run.stop()


world_daemon: list[Daemon] = []  # a daemon the last test restarts, stopped by the fixture


def page(w: World, path: str) -> None:
    w.driver.get(w.base + path)
    WebDriverWait(w.driver, 60).until(
        lambda drv: drv.execute_script("return document.readyState") == "complete")


def shown_at(w: World, url: str) -> tuple[str, str]:
    """The banner of the page at `url` (of any UI), once loaded."""
    w.driver.get(url)
    WebDriverWait(w.driver, 60).until(
        lambda drv: drv.execute_script("return document.readyState") == "complete")
    return banner(w)


def banner(w: World) -> tuple[str, str]:
    box = w.driver.find_element(By.ID, "verdict")
    return box.get_attribute("data-status") or "", w.driver.find_element(
        By.ID, "verdict-banner").text


def console_errors(w: World) -> list[str]:
    return [e["message"] for e in w.driver.get_log("browser") if e["level"] == "SEVERE"]


def screenshot(w: World, name: str, width: int = 1280) -> Path:
    """The whole page at `width` CSS pixels, also kept in $HSMCA_UI_SCREENSHOTS."""
    drv = w.driver
    drv.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": 900, "deviceScaleFactor": 1, "mobile": width < 600})
    try:
        height = int(drv.execute_script("return document.documentElement.scrollHeight"))
        shot = drv.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": min(height, 3200), "scale": 1}})
    finally:
        drv.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    path = w.shots / f"{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    keep = os.environ.get("HSMCA_UI_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / path.name)
    return path


def test_every_page_is_green_on_a_good_log_without_console_errors(world: World) -> None:
    w = world
    intent = next(e for e in log_lines(w.ca_state) if e.get("serial") == w.gone
                  and e.get("phase") == "intent")
    # The witness cosigns each checkpoint the daemon pushes, in the background: wait until
    # the UI counts its cosignature (on a checkpoint consistent with what it verified).
    w.witness.run.wait("cosigned")

    def witnessed(drv: WebDriver) -> bool:
        page(w, "/")
        return banner(w)[1].endswith(", 1 witness")

    WebDriverWait(w.driver, 60, poll_frequency=0.5).until(witnessed)
    pages = [("overview", "/"), ("certificates", "/certificates"),
             ("certificate", f"/certificates/{w.renewed}"), ("audit", "/audit"),
             ("audit-line", f"/audit/{intent['seq']}"), ("keys", "/keys"), ("ssh", "/ssh")]
    for name, path in pages:
        page(w, path)
        status, text = banner(w)
        assert status == "ok" and text.startswith("verified up to seq "), (path, text)
        assert ", checkpoint " in text and text.endswith(" witness"), text
        assert console_errors(w) == [], path
        assert screenshot(w, name).stat().st_size > 15_000, f"{path} looks blank"
    for name, path in pages:  # at phone width, nothing runs off the side of any page
        page(w, path)
        if name in ("overview", "certificate", "audit"):
            screenshot(w, f"{name}-390", 390)
        w.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
        try:
            wide = w.driver.execute_script("return document.documentElement.scrollWidth")
        finally:
            w.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        assert wide <= 390, (path, wide)
    assert console_errors(w) == []
    # For the keyboard and screen readers (a web view trial): the list says which column
    # it is sorted by, and which way; the first tab stop skips to the content; the
    # banner is a stop only where it does something (with JavaScript, as here)
    page(w, "/certificates?sort=serial&order=asc")
    heads = {th.text.split(" ")[0]: th.get_attribute("aria-sort")
             for th in w.driver.find_elements(By.CSS_SELECTOR, "table.list th")}
    assert heads["Serial"] == "ascending" and heads["Issued"] is None, heads
    first = w.driver.find_element(By.CSS_SELECTOR, "body > a")
    assert first.get_attribute("class") == "skip" and first.get_attribute("href").endswith(
        "#main"), first.get_attribute("outerHTML")
    assert w.driver.find_element(By.ID, "verdict").get_attribute("tabindex") == "0"


def test_a_certificate_found_by_name_shows_its_verified_inclusion_proof(world: World) -> None:
    w = world
    page(w, "/certificates")
    w.driver.find_element(By.NAME, "q").send_keys("web.ui.example" + Keys.RETURN)
    WebDriverWait(w.driver, 60).until(lambda drv: "q=web.ui.example" in drv.current_url)
    serials = [a.text for a in w.driver.find_elements(
        By.CSS_SELECTOR, "table.list td[data-label='Serial'] a.serial")]
    assert sorted(serials) == sorted([w.web, w.renewed])
    lineage = w.driver.find_elements(By.CSS_SELECTOR, "td[data-label='Lineage'] a")
    # The renewal names what it renewed.
    assert [a.get_attribute("title") for a in lineage] == [w.web]
    assert lineage[0].find_element(By.XPATH, "..").text.startswith("renews ")
    w.driver.find_element(By.CSS_SELECTOR, f"a.serial[href='/certificates/{w.renewed}']").click()
    WebDriverWait(w.driver, 60).until(lambda drv: drv.current_url.endswith(w.renewed))
    audit = w.driver.find_element(By.XPATH, "//h2[.='In the audit log']/..").text
    assert "✓ the intent and outcome of this certificate's signature are lines of the log " \
           "you verified" in audit
    assert f"is an hsm.sign intent for serial {w.renewed}" in audit
    assert "✓ the outcome's fingerprint is this certificate's SHA-256" in audit
    for what in ("names", "public key", "notAfter"):
        assert f"✓ the intent's {what} is the certificate's" in audit \
            or f"✓ the intent's {what} are the certificate's" in audit, (what, audit)
    proof = w.driver.find_element(By.CSS_SELECTOR, "details[open] dl.kv").text
    assert "✓ verified: leaf " in proof and " of the tree of " in proof
    chain = w.driver.find_element(By.CSS_SELECTOR, "ol.chain").text
    assert chain.count("✓") == 3 and "the root you pinned (--ca)" in chain
    assert console_errors(w) == []


def test_ssh_certificates_are_found_by_principal_and_lead_to_who_asked(world: World) -> None:
    w = world
    # A search of the X.509 certificates says that SSH certificates match it too.
    page(w, "/certificates?q=alice")
    w.driver.find_element(By.PARTIAL_LINK_TEXT, "1 SSH certificate matches too").click()
    WebDriverWait(w.driver, 60).until(lambda drv: "/ssh?q=alice" in drv.current_url)
    rows = w.driver.find_elements(By.CSS_SELECTOR, "table.list tbody tr")
    assert len(rows) == 1, [r.text for r in rows]
    cells = {c.get_attribute("data-label"): c.text for c in
             rows[0].find_elements(By.TAG_NAME, "td")}
    assert cells["Serial"] == w.alice_ssh and cells["Type"] == "user"
    assert "principals: alice" in cells["Key id"] and cells["Status"] == "valid"
    page(w, "/ssh?type=host")
    hosts = [c.text for c in w.driver.find_elements(By.CSS_SELECTOR, "td[data-label='Key id']")]
    assert len(hosts) == 1 and "principals: web1.ui.example" in hosts[0], hosts
    page(w, "/ssh?q=alice")
    # The list's download is the search's rows (docs said every list had one; the SSH
    # list had none).
    link = w.driver.find_element(By.PARTIAL_LINK_TEXT, "Download CSV").get_attribute("href")
    assert link.endswith("/ssh.csv?q=alice"), link
    with urllib.request.urlopen(link, timeout=60) as answer:
        assert "ssh-certificates-" in answer.headers["Content-Disposition"]
        rows = list(csv.DictReader(io.StringIO(answer.read().decode())))
    assert [(r["serial"], r["type"], r["principals"], r["owner_serial"]) for r in rows] == [
        (w.alice_ssh, "user", "alice", w.alice)], rows
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(w.base + "/ssh.csv?type=xx", timeout=60)
    assert refused.value.code == 400 and "this search cannot be made: " in \
        refused.value.read().decode()
    w.driver.find_element(By.CSS_SELECTOR, "td[data-label='Asked for by'] a").click()
    WebDriverWait(w.driver, 60).until(lambda drv: drv.current_url.endswith(w.alice))
    assert "alice@ui.example" in w.driver.find_element(By.TAG_NAME, "main").text
    # And back: the X.509 certificate's page counts the SSH certificates it asked for,
    # which revoking it revokes too (its page said nothing of them).
    w.driver.find_element(By.PARTIAL_LINK_TEXT, "1 asked for with it").click()
    WebDriverWait(w.driver, 60).until(lambda drv: f"/ssh?owner={w.alice}" in drv.current_url)
    serials = [c.text for c in w.driver.find_elements(By.CSS_SELECTOR, "td[data-label='Serial']")]
    assert serials == [w.alice_ssh], serials
    assert console_errors(w) == []


def test_a_revoked_certificate_shows_its_reason_everywhere(world: World) -> None:
    w = world
    page(w, f"/certificates/{w.gone}")
    text = w.driver.find_element(By.TAG_NAME, "main").text
    assert text.count("keyCompromise") >= 3, text  # the inventory, the CRL and OCSP
    assert "CRL: revoked" in text and "OCSP: revoked" in text
    assert text.count("✓ signed by the certificate's issuer") == 2
    # Who revoked it and why, by its line of the verified log (a web trial found only
    # the issuance's lines: nothing said who, and a rewritten reason went unseen).
    line = next(e for e in log_lines(w.ca_state) if e["event"] == "cert.revoke"
                and w.gone in e["serials"])
    audit = w.driver.find_element(By.XPATH, "//h2[.='In the audit log']/..").text
    assert f"Revocation: seq {line['seq']}" in audit, audit
    assert "✓ revoked by cert:" in audit and "CN=admin." in audit, audit
    assert f"✓ line {line['seq']} is a cert.revoke naming serial {w.gone}" in audit
    assert "✓ its reason is the inventory's (keyCompromise)" in audit, audit
    # The serial as the CLI takes it (openssl's colon form, 0x, leading zeros) leads to
    # the same page, under the serial as hsmca prints it (a web trial got 404s).
    padded = w.gone.rjust(40, "0")
    for asked in (":".join(padded[i:i + 2] for i in range(0, 40, 2)), "0x" + w.gone.upper(),
                  padded):
        page(w, f"/certificates/{asked}")
        assert w.driver.current_url == f"{w.base}/certificates/{w.gone}", asked
        assert w.driver.find_element(By.TAG_NAME, "h1").text == f"Certificate {w.gone}"
    page(w, "/certificates?status=revoked")
    reasons = [r.text for r in w.driver.find_elements(By.CSS_SELECTOR, "td .reason")]
    assert reasons == ["keyCompromise"]
    screenshot(w, "revoked")


def test_a_script_name_is_shown_as_text(world: World) -> None:
    w = world
    for path in ("/certificates?q=script", f"/certificates/{w.script}", "/audit?actor=script"):
        page(w, path)
        assert SCRIPT_NAME in w.driver.find_element(By.TAG_NAME, "main").text, path
        with pytest.raises(NoAlertPresentException):
            _ = w.driver.switch_to.alert.text
        # The page's only script is the packaged one; the name added none.
        sources = w.driver.execute_script(
            "return Array.from(document.scripts).map(s => s.getAttribute('src'))")
        assert sources == ["/static/ui.js"], path
        assert console_errors(w) == [], path


def test_a_banner_no_longer_checked_turns_grey_and_says_since_when(world: World) -> None:
    """The view's own server gone, an open page kept its green banner for good (an
    auditor trial: `.catch(function(){ /* keep what is shown */ })`). Now the next
    check that gets no answer turns it grey, saying since when; a click checks at
    once (here with the page's fetch made to fail, as a dead server makes it)."""
    w = world
    page(w, "/")
    assert banner(w)[0] == "ok"
    w.driver.execute_script(
        "window.fetch = function () { return Promise.reject(new TypeError('gone')); };")
    w.driver.find_element(By.ID, "verdict").click()
    WebDriverWait(w.driver, 30).until(lambda drv: banner(w)[0] == "unknown")
    said = w.driver.find_element(By.ID, "verdict-detail").text
    assert said.startswith("not checked since ") and "verified up to seq " in said, said
    # the live region says it too: a screen reader heard nothing, and the banner still
    # read "verified" (a web view trial)
    assert w.driver.find_element(By.ID, "verdict-banner").text == \
        "NOT CHECKED: hsmca ui does not answer"
    # The keyboard does the same (a web trial: the banner could not be reached without
    # a mouse): focused with Tab, checked again with Enter.
    page(w, "/")
    assert banner(w)[0] == "ok"
    w.driver.execute_script(
        "window.fetch = function () { return Promise.reject(new TypeError('gone')); };")
    w.driver.find_element(By.ID, "verdict").send_keys(Keys.ENTER)
    WebDriverWait(w.driver, 30).until(lambda drv: banner(w)[0] == "unknown")


def test_strict_headers_and_only_loopback_host_names(world: World) -> None:
    with urllib.request.urlopen(world.base + "/", timeout=60) as answer:
        csp = answer.headers["Content-Security-Policy"]
        assert answer.headers["Cache-Control"] == "no-store"
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    rebound = urllib.request.Request(world.base + "/", headers={"Host": "evil.example"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(rebound, timeout=60)
    assert refused.value.code == 421
    # A digit only to str.isdigit() is not a line number (it was a 500).
    with pytest.raises(urllib.error.HTTPError) as superscript:
        urllib.request.urlopen(world.base + "/audit/%C2%B2", timeout=60)
    assert superscript.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as not_a_seq:  # said, not the first page
        urllib.request.urlopen(world.base + "/audit/go?seq=%C2%B2", timeout=60)
    assert not_a_seq.value.code == 400
    with urllib.request.urlopen(world.base + "/certificates.csv?q=script", timeout=60) as csv:
        rows = csv.read().decode().splitlines()
    assert rows[0].startswith("serial,status,reason") and len(rows) == 3  # it and its renewal
    assert all(SCRIPT_NAME in row for row in rows[1:])
    # A search the daemon refuses is the page's 400, in the daemon's words without the
    # API's address; a page past the last leads to the last (a web trial got 200 with
    # the API's URL, and "page 99999 of 1 ... No certificate matches").
    for path in ("/certificates?status=bogus", "/ssh?type=xx"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(world.base + path, timeout=60)
        text = refused.value.read().decode()
        assert refused.value.code == 400 and "this search cannot be made: " in text, path
        assert "/v1/inventory" not in text, text
    with urllib.request.urlopen(world.base + "/certificates?q=ui.example&page=99999",
                                timeout=60) as last:
        assert last.url.endswith("/certificates?q=ui.example&page=1"), last.url
        assert "No certificate matches" not in last.read().decode()


def test_a_line_withheld_or_changed_inside_the_verified_log_turns_the_banner_red(
        world: World, tmp_path: Path) -> None:
    """The daemon (here a lying front before it) serves the log the auditor verified,
    then, page by page, leaves a line out of a list or changes the one a page shows:
    a page never says "no such line" or quietly marks rows unverified under a green
    banner; the view fails, at that seq, for good."""
    w = world
    victim = next(e["seq"] for e in log_lines(w.ca_state) if e.get("serial") == w.web
                  and e.get("phase") == "intent")
    # The front holds the daemon's own TLS key (and serves its chain): at a loopback
    # address the view talks only to a server that proves it is the CA's.
    front = LyingFront(w.daemon.url, w.daemon.root, w.auditor,
                       (w.ca_state / "tls" / "server.pem", w.ca_state / "tls" / "server.key"))
    try:
        for lie, path in (("drop", f"/audit?event=hsm.sign&before={victim + 5}"),
                          ("drop", f"/audit/{victim}"), ("alter", f"/audit/{victim}")):
            front.drop = front.alter = None
            ui = Running.start("ui", "--url", front.url, "--ca", w.daemon.root, "--cert",
                               w.auditor[0], "--key", w.auditor[1], "--audit-key",
                               w.ca_state / "audit" / "audit_key.pem", "--state",
                               tmp_path / f"{lie}-{len(path)}.state", "--listen", "127.0.0.1:0")
            try:
                base = ui.listening_url()
                WebDriverWait(w.driver, 60, poll_frequency=0.5).until(
                    lambda drv, base=base: shown_at(w, base + "/")[0] == "ok")
                setattr(front, lie, victim)
                status, text = shown_at(w, base + path)
                assert status == "failed", (lie, path, text)
                assert text.startswith(f"FAILED at seq {victim}: "), text
                if path.startswith("/audit/") and lie == "drop":  # not "no line (yet)"
                    said = w.driver.find_element(By.TAG_NAME, "main").text
                    assert "it is withholding a line of its log" in said, said
                front.drop = front.alter = None  # honest again: the failure stands
                assert shown_at(w, base + "/")[0] == "failed"
            finally:
                ui.stop()
    finally:
        front.close()


def test_one_line_changed_is_the_one_row_marked_not_every_row_below_it(
        world: World, tmp_path: Path) -> None:
    """A web trial changed one line and the page of the 50 lines ending at it marked all
    50 not verified (one proof for the page, which failed), while each of the others,
    opened alone, was verified."""
    w = world
    victim = next(e["seq"] for e in log_lines(w.ca_state) if e.get("serial") == w.web
                  and e.get("phase") == "intent")
    front = LyingFront(w.daemon.url, w.daemon.root, w.auditor,
                       (w.ca_state / "tls" / "server.pem", w.ca_state / "tls" / "server.key"))
    ui = None
    try:
        ui = Running.start("ui", "--url", front.url, "--ca", w.daemon.root, "--cert",
                           w.auditor[0], "--key", w.auditor[1], "--audit-key",
                           w.ca_state / "audit" / "audit_key.pem", "--state",
                           tmp_path / "one.state", "--listen", "127.0.0.1:0")
        base = ui.listening_url()
        WebDriverWait(w.driver, 60, poll_frequency=0.5).until(
            lambda drv: shown_at(w, base + "/")[0] == "ok")
        front.alter = victim
        shown_at(w, base + f"/audit?before={victim + 3}")
        rows = {int(r.find_element(By.CSS_SELECTOR, "td[data-label=Seq]").text):
                r.find_element(By.CSS_SELECTOR, "td[data-label=Verified]").text
                for r in w.driver.find_elements(By.CSS_SELECTOR, "table.log tbody tr")}
        assert rows[victim] == "✗ not verified", rows
        others = {seq: mark for seq, mark in rows.items() if seq != victim}
        assert len(others) >= 10 and set(others.values()) == {"✓ verified"}, rows
    finally:
        if ui is not None:
            ui.stop()
        front.close()


def test_a_rewritten_log_turns_the_banner_red_at_the_seq_the_state_names(world: World) -> None:
    w = world
    assert w.daemon.stop() == 0
    # The UI cannot reach the daemon: its state stays as it was, and the banner says
    # it is not checked now (a web trial's stayed green, its "checked" time moving on).

    def unchecked(drv: WebDriver) -> bool:
        page(w, "/")
        return banner(w)[0] == "stale"

    WebDriverWait(w.driver, 60, poll_frequency=1).until(unchecked)
    _, text = banner(w)
    assert text.startswith("NOT CHECKED since ") and "the daemon could not be asked" in \
        text and "verified then up to seq " in text, text
    page(w, "/")
    assert banner(w) == ("stale", text)  # the time of the last check, not of this page
    saved = json.loads(w.state.read_text())
    victim = next(e for e in log_lines(w.ca_state) if e.get("serial") == w.web
                  and e.get("phase") == "intent")
    assert victim["seq"] < saved["size"]  # the auditor verified it
    rewrite_line(w.ca_state / "audit" / "log.jsonl", victim["seq"],
                 {"names": ["innocent.ui.example"]})
    (w.ca_state / "audit" / "checkpoint").unlink()
    signer = subprocess.run([sys.executable, "-c", _ATTACKER_SIGNS,
                             w.ca_state / "hsmca.toml"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert signer.returncode == 0, signer.stderr
    # The daemon comes back where the UI looks for it, and accepts "its" log.
    world_daemon.append(start_daemon(w.ca_state, "--listen", f"127.0.0.1:{w.port}"))

    def red(drv: WebDriver) -> bool:
        page(w, "/")
        return banner(w)[0] == "failed"

    WebDriverWait(w.driver, 120, poll_frequency=1).until(red)
    _, text = banner(w)
    # Whichever sees it first: the follower's run, which names the span the change is
    # in, the victim among it (it named the last line verified: a review), or the page
    # proving the last line verified (which the daemon's log no longer holds as it was).
    span = re.search(r"^FAILED at seq \d+: the log was cut or rewritten since it was "
                     r"verified last time: .* a line from seq (\d+) to (\d+) was altered", text)
    assert (span and int(span[1]) <= victim["seq"] <= int(span[2])) or text.startswith(
        f"FAILED at seq {saved['size'] - 1}: this line and its inclusion proof, as the "
        "daemon served them, do not lead to the verified root"), text
    assert json.loads(w.state.read_text()) == saved  # a failed run saves nothing
    screenshot(w, "failed")
    # The card of the verified checkpoint gives its root as its note writes it, and no
    # time read from the rewritten log's line (an auditor trial saw the forged one's)
    card = w.driver.find_element(By.XPATH, "//h2[.='Latest checkpoint you verified']/..").text
    assert saved["checkpoint"].split("\n")[2] in card, card
    assert "✗ not shown: the line the daemon serves" in card and "written until" not in card
    # Nothing the daemon now serves is shown as verified: its proofs no longer lead to
    # the root the auditor verified.
    page(w, "/audit")
    marks = [e.text for e in w.driver.find_elements(By.CSS_SELECTOR, "table.log td:last-child")]
    assert marks and not any("✓" in m for m in marks)
    # and the lines after the verified ones are not "not yet covered", as if they would be
    # (a web view trial), nor is the rewrite's checkpoint left at its signature's ✓
    assert not any("not yet covered" in m for m in marks), marks
    assert any("not covered: the log failed verification" in m for m in marks), marks
    newest = int(w.driver.find_element(By.CSS_SELECTOR, "table.log tbody tr td").text)
    checkpoint = next(e for e in reversed(log_lines(w.ca_state))
                      if e.get("event") == "hsm.sign" and e.get("phase") == "outcome"
                      and "checkpoint" in e and e["seq"] <= newest)
    page(w, f"/audit/{checkpoint['seq']}")
    assert "but the log failed verification: this checkpoint covers lines you cannot " \
        "verify" in w.driver.find_element(By.TAG_NAME, "main").text
    page(w, f"/certificates/{w.renewed}")
    assert banner(w)[0] == "failed"
    audit = w.driver.find_element(By.XPATH, "//h2[.='In the audit log']/..").text
    assert "✗ not fully verified" in audit

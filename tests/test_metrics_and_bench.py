"""/metrics parses as Prometheus text and moves when certificates are issued; the
benchmark still runs (tiny N: it is not a timing test)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from ca.issuance.pipeline import SigningPipeline
from tests.conftest import Daemon
from tests.helpers import bootstrap_token, csr_pem, http, metric_samples

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.asyncio(loop_scope="session")
async def test_metrics_move_when_certificates_are_issued(daemon: Daemon) -> None:
    status, ctype, raw = await http("GET", f"{daemon.url}/metrics", daemon.ssl())
    assert status == 200 and ctype == "text/plain"
    before = metric_samples(raw.decode())
    issued_key = ("hsmca_issued_total", (("kind", "x509"), ("result", "ok")))
    for _ in range(3):
        token = await bootstrap_token(daemon, "service", ["metrics.internal.example"])
        status, _, raw = await http("POST", f"{daemon.url}/v1/x509/enroll", daemon.ssl(),
                                    body={"csr": csr_pem(["metrics.internal.example"])},
                                    headers={"Authorization": f"Bearer {token}"})
        assert status == 201
    # One of them revoked, as a leak is handled: counted by kind and reason
    status, _, _ = await http("POST", f"{daemon.url}/v1/x509/revoke", daemon.admin_ssl(),
                              body={"serial": json.loads(raw)["serial"],
                                    "reason": "keyCompromise"})
    assert status == 200
    _, _, raw = await http("GET", f"{daemon.url}/metrics", daemon.ssl())
    after = metric_samples(raw.decode())
    assert after[issued_key] - before.get(issued_key, 0) == 3
    revoked = ("hsmca_revoked_total", (("kind", "x509"), ("reason", "keyCompromise")))
    assert after[revoked] - before.get(revoked, 0) == 1
    route = ("hsmca_http_request_seconds_count", (("route", "/v1/x509/enroll"),))
    assert after[route] - before.get(route, 0) == 3
    assert after[("hsmca_audit_commit_seconds_count", ())] > before[
        ("hsmca_audit_commit_seconds_count", ())]
    for part in ("hsm", "audit", "store"):
        assert after[("hsmca_up", (("part", part),))] == 1, part
    # the lowest over every process's session, the primary's included (it read 0 on a
    # healthy daemon: a docs trial)
    assert before[("hsmca_hsm_up", ())] == after[("hsmca_hsm_up", ())] == 1
    # The HSM's own count of C_Sign calls: one per certificate, and the daemon's own
    # signatures (OCSP responses for the new certificates, checkpoints) on top.
    calls = ("hsmca_hsm_sign_calls_total", ())
    assert after[calls] - before[calls] >= 3
    for name in ("hsmca_hsm_call_seconds_count", "hsmca_audit_batch_lines_count",
                 "hsmca_hsm_reconnects_total"):
        assert (name, ()) in after, name
    # The primary's signatures count too (its checkpoints, one before anyone could
    # connect, and the OCSP responses): they were two thirds of the HSM's work, missing
    # from these (an operator's trial).
    assert after[("hsmca_issued_total", (("kind", "checkpoint"), ("result", "ok")))] >= 1
    assert after[("hsmca_hsm_signatures_total", ())] >= after[issued_key] + 1

    # What an operator's dashboards and alerts need from the first scrape on: the
    # release, the start (a restart is a new start time, not just counters at zero),
    # and each kind of certificate's series, at zero until the first.
    from ca import __version__
    assert before[("hsmca_build_info", (("version", __version__),))] == 1
    started = before[("hsmca_start_time_seconds", ())]
    assert started == after[("hsmca_start_time_seconds", ())] and 1.7e9 < started <= time.time()
    for kind in ("x509", "ssh-user", "ssh-host"):
        assert ("hsmca_issued_total", (("kind", kind), ("result", "ok"))) in before, kind
    # When what relying parties hold ends: each signing issuer's CRL (the issuing CA's,
    # the root's), and when the OCSP refresher last had nothing due (an SRE trial found
    # no signal of a coming CRL or OCSP expiry).
    deadline = time.monotonic() + 60  # read by the primary's CRL round, first at start
    while True:
        crls = {dict(labels)["issuer"]: value for (name, labels), value in after.items()
                if name == "hsmca_crl_next_update_timestamp_seconds"}
        if ({"issuing-ca", "root-ca"} <= set(crls) and (
                "hsmca_ocsp_current_timestamp_seconds", ()) in after) \
                or time.monotonic() > deadline:
            break
        after = metric_samples((await http("GET", f"{daemon.url}/metrics", daemon.ssl()))[2]
                               .decode())
    assert {"issuing-ca", "root-ca"} <= set(crls) and all(
        time.time() + 12 * 3600 < v <= time.time() + 25 * 3600 for v in crls.values()), crls
    assert started <= after[("hsmca_ocsp_current_timestamp_seconds", ())] <= time.time() + 1
    # Refused handshakes too: an alert on their increase missed the first refusals
    # after each start, the series starting at 1 (an SRE trial).
    for reason in ("client-certificate", "server-certificate", "not-tls", "protocol",
                   "other"):
        assert ("hsmca_tls_handshakes_refused_total", (("reason", reason),)) in before, \
            reason


async def test_every_metric_the_operator_guide_names_is_served_and_every_one_served_named(
        daemon: Daemon) -> None:
    """The metrics table and the alerting rules of docs/operator.md name what /metrics
    has, and nothing /metrics has is left out of them (the witnesses' series appear
    with witnesses configured, which this daemon has not)."""
    import re

    from prometheus_client.parser import text_string_to_metric_families
    await http("GET", f"{daemon.url}/health", daemon.ssl())  # the requests' series
    status, _, raw = await http("GET", f"{daemon.url}/metrics", daemon.ssl())
    assert status == 200
    served = {f.name + ("_total" if f.type == "counter" else "")
              for f in text_string_to_metric_families(raw.decode())}
    guide = (ROOT / "docs" / "operator.md").read_text()
    named = {re.sub(r"_(bucket|count|sum)$", "", n)
             for n in re.findall(r"\bhsmca_[a-z0-9_]*[a-z0-9]", guide)}
    named = {n for n in named if not n.startswith("hsmca_witness")}
    assert named - served == set(), named - served
    assert served - named == set(), served - named


async def test_the_hsm_queue_depth_is_set_by_the_signing_thread_as_it_works(
        worker: SigningPipeline) -> None:
    """hsmca_hsm_queue_depth was set by the worker that answered a scrape, for itself:
    the other workers' values stayed as their last scrape left them, and a scraper on
    one kept-alive connection read 3 long after every queue was empty (an SRE trial).
    Each signing thread now reports its backlog as each round starts and ends."""
    seen: list[int] = []
    worker.on_backlog = seen.append
    try:
        key = await worker.generate_key("lab-backlog", "ec-p256")
        await asyncio.gather(*(worker.sign(key.label, lambda k: k.sign(
            b"queued", ec.ECDSA(hashes.SHA256())), purpose="x509", actor="local")
            for _ in range(8)))
        # Reported before the results of the round go out: nothing waits by now.
        assert seen and max(seen) >= 1 and seen[-1] == 0, seen
    finally:
        worker.on_backlog = None


def test_benchmark_runs_and_reports_every_figure(tmp_path: Path) -> None:
    # No peers there: the step-ca comparison is skipped, and says how to get it.
    proc = subprocess.run([sys.executable, ROOT / "scripts" / "bench", "--n", "40",
                           "--concurrency", "4", "--verify-lines", "2000",
                           "--peers", tmp_path / "no-peers"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout)
    for key in ("hsm_sign_per_s", "x509_issue_per_s", "p50_ms", "p99_ms", "ssh_issue_per_s",
                "issue_vs_hsm", "audit_verify_lines_per_s", "verify_vs_sha256",
                "http_floor_per_s", "issue_vs_http_floor", "rss_mb",
                "x509_daemon_cpu_ms_per_issue", "x509_loadgen_cpu_ms_per_issue"):
        assert figures[key] > 0, key
    assert figures["vs_step_ca"].startswith("not measured: no peers in "), figures["vs_step_ca"]
    assert "setup-peers.sh" in figures["vs_step_ca"]


def test_every_documented_quantile_alert_can_fire() -> None:
    """An SRE trial: HsmcaAuditCommitsSlow, p99 of hsmca_audit_commit_seconds > 0.25,
    could never fire: 0.25 was the highest finite bucket, and PromQL's
    histogram_quantile answers a quantile in the +Inf bucket with that bound. Each
    documented quantile alert's threshold lies below its histogram's highest finite
    bucket, as the daemon serves it."""
    import re

    from ca.metrics import AuditMetrics, Metrics
    rules = re.findall(r"histogram_quantile\([\d.]+, rate\((\w+)_bucket\[\w+\]\)\) > ([\d.]+)",
                       (Path(__file__).parent.parent / "docs/operator.md").read_text())
    assert rules, "the docs' quantile alerts"
    served = [*vars(Metrics()).values(), *vars(AuditMetrics()).values()]
    for name, threshold in rules:
        [histogram] = [m for m in served if getattr(m, "_name", None) == name]
        assert max(b for b in histogram._upper_bounds if b != float("inf")) > float(threshold), \
            (name, threshold)

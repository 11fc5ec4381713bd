"""Prometheus metrics, summed over the daemon's processes.

Every process (the primary and each worker) writes its counters and histograms to
memory-mapped files in a directory of the run's own in /dev/shm, else in
`state-dir/run/metrics` (see `prepare`; prometheus-client's multiprocess mode);
whichever worker answers `/metrics` reads them all, so a scrape sees the whole daemon,
not the share of the worker it reached, and the totals survive a worker's restart.
`prepare` must run before prometheus_client is first imported: it picks the storage
of every metric at import.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# The reasons of hsmca_tls_handshakes_refused_total (ca/server/app.py `_kind`).
TLS_REFUSALS = ("client-certificate", "server-certificate", "not-tls", "protocol", "other")
# Up to 5 s: a quantile in the +Inf bucket is read as the highest finite bound, so an
# alert on "p99 > 0.25" could never fire while 0.25 was the last (an SRE trial).
FAST_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25,
                1.0, 5.0)


def prepare(state_dir: Path) -> Path:
    """An empty directory for this run's metric files (a new run starts from zero),
    named in the environment that the workers inherit.

    In memory (/dev/shm) where there is one, not on the state directory's disk: the
    files are memory-mapped and grow as new label values appear (a route's first
    503), and a page the disk has no room for kills the process with SIGBUS. A full
    state disk must give 503s and a /health that says why, not dead workers. Where
    the last run's directory was is kept in run/metrics-dir, to remove it; directories
    of runs whose primary is gone (its pid in each) are removed by any start."""
    run = state_dir / "run"
    run.mkdir(mode=0o700, parents=True, exist_ok=True)
    run.chmod(0o700)  # as docs/operator.md says, whatever the umask or an older start made
    pointer = run / "metrics-dir"
    _remove_previous(pointer)
    shutil.rmtree(run / "metrics", ignore_errors=True)
    directory: Path | None = None
    if os.access(SHM, os.W_OK):
        _sweep_orphans()
        try:
            directory = Path(tempfile.mkdtemp(prefix=PREFIX, dir=SHM))
            (directory / OWNER).write_text(f"{os.getpid()}\n")
        except OSError:
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)
            directory = None
    if directory is not None:
        try:
            pointer.write_text(f"{directory}\n")
        except OSError:
            # A full state disk: the directory stays in memory all the same (a later
            # start sweeps it once its owner is gone). Falling back to the full disk
            # killed the start with SIGBUS at the first metric (a disaster trial).
            pass
    else:
        directory = run / "metrics"
        directory.mkdir(mode=0o700)
        _room_for_metrics(directory)
    os.environ[ENV] = str(directory)
    return directory


# What prometheus-client maps for each process's first file, and some more: a page it
# maps and the disk cannot hold kills the process with SIGBUS, without a word.
METRICS_ROOM = 16 << 20


def _room_for_metrics(directory: Path) -> None:
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if free < METRICS_ROOM:
        raise OSError(errno.ENOSPC, f"the disk of {directory} has {free >> 20} MiB free, "
                      f"less than the {METRICS_ROOM >> 20} MiB the metrics files need (/dev/shm "
                      "is not writable here, where they go otherwise): make room on it")


SHM = "/dev/shm"
PREFIX = "hsmca-metrics-"
OWNER = "owner"  # the pid of the primary whose run it is


def _sweep_orphans() -> None:
    """Directories of runs whose primary is gone and whose state directory never started
    again (killed, then the state directory deleted: a test, a drill): ours only."""
    for path in Path(SHM).glob(PREFIX + "*"):
        try:
            st = path.lstat()
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
                continue
            os.kill(int((path / OWNER).read_text()), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (OSError, ValueError):
            continue  # no owner said yet (being made), or one we may not ask: kept


def release(state_dir: Path) -> None:
    """At a stop: the run's directory in /dev/shm goes (memory, not disk)."""
    _remove_previous(state_dir / "run" / "metrics-dir")


def _remove_previous(pointer: Path) -> None:
    """The last run's directory in /dev/shm, if it is still there and still ours."""
    try:
        previous = Path(pointer.read_text().strip())
        pointer.unlink()
    except (OSError, ValueError):
        return
    try:
        st = previous.lstat()
    except OSError:
        return
    if (previous.parent == Path(SHM) and previous.name.startswith(PREFIX)
            and stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()):
        shutil.rmtree(previous, ignore_errors=True)


def process_exited(pid: int) -> None:
    """Drop the live gauges of a worker that exited (its counters are kept)."""
    from prometheus_client import multiprocess
    if os.environ.get(ENV):
        multiprocess.mark_process_dead(pid)


def count_sign_calls(pipeline: Any) -> None:
    """Export the HSM's own count of C_Sign calls (whatever their result: a signature
    that failed its check, or whose outcome could not be written, counts too) as
    hsmca_hsm_sign_calls_total, summed over the processes that sign. The counter moves
    at each call, on the signing thread, so a scrape sees every C_Sign made before it."""
    from prometheus_client import Counter
    counter = Counter("hsmca_hsm_sign_calls", "C_Sign calls the HSM sessions made, whatever "
                      "their result (the HSM's own count)", registry=None)
    counter.inc(pipeline.hsm.sign_calls)  # exported from the start
    pipeline.hsm.on_sign_call = counter.inc


class AuditMetrics:
    """What the primary measures: the audit log's group commits, what the witnesses
    answered to its checkpoints, and its workers' restarts."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram
        self.commit = Histogram("hsmca_audit_commit_seconds",
                                "Audit group commit (write + fdatasync) latency",
                                buckets=FAST_BUCKETS, registry=None)
        self.batch = Histogram("hsmca_audit_batch_lines", "Lines per audit group commit",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=None)
        self.cosigned = Counter("hsmca_witness_cosigned", "Checkpoints a witness cosigned "
                                "(a file witness: held)", ["witness"], registry=None)
        self.refused = Counter("hsmca_witness_refused", "Checkpoints a witness did not "
                               "cosign, by reason (fork, inconsistent, cut: it saw another "
                               "log; untrusted-key, unknown-log, bad-cosignature: its "
                               "configuration or the CA's; unreachable, error)",
                               ["witness", "reason"], registry=None)
        self.cosigned_size = Gauge("hsmca_witness_last_cosigned_size", "Tree size of the "
                                   "latest checkpoint a witness cosigned", ["witness"],
                                   registry=None, multiprocess_mode="mostrecent")
        # What a relying party holds until: the classic CA outage is an expired CRL or
        # OCSP response, and nothing said one was coming (an SRE trial).
        self.crl_next_update = Gauge(
            "hsmca_crl_next_update_timestamp_seconds", "The nextUpdate of each signing "
            "issuer's CRL in the inventory (Unix time), read every 5 minutes (NaN: the "
            "issuer signs no more): it is re-signed half way, so less than 12 h ahead for "
            "longer than 5 minutes means re-signing fails",
            ["issuer"], registry=None, multiprocess_mode="mostrecent")
        self.ocsp_current = Gauge(
            "hsmca_ocsp_current_timestamp_seconds", "When the OCSP refresher last found "
            "every live certificate's response signed and not due (Unix time; on a "
            "cluster, the node holding the refresh lease): responses are due 12 h before "
            "they expire, so an age of minutes means signing falls behind",
            registry=None, multiprocess_mode="mostrecent")
        self.worker_restarts = Counter(
            "hsmca_worker_restarts", "Worker processes started again, by reason: exited "
            "(it died), unanswered (its event loop stopped answering the primary's pings "
            "and it was killed)", ["reason"], registry=None)
        for reason in ("exited", "unanswered"):
            self.worker_restarts.labels(reason)  # exported from the start, at zero
        # A worker that cannot be started again (a token refusing the PIN to new
        # sessions) left /health and hsmca_hsm_up as they were, since the others still
        # answered (a fault trial): alert on serving < configured.
        self.workers = Gauge("hsmca_workers", "Worker processes the daemon runs when all "
                             "is well ([server] workers)", registry=None,
                             multiprocess_mode="max")
        # What an operator of a CA alerts on first (an operator trial found none): the
        # CA's own certificates' ends; the listener's and the admin's are renewed by the
        # daemon 30 days ahead, so one closer than that means the renewal fails.
        self.not_after = Gauge("hsmca_certificate_not_after_timestamp_seconds",
                               "When the CA's own certificates end (Unix time): root, "
                               "issuing (the current key's), tls (the daemon's listener), "
                               "admin (STATE_DIR/admin/cert.pem)", ["certificate"],
                               registry=None, multiprocess_mode="max")
        self.workers_serving = Gauge("hsmca_workers_serving", "Worker processes started "
                                     "and not exited: fewer than hsmca_workers while one "
                                     "cannot be started again", registry=None,
                                     multiprocess_mode="max")
        self.workers_answering = Gauge(
            "hsmca_workers_answering", "Worker processes serving that answer the primary's "
            "pings: fewer than hsmca_workers_serving while one is stopped or stuck, its "
            "connections hanging until it is killed ([server] worker-timeout-s)",
            registry=None, multiprocess_mode="max")
        # Which release runs, and since when: a restart shows as a new start time, not
        # only as every counter going back to zero.
        from ca import __version__
        Gauge("hsmca_build_info", "The running release, as the label version (value 1)",
              ["version"], registry=None, multiprocess_mode="max").labels(__version__).set(1)
        Gauge("hsmca_start_time_seconds", "When the daemon started, in Unix seconds",
              registry=None, multiprocess_mode="max").set_to_current_time()

    def watch(self, audit: Any) -> None:
        def commit(seconds: float, lines: int) -> None:
            self.commit.observe(seconds)
            self.batch.observe(lines)

        audit.on_commit = commit

    def watch_witnesses(self, witnessing: Any) -> None:
        """Count each witness's answers (ca/audit/witnessing.py). Every series of every
        configured witness is exported from the start, at zero, so that the first
        refusal is an increase to alert on."""
        from ca.audit.witnessing import REASONS
        for witness in witnessing.witnesses:
            name = str(witness)  # as the log lines name it: a URL without its password
            self.cosigned.labels(name).inc(0)
            self.cosigned_size.labels(name).set(0)
            for reason in REASONS:
                self.refused.labels(name, reason).inc(0)

        def result(name: str, outcome: str, size: int) -> None:
            if outcome == "cosigned":
                self.cosigned.labels(name).inc()
                self.cosigned_size.labels(name).set(size)
            else:
                self.refused.labels(name, outcome).inc()

        witnessing.on_result = result


class Metrics:
    """What a worker measures, and the /metrics page of the whole daemon."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.issued = Counter("hsmca_issued", "Signatures asked of the HSM, by kind (x509, "
                              "ssh-user, ssh-host, ocsp, crl, checkpoint, ...) and result: "
                              "ok, or why it failed (failures included)",
                              ["kind", "result"], registry=None)
        self.revoked = Counter("hsmca_revoked", "Certificates revoked, by kind (x509, ssh) "
                               "and reason (RFC 5280's name; an SSH certificate revoked "
                               "by itself: unspecified)", ["kind", "reason"], registry=None)
        self.requests = Counter("hsmca_http_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=None)
        self.latency = Histogram("hsmca_http_request_seconds", "HTTP request latency",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=None)
        self.hsm_call = Histogram("hsmca_hsm_call_seconds", "Time per call on the HSM thread",
                                  buckets=FAST_BUCKETS, registry=None)
        self.reconnects = Counter("hsmca_hsm_reconnects", "HSM session re-opens",
                                  registry=None)
        self.signatures = Counter("hsmca_hsm_signatures", "Signatures made by the HSM",
                                  registry=None)
        # Each worker's own HSM session: the lowest over the live workers is reported.
        self.hsm_up = Gauge("hsmca_hsm_up", "1 if every worker's HSM session works",
                            registry=None, multiprocess_mode="livemin")
        self.tls_refused = Counter("hsmca_tls_handshakes_refused",
                                   "TLS handshakes refused, by reason: client-certificate "
                                   "(one of another CA), server-certificate (the client "
                                   "refused this daemon's), not-tls (plain HTTP, a probe), "
                                   "protocol (TLS 1.1 or older, no shared suite), other",
                                   ["reason"], registry=None)
        for reason in TLS_REFUSALS:
            self.tls_refused.labels(reason)  # exported from the start, at zero
        self.hsm_queue = Gauge("hsmca_hsm_queue_depth", "Jobs waiting for the HSM threads",
                               registry=None, multiprocess_mode="livesum")
        self.connections = Gauge("hsmca_connections_open", "Client connections the workers "
                                 "hold (TLS handshakes under way included)", registry=None,
                                 multiprocess_mode="livesum")
        self.connections_refused = Counter(
            "hsmca_connections_refused", "Client connections closed as soon as accepted, by "
            "reason: per-address ([server] max-connections-per-address), capacity (the "
            "worker's file descriptors), no-descriptors (accept failed)", ["reason"],
            registry=None)
        for reason in ("per-address", "capacity", "no-descriptors"):
            self.connections_refused.labels(reason)  # exported from the start, at zero
        for kind in ("x509", "ssh-user", "ssh-host"):
            self.child(self.issued, kind, "ok")  # exported from the start, at zero

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once: prometheus-client takes a lock and
        validates the labels on every call, and these run on every request."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def watch(self, hsm: Any) -> None:
        """Hook this process's signing thread (ca/issuance/pipeline.py)."""
        hsm.on_call = self.hsm_call.observe

        def signed(purpose: str, result: str) -> None:
            self.child(self.issued, purpose, result).inc()
            if result == "ok":
                self.signatures.inc()

        def health(up: bool) -> None:
            self.hsm_up.set(1 if up else 0)
            if up:
                self.reconnects.inc()

        hsm.on_sign = signed
        hsm.on_health = health
        # Set by each worker's signing thread as its queue changes: set at a scrape, by
        # the worker answering it alone, the sum kept the others' values of their last
        # scrape, and a scraper on one kept-alive connection saw 3 long after the
        # queues were empty (an SRE trial).
        hsm.on_backlog = self.hsm_queue.set
        count_sign_calls(hsm)
        self.hsm_up.set(1 if hsm.healthy else 0)
        self.reconnects.inc(0)  # exported from the start, at zero

    def render(self, hsm: Any, audit: dict[str, Any], store_healthy: bool) -> bytes:
        """The whole daemon's metrics; `audit` is the primary's answer about its log,
        `store_healthy` whether the inventory answered this scrape."""
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess
        # This worker's own queue as of now, on top of what each signing thread says at
        # its rounds: a hung C_Sign ends no round, and its queue grows meanwhile.
        self.hsm_queue.set(hsm.queue_depth)
        families = list(multiprocess.MultiProcessCollector(None).collect())
        # hsmca_up{part="hsm"} is every worker's, as hsmca_hsm_up is: the answering
        # worker's alone flipped with whichever worker a scrape reached, and said 1 in
        # the very second /health said 503 (an operator trial).
        every = [s.value for f in families if f.name == "hsmca_hsm_up" for s in f.samples]
        healthy = hsm.healthy and (min(every) >= 1 if every else True)
        registry = CollectorRegistry()
        registry.register(_Collected(families))
        registry.register(_AuditState(audit, healthy, store_healthy))
        return generate_latest(registry)


class _Collected:
    """Metric families collected already."""

    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> Iterator[Any]:
        return iter(self.families)


class _AuditState:
    """The audit log's state, as the primary reported it for this scrape, the HSM
    sessions and the answering worker's inventory."""

    def __init__(self, audit: dict[str, Any], hsm_healthy: bool, store_healthy: bool) -> None:
        self.audit, self.hsm_healthy, self.store_healthy = audit, hsm_healthy, store_healthy

    def describe(self) -> Iterator[Any]:
        return iter(())

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily
        if "size" in self.audit:  # unknown (the primary did not answer): no sample, not
            # a 0 that reads as a log cut to nothing (an SRE trial)
            yield GaugeMetricFamily("hsmca_audit_lines", "Durable audit log lines",
                                    value=self.audit["size"])
        up = GaugeMetricFamily("hsmca_up", "1 if the part is healthy (hsm: every worker's "
                               "HSM session; audit: the audit log takes lines and "
                               "checkpoints are signed; store: the inventory, SQLite or "
                               "PostgreSQL)", labels=["part"])
        up.add_metric(["hsm"], 1 if self.hsm_healthy else 0)
        up.add_metric(["audit"], 1 if self.audit.get("healthy") else 0)
        up.add_metric(["store"], 1 if self.store_healthy else 0)
        yield up

"""Prometheus metrics, in a registry of the app's own (no process-global state)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
FAST_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry
        self.issued = Counter("hsmca_issued", "Certificates and signed objects issued",
                              ["kind", "result"], registry=r)
        self.requests = Counter("hsmca_http_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.latency = Histogram("hsmca_http_request_seconds", "HTTP request latency",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.hsm_call = Histogram("hsmca_hsm_call_seconds", "Time per call on the HSM thread",
                                  buckets=FAST_BUCKETS, registry=r)
        self.audit_commit = Histogram("hsmca_audit_commit_seconds",
                                      "Audit group commit (write + fdatasync) latency",
                                      buckets=FAST_BUCKETS, registry=r)
        self.audit_batch = Histogram("hsmca_audit_batch_lines", "Lines per audit group commit",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
                                     registry=r)

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once: prometheus-client takes a lock and
        validates the labels on every call, and these run on every request."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def watch(self, hsm: Any, audit: Any) -> None:
        """Hook the HSM worker and the audit log, and export their live state."""
        hsm.on_call = self.hsm_call.observe
        hsm.on_sign = lambda purpose, result: self.child(self.issued, purpose, result).inc()

        def commit(seconds: float, lines: int) -> None:
            self.audit_commit.observe(seconds)
            self.audit_batch.observe(lines)

        audit.on_commit = commit
        self.registry.register(_LiveState(hsm, audit))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveState(Collector):
    def __init__(self, hsm: Any, audit: Any) -> None:
        self.hsm, self.audit = hsm, audit

    def collect(self) -> Iterator[Any]:
        yield CounterMetricFamily("hsmca_hsm_reconnects", "HSM session re-opens",
                                  value=self.hsm.reconnects)
        yield CounterMetricFamily("hsmca_hsm_signatures", "Signatures made by the HSM",
                                  value=self.hsm.sign_count)
        q = GaugeMetricFamily("hsmca_queue_depth", "Work waiting", labels=["queue"])
        q.add_metric(["hsm"], self.hsm.queue_depth)
        q.add_metric(["audit"], self.audit.queue_depth)
        yield q
        yield GaugeMetricFamily("hsmca_audit_lines", "Durable audit log lines",
                                value=self.audit.size)
        up = GaugeMetricFamily("hsmca_up", "1 if the part is healthy", labels=["part"])
        up.add_metric(["hsm"], 1 if self.hsm.healthy else 0)
        up.add_metric(["audit"], 1 if self.audit.healthy else 0)
        yield up

    def describe(self) -> Iterator[Any]:
        return iter(())

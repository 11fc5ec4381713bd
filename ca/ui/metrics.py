"""What the overview reads from the daemon's /metrics page (Prometheus text): renewal
latency quantiles from its request histogram, and a few gauges of its health."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

RENEW_ROUTE = "/v1/x509/renew"


@dataclass(frozen=True)
class Latency:
    """A request histogram of one route: bucket bounds (seconds) with the count of
    requests at most that long (cumulative, as Prometheus keeps them), and quantiles."""

    route: str
    buckets: tuple[tuple[float, float], ...]
    count: int

    def quantile(self, q: float) -> float | None:
        """Prometheus' histogram_quantile: linear within the bucket the rank falls in;
        the largest finite bound if it falls in +Inf. None without requests."""
        if self.count == 0 or not self.buckets:
            return None
        rank = q * self.count
        lower_bound, lower_count = 0.0, 0.0
        for bound, cumulative in self.buckets:
            if cumulative >= rank:
                if math.isinf(bound):
                    return lower_bound
                inside = cumulative - lower_count
                share = (rank - lower_count) / inside if inside else 0.0
                return lower_bound + (bound - lower_bound) * share
            lower_bound, lower_count = bound, cumulative
        return lower_bound

    def per_bucket(self) -> list[tuple[float, float, int]]:
        """(lower, upper, requests) for each bucket, not cumulative."""
        out = []
        lower, before = 0.0, 0.0
        for bound, cumulative in self.buckets:
            out.append((lower, bound, int(cumulative - before)))
            lower, before = bound, cumulative
        return out


@dataclass(frozen=True)
class Scrape:
    latency: Latency | None
    gauges: dict[str, float] = field(default_factory=dict)  # name{labels} -> value
    issued: dict[str, float] = field(default_factory=dict)  # signature purpose -> ok count


def parse(text: str, route: str = RENEW_ROUTE) -> Scrape:
    buckets: dict[float, float] = {}
    count = 0
    gauges: dict[str, float] = {}
    issued: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "hsmca_http_request_seconds_bucket" and s.labels.get("route") == route:
                buckets[float(s.labels["le"])] = s.value
            elif s.name == "hsmca_http_request_seconds_count" and s.labels.get("route") == route:
                count = int(s.value)
            elif s.name in ("hsmca_hsm_up", "hsmca_hsm_queue_depth", "hsmca_audit_lines"):
                gauges[s.name] = s.value
            elif s.name == "hsmca_up":
                gauges[f"hsmca_up{{part={s.labels.get('part')}}}"] = s.value
            elif s.name == "hsmca_issued_total" and s.labels.get("result") == "ok":
                issued[s.labels.get("kind", "?")] = s.value
    latency = Latency(route, tuple(sorted(buckets.items())), count) if buckets else None
    return Scrape(latency, gauges, issued)

"""Charts as server-rendered SVG: the geometry is computed here, the markup comes from
the templates (so every label is escaped like any other text), the colours from the
stylesheet (classes, never inline styles: the Content-Security-Policy forbids them).
They need no JavaScript and no chart library."""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field

from ca.ui.metrics import Latency

# The kinds the issue names first, in this order; other X.509 roles follow.
MAIN_KINDS = ("x509-service", "ssh-host", "ssh-user", "acme")
PALETTE = 12  # CSS classes k0..k11


def kind_label(kind: str) -> str:
    if kind == "acme":
        return "ACME"
    if kind.startswith("ssh-"):
        return f"SSH {kind[4:]}"
    if kind.startswith("x509-"):
        return f"X.509 {kind[5:]}"
    return kind


def kind_order(kinds: set[str]) -> list[str]:
    return [*MAIN_KINDS, *sorted(kinds - set(MAIN_KINDS))]


@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    w: float
    h: float
    cls: str
    title: str


@dataclass(frozen=True)
class Tick:
    pos: float
    label: str


@dataclass
class Chart:
    width: int
    height: int
    left: int
    top: int
    bottom: int  # y of the x axis
    right: int
    rects: list[Rect] = field(default_factory=list)
    yticks: list[Tick] = field(default_factory=list)
    xticks: list[Tick] = field(default_factory=list)
    markers: list[Tick] = field(default_factory=list)  # vertical lines with a label
    legend: list[tuple[str, str, int]] = field(default_factory=list)  # label, class, total
    label: str = ""  # what the chart shows, for screen readers
    empty: bool = False
    latest_right: bool = False  # a time axis: narrow screens show its right (recent) end


def _nice(top: float) -> float:
    """The top of a count axis in four equal whole steps (1, 2, 3, 4, 5, 6 or 8 times a
    power of ten), the smallest that reaches `top`."""
    need = max(top, 1) / 4
    power = 10 ** max(0, math.floor(math.log10(need)))
    for step in (1, 2, 3, 4, 5, 6, 8, 10):
        if step * power >= need:
            return float(4 * step * power)
    return float(40 * power)


def issuance(counts: list[tuple[str, str, int]], since: dt.datetime, hours: int) -> Chart:
    """Stacked bars, one per hour from `since`; `counts` is (kind, "YYYY-MM-DDTHH", n)."""
    c = Chart(width=840, height=230, left=40, top=12, bottom=196, right=832,
              label=f"certificates issued per hour over the last {hours // 24} days, by kind")
    kinds = kind_order({k for k, _, _ in counts})
    classes = {k: f"k{i % PALETTE}" for i, k in enumerate(kinds)}
    per_hour: dict[str, dict[str, int]] = {}
    for kind, hour, n in counts:
        per_hour.setdefault(hour, {})[kind] = per_hour.get(hour, {}).get(kind, 0) + n
    totals = {k: sum(n for kk, _, n in counts if kk == k) for k in kinds}
    top = _nice(max((sum(v.values()) for v in per_hour.values()), default=0))
    plot_h = c.bottom - c.top
    step = (c.right - c.left) / hours
    for i in range(hours):
        start = since + dt.timedelta(hours=i)
        key = start.isoformat()[:13]
        x = c.left + i * step
        y = float(c.bottom)
        for kind in kinds:
            n = per_hour.get(key, {}).get(kind, 0)
            if not n:
                continue
            h = plot_h * n / top
            y -= h
            c.rects.append(Rect(round(x + 0.5, 2), round(y, 2), round(max(step - 1, 1), 2),
                                round(h, 2), classes[kind],
                                f"{start:%Y-%m-%d %H}:00 UTC: {n} {kind_label(kind)}"))
        if start.hour == 0:
            c.xticks.append(Tick(round(x, 2), f"{start:%b %d}"))
    for j in range(5):
        value = top * j / 4
        label = f"{value:g}"
        c.yticks.append(Tick(round(c.bottom - plot_h * j / 4, 2), label))
    c.legend = [(kind_label(k), classes[k], totals[k]) for k in kinds]
    c.empty = not counts
    c.latest_right = True
    if per_hour:
        # What a screen reader says of the image: its figures, not only its title (the
        # per-hour numbers are in each bar's title, which it does not read: a web trial)
        busiest = max(per_hour, key=lambda h: (sum(per_hour[h].values()), h))
        c.label += (f": {sum(totals.values())} in all ("
                    + ", ".join(f"{kind_label(k)} {totals[k]}" for k in kinds)
                    + f"); the busiest hour {busiest}:00 UTC, with "
                    f"{sum(per_hour[busiest].values())}")
    return c


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def latency(hist: Latency) -> Chart:
    """The renewal latency distribution: one bar per histogram bucket, with the p50 and
    p99 the histogram gives (interpolated as Prometheus does) marked."""
    c = Chart(width=840, height=230, left=40, top=28, bottom=196, right=832,
              label=f"latency of {hist.count} renewals since the daemon started, with p50 and "
              "p99")
    buckets = hist.per_bucket()
    top = _nice(max((n for _, _, n in buckets), default=0))
    plot_h = c.bottom - c.top
    step = (c.right - c.left) / max(len(buckets), 1)
    for i, (lower, upper, n) in enumerate(buckets):
        x = c.left + i * step
        label = f"> {_ms(lower)}" if math.isinf(upper) else f"≤ {_ms(upper)}"
        if n:
            h = plot_h * n / top
            c.rects.append(Rect(round(x + 2, 2), round(c.bottom - h, 2), round(step - 4, 2),
                                round(h, 2), "k0", f"{label}: {n} renewals"))
        c.xticks.append(Tick(round(x + step / 2, 2), label))
    for j in range(5):
        c.yticks.append(Tick(round(c.bottom - plot_h * j / 4, 2), f"{top * j / 4:g}"))
    for name, q in (("p50", 0.5), ("p99", 0.99)):
        value = hist.quantile(q)
        if value is None:
            continue
        c.markers.append(Tick(round(_position(buckets, value, c.left, step), 2),
                              f"{name} {_ms(value)}"))
    c.empty = hist.count == 0
    return c


def _position(buckets: list[tuple[float, float, int]], value: float, left: float,
              step: float) -> float:
    """Where `value` falls on the bucket axis, linear within its bucket."""
    for i, (lower, upper, _) in enumerate(buckets):
        if value <= upper or math.isinf(upper):
            share = 0.0 if math.isinf(upper) or upper == lower else (value - lower) / (
                upper - lower)
            return left + (i + min(max(share, 0.0), 1.0)) * step
    return left + len(buckets) * step

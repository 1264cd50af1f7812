"""Usage charts for the admin UI: requests per time bucket as inline SVG bar charts, drawn on
the server (no chart library, nothing fetched by the browser)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from html import escape

WIDTH = 600
HEIGHT = 120
AXIS = 16
"""Room under the bars for the first and last bucket's time."""


@dataclass
class Bucket:
    """One time bucket of one group."""

    start: datetime
    requests: int = 0
    tokens: int = 0


@dataclass
class UsageChart:
    """The buckets of one model (or key) over the window, oldest first."""

    group: str
    buckets: list[Bucket] = field(default_factory=list)

    @property
    def requests(self) -> int:
        """Requests over the whole window."""
        return sum(b.requests for b in self.buckets)

    @property
    def tokens(self) -> int:
        """Prompt and generated tokens over the whole window."""
        return sum(b.tokens for b in self.buckets)


def _label(moment: datetime, bucket_s: int) -> str:
    return moment.strftime("%H:%M" if bucket_s < 86400 else "%m-%d")


def bar_chart(chart: UsageChart, bucket_s: int) -> str:
    """An SVG of `chart`'s requests per bucket; each bar's tooltip gives its time and figures."""
    count = max(len(chart.buckets), 1)
    peak = max((b.requests for b in chart.buckets), default=0) or 1
    slot = WIDTH / count
    plot = HEIGHT - AXIS
    bars = []
    for index, bucket in enumerate(chart.buckets):
        height = plot * bucket.requests / peak
        tip = f"{bucket.start:%Y-%m-%d %H:%M} UTC: {bucket.requests} requests, {bucket.tokens} tokens"
        bars.append(
            f'<rect x="{index * slot + slot * 0.1:.1f}" y="{plot - height:.1f}" width="{slot * 0.8:.1f}" '
            f'height="{height:.1f}" class="bar"><title>{escape(tip)}</title></rect>')
    labels = ""
    if chart.buckets:
        first, last = chart.buckets[0].start, chart.buckets[-1].start
        labels = (f'<text x="0" y="{HEIGHT - 3}" class="axis">{_label(first, bucket_s)}</text>'
                  f'<text x="{WIDTH}" y="{HEIGHT - 3}" class="axis" text-anchor="end">'
                  f'{_label(last, bucket_s)}</text>')
    title = escape(f"{chart.group or '(no key)'}: requests per bucket")
    return (f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
            f'aria-label="{title}" class="chart"><line x1="0" y1="{plot}" x2="{WIDTH}" y2="{plot}" '
            f'class="baseline"/>{"".join(bars)}{labels}</svg>')


def charts_from(points: list[tuple[str, datetime, int, int]], since: datetime, bucket_s: int,
                count: int) -> list[UsageChart]:
    """One chart per group from `(group, bucket start, requests, tokens)` rows, over `count`
    buckets of `bucket_s` seconds from `since` (empty ones at zero; a row falls in the bucket its
    start lies in), groups with the most requests first."""
    by_group: dict[str, list[Bucket]] = {}
    for group, start, requests, tokens in points:
        buckets = by_group.setdefault(
            group, [Bucket(since + timedelta(seconds=i * bucket_s)) for i in range(count)])
        index = int((start - since).total_seconds() // bucket_s)
        bucket = buckets[min(max(index, 0), count - 1)]
        bucket.requests += requests
        bucket.tokens += tokens
    charts = [UsageChart(group, buckets) for group, buckets in by_group.items()]
    return sorted(charts, key=lambda c: (-c.requests, c.group))

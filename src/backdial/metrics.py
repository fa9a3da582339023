"""Prometheus exposition through ``prometheus-client``, read from plain counters at scrape time.

Components keep their own counters as plain ints (and ``Histogram``'s bucket
list) on the hot path: observing costs an integer add.  When ``/metrics`` is
scraped, a component's collector turns them into ``prometheus-client`` metric
families with the helpers below, and ``render`` encodes them in the format the
scraper asked for (``Accept``): the Prometheus text format 0.0.4 by default,
OpenMetrics 1.0 when requested.  ``merge`` sums the families of several
processes (the sidecar's workers) so that counts stay exact across them.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Mapping, Sequence

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

Rows = Iterable[tuple[Mapping[str, str], float]]  # (labels, value) of each series


class Histogram:
    """Fixed-bucket histogram; ``observe`` is a bisect and two adds."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1


def gauge(name: str, documentation: str, rows: Rows) -> Metric:
    family = Metric(name, documentation, "gauge")
    for labels, value in rows:
        family.add_sample(name, dict(labels), value)
    return family


def counter(name: str, documentation: str, rows: Rows) -> Metric:
    """A counter family; *name* is the series name, ending in ``_total``."""
    if not name.endswith("_total"):
        raise ValueError(f"counter {name!r} must end in _total")
    family = Metric(name.removesuffix("_total"), documentation, "counter")
    for labels, value in rows:
        family.add_sample(name, dict(labels), value)
    return family


def histogram(
    name: str, documentation: str, series: Iterable[tuple[Mapping[str, str], Histogram]]
) -> Metric:
    family = Metric(name, documentation, "histogram")
    for labels, hist in series:
        running = 0
        for bound, count in zip(hist.bounds, hist.counts, strict=False):
            running += count
            family.add_sample(name + "_bucket", {**labels, "le": _le(bound)}, running)
        total = running + hist.counts[-1]
        family.add_sample(name + "_bucket", {**labels, "le": "+Inf"}, total)
        family.add_sample(name + "_count", dict(labels), total)
        family.add_sample(name + "_sum", dict(labels), hist.sum)
    return family


def _le(bound: float) -> str:
    return str(int(bound)) if bound == int(bound) else repr(bound)


class Scrape(Collector):
    """A collector made of a function that reads the plain counters when scraped."""

    def __init__(self, families: Callable[[], Iterable[Metric]]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families()


def registry(families: Callable[[], Iterable[Metric]]) -> CollectorRegistry:
    """A registry holding only *families* (no process or platform collectors)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(Scrape(families))
    return reg


def render(reg: CollectorRegistry, accept: str = "") -> tuple[bytes, str]:
    """(body, content type) in the exposition format *accept* prefers."""
    encode, content_type = choose_encoder(accept)
    return encode(reg), content_type


def merge(texts: Iterable[str]) -> list[Metric]:
    """The families of several text expositions with identical series summed.

    Every process reports the same families, so HELP and TYPE come from the first
    that has a family; series keep the order in which they first appear.
    """
    merged: dict[str, Metric] = {}
    sums: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name not in merged:
                merged[family.name] = Metric(family.name, family.documentation, family.type)
                sums[family.name] = {}
            totals = sums[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                totals[key] = totals.get(key, 0.0) + sample.value
    for name, family in merged.items():
        for (sample_name, labels), value in sums[name].items():
            family.add_sample(sample_name, dict(labels), value)
    return list(merged.values())

"""Prometheus text exposition (format 0.0.4) without a client library.

Components keep their own counters as plain ints on the hot path and render
them here only when ``/metrics`` is scraped, so observing costs nothing per
request beyond an integer add.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return "{" + inner + "}"


def _num(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


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


class Exposition:
    """Collects families and renders them in one pass."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def family(
        self,
        name: str,
        kind: str,
        help_text: str,
        samples: Iterable[tuple[Mapping[str, str], float]],
    ) -> None:
        self._lines.append(f"# HELP {name} {help_text}")
        self._lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self._lines.append(f"{name}{_labels(labels)} {_num(value)}")

    def histogram(
        self,
        name: str,
        help_text: str,
        series: Iterable[tuple[Mapping[str, str], Histogram]],
    ) -> None:
        self._lines.append(f"# HELP {name} {help_text}")
        self._lines.append(f"# TYPE {name} histogram")
        for labels, hist in series:
            running = 0
            for bound, count in zip(hist.bounds, hist.counts, strict=False):
                running += count
                le = dict(labels, le=_num(bound))
                self._lines.append(f"{name}_bucket{_labels(le)} {running}")
            running += hist.counts[-1]
            self._lines.append(f"{name}_bucket{_labels(dict(labels, le='+Inf'))} {running}")
            self._lines.append(f"{name}_sum{_labels(labels)} {_num(hist.sum)}")
            self._lines.append(f"{name}_count{_labels(labels)} {hist.count}")

    def render(self) -> bytes:
        return ("\n".join(self._lines) + "\n").encode()

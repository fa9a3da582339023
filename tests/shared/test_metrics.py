"""Metric families from plain counters, exposition formats, and the cross-process merge."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from backdial.metrics import Histogram, counter, gauge, histogram, merge, registry, render
from tests.helpers import metric


def _families() -> list[object]:
    hist = Histogram((0.1, 1.0))
    for value in (0.05, 0.5, 0.5, 3.0):
        hist.observe(value)
    return [
        gauge("backdial_x_sessions", "Sessions.", [({"slice": "a"}, 3), ({"slice": "b"}, 0)]),
        counter("backdial_x_rejected_total", "Refusals.", [({"reason": "timeout"}, 2)]),
        histogram("backdial_x_wait_seconds", "Waits.", [({"slice": "a"}, hist)]),
    ]


def test_histogram_counts_and_buckets() -> None:
    hist = Histogram((0.1, 1.0))
    for value in (0.1, 0.2, 5.0):
        hist.observe(value)
    assert hist.counts == [1, 1, 1] and hist.count == 3 and abs(hist.sum - 5.3) < 1e-9


def test_text_exposition_by_default() -> None:
    body, content_type = render(registry(_families))
    text = body.decode()
    assert content_type.startswith("text/plain; version=0.0.4")
    assert metric(text, "backdial_x_sessions", slice="a") == 3
    assert metric(text, "backdial_x_rejected_total", reason="timeout") == 2
    assert "# TYPE backdial_x_rejected_total counter" in text
    assert metric(text, "backdial_x_wait_seconds_bucket", slice="a", le="0.1") == 1
    assert metric(text, "backdial_x_wait_seconds_bucket", slice="a", le="1") == 3  # cumulative
    assert metric(text, "backdial_x_wait_seconds_bucket", slice="a", le="+Inf") == 4
    assert metric(text, "backdial_x_wait_seconds_count", slice="a") == 4
    assert metric(text, "backdial_x_wait_seconds_sum", slice="a") == 4.05


def test_openmetrics_when_asked() -> None:
    body, content_type = render(
        registry(_families), "application/openmetrics-text; version=1.0.0,text/plain;q=0.5"
    )
    text = body.decode()
    assert content_type.startswith("application/openmetrics-text")
    assert text.endswith("# EOF\n")
    assert "# TYPE backdial_x_rejected counter" in text  # OpenMetrics names the family bare
    assert 'backdial_x_rejected_total{reason="timeout"} 2.0' in text


def test_families_are_read_at_scrape_time() -> None:
    value = [1]
    reg = registry(lambda: [gauge("backdial_x_live", "Live.", [({}, value[0])])])
    assert metric(render(reg)[0].decode(), "backdial_x_live") == 1
    value[0] = 7  # the plain counter moved: the next scrape shows it, nothing else to update
    assert metric(render(reg)[0].decode(), "backdial_x_live") == 7


def test_merge_sums_identical_series_across_processes() -> None:
    one = render(registry(_families))[0].decode()
    extra = render(
        registry(lambda: [gauge("backdial_x_sessions", "Sessions.", [({"slice": "c"}, 5)])])
    )[0].decode()
    merged = merge([one, one, extra])
    text = render(registry(lambda: merged))[0].decode()
    assert metric(text, "backdial_x_sessions", slice="a") == 6
    assert metric(text, "backdial_x_sessions", slice="c") == 5
    assert metric(text, "backdial_x_rejected_total", reason="timeout") == 4
    assert metric(text, "backdial_x_wait_seconds_bucket", slice="a", le="+Inf") == 8
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert families == {
        "backdial_x_sessions": "gauge",
        "backdial_x_rejected": "counter",
        "backdial_x_wait_seconds": "histogram",
    }
    assert text.count("# HELP backdial_x_sessions ") == 1
    assert merge([]) == []

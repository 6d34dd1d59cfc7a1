"""The service's metrics: nearest-rank percentiles over the last WINDOW requests, exact counts
under concurrent updates, and text that parses as Prometheus' exposition format 0.0.4."""

import math
import re
import sys
import threading
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distrifusion.serve.metrics import QUANTILES, WINDOW, ServiceMetrics, nearest_rank

LATENCY = "distrifusion_request_latency_seconds"
GENERATION = "distrifusion_generation_seconds"
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{quantile="([^"]*)"\})? '
                     r'(NaN|[+-]Inf|[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)$')


def parse(text: str) -> dict[tuple[str, str | None], float]:
    """The samples of a text exposition, {(name, quantile label or None): value}, checking that
    every family has HELP then TYPE before its samples and every sample belongs to its family."""
    assert text.endswith("\n")
    samples, types, helped, family = {}, {}, set(), None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, help_text = line[7:].split(" ", 1)
            assert help_text.strip() and name not in helped
            helped.add(name)
        elif line.startswith("# TYPE "):
            name, kind = line[7:].split(" ")
            assert name in helped and name not in types and kind in ("counter", "gauge", "summary")
            types[name], family = kind, name
        else:
            match = _SAMPLE.match(line)
            assert match, line
            name, quantile, value = match.groups()
            kind = types[family]
            if kind == "summary":
                assert name in (family, f"{family}_sum", f"{family}_count")
                assert (quantile is not None) == (name == family)
            else:
                assert name == family and quantile is None
                assert (kind == "counter") == name.endswith("_total")
            samples[(name, quantile)] = float(value)
    return samples


def reference_percentile(values: list[float], q: str) -> float:
    """The smallest value with at least a fraction q of all values at or below it."""
    ordered = sorted(values)
    return next(v for v in ordered if Fraction(sum(w <= v for w in ordered), len(ordered)) >= Fraction(q))


def test_nearest_rank_by_hand():
    data = [15.0, 20.0, 35.0, 40.0, 50.0]
    assert [nearest_rank(data, q) for q in ("0", "0.05", "0.3", "0.4", "0.5", "0.9", "1")] == \
        [15.0, 15.0, 20.0, 20.0, 35.0, 50.0, 50.0]
    tens = [float(i) for i in range(1, 11)]
    assert [nearest_rank(tens, q) for q in QUANTILES] == [5.0, 9.0, 10.0]
    with pytest.raises(ValueError):
        nearest_rank([], "0.5")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1e4, allow_nan=False), min_size=1, max_size=200))
def test_quantiles_match_the_sorted_list_rule(latencies):
    metrics = ServiceMetrics()
    for x in latencies:
        metrics.observe(x, x / 2)
    samples = parse(metrics.render(queue_length=0))
    for q in QUANTILES:
        assert samples[(LATENCY, q)] == reference_percentile(latencies, q)
        assert samples[(GENERATION, q)] == reference_percentile([x / 2 for x in latencies], q)
    assert samples[(LATENCY + "_count", None)] == len(latencies)
    assert samples[(LATENCY + "_sum", None)] == pytest.approx(math.fsum(latencies), rel=1e-12, abs=1e-9)


def test_window_keeps_the_latest_requests_and_counts_all():
    metrics = ServiceMetrics()
    for _ in range(WINDOW):
        metrics.observe(100.0, 50.0)
    for i in range(WINDOW):
        metrics.observe(1.0 + i % 10, 0.5)
    samples = parse(metrics.render(queue_length=0))
    assert [samples[(LATENCY, q)] for q in QUANTILES] == [5.0, 9.0, 10.0]
    assert [samples[(GENERATION, q)] for q in QUANTILES] == [0.5] * 3
    assert samples[(LATENCY + "_count", None)] == 2 * WINDOW
    assert samples[(LATENCY + "_sum", None)] == 100.0 * WINDOW + 5.5 * WINDOW
    assert samples[("distrifusion_images_served_total", None)] == 2 * WINDOW


def test_counters_gauge_and_empty_summaries():
    metrics = ServiceMetrics()
    empty = parse(metrics.render(queue_length=0))
    assert all(math.isnan(empty[(LATENCY, q)]) for q in QUANTILES)
    assert empty[(LATENCY + "_count", None)] == 0
    for _ in range(3):
        metrics.failed()
    for _ in range(2):
        metrics.rejected()
    metrics.observe(0.25, 0.125)
    samples = parse(metrics.render(queue_length=7))
    assert samples[("distrifusion_queue_length", None)] == 7
    assert samples[("distrifusion_requests_failed_total", None)] == 3
    assert samples[("distrifusion_requests_rejected_total", None)] == 2
    assert samples[("distrifusion_images_served_total", None)] == 1
    assert [samples[(GENERATION, q)] for q in QUANTILES] == [0.125] * 3


def test_concurrent_updates_are_counted_exactly_and_rendered_consistently():
    """Threads switching every microsecond: no update is lost, and a render never sees a
    request in one summary but not the other."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    metrics, threads, per_thread, stop, torn = ServiceMetrics(), 6, 3000, threading.Event(), []

    def work():
        for _ in range(per_thread):
            metrics.observe(0.5, 0.25)
            metrics.failed()
            metrics.rejected()

    def watch():
        while not stop.is_set():
            s = parse(metrics.render(queue_length=0))
            if not s[(LATENCY + "_count", None)] == s[(GENERATION + "_count", None)] == \
                    s[("distrifusion_images_served_total", None)]:
                torn.append(s)

    try:
        watcher = threading.Thread(target=watch)
        watcher.start()
        workers = [threading.Thread(target=work) for _ in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        stop.set()
        watcher.join()
    finally:
        sys.setswitchinterval(previous)
    total = threads * per_thread
    samples = parse(metrics.render(queue_length=0))
    assert not torn
    assert samples[(LATENCY + "_count", None)] == samples[(GENERATION + "_count", None)] == total
    assert samples[(LATENCY + "_sum", None)] == 0.5 * total
    assert samples[("distrifusion_requests_failed_total", None)] == total
    assert samples[("distrifusion_requests_rejected_total", None)] == total

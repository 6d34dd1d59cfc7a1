"""The service's counters and latency summaries, rendered in Prometheus' text format 0.0.4.

Rank 0's HTTP handlers and its generation loop update one `ServiceMetrics` from different
threads; `GET /metrics` renders it. Percentiles are over the last `WINDOW` served requests
(recent behaviour, bounded memory); `_sum` and `_count` are over all of them, as Prometheus
expects of a summary.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Sequence
from fractions import Fraction

WINDOW = 1000
QUANTILES = ("0.5", "0.9", "0.99")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def nearest_rank(sorted_values: Sequence[float], q: str | float) -> float:
    """The nearest-rank percentile: the ceil(q * n)-th smallest of n >= 1 values (1-based; the
    smallest for q = 0). Always one of the values; `q` as a decimal string is exact."""
    if not sorted_values:
        raise ValueError("no values")
    rank = math.ceil(Fraction(q) * len(sorted_values))
    return sorted_values[max(rank, 1) - 1]


def _number(x: float) -> str:
    """A sample value as the text format writes it (NaN, +Inf, -Inf)."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x))


class _Summary:
    """Observations of one quantity: a window of the latest for quantiles, sum and count of all."""

    def __init__(self) -> None:
        self.window: deque[float] = deque(maxlen=WINDOW)
        self.sum, self.count = 0.0, 0

    def observe(self, x: float) -> None:
        self.window.append(x)
        self.sum += x
        self.count += 1

    def lines(self, name: str, help_text: str) -> list[str]:
        ordered = sorted(self.window)
        out = [f"# HELP {name} {help_text}", f"# TYPE {name} summary"]
        for q in QUANTILES:
            value = nearest_rank(ordered, q) if ordered else math.nan
            out.append(f'{name}{{quantile="{q}"}} {_number(value)}')
        return out + [f"{name}_sum {_number(self.sum)}", f"{name}_count {self.count}"]


class ServiceMetrics:
    """Thread-safe metrics of the service: `observe` a served request, count a `failed` or a
    `rejected` one, `render` all of them with the current queue length."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latency = _Summary()
        self._generation = _Summary()
        self._failed = 0
        self._rejected = 0

    def observe(self, latency_s: float, generation_s: float) -> None:
        """A request served: `latency_s` from its arrival to its response, `generation_s` the
        ranks' generation alone (the rest is queueing, validation, encoding)."""
        with self._lock:
            self._latency.observe(latency_s)
            self._generation.observe(generation_s)

    def failed(self) -> None:
        """A validated request that failed while being generated (answered 5xx)."""
        with self._lock:
            self._failed += 1

    def rejected(self) -> None:
        """A request turned away before it was queued: invalid (4xx) or the queue full (503)."""
        with self._lock:
            self._rejected += 1

    def render(self, queue_length: int) -> str:
        """Everything in the text exposition format 0.0.4 (serve it as `CONTENT_TYPE`)."""
        with self._lock:
            lines = [
                "# HELP distrifusion_queue_length Requests waiting to be generated.",
                "# TYPE distrifusion_queue_length gauge",
                f"distrifusion_queue_length {int(queue_length)}",
            ]
            for name, help_text, value in (
                ("distrifusion_images_served_total", "Requests answered with an image or latents.",
                 self._latency.count),
                ("distrifusion_requests_failed_total", "Requests that failed while being generated.",
                 self._failed),
                ("distrifusion_requests_rejected_total", "Requests turned away unqueued: invalid, or the queue full.",
                 self._rejected),
            ):
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name} {value}"]
            lines += self._latency.lines(
                "distrifusion_request_latency_seconds",
                f"Time from a request's arrival to its response (quantiles over the last {WINDOW}).")
            lines += self._generation.lines(
                "distrifusion_generation_seconds",
                f"Time the ranks spent generating a request (quantiles over the last {WINDOW}).")
        return "\n".join(lines) + "\n"

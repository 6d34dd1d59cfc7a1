"""Write a simulated timeline as Chrome trace JSON (opens in Perfetto and chrome://tracing).

One process per rank ("rank N"), two threads per process: 0 = compute stream, 1 = comm
stream; each span is a complete ("X") event with microsecond `ts` and `dur`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from .engine import Span

STREAM_TIDS = {"compute": 0, "comm": 1}


def chrome_trace(spans: Iterable[Span], metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """The trace as a JSON-able dict: {"traceEvents": [...], "displayTimeUnit": "ms", ...}."""
    events: list[dict[str, Any]] = []
    ranks: set[int] = set()
    for s in spans:
        ranks.add(s.rank)
        events.append({"name": s.name, "cat": s.stream, "ph": "X", "pid": s.rank,
                       "tid": STREAM_TIDS[s.stream], "ts": s.start * 1e6, "dur": (s.end - s.start) * 1e6})
    for rank in sorted(ranks):
        events.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": rank, "args": {"sort_index": rank}})
        for stream, tid in STREAM_TIDS.items():
            events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": tid, "args": {"name": stream}})
    trace: dict[str, Any] = {"traceEvents": events, "displayTimeUnit": "ms"}
    if metadata:
        trace["otherData"] = metadata
    return trace


def write_chrome_trace(spans: Iterable[Span], path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write `chrome_trace(spans, metadata)` to `path` (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(chrome_trace(spans, metadata)))
    return path

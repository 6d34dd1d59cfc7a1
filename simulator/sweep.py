"""Sweep output: one CSV row per simulation, and a speedup-vs-devices plot.

Rows need the columns `hardware`, `resolution`, `devices` and `latency_s` (as in
`SimResult.to_row()`); speedup is relative to the 1-device row of the same hardware and
resolution, or to its fewest-devices row (scaled by that device count) when there is none.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def append_row(path: str | Path, row: dict[str, Any]) -> None:
    """Append `row` to CSV `path`, writing the header first if the file is new or empty.

    Raises `ValueError` if the file's header has other columns than `row`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if header != list(row):
            raise ValueError(f"{path} has columns {header}, the row has {list(row)}")
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """All rows of a sweep CSV, as strings."""
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def speedups(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{resolution: {hardware: [(devices, speedup), ...] sorted by devices}}.

    Several rows for one (resolution, hardware, devices) keep the last.
    """
    latency: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        latency[str(row["resolution"])][str(row["hardware"])][int(row["devices"])] = float(row["latency_s"])
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for res, by_hw in latency.items():
        out[res] = {}
        for hw, by_n in by_hw.items():
            base_n = min(by_n)
            base = by_n[base_n] * base_n  # latency one device would need at perfect scaling
            out[res][hw] = [(n, base / by_n[n]) for n in sorted(by_n)]
    return out


def plot_speedup(rows: Iterable[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Plot speedup vs devices, one subplot per resolution, one line per hardware; save a PNG."""
    data = speedups(rows)
    if not data:
        raise ValueError("no rows to plot")
    resolutions = sorted(data, key=lambda r: (len(r), r))
    fig, axes = plt.subplots(1, len(resolutions), figsize=(5 * len(resolutions), 4), squeeze=False)
    for ax, res in zip(axes[0], resolutions):
        top = 1
        for hw in sorted(data[res]):
            points = data[res][hw]
            ax.plot([n for n, _ in points], [s for _, s in points], marker="o", label=hw)
            top = max(top, *(n for n, _ in points))
        ax.plot([1, top], [1, top], linestyle="--", color="gray", label="linear")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("devices")
        ax.set_ylabel("speedup")
        ax.set_title(f"{res}px")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""Sweep output: one CSV row per simulation, and a plot of it against the device count.

Rows need the columns `hardware`, `resolution`, `devices` and `latency_s` (as in
`Prediction.row()`); speedup is relative to the 1-device row of the same hardware and
resolution, or to its fewest-devices row (scaled by that device count) when there is none.
Rows with `comm_s` and `comm_exposed_s` also give the share of communication left exposed.
The plot has one column per resolution and three rows: speedup (with the linear reference
drawn at each device count plotted), latency in seconds, and exposed / total communication time.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.figure import Figure  # noqa: E402

Curves = dict[str, dict[str, list[tuple[int, float]]]]  # {resolution: {hardware: [(devices, value), ...]}}


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


def curves(rows: Iterable[dict[str, Any]], value: Callable[[dict[str, Any]], float]) -> Curves:
    """{resolution: {hardware: [(devices, value(row)), ...] sorted by devices}}; of several rows for
    one (resolution, hardware, devices), the last."""
    out: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        out[str(row["resolution"])][str(row["hardware"])][int(row["devices"])] = value(row)
    return {res: {hw: sorted(by_n.items()) for hw, by_n in by_hw.items()} for res, by_hw in out.items()}


def speedups(rows: Iterable[dict[str, Any]]) -> Curves:
    """Speedup curves: each row's latency against its 1-device row (see the module docstring)."""
    out: Curves = {}
    for res, by_hw in curves(rows, lambda r: float(r["latency_s"])).items():
        out[res] = {}
        for hw, points in by_hw.items():
            base_n, base_latency = points[0]
            base = base_latency * base_n  # latency one device would need at perfect scaling
            out[res][hw] = [(n, base / latency) for n, latency in points]
    return out


def exposed_share(row: dict[str, Any]) -> float:
    """comm_exposed_s / comm_s of a row; NaN without communication (or without those columns)."""
    comm = float(row.get("comm_s") or 0)
    return float(row["comm_exposed_s"]) / comm if comm > 0 else math.nan


PANELS = (("speedup", speedups),
          ("latency (s)", lambda rows: curves(rows, lambda r: float(r["latency_s"]))),
          ("exposed comm / comm time", lambda rows: curves(rows, exposed_share)))


def sweep_figure(rows: Iterable[dict[str, Any]], title: str | None = None) -> Figure:
    """The figure of the module docstring: one column per resolution, one line per hardware."""
    rows = list(rows)
    data = [make(rows) for _, make in PANELS]
    if not data[0]:
        raise ValueError("no rows to plot")
    resolutions = sorted(data[0], key=lambda r: (len(r), r))
    fig, axes = plt.subplots(len(PANELS), len(resolutions), figsize=(5 * len(resolutions), 10), squeeze=False,
                             sharex="col")
    for col, res in enumerate(resolutions):
        for row, ((label, _), panel) in enumerate(zip(PANELS, data)):
            ax = axes[row][col]
            for hw in sorted(panel[res]):
                points = panel[res][hw]
                ax.plot([n for n, _ in points], [v for _, v in points], marker="o", label=hw)
            if row == 0:
                devices = sorted({n for points in panel[res].values() for n, _ in points} | {1})
                ax.plot(devices, devices, linestyle="--", marker=".", color="gray", label="linear")
                ax.set_title(f"{res}px")
            ax.set_xscale("log", base=2)
            if row == len(PANELS) - 1:
                ax.set_ylim(0, 1.05)
                ax.set_xlabel("devices")
                ax.set_xticks(devices, [str(n) for n in devices], minor=False)
                ax.minorticks_off()
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
        axes[0][col].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_speedup(rows: Iterable[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Save `sweep_figure(rows, title)` as a PNG at `path`."""
    fig = sweep_figure(rows, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

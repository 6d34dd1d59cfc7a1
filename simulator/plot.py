"""Plot a sweep CSV: `python -m simulator.plot results.csv [speedup.png]`.

Speedup, latency and the share of communication left exposed vs devices (`sweep.sweep_figure`),
one column per resolution, one line per hardware (and per parallel mode or model when the
sweep varies them). Speedups are against each row's simulated single-device baseline
(`single_device_latency_s`), so a sweep without world_size=1 still starts from the true
one-device latency.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .sweep import plot_speedup, read_rows


def plot_rows(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Rows as `sweep.plot_speedup` wants them: labelled lines, each with its 1-device point."""
    varying = [k for k in ("parallel", "model") if len({r.get(k) for r in rows}) > 1]
    out: list[dict[str, str]] = []
    for r in rows:
        label = " ".join([r["hardware"], *(r[k] for k in varying)])
        out.append({**r, "hardware": label})
    have_one = {(r["hardware"], r["resolution"]) for r in out if int(r["devices"]) == 1}
    for r in list(out):
        if (r["hardware"], r["resolution"]) not in have_one and r.get("single_device_latency_s"):
            have_one.add((r["hardware"], r["resolution"]))
            out.insert(0, {**r, "devices": "1", "latency_s": r["single_device_latency_s"], "comm_s": "0",
                           "comm_exposed_s": "0"})
    return out


def plot_sweep(csv_path: str | Path, png_path: str | Path | None = None) -> Path:
    """Draw the PNG of sweep CSV `csv_path` (default: next to it, `speedup.png`)."""
    csv_path = Path(csv_path)
    png = Path(png_path) if png_path else csv_path.with_name("speedup.png")
    rows = read_rows(csv_path)
    models = sorted({r.get("model", "") for r in rows})
    return plot_speedup(plot_rows(rows), png, title=f"{', '.join(models)}: predicted generation")


def main(argv: list[str]) -> None:
    """CLI: CSV path, optional PNG path."""
    if not 1 <= len(argv) <= 2:
        sys.exit("usage: python -m simulator.plot RESULTS.csv [SPEEDUP.png]")
    print(plot_sweep(*argv))


if __name__ == "__main__":
    main(sys.argv[1:])

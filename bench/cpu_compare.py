"""Compare the simulator's predictions with `bench/cpu_validation.py` measurements.

    python bench/cpu_compare.py m1.jsonl m2.jsonl [--hardware cpu_gloo_loopback] [--trace-cache DIR]

For every measured JSON line, predicts the same run (model, resolution, world size, mode,
split_cfg, steps, warm-up steps, float32) on `--hardware` with the calibration profile that
was sampled alongside it (the line's `profile`; a relative path is read from the measurement
file's folder), and prints a Markdown table of measured vs
predicted generation latency and the error.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from simulator import CalibrationProfile, load_hardware
from simulator.predict import predict


def read_measurements(paths: list[Path]) -> list[dict]:
    """The JSON lines of every file, each `profile` made a path that can be opened from here."""
    measured = []
    for path in paths:
        for line in path.read_text().splitlines():
            if line.startswith("{"):
                m = json.loads(line)
                m["profile"] = path.parent / m["profile"]  # an absolute `profile` stays as it is
                measured.append(m)
    return measured


def compare(measured: list[dict], hardware: str, cache: str | None) -> list[dict]:
    """One row per measurement: its setup, measured and predicted latency, relative error."""
    hw = load_hardware(hardware)
    rows = []
    for m in measured:
        p = predict(m["model"], m["resolution"], m["world_size"], m["mode"], hw, m["steps"],
                    warmup_steps=m["warmup_steps"], split_cfg=m["split_cfg"], dtype="float32",
                    profile=CalibrationProfile.load(m["profile"]), cache_dir=cache)
        r = p.result
        rows.append({"world_size": m["world_size"], "mode": m["mode"], "split_cfg": m["split_cfg"],
                     "steps": m["steps"], "measured_s": m["latency_s"], "predicted_s": r.latency_s,
                     "measured_range_s": (min(m["runs_s"]), max(m["runs_s"])),
                     "error": r.latency_s / m["latency_s"] - 1, "comm_s": r.comm_s,
                     "comm_exposed_s": r.comm_exposed_s})
    return rows


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table; speedups are against the 1-rank row, where there is one."""
    single = next((r for r in rows if r["world_size"] == 1), None)
    lines = ["| ranks | mode | split_cfg | measured (s), median [range] | predicted (s) | error "
             "| speedup measured / predicted | predicted comm / exposed (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        low, high = r["measured_range_s"]
        speedup = (f"{single['measured_s'] / r['measured_s']:.2f}x / {single['predicted_s'] / r['predicted_s']:.2f}x"
                   if single else "-")
        lines.append(f"| {r['world_size']} | {r['mode']} | {r['split_cfg']} | {r['measured_s']:.2f} "
                     f"[{low:.2f}-{high:.2f}] | {r['predicted_s']:.2f} | {r['error']:+.1%} | {speedup} | "
                     f"{r['comm_s']:.3f} / {r['comm_exposed_s']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    """CLI: read the measurements, predict, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("measured", type=Path, nargs="+", help="JSON lines of bench/cpu_validation.py")
    parser.add_argument("--hardware", default="cpu_gloo_loopback")
    parser.add_argument("--trace-cache", default=None)
    args = parser.parse_args()
    rows = compare(read_measurements(args.measured), args.hardware, args.trace_cache)
    print(markdown(rows))


if __name__ == "__main__":
    main()

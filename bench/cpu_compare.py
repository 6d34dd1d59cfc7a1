"""Compare the simulator's predictions with `bench/cpu_validation.py` measurements.

    python bench/cpu_compare.py m1.jsonl m2.jsonl [--hardware cpu_gloo_loopback] [--trace-cache DIR]

For every measured JSON line, predicts the same run (model, resolution, world size, mode,
split_cfg, steps, warm-up steps, float32) on `--hardware` with the calibration profile that
was sampled alongside it (the line's `profile`), and prints a Markdown table of measured vs
predicted generation latency and the error.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from simulator import CalibrationProfile, load_hardware
from simulator.predict import predict


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
                     "error": r.latency_s / m["latency_s"] - 1, "comm_s": r.comm_s,
                     "comm_exposed_s": r.comm_exposed_s})
    return rows


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    lines = ["| ranks | mode | split_cfg | measured (s) | predicted (s) | error | predicted comm / exposed (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['world_size']} | {r['mode']} | {r['split_cfg']} | {r['measured_s']:.3f} | "
                     f"{r['predicted_s']:.3f} | {r['error']:+.1%} | {r['comm_s']:.3f} / {r['comm_exposed_s']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    """CLI: read the measurements, predict, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("measured", type=Path, nargs="+", help="JSON lines of bench/cpu_validation.py")
    parser.add_argument("--hardware", default="cpu_gloo_loopback")
    parser.add_argument("--trace-cache", default=None)
    args = parser.parse_args()
    measured = [json.loads(line) for path in args.measured for line in path.read_text().splitlines()
                if line.startswith("{")]
    rows = compare(measured, args.hardware, args.trace_cache)
    print(markdown(rows))


if __name__ == "__main__":
    main()

"""What one rank's steady displaced step costs beyond the UNet itself, counted on the CPU.

    python bench/step_traffic.py [--sizes 1024x8,2048x4,3840x8] [--dtype float16]

For each (resolution, ranks) of SDXL, records one rank's steady step on the `meta` device
(the simulator's op counter: every aten op's bytes read + written and its launch) in mode
`displaced` and in mode `naive_patch`, which runs the same layers on the same rows but
exchanges nothing. Self-attention is left out of both (displaced attends over all tokens,
naive over its own, so their attention differs by design), so the difference is what the
exchanges add: halo rows, GroupNorm statistics, K/V handling. Prints per size the bytes and
launches of both, their ratio, and the op kinds that make up the difference. No GPU needed:
these are the memory passes a GPU step pays for, which is where the per-rank overhead goes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from simulator.workload import load_or_record  # noqa: E402


def steady_ops(res: int, n: int, mode: str, dtype: str, cache: str) -> Counter:
    """(kind -> [bytes, launches]) of the recorded rank's steady step, attention excluded."""
    trace = load_or_record("sdxl", res, n, mode, dtype=dtype, cache_dir=cache)
    totals: Counter = Counter()
    for event in trace["roles"][0]["phases"]["steady"]:
        for op in event.get("ops", []) if event["type"] == "compute" else []:
            if op["kind"] != "sdpa":
                totals[(op["kind"], "bytes")] += op["bytes"]
                totals[(op["kind"], "launches")] += op["count"]
    return totals


def compare(res: int, n: int, dtype: str, cache: str) -> dict:
    """Displaced vs naive_patch traffic of one rank at (res, n)."""
    ops = {mode: steady_ops(res, n, mode, dtype, cache) for mode in ("displaced", "naive_patch")}
    total = {mode: {what: sum(v for (_, w), v in c.items() if w == what) for what in ("bytes", "launches")}
             for mode, c in ops.items()}
    extra = Counter({kind: ops["displaced"][(kind, "bytes")] - ops["naive_patch"][(kind, "bytes")]
                     for kind, what in ops["displaced"] if what == "bytes"})
    return {"res": res, "n": n, "dtype": dtype,
            "displaced_gib": total["displaced"]["bytes"] / 2**30, "naive_gib": total["naive_patch"]["bytes"] / 2**30,
            "bytes_ratio": total["displaced"]["bytes"] / total["naive_patch"]["bytes"],
            "displaced_launches": total["displaced"]["launches"], "naive_launches": total["naive_patch"]["launches"],
            "extra_gib_by_kind": {k: v / 2**30 for k, v in extra.most_common(6) if v > 0}}


def main() -> None:
    """CLI: one table row per size, then one JSON line with every row."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1024x8,2048x4,3840x8", help="resolution x ranks, comma separated")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--trace-cache", default=None, help="default: a fresh temporary directory")
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in item.split("x")) for item in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [compare(res, n, args.dtype, args.trace_cache or tmp) for res, n in sizes]
    print("| res | N | displaced GiB | naive_patch GiB | ratio | launches displaced / naive | largest extra (GiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        extra = ", ".join(f"{k} {v:.2f}" for k, v in r["extra_gib_by_kind"].items())
        print(f"| {r['res']} | {r['n']} | {r['displaced_gib']:.2f} | {r['naive_gib']:.2f} | {r['bytes_ratio']:.3f} | "
              f"{r['displaced_launches']} / {r['naive_launches']} | {extra} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()

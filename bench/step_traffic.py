"""What one rank's steady displaced step costs beyond the UNet itself, and what it receives,
counted on the CPU.

    python bench/step_traffic.py [--sizes 1024x8,2048x4,3840x8] [--dtype float16]
    python bench/step_traffic.py --received [--compress none,fp8,int8,int8+delta] [--sizes 2048x4,3840x8]

Memory passes (the default): for each (resolution, ranks) of SDXL, records one rank's steady
step on the `meta` device (the simulator's op counter: every aten op's bytes read + written and
its launch) in mode `displaced` and in mode `naive_patch`, which runs the same layers on the
same rows but exchanges nothing. Self-attention is left out of both (displaced attends over all
tokens, naive over its own, so their attention differs by design), so the difference is what the
exchanges add: halo rows, GroupNorm statistics, K/V handling. Prints per size the bytes and
launches of both, their ratio, and the op kinds that make up the difference. No GPU needed:
these are the memory passes a GPU step pays for, which is where the per-rank overhead goes.

Received (`--received`): the bytes one rank receives from the others in a steady displaced step,
from the recorded collectives (an all-gather of b bytes per rank over g ranks brings b*(g-1)),
by layer kind (the tag's prefix: `attn` K/V, `conv` halo rows, `norm` GroupNorm statistics,
`output` the final gather), for each `parallel.compress` (`int8+delta`: with `parallel.delta`),
and how many times fewer than uncompressed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from simulator.topology import ring_plan  # noqa: E402
from simulator.workload import load_or_record  # noqa: E402

KINDS = ("attn", "conv", "norm", "output")


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


def received(res: int, n: int, compress: str, dtype: str, cache: str) -> dict:
    """Bytes one rank receives per steady displaced step at (res, n), by layer kind, with
    `compress` ("none", "fp8", "int8", optionally "+delta")."""
    kind, _, delta = compress.partition("+")
    trace = load_or_record("sdxl", res, n, "displaced", dtype=dtype, cache_dir=cache, compress=kind,
                           delta=delta == "delta")
    by_kind: Counter = Counter()
    for event in trace["roles"][0]["phases"]["steady"]:
        if event["type"] == "issue":
            by_kind[(event["tag"] or "").split(":")[0]] += ring_plan(event["kind"], event["bytes"],
                                                                     event["group_size"])[1]
    return {"res": res, "n": n, "dtype": dtype, "compress": compress, "total": sum(by_kind.values()),
            **{k: by_kind[k] for k in KINDS}}


def print_received(rows: list[dict]) -> None:
    """The received-bytes table (MiB), each row's total against its size's uncompressed one."""
    print("| res | N | compress | " + " | ".join(f"{k} MiB" for k in KINDS) + " | total MiB | fewer than none |")
    print("|---|---|---|" + "---|" * (len(KINDS) + 2))
    for r in rows:
        none = next(o for o in rows if (o["res"], o["n"], o["compress"]) == (r["res"], r["n"], "none"))
        r["fewer"] = none["total"] / r["total"]
        cells = " | ".join(f"{r[k] / 2**20:.2f}" for k in (*KINDS, "total"))
        print(f"| {r['res']} | {r['n']} | {r['compress']} | {cells} | {r['fewer']:.2f}x |")


def main() -> None:
    """CLI: one table row per size, then one JSON line with every row."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1024x8,2048x4,3840x8", help="resolution x ranks, comma separated")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--trace-cache", default=None, help="default: a fresh temporary directory")
    parser.add_argument("--received", action="store_true", help="bytes received per steady step, not memory passes")
    parser.add_argument("--compress", default="none,fp8,int8,int8+delta", help="with --received: comma separated")
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in item.split("x")) for item in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.trace_cache or tmp
        if args.received:
            rows = [received(res, n, c, args.dtype, cache) for res, n in sizes for c in ["none", *(
                c for c in args.compress.split(",") if c != "none")]]
            print_received(rows)
            print(json.dumps(rows))
            return
        rows = [compare(res, n, args.dtype, cache) for res, n in sizes]
    print("| res | N | displaced GiB | naive_patch GiB | ratio | launches displaced / naive | largest extra (GiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        extra = ", ".join(f"{k} {v:.2f}" for k, v in r["extra_gib_by_kind"].items())
        print(f"| {r['res']} | {r['n']} | {r['displaced_gib']:.2f} | {r['naive_gib']:.2f} | {r['bytes_ratio']:.3f} | "
              f"{r['displaced_launches']} / {r['naive_launches']} | {extra} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()

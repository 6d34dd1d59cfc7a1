"""The compute model against the H100 reference measurements (bench/reference/), row by row.

    python bench/compute_model_report.py [--fit] [--cache DIR]

Prints, for every row of the ceiling and displaced-step files, measured vs predicted ms per
step (`simulator.predict.rank_compute_seconds` on the `h100_sxm_nvlink` preset), the error, the
kernel count and where the predicted time goes (launch overhead, GEMMs, attention, memory-bound
ops); then the worst error with parts of the model removed (no launch cost, no wave
quantization, 128x128 GEMM tiles). `--fit` redoes the grid fit of the preset's efficiencies on
the ceiling rows alone and reports the error it gives on the displaced rows, which it never saw.
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from simulator import kernel_model, load_hardware  # noqa: E402
from simulator.ceiling import load_or_record_ceiling  # noqa: E402
from simulator.hardware import Hardware  # noqa: E402
from simulator.predict import rank_compute_seconds  # noqa: E402
from simulator.workload import load_or_record  # noqa: E402

REFERENCE = Path(__file__).resolve().parent / "reference"


def rows(cache: str | None) -> list[dict]:
    """Every reference row with its trace: ceiling (batch 1, N patches) and displaced (split CFG)."""
    out = []
    for r in json.loads((REFERENCE / "h100_sdxl_patch_ceiling.json").read_text())["rows"]:
        trace = load_or_record_ceiling("sdxl", r["res"], r["n"], split_cfg=False, cfg=False, cache_dir=cache)
        out.append({"what": "ceiling", "res": r["res"], "n": r["n"], "measured_ms": r["ms_per_step"], "trace": trace})
    steps = json.loads((REFERENCE / "h100_sdxl_displaced_step.json").read_text())["per_rank_displaced_split_cfg_ms"]
    for res, by_n in steps.items():
        for n, ms in by_n.items():
            trace = load_or_record("sdxl", int(res), int(n), "displaced", split_cfg=True, cache_dir=cache)
            out.append({"what": "displaced", "res": int(res), "n": int(n), "measured_ms": ms, "trace": trace})
    return out


def steady_ops(trace: dict) -> list[dict]:
    return [op for ev in trace["roles"][0]["phases"]["steady"] if ev["type"] == "compute" for op in ev["ops"]]


def breakdown_ms(trace: dict, hardware: Hardware) -> dict[str, float]:
    """Predicted ms of the steady step by part: launch overhead, GEMMs, attention, the rest."""
    device = hardware.device
    parts = {"launch": 0.0, "gemm": 0.0, "attention": 0.0, "memory": 0.0}
    for op in steady_ops(trace):
        launch = device.launch_overhead * op["count"]
        part = ("gemm" if op["kind"] in kernel_model.GEMM_KINDS else
                "attention" if op["kind"] == kernel_model.ATTENTION else "memory")
        parts["launch"] += 1e3 * launch
        parts[part] += 1e3 * (kernel_model.kernel_seconds(op, device, "float16") - launch)
    return parts


def worst_error(table: list[dict], hardware: Hardware) -> float:
    return max(abs(rank_compute_seconds(r["trace"], hardware) * 1e3 / r["measured_ms"] - 1) for r in table)


def with_device(hardware: Hardware, **changes) -> Hardware:
    return dataclasses.replace(hardware, device=dataclasses.replace(hardware.device, **changes))


def ablations(table: list[dict], hardware: Hardware) -> dict[str, float]:
    """Worst error of the model as is and with one part taken out."""
    out = {"model": worst_error(table, hardware),
           "no launch overhead": worst_error(table, with_device(hardware, launch_overhead=0.0)),
           "no wave quantization": worst_error(table, with_device(hardware, sm_count=1))}
    tile, kernel_model.GEMM_TILE = kernel_model.GEMM_TILE, (128, 128)
    try:
        out["128x128 GEMM tiles"] = worst_error(table, hardware)
    finally:
        kernel_model.GEMM_TILE = tile
    return out


def fit_on_ceiling(table: list[dict], hardware: Hardware) -> dict:
    """Grid fit of flops / attention efficiency and launch overhead on the ceiling rows alone."""
    train = [r for r in table if r["what"] == "ceiling"]
    held_out = [r for r in table if r["what"] == "displaced"]
    grid = itertools.product((0.5, 0.55, 0.6, 0.65, 0.7, 0.75), (0.34, 0.36, 0.38, 0.4, 0.42, 0.44),
                             (2.0e-6, 2.5e-6, 3.0e-6, 3.5e-6, 4.0e-6))
    best = min(grid, key=lambda p: worst_error(train, with_device(hardware, flops_efficiency=p[0],
                                                                     attention_efficiency=p[1],
                                                                     launch_overhead=p[2])))
    fitted = with_device(hardware, flops_efficiency=best[0], attention_efficiency=best[1], launch_overhead=best[2])
    return {"flops_efficiency": best[0], "attention_efficiency": best[1], "launch_overhead": best[2],
            "train_worst": worst_error(train, fitted), "held_out_worst": worst_error(held_out, fitted)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fit", action="store_true", help="refit on the ceiling rows, check on the displaced ones")
    parser.add_argument("--cache", default=None, help="trace cache directory (default: the simulator's)")
    args = parser.parse_args()
    hardware = load_hardware("h100_sxm_nvlink")
    table = rows(args.cache)
    print("| what | res | N | measured ms | predicted ms | error | kernels | launch | GEMM | attention | memory |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        predicted = 1e3 * rank_compute_seconds(r["trace"], hardware)
        parts = breakdown_ms(r["trace"], hardware)
        kernels = sum(op["count"] for op in steady_ops(r["trace"]))
        print(f"| {r['what']} | {r['res']} | {r['n']} | {r['measured_ms']:.2f} | {predicted:.2f} | "
              f"{100 * (predicted / r['measured_ms'] - 1):+.1f}% | {kernels} | " +
              " | ".join(f"{parts[k]:.1f}" for k in ("launch", "gemm", "attention", "memory")) + " |")
    summary = {"worst_error": ablations(table, hardware)}
    for name, err in summary["worst_error"].items():
        print(f"worst error, {name}: {100 * err:.1f}%")
    if args.fit:
        summary["fit_on_ceiling"] = fit_on_ceiling(table, hardware)
        print(f"fit on the ceiling rows: {summary['fit_on_ceiling']}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

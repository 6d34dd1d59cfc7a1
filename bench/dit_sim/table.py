"""The simulator's view of a diffusion transformer: FLUX.1-dev at 2048 x 2048 (issue 17).

    python bench/dit_sim/table.py [--out bench/dit_sim] [--steps 28]

Predicts FLUX.1-dev (bfloat16, FluxPipeline's 28 steps, no CFG batch: the model is
guidance-distilled) at 2048 x 2048 px on 1, 2, 4 and 8 GPUs of each preset, in modes displaced
(4 synchronous warm-up steps), sync_patch and naive_patch (the lower bound on latency, not an
image anyone wants), each against one GPU running the model whole. The 2-node presets are placed
as 2 nodes of N/2 GPUs, `a100_2node_1nic` with one 100 Gb/s NIC per node
(`bench/compression_sim/table.py`'s `hardware`). Then, per N: what one rank receives in a steady
step (from the recorded collectives), its stale K/V buffers and its peak memory. Everything comes
from traces of the real code recorded on the meta device (cached). Writes `table.md` and
`results.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.compression_sim.table import hardware  # noqa: E402
from simulator.predict import predict  # noqa: E402
from simulator.topology import ring_plan  # noqa: E402
from simulator.workload import load_or_record  # noqa: E402

MODEL, RES, DTYPE = "flux_dev", 2048, "bfloat16"
HARDWARE = ("h100_sxm_nvlink", "a100_sxm_nvlink", "h100_pcie", "a100_pcie", "l40s_pcie", "h100_2node", "a100_2node",
            "a100_2node_1nic")
DEVICES = (2, 4, 8)
MODES = ("displaced", "sync_patch", "naive_patch")
GIB = 2**30


def prediction(name: str, n: int, mode: str, steps: int):
    return predict(MODEL, RES, n, mode, hardware(name, n), steps, cfg=False, dtype=DTYPE)


def speedups(steps: int) -> list[dict]:
    """Per preset: one GPU's latency, and per N and mode the speedup, step and exposed communication."""
    rows = []
    for name in HARDWARE:
        single = prediction(name, 2, "displaced", steps)  # its baseline is one GPU, mode none
        row = {"hardware": name, "single_latency_s": single.baseline_latency_s,
               "single_step_ms": single.single_step_s * 1e3, "runs": {}}
        for n in DEVICES:
            for mode in MODES:
                p = prediction(name, n, mode, steps)
                s = p.summary()
                row["runs"][f"{n}:{mode}"] = {k: s[k] for k in (
                    "speedup", "latency_s", "step_ms", "rank_compute_ms_per_step", "ceiling_speedup", "comm_s",
                    "comm_exposed_s", "comm_hidden_fraction", "peak_memory_gib_per_rank", "fits_in_memory")}
        rows.append(row)
    return rows


def per_rank(steps: int) -> dict:
    """Per N (displaced): bytes a rank receives in a steady step, by kind; its stale buffers and peak memory."""
    out = {}
    for n in DEVICES:
        trace = load_or_record(MODEL, RES, n, "displaced", cfg=False, dtype=DTYPE)
        issues = [e for e in trace["roles"][0]["phases"]["steady"] if e["type"] == "issue"]
        received = {kind: sum(ring_plan(e["kind"], e["bytes"], e["group_size"])[1] for e in issues
                              if e["tag"].startswith(kind)) for kind in ("attn", "output")}
        s = prediction("h100_sxm_nvlink", n, "displaced", steps).summary()
        out[n] = {"gathers_per_step": len(issues), "kv_bytes_per_layer": issues[0]["bytes"],
                  "received_attn_gib": received["attn"] / GIB, "received_output_gib": received["output"] / GIB,
                  "stale_buffer_gib": s["stale_buffer_gib_per_rank"], "weights_gib": s["weights_gib_per_rank"],
                  "peak_gib": s["peak_memory_gib_per_rank"], "peak_phase": s["peak_memory_phase"]}
    return out


def render(rows: list[dict], ranks: dict, steps: int) -> str:
    head = " | ".join(f"{n} GPUs" for n in DEVICES)
    lines = [f"FLUX.1-dev {RES}x{RES}, {DTYPE}, {steps} steps: speedup over one GPU, displaced / sync_patch / "
             "naive_patch (exposed communication of displaced / sync_patch, s):", "",
             f"| hardware | 1 GPU (s) | {head} |", "|---|---|" + "---|" * len(DEVICES)]
    for row in rows:
        label = row["hardware"] + (" (2 nodes x N/2)" if hardware(row["hardware"], 2).interconnect.kind == "multinode"
                                   else "")
        cells = []
        for n in DEVICES:
            r = {mode: row["runs"][f"{n}:{mode}"] for mode in MODES}
            cells.append(" / ".join(f"{r[m]['speedup']:.2f}x" for m in MODES)
                         + f" ({r['displaced']['comm_exposed_s']:.2f} / {r['sync_patch']['comm_exposed_s']:.2f})")
        lines.append(f"| {label} | {row['single_latency_s']:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "Steady step of one rank, displaced / sync_patch (ms), and the compute-only ceiling of the speedup:",
              "", f"| hardware | 1 GPU | {head} |", "|---|---|" + "---|" * len(DEVICES)]
    for row in rows:
        cells = [f"{row['runs'][f'{n}:displaced']['step_ms']:.0f} / {row['runs'][f'{n}:sync_patch']['step_ms']:.0f} "
                 f"(ceiling {row['runs'][f'{n}:displaced']['ceiling_speedup']:.2f}x)" for n in DEVICES]
        lines.append(f"| {row['hardware']} | {row['single_step_ms']:.0f} | " + " | ".join(cells) + " |")
    lines += ["", "Per rank, displaced (from the recorded trace; memory per `simulator.memory.peak_memory`):", "",
              "| N | gathers per step | K/V bytes per layer sent | received per step (GiB): K/V + output | "
              "stale buffers (GiB) | weights (GiB) | peak (GiB, phase) |", "|---|---|---|---|---|---|---|"]
    for n, r in ranks.items():
        lines.append(f"| {n} | {r['gathers_per_step']} | {r['kv_bytes_per_layer'] / 2**20:.1f} MiB | "
                     f"{r['received_attn_gib']:.2f} + {r['received_output_gib']:.3f} | {r['stale_buffer_gib']:.2f} | "
                     f"{r['weights_gib']:.2f} | {r['peak_gib']:.2f} ({r['peak_phase']}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--steps", type=int, default=28)
    args = parser.parse_args()
    rows, ranks = speedups(args.steps), per_rank(args.steps)
    table = render(rows, ranks, args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table)
    setup = {"model": MODEL, "resolution": RES, "dtype": DTYPE, "steps": args.steps, "cfg": False, "warmup_steps": 4}
    (args.out / "results.json").write_text(json.dumps({"setup": setup, "speedups": rows, "per_rank": ranks}, indent=1))
    print(table)


if __name__ == "__main__":
    main()

"""The simulator's view of the compressed stale exchange (`parallel.compress`, issue 15).

    python bench/compression_sim/table.py [--out bench/compression_sim]

Predicts SDXL (float16, 50 steps, CFG) at 2048 and 3840 px on 4 and 8 GPUs, displaced with
warm-up 4, uncompressed and with 8-bit payloads (`int8`; `fp8` sends the same bytes, its codec
time is in the second table), split CFG on and off, on PCIe presets, NVLink, and a 2-node
preset placed as 2 nodes of N/2 GPUs (`hardware.interconnect.gpus_per_node=N/2`; with the
preset's 8 GPUs per node N <= 8 would stay inside one node), once with the preset's NIC per GPU
and once with one 100 Gb/s NIC per node (`a100_2node_1nic`: `nic_bandwidth=12.5e9`). Then, at
3840 px on 8 GPUs, the per-rank memory (`simulator.memory.peak_memory`) and the (de)quantisation
kernels' time per steady step (one rank's priced steady compute, compressed minus uncompressed).
Everything comes from traces of the real code recorded on the meta device (cached). Writes
`table.md` and `results.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from simulator import load_hardware  # noqa: E402
from simulator.hardware import Hardware  # noqa: E402
from simulator.memory import peak_memory  # noqa: E402
from simulator.predict import predict  # noqa: E402

HARDWARE = ("a100_pcie", "h100_pcie", "a100_2node", "a100_2node_1nic", "h100_2node", "h100_sxm_nvlink")
ONE_NIC = 12.5e9  # bytes/s: "_1nic", one 100 Gb/s NIC per node instead of one per GPU
SIZES = ((2048, 4), (2048, 8), (3840, 4), (3840, 8))
CODECS = (("int8", False), ("fp8", False), ("int8", True))
GIB = 2**30


def hardware(name: str, n: int) -> Hardware:
    """Preset `name`; a multi-node one with its `n` GPUs on two nodes (and, named `*_1nic`,
    one 100 Gb/s NIC per node)."""
    hw = load_hardware(name.removesuffix("_1nic"))
    if hw.interconnect.kind != "multinode":
        return hw
    nics = {"nic_bandwidth": ONE_NIC} if name.endswith("_1nic") else {}
    return dataclasses.replace(hw, interconnect=dataclasses.replace(hw.interconnect, gpus_per_node=n // 2, **nics))


def speedups() -> list[dict]:
    """Speedup over one GPU and exposed communication, uncompressed and int8, per setup."""
    rows = []
    for name in HARDWARE:
        for split in (True, False):
            for res, n in SIZES:
                row = {"hardware": name, "split_cfg": split, "resolution": res, "devices": n}
                for compress in ("none", "int8"):
                    p = predict("sdxl", res, n, "displaced", hardware(name, n), 50, split_cfg=split, compress=compress)
                    row[compress] = {"speedup": p.speedup, "latency_s": p.latency_s,
                                     "comm_exposed_s": p.result.comm_exposed_s}
                rows.append(row)
    return rows


def codec_and_memory(res: int = 3840, n: int = 8) -> dict:
    """Per-rank memory and the codec's ms per steady step (each preset) at (res, n), split CFG."""
    out = {}
    for compress, delta in (("none", False), *CODECS):
        m = peak_memory("sdxl", res, n, "displaced", compress=compress, delta=delta)
        codec_ms = {}
        for name in HARDWARE:
            on = {c: predict("sdxl", res, n, "displaced", hardware(name, n), 50, compress=c, delta=d).rank_compute_s
                  for c, d in (("none", False), (compress, delta))}
            codec_ms[name] = 1e3 * (on[compress] - on["none"])
        out[compress + ("+delta" if delta else "")] = {
            "stale_buffer_gib": m["stale_buffer_bytes"] / GIB, "peak_gib": m["peak_bytes"] / GIB,
            "peak_phase": m["peak_phase"], "denoise_gib": m["phases"]["denoise"] / GIB, "codec_ms": codec_ms}
    return out


def render(rows: list[dict], per_rank: dict) -> str:
    sizes = [f"{res} px, {n} GPUs" for res, n in SIZES]
    lines = ["Speedup over one GPU, uncompressed / int8 (exposed communication, s):", "",
             "| hardware | split CFG | " + " | ".join(sizes) + " |", "|---|---|" + "---|" * len(SIZES)]
    for name in HARDWARE:
        for split in (True, False):
            cells = [f"{r['none']['speedup']:.2f}x / {r['int8']['speedup']:.2f}x "
                     f"({r['none']['comm_exposed_s']:.2f} / {r['int8']['comm_exposed_s']:.2f})"
                     for r in rows if (r["hardware"], r["split_cfg"]) == (name, split)]
            label = f"{name} (2 nodes x N/2)" if hardware(name, 2).interconnect.kind == "multinode" else name
            lines.append(f"| {label} | {'yes' if split else 'no'} | " + " | ".join(cells) + " |")
    lines += ["", "Per rank at 3840 px on 8 GPUs, split CFG: memory (GiB) and the codec's time per steady step (ms):",
              "", "| compress | stale buffers | denoising peak | peak (phase) | " + " | ".join(HARDWARE) + " |",
              "|---|---|---|---|" + "---|" * len(HARDWARE)]
    for kind, m in per_rank.items():
        lines.append(f"| {kind} | {m['stale_buffer_gib']:.2f} | {m['denoise_gib']:.2f} | {m['peak_gib']:.2f} "
                     f"({m['peak_phase']}) | " + " | ".join(f"{m['codec_ms'][h]:.1f}" for h in HARDWARE) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    rows, per_rank = speedups(), codec_and_memory()
    table = render(rows, per_rank)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table)
    (args.out / "results.json").write_text(json.dumps({"speedups": rows, "per_rank_3840x8": per_rank}, indent=1))
    print(table)


if __name__ == "__main__":
    main()

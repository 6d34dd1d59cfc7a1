"""How fast the simulator answers: one big prediction, a 60-point sweep, an `advise`.

    python bench/simulator_speed.py

(a) `python -m simulator model=sdxl resolution=3840 world_size=8 hardware=a100_sxm_nvlink
    parallel=displaced steps=50` with its traces cached (goal < 5 s), as a whole command and
    as the in-process `predict(...).summary()` alone (the JSON line: whole generation, memory);
(b) the multirun of 3 resolutions x 4 world sizes x 5 presets = 60 points, once from an empty
    trace cache (recording included) and once cached (goal < 1 min);
(c) `python -m simulator advise model=sdxl resolution=2048 hardware=a100_pcie max_devices=8`,
    cached (its traces are (b)'s but for the sync, naive and no-split-CFG ones: recorded first).

Uses a fresh trace cache in a temporary directory; prints the times and one JSON line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from simulator import load_hardware
from simulator.predict import predict

ADVISE = ["advise", "model=sdxl", "resolution=2048", "hardware=a100_pcie", "max_devices=8"]
ONE = ["model=sdxl", "resolution=3840", "world_size=8", "hardware=a100_sxm_nvlink", "parallel=displaced", "steps=50"]
SWEEP = ["-m", "model=sdxl", "resolution=1024,2048,3840", "world_size=1,2,4,8",
         "hardware=a100_sxm_nvlink,a100_pcie,h100_sxm_nvlink,h100_pcie,l40s_pcie"]


def timed_app(args: list[str], cache: Path, out: Path) -> float:
    """Seconds of one `python -m simulator` command (raises if it fails)."""
    cmd = [sys.executable, "-m", "simulator", *args, f"trace_cache={cache}", f"hydra.run.dir={out}",
           f"hydra.sweep.dir={out}"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def main() -> None:
    """Run both measurements and print them."""
    with tempfile.TemporaryDirectory() as tmp:
        cache, out = Path(tmp) / "traces", Path(tmp) / "out"
        timed_app(ONE, cache, out / "record")  # record the traces: not timed
        one_app = timed_app(ONE, cache, out / "one")
        start = time.perf_counter()
        predict("sdxl", 3840, 8, "displaced", load_hardware("a100_sxm_nvlink"), 50, cache_dir=cache).summary()
        one_call = time.perf_counter() - start
        sweep_cache = Path(tmp) / "sweep_traces"
        cold = timed_app(SWEEP, sweep_cache, out / "sweep_cold")
        warm = timed_app(SWEEP, sweep_cache, out / "sweep_warm")
        rows = (out / "sweep_warm" / "results.csv").read_text().count("\n") - 1
        advise_cold = timed_app(ADVISE, sweep_cache, out / "advise_cold")
        advise_warm = timed_app(ADVISE, sweep_cache, out / "advise_warm")
    print(f"(a) sdxl 3840px 8x displaced 50 steps, cached: {one_app:.2f} s command, {one_call:.2f} s predict()")
    print(f"(b) {rows}-point sweep: {cold:.1f} s from an empty cache, {warm:.1f} s cached")
    print(f"(c) advise sdxl 2048px a100_pcie up to 8: {advise_cold:.1f} s recording what (b) did not, "
          f"{advise_warm:.1f} s cached")
    print(json.dumps({"one_command_s": one_app, "one_predict_s": one_call, "sweep_points": rows,
                      "sweep_cold_s": cold, "sweep_cached_s": warm, "advise_cold_s": advise_cold,
                      "advise_cached_s": advise_warm}))


if __name__ == "__main__":
    main()

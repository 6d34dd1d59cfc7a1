"""`python -m distrifusion` end to end in float16 and bfloat16 on every backend, N = 1, 2, 4
(Open MPI in float16: tests/test_generate_app.py).

Rank 0 decodes and broadcasts the image; the launched backends check every collective's dtype
across ranks (`backend.validate`), so a run that ends well had one image dtype on every rank.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launchers import backend_of, launch_command
from test_app import run_app

SMALL = ("sampler.steps=3", "parallel.warmup_steps=1")


def _check_outputs(out: Path, world_size: int) -> None:
    report = json.loads((out / f"tiny_displaced_{world_size}ranks_seed0.json").read_text())
    assert report["world_size"] == world_size and len(report["step_times_s"]) == 3
    assert (out / f"tiny_displaced_{world_size}ranks_seed0.png").stat().st_size > 0


def test_fake_ranks_in_half_precision(tmp_path):
    """One Hydra multirun: N = 1, 2, 4 in float16 and bfloat16 (six generations, one process)."""
    proc = run_app("-m", "backend=fake", "world_size=1,2,4", "model.dtype=float16,bfloat16", *SMALL,
                   f"output_dir={tmp_path}/${{model.dtype}}", f"hydra.sweep.dir={tmp_path}/sweep")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for dtype in ("float16", "bfloat16"):
        for n in (1, 2, 4):
            _check_outputs(tmp_path / dtype, n)


@pytest.mark.parametrize("launcher,world_size,dtype", [
    ("torch", 2, "bfloat16"), ("torch", 4, "float16"), ("mpich", 4, "bfloat16")])
def test_launched_ranks_in_half_precision(tmp_path, launcher, world_size, dtype):
    cmd, env = launch_command(launcher, world_size)
    proc = subprocess.run([*cmd, sys.executable, "-m", "distrifusion", f"backend={backend_of(launcher)}",
                           f"model.dtype={dtype}", f"output_dir={tmp_path}", *SMALL],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_outputs(tmp_path, world_size)

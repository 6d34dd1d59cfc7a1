"""The `python -m distrifusion` Hydra app: config resolution, clear errors, the demo on each backend."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run_app(*overrides: str, launcher: tuple[str, ...] = (), timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [*launcher, sys.executable, "-m", "distrifusion", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_cfg_job_shows_the_resolved_config():
    proc = run_app("--cfg", "job", "backend=mpi")
    assert proc.returncode == 0, proc.stderr
    assert "name: mpi" in proc.stdout and "world_size: null" in proc.stdout


@pytest.mark.parametrize("override,message", [
    ("backend=nccl", "Available options in 'backend'"),
    ("nonsense=1", "Key 'nonsense' not in"),
    ("task=paint", "expected one of"),
    ("parallel.mode=fast", "ParallelConfig.mode must be one of"),
])
def test_bad_options_fail_with_the_allowed_choices(override, message):
    proc = run_app(override)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout


def test_allgather_demo_on_fake_ranks():
    proc = run_app("task=allgather_demo", "backend=fake", "world_size=3", "demo.mib=1")
    assert proc.returncode == 0, proc.stderr
    result = last_json(proc.stdout)
    assert result["verified"] and result["out_shape"] == [3, 262144]
    assert proc.stdout.count("all-gathered") == 1  # rank 0 alone reports

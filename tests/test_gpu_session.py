"""bench/gpu_session.sh, the prepared GPU command: its CPU dry run exercises every part (so it
cannot rot before a GPU session), without the packages the GPU machine lacks, and its results
survive a part that fails or runs out of time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from simulator import CalibrationProfile

ROOT = Path(__file__).resolve().parents[1]
MODES = ("naive_patch", "sync_patch", "displaced")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """`bash bench/gpu_session.sh --dry-run`, with hydra and omegaconf unimportable as on the GPU machine."""
    out, stubs = tmp_path_factory.mktemp("session"), tmp_path_factory.mktemp("stubs")
    for name in ("hydra", "omegaconf"):
        (stubs / f"{name}.py").write_text("raise ImportError('not on the GPU machine')\n")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(stubs), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_session.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=280)
    return proc, out


def test_the_dry_run_measures_every_part(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "gpu_session.json").read_text())
    assert (out / "gpu_session.log").read_text().strip()
    assert results["meta"]["dry_run"] is True
    parts = results["parts"]

    generations = parts["generations"]
    expected = {f"{dtype} N={n} {mode}" for dtype in ("float16", "bfloat16")
                for n, mode in [(1, "none")] + [(n, m) for n in (2, 8) for m in MODES]
                + [(8, f"displaced {c}") for c in ("int8", "fp8", "int8 delta")]}
    assert set(generations) == expected
    for name, item in generations.items():
        assert item["ok"] and item["finite"], (name, item)
        assert len(item["step_ms"]) == 4 and all(ms > 0 for ms in item["step_ms"])
    assert generations["bfloat16 N=1 none"]["output_dtype"] == "torch.float32"  # the decoded image

    for name, row in parts["per_rank"].items():
        assert row["ok"] and row["displaced_ms"] > 0 and row["ideal_ms"] > 0, (name, row)
        assert row["ratio"] == pytest.approx(row["displaced_ms"] / row["ideal_ms"])

    checks = parts["latency"]["checks"]
    assert {"app_denoising_vs_graphed_steps", "speedup_vs_stock_eager"} <= set(checks)

    profiles = set()
    for name, item in parts["calibration"].items():
        assert item["ok"] and item["replay"] == "graph", (name, item)
        profiles.add(item["profile"])
    (profile,) = profiles
    assert len(CalibrationProfile.load(out / profile).entries) > 0

    vae = parts["vae"]  # 70 px: 35 latent rows, dealt 18 and 17
    assert set(vae) == {"70 N=1", "70 N=2"}
    for name, item in vae.items():
        assert item["ok"] and item["decode_s"] > 0 and item["image_shape"] == [1, 3, 70, 70], (name, item)


def test_a_failing_or_late_item_is_recorded_and_the_rest_still_runs(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_session
    finally:
        sys.path.pop(0)
    path = tmp_path / "results.json"
    results = gpu_session.Results(path, {"device": "cpu"})
    part = gpu_session.Part(results, "part", budget_s=60, device="cpu")
    part.item("fails", lambda: 1 / 0)
    assert json.loads(path.read_text())["parts"]["part"]["fails"]["ok"] is False  # written at once
    part.item("works", lambda: {"value": 1})
    late = gpu_session.Part(results, "late", budget_s=-1, device="cpu")
    late.item("never", lambda: pytest.fail("ran past its part's budget"))
    written = json.loads(path.read_text())["parts"]
    assert "ZeroDivisionError" in written["part"]["fails"]["error"]
    assert written["part"]["works"] == {**written["part"]["works"], "ok": True, "value": 1}
    assert "skipped" in written["late"]["never"]
    assert part.failures == 1 and late.failures == 0

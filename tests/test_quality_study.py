"""bench/quality_study.py: cells found on disk become the tables and the plot, in a fixed order,
with each cell's own numbers (the study itself runs the app: tests/test_quality_trained.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import quality_study  # noqa: E402

sys.path.pop(0)


def _cell(out: Path, name: str, ranks: int, size: int, split: bool, psnr: float) -> None:
    mean = {v: {"psnr_db": psnr + i, "psnr_db_sd": 0.5, "ssim": 0.9 + i / 100, "latent_rel_err": 0.1 / (i + 1)}
            for i, v in enumerate(("naive_patch", "displaced w4 corrected"))}
    config = {"quality": {"seeds": [0, 1, 2]}, "parallel": {"split_cfg": split}, "model": {"height": size}}
    (out / name).mkdir(parents=True)
    (out / name / "quality.json").write_text(json.dumps({"config": config, "world_size": ranks, "mean": mean}))


def test_cells_become_ordered_tables_and_a_plot(tmp_path):
    _cell(tmp_path, "n8_128px_nosplit", 8, 128, False, 10.0)
    _cell(tmp_path, "n8_128px", 8, 128, True, 30.0)
    _cell(tmp_path, "n4_128px", 4, 128, True, 20.0)
    _cell(tmp_path, "n4_64px", 4, 64, True, 40.0)
    cells = quality_study.load_cells(tmp_path)
    assert list(cells) == [(True, 4, 64), (True, 4, 128), (True, 8, 128), (False, 8, 128)]
    text = quality_study.table(cells)
    head = ("| variant | N=4, 64 px (3 seeds) | N=4, 128 px (3 seeds) | N=8, 128 px (3 seeds) "
            "| N=8 no split, 128 px (3 seeds) |")
    assert text.count(head) == 3
    assert "| naive_patch | 40.0 ± 0.5 | 20.0 ± 0.5 | 30.0 ± 0.5 | 10.0 ± 0.5 |" in text
    assert "| displaced w4 corrected | 0.9100 | 0.9100 | 0.9100 | 0.9100 |" in text
    assert "| displaced w4 corrected | 5.0e-02 | 5.0e-02 | 5.0e-02 | 5.0e-02 |" in text
    assert "against the variant in brackets" not in text  # no cell compares variants with each other
    quality_study.plot(cells, tmp_path / "psnr.png")
    assert (tmp_path / "psnr.png").stat().st_size > 10_000


def test_variants_scored_against_each_other_get_their_own_tables(tmp_path):
    _cell(tmp_path, "n4_128px", 4, 128, True, 30.0)
    found = json.loads((tmp_path / "n4_128px" / "quality.json").read_text())
    found["mean"]["displaced w4 corrected"] |= {"latent_rel_err_sd": 0.01, "against": "sync_patch",
                                                "against_psnr_db": 50.0, "against_psnr_db_sd": 1.5,
                                                "against_latent_rel_err": 0.03, "against_latent_rel_err_sd": 0.002}
    (tmp_path / "n4_128px" / "quality.json").write_text(json.dumps(found))
    text = quality_study.table(quality_study.load_cells(tmp_path))
    assert "| naive_patch | 1.0e-01 |" in text and "| displaced w4 corrected | 5.0e-02 ± 1.0e-02 |" in text
    assert "| displaced w4 corrected (vs sync_patch) | 50.0 ± 1.5 |" in text
    assert "| displaced w4 corrected (vs sync_patch) | 3.0e-02 ± 2.0e-03 |" in text
    assert "naive_patch (vs" not in text

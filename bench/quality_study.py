"""The quality study on the trained `tiny` model: `task=quality` for each rank count and resolution.

Each cell (N ranks, image size) is one run of `python -m distrifusion task=quality` on fake ranks,
written to `OUT/n{N}_{size}px/` (quality.json, quality_grid.png); a cell already there with the
same seeds is not run again, so a long study can be stopped and resumed, and cells can be added
later with other seed counts. Every cell found in OUT goes into `OUT/table.md` and `OUT/psnr.png`.
With split CFG (the default) N ranks make N/2 patches per guidance branch, so N = 2 is exact;
`--no-split-cfg` runs N patches (cells `n{N}_{size}px_nosplit`). `--set` passes overrides to
every run (pick the variants with them; a cell already there is kept whatever they were).

    python bench/quality_study.py --ranks 4 --scales 2 --seeds 16     # the done-when cell
    python bench/quality_study.py --ranks 2 4 8 --scales 1 2 4 --seeds 4
    python bench/quality_study.py --out bench/quality_compress/trained --ranks 4 --scales 2 --seeds 4 \
        --set 'quality.baselines=[sync_patch]' 'quality.warmups=[]' 'quality.groupnorms=[]' \
        'quality.deltas=[false,true]'                                 # issue 15's compression cell
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

MODEL_PATH = "bench/tiny_trained"
TRAINING_SIZE = 64


def run_cell(out: Path, ranks: int, size: int, seeds: list[int], prompt: str, steps: int, split_cfg: bool,
             model_path: str = MODEL_PATH, overrides: tuple[str, ...] = ()) -> Path:
    """Run one cell unless OUT already holds it with these seeds; returns its quality.json.
    An empty `model_path` runs the tiny model's random weights."""
    cell = out / f"n{ranks}_{size}px{'' if split_cfg else '_nosplit'}"
    result = cell / "quality.json"
    if result.exists() and json.loads(result.read_text())["config"]["quality"]["seeds"] == seeds:
        print(f"{cell.name}: done before, kept")
        return result
    start = time.perf_counter()
    command = [sys.executable, "-m", "distrifusion", "task=quality", "backend=fake", f"world_size={ranks}",
               *([f"model.path={model_path}"] if model_path else []), f"model.height={size}", f"model.width={size}",
               f"prompt={prompt}", f"sampler.steps={steps}", f"quality.seeds=[{','.join(map(str, seeds))}]",
               f"output_dir={cell}", f"parallel.split_cfg={str(split_cfg).lower()}", *overrides]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    print(f"{cell.name}: {len(seeds)} seeds in {time.perf_counter() - start:.0f} s")
    return result


Cell = tuple[bool, int, int]  # (split CFG, ranks, image size)


def load_cells(out: Path) -> dict[Cell, dict]:
    """Every finished cell in OUT by (split CFG, ranks, size), split CFG first, then by size and ranks."""
    cells = {}
    for path in out.glob("n*_*px*/quality.json"):
        found = json.loads(path.read_text())
        config = found["config"]
        cells[(config["parallel"]["split_cfg"], found["world_size"], config["model"]["height"])] = found
    return dict(sorted(cells.items(), key=lambda kv: (not kv[0][0], kv[0][2], kv[0][1])))


def _error(key: str):
    """A relative error's mean, with its standard deviation where the cell has one."""
    return lambda m: f"{m[key]:.1e}" + (f" ± {m[key + '_sd']:.1e}" if key + "_sd" in m else "")


METRICS = {  # title: (the key a variant needs to be shown, how)
    "PSNR against the single-device image, dB (mean ± sd over seeds)":
        ("psnr_db", lambda m: f"{m['psnr_db']:.1f} ± {m['psnr_db_sd']:.1f}"),
    "SSIM against the single-device image (mean)": ("ssim", lambda m: f"{m['ssim']:.4f}"),
    "Relative error of the final latents (mean)": ("latent_rel_err", _error("latent_rel_err")),
    "PSNR against the variant in brackets, dB (mean ± sd over seeds)":
        ("against", lambda m: f"{m['against_psnr_db']:.1f} ± {m['against_psnr_db_sd']:.1f}"),
    "Relative error of the final latents against the variant in brackets (mean ± sd over seeds)":
        ("against", _error("against_latent_rel_err")),
}


def table(cells: dict[Cell, dict]) -> str:
    """Markdown: per metric, one row per variant that has it and one column per cell."""
    head = [f"N={n}{'' if split else ' no split'}, {size} px ({len(c['config']['quality']['seeds'])} seeds)"
            for (split, n, size), c in cells.items()]
    variants = list(dict.fromkeys(v for c in cells.values() for v in c["mean"]))
    parts = []
    for title, (key, show) in METRICS.items():
        lines = [f"**{title}**", "", "| variant | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
        for name in variants:
            means = [c["mean"].get(name, {}) for c in cells.values()]
            if any(key in m for m in means):
                against = next((f" (vs {m['against']})" for m in means if key == "against" and "against" in m), "")
                lines.append(f"| {name}{against} | " + " | ".join(show(m) if key in m else "" for m in means) + " |")
        if len(lines) > 4:
            parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def plot(cells: dict[Cell, dict], path: Path) -> None:
    """PSNR against the patches per image, one panel per (split CFG, resolution), one line per
    variant; cells without patches (N = 2 with split CFG: exact) are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((split, size) for split, _, size in cells))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), sharey=True, squeeze=False)
    for ax, (split, size) in zip(axes[0], panels):
        mine = {n // 2 if split else n: c for (sp, n, s), c in cells.items() if (sp, s) == (split, size)}
        mine = {patches: c for patches, c in mine.items() if patches > 1}
        for name in dict.fromkeys(v for c in mine.values() for v in c["mean"]):
            if name == "sync_patch":  # exact: its PSNR is fp32 rounding, off the chart
                continue
            xs = [p for p in mine if name in mine[p]["mean"]]
            ax.plot(xs, [mine[p]["mean"][name]["psnr_db"] for p in xs], marker="o", label=name)
        ax.set_title(f"{size} px ({size // TRAINING_SIZE}x training size){'' if split else ', no CFG split'}",
                     fontsize=10)
        ax.set_xlabel("row patches per image" + (" (N/2 ranks)" if split else " (N ranks)"))
        ax.set_xticks(sorted(mine))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("PSNR vs single device (dB)")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1 - 1.6 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/quality_tiny_trained"))
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 2, 4], help="multiples of the 64 px training size")
    parser.add_argument("--seeds", type=int, default=16, help="seeds 0..SEEDS-1")
    parser.add_argument("--prompt", default="brick", help="one of the training images' names")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-split-cfg", dest="split_cfg", action="store_false",
                        help="run N patches instead of N/2 per classifier-free-guidance branch")
    parser.add_argument("--model-path", default=MODEL_PATH, help="'' for the tiny model's random weights")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for scale in args.scales:
        for ranks in args.ranks:
            run_cell(args.out, ranks, TRAINING_SIZE * scale, list(range(args.seeds)), args.prompt, args.steps,
                     args.split_cfg, args.model_path, tuple(args.set))
    cells = load_cells(args.out)
    (args.out / "table.md").write_text(table(cells))
    plot(cells, args.out / "psnr.png")
    print(table(cells))


if __name__ == "__main__":
    main()

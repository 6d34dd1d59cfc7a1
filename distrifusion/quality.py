"""The `quality` task: how far patch-parallel images are from the single-device ones.

For each seed it generates the reference under `none`, then every variant the config names
(`sync_patch`, `naive_patch`, `displaced` per warm-up count and per GroupNorm policy and per
compression of what it sends), and reports PSNR and SSIM of the image and the relative error of
the final latents against the reference (and LPIPS when the `lpips` package is installed).
Compressed variants are also scored against uncompressed `displaced`, and that against
`sync_patch` (`compared_with`): compression is cheap when its error is below displacement's.
Rank 0 writes `quality.json` and a picture grid, `quality_grid.png`: single device, displaced,
naive, and their differences from the single-device image, amplified, because seams are judged
by eye.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from backends import Communicator

from .generate import run_generation
from .parallel_config import ParallelConfig
from .quality_grid import save_grid


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1]."""
    mse = torch.mean((image.float() - reference.float()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def ssim(image: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean structural similarity (scikit-image) of two (1, 3, H, W) images in [0, 1]."""
    from skimage.metrics import structural_similarity

    def hwc(x: torch.Tensor):
        return x[0].permute(1, 2, 0).double().cpu().numpy()

    return float(structural_similarity(hwc(image), hwc(reference), channel_axis=2, data_range=1.0))


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    """||x - reference|| / ||reference||, in float64."""
    return (torch.linalg.vector_norm((x - reference).double()) / torch.linalg.vector_norm(reference.double())).item()


def _lpips():
    try:
        import lpips
    except ImportError:
        return None
    return lpips.LPIPS(net="alex", verbose=False)


def variants(cfg: DictConfig) -> dict[str, ParallelConfig]:
    """The variants compared with `none`, by name: the baselines, `displaced` at each warm-up count
    (with `parallel.groupnorm`), then each GroupNorm policy (at `parallel.warmup_steps`), all
    uncompressed whatever `parallel.compress` says, then `displaced` at `parallel.warmup_steps` and
    `parallel.groupnorm` sending each of the compressions with each delta setting."""
    base = {**OmegaConf.to_container(cfg.parallel), "compress": "none", "delta": False}
    found = {mode: ParallelConfig(**{**base, "mode": mode}) for mode in cfg.quality.baselines}
    runs = [(w, base["groupnorm"]) for w in cfg.quality.warmups]
    runs += [(base["warmup_steps"], gn) for gn in cfg.quality.groupnorms]
    runs += [(base["warmup_steps"], base["groupnorm"])] if cfg.quality.compressions else []
    for w, gn in dict.fromkeys(runs):
        found[displaced_name(w, gn)] = ParallelConfig(**{**base, "mode": "displaced", "warmup_steps": w,
                                                         "groupnorm": gn})
    for kind in cfg.quality.compressions:
        for delta in dict.fromkeys(cfg.quality.deltas):
            found[displaced_name(base["warmup_steps"], base["groupnorm"], kind, delta)] = ParallelConfig(
                **{**base, "mode": "displaced", "compress": kind, "delta": delta})
    return found


def displaced_name(warmup: int, groupnorm: str, compress: str = "none", delta: bool = False) -> str:
    """The row name of `displaced` with this warm-up count, GroupNorm policy and compression."""
    return f"displaced w{warmup} {groupnorm}" + ("" if compress == "none" else f" {compress}") + " delta" * delta


def compared_with(cfg: DictConfig, found: dict[str, ParallelConfig]) -> dict[str, str]:
    """The variant each of `found` is also scored against: every compressed `displaced` against the
    uncompressed one at the same settings, and that against `sync_patch` (when both are there)."""
    plain = displaced_name(cfg.parallel.warmup_steps, cfg.parallel.groupnorm)
    pairs = {name: plain for name, parallel in found.items() if parallel.compress != "none"}
    if pairs and "sync_patch" in found:
        pairs[plain] = "sync_patch"
    return pairs


def scores(got: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """PSNR of the image and relative error of the final latents of a generation against another."""
    return {"psnr_db": psnr(got["image"], reference["image"]),
            "latent_rel_err": relative_error(got["latents"], reference["latents"])}


def references(comm: Communicator, cfg: DictConfig) -> dict[int, dict[str, torch.Tensor]]:
    """The single-device image and final latents of every seed, each generated once, the seeds
    dealt out over the ranks and all-gathered (mode `none` needs no other rank)."""
    seeds = list(cfg.quality.seeds)
    found: dict[int, dict[str, torch.Tensor]] = {}
    for start in range(0, len(seeds), comm.world_size):
        # a rank past the last seed repeats it, so no rank waits a whole generation in the gather
        mine = seeds[min(start + comm.rank, len(seeds) - 1)]
        with comm.split(comm.rank) as alone:  # a pipeline on N ranks returns rank 0's image
            got = run_generation(alone, cfg, ParallelConfig(mode="none"), mine, progress=comm.rank == 0)
        images = comm.all_gather(got["image"].contiguous(), tag="quality:reference")
        latents = comm.all_gather(got["latents"].contiguous(), tag="quality:reference")
        for r, seed in enumerate(seeds[start:start + comm.world_size]):
            found[seed] = {"image": images[r], "latents": latents[r]}
    return found


def quality(comm: Communicator, cfg: DictConfig) -> list[dict]:
    """Run the study; rank 0 prints the table and writes `quality.json` and `quality_grid.png`."""
    metric = _lpips() if comm.rank == 0 else None
    refs = references(comm, cfg)
    shown = list(cfg.quality.seeds)[:cfg.quality.grid_seeds]
    found = variants(cfg)
    pairs = compared_with(cfg, found)
    rows, kept = [], {}
    for seed in cfg.quality.seeds:
        ref, done = refs[seed], {}
        for name, parallel in found.items():
            got = done[name] = run_generation(comm, cfg, parallel, seed)
            row = {"seed": seed, "variant": name, **scores(got, ref), "ssim": ssim(got["image"], ref["image"])}
            if name in pairs:
                against = scores(got, done[pairs[name]])
                row |= {"against": pairs[name], **{f"against_{k}": v for k, v in against.items()}}
            if metric is not None:
                row["lpips"] = metric(got["image"].float().cpu() * 2 - 1, ref["image"].float().cpu() * 2 - 1).item()
            rows.append(row)
            if seed in shown:
                kept[(seed, name)] = got["image"]
    if comm.rank == 0:
        _report(cfg, comm.world_size, rows, refs, kept, shown)
    return rows


def _report(cfg: DictConfig, world_size: int, rows: list[dict], refs: dict, kept: dict, shown: list[int]) -> None:
    summary = summarise(rows)
    print(f"quality vs none: {cfg.model.name} ({cfg.model.path or 'random weights'}), "
          f"{cfg.sampler.steps} steps, {world_size} ranks, seeds {list(cfg.quality.seeds)}")
    print(f"{'variant':<34}{'PSNR dB':>9}{'± sd':>7}{'SSIM':>8}{'latent rel err':>16}")
    for name, r in summary.items():
        against = (f"   against {r['against']}: {r['against_psnr_db']:.2f} dB, {r['against_latent_rel_err']:.2e}"
                   if "against" in r else "")
        print(f"{name:<34}{r['psnr_db']:>9.2f}{r['psnr_db_sd']:>7.2f}{r['ssim']:>8.4f}{r['latent_rel_err']:>16.2e}"
              + against)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps({"config": OmegaConf.to_container(cfg, enum_to_str=True),
                                                  "world_size": world_size, "rows": rows, "mean": summary},
                                                 indent=1, default=str))
    displaced = displaced_name(cfg.parallel.warmup_steps, cfg.parallel.groupnorm)
    columns = [name for name in (displaced, "naive_patch") if (shown and (shown[0], name) in kept)]
    if columns:
        grid = save_grid(out / "quality_grid.png", [refs[s]["image"] for s in shown],
                         {name: [kept[(s, name)] for s in shown] for name in columns}, cfg.quality.amplify)
        print(f"grid: {grid} (seeds {shown}; differences x{cfg.quality.amplify:g})")
    print(json.dumps(summary))


def summarise(rows: list[dict]) -> dict[str, dict]:
    """Per variant over the seeds: the mean of every metric and, as `{metric}_sd`, the standard
    deviation of its finite values (an exact variant's PSNR is infinite); `against` as it is."""
    summary: dict[str, dict] = {}
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        summary[name] = {k: v for k, v in mine[0].items() if k == "against"}
        for key in [k for k in mine[0] if k not in ("seed", "variant", "against")]:
            values = [r[key] for r in mine]
            finite = [v for v in values if math.isfinite(v)]
            summary[name] |= {key: sum(values) / len(values), f"{key}_sd": statistics.pstdev(finite) if finite else 0.0}
    return summary

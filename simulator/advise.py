"""Which setup is fastest on this hardware: `python -m simulator advise ...`.

    python -m simulator advise model=sdxl resolution=2048 hardware=a100_pcie max_devices=8 [steps=50] [top=10] \\
        [graphs=warm]

(`advise` is short for `task=advise`; `max_devices` defaults to the preset's device count.)
Predicts the whole generation for every device count up to `max_devices` whose row patches
the model's latent height allows, split CFG on and off, modes displaced (warm-up 1, 2 and 4
synchronous steps) and sync_patch, plus the one-device baseline; prints the `top` fastest with
their speedup, exposed communication and peak memory per rank (and whether it fits the
device, where the preset gives its memory), then says where adding devices stops paying: the
next doubling gains less than `GAIN_WORTH_IT`, or the peak memory per rank hardly shrinks
(the weights, the stale K/V of the whole image and the VAE decode of the whole image do not
shrink with N). naive_patch is listed apart as a lower bound only: it drops the halo and the
other patches' K/V, and its images are not acceptable. The last line is one JSON object
(`advise`'s result).

Each trace is recorded once: the warm-up count only changes `meta.warmup_steps`
(`predict.with_warmup`), so a configuration's three warm-ups replay the same trace.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .compute_model import CalibrationProfile
from .hardware import Hardware
from .predict import Prediction, predict
from .vae_decode import DEFAULT_CHUNK_MIB

LOWER_BOUND_MODE = "naive_patch"  # quality not acceptable: a lower bound on latency only
WARMUPS = (1, 2, 4)
GAIN_WORTH_IT = 0.10  # a doubling of the devices that gains less does not pay
MEMORY_SHRINKS = 0.90  # a doubling that leaves more of the peak memory per rank does not shrink it


@dataclass(frozen=True)
class Setup:
    """One configuration tried; `warmup_steps` is None where the mode has no warm-up to choose."""

    devices: int
    split_cfg: bool
    mode: str
    warmup_steps: int | None


def device_counts(model: str, resolution: int, max_devices: int, split_cfg: bool, cfg: bool = True) -> list[int]:
    """Device counts >= 2 up to `max_devices` whose row patches the model's latent height allows.

    With split CFG (and CFG on) a count must be even and each guidance branch's image is cut
    into half as many patches. A diffusion transformer's patches are rows of its token grid, as
    uneven as need be but at least one row each.
    """
    from distrifusion.model_configs import get_spec
    from distrifusion.patch_unet import check_height

    from .unet_run import latent_size

    spec = get_spec(model)
    latent = latent_size(model, resolution)
    split = split_cfg and cfg

    def fits(patches: int) -> bool:
        if spec.unet is None:
            return patches <= latent // spec.latent_pixels_per_token
        levels = len(spec.unet["down_block_types"]) - 1  # diffusers halves after every down block but the last
        try:
            check_height(latent, patches, levels)
        except ValueError:
            return False
        return True

    return [n for n in range(2, max_devices + 1) if not (split and n % 2) and fits(n // 2 if split else n)]


def setups(model: str, resolution: int, max_devices: int, cfg: bool = True) -> list[Setup]:
    """The one-device baseline and every configuration `advise` tries, naive_patch included."""
    out = [Setup(1, False, "none", None)]
    for split_cfg in ((True, False) if cfg else (False,)):
        for n in device_counts(model, resolution, max_devices, split_cfg, cfg):
            out += [Setup(n, split_cfg, "displaced", w) for w in WARMUPS]
            out += [Setup(n, split_cfg, mode, None) for mode in ("sync_patch", LOWER_BOUND_MODE)]
    return out


def option(setup: Setup, p: Prediction) -> dict[str, Any]:
    """One configuration's figures, as the JSON and the table give them."""
    s = p.summary()
    return {"devices": setup.devices, "split_cfg": setup.split_cfg, "mode": setup.mode,
            "warmup_steps": setup.warmup_steps, "latency_s": s["latency_s"], "speedup": s["speedup"],
            "ceiling_speedup": s["ceiling_speedup"],
            "step_ms": s["step_ms"], "comm_s": s["comm_s"], "comm_exposed_s": s["comm_exposed_s"],
            "comm_hidden_fraction": s["comm_hidden_fraction"],
            "peak_memory_gib_per_rank": s["peak_memory_gib_per_rank"], "peak_memory_phase": s["peak_memory_phase"],
            "stale_buffer_gib_per_rank": s["stale_buffer_gib_per_rank"], "weights_gib_per_rank": s["weights_gib_per_rank"],
            "vae_decode_gib": s["vae_decode_gib"], "vae_decode": s["vae_decode"],
            "fits_in_memory": s["fits_in_memory"],
            "lower_bound": setup.mode == LOWER_BOUND_MODE}


def verdict(options: list[dict[str, Any]]) -> dict[str, Any]:
    """Where adding devices stops paying, in latency and in memory, and why, in sentences.

    Compares the fastest acceptable configuration (fitting the memory where that is known) of
    each device count with that of twice as many. `stops_paying_at`: the first count whose
    doubling gains less than `GAIN_WORTH_IT` (else the most devices tried);
    `memory_stops_shrinking_at`: the first count whose doubling leaves more than
    `MEMORY_SHRINKS` of the peak memory per rank (None if every doubling shrinks it).
    """
    best: dict[int, dict[str, Any]] = {}
    for o in options:
        if not o["lower_bound"] and o["fits_in_memory"] is not False:
            if o["devices"] not in best or o["latency_s"] < best[o["devices"]]["latency_s"]:
                best[o["devices"]] = o
    if not best:
        return {"stops_paying_at": None, "memory_stops_shrinking_at": None,
                "notes": ["no configuration fits the device's memory"]}
    doublings = [(best[n], best[2 * n]) for n in sorted(best) if 2 * n in best]
    slow = next(((a, b) for a, b in doublings if a["latency_s"] / b["latency_s"] - 1 < GAIN_WORTH_IT), None)
    if slow is None:
        stop = max(best)
        notes = [f"every doubling up to {stop} devices gains at least {GAIN_WORTH_IT:.0%}"]
    else:
        a, b = slow
        stop, gain = a["devices"], a["latency_s"] / b["latency_s"] - 1
        change = f"gains {gain:.0%} (< {GAIN_WORTH_IT:.0%})" if gain >= 0 else f"is {-gain:.0%} slower"
        notes = [f"{_devices(stop)} -> {b['devices']} {change}: adding devices stops paying at {stop}"]
    flat = next(((a, b) for a, b in doublings
                 if b["peak_memory_gib_per_rank"] > MEMORY_SHRINKS * a["peak_memory_gib_per_rank"]), None)
    if flat is None:
        notes.append(f"every doubling lowers the peak memory per rank by more than {1 - MEMORY_SHRINKS:.0%}")
    else:
        a, b = flat
        kept = {"the weights": b["weights_gib_per_rank"],
                "the stale activations (the whole image's K/V)": b["stale_buffer_gib_per_rank"],
                ("the VAE decode of rank 0's rows" if b["vae_decode"] == "patch"
                 else "the VAE decode of the whole image (rank 0)"): b["vae_decode_gib"]}
        notes.append(f"from {_devices(a['devices'])} on, more devices hardly lower the peak memory per rank "
                     f"({a['peak_memory_gib_per_rank']:.1f} GiB on {a['devices']}, "
                     f"{b['peak_memory_gib_per_rank']:.1f} on {b['devices']}, at the {b['peak_memory_phase']}); "
                     f"what does not shrink with N: "
                     + ", ".join(f"{what} {gib:.3g} GiB" for what, gib in kept.items()
                                 if gib >= 0.05 * b["peak_memory_gib_per_rank"]))
    return {"stops_paying_at": stop, "memory_stops_shrinking_at": None if flat is None else flat[0]["devices"],
            "notes": notes}


def _devices(n: int) -> str:
    return f"{n} device" if n == 1 else f"{n} devices"


def advise(model: str, resolution: int, hardware: Hardware, max_devices: int, steps: int, cfg: bool = True,
           dtype: str = "float16", groupnorm: str = "corrected", profile: CalibrationProfile | None = None,
           cache_dir: str | Path | None = None, graphs: str = "cold", progress: bool = True, vae: str = "patch",
           vae_chunk_mib: int = DEFAULT_CHUNK_MIB, compress: str = "none", delta: bool = False) -> dict[str, Any]:
    """Predict every setup of `setups` and rank them (decoding as `vae`, `vae_chunk_mib` say, the
    displaced setups sending as `compress`, `delta` say: see `predict`); the JSON
    `python -m simulator advise` prints.

    `configurations` holds the acceptable ones sorted by latency, `lower_bound` the naive_patch
    ones; then `verdict`'s keys (`stops_paying_at`, `memory_stops_shrinking_at`, `notes`).
    """
    if max_devices > hardware.num_devices:
        raise ValueError(f"max_devices={max_devices} but {hardware.name} has {hardware.num_devices} devices")
    todo = setups(model, resolution, max_devices, cfg)
    options = []
    for setup in _progress(todo, progress, f"{model} {resolution}px on {hardware.name}"):
        p = predict(model, resolution, setup.devices, setup.mode, hardware, steps,
                    warmup_steps=setup.warmup_steps or 1, groupnorm=groupnorm, split_cfg=setup.split_cfg, cfg=cfg,
                    dtype=dtype, profile=profile, cache_dir=cache_dir, graphs=graphs, vae=vae,
                    vae_chunk_mib=vae_chunk_mib, compress=compress, delta=delta)
        options.append(option(setup, p))
    options.sort(key=lambda o: (o["latency_s"], o["devices"]))  # a tie goes to fewer devices
    return {"model": model, "resolution": resolution, "hardware": hardware.name, "max_devices": max_devices,
            "steps": steps, "dtype": dtype, "cfg": cfg, "graphs": graphs, "vae": vae, "vae_chunk_mib": vae_chunk_mib,
            "compress": compress, "delta": delta, "configurations": [o for o in options if not o["lower_bound"]],
            "lower_bound": [o for o in options if o["lower_bound"]], **verdict(options)}


def _progress(items: list, show: bool, desc: str) -> Iterable:
    if not show:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="config", file=sys.stderr, leave=False)


def _row(o: dict[str, Any]) -> str:
    warm = "-" if o["warmup_steps"] is None else str(o["warmup_steps"])
    fits = {None: "", True: "yes", False: "NO"}[o["fits_in_memory"]]
    return (f"{o['devices']:>7} {'yes' if o['split_cfg'] else 'no':>9} {o['mode']:<11} {warm:>7} "
            f"{o['latency_s']:>10.3f}s {o['speedup']:>7.2f}x {o['comm_exposed_s']:>10.3f}s "
            f"{o['peak_memory_gib_per_rank']:>9.1f} GiB {fits:>4}")


def render(advice: dict[str, Any], top: int = 10) -> str:
    """The table `python -m simulator advise` prints: the `top` fastest, the lower bound, the verdict."""
    head = (f"{'devices':>7} {'split CFG':>9} {'mode':<11} {'warm-up':>7} {'latency':>11} {'speedup':>8} "
            f"{'exposed':>11} {'peak/rank':>13} {'fits':>4}")
    a = advice
    lines = [f"{a['model']} {a['resolution']}px, {a['steps']} steps, {a['dtype']} on {a['hardware']} "
             f"(up to {a['max_devices']} devices): the {min(top, len(a['configurations']))} fastest "
             f"of {len(a['configurations'])}", head]
    lines += [_row(o) for o in a["configurations"][:top]]
    if a["lower_bound"]:
        lines.append("lower bound only (naive_patch: no halo, no stale K/V; its images are not acceptable):")
        best = {}
        for o in a["lower_bound"]:
            best.setdefault(o["devices"], o)
        lines += [_row(o) for _, o in sorted(best.items())]
    lines += ["verdict:"] + [f"  {n}" for n in a["notes"]]
    return "\n".join(lines)

"""The compute-only ceiling of patch parallelism: one rank's UNet step with nothing exchanged.

The rank convolves exactly its own latent rows (zero padding, no halo) and its self-attention
attends over all of its image's tokens (the other patches' K/V are copies of its own), so no
patch-parallel runtime can do a rank's step with less work. A diffusion transformer's rank runs
its own image tokens (and the text tokens) through every block, its attention over all image
tokens. The single-device step divided by
this one is the best speedup patch parallelism can reach on a device before communication
(`shared/reference/h100_sdxl_patch_ceiling.json` measured it on an H100). With split CFG a
rank's image is cut into `world_size / 2` patches, as in the real run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .workload import cached


def load_or_record_ceiling(model: str, resolution: int, world_size: int, split_cfg: bool = True, cfg: bool = True,
                           dtype: str = "float16", cache_dir: str | Path | None = None) -> dict[str, Any]:
    """The ceiling of `model` at `resolution` on `world_size` ranks as a trace without
    collectives (`full_token_attention.record_ceiling`), from the trace cache when there (no
    torch import then). `predict.rank_compute_seconds` prices its step; `simulate` replays it."""
    args = {"model": model, "resolution": int(resolution), "world_size": int(world_size), "mode": "ceiling",
            "split_cfg": bool(split_cfg), "cfg": bool(cfg), "dtype": dtype}
    def produce() -> dict[str, Any]:
        from .full_token_attention import record_ceiling

        return record_ceiling(model, resolution, world_size, split_cfg, cfg, dtype)

    return cached(args, produce, cache_dir)

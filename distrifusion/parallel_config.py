"""`ParallelConfig`: how a model is run across the ranks of a communicator."""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("none", "naive_patch", "sync_patch", "displaced")
GROUPNORMS = ("separate", "stale", "corrected", "sync")
SPLITS = ("rows",)
VAES = ("patch", "none")
COMPRESSIONS = ("none", "fp8", "int8")


@dataclass
class ParallelConfig:
    """Options of `distrifusion.parallelize`; the defaults are the paper's.

    mode: "none" (no patches: every rank runs the whole model), "naive_patch" (patches never
        interact; shows seams), "sync_patch" (fresh activations exchanged synchronously at
        every layer; exact), "displaced" (DistriFusion: stale activations, async exchange).
    warmup_steps: steps run as sync_patch before the displaced regime starts (at least one
        step always is: there is nothing stale before the first).
    groupnorm: statistics in the displaced regime: "separate" (local only), "stale" (last
        step's global), "corrected" (stale global plus this step's local change), "sync" (exact).
    split_cfg: run the two classifier-free-guidance branches on two halves of the ranks.
    split: how the latent is cut into patches ("rows": along the height).
    cuda_graph: on CUDA, replay steady steps (every step of mode none) as CUDA graphs (eager,
        with a log line, where capture is impossible).
    vae: how the image is decoded when the UNet is patch-parallel: "patch" (every rank decodes
        its rows, exactly, and the rows are gathered; `distrifusion.patch_vae`) or "none" (rank 0
        decodes the whole latent and broadcasts the image). Mode "none" always decodes whole.
    vae_chunk_mib: the patched decode runs each convolution in row chunks whose input is at most
        this many MiB, which bounds its temporaries (0: whole patches).
    compress: how displaced steps send K/V and halo rows: "none" (the model's dtype), "fp8"
        (e4m3) or "int8", with a float32 scale per block of 128 values (`distrifusion.compression`);
        the received stale buffers stay 8-bit until a layer reads them. Warm-up steps and
        GroupNorm statistics are never compressed.
    delta: with `compress`, send the change since the last step instead of the values; every
        rank then keeps full-precision copies of all patches (more memory, less error).
    """

    mode: str = "displaced"
    warmup_steps: int = 4
    groupnorm: str = "corrected"
    split_cfg: bool = True
    split: str = "rows"
    cuda_graph: bool = True
    vae: str = "patch"
    vae_chunk_mib: int = 256
    compress: str = "none"
    delta: bool = False

    def __post_init__(self) -> None:
        for name, allowed in (("mode", MODES), ("groupnorm", GROUPNORMS), ("split", SPLITS), ("vae", VAES),
                              ("compress", COMPRESSIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ParallelConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"ParallelConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.vae_chunk_mib < 0:
            raise ValueError(f"ParallelConfig.vae_chunk_mib must be >= 0, got {self.vae_chunk_mib}")
        if self.delta and self.compress == "none":
            raise ValueError("ParallelConfig.delta=true needs compress=fp8 or int8 (uncompressed values are exact)")

"""The transformer-level forward of a diffusion transformer (PixArt, SD3, Flux): the whole model
(mode "none"), or this rank's row patch of image tokens (the patch modes).

The patched forward splits the guidance branches over the two halves of the ranks (split CFG),
counts steps (synchronous warm-up, then displaced), and runs the transformer's own forward with
layer patches a family adapter installed (`patch_pixart`, `patch_sd3`, `patch_flux`): this
rank's tokens taken from the whole-latent patch embedding or from the packed tokens, the
attention processors of `dit_attention`, and the all-gather of every rank's final tokens
(`TokenGather`), after which the transformer's own unpatchify sees the whole token grid.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from .compressed_exchange import activation_exchange
from .cuda_graph import StepGraphs
from .denoiser_forward import DenoiserForward, take_branch
from .dit_attention import PatchTokenAttention, PatchTokens, check_attention
from .patch_context import PatchContext
from .token_rows import TokenRows

# inputs of whole-grid residuals or extra K/V the patched blocks would not cut or exchange
UNSUPPORTED_INPUTS = ("block_controlnet_hidden_states", "controlnet_block_samples", "controlnet_single_block_samples")
UNSUPPORTED_ATTENTION_INPUTS = ("ip_adapter_image_embeds", "ip_hidden_states")


class DiTForward(DenoiserForward):
    """The mode "none" forward of a diffusion transformer (see `DenoiserForward`)."""

    def __init__(self, model: torch.nn.Module, cuda_graph: bool = True):
        super().__init__(model, "hidden_states", Transformer2DModelOutput, cuda_graph)


class PatchDiTForward(DiTForward):
    """The replacement `transformer.forward` of the patch modes: runs this rank's patch.

    `take_tokens(inputs)` (the family adapter's) returns the inputs with this rank's tokens where
    the adapter slices them before the model runs (Flux), and sets `tokens.rows`/`tokens.text`.
    `shared` names the inputs that every guidance branch uses whole (not split by batch).
    """

    def __init__(self, model: torch.nn.Module, ctx: PatchContext, tokens: PatchTokens,
                 take_tokens: Callable[[dict], dict] = lambda inputs: inputs, shared: tuple[str, ...] = ()):
        super().__init__(model, ctx.config.cuda_graph)
        self.ctx, self.tokens, self.take_tokens, self.shared = ctx, tokens, take_tokens, shared
        self.split_guidance = True
        self.graphs = StepGraphs(self._graph_step, before_capture=ctx.finish, latent=self.latent)

    def run(self, inputs: dict) -> torch.Tensor:
        unsupported = [name for name in UNSUPPORTED_INPUTS if inputs.get(name) is not None]
        unsupported += [name for name in UNSUPPORTED_ATTENTION_INPUTS if name in (inputs.get("joint_attention_kwargs") or {})]
        if unsupported:
            raise ValueError(f"patch parallelism does not support {unsupported} (ControlNet/IP-Adapter) yet")
        ctx = self.ctx
        batch = inputs["hidden_states"].shape[0]
        ctx.use_branches(2 if self.split_guidance and ctx.can_split(batch) else 1)
        if ctx.branches == 2:
            inputs = {k: v if k in self.shared else take_branch(v, ctx.branch, batch) for k, v in inputs.items()}
        inputs = self.take_tokens(inputs)
        if self.cuda_graph and inputs["hidden_states"].is_cuda and not ctx.sync_step:
            full = self.graphs(inputs, key=(ctx.branches,))
        else:
            full = self._step(**inputs)
        ctx.step += 1
        return full

    def _graph_step(self, **inputs: Any) -> torch.Tensor:
        full = self._step(**inputs)
        self.ctx.finish()  # a replay runs no Python: its gathers must complete within it
        return full


class RowsOfPatchEmbed:
    """Forward of a `PatchEmbed` (PixArt, SD3) on the whole latent, keeping this rank's token
    rows: position embeddings are those of each token's place in the whole grid, and the
    stride-p convolution on the whole latent costs little beside the blocks."""

    def __init__(self, embed: torch.nn.Module, ctx: PatchContext, tokens: PatchTokens):
        self.original, self.ctx, self.tokens = embed.forward, ctx, tokens
        self.patch_size = embed.patch_size

    def __call__(self, latent: torch.Tensor) -> torch.Tensor:
        p, ctx = self.patch_size, self.ctx
        rows = TokenRows(latent.shape[-2] // p, latent.shape[-1] // p, ctx.world_size, ctx.rank)
        self.tokens.rows = rows
        return rows.take(self.original(latent), 1)


class TokenGather:
    """Forward of the transformer's last projection followed by the all-gather of every rank's
    (B, tokens, C) output into the whole batch's whole token sequence, in one reused buffer."""

    def __init__(self, proj: torch.nn.Module, ctx: PatchContext, tokens: PatchTokens):
        self.original, self.ctx, self.tokens = proj.forward, ctx, tokens
        self.buffer: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        ctx, rows = self.ctx, self.tokens.rows
        local = rows.pad(self.original(x).transpose(0, 1), 0).contiguous()  # (largest, B, C)
        shape = (ctx.world_comm.world_size, *local.shape)
        if self.buffer is None or self.buffer.shape != shape or self.buffer.dtype != local.dtype:
            self.buffer = ctx.allocate(shape, local.dtype, local.device)
        parts = ctx.world_comm.all_gather(local, out=self.buffer, tag="output:transformer")
        whole = rows.join(parts.view(ctx.branches, ctx.world_size, *local.shape), dim=1)  # (branches, L, B, C)
        b, c = local.shape[1], local.shape[2]
        return whole.permute(0, 2, 1, 3).reshape(ctx.branches * b, -1, c)


def patch_attention(attn: torch.nn.Module, ctx: PatchContext, tokens: PatchTokens, tag: str,
                    text_prefix: bool = False) -> None:
    """Give `attn` the patch processor, its image K/V exchanged under `tag`."""
    check_attention(attn)
    attn.set_processor(PatchTokenAttention(ctx, activation_exchange(ctx, tag), tokens, text_prefix))


def patch_transformer(model: torch.nn.Module, ctx: PatchContext, tokens: PatchTokens,
                      attentions: dict[str, torch.nn.Module], joint_sequences: dict[str, torch.nn.Module] | None = None,
                      take_tokens: Callable[[dict], dict] = lambda inputs: inputs,
                      shared: tuple[str, ...] = ()) -> PatchDiTForward:
    """Install the patch processors on `attentions` (by exchange tag) and on `joint_sequences`
    (attentions over one text-then-image sequence), the output gather on `model.proj_out`, and
    the patched forward on `model`; returns the latter. See `PatchDiTForward` for the rest."""
    for tag, attn in attentions.items():
        patch_attention(attn, ctx, tokens, tag)
    for tag, attn in (joint_sequences or {}).items():
        patch_attention(attn, ctx, tokens, tag, text_prefix=True)
    model.proj_out.forward = TokenGather(model.proj_out, ctx, tokens)
    forward = PatchDiTForward(model, ctx, tokens, take_tokens, shared)
    model.forward = forward
    return forward


def whole_transformer(model: torch.nn.Module, cuda_graph: bool = True) -> DiTForward:
    """Install the mode "none" forward (the whole transformer, graphed on CUDA) on `model`; returns it."""
    forward = DiTForward(model, cuda_graph)
    model.forward = forward
    return forward

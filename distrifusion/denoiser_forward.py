"""`DenoiserForward`: the replacement `forward` of a denoiser (a UNet or a diffusion transformer)
for mode "none", and the base of the patched ones.

It keeps the model's call signature, runs without autograd, and on CUDA replays its steps as
CUDA graphs exactly as the patch modes do, so that one device is measured the way N are.
`take_branch` cuts a guidance branch out of the forward's batched inputs (split CFG).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .cuda_graph import StepGraphs


def take_branch(value: Any, branch: int, batch: int) -> Any:
    """The half of `value` (tensors, dicts of them) that belongs to guidance branch `branch`."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        half = batch // 2
        return value[branch * half:(branch + 1) * half]
    if isinstance(value, dict):
        return {k: take_branch(v, branch, batch) for k, v in value.items()}
    return value


class DenoiserForward:
    """A replacement `model.forward` with the same signature, whose input `latent` (the name of
    the latent argument) is what graphs are keyed on and `output` the model's return_dict class."""

    def __init__(self, model: torch.nn.Module, latent: str, output: type, cuda_graph: bool = True):
        self.model, self.latent, self.output_class, self.cuda_graph = model, latent, output, cuda_graph
        self.original = model.forward
        self.signature = inspect.signature(self.original)
        self.graphs = StepGraphs(self._step, latent=latent)

    @torch.no_grad()
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        inputs = dict(bound.arguments)
        return_dict = inputs.pop("return_dict")
        full = self.run(inputs)
        return self.output_class(sample=full) if return_dict else (full,)

    def run(self, inputs: dict) -> torch.Tensor:
        """The model's whole output for `inputs` (the forward's arguments but `return_dict`)."""
        if self.cuda_graph and inputs[self.latent].is_cuda:
            return self.graphs(inputs)
        return self._step(**inputs)

    def _step(self, **inputs: Any) -> torch.Tensor:
        return self.original(**inputs, return_dict=False)[0]

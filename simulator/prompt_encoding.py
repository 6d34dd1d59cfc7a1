"""The pipeline's prompt encoding as its `__call__` runs it, on the meta device."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class PaddedPromptMasks(TorchDispatchMode):
    """Answers False where code reads a boolean meta tensor as a Python bool (meta tensors have
    no values): transformers asks `attention_mask.all()` to skip an all-ones mask, and a prompt
    padded to T5's `max_sequence_length` has zeros in it, so the mask is built as on a GPU."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if (func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta"
                and args[0].dtype == torch.bool):
            return False
        return func(*args, **(kwargs or {}))


def encode_prompt(pipe: Any, prompt: str, device: Any, cfg: bool, max_sequence_length: int | None = None) -> None:
    """`pipe.encode_prompt` of one `prompt` as the app's pipeline call runs it: every text
    encoder on its own prompt (the same one), the negative branch with `cfg` where the pipeline
    has one (Flux's has none), T5's prompt padded to `max_sequence_length` (the model spec's)."""
    params = inspect.signature(pipe.encode_prompt).parameters
    kwargs: dict[str, Any] = {name: prompt for name in ("prompt_2", "prompt_3") if name in params}
    if "do_classifier_free_guidance" in params:
        kwargs["do_classifier_free_guidance"] = cfg
    if max_sequence_length is not None:
        kwargs["max_sequence_length"] = max_sequence_length
    with PaddedPromptMasks():
        pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1, **kwargs)

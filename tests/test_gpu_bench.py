"""bench/gpu_bench.py's ideal patch compute, checked on the CPU: with split CFG a rank's image is
cut into N/2 patches, so the ideal's self-attention must attend over exactly that image's tokens
and its convolutions must run over exactly the rank's rows."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from distrifusion.pipeline_factory import build_unet
from simulator.unet_run import PROMPT_TOKENS, unet_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_bench  # noqa: E402

sys.path.pop(0)

RESOLUTION = 64  # tiny model: VAE factor 2, latent 32, divisible by 4 patches through 2 halvings


class AttentionCalls(TorchFunctionMode):
    """The (query, key) shapes of every attention call."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[torch.Size, torch.Size]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.calls.append((args[0].shape, args[1].shape))
        return func(*args, **(kwargs or {}))


class ConvInputs(TorchDispatchMode):
    """The input of every convolution."""

    def __init__(self):
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.inputs.append(args[0].detach().clone())
        return func(*args, **(kwargs or {}))


def record(model, inputs):
    attention, convs = AttentionCalls(), ConvInputs()
    with torch.no_grad(), attention, convs:
        model(**inputs)
    return attention.calls, convs.inputs


@pytest.fixture(scope="module")
def unet():
    return build_unet("tiny", "cpu", torch.float32)


@pytest.mark.parametrize("split_cfg", [True, False], ids=["split_cfg", "no_split"])
@pytest.mark.parametrize("n", [2, 4])
def test_ideal_attends_over_the_image_and_convolves_the_ranks_rows(unet, n, split_cfg):
    inputs = unet_inputs("tiny", RESOLUTION, 2, torch.float32, "cpu")
    patches = n // 2 if split_cfg else n
    rank = gpu_bench.bench_rank(n, split_cfg)
    branch = rank * 2 // n if split_cfg else None
    image = inputs
    if split_cfg:  # the rank's image: its guidance branch's half of the batch
        image = {"sample": inputs["sample"][branch:branch + 1], "timestep": inputs["timestep"],
                 "encoder_hidden_states": inputs["encoder_hidden_states"][branch:branch + 1],
                 "added_cond_kwargs": {k: v[branch:branch + 1] for k, v in inputs["added_cond_kwargs"].items()}}
    whole_attention, whole_convs = record(unet, image)

    ideal = gpu_bench.ideal_model(unet, n, "cpu", split_cfg)
    record(ideal, inputs)  # the synchronous first step
    attention, convs = record(ideal, inputs)  # a steady one

    assert len(attention) == len(whole_attention) and len(convs) == len(whole_convs)
    self_attention = 0
    for (q, k), (whole_q, whole_k) in zip(attention, whole_attention):
        assert q[0] == whole_q[0] and k[0] == whole_k[0]  # same batch
        if whole_k[-2] == PROMPT_TOKENS:  # cross-attention: the prompt's tokens
            assert k[-2] == PROMPT_TOKENS and q[-2] * patches == whole_q[-2]
            continue
        self_attention += 1
        assert k[-2] == whole_k[-2], "the ideal's self-attention must see exactly the image's tokens"
        assert q[-2] * patches == whole_q[-2], "its queries: this patch's tokens"
    assert self_attention > 0

    rows = inputs["sample"].shape[-2] // patches
    mine = rank % patches
    sample = inputs["sample"][branch:branch + 1] if split_cfg else inputs["sample"]
    assert torch.equal(convs[0], sample[..., mine * rows:(mine + 1) * rows, :])  # conv_in: the rank's rows
    for x, whole in zip(convs, whole_convs):
        b, c, h, w = whole.shape
        assert x.shape == (b, c, h // patches, w), "each convolution runs on exactly the rank's rows"

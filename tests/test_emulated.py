"""The emulated backend runs exactly the code path of one rank of a real group."""

from __future__ import annotations

import pytest
import torch

from backends.emulated import EmulatedCommunicator
from backends.fake import spawn
from backends.recording import Recorder
from distrifusion import ParallelConfig, parallelize
from distrifusion.pipeline_factory import build_unet
from distrifusion.rank_replica import unet_replica


@pytest.fixture(scope="module")
def unet():
    return build_unet("tiny", device="cpu")


def inputs():
    g = torch.Generator().manual_seed(0)
    return dict(sample=torch.randn(2, 4, 32, 32, generator=g), timestep=torch.tensor(400),
                encoder_hidden_states=torch.randn(2, 77, 64, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)})


def trace(comm, unet, steps=3):
    rec = Recorder(comm)
    model = parallelize(unet_replica(unet), rec, ParallelConfig(warmup_steps=1))
    for _ in range(steps):
        out = model(**inputs()).sample
    signature = [(r.kind, r.tag, r.shape, r.dtype, r.async_op, r.group_size) for r in rec.records]
    order = [(e["op"], e["id"]) for e in rec.events]
    return signature, order, out.shape, model.forward.ctx.allocated_bytes


@pytest.mark.parametrize("world_size", [2, 4])
def test_emulated_rank_matches_a_real_rank(unet, world_size):
    real = spawn(trace, world_size, unet)
    for rank in range(world_size):
        emulated = trace(EmulatedCommunicator(world_size, rank), unet)
        assert emulated == real[rank]


def test_emulated_split_follows_the_guidance_halves():
    comm = EmulatedCommunicator(8, rank=5)
    half = comm.split(1)
    assert (half.rank, half.world_size) == (1, 4)
    gathered = comm.all_gather(torch.tensor([3.0]))
    assert gathered.tolist() == [[3.0]] * 8

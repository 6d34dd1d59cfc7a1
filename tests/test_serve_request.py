"""The service's job configs: built and checked once per distinct settings, never per request."""

from __future__ import annotations

import pytest

from distrifusion.serve.request import GenerateRequest, JobConfigs
from test_bad_input import config


def test_requests_with_the_same_settings_share_one_checked_config():
    configs = JobConfigs(config("task=serve", "serve.resolutions=[[64,64],[96,64]]", "serve.max_steps=30"), 2)
    first = configs(GenerateRequest(prompt="a lighthouse", seed=1))
    assert configs(GenerateRequest(prompt="a harbour", seed=2, negative_prompt="fog")) is first
    assert configs(GenerateRequest(prompt="x", steps=first.sampler.steps, height=64, width=64)) is first
    taller = configs(GenerateRequest(prompt="x", height=96, width=64, steps=7, guidance_scale=1.5, mode="sync_patch"))
    assert taller is not first and (taller.model.height, taller.model.width) == (96, 64)
    assert (taller.sampler.steps, taller.sampler.guidance_scale, taller.parallel.mode) == (7, 1.5, "sync_patch")
    assert (first.model.height, first.sampler.steps, first.parallel.mode) == (64, 20, "displaced")


@pytest.mark.parametrize("fields,reason", [
    ({"height": 128, "width": 128}, "height=128 width=128: this service makes [(64, 64)]"),
    ({"steps": 31}, "steps=31: this service runs at most serve.max_steps=30"),
    ({"steps": 1000}, "steps=1000: this service runs at most"),
])
def test_settings_that_cannot_run_are_refused_every_time(fields, reason):
    configs = JobConfigs(config("task=serve", "serve.max_steps=30"), 2)
    for _ in range(2):  # a refusal is not cached as a config
        with pytest.raises(ValueError, match=reason.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            configs(GenerateRequest(prompt="x", **fields))


def test_the_batch_apps_own_checks_refuse_what_it_would():
    configs = JobConfigs(config("task=serve", "serve.resolutions=[[72,64]]"), 4)
    with pytest.raises(ValueError, match="cannot be cut into 2 row patches"):
        configs(GenerateRequest(prompt="x", height=72, width=64))

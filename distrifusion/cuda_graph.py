"""Replay a steady-state step as a CUDA graph: at the resolutions people use, eager PyTorch
spends longer launching kernels than the GPU spends running them, and patch parallelism
makes each rank's kernels smaller still.

`CudaGraphed(fn)` runs `fn(**inputs)` eagerly on its first call (warming up libraries),
captures it on the second into a graph over static input buffers, and from then on copies
the inputs in and replays. If capture fails (a backend whose collectives cannot be
captured, say), it logs why once and stays eager.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

log = logging.getLogger("distrifusion")


def _copy_into(static: Any, value: Any, path: str = "input") -> None:
    if isinstance(static, torch.Tensor):
        if not isinstance(value, torch.Tensor) or value.shape != static.shape:
            raise ValueError(f"{path} changed shape between graph replays")
        static.copy_(value)
    elif isinstance(static, dict):
        for k in static:
            _copy_into(static[k], value[k], f"{path}.{k}")
    elif static != value:
        raise ValueError(f"{path} changed between graph replays ({static!r} -> {value!r})")


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


class CudaGraphed:
    """`fn(**inputs)` as a replayed CUDA graph after one eager call; see the module docstring."""

    def __init__(self, fn: Callable[..., torch.Tensor], name: str, before_capture: Callable[[], None] = lambda: None):
        self.fn, self.name, self.before_capture = fn, name, before_capture
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_inputs: dict | None = None
        self.static_output: torch.Tensor | None = None
        self.eager = False

    def __call__(self, **inputs: Any) -> torch.Tensor:
        self.calls += 1
        if self.eager or self.calls == 1:
            return self.fn(**inputs)
        if self.graph is None and not self._capture(inputs):
            return self.fn(**inputs)
        _copy_into(self.static_inputs, inputs)
        self.graph.replay()
        return self.static_output.clone()

    def _capture(self, inputs: dict) -> bool:
        self.before_capture()
        self.static_inputs = _clone(inputs)
        graph = torch.cuda.CUDAGraph()
        try:
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                self.static_output = self.fn(**self.static_inputs)
        except Exception as e:  # noqa: BLE001 - any capture failure means: run eagerly
            log.warning("CUDA graph capture of %s failed, running it eagerly: %s", self.name, str(e).splitlines()[0])
            self.eager, self.static_inputs, self.static_output = True, None, None
            torch.cuda.synchronize()
            return False
        self.graph = graph
        log.info("captured %s as a CUDA graph", self.name)
        return True


class StepGraphs:
    """Denoising steps through CUDA graphs, one `CudaGraphed` per shape of the input named
    `latent` (and caller's key).

    The timestep becomes a per-sample tensor, so a replay reads each step's value from its
    static buffer instead of baking the captured step's value into the graph.
    """

    def __init__(self, step: Callable[..., torch.Tensor], before_capture: Callable[[], None] = lambda: None,
                 latent: str = "sample"):
        self.step, self.before_capture, self.latent = step, before_capture, latent
        self.graphs: dict[tuple, CudaGraphed] = {}

    def __call__(self, inputs: dict, key: tuple = ()) -> torch.Tensor:
        sample = inputs[self.latent]
        inputs["timestep"] = torch.as_tensor(inputs["timestep"], device=sample.device).reshape(-1).expand(
            sample.shape[0]).contiguous()
        key = (tuple(sample.shape), *key)
        if key not in self.graphs:
            self.graphs[key] = CudaGraphed(self.step, f"step {list(sample.shape)}", self.before_capture)
        return self.graphs[key](**inputs)

"""Record the trace the simulator replays, from the real algorithm run on the meta device.

`record(...)` builds the model's denoiser, its UNet or its diffusion transformer (PixArt, SD3,
Flux), on `meta` (shapes, no data), patches it with
`distrifusion.parallelize` over an emulated rank wrapped in a `Recorder`, and runs three
denoising steps under an `OpCounter` that is cut at every collective:

- step 0 (synchronous) becomes the trace's `warmup` phase;
- step 1 is the first displaced step (it issues async gathers, but has nothing to wait for);
- step 2 becomes the `steady` phase: it waits on step 1's gathers and issues its own;
- the context's `finish()` (waits for the last gathers) becomes the `final` phase.

Issue ids are an exchange's position in its step, the same in every step, so a steady wait
names the previous step's issue of that exchange (the engine matches the latest instance).

One role holds every rank: with row patches every rank runs the same layers on equally
sized patches and issues the same collectives with the same bytes; only the first and last
patch fill their missing halo with zeros instead of copying it, a difference of a few
row copies. (A DiT's token rows may split unevenly: the first ranks then hold one row more,
and every gather carries the largest patch.) The rank recorded is `unet_run.role_rank` (an interior one where possible).

A single device (world_size 1) is always recorded as mode "none": patching one rank would
only add the slicing and the one-rank output gather. Traces are cached as JSON, keyed by
every argument and `code_version()` (the trace format's version and a digest of the sources a
trace is recorded from: editing the algorithm re-records, editing how traces are priced or
shown does not); `load_or_record` reads or fills the cache without importing torch when the
trace is cached.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

TRACE_VERSION = "2"
DEFAULT_CACHE = "~/.cache/distrifusion/traces"
MODES = ("none", "naive_patch", "sync_patch", "displaced")


def trace_args(model: str, resolution: int, world_size: int, mode: str, warmup_steps: int = 4,
               groupnorm: str = "corrected", split_cfg: bool = True, dtype: str = "float16",
               cfg: bool = True, compress: str = "none", delta: bool = False) -> dict[str, Any]:
    """The normalised arguments of a trace (what its cache key hashes). `compress` and `delta`
    (`parallel.compress`, `parallel.delta`) only change displaced steps: other modes are
    recorded with "none" and False."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    mode = "none" if world_size == 1 else mode
    displaced = mode == "displaced"
    return {"model": model, "resolution": int(resolution), "world_size": int(world_size),
            "mode": mode, "warmup_steps": max(1, int(warmup_steps)),
            "groupnorm": groupnorm, "split_cfg": bool(split_cfg), "dtype": dtype, "cfg": bool(cfg),
            "compress": compress if displaced else "none", "delta": bool(delta) and displaced}


# the simulator's modules whose code shapes a recording (the rest only price or show it)
RECORDING_MODULES = ("workload", "unet_run", "transformer_inputs", "prompt_encoding", "op_counter", "meta_memo",
                     "ceiling", "full_token_attention",
                     "generation", "memory", "live_memory", "vae_decode")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """`TRACE_VERSION` and a digest of the sources a recording runs (found, not imported):
    `distrifusion`, `backends` and the simulator's `RECORDING_MODULES`."""
    digest = hashlib.sha256(TRACE_VERSION.encode())
    sources = []
    for package in ("distrifusion", "backends"):
        sources += sorted(Path(importlib.util.find_spec(package).origin).parent.glob("*.py"))
    here = Path(__file__).resolve().parent
    sources += [here / f"{name}.py" for name in RECORDING_MODULES]
    for source in sources:
        digest.update(source.name.encode() + source.read_bytes())
    return f"{TRACE_VERSION}-{digest.hexdigest()[:16]}"


def cache_path(args: dict[str, Any], cache_dir: str | Path | None = None) -> Path:
    """Where the trace of normalised `args` is cached."""
    digest = hashlib.sha256(json.dumps({**args, "version": code_version()}, sort_keys=True).encode()).hexdigest()
    name = f"{args['model']}-{args['resolution']}-w{args['world_size']}-{args['mode']}-{digest[:16]}.json"
    return Path(cache_dir or DEFAULT_CACHE).expanduser() / name


def load_or_record(model: str, resolution: int, world_size: int, mode: str, warmup_steps: int = 4,
                   groupnorm: str = "corrected", split_cfg: bool = True, dtype: str = "float16",
                   cfg: bool = True, cache_dir: str | Path | None = None, compress: str = "none",
                   delta: bool = False) -> dict:
    """The cached trace of these arguments, recording and caching it first if needed."""
    args = trace_args(model, resolution, world_size, mode, warmup_steps, groupnorm, split_cfg, dtype, cfg,
                      compress, delta)
    return cached(args, lambda: record(**args), cache_dir)


def cached(args: dict[str, Any], produce: Callable[[], dict], cache_dir: str | Path | None = None) -> dict:
    """The JSON cached under `args` (with `model`, `resolution`, `world_size`, `mode`), made by
    `produce()` and cached first if missing."""
    return cached_at(cache_path(args, cache_dir), produce)


def cached_at(path: Path, produce: Callable[[], dict]) -> dict:
    """The JSON at `path`, or `produce()` written there first."""
    if path.is_file():
        return json.loads(path.read_text())
    data = produce()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, separators=(",", ":"))
    os.replace(tmp, path)  # atomic: concurrent recorders never leave a half-written file
    return data


class StepEvents:
    """Recorder hook: per step, compute segments cut at every collective plus the collectives."""

    def __init__(self, counter: Any):
        self.counter = counter
        self.records: list = []
        self.steps: list[list[dict]] = [[]]
        self.position: dict[int, int] = {}  # record id -> issue position within its step
        self.issued = 0

    def on_event(self, event: dict) -> None:
        rec = self.records[event["id"]]
        self._cut(f"before {rec.tag or rec.kind}")
        if event["op"] == "issue":
            self.position[rec.id] = self.issued
            self.steps[-1].append({"type": "issue", "id": self.issued, "kind": rec.kind, "bytes": rec.bytes,
                                   "group_size": rec.group_size, "async": rec.async_op, "tag": rec.tag})
            self.issued += 1
        else:
            self.steps[-1].append({"type": "wait", "id": self.position[rec.id]})

    def end_step(self) -> list[dict]:
        """Close the step under way and return its events."""
        self._cut("step tail")
        self.steps.append([])
        self.issued = 0
        return self.steps[-2]

    def _cut(self, tag: str) -> None:
        segment = self.counter.cut(tag)
        if segment is not None:
            self.steps[-1].append(segment)


def _issues(events: list[dict]) -> list[tuple]:
    return [(e["kind"], e["tag"], e["bytes"], e["async"]) for e in events if e["type"] == "issue"]


def record(model: str, resolution: int, world_size: int, mode: str, warmup_steps: int = 4,
           groupnorm: str = "corrected", split_cfg: bool = True, dtype: str = "float16",
           cfg: bool = True, compress: str = "none", delta: bool = False) -> dict:
    """Record the trace of one rank of `model` at `resolution` on `world_size` ranks (see module doc)."""
    import torch

    from .meta_memo import MetaMemo
    from .op_counter import OpCounter
    from .unet_run import EmulatedUNet

    args = trace_args(model, resolution, world_size, mode, warmup_steps, groupnorm, split_cfg, dtype, cfg,
                      compress, delta)
    counter = OpCounter()
    events = StepEvents(counter)
    run = EmulatedUNet(model, resolution, world_size, args["mode"], counter, device="meta",
                       dtype=getattr(torch, dtype), cfg=cfg, warmup_steps=1, groupnorm=groupnorm,
                       split_cfg=split_cfg, compress=args["compress"], delta=args["delta"],
                       on_event=events.on_event)
    events.records = run.recorder.records
    with MetaMemo(), counter:
        steps = []
        for _ in range(3):
            run.step()
            steps.append(events.end_step())
        run.finish()
        final = events.end_step()
    if _issues(steps[1]) != _issues(steps[2]):
        raise RuntimeError("consecutive displaced steps issued different collectives; the trace cannot repeat them")
    phases = {"warmup": steps[0], "steady": steps[2], "final": final}
    ctx = run.context
    meta = {**args, "version": code_version(), "batch": 2 if cfg else 1,
            "recorded_rank": run.rank, "exchanges": len(ctx.exchanges) if ctx is not None else 0,
            "flops_per_step": sum(e["flops"] for e in steps[2] if e["type"] == "compute")}
    return {"meta": meta, "roles": [{"ranks": list(range(world_size)), "phases": phases}]}

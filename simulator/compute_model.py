"""How long a compute event takes: `simulator.kernel_model` per op, or measured times.

A trace op `{"kind", "key", "flops", "bytes", "count"}` stands for `count` launches of one
kernel shape; its flops and bytes are totals over those launches. A `CalibrationProfile`
holds measured seconds of ONE launch per (kind, key):

    {"device": str, "dtype": str,
     "entries": [{"kind": str, "key": str, "seconds": float, "flops": float, "bytes": float}]}

with `flops`/`bytes` those of one launch too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .hardware import Device
from .kernel_model import kernel_seconds


@dataclass(frozen=True)
class ProfileEntry:
    """Measured time of one launch of op `kind` with shape signature `key`."""

    kind: str
    key: str
    seconds: float
    flops: float
    bytes: float


class CalibrationProfile:
    """Measured seconds per (op kind, key) on one device and dtype."""

    def __init__(self, device: str, dtype: str, entries: list[ProfileEntry]):
        self.device = device
        self.dtype = dtype
        self.entries = {(e.kind, e.key): e for e in entries}

    @classmethod
    def from_dict(cls, data: dict) -> "CalibrationProfile":
        """Build from the JSON layout in the module docstring, checking every field."""
        if not isinstance(data, dict) or set(data) != {"device", "dtype", "entries"}:
            raise ValueError("a calibration profile is a mapping with exactly the keys device, dtype, entries")
        if not isinstance(data["entries"], list):
            raise ValueError("a calibration profile's entries must be a list")
        entries = []
        names = [f.name for f in fields(ProfileEntry)]
        for i, raw in enumerate(data["entries"]):
            if not isinstance(raw, dict) or set(raw) != set(names):
                raise ValueError(f"profile entry {i} must have exactly the keys {names}, got {raw!r}")
            entry = ProfileEntry(str(raw["kind"]), str(raw["key"]),
                                 *(float(raw[k]) for k in ("seconds", "flops", "bytes")))
            if entry.seconds < 0 or entry.flops < 0 or entry.bytes < 0:
                raise ValueError(f"profile entry {i} has a negative value: {raw!r}")
            entries.append(entry)
        return cls(str(data["device"]), str(data["dtype"]), entries)

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationProfile":
        """Read a profile JSON file."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def to_dict(self) -> dict:
        """The JSON layout in the module docstring."""
        return {"device": self.device, "dtype": self.dtype,
                "entries": [asdict(e) for e in self.entries.values()]}

    def save(self, path: str | Path) -> None:
        """Write the profile as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")


class ComputeModel:
    """Seconds of trace compute events on `device` in `dtype`, calibrated where measured.

    An op whose (kind, key) the profile measured takes count * measured seconds. An op of a
    measured kind but unmeasured key takes its modelled time (`kernel_model.kernel_seconds`)
    scaled by that kind's measured / modelled ratio (summed over the kind's entries).
    Anything else: the modelled time.
    """

    def __init__(self, device: Device, dtype: str, profile: CalibrationProfile | None = None):
        if dtype not in device.peak_flops:
            raise ValueError(f"dtype {dtype!r} has no peak FLOP/s for {device.name}; "
                             f"known: {sorted(device.peak_flops)}")
        self.device, self.dtype = device, dtype
        self.measured = dict(profile.entries) if profile else {}
        totals: dict[str, list[float]] = {}
        for e in self.measured.values():
            pair = totals.setdefault(e.kind, [0.0, 0.0])
            pair[0] += e.seconds
            pair[1] += kernel_seconds({"kind": e.kind, "key": e.key, "flops": e.flops, "bytes": e.bytes},
                                      device, dtype)
        self.kind_ratio = {k: m / r for k, (m, r) in totals.items() if r > 0}

    def op_seconds(self, op: dict[str, Any], eager: bool = False) -> float:
        """Seconds of one trace op (all `count` launches); `eager`: not graph-replayed."""
        entry = self.measured.get((op["kind"], op.get("key", "")))
        if entry is not None:
            return entry.seconds * int(op.get("count", 1))
        return kernel_seconds(op, self.device, self.dtype, eager) * self.kind_ratio.get(op["kind"], 1.0)

    def event_seconds(self, event: dict[str, Any], eager: bool | None = None) -> float:
        """Seconds of a compute event: its ops summed (eager if `eager`, or, when None, if the
        event says `"eager": true`), or (no ops) its FLOP and byte totals as one shapeless
        launch without launch overhead."""
        ops = event.get("ops")
        if ops:
            eager = bool(event.get("eager", False)) if eager is None else eager
            return sum(self.op_seconds(op, eager) for op in ops)
        total = {"kind": "event", "flops": event.get("flops", 0), "bytes": event.get("bytes", 0)}
        return kernel_seconds(total, self.device, self.dtype) - self.device.launch_overhead

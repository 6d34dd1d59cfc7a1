"""Hardware presets: a device model and an interconnect model, loaded from `conf/hardware/*.yaml`.

Every number is in SI units (FLOP/s, bytes/s, seconds). `docs/hardware.md` gives the source
of each preset value.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

HARDWARE_DIR = Path(__file__).resolve().parent.parent / "conf" / "hardware"
DTYPES = ("float16", "bfloat16", "float32")
TF32 = "tfloat32"  # optional peak: cuDNN runs float32 convolutions in TF32 by default
KINDS = ("nvswitch", "pcie", "multinode")
INTRA_KINDS = ("nvswitch",)


@dataclass(frozen=True)
class Device:
    """One accelerator: peaks, the fractions of them kernels achieve, what a kernel costs at
    least, how many CTAs run at once (`simulator.kernel_model` uses them all)."""

    name: str
    peak_flops: dict[str, float]  # dense FLOP/s per dtype (and "tfloat32": float32 convolutions)
    memory_bandwidth: float  # bytes/s
    flops_efficiency: float  # achieved / peak FLOP/s of a full wave of GEMM tiles
    bandwidth_efficiency: float  # achieved / peak memory bandwidth
    launch_overhead: float  # seconds every kernel costs under CUDA-graph replay
    sm_count: int = 1  # CTAs of one wave (1: no wave quantization, a plain roofline)
    attention_efficiency: float | None = None  # achieved / peak of a full wave of attention (None: flops_efficiency)
    memory_gib: float | None = None  # device memory (None: unknown, nothing is checked against it)
    eager_op_overhead: float = 0.0  # host seconds per op when not graph-replayed (0: never host-bound)

    @property
    def attention_rate_efficiency(self) -> float:
        """`attention_efficiency`, or `flops_efficiency` where the preset does not give it."""
        return self.flops_efficiency if self.attention_efficiency is None else self.attention_efficiency


@dataclass(frozen=True)
class Interconnect:
    """How the devices talk. Keys beyond the common ones depend on `kind`.

    nvswitch: every GPU has a `link_bandwidth` port into a non-blocking switch.
    pcie: `gpus_per_switch` GPUs behind each PCIe switch, `switches_per_socket` switches per CPU
    socket; traffic between switches crosses the socket's host bridge (aggregate
    `host_bridge_bandwidth`), traffic between sockets also the `cross_socket_bandwidth` link.
    multinode: `gpus_per_node` GPUs per node joined by `intra_kind` at `link_bandwidth`; nodes
    joined by NICs with `nic_bandwidth` per node and direction and `nic_latency` per hop.
    Bandwidths are per direction; `nccl_efficiency` scales every link to NCCL's achieved bus
    bandwidth; `latency` is the per ring step latency (alpha) inside a switch domain and
    `base_latency` the fixed latency of every call, both of the bandwidth (NCCL Simple)
    protocol. `protocols`: "nccl" lets each call take NCCL's cheapest protocol (and ring or tree
    for all-reduce), "simple" always uses that one. `overlap_slowdown`: the fraction of its speed
    a GPU's compute loses while its collectives run (their kernels hold SMs and memory bandwidth).
    """

    kind: str
    link_bandwidth: float
    latency: float
    nccl_efficiency: float
    gpus_per_switch: int | None = None
    switches_per_socket: int | None = None
    host_bridge_bandwidth: float | None = None
    cross_socket_bandwidth: float | None = None
    gpus_per_node: int | None = None
    intra_kind: str | None = None
    nic_bandwidth: float | None = None
    nic_latency: float | None = None
    base_latency: float = 0.0
    protocols: str = "simple"
    overlap_slowdown: float = 0.0


@dataclass(frozen=True)
class Hardware:
    """A preset: `num_devices` identical devices joined by `interconnect`."""

    name: str
    description: str
    num_devices: int
    device: Device
    interconnect: Interconnect


_COLLECTIVE_KEYS = ("base_latency", "protocols", "overlap_slowdown")
_KIND_KEYS = {
    "nvswitch": _COLLECTIVE_KEYS,
    "pcie": ("gpus_per_switch", "switches_per_socket", "host_bridge_bandwidth", "cross_socket_bandwidth",
             *_COLLECTIVE_KEYS),
    "multinode": ("gpus_per_node", "intra_kind", "nic_bandwidth", "nic_latency", *_COLLECTIVE_KEYS),
}
_RULES = {
    "name": "str", "kind": "str", "intra_kind": "str", "protocols": "str",
    "num_devices": "int", "sm_count": "int", "gpus_per_switch": "int", "switches_per_socket": "int", "gpus_per_node": "int",
    "flops_efficiency": "fraction", "attention_efficiency": "fraction", "bandwidth_efficiency": "fraction", "nccl_efficiency": "fraction",
    "latency": "nonneg", "nic_latency": "nonneg", "launch_overhead": "nonneg", "eager_op_overhead": "nonneg", "base_latency": "nonneg",
    "overlap_slowdown": "nonneg",
}  # every other key: a number > 0


def available_hardware() -> list[str]:
    """Names of the presets under `conf/hardware/`."""
    return sorted(p.stem for p in HARDWARE_DIR.glob("*.yaml"))


def load_hardware(name_or_path: str | Path) -> Hardware:
    """Load and validate a preset by name (`conf/hardware/<name>.yaml`) or by YAML path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = HARDWARE_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ValueError(f"unknown hardware {name_or_path!r}; available: {', '.join(available_hardware())}")
    elif not path.is_file():
        raise ValueError(f"hardware file {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text())
    try:
        return hardware_from_dict(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def hardware_from_dict(data: Any) -> Hardware:
    """Build a `Hardware` from a parsed YAML mapping, raising `ValueError` on bad keys or values."""
    top = _section(data, "hardware", ("name", "num_devices", "device", "interconnect"), ("description",))
    optional = ("sm_count", "attention_efficiency", "memory_gib", "eager_op_overhead")
    dev = _section(top["device"], "device", tuple(f.name for f in fields(Device) if f.name not in optional), optional)
    peaks = _section(dev["peak_flops"], "device.peak_flops", DTYPES, (TF32,))
    device = Device(
        name=_value("device.name", dev["name"]),
        peak_flops={d: _value(f"device.peak_flops.{d}", v) for d, v in peaks.items()},
        **{k: _value(f"device.{k}", v) for k, v in dev.items() if k not in ("name", "peak_flops")},
    )
    net = top["interconnect"]
    kind = net.get("kind") if isinstance(net, dict) else None
    if kind not in KINDS:
        raise ValueError(f"interconnect.kind must be one of {', '.join(KINDS)}, got {kind!r}")
    common = ("kind", "link_bandwidth", "latency", "nccl_efficiency")
    net = _section(net, f"interconnect ({kind})", common + _KIND_KEYS[kind], ())
    interconnect = Interconnect(**{k: _value(f"interconnect.{k}", v) for k, v in net.items()})
    if kind == "multinode" and interconnect.intra_kind not in INTRA_KINDS:
        raise ValueError(f"interconnect.intra_kind must be one of {', '.join(INTRA_KINDS)}, "
                         f"got {interconnect.intra_kind!r}")
    hw = Hardware(name=_value("name", top["name"]), description=str(top.get("description", "")),
                  num_devices=_value("num_devices", top["num_devices"]), device=device,
                  interconnect=interconnect)
    _check_shape(hw)
    return hw


def _section(data: Any, where: str, required: tuple[str, ...], optional: tuple[str, ...]) -> dict:
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(required) - set(optional))
    missing = [k for k in required if k not in data]
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(required + optional)}")
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")
    return data


def _value(where: str, value: Any) -> Any:
    key = where.rsplit(".", 1)[-1]
    rule = _RULES.get(key, "positive")
    if rule == "str":
        if not isinstance(value, str) or not value:
            raise ValueError(f"{where} must be a non-empty string, got {value!r}")
        return value
    if rule == "int":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where} must be a positive integer, got {value!r}")
        return value
    try:
        number = float(value)  # PyYAML reads 1.5e12 (no exponent sign) as a string
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a number, got {value!r}") from None
    low_ok = number >= 0 if rule == "nonneg" else number > 0
    if isinstance(value, bool) or not low_ok or number == float("inf") or (rule == "fraction" and number > 1):
        bounds = {"nonneg": ">= 0", "positive": "> 0", "fraction": "in (0, 1]"}[rule]
        raise ValueError(f"{where} must be a finite number {bounds}, got {value!r}")
    return number


def _check_shape(hw: Hardware) -> None:
    net = hw.interconnect
    if net.kind == "pcie":
        per_socket = net.gpus_per_switch * net.switches_per_socket
        if hw.num_devices % net.gpus_per_switch:
            raise ValueError(f"num_devices {hw.num_devices} is not a multiple of gpus_per_switch "
                             f"{net.gpus_per_switch}")
        if hw.num_devices > per_socket and hw.num_devices % per_socket:
            raise ValueError(f"num_devices {hw.num_devices} does not fill whole sockets of {per_socket} GPUs")
    if net.kind == "multinode" and hw.num_devices % net.gpus_per_node:
        raise ValueError(f"num_devices {hw.num_devices} is not a multiple of gpus_per_node {net.gpus_per_node}")

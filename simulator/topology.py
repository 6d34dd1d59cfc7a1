"""Cost of collectives over a topology as NCCL runs them, with links shared as a fluid.

A collective among `g` ranks runs over one ring in rank order. Each ring hop loads a set of
links (a GPU's port, a PCIe switch uplink, a socket's host bridge, the inter-socket link, a
node's NIC); the ring's bus bandwidth is that of its most loaded link. One call costs a fixed
base latency, a latency per algorithm step, and its bytes at a share of the bus bandwidth
(`Plan`). With `interconnect.protocols: nccl` each call takes the cheapest of NCCL's protocols
(LL, LL128 on NVLink, Simple) and, for all-reduce, ring or tree, as NCCL's tuning model does;
with `simple` it always uses the preset's one protocol. `FluidNetwork` holds the transfers in
flight: a link's capacity is split equally between the ring hops crossing it, a transfer
moves at the rate of its tightest link, and rates are re-divided whenever one starts or ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from .hardware import Hardware

COLLECTIVES = ("all_gather", "all_reduce", "broadcast", "barrier")
PROTOCOL_CHOICES = ("nccl", "simple")

# NCCL's tuning model, src/graph/tuning.cc (NCCL 2.19-2.21): base latency per call and latency per
# step by link (NVLink, PCI, network), in seconds, for the low-latency protocols and the tree. The
# Simple ring's numbers are the preset's `base_latency`, `latency` and `nic_latency`.
_BASE = {("ring", "LL"): 6.6e-6, ("ring", "LL128"): 14.0e-6,
         ("tree", "LL"): 6.8e-6, ("tree", "LL128"): 14.0e-6, ("tree", "Simple"): 0.0}
_STEP = {"nvlink": {("ring", "LL"): 0.6e-6, ("ring", "LL128"): 1.9e-6,
                    ("tree", "LL"): 0.6e-6, ("tree", "LL128"): 1.25e-6, ("tree", "Simple"): 28e-6},
         "pci": {("ring", "LL"): 1.0e-6, ("ring", "LL128"): 2.5e-6,
                 ("tree", "LL"): 1.0e-6, ("tree", "LL128"): 1.9e-6, ("tree", "Simple"): 28e-6},
         "net": {("ring", "LL"): 2.7e-6, ("ring", "LL128"): 4.0e-6,
                 ("tree", "LL"): 5.0e-6, ("tree", "LL128"): 8.5e-6, ("tree", "Simple"): 28e-6}}


@dataclass(frozen=True)
class Ring:
    """A group's ring: `loads` pairs a link index with how many of the ring's hops cross it."""

    ranks: tuple[int, ...]
    loads: tuple[tuple[int, int], ...]
    nodes: int  # nodes the ring spans (1 unless multinode)
    bus_bandwidth: float  # bytes/s per hop when the ring runs alone


class Plan(NamedTuple):
    """How one call runs: latency before its bytes move, then `load` bytes per hop at bus rate."""

    algorithm: str  # "ring" or "tree"
    protocol: str  # "LL", "LL128" or "Simple"
    latency: float  # seconds: base latency + steps * per step latency
    load: float  # bytes per ring hop, the protocol's bandwidth share folded in
    sent: float  # payload bytes each rank sends


def ring_plan(kind: str, nbytes: float, group_size: int) -> tuple[int, float]:
    """(ring steps, bytes each rank sends) of one collective; `nbytes` is one rank's input.

    all_gather: g-1 steps, (g-1)/g of the output. all_reduce: 2(g-1) steps, 2(g-1)/g of the
    tensor. broadcast: a pipelined chain, g-1 steps, the whole tensor. barrier: the latency of
    an all_reduce of nothing.
    """
    g = group_size
    if g <= 1:
        return 0, 0.0
    if kind == "all_gather":
        return g - 1, (g - 1) * nbytes
    if kind == "all_reduce":
        return 2 * (g - 1), 2 * (g - 1) / g * nbytes
    if kind == "broadcast":
        return g - 1, float(nbytes)
    if kind == "barrier":
        return 2 * (g - 1), 0.0
    raise ValueError(f"unknown collective kind {kind!r}; expected one of {COLLECTIVES}")


def isolated_time(plan: Plan, ring: Ring) -> float:
    """Seconds `plan` takes on `ring` with no other traffic."""
    return plan.latency + plan.load / ring.bus_bandwidth


class Topology:
    """The links of `hardware` for `world_size` ranks, and the ring of any contiguous group."""

    def __init__(self, hardware: Hardware, world_size: int):
        if not 1 <= world_size <= hardware.num_devices:
            raise ValueError(f"world_size {world_size} does not fit {hardware.name!r}, which has "
                             f"{hardware.num_devices} devices")
        self.net = hardware.interconnect
        self.world_size = world_size
        self.capacities: list[float] = []  # per link, bytes/s after nccl_efficiency
        self.link_names: list[str] = []  # per link, e.g. "gpu3.tx", "switch1.up", "socket0->1"
        self._index: dict[str, int] = {}
        self._rings: dict[tuple[int, int], Ring] = {}
        self._plans: dict[tuple[str, float, int, int], Plan] = {}
        if self.net.protocols not in PROTOCOL_CHOICES:
            raise ValueError(f"interconnect.protocols must be one of {PROTOCOL_CHOICES}, got {self.net.protocols!r}")
        self._intra = "pci" if self.net.kind == "pcie" else "nvlink"

    def ring(self, first: int, size: int) -> Ring:
        """The ring of ranks `first .. first+size-1` (cached)."""
        ring = self._rings.get((first, size))
        if ring is None:
            ring = self._rings[(first, size)] = self._build_ring(tuple(range(first, first + size)))
        return ring

    def plan(self, kind: str, nbytes: float, first: int, size: int) -> Plan:
        """How the group `first .. first+size-1` runs `kind` on `nbytes` per rank (cached)."""
        key = (kind, nbytes, first, size)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._cheapest(kind, nbytes, self.ring(first, size))
        return plan

    def _cheapest(self, kind: str, nbytes: float, ring: Ring) -> Plan:
        """The candidate with the least isolated time, as NCCL picks by its own model."""
        steps, sent = ring_plan(kind, nbytes, len(ring.ranks))
        if steps == 0:
            return Plan("ring", "Simple", 0.0, 0.0, 0.0)
        net = self.net
        candidates = [Plan("ring", "Simple", net.base_latency + steps * self._step(ring, "ring", "Simple"), sent, sent)]
        if net.protocols == "nccl":
            reduces = kind in ("all_reduce", "barrier")
            shares = {"LL": 1 / 4 if reduces or ring.nodes > 1 else 1 / 3}
            if self._intra == "nvlink":
                shares["LL128"] = 0.92
            for proto, share in shares.items():
                latency = _BASE["ring", proto] + steps * self._step(ring, "ring", proto)
                candidates.append(Plan("ring", proto, latency, sent / share, sent))
            if reduces:
                candidates += [self._tree(proto, nbytes, sent, ring) for proto in ("LL", "LL128", "Simple")
                               if proto != "LL128" or self._intra == "nvlink"]
        return min(candidates, key=lambda p: isolated_time(p, ring))

    def _step(self, ring: Ring, algorithm: str, protocol: str) -> float:
        """Mean latency of one ring step: of the g-1 steps, nodes-1 cross the network (NCCL's model)."""
        simple = protocol == "Simple" and algorithm == "ring"
        intra = self.net.latency if simple else _STEP[self._intra][algorithm, protocol]
        if ring.nodes == 1:
            return intra
        inter = self.net.nic_latency if simple else _STEP["net"][algorithm, protocol]
        g = len(ring.ranks)
        return ((g - ring.nodes) * intra + (ring.nodes - 1) * inter) / (g - 1)

    def _tree(self, protocol: str, nbytes: float, sent: float, ring: Ring) -> Plan:
        """NCCL's all-reduce tree: a chain inside each node, a binary tree between nodes.

        Latency base + 2((g/nodes-1) intra + floor(log2(nodes)) inter); bandwidth half of 92% of the bus
        (LL: /3.8 more, LL128: 7/9 in one node, 120/128 across nodes), over the ring's links.
        """
        g, nodes = len(ring.ranks), ring.nodes
        intra = _STEP[self._intra]["tree", protocol]
        latency = _BASE["tree", protocol] + 2 * ((g // nodes - 1) * intra
                                                 + (nodes.bit_length() - 1) * _STEP["net"]["tree", protocol])
        share = 0.92 * {"LL": 1 / 3.8, "LL128": 7 / 9 if nodes == 1 else 120 / 128, "Simple": 1.0}[protocol]
        return Plan("tree", protocol, latency, 2 * nbytes / share, sent)

    def _build_ring(self, ranks: tuple[int, ...]) -> Ring:
        counts: dict[int, int] = {}
        inter_hops = 0
        for i, src in enumerate(ranks):
            dst = ranks[(i + 1) % len(ranks)]
            hop, crosses_node = self._hop(src, dst) if len(ranks) > 1 else ([], False)
            inter_hops += crosses_node
            for link in hop:
                counts[link] = counts.get(link, 0) + 1
        loads = tuple(sorted(counts.items()))
        bus = min((self.capacities[l] / m for l, m in loads), default=float("inf"))
        return Ring(ranks, loads, max(inter_hops, 1), bus)

    def _link(self, name: str, bandwidth: float) -> int:
        index = self._index.get(name)
        if index is None:
            index = self._index[name] = len(self.capacities)
            self.capacities.append(bandwidth * self.net.nccl_efficiency)
            self.link_names.append(name)
        return index

    def _hop(self, src: int, dst: int) -> tuple[list[int], bool]:
        """Links one ring hop src -> dst loads, and whether it leaves the node."""
        net, link = self.net, self._link
        if net.kind == "multinode" and src // net.gpus_per_node != dst // net.gpus_per_node:
            a, b = src // net.gpus_per_node, dst // net.gpus_per_node
            return [link(f"nic{a}.tx", net.nic_bandwidth), link(f"nic{b}.rx", net.nic_bandwidth)], True
        links = [link(f"gpu{src}.tx", net.link_bandwidth), link(f"gpu{dst}.rx", net.link_bandwidth)]
        if net.kind != "pcie":
            return links, False
        sw_a, sw_b = src // net.gpus_per_switch, dst // net.gpus_per_switch
        if sw_a == sw_b:
            return links, False
        sock_a, sock_b = sw_a // net.switches_per_socket, sw_b // net.switches_per_socket
        links += [link(f"switch{sw_a}.up", net.link_bandwidth), link(f"switch{sw_b}.down", net.link_bandwidth),
                  link(f"socket{sock_a}.host_bridge", net.host_bridge_bandwidth)]
        if sock_a != sock_b:
            links += [link(f"socket{sock_b}.host_bridge", net.host_bridge_bandwidth),
                      link(f"socket{sock_a}->{sock_b}", net.cross_socket_bandwidth)]
        return links, False


class Transfer:
    """One collective's data movement in flight."""

    __slots__ = ("remaining", "loads", "rate", "finish", "payload")

    def __init__(self, remaining: float, loads: tuple[tuple[int, int], ...], payload: Any):
        self.remaining = remaining
        self.loads = loads
        self.rate = 0.0
        self.finish = float("inf")
        self.payload = payload


class FluidNetwork:
    """Transfers sharing link capacities; call `add` and `pop_finished` at the current time.

    A SimPy engine keeps one timer at `next_finish()` and calls `pop_finished(now)` when it
    fires (and re-arms it after every `add` / `pop_finished`, since rates change then).
    """

    def __init__(self, capacities: list[float]):
        self.capacities = capacities
        self.active: list[Transfer] = []
        self._last = 0.0
        self._solo: dict[tuple[tuple[int, int], ...], float] = {}  # loads -> rate when alone

    def add(self, now: float, remaining: float, loads: tuple[tuple[int, int], ...], payload: Any) -> Transfer:
        """Start moving `remaining` bytes (per ring hop) over `loads` at time `now`."""
        self._settle(now)
        transfer = Transfer(remaining, loads, payload)
        self.active.append(transfer)
        self._rerate(now)
        return transfer

    def pop_finished(self, now: float) -> list[Any]:
        """Payloads of the transfers done by `now`, removed from the network."""
        self._settle(now)
        slack = 1e-12 * max(1.0, now)
        done = [t for t in self.active if t.finish <= now + slack]
        if done:
            self.active = [t for t in self.active if t.finish > now + slack]
            self._rerate(now)
        return [t.payload for t in done]

    def next_finish(self) -> float:
        """When the earliest transfer in flight ends at current rates (inf if none)."""
        return min((t.finish for t in self.active), default=float("inf"))

    def _settle(self, now: float) -> None:
        elapsed = now - self._last
        if elapsed > 0:
            for t in self.active:
                t.remaining -= t.rate * elapsed
        self._last = now

    def _rerate(self, now: float) -> None:
        if len(self.active) == 1:
            t = self.active[0]
            t.rate = self._solo.get(t.loads) or self._solo.setdefault(
                t.loads, min(self.capacities[link] / hops for link, hops in t.loads))
            t.finish = now + max(t.remaining, 0.0) / t.rate
            return
        share: dict[int, int] = {}
        for t in self.active:
            for link, hops in t.loads:
                share[link] = share.get(link, 0) + hops
        caps = self.capacities
        for t in self.active:
            t.rate = min(caps[link] / share[link] for link, _ in t.loads)
            t.finish = now + max(t.remaining, 0.0) / t.rate

"""Alpha-beta cost of ring collectives over a topology, with links shared as a fluid.

A collective among `g` ranks runs as one ring in rank order. Each ring hop loads a set of
links (a GPU's port, a PCIe switch uplink, a socket's host bridge, the inter-socket link, a
node's NIC); the ring's bus bandwidth is that of its most loaded link. `FluidNetwork` holds
the transfers in flight: a link's capacity is split equally between the ring hops crossing
it, a transfer moves at the rate of its tightest link, and rates are re-divided whenever a
transfer starts or ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .hardware import Hardware

COLLECTIVES = ("all_gather", "all_reduce", "broadcast", "barrier")


@dataclass(frozen=True)
class Ring:
    """A group's ring: `loads` pairs a link index with how many of the ring's hops cross it."""

    ranks: tuple[int, ...]
    loads: tuple[tuple[int, int], ...]
    alpha: float  # mean latency of one ring step, seconds
    bus_bandwidth: float  # bytes/s per hop when the ring runs alone


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


def isolated_time(kind: str, nbytes: float, ring: Ring) -> float:
    """Seconds `kind` takes on `ring` with no other traffic: steps*alpha + bytes/bus_bandwidth."""
    steps, sent = ring_plan(kind, nbytes, len(ring.ranks))
    return steps * ring.alpha + (sent / ring.bus_bandwidth if sent else 0.0)


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

    def ring(self, first: int, size: int) -> Ring:
        """The ring of ranks `first .. first+size-1` (cached)."""
        ring = self._rings.get((first, size))
        if ring is None:
            ring = self._rings[(first, size)] = self._build_ring(tuple(range(first, first + size)))
        return ring

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
        alpha = self.net.latency
        if inter_hops:
            # as in NCCL's tuning model: of the g-1 steps, (nodes-1) cross the network
            nodes, g = inter_hops, len(ranks)
            alpha = ((g - nodes) * self.net.latency + (nodes - 1) * self.net.nic_latency) / (g - 1)
        return Ring(ranks, loads, alpha, bus)

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

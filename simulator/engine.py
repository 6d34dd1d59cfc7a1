"""The SimPy model: replay a recorded trace on modelled hardware.

Per rank, as on a GPU, a compute stream and a comm stream, both driven by SimPy events. The
compute stream walks the trace (compute -> run the op's seconds of work, issue -> hand the
collective to the comm stream, wait -> block until it completes), step by step as the app runs
them: eager before the CUDA graphs exist, then replays that wait for their own gathers
(`_graph_schedule`). The comm stream runs its
collectives one at a time in issue order. A collective starts once every rank of its group has
it at the head of its comm stream, waits its latency (`topology.Plan`), then moves its bytes
through the shared `FluidNetwork`. While a rank's comm stream runs a collective, its compute
work progresses at 1 - `interconnect.overlap_slowdown` of full speed: NCCL's kernels hold SMs
and memory bandwidth of the same GPU.

Trace layout (see `simulate`): meta {world_size, dtype, warmup_steps, ...} and roles, each a
list of ranks with phases warmup / steady / final of events:
compute {tag, flops, bytes, ops}, issue {id, kind, bytes, group_size, async, tag}, wait {id}.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import simpy

from .compute_model import CalibrationProfile, ComputeModel
from .hardware import Hardware, load_hardware
from .topology import COLLECTIVES, FluidNetwork, Plan, Topology

COMPUTE, ISSUE, WAIT = 0, 1, 2
PHASES = ("warmup", "steady", "final")
EAGER_STEPS = 2  # steps of a graph before it replays: one eager, one captured
GRAPHS = ("cold", "warm", "all", "none")  # which steps replay CUDA graphs (`_graph_schedule`)


class Span(NamedTuple):
    """One interval of work on one stream ("compute" or "comm") of one rank, in seconds."""

    rank: int
    stream: str
    name: str
    start: float
    end: float


@dataclass
class SimResult:
    """Outcome of one simulation; times in seconds, maxima over ranks."""

    latency_s: float  # until the last compute stream finishes
    compute_s: float  # compute stream work at full speed
    comm_s: float  # comm stream busy time (latency + transfer of its collectives)
    comm_exposed_s: float  # time the compute stream sat blocked in waits
    comm_bytes_per_device: float  # bytes one device sent over the run
    compute_slowdown_s: float  # compute time lost to collectives running beside it
    world_size: int
    steps: int
    hardware: str
    meta: dict = field(default_factory=dict)
    spans: list[Span] = field(default_factory=list)
    # when the slowest rank finished each warm-up step, each steady step, then the final phase
    step_end_s: list[float] = field(default_factory=list)

    def to_row(self) -> dict[str, Any]:
        """A flat CSV row: the trace's model/resolution/mode/dtype, the setup and the results."""
        return {
            "model": self.meta.get("model"), "resolution": self.meta.get("resolution"),
            "mode": self.meta.get("mode"), "dtype": self.meta.get("dtype"),
            "hardware": self.hardware, "devices": self.world_size, "steps": self.steps,
            "latency_s": self.latency_s, "compute_s": self.compute_s, "comm_s": self.comm_s,
            "comm_exposed_s": self.comm_exposed_s, "comm_bytes_per_device": self.comm_bytes_per_device,
        }


class _Collective:
    """One collective instance shared by the ranks of its group."""

    __slots__ = ("kind", "nbytes", "tag", "size", "ranks", "plan", "loads", "issued", "streams",
                 "waiters", "start", "end")

    def __init__(self, op: tuple, topology: Topology, first: int):
        _, _, self.kind, self.nbytes, self.size, self.tag = op
        self.plan: Plan = topology.plan(self.kind, self.nbytes, first, self.size)
        ring = topology.ring(first, self.size)
        self.ranks, self.loads = ring.ranks, ring.loads
        self.issued = 0
        self.streams: list[_CommStream] = []  # comm streams that reached it, in arrival order
        self.waiters: list[_ComputeStream] = []  # compute streams blocked on it
        self.start: float | None = None
        self.end: float | None = None

    def describe(self) -> str:
        return f"{self.kind} {self.tag!r} of ranks {self.ranks[0]}..{self.ranks[-1]}"


class _CommStream:
    """One rank's communication stream: its collectives one at a time, in issue order.

    Event-driven rather than a SimPy process: a collective reaching the head of the queue is
    offered to its group at once (`offer`), and its completion offers the next one. That is the
    schedule a process would produce, without two process switches per collective and rank.
    """

    __slots__ = ("sim", "rank", "queue", "busy", "sent", "running")

    def __init__(self, sim: "_Sim", rank: int):
        self.sim, self.rank = sim, rank
        self.queue: deque[_Collective] = deque()
        self.busy = self.sent = 0.0
        self.running = False  # a collective of this stream is past its rendezvous

    def offer(self, coll: _Collective) -> None:
        """`coll` is at the head of this stream; the last rank of the group to offer starts it."""
        coll.streams.append(self)
        if len(coll.streams) == coll.size:
            self.sim.start(coll)

    def completed(self, coll: _Collective) -> None:
        """The head collective finished: account for it and offer the next one."""
        queue = self.queue
        queue.popleft()
        self.busy += coll.end - coll.start
        self.sent += coll.plan.sent
        if self.sim.spans is not None:
            self.sim.spans.append(Span(self.rank, "comm", coll.tag or coll.kind, coll.start, coll.end))
        if queue:
            self.offer(queue[0])


class _Sim:
    """Shared state of one run: comm streams, pending rendezvous, the network and its timer."""

    def __init__(self, env: simpy.Environment, topology: Topology, timeline: bool):
        self.env, self.topology = env, topology
        slowdown = topology.net.overlap_slowdown
        if not 0 <= slowdown < 1:
            raise ValueError(f"interconnect.overlap_slowdown must be in [0, 1), got {slowdown}")
        self.overlapped_rate = 1.0 - slowdown
        self.network = FluidNetwork(topology.capacities)
        self.streams = [_CommStream(self, r) for r in range(topology.world_size)]
        self.computes: list[_ComputeStream] = []
        self.seqs: list[dict[int, int]] = [{} for _ in range(topology.world_size)]
        self.pending: dict[tuple[int, int, int], _Collective] = {}
        self.spans: list[Span] | None = [] if timeline else None
        self._timer_gen = 0
        self._timer_at = float("inf")

    def issue(self, rank: int, op: tuple) -> _Collective:
        """Put collective `op` on `rank`'s comm stream; the n-th issue on a group matches across ranks."""
        size = op[4]
        seqs = self.seqs[rank]
        n = seqs.get(size, 0)
        seqs[size] = n + 1
        first = rank // size * size
        key = (first, size, n)
        coll = self.pending.get(key)
        if coll is None:
            coll = self.pending[key] = _Collective(op, self.topology, first)
        elif coll.kind != op[2] or coll.nbytes != op[3]:
            raise ValueError(f"rank {rank} issued {op[2]} of {op[3]} bytes (tag {op[5]!r}) where an earlier rank "
                             f"of its group issued {coll.kind} of {coll.nbytes} bytes (tag {coll.tag!r})")
        coll.issued += 1
        if coll.issued == size:
            del self.pending[key]
        stream = self.streams[rank]
        stream.queue.append(coll)
        if len(stream.queue) == 1:
            stream.offer(coll)
        return coll

    def start(self, coll: _Collective) -> None:
        """Every rank of the group is ready: pay the call's latency, then move the bytes."""
        coll.start = self.env.now
        for stream in coll.streams:
            stream.running = True
            self.computes[stream.rank].set_rate(self.overlapped_rate)
        latency = coll.plan.latency
        if latency > 0:
            self.env.timeout(latency, coll).callbacks.append(self._begin_transfer)
        else:
            self._transfer(coll)

    def _begin_transfer(self, event: simpy.Event) -> None:
        self._transfer(event.value)

    def _transfer(self, coll: _Collective) -> None:
        if coll.plan.load > 0:
            self.network.add(self.env.now, coll.plan.load, coll.loads, coll)
            self._arm()
        else:
            self._finish(coll)

    def _finish(self, coll: _Collective) -> None:
        coll.end = self.env.now
        if coll.waiters:
            self.env.timeout(0, coll.waiters).callbacks.append(_wake)
        for stream in coll.streams:
            stream.running = False
            stream.completed(coll)
        for stream in coll.streams:
            if not stream.running:  # no next collective started at once
                self.computes[stream.rank].set_rate(1.0)

    def _arm(self) -> None:
        at = self.network.next_finish()
        if at == self._timer_at:
            return
        self._timer_gen += 1
        self._timer_at = at
        if at != float("inf"):
            self.env.timeout(max(at - self.env.now, 0.0), self._timer_gen).callbacks.append(self._on_timer)

    def _on_timer(self, event: simpy.Event) -> None:
        if event.value != self._timer_gen:
            return  # rates changed since this timer was set
        self._timer_at = float("inf")
        for coll in self.network.pop_finished(self.env.now):
            self._finish(coll)
        self._arm()


class _ComputeStream:
    """One rank's compute stream walking its steps; event-driven like `_CommStream`.

    A compute op is `left` seconds of full-speed work progressing at `rate`. Its end timer is
    re-armed when the rate rises (a timer of an older `gen` is ignored); when the rate falls the
    timer fires early, finds work left and re-arms then, which saves a timer per overlap.
    """

    __slots__ = ("sim", "rank", "steps", "ops", "pos", "latest", "op", "left", "rate", "since", "begin", "gen",
                 "ran", "exposed", "blocked_on", "blocked_since", "step_ends", "finished_at")

    def __init__(self, sim: _Sim, rank: int, schedule: list[tuple[list, int]]):
        self.sim, self.rank = sim, rank
        self.steps = deque(ops for ops, reps in schedule for _ in range(reps))
        self.ops, self.pos = self.steps.popleft(), 0
        self.latest: dict[int, _Collective] = {}  # id -> latest issued instance
        self.op: tuple | None = None  # the compute op in progress
        self.left = self.since = self.begin = 0.0
        self.rate = 1.0
        self.gen = 0
        self.ran = self.exposed = 0.0  # seconds spent computing, and blocked in waits
        self.blocked_on: _Collective | None = None
        self.blocked_since = 0.0
        self.step_ends: list[float] = []
        self.finished_at: float | None = None

    def run(self) -> None:
        """Walk the ops until one takes time: a compute op, or a wait on an unfinished collective."""
        sim, now = self.sim, self.sim.env.now
        while True:
            ops = self.ops
            while self.pos < len(ops):
                op = ops[self.pos]
                self.pos += 1
                code = op[0]
                if code == COMPUTE:
                    self.op, self.left, self.begin, self.since = op, op[1], now, now
                    self._arm()
                    return
                if code == ISSUE:
                    self.latest[op[1]] = sim.issue(self.rank, op)
                else:
                    coll = self.latest.get(op[1])
                    if coll is not None and coll.end is None:
                        coll.waiters.append(self)
                        self.blocked_on, self.blocked_since = coll, now
                        return
            self.step_ends.append(now)
            if not self.steps:
                self.finished_at = now
                return
            self.ops, self.pos = self.steps.popleft(), 0

    def set_rate(self, rate: float) -> None:
        """Change the compute speed, settling the work done at the old one."""
        if rate == self.rate:
            return
        faster = rate > self.rate
        if self.op is not None:
            self._settle()
        self.rate = rate
        if faster and self.op is not None:
            self._arm()

    def _settle(self) -> None:
        now = self.sim.env.now
        self.left -= (now - self.since) * self.rate
        self.since = now

    def wake(self) -> None:
        """The awaited collective finished."""
        self.exposed += self.sim.env.now - self.blocked_since
        self.blocked_on = None
        self.run()

    def _arm(self) -> None:
        self.gen += 1
        self.sim.env.timeout(max(self.left, 0.0) / self.rate, self.gen).callbacks.append(self._op_done)

    def _op_done(self, event: simpy.Event) -> None:
        if event.value != self.gen:
            return
        self._settle()
        now = self.sim.env.now
        if self.left > 1e-12 * max(1.0, now) * self.rate:  # the rate fell since the timer was set
            self._arm()
            return
        op, self.op = self.op, None
        self.ran += now - self.begin
        spans = self.sim.spans
        if spans is not None:
            scale, t = (now - self.begin) / op[1], self.begin  # slowed parts, stretched evenly
            for name, seconds in op[2]:
                spans.append(Span(self.rank, "compute", name, t, t + seconds * scale))
                t += seconds * scale
        self.run()


def _wake(event: simpy.Event) -> None:
    for stream in event.value:
        stream.wake()


def compile_phase(events: list[dict], model: ComputeModel, world_size: int, where: str,
                  eager: bool = False) -> list[tuple]:
    """Trace events -> op tuples; consecutive compute events merge into one timeout (priced
    as eager launches if `eager`, else as graph replays).

    (COMPUTE, seconds, ((tag, seconds), ...)),
    (ISSUE, id, kind, bytes, group_size, tag), (WAIT, id).
    A synchronous issue gets its wait right after it if the trace lacks one.
    """
    ops: list[tuple] = []
    parts: list[tuple[str, float]] = []

    def flush() -> None:
        if parts:
            total = sum(s for _, s in parts)
            if total > 0:
                ops.append((COMPUTE, total, tuple(parts)))
            parts.clear()

    for i, ev in enumerate(events):
        kind = ev.get("type")
        if kind == "compute":
            parts.append((str(ev.get("tag") or "compute"), model.event_seconds(ev, eager)))
            continue
        flush()
        if kind == "issue":
            if ev["kind"] not in COLLECTIVES:
                raise ValueError(f"{where} event {i}: unknown collective {ev['kind']!r}; expected {COLLECTIVES}")
            size = int(ev.get("group_size", world_size))
            if size < 1 or world_size % size:
                raise ValueError(f"{where} event {i}: group_size {size} does not divide world_size {world_size}")
            nbytes = float(ev["bytes"])
            ops.append((ISSUE, ev["id"], ev["kind"], nbytes, size, ev.get("tag")))
            nxt = events[i + 1] if i + 1 < len(events) else {}
            if not ev.get("async", False) and not (nxt.get("type") == "wait" and nxt.get("id") == ev["id"]):
                ops.append((WAIT, ev["id"]))
        elif kind == "wait":
            ops.append((WAIT, ev["id"]))
        else:
            raise ValueError(f"{where} event {i}: unknown event type {kind!r}; expected compute, issue or wait")
    flush()
    return ops


def _schedules(trace: dict, model: ComputeModel, steps: int, graphs: str) -> tuple[dict[int, list], int]:
    meta = trace.get("meta", {})
    for key in ("world_size", "warmup_steps", "dtype"):
        if key not in meta:
            raise ValueError(f"trace meta lacks {key!r}")
    world = int(meta["world_size"])
    warm = min(int(meta["warmup_steps"]), steps)
    per_rank: dict[int, list] = {}
    for r, role in enumerate(trace["roles"]):
        phases = role["phases"]
        unknown = set(phases) - set(PHASES)
        if unknown:
            raise ValueError(f"role {r}: unknown phase(s) {sorted(unknown)}; expected {PHASES}")
        compiled = {p: compile_phase(phases.get(p, []), model, world, f"role {r} {p}") for p in PHASES}
        issued = {op[1] for ops in compiled.values() for op in ops if op[0] == ISSUE}
        stray = sorted({op[1] for ops in compiled.values() for op in ops if op[0] == WAIT} - issued)
        if stray:
            raise ValueError(f"role {r} waits on collective ids never issued: {stray[:10]}")
        eager = {p: compile_phase(phases.get(p, []), model, world, f"role {r} {p}", eager=True)
                 for p in ("warmup", "steady")}
        schedule = _graph_schedule(compiled, eager, warm, steps, meta.get("mode", "none") != "none", graphs)
        for rank in role["ranks"]:
            if rank in per_rank or not 0 <= rank < world:
                raise ValueError(f"rank {rank} of role {r} is repeated or outside world_size {world}")
            per_rank[rank] = schedule
    if len(per_rank) != world:
        raise ValueError(f"roles cover ranks {sorted(per_rank)}, not all of 0..{world - 1}")
    return per_rank, world


def _graph_schedule(graphed: dict[str, list], eager: dict[str, list], warm: int, steps: int,
                    patched: bool, graphs: str) -> list[tuple[list, int]]:
    """(ops, repetitions) per step in order, as the app runs them on a GPU.

    A graph-replayed steady step waits for its own gathers before it ends (a replay runs no
    Python to wait later: `PatchUNetForward._graph_step`). `graphs` (see `GRAPHS`) says which
    steps replay: "cold", a process's first generation: a patched mode's synchronous warm-up
    steps run eagerly, then the first steady step (`CudaGraphed`'s first call) and the second
    (captured: the host's eager time; its replay is not counted again); unpatched (mode none),
    the first two steps. "warm": a later generation, graphs already captured (warm-up steps
    still eager: the app does not capture them). "all": every step replays, warm-up included
    (as a runtime that captures its warm-up steps too). "none": every step eager.
    """
    if graphs not in GRAPHS:
        raise ValueError(f"graphs must be one of {GRAPHS}, got {graphs!r}")
    if graphs == "none":
        return [(eager["warmup"], warm), (eager["steady"], steps - warm), (graphed["final"], 1)]
    if not patched:
        cold = EAGER_STEPS if graphs == "cold" else 0
        warm_eager, steady_eager = min(warm, cold), min(steps - warm, max(0, cold - warm))
        return [(eager["warmup"], warm_eager), (graphed["warmup"], warm - warm_eager),
                (eager["steady"], steady_eager), (graphed["steady"], steps - warm - steady_eager),
                (graphed["final"], 1)]
    replayed = graphed["steady"] + [(WAIT, op[1]) for op in graphed["steady"] if op[0] == ISSUE]
    first = eager["warmup"] if graphs in ("cold", "warm") else graphed["warmup"]
    steady_eager = min(steps - warm, EAGER_STEPS) if graphs == "cold" else 0
    return [(first, warm), (eager["steady"], steady_eager), (replayed, steps - warm - steady_eager),
            (graphed["final"], 1)]


def simulate(trace: dict, hardware: Hardware | str, steps: int, profile: CalibrationProfile | None = None,
             timeline: bool = False, graphs: str = "cold") -> SimResult:
    """Replay `trace` for `steps` denoising steps on `hardware` (a preset or its name).

    The warmup phase runs min(meta.warmup_steps, steps) times, the steady phase the remaining
    steps, the final phase once; `graphs` (`GRAPHS`) says which steps replay CUDA graphs and
    which run eagerly (`_graph_schedule`). `profile` replaces roofline times where it has measurements;
    `timeline=True` fills `SimResult.spans`. Raises `RuntimeError` if the ranks deadlock.
    """
    if isinstance(hardware, str):
        hardware = load_hardware(hardware)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    model = ComputeModel(hardware.device, trace.get("meta", {}).get("dtype", ""), profile)
    schedules, world = _schedules(trace, model, steps, graphs)
    env = simpy.Environment()
    sim = _Sim(env, Topology(hardware, world), timeline)
    sim.computes = [_ComputeStream(sim, rank, schedules[rank]) for rank in range(world)]
    for stream in sim.computes:
        stream.run()
    env.run()
    _check_finished(sim)
    busy = [sum(op[1] * reps for ops, reps in schedules[r] for op in ops if op[0] == COMPUTE) for r in range(world)]
    computes = sim.computes
    return SimResult(
        latency_s=max(c.finished_at for c in computes), compute_s=max(busy),
        comm_s=max(s.busy for s in sim.streams), comm_exposed_s=max(c.exposed for c in computes),
        comm_bytes_per_device=max(s.sent for s in sim.streams),
        compute_slowdown_s=max(c.ran - b for c, b in zip(computes, busy)), world_size=world, steps=steps,
        hardware=hardware.name, meta=dict(trace.get("meta", {})), spans=sim.spans or [],
        step_end_s=[max(ends) for ends in zip(*(c.step_ends for c in computes))],
    )


def _check_finished(sim: _Sim) -> None:
    """Raise if a compute stream never finished or a collective never found its whole group."""
    stuck = [c.rank for c in sim.computes if c.finished_at is None]
    stuck += [r for r, stream in enumerate(sim.streams) if stream.queue and r not in stuck]
    if not stuck:
        return
    lines = []
    for r in stuck[:8]:
        blocked_on = sim.computes[r].blocked_on
        waits = blocked_on.describe() if blocked_on else "nothing"
        queue = sim.streams[r].queue
        at = f"{queue[0].describe()} ({len(queue[0].streams)}/{queue[0].size} ranks ready)" if queue else "idle"
        lines.append(f"rank {r}: compute waits for {waits}; comm stream at {at}")
    raise RuntimeError(f"deadlock at t={sim.env.now:.6g}s: ranks {stuck} never finish their compute or "
                       f"comm stream (do all ranks of a group issue the same collectives in the same order?):\n"
                       + "\n".join(lines))

"""The simulator against closed forms: roofline, ring alpha-beta, overlap, contention, rendezvous."""

from __future__ import annotations

import json

import pytest

from simulator import CalibrationProfile, available_hardware, load_hardware, simulate
from simulator.chrome_trace import write_chrome_trace
from simulator.compute_model import ProfileEntry
from simulator.hardware import hardware_from_dict
from simulator.sweep import append_row, plot_speedup, read_rows, speedups
from simulator.topology import Topology, isolated_time

PEAK, F_FLOPS, MEM_BW, F_BW, LAUNCH = 1e12, 0.5, 1e11, 0.8, 1e-5
LINK, ALPHA, BASE, EFF = 1e10, 1e-6, 5e-6, 0.5


def make_hw(kind: str = "nvswitch", num_devices: int = 8, **net) -> object:
    """A preset with round numbers; `net` adds or overrides interconnect keys."""
    return hardware_from_dict({
        "name": f"test_{kind}", "num_devices": num_devices,
        "device": {"name": "testgpu", "peak_flops": {"float16": PEAK, "bfloat16": PEAK, "float32": PEAK / 4},
                   "memory_bandwidth": MEM_BW, "flops_efficiency": F_FLOPS, "bandwidth_efficiency": F_BW,
                   "launch_overhead": LAUNCH},
        "interconnect": {"kind": kind, "link_bandwidth": LINK, "latency": ALPHA, "nccl_efficiency": EFF,
                         "base_latency": BASE, "protocols": "simple", "overlap_slowdown": 0.0, **net},
    })


def compute(seconds: float, tag: str = "c", kind: str = "matmul", key: str = "k") -> dict:
    """A compute event whose roofline time is `seconds` (compute bound, one launch)."""
    flops = (seconds - LAUNCH) * PEAK * F_FLOPS
    op = {"kind": kind, "key": key, "flops": flops, "bytes": 0.0, "count": 1}
    return {"type": "compute", "tag": tag, "flops": flops, "bytes": 0.0, "ops": [op]}


def issue(cid: int, nbytes: float, group: int, is_async: bool = True, kind: str = "all_gather") -> dict:
    return {"type": "issue", "id": cid, "kind": kind, "bytes": nbytes, "group_size": group,
            "async": is_async, "tag": f"coll{cid}"}


def wait(cid: int) -> dict:
    return {"type": "wait", "id": cid}


def make_trace(world: int, roles: list[tuple[list[int], list[dict]]], warmup: list[dict] | None = None,
               warmup_steps: int = 0) -> dict:
    """Each role runs `events` every steady step (and `warmup` in warm-up steps)."""
    return {"meta": {"model": "test", "resolution": 1024, "world_size": world, "dtype": "float16",
                     "warmup_steps": warmup_steps, "mode": "displaced"},
            "roles": [{"ranks": ranks, "phases": {"warmup": warmup or [], "steady": events, "final": []}}
                      for ranks, events in roles]}


def ring_all_gather(nbytes: float, g: int, bus: float = LINK * EFF) -> float:
    return BASE + (g - 1) * ALPHA + (g - 1) / g * (nbytes * g) / bus


def close(a: float, b: float) -> bool:
    return a == pytest.approx(b, rel=0.01)


def test_pure_compute_is_the_per_op_roofline():
    compute_bound = {"kind": "conv2d", "key": "a", "flops": 1e11, "bytes": 8e9, "count": 3}  # 0.2 s vs 0.1 s
    memory_bound = {"kind": "norm", "key": "b", "flops": 2.5e10, "bytes": 8e9, "count": 1}  # 0.05 s vs 0.1 s
    event = {"type": "compute", "tag": "x", "flops": 1.25e11, "bytes": 1.6e10, "ops": [compute_bound, memory_bound]}
    expect = (1e11 / (PEAK * F_FLOPS) + 3 * LAUNCH) + (8e9 / (MEM_BW * F_BW) + LAUNCH)
    trace = make_trace(1, [([0], [event])], warmup=[event, event], warmup_steps=2)
    result = simulate(trace, make_hw(num_devices=1), steps=5)
    assert close(result.latency_s, (2 * 2 + 3) * expect)
    assert close(result.compute_s, 7 * expect)
    assert result.comm_s == 0 and result.comm_exposed_s == 0


@pytest.mark.parametrize("g", [2, 4, 8])
def test_sync_all_gather_is_ring_alpha_beta(g):
    nbytes = 1e8
    trace = make_trace(8, [(list(range(8)), [issue(0, nbytes, g, is_async=False), wait(0)])])
    result = simulate(trace, make_hw(), steps=3)
    assert close(result.latency_s, 3 * ring_all_gather(nbytes, g))
    assert close(result.comm_s, result.latency_s)
    assert close(result.comm_bytes_per_device, 3 * (g - 1) * nbytes)


def test_all_reduce_and_broadcast_costs():
    nbytes, g = 4e8, 8
    for kind, expect in [("all_reduce", BASE + 2 * (g - 1) * ALPHA + 2 * (g - 1) / g * nbytes / (LINK * EFF)),
                         ("broadcast", BASE + (g - 1) * ALPHA + nbytes / (LINK * EFF)),
                         ("barrier", BASE + 2 * (g - 1) * ALPHA)]:
        trace = make_trace(g, [(list(range(g)), [issue(0, nbytes, g, is_async=False, kind=kind)])])
        assert close(simulate(trace, make_hw(), steps=1).latency_s, expect), kind


def test_async_all_gather_hidden_behind_longer_compute():
    nbytes, g = 1e8, 8
    t_comm, c = ring_all_gather(nbytes, g), 0.5
    assert c > t_comm
    trace = make_trace(g, [(list(range(g)), [issue(0, nbytes, g), compute(c), wait(0)])])
    result = simulate(trace, make_hw(), steps=4)
    assert close(result.latency_s, 4 * c)
    assert result.comm_exposed_s == 0
    assert close(result.comm_s, 4 * t_comm)


def test_communication_bound_when_compute_is_shorter():
    nbytes, g = 4e8, 8
    t_comm, c_before, c = ring_all_gather(nbytes, g), 0.05, 0.1
    assert c < t_comm
    trace = make_trace(g, [(list(range(g)), [compute(c_before), issue(0, nbytes, g), compute(c), wait(0)])])
    result = simulate(trace, make_hw(), steps=2)
    assert close(result.latency_s, 2 * (c_before + t_comm))
    assert close(result.comm_exposed_s, 2 * (t_comm - c))


def test_wait_on_previous_step_instance():
    """Steady step: wait for the last step's collective, compute, issue this step's."""
    nbytes, g, steps = 4e8, 8, 5
    t_comm, c = ring_all_gather(nbytes, g), 0.1
    trace = make_trace(g, [(list(range(g)), [wait(0), compute(c), issue(0, nbytes, g)])])
    result = simulate(trace, make_hw(), steps=steps, graphs="none")  # eager: the trace's own waits only
    assert close(result.latency_s, steps * c + (steps - 1) * t_comm)
    assert close(result.comm_exposed_s, (steps - 1) * t_comm)


def test_a_replayed_graph_step_waits_for_its_own_gathers():
    """Graph replays (after the two eager steps of a cold start) end with the step's gathers done:
    the gather issued at a step's end is exposed in that step, and the next one's wait is free."""
    nbytes, g, steps = 4e8, 8, 6
    t_comm, c = ring_all_gather(nbytes, g), 0.1
    trace = make_trace(g, [(list(range(g)), [wait(0), compute(c), issue(0, nbytes, g)])])
    ends = simulate(trace, make_hw(), steps=steps, graphs="cold").step_end_s
    durations = [b - a for a, b in zip([0.0] + ends, ends)][:steps]
    # eager step 1: c; eager step 2: waits step 1's gather, then c; the first replay waits step
    # 2's gather too, then c and its own; later replays: c and their own gather
    expect = [c, t_comm + c, 2 * t_comm + c] + [c + t_comm] * (steps - 3)
    assert all(close(a, b) for a, b in zip(durations, expect)), (durations, expect)


def test_step_end_s_marks_each_step_of_the_slowest_rank():
    """Warm-up: compute w, sync gather. Steady: wait last step's gather, compute c, issue (c < t).

    Steady step 1 ends w + t + c (nothing to wait for); each later one waits out the previous
    gather, so steps end t + c apart; the final phase waits the last gather, and rank 1 computes
    f more there, so the final entry is rank 1's.
    """
    nbytes, g, steps, warm, w, c, f = 4e8, 2, 6, 2, 0.02, 0.01, 0.03
    t = ring_all_gather(nbytes, g)
    assert c < t
    warmup = [compute(w), issue(0, nbytes, g, is_async=False)]
    steady = [wait(0), compute(c), issue(0, nbytes, g)]
    trace = make_trace(g, [([0], steady), ([1], steady)], warmup=warmup, warmup_steps=warm)
    trace["roles"][1]["phases"]["final"] = [wait(0), compute(f)]
    trace["roles"][0]["phases"]["final"] = [wait(0)]
    ends = simulate(trace, make_hw(num_devices=2), steps=steps, graphs="none").step_end_s
    first_steady = warm * (w + t) + c
    expect = [w + t, 2 * (w + t)] + [first_steady + k * (t + c) for k in range(steps - warm)]
    expect.append(expect[-1] + t + f)
    assert len(ends) == steps + 1
    assert all(close(a, b) for a, b in zip(ends, expect)), (ends, expect)
    assert all(b > a for a, b in zip(ends, ends[1:]))


def test_rendezvous_waits_for_the_slowest_rank():
    nbytes, g, slow, fast = 1e8, 4, 0.3, 0.01
    event = lambda c: [compute(c), issue(0, nbytes, g, is_async=False), wait(0)]  # noqa: E731
    trace = make_trace(g, [([2], event(slow)), ([0, 1, 3], event(fast))])
    result = simulate(trace, make_hw(), steps=1, timeline=True)
    t_comm = ring_all_gather(nbytes, g)
    assert close(result.latency_s, slow + t_comm)
    assert close(result.comm_exposed_s, slow - fast + t_comm)
    comm = [s for s in result.spans if s.stream == "comm"]
    assert len(comm) == g and all(close(s.start, slow) for s in comm)


def test_comm_stream_runs_collectives_in_issue_order():
    """Ranks 0,1 issue a world all-gather then a pair all-gather; ranks 2,3 join the first late.

    The pair's collective queues behind the world one, as on one NCCL stream.
    """
    late, nbytes = 0.3, 1e8
    first, second = issue(0, nbytes, 4), issue(1, nbytes, 2)
    roles = [([0, 1], [first, second, wait(1), wait(0)]), ([2, 3], [compute(late), first, second, wait(1), wait(0)])]
    result = simulate(make_trace(4, roles), make_hw(), steps=1)
    assert close(result.latency_s, late + ring_all_gather(nbytes, 4) + ring_all_gather(nbytes, 2))


def _pcie_halves(both: bool) -> float:
    """4 GPUs, each on its own switch in one socket, CFG halves {0,1} and {2,3} all-gathering."""
    hw = make_hw("pcie", num_devices=4, gpus_per_switch=1, switches_per_socket=4,
                 host_bridge_bandwidth=1e10, cross_socket_bandwidth=1e10)
    busy = [issue(0, 1e8, 2, is_async=False), wait(0)]
    roles = [([0, 1], busy), ([2, 3], busy if both else [compute(1e-3)])]
    return simulate(make_trace(4, roles), hw, steps=1).comm_s


def test_two_cfg_halves_share_the_host_bridge():
    # ring 0->1->0 crosses the host bridge twice: alone it gets 1/2 of it, with the other half 1/4
    alone, shared = _pcie_halves(both=False), _pcie_halves(both=True)
    assert close(alone, BASE + ALPHA + 1e8 / (1e10 * EFF / 2))
    assert close(shared, BASE + ALPHA + 1e8 / (1e10 * EFF / 4))
    assert close(shared - BASE - ALPHA, 2 * (alone - BASE - ALPHA))


def test_bandwidth_is_redivided_when_a_transfer_joins_and_leaves():
    """Half B starts 20 ms after half A on the shared bridge: A runs alone at R, then both at R/2."""
    hw = make_hw("pcie", num_devices=4, gpus_per_switch=1, switches_per_socket=4,
                 host_bridge_bandwidth=1e10, cross_socket_bandwidth=1e10)
    rate, delay, nbytes = 1e10 * EFF / 2, 0.02, 1e8
    sync = [issue(0, nbytes, 2, is_async=False), wait(0)]
    trace = make_trace(4, [([0, 1], sync), ([2, 3], [compute(delay)] + sync)])
    result = simulate(trace, hw, steps=1, timeline=True)
    a_left = nbytes - rate * delay  # both halves then share: A finishes after 2*a_left/rate more
    a_end = BASE + ALPHA + delay + 2 * a_left / rate
    b_end = a_end + (nbytes - a_left) / rate
    ends = {s.rank: s.end for s in result.spans if s.stream == "comm"}
    assert close(ends[0], a_end) and close(ends[1], a_end)
    assert close(ends[2], b_end) and close(result.latency_s, b_end)


def test_cfg_halves_do_not_contend_on_nvswitch():
    busy = [issue(0, 1e8, 4, is_async=False), wait(0)]
    result = simulate(make_trace(8, [(list(range(8)), busy)]), make_hw(), steps=1)
    assert close(result.latency_s, ring_all_gather(1e8, 4))


def test_topology_bottlenecks():
    pcie = Topology(make_hw("pcie", gpus_per_switch=2, switches_per_socket=2, host_bridge_bandwidth=4e10,
                            cross_socket_bandwidth=5e9), 8)
    assert close(pcie.ring(0, 2).bus_bandwidth, LINK * EFF)  # same switch: GPU links only
    full = pcie.ring(0, 8)
    assert close(full.bus_bandwidth, 5e9 * EFF)  # crosses sockets: the inter-socket link
    assert {"socket0->1", "socket1->0", "socket0.host_bridge"} <= {pcie.link_names[l] for l, _ in full.loads}
    assert close(isolated_time(pcie.plan("all_gather", 1e8, 0, 8), full), ring_all_gather(1e8, 8, bus=5e9 * EFF))
    two_nodes = Topology(make_hw("multinode", num_devices=16, gpus_per_node=8, intra_kind="nvswitch",
                                 nic_bandwidth=4e9, nic_latency=1e-5), 16)
    ring = two_nodes.ring(0, 16)
    assert close(ring.bus_bandwidth, 4e9 * EFF)
    plan = two_nodes.plan("all_gather", 0.0, 0, 16)
    assert close(plan.latency, BASE + 14 * ALPHA + 1e-5)  # one of the 15 steps crosses the network
    assert close(two_nodes.ring(8, 8).bus_bandwidth, LINK * EFF)


def test_base_latency_is_paid_once_per_call():
    """Ten tiny synchronous all-gathers cost ten times (base + steps*alpha), not one base."""
    calls, g, nbytes = 10, 4, 256.0
    trace = make_trace(g, [(list(range(g)), [issue(i, nbytes, g, is_async=False) for i in range(calls)])])
    result = simulate(trace, make_hw(num_devices=g), steps=1)
    assert close(result.latency_s, calls * ring_all_gather(nbytes, g))
    assert close(result.comm_s, calls * (BASE + (g - 1) * ALPHA + (g - 1) * nbytes / (LINK * EFF)))


NCCL_NET = {"protocols": "nccl", "base_latency": 8.4e-6, "latency": 3.4e-6}  # NCCL's ring Simple on NVLink


def test_nccl_protocol_per_call_small_low_latency_large_simple():
    """NCCL's model: a 256 B all-gather runs LL (6.6 us + 0.6 us a step), 256 MB Simple, 20 kB LL128."""
    topo = Topology(make_hw(**NCCL_NET), 8)
    small, large = topo.plan("all_gather", 256.0, 0, 8), topo.plan("all_gather", 256e6, 0, 8)
    assert (small.protocol, large.protocol) == ("LL", "Simple")
    assert close(small.latency, 6.6e-6 + 7 * 0.6e-6) and close(small.load, 3 * 7 * 256.0)  # LL: 1/3 of the bus
    assert close(large.latency, 8.4e-6 + 7 * 3.4e-6) and close(large.load, 7 * 256e6)
    trace = make_trace(8, [(list(range(8)), [issue(0, 256.0, 8, is_async=False), issue(1, 256e6, 8, is_async=False)])])
    expect = sum(p.latency + p.load / (LINK * EFF) for p in (small, large))
    assert close(simulate(trace, make_hw(**NCCL_NET), steps=1).latency_s, expect)
    # 20 kB: LL128 (14 us + 1.9 us a step, 92% of the bus) beats both on NVLink; NCCL enables it only there
    assert topo.plan("all_gather", 2e4, 0, 8).protocol == "LL128"
    pcie = Topology(make_hw("pcie", gpus_per_switch=8, switches_per_socket=1, host_bridge_bandwidth=1e10,
                            cross_socket_bandwidth=1e10, **{**NCCL_NET, "latency": 5.7e-6}), 8)
    assert pcie.plan("all_gather", 2e4, 0, 8).protocol == "Simple"


def test_all_reduce_takes_the_tree_when_small_across_nodes_and_the_ring_when_large():
    """4 nodes x 8: NCCL's tree crosses the network 2*log2(4) times, the ring 2*(4-1); inside one node ring wins."""
    hw = make_hw("multinode", num_devices=32, gpus_per_node=8, intra_kind="nvswitch", nic_bandwidth=4e10,
                 nic_latency=14e-6, **NCCL_NET)
    topo = Topology(hw, 32)
    small, large = topo.plan("all_reduce", 1024.0, 0, 32), topo.plan("all_reduce", 1e9, 0, 32)
    assert small.algorithm == "tree" and large.algorithm == "ring"
    assert close(small.latency, 6.8e-6 + 2 * (7 * 0.6e-6 + 2 * 5.0e-6))  # tree LL
    ring = topo.ring(0, 32)
    assert close(large.latency + large.load / ring.bus_bandwidth, 8.4e-6 + (62 * (28 * 3.4e-6 + 3 * 14e-6) / 31)
                 + 2 * 31 / 32 * 1e9 / ring.bus_bandwidth)
    assert Topology(make_hw(**NCCL_NET), 8).plan("all_reduce", 1024.0, 0, 8).algorithm == "ring"


def test_pcie_ring_of_all_ranks_is_slower_per_byte_than_a_pair_on_one_switch():
    """a100_pcie: a pair on one switch moves at its GPU links; all 8 GPUs send at once and the ring
    crosses socket 0's host bridge three times (1->2, 3->4, 7->0), so it gets a third of it."""
    hw = load_hardware("a100_pcie")
    net, nbytes = hw.interconnect, 64e6
    per_byte = {}
    for g in (2, 8):
        trace = make_trace(8, [(list(range(8)), [issue(0, nbytes, g, is_async=False)])])
        topo = Topology(hw, 8)
        plan = topo.plan("all_gather", nbytes, 0, g)
        per_byte[g] = (simulate(trace, hw, steps=1).latency_s - plan.latency) / plan.sent
    assert close(per_byte[2], 1 / (net.link_bandwidth * net.nccl_efficiency))
    bridge = net.host_bridge_bandwidth * net.nccl_efficiency / 3
    assert bridge < min(net.cross_socket_bandwidth, net.link_bandwidth) * net.nccl_efficiency
    assert close(per_byte[8], 1 / bridge) and per_byte[8] > 1.5 * per_byte[2]


SLOW = 0.2


def test_overlap_slowdown_lengthens_an_overlapped_step_by_slowdown_times_comm():
    """Compute c beside a gather of t: (1-s) speed for t, so the step ends at c + s*t; synchronous: t + c."""
    nbytes, g, c, steps = 1e8, 8, 0.5, 3
    t = ring_all_gather(nbytes, g)
    assert c > t
    hw = make_hw(overlap_slowdown=SLOW)
    overlapped = simulate(make_trace(g, [(list(range(g)), [issue(0, nbytes, g), compute(c), wait(0)])]), hw, steps)
    assert close(overlapped.latency_s, steps * (c + SLOW * t))
    assert close(overlapped.compute_slowdown_s, steps * SLOW * t) and close(overlapped.compute_s, steps * c)
    sync = simulate(make_trace(g, [(list(range(g)), [issue(0, nbytes, g, is_async=False), compute(c)])]), hw, steps)
    assert close(sync.latency_s, steps * (t + c)) and sync.compute_slowdown_s == pytest.approx(0, abs=1e-12)


def test_overlap_slowdown_starting_and_ending_mid_op():
    """Rank 1 starts the gather d into rank 0's compute c; both lose s*t; the gather then ends mid-op."""
    nbytes, c, d, e = 1e8, 0.6, 0.1, 0.4
    t = ring_all_gather(nbytes, 2)
    assert d + t < c and t < e
    roles = [([0], [issue(0, nbytes, 2), compute(c), wait(0)]), ([1], [compute(d), issue(0, nbytes, 2), compute(e), wait(0)])]
    result = simulate(make_trace(2, roles), make_hw(num_devices=2, overlap_slowdown=SLOW), steps=1, timeline=True)
    ends = {s.rank: s.end for s in result.spans if s.stream == "compute"}
    assert close(ends[0], c + SLOW * t) and close(ends[1], d + e + SLOW * t)


def test_calibration_profile_overrides_roofline(tmp_path):
    hw = make_hw(num_devices=1)
    measured = {"kind": "conv2d", "key": "3x3", "flops": 2e9, "bytes": 0.0, "count": 3}
    same_kind = {"kind": "conv2d", "key": "1x1", "flops": 1e10, "bytes": 0.0, "count": 1}
    other_kind = {"kind": "matmul", "key": "m", "flops": 1e10, "bytes": 0.0, "count": 1}
    roof = lambda flops, n: flops / (PEAK * F_FLOPS) + n * LAUNCH  # noqa: E731
    ratio = 0.5 / roof(2e9 / 3, 1)
    profile = CalibrationProfile("testgpu", "float16", [ProfileEntry("conv2d", "3x3", 0.5, 2e9 / 3, 0.0)])
    profile.save(tmp_path / "p.json")
    loaded = CalibrationProfile.load(tmp_path / "p.json")
    assert loaded.to_dict() == profile.to_dict()
    for op, expect in [(measured, 3 * 0.5), (same_kind, ratio * roof(1e10, 1)), (other_kind, roof(1e10, 1))]:
        trace = make_trace(1, [([0], [{"type": "compute", "tag": "x", "flops": 0, "bytes": 0, "ops": [op]}])])
        assert close(simulate(trace, hw, steps=1, profile=loaded).latency_s, expect), op["key"]
        assert close(simulate(trace, hw, steps=1).latency_s, roof(op["flops"], op["count"]))


def test_chrome_trace_is_valid_json_with_every_rank(tmp_path):
    trace = make_trace(4, [(list(range(4)), [compute(0.01), issue(0, 1e6, 4), compute(0.02), wait(0)])])
    result = simulate(trace, make_hw(), steps=2, timeline=True)
    path = write_chrome_trace(result.spans, tmp_path / "t.json", metadata=result.to_row())
    data = json.loads(path.read_text())
    spans = [e for e in data["traceEvents"] if e["ph"] == "X"]
    assert {(e["pid"], e["tid"]) for e in spans} == {(r, t) for r in range(4) for t in (0, 1)}
    assert all(e["dur"] >= 0 and isinstance(e["name"], str) for e in spans)
    assert close(max(e["ts"] + e["dur"] for e in spans), result.latency_s * 1e6)


def test_mismatched_ranks_deadlock_or_disagree():
    ok = [issue(0, 1e6, 2, is_async=False)]
    with pytest.raises(RuntimeError, match="deadlock"):
        simulate(make_trace(2, [([0], ok), ([1], [compute(0.01)])]), make_hw(), steps=1)
    with pytest.raises(RuntimeError, match="rank 0: .*comm stream at all_gather"):  # async, never matched
        simulate(make_trace(2, [([0], [issue(0, 1e6, 2)]), ([1], [compute(0.01)])]), make_hw(), steps=1)
    with pytest.raises(ValueError, match="bytes"):
        simulate(make_trace(2, [([0], ok), ([1], [issue(0, 2e6, 2, is_async=False)])]), make_hw(), steps=1)


def test_presets_load_and_bad_presets_are_explained(tmp_path):
    names = available_hardware()
    assert {"a100_sxm_nvlink", "h100_pcie", "rtx4090_pcie", "h100_2node", "h200_sxm_nvlink", "a100_2node"} <= set(names)
    for name in names:
        assert load_hardware(name).name == name
    with pytest.raises(ValueError, match="available: .*h100_pcie"):
        load_hardware("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text((load_hardware.__globals__["HARDWARE_DIR"] / "a100_pcie.yaml").read_text()
                   .replace("nccl_efficiency", "nccl_efficency"))
    with pytest.raises(ValueError, match="unknown key.*nccl_efficency.*allowed"):
        load_hardware(bad)


def test_sweep_csv_and_plot(tmp_path):
    csv_path = tmp_path / "sweep.csv"
    for hw, n, lat in [("a", 1, 8.0), ("a", 2, 4.4), ("a", 4, 2.5), ("b", 2, 5.0), ("b", 4, 3.0)]:
        append_row(csv_path, {"hardware": hw, "resolution": 1024, "devices": n, "latency_s": lat})
    rows = read_rows(csv_path)
    curves = speedups(rows)["1024"]
    assert curves["a"][2] == (4, pytest.approx(3.2)) and curves["b"][1] == (4, pytest.approx(10 / 3))
    with pytest.raises(ValueError, match="columns"):
        append_row(csv_path, {"hardware": "a"})
    assert plot_speedup(rows, tmp_path / "s.png").stat().st_size > 0

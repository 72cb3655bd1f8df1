"""Disaggregated prefill/decode (hand-offs): the scheduler's decision, the simulated transfer,
the receiver's KV reservation, and departures during a hand-off."""

from __future__ import annotations

import heapq
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from sparecycles.errors import InvalidRequest
from sparecycles.scheduling import perfmodel
from sparecycles.scheduling.presets import DEVICE_PRESETS, MBIT, MODEL_PRESETS
from sparecycles.scheduling.scheduler import SchedulerConfig, predict, schedule
from sparecycles.sim import SimConfig, load_trace, parse_fleet, simulate, summarize
from sparecycles.sim.loop import DONE, EV_KV_ARRIVED, EV_NODE, Simulation, Waiting
from sparecycles.sim.trace import Trace, head, scaled
from sparecycles.types import DeviceProfile, Job, NodeSnapshot

MODEL = MODEL_PRESETS["llama-3.1-8b-q4"]
MODELS = {MODEL.name: MODEL}
NOW = 1000.0
EPOCH = 1_700_158_546.0
LAN = 10_000 * MBIT  # 10 Gbit/s
# compute-rich, bandwidth-poor: a parked car's Orin board (42.5 TFLOP/s, 205 GB/s), here on a
# fast link; bandwidth-rich, compute-poor: an EPYC server (461 GB/s, 7.4 TFLOP/s, 25 Gbit/s)
ORIN = replace(DEVICE_PRESETS["car"], uplink_bytes_per_s=LAN, downlink_bytes_per_s=LAN)
EPYC = DEVICE_PRESETS["server"]
DISAGG = SchedulerConfig(disaggregate=True)


def node(node_id: str, profile: DeviceProfile, **kw: Any) -> NodeSnapshot:
    return NodeSnapshot(node_id=node_id, owner_id="o-" + node_id, profile=profile,
                        models=(MODEL.name,), **kw)  # fmt: skip


def job(job_id: str = "j1", prompt: int = 12_000, out: int = 512) -> Job:
    return Job(job_id, MODEL.name, prompt, out, "c", NOW)


# --- the decision ------------------------------------------------------------------------


def test_prefills_on_compute_and_decodes_on_bandwidth_over_a_fast_link() -> None:
    """A 12k-token prompt: the Orin prefills it ~7x faster than the server, the server decodes
    ~2x faster; over 10 Gbit/s the 1.6 GB cache takes ~1.3 s, so the pair beats either alone."""
    nodes = [node("orin", ORIN), node("epyc", EPYC)]
    out = schedule([job()], nodes, MODELS, NOW, DISAGG)
    assert [(a.node_id, a.decode_node_id) for a in out] == [("orin", "epyc")]
    alone = min(predict(job(), n, MODEL, NOW, DISAGG).total_s for n in nodes)
    assert out[0].predicted_finish_s - NOW < alone / DISAGG.disaggregate_gain_min
    # the same state, ours without hand-offs: one node does both
    colocated = schedule([job()], nodes, MODELS, NOW, SchedulerConfig())
    assert [a.decode_node_id for a in colocated] == [""]


def test_no_hand_off_over_a_home_uplink() -> None:
    """The same pair with the car's own link (10 Mbit/s up): 1.6 GB would take ~21 minutes."""
    car = DEVICE_PRESETS["car"]
    kv_bytes = 12_000 * perfmodel.kv_bytes_per_token(MODEL)
    assert kv_bytes / perfmodel.link_bytes_per_s(car, EPYC) > 1200.0
    out = schedule([job()], [node("car", car), node("epyc", EPYC)], MODELS, NOW, DISAGG)
    assert [a.decode_node_id for a in out] == [""]


def test_no_hand_off_when_a_link_is_unknown_or_busy() -> None:
    unknown = replace(ORIN, uplink_bytes_per_s=0.0)
    out = schedule([job()], [node("orin", unknown), node("epyc", EPYC)], MODELS, NOW, DISAGG)
    assert [a.decode_node_id for a in out] == [""]
    # a known link, but ten minutes of hand-offs already queued on it
    busy = node("orin", ORIN, uplink_backlog_s=600.0)
    out = schedule([job()], [busy, node("epyc", EPYC)], MODELS, NOW, DISAGG)
    assert [a.decode_node_id for a in out] == [""]


def test_the_receiver_needs_room_for_the_whole_kv_need() -> None:
    """A receiver whose KV reservations leave no room for the job's prompt plus max_tokens is not
    one; two hand-offs in one call see each other's reservation."""
    capacity = perfmodel.costs(MODEL, EPYC).kv_capacity_tokens
    full = node("epyc", EPYC, active_jobs=1, kv_reserved_tokens=capacity - 12_000)
    out = schedule([job()], [node("orin", ORIN), full], MODELS, NOW, DISAGG)
    assert [a.decode_node_id for a in out] == [""]
    roomy = node("epyc", EPYC, active_jobs=1, kv_reserved_tokens=capacity - 18_000)
    jobs = [job("a"), replace(job("b"), admitted_at_s=NOW + 1e-3)]
    out = schedule(jobs, [node("orin", ORIN), roomy], MODELS, NOW + 1e-3, DISAGG)
    assert sum(a.decode_node_id == "epyc" for a in out) == 1  # the second would not fit


def test_fleet_file_link_speeds() -> None:
    fleet = parse_fleet({"class": [{"name": "pc", "device": "gaming-pc", "count": 1,
                                    "models": [MODEL.name], "uplink_mbit_s": 500,
                                    "downlink_mbit_s": 1000}]})  # fmt: skip
    profile = fleet.classes[0].profile
    assert (profile.uplink_bytes_per_s, profile.downlink_bytes_per_s) == (500 * MBIT, 1000 * MBIT)
    with pytest.raises(InvalidRequest):
        parse_fleet({"class": [{"name": "pc", "device": "gaming-pc", "models": [MODEL.name],
                                "uplink_mbit_s": -1}]})  # fmt: skip


# --- the simulated hand-off --------------------------------------------------------------


def two_node_sim(link_mbit_s: float = 10_000.0) -> tuple[Simulation, Any, Any]:
    fleet = parse_fleet({"class": [
        {"name": "orin", "device": "car", "count": 1, "models": [MODEL.name],
         "uplink_mbit_s": link_mbit_s, "downlink_mbit_s": link_mbit_s},
        {"name": "epyc", "device": "server", "count": 1, "models": [MODEL.name]},
    ]})  # fmt: skip
    trace = Trace("t", EPOCH, np.zeros(4), np.full(4, 12_000), np.full(4, 300))
    sim = Simulation(trace, fleet, SimConfig(policy="fastest+disagg", seed=1))
    sim._start_nodes()
    return sim, sim.nodes[0], sim.nodes[1]


def hand_off(sim: Simulation, sender: Any, receiver: Any, req: int, t: float = 0.0) -> None:
    job = Job(str(req), MODEL.name, 12_000, 512, "c", t)
    sim.start_handoff(Waiting(req, job, t), sender, receiver, t, t + 60.0)


def run_events(sim: Simulation, until: float, kinds: tuple[int, ...] = (EV_NODE, EV_KV_ARRIVED)
               ) -> list[tuple[float, int]]:  # fmt: skip
    """Process the nodes' and the hand-offs' events up to ``until`` (no scheduler)."""
    handlers = {EV_NODE: sim.on_node, EV_KV_ARRIVED: sim.on_kv_arrived}
    seen = []
    while sim.heap and sim.heap[0][0] <= until:
        t, _, kind, obj, version = heapq.heappop(sim.heap)
        if kind in kinds:
            handlers[kind](obj, version, t)
            seen.append((t, kind))
    return seen


def test_the_first_token_comes_from_the_sender_and_the_decode_waits_for_the_cache() -> None:
    sim, orin, epyc = two_node_sim()
    hand_off(sim, orin, epyc, 0)
    pre = orin.prefilling
    dec = epyc.incoming[0]
    assert pre is not None and pre.handoff is dec and dec.source is pre
    assert epyc.kv_reserved() == 12_000 + 512  # reserved from the placement on ...
    assert epyc.kv_admitted() == 0  # ... not yet filled
    assert orin.kv_reserved() == 12_001  # the sender holds the prompt and its first token
    prefilled = orin.next_event_t(0.0)
    assert prefilled is not None
    run_events(sim, prefilled)
    assert sim.first[0] == pytest.approx(prefilled + orin.profile.network_rtt_s)
    assert orin.sending == [pre] and dec.done == 1.0
    arrivals = [e for e in sim.heap if e[2] == EV_KV_ARRIVED]
    size = 12_000 * orin.costs.kv_bytes_per_token
    expected = prefilled + size / (10_000 * MBIT) + perfmodel.pair_rtt_s(orin.profile,
                                                                         epyc.profile)
    assert [e[0] for e in arrivals] == [pytest.approx(expected)]
    assert epyc.decoding == []  # nothing decodes before the cache is there
    run_events(sim, expected)
    assert epyc.decoding == [dec] and epyc.incoming == [] and orin.sending == []
    assert orin.kv_admitted() == 0 and orin.cache == {}  # freed (no conversation to keep)
    assert sim.result_counters["kv_bytes"] == size
    run_events(sim, 1e6)
    assert sim.status[0] == DONE and sim.end[0] > expected
    assert sim.handed_off[0] == 1 and sim.interrupted[0] == 0


def test_hand_offs_queue_on_the_link() -> None:
    """Two hand-offs over a 100 Mbit/s link: the second cache waits for the first to leave."""
    sim, orin, epyc = two_node_sim(link_mbit_s=100.0)
    hand_off(sim, orin, epyc, 0)
    hand_off(sim, orin, epyc, 1)
    seen = run_events(sim, 1e6)
    size_s = 12_000 * orin.costs.kv_bytes_per_token / (100 * MBIT)
    rtt = perfmodel.pair_rtt_s(orin.profile, epyc.profile)
    first_prefilled = sim.first[0] - orin.profile.network_rtt_s
    arrived = [t for t, kind in seen if kind == EV_KV_ARRIVED]
    assert arrived == [pytest.approx(first_prefilled + size_s + rtt),
                       pytest.approx(first_prefilled + 2 * size_s + rtt)]  # fmt: skip
    assert sim.status[0] == DONE and sim.status[1] == DONE


def test_the_sender_leaving_mid_hand_off_re_places_the_job() -> None:
    sim, orin, epyc = two_node_sim()
    hand_off(sim, orin, epyc, 0)
    sim.on_leave(orin, 0, 1.0)
    sim.on_drain_end(orin, orin.drains, 1.0 + orin.policy.drain_grace_s)
    assert epyc.incoming == [] and epyc.kv_reserved() == 0  # the reservation is released
    w = sim.waiting["0"]
    assert w.job.avoid_nodes == (orin.node_id,) and w.job.generated_tokens == 0
    assert sim.interrupted[0] == 1 and sim.result_counters["handoffs_interrupted"] == 1


def test_the_receiver_leaving_while_the_cache_is_in_flight_re_places_the_job() -> None:
    sim, orin, epyc = two_node_sim(link_mbit_s=100.0)
    hand_off(sim, orin, epyc, 0)
    prefilled = orin.next_event_t(0.0)
    assert prefilled is not None
    run_events(sim, prefilled)
    assert orin.sending  # the cache is on its way
    sim.on_leave(epyc, 0, prefilled + 1.0)
    sim.on_drain_end(epyc, epyc.drains, prefilled + 1.0 + epyc.policy.drain_grace_s)
    assert orin.sending == [] and orin.kv_reserved() == 0
    w = sim.waiting["0"]
    assert w.job.avoid_nodes == (epyc.node_id,)
    assert w.job.generated_tokens == 1  # the first token reached the client from the sender
    assert sim.result_counters["handoffs_interrupted"] == 1
    run_events(sim, 1e6)  # the cache's arrival, now stale, changes nothing
    assert epyc.decoding == [] and sim.status[0] != DONE


class CheckedSimulation(Simulation):
    """Asserts after every node and hand-off event that no node's KV reservations exceed its
    capacity (nor what its engine holds)."""

    def _check(self) -> None:
        for n in self.nodes:
            every = [*n.queue, *n.decoding, *n.sending, *n.incoming]
            if n.prefilling is not None:
                every.append(n.prefilling)
            assert sum(a.kv_need for a in every) <= n.costs.kv_capacity_tokens, n.node_id
            assert n.kv_admitted() + n.cached_tokens <= n.costs.kv_capacity_tokens, n.node_id

    def on_node(self, obj: object, version: int, t: float) -> None:
        super().on_node(obj, version, t)
        self._check()

    def on_kv_arrived(self, obj: object, version: int, t: float) -> None:
        super().on_kv_arrived(obj, version, t)
        self._check()

    def on_schedule(self, obj: object, version: int, t: float) -> None:
        super().on_schedule(obj, version, t)
        self._check()


def datacentre_fleet():
    return parse_fleet({"class": [
        {"name": "h100", "device": "h100", "count": 1, "models": [MODEL.name], "jobs_max": 16},
        # servers lending 12 GiB: ~60k tokens of KV cache beside the weights, so a few long
        # sequences fill it before their eight slots do
        {"name": "server", "device": "server", "count": 8, "models": [MODEL.name],
         "profile": {"ram_bytes": 24 << 30}},
    ]})  # fmt: skip


def test_the_receiver_s_kv_cache_is_never_over_committed() -> None:
    """The long-context trace at three times its rate on one H100 and eight CPU servers with
    little memory: hand-offs happen, and no node's KV reservations ever exceed its capacity."""
    trace = head(scaled(load_trace("long"), 3 * 3600, 1), 500)
    config = SimConfig(policy="fastest+disagg", seed=1)
    result = CheckedSimulation(trace, datacentre_fleet(), config).run()
    assert (result.handed_off > 0).sum() > 10
    assert result.kv_over_capacity_placements == 0
    assert result.kv_bytes_moved > 0
    again = simulate(trace, datacentre_fleet(), config)  # and it replays from its seed
    assert np.array_equal(result.end, again.end, equal_nan=True)
    assert summarize(again).kv_over_capacity_placements == 0

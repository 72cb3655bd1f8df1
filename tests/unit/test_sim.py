"""The simulator: replays exactly from its seed, and ours beats the baselines under churn."""

from __future__ import annotations

import random
import tomllib
from pathlib import Path

import numpy as np
import pytest

from sparecycles import availability as av
from sparecycles.errors import InvalidRequest, NotFound
from sparecycles.sim import (
    SimConfig,
    load_fleet,
    load_trace,
    parse_fleet,
    scaled,
    simulate,
    summarize,
)
from sparecycles.sim.churn import AvailabilitySpec, CarHabits, intersect, realise
from sparecycles.sim.loop import DONE, max_tokens_for
from sparecycles.sim.policies import CandidateIndex
from sparecycles.sim.report import comparison_table, markdown
from sparecycles.sim.trace import Trace, head

FLEETS = Path(__file__).resolve().parents[2] / "examples" / "fleets"
EPOCH = 1_700_158_546.0  # 2023-11-16 18:15:46 UTC, the conv trace's start


def churny_consumer_fleet():  # the churny example without its data-centre GPU
    data = tomllib.loads((FLEETS / "churny.toml").read_text())
    data["class"] = [c for c in data["class"] if c["name"] != "a100"]
    return parse_fleet(data)


@pytest.fixture(scope="module")
def trace() -> Trace:
    # the conv trace's first ~2.5 minutes at twice its rate
    return head(scaled(load_trace("conv"), 2 * 19_366, 0), 1000)


def test_same_seed_same_results(trace: Trace) -> None:
    fleet = load_fleet(FLEETS / "churny.toml")
    short = head(trace, 150)
    for policy in ("fastest+hedge", "random"):
        a = simulate(short, fleet, SimConfig(policy=policy, seed=11))
        b = simulate(short, fleet, SimConfig(policy=policy, seed=11))
        for name in ("first_token", "end", "status", "attempts", "interrupted", "hedged",
                     "node_busy_s", "node_earned_micros"):  # fmt: skip
            assert np.array_equal(getattr(a, name), getattr(b, name), equal_nan=True), name
        assert a.events == b.events and a.charges_micros == b.charges_micros
    c = simulate(short, fleet, SimConfig(policy="random", seed=12))
    assert not np.array_equal(c.end, b.end, equal_nan=True)  # another seed, another run


def test_ours_beats_every_baseline_under_churn(trace: Trace) -> None:
    fleet = churny_consumer_fleet()
    results = {
        p: summarize(simulate(trace, fleet, SimConfig(policy=p, seed=5)))
        for p in ("fastest", "random", "round-robin", "least-loaded")
    }
    ours = results.pop("fastest")
    for name, base in results.items():
        assert ours.slo_attainment > base.slo_attainment, name
        assert ours.goodput_rps > base.goodput_rps, name
        assert ours.goodput_tokens_per_s > base.goodput_tokens_per_s, name
    table = markdown([ours, *results.values()])
    assert "| fastest |" in table and "| least-loaded |" in table
    assert comparison_table([ours]).row_count == 1


def test_every_request_is_accounted_for(trace: Trace) -> None:
    result = simulate(head(trace, 400), load_fleet(FLEETS / "churny.toml"), SimConfig(seed=2))
    s = summarize(result)
    assert s.completed + s.failed == s.requests == 400
    done = result.status == DONE
    assert np.all(result.end[done] >= result.first_token[done])
    assert np.all(result.first_token[done] >= result.arrival[done])
    # owners are paid from the charges: never more than the owners' 80% share
    assert 0 < result.node_earned_micros.sum() <= result.charges_micros * 0.8 + len(result.status)
    assert (
        0.0 <= min(c.utilization for c in s.classes) <= max(c.utilization for c in s.classes) <= 1.0
    )


def test_departures_interrupt_and_jobs_resume_elsewhere() -> None:
    """Nodes whose every stay is ~90 s, serving long outputs: jobs must be resumed."""
    fleet = parse_fleet({
        "class": [{
            "name": "flaky", "device": "laptop", "count": 12, "models": ["llama-3-8b-q4"],
            "availability": {"kind": "weibull", "up_shape": 1.0, "up_scale_h": 0.025,
                             "down_shape": 1.0, "down_scale_h": 0.01, "drain_grace_s": 0},
        }],
    })  # fmt: skip
    n = 60
    trace = Trace("long", EPOCH, np.arange(n) * 2.0, np.full(n, 100), np.full(n, 1500))
    s = summarize(simulate(trace, fleet, SimConfig(policy="random", seed=1)))
    assert s.interrupted > 0
    assert s.recovered > 0  # resumed elsewhere from the tokens already delivered


def test_max_tokens_rule() -> None:
    assert max_tokens_for(1) == 64
    assert max_tokens_for(100) == 128
    assert max_tokens_for(128) == 128
    assert max_tokens_for(5000) == 8192
    assert max_tokens_for(9000) == 9000  # never below what the request produced


def test_example_fleets_parse_and_scale() -> None:
    mixed = load_fleet(FLEETS / "mixed.toml")
    assert {c.name for c in mixed.classes} >= {"gaming-pc", "laptop", "car", "a100"}
    assert mixed.slo.ttft_s == 5.0
    big = mixed.scaled(100_000)
    assert abs(big.node_count - 100_000) < 10
    assert [c.name for c in big.classes] == [c.name for c in mixed.classes]
    with pytest.raises(InvalidRequest):
        parse_fleet({"class": [{"device": "laptop", "models": ["llama-3-8b-q4"],
                                "availability": {"kind": "weibull", "up": "nope"}}]})  # fmt: skip
    with pytest.raises(NotFound):
        parse_fleet({"class": [{"device": "toaster", "models": ["llama-3-8b-q4"]}]})
    with pytest.raises(InvalidRequest):
        parse_fleet({})


def test_trace_loading_and_scaling() -> None:
    conv = load_trace("conv")
    assert len(conv) == 19_366
    assert 1000 < conv.prompt_tokens.mean() < 1300
    big = scaled(conv, 50_000, 0)
    assert len(big) == 50_000
    assert np.all(np.diff(big.arrival_s) >= 0)
    assert big.duration_s <= conv.duration_s
    assert scaled(conv, 50_000, 0).arrival_s.tolist() == big.arrival_s.tolist()


def test_weibull_availability_starts_in_steady_state() -> None:
    spec = AvailabilitySpec(kind="weibull", up=av.FTA_ND07CPU_UP, down=av.FTA_ND07CPU_DOWN)
    rng = random.Random(0)
    up_at_zero = sum(
        any(a <= 0.0 < b for a, b in realise(rng, spec, EPOCH, 3600.0).intervals)
        for _ in range(4000)
    )
    expected = av.FTA_ND07CPU_UP.mean_s / (av.FTA_ND07CPU_UP.mean_s + av.FTA_ND07CPU_DOWN.mean_s)
    assert up_at_zero / 4000 == pytest.approx(expected, abs=0.03)


def test_windows_cut_availability() -> None:
    # available 18:00-19:00 UTC only; the run starts 18:15:46
    spec = AvailabilitySpec(kind="always", windows=((18 * 60, 19 * 60),))
    real = realise(random.Random(0), spec, EPOCH, 7200.0)
    inside = [iv for iv in real.intervals if iv[1] > 0 and iv[0] < 7200]
    assert len(inside) == 1
    assert inside[0][1] == pytest.approx(44 * 60 + 14)  # leaves at 19:00
    assert intersect([(0, 10), (20, 30)], [(5, 25)]) == [(5, 10), (20, 25)]


def test_parked_car_is_on_only_when_plugged_in_and_within_its_plan() -> None:
    spec = AvailabilitySpec(kind="parked-car", car=CarHabits(plugged_at_home=1.0,
                                                             plugged_at_work=0.0))  # fmt: skip
    rng = random.Random(3)
    for _ in range(50):
        real = realise(rng, spec, EPOCH, 2 * 86_400.0, utc_offset_minutes=60)
        assert real.policy.only_on_ac_power and len(real.policy.windows) == 1
        for a, b in real.intervals:
            mid = EPOCH + (a + b) / 2
            assert av.in_window(real.policy, mid)
            assert av.window_remaining_s(real.policy, EPOCH + a) >= (b - a) - 60.0
        parked = sum(b - a for a, b in real.intervals if a >= 0 and b <= 86_400)
        assert parked < 86_400 * 0.8  # at home only: the working day is not lent


def test_candidate_index_offers_least_loaded_per_class() -> None:
    index = CandidateIndex(all_max=4, extra_per_class=1)
    for node in range(10):
        index.update(node, "m", cls=node % 2, active=node // 2, jobs_max=8, accepting=True)
    picked = index.candidates("m", 1, "fastest", random.Random(0))
    assert sorted(picked) == [0, 1, 2, 3]  # the two least loaded of each class
    index.update(0, "m", 0, 0, 8, accepting=False)
    assert 0 not in index.candidates("m", 1, "least-loaded", random.Random(0))
    assert len(index.candidates("m", 1, "random", random.Random(0))) == 9
    assert index.candidates("other", 1, "fastest", random.Random(0)) == []


@pytest.mark.parametrize("seed", range(20))
def test_baselines_see_every_node_they_could_pick(seed: int) -> None:
    """On random fleet states, a baseline given the index's candidates places every job exactly
    as it does given every node of the fleet (the full scan)."""
    from sparecycles.scheduling.presets import DEVICE_PRESETS, MODEL_PRESETS
    from sparecycles.scheduling.scheduler import SchedulerConfig, schedule
    from sparecycles.types import Job, NodeSnapshot

    rng = random.Random(seed)
    spec = MODEL_PRESETS["llama-3-8b-q4"]
    profiles = [DEVICE_PRESETS[d] for d in ("gaming-pc", "laptop", "a100")]
    index = CandidateIndex(all_max=8)
    state: dict[int, tuple[int, int, bool, float]] = {}  # node -> cls, active, accepting, last
    for step in range(400):
        n = rng.randrange(120)
        cls = n % 3
        active = rng.choice([0, 0, 1, 2, 4, 4, 4])  # many full nodes (jobs_max 4)
        accepting = rng.random() < 0.8
        state[n] = (cls, active, accepting, float(step))
        index.update(n, spec.name, cls, active, 4, accepting)
        if accepting and rng.random() < 0.5:
            index.assigned(n)
    snaps = {
        n: NodeSnapshot(f"n{n}", "o", profiles[cls], (spec.name,), active_jobs=active,
                        jobs_max=4, queued_tokens=100 * active, available=accepting,
                        last_assigned_s=last)
        for n, (cls, active, accepting, last) in state.items()
    }  # fmt: skip
    full_scan = {n for n, (_, active, accepting, _) in state.items() if accepting and active < 4}
    jobs = [Job(f"j{i}", spec.name, rng.randrange(50, 3000), 256, "c", float(i))
            for i in range(rng.randrange(1, 30))]  # fmt: skip
    for policy in ("random", "round-robin", "least-loaded"):
        offered = index.candidates(spec.name, len(jobs), policy, random.Random(seed))
        assert set(offered) == full_scan, policy
        if policy == "random":
            continue  # same candidates; the draw itself depends on the list's order
        config = SchedulerConfig(policy=policy)
        everything = schedule(jobs, list(snaps.values()), {spec.name: spec}, 1e6, config,
                              random.Random(seed))  # fmt: skip
        indexed = schedule(jobs, [snaps[n] for n in offered], {spec.name: spec}, 1e6, config,
                           random.Random(seed))  # fmt: skip
        assert indexed == everything, policy


def test_a_simulated_node_reports_its_prefill_backlog() -> None:
    """The snapshot the simulator hands the scheduler counts the prompts queued on the node."""
    from sparecycles.sim.loop import Simulation, Waiting
    from sparecycles.types import Job

    fleet = parse_fleet({"class": [{"name": "pc", "device": "gaming-pc", "count": 1,
                                    "models": ["llama-3-8b-q4"]}]})  # fmt: skip
    n = 3
    trace = Trace("t", EPOCH, np.zeros(n), np.full(n, 4000), np.full(n, 10))
    sim = Simulation(trace, fleet, SimConfig(seed=1))
    sim._start_nodes()
    node = sim.nodes[0]
    for req in range(n):
        w = Waiting(req, Job(str(req), "llama-3-8b-q4", 4000, 64, "c", 0.0), 0.0)
        sim.start(w, node, 0.0, 1.0)
    snap = sim.snapshot(node, 0.0)
    assert snap.prefill_backlog_tokens == 3 * 4000  # one being prefilled, two queued
    assert snap.prefill_backlog_s == pytest.approx(3 * node.costs.prefill_s(4000))
    end = node.next_event_t(0.0)  # the first prompt's prefill ends (the rates are set)
    assert end is not None
    half = end / 2
    assert sim.snapshot(node, half) is snap  # unchanged within the refresh...
    node.snapshot = None
    assert sim.snapshot(node, half).prefill_backlog_tokens == pytest.approx(2 * 4000 + 2000, abs=1)


def test_a_simulated_engine_admits_only_what_fits_its_kv_cache() -> None:
    """Placed past its KV capacity (which the scheduler never does), a simulated node queues the
    sequence until running ones free their cache, and the placement is counted."""
    from sparecycles.sim.loop import Simulation, Waiting
    from sparecycles.types import Job

    fleet = parse_fleet({"class": [{"name": "pc", "device": "gaming-pc", "count": 1,
                                    "models": ["llama-3-8b-q4"]}]})  # fmt: skip
    trace = Trace("t", EPOCH, np.zeros(2), np.full(2, 100), np.full(2, 10))
    sim = Simulation(trace, fleet, SimConfig(seed=1))
    sim._start_nodes()
    node = sim.nodes[0]
    capacity = node.costs.kv_capacity_tokens
    half = capacity // 2 + 100  # two of these do not fit together
    for req in range(2):
        w = Waiting(req, Job(str(req), "llama-3-8b-q4", half - 64, 64, "c", 0.0), 0.0)
        sim.start(w, node, 0.0, 1.0)
    assert node.kv_over_capacity_placements == 1
    end = node.next_event_t(0.0)
    assert end is not None
    sim.on_node(node, node.version, end)  # the first prefilled: now decoding
    assert node.prefilling is None and len(node.queue) == 1  # the second waits for KV
    assert sim.snapshot(node, node.last_t).kv_reserved_tokens == 2 * half


def test_ours_makes_no_kv_over_capacity_placement(trace: Trace) -> None:
    fleet = churny_consumer_fleet()
    result = simulate(head(trace, 300), fleet, SimConfig(policy="fastest", seed=3))
    assert summarize(result).kv_over_capacity_placements == 0


def test_ours_beats_the_baselines_under_diurnal_and_correlated_churn(trace: Trace) -> None:
    """Churn that is not a renewal process (sessions' lengths depend on the hour they start;
    half the nodes up leave together at shared moments), stays learned from a week of sessions,
    never told: ours still wins."""
    data = tomllib.loads((FLEETS / "churny.toml").read_text())
    data["class"] = [c for c in data["class"] if c["name"] != "a100"]
    for c in data["class"]:
        if c["availability"]["kind"] == "weibull":
            c["availability"].update(diurnal_amplitude=0.8, correlated_events_per_day=24.0,
                                     correlated_leave_fraction=0.5)  # fmt: skip
    fleet = parse_fleet(data)
    results = {
        p: summarize(simulate(trace, fleet, SimConfig(policy=p, seed=5)))
        for p in ("fastest", "random", "round-robin", "least-loaded")
    }
    ours = results.pop("fastest")
    for name, base in results.items():
        assert ours.goodput_rps > base.goodput_rps, name
    learned = simulate(head(trace, 200), fleet, SimConfig(seed=5))
    again = simulate(head(trace, 200), fleet, SimConfig(seed=5))
    assert np.array_equal(learned.end, again.end, equal_nan=True)  # replays from its seed


def _one_node_sim(chunk: int, device: str = "gaming-pc", model: str = "llama-3.1-8b-q4"):
    from sparecycles.sim.loop import Simulation

    fleet = parse_fleet({"class": [{"name": "pc", "device": device, "count": 1,
                                    "models": [model]}]})  # fmt: skip
    trace = Trace("t", EPOCH, np.zeros(4), np.full(4, 100), np.full(4, 10))
    sim = Simulation(trace, fleet, SimConfig(seed=1, prefill_chunk_tokens=chunk))
    sim._start_nodes()
    return sim, sim.nodes[0]


def _place(sim, node, req: int, prompt: int, out: int, t: float, **job_kw):
    from sparecycles.sim.loop import Waiting
    from sparecycles.types import Job

    sim.output[req] = out
    sim.prompt[req] = prompt
    job = Job(str(req), node.spec.name, prompt, out, "c", t, **job_kw)
    sim.start(Waiting(req, job, t), node, t, t + 1.0)


def _run_node(sim, node, until: float) -> None:
    """Drive the node's own events up to ``until`` (no scheduler, no other node)."""
    while True:
        at = node.next_event_t(node.last_t)
        if at is None or at > until:
            node.advance(until)
            return
        sim.on_node(node, node.version, at)


@pytest.mark.parametrize("chunk", [0, 512])
def test_chunked_prefill_keeps_decoding_through_a_long_prompt(chunk: int) -> None:
    """A sequence decoding when a 30k-token prompt arrives: prefill-first stops it for the whole
    prefill; chunked prefill keeps it going, at slower steps."""
    sim, node = _one_node_sim(chunk)
    _place(sim, node, 0, prompt=200, out=2000, t=0.0)
    _run_node(sim, node, 1.0)  # prefilled and decoding
    before = node.decoding[0].done
    _place(sim, node, 1, prompt=30_000, out=10, t=1.0)
    _run_node(sim, node, 5.0)
    gained = node.decoding[0].done - before
    assert node.prefilling is not None  # the long prompt is still being prefilled
    if chunk:
        assert gained > 3  # a token every step, each step carrying a 512-token chunk (~0.7 s)
    else:
        assert gained == pytest.approx(0.0, abs=1e-6)


def test_chunked_prefill_costs_about_what_a_whole_prefill_costs() -> None:
    """Alone on a node, a prompt prefilled in chunks takes about its whole prefill's time (a
    little more: the weights are read once per chunk)."""
    sim, node = _one_node_sim(512, device="gaming-pc-4090")
    _place(sim, node, 0, prompt=20_000, out=1, t=0.0)
    end = node.next_event_t(0.0)
    whole = node.costs.prefill_s(20_000) / node.speed
    assert end == pytest.approx(whole, rel=0.25)


def test_a_node_reuses_a_conversation_s_cached_prefix() -> None:
    sim, node = _one_node_sim(512)
    _place(sim, node, 0, prompt=8000, out=100, t=0.0, prefix_key="c7")
    _run_node(sim, node, 600.0)
    assert sim.status[0] == DONE
    assert node.cache == {"c7": 8100}  # prompt and answer kept for the next turn
    _place(sim, node, 1, prompt=8300, out=50, t=600.0, prefix_key="c7", prefix_tokens=8100)
    head_ = node.prefilling
    assert head_ is not None and head_.cached == 8100
    assert node.prefill_left == pytest.approx(200.0)  # only the new message is prefilled
    assert "c7" not in node.cache  # the running sequence owns those blocks now
    _run_node(sim, node, 1200.0)
    assert node.prompt_tokens_cached == 8100
    assert node.prompt_tokens_admitted == 8000 + 8300
    # another conversation's turn finds nothing
    _place(sim, node, 2, prompt=500, out=5, t=1200.0, prefix_key="c8", prefix_tokens=400)
    assert node.prefilling is not None and node.prefilling.cached == 0


def test_a_node_s_prefix_cache_fits_what_admitted_sequences_leave() -> None:
    _sim, node = _one_node_sim(512)
    capacity = node.costs.kv_capacity_tokens
    for i in range(6):
        node.remember(f"c{i}", capacity // 4)
    assert node.cached_tokens <= capacity
    assert list(node.cache) == ["c2", "c3", "c4", "c5"]  # least recently used out first


def test_long_context_trace_is_kept_with_its_generator() -> None:
    from sparecycles.sim.synthetic import generate

    kept = load_trace("long")
    fresh = generate(17)
    assert np.array_equal(kept.prompt_tokens, fresh.prompt_tokens)
    assert np.array_equal(kept.conversation, fresh.conversation)
    assert np.array_equal(kept.prefix_tokens, fresh.prefix_tokens)
    assert np.allclose(kept.arrival_s, fresh.arrival_s, atol=1e-5)
    p = kept.prompt_tokens
    assert 9_000 < p.mean() < 14_000 and 60_000 < np.percentile(p, 99) < 100_000
    assert p.max() + kept.output_tokens.max() <= 131_072
    later = kept.prefix_tokens > 0
    assert later.mean() > 0.5 and np.all(kept.prefix_tokens[later] < p[later])
    big = scaled(kept, 2 * len(kept), 0)  # copies keep their conversations apart
    assert big.conversation is not None and len(np.unique(big.conversation)) == 2 * len(
        np.unique(kept.conversation))


def test_the_ttft_target_grows_with_the_prompt() -> None:
    from sparecycles.sim.report import slo_met

    fleet = parse_fleet({"slo": {"ttft_s": 5.0, "ttft_s_per_ktok": 1.0},
                         "class": [{"name": "pc", "device": "a100", "count": 1,
                                    "models": ["llama-3.1-8b-q4"]}]})  # fmt: skip
    assert fleet.slo.ttft_target_s(0) == 5.0
    assert fleet.slo.ttft_target_s(100_000) == 105.0
    trace = Trace("t", EPOCH, np.array([0.0, 60.0]), np.array([100_000, 1000]), np.array([5, 5]))
    result = simulate(trace, fleet, SimConfig(seed=1))
    assert slo_met(result).all()  # 100k tokens on an A100: ~30 s, within 105 s
    assert result.first_token[0] - result.arrival[0] > 6.0  # a fixed 5 s target would miss it

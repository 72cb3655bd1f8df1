"""The scheduler on hand-built states whose right answer is known."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparecycles.coordinator.node_conn import NodeConn
from sparecycles.scheduling import perfmodel
from sparecycles.scheduling.presets import DEVICE_PRESETS, MODEL_PRESETS
from sparecycles.scheduling.scheduler import (
    RankMemo,
    SchedulerConfig,
    hedge_job,
    predict,
    schedule,
    should_hedge,
    speed_factor,
    update_speed_factor,
)
from sparecycles.types import Assignment, AvailabilityPolicy, DeviceProfile, Job, NodeSnapshot

MODEL = MODEL_PRESETS["llama-3-8b-q4"]
MODELS = {MODEL.name: MODEL}
GPU = DEVICE_PRESETS["gaming-pc"]
CPU = DEVICE_PRESETS["laptop-cpu"]
H100 = DEVICE_PRESETS["h100"]
NOW = 1000.0


def node(node_id: str, profile: DeviceProfile = GPU, **kw: Any) -> NodeSnapshot:
    kw.setdefault("models", (MODEL.name,))
    return NodeSnapshot(node_id=node_id, owner_id="o-" + node_id, profile=profile, **kw)


def job(job_id: str = "j1", prompt: int = 500, out: int = 200, **kw: Any) -> Job:
    kw.setdefault("admitted_at_s", NOW)
    return Job(job_id=job_id, model=MODEL.name, prompt_tokens=prompt, max_tokens=out,
               client_id="c", **kw)  # fmt: skip


def placed(assignments: list[Assignment]) -> dict[str, str]:
    return {a.job_id: a.node_id for a in assignments}


def test_goes_to_the_fastest_node() -> None:
    out = schedule([job()], [node("cpu", CPU), node("gpu", GPU)], MODELS, NOW)
    assert placed(out) == {"j1": "gpu"}
    expected = predict(job(), node("gpu", GPU), MODEL, NOW, SchedulerConfig()).total_s
    assert out[0].predicted_finish_s == pytest.approx(NOW + expected)


def test_prefers_the_idle_twin_over_the_busy_one() -> None:
    busy = node("busy", active_jobs=3, queued_tokens=600)
    out = schedule([job()], [busy, node("idle")], MODELS, NOW)
    assert placed(out) == {"j1": "idle"}


@pytest.mark.parametrize(
    "bad",
    [
        dict(models=("other",)),
        dict(available=False),
        dict(draining=True),
        dict(reputation=0.1),
        dict(active_jobs=8, jobs_max=8),  # full; with late binding off it cannot wait either
    ],
)
def test_hard_constraints_exclude_a_node(bad: dict) -> None:
    cfg = SchedulerConfig(late_binding=False)
    out = schedule([job()], [node("cpu", CPU), node("gpu", GPU, **bad)], MODELS, NOW, cfg)
    assert placed(out) == {"j1": "cpu"}


def test_job_side_constraints() -> None:
    nodes = [node("cpu", CPU), node("gpu", GPU, reputation=0.7)]
    assert placed(schedule([job(trusted_only=True)], nodes, MODELS, NOW)) == {"j1": "cpu"}
    assert placed(schedule([job(avoid_nodes=("gpu",))], nodes, MODELS, NOW)) == {"j1": "cpu"}
    # the 8B model in 16-bit does not fit a 12 GB card: only the CPU laptop... which lacks RAM too
    big = MODEL_PRESETS["llama-3-8b"]
    nodes16 = [replace(n, models=(big.name,)) for n in nodes]
    j = replace(job(), model=big.name)
    assert schedule([j], nodes16, {big.name: big}, NOW) == []


def test_unknown_model_or_no_nodes_leave_the_job_waiting() -> None:
    assert schedule([replace(job(), model="nope")], [node("gpu")], MODELS, NOW) == []
    assert schedule([job()], [], MODELS, NOW) == []


def test_jobs_of_one_call_share_the_slots_oldest_first() -> None:
    nodes = [node("a", jobs_max=1), node("b", jobs_max=1)]
    jobs = [job("late", admitted_at_s=NOW - 1), job("early", admitted_at_s=NOW - 5),
            job("last", admitted_at_s=NOW)]  # fmt: skip
    out = placed(schedule(jobs, nodes, MODELS, NOW))
    assert set(out) == {"early", "late"}  # "last" waits: both nodes are full now
    assert set(out.values()) == {"a", "b"}


def test_waits_for_a_busy_fast_node_rather_than_a_slow_free_one() -> None:
    """A long prompt takes ~90 s to prefill on a CPU laptop; a full H100 frees a slot in well
    under a second. Ours keeps the job waiting (late binding); a baseline would not."""
    h100 = node("h100", H100, active_jobs=8, jobs_max=8, queued_tokens=8 * 20)
    long_prompt = job(prompt=2000, out=100)
    assert schedule([long_prompt], [h100, node("cpu", CPU)], MODELS, NOW) == []
    # ... but not for ever: after late_binding_wait_s_max the free node takes it
    waited = replace(long_prompt, admitted_at_s=NOW - 6.0)
    assert placed(schedule([waited], [h100, node("cpu", CPU)], MODELS, NOW)) == {"j1": "cpu"}


def test_does_not_wait_for_a_busy_node_only_a_little_faster() -> None:
    """Twin gaming PCs, the busy one measured 10 % faster: within the model's accuracy, so the
    job goes to the free twin rather than queueing (it would with no margin)."""
    busy = node("busy", active_jobs=4, jobs_max=4, queued_tokens=4 * 4,
                decode_speed_factor={MODEL.name: 1.1})  # fmt: skip
    free = node("free", decode_speed_factor={MODEL.name: 1.0})
    assert placed(schedule([job()], [busy, free], MODELS, NOW)) == {"j1": "free"}
    no_margin = SchedulerConfig(late_binding_gain_min=1.0)
    assert schedule([job()], [busy, free], MODELS, NOW, no_margin) == []  # waits for "busy"
    with pytest.raises(RuntimeError, match="late_binding_gain_min"):
        SchedulerConfig(late_binding_gain_min=0.5)


def test_a_replica_prefers_its_own_node_among_near_equals() -> None:
    """Nodes on other replicas (relayed over the bus) win only by more than relay_tolerance."""
    mine = node("mine", decode_speed_factor={MODEL.name: 1.0})
    near = node("near", relayed=True, decode_speed_factor={MODEL.name: 1.05})
    far = node("far", relayed=True, decode_speed_factor={MODEL.name: 1.5})
    assert placed(schedule([job()], [near, mine], MODELS, NOW)) == {"j1": "mine"}
    assert placed(schedule([job()], [far, mine], MODELS, NOW)) == {"j1": "far"}
    no_preference = SchedulerConfig(relay_tolerance=0.0)
    assert placed(schedule([job()], [near, mine], MODELS, NOW, no_preference)) == {"j1": "near"}


def test_the_own_node_is_found_below_the_top_of_a_large_group() -> None:
    """A group of 30 twins ranked by measured speed: the ten fastest are on other replicas,
    a little faster than this replica's own; the job still goes to one of its own."""
    nodes = [node(f"r{i:02d}", relayed=True, decode_speed_factor={MODEL.name: 1.08 - i / 1000})
             for i in range(10)]
    nodes += [node(f"m{i:02d}", decode_speed_factor={MODEL.name: 1.0 - i / 1000})
              for i in range(20)]
    assert placed(schedule([job()], nodes, MODELS, NOW)) == {"j1": "m00"}
    no_preference = SchedulerConfig(relay_tolerance=0.0)
    assert placed(schedule([job()], nodes, MODELS, NOW, no_preference)) == {"j1": "r00"}


def test_long_job_not_placed_on_a_node_about_to_leave() -> None:
    leaving = node("leaving", H100, expected_stay_s=5.0)
    staying = node("staying", GPU)
    cfg = SchedulerConfig()
    long_job = job("long", prompt=500, out=2000)  # ~35 s on the gaming PC, ~4 s on the H100
    assert predict(long_job, leaving, MODEL, NOW, cfg).total_s > 0.5 * 5.0
    assert placed(schedule([long_job], [leaving, staying], MODELS, NOW)) == {"long": "staying"}
    short_job = job("short", prompt=100, out=10)
    assert placed(schedule([short_job], [leaving, staying], MODELS, NOW)) == {"short": "leaving"}
    # the same long job, after waiting past the relax time with only the leaving node, runs there
    stale = replace(long_job, admitted_at_s=NOW - 10.0)
    assert placed(schedule([stale], [leaving], MODELS, NOW)) == {"long": "leaving"}
    assert schedule([long_job], [leaving], MODELS, NOW) == []


def test_measured_speed_corrects_the_prediction() -> None:
    slow_h100 = node("h100", H100, decode_speed_factor={MODEL.name: 0.02})
    out = schedule([job()], [slow_h100, node("gpu", GPU)], MODELS, NOW)
    assert placed(out) == {"j1": "gpu"}


def conn(node_id: str, profile: DeviceProfile = GPU) -> NodeConn:
    """A connected node as the coordinator keeps it (its socket is never written to here)."""

    async def send(_frame: str) -> None:
        raise AssertionError("nothing is sent in these tests")

    return NodeConn(node_id=node_id, owner_id="o-" + node_id, name=node_id, public_key="",
                    profile=profile, policy=AvailabilityPolicy(), models=(MODEL.name,),
                    weights={}, jobs_max=8, send_raw=send)  # fmt: skip


def test_node_measured_slower_than_predicted_loses_placement() -> None:
    """The coordinator's path: finished jobs' speeds (NodeConn.observe_speed, as dispatch calls
    it) reach the scheduler through the snapshot and correct the twins' equal predictions."""
    slow, fair = conn("slow"), conn("fair")
    twins = [slow.snapshot(NOW), fair.snapshot(NOW)]
    assert placed(schedule([job()], twins, MODELS, NOW)) == {"j1": "slow"}  # a tie: list order
    predicted = 1.0 / perfmodel.decode_step_s(MODEL, GPU, 1, 1024)
    for _ in range(5):
        slow.observe_speed(MODEL.name, 0.6 * predicted, batch=1)
        fair.observe_speed(MODEL.name, 1.0 * predicted, batch=1)
    slow_snap, fair_snap = slow.snapshot(NOW), fair.snapshot(NOW)
    assert speed_factor(slow_snap, MODEL.name, MODEL) == pytest.approx(0.6)
    assert speed_factor(fair_snap, MODEL.name, MODEL) == pytest.approx(1.0)
    assert placed(schedule([job()], [slow_snap, fair_snap], MODELS, NOW)) == {"j1": "fair"}
    config = SchedulerConfig()
    slow_s = predict(job(), slow_snap, MODEL, NOW, config).total_s
    assert slow_s > predict(job(), fair_snap, MODEL, NOW, config).total_s * 1.5


def test_speed_measured_in_a_busy_batch_is_compared_at_that_batch() -> None:
    """A job that shared the node with seven others ran at the predicted per-job speed of batch
    8, which is slower than batch 1's on a compute-bound CPU: not evidence of a slow node."""
    busy, other = conn("busy", CPU), conn("other", CPU)
    busy.jobs.update(f"j{i}" for i in range(8))  # observed before the finishing job leaves
    busy.observe_speed(MODEL.name, 1.0 / perfmodel.decode_step_s(MODEL, CPU, 8, 1024))
    busy.jobs.clear()
    assert busy.snapshot(NOW).measured_decode_batch == {MODEL.name: 8.0}
    other.observe_speed(MODEL.name, 0.8 / perfmodel.decode_step_s(MODEL, CPU, 1, 1024), batch=1)
    snaps = [other.snapshot(NOW), busy.snapshot(NOW)]
    assert speed_factor(snaps[1], MODEL.name, MODEL) == pytest.approx(1.0)
    assert placed(schedule([job()], snaps, MODELS, NOW)) == {"j1": "busy"}


def test_reported_per_job_speed_is_used_when_no_factor_is_kept() -> None:
    spec, profile = MODEL, GPU
    predicted = 1.0 / perfmodel.decode_step_s(spec, profile, 1, 1024)
    n = node("gpu", measured_decode_tokens_per_s={MODEL.name: predicted / 2})
    assert speed_factor(n, MODEL.name, spec) == pytest.approx(0.5)
    assert speed_factor(node("x"), MODEL.name, spec) == 1.0
    kept = node("gpu", decode_speed_factor={MODEL.name: 3.0})
    assert speed_factor(kept, MODEL.name, spec) == 3.0


def test_update_speed_factor_is_an_ewma_with_clamps() -> None:
    assert update_speed_factor(1.0, 50.0, 100.0, alpha=0.2) == pytest.approx(0.9)
    assert update_speed_factor(1.0, 50.0, 100.0, alpha=1.0) == pytest.approx(0.5)
    assert update_speed_factor(1.0, 1e6, 1.0, alpha=1.0) == 20.0
    assert update_speed_factor(1.0, 1e-9, 1.0, alpha=1.0) == 0.05
    assert update_speed_factor(0.7, 0.0, 100.0) == 0.7  # nothing measured, nothing learnt
    factor = 1.0
    for _ in range(30):
        factor = update_speed_factor(factor, 40.0, 100.0)
    assert factor == pytest.approx(0.4, rel=1e-2)


def test_best_node_found_within_a_large_group() -> None:
    """Twenty identical gaming PCs (one group); only one is fast in practice."""
    nodes = [node(f"n{i:02d}", decode_speed_factor={MODEL.name: 1.0}) for i in range(20)]
    nodes[13] = replace(nodes[13], decode_speed_factor={MODEL.name: 2.0})
    assert placed(schedule([job()], nodes, MODELS, NOW)) == {"j1": "n13"}


@settings(deadline=None)
@given(
    seed=st.integers(0, 10_000),
    rounds=st.integers(2, 8),
    group=st.integers(5, 40),
)
def test_a_memo_changes_no_answer_only_the_cost(seed: int, rounds: int, group: int) -> None:
    """Call after call, some nodes get new snapshots (their load changed) and the rest stay the
    same objects: with one memo kept across the calls every answer equals the one without, and
    the memo holds a score per (snapshot, typical job) it was asked for."""
    rng = random.Random(seed)
    cfg, memo = SchedulerConfig(), RankMemo()
    nodes = [node(f"n{i:02d}", active_jobs=rng.randint(0, 3), jobs_max=4,
                  queued_tokens=rng.randint(0, 400),
                  decode_speed_factor={MODEL.name: rng.uniform(0.5, 2.0)})
             for i in range(group)]  # fmt: skip
    for r in range(rounds):
        for i in rng.sample(range(group), k=rng.randint(0, 3)):
            active = rng.randint(0, 4)
            nodes[i] = replace(nodes[i], active_jobs=active, queued_tokens=active * 90)
        jobs = [job(f"j{r}-{k}", prompt=rng.randint(1, 3000), out=rng.randint(1, 500))
                for k in range(rng.randint(1, 4))]  # fmt: skip
        assert schedule(jobs, nodes, MODELS, NOW, cfg, memo=memo) == schedule(
            jobs, nodes, MODELS, NOW, cfg)
    assert 0 < len(memo) <= group * rounds


def test_a_memo_is_bounded_and_forgets_another_config() -> None:
    memo = RankMemo(entries_max=10)
    nodes = [node(f"n{i:02d}") for i in range(8)]
    schedule([job(out=50)], nodes, MODELS, NOW, SchedulerConfig(), memo=memo)
    assert len(memo) == 8
    schedule([job(out=50)], nodes, MODELS, NOW, SchedulerConfig(), memo=memo)  # an equal config
    assert len(memo) == 8  # every score was found
    schedule([job(out=400)], nodes, MODELS, NOW, SchedulerConfig(), memo=memo)  # 16 > 10
    assert len(memo) == 10  # the least recently used went, one at a time; the rest stayed
    schedule([job(out=400)], nodes, MODELS, NOW, SchedulerConfig(group_candidates=2), memo=memo)
    assert len(memo) == 8  # a different config: nothing of the old one is reused


def test_resumed_job_prefills_what_it_already_generated() -> None:
    cfg = SchedulerConfig()
    fresh = predict(job(prompt=500, out=200), node("gpu"), MODEL, NOW, cfg)
    resumed = predict(job(prompt=500, out=200, generated_tokens=150), node("gpu"), MODEL, NOW, cfg)
    assert resumed.prefill_s > fresh.prefill_s
    assert resumed.total_s < fresh.total_s  # only 50 tokens left to decode


def test_cheapest_within_deadline() -> None:
    cheap = node("cheap", CPU, price_micros_per_mtok=50_000)
    dear = node("dear", H100, price_micros_per_mtok=900_000)
    cfg = SchedulerConfig(policy="cheapest-within-deadline")
    short = job(prompt=100, out=20)
    slack = replace(short, deadline_s=NOW + 600)
    assert placed(schedule([slack], [cheap, dear], MODELS, NOW, cfg)) == {"j1": "cheap"}
    tight = replace(short, deadline_s=NOW + 1.0)
    assert placed(schedule([tight], [cheap, dear], MODELS, NOW, cfg)) == {"j1": "dear"}
    hopeless = replace(short, deadline_s=NOW - 1.0)  # nobody meets it: the fastest
    assert placed(schedule([hopeless], [cheap, dear], MODELS, NOW, cfg)) == {"j1": "dear"}
    assert predict(short, cheap, MODEL, NOW, cfg).cost_micros == 50_000 * 120 // 1_000_000


def test_baselines_ignore_speed_and_departures_but_keep_hard_constraints() -> None:
    nodes = [node("cpu", CPU), node("gpu", GPU, expected_stay_s=1.0), node("off", available=False)]
    rr = SchedulerConfig(policy="round-robin")
    assert placed(schedule([job()], nodes, MODELS, NOW, rr)) == {"j1": "cpu"}  # by node id
    nodes[0] = replace(nodes[0], last_assigned_s=NOW - 1)
    assert placed(schedule([job()], nodes, MODELS, NOW, rr)) == {"j1": "gpu"}
    ll = SchedulerConfig(policy="least-loaded")
    nodes[1] = replace(nodes[1], active_jobs=1)
    assert placed(schedule([job()], nodes, MODELS, NOW, ll)) == {"j1": "cpu"}


def test_round_robin_cycles_within_one_call() -> None:
    nodes = [node("a"), node("b"), node("c")]
    jobs = [job(f"j{i}", admitted_at_s=NOW + i) for i in range(6)]
    out = schedule(jobs, nodes, MODELS, NOW + 10, SchedulerConfig(policy="round-robin"))
    assert [a.node_id for a in out] == ["a", "b", "c", "a", "b", "c"]


def test_random_is_reproducible_from_its_seed() -> None:
    nodes = [node(f"n{i}") for i in range(10)]
    jobs = [job(f"j{i}") for i in range(5)]
    cfg = SchedulerConfig(policy="random")
    first = schedule(jobs, nodes, MODELS, NOW, cfg, random.Random(7))
    again = schedule(jobs, nodes, MODELS, NOW, cfg, random.Random(7))
    assert first == again
    assert len({a.node_id for a in first}) > 1


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(RuntimeError):
        SchedulerConfig(policy="magic")


def test_hedging_decision() -> None:
    cfg = SchedulerConfig(hedge_after_factor=2.0)
    j = job(out=200)
    assert not should_hedge(j, 0.0, 10.0, 50, 0, 19.0, cfg)
    assert should_hedge(j, 0.0, 10.0, 50, 0, 20.0, cfg)
    assert not should_hedge(j, 0.0, 10.0, 50, 1, 20.0, cfg)  # one hedge per job
    assert not should_hedge(j, 0.0, 10.0, 190, 0, 20.0, cfg)  # almost done anyway
    assert not should_hedge(j, 0.0, 10.0, 50, 0, 20.0, SchedulerConfig())  # off by default
    copy = hedge_job(j, 50, "slow", 1)
    assert copy.job_id == "j1~h1" and copy.generated_tokens == 50 and copy.avoid_nodes == ("slow",)
    assert schedule([copy], [node("slow")], MODELS, NOW) == []


POLICY = st.sampled_from(["fastest", "cheapest-within-deadline", "random", "round-robin",
                          "least-loaded"])  # fmt: skip


@settings(deadline=None)
@given(
    policy=POLICY,
    actives=st.lists(st.integers(0, 4), min_size=1, max_size=12),
    n_jobs=st.integers(1, 30),
    seed=st.integers(0, 1000),
)
def test_never_oversubscribes_and_places_each_job_once(
    policy: str, actives: list[int], n_jobs: int, seed: int
) -> None:
    rng = random.Random(seed)
    profiles = [GPU, CPU, H100, DEVICE_PRESETS["car"], DEVICE_PRESETS["laptop"]]
    nodes = [
        node(f"n{i}", rng.choice(profiles), active_jobs=a, jobs_max=4, queued_tokens=a * 50,
             expected_stay_s=rng.choice([30.0, 600.0, float("inf")]))
        for i, a in enumerate(actives)
    ]  # fmt: skip
    jobs = [job(f"j{i}", prompt=rng.randint(1, 3000), out=rng.randint(1, 500),
                admitted_at_s=NOW - rng.random() * 10) for i in range(n_jobs)]  # fmt: skip
    out = schedule(jobs, nodes, MODELS, NOW, SchedulerConfig(policy=policy), random.Random(seed))
    assert len({a.job_id for a in out}) == len(out)
    per_node: dict[str, int] = {}
    for a in out:
        per_node[a.node_id] = per_node.get(a.node_id, 0) + 1
        assert a.predicted_finish_s > NOW
    for n in nodes:
        assert n.active_jobs + per_node.get(n.node_id, 0) <= n.jobs_max
    if policy in ("random", "round-robin", "least-loaded"):
        free = sum(n.jobs_max - n.active_jobs for n in nodes)
        assert len(out) == min(free, n_jobs)  # baselines fill every free slot they can


def test_a_job_that_needs_a_feature_goes_only_to_nodes_that_said_it() -> None:
    """A grammar-constrained job never reaches a node too old to apply the grammar (it would
    ignore the unknown field and answer unconstrained)."""
    needs = frozenset({"grammar"})
    old, new = node("old", GPU), node("new", CPU, features=frozenset({"grammar"}))
    assert placed(schedule([job(needs=needs)], [old, new], MODELS, NOW)) == {"j1": "new"}
    assert schedule([job(needs=needs)], [old], MODELS, NOW) == []
    assert placed(schedule([job()], [old, new], MODELS, NOW)) == {"j1": "old"}  # the faster


def test_a_queued_prefill_backlog_delays_the_first_token() -> None:
    """Twins, one with 60k prompt tokens queued for prefill (and otherwise a little less
    loaded): ours sends a short prompt to the other, whose first token comes far sooner."""
    backlog = node("backlog", active_jobs=1, queued_tokens=100, prefill_backlog_tokens=60_000)
    decoding = node("decoding", active_jobs=1, queued_tokens=200)
    out = schedule([job(prompt=200, out=64)], [backlog, decoding], MODELS, NOW)
    assert placed(out) == {"j1": "decoding"}
    config = SchedulerConfig()
    slow = predict(job(prompt=200, out=64), backlog, MODEL, NOW, config)
    fast = predict(job(prompt=200, out=64), decoding, MODEL, NOW, config)
    costs = perfmodel.costs(MODEL, GPU)
    assert slow.ttft_s - fast.ttft_s == pytest.approx(costs.prefill_s(60_000), rel=0.05)
    # a predicted backlog in seconds, when the caller gives one, is taken as it is
    stated = replace(backlog, prefill_backlog_s=1.5)
    assert predict(job(prompt=200, out=64), stated, MODEL, NOW, config).ttft_s == pytest.approx(
        fast.ttft_s + 1.5, rel=0.05)


def test_never_over_commits_a_node_s_kv_cache() -> None:
    """Every running job's KV reservation counts, not only the new job's context: a node whose
    cache is all but reserved by one long job takes no job that does not fit beside it."""
    capacity = perfmodel.costs(MODEL, GPU).kv_capacity_tokens
    full = node("full", active_jobs=1, queued_tokens=100, kv_reserved_tokens=capacity - 1000)
    small, big = job("small", prompt=500, out=200), job("big", prompt=3000, out=1000)
    assert placed(schedule([small], [full], MODELS, NOW)) == {"small": "full"}
    assert schedule([big], [full], MODELS, NOW) == []  # would need 4,000 of 1,000 left
    for policy in ("random", "round-robin", "least-loaded", "cheapest-within-deadline"):
        assert schedule([big], [full], MODELS, NOW, SchedulerConfig(policy=policy)) == [], policy
    # jobs of one call reserve too: two that fit one at a time do not both go to one node
    room = node("room", kv_reserved_tokens=capacity - 5000)
    two = [job("a", prompt=3000, out=1000), job("b", prompt=3000, out=1000)]
    assert len(schedule(two, [room], MODELS, NOW)) == 1


def test_a_conversation_s_next_turn_goes_where_its_prefix_is_cached() -> None:
    """Twins, one holding the conversation's 20k-token prefix and a little busier: ours sends
    the next turn there; once that node's queue outweighs the saved prefill, to the other."""
    long = MODEL_PRESETS["llama-3.1-8b-q4"]  # 128k context
    models = {long.name: long}
    turn = Job("t2", long.name, 20_300, 200, "c", NOW, prefix_key="conv", prefix_tokens=20_000)
    holder = node("holder", models=(long.name,), active_jobs=2, queued_tokens=400,
                  kv_reserved_tokens=3000, cached_prefixes={"conv": 20_000})  # fmt: skip
    other = node("other", models=(long.name,), active_jobs=1, queued_tokens=200,
                 kv_reserved_tokens=1500)  # fmt: skip
    assert placed(schedule([turn], [holder, other], models, NOW)) == {"t2": "holder"}
    config = SchedulerConfig()
    cached = predict(turn, holder, long, NOW, config)
    cold = predict(turn, replace(holder, cached_prefixes={}), long, NOW, config)
    assert cached.prefill_s < 0.1 * cold.prefill_s
    swamped = replace(holder, prefill_backlog_tokens=40_000)
    assert placed(schedule([turn], [swamped, other], models, NOW)) == {"t2": "other"}

"""The placement index gives the scheduler's own answer, and re-scores only what changed.

The property: after any sequence of fleet events (a node's snapshot replaced by a changed one or
by an equal new object, nodes joining, leaving, moving in the list), ``PlacementIndex.place``
for one job equals ``scheduler.schedule([job], snapshots)`` on the same snapshots, node, finish
time and all, or declines (None) where it says it would not be exact. And the scheduler's early
end (no node left that could take a job) changes no answer: checked against the same call with
one more free node that no job may use, which keeps every loop running to its end.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparecycles.scheduling.placement_index import PlacementIndex
from sparecycles.scheduling.presets import DEVICE_PRESETS, MODEL_PRESETS
from sparecycles.scheduling.scheduler import SchedulerConfig, schedule
from sparecycles.types import Job, NodeSnapshot

M1 = MODEL_PRESETS["llama-3-8b-q4"]
M2 = MODEL_PRESETS["qwen2.5-1.5b"]
MODELS = {M1.name: M1, M2.name: M2}
PROFILES = [DEVICE_PRESETS[k] for k in ("gaming-pc", "laptop-cpu", "h100")]
NOW = 1_000.0

_node_fields = st.fixed_dictionaries({
    "profile": st.sampled_from(PROFILES),
    "models": st.sampled_from([(M1.name,), (M2.name,), (M1.name, M2.name)]),
    "jobs_max": st.integers(1, 6),
    "active_jobs": st.integers(0, 6),
    "queued_tokens": st.integers(0, 3_000),
    "prefill_backlog_tokens": st.sampled_from([0, 0, 300, 2_000]),
    "kv_reserved_tokens": st.sampled_from([0, 2_000, 60_000]),
    "available": st.sampled_from([True, True, True, False]),
    "draining": st.sampled_from([False, False, False, True]),
    "reputation": st.sampled_from([1.0, 1.0, 0.95, 0.7, 0.3]),
    "expected_stay_s": st.sampled_from([math.inf, math.inf, 20.0, 300.0, 3_600.0]),
    "price_micros_per_mtok": st.sampled_from([0, 0, 50]),
    "relayed": st.sampled_from([False, False, False, True]),
    "decode_speed_factor": st.sampled_from([{}, {}, {M1.name: 0.5}, {M2.name: 1.7}]),
    "features": st.sampled_from([frozenset(), frozenset({"grammar"})]),
})


def _snap(node_id: str, fields: dict[str, Any]) -> NodeSnapshot:
    fields = dict(fields)
    fields["active_jobs"] = min(fields["active_jobs"], fields["jobs_max"])
    return NodeSnapshot(node_id=node_id, owner_id="o-" + node_id, **fields)


_jobs = st.builds(
    lambda model, prompt, out, gen, waited, trusted, needs, avoid: Job(
        job_id="j", model=model, prompt_tokens=prompt, max_tokens=out, client_id="c",
        admitted_at_s=NOW - waited, generated_tokens=min(gen, out), trusted_only=trusted,
        needs=needs, avoid_nodes=avoid),
    st.sampled_from([M1.name, M1.name, M2.name, "unknown"]),
    st.integers(1, 3_000), st.integers(1, 600), st.sampled_from([0, 0, 40]),
    st.sampled_from([0.0, 0.0, 3.0, 8.0]), st.booleans(),
    st.sampled_from([frozenset(), frozenset({"grammar"})]),
    st.sampled_from([(), ("n1",), ("n0", "n3")]),
)

_configs = st.builds(
    lambda policy, candidates, rank_max, late, relay, scan: SchedulerConfig(
        policy=policy, group_candidates=candidates, group_rank_max=max(rank_max, candidates),
        late_binding=late, relay_tolerance=relay, group_rank_local_scan=scan),
    st.sampled_from(["fastest", "fastest", "cheapest-within-deadline"]),
    st.sampled_from([1, 2, 4]), st.sampled_from([512, 512, 8]), st.booleans(),
    st.sampled_from([0.1, 0.0]), st.sampled_from([64, 2]),
)

# events: ("change", i, fields), ("same", i), ("remove", i), ("add", fields), ("move", i),
# ("place", job, prefix holders)
_events = st.lists(
    st.one_of(
        st.tuples(st.just("change"), st.integers(0, 99), _node_fields),
        st.tuples(st.just("change"), st.integers(0, 99), _node_fields),
        st.tuples(st.just("same"), st.integers(0, 99)),
        st.tuples(st.just("remove"), st.integers(0, 99)),
        st.tuples(st.just("add"), _node_fields),
        st.tuples(st.just("move"), st.integers(0, 99)),
        st.tuples(st.just("place"), _jobs, st.lists(st.integers(0, 99), max_size=3)),
        st.tuples(st.just("place"), _jobs, st.just([])),
    ),
    min_size=1, max_size=30,
)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleet=st.lists(_node_fields, min_size=0, max_size=24), events=_events,
       config=_configs, twins=st.integers(0, 12))
def test_index_places_as_the_full_scan(fleet: list[dict[str, Any]],
                                       events: list[tuple[Any, ...]], config: SchedulerConfig,
                                       twins: int) -> None:  # fmt: skip
    # identical twins (same profile and load: equal scores) make the tie-break count
    nodes = [_snap(f"n{i}", f) for i, f in enumerate(fleet)]
    if nodes:
        nodes += [replace(nodes[0], node_id=f"t{i}") for i in range(twins)]
    index = PlacementIndex(rankings_max=2)
    fresh = len(nodes) + 1
    answered = 0
    for event in events:
        kind = event[0]
        if kind == "change" and nodes:
            i = event[1] % len(nodes)
            nodes[i] = _snap(nodes[i].node_id, event[2])
        elif kind == "same" and nodes:
            i = event[1] % len(nodes)
            nodes[i] = replace(nodes[i])  # equal, but a new object: re-scored to the same score
        elif kind == "remove" and nodes:
            del nodes[event[1] % len(nodes)]
        elif kind == "add":
            nodes.append(_snap(f"a{fresh}", event[1]))
            fresh += 1
        elif kind == "move" and nodes:
            nodes.append(nodes.pop(event[1] % len(nodes)))
        elif kind == "place":
            job, holders = event[1], event[2]
            overrides: dict[str, NodeSnapshot] = {}
            if holders and nodes:  # the prefix cache of some nodes holds part of this prompt
                job = replace(job, prefix_key="conv", prefix_tokens=job.prompt_tokens)
                for h in holders:
                    n = nodes[h % len(nodes)]
                    overrides[n.node_id] = replace(n, cached_prefixes={"conv": 16 * (1 + h)})
            index.sync(nodes)
            got = index.place(job, MODELS, NOW, config, overrides)
            want = schedule([job], [overrides.get(n.node_id, n) for n in nodes], MODELS, NOW,
                            config)
            if got is not None:
                answered += 1
                assert got == want
            else:  # it declines only where it says so
                assert config.group_rank_max < 512
    if config.group_rank_max >= 512:
        assert answered == sum(e[0] == "place" for e in events)


def _gpu(node_id: str, active: int = 0, **kw: Any) -> NodeSnapshot:
    return NodeSnapshot(node_id=node_id, owner_id="o", profile=PROFILES[0], models=(M1.name,),
                        active_jobs=active, jobs_max=8, **kw)


def _job(k: int = 0, prompt: int = 200, out: int = 16) -> Job:
    return Job(job_id=f"j{k}", model=M1.name, prompt_tokens=prompt, max_tokens=out,
               client_id="c", admitted_at_s=NOW)


def test_only_changed_nodes_are_rescored() -> None:
    nodes = [_gpu(f"n{i}", i % 8) for i in range(200)]
    index = PlacementIndex()
    index.sync(nodes)
    assert index.place(_job(), MODELS, NOW, SchedulerConfig()) == schedule(
        [_job()], nodes, MODELS, NOW)
    assert index.rescored == 200  # the ranking for this size, built once
    for k in range(1, 20):
        i = (7 * k) % len(nodes)
        nodes[i] = replace(nodes[i], active_jobs=(nodes[i].active_jobs + 1) % 8)
        index.sync(nodes)
        got = index.place(_job(k), MODELS, NOW, SchedulerConfig())
        assert got == schedule([_job(k)], nodes, MODELS, NOW)
        assert index.rescored == 200 + k  # one node changed, one re-scored
    index.sync(nodes)
    index.place(_job(99, prompt=3_000, out=500), MODELS, NOW, SchedulerConfig())
    assert index.rescored == 200 + 19 + 200  # another size: its own ranking


def test_declines_what_it_cannot_answer_exactly() -> None:
    nodes = [_gpu(f"n{i}") for i in range(10)]
    index = PlacementIndex()
    index.sync(nodes)
    assert index.place(_job(), MODELS, NOW, SchedulerConfig(policy="random")) is None
    assert index.place(_job(), MODELS, NOW, SchedulerConfig(disaggregate=True)) is None
    small = SchedulerConfig(group_candidates=2, group_rank_max=4)
    assert index.place(_job(), MODELS, NOW, small) is None
    index.sync([*nodes, nodes[3]])  # one node listed twice
    assert index.place(_job(), MODELS, NOW, SchedulerConfig()) is None
    index.sync(nodes)
    assert index.place(_job(), MODELS, NOW, SchedulerConfig()) == schedule(
        [_job()], nodes, MODELS, NOW)


# --- the scheduler's early end --------------------------------------------------------------

_DUMMY = "dummy-free-node"


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleet=st.lists(_node_fields, min_size=1, max_size=16),
       jobs=st.lists(_jobs, min_size=1, max_size=12), config=_configs,
       disagg=st.booleans(), policy=st.sampled_from(["", "least-loaded", "round-robin"]))
def test_stopping_when_no_node_is_free_changes_no_answer(
    fleet: list[dict[str, Any]], jobs: list[Job], config: SchedulerConfig, disagg: bool,
    policy: str,
) -> None:
    if policy:
        config = replace(config, policy=policy)
    elif disagg:
        config = replace(config, policy="fastest", disaggregate=True)
    nodes = [_snap(f"n{i}", f) for i, f in enumerate(fleet)]
    queue = [replace(j, job_id=f"j{k}", admitted_at_s=j.admitted_at_s + k * 1e-3)
             for k, j in enumerate(jobs)]
    got = schedule(queue, nodes, MODELS, NOW, config)
    # the same call with one more node, free and serving every model, in a group of its own,
    # that every job avoids: no job can go there, and no loop ends early for want of free nodes
    dummy = NodeSnapshot(node_id=_DUMMY, owner_id="o", profile=PROFILES[2],
                         models=tuple(MODELS), jobs_max=64, price_micros_per_mtok=999_999)
    avoiding = [replace(j, avoid_nodes=(*j.avoid_nodes, _DUMMY)) for j in queue]
    want = schedule(avoiding, [*nodes, dummy], MODELS, NOW, config)
    assert got == want


def test_a_full_fleet_returns_at_once() -> None:
    nodes = [_gpu(f"n{i}", 8) for i in range(50)]
    assert schedule([_job(k) for k in range(48)], nodes, MODELS, NOW) == []
    nodes[17] = _gpu("n17", 7)  # one slot frees: one job takes it (the first ones queue for
    out = schedule([_job(k) for k in range(48)], nodes, MODELS, NOW)  # busy twins first)
    assert [a.node_id for a in out] == ["n17"]

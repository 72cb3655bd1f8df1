"""Placement over many nodes stays cheap: a big group is ranked over its least-loaded members,
and a node's snapshot is reused while nothing it reads has changed."""

from __future__ import annotations

import time
from dataclasses import replace

from sparecycles import availability
from sparecycles.coordinator.node_conn import NodeConn, snapshot_reuse_s_max
from sparecycles.scheduling import scheduler
from sparecycles.tools.loadtest.fakenodes import fake_profile
from sparecycles.types import AvailabilityPolicy, Job, ModelSpec, NodeSnapshot

SPEC = ModelSpec(name="m", n_params=1_000_000_000, bytes_per_param=2.0, n_layers=24,
                 hidden_size=2048, n_kv_heads=8, head_dim=128, context_length=4096)


def _snap(i: int, active: int) -> NodeSnapshot:
    return NodeSnapshot(node_id=f"n{i:05d}", owner_id="o", profile=fake_profile(), models=("m",),
                        active_jobs=active, jobs_max=8)


def _job(k: int, now: float) -> Job:
    return Job(job_id=f"j{k}", model="m", prompt_tokens=200, max_tokens=64, client_id="c",
               admitted_at_s=now)


def test_a_big_group_still_finds_its_idle_nodes() -> None:
    now = 1_000.0
    # 3,000 nodes of one group, all busy but three idle ones at the end of the list
    nodes = [_snap(i, 6) for i in range(2_997)] + [_snap(2_997 + i, 0) for i in range(3)]
    config = scheduler.SchedulerConfig(group_rank_max=64)
    out = scheduler.schedule([_job(k, now) for k in range(3)], nodes, {"m": SPEC}, now, config)
    assert sorted(a.node_id for a in out) == ["n02997", "n02998", "n02999"]


def test_ranking_cut_matches_the_full_ranking_on_identical_nodes() -> None:
    now = 1_000.0
    nodes = [_snap(i, i % 8) for i in range(1_000)]
    jobs = [_job(k, now) for k in range(20)]
    cut = scheduler.schedule(jobs, nodes, {"m": SPEC}, now,
                             scheduler.SchedulerConfig(group_rank_max=100))
    full = scheduler.schedule(jobs, nodes, {"m": SPEC}, now,
                              scheduler.SchedulerConfig(group_rank_max=10_000))
    loads = {n.node_id: n.active_jobs for n in nodes}
    assert len(cut) == len(full) == 20
    assert sorted(loads[a.node_id] for a in cut) == sorted(loads[a.node_id] for a in full)


def _conn() -> NodeConn:
    async def send(_frame: str) -> None:
        return None

    return NodeConn(node_id="n", owner_id="o", name="n", public_key="", profile=fake_profile(),
                    policy=AvailabilityPolicy(owner_load_max=0.5), models=("m",), weights={},
                    jobs_max=8,
                    send_raw=send)


def test_snapshot_is_reused_until_its_inputs_change() -> None:
    node, now = _conn(), time.time()
    first = node.snapshot(now)
    assert node.snapshot(now + 0.1) is first
    node.jobs.add("j1")
    second = node.snapshot(now + 0.2)
    assert second is not first and second.active_jobs == 1
    node.status = replace(node.status, owner_load=0.99)
    assert node.snapshot(now + 0.3).available is False
    node.observe_speed("m", 40.0)
    assert node.snapshot(now + 0.4).measured_decode_tokens_per_s == {"m": 40.0}
    third = node.snapshot(now + 0.5)
    assert node.snapshot(now + 0.5 + snapshot_reuse_s_max) is not third
    assert isinstance(node.status, availability.DeviceStatus)

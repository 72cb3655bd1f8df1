"""The coordinator's placement index stays the full scan's, from the nodes' own changes.

``LivePlacement`` re-reads only the snapshots of nodes that told it they changed (a job started
or ended, the backlog moved, status, draining, trust, speed, joining and leaving). Driven by
random changes made the way dispatch, the router and the verifier make them, its answer for
one job must equal ``schedule`` over every node's fresh snapshot, and it must have asked only
the changed nodes.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparecycles import availability
from sparecycles.coordinator.node_conn import NodeConn
from sparecycles.coordinator.placement import LivePlacement
from sparecycles.coordinator.watch import JobSet
from sparecycles.scheduling.presets import DEVICE_PRESETS, MODEL_PRESETS
from sparecycles.scheduling.scheduler import SchedulerConfig, schedule
from sparecycles.types import AvailabilityPolicy, Job

MODEL = MODEL_PRESETS["llama-3-8b-q4"]
MODELS = {MODEL.name: MODEL}
PROFILES = [DEVICE_PRESETS[k] for k in ("gaming-pc", "laptop-cpu")]
NOW = 1_000_000.0


def _conn(node_id: str, profile_index: int = 0, jobs_max: int = 4) -> NodeConn:
    async def send(_frame: str) -> None:
        raise AssertionError("nothing is sent in these tests")

    return NodeConn(node_id=node_id, owner_id="o", name=node_id, public_key="",
                    profile=PROFILES[profile_index], policy=AvailabilityPolicy(),
                    models=(MODEL.name,), weights={}, jobs_max=jobs_max, send_raw=send)


def _job(prompt: int, out: int) -> Job:
    return Job(job_id="j", model=MODEL.name, prompt_tokens=prompt, max_tokens=out,
               client_id="c", admitted_at_s=NOW)


def _full_scan(live: LivePlacement, job: Job, config: SchedulerConfig) -> Any:
    nodes = [*live.nodes.values(), *live.remote.values()]
    snaps = [n.snapshot(NOW) for n in nodes if not n.closed and not n.draining]
    return schedule([job], snaps, MODELS, NOW, config)


_ops = st.lists(st.tuples(
    st.sampled_from(["start", "start", "end", "tokens", "tokens", "first_token", "trust",
                     "drain", "undrain", "close", "status", "speed", "leave", "join",
                     "replace"]),
    st.integers(0, 1_000), st.integers(1, 400)), min_size=1, max_size=40)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_ops, size=st.integers(1, 12), candidates=st.sampled_from([1, 2, 4]),
       job_sizes=st.tuples(st.integers(10, 2_000), st.integers(1, 300)))
def test_live_index_places_as_the_full_scan(ops: list[tuple[str, int, int]], size: int,
                                            candidates: int,
                                            job_sizes: tuple[int, int]) -> None:  # fmt: skip
    config = SchedulerConfig(group_candidates=candidates)
    live = LivePlacement()
    for i in range(size):
        live.nodes[f"n{i}"] = _conn(f"n{i}", i % 2, jobs_max=(1, 2, 4)[i % 3])
    seq = size
    job = _job(*job_sizes)
    for k, (op, a, b) in enumerate(ops):
        nodes = list(live.nodes.values())
        if not nodes and op != "join":
            continue
        node = nodes[a % len(nodes)] if nodes else None
        jid = f"x{k}"
        if op == "start" and node is not None:  # as dispatch._begin_attempt
            node.jobs.add(jid)
            node.queued_tokens += b
            node.backlog.sent(jid, b, b)
        elif op == "end" and node is not None and node.jobs:  # as dispatch._end_attempt
            gone = sorted(node.jobs)[a % len(node.jobs)]
            node.jobs.discard(gone)
            node.queued_tokens = max(0, node.queued_tokens - b)
        elif op == "tokens" and node is not None:  # as dispatch.on_tokens
            node.queued_tokens = max(0, node.queued_tokens - 1 - b % 5)
        elif op == "first_token" and node is not None and node.jobs:
            node.backlog.streaming(sorted(node.jobs)[0])
        elif op == "trust" and node is not None:  # as the verifier
            node.reputation = [1.0, 0.4, 0.95][b % 3]
        elif op == "drain" and node is not None:  # as the router
            node.set_draining(True, NOW)
        elif op == "undrain" and node is not None:
            node.set_draining(False, NOW)
        elif op == "close" and node is not None:
            node.closed = True
        elif op == "status" and node is not None:  # a heartbeat
            node.status = availability.DeviceStatus(owner_load=(b % 10) / 10)
        elif op == "speed" and node is not None:
            node.observe_speed(MODEL.name, float(b))
        elif op == "leave" and node is not None:  # as dispatch.on_node_lost
            del live.nodes[node.node_id]
        elif op == "join":
            live.nodes[f"n{seq}"] = _conn(f"n{seq}", b % 2, jobs_max=(1, 2, 4)[b % 3])
            seq += 1
        elif op == "replace" and node is not None:  # the same node id on a new socket
            live.nodes[node.node_id] = _conn(node.node_id, b % 2)
        before = live.refreshed
        marked = len(live._dirty)
        assert live.refresh(NOW)
        assert live.refreshed - before <= marked  # only the marked nodes were asked
        got = live.index.place(job, MODELS, NOW, config)
        assert got == _full_scan(live, job, config)
        open_nodes = [n for n in live.nodes.values() if not n.closed and not n.draining]
        assert len(live.index) == len(open_nodes)
        for n in open_nodes:  # what the index keeps is what the full scan reads ...
            kept, fresh = live.snapshot_of(n.node_id), n.snapshot(NOW)
            if fresh.active_jobs < fresh.jobs_max:  # ... but a free node's queue (not read)
                kept = replace(kept, queued_tokens=fresh.queued_tokens)
            assert kept == fresh
        assert live.index.free == sum(len(n.jobs) < n.jobs_max for n in open_nodes)


def test_unchanged_nodes_are_not_asked() -> None:
    live = LivePlacement()
    for i in range(100):
        live.nodes[f"n{i}"] = _conn(f"n{i}")
    live.refresh(NOW)
    assert live.refreshed == 100
    live.refresh(NOW)
    assert live.refreshed == 100  # nothing changed: nothing asked
    node = live.nodes["n42"]
    node.jobs.add("j")  # a job starts there
    node.queued_tokens += 16
    live.refresh(NOW)
    assert live.refreshed == 101
    node.queued_tokens -= 1  # a token: the node has free slots, so this does not count
    live.refresh(NOW)
    assert live.refreshed == 101
    for k in range(3):
        node.jobs.add(f"f{k}")  # now full: its queue counts
    live.refresh(NOW)
    node.queued_tokens -= 1
    live.refresh(NOW)
    assert live.refreshed == 103
    live.refresh(NOW + 2.0)  # every snapshot is older than snapshot_reuse_s_max: asked again
    assert live.refreshed == 203


def test_job_sets_tell_their_node() -> None:
    node = _conn("n")
    seen: list[str] = []
    node.set_watch(lambda _n, what: seen.append(what))
    assert isinstance(node.jobs, JobSet)
    node.jobs.add("a")
    node.jobs |= {"b"}
    node.jobs.discard("a")
    node.backlog.sent("b", 10, 10)
    node.reputation = 0.5
    node.last_seen_s = 5.0  # not read by placement
    # "|=" tells it by setting the attribute again (to the same set)
    assert seen == ["jobs", "jobs", "jobs", "backlog", "reputation"]
    assert isinstance(node.jobs, JobSet) and node.jobs == {"b"}
    node.set_watch(None)
    node.jobs.add("c")
    assert len(seen) == 5

"""Two replicas in one process: their dispatchers share a store and ledger, their fleets one
in-process bus. The test plays each node (and each host's socket reader, which passes the node's
messages to ``Fleet.take`` as coordinator/router.py does)."""

from __future__ import annotations

import pytest
from test_dispatch import SPEC, FakeNode, _admit, _drain, _until

from sparecycles import protocol
from sparecycles.coordinator.dispatch import Dispatcher
from sparecycles.coordinator.replication import fleet as fleet_mod
from sparecycles.coordinator.replication.bus import MemoryBus, subject_matches
from sparecycles.coordinator.replication.fleet import Fleet, RemoteNode


@pytest.fixture
def fast_beats(monkeypatch):
    monkeypatch.setattr(fleet_mod, "beat_interval_s", 0.05)
    monkeypatch.setattr(fleet_mod, "replica_timeout_s", 0.5)


async def _replica(world, bus: MemoryBus, name: str) -> tuple[Dispatcher, Fleet]:
    store, ledger, *_ = world
    d = Dispatcher(store=store, ledger=ledger, models={"m": SPEC}, replica_id=name,
                   token_gap_s=30)
    await d.start()
    f = Fleet(bus, name, d)
    await f.start()
    return d, f


async def _two_replicas(world) -> tuple[Dispatcher, Fleet, Dispatcher, Fleet]:
    """Replicas r1 and r2 on one in-process bus."""
    bus = MemoryBus()
    d1, f1 = await _replica(world, bus, "r1")
    d2, f2 = await _replica(world, bus, "r2")
    return d1, f1, d2, f2


async def _host(d: Dispatcher, f: Fleet, peer: Dispatcher, node: FakeNode) -> None:
    """``node`` connects to the replica of ``d``; wait until ``peer`` sees it."""
    d.on_node_ready(node.conn)
    f.local_up(node.conn)
    await _until(lambda: node.conn.node_id in peer.remote)


def _relay(f: Fleet, node: FakeNode, msg) -> None:
    """The host's socket reader: a node's message, relayed if another replica owns the job."""
    assert f.owns(node.conn, msg.job_id)
    f.take(node.conn, msg, protocol.encode(msg))


def test_subject_matching() -> None:
    assert subject_matches("sc.fleet.*", "sc.fleet.up")
    assert not subject_matches("sc.fleet.*", "sc.fleet.up.x")
    assert subject_matches("sc.>", "sc.fleet.up.x")
    assert not subject_matches("sc.>", "sc")
    assert subject_matches("sc.replica.a.to_node", "sc.replica.a.to_node")
    assert not subject_matches("sc.replica.a.to_node", "sc.replica.b.to_node")


async def test_a_client_on_one_replica_is_served_by_a_node_on_another(world, fast_beats) -> None:
    store, ledger, client, (alice, _bob) = world
    bus = MemoryBus()
    d1, f1 = await _replica(world, bus, "r1:8001")
    d2, f2 = await _replica(world, bus, "r2:8002")
    node = FakeNode("n1", alice)
    await _host(d2, f2, d1, node)
    assert isinstance(d1.remote[node.conn.node_id], RemoteNode)

    job = await _admit(d1, client)  # the client reached r1; r1 has no node of its own
    await _until(lambda: node.jobs())
    assign = node.jobs()[0]
    assert assign["prompt_token_ids"] == [5, 6, 7]
    assert f2.relayed["job_1"].owner == f1.me
    _relay(f2, node, protocol.Tokens(job_id="job_1", attempt=1, index=0, token_ids=[1, 2]))
    _relay(f2, node, protocol.Tokens(job_id="job_1", attempt=1, index=2, token_ids=[3]))
    _relay(f2, node, node.done(assign, [1, 2, 3]))
    await _until(lambda: job.events.qsize() == 3)  # two token messages, then the end
    assert store.get_job("job_1").state == "done"
    events = _drain(job)
    assert [t for e in events if e.kind == "tokens" for t in e.token_ids] == [1, 2, 3]
    assert events[-1].kind == "done"
    assert "job_1" not in f2.relayed and not node.conn.jobs
    remote = d1.remote[node.conn.node_id]  # its speed is measured with the batch it ran in
    assert remote.measured_tps["m"] > 0 and remote.snapshot(0).measured_decode_batch["m"] >= 1
    snap = remote.snapshot(0)  # reused while nothing it reads changes (placement's memo)
    assert remote.snapshot(1e9) is snap
    remote.observe_speed("m", 123.0)
    assert remote.snapshot(0) is not snap
    snap = remote.snapshot(0)
    remote.apply_state([3, 40, True, None, False, 1.0, {}])
    assert remote.snapshot(0) is not snap and remote.snapshot(0).active_jobs == 3
    money = ledger.job_money("job_1")
    assert money["state"] == "settled" and money["charged_micros"] > 0
    assert ledger.check() == []
    for f, d in ((f1, d1), (f2, d2)):
        await f.stop()
        await d.stop()


async def test_a_dead_host_replica_s_jobs_resume_on_the_owner_s_own_node(world, fast_beats
                                                                         ) -> None:
    store, ledger, client, (alice, bob) = world
    d1, f1, d2, f2 = await _two_replicas(world)
    far = FakeNode("far", alice)
    await _host(d2, f2, d1, far)
    job = await _admit(d1, client)
    await _until(lambda: far.jobs())
    _relay(f2, far, protocol.Tokens(job_id="job_1", attempt=1, index=0, token_ids=[1, 2]))
    await _until(lambda: len(job.generated) == 2)

    near = FakeNode("near", bob)  # a node of r1's own joins; then r2 dies without a word
    d1.on_node_ready(near.conn)
    await f2.stop()
    await d2.stop()
    await _until(lambda: near.jobs(), timeout_s=5)
    resumed = near.jobs()[0]
    assert resumed["attempt"] == 2 and resumed["prompt_token_ids"] == [5, 6, 7, 1, 2]
    d1.on_tokens(near.conn, protocol.Tokens(job_id="job_1", attempt=2, index=0, token_ids=[9]))
    await d1.on_done(near.conn, near.done(resumed, [9]))
    await _until(lambda: store.get_job("job_1").state == "done")
    assert [t for e in _drain(job) if e.kind == "tokens" for t in e.token_ids] == [1, 2, 9]
    assert [(a.outcome, a.completion_tokens) for a in store.attempts("job_1")] == [
        ("replica_lost", 2), ("done", 1)]
    assert ledger.check() == []
    await f1.stop()
    await d1.stop()


async def test_a_node_that_moves_to_the_owner_replica_is_resumed_there(world, fast_beats
                                                                      ) -> None:
    store, ledger, client, (alice, _bob) = world
    d1, f1, d2, f2 = await _two_replicas(world)
    node = FakeNode("n", alice)
    await _host(d2, f2, d1, node)
    job = await _admit(d1, client)
    await _until(lambda: node.jobs())
    _relay(f2, node, protocol.Tokens(job_id="job_1", attempt=1, index=0, token_ids=[4]))
    await _until(lambda: job.generated == [4])
    # its socket to r2 drops and it dials r1 (as through a load balancer)
    await node.conn.stop()
    await d2.on_node_lost(node.conn)
    f2.local_down(node.conn)
    again = FakeNode("n", alice)
    again.identity, again.conn.node_id = node.identity, node.conn.node_id
    d1.on_node_ready(again.conn)
    await _until(lambda: again.jobs())
    assert again.jobs()[0]["attempt"] == 2
    assert again.jobs()[0]["prompt_token_ids"] == [5, 6, 7, 4]
    assert node.conn.node_id not in d1.remote
    await d1.cancel("job_1")
    await _until(lambda: store.get_job("job_1").state == "done")
    assert ledger.check() == []
    for f, d in ((f1, d1), (f2, d2)):
        await f.stop()
        await d.stop()


async def test_a_dead_owner_replica_s_relayed_jobs_are_cancelled(world, fast_beats) -> None:
    _store, _ledger, client, (alice, _bob) = world
    d1, f1, d2, f2 = await _two_replicas(world)
    node = FakeNode("n", alice)
    await _host(d2, f2, d1, node)
    await _admit(d1, client)
    await _until(lambda: node.jobs())
    await f1.stop()  # r1 dies: its client's connection died with it
    await _until(lambda: any(m["type"] == "cancel" for m in node.sent), timeout_s=5)
    assert "job_1" not in f2.relayed and not node.conn.jobs
    await d1.stop()  # (its restart, or another replica's reaper, settles the job)
    await f2.stop()
    await d2.stop()

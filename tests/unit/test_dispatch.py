"""The job lifecycle with in-memory twins: a SQLite in-memory store, the real ledger, fake sockets.

Nodes here are ``NodeConn``s whose socket is a list: the test plays the node's part by calling
dispatch's handlers with the messages a node would send.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import replace

import pytest
from sqlalchemy import event

from sparecycles import protocol
from sparecycles.coordinator.dispatch import Dispatcher
from sparecycles.coordinator.jobs import Attempt, LiveJob, observed_decode_tokens_per_s
from sparecycles.coordinator.node_conn import NodeConn
from sparecycles.errors import InsufficientBalance, NoNodeAvailable
from sparecycles.identity import NodeIdentity
from sparecycles.scheduling import chains as chains_planner
from sparecycles.types import AvailabilityPolicy, DeviceProfile, ModelSpec, SamplingParams

SPEC = ModelSpec(name="m", n_params=5_000_000, bytes_per_param=4, n_layers=4, hidden_size=128,
                 n_kv_heads=2, head_dim=32, context_length=2048, weights_sha256="a" * 64)
PROFILE = DeviceProfile(device_class="laptop", cpu_cores=8, ram_bytes=16 << 30,
                        memory_bandwidth_bytes_per_s=20e9, peak_flops=2e11)


class FakeNode:
    def __init__(self, name: str, owner_id: str, profile: DeviceProfile = PROFILE):
        self.identity = NodeIdentity.generate()
        self.sent: list[dict] = []

        async def send_raw(frame: str) -> None:
            self.sent.append(json.loads(frame))

        self.conn = NodeConn(
            node_id=self.identity.node_id, owner_id=owner_id, name=name,
            public_key=self.identity.public_key_b64, profile=profile,
            policy=AvailabilityPolicy(), models=("m",), weights={"m": SPEC.weights_sha256},
            jobs_max=8, send_raw=send_raw)
        self.conn.start()

    def jobs(self) -> list[dict]:
        return [m for m in self.sent if m["type"] == "job"]

    def done(self, job: dict, produced: list[int], reason: str = "stop", *,
             busy_s: float = 0.04, energy_j: float = 0.0) -> protocol.Done:
        metering = protocol.Metering(prompt_tokens=len(job["prompt_token_ids"]),
                                     completion_tokens=len(produced), time_to_first_token_s=0.01,
                                     total_s=0.05, busy_s=busy_s, energy_j=energy_j)
        out = protocol.tokens_sha256(produced)
        payload = protocol.result_payload(
            job_id=job["job_id"], attempt=job["attempt"], weights_sha256=SPEC.weights_sha256,
            prompt_sha256=job["prompt_sha256"], output_sha256=out, finish_reason=reason,
            metering=metering)
        return protocol.Done(job_id=job["job_id"], attempt=job["attempt"], finish_reason=reason,
                             metering=metering, output_sha256=out,
                             signature=self.identity.sign(payload))


async def _until(cond, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


async def _admit(d: Dispatcher, client: str, job_id: str = "job_1", max_tokens: int = 10
                 ) -> LiveJob:
    return await d.admit(job_id=job_id, client_id=client, api_key_id=None, model="m",
                         endpoint="chat.completions", prompt_ids=[5, 6, 7],
                         sampling=SamplingParams(max_tokens=max_tokens, temperature=0),
                         stream=True)


def _drain(job: LiveJob) -> list:
    events = []
    while not job.events.empty():
        events.append(job.events.get_nowait())
    return events


async def test_tokens_exactly_once_across_a_lost_node(world) -> None:
    store, ledger, client, (alice, bob) = world
    d = Dispatcher(store=store, ledger=ledger, models={"m": SPEC}, replica_id="r1")
    await d.start()
    n1, n2 = FakeNode("n1", alice), FakeNode("n2", bob)
    d.on_node_ready(n1.conn)
    job = await _admit(d, client)
    await _until(lambda: n1.jobs())
    d.on_node_ready(n2.conn)  # n2 joins after placement
    first = n1.jobs()[0]
    assert first["prompt_token_ids"] == [5, 6, 7] and first["attempt"] == 1
    d.on_tokens(n1.conn, protocol.Tokens(job_id="job_1", attempt=1, index=0, token_ids=[1, 2]))
    d.on_tokens(n1.conn, protocol.Tokens(job_id="job_1", attempt=1, index=0, token_ids=[1, 2, 3]))
    await d.on_node_lost(n1.conn)
    await _until(lambda: n2.jobs())
    second = n2.jobs()[0]
    assert second["attempt"] == 2
    assert second["prompt_token_ids"] == [5, 6, 7, 1, 2, 3]  # resumed from what was delivered
    assert second["sampling"]["max_tokens"] == 7
    # a late message from the lost attempt changes nothing
    d.on_tokens(n1.conn, protocol.Tokens(job_id="job_1", attempt=1, index=3, token_ids=[99]))
    d.on_tokens(n2.conn, protocol.Tokens(job_id="job_1", attempt=2, index=0, token_ids=[4, 5]))
    await d.on_done(n2.conn, n2.done(second, [4, 5]))
    events = _drain(job)
    streamed = [t for e in events if e.kind == "tokens" for t in e.token_ids]
    assert streamed == [1, 2, 3, 4, 5]
    assert events[-1].kind == "done"
    await _until(lambda: store.get_job("job_1").state == "done")
    money = ledger.job_money("job_1")
    assert money["state"] == "settled" and money["charged_micros"] > 0
    attempts = store.attempts("job_1")
    assert [(a.outcome, a.completion_tokens) for a in attempts] == [("node_lost", 3), ("done", 2)]
    assert ledger.check() == []
    await d.stop()


async def test_the_last_attempt_ends_in_the_settlements_transaction(world, monkeypatch) -> None:
    """A job's last attempt is ended by its settlement's transaction (one commit a job fewer,
    and one hand-off to a thread); an attempt the job went on from is written at once, before
    the next one starts."""
    store, ledger, client, (alice, bob) = world
    separate: list[tuple[str, int, str]] = []
    real_end = store.end_attempt

    def end_attempt(job_id: str, attempt: int, **fields) -> None:
        separate.append((job_id, attempt, fields["outcome"]))
        real_end(job_id, attempt, **fields)

    monkeypatch.setattr(store, "end_attempt", end_attempt)
    d = Dispatcher(store=store, ledger=ledger, models={"m": SPEC}, replica_id="r1")
    await d.start()
    n1, n2 = FakeNode("n1", alice), FakeNode("n2", bob)
    d.on_node_ready(n1.conn)
    await _admit(d, client)
    await _until(lambda: n1.jobs())
    d.on_tokens(n1.conn, protocol.Tokens(job_id="job_1", attempt=1, index=0, token_ids=[1]))
    d.on_node_ready(n2.conn)
    await d.on_node_lost(n1.conn)
    await _until(lambda: n2.jobs())
    second = n2.jobs()[0]
    d.on_tokens(n2.conn, protocol.Tokens(job_id="job_1", attempt=2, index=0, token_ids=[4, 5]))
    await d.on_done(n2.conn, n2.done(second, [4, 5], busy_s=0.03, energy_j=1.5))
    assert separate == [("job_1", 1, "node_lost")]  # the done attempt rode with the settlement
    rows = store.attempts("job_1")
    assert [(a.outcome, a.completion_tokens) for a in rows] == [("node_lost", 1), ("done", 2)]
    assert rows[1].busy_s == 0.03 and rows[1].energy_j == 1.5 and rows[1].signature
    assert rows[1].ended_at_s is not None and store.get_job("job_1").state == "done"
    assert ledger.job_money("job_1")["state"] == "settled"
    # a job that delivered nothing is voided with its attempt's end in the same transaction
    await _admit(d, client, job_id="job_2")
    await _until(lambda: len(n2.jobs()) == 2)
    await d.cancel("job_2")
    assert [a.outcome for a in store.attempts("job_2")] == ["cancelled"]
    assert ledger.job_money("job_2")["state"] == "voided" and len(separate) == 1
    await d.stop()


async def test_a_job_handed_back_by_the_favourite_goes_to_the_free_node_beside_it(world) -> None:
    """The node that handed a job back is still the scheduler's first choice for it; the
    scheduler is told to avoid that node for that job, so the free node beside it takes the job
    (it used to be offered to the favourite again and again, dropped each time, until the client
    got 503 after ``placement_wait_s``)."""
    store, ledger, client, (alice, bob) = world
    d = Dispatcher(store=store, ledger=ledger, models={"m": SPEC}, replica_id="r1",
                   placement_wait_s=1.0)
    await d.start()
    fast = FakeNode("fast", alice, replace(PROFILE, memory_bandwidth_bytes_per_s=200e9,
                                           peak_flops=2e12))
    slow = FakeNode("slow", bob)
    d.on_node_ready(fast.conn)
    d.on_node_ready(slow.conn)
    job = await _admit(d, client)
    await _until(lambda: fast.jobs())
    assert not slow.jobs()
    await d.on_job_error(fast.conn, protocol.JobError(job_id="job_1", attempt=1,
                                                      message="out of memory"))
    await _until(lambda: slow.jobs(), timeout_s=3.0)
    assert slow.jobs()[0]["attempt"] == 2 and len(fast.jobs()) == 1
    d.on_tokens(slow.conn, protocol.Tokens(job_id="job_1", attempt=2, index=0, token_ids=[4]))
    await d.on_done(slow.conn, slow.done(slow.jobs()[0], [4]))
    assert [e.kind for e in _drain(job)] == ["tokens", "done"]
    await d.stop()


async def test_admission_is_one_commit_and_places_at_once(world) -> None:
    """The job row, the hold and the first attempt's row are one transaction, durable before
    the node is sent the job; with nothing else waiting the job goes to the node within
    ``admit``, not a loop turn later, and its attempt costs no commit of its own."""
    store, ledger, client, (alice, _bob) = world
    d = Dispatcher(store=store, ledger=ledger, models={"m": SPEC}, replica_id="r1")
    await d.start()
    n1 = FakeNode("n1", alice)
    d.on_node_ready(n1.conn)
    await _admit(d, client, job_id="job_0")  # first hold of a client creates its accounts
    await _until(lambda: store.get_job("job_0").state == "placed")  # its writes are done
    commits: list[int] = []
    event.listen(store.engine, "commit", lambda _conn: commits.append(1))
    job = await _admit(d, client)
    assert len(commits) == 1
    await _until(lambda: len(n1.jobs()) == 2)  # the socket's writer sends it
    await d.writer.drain()
    assert len(commits) == 1  # nothing more was written for it
    assert ledger.job_money("job_1")["state"] == "held"
    assert job.state == "placed" and job.dispatched_perf_s is not None and not d.waiting
    # admission's parts, timed for the API's overhead metrics: placement, then the hold's wait
    assert job.placement_s is not None and job.hold_s is not None
    assert job.placement_s >= 0 and job.hold_s > 0
    assert job.placement_s + job.hold_s <= job.dispatched_perf_s - job.received_perf_s
    row = store.get_job("job_1")
    assert (row.state, row.node_id, row.attempts) == ("placed", n1.conn.node_id, 1)
    assert [(a.attempt, a.node_id, a.outcome, a.prompt_tokens)
            for a in store.attempts("job_1")] == [(1, n1.conn.node_id, "running", 3)]
    await d.stop()


async def test_a_refused_hold_gives_back_the_slot_it_took(world) -> None:
    """Placement on admission takes the node's slot before the hold commits; a refused hold
    frees it, and the failed job's row names no node and has no attempt."""
    store, ledger, _client, (alice, _bob) = world
    poor = store.ensure_client("poor")
    d = Dispatcher(store=store, ledger=ledger, models={"m": SPEC}, replica_id="r1")
    await d.start()
    n1 = FakeNode("n1", alice)
    d.on_node_ready(n1.conn)
    with pytest.raises(InsufficientBalance):
        await _admit(d, poor, job_id="job_poor")
    row = store.get_job("job_poor")
    assert (row.state, row.node_id, row.attempts) == ("failed", None, 0)
    assert store.attempts("job_poor") == []
    assert not n1.conn.jobs and n1.conn.queued_tokens == 0 and not n1.conn.backlog.kv
    assert not n1.jobs() and "job_poor" not in d.jobs
    await d.stop()


async def test_a_node_lost_while_the_hold_commits_ends_the_attempt_and_the_job_waits(
        world, monkeypatch) -> None:
    """The node chosen on admission left before the hold committed: its attempt (already in the
    books with the hold) ends as node_lost, and the job goes to the next node."""
    store, ledger, client, (alice, bob) = world
    d = Dispatcher(store=store, ledger=ledger, models={"m": SPEC}, replica_id="r1")
    await d.start()
    n1, n2 = FakeNode("n1", alice), FakeNode("n2", bob)
    d.on_node_ready(n1.conn)
    real_hold = ledger.hold_async

    async def hold_while_n1_leaves(*args, **kwargs):
        result = await real_hold(*args, **kwargs)
        await d.on_node_lost(n1.conn)  # the reader of n1's socket, during the commit
        await n1.conn.stop()
        d.on_node_ready(n2.conn)
        return result

    monkeypatch.setattr(ledger, "hold_async", hold_while_n1_leaves)
    job = await _admit(d, client)
    await _until(lambda: n2.jobs())
    assert n2.jobs()[0]["attempt"] == 2 and not n1.jobs()
    d.on_tokens(n2.conn, protocol.Tokens(job_id="job_1", attempt=2, index=0, token_ids=[4]))
    await d.on_done(n2.conn, n2.done(n2.jobs()[0], [4]))
    assert [e.kind for e in _drain(job)] == ["tokens", "done"]
    assert [(a.attempt, a.outcome) for a in store.attempts("job_1")] == [(1, "node_lost"),
                                                                          (2, "done")]
    assert ledger.job_money("job_1")["state"] == "settled" and ledger.check() == []
    await d.stop()


async def test_a_result_with_a_bad_signature_is_not_accepted(world) -> None:
    store, ledger, client, (alice, _bob) = world
    d = Dispatcher(store=store, ledger=ledger, models={"m": SPEC}, replica_id="r1")
    await d.start()
    n1 = FakeNode("n1", alice)
    d.on_node_ready(n1.conn)
    await _admit(d, client)
    await _until(lambda: n1.jobs())
    d.on_tokens(n1.conn, protocol.Tokens(job_id="job_1", attempt=1, index=0, token_ids=[1, 2]))
    forged = n1.done(n1.jobs()[0], [1, 2]).model_copy(update={"signature": "A" * 88})
    await d.on_done(n1.conn, forged)
    assert d.jobs["job_1"].state == "admitted"  # back to waiting, not settled
    assert ledger.job_money("job_1")["state"] == "held"
    await d.stop()


async def test_a_result_signed_for_another_prompt_is_not_accepted(world) -> None:
    """The prompt a result is checked against is the one its attempt was sent (its hash kept
    from then): a node signing for any other prompt is refused as a forgery."""
    store, ledger, client, (alice, _bob) = world
    d = Dispatcher(store=store, ledger=ledger, models={"m": SPEC}, replica_id="r1")
    await d.start()
    n1 = FakeNode("n1", alice)
    d.on_node_ready(n1.conn)
    await _admit(d, client)
    await _until(lambda: n1.jobs())
    job = n1.jobs()[0]
    assert d.jobs["job_1"].current.prompt_sha256 == job["prompt_sha256"]
    d.on_tokens(n1.conn, protocol.Tokens(job_id="job_1", attempt=1, index=0, token_ids=[1, 2]))
    other = {**job, "prompt_sha256": protocol.tokens_sha256(job["prompt_token_ids"] + [9])}
    await d.on_done(n1.conn, n1.done(other, [1, 2]))
    assert d.jobs["job_1"].state == "admitted"  # back to waiting, not settled
    assert ledger.job_money("job_1")["state"] == "held"
    await d.stop()


@pytest.mark.parametrize(("busy_s", "energy_j"), [(1e12, 0.0), (0.04, 1e9)])
async def test_metering_out_of_bounds_is_refused_and_never_reaches_the_books(
        world, busy_s: float, energy_j: float) -> None:
    """busy_s beyond the attempt's wall time, or more energy than a laptop can draw in its
    busy time: the signed result is refused like a forgery (resumed elsewhere), its metering
    is not stored, and the job is settled on the honest node's report."""
    store, ledger, client, (alice, bob) = world
    d = Dispatcher(store=store, ledger=ledger, models={"m": SPEC}, replica_id="r1")
    await d.start()
    n1, n2 = FakeNode("n1", alice), FakeNode("n2", bob)
    d.on_node_ready(n1.conn)
    await _admit(d, client)
    await _until(lambda: n1.jobs())
    d.on_tokens(n1.conn, protocol.Tokens(job_id="job_1", attempt=1, index=0, token_ids=[1, 2]))
    await d.on_done(n1.conn, n1.done(n1.jobs()[0], [1, 2], busy_s=busy_s, energy_j=energy_j))
    assert d.jobs["job_1"].state == "admitted"  # refused: back to waiting, not settled
    assert ledger.job_money("job_1")["state"] == "held"
    await d.on_node_lost(n1.conn)  # (the scheduler's own avoid list is another change)
    d.on_node_ready(n2.conn)
    await _until(lambda: n2.jobs())
    second = n2.jobs()[0]
    d.on_tokens(n2.conn, protocol.Tokens(job_id="job_1", attempt=2, index=0, token_ids=[3]))
    await d.on_done(n2.conn, n2.done(second, [3]))
    await _until(lambda: store.get_job("job_1").state == "done")
    await _until(lambda: [a.outcome for a in store.attempts("job_1")] == ["bad_metering",
                                                                           "done"])
    bad, good = store.attempts("job_1")
    assert not bad.busy_s and not bad.energy_j  # the refused numbers are nowhere
    assert good.busy_s == pytest.approx(0.04)
    assert ledger.check() == []
    await d.stop()


async def test_no_node_means_503_and_the_hold_is_voided(world) -> None:
    store, ledger, client, _ = world
    d = Dispatcher(store=store, ledger=ledger, models={"m": SPEC}, replica_id="r1",
                   placement_wait_s=0.3)
    await d.start()
    job = await _admit(d, client)
    event = await asyncio.wait_for(job.events.get(), 5)
    assert event.kind == "error" and isinstance(event.error, NoNodeAvailable)
    await _until(lambda: ledger.job_money("job_1")["state"] == "voided")
    assert store.get_job("job_1").state == "failed"
    await d.stop()


async def test_admission_without_balance_is_refused(world) -> None:
    store, ledger, _client, _ = world
    poor = store.ensure_client("poor")
    d = Dispatcher(store=store, ledger=ledger, models={"m": SPEC}, replica_id="r1")
    with pytest.raises(InsufficientBalance):
        await _admit(d, poor, job_id="job_poor")
    assert store.get_job("job_poor").state == "failed"
    assert "job_poor" not in d.jobs


async def test_client_cancel_charges_only_what_was_delivered(world) -> None:
    store, ledger, client, (alice, _bob) = world
    d = Dispatcher(store=store, ledger=ledger, models={"m": SPEC}, replica_id="r1")
    await d.start()
    n1 = FakeNode("n1", alice)
    d.on_node_ready(n1.conn)
    await _admit(d, client, max_tokens=50)
    await _until(lambda: n1.jobs())
    d.on_tokens(n1.conn, protocol.Tokens(job_id="job_1", attempt=1, index=0, token_ids=[1, 2]))
    await d.cancel("job_1", reason="client")
    await _until(lambda: any(m["type"] == "cancel" for m in n1.sent))
    await _until(lambda: store.get_job("job_1").state == "done")
    assert store.get_job("job_1").completion_tokens == 2
    full = ledger.job_money("job_1")
    assert 0 < full["charged_micros"] < full["held_micros"]
    await d.stop()


async def test_restart_voids_what_a_crashed_run_left_open(world) -> None:
    store, ledger, client, _ = world
    d = Dispatcher(store=store, ledger=ledger, models={"m": SPEC}, replica_id="r1")
    await _admit(d, client)  # admitted, never placed: then the process "dies"
    assert ledger.job_money("job_1")["state"] == "held"
    again = Dispatcher(store=store, ledger=ledger, models={"m": SPEC}, replica_id="r1")
    await again.start()
    assert ledger.job_money("job_1")["state"] == "voided"
    assert store.get_job("job_1").state == "failed"
    assert ledger.check() == []
    await again.stop()


async def test_writes_after_admission_wait_out_a_database_outage(world, monkeypatch) -> None:
    from sqlalchemy import exc as sa_exc

    from sparecycles.coordinator import writer

    store, ledger, *_ = world
    d = Dispatcher(store=store, ledger=ledger, models={"m": SPEC}, replica_id="r1")
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise sa_exc.OperationalError("UPDATE jobs", {}, Exception("server closed"))
        return "written"

    assert await d.writer.apply(flaky) == "written" and len(calls) == 3

    def landed_before_the_drop() -> None:  # its commit landed; the retry hits the key
        calls.append(1)
        if len(calls) == 4:
            raise sa_exc.OperationalError("INSERT", {}, Exception("connection lost"))
        raise sa_exc.IntegrityError("INSERT", {}, Exception("duplicate key"))

    assert await d.writer.apply(landed_before_the_drop) is None
    monkeypatch.setattr(writer, "store_retry_s", 0.3)

    def down() -> None:
        raise sa_exc.OperationalError("SELECT", {}, Exception("connection refused"))

    with pytest.raises(sa_exc.OperationalError):
        await d.writer.apply(down)  # not for ever: the outage outlasted the retry window


def job_fields(job_id: str, client_id: str, now: float) -> dict:
    return dict(id=job_id, client_id=client_id, model="m", endpoint="chat.completions",
                state="admitted", prompt_tokens=3, max_tokens=10, created_at_s=now)


async def test_one_bad_write_in_a_batch_costs_only_itself(world) -> None:
    """Metering writes that queue together commit as one; when the batch fails, the writer
    replays them one by one, in order, so only the bad write is lost (and logged)."""
    import time


    store, ledger, client, _ = world
    d = Dispatcher(store=store, ledger=ledger, models={"m": SPEC}, replica_id="r1")
    for j in ("j1", "j2"):
        store.insert_job(**job_fields(j, client, time.time()))

    def bad() -> None:
        raise ValueError("a bug in one write")

    batch = [lambda: store.start_attempt(job_id="j1", attempt=1, node_id="n", prompt_tokens=3),
             bad,
             lambda: store.start_attempt(job_id="j2", attempt=1, node_id="n", prompt_tokens=3),
             lambda: store.end_attempt("j1", 1, outcome="done", completion_tokens=4)]
    from sparecycles.coordinator.writer import Write

    await d.writer.run_batch([Write(fn, None) for fn in batch])
    assert [(a.outcome, a.completion_tokens) for a in store.attempts("j1")] == [("done", 4)]
    assert [a.outcome for a in store.attempts("j2")] == ["running"]
    assert store.get_job("j2").state == "placed"


async def test_a_duplicate_in_a_retried_batch_is_not_taken_for_the_whole_batch(world,
                                                                              monkeypatch
                                                                              ) -> None:
    """After a dropped connection, a duplicate key on the retry means "this one write landed"
    only for a single write; a batch that meets one is replayed write by write."""
    import time

    from sqlalchemy import exc as sa_exc

    from sparecycles.coordinator.writer import Write

    store, ledger, client, _ = world
    d = Dispatcher(store=store, ledger=ledger, models={"m": SPEC}, replica_id="r1")
    store.insert_job(**job_fields("j1", client, time.time()))
    real = store.write_batch
    tries: list[int] = []

    def dropped_then_duplicate(writes):
        tries.append(1)
        if len(tries) == 1:
            raise sa_exc.OperationalError("COMMIT", {}, Exception("connection lost"))
        raise sa_exc.IntegrityError("INSERT", {}, Exception("duplicate key"))

    monkeypatch.setattr(store, "write_batch", dropped_then_duplicate)
    await d.writer.run_batch([
        Write(lambda: store.start_attempt(job_id="j1", attempt=1, node_id="n",
                                           prompt_tokens=3), None),
        Write(lambda: store.update_job("j1", error="metered"), None)])
    monkeypatch.setattr(store, "write_batch", real)
    assert len(tries) == 2  # the batch was not taken as landed: its writes ran one by one
    assert [a.outcome for a in store.attempts("j1")] == ["running"]
    assert store.get_job("j1").error == "metered"


async def test_a_batch_lost_to_a_long_outage_is_not_replayed_write_by_write(world,
                                                                           monkeypatch) -> None:
    """Past ``store_retry_s`` an outage costs the batch as it would cost one write, rather than
    waiting the window out again for each of its writes while settlements queue behind them."""
    from sqlalchemy import exc as sa_exc

    from sparecycles.coordinator import writer
    from sparecycles.coordinator.writer import Write

    store, ledger, *_ = world
    d = Dispatcher(store=store, ledger=ledger, models={"m": SPEC}, replica_id="r1")
    monkeypatch.setattr(writer, "store_retry_s", 0.3)
    calls: list[int] = []

    def down() -> None:
        calls.append(1)
        raise sa_exc.OperationalError("INSERT", {}, Exception("connection refused"))

    monkeypatch.setattr(store, "write_batch", lambda writes: down())
    await d.writer.run_batch([Write(down, None) for _ in range(5)])
    assert 1 <= len(calls) <= 3  # the batch's own tries only, none per write


def _attempt(started_mono_s: float, first_token_mono_s: float | None, tokens: int) -> Attempt:
    return Attempt(number=1, node_id="n", owner_id="o", device_class="gpu", token_base=0,
                   started_mono_s=started_mono_s, first_token_mono_s=first_token_mono_s,
                   tokens=tokens)


def test_observed_speed_of_a_steady_stream_is_its_token_rate() -> None:
    # 101 tokens, the first at 0.1 s, then one every 20 ms: 50 tokens/s
    att = _attempt(started_mono_s=0.0, first_token_mono_s=0.1, tokens=101)
    assert observed_decode_tokens_per_s(att, now_mono_s=0.1 + 100 * 0.02) == pytest.approx(50.0)


def test_a_burst_does_not_make_a_node_look_faster_than_its_whole_attempt() -> None:
    """Eight tokens over 0.4 s, the last seven held back and sent 1 ms after the first: taken
    at face value that is 7,000 tokens/s; the attempt as a whole (20 tokens/s) bounds it at 40."""
    att = _attempt(started_mono_s=0.0, first_token_mono_s=0.399, tokens=8)
    speed = observed_decode_tokens_per_s(att, now_mono_s=0.4)
    assert speed == pytest.approx(7 / (0.4 * 7 / 16))
    assert speed <= 2 * 8 / 0.4


def test_nothing_to_measure_in_one_token() -> None:
    assert observed_decode_tokens_per_s(_attempt(0.0, 0.1, 1), now_mono_s=0.2) == 0.0
    assert observed_decode_tokens_per_s(_attempt(5.0, None, 3), now_mono_s=5.0) == 0.0


async def test_a_round_of_settlements_lands_together_each_waiter_told_its_own(world) -> None:
    """Many jobs end at once: their settlements run side by side (fewer ledger commits than
    jobs), each job's attempt rows land before its settlement, every job is closed with its
    money, and stop() drains what is queued."""
    store, ledger, client, (alice, bob) = world
    d = Dispatcher(store=store, ledger=ledger, models={"m": SPEC}, replica_id="r1")
    await d.start()
    nodes = [FakeNode(f"n{i}", (alice, bob)[i % 2]) for i in range(4)]
    for n in nodes:
        d.on_node_ready(n.conn)
    await _admit(d, client, job_id="job_0")  # the client's accounts, apart
    ids = [f"job_{i}" for i in range(1, 25)]
    jobs = await asyncio.gather(*(_admit(d, client, job_id=j, max_tokens=5) for j in ids))
    await _until(lambda: sum(len(n.jobs()) for n in nodes) == 25)
    by_id = {m["job_id"]: (n, m) for n in nodes for m in n.jobs()}
    for j in ids:
        n, _m = by_id[j]
        d.on_tokens(n.conn, protocol.Tokens(job_id=j, attempt=1, index=0, token_ids=[1, 2]))
    commits: list[int] = []
    event.listen(store.engine, "commit", lambda _conn: commits.append(1))
    ended = [d.on_done(by_id[j][0].conn, by_id[j][0].done(by_id[j][1], [1, 2]))
             for j in ids[:20]]
    ended += [d.cancel(j) for j in ids[20:]]
    await asyncio.gather(*ended)
    assert len(commits) < len(ids)  # settlements shared transactions
    for j, job in zip(ids, jobs, strict=True):
        assert job.state.is_final
        assert _drain(job)[-1].kind == "done"
        row = store.get_job(j)
        assert (row.state, row.completion_tokens) == ("done", 2), j
        assert ledger.job_money(j)["state"] == "settled"
        assert [a.outcome for a in store.attempts(j)] == (["done"] if j in ids[:20]
                                                           else ["cancelled"])
    await d.stop()  # job_0 is still open: stop settles it and drains
    assert store.get_job("job_0").state == "failed"
    assert ledger.job_money("job_0")["state"] == "voided"
    assert ledger.check() == []


async def test_the_writers_round_background_first_waiters_after_the_round(world,
                                                                          monkeypatch) -> None:
    """A round: its background writes commit first (even those queued after a settlement),
    then the writes waited for run side by side, coroutine functions awaited, each retried
    through an outage on its own, and a failing one raises in its own waiter only."""
    from sqlalchemy import exc as sa_exc

    from sparecycles.coordinator import writer

    store, ledger, *_ = world
    d = Dispatcher(store=store, ledger=ledger, models={"m": SPEC}, replica_id="r1")
    monkeypatch.setattr(writer, "store_retry_s", 5.0)
    log: list[str] = []
    gate = threading.Event()

    async def waited(name: str, *, fail: BaseException | None = None, flaky: int = 0) -> str:
        tries = [0]

        async def fn() -> str:
            tries[0] += 1
            log.append(f"{name}:{tries[0]}")
            await asyncio.sleep(0)
            if tries[0] <= flaky:
                raise sa_exc.OperationalError("COMMIT", {}, Exception("connection lost"))
            if fail is not None:
                raise fail
            return name

        return await d.writer.write(fn)

    await d.start()
    d.writer.background(lambda: gate.wait(5) and log.append("blocker"))  # holds the writer
    await _until(lambda: d.writer.idle)
    d.writer.background(log.append, "bg1")
    w1 = asyncio.ensure_future(waited("s1"))
    w2 = asyncio.ensure_future(waited("s2", fail=ValueError("bad settlement")))
    w3 = asyncio.ensure_future(waited("s3", flaky=1))
    await asyncio.sleep(0)
    d.writer.background(log.append, "bg2")  # queued after the settlements
    gate.set()
    results = await asyncio.wait_for(asyncio.gather(w1, w2, w3, return_exceptions=True), 10)
    assert results[0] == "s1" and results[2] == "s3"
    assert isinstance(results[1], ValueError)
    assert log[:3] == ["blocker", "bg1", "bg2"]  # one round: its background writes first
    assert sorted(log[3:]) == ["s1:1", "s2:1", "s3:1", "s3:2"]  # s3 retried, the others once
    await d.stop()


async def test_a_write_that_returns_a_coroutine_is_refused_not_skipped() -> None:
    from sparecycles.coordinator.writer import call as _call
    from sparecycles.errors import InvariantViolation

    async def settle() -> int:
        return 7

    assert await _call(settle) == 7
    assert await _call(lambda: 8) == 8
    with pytest.raises(InvariantViolation):
        await _call(lambda: settle())  # a plain function returning a coroutine


async def test_a_node_s_reader_does_not_wait_for_a_settlement(world, monkeypatch) -> None:
    """done_received (what a socket's reader calls) ends the job at once and leaves the commit
    to run: while the ledger holds the settlement, the node's next job's tokens still reach its
    client; the first client hears "done" only once its settlement has committed."""
    store, ledger, client, (alice, _bob) = world
    d = Dispatcher(store=store, ledger=ledger, models={"m": SPEC}, replica_id="r1")
    await d.start()
    node = FakeNode("n1", alice)
    d.on_node_ready(node.conn)
    first = await _admit(d, client, "job_1")
    second = await _admit(d, client, "job_2")
    await _until(lambda: len(node.jobs()) == 2)
    by_id = {j["job_id"]: j for j in node.jobs()}
    gate = asyncio.Event()
    settle = ledger.settle_async

    async def held_settle(*args, **kwargs):
        await gate.wait()
        return await settle(*args, **kwargs)

    monkeypatch.setattr(ledger, "settle_async", held_settle)
    d.on_tokens(node.conn, protocol.Tokens(job_id="job_1", attempt=1, index=0, token_ids=[1]))
    ending = d.done_received(node.conn, node.done(by_id["job_1"], [1]))
    assert ending is not None and not ending.done()
    assert "job_1" not in d.jobs  # ended now, settling later
    d.on_tokens(node.conn, protocol.Tokens(job_id="job_2", attempt=1, index=0, token_ids=[7]))
    events = _drain(second)
    assert [t for e in events if e.kind == "tokens" for t in e.token_ids] == [7]
    await asyncio.sleep(0.05)
    assert [e.kind for e in _drain(first)] == ["tokens"]  # no "done" before the commit
    gate.set()
    await ending
    assert [e.kind for e in _drain(first)] == ["done"]
    assert ledger.job_money("job_1")["state"] == "settled"
    await d.stop()


async def test_a_bad_result_resumes_its_own_attempt_at_once(world) -> None:
    """A forged result, then the same node lost in the same read, then placement: the attempt
    that sent the forgery is the one ended and blamed, at once; the next node's attempt is
    left running (a deferred resume once ended and blamed the next node's attempt instead)."""
    store, ledger, client, (alice, bob) = world
    d = Dispatcher(store=store, ledger=ledger, models={"m": SPEC}, replica_id="r1")
    await d.start()
    n1 = FakeNode("n1", alice)
    d.on_node_ready(n1.conn)
    job = await _admit(d, client)
    await _until(lambda: n1.jobs())
    n2 = FakeNode("n2", bob)
    d.nodes[n2.conn.node_id] = n2.conn  # online, without waking the loop yet
    d.on_tokens(n1.conn, protocol.Tokens(job_id="job_1", attempt=1, index=0, token_ids=[1]))
    forged = n1.done(n1.jobs()[0], [1]).model_copy(update={"signature": "A" * 88})
    d._wake.set()  # the loop is due to run (an admission or a heartbeat a moment earlier)
    assert d.done_received(n1.conn, forged) is None  # resumed now: back in the queue
    assert "job_1" in d.waiting and n1.conn.node_id in job.avoid_nodes
    await d.on_node_lost(n1.conn)  # the next frame of the same read
    await _until(lambda: n2.jobs())
    await asyncio.sleep(0.05)
    assert [a.node_id for a in job.attempts] == [n1.conn.node_id, n2.conn.node_id]
    assert n2.conn.node_id not in job.avoid_nodes and "job_1" in n2.conn.jobs
    await _until(lambda: [r.outcome for r in store.attempts("job_1")] == ["bad_signature",
                                                                           "running"])
    await d.stop()


async def test_a_silent_nodes_late_answer_is_dropped_while_its_job_waits(world) -> None:
    """A node silent past the token gap (a long prefill on a slow device) has its attempt ended
    and its job put back; its answer for that attempt, coming later, is stale: neither its
    tokens nor its result (a cancellation, with no tokens) may end the job, which reached the
    client as a 200 with no text while its books said it failed. The next node serves it."""
    store, ledger, client, (alice, bob) = world
    d = Dispatcher(store=store, ledger=ledger, models={"m": SPEC}, replica_id="r1",
                   token_gap_s=0.2)
    await d.start()
    n1 = FakeNode("n1", alice)
    d.on_node_ready(n1.conn)
    job = await _admit(d, client)
    await _until(lambda: n1.jobs())
    await _until(lambda: "job_1" in d.waiting, timeout_s=10)  # silent: resumed, waits
    first = n1.jobs()[0]
    d.on_tokens(n1.conn, protocol.Tokens(job_id="job_1", attempt=1, index=0, token_ids=[9]))
    assert job.generated == []  # stale: dropped
    assert d.done_received(n1.conn, n1.done(first, [], "cancelled")) is None
    assert not job.state.is_final and "job_1" in d.waiting
    n2 = FakeNode("n2", bob)
    d.on_node_ready(n2.conn)
    await _until(lambda: n2.jobs())
    d.on_tokens(n2.conn, protocol.Tokens(job_id="job_1", attempt=2, index=0, token_ids=[1, 2]))
    await d.on_done(n2.conn, n2.done(n2.jobs()[0], [1, 2]))
    events = [job.events.get_nowait() for _ in range(job.events.qsize())]
    assert [e.kind for e in events] == ["tokens", "done"]
    assert events[0].token_ids == (1, 2) and events[-1].finish_reason == "stop"
    assert [r.outcome for r in store.attempts("job_1")] == ["node_silent", "done"]
    await d.stop()


def test_the_first_token_grace_is_bounded() -> None:
    """A node's peak is its own report: however slow it says it is, a hung node that still
    heartbeats loses its job within the token gap plus first_token_grace_s_max."""
    from sparecycles import limits
    from sparecycles.coordinator.dispatch import first_token_grace_s

    assert first_token_grace_s(135_000_000, 8_000, 1e11) == pytest.approx(216.0)
    assert first_token_grace_s(8_000_000_000, 65_536, 6.4e11) == limits.first_token_grace_s_max
    assert first_token_grace_s(1, 10, 0.0) < 1e-6  # a bogus peak reads as 1 GFLOP/s


async def test_a_long_prefill_is_not_silence_but_a_stall_after_it_is(world) -> None:
    """Before its first token a node may take the token gap plus its prefill at a pessimistic
    rate (a prompt of 8,131 tokens on a busy CPU took over a minute, and was cancelled as
    silent); once it streams, the gap alone."""
    store, ledger, client, (alice, _bob) = world
    d = Dispatcher(store=store, ledger=ledger, models={"m": SPEC}, replica_id="r1",
                   token_gap_s=0.2)
    await d.start()
    slow = replace(PROFILE, peak_flops=1e9)  # 2 * 5M params a token at a tenth: 0.1 s a token
    n1 = FakeNode("n1", alice, slow)
    d.on_node_ready(n1.conn)
    job = await d.admit(job_id="job_1", client_id=client, api_key_id=None, model="m",
                        endpoint="chat.completions", prompt_ids=list(range(5, 65)),
                        sampling=SamplingParams(max_tokens=10, temperature=0), stream=True)
    await _until(lambda: n1.jobs())
    assert job.attempts[0].first_token_grace_s == pytest.approx(6.0)  # 60 tokens
    await asyncio.sleep(0.8)  # four token gaps, within the prefill's grace
    assert "job_1" not in d.waiting and len(job.attempts) == 1
    d.on_tokens(n1.conn, protocol.Tokens(job_id="job_1", attempt=1, index=0, token_ids=[1]))
    await _until(lambda: "job_1" in d.waiting, timeout_s=5)  # streaming, then silent: the gap
    await _until(lambda: [r.outcome for r in store.attempts("job_1")] == ["node_silent"])
    await d.stop()


async def test_the_prefill_backlog_counts_prompts_sent_and_not_yet_streaming(world) -> None:
    """The scheduler's view of a live node counts the prompt tokens of the jobs dispatch sent it
    until their first token comes back, and the KV tokens they may fill until they end."""
    store, ledger, client, (alice, _bob) = world
    d = Dispatcher(store=store, ledger=ledger, models={"m": SPEC}, replica_id="r1")
    await d.start()
    n1 = FakeNode("n1", alice)
    d.on_node_ready(n1.conn)
    await _admit(d, client, job_id="job_1", max_tokens=10)
    await _until(lambda: n1.jobs())
    snap = n1.conn.snapshot(1e9)
    assert snap.prefill_backlog_tokens == 3  # the prompt [5, 6, 7], not prefilled yet
    assert snap.kv_reserved_tokens == 3 + 10  # ... and the 10 tokens it may generate
    d.on_tokens(n1.conn, protocol.Tokens(job_id="job_1", attempt=1, index=0, token_ids=[1]))
    assert n1.conn.snapshot(1e9).prefill_backlog_tokens == 0  # streaming: prefilled
    job = n1.jobs()[0]
    await d.on_done(n1.conn, n1.done(job, [1]))
    assert n1.conn.backlog.totals(n1.conn.jobs) == (0, 0)  # forgotten once the job ends
    await d.stop()


# ---- prefix-aware placement (coordinator/prefixes.py) ---------------------------------------


async def test_the_next_turn_goes_to_the_node_holding_the_conversation(world) -> None:
    store, ledger, client, (alice, bob) = world
    d = Dispatcher(store=store, ledger=ledger, models={"m": SPEC}, replica_id="r1")
    await d.start()
    features = frozenset({protocol.FEATURE_PREFIX_CACHE})
    n1 = FakeNode("n1", alice)
    n1.conn.features = features
    d.on_node_ready(n1.conn)
    history = [(7 * i) % 300 + 1 for i in range(1000)]
    params = SamplingParams(max_tokens=10, temperature=0)

    async def ask(job_id: str, prompt: list[int]) -> None:
        await d.admit(job_id=job_id, client_id=client, api_key_id=None, model="m",
                      endpoint="chat.completions", prompt_ids=prompt, sampling=params,
                      stream=True)

    await ask("turn1", history)
    await _until(lambda: n1.jobs())
    # one token: a node's decode speed is observed from two or more, timed by the wall clock,
    # which a loaded machine stretches (n1 then looked slow enough to lose its own next turn)
    d.on_tokens(n1.conn, protocol.Tokens(job_id="turn1", attempt=1, index=0, token_ids=[11]))
    await d.on_done(n1.conn, n1.done(n1.jobs()[0], [11]))
    # a faster node joins: without the prefix cache it would win the next turn
    n2 = FakeNode("n2", bob, replace(PROFILE, memory_bandwidth_bytes_per_s=24e9))
    n2.conn.features = features
    d.on_node_ready(n2.conn)
    await ask("turn2", [*history, 11, 40, 41, 42])
    await _until(lambda: len(n1.jobs()) + len(n2.jobs()) == 2)
    assert [j["job_id"] for j in n1.jobs()] == ["turn1", "turn2"]
    # a new conversation has no home: the faster node takes it
    await ask("other", [3] * 1000)
    await _until(lambda: n2.jobs())
    assert n2.jobs()[0]["job_id"] == "other"
    await d.stop()


async def test_without_prefix_awareness_the_faster_node_takes_the_next_turn(world) -> None:
    store, ledger, client, (alice, bob) = world
    d = Dispatcher(store=store, ledger=ledger, models={"m": SPEC}, replica_id="r1")
    d.prefix_aware = False
    await d.start()
    n1 = FakeNode("n1", alice)
    n1.conn.features = frozenset({protocol.FEATURE_PREFIX_CACHE})
    d.on_node_ready(n1.conn)
    history = [(7 * i) % 300 + 1 for i in range(1000)]
    params = SamplingParams(max_tokens=10, temperature=0)
    await d.admit(job_id="turn1", client_id=client, api_key_id=None, model="m",
                  endpoint="chat.completions", prompt_ids=history, sampling=params, stream=True)
    await _until(lambda: n1.jobs())
    d.on_tokens(n1.conn, protocol.Tokens(job_id="turn1", attempt=1, index=0, token_ids=[11]))
    await d.on_done(n1.conn, n1.done(n1.jobs()[0], [11]))  # one token: no speed observed
    n2 = FakeNode("n2", bob, replace(PROFILE, memory_bandwidth_bytes_per_s=24e9))
    d.on_node_ready(n2.conn)
    await d.admit(job_id="turn2", client_id=client, api_key_id=None, model="m",
                  endpoint="chat.completions", prompt_ids=[*history, 11, 40],
                  sampling=params, stream=True)
    await _until(lambda: n2.jobs())
    assert n2.jobs()[0]["job_id"] == "turn2"
    await d.stop()


# ---- a chain when it is predicted faster (coordinator/chains.ChainRegistry.plan_for) ---------

FAST = replace(PROFILE, memory_bandwidth_bytes_per_s=200e9, peak_flops=2e13, network_rtt_s=1e-4)


def _stage_node(name: str, owner_id: str, first: int, end: int) -> FakeNode:
    node = FakeNode(name, owner_id, FAST)
    node.conn.models, node.conn.weights = (), {}
    node.conn.layer_ranges = {"m": (first, end)}
    return node


def _whole_over_chain(whole: FakeNode, parts: list[FakeNode]) -> float:
    """The best whole-model node's predicted token time over the chain's (the roofline)."""
    snaps = [p.conn.snapshot(0.0) for p in parts]
    plan = chains_planner.plan_chain(SPEC, snaps, context_tokens=3)
    assert plan is not None
    return chains_planner.whole_node_token_s(SPEC, whole.conn.snapshot(0.0), 3) / plan.token_s


@pytest.mark.parametrize(("whole_bandwidth", "when_faster", "to_chain"), [
    (1e9, True, True),  # the whole node ~50x slower than the chain: the chain
    (50e9, True, False),  # faster, but by less than the 20 % margin: the whole node
    (1e9, False, False),  # the setting off: the whole node, however slow
])
async def test_a_chain_serves_a_job_when_predicted_faster_by_the_margin(
        world, whole_bandwidth: float, when_faster: bool, to_chain: bool) -> None:
    store, ledger, client, (alice, bob) = world
    d = Dispatcher(store=store, ledger=ledger, models={"m": SPEC}, replica_id="r1")
    d.chains.when_faster = when_faster
    await d.start()
    whole = FakeNode("whole", alice, replace(PROFILE, memory_bandwidth_bytes_per_s=whole_bandwidth))
    parts = [_stage_node("a", bob, 0, 2), _stage_node("b", bob, 2, 4)]
    for n in (whole, *parts):
        d.on_node_ready(n.conn)
    ratio = _whole_over_chain(whole, parts)
    assert ratio > 1.2 if whole_bandwidth == 1e9 else 1.0 < ratio < 1.2
    job = await _admit(d, client)
    stage_sent = lambda: [m for m in parts[0].sent if m["type"] == "stage_forward"]  # noqa: E731
    await _until(lambda: bool(whole.jobs()) or bool(stage_sent()))
    if to_chain:
        assert job.chain is not None and not whole.jobs()
        assert stage_sent()[0]["token_ids"] == [5, 6, 7]
        assert [a.layers for a in job.attempts] == [(0, 2), (2, 4)]
    else:
        assert job.chain is None and not stage_sent()
        assert [j["job_id"] for j in whole.jobs()] == ["job_1"]
    await d.stop()

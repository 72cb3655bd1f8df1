"""Chains across coordinator replicas: stage nodes hosted by one replica serve a chain another
replica drives. Two (or three) dispatchers in one process share a store and ledger, their fleets
one in-process bus; each stage node is played here, and each host's socket reader passes the
node's answers to ``NodeRouter.route`` as api/node_ws.py does (so relayed ones cross the bus).

The stages compute a toy model whose next token depends on every position before it, and refuse
a step that does not continue their cache exactly: a chain whose caches were rebuilt wrongly, or
whose tokens repeat or skip, produces a different answer than the unsplit toy model.
"""

from __future__ import annotations

import asyncio
import json
import struct

import pytest
from test_dispatch import SPEC, _drain, _until

from sparecycles import limits, protocol
from sparecycles.coordinator.dispatch import Dispatcher
from sparecycles.coordinator.node_conn import NodeConn
from sparecycles.coordinator.replication import fleet as fleet_mod
from sparecycles.coordinator.replication.bus import MemoryBus
from sparecycles.coordinator.replication.fleet import (
    Fleet,
    RemoteNode,
    frame_type,
    pack_frame,
    unpack_frame,
)
from sparecycles.coordinator.router import NodeRouter
from sparecycles.identity import NodeIdentity
from sparecycles.ledger.pricing import ModelPrice
from sparecycles.scheduling import chains as planner
from sparecycles.types import AttemptOutcome, AvailabilityPolicy, DeviceProfile, SamplingParams

H = SPEC.hidden_size
PROMPT = [5, 6, 7]
PROFILE = DeviceProfile(device_class="laptop", cpu_cores=8, ram_bytes=16 << 30,
                        memory_bandwidth_bytes_per_s=20e9, peak_flops=2e11)


def toy_next(context: list[int]) -> int:
    """The unsplit toy model: the next token after ``context``."""
    return (sum((i + 1) * t for i, t in enumerate(context)) % 89) + 3


def _row(token: int, position: int) -> bytes:
    return struct.pack(f"<{H}f", float(token), float(position), *([0.0] * (H - 2)))


class Replica:
    def __init__(self, d: Dispatcher, f: Fleet) -> None:
        self.d, self.f = d, f
        self.router = NodeRouter(d, relay=f)

    async def stop(self) -> None:
        await self.f.stop()
        await self.d.stop()


class Stage:
    """A node holding layers ``[first, end)`` of the toy model (of the 4 of ``SPEC``), connected
    to ``replica``: the first stage embeds (token, position) rows, the last sums them into the
    next token. Its cache is the rows it has seen, per sequence."""

    def __init__(self, name: str, owner_id: str, first: int, end: int) -> None:
        self.identity = NodeIdentity.generate()
        self.first, self.end = first, end
        self.cache: dict[str, list[tuple[int, int]]] = {}
        self.forwards = 0
        self.replica: Replica | None = None
        self.conn = NodeConn(
            node_id=self.identity.node_id, owner_id=owner_id, name=name,
            public_key=self.identity.public_key_b64, profile=PROFILE,
            policy=AvailabilityPolicy(), models=(), weights={}, jobs_max=8,
            send_raw=self._receive, layer_ranges={"m": (first, end)})

    async def _receive(self, frame: str) -> None:
        msg = protocol.decode_coordinator_message(frame)
        if isinstance(msg, protocol.StageRelease):
            self.cache.pop(msg.sequence_id, None)
            return
        assert isinstance(msg, protocol.StageForward)
        self.forwards += 1
        self.answer(self.step(msg))

    def step(self, msg: protocol.StageForward) -> protocol.StageOutput:
        seen = self.cache.setdefault(msg.sequence_id, [])
        if msg.start != len(seen):
            return protocol.StageOutput(sequence_id=msg.sequence_id, step=msg.step,
                                        error=f"start {msg.start} after {len(seen)}")
        if msg.token_ids is not None:
            rows = [(t, msg.start + i) for i, t in enumerate(msg.token_ids)]
        else:
            assert msg.hidden is not None
            raw = msg.hidden.raw()
            rows = [(int(v[0]), int(v[1])) for v in
                    (struct.unpack_from("<2f", raw, k * H * 4) for k in range(msg.hidden.shape[0]))]
        seen.extend(rows)
        if self.end < SPEC.n_layers:
            data = b"".join(_row(t, p) for t, p in rows)
            hidden = protocol.Activation(dtype="float32", shape=(len(rows), H),
                                         data=protocol.b64(data))
            return protocol.StageOutput(sequence_id=msg.sequence_id, step=msg.step,
                                        hidden=hidden, busy_s=0.001)
        token = toy_next([t for t, _p in seen]) if msg.choose is not None else None
        return protocol.StageOutput(sequence_id=msg.sequence_id, step=msg.step, token=token,
                                    busy_s=0.001)

    def answer(self, out: protocol.StageOutput) -> None:
        assert self.replica is not None
        assert self.replica.router.route(self.conn, out, protocol.encode(out)) is None

    async def connect(self, replica: Replica, *others: Replica) -> None:
        """Its socket reaches ``replica``; wait until ``others`` see it."""
        self.replica = replica
        self.conn.start()
        replica.d.on_node_ready(self.conn)
        replica.f.local_up(self.conn)
        await _until(lambda: all(self.conn.node_id in o.d.remote for o in others))


@pytest.fixture
def fast_beats(monkeypatch):
    monkeypatch.setattr(fleet_mod, "beat_interval_s", 0.05)
    monkeypatch.setattr(fleet_mod, "replica_timeout_s", 0.5)


async def _replicas(world, *names: str) -> list[Replica]:
    store, ledger, *_ = world
    bus, out = MemoryBus(), []
    for name in names:
        d = Dispatcher(store=store, ledger=ledger, models={"m": SPEC}, replica_id=name,
                       token_gap_s=30, placement_wait_s=3)
        await d.start()
        f = Fleet(bus.connection(), name, d)  # its own connection: closed when it stops
        await f.start()
        out.append(Replica(d, f))
    return out


def _unsplit(n: int) -> list[int]:
    context = list(PROMPT)
    for _ in range(n):
        context.append(toy_next(context))
    return context[len(PROMPT):]


async def _admit(d: Dispatcher, client: str, job_id: str, max_tokens: int):
    return await d.admit(job_id=job_id, client_id=client, api_key_id=None, model="m",
                         endpoint="completions", prompt_ids=list(PROMPT),
                         sampling=SamplingParams(max_tokens=max_tokens, temperature=0),
                         stream=True)


def _tokens(job) -> list[int]:
    return [t for e in _drain(job) if e.kind == "tokens" for t in e.token_ids]


@pytest.mark.parametrize("form", [2, 1])
async def test_a_chain_runs_through_stages_of_two_replicas(world, fast_beats, monkeypatch, form
                                                           ) -> None:
    """Form 2: frames cross the bus as a header line and their own bytes; form 1: as replicas
    before it relayed them (and still read them), the frame inside one JSON object."""
    monkeypatch.setattr(fleet_mod, "relay_form", form)
    store, ledger, client, (alice, bob) = world
    ledger.set_price("m", ModelPrice(10_000_000, 30_000_000))  # a charge worth splitting
    r1, r2 = await _replicas(world, "r1", "r2")
    head, tail = Stage("head", alice, 0, 2), Stage("tail", bob, 2, 4)
    await head.connect(r1, r2)
    await tail.connect(r2, r1)
    await _until(lambda: r1.f.peer_forms.get(r2.f.me) == r2.f.peer_forms.get(r1.f.me) == form)
    remote = r1.d.remote[tail.conn.node_id]  # announced with its layers: a stage for r1 too
    assert isinstance(remote, RemoteNode) and remote.layer_ranges == {"m": (2, 4)}
    snap = remote.snapshot(0)
    assert snap.layer_ranges == {"m": (2, 4)} and snap.relayed and snap.models == ()
    assert planner.hop_s(SPEC, snap) > planner.hop_s(SPEC, r1.d.nodes[head.conn.node_id]
                                                      .snapshot(0))

    for owner, job_id in ((r1, "job_1"), (r2, "job_2")):  # a client on either replica
        job = await _admit(owner.d, client, job_id, 8)
        await _until(lambda job_id=job_id: store.get_job(job_id).state == "done")
        assert _tokens(job) == _unsplit(8)
        stages = store.attempts(job_id)
        assert sorted(a.node_id for a in stages) == sorted([head.conn.node_id,
                                                            tail.conn.node_id])
        assert all(a.outcome == "done" for a in stages)
        earned = ledger.job_money(job_id)["earnings"]
        a, b = earned[head.conn.node_id], earned[tail.conn.node_id]
        assert a > 0 and abs(a - b) <= 1, earned  # two layers each: equal shares
    # each host forgot the sequences it relayed once their owner released them
    await _until(lambda: not r1.f.stages and not r2.f.stages)
    assert not head.cache and not tail.cache
    assert not head.conn.jobs and not tail.conn.jobs
    assert ledger.check() == []
    for r in (r1, r2):
        await r.stop()


async def test_a_dead_host_replica_s_stage_is_repaired_and_the_answer_goes_on(world, fast_beats
                                                                             ) -> None:
    """r2 hosts the chain's second stage and dies mid-answer: r1 (the owner) repairs that stage
    on a spare hosted by r3, rebuilt from the inputs the lost stage had received; the answer is
    the unsplit one, no token repeated or lost, and the lost stage is not blamed."""
    store, ledger, client, (alice, bob) = world
    r1, r2, r3 = await _replicas(world, "r1", "r2", "r3")
    head, tail, spare = Stage("head", alice, 0, 2), Stage("tail", bob, 2, 4), \
        Stage("spare", bob, 2, 4)
    await head.connect(r1, r2, r3)
    await tail.connect(r2, r1, r3)
    spare.conn.draining = True  # kept out until the chain has started on the tail
    await spare.connect(r3, r1)

    held: list[protocol.StageOutput] = []
    answer = tail.answer

    def stall_after_four(out: protocol.StageOutput) -> None:
        if tail.forwards > 4:  # the host dies with this answer in flight
            held.append(out)
            return
        answer(out)

    tail.answer = stall_after_four  # type: ignore[method-assign]
    job = await _admit(r1.d, client, "job_1", 10)
    await _until(lambda: bool(held))
    assert len(job.generated) >= 3
    spare.conn.draining = False  # r3 says so at its next beat
    await r2.stop()  # r2 goes without a word: r1 hears its silence
    await _until(lambda: store.get_job("job_1").state == "done", timeout_s=10)
    assert _tokens(job) == _unsplit(10)
    attempts = {(a.node_id, a.outcome) for a in store.attempts("job_1")}
    assert attempts == {(head.conn.node_id, "done"), (tail.conn.node_id, "replica_lost"),
                        (spare.conn.node_id, "done")}
    assert tail.conn.node_id not in job.avoid_nodes  # not its fault: it may serve again
    await _until(lambda: not r3.f.stages and not spare.cache and not head.cache)
    assert ledger.check() == []
    for r in (r1, r3):
        await r.stop()


async def test_a_host_forgets_the_stages_of_a_dead_owner_and_tells_the_node(world, fast_beats
                                                                           ) -> None:
    _store, _ledger, client, (alice, bob) = world
    r1, r2 = await _replicas(world, "r1", "r2")
    head, tail = Stage("head", alice, 0, 2), Stage("tail", bob, 2, 4)
    await head.connect(r1, r2)
    await tail.connect(r2, r1)
    tail.answer = lambda out: None  # type: ignore[method-assign]  # the owner waits
    await _admit(r1.d, client, "job_1", 10)
    await _until(lambda: bool(r2.f.stages) and bool(tail.cache))
    assert tail.conn.jobs == set(r2.f.stages)  # the host counts the stage in its node's load
    await r1.stop()
    await _until(lambda: not r2.f.stages, timeout_s=5)
    await _until(lambda: not tail.cache)  # a stage_release went to the node
    assert not tail.conn.jobs
    await r2.stop()


async def test_an_answer_the_owner_cannot_read_fails_the_step_at_once(world, fast_beats) -> None:
    _store, _ledger, _client, (alice, _bob) = world
    r1, r2 = await _replicas(world, "r1", "r2")
    node = Stage("tail", alice, 2, 4)
    node.answer = lambda out: None  # type: ignore[method-assign]  # its host sends this:
    await node.connect(r2, r1)
    remote = r1.d.remote[node.conn.node_id]
    msg = protocol.StageForward(sequence_id="j.1", model="m", step=7, start=0, token_ids=[1])
    task = asyncio.get_running_loop().create_task(r1.d.chains.exchange(remote, msg))
    await _until(lambda: "j.1" in r2.f.stages)
    # a frame its host should never have passed on: an activation of the wrong size
    bad = json.dumps({"v": 1, "type": "stage_output", "sequence_id": "j.1", "step": 7,
                      "hidden": {"dtype": "float32", "shape": [1, 4], "data": "AAAA"}})
    r2.f._publish_frame(r1.f.me, "from_node", {"r": r2.f.me, "node": node.conn.node_id}, bad)
    with pytest.raises(Exception, match="invalid") as caught:
        await asyncio.wait_for(task, 5)
    assert caught.value.outcome is AttemptOutcome.PROTOCOL_GAP  # type: ignore[attr-defined]
    for r in (r1, r2):
        await r.stop()


def test_the_largest_frames_fit_one_bus_message() -> None:
    # an activation of the most bytes allowed, as the chain driver sends it to a stage
    cols = 1024
    rows = limits.activation_bytes_max // (cols * 4)
    act = protocol.Activation(dtype="float32", shape=(rows, cols),
                              data=protocol.b64(b"\1" * rows * cols * 4))
    forward = protocol.encode(protocol.StageForward(
        sequence_id="j" * 60 + ".1", model="m" * 200, step=2**40, start=4000, hidden=act,
        score=protocol.StageScore(offset=0, targets=[151_000] * limits.activation_positions_max,
                                  temperature=0.0)))
    header = {"r": "replica-" + "x" * 200, "node": "n" * 64}
    packed = pack_frame(header, forward)
    assert len(forward) <= limits.ws_message_bytes_max
    assert len(packed) <= limits.bus_message_bytes_max
    assert unpack_frame(packed) == (header, forward)  # the frame as it was, not re-escaped
    assert frame_type(forward) == "stage_forward"
    # the largest frame a node may send at all, with the longest header, still fits
    assert (limits.ws_message_bytes_max + limits.bus_header_bytes_max + 1
            <= limits.bus_message_bytes_max)
    # the older form (the frame as a JSON string inside the header) is still read
    old = json.dumps({"r": "a", "node": "n", "frame": forward}).encode()
    assert unpack_frame(old) == ({"r": "a", "node": "n", "frame": forward}, forward)


async def test_a_frame_too_large_for_the_bus_is_not_sent(world) -> None:
    _store, _ledger, _client, (alice, _bob) = world
    (r1,) = await _replicas(world, "r1")
    node = RemoteNode(node_id="n", owner_id=alice, name="n", public_key="", profile=PROFILE,
                      models=(), weights={}, jobs_max=8, host="r2", fleet=r1.f)
    assert node.send(json.dumps({"v": 1, "type": "cancel", "job_id": "j", "attempt": 1}))
    assert not node.send("x" * limits.bus_message_bytes_max)
    await r1.stop()

"""Disaggregated prefill/decode in dispatch (coordinator/handoff.py), with in-memory twins.

The test plays both nodes: the sender's first token, KV chunks and ``done``; the receiver's
tokens and ``done``. Also the wire's checks of a chunk and the hand-off's checks of its layout.
"""

from __future__ import annotations

import itertools

import pytest
from test_dispatch import SPEC, FakeNode, _admit, _drain, _until

from sparecycles import limits, protocol
from sparecycles.coordinator.dispatch import Dispatcher
from sparecycles.coordinator.handoff import KvHandoff, chunk_problem, pick_receiver
from sparecycles.errors import ProtocolError
from sparecycles.ledger.pricing import ModelPrice

LAYOUT = protocol.KvLayout(layers=SPEC.n_layers, kv_heads=SPEC.n_kv_heads,
                           head_dim=SPEC.head_dim, positions=3, dtype="float32")


def _chunks(job_id: str, attempt: int, layout: protocol.KvLayout = LAYOUT
            ) -> list[protocol.KvChunk]:
    out = []
    for index, (_layer, _start, n) in enumerate(protocol.kv_chunks(layout)):
        data = protocol.b64(bytes(n * layout.row_bytes))
        out.append(protocol.KvChunk(job_id=job_id, attempt=attempt, index=index, layout=layout,
                                    keys=data, values=data))
    return out


def test_a_chunk_whose_bytes_are_not_its_shape_is_refused_on_decode() -> None:
    good = _chunks("j", 1)[0]
    raw = protocol.encode(good)
    assert protocol.decode_node_message(raw) == good
    short = good.model_copy(update={"keys": protocol.b64(bytes(LAYOUT.row_bytes * 3 - 4))})
    with pytest.raises(ProtocolError, match="base64"):
        protocol.decode_node_message(protocol.encode(short))
    beyond = good.model_copy(update={"index": len(protocol.kv_chunks(LAYOUT))})
    with pytest.raises(ProtocolError, match="chunk"):
        protocol.decode_node_message(protocol.encode(beyond))
    with pytest.raises(ValueError, match="exceeds"):
        protocol.KvLayout(layers=64, kv_heads=8, head_dim=128, dtype="float32",
                          positions=limits.kv_handoff_bytes_max // (64 * 8 * 128 * 4))


def test_a_long_cache_travels_in_chunks_under_the_bound_covering_every_position() -> None:
    layout = protocol.KvLayout(layers=2, kv_heads=8, head_dim=128, positions=5000,
                               dtype="float16")
    plan = protocol.kv_chunks(layout)
    assert all(2 * n * layout.row_bytes <= limits.kv_chunk_bytes_max for _, _, n in plan)
    for layer in range(2):
        spans = [(start, n) for lay, start, n in plan if lay == layer]
        assert spans[0][0] == 0 and sum(n for _, n in spans) == 5000
        assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(spans))


def test_the_hand_off_checks_each_chunk_against_the_model_and_the_prompt() -> None:
    chunks = _chunks("j", 1)
    h = KvHandoff("receiver", 1, positions=3)
    assert chunk_problem(chunks[0], SPEC, 3, None, 0) is None
    assert "positions" in (chunk_problem(chunks[0], SPEC, 4, None, 0) or "")
    other = _chunks("j", 1, LAYOUT.model_copy(update={"layers": 5}))[0]
    assert "layers" in (chunk_problem(other, SPEC, 3, None, 0) or "")
    assert "next" in (chunk_problem(chunks[1], SPEC, 3, None, 0) or "")
    held = sum(h.add(c, SPEC, 0) for c in chunks)
    assert h.complete and held == LAYOUT.total_bytes == h.held_bytes
    h2 = KvHandoff("receiver", 1, positions=3)
    h2.add(chunks[0], SPEC, 0)
    assert h2.add(chunks[2], SPEC, 0) == -2 * 3 * LAYOUT.row_bytes  # out of order: dropped
    assert h2.error and not h2.complete and h2.held_bytes == 0 and h2.chunks == []
    full = KvHandoff("receiver", 1, positions=3)
    assert full.add(chunks[0], SPEC, 512 * 1024 * 1024) == 0 and "too many" in (full.error or "")


def test_always_picks_the_least_busy_other_node_with_a_free_slot() -> None:
    nodes = [("a", 0, 8), ("b", 2, 8), ("c", 1, 8), ("d", 0, 0)]
    assert pick_receiver(nodes, "a", set()) == "c"
    assert pick_receiver(nodes, "b", set()) == "a"
    assert pick_receiver(nodes, "a", {"c"}) == "b"
    assert pick_receiver([("a", 0, 8)], "a", set()) is None


async def _two_nodes(world, disagg: str = "always"):
    store, ledger, _client, (alice, bob) = world
    ledger.set_price("m", ModelPrice(10_000_000, 30_000_000))  # whole micros per token
    d = Dispatcher(store=store, ledger=ledger, models={"m": SPEC}, replica_id="r1",
                   disagg=disagg)
    await d.start()
    nodes = [FakeNode("n1", alice), FakeNode("n2", bob)]
    for n in nodes:
        n.conn.features = frozenset({protocol.FEATURE_KV_HANDOFF})
        d.on_node_ready(n.conn)
    return d, nodes


async def _prefilled(d, nodes, client, *, chunks: list[protocol.KvChunk] | None = None):
    """Admit a job, play its sender: the first token (1), its cache, its done."""
    job = await _admit(d, client, max_tokens=4)
    await _until(lambda: any(n.jobs() for n in nodes))
    sender = next(n for n in nodes if n.jobs())
    receiver = next(n for n in nodes if n is not sender)
    first = sender.jobs()[0]
    assert first["kv_export"] and first["sampling"]["max_tokens"] == 1
    d.on_tokens(sender.conn, protocol.Tokens(job_id="job_1", attempt=1, index=0, token_ids=[1]))
    for c in _chunks("job_1", 1) if chunks is None else chunks:
        d.on_kv_chunk(sender.conn, c)
    d.done_received(sender.conn, sender.done(first, [1], "length"))
    return job, sender, receiver


async def test_the_receiver_decodes_from_the_cache_and_each_node_is_paid_its_work(world
                                                                                 ) -> None:
    store, ledger, client, _ = world
    d, nodes = await _two_nodes(world)
    job, sender, receiver = await _prefilled(d, nodes, client)
    await _until(lambda: receiver.jobs())
    second = receiver.jobs()[0]
    assert second["attempt"] == 2 and second["prompt_token_ids"] == [5, 6, 7, 1]
    assert second["kv_import"]["positions"] == 3 and not second["kv_export"]
    await _until(lambda: len([m for m in receiver.sent if m["type"] == "kv_chunk"]) == 4)
    relayed = [m for m in receiver.sent if m["type"] == "kv_chunk"]
    assert [m["attempt"] for m in relayed] == [2] * 4 and [m["index"] for m in relayed] == [0, 1,
                                                                                          2, 3]
    assert d.kv_held_bytes == 0 and d.handoffs == {"started": 1, "sent": 1, "failed": 0}
    d.on_tokens(receiver.conn, protocol.Tokens(job_id="job_1", attempt=2, index=0,
                                               token_ids=[2, 3, 4]))
    done = receiver.done(second, [2, 3, 4], "length")
    done = done.model_copy(update={"metering": done.metering.model_copy(
        update={"prompt_tokens": 1})})  # what it prefilled: its signature covers 4; re-sign
    payload = protocol.result_payload(
        job_id="job_1", attempt=2, weights_sha256=SPEC.weights_sha256,
        prompt_sha256=second["prompt_sha256"], output_sha256=done.output_sha256,
        finish_reason="length", metering=done.metering)
    await d.on_done(receiver.conn, done.model_copy(update={
        "signature": receiver.identity.sign(payload)}))
    streamed = [t for e in _drain(job) if e.kind == "tokens" for t in e.token_ids]
    assert streamed == [1, 2, 3, 4]
    await _until(lambda: store.get_job("job_1").state == "done")
    attempts = store.attempts("job_1")
    assert [(a.outcome, a.completion_tokens) for a in attempts] == [("done", 1), ("done", 3)]
    money = ledger.job_money("job_1")
    s_earned = money["earnings"][sender.conn.node_id]
    r_earned = money["earnings"][receiver.conn.node_id]
    price = ledger.prices().price_of("m")
    w_s = 3 * price.input_micros_per_mtok + 1 * price.output_micros_per_mtok
    w_r = 1 * price.input_micros_per_mtok + 3 * price.output_micros_per_mtok
    pool = s_earned + r_earned
    assert abs(s_earned - pool * w_s / (w_s + w_r)) <= 1 and pool > 0
    assert ledger.check() == []
    await d.stop()


async def test_a_refused_cache_puts_the_job_back_with_its_first_token(world) -> None:
    store, ledger, client, _ = world
    d, nodes = await _two_nodes(world)
    wrong = _chunks("job_1", 1, LAYOUT.model_copy(update={"positions": 2}))
    job, sender, receiver = await _prefilled(d, nodes, client, chunks=wrong)
    await _until(lambda: len(sender.jobs()) + len(receiver.jobs()) == 2)
    node = next(n for n in nodes if len(n.jobs()) == 2 or (n is receiver and n.jobs()))
    second = node.jobs()[-1]
    assert second["attempt"] == 2 and second["prompt_token_ids"] == [5, 6, 7, 1]
    assert second["kv_import"] is None and second["resumed_tokens"] == 1
    assert not any(m["type"] == "kv_chunk" for n in nodes for m in n.sent)
    assert d.kv_held_bytes == 0 and d.handoffs["failed"] == 1
    d.on_tokens(node.conn, protocol.Tokens(job_id="job_1", attempt=2, index=0,
                                           token_ids=[2, 3, 4]))
    await d.on_done(node.conn, node.done(second, [2, 3, 4], "length"))
    assert [t for e in _drain(job) if e.kind == "tokens" for t in e.token_ids] == [1, 2, 3, 4]
    await _until(lambda: store.get_job("job_1").state == "done")
    assert ledger.check() == []
    await d.stop()


async def test_a_receiver_gone_before_the_cache_is_ready_leaves_the_job_to_the_queue(world
                                                                                    ) -> None:
    store, ledger, client, _ = world
    d, nodes = await _two_nodes(world)
    job = await _admit(d, client, max_tokens=4)
    await _until(lambda: any(n.jobs() for n in nodes))
    sender = next(n for n in nodes if n.jobs())
    receiver = next(n for n in nodes if n is not sender)
    await d.on_node_lost(receiver.conn)
    first = sender.jobs()[0]
    d.on_tokens(sender.conn, protocol.Tokens(job_id="job_1", attempt=1, index=0, token_ids=[1]))
    for c in _chunks("job_1", 1):
        d.on_kv_chunk(sender.conn, c)
    assert d.kv_held_bytes == LAYOUT.total_bytes
    d.done_received(sender.conn, sender.done(first, [1], "length"))
    await _until(lambda: len(sender.jobs()) == 2)  # back on the sender, as a resumed job
    second = sender.jobs()[1]
    assert second["prompt_token_ids"] == [5, 6, 7, 1] and second["kv_import"] is None
    assert d.kv_held_bytes == 0 and d.handoffs["failed"] == 1
    d.on_tokens(sender.conn, protocol.Tokens(job_id="job_1", attempt=2, index=0,
                                             token_ids=[2, 3, 4]))
    await d.on_done(sender.conn, sender.done(second, [2, 3, 4], "length"))
    assert [t for e in _drain(job) if e.kind == "tokens" for t in e.token_ids] == [1, 2, 3, 4]
    await _until(lambda: store.get_job("job_1").state == "done")
    assert ledger.check() == []
    await d.stop()


async def test_a_sender_lost_mid_prefill_resumes_the_job_as_any(world) -> None:
    _store, _ledger, client, _ = world
    d, nodes = await _two_nodes(world)
    await _admit(d, client, max_tokens=4)
    await _until(lambda: any(n.jobs() for n in nodes))
    sender = next(n for n in nodes if n.jobs())
    other = next(n for n in nodes if n is not sender)
    d.on_kv_chunk(sender.conn, _chunks("job_1", 1)[0])
    await d.on_node_lost(sender.conn)
    await _until(lambda: other.jobs())
    again = other.jobs()[0]
    assert again["prompt_token_ids"] == [5, 6, 7] and not again["kv_export"]  # no partner left
    assert d.kv_held_bytes == 0 and d.handoffs["failed"] == 1
    await d.stop()


async def test_off_never_hands_off(world) -> None:
    _store, _ledger, client, _ = world
    d, nodes = await _two_nodes(world, disagg="off")
    await _admit(d, client, max_tokens=4)
    await _until(lambda: any(n.jobs() for n in nodes))
    job = next(n for n in nodes if n.jobs()).jobs()[0]
    assert not job["kv_export"] and job["sampling"]["max_tokens"] == 4
    await d.stop()

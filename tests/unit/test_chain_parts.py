"""Chains on hand-built states: the planner (pure), the split of the charge by stage, the
activation's bounds on the wire, and the inputs a replacement stage is rebuilt from."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from sparecycles import limits, protocol
from sparecycles.coordinator.chains import merged_inputs
from sparecycles.errors import ProtocolError
from sparecycles.ledger.pricing import ModelPrice, PayoutTerms, WorkShare, split_charge
from sparecycles.scheduling import chains
from sparecycles.scheduling.presets import DEVICE_PRESETS, MODEL_PRESETS
from sparecycles.types import DeviceProfile, NodeSnapshot

MODEL = MODEL_PRESETS["llama-3-8b-q4"]
L = MODEL.n_layers
GPU = DEVICE_PRESETS["gaming-pc"]
CPU = DEVICE_PRESETS["laptop-cpu"]


def stage(node_id: str, first: int, end: int, profile: DeviceProfile = GPU,
          **kw: Any) -> NodeSnapshot:
    return NodeSnapshot(node_id=node_id, owner_id="o-" + node_id, profile=profile, models=(),
                        layer_ranges={MODEL.name: (first, end)}, **kw)


def ids(plan: chains.ChainPlan | None) -> list[str]:
    assert plan is not None
    return [s.node_id for s in plan.stages]


def test_a_chain_covers_every_layer_end_to_start() -> None:
    nodes = [stage("a", 0, 10), stage("b", 10, 20), stage("c", 20, L), stage("x", 5, 12)]
    plan = chains.plan_chain(MODEL, nodes, context_tokens=500)
    assert ids(plan) == ["a", "b", "c"]
    assert [(s.first, s.end) for s in plan.stages] == [(0, 10), (10, 20), (20, L)]


def test_no_chain_when_a_layer_is_missing_or_its_only_node_is_avoided() -> None:
    assert chains.plan_chain(MODEL, [stage("a", 0, 10), stage("c", 11, L)],
                             context_tokens=500) is None
    nodes = [stage("a", 0, 10), stage("b", 10, L)]
    assert chains.plan_chain(MODEL, nodes, context_tokens=500, avoid={"b"}) is None
    busy = [stage("a", 0, 10), stage("b", 10, L, active_jobs=8, jobs_max=8)]
    assert chains.plan_chain(MODEL, busy, context_tokens=500) is None


def test_the_faster_stage_wins_and_fewer_hops_beat_more() -> None:
    nodes = [stage("slow", 0, 16, CPU), stage("fast", 0, 16, GPU), stage("b", 16, L)]
    assert ids(chains.plan_chain(MODEL, nodes, context_tokens=500)) == ["fast", "b"]
    # the same layers as one stage or two: the extra hop makes two slower
    two = [stage("a", 0, 16), stage("b", 16, L), stage("a1", 0, 8), stage("a2", 8, 16)]
    assert ids(chains.plan_chain(MODEL, two, context_tokens=500)) == ["a", "b"]


def test_a_chain_token_time_is_its_stages_plus_hops() -> None:
    nodes = [stage("a", 0, 16), stage("b", 16, L)]
    plan = chains.plan_chain(MODEL, nodes, context_tokens=500)
    assert plan is not None
    hop = chains.hop_s(MODEL, nodes[0])
    rtt = GPU.network_rtt_s or 0.02
    assert hop == pytest.approx(rtt + 2 * MODEL.hidden_size * 4 / 12.5e6)
    step_a = chains.stage_step_s(MODEL, nodes[0], 0, 16, 500)
    assert plan.token_s == pytest.approx(step_a + chains.stage_step_s(MODEL, nodes[1], 16, L, 500)
                                         + 2 * hop)
    # each stage reads its share of the weights: about half the whole model's step each
    whole = chains.whole_node_token_s(MODEL, stage("w", 0, L), 500)
    assert 0.4 * whole < step_a < 0.6 * whole
    assert not chains.chain_is_faster(plan, MODEL, [stage("w", 0, L)], 500)
    assert chains.chain_is_faster(plan, MODEL, [], 500)


def test_a_repair_plans_only_the_lost_range() -> None:
    nodes = [stage("a", 0, 10), stage("b", 10, 20), stage("b1", 10, 15), stage("b2", 15, 20),
             stage("c", 20, L)]
    plan = chains.plan_segment(MODEL, nodes, 10, 20, context_tokens=900, avoid={"b"})
    assert ids(plan) == ["b1", "b2"]


def test_stage_work_is_its_share_of_the_layers() -> None:
    assert chains.stage_work_ppm(MODEL, 0, L) == 1_000_000
    assert chains.stage_work_ppm(MODEL, 0, L // 4) == 250_000


# ---- money -----------------------------------------------------------------------------------

PRICE = ModelPrice(10_000_000, 30_000_000)


def test_the_owners_pool_is_split_by_each_stage_work() -> None:
    shares = [WorkShare("o1", "n1", "pc", 10, 20, work_ppm=250_000),
              WorkShare("o2", "n2", "pc", 10, 20, work_ppm=500_000),
              WorkShare("o3", "n3", "pc", 10, 20, work_ppm=250_000)]
    split = split_charge(1_000_000, PRICE, PayoutTerms(), shares)
    got = {e.node_id: e.amount_micros for e in split.earnings}
    assert got == {"n1": 200_000, "n2": 400_000, "n3": 200_000}
    assert sum(got.values()) + split.fee_micros == 1_000_000


def test_whole_model_shares_split_exactly_as_before() -> None:
    shares = [WorkShare("o1", "n1", "pc", 7, 3), WorkShare("o2", "n2", "pc", 9, 11)]
    new = split_charge(999_999, PRICE, PayoutTerms(), shares)
    # the same weights without the factor of a million: identical floors
    w = [7 * 10_000_000 + 3 * 30_000_000, 9 * 10_000_000 + 11 * 30_000_000]
    pool = 999_999 * 800_000 // 1_000_000
    assert [e.amount_micros for e in new.earnings] == [pool * x // sum(w) for x in w]


def test_a_replaced_stage_is_paid_for_the_tokens_it_ran() -> None:
    shares = [WorkShare("o1", "n1", "pc", 10, 30, work_ppm=500_000),
              WorkShare("o2", "n2", "pc", 10, 12, work_ppm=500_000),  # left after 12 tokens
              WorkShare("o3", "n3", "pc", 22, 18, work_ppm=500_000)]  # its replacement
    split = split_charge(1_000_000, PRICE, PayoutTerms(), shares)
    got = {e.node_id: e.amount_micros for e in split.earnings}
    assert got["n1"] > got["n3"] > got["n2"] > 0


@pytest.mark.parametrize("ppm", [-1, 1_000_001, 0.5])
def test_work_outside_the_whole_is_refused(ppm: Any) -> None:
    with pytest.raises(Exception, match="work_ppm"):
        split_charge(100, PRICE, PayoutTerms(), [WorkShare("o", "n", "pc", 1, 1, work_ppm=ppm)])


# ---- activations on the wire -----------------------------------------------------------------


def activation(rows: int, cols: int, fill: bytes = b"\0") -> protocol.Activation:
    return protocol.Activation(dtype="float32", shape=(rows, cols),
                               data=protocol.b64(fill * (rows * cols * 4)))


def output(**hidden: Any) -> str:
    return ('{"type":"stage_output","sequence_id":"s","step":1,"hidden":'
            + protocol.Activation.model_construct(**hidden).model_dump_json() + "}")


def test_an_activation_round_trips_and_its_size_is_checked() -> None:
    good = activation(3, 8)
    msg = protocol.decode_node_message(
        protocol.encode(protocol.StageOutput(sequence_id="s", step=1, hidden=good)))
    assert isinstance(msg, protocol.StageOutput) and msg.hidden == good
    assert len(msg.hidden.raw()) == 3 * 8 * 4
    short = protocol.b64(b"\0" * (3 * 8 * 4 - 4))
    with pytest.raises(ProtocolError, match="base64"):
        protocol.decode_node_message(output(dtype="float32", shape=(3, 8), data=short))
    with pytest.raises(ProtocolError):
        protocol.decode_node_message(output(dtype="int8", shape=(3, 8), data=short))
    with pytest.raises(ProtocolError, match="exceeds"):  # each bound alone is kept
        protocol.decode_node_message(output(dtype="float32",
                                            shape=(limits.activation_positions_max, 64), data=""))
    with pytest.raises(ProtocolError, match="out of bounds"):
        protocol.decode_node_message(output(dtype="float32", shape=(0, 8), data=""))


def test_a_stage_offer_names_a_real_range() -> None:
    assert protocol.ModelOffer(name="m", weights_sha256="0" * 64, layers=(0, 4)).layers == (0, 4)
    with pytest.raises(ValueError):
        protocol.ModelOffer(name="m", weights_sha256="0" * 64, layers=(4, 4))


def test_a_replacement_is_rebuilt_from_few_messages_in_order() -> None:
    a, b = activation(2, 8, b"\1"), activation(1, 8, b"\2")
    merged = merged_inputs([a, b, b])
    assert len(merged) == 1
    m = merged[0]
    assert isinstance(m, protocol.Activation) and m.shape == (4, 8)
    assert m.raw() == a.raw() + b.raw() + b.raw()
    assert merged_inputs([[1, 2], [3], [4]]) == [[1, 2, 3, 4]]
    big = activation(limits.activation_positions_max, 8)
    assert len(merged_inputs([big, b, b])) == 2  # one message cannot hold them all


def test_snapshots_keep_the_ranges() -> None:
    snap = stage("a", 0, 4)
    assert replace(snap, active_jobs=1).layer_ranges == {MODEL.name: (0, 4)}

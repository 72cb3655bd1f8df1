"""Chains in the simulator (sim/chains.py): placed by the production planner, repaired when a
stage's node leaves, and the two baselines (a fixed chain, Petals' rule) behaving as described."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sparecycles.errors import InvalidRequest
from sparecycles.scheduling import chains as planner
from sparecycles.scheduling.presets import device_preset, model_preset
from sparecycles.sim import SimConfig, load_fleet, parse_fleet, simulate, summarize
from sparecycles.sim.chains import ChainSimulation
from sparecycles.sim.fleet_file import FleetSpec
from sparecycles.sim.loop import DONE, FAILED
from sparecycles.sim.node import SimNode
from sparecycles.sim.trace import Trace
from sparecycles.types import NodeSnapshot

FLEETS = Path(__file__).resolve().parents[2] / "examples" / "fleets"
EPOCH = 1_700_158_546.0
MODEL = "llama-3-70b-q4"  # 80 layers, ~40 GB: no device here holds it whole


def chain_fleet(*classes: tuple[str, str, list[list[int]], int]) -> FleetSpec:
    """Always-on classes of (name, device, layer ranges, count)."""
    return parse_fleet({
        "fleet": {"name": "t"},
        "class": [{"name": name, "device": device, "count": count, "models": [MODEL],
                   "layers": layers, "jobs_max": 4,
                   "availability": {"kind": "always", "drain_grace_s": 1}}
                  for name, device, layers, count in classes],
    })  # fmt: skip


def requests(n: int, prompt: int = 200, output: int = 40, every_s: float = 1.0) -> Trace:
    return Trace("t", EPOCH, np.arange(n) * every_s, np.full(n, prompt), np.full(n, output))


def sim_of(fleet: FleetSpec, trace: Trace, policy: str, seed: int = 1) -> ChainSimulation:
    return ChainSimulation(trace, fleet, SimConfig(policy=policy, seed=seed))


def leaves_at(sim: ChainSimulation, node_id: str, t: float) -> None:
    """The node is up from the start and leaves for good at ``t``."""
    sim.by_id[node_id].intervals = ((-1e6, t),)


def stays(sim: ChainSimulation, table: dict[str, float]) -> None:
    """What the coordinator predicts of each node's stay (inf for those not named)."""
    def stay_of(node: SimNode, _t: float) -> float:
        return table.get(node.node_id, math.inf) if node.accepting else 0.0

    sim.stay_of = stay_of  # type: ignore[method-assign]


QUARTERS = [("a", "gaming-pc", [[0, 20]], 1), ("b", "gaming-pc", [[20, 40]], 1),
            ("c", "gaming-pc", [[40, 60]], 1), ("d", "gaming-pc", [[60, 80]], 1)]


@pytest.mark.parametrize("policy", ["fastest", "fixed-chain", "petals"])
def test_a_chain_forms_when_no_node_holds_the_model(policy: str) -> None:
    fleet = chain_fleet(*QUARTERS)
    trace = requests(3)
    sim = sim_of(fleet, trace, policy)
    result = sim.run()
    assert (result.status == DONE).all()
    for req, run in sim.runs.items():
        assert [(s.first, s.end) for s in run.stages] == [(0, 20), (20, 40), (40, 60), (60, 80)]
        assert run.done == trace.output_tokens[req]
    assert result.extra["repairs"] == 0 and result.extra["stage_losses"] == 0
    assert result.charges_micros > 0
    # every stage's owner earned, each by its share of the work (equal ranges: equal shares)
    earned = result.node_earned_micros
    assert (earned > 0).all() and earned.max() - earned.min() <= 4


def test_a_whole_model_fleet_refuses_the_chain_baselines() -> None:
    fleet = load_fleet(FLEETS / "churny.toml")
    with pytest.raises(ValueError, match="layer ranges"):
        simulate(requests(1), fleet, SimConfig(policy="petals"))


@pytest.mark.parametrize("policy", ["fastest", "petals"])
def test_a_departure_mid_answer_is_repaired_and_the_answer_completes(policy: str) -> None:
    fleet = chain_fleet(*QUARTERS[:1], ("mid", "gaming-pc", [[20, 40]], 2), *QUARTERS[2:])
    trace = requests(1, prompt=300, output=300)
    sim = sim_of(fleet, trace, policy)
    stays(sim, {})
    leaves_at(sim, "mid-0", 20.0)  # the tie goes to mid-0; ~90 s of decoding remain at 20 s
    result = sim.run()
    run = sim.runs[0]
    assert result.status[0] == DONE
    assert result.extra["stage_losses"] == 1 and result.extra["repairs"] == 1
    assert result.interrupted[0] == 1
    assert run.done == 300  # the right token count: none lost, none repeated
    assert [s.node.node_id for s in run.stages] == ["a-0", "mid-1", "c-0", "d-0"]
    assert sim.first[0] < 20.0 < sim.end[0]
    # the lost stage was paid for the tokens it processed, its replacement for the rest
    assert result.node_earned_micros[sim.by_id["mid-0"].idx] > 0
    assert result.node_earned_micros[sim.by_id["mid-1"].idx] > 0


def test_a_chain_that_cannot_be_repaired_fails_the_request() -> None:
    fleet = chain_fleet(*QUARTERS)
    sim = sim_of(fleet, requests(1, prompt=300, output=300), "fastest")
    leaves_at(sim, "b-0", 20.0)
    result = sim.run()
    assert result.status[0] == FAILED
    assert result.extra["repair_failed"] == 1 and result.extra["repairs"] == 0
    assert result.charges_micros == 0 and result.node_earned_micros.sum() == 0


def test_the_fixed_chain_suffers_when_its_stage_leaves() -> None:
    # layers 20-40: one node holding them all (the planner's pick: one stage, one hop fewer)
    # and two holding halves; when the first leaves, only a node of the same layers would do
    fleet = chain_fleet(*QUARTERS[:1], ("mid", "gaming-pc", [[20, 40]], 1),
                        ("half", "laptop", [[20, 30], [30, 40]], 2), *QUARTERS[2:])
    trace = requests(3, prompt=300, output=300, every_s=30.0)
    out = {}
    for policy in ("fastest", "fixed-chain", "petals"):
        sim = sim_of(fleet, trace, policy)
        stays(sim, {})
        leaves_at(sim, "mid-0", 20.0)
        out[policy] = (sim.run(), sim)
    fixed = out["fixed-chain"][0]
    assert fixed.status[0] == FAILED and fixed.extra["repair_failed"] == 1
    assert (fixed.status[1:] == FAILED).all()  # the chain stays broken: later requests wait, 503
    for policy in ("fastest", "petals"):
        result, sim = out[policy]
        assert (result.status == DONE).all(), policy
        assert result.extra["repairs"] == 1
        assert [s.node.node_id for s in sim.runs[0].stages] == ["a-0", "half-0", "half-1",
                                                                 "c-0", "d-0"]


def test_petals_rule_ignores_departure_prediction() -> None:
    # layers 20-40 on a fast node predicted to leave in 5 s and on a slower one that stays;
    # the request takes a minute or more: ours avoids the fast node, Petals' rule does not
    fleet = chain_fleet(*QUARTERS[:1], ("fast", "gaming-pc-4090", [[20, 40]], 1),
                        ("slow", "gaming-pc", [[20, 40]], 1), *QUARTERS[2:])
    trace = requests(1, prompt=300, output=200)
    chosen = {}
    for policy in ("fastest", "petals"):
        sim = sim_of(fleet, trace, policy)
        stays(sim, {"fast-0": 5.0})
        assert sim.run().status[0] == DONE  # nobody actually leaves
        chosen[policy] = sim.runs[0].stages[1].node.node_id
    assert chosen == {"fastest": "slow-0", "petals": "fast-0"}


def test_the_planner_weighs_stays_and_relaxes_when_it_must() -> None:
    spec = model_preset(MODEL)
    pc, fast = device_preset("gaming-pc"), device_preset("gaming-pc-4090")

    def node(node_id: str, profile: Any, rng: tuple[int, int], stay: float) -> NodeSnapshot:
        return NodeSnapshot(node_id, "o-" + node_id, profile, (), expected_stay_s=stay,
                            layer_ranges={MODEL: rng})

    base = [node("a", pc, (0, 40), math.inf), node("c", pc, (60, 80), math.inf)]
    risky, safe = node("b1", fast, (40, 60), 5.0), node("b2", pc, (40, 60), math.inf)
    plain = planner.plan_chain(spec, [*base, risky, safe], context_tokens=500)
    assert plain is not None and plain.stages[1].node_id == "b1"  # the faster, blind to stays
    aware = planner.plan_chain_for_job(spec, [*base, risky, safe], context_tokens=500,
                                          tokens_left=200)
    assert aware is not None and aware.stages[1].node_id == "b2"
    alone = planner.plan_chain_for_job(spec, [*base, risky], context_tokens=500,
                                          tokens_left=200)
    assert alone is not None and alone.stages[1].node_id == "b1"  # a risky chain beats none


def test_same_seed_same_chains() -> None:
    data = tomllib.loads((FLEETS / "consumer16.toml").read_text())
    for c in data["class"]:  # the churny example's home machines: departures mid-answer
        c["count"] = 12
        c["availability"] = {"kind": "weibull", "up_shape": 0.5, "up_scale_h": 0.1,
                             "down_shape": 0.6, "down_scale_h": 0.1, "drain_grace_s": 5}
    fleet = parse_fleet(data)
    rng = np.random.default_rng(0)
    n = 40
    trace = Trace("t", EPOCH, np.sort(rng.uniform(0, 600, n)), rng.integers(50, 400, n),
                  rng.integers(10, 200, n))
    losses = 0.0
    for policy in ("fastest", "petals", "fixed-chain"):
        a = simulate(trace, fleet, SimConfig(policy=policy, seed=5))
        b = simulate(trace, fleet, SimConfig(policy=policy, seed=5))
        for name in ("first_token", "end", "status", "interrupted", "node_busy_s",
                     "node_earned_micros"):  # fmt: skip
            assert np.array_equal(getattr(a, name), getattr(b, name), equal_nan=True), name
        assert a.extra == b.extra and a.events == b.events
        assert summarize(a).completed > 0
        losses += a.extra["stage_losses"]
    assert losses > 0  # departures mid-answer happened, and replayed the same


def test_layer_ranges_are_checked() -> None:
    def fleet(**kw: Any) -> dict[str, Any]:
        cls = {"name": "x", "device": "gaming-pc", "count": 1, "models": [MODEL],
               "layers": [[0, 20]], **kw}
        return {"class": [cls]}

    parse_fleet(fleet())
    with pytest.raises(InvalidRequest, match="do not fit"):
        parse_fleet(fleet(layers=[[0, 40]]))  # 20 GB on a 12 GB card
    with pytest.raises(InvalidRequest, match="outside"):
        parse_fleet(fleet(layers=[[60, 90]]))
    with pytest.raises(InvalidRequest, match="exactly one model"):
        parse_fleet(fleet(models=[MODEL, "llama-3-8b-q4"]))
    mixed = fleet()
    mixed["class"].append({"name": "y", "device": "gaming-pc", "count": 1,
                           "models": ["llama-3-8b-q4"]})
    with pytest.raises(InvalidRequest, match="one model in every class"):
        parse_fleet(mixed)
    assert load_fleet(FLEETS / "consumer16.toml").chained


def test_the_job_planner_weighs_a_stage_s_prefill_backlog() -> None:
    spec = model_preset(MODEL)
    pc = device_preset("gaming-pc")

    def node(node_id: str, rng: tuple[int, int], backlog_s: float = 0.0) -> NodeSnapshot:
        return NodeSnapshot(node_id, "o-" + node_id, pc, (), prefill_backlog_s=backlog_s,
                            layer_ranges={MODEL: rng})

    nodes = [node("a", (0, 40)), node("b1", (40, 80), backlog_s=60.0), node("b2", (40, 80))]
    per_token = planner.plan_chain(spec, nodes, context_tokens=500)
    assert per_token is not None and per_token.stages[1].node_id == "b1"  # a tie, to the id
    for_job = planner.plan_chain_for_job(spec, nodes, context_tokens=500, tokens_left=100)
    assert for_job is not None and for_job.stages[1].node_id == "b2"  # a minute less queued


def test_a_thinned_trace_keeps_its_shape_at_a_lower_rate() -> None:
    from sparecycles.sim.trace import thinned

    trace = requests(2000)
    thin = thinned(trace, 0.1, seed=3)
    assert 150 < len(thin) < 250
    assert (np.diff(thin.arrival_s) > 0).all() and thin.arrival_s[-1] <= trace.arrival_s[-1]
    assert np.array_equal(thin.arrival_s, thinned(trace, 0.1, seed=3).arrival_s)
    with pytest.raises(ValueError):
        thinned(trace, 0.0, seed=3)


def test_the_cli_runs_the_chain_policies_on_a_fleet_of_ranges() -> None:
    from sparecycles.cli.sim import run_policies

    with pytest.raises(ValueError, match="layer ranges"):
        run_policies("conv", FLEETS / "consumer16.toml", ["random"], show_progress=False)
    out = run_policies("conv", FLEETS / "consumer16.toml", ["petals"], rate=0.002,
                       show_progress=False)
    assert out[0].policy == "petals" and out[0].requests > 0 and out[0].completed > 0

"""Chains: which nodes, each holding a range of a model's layers, serve one request together.

Pure arithmetic over snapshots, like the rest of scheduling/. A chain covers layers ``[0,
n_layers)`` with stages whose ranges meet end to start; a token's decode time through it is the
sum over its stages of

- the stage's own decode step: the roofline of ``perfmodel`` applied to the stage's share of the
  model (its layers' bytes read from the node's measured memory bandwidth, plus the node's
  measured engine overhead for that many layers), and
- the hop into and out of it: activations travel through the coordinator (nodes dial out), so
  each stage costs one round trip plus twice the activation bytes of a token over the link; a
  node connected to another coordinator replica (``relayed``) adds the bus's round trip between
  the replicas (its activations cross the bus both ways).

``plan_segment`` finds the chain of least predicted time per token over any layer range by a
shortest path over layer boundaries (nodes are edges from their first layer to their end), so the
same function places a new chain (``[0, n_layers)``) and repairs a broken one (the lost stage's
range, excluding the nodes that failed it).

One job's completion, departures weighed in (``JobRule``, optional), as the scheduler scores a
whole-model node (``scheduler._predict``): a stage's edge costs the job's predicted time there
(the prompt's prefill after the node's prefill backlog, its hop, then every token's step at the
node's batch with this job, and its hop), weighted by ``1 + departure_penalty_fraction * P(its
node leaves within the job)`` (from ``NodeSnapshot.expected_stay_s``); a node expected to stay
less than the job's predicted time over ``stay_fraction_max`` is left out, unless no chain covers
the range without it. ``plan_chain_for_job`` predicts the job's time from a first plan without
the rule, then plans with it (the simulator's policy; docs/scheduling.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from sparecycles import limits
from sparecycles.scheduling import perfmodel
from sparecycles.types import ModelSpec, NodeSnapshot


@dataclass(frozen=True, slots=True)
class ChainConfig:
    # The link between a node and the coordinator when nothing better is known: 100 Mbit/s, a
    # home uplink's order of magnitude (loopback is far faster; a measured figure replaces it
    # once nodes report one).
    link_bytes_per_s: float = 12.5e6
    # A round trip when the profile has none: a node on another continent is ~0.15 s, one in the
    # same city ~0.01 s; 0.02 s keeps a chain from looking free.
    rtt_s_default: float = 0.02
    activation_bytes_per_value: int = 4  # float32 on the wire (chains on CPUs keep fp32)
    # A stage on a node of another replica: each hop also crosses the bus, there and back
    # (NATS between replicas in one region: about a millisecond each way, with the copy).
    relay_rtt_s: float = 0.002
    stages_max: int = limits.chain_stages_max


DEFAULT_CHAIN_CONFIG = ChainConfig()


@dataclass(frozen=True, slots=True)
class StagePlan:
    node_id: str
    first: int
    end: int
    step_s: float  # predicted decode step of this stage alone
    hop_s: float  # predicted hop into and out of it, per token


@dataclass(frozen=True, slots=True)
class ChainPlan:
    stages: tuple[StagePlan, ...]

    @property
    def token_s(self) -> float:
        """Predicted seconds per decoded token through the whole chain."""
        return sum(s.step_s + s.hop_s for s in self.stages)

    @property
    def hop_s(self) -> float:
        return sum(s.hop_s for s in self.stages)


@dataclass(frozen=True, slots=True)
class JobRule:
    """Plan for one job's completion, departures weighed in (see the module's doc); the
    defaults are the scheduler's (``SchedulerConfig.stay_fraction_max``,
    ``departure_penalty_fraction``)."""

    job_s: float  # the job's predicted seconds through the chain (prefill and decode)
    prompt_tokens: int = 0  # positions each stage prefills
    tokens_left: int = 0  # tokens it may still generate (0: weigh the time per token only)
    stay_fraction_max: float = 0.5
    departure_penalty_fraction: float = 1.0
    strict: bool = True  # leave out nodes expected to leave first (False: weigh them only)


def p_leave(seconds: float, stay_s: float) -> float:
    """The chance that a node expected to stay ``stay_s`` leaves within ``seconds`` (roughly
    exponential departures, as ``scheduler._p_leave``)."""
    if stay_s == math.inf:
        return 0.0
    return 1.0 - math.exp(-seconds / (stay_s if stay_s > 1e-9 else 1e-9))


def stage_spec(spec: ModelSpec, first: int, end: int) -> ModelSpec:
    """The part of ``spec`` a stage of layers ``[first, end)`` holds, as a model of its own:
    parameters in proportion to its layers (the embeddings and head are counted as spread over
    the layers; a refinement would charge them to the first and last stages)."""
    n = end - first
    return replace(spec, n_params=spec.n_params * n // max(1, spec.n_layers), n_layers=n,
                   weights_sha256="")


def stage_work_ppm(spec: ModelSpec, first: int, end: int) -> int:
    """The part of each token's work a stage does, by the bytes its layers read: parts per
    million of the whole model's."""
    return (end - first) * 1_000_000 // max(1, spec.n_layers)


def hop_s(spec: ModelSpec, node: NodeSnapshot, config: ChainConfig = DEFAULT_CHAIN_CONFIG
          ) -> float:
    """One token's hop into a stage and out again, through the coordinator."""
    rtt_s = node.profile.network_rtt_s or config.rtt_s_default
    if node.relayed:
        rtt_s += config.relay_rtt_s
    token_bytes = spec.hidden_size * config.activation_bytes_per_value
    return rtt_s + 2 * token_bytes / config.link_bytes_per_s


def prefill_hop_s(spec: ModelSpec, node: NodeSnapshot, tokens: int,
                  config: ChainConfig = DEFAULT_CHAIN_CONFIG) -> float:
    """``tokens`` positions' hop into a stage and out again (a prompt's prefill, or a repair
    rebuilding a stage's cache from its inputs): one round trip plus the activations both ways."""
    rtt_s = node.profile.network_rtt_s or config.rtt_s_default
    return rtt_s + 2 * tokens * spec.hidden_size * config.activation_bytes_per_value / (
        config.link_bytes_per_s)


def stage_prefill_s(spec: ModelSpec, node: NodeSnapshot, first: int, end: int,
                    tokens: int) -> float:
    """Predicted prefill of ``tokens`` positions through layers ``[first, end)`` on ``node``."""
    return perfmodel.costs(stage_spec(spec, first, end), node.profile).prefill_s(tokens)


def stage_step_s(spec: ModelSpec, node: NodeSnapshot, first: int, end: int,
                 context_tokens: int) -> float:
    """Predicted decode step of layers ``[first, end)`` on ``node`` for one sequence."""
    return perfmodel.costs(stage_spec(spec, first, end), node.profile).decode_step_s(
        1, context_tokens)


def _usable(node: NodeSnapshot, model: str, avoid: frozenset[str]) -> tuple[int, int] | None:
    rng = node.layer_ranges.get(model)
    if (rng is None or node.node_id in avoid or not node.available or node.draining
            or node.active_jobs >= node.jobs_max):
        return None
    return rng


def plan_segment(spec: ModelSpec, nodes: Iterable[NodeSnapshot], first: int, end: int, *,
                 context_tokens: int, avoid: Iterable[str] = (),
                 config: ChainConfig = DEFAULT_CHAIN_CONFIG, stay: JobRule | None = None
                 ) -> ChainPlan | None:
    """The chain of least predicted time per token covering layers ``[first, end)`` of ``spec``
    with nodes' declared ranges, none of them in ``avoid``; None when no chain covers it.
    Ties go to fewer stages, then to the smaller node ids (a stable choice). With ``stay``,
    departures weigh in (see the module's doc)."""
    if stay is not None and stay.strict:
        nodes = list(nodes)
        rule = stay

        def stays_long(node: NodeSnapshot) -> bool:
            return rule.job_s <= rule.stay_fraction_max * node.expected_stay_s

        plan = _shortest(spec, nodes, first, end, context_tokens, avoid, config, stay,
                         stays_long)
        if plan is not None:
            return plan  # otherwise a risky chain beats none
    return _shortest(spec, nodes, first, end, context_tokens, avoid, config, stay)


def _shortest(spec: ModelSpec, nodes: Iterable[NodeSnapshot], first: int, end: int,
              context_tokens: int, avoid: Iterable[str], config: ChainConfig,
              stay: JobRule | None, keep: Callable[[NodeSnapshot], bool] | None = None
              ) -> ChainPlan | None:
    banned = frozenset(avoid)
    edges: dict[int, list[tuple[NodeSnapshot, int]]] = {}
    for node in nodes:
        rng = _usable(node, spec.name, banned)
        if rng is not None and first <= rng[0] < rng[1] <= end and (keep is None or keep(node)):
            edges.setdefault(rng[0], []).append((node, rng[1]))
    # best[layer] = (seconds, stages, node ids, plan) of the best path from ``first`` to it
    best: dict[int, tuple[float, int, tuple[str, ...], tuple[StagePlan, ...]]] = {
        first: (0.0, 0, (), ())}
    for at in range(first, end):  # ranges only go forward: boundaries in order are final
        here = best.get(at)
        if here is None:
            continue
        for node, to in edges.get(at, ()):
            if here[1] + 1 > config.stages_max:
                continue
            stage = StagePlan(node.node_id, at, to,
                              stage_step_s(spec, node, at, to, context_tokens),
                              hop_s(spec, node, config))
            cost = stage.step_s + stage.hop_s
            if stay is not None:
                if stay.tokens_left > 0:
                    cost = _job_on_stage_s(spec, node, at, to, context_tokens, stay, stage.hop_s,
                                           config)
                cost *= 1.0 + stay.departure_penalty_fraction * p_leave(stay.job_s,
                                                                        node.expected_stay_s)
            cand = (here[0] + cost, here[1] + 1,
                    (*here[2], node.node_id), (*here[3], stage))
            old = best.get(to)
            if old is None or cand[:3] < old[:3]:
                best[to] = cand
    done = best.get(end)
    if done is None or not done[3]:
        return None
    return ChainPlan(done[3])


def plan_chain(spec: ModelSpec, nodes: Sequence[NodeSnapshot], *, context_tokens: int,
               avoid: Iterable[str] = (), config: ChainConfig = DEFAULT_CHAIN_CONFIG
               ) -> ChainPlan | None:
    """A chain over the whole model (see ``plan_segment``)."""
    return plan_segment(spec, nodes, 0, spec.n_layers, context_tokens=context_tokens,
                        avoid=avoid, config=config)


def whole_node_token_s(spec: ModelSpec, node: NodeSnapshot, context_tokens: int) -> float:
    """A whole-model node's predicted decode step, to compare a chain with (same roofline)."""
    return perfmodel.costs(spec, node.profile).decode_step_s(1, context_tokens)


chain_speedup_min_default = limits.chain_speedup_min_default  # see limits.py


def chain_is_faster(plan: ChainPlan, spec: ModelSpec, whole: Sequence[NodeSnapshot],
                    context_tokens: int, speedup_min: float = 1.0) -> bool:
    """Whether ``plan`` is predicted to decode faster than the best of the whole-model nodes
    ``whole`` by a factor above ``speedup_min`` (True when there is none): the best whole
    node's token time over the chain's must exceed ``speedup_min``."""
    if not whole:
        return True
    best_s = min(whole_node_token_s(spec, n, context_tokens) for n in whole)
    return plan.token_s * speedup_min < best_s


def _job_on_stage_s(spec: ModelSpec, node: NodeSnapshot, first: int, end: int,
                    context_tokens: int, rule: JobRule, hop: float, config: ChainConfig) -> float:
    """A job's predicted seconds on one stage: its prompt's prefill after the node's backlog,
    that prefill's hop, then each token's step at the node's batch with it, and its hop."""
    costs = perfmodel.costs(stage_spec(spec, first, end), node.profile)
    batch = min(node.active_jobs + 1, node.jobs_max)
    step = costs.decode_step_s(batch, context_tokens + rule.tokens_left // 2)
    return (node.prefill_backlog_s + costs.prefill_s(rule.prompt_tokens)
            + prefill_hop_s(spec, node, rule.prompt_tokens, config)
            + rule.tokens_left * (step + hop))


def chain_prefill_s(spec: ModelSpec, plan: ChainPlan, nodes: Sequence[NodeSnapshot],
                    tokens: int, config: ChainConfig = DEFAULT_CHAIN_CONFIG) -> float:
    """Predicted prefill of ``tokens`` positions through ``plan``'s stages one after another,
    hops included (``nodes`` holds at least the plan's)."""
    by_id = {n.node_id: n for n in nodes}
    total = 0.0
    for s in plan.stages:
        node = by_id[s.node_id]
        total += (stage_prefill_s(spec, node, s.first, s.end, tokens)
                  + prefill_hop_s(spec, node, tokens, config))
    return total


def plan_chain_for_job(spec: ModelSpec, nodes: Sequence[NodeSnapshot], *,
                       context_tokens: int, tokens_left: int, avoid: Iterable[str] = (),
                       first: int = 0, end: int | None = None, strict: bool = True,
                       config: ChainConfig = DEFAULT_CHAIN_CONFIG,
                       stay_fraction_max: float = 0.5,
                       departure_penalty_fraction: float = 1.0) -> ChainPlan | None:
    """The chain over layers ``[first, end)`` (the whole model by default) that finishes the
    job soonest, departures weighed in: the job's time (its prefill of ``context_tokens`` and
    ``tokens_left`` decode steps) is predicted from the plan per token, then the plan is made
    again with a ``JobRule`` for that time. ``strict=False``: risky nodes are weighed, never
    left out (a job that has waited long enough, as ``SchedulerConfig.stay_rule_relax_after_s``)."""
    stop = spec.n_layers if end is None else end
    banned = tuple(avoid)
    base = plan_segment(spec, nodes, first, stop, context_tokens=context_tokens, avoid=banned,
                        config=config)
    if base is None:
        return None
    job_s = chain_prefill_s(spec, base, nodes, context_tokens, config) + (
        tokens_left * base.token_s)
    rule = JobRule(job_s, context_tokens, tokens_left, stay_fraction_max,
                   departure_penalty_fraction, strict)
    return plan_segment(spec, nodes, first, stop, context_tokens=context_tokens, avoid=banned,
                        config=config, stay=rule)

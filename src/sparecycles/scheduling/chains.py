"""Chains: which nodes, each holding a range of a model's layers, serve one request together.

Pure arithmetic over snapshots, like the rest of scheduling/. A chain covers layers ``[0,
n_layers)`` with stages whose ranges meet end to start; a token's decode time through it is the
sum over its stages of

- the stage's own decode step: the roofline of ``perfmodel`` applied to the stage's share of the
  model (its layers' bytes read from the node's measured memory bandwidth, plus the node's
  measured engine overhead for that many layers), and
- the hop into and out of it: activations travel through the coordinator (nodes dial out), so
  each stage costs one round trip plus twice the activation bytes of a token over the link.

``plan_segment`` finds the chain of least predicted time per token over any layer range by a
shortest path over layer boundaries (nodes are edges from their first layer to their end), so the
same function places a new chain (``[0, n_layers)``) and repairs a broken one (the lost stage's
range, excluding the nodes that failed it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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
    token_bytes = spec.hidden_size * config.activation_bytes_per_value
    return rtt_s + 2 * token_bytes / config.link_bytes_per_s


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
                 config: ChainConfig = DEFAULT_CHAIN_CONFIG) -> ChainPlan | None:
    """The chain of least predicted time per token covering layers ``[first, end)`` of ``spec``
    with nodes' declared ranges, none of them in ``avoid``; None when no chain covers it.
    Ties go to fewer stages, then to the smaller node ids (a stable choice)."""
    banned = frozenset(avoid)
    edges: dict[int, list[tuple[NodeSnapshot, int]]] = {}
    for node in nodes:
        rng = _usable(node, spec.name, banned)
        if rng is not None and first <= rng[0] < rng[1] <= end:
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
            cand = (here[0] + stage.step_s + stage.hop_s, here[1] + 1,
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

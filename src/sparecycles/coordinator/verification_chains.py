"""Spot checks of chain jobs: end to end, then stage by stage to find the stage that lied.

The decisions are ``trust/chains.py``; this module is their I/O, run by the verifier
(``coordinator/verification.py``) for a chain job it selected:

1. **End to end.** The delivered tokens are scored teacher-forced by owners other than the
   stages': on a whole-model node (a ``score`` message, as for any job) or, where no such node
   holds the model, through a chain of other stages: the prompt and the output prefilled through
   them (``stage_forward``), the last one asked (``StageForward.score``) for the statistics of
   each output position.
2. **Stage by stage**, when that fails. The coordinator kept every input each stage completed
   (for repair: ``coordinator/chains.py``) and what the stage returned; each stage's inputs are
   run again through other nodes holding its layers (a segment planned by
   ``scheduling/chains.plan_segment`` over them), and their hidden states are compared with the
   stage's, position by position; the last stage's inputs are scored against the tokens it
   chose. A re-check by nodes that are not all trusted counts as a failure only when a second
   re-check, by nodes of yet other owners, agrees.
3. The verdicts go back to the verifier, which records them, withholds the blamed stage's
   earning (``Ledger.withhold`` of that node: each stage is paid as its own share) and lowers its
   reputation; the stages that passed keep theirs.

Check sequences look like a chain's (``<job id>.<n>``), so a stage cannot tell a check from work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from sparecycles import limits, protocol
from sparecycles.coordinator.chains import (
    StageFailed,
    StageInput,
    merged_inputs,
    positions_per_message,
)
from sparecycles.scheduling import chains as planner
from sparecycles.secrets_util import new_id
from sparecycles.trust import chains as decide
from sparecycles.trust import decisions as verify
from sparecycles.trust.decisions import Method, Outcome, Verdict
from sparecycles.types import SamplingParams

if TYPE_CHECKING:
    from sparecycles.coordinator.chains import ChainRegistry
    from sparecycles.coordinator.jobs import LiveJob
    from sparecycles.coordinator.node_conn import NodeConn
    from sparecycles.coordinator.verification_link import VerifierLink
    from sparecycles.trust.reputation import NodeTrust
    from sparecycles.types import ModelSpec


@dataclass(frozen=True, slots=True)
class StageWork:
    """One stage of a finished chain job, frozen when the job finished."""

    number: int  # its attempt number
    node_id: str
    owner_id: str
    first: int
    end: int
    token_base: int  # the job's tokens it was part of: [token_base, token_base + tokens)
    tokens: int
    inputs: tuple[StageInput, ...]  # every input it completed, from position 0
    outputs: tuple[protocol.Activation, ...]  # what it returned for each (not the last stage)


@dataclass(frozen=True, slots=True)
class ChainCheckTask:
    job_id: str
    model: str
    prompt_ids: tuple[int, ...]
    generated: tuple[int, ...]
    sampling: SamplingParams
    stages: tuple[StageWork, ...]


def chain_task(job: LiveJob) -> ChainCheckTask | None:
    """What a check of ``job`` (served by a chain) needs: its paid stages' records."""
    run = job.chain
    if run is None or not job.generated:
        return None
    stages = tuple(
        StageWork(s.attempt.number, s.node.node_id, s.node.owner_id, s.first, s.end,
                  s.attempt.token_base, s.attempt.tokens, tuple(s.inputs), tuple(s.outputs))
        for s in run.history if s.attempt.tokens > 0 and s.inputs)
    if not stages:
        return None
    return ChainCheckTask(job.job_id, job.model, tuple(job.prompt_ids), tuple(job.generated),
                          job.sampling, stages)


class CheckHost(Protocol):
    """What the chain checks need of the verifier (``Verifier`` satisfies it)."""

    link: VerifierLink
    trusted_min: float
    verification_busy_s: float

    def trust_of(self, node_id: str) -> NodeTrust: ...

    def local_nodes(self) -> dict[str, NodeConn]: ...

    def chain_registry(self) -> ChainRegistry | None: ...

    def model_spec(self, model: str) -> ModelSpec | None: ...

    def tolerance_of(self, model: str) -> verify.Tolerance: ...

    def pick_verifier(self, model: str, exclude_owners: set[str],
                      needs: frozenset[str] = frozenset()) -> tuple[NodeConn, bool] | None: ...


class _CheckFailed(Exception):
    """A check's own work did not complete (a verifier left, was silent or answered an error):
    the verdict is inconclusive, nobody is blamed."""


@dataclass(frozen=True, slots=True)
class _Segment:
    nodes: tuple[NodeConn, ...]
    plan: planner.ChainPlan
    trusted: bool  # every node designated trusted or of reputation >= trusted_min

    @property
    def owners(self) -> set[str]:
        return {n.owner_id for n in self.nodes}

    @property
    def first_node_id(self) -> str:
        return self.nodes[0].node_id


@dataclass(frozen=True, slots=True)
class _ScoreAsk:
    """Score positions ``[start, start + len(targets))`` of a run, each followed by its target."""

    start: int
    targets: tuple[int, ...]
    temperature: float
    top_p: float


@dataclass
class ChainJudgement:
    """The verdict of each stage (by attempt number), who checked it, and the compute spent."""

    verdicts: dict[int, Verdict]
    verifiers: dict[int, str | None]
    busy_s: float = 0.0


class ChainChecker:
    def __init__(self, host: CheckHost) -> None:
        self.host = host

    async def judge(self, task: ChainCheckTask, now_epoch_s: float) -> ChainJudgement:
        """End to end, then (on failure) stage by stage: each stage's verdict."""
        out = ChainJudgement({}, {})
        spec = self.host.model_spec(task.model)
        registry = self.host.chain_registry()
        owners = {s.owner_id for s in task.stages}
        checked = [s for s in task.stages if not self.host.trust_of(s.node_id).designated_trusted]
        numbers = [s.number for s in checked]
        if spec is None or registry is None:
            e2e = Verdict(Outcome.INCONCLUSIVE, Method.TEACHER_FORCED, "the model is unknown")
            out.verdicts = decide.attribute(e2e, {}, numbers)
            return out
        e2e, who = await self._end_to_end(task, spec, registry, owners, now_epoch_s, out)
        rechecks: dict[int, Verdict] = {}
        if e2e.outcome is Outcome.FAIL:
            for stage in checked:
                v, by = await self._recheck(task, spec, registry, stage, owners, now_epoch_s, out)
                rechecks[stage.number] = v
                out.verifiers[stage.number] = by
        out.verdicts = decide.attribute(e2e, rechecks, numbers)
        for n in numbers:
            out.verifiers.setdefault(n, who)
        return out

    # ---- end to end ---------------------------------------------------------------------------

    async def _end_to_end(self, task: ChainCheckTask, spec: ModelSpec, registry: ChainRegistry,
                          owners: set[str], now_epoch_s: float, out: ChainJudgement
                          ) -> tuple[Verdict, str | None]:
        n = min(len(task.generated), limits.score_tokens_max)
        claim = verify.Claim(task.generated[:n], None, task.sampling.temperature,
                             task.sampling.top_p)
        tol = decide.chain_tolerance(self.host.tolerance_of(task.model))
        pick = self.host.pick_verifier(task.model, owners)
        if pick is not None:  # a whole-model node: one ``score``, as for any job
            node = pick[0]
            scored = await self.host.link.score(node, task.model, list(task.prompt_ids),
                                                list(task.generated[:n]),
                                                task.sampling.temperature, task.sampling.top_p)
            self._spent(out, scored.busy_s)
            if scored.error:
                return Verdict(Outcome.INCONCLUSIVE, Method.TEACHER_FORCED,
                               f"no verdict: {scored.error}"), node.node_id
            scores = verify.Scores(tuple(scored.logprobs), tuple(scored.top_logprobs),
                                   tuple(scored.mass_above), tuple(scored.expected_logprobs),
                                   tuple(scored.logprob_vars))
            return verify.judge_scores(claim, scores, tol), node.node_id
        segment = self._segment(spec, 0, spec.n_layers, owners, now_epoch_s)
        if segment is None:
            return Verdict(Outcome.INCONCLUSIVE, Method.TEACHER_FORCED,
                           "no verifier available (no whole-model node nor chain of other "
                           "owners)"), None
        m = len(task.prompt_ids)
        context = list(task.prompt_ids + task.generated[: n - 1])  # the last token predicts none
        per = positions_per_message(spec)
        inputs: list[StageInput] = [context[i : i + per] for i in range(0, len(context), per)]
        ask = _ScoreAsk(m - 1, task.generated[:n], task.sampling.temperature, task.sampling.top_p)
        try:
            scores = await self._run_scored(registry, spec, segment, inputs, ask, out)
        except _CheckFailed as exc:
            return Verdict(Outcome.INCONCLUSIVE, Method.TEACHER_FORCED,
                           f"no verdict: {exc}"), segment.first_node_id
        return verify.judge_scores(claim, scores, tol), segment.first_node_id

    # ---- stage by stage ----------------------------------------------------------------------

    async def _recheck(self, task: ChainCheckTask, spec: ModelSpec, registry: ChainRegistry,
                       stage: StageWork, owners: set[str], now_epoch_s: float,
                       out: ChainJudgement) -> tuple[Verdict, str | None]:
        """One stage's inputs re-run on other owners' nodes; a failure by nodes that are not
        all trusted is confirmed by a second segment of yet other owners."""
        first = self._segment(spec, stage.first, stage.end, owners, now_epoch_s)
        if first is None:
            return Verdict(Outcome.INCONCLUSIVE, Method.STAGE_RECHECK,
                           f"no other owner's nodes hold layers {stage.first}:{stage.end}"), None
        verdict = await self._recheck_on(task, spec, registry, stage, first, out)
        if verdict.outcome is not Outcome.FAIL or first.trusted:
            return verdict, first.first_node_id
        second = self._segment(spec, stage.first, stage.end, owners | first.owners, now_epoch_s)
        again = None if second is None else await self._recheck_on(task, spec, registry, stage,
                                                                   second, out)
        return decide.confirmed(verdict, again), first.first_node_id

    async def _recheck_on(self, task: ChainCheckTask, spec: ModelSpec, registry: ChainRegistry,
                          stage: StageWork, segment: _Segment, out: ChainJudgement) -> Verdict:
        inputs = list(stage.inputs)
        try:
            if stage.end < spec.n_layers:
                theirs = await self._run_hidden(registry, spec, segment, inputs, out)
                diff = activation_diff(list(stage.outputs), theirs)
                return decide.judge_activations(
                    diff, decide.stage_tolerance_for(spec.bytes_per_param))
            # the last stage: the tokens it chose, scored on its inputs
            n = min(stage.tokens, limits.score_tokens_max)
            chosen = task.generated[stage.token_base : stage.token_base + n]
            start = len(task.prompt_ids) - 1 + stage.token_base
            if n <= 0 or start + n > sum(_length(x) for x in inputs):
                return Verdict(Outcome.INCONCLUSIVE, Method.STAGE_RECHECK,
                               "its inputs do not reach the tokens it chose")
            ask = _ScoreAsk(start, chosen, task.sampling.temperature, task.sampling.top_p)
            scores = await self._run_scored(registry, spec, segment, inputs, ask, out)
        except _CheckFailed as exc:
            return Verdict(Outcome.INCONCLUSIVE, Method.STAGE_RECHECK, f"no verdict: {exc}")
        claim = verify.Claim(chosen, None, task.sampling.temperature, task.sampling.top_p)
        tol = decide.chain_tolerance(self.host.tolerance_of(task.model))
        return decide.as_stage_recheck(verify.judge_scores(claim, scores, tol))

    # ---- running inputs through other nodes --------------------------------------------------

    def _segment(self, spec: ModelSpec, first: int, end: int, exclude_owners: set[str],
                 now_epoch_s: float) -> _Segment | None:
        """Nodes of other owners covering layers ``[first, end)``: trusted ones if they can,
        else any of positive reputation; the fastest such chain (``plan_segment``)."""
        nodes = {n.node_id: n for n in self.host.local_nodes().values()
                 if not n.closed and not n.draining and n.owner_id not in exclude_owners
                 and n.reputation > 0 and spec.name in n.layer_ranges}
        trusted = {i for i, n in nodes.items() if self.host.trust_of(i).designated_trusted
                   or n.reputation >= self.host.trusted_min}
        snaps = [n.snapshot(now_epoch_s) for n in nodes.values()]
        for pool, all_trusted in (([s for s in snaps if s.node_id in trusted], True),
                                  (snaps, False)):
            plan = planner.plan_segment(spec, pool, first, end, context_tokens=0)
            if plan is not None:
                chosen = tuple(nodes[sp.node_id] for sp in plan.stages)
                return _Segment(chosen, plan, all_trusted or all(
                    n.node_id in trusted for n in chosen))
        return None

    async def _run_hidden(self, registry: ChainRegistry, spec: ModelSpec, segment: _Segment,
                          inputs: list[StageInput], out: ChainJudgement
                          ) -> list[protocol.Activation]:
        hidden, _ = await self._run(registry, spec, segment, inputs, None, out)
        return hidden

    async def _run_scored(self, registry: ChainRegistry, spec: ModelSpec, segment: _Segment,
                          inputs: list[StageInput], ask: _ScoreAsk, out: ChainJudgement
                          ) -> verify.Scores:
        if segment.plan.stages[-1].end != spec.n_layers:
            raise _CheckFailed("only a segment ending at the last layer scores")
        _, scores = await self._run(registry, spec, segment, inputs, ask, out)
        if len(scores[0]) != len(ask.targets):
            raise _CheckFailed(f"scored {len(scores[0])} of {len(ask.targets)} positions")
        lps, top, above, expected, variances = (tuple(col) for col in scores)
        return verify.Scores(lps, top, above, expected, variances)

    async def _run(self, registry: ChainRegistry, spec: ModelSpec, segment: _Segment,
                   inputs: list[StageInput], ask: _ScoreAsk | None, out: ChainJudgement
                   ) -> tuple[list[protocol.Activation], list[list[float]]]:
        """``inputs`` (from position 0) through the segment's nodes, stage after stage, as a
        repair rebuilds a cache; the last node's hidden states, or its scores of ``ask``."""
        check_id = new_id("job")
        per = positions_per_message(spec)
        xs = merged_inputs(inputs, per)
        scores: list[list[float]] = [[], [], [], [], []]
        opened: list[tuple[NodeConn, str]] = []
        try:
            for k, (node, sp) in enumerate(zip(segment.nodes, segment.plan.stages, strict=True)):
                sequence_id = f"{check_id}.{k + 1}"
                opened.append((node, sequence_id))
                node.jobs.add(check_id)  # it takes a slot there, as the scheduler should see
                last = sp.end == spec.n_layers
                position, outs = 0, []
                for x in xs:
                    n = _length(x)
                    wire = _score_of(ask, position, n) if last else None
                    msg = protocol.StageForward(
                        sequence_id=sequence_id, model=spec.name, step=next(registry.steps),
                        start=position, token_ids=x if isinstance(x, list) else None,
                        hidden=x if isinstance(x, protocol.Activation) else None, score=wire)
                    try:
                        answer = await registry.exchange(node, msg)
                    except StageFailed as exc:
                        raise _CheckFailed(f"verifier {node.node_id}: {exc}") from None
                    if answer.error is not None:
                        raise _CheckFailed(f"verifier {node.node_id} answered: "
                                           f"{answer.error[:200]}")
                    self._spent(out, answer.busy_s)
                    if not last:
                        if answer.hidden is None or answer.hidden.shape != (n, spec.hidden_size):
                            raise _CheckFailed(f"verifier {node.node_id}: its activation is "
                                               f"not {n} x {spec.hidden_size}")
                        outs.append(answer.hidden)
                    elif wire is not None:
                        got = answer.scores
                        if got is None or len(got.logprobs) != len(wire.targets):
                            raise _CheckFailed(f"verifier {node.node_id} did not score")
                        for col, name in zip(scores, _score_fields, strict=True):
                            col.extend(getattr(got, name))
                    position += n
                xs = merged_inputs(outs, per) if not last else []
        finally:
            for node, sequence_id in opened:
                node.jobs.discard(check_id)
                if not node.closed:
                    node.send(protocol.encode(protocol.StageRelease(
                        sequence_id=sequence_id, model=spec.name)))
        return [x for x in xs if isinstance(x, protocol.Activation)], scores

    def _spent(self, out: ChainJudgement, busy_s: float) -> None:
        out.busy_s += busy_s
        self.host.verification_busy_s += busy_s


_score_fields = ("logprobs", "top_logprobs", "mass_above", "expected_logprobs", "logprob_vars")


def _length(x: StageInput) -> int:
    return len(x) if isinstance(x, list) else x.shape[0]


def _score_of(ask: _ScoreAsk | None, position: int, n: int) -> protocol.StageScore | None:
    """The part of ``ask`` that falls in positions ``[position, position + n)``."""
    if ask is None:
        return None
    lo, hi = max(position, ask.start), min(position + n, ask.start + len(ask.targets))
    if lo >= hi:
        return None
    return protocol.StageScore(offset=lo - position,
                               targets=list(ask.targets[lo - ask.start : hi - ask.start]),
                               temperature=ask.temperature, top_p=ask.top_p)


# ---- comparing hidden states ---------------------------------------------------------------


def _rows(acts: list[protocol.Activation]) -> np.ndarray:
    """The activations' rows, stacked, as float64."""
    parts = []
    for a in acts:
        raw = a.raw()
        if a.dtype == "float32":
            x = np.frombuffer(raw, dtype="<f4")
        elif a.dtype == "float16":
            x = np.frombuffer(raw, dtype="<f2")
        else:  # bfloat16: the high half of a float32
            x = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        parts.append(x.astype(np.float64).reshape(a.shape))
    if not parts:
        return np.zeros((0, 0))
    return np.concatenate(parts, axis=0)


def activation_diff(stage: list[protocol.Activation], rerun: list[protocol.Activation]
                    ) -> decide.ActivationDiff:
    """The stage's hidden states against the re-run's, position by position: the relative
    Euclidean error of each row (over the hidden size)."""
    ours, theirs = _rows(rerun), _rows(stage)
    if ours.shape != theirs.shape or ours.shape[0] == 0:
        return decide.ActivationDiff(theirs.shape[0], ours.shape[0], math.nan, math.nan, -1)
    err = np.linalg.norm(theirs - ours, axis=1) / np.maximum(np.linalg.norm(ours, axis=1), 1e-12)
    worst = int(np.argmax(err))
    return decide.ActivationDiff(int(ours.shape[0]), int(ours.shape[0]), float(err[worst]),
                                 float(err.mean()), worst)

"""Spot checks of chains: which chain jobs to check, and which stage to blame. Pure.

A chain's answer is the work of several nodes, each running some of the model's layers on what
the stage before it sent (``coordinator/chains.py``). A stage's output is hidden states, which no
token-level test can judge on their own; so a chain job is checked in two steps
(``coordinator/verification_chains.py`` runs them):

1. **End to end**, as any job: the delivered tokens are scored teacher-forced on a whole-model
   node, or on another chain, of owners other than the stages' (``decisions.judge_scores``; a
   chain's stages report no log-probabilities, so only the tokens are judged).
2. **Stage by stage**, only when that fails: each stage's recorded inputs are run again on other
   nodes holding its layers, and their hidden states compared with the ones the stage returned
   (``judge_activations``); the last stage's inputs are scored against the tokens it chose. The
   stages whose re-check differs are blamed (``attribute``); the others passed.

Selection (``select_chain``) follows the same per-node rule as whole-model jobs
(``decisions.select``): a chain job counts as a job of each of its stages' nodes, so it is checked
when any of them draws a check, and a new node in a chain of established ones is still checked on
every job.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from sparecycles.trust.decisions import (
    DEFAULT_SPOT_CHECKS,
    Method,
    Outcome,
    SpotCheckConfig,
    Tolerance,
    Verdict,
    select,
)
from sparecycles.trust.reputation import NodeTrust


def select_chain(stages: Sequence[NodeTrust], overhead_ratio: float, rng: random.Random,
                 config: SpotCheckConfig = DEFAULT_SPOT_CHECKS) -> bool:
    """Whether to check a settled chain job whose stages ran on these nodes: each stage's node
    draws as for a whole-model job of its own (two draws each, whatever the answer, so a seeded
    run replays exactly), and one draw is enough. Re-execution does not apply: a chain's stages
    report no log-probabilities, and scoring covers greedy and sampled jobs alike."""
    drawn = [select(t, overhead_ratio, False, rng, config) is not None for t in stages]
    return any(drawn)


def chain_tolerance(tol: Tolerance) -> Tolerance:
    """The tolerance for a chain's tokens: as the model's, without log-probabilities (a chain's
    last stage sends none)."""
    return replace(tol, logprobs_required=False)


# ---- a stage's hidden states against a re-run's ---------------------------------------------


@dataclass(frozen=True, slots=True)
class StageTolerance:
    """How far an honest stage's hidden states may stray from a re-run's: the relative error of
    the worst position, ``||theirs - ours|| / ||ours||`` (Euclidean, over the hidden size).

    The same layers on the same inputs differ between devices only by float rounding: a prefill
    split into other chunks, another matmul kernel or thread count. Measured on the tiny and the
    ~290M model in float32 (``bench/chain_check.py``, docs/benchmarks.md, "Chains"): at most
    1.1e-6 for honest work; a bfloat16 copy of the stage 6e-3 to 1.5e-2; the stage cheats (noise,
    skipped layers) about 1. The float32 limit sits ~900x above honest work and 6x below the
    bfloat16 copy; the 16-bit limit, 3x above that copy (honest 16-bit kernels differ so)."""

    row_rel_max: float = 1e-3


FP32_STAGE_TOLERANCE = StageTolerance(row_rel_max=1e-3)
HALF_STAGE_TOLERANCE = StageTolerance(row_rel_max=0.05)  # fp16/bf16 kernels, ~1e-2 apart


def stage_tolerance_for(bytes_per_param: float) -> StageTolerance:
    """The tolerance for stages of a model served at this precision."""
    return FP32_STAGE_TOLERANCE if bytes_per_param >= 4 else HALF_STAGE_TOLERANCE


@dataclass(frozen=True, slots=True)
class ActivationDiff:
    """A stage's returned hidden states against a re-run of its inputs, position by position."""

    rows: int  # positions the stage returned
    rows_rerun: int  # positions the re-run returned (the same, or the comparison is void)
    row_rel_max: float  # the worst position's relative error
    row_rel_mean: float
    worst_row: int


def judge_activations(diff: ActivationDiff, tol: StageTolerance = FP32_STAGE_TOLERANCE
                      ) -> Verdict:
    """A stage's verdict from its hidden states against a re-run's."""
    rc = Method.STAGE_RECHECK
    if diff.rows != diff.rows_rerun or diff.rows == 0:
        return Verdict(Outcome.INCONCLUSIVE, rc, f"the re-run returned {diff.rows_rerun} "
                       f"positions for the stage's {diff.rows}")
    if not (math.isfinite(diff.row_rel_max) and math.isfinite(diff.row_rel_mean)):
        return Verdict(Outcome.INCONCLUSIVE, rc, "the comparison is not finite")
    failed = diff.row_rel_max > tol.row_rel_max
    numbers = (f"relative error {diff.row_rel_max:.3g} at position {diff.worst_row}, "
               f"{diff.row_rel_mean:.3g} on average; tolerance {tol.row_rel_max:g}")
    why = (f"its hidden states differ from a re-run of its inputs ({numbers})" if failed
           else f"its hidden states match a re-run of its inputs ({numbers})")
    return Verdict(Outcome.FAIL if failed else Outcome.PASS, rc, why, tokens_checked=diff.rows)


def as_stage_recheck(verdict: Verdict) -> Verdict:
    """The last stage's verdict: its inputs re-run and scored against the tokens it chose."""
    why = verdict.reason
    if verdict.outcome is Outcome.FAIL:
        why = f"given its inputs, {why}"
    return replace(verdict, method=Method.STAGE_RECHECK, reason=why)


def confirmed(first: Verdict, second: Verdict | None) -> Verdict:
    """A stage's re-check failure by nodes that are not trusted counts only if a second
    re-check, on nodes of other owners, fails it too; otherwise it is inconclusive."""
    if first.outcome is not Outcome.FAIL:
        return first
    if second is None or second.outcome is Outcome.INCONCLUSIVE:
        return replace(first, outcome=Outcome.INCONCLUSIVE, reason=first.reason
                       + "; not confirmed")
    if second.outcome is Outcome.PASS:
        return replace(second, outcome=Outcome.INCONCLUSIVE, reason="two re-checks disagree: "
                       f"{first.reason}; then {second.reason}")
    return replace(second, reason=second.reason + " (confirmed by a second re-check)")


def attribute(end_to_end: Verdict, rechecks: Mapping[int, Verdict],
              stages: Sequence[int]) -> dict[int, Verdict]:
    """Each stage's verdict (by its attempt number) from the chain's end-to-end verdict and,
    when that failed, the stages' re-checks.

    - end to end passed: every stage passed (the answer is the model's, so was each part);
    - end to end inconclusive: every stage is;
    - end to end failed: a stage whose re-check failed is blamed, one whose re-check passed
      passed; if no re-check failed, nothing can be attributed (a stage's cheat within the
      tolerance, or a verifier's error) and every stage is inconclusive."""
    if end_to_end.outcome is Outcome.PASS:
        return {n: replace(end_to_end, reason=f"the chain's answer passed end to end: "
                           f"{end_to_end.reason}") for n in stages}
    if end_to_end.outcome is Outcome.INCONCLUSIVE:
        return {n: end_to_end for n in stages}
    blamed = [n for n in stages if n in rechecks and rechecks[n].outcome is Outcome.FAIL]
    if not blamed:
        return {n: Verdict(Outcome.INCONCLUSIVE, Method.STAGE_RECHECK,
                           f"the chain's answer failed ({end_to_end.reason}) but no stage's "
                           "re-check differs") for n in stages}
    out = {}
    for n in stages:
        v = rechecks.get(n)
        out[n] = v if v is not None else Verdict(
            Outcome.INCONCLUSIVE, Method.STAGE_RECHECK, "not re-checked")
    return out

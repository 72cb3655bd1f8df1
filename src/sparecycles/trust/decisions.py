"""Verification decisions: which jobs to check, how, and what the evidence says. Pure.

No database, network or clock: randomness comes in as a ``random.Random`` and the measured
verification overhead as a number, so the coordinator (``coordinator/verification.py``), the
benchmark and the
tests all run the same decisions.

Two ways to check a settled job, both run on another node after the client has its answer:

- **Teacher-forced scoring** (the default): the verifier runs the prompt plus the claimed tokens
  through the model in one prefill pass and returns, per claimed token, its log-probability, the
  best log-probability at that position, the probability mass above it (at the job's
  temperature) and the mean and variance of the log-probability a sampled token would have.
  ``judge_scores`` then asks: were greedy tokens the model's choice (within ``greedy_gap_max``
  nats, so float noise between devices never fails an honest node)? Do the node's reported
  log-probabilities match the verifier's? Were sampled tokens inside the top-p nucleus, and is
  their total log-likelihood plausible (a z-test)?
- **Re-execution**: for greedy or seeded jobs the verifier decodes the same prompt with the same
  sampling; ``compare_reexecution`` passes an exact match and reports the first point of
  divergence otherwise, which is then judged by teacher-forced scoring (a divergence is either a
  near tie that float differences flip, or a lie; scoring tells them apart).

Plus two checks that cost nothing and run on every result: the signature (``dispatch``) and
``check_metering`` (a node claiming more tokens than it delivered).

How often (``check_probability``), as BOINC's adaptive replication: a node with no clean record is
checked on every job; each ``clean_halving`` consecutive clean checks halve the rate, down to
``rate_min``; a failure resets it. Established nodes are slowed further when the measured
verification compute exceeds ``overhead_budget`` (5%) of the serving compute.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from sparecycles import limits
from sparecycles.trust.reputation import NodeTrust


class Method(enum.StrEnum):
    TEACHER_FORCED = "teacher_forced"
    REEXECUTION = "reexecution"
    METERING = "metering"  # the claimed token counts against what the coordinator received
    SIGNATURE = "signature"  # the signed result did not verify
    STAGE_RECHECK = "stage_recheck"  # one stage of a chain re-run elsewhere (trust/chains.py)


class Outcome(enum.StrEnum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"  # needs another look (a divergence), or the verifier failed


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Outcome
    method: Method
    reason: str = ""
    tokens_checked: int = 0
    first_divergence: int | None = None  # re-execution: index of the first differing token
    logprob_diff_max: float | None = None  # |reported - verified|, worst token
    logprob_diff_mean: float | None = None
    greedy_gap_max: float | None = None  # best log-prob minus the claimed token's, worst token
    z: float | None = None  # log-likelihood z-score of sampled tokens

    @property
    def passed(self) -> bool:
        return self.outcome is Outcome.PASS


# ---- how often and how ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpotCheckConfig:
    rate_new: float = 1.0  # chance a job of a node with no clean checks is checked
    clean_halving: float = 3.0  # consecutive clean checks that halve the chance
    rate_min: float = 0.01  # never below: a long clean record is still checked now and then
    overhead_budget: float = 0.05  # verification compute / serving compute at steady state
    established_clean_min: int = 10  # nodes past this many clean checks yield to the budget
    reexecution_share: float = 0.25  # of the checks of greedy or seeded jobs


DEFAULT_SPOT_CHECKS = SpotCheckConfig()


def check_probability(trust: NodeTrust, overhead_ratio: float,
                      config: SpotCheckConfig = DEFAULT_SPOT_CHECKS) -> float:
    """The chance that a settled job of this node is checked."""
    if trust.designated_trusted or trust.quarantined:
        return 0.0
    rate: float = config.rate_new * 0.5 ** (trust.consecutive_clean / config.clean_halving)
    if (trust.consecutive_clean >= config.established_clean_min
            and overhead_ratio > config.overhead_budget):
        rate *= config.overhead_budget / overhead_ratio
    return min(1.0, max(config.rate_min, rate))


def select(trust: NodeTrust, overhead_ratio: float, reproducible: bool, rng: random.Random,
           config: SpotCheckConfig = DEFAULT_SPOT_CHECKS) -> Method | None:
    """Whether to check a settled job, and how; ``reproducible``: greedy, or sampled with a seed.

    Draws from ``rng`` twice whatever the answer, so a seeded run replays exactly."""
    draw, how = rng.random(), rng.random()
    if draw >= check_probability(trust, overhead_ratio, config):
        return None
    if reproducible and how < config.reexecution_share:
        return Method.REEXECUTION
    return Method.TEACHER_FORCED


@dataclass(frozen=True, slots=True)
class Candidate:
    """A node that could verify: connected, serving the model, with a free slot."""

    node_id: str
    owner_id: str
    reputation: float
    designated_trusted: bool = False


def choose_verifier(candidates: Sequence[Candidate], exclude_owners: set[str],
                    rng: random.Random, trusted_min: float = 0.9) -> tuple[Candidate, bool] | None:
    """The node to verify on, and whether its word is trusted on its own.

    Never a node of an owner whose work is being checked (an owner would vouch for itself).
    Designated trusted nodes first, then nodes of reputation >= ``trusted_min``, then the most
    reputable; ties are broken at random so no node can count on verifying a given peer."""
    usable = [c for c in candidates if c.owner_id not in exclude_owners and c.reputation > 0]
    if not usable:
        return None

    def rank(c: Candidate) -> tuple[int, float, float]:
        tier = 2 if c.designated_trusted else 1 if c.reputation >= trusted_min else 0
        return (tier, c.reputation, rng.random())

    best = max(usable, key=rank)
    return best, best.designated_trusted or best.reputation >= trusted_min


# ---- judging the evidence -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tolerance:
    """How far honest work on other hardware may stray from the verifier's, in nats.

    The defaults suit 16-bit models (bf16/fp16 weights and kernels differ between devices by up
    to ~1e-2 nats per token); ``FP32_TOLERANCE`` suits networks serving float32 weights, where
    any two correct implementations agree to ~1e-5 (docs/benchmarks.md, "Verification")."""

    greedy_gap_max: float = 0.1  # how far a greedy token may trail the verifier's best
    logprob_abs_max: float = 1.0  # reported vs verified, any one token
    logprob_mean_max: float = 0.05  # reported vs verified, mean over the tokens
    logprobs_required: bool = True  # a node asked for log-probabilities must send them
    nucleus_slack: float = 0.02  # probability mass a top-p token may sit outside the nucleus
    z_min: float = -6.0  # log-likelihood z-score below which sampled tokens are implausible
    z_tokens_min: int = 16  # the z-test needs this many tokens
    # a token trailing the best by this many nats had probability < e^-1000 (a constrained
    # job's verifier scores a token its grammar forbids at score_floor, 1e4 nats down)
    impossible_gap: float = 1000.0


DEFAULT_TOLERANCE = Tolerance()
# float32: honest differences measured at <= 5e-6 nats per token (any fp32 implementation against
# float64); a bfloat16 copy of the weights at >= 9e-4 mean. These sit 40x above the one and 4x
# below the other.
FP32_TOLERANCE = Tolerance(greedy_gap_max=1e-3, logprob_abs_max=1e-2, logprob_mean_max=2e-4)


# Quantized GGUF files (under 2 bytes a weight), where a llama.cpp node (quantized kernels, 8-bit
# activations) and a transformers node (the same file dequantized, float32) check each other.
# Honest differences between them on SmolLM2-135M Q4_1 and Q8_0, 1,000 jobs over both pairs both
# ways (bench/cross_backend_verify.py --jobs 250, docs/benchmarks.md): at most 0.11 nats per token
# on average over a job, 1.02 on one token, and a greedy token at most 1.30 nats below the
# verifier's best (near ties flip: each of the two tokens' log-probabilities may move by up to the
# one-token difference). A greedy gap of 1.0, set from a first run of 224 jobs, failed one honest
# job in 1,000; the gap now shares the one-token limit. A Q4_0 file sold as Q8_0 differs by 0.54
# nats per token (median job) and still fails most of its checks (docs/benchmarks.md).
QUANTIZED_TOLERANCE = Tolerance(greedy_gap_max=2.0, logprob_abs_max=2.0, logprob_mean_max=0.3)


def tolerance_for(bytes_per_param: float) -> Tolerance:
    """The tolerance for a model served at this precision (``ModelSpec.bytes_per_param``)."""
    if bytes_per_param >= 4:
        return FP32_TOLERANCE
    return QUANTIZED_TOLERANCE if bytes_per_param < 2 else DEFAULT_TOLERANCE


@dataclass(frozen=True, slots=True)
class Claim:
    """What a node said it produced: tokens, its log-probabilities, and the sampling asked."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float | None, ...] | None
    temperature: float
    top_p: float = 1.0


@dataclass(frozen=True, slots=True)
class Scores:
    """A verifier's teacher-forced pass over a claim, one entry per claimed token."""

    logprobs: tuple[float, ...]  # log p(claimed token) under the model, untempered
    top_logprobs: tuple[float, ...]  # the best log p at that position
    mass_above: tuple[float, ...]  # probability above the claimed token's, at the temperature
    expected_logprobs: tuple[float, ...]  # E[log p(t)] for t drawn at the job's sampling
    logprob_vars: tuple[float, ...]  # Var[log p(t)] for t drawn at the job's sampling


def judge_scores(claim: Claim, scores: Scores,
                 tol: Tolerance = DEFAULT_TOLERANCE) -> Verdict:
    """The teacher-forced verdict on a claim."""
    tf = Method.TEACHER_FORCED
    n = len(claim.token_ids)
    lengths = {len(scores.logprobs), len(scores.top_logprobs), len(scores.mass_above),
               len(scores.expected_logprobs), len(scores.logprob_vars)}
    if lengths != {n}:
        return Verdict(Outcome.INCONCLUSIVE, tf, f"the verifier scored {sorted(lengths)} of {n}")
    if n == 0:
        return Verdict(Outcome.PASS, tf, "nothing to check")
    if not all(math.isfinite(x) for x in scores.logprobs + scores.top_logprobs):
        return Verdict(Outcome.INCONCLUSIVE, tf, "the verifier's scores are not finite")
    fields: dict[str, Any] = {"tokens_checked": n}
    trail = [top - lp for top, lp in zip(scores.top_logprobs, scores.logprobs, strict=True)]
    impossible = [i for i, g in enumerate(trail) if g >= tol.impossible_gap]
    if impossible:  # e.g. a token the job's grammar forbids, or one the model never gives
        return Verdict(Outcome.FAIL, tf, f"{len(impossible)} tokens the job's sampling could "
                       f"never draw, first at {impossible[0]}", **fields)
    if claim.temperature == 0:
        gaps = [top - lp for top, lp in zip(scores.top_logprobs, scores.logprobs, strict=True)]
        worst = max(range(n), key=gaps.__getitem__)
        fields["greedy_gap_max"] = gaps[worst]
        if gaps[worst] > tol.greedy_gap_max:
            return Verdict(Outcome.FAIL, tf, f"greedy token {worst} is not the model's choice "
                           f"({gaps[worst]:.3g} nats below the best)", **fields)
    else:
        if claim.top_p < 1.0:
            outside = [i for i, m in enumerate(scores.mass_above)
                       if m > claim.top_p + tol.nucleus_slack]
            if outside:
                return Verdict(Outcome.FAIL, tf, f"{len(outside)} tokens outside the top-p "
                               f"nucleus, first at {outside[0]}", **fields)
        z = likelihood_z(scores)
        fields["z"] = z
        if n >= tol.z_tokens_min and z < tol.z_min:
            return Verdict(Outcome.FAIL, tf, f"sampled tokens are implausible under the model "
                           f"(z = {z:.1f})", **fields)
    reported = claim.logprobs
    if reported is None or any(x is None for x in reported) or len(reported) != n:
        if tol.logprobs_required:
            return Verdict(Outcome.FAIL, tf, "log-probabilities were asked for and not sent",
                           **fields)
        return Verdict(Outcome.PASS, tf, "tokens consistent; no log-probabilities to compare",
                       **fields)
    diffs = [abs(float(r) - v) if r is not None and math.isfinite(r) else math.inf
             for r, v in zip(reported, scores.logprobs, strict=True)]
    worst = max(range(n), key=diffs.__getitem__)
    fields |= {"logprob_diff_max": diffs[worst], "logprob_diff_mean": sum(diffs) / n}
    if diffs[worst] > tol.logprob_abs_max:
        return Verdict(Outcome.FAIL, tf, f"reported log-probability of token {worst} is off by "
                       f"{diffs[worst]:.3g} nats", **fields)
    if fields["logprob_diff_mean"] > tol.logprob_mean_max:
        return Verdict(Outcome.FAIL, tf, "reported log-probabilities are off by "
                       f"{fields['logprob_diff_mean']:.3g} nats on average", **fields)
    return Verdict(Outcome.PASS, tf, "consistent with the model", **fields)


def likelihood_z(scores: Scores) -> float:
    """z-score of the claimed tokens' total log-probability against what sampling would give."""
    total = sum(scores.logprobs) - sum(scores.expected_logprobs)
    var = sum(max(0.0, v) for v in scores.logprob_vars)
    return total / math.sqrt(var + 1e-9)


def compare_reexecution(claim: Claim, replay: Sequence[int],
                        replay_logprobs: Sequence[float | None] | None = None,
                        tol: Tolerance = DEFAULT_TOLERANCE) -> Verdict:
    """Token-by-token comparison with the verifier's own decode of the same prompt and sampling.

    Identical tokens pass if the node's reported log-probabilities match the verifier's (the
    same test as in scoring: a lower-precision copy decodes the same tokens with other numbers).
    Anything else reports where the sequences part and is inconclusive: float differences between
    devices can flip a near tie, after which the two runs continue from different prefixes, so
    only teacher-forced scoring of the claim can tell a flipped tie from a lie."""
    rx = Method.REEXECUTION
    claimed = claim.token_ids
    n = min(len(claimed), len(replay))
    first = next((i for i in range(n) if claimed[i] != replay[i]), None)
    if first is None and len(claimed) == len(replay):
        theirs = replay_logprobs
        if not theirs or len(theirs) != len(claimed) or any(x is None for x in theirs):
            return Verdict(Outcome.PASS, rx, "identical", tokens_checked=len(claimed))
        scores = Scores(*(tuple(float(x or 0.0) for x in theirs),) * 5)
        verdict = judge_scores(replace(claim, temperature=0.0), scores, tol)
        return replace(verdict, method=rx, greedy_gap_max=None,
                       reason="identical" if verdict.passed else verdict.reason)
    if first is None:
        first = n
    return Verdict(Outcome.INCONCLUSIVE, rx, f"diverged at token {first} of {len(claimed)} "
                   f"(replay has {len(replay)})", tokens_checked=first, first_divergence=first)


def check_metering(*, claimed_prompt_tokens: int, claimed_completion_tokens: int,
                   sent_prompt_tokens: int, received_tokens: int) -> Verdict | None:
    """A node's signed metering against what the coordinator sent and received; None if equal.

    The coordinator pays for the tokens it received, never for the claim, so an inflated claim
    costs nobody money; it is still a lie, and it counts against the node."""
    if (claimed_completion_tokens == received_tokens
            and claimed_prompt_tokens == sent_prompt_tokens):
        return None
    return Verdict(Outcome.FAIL, Method.METERING,
                   f"claimed {claimed_prompt_tokens}+{claimed_completion_tokens} tokens, the "
                   f"coordinator sent {sent_prompt_tokens} and received {received_tokens}",
                   tokens_checked=received_tokens)


def check_metering_bounds(*, busy_s: float, energy_j: float, wall_s: float,
                          device_class: str) -> Verdict | None:
    """A node's metering against what is physically possible; None if within the bounds.

    ``busy_s`` at most the attempt's wall time as the coordinator measured it (plus
    ``limits.metering_wall_slack_s``); ``energy_j`` at most the device class's most power
    (``limits.device_power_w_max``) times ``busy_s``. NaN and infinity fail (the protocol
    refuses them already; this stays true if a caller forgets). A report outside the bounds is
    refused: it never reaches the books, and it counts against the node."""
    power_w = limits.device_power_w_max.get(device_class, limits.device_power_w_max_default)
    wall_max_s = max(0.0, wall_s) + limits.metering_wall_slack_s
    if not (math.isfinite(busy_s) and math.isfinite(energy_j)) or busy_s < 0 or energy_j < 0:
        why = f"busy_s={busy_s!r}, energy_j={energy_j!r} are not finite non-negative numbers"
    elif busy_s > wall_max_s:
        why = f"busy {busy_s:.3f} s in an attempt of {wall_s:.3f} s wall time"
    elif energy_j > power_w * busy_s:
        why = (f"{energy_j:.1f} J in {busy_s:.3f} s busy: more than a {device_class} can draw "
               f"({power_w} W)")
    else:
        return None
    return Verdict(Outcome.FAIL, Method.METERING, f"metering out of bounds: {why}")


def overhead_ratio(verification_busy_s: float, serving_busy_s: float) -> float:
    """Verification compute as a share of serving compute (device-busy seconds)."""
    if serving_busy_s <= 0:
        return 0.0 if verification_busy_s <= 0 else math.inf
    return verification_busy_s / serving_busy_s

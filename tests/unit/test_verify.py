"""Verification decisions: selection, the adaptive rate, comparisons and verdicts (pure)."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparecycles.trust import decisions as verify
from sparecycles.trust.decisions import Claim, Method, Outcome, Scores
from sparecycles.trust.reputation import new_trust, record_check


def _trust(clean: int = 0, *, designated: bool = False):
    t = new_trust("n", designated_trusted=designated)
    for _ in range(clean):
        t = record_check(t, True)
    return t


def test_new_nodes_are_always_checked_and_clean_records_rarely() -> None:
    assert verify.check_probability(_trust(0), 0.0) == 1.0
    assert verify.check_probability(_trust(3), 0.0) == pytest.approx(0.5)
    assert verify.check_probability(_trust(60), 0.0) == verify.DEFAULT_SPOT_CHECKS.rate_min
    assert verify.check_probability(_trust(designated=True), 0.0) == 0.0
    rates = [verify.check_probability(_trust(k), 0.0) for k in range(40)]
    assert rates == sorted(rates, reverse=True)


def test_a_failure_resets_the_rate() -> None:
    t = record_check(_trust(30), False)
    assert verify.check_probability(t, 0.0) == 1.0


def test_the_overhead_budget_slows_established_nodes_only() -> None:
    cfg = verify.SpotCheckConfig(rate_min=0.001)
    established, new = _trust(12), _trust(2)
    assert (verify.check_probability(established, 0.10, cfg)
            == pytest.approx(verify.check_probability(established, 0.0, cfg) / 2))
    assert verify.check_probability(new, 10.0, cfg) == verify.check_probability(new, 0.0, cfg)


def test_selection_is_random_at_the_stated_rate_and_replays_from_a_seed() -> None:
    t = _trust(3)  # rate 0.5
    picks = [verify.select(t, 0.0, True, random.Random(s)) for s in range(2000)]
    assert 0.45 < sum(p is not None for p in picks) / 2000 < 0.55
    share = sum(p is Method.REEXECUTION for p in picks) / sum(p is not None for p in picks)
    assert 0.2 < share < 0.3
    assert all(verify.select(t, 0.0, False, random.Random(s)) in (None, Method.TEACHER_FORCED)
               for s in range(200))
    a, b = random.Random(9), random.Random(9)
    assert ([verify.select(t, 0.0, True, a) for _ in range(50)]
            == [verify.select(t, 0.0, True, b) for _ in range(50)])


def test_the_verifier_is_never_of_the_checked_owner_and_trust_ranks_first() -> None:
    c = [verify.Candidate("a", "alice", 0.95), verify.Candidate("b", "bob", 0.99),
         verify.Candidate("o", "ops", 0.7, designated_trusted=True),
         verify.Candidate("q", "quinn", 0.0)]
    rng = random.Random(0)
    assert verify.choose_verifier(c, {"ops"}, rng) == (c[1], True)
    assert verify.choose_verifier(c, set(), rng) == (c[2], True)
    assert verify.choose_verifier(c[:1], {"bob"}, rng) == (c[0], True)
    low = [verify.Candidate("x", "xavier", 0.75)]
    assert verify.choose_verifier(low, set(), rng) == (low[0], False)
    assert verify.choose_verifier(c, {"alice", "bob", "ops"}, rng) is None  # quarantined: 0


def _scores(lps, top=None, mass=None, exp=None, var=None) -> Scores:
    n = len(lps)
    return Scores(tuple(lps), tuple(top or lps), tuple(mass or [0.0] * n),
                  tuple(exp or lps), tuple(var or [0.0] * n))


def test_greedy_tokens_must_be_the_models_choice() -> None:
    claim = Claim((1, 2, 3), (-0.1, -0.2, -0.3), temperature=0)
    assert verify.judge_scores(claim, _scores([-0.1, -0.2, -0.3])).passed
    bad = verify.judge_scores(claim, _scores([-0.1, -2.2, -0.3], top=[-0.1, -0.2, -0.3]))
    assert bad.outcome is Outcome.FAIL and "token 1" in bad.reason
    assert bad.greedy_gap_max == pytest.approx(2.0)
    tie = verify.judge_scores(claim, _scores([-0.1, -0.2, -0.3], top=[-0.1, -0.15, -0.3]))
    assert tie.passed  # a near tie float noise can flip is tolerated


def test_reported_logprobs_must_match_and_must_be_sent() -> None:
    truth = _scores([-1.0] * 20)
    near = Claim(tuple(range(20)), tuple([-1.0001] * 20), temperature=0)
    assert verify.judge_scores(near, truth).passed
    fp32 = verify.FP32_TOLERANCE
    quantized = Claim(tuple(range(20)), tuple([-1.002] * 20), temperature=0)
    assert verify.judge_scores(quantized, truth).passed  # within the 16-bit tolerance
    failed = verify.judge_scores(quantized, truth, fp32)
    assert failed.outcome is Outcome.FAIL and "on average" in failed.reason
    one_off = Claim(tuple(range(20)), tuple([-1.0] * 19 + [-4.0]), temperature=0)
    assert "token 19" in verify.judge_scores(one_off, truth).reason
    missing = Claim(tuple(range(20)), None, temperature=0)
    assert verify.judge_scores(missing, truth).outcome is Outcome.FAIL
    lenient = verify.Tolerance(logprobs_required=False)
    assert verify.judge_scores(missing, truth, lenient).passed
    nan = Claim(tuple(range(20)), tuple([math.nan] * 20), temperature=0)
    assert verify.judge_scores(nan, truth).outcome is Outcome.FAIL


def test_sampled_tokens_outside_the_nucleus_or_implausible_fail() -> None:
    n = 30
    claim = Claim(tuple(range(n)), tuple([-2.0] * n), temperature=1.0, top_p=0.9)
    ok = _scores([-2.0] * n, top=[-0.5] * n, mass=[0.5] * n, exp=[-2.0] * n, var=[1.0] * n)
    assert verify.judge_scores(claim, ok).passed
    outside = _scores([-2.0] * n, top=[-0.5] * n, mass=[0.5] * (n - 1) + [0.97],
                      exp=[-2.0] * n, var=[1.0] * n)
    assert "nucleus" in verify.judge_scores(claim, outside).reason
    unlikely = _scores([-2.0] * n, top=[-0.5] * n, mass=[0.5] * n, exp=[-0.5] * n,
                       var=[0.1] * n)  # the model expected far likelier tokens
    v = verify.judge_scores(claim, unlikely)
    assert v.outcome is Outcome.FAIL and v.z is not None and v.z < -6


def test_a_verifier_answer_of_the_wrong_size_is_inconclusive() -> None:
    claim = Claim((1, 2), (-1.0, -1.0), temperature=0)
    v = verify.judge_scores(claim, _scores([-1.0]))
    assert v.outcome is Outcome.INCONCLUSIVE
    assert verify.judge_scores(Claim((), (), 0), _scores([])).passed


def test_reexecution_reports_the_first_divergence() -> None:
    claim = Claim((5, 6, 7, 8), None, temperature=0)
    assert verify.compare_reexecution(claim, [5, 6, 7, 8]).passed
    v = verify.compare_reexecution(claim, [5, 6, 9, 8])
    assert v.outcome is Outcome.INCONCLUSIVE and v.first_divergence == 2
    assert verify.compare_reexecution(claim, [5, 6]).first_divergence == 2
    assert verify.compare_reexecution(claim, [5, 6, 7, 8, 1]).first_divergence == 4


def test_identical_replays_still_compare_the_reported_numbers() -> None:
    replay_lps = [-0.5, -0.25, -1.0]
    honest = Claim((1, 2, 3), (-0.5, -0.25, -1.0000004), temperature=0)
    v = verify.compare_reexecution(honest, [1, 2, 3], replay_lps, verify.FP32_TOLERANCE)
    assert v.passed and v.reason == "identical" and v.logprob_diff_max is not None
    rounded = Claim((1, 2, 3), (-0.501, -0.2515, -1.002), temperature=0)  # same tokens
    v = verify.compare_reexecution(rounded, [1, 2, 3], replay_lps, verify.FP32_TOLERANCE)
    assert v.outcome is Outcome.FAIL and v.method is Method.REEXECUTION
    silent = Claim((1, 2, 3), None, temperature=0)
    assert not verify.compare_reexecution(silent, [1, 2, 3], replay_lps).passed
    assert verify.compare_reexecution(silent, [1, 2, 3]).passed  # nothing to compare with


def test_metering_claims_are_checked_against_what_was_received() -> None:
    assert verify.check_metering(claimed_prompt_tokens=5, claimed_completion_tokens=3,
                                 sent_prompt_tokens=5, received_tokens=3) is None
    v = verify.check_metering(claimed_prompt_tokens=5, claimed_completion_tokens=9,
                              sent_prompt_tokens=5, received_tokens=3)
    assert v is not None and v.method is Method.METERING and v.outcome is Outcome.FAIL


def test_tolerance_follows_the_models_precision() -> None:
    assert verify.tolerance_for(4.0) is verify.FP32_TOLERANCE
    assert verify.tolerance_for(2.0) is verify.DEFAULT_TOLERANCE
    # a quantized GGUF (Q4_1: 0.72 bytes a weight) checked across backends
    assert verify.tolerance_for(0.72) is verify.QUANTIZED_TOLERANCE


@settings(deadline=None)
@given(st.lists(st.tuples(st.floats(-20, 0), st.floats(0, 1e-6)), min_size=1, max_size=64),
       st.sampled_from([0.0, 0.7, 1.0]))
def test_honest_work_always_passes(rows: list[tuple[float, float]], temperature: float) -> None:
    """Whatever the model's numbers, a claim that reports them (within fp32 noise) passes."""
    lps = [lp for lp, _ in rows]
    claim = Claim(tuple(range(len(rows))), tuple(lp + noise for lp, noise in rows), temperature)
    scores = _scores(lps, var=[1.0] * len(rows))
    assert verify.judge_scores(claim, scores, verify.FP32_TOLERANCE).passed


def test_metering_bounds() -> None:
    ok = verify.check_metering_bounds(busy_s=2.0, energy_j=2.0 * 300, wall_s=2.1,
                                      device_class="laptop")
    assert ok is None
    for busy_s, energy_j, wall_s in ((1e12, 0.0, 3.0), (2.0, 2.0 * 300 + 1, 2.1),
                                     (math.inf, 0.0, 3.0), (1.0, math.nan, 3.0), (-1.0, 0, 3)):
        v = verify.check_metering_bounds(busy_s=busy_s, energy_j=energy_j, wall_s=wall_s,
                                         device_class="laptop")
        assert v is not None and v.outcome is Outcome.FAIL and v.method is Method.METERING
    # an unknown class gets the default ceiling, not an unbounded one
    assert verify.check_metering_bounds(busy_s=1.0, energy_j=1e6, wall_s=1.0,
                                        device_class="toaster") is not None

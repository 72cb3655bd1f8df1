"""The Beta posterior of a node's honesty, and the quarantine rule (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparecycles.trust.reputation import (
    NodeTrust,
    ReputationConfig,
    beta_cdf,
    honesty_lower_bound,
    new_trust,
    record_check,
    reputation,
)


def _run(outcomes: list[bool], config: ReputationConfig = ReputationConfig()) -> NodeTrust:
    t = new_trust("n", config)
    for ok in outcomes:
        t = record_check(t, ok, "why", config)
    return t


def test_a_new_node_works_but_is_not_trusted() -> None:
    t = new_trust("n")
    assert 0.5 <= reputation(t) < 0.9


def test_a_cheater_is_quarantined_at_its_third_failure() -> None:
    t = _run([False, False])
    assert not t.quarantined and reputation(t) == 0.5
    t = record_check(t, False, "token 3 is not the model's choice")
    assert t.quarantined and reputation(t) == 0.0
    assert "3 failed checks of 3" in t.quarantine_reason and "token 3" in t.quarantine_reason


def test_an_honest_node_earns_trust_and_survives_a_false_positive() -> None:
    t = _run([True] * 9)
    assert reputation(t) > 0.9
    t = _run([True] * 100 + [False] * 3)
    assert not t.quarantined and reputation(t) > 0.9
    assert t.consecutive_clean == 0 and t.failures == 3


def test_designated_nodes_are_trusted_and_never_quarantined() -> None:
    t = new_trust("ops", designated_trusted=True)
    for _ in range(5):
        t = record_check(t, False)
    assert not t.quarantined and reputation(t) == 1.0


def test_beta_cdf_against_closed_forms() -> None:
    for x in (0.1, 0.37, 0.5, 0.93):
        assert beta_cdf(x, 1, 1) == pytest.approx(x)
        assert beta_cdf(x, 2, 1) == pytest.approx(x**2)
        assert beta_cdf(x, 1, 3) == pytest.approx(1 - (1 - x) ** 3)
    assert beta_cdf(0.0, 3, 4) == 0.0 and beta_cdf(1.0, 3, 4) == 1.0


def test_the_lower_bound_is_a_5pct_quantile() -> None:
    t = NodeTrust("n", 2.0, 1.0)  # CDF x^2: the 5% quantile is sqrt(0.05)
    assert honesty_lower_bound(t) == pytest.approx(0.05**0.5, abs=1e-9)


@settings(deadline=None)
@given(st.lists(st.booleans(), max_size=60))
def test_posterior_bookkeeping(outcomes: list[bool]) -> None:
    t = _run(outcomes)
    assert t.checks == len(outcomes) and t.failures == outcomes.count(False)
    assert t.alpha == 3 + outcomes.count(True) and t.beta == 1 + outcomes.count(False)
    assert 0 <= honesty_lower_bound(t) <= t.mean <= 1
    if t.quarantined:
        assert t.failures >= 3

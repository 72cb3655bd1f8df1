"""Learned stays (scheduling/stays.py): Kaplan-Meier with censoring, per class and per node, and
how well it predicts churn that is diurnal and correlated (not a renewal process)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from sparecycles import availability as av
from sparecycles.scheduling import stays
from sparecycles.sim.churn import AvailabilitySpec, realise, shared_moments
from sparecycles.types import AvailabilityPolicy

EPOCH = 1_700_158_546.0
DAY = 86_400.0


def test_without_censoring_it_is_the_empirical_law() -> None:
    lengths = [100.0, 200.0, 200.0, 400.0, 1000.0]
    km = stays.kaplan_meier((x, True) for x in lengths)
    assert km.s(50.0) == 1.0
    assert km.s(150.0) == pytest.approx(0.8)
    assert km.s(300.0) == pytest.approx(0.4)
    assert km.s(500.0) == pytest.approx(0.2)
    # the integral of S is the sample mean, up to the last session (the tail takes over there)
    assert km.integral(1000.0) == pytest.approx(np.mean(lengths), rel=0.01)
    assert km.residual_s(150.0) > 0 and km.residual_s(10_000.0) > 0  # never "leaves at once"


def test_censored_sessions_do_not_bias_the_estimate_down() -> None:
    rng = random.Random(1)
    sessions = []
    for _ in range(4000):
        length, cut = rng.expovariate(1 / 1000.0), rng.uniform(0.0, 2000.0)
        sessions.append((min(length, cut), length <= cut))
    naive = np.mean([x for x, _ in sessions])
    km = stays.kaplan_meier(sessions)
    assert naive < 700  # the lengths seen are short: many were cut
    assert km.mean_s == pytest.approx(1000.0, rel=0.08)
    # memoryless: a node up for 500 s is expected to stay about as long as a new one
    assert km.residual_s(500.0) == pytest.approx(1000.0, rel=0.12)
    assert km.residual_s(500.0, horizon_s=300.0) <= 300.0


def test_a_class_with_only_censored_sessions_is_expected_to_stay() -> None:
    km = stays.kaplan_meier([(3600.0, False)] * 5)
    assert math.isinf(km.residual_s(100.0))
    assert km.residual_s(100.0, horizon_s=600.0) == pytest.approx(600.0)


def test_a_node_s_own_history_takes_over_from_its_class_s() -> None:
    learner = stays.StayLearner(node_prior=8.0)
    for i in range(200):  # the class: sessions of ~1 hour
        learner.observe("pc", f"other{i}", 3600.0, True)
    assert learner.residual_s("pc", "new", 0.0) == pytest.approx(3600.0, rel=0.05)
    for _ in range(8):  # this node: sessions of ~10 minutes
        learner.observe("pc", "short", 600.0, True)
    halfway = learner.residual_s("pc", "short", 0.0)
    assert 600.0 < halfway < 3600.0
    for _ in range(200):
        learner.observe("pc", "short", 600.0, True)
    assert learner.residual_s("pc", "short", 0.0) < 0.5 * halfway  # its own history dominates
    assert learner.residual_s("unknown-class", "x", 0.0) == pytest.approx(stays.prior_mean_s)


def test_a_window_end_is_a_censored_session_not_a_departure() -> None:
    policy = AvailabilityPolicy(windows=((9 * 60, 17 * 60),))
    day = EPOCH - (EPOCH % DAY)
    assert stays.ended_by_window(policy, day + 17 * 3600)
    assert not stays.ended_by_window(policy, day + 12 * 3600)
    assert not stays.ended_by_window(AvailabilityPolicy(), day + 17 * 3600)


def _realised_residuals(spec: AvailabilitySpec, nodes: int, seed: int):
    """Per node: intervals over 14 days (7 of history, 7 to test on)."""
    moments = shared_moments(random.Random(f"{seed}:class"), spec.correlated_events_per_day,
                             14 * DAY)  # fmt: skip
    rng = random.Random(seed)
    return [realise(rng, spec, EPOCH, 14 * DAY, 0, moments).intervals for _ in range(nodes)]


@pytest.mark.parametrize("diurnal, correlated", [(0.9, 0.0), (0.0, 0.6), (0.9, 0.6)])
def test_learned_stays_beat_the_assumed_law_under_diurnal_and_correlated_churn(
    diurnal: float, correlated: float
) -> None:
    """Sessions drawn with a time-of-day-dependent scale and class-wide departure moments: the
    Weibull fit (what a coordinator would assume) misjudges the stays; the learner, trained on a
    week of sessions, predicts the next week's remaining stays with little bias."""
    up = av.StayModel.from_hours(0.6, 2.0)
    spec = AvailabilitySpec(kind="weibull", up=up, down=av.StayModel.from_hours(0.6, 1.0),
                            diurnal_amplitude=diurnal, correlated_events_per_day=8.0,
                            correlated_leave_fraction=correlated)  # fmt: skip
    fleet = _realised_residuals(spec, 150, seed=3)
    learner = stays.StayLearner()
    for i, intervals in enumerate(fleet):
        for a, b in intervals:
            if a >= 0.0 and b <= 7 * DAY:
                learner.observe("pc", f"n{i}", b - a, True)
    horizon = 6 * 3600.0
    rng = random.Random(9)
    predicted_learned, predicted_weibull, realised = [], [], []
    for _ in range(3000):
        i, t = rng.randrange(len(fleet)), rng.uniform(7 * DAY, 13 * DAY)
        for a, b in fleet[i]:
            if a <= t < b:
                realised.append(min(b - t, horizon))
                predicted_learned.append(learner.residual_s("pc", f"n{i}", t - a, horizon))
                predicted_weibull.append(av.residual_stay_s(up, t - a, horizon))
                break
    real = np.mean(realised)
    learned_bias = abs(np.mean(predicted_learned) - real) / real
    weibull_bias = abs(np.mean(predicted_weibull) - real) / real
    assert learned_bias < 0.15, (learned_bias, weibull_bias)
    if correlated:
        assert learned_bias < weibull_bias


def test_the_coordinator_learns_from_the_sessions_it_sees() -> None:
    """Live: NodeConn.set_draining (called when a node's heartbeat says it is unavailable, it
    announces a drain or its socket closes) is one session; the snapshot's expected stay comes
    from the learner, not from an assumed law."""
    from sparecycles.coordinator.node_conn import NodeConn
    from sparecycles.scheduling.presets import DEVICE_PRESETS

    async def send(_frame: str) -> None:
        return None

    learner = stays.StayLearner()
    conn = NodeConn(node_id="n", owner_id="o", name="n", public_key="",
                    profile=DEVICE_PRESETS["laptop"], policy=AvailabilityPolicy(), models=(),
                    weights={}, jobs_max=4, send_raw=send, stays=learner,
                    up_since_s=EPOCH)  # fmt: skip
    for k in range(30):  # sessions of 10 minutes, 10 minutes apart
        start = EPOCH + k * 1200.0
        conn.set_draining(False, start)
        conn.set_draining(True, start + 600.0)
    assert learner.sessions("n") == 30
    conn.set_draining(False, EPOCH + 40_000.0)
    stay = conn.snapshot(EPOCH + 40_060.0).expected_stay_s  # up for a minute
    grace = AvailabilityPolicy().drain_grace_s
    assert stay - grace == pytest.approx(540.0, rel=0.1)  # what is left of its usual 10 minutes
    without = NodeConn(node_id="m", owner_id="o", name="m", public_key="",
                       profile=DEVICE_PRESETS["laptop"], policy=AvailabilityPolicy(), models=(),
                       weights={}, jobs_max=4, send_raw=send)  # fmt: skip
    assert math.isinf(without.snapshot(EPOCH).expected_stay_s)  # no learner: the window alone

"""Availability: windows (with midnight), power, load, temperature, and the expected stay."""

from __future__ import annotations

import calendar
import math

import numpy as np
import pytest

from sparecycles import availability as av
from sparecycles.coordinator.node_conn import policy_from_dict
from sparecycles.types import AvailabilityPolicy

HOUR = 3600.0
DAY0 = 1_700_006_400.0  # 2023-11-15 00:00 UTC, a whole number of days since the epoch


def at(hour: float, minute: float = 0.0) -> float:
    return DAY0 + hour * HOUR + minute * 60.0


def test_no_policy_means_always_available() -> None:
    policy = AvailabilityPolicy()
    assert av.is_available(policy, av.DeviceStatus(), at(3))
    assert math.isinf(av.window_remaining_s(policy, at(3)))
    assert av.expected_stay_s(policy, av.DeviceStatus(), at(3)) == math.inf


def test_window_crossing_midnight() -> None:
    nights = AvailabilityPolicy(windows=((22 * 60, 7 * 60),))
    assert av.in_window(nights, at(23))
    assert av.in_window(nights, at(2))
    assert not av.in_window(nights, at(12))
    assert not av.in_window(nights, at(7))  # end exclusive
    assert av.window_remaining_s(nights, at(23)) == pytest.approx(8 * HOUR)
    assert av.window_remaining_s(nights, at(6, 30)) == pytest.approx(30 * 60)


def test_touching_windows_join_and_a_full_day_is_unbounded() -> None:
    split = AvailabilityPolicy(windows=((1320, 1440), (0, 420)))
    assert av.window_remaining_s(split, at(23)) == pytest.approx(8 * HOUR)
    full = AvailabilityPolicy(windows=((0, 720), (720, 1440)))
    assert math.isinf(av.window_remaining_s(full, at(5)))


def test_utc_offset_shifts_the_local_day() -> None:
    # 09:00-17:00 local in UTC+2 is 07:00-15:00 UTC
    office = AvailabilityPolicy(windows=((9 * 60, 17 * 60),), utc_offset_minutes=120)
    assert av.in_window(office, at(7))
    assert not av.in_window(office, at(16))
    assert av.local_minute(office, at(7)) == pytest.approx(9 * 60)


def utc(*ymdhm: int) -> float:
    return float(calendar.timegm((*ymdhm, 0)))


def test_windows_follow_the_owners_time_zone_across_daylight_saving() -> None:
    """Europe/Berlin is UTC+1 in winter, UTC+2 from 2026-03-29 to 2026-10-25: a window of
    09:00-17:00 local starts an hour earlier in UTC in summer, and a night window that spans
    the change is an hour shorter (March) or longer (October)."""
    office = policy_from_dict({"windows": [[9 * 60, 17 * 60]], "time_zone": "Europe/Berlin"})
    assert av.in_window(office, utc(2026, 3, 27, 8, 30))  # 09:30 CET
    assert not av.in_window(office, utc(2026, 3, 27, 7, 30))  # 08:30 CET
    assert av.in_window(office, utc(2026, 3, 30, 7, 30))  # 09:30 CEST
    assert not av.in_window(office, utc(2026, 3, 30, 15, 30))  # 17:30 CEST
    assert av.local_minute(office, utc(2026, 3, 30, 7, 30)) == pytest.approx(9 * 60 + 30)
    assert av.window_remaining_s(office, utc(2026, 3, 30, 14, 0)) == pytest.approx(HOUR)
    assert av.window_wait_s(office, utc(2026, 3, 30, 6, 0)) == pytest.approx(HOUR)
    assert av.in_window(office, utc(2026, 10, 26, 8, 30))  # 09:30 CET again
    assert not av.in_window(office, utc(2026, 10, 26, 7, 30))

    nights = policy_from_dict({"windows": [[22 * 60, 7 * 60]], "time_zone": "Europe/Berlin"})
    # 22:00 CET on 28 March to 07:00 CEST on 29 March: 8 hours, not 9
    assert av.window_remaining_s(nights, utc(2026, 3, 28, 21, 0)) == pytest.approx(8 * HOUR)
    assert not av.in_window(nights, utc(2026, 3, 29, 5, 0))  # 07:00 CEST
    # 22:00 CEST on 24 October to 07:00 CET on 25 October: 10 hours
    assert av.window_remaining_s(nights, utc(2026, 10, 24, 20, 0)) == pytest.approx(10 * HOUR)
    assert av.in_window(nights, utc(2026, 10, 25, 5, 30))  # 06:30 CET
    assert av.window_wait_s(nights, utc(2026, 10, 25, 6, 0)) == pytest.approx(15 * HOUR)


def test_a_policy_with_an_offset_keeps_its_fixed_offset() -> None:
    old = policy_from_dict({"windows": [[9 * 60, 17 * 60]], "utc_offset_minutes": 60})
    assert av.in_window(old, utc(2026, 3, 30, 8, 30))  # 09:30 at UTC+1, all year round
    assert not av.in_window(old, utc(2026, 3, 30, 7, 30))


def test_an_unknown_time_zone_is_refused() -> None:
    with pytest.raises(ValueError, match="time zone"):
        policy_from_dict({"windows": [[0, 60]], "time_zone": "Europe/Atlantis"})
    with pytest.raises(ValueError, match="time zone"):
        policy_from_dict({"time_zone": "../../etc/passwd"})


def test_every_condition_must_hold() -> None:
    policy = AvailabilityPolicy(
        only_on_ac_power=True, owner_load_max=0.3, temperature_max_c=85.0, only_while_charging=True
    )
    good = av.DeviceStatus(on_ac_power=True, charging=True, owner_load=0.1, temperature_c=60.0)
    assert av.is_available(policy, good, at(1))
    for bad in (
        av.DeviceStatus(on_ac_power=False, charging=True, owner_load=0.1),
        av.DeviceStatus(on_ac_power=True, charging=False, owner_load=0.1),
        av.DeviceStatus(on_ac_power=True, charging=True, owner_load=0.5),
        av.DeviceStatus(on_ac_power=True, charging=True, temperature_c=90.0),
    ):
        assert not av.is_available(policy, bad, at(1))
        assert len(av.unavailable_reasons(policy, bad, at(1))) == 1
        assert av.expected_stay_s(policy, bad, at(1)) == 0.0
    # an unknown temperature does not block
    assert av.is_available(policy, av.DeviceStatus(charging=True, temperature_c=None), at(1))


def test_expected_stay_is_the_window_end_plus_grace_without_a_model() -> None:
    evenings = AvailabilityPolicy(windows=((18 * 60, 23 * 60),), drain_grace_s=30.0)
    assert av.expected_stay_s(evenings, av.DeviceStatus(), at(22)) == pytest.approx(HOUR + 30.0)


def test_exponential_residual_is_memoryless() -> None:
    model = av.StayModel(shape=1.0, scale_s=1000.0)
    assert av.residual_stay_s(model, 0.0) == pytest.approx(1000.0)
    assert av.residual_stay_s(model, 5000.0) == pytest.approx(1000.0)
    # capped at a horizon h: E[min(R, h)] = scale * (1 - exp(-h / scale))
    assert av.residual_stay_s(model, 77.0, 500.0) == pytest.approx(1000.0 * (1 - math.exp(-0.5)))


@pytest.mark.parametrize("model", [av.FTA_ND07CPU_UP, av.FTA_MICROSOFT99_UP, av.FTA_SKYPE06_UP])
@pytest.mark.parametrize(("age_s", "horizon_s"), [(0.0, 600.0), (HOUR, 2 * HOUR), (20 * HOUR, 1e6)])
def test_weibull_residual_matches_numerical_integration(
    model: av.StayModel, age_s: float, horizon_s: float
) -> None:
    u = np.linspace(age_s, age_s + horizon_s, 400_001)
    survival = np.exp(-((u / model.scale_s) ** model.shape))
    expected = np.trapezoid(survival, u) / math.exp(-((age_s / model.scale_s) ** model.shape))
    assert av.residual_stay_s(model, age_s, horizon_s) == pytest.approx(expected, rel=2e-3)


def test_weibull_mean_and_decreasing_hazard() -> None:
    model = av.FTA_ND07CPU_UP
    assert av.residual_stay_s(model, 0.0) == pytest.approx(model.mean_s)
    # shape < 1: the longer a node has been up, the longer it is expected to stay
    young, old = av.residual_stay_s(model, 60.0), av.residual_stay_s(model, 10 * HOUR)
    assert old > young


def test_expected_stay_combines_window_model_and_age() -> None:
    policy = AvailabilityPolicy(windows=((0, 1440),), drain_grace_s=0.0)
    whole_day = AvailabilityPolicy(drain_grace_s=0.0)
    model = av.FTA_ND07CPU_UP
    stay = av.expected_stay_s(whole_day, av.DeviceStatus(), at(12), up_since_s=at(11), model=model)
    assert stay == pytest.approx(av.residual_stay_s(model, HOUR))
    near_end = AvailabilityPolicy(windows=((0, 12 * 60 + 10),), drain_grace_s=0.0)
    stay = av.expected_stay_s(near_end, av.DeviceStatus(), at(12), up_since_s=at(0), model=model)
    assert stay <= 600.0
    assert stay == pytest.approx(av.residual_stay_s(model, 12 * HOUR, 600.0))
    assert math.isinf(av.window_remaining_s(policy, at(3)))  # one window of the whole day

"""The dashboard's forms: reading a urlencoded body within limits, and validating each form.

Each parser turns the posted strings into exactly the values the store takes, or raises
``InvalidRequest`` with a sentence the page shows next to the form.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any
from urllib.parse import parse_qs

from fastapi import Request

from sparecycles import availability
from sparecycles.errors import InvalidRequest, PayloadTooLarge
from sparecycles.ledger.pricing import parse_money

form_bytes_max = 16_384
field_chars_max = 500
key_name_chars_max = 100
windows_max = 8
utc_offset_minutes_max = 14 * 60
drain_grace_s_max = 3600.0
temperature_c_max = 150.0
requests_per_minute_max = 100_000
_window = re.compile(r"^\s*([01]?\d|2[0-3]):([0-5]\d)\s*-\s*([01]?\d|2[0-3]|24):([0-5]\d)\s*$")


async def read_form(request: Request) -> dict[str, str]:
    """The first value of each field of a urlencoded form (at most ``form_bytes_max``)."""
    if not request.headers.get("content-type", "").startswith(
            "application/x-www-form-urlencoded"):
        raise InvalidRequest("the form must be sent urlencoded")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > form_bytes_max:
            raise PayloadTooLarge(f"a form is at most {form_bytes_max} bytes")
    try:
        fields = parse_qs(body.decode(), keep_blank_values=True, max_num_fields=50)
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest("the form could not be read") from None
    return {k: v[0][:field_chars_max] for k, v in fields.items() if v}


def _number(text: str, what: str, lo: float, hi: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InvalidRequest(f"{what} must be a number") from None
    if not math.isfinite(value) or not lo <= value <= hi:
        raise InvalidRequest(f"{what} must be between {lo:g} and {hi:g}")
    return value


def parse_windows(text: str) -> list[list[int]]:
    """``"22:00-07:00, 12:00-13:30"`` -> ``[[1320, 420], [720, 810]]`` (minutes of the day)."""
    out: list[list[int]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = _window.match(part)
        if m is None:
            raise InvalidRequest(f"a time window looks like 22:00-07:00, not {part[:40]!r}")
        start = int(m[1]) * 60 + int(m[2])
        end = (int(m[3]) * 60 + int(m[4])) % 1440
        if start == end:
            raise InvalidRequest(f"the window {part} is empty; leave windows blank for all day")
        out.append([start, end])
    if len(out) > windows_max:
        raise InvalidRequest(f"at most {windows_max} time windows")
    return out


def parse_policy(form: dict[str, str]) -> dict[str, Any]:
    """An ``AvailabilityPolicy`` as stored on the node's row, marked as set by its owner."""
    temperature = form.get("temperature_max_c", "").strip()
    return {
        "windows": parse_windows(form.get("windows", "")),
        "utc_offset_minutes": int(_number(form.get("utc_offset_minutes", "0") or "0",
                                          "the UTC offset (minutes)", -utc_offset_minutes_max,
                                          utc_offset_minutes_max)),
        "time_zone": _time_zone(form.get("time_zone", "")),
        "only_on_ac_power": form.get("only_on_ac_power") == "on",
        "only_while_charging": form.get("only_while_charging") == "on",
        "owner_load_max": round(_number(form.get("owner_load_max_pct", "100") or "100",
                                        "your own load limit (%)", 0, 100) / 100, 4),
        "temperature_max_c": (None if not temperature else
                              _number(temperature, "the temperature limit (°C)", 0,
                                      temperature_c_max)),
        "drain_grace_s": _number(form.get("drain_grace_s", "30") or "0",
                                 "the drain grace (s)", 0, drain_grace_s_max),
        "set_by": "owner",
        "set_at_s": round(time.time(), 3),
    }


def _time_zone(text: str) -> str:
    """An IANA time zone name, or "" (the windows then use the UTC offset)."""
    name = text.strip()
    if not name:
        return ""
    try:
        return availability.check_time_zone(name)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


def parse_key_name(form: dict[str, str]) -> str:
    name = " ".join(form.get("name", "").split())
    if not 1 <= len(name) <= key_name_chars_max:
        raise InvalidRequest(f"a key's name is 1 to {key_name_chars_max} characters")
    return name


def parse_limits(form: dict[str, str]) -> tuple[int | None, int | None]:
    """(budget in micro-units per month, requests per minute); blank means no limit."""
    budget_text = form.get("budget", "").strip()
    rpm_text = form.get("requests_per_minute", "").strip()
    budget = parse_money(budget_text) if budget_text else None
    rpm = None
    if rpm_text:
        if not rpm_text.isdigit():
            raise InvalidRequest("requests per minute is a whole number")
        rpm = int(rpm_text)
        if not 1 <= rpm <= requests_per_minute_max:
            raise InvalidRequest(f"requests per minute is 1 to {requests_per_minute_max}")
    return budget, rpm


def _hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


def policy_form_values(policy: dict[str, Any]) -> dict[str, Any]:
    """An availability policy as the owner's form shows it."""
    windows = policy.get("windows") or []
    return {
        "windows": ", ".join(f"{_hhmm(int(a))}-{_hhmm(int(b))}" for a, b in windows),
        "utc_offset_minutes": int(policy.get("utc_offset_minutes", 0) or 0),
        "time_zone": str(policy.get("time_zone", "") or ""),
        "only_on_ac_power": bool(policy.get("only_on_ac_power", False)),
        "only_while_charging": bool(policy.get("only_while_charging", False)),
        "owner_load_max_pct": round(100 * float(policy.get("owner_load_max", 1.0) or 0)),
        "temperature_max_c": policy.get("temperature_max_c"),
        "drain_grace_s": float(policy.get("drain_grace_s", 30.0) or 0),
        "set_by": policy.get("set_by", "node"),
    }

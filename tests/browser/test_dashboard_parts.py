"""The dashboard's parts without a server: the fleet sampler and its series, form parsing,
sessions and the chart helpers."""

from __future__ import annotations

import calendar
import time

import pytest

from sparecycles.api.dashboard import charts as ch
from sparecycles.api.dashboard import forms as forms
from sparecycles.api.dashboard import session as sess
from sparecycles.errors import InvalidRequest
from sparecycles.store import Store
from sparecycles.store.dashboard_queries import (
    DashboardQueries,
    month_start_s,
    node_samples_keep_s,
)


@pytest.fixture
def store() -> Store:
    s = Store("sqlite://")
    s.create_all()
    return s


def _node(store: Store, node_id: str, cls: str) -> None:
    store.node_connected(node_id=node_id, owner_id=store.ensure_owner("o"), name=node_id,
                         public_key="pk", profile={"device_class": cls}, models=[],
                         availability={}, agent_version="t", replica_id="r")


def test_node_samples_per_class_and_rate_limited(store: Store) -> None:
    q = DashboardQueries(store.sessions)
    now = time.time()
    assert q.record_node_sample(now) == 1  # nobody online: one row of class ""
    _node(store, "n1", "laptop")
    _node(store, "n2", "laptop")
    _node(store, "n3", "car")
    store.insert_job(id="j1", client_id=store.ensure_client("c"), model="m", endpoint="e",
                     state="admitted", prompt_tokens=1, max_tokens=1, created_at_s=now)
    store.insert_job(id="j2", client_id=store.ensure_client("c"), model="m", endpoint="e",
                     state="admitted", prompt_tokens=1, max_tokens=1, created_at_s=now)
    store.start_attempt(job_id="j2", attempt=1, node_id="n1", prompt_tokens=1)
    assert q.record_node_sample(now + 10) == 0  # another sample is younger than 30 s
    assert q.record_node_sample(now + 60) == 2
    fleet = {(r[1]): r for r in q.fleet_series(now + 30, now + 90, 60)}
    assert fleet["laptop"][2] == 2 and fleet["laptop"][3] == 1  # online, busy
    assert fleet["car"][2] == 1 and fleet["car"][3] == 0
    assert fleet["laptop"][5] == 1  # j1 waits for a node
    store.set_node_status("n3", "offline")
    assert q.record_node_sample(now + node_samples_keep_s + 120) == 1  # and prunes the old
    rows = q.fleet_series(0, now + 10 * node_samples_keep_s, 60)
    assert [r[1] for r in rows] == ["laptop"]


def test_time_windows() -> None:
    assert forms.parse_windows("22:00-07:00, 12:00-13:30") == [[1320, 420], [720, 810]]
    assert forms.parse_windows("23:00-24:00") == [[1380, 0]]
    assert forms.parse_windows("  ") == []
    for bad in ("25:00-01:00", "10:00-10:00", "noon-1", "1-2"):
        with pytest.raises(InvalidRequest):
            forms.parse_windows(bad)
    shown = forms.policy_form_values({"windows": [[1320, 420]], "owner_load_max": 0.25})
    assert shown["windows"] == "22:00-07:00" and shown["owner_load_max_pct"] == 25


def test_policy_and_limits_forms() -> None:
    policy = forms.parse_policy({"windows": "", "utc_offset_minutes": "-300",
                                 "owner_load_max_pct": "80", "temperature_max_c": "85",
                                 "drain_grace_s": "10", "only_while_charging": "on"})
    assert policy["utc_offset_minutes"] == -300 and policy["owner_load_max"] == 0.8
    assert policy["only_while_charging"] and not policy["only_on_ac_power"]
    assert policy["time_zone"] == ""
    zoned = forms.parse_policy({"windows": "22:00-07:00", "time_zone": " Europe/Berlin "})
    assert zoned["time_zone"] == "Europe/Berlin"
    assert forms.policy_form_values(zoned)["time_zone"] == "Europe/Berlin"
    with pytest.raises(InvalidRequest, match="time zone"):
        forms.parse_policy({"time_zone": "Mars/Olympus_Mons"})
    with pytest.raises(InvalidRequest):
        forms.parse_policy({"owner_load_max_pct": "150"})
    with pytest.raises(InvalidRequest):
        forms.parse_policy({"drain_grace_s": "nan"})
    assert forms.parse_limits({"budget": "12.50", "requests_per_minute": "60"}) == (
        12_500_000, 60)
    assert forms.parse_limits({"budget": "", "requests_per_minute": ""}) == (None, None)
    for bad in ({"budget": "-1"}, {"requests_per_minute": "0"}, {"requests_per_minute": "1.5"}):
        with pytest.raises(InvalidRequest):
            forms.parse_limits(bad)


def test_sessions_expire_and_resist_tampering() -> None:
    secret, now = b"s" * 32, time.time()
    cookie = sess.make_session(secret, "key_1", now)
    key_id, nonce = sess.read_session(secret, cookie, now + 60) or ("", "")
    assert key_id == "key_1"
    assert sess.read_session(secret, cookie, now + sess.session_max_age_s + 1) is None
    assert sess.read_session(b"t" * 32, cookie, now) is None
    assert sess.csrf_ok(secret, nonce, sess.csrf_token(secret, nonce))
    assert not sess.csrf_ok(secret, nonce, sess.csrf_token(b"t" * 32, nonce))
    assert not sess.csrf_ok(secret, "other", sess.csrf_token(secret, nonce))


def test_secret_is_kept_beside_the_database(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(sess.SECRET_ENV, raising=False)
    url = f"sqlite:///{tmp_path / 'db' / 'x.db'}"
    first = sess.load_secret(url)
    assert first == sess.load_secret(url) and len(first) >= 32
    assert (tmp_path / "db" / sess.SECRET_FILE).stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv(sess.SECRET_ENV, "e" * 40)
    assert sess.load_secret(url) == b"e" * 40


def test_buckets_percentiles_and_months() -> None:
    bs = ch.buckets(1_000_000.0, 3600, 60)
    assert len(bs) == 60 and bs[-1] == 999_960 and bs[0] == 999_960 - 59 * 60
    assert ch.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert ch.percentile([1.0, 2.0, 3.0, 4.0], 95) == 4.0
    assert ch.percentile([], 50) is None
    assert month_start_s(calendar.timegm((2026, 11, 22, 4, 0, 0))) == calendar.timegm(
        (2026, 11, 1, 0, 0, 0))
    assert ch.money_short(2_538_306_952, "USD") == "2,538.31 USD"
    assert ch.money_short(44, "USD") == "0.000044 USD"
    assert ch.pct(-2_000_000.0) == "< -999 %"
    empty = ch.figure([], "time (UTC)", "nodes")
    assert empty["layout"]["xaxis"]["title"]["text"] == "time (UTC)"
    assert empty["layout"]["annotations"][0]["text"].startswith("no data")


def test_the_finance_page_names_the_cost_model_not_its_path(tmp_path, monkeypatch) -> None:
    """The page (and the screenshots taken of it) shows the cost model's file name, never the
    absolute path of the machine the coordinator runs on."""
    from sparecycles.api.dashboard.finance import finance
    from sparecycles.costs.costmodel import SHIPPED_EXAMPLE
    from sparecycles.ledger.pricing import PriceBook
    from sparecycles.ledger.service import Ledger

    model = tmp_path / "secret-dir" / "acme-costs.toml"
    model.parent.mkdir()
    model.write_text(SHIPPED_EXAMPLE.read_text())
    monkeypatch.setenv("SPARECYCLES_COST_MODEL", str(model))
    s = Store("sqlite://")
    s.create_all()

    class Coord:  # what the finance page reads of a coordinator
        store = s
        ledger = Ledger(s.sessions, prices=PriceBook.default())

    now = time.time()
    data = finance(Coord(), time.strftime("%Y-%m", time.gmtime(now)), now)
    assert data["tables"]["cost_model"] == "acme-costs.toml"
    assert "secret-dir" not in repr(data)

"""The dashboard over HTTP, in process (no browser): sign-in, roles, CSRF, and that an owner or a
client reaches only their own data, through the pages, the JSON and the forms."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
from dashboard_app import BASE, FakeCoordinator, dashboard_app, sign_in
from fastapi.testclient import TestClient

from sparecycles.api.dashboard import session as sess
from sparecycles.costs import focus
from sparecycles.ledger.service import WorkShare
from sparecycles.store import Store
from sparecycles.store.dashboard_queries import DashboardQueries


def _node(store: Store, node_id: str, owner: str, cls: str) -> str:
    owner_id = store.ensure_owner(owner)
    store.node_connected(node_id=node_id, owner_id=owner_id, name=f"{owner}-{cls}",
                         public_key="pk", profile={"device_class": cls}, models=[],
                         availability={}, agent_version="t", replica_id="r1")
    return owner_id


def _job(coord: FakeCoordinator, job_id: str, client: str, key_id: str, node_id: str,
         owner_id: str) -> None:
    client_id = coord.store.ensure_client(client)
    now = time.time()
    coord.store.insert_job(id=job_id, client_id=client_id, api_key_id=key_id, model="tiny",
                           endpoint="chat.completions", state="done", prompt_tokens=10,
                           max_tokens=20, completion_tokens=20, created_at_s=now - 5,
                           finished_at_s=now, total_s=1.5, time_to_first_token_s=0.2)
    coord.store.start_attempt(job_id=job_id, attempt=1, node_id=node_id, prompt_tokens=10)
    coord.store.end_attempt(job_id, 1, outcome="done", completion_tokens=20, busy_s=1.0,
                            energy_j=30.0, signature="sig")
    coord.store.update_job(job_id, state="done")  # start_attempt marked it placed
    coord.ledger.hold(job_id, client_id, "tiny", 10, 20)
    coord.ledger.settle(job_id, client_id, "tiny", 10, 20,
                        [WorkShare(owner_id, node_id, "laptop", 10, 20)])


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    app, coord = dashboard_app(monkeypatch, tmp_path)
    s = coord.store
    keys = {
        "admin": s.create_api_key("ops", "ops-admin", scopes=("admin",)),
        "acme": s.create_api_key("acme", "acme-prod"),
        "globex": s.create_api_key("globex", "globex-prod"),
        "alice": s.create_owner_key("alice"),
        "bob": s.create_owner_key("bob"),
    }
    alice = _node(s, "node-alice", "alice", "gaming-pc")
    bob = _node(s, "node-bob", "bob", "laptop")
    for name in ("acme", "globex"):
        coord.ledger.deposit(s.ensure_client(name), 10_000_000, f"top-up-{name}")
    _job(coord, "job-acme", "acme", keys["acme"][0], "node-alice", alice)
    _job(coord, "job-globex", "globex", keys["globex"][0], "node-bob", bob)
    DashboardQueries(s.sessions).record_node_sample(time.time())
    with TestClient(app, base_url=BASE) as client:
        yield client, keys, coord
    s.close()


def csrf(page: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', page)
    assert m is not None
    return m[1]


def test_pages_need_a_session_and_json_says_401(env) -> None:
    client, _, _ = env
    for path in ("/dashboard/network", "/dashboard/owner", "/dashboard/client",
                 "/dashboard/finance"):
        r = client.get(path, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/dashboard/login"
    for path in ("/dashboard/api/network", "/dashboard/api/owner", "/dashboard/api/client",
                 "/dashboard/api/finance", "/dashboard/finance/focus.csv"):
        assert client.get(path, follow_redirects=False).status_code in (401, 303)


def test_sign_in_sets_a_secure_cookie_and_refuses_bad_keys(env) -> None:
    client, keys, _ = env
    page = client.get("/dashboard/login")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    r = client.post("/dashboard/login", data={"key": keys["acme"][1], "csrf": csrf(page.text)},
                    follow_redirects=False)
    assert r.headers["location"] == "/dashboard/client"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/dashboard" in cookie
    client.cookies.clear()
    page = client.get("/dashboard/login")
    r = client.post("/dashboard/login", data={"key": "sk-sc-nope", "csrf": csrf(page.text)})
    assert r.status_code == 401 and "does not open the dashboard" in r.text
    # a sign-in without the form's token (login CSRF) is refused
    client.cookies.clear()
    r = client.post("/dashboard/login", data={"key": keys["acme"][1], "csrf": "x"})
    assert r.status_code == 403


def test_forged_or_tampered_session_is_ignored(env) -> None:
    client, keys, _ = env
    sign_in(client, keys["alice"][1])
    value = client.cookies.get(sess.SESSION_COOKIE)
    payload, mac = value.split(".")
    forged = sess.make_session(b"x" * 32, keys["admin"][0], time.time())
    for bad in (forged, payload + "." + mac[:-2] + "AA", "garbage"):
        client.cookies.clear()
        client.cookies.set(sess.SESSION_COOKIE, bad, path="/dashboard")
        assert client.get("/dashboard/api/network").status_code == 401


def test_roles(env) -> None:
    client, keys, _ = env
    sign_in(client, keys["acme"][1])
    assert client.get("/dashboard/network").status_code == 403
    assert client.get("/dashboard/api/finance").status_code == 403
    assert client.get("/dashboard/api/owner").status_code == 403
    sign_in(client, keys["alice"][1])
    assert client.get("/dashboard/client").status_code == 403
    assert client.get("/dashboard/api/network").status_code == 403
    sign_in(client, keys["admin"][1])
    assert client.get("/dashboard/api/network").status_code == 200
    assert client.get("/dashboard/api/finance").status_code == 200
    page = client.get("/dashboard/finance").text  # the month view of ``costs report``
    assert 'id="month-view"' in page and "Accrued to date" in page
    for label in ("price (revenue)", "variable cost", "contribution margin",
                  "fixed base, total", "break-even, tokens a month"):
        assert label in page
    r = client.get("/dashboard/finance/focus.csv")
    assert r.status_code == 200 and "attachment" in r.headers["content-disposition"]
    rows = focus.read_csv(r.text)
    assert focus.validate(*rows) == []


def test_an_owner_sees_only_their_devices(env) -> None:
    client, keys, _ = env
    sign_in(client, keys["alice"][1])
    page = client.get("/dashboard/owner")
    assert page.status_code == 200
    assert "alice-gaming-pc" in page.text and "bob-laptop" not in page.text
    data = client.get("/dashboard/api/owner").json()
    assert "bob" not in str(data) and "alice-gaming-pc" in str(data)


def test_an_owner_cannot_change_another_owners_policy(env) -> None:
    client, keys, coord = env
    sign_in(client, keys["alice"][1])
    token = csrf(client.get("/dashboard/owner").text)
    form = {"csrf": token, "windows": "22:00-07:00", "utc_offset_minutes": "60",
            "owner_load_max_pct": "50", "drain_grace_s": "20", "only_on_ac_power": "on"}
    r = client.post("/dashboard/owner/nodes/node-bob/policy", data=form, follow_redirects=False)
    assert r.status_code == 404
    assert coord.store.get_node("node-bob").availability == {}
    r = client.post("/dashboard/owner/nodes/node-alice/policy", data=form,
                    follow_redirects=False)
    assert r.status_code == 303
    policy = coord.store.get_node("node-alice").availability
    assert policy["windows"] == [[1320, 420]] and policy["only_on_ac_power"] is True
    assert policy["owner_load_max"] == 0.5 and policy["set_by"] == "owner"
    # without the CSRF token, or from another site, nothing changes
    r = client.post("/dashboard/owner/nodes/node-alice/policy", data={**form, "csrf": "x"})
    assert r.status_code == 403
    r = client.post("/dashboard/owner/nodes/node-alice/policy", data=form,
                    headers={"Origin": "https://evil.example"})
    assert r.status_code == 403
    r = client.post("/dashboard/owner/nodes/node-alice/policy",
                    data={**form, "windows": "25:00-99"})
    assert r.status_code == 400 and "22:00-07:00" in r.text


def test_a_client_sees_only_their_spend_and_keys(env) -> None:
    client, keys, _ = env
    sign_in(client, keys["acme"][1])
    page = client.get("/dashboard/client")
    assert "acme-prod" in page.text and "globex" not in page.text
    data = client.get("/dashboard/api/client?range=1h").json()
    assert "globex" not in str(data)
    spend = data["charts"]["spend"]["data"]
    assert [t["name"].split(" ")[0] for t in spend] == ["acme-prod"]


def test_a_client_manages_only_their_own_keys(env) -> None:
    client, keys, coord = env
    sign_in(client, keys["acme"][1])
    token = csrf(client.get("/dashboard/client").text)
    globex_key = keys["globex"][0]
    r = client.post(f"/dashboard/client/keys/{globex_key}/revoke", data={"csrf": token})
    assert r.status_code == 404
    r = client.post(f"/dashboard/client/keys/{globex_key}/limits",
                    data={"csrf": token, "budget": "1.00"})
    assert r.status_code == 404
    assert coord.store.authenticate_key(keys["globex"][1]) is not None
    r = client.post("/dashboard/client/keys", data={"csrf": token, "name": "batch"})
    assert r.status_code == 200
    new = re.search(r'id="new-key">(sk-sc-[^<]+)<', r.text)
    assert new is not None
    info = coord.store.authenticate_key(new[1])
    assert info is not None and info.scopes == frozenset({"inference"})
    assert info.client_name == "acme"
    r = client.post(f"/dashboard/client/keys/{info.key_id}/limits",
                    data={"csrf": token, "budget": "2.50", "requests_per_minute": "30"},
                    follow_redirects=False)
    assert r.status_code == 303
    q = DashboardQueries(coord.store.sessions)
    assert q.key_limits(info.key_id) == (2_500_000, 30)
    r = client.post(f"/dashboard/client/keys/{info.key_id}/revoke", data={"csrf": token},
                    follow_redirects=False)
    assert r.status_code == 303 and coord.store.authenticate_key(new[1]) is None


def test_owner_keys_belong_to_an_owner_and_no_client(env) -> None:
    _, keys, coord = env
    key = DashboardQueries(coord.store.sessions).key_by_secret(keys["alice"][1])
    assert key is not None and key.client_id is None and key.scopes == frozenset({"owner"})
    assert sess.roles_of(key) == frozenset({"owner"})


def test_revoking_the_key_ends_its_sessions(env) -> None:
    client, keys, coord = env
    sign_in(client, keys["globex"][1])
    assert client.get("/dashboard/api/client").status_code == 200
    coord.store.revoke_api_key(keys["globex"][0])
    assert client.get("/dashboard/api/client").status_code == 401


def test_static_assets_come_from_the_packages(env) -> None:
    client, _, _ = env
    r = client.get("/dashboard/static/plotly.min.js", headers={"Accept-Encoding": "gzip"})
    assert r.status_code == 200 and len(r.content) > 1_000_000  # decoded by the client
    assert client.get("/dashboard/static/dashboard.css").status_code == 200
    assert client.get("/dashboard/static/../app.py").status_code == 404
    assert client.get("/dashboard/static/secret.txt").status_code == 404

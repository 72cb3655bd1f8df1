"""Cheating nodes against the real network: real node processes that cheat (``--cheat MODE``,
test-only), an honest node, and the operator's own trusted node that verifies.

Each cheat must be caught: its earning withheld, its reputation lowered, and after repeated
failures the node quarantined (refused from then on). The client and admin boundary is here too:
scopes, per-key rate limits, budgets and concurrent streams (429 with Retry-After), trusted-only
keys, and no secret in any log.
"""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import openai
import pytest
from openai import OpenAI

from sparecycles.ledger.pricing import ModelPrice, PriceBook
from sparecycles.ledger.service import Ledger
from sparecycles.store.trust_queries import TrustQueries
from sparecycles.tools.localnet import LocalNetwork

pytestmark = pytest.mark.timeout(300)
CHEATS = ("random-tokens", "different-model", "bf16", "replay", "forged-signature", "overclaim")
rounds_s_max = 120.0  # a cheater checked on every job is quarantined at its third failure


@pytest.fixture(scope="module")
def net(tmp_path_factory, tiny_model_path):
    root = tmp_path_factory.mktemp("adversaries")
    network = LocalNetwork(root=root, models={"tiny": tiny_model_path},
                           # least-loaded with random ties: requests reach every node
                           env={"SPARECYCLES_ALLOW_CHEATS": "1",
                                "SPARECYCLES_SCHEDULER_POLICY": "least-loaded"},
                           coordinator_args=["--placement-wait-s", "20"])
    with network:
        store = network.store()
        store.ensure_owner("ops")
        TrustQueries(store.sessions).set_owner_trusted("ops", True)  # the operator's machine
        # a price at which a short answer earns its owner something that can be withheld
        Ledger(store.sessions, prices=PriceBook.default()).set_price(
            "tiny", ModelPrice(input_micros_per_mtok=1_000_000, output_micros_per_mtok=3_000_000))
        network.start_coordinator()
        network.start_node("ops-1", "ops")
        network.start_node("alice-pc", "alice")
        for mode in CHEATS:
            network.start_node(f"cheat-{mode}", f"mallory-{mode}", extra_args=["--cheat", mode])
        network.wait_ready(2 + len(CHEATS), timeout_s=150)
        _id, key = store.create_api_key("acme", "e2e")
        _id, admin = store.create_api_key("ops-admin", "admin", ("admin",))
        Ledger(store.sessions, prices=PriceBook.default()).deposit(
            store.ensure_client("acme"), 50_000_000, reference="adversaries-topup")
        network.key, network.admin = key, admin  # type: ignore[attr-defined]
        network.secrets = [key, admin] + [n.token for n in network.nodes.values()]  # type: ignore
        network.client = OpenAI(base_url=network.url + "/v1", api_key=key,  # type: ignore
                                max_retries=0, timeout=60)
        yield network
        problems = Ledger(store.sessions, prices=PriceBook.default()).check()
        assert problems == [], problems


def _admin(net, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(method, net.url + path, timeout=30,
                         headers={"Authorization": f"Bearer {net.admin}"}, **kw)


def _nodes(net) -> dict[str, dict]:
    return {n["name"]: n for n in _admin(net, "GET", "/v1/admin/nodes").json()["data"]}


def _ask(net, i: int):
    return net.client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": f"Tell me about the garden, {i}."}],
        max_tokens=32, temperature=0.8, seed=i)


def _served_by(net, job_id: str) -> list[str]:
    job = httpx.get(f"{net.url}/v1/jobs/{job_id}", timeout=30,
                    headers={"Authorization": f"Bearer {net.key}"}).json()
    return [a["node_id"] for a in job["attempts"] if a["completion_tokens"] > 0]


def test_every_cheat_is_caught_withheld_and_quarantined(net) -> None:
    ids = {n["name"]: n["node_id"] for n in _nodes(net).values()}
    jobs_of: dict[str, list[str]] = {name: [] for name in ids}
    names = {v: k for k, v in ids.items()}
    i = 0
    deadline = time.monotonic() + rounds_s_max
    with cf.ThreadPoolExecutor(2 * len(ids)) as pool:
        while time.monotonic() < deadline:
            live = [n for n in _nodes(net).values() if not n["quarantined"]]
            if all(not n["name"].startswith("cheat-") for n in live):
                break
            # two requests per node still serving, sent at once: ties are broken at random
            answers = list(pool.map(lambda k: _ask(net, k), range(i, i + 2 * len(live))))
            i += 2 * len(live)
            for a in answers:
                for node_id in _served_by(net, a.id):
                    jobs_of[names[node_id]].append(a.id.removeprefix("chatcmpl-"))
            time.sleep(0.5)  # checks run after settlement; let them land
    time.sleep(2.0)
    nodes = _nodes(net)
    report = {}
    for mode in CHEATS:
        node = nodes[f"cheat-{mode}"]
        verdicts = _admin(net, "GET", "/v1/admin/verifications",
                          params={"node_id": node["node_id"], "limit": 50}).json()["data"]
        failed = [v for v in reversed(verdicts) if v["outcome"] == "fail"]
        assert failed, (mode, verdicts)
        served = jobs_of[f"cheat-{mode}"]
        first = served.index(failed[0]["job_id"]) + 1 if failed[0]["job_id"] in served else None
        report[mode] = (first, len(served), failed[0]["method"])
        assert node["quarantined"] and node["failures"] >= 3, (mode, node)
        assert node["reputation"] == 0 and node["posterior"]["beta"] > 1, node
        assert sum(v["withheld_micros"] for v in failed) > 0, (mode, failed)
        assert node["status"] == "offline", node  # sent away, and refused at its next hello
    honest = nodes["alice-pc"]
    assert honest["failures"] == 0 and honest["checks"] >= 1 and not honest["quarantined"]
    assert nodes["ops-1"]["failures"] == 0
    print("\ncheat: (jobs until first detection, jobs served, method)", report)
    summary = _admin(net, "GET", "/v1/admin/verification").json()
    assert summary["live"]["counts"].get("selected", 0) >= 1


def test_a_quarantined_owner_sees_why(net) -> None:
    owner_key = net.store().create_owner_key("mallory-bf16")[1]
    net.secrets.append(owner_key)
    r = httpx.get(net.url + "/v1/owner/nodes", timeout=30,
                  headers={"Authorization": f"Bearer {owner_key}"})
    assert r.status_code == 200, r.text
    (node,) = r.json()["data"]
    assert node["name"] == "cheat-bf16" and node["quarantined"]
    assert "log-probabilit" in node["quarantine_reason"]
    assert any(v["outcome"] == "fail" and v["withheld_micros"] > 0
               for v in r.json()["verifications"])
    other = httpx.get(net.url + "/v1/owner/nodes", headers={"Authorization": f"Bearer {net.key}"})
    assert other.status_code == 403  # a valid key, but not an owner's


def test_admin_endpoints_need_an_admin_key(net) -> None:
    for headers, status in (({}, 401), ({"Authorization": f"Bearer {net.key}"}, 403),
                            ({"Authorization": f"Bearer {net.admin}"}, 200)):
        assert httpx.get(net.url + "/v1/admin/nodes", headers=headers).status_code == status
    r = httpx.post(net.url + "/v1/chat/completions",
                   headers={"Authorization": f"Bearer {net.admin}"},
                   json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 403  # an admin-only key has no inference scope


def _limited_key(net, **limits) -> tuple[str, OpenAI]:
    r = _admin(net, "POST", "/v1/admin/keys", json={"client": "acme", "name": "limited",
                                                     "limits": limits})
    assert r.status_code == 201, r.text
    secret = r.json()["key"]
    net.secrets.append(secret)
    return r.json()["id"], OpenAI(base_url=net.url + "/v1", api_key=secret, max_retries=0,
                                  timeout=60)


def _hi(client: OpenAI, **kw):
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, **kw)


def test_rate_limit_is_429_with_retry_after(net) -> None:
    _id, client = _limited_key(net, requests_per_minute=2)
    _hi(client)
    _hi(client)
    with pytest.raises(openai.RateLimitError) as info:
        _hi(client)
    assert info.value.status_code == 429
    assert 1 <= int(info.value.response.headers["retry-after"]) <= 31
    assert info.value.body["code"] == "rate_limit_exceeded"


def test_budget_is_429_until_the_next_period(net) -> None:
    key_id, client = _limited_key(net, budget_micros=1, budget_period="day")
    with pytest.raises(openai.RateLimitError) as info:
        _hi(client)
    assert info.value.body["code"] == "budget_exceeded"
    assert int(info.value.response.headers["retry-after"]) > 0
    r = _admin(net, "PUT", f"/v1/admin/keys/{key_id}/limits", json={"budget_micros": 10**9})
    assert r.status_code == 200
    assert _hi(client).choices[0].message is not None  # the new budget applies at once


def test_trusted_only_key_runs_on_trusted_nodes(net) -> None:
    _id, client = _limited_key(net, trusted_only=True, streams_max=1)
    for _ in range(3):
        resp = _hi(client)
        # trusted = the operator's designated nodes, or a reputation of at least 0.9 (the
        # documented definition, docs/security.md): never a cheater or a new node
        nodes = {n["node_id"]: n for n in _nodes(net).values()}
        for node_id in _served_by(net, resp.id):
            node = nodes[node_id]
            rep = node.get("reputation") or 0.0
            assert node["name"] == "ops-1" or rep >= 0.9, node


def test_revoked_key_stops_at_once(net) -> None:
    key_id, client = _limited_key(net)
    _hi(client)
    assert _admin(net, "DELETE", f"/v1/admin/keys/{key_id}").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        _hi(client)


def test_no_secret_appears_in_any_log(net) -> None:
    text = "\n".join(p.read_text(errors="replace") for p in (net.root / "logs").glob("*.log"))
    assert text  # the logs exist
    leaked = [s[:12] for s in net.secrets if s in text]
    assert leaked == []

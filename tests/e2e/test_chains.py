"""A model split over several node processes (chains), end to end on loopback.

No node holds the whole tiny model: each holds a range of its layers (``sparecycles node
--layers``). The coordinator drives each request through a chain of them, and greedy output must
equal the unsplit model's token for token (fp32). Killing the middle stage mid-stream, a spare
node with the same layers takes over, its cache rebuilt from the inputs the lost stage had
received, and the answer still equals the unsplit one. The charge is split among the stages'
owners by the layers each ran. Concurrent requests, whose decode steps the stages run together
in shared forward passes, each still equal the unsplit model.

The processes start once for this module; the first tests use a chain of two stages, then those
two nodes stop and four others (a chain of three, plus a spare middle) take over.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI

from greedy_reference import greedy_reference
from sparecycles.identity import NodeIdentity
from sparecycles.ledger.pricing import ModelPrice, PriceBook, format_money
from sparecycles.ledger.service import Ledger
from sparecycles.tools.localnet import LocalNetwork

pytestmark = pytest.mark.timeout(900)

PROMPTS = ("The garden", "Where does the river go? It", "Once upon a time there was",
           "The old man said that")


@pytest.fixture(scope="module")
def reference(tiny_model_path):
    return greedy_reference(tiny_model_path, PROMPTS)


@pytest.fixture(scope="module")
def net(tmp_path_factory, tiny_model_path):
    root = tmp_path_factory.mktemp("chains")
    network = LocalNetwork(root=root, models={"tiny": tiny_model_path},
                           coordinator_args=["--placement-wait-s", "5"],
                           env={"SPARECYCLES_VERIFICATION": "false"})
    with network:
        store = network.store()
        network.start_coordinator()
        network.start_node("first-half", "alice", extra_args=["--layers", "0:2"])
        network.start_node("second-half", "bob", extra_args=["--layers", "2:4"])
        network.wait_ready(2)
        _key_id, key = store.create_api_key("acme", "e2e")
        ledger = Ledger(store.sessions, prices=PriceBook.default())
        ledger.deposit(store.ensure_client("acme"), 50_000_000, reference="e2e-topup")
        ledger.set_price("tiny", ModelPrice(10_000_000, 30_000_000))  # whole micros per token
        network.client = OpenAI(  # type: ignore[attr-defined]
            base_url=network.url + "/v1", api_key=key, max_retries=0, timeout=120)
        network.key = key  # type: ignore[attr-defined]
        yield network
        problems = Ledger(store.sessions, prices=PriceBook.default()).check()
        assert problems == [], problems


def _complete(net, prompt: str, **kw):
    return net.client.completions.create(model="tiny", prompt=prompt, max_tokens=60,
                                         temperature=0, **kw)


def _node_id(net, name: str) -> str:
    return NodeIdentity.load_or_create(net.root / "nodes" / name / "node_key.pem").node_id


def _job_id(reply_id: str) -> str:
    return reply_id.split("-", 1)[1]  # cmpl-<job id>


def _stages(net, reply_id: str) -> list:
    return net.store().attempts(_job_id(reply_id))


def test_two_stages_equal_the_unsplit_model(net, reference) -> None:
    for prompt in PROMPTS:
        resp = _complete(net, prompt)
        gen, text, _ = reference[prompt]
        assert resp.choices[0].text == text, prompt
        assert resp.usage.completion_tokens == len(gen)
        stages = _stages(net, resp.id)
        assert sorted(a.node_id for a in stages) == sorted(
            [_node_id(net, "first-half"), _node_id(net, "second-half")])
        assert all(a.outcome == "done" for a in stages)
        # each stage's row keeps its layers and its part of each token's work
        assert sorted((a.layer_first, a.layer_end, a.work_ppm) for a in stages) == [
            (0, 2, 500_000), (2, 4, 500_000)]


def _concurrently(net, prompts: list[str]) -> list:
    """The prompts as concurrent requests: their chains step at about the same time, so the
    stages run their decode steps in shared forward passes (node/backends/transformers_stage)."""
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda p: _complete(net, p), prompts))


def test_concurrent_chained_requests_each_equal_the_unsplit_model(net, reference) -> None:
    prompts = list(PROMPTS) * 2
    for prompt, resp in zip(prompts, _concurrently(net, prompts), strict=True):
        assert resp.choices[0].text == reference[prompt][1], prompt
        assert len(_stages(net, resp.id)) == 2


def test_the_charge_is_split_by_the_layers_each_stage_ran(net, reference) -> None:
    resp = _complete(net, PROMPTS[0])
    money = Ledger(net.store().sessions, prices=PriceBook.default()).job_money(_job_id(resp.id))
    earnings = money["earnings"]
    a, b = earnings[_node_id(net, "first-half")], earnings[_node_id(net, "second-half")]
    assert a > 0 and abs(a - b) <= 1, earnings  # two layers each: equal shares
    assert money["owner_earned_micros"] + money["fee_micros"] == money["charged_micros"]


@pytest.fixture(scope="module")
def three(net):
    """Four nodes: layers 0:1, 1:3 twice (the middle and its spare), 3:4; the halves stop."""
    slow = ["--duty-cycle", "0.05"]  # middle stages slow enough to be killed mid-stream
    net.start_node("s0", "carol", extra_args=["--layers", "0:1"])
    net.start_node("m1", "dave", extra_args=["--layers", "1:3", *slow])
    net.start_node("m2", "erin", extra_args=["--layers", "1:3", *slow])
    net.start_node("s2", "frank", extra_args=["--layers", "3:4"])
    net.wait_ready(6)
    net.kill_node("first-half")
    net.kill_node("second-half")
    deadline = time.monotonic() + 30
    while httpx.get(net.url + "/readyz").json().get("nodes_online") != 4:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    return net


def test_three_stages_equal_the_unsplit_model(three, reference) -> None:
    for prompt in PROMPTS:
        resp = _complete(three, prompt)
        assert resp.choices[0].text == reference[prompt][1], prompt
        stages = _stages(three, resp.id)
        assert len(stages) == 3, [(a.node_id, a.outcome) for a in stages]
    earned = Ledger(three.store().sessions, prices=PriceBook.default()).job_money(
        _job_id(resp.id))["earnings"]
    first, last = earned[_node_id(three, "s0")], earned[_node_id(three, "s2")]
    middle = next(v for k, v in earned.items() if k in (_node_id(three, "m1"),
                                                         _node_id(three, "m2")))
    assert abs(middle - 2 * first) <= 2 and abs(first - last) <= 1, earned


def test_concurrent_requests_over_three_stages_each_equal_the_unsplit_model(three, reference
                                                                            ) -> None:
    for prompt, resp in zip(PROMPTS, _concurrently(three, list(PROMPTS)), strict=True):
        assert resp.choices[0].text == reference[prompt][1], prompt
        assert len(_stages(three, resp.id)) == 3


def test_killing_the_middle_stage_mid_stream_loses_and_repeats_nothing(three, reference
                                                                        ) -> None:
    prompt = max(PROMPTS, key=lambda p: len(reference[p][0]))
    gen, text, _ = reference[prompt]
    assert len(gen) >= 12, "the longest reference answer is too short to cut"
    middles = {_node_id(three, "m1"): "m1", _node_id(three, "m2"): "m2"}
    parts, job_id, killed = [], None, None
    stream = three.client.completions.create(model="tiny", prompt=prompt, max_tokens=60,
                                             temperature=0, stream=True)
    for chunk in stream:
        job_id = chunk.id
        if chunk.choices and chunk.choices[0].text:
            parts.append(chunk.choices[0].text)
        if killed is None and len(parts) >= 4:
            middle = next(a.node_id for a in _stages(three, job_id) if a.node_id in middles)
            killed = middles[middle]
            three.kill_node(killed)
    assert killed is not None, "the answer ended before the middle stage could be killed"
    assert "".join(parts) == text
    stages = _stages(three, job_id)
    outcomes = {three_name(three, a.node_id): a.outcome for a in stages}
    assert outcomes[killed] == "node_lost", outcomes
    assert len(stages) == 4 and sum(o == "done" for o in outcomes.values()) == 3, outcomes
    three.restart_node(killed)


def _dashboard(net, key: str, path: str) -> str:
    """A dashboard page as the holder of ``key`` sees it, signed in through the form."""
    with httpx.Client(base_url=net.url, timeout=30) as web:
        form = web.get("/dashboard/login").text
        csrf = re.search(r'name="csrf" value="([^"]+)"', form)
        assert csrf is not None
        web.post("/dashboard/login", data={"key": key, "csrf": csrf[1]})
        page = web.get(path)
        assert page.status_code == 200, page.text[:300]
        return page.text


def test_the_dashboard_shows_the_chain_its_stages_and_the_repair(three, reference) -> None:
    """After the kill above: the network page lists that job with its four stages (the lost
    middle and its replacement among them) and one repair; the replacement's owner sees the
    stage job on their own page, with what it earned."""
    store = three.store()
    _key_id, admin = store.create_api_key("ops", "e2e-admin", scopes=("admin",))
    page = _dashboard(three, admin, "/dashboard/network")
    chains = re.findall(r'<tbody class="chain" id="chain-([^"]+)">(.*?)</tbody>\s*</table>',
                        page, re.S)
    assert chains, "no chain job on the network page"
    repaired = [(jid, body) for jid, body in chains if body.count('<tr class="stage">') == 4]
    assert repaired, [(jid, body.count('<tr class="stage">')) for jid, body in chains]
    jid, body = repaired[0]
    ended = re.findall(r'<tr class="stage">.*?<span class="badge[^"]*">([^<]+)</span></td></tr>',
                       body, re.S)
    assert sorted(ended) == ["done", "done", "done", "node lost"], ended
    assert re.search(r'<span class="badge bad">1</span>', body), "one repair"
    for layers in ("0:1", "1:3", "3:4"):
        assert f"<code>{layers}</code>" in body
    stages = {a.node_id: a for a in store.attempts(jid)}
    earned = Ledger(store.sessions, prices=PriceBook.default()).job_money(jid)["earnings"]
    replacement = next(n for n, a in stages.items() if a.layer_first == 1 and a.outcome == "done")
    owner = {_node_id(three, "m1"): "dave", _node_id(three, "m2"): "erin"}[replacement]
    page = _dashboard(three, store.create_owner_key(owner)[1], "/dashboard/owner")
    section = page.split('id="stage-jobs"', 1)[1].split("</section>", 1)[0]
    assert jid not in section  # the owner page names devices and models, not job ids
    assert "<code>1:3</code>" in section and "50.0 %" in section
    assert format_money(earned[replacement], "USD") in section


def three_name(net, node_id: str) -> str:
    for name in net.nodes:
        if _node_id(net, name) == node_id:
            return name
    return node_id

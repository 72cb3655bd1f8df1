"""Chains on the dashboard, in process (no browser): the network page lists a job served by a
chain with its stages (node, layers, part of the work, share of the pay, earning, how each
ended, the repair), and each owner sees their own devices' stage jobs and no one else's."""

from __future__ import annotations

import html
import re
import time
from pathlib import Path
from typing import Any

import pytest
from dashboard_app import BASE, FakeCoordinator, dashboard_app, sign_in
from fastapi.testclient import TestClient

from sparecycles.api.dashboard.charts import money
from sparecycles.ledger.pricing import ModelPrice
from sparecycles.ledger.service import WorkShare
from sparecycles.store import Store

PROMPT = 10


def _node(store: Store, node_id: str, owner: str, name: str) -> str:
    owner_id = store.ensure_owner(owner)
    store.node_connected(node_id=node_id, owner_id=owner_id, name=name, public_key="pk",
                         profile={"device_class": "phone"}, models=[], availability={},
                         agent_version="t", replica_id="r1")
    return owner_id


def _chain_job(coord: FakeCoordinator, owners: dict[str, str]) -> None:
    """A request over two stages, layers 0:2 and 2:4 of a 4-layer model; the second stage's
    node (bob's) left after 6 tokens and carol's node, holding the same layers, took over."""
    s = coord.store
    client_id = s.ensure_client("acme")
    now = time.time()
    s.insert_job(id="job-chain", client_id=client_id, model="big", endpoint="completions",
                 state="done", prompt_tokens=PROMPT, max_tokens=20, completion_tokens=20,
                 created_at_s=now - 5, finished_at_s=now, total_s=4.0)
    for attempt, node, layers, prompt, tokens, outcome in (
            (1, "node-alice", (0, 2), PROMPT, 20, "done"),
            (2, "node-bob", (2, 4), PROMPT, 6, "node_lost"),
            (3, "node-carol", (2, 4), PROMPT + 6, 14, "done")):
        s.start_attempt(job_id="job-chain", attempt=attempt, node_id=node, prompt_tokens=prompt,
                        layers=layers, work_ppm=500_000)
        s.end_attempt("job-chain", attempt, outcome=outcome, completion_tokens=tokens,
                      busy_s=0.5)
    s.update_job("job-chain", state="done")
    coord.ledger.deposit(client_id, 10_000_000, "top-up-acme")
    coord.ledger.set_price("big", ModelPrice(10_000_000, 30_000_000))  # 10 and 30 a token
    coord.ledger.hold("job-chain", client_id, "big", PROMPT, 20)
    coord.ledger.settle("job-chain", client_id, "big", PROMPT, 20, [
        WorkShare(owners["alice"], "node-alice", "phone", PROMPT, 20, work_ppm=500_000),
        WorkShare(owners["bob"], "node-bob", "phone", PROMPT, 6, work_ppm=500_000),
        WorkShare(owners["carol"], "node-carol", "phone", PROMPT + 6, 14, work_ppm=500_000)])


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    app, coord = dashboard_app(monkeypatch, tmp_path)
    s = coord.store
    keys = {"admin": s.create_api_key("ops", "ops-admin", scopes=("admin",)),
            **{o: s.create_owner_key(o) for o in ("alice", "bob", "carol", "dave")}}
    owners = {o: _node(s, f"node-{o}", o, f"{o}-phone") for o in ("alice", "bob", "carol")}
    _node(s, "node-dave", "dave", "dave-phone")
    _chain_job(coord, owners)
    with TestClient(app, base_url=BASE) as client:
        yield client, keys, coord
    s.close()


def _cells(row: str) -> list[str]:
    return [html.unescape(re.sub(r"<[^>]+>", "", c)).strip()
            for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]


def _stage_rows(page: str) -> list[list[str]]:
    return [_cells(r) for r in re.findall(r'<tr class="stage">(.*?)</tr>', page, re.S)]


def test_the_network_page_shows_a_chain_job_with_its_stages_and_repair(env) -> None:
    client, keys, coord = env
    page = sign_in(client, keys["admin"][1]).get("/dashboard/network").text
    earned = coord.ledger.job_money("job-chain")["earnings"]
    paid = sum(earned.values())
    job = re.search(r'<tbody class="chain" id="chain-job-chain">(.*?)</tbody>\s*</table>',
                    page, re.S)
    assert job is not None, "the chain job is not listed"
    head = _cells(job[1].split("</tr>", 1)[0])
    # job, model, client, state, stages, repairs, tokens, charged, owners paid
    assert head[:7] == ["job-chain", "big", "acme", "done", "3", "1", "30"]
    assert head[8] == money(paid, "USD")
    rows = _stage_rows(job[1])
    # node, owner, layers, part of a token, tokens, joined at token, busy, share, earning, ended
    assert [(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows] == [
        ("alice-phone", "alice", "0:2", "50.0 %", "30", "0"),
        ("bob-phone", "bob", "2:4", "50.0 %", "16", "0"),
        ("carol-phone", "carol", "2:4", "50.0 %", "30", "6")]
    assert [r[8] for r in rows] == [money(earned[n], "USD")
                                    for n in ("node-alice", "node-bob", "node-carol")]
    assert [r[7] for r in rows] == [f"{100 * earned[n] / paid:.1f} %"
                                    for n in ("node-alice", "node-bob", "node-carol")]
    assert [r[9] for r in rows] == ["done", "node lost", "done"]
    # by hand: charged 10 x 10 + 20 x 30 = 700, owners' 80 % = 560 split by half of each
    # stage's token value: alice 10 x 10 + 20 x 30 = 700, bob 100 + 6 x 30 = 280, carol
    # 16 x 10 + 14 x 30 = 580 (it prefilled the 6 tokens bob had delivered): 560 x w / 1,560
    assert earned == {"node-alice": 251, "node-bob": 100, "node-carol": 208}
    assert head[7] == money(700, "USD")


def test_each_owner_sees_only_their_own_stage_jobs(env) -> None:
    client, keys, coord = env
    earned = coord.ledger.job_money("job-chain")["earnings"]
    for owner, layers in (("alice", "0:2"), ("carol", "2:4")):
        page = sign_in(client, keys[owner][1]).get("/dashboard/owner").text
        section = page.split('id="stage-jobs"', 1)[1].split("</section>", 1)[0]
        rows = _stage_rows(section)
        # when, device, model, layers, part of a token, tokens, share of pay, earned, ended
        assert [r[1:6] for r in rows] == [[f"{owner}-phone", "big", layers, "50.0 %",
                                           str(PROMPT + 20 if owner == "alice" else 30)]]
        assert rows[0][7] == money(earned[f"node-{owner}"], "USD")
        assert rows[0][8] == "done"
        assert not any(other in section for other in ("alice-phone", "bob-phone", "carol-phone")
                       if other != f"{owner}-phone")
    page = sign_in(client, keys["bob"][1]).get("/dashboard/owner").text
    assert [r[8] for r in _stage_rows(page)] == ["node lost"]
    page = sign_in(client, keys["dave"][1]).get("/dashboard/owner").text
    assert _stage_rows(page) == [] and "None of your devices has served a stage" in page
    # an owner is not an admin: the network page (every chain) is refused
    assert client.get("/dashboard/network").status_code == 403

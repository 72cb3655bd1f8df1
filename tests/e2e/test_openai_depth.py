"""The OpenAI API in depth, end to end: structured outputs, tool calls, log-probabilities,
sampling controls, several choices and prompts, and a clear 400 for everything else.

A real coordinator and node on loopback, driven by the unmodified ``openai`` SDK. The tiny model
is nearly random, so the tests check what constrained decoding and the sampling controls
guarantee whatever the model writes (valid JSON, arguments that match the schema, forbidden
tokens absent), never the quality of an answer.
"""

from __future__ import annotations

import json
import math

import httpx
import jsonschema_rs
import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel

from sparecycles import modelfiles
from sparecycles.ledger.pricing import PriceBook
from sparecycles.ledger.service import Ledger
from sparecycles.tools.localnet import LocalNetwork

pytestmark = pytest.mark.timeout(600)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12},
                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "integer",
                                                                 "minimum": -12,
                                                                 "maximum": 14}},
                       "required": ["zone"], "additionalProperties": False},
    },
}
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 16},
                   "age": {"type": "integer", "minimum": 0, "maximum": 130},
                   "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                            "maxItems": 3}},
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def net(tmp_path_factory, tiny_model_path):
    root = tmp_path_factory.mktemp("depth")
    network = LocalNetwork(root=root, models={"tiny": tiny_model_path})
    with network:
        store = network.store()
        network.start_coordinator()
        network.start_node("alice-pc", "alice")
        network.wait_ready(1)
        _key_id, key = store.create_api_key("acme", "e2e")
        Ledger(store.sessions, prices=PriceBook.default()).deposit(
            store.ensure_client("acme"), 50_000_000, reference="e2e-topup")
        network.key = key  # type: ignore[attr-defined]
        network.client = OpenAI(  # type: ignore[attr-defined]
            base_url=network.url + "/v1", api_key=key, max_retries=0, timeout=120)
        yield network
        problems = Ledger(store.sessions, prices=PriceBook.default()).check()
        assert problems == [], problems


@pytest.fixture(scope="module")
def tok(tiny_model_path):
    return modelfiles.load_tokenizer(str(tiny_model_path))


def _user(text: str = "Tell me about the garden.") -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# ---- everything else gets a clear 400 ------------------------------------------------------------


@pytest.mark.parametrize(("extra", "param"), [
    ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"reasoning_effort": "low"}, "reasoning_effort"),
    ({"frobnicate": 3}, "frobnicate"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"use_beam_search": True}, "use_beam_search"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logit_bias": {"999999": 5}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"n": 9}, "n"),
    ({"min_tokens": 30}, "min_tokens"),  # more than max_tokens
    ({"tool_choice": "required"}, "tool_choice"),  # without tools
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                 "image_url": {"url": "http://x"}}]}]},
     "messages.0.content"),
])
def test_unsupported_or_invalid_parameters_get_a_400_naming_them(net, extra, param) -> None:
    body = {"model": "tiny", "messages": _user(), "max_tokens": 8, **extra}
    r = httpx.post(net.url + "/v1/chat/completions", json=body,
                   headers={"Authorization": f"Bearer {net.key}"}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] is not None and error["param"].startswith(param), error


@pytest.mark.parametrize(("extra", "param"), [
    ({"suffix": "end"}, "suffix"),
    ({"best_of": 1, "n": 2}, "best_of"),
    ({"best_of": 3, "stream": True}, "best_of"),
    ({"echo": True, "logprobs": 2}, "echo"),
    ({"logprobs": 21}, "logprobs"),
    ({"prompt": ["a"] * 17}, "prompt"),
    ({"prompt": "word " * 4000}, "prompt"),  # longer than the context (it said "messages")
])
def test_completions_refusals_name_the_parameter(net, extra, param) -> None:
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 8, **extra}
    r = httpx.post(net.url + "/v1/completions", json=body,
                   headers={"Authorization": f"Bearer {net.key}"}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(param)


def test_fields_that_change_nothing_are_accepted(net) -> None:
    resp = net.client.chat.completions.create(
        model="tiny", messages=_user(), max_tokens=4, user="u-1", metadata={"k": "v"},
        store=False, service_tier="auto", extra_body={"priority": 0, "modalities": ["text"]})
    assert resp.choices[0].message.content is not None


def test_model_by_id_and_unknown_model(net) -> None:
    model = net.client.models.retrieve("tiny")
    assert model.id == "tiny" and model.object == "model"
    with pytest.raises(openai.NotFoundError):
        net.client.models.retrieve("no-such-model")


# ---- sampling controls ---------------------------------------------------------------------------


def test_ignore_eos_and_min_tokens_fix_the_output_length(net) -> None:
    for _ in range(3):
        resp = net.client.chat.completions.create(
            model="tiny", messages=_user(), max_tokens=32, temperature=0.8,
            extra_body={"ignore_eos": True})
        assert resp.usage.completion_tokens == 32
        assert resp.choices[0].finish_reason == "length"
    resp = net.client.chat.completions.create(
        model="tiny", messages=_user(), max_tokens=40, temperature=0,
        extra_body={"min_tokens": 20})
    assert resp.usage.completion_tokens >= 20


def test_logit_bias_forces_and_forbids_tokens(net, tok) -> None:
    free = net.client.chat.completions.create(model="tiny", messages=_user(), max_tokens=12,
                                              temperature=0, logprobs=True)
    first = free.choices[0].logprobs.content[0].token
    first_id = tok.convert_tokens_to_ids(tok.tokenize(first))[0]
    banned = net.client.chat.completions.create(
        model="tiny", messages=_user(), max_tokens=12, temperature=0, logprobs=True,
        logit_bias={str(first_id): -100})
    assert first_id not in _ids(tok, banned)
    target = tok.convert_tokens_to_ids(tok.tokenize(" river"))[0]
    forced = net.client.chat.completions.create(
        model="tiny", messages=_user(), max_tokens=6, temperature=0.7,
        logit_bias={str(target): 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].message.content == tok.decode([target] * 6)


def _ids(tok, resp) -> list[int]:
    text = resp.choices[0].message.content
    return tok.encode(text, add_special_tokens=False)


def test_penalties_reduce_repetition(net) -> None:
    """Greedy decoding of a nearly random model repeats itself; frequency and presence penalties
    must reduce the repeats (the documented direction), a negative one increase them."""
    def repeats(extra: dict | None = None, **kw) -> int:
        resp = net.client.completions.create(model="tiny", prompt="The garden and the river",
                                             max_tokens=48, temperature=0, logprobs=0,
                                             extra_body={"ignore_eos": True, **(extra or {})},
                                             **kw)
        tokens = resp.choices[0].logprobs.tokens
        return len(tokens) - len(set(tokens))
    plain = repeats()
    assert repeats(frequency_penalty=2.0) < plain
    assert repeats(presence_penalty=2.0) < plain
    assert repeats({"repetition_penalty": 5.0}) < plain
    assert repeats(frequency_penalty=-2.0) >= plain


def test_top_k_one_is_greedy_and_seeds_reproduce(net) -> None:
    greedy = net.client.chat.completions.create(model="tiny", messages=_user(), max_tokens=16,
                                                temperature=0)
    top1 = net.client.chat.completions.create(model="tiny", messages=_user(), max_tokens=16,
                                              temperature=1.5, extra_body={"top_k": 1})
    assert top1.choices[0].message.content == greedy.choices[0].message.content
    a, b = (net.client.chat.completions.create(
        model="tiny", messages=_user(), max_tokens=16, seed=7, temperature=1.0,
        extra_body={"min_p": 0.05}) for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content


def test_n_choices_several_prompts_echo_and_best_of(net) -> None:
    resp = net.client.chat.completions.create(model="tiny", messages=_user(), max_tokens=8, n=3,
                                              seed=1)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    # each choice is its own job, charged for the tokens it delivered
    raw = httpx.post(net.url + "/v1/chat/completions", headers={"Authorization":
                     f"Bearer {net.key}"}, timeout=60,
                     json={"model": "tiny", "messages": _user(), "max_tokens": 8, "n": 2})
    jobs = raw.headers["X-Sparecycles-Job-Ids"].split(",")
    charged = [httpx.get(f"{net.url}/v1/jobs/{j}", headers={"Authorization":
                         f"Bearer {net.key}"}).json() for j in jobs]
    assert sum(j["completion_tokens"] for j in charged) == raw.json()["usage"][
        "completion_tokens"]
    assert all(j["money"]["charged_micros"] > 0 for j in charged)
    comp = net.client.completions.create(model="tiny", prompt=["Once upon", "The river"],
                                         max_tokens=5, n=2, echo=True, temperature=0)
    assert [c.index for c in comp.choices] == [0, 1, 2, 3]
    assert comp.choices[0].text.startswith("Once upon")
    assert comp.choices[2].text.startswith("The river")
    streamed: dict[int, str] = {}  # the same, streamed: the prompt comes first there too
    for chunk in net.client.completions.create(model="tiny", prompt=["Once upon", "The river"],
                                               max_tokens=5, n=2, echo=True, temperature=0,
                                               stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {c.index: c.text for c in comp.choices}
    best = net.client.completions.create(model="tiny", prompt="Once upon", max_tokens=6,
                                         n=1, best_of=3, logprobs=1, seed=3)
    assert len(best.choices) == 1
    assert best.usage.completion_tokens >= len(best.choices[0].logprobs.tokens)


def test_streamed_n_choices_each_end(net) -> None:
    finishes, texts = {}, {}
    for chunk in net.client.chat.completions.create(model="tiny", messages=_user(),
                                                    max_tokens=8, n=2, stream=True):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert set(finishes) == {0, 1}


# ---- log-probabilities ---------------------------------------------------------------------------


def test_chat_logprobs_and_top_logprobs(net, tok) -> None:
    resp = net.client.chat.completions.create(model="tiny", messages=_user(), max_tokens=10,
                                              temperature=0, logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    assert "".join(t.token for t in content) == resp.choices[0].message.content
    assert bytes(b for t in content for b in t.bytes).decode() == resp.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
        assert math.isclose(t.logprob, t.top_logprobs[0].logprob, abs_tol=1e-5)  # greedy
    streamed = []
    for chunk in net.client.chat.completions.create(
            model="tiny", messages=_user(), max_tokens=10, temperature=0, logprobs=True,
            top_logprobs=3, stream=True):
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
            streamed.extend(chunk.choices[0].logprobs.content)
    assert [t.token for t in streamed] == [t.token for t in content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content],
                                                          abs=1e-4)


def test_completions_logprobs_shape(net) -> None:
    resp = net.client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6,
                                         temperature=0, logprobs=2)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == resp.choices[0].text


# ---- structured outputs --------------------------------------------------------------------------


def test_json_schema_output_always_parses_and_validates(net) -> None:
    validator = jsonschema_rs.validator_for(PERSON)
    prompts = [f"Describe person number {i} in the village." for i in range(40)]
    valid = 0
    for i, prompt in enumerate(prompts):
        resp = net.client.chat.completions.create(
            model="tiny", messages=_user(prompt), max_tokens=120, temperature=1.0, seed=i,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
        assert resp.choices[0].finish_reason == "stop", resp.choices[0]
        validator.validate(json.loads(resp.choices[0].message.content))
        valid += 1
    print(f"\njson_schema: {valid}/{len(prompts)} outputs parsed and validated")
    assert valid == len(prompts)


def test_json_object_mode(net) -> None:
    for seed in range(5):
        resp = net.client.chat.completions.create(
            model="tiny", messages=_user("Answer in JSON."), max_tokens=200, seed=seed,
            response_format={"type": "json_object"})
        if resp.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(resp.choices[0].message.content), dict)


class Person(BaseModel):
    name: str
    age: int
    retired: bool


def test_sdk_parse_with_a_pydantic_model(net) -> None:
    completion = net.client.chat.completions.parse(
        model="tiny", messages=_user("Who lives by the river?"), response_format=Person,
        max_tokens=300, temperature=0.7, seed=5)
    person = completion.choices[0].message.parsed
    assert isinstance(person, Person)


def test_grammar_compile_time_is_measured(net) -> None:
    metrics = httpx.get(net.url + "/metrics").text
    count = [line for line in metrics.splitlines() if line.startswith(
        'sparecycles_coordinator_overhead_seconds_count{stage="grammar_compile"}')]
    assert count and float(count[0].split()[-1]) >= 1


def test_admission_and_its_parts_are_measured(net) -> None:
    """Admission (received to sent to a node) and, of it, placement and the wait for the hold's
    commit: one observation each for every request placed as it was admitted."""
    metrics = httpx.get(net.url + "/metrics").text

    def count(stage: str) -> float:
        lines = [line for line in metrics.splitlines() if line.startswith(
            f'sparecycles_coordinator_overhead_seconds_count{{stage="{stage}"}}')]
        return float(lines[0].split()[-1]) if lines else 0.0

    assert count("admission") >= 1
    assert 1 <= count("admission_hold") == count("admission_placement") <= count("admission")


def test_schema_limits_are_a_400_naming_the_limit(net) -> None:
    deep: dict = {"type": "string"}
    for _ in range(40):
        deep = {"type": "object", "properties": {"x": deep}}
    with pytest.raises(openai.BadRequestError) as info:
        net.client.chat.completions.create(
            model="tiny", messages=_user(), max_tokens=8,
            response_format={"type": "json_schema", "json_schema": {"name": "d", "schema": deep}})
    assert "json_schema_depth_max" in str(info.value)
    assert info.value.body["param"] == "response_format"
    bad = {"type": "object", "properties": {"x": {"$ref": "#/nowhere"}}}
    with pytest.raises(openai.BadRequestError) as info:
        net.client.chat.completions.create(
            model="tiny", messages=_user(), max_tokens=8,
            response_format={"type": "json_schema", "json_schema": {"name": "b", "schema": bad}})
    assert info.value.body["param"] == "response_format"


# ---- tool calling --------------------------------------------------------------------------------


def _validate_call(call) -> dict:
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    args = json.loads(call.function.arguments)
    jsonschema_rs.validator_for(tool["function"]["parameters"]).validate(args)
    return args


def test_forced_tool_call_returns_arguments_that_validate(net) -> None:
    for seed in range(8):
        resp = net.client.chat.completions.create(
            model="tiny", messages=_user("What is the weather in Paris?"), max_tokens=80,
            seed=seed, tools=[WEATHER, TIME],
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        choice = resp.choices[0]
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name == "get_weather"
        _validate_call(call)


def test_required_tool_choice_and_parallel_calls(net) -> None:
    for seed in range(6):
        resp = net.client.chat.completions.create(
            model="tiny", messages=_user("Weather and time, please."), max_tokens=160,
            seed=seed, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
        choice = resp.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert len(choice.message.tool_calls) == 1
        _validate_call(choice.message.tool_calls[0])


def test_streamed_tool_calls_reassemble_to_the_non_streamed_arguments(net) -> None:
    for choice_kw in ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}},
                      {"tool_choice": "required", "parallel_tool_calls": False}):
        kw = dict(model="tiny", messages=_user("What time is it in Tokyo?"), max_tokens=120,
                  temperature=0, tools=[WEATHER, TIME], **choice_kw)
        once = net.client.chat.completions.create(**kw)
        calls: dict[int, dict] = {}
        finish = None
        for chunk in net.client.chat.completions.create(stream=True, **kw):
            for c in chunk.choices:
                finish = c.finish_reason or finish
                for d in c.delta.tool_calls or []:
                    entry = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                    entry["id"] = d.id or entry["id"]
                    if d.function and d.function.name:
                        entry["name"] = d.function.name
                    if d.function and d.function.arguments:
                        entry["arguments"] += d.function.arguments
        assert finish == "tool_calls"
        expected = [(c.function.name, json.loads(c.function.arguments))
                    for c in once.choices[0].message.tool_calls]
        got = [(calls[i]["name"], json.loads(calls[i]["arguments"])) for i in sorted(calls)]
        assert got == expected
        assert all(calls[i]["id"] for i in calls)


def test_agent_loop_with_tool_results_in_the_history(net, tok) -> None:
    """call -> tool result -> final answer: the assistant's tool call and the tool's result are
    rendered into the prompt through the model's chat template (the usage shows them)."""
    messages = _user("What is the weather in Oslo?")
    resp = net.client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=80, temperature=0, tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = resp.choices[0].message.tool_calls[0]
    messages.append(resp.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id,
                     "content": json.dumps({"temperature": 21, "sky": "clear"})})
    final = net.client.chat.completions.create(model="tiny", messages=messages, max_tokens=20,
                                               temperature=0, tools=[WEATHER], tool_choice="none")
    assert final.choices[0].message.content is not None
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "What is the weather in Oslo?"},
         {"role": "assistant", "content": "", "tool_calls": [
             {"type": "function", "function": {"name": "get_weather",
                                               "arguments": json.loads(call.function.arguments)}}]},
         {"role": "tool", "content": json.dumps({"temperature": 21, "sky": "clear"})}],
        tools=[WEATHER], add_generation_prompt=True, tokenize=False)
    assert "<tool_response>" in rendered
    assert final.usage.prompt_tokens == len(tok.encode(rendered, add_special_tokens=False))


# ---- LiteLLM as a library client -----------------------------------------------------------------


def test_litellm_forced_tool_call_and_json_schema(net) -> None:
    litellm = pytest.importorskip("litellm")
    kw = dict(model="openai/tiny", api_base=net.url + "/v1", api_key=net.key, max_tokens=80,
              temperature=0)
    resp = litellm.completion(messages=_user("Weather in Lima?"), tools=[WEATHER],
                              tool_choice={"type": "function",
                                           "function": {"name": "get_weather"}}, **kw)
    (call,) = resp.choices[0].message.tool_calls
    _validate_call(call)
    assert resp.choices[0].finish_reason == "tool_calls"
    resp = litellm.completion(messages=_user("A person, please."), response_format={
        "type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": True}},
        **{**kw, "max_tokens": 120})
    jsonschema_rs.validator_for(PERSON).validate(json.loads(resp.choices[0].message.content))
    with pytest.raises(litellm.BadRequestError):
        litellm.completion(messages=_user(), extra_body={"frobnicate": 1}, **kw)


# ---- the Responses API (stateless) -------------------------------------------------------------


def test_responses_api_refusals_name_its_own_fields(net) -> None:
    r = httpx.post(net.url + "/v1/responses", headers={"Authorization": f"Bearer {net.key}"},
                   json={"model": "tiny", "input": "Hi", "max_output_tokens": 10**6}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_output_tokens", r.text


def test_responses_api_text_tools_and_streaming(net) -> None:
    r = net.client.responses.create(model="tiny", input="Tell me about the garden.",
                                    instructions="Be brief.", max_output_tokens=12,
                                    temperature=0)
    assert r.object == "response" and r.status in ("completed", "incomplete")
    assert r.output_text and r.usage.output_tokens >= 1
    first = r
    tools = [{"type": "function", "name": WEATHER["function"]["name"],
              "parameters": WEATHER["function"]["parameters"]}]
    r = net.client.responses.create(model="tiny", input="Weather in Oslo?", tools=tools,
                                    tool_choice={"type": "function", "name": "get_weather"},
                                    max_output_tokens=80, temperature=0)
    (call,) = [o for o in r.output if o.type == "function_call"]
    jsonschema_rs.validator_for(WEATHER["function"]["parameters"]).validate(
        json.loads(call.arguments))
    # the agent loop: the call and its output go back as input items
    r2 = net.client.responses.create(model="tiny", max_output_tokens=10, temperature=0, input=[
        {"role": "user", "content": "Weather in Oslo?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name,
         "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        tools=tools)
    assert r2.status in ("completed", "incomplete")
    events = list(net.client.responses.create(model="tiny", input="Tell me about the garden.",
                                              max_output_tokens=12, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created"
    assert kinds[-1] in ("response.completed", "response.incomplete")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == first.output_text
    with pytest.raises(openai.BadRequestError) as info:
        net.client.responses.create(model="tiny", input="hi", previous_response_id="resp_x")
    assert info.value.body["param"] == "previous_response_id"

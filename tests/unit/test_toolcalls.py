"""Tool plans and tool-call parsers (api/toolcalls.py), and the refusal of unsupported fields."""

from __future__ import annotations

import json

import pytest

from sparecycles.api import toolcalls
from sparecycles.api.schemas import ChatCompletionRequest, refuse_unsupported
from sparecycles.errors import InvalidRequest

WEATHER = {"type": "function", "function": {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


def _body(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **kw)


def test_hermes_calls_are_parsed_with_their_content() -> None:
    plan = toolcalls.plan_for(_body(tools=[WEATHER]), toolcalls.ParserKind.HERMES)
    assert plan.mode is toolcalls.ToolMode.AUTO
    text = ('Let me look.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
            '</tool_call><tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}'
            '</tool_call>')
    content, calls = toolcalls.parse_output(text, plan)
    assert content == "Let me look."
    assert [json.loads(c.arguments)["city"] for c in calls] == ["Oslo", "Rome"]
    assert toolcalls.parse_output("no call here", plan) == ("no call here", [])
    # an unknown function is not a call
    assert toolcalls.parse_output('<tool_call>{"name": "rm", "arguments": {}}</tool_call>',
                                  plan)[1] == []


def test_json_parser_and_forced_modes() -> None:
    plan = toolcalls.plan_for(_body(tools=[WEATHER]), toolcalls.ParserKind.JSON)
    content, calls = toolcalls.parse_output('{"name": "get_weather", "parameters": '
                                            '{"city": "Oslo"}}', plan)
    assert content is None and calls[0].name == "get_weather"
    named = toolcalls.plan_for(_body(tools=[WEATHER], tool_choice={
        "type": "function", "function": {"name": "get_weather"}}), toolcalls.ParserKind.JSON)
    assert named.grammar_schema() == WEATHER["function"]["parameters"]
    assert toolcalls.parse_output('{"city": "Oslo"}', named)[1][0].arguments == '{"city": "Oslo"}'
    required = toolcalls.plan_for(_body(tools=[WEATHER], tool_choice="required",
                                        parallel_tool_calls=False), toolcalls.ParserKind.JSON)
    schema = required.grammar_schema()
    assert schema["minItems"] == 1 and schema["maxItems"] == 1
    _, calls = toolcalls.parse_output('[{"name": "get_weather", "parameters": {"city": "X"}}]',
                                      required)
    assert calls[0].name == "get_weather"


def test_tool_choice_needs_tools_and_a_known_name() -> None:
    with pytest.raises(InvalidRequest) as err:
        toolcalls.plan_for(_body(tool_choice="required"), toolcalls.ParserKind.JSON)
    assert err.value.param == "tool_choice"
    with pytest.raises(InvalidRequest):
        toolcalls.plan_for(_body(tools=[WEATHER], tool_choice={
            "type": "function", "function": {"name": "other"}}), toolcalls.ParserKind.JSON)


def test_held_prefix_never_leaks_an_opening_tag() -> None:
    assert toolcalls.held_prefix("hello <tool_") == len("<tool_")
    assert toolcalls.held_prefix("hello") == 0


def test_unknown_fields_are_refused_and_harmless_ones_accepted() -> None:
    refuse_unsupported(_body(user="u", metadata={"a": "b"}, store=True, service_tier="auto",
                             modalities=["text"], functions=None))
    for field, value in (("functions", [{"name": "f"}]), ("frobnicate", 1),
                         ("modalities", ["audio"]), ("reasoning_effort", "low")):
        with pytest.raises(InvalidRequest) as err:
            refuse_unsupported(_body(**{field: value}))
        assert err.value.param == field

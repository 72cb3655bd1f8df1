"""Tool calling: what a request's ``tools`` and ``tool_choice`` ask of the output, and the
parsers that turn a model's output into OpenAI's ``tool_calls``.

As vLLM does: a named ``tool_choice`` constrains the output to the function's parameters (a JSON
schema grammar) and the whole output is the call's arguments; ``required`` constrains it to a
JSON array of ``{"name", "parameters"}`` objects, one of the tools each (at most one when
``parallel_tool_calls`` is false); ``auto`` leaves the model free and a parser per model family
finds the calls in its text; ``none`` renders the tools but parses nothing.

Parsers, by the chat template's format (``parser_for``):
- ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks, as Hermes,
  Qwen2/2.5/3 and the tiny test model's templates write them; text outside them is content.
- ``json``: the whole output is one JSON object ``{"name", "arguments" | "parameters"}`` or a
  list of them (Llama 3's JSON tool format); anything else is content.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass
from typing import Any

from sparecycles.api.schemas import ChatCompletionRequest, NamedToolChoice, Tool
from sparecycles.errors import InvalidRequest
from sparecycles.secrets_util import new_id


class ToolMode(enum.StrEnum):
    NONE = "none"  # no tools, or tool_choice "none"
    AUTO = "auto"
    REQUIRED = "required"
    NAMED = "named"


class ParserKind(enum.StrEnum):
    HERMES = "hermes"
    JSON = "json"


@dataclass(frozen=True, slots=True)
class ToolPlan:
    mode: ToolMode
    tools: tuple[Tool, ...] = ()
    named: str | None = None  # the function tool_choice names
    parallel: bool = True
    parser: ParserKind = ParserKind.HERMES

    def grammar_schema(self) -> dict[str, Any] | None:
        """The JSON schema the output must match, for named and required choices."""
        if self.mode is ToolMode.NAMED:
            tool = next(t for t in self.tools if t.function.name == self.named)
            return tool.function.parameters_schema()
        if self.mode is ToolMode.REQUIRED:
            items = [{"type": "object",
                      "properties": {"name": {"type": "string", "enum": [t.function.name]},
                                     "parameters": t.function.parameters_schema()},
                      "required": ["name", "parameters"], "additionalProperties": False}
                     for t in self.tools]
            array: dict[str, Any] = {"type": "array", "minItems": 1,
                                     "items": items[0] if len(items) == 1 else {"anyOf": items}}
            if not self.parallel:
                array["maxItems"] = 1
            return array
        return None


def plan_for(body: ChatCompletionRequest, parser: ParserKind) -> ToolPlan:
    """What the request's tools ask; a 400 for a tool_choice that cannot be met."""
    tools = tuple(body.tools or ())
    choice = body.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise InvalidRequest("tool_choice is only allowed when tools are specified",
                                 param="tool_choice")
        return ToolPlan(ToolMode.NONE)
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise InvalidRequest("tool names must be unique", param="tools")
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise InvalidRequest(f"tool_choice names '{choice.function.name}', which is not "
                                 "among the tools", param="tool_choice")
        return ToolPlan(ToolMode.NAMED, tools, choice.function.name, body.parallel_tool_calls,
                        parser)
    mode = {None: ToolMode.AUTO, "auto": ToolMode.AUTO, "required": ToolMode.REQUIRED,
            "none": ToolMode.NONE}[choice]
    return ToolPlan(mode, tools, None, body.parallel_tool_calls, parser)


def parser_for(tokenizer: Any) -> ParserKind:
    """The tool-call format of a model, from its chat template."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = " ".join(str(v) for v in template.values())
    return ParserKind.HERMES if "<tool_call>" in template else ParserKind.JSON


def new_call_id() -> str:
    return "call_" + new_id("t").split("_", 1)[-1][:24]


@dataclass(frozen=True, slots=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text

    def as_openai(self, call_id: str, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": call_id, "type": "function",
                               "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            out["index"] = index
        return out


def _call_of(obj: Any, names: set[str]) -> ParsedCall | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
HERMES_OPEN = "<tool_call>"


def parse_output(text: str, plan: ToolPlan) -> tuple[str | None, list[ParsedCall]]:
    """(content, tool calls) of a finished output under the plan."""
    names = {t.function.name for t in plan.tools}
    if plan.mode is ToolMode.NAMED:
        assert plan.named is not None
        return None, [ParsedCall(plan.named, text.strip() or "{}")]
    if plan.mode is ToolMode.REQUIRED:
        try:
            items = json.loads(text)
        except ValueError:
            return text, []  # cut short (length): no complete call
        calls = [c for item in items if (c := _call_of(
            {"name": item.get("name"), "arguments": item.get("parameters")}, names))]
        return None, calls
    if plan.mode is ToolMode.NONE:
        return text, []
    if plan.parser is ParserKind.HERMES and HERMES_OPEN in text:
        calls = []
        for body in _HERMES.findall(text):
            try:
                call = _call_of(json.loads(body), names)
            except ValueError:
                call = None
            if call is not None:
                calls.append(call)
        if calls:
            content = text[: text.index(HERMES_OPEN)].strip()
            return content or None, calls
        return text, []
    stripped = text.strip()
    if stripped[:1] in ("{", "["):
        try:
            obj = json.loads(stripped)
        except ValueError:
            return text, []
        objs = obj if isinstance(obj, list) else [obj]
        calls = [c for o in objs if (c := _call_of(o, names))]
        if calls and len(calls) == len(objs):
            return None, calls
    return text, []


def held_prefix(text: str, marker: str = HERMES_OPEN) -> int:
    """Characters at the end of ``text`` that could begin ``marker`` (held back when streaming
    content in auto mode, so a tool call's opening tag never reaches the client as content)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0

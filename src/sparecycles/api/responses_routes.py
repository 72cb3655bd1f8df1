"""The Responses API (``POST /v1/responses``), stateless: a request becomes a chat completion.

``input`` (text, or message / ``function_call`` / ``function_call_output`` items), ``instructions``
(a system message first), function ``tools`` and ``tool_choice``, ``text.format`` (json_object,
json_schema) and the sampling fields map onto ``/v1/chat/completions``, which does the work; the
answer is rewritten into the Responses shape (``output`` items: a ``message`` with
``output_text``, and ``function_call`` items), streamed as its typed events. Nothing is stored:
``previous_response_id`` and ``conversation`` are a 400, ``store`` is accepted and does nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sparecycles import limits
from sparecycles.api import openai_routes
from sparecycles.api.auth import require_key
from sparecycles.api.errors import ERROR_RESPONSES, field_param
from sparecycles.api.schemas import (
    ChatCompletionRequest,
    null_is_default,
    refuse_bad_unicode,
    refuse_unsupported,
)
from sparecycles.errors import InvalidRequest
from sparecycles.store import ApiKeyInfo

router = APIRouter(responses=ERROR_RESPONSES)


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="forbid")  # OpenAI's fields only: no key silently ignored
    type: Literal["function"]
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None  # the model's own length: low and high are a 400


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=200)
    input: str | list[dict[str, Any]] = Field(min_length=1)
    instructions: str | None = Field(default=None, max_length=limits.message_chars_max)
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    tools: list[FunctionTool] | None = Field(default=None,
                                             max_length=limits.tools_per_request_max)
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    text: TextOptions | None = None
    stream: bool = False
    truncation: Literal["disabled"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data: Any) -> Any:
        return refuse_bad_unicode(data)

    _nulls = field_validator("parallel_tool_calls", "stream", mode="before")(null_is_default)


_RESPONSES_NO_EFFECT = frozenset({"store", "include", "background"})  # at their defaults
# the chat request's fields, as the Responses API names them (in a 400's ``param``)
_RESPONSES_PARAM = {"max_tokens": "max_output_tokens", "max_completion_tokens":
                    "max_output_tokens", "messages": "input", "response_format": "text.format"}


def _messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if body.instructions:
        out.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        return [*out, {"role": "user", "content": body.input}]
    for i, item in enumerate(body.input):
        kind = item.get("type", "message")
        if kind == "message":
            out.append({"role": item.get("role", "user"),
                        "content": _text_of(item.get("content", ""), f"input.{i}.content")})
        elif kind == "function_call":
            call = {"id": item.get("call_id", ""), "type": "function",
                    "function": {"name": item.get("name", ""),
                                 "arguments": item.get("arguments", "{}")}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls"):
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output", "")
            out.append({"role": "tool", "tool_call_id": item.get("call_id", ""),
                        "content": output if isinstance(output, str) else json.dumps(output)})
        else:
            raise InvalidRequest(f"input items of type '{kind}' are not supported",
                                 param=f"input.{i}.type")
    return out


def _text_of(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") in ("input_text", "output_text", "text")
            and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise InvalidRequest("content must be text, or a list of text parts", param=param)


def _chat_body(body: ResponsesRequest) -> dict[str, Any]:
    # what is left of the extras is what changes nothing (user, metadata, ...): passed along
    extra = {k: v for k, v in (body.model_extra or {}).items()
             if k not in _RESPONSES_NO_EFFECT and v is not None}
    chat: dict[str, Any] = {"model": body.model, "messages": _messages(body), **extra}
    if body.max_output_tokens is not None:
        chat["max_completion_tokens"] = body.max_output_tokens
    for name in ("temperature", "top_p"):
        if getattr(body, name) is not None:
            chat[name] = getattr(body, name)
    if body.tools:
        chat["tools"] = [{"type": "function", "function": t.model_dump(
            exclude={"type"}, exclude_none=True)} for t in body.tools]
        chat["parallel_tool_calls"] = body.parallel_tool_calls
    choice = body.tool_choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name", "")}}
    if choice is not None:
        chat["tool_choice"] = choice
    fmt = body.text.format if body.text else None
    if fmt is not None and fmt.type == "json_object":
        chat["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.name, "schema": fmt.schema_ or {}, "strict": fmt.strict}}
    return chat


class _Shape:
    """One response in the Responses shape, built from chat completion pieces."""

    def __init__(self, body: ResponsesRequest, job_id: str):
        self.body = body
        self.id = "resp_" + job_id
        self.created = int(time.time())
        self.msg_id = "msg_" + job_id

    def envelope(self, status: str, output: list[dict[str, Any]],
                 usage: dict[str, int] | None, incomplete: bool = False) -> dict[str, Any]:
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "model": self.body.model, "output": output, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": self.body.instructions,
            "max_output_tokens": self.body.max_output_tokens,
            "parallel_tool_calls": self.body.parallel_tool_calls,
            "temperature": self.body.temperature, "top_p": self.body.top_p,
            "tool_choice": self.body.tool_choice or "auto",
            "tools": [t.model_dump(exclude_none=True) for t in self.body.tools or []],
            "text": {"format": (self.body.text.format.model_dump(by_alias=True, exclude_none=True)
                                if self.body.text and self.body.text.format
                                else {"type": "text"})},
            "usage": None if usage is None else {
                "input_tokens": usage["prompt_tokens"], "output_tokens":
                usage["completion_tokens"], "total_tokens": usage["total_tokens"],
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0}},
        }

    def message(self, text: str, status: str = "completed") -> dict[str, Any]:
        return {"type": "message", "id": self.msg_id, "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}

    @staticmethod
    def call(call: dict[str, Any], status: str = "completed") -> dict[str, Any]:
        return {"type": "function_call", "id": "fc_" + call["id"].removeprefix("call_"),
                "call_id": call["id"], "name": call["function"]["name"],
                "arguments": call["function"]["arguments"], "status": status}


@router.post("/v1/responses", response_model=None)
async def create_response(body: ResponsesRequest, request: Request,
                          key: ApiKeyInfo = Depends(require_key)
                          ) -> JSONResponse | StreamingResponse:
    extra = body.model_extra or {}
    for name in ("include", "background"):
        if extra.get(name):
            raise InvalidRequest(f"Unsupported parameter: '{name}'", param=name,
                                 code="unsupported_parameter")
    refuse_unsupported(body, _RESPONSES_NO_EFFECT)  # previous_response_id, reasoning, ...
    try:
        chat = ChatCompletionRequest.model_validate({
            **_chat_body(body), "stream": body.stream,
            **({"stream_options": {"include_usage": True}} if body.stream else {})})
    except ValidationError as exc:  # the items did not make a valid conversation: a 400
        first = exc.errors()[0]
        where = field_param(first.get("loc", ()), first.get("type") == "extra_forbidden") or ""
        head, _, rest = where.partition(".")
        param = ("input" if head == "messages" else
                 ".".join(filter(None, (_RESPONSES_PARAM.get(head, head), rest))) or None)
        raise InvalidRequest(f"Invalid value for '{param}': {first.get('msg')} (at {where})",
                             param=param) from None
    try:
        answer = await openai_routes.chat_completions(chat, request, key)
    except InvalidRequest as exc:  # named as this API names the field
        exc.param = _RESPONSES_PARAM.get(exc.param or "", exc.param)
        raise
    job_id = answer.headers["X-Sparecycles-Job-Id"]
    shape = _Shape(body, job_id)
    if isinstance(answer, JSONResponse):
        data = json.loads(bytes(answer.body))
        choice = data["choices"][0]
        msg = choice["message"]
        output = []
        if msg.get("content"):
            output.append(shape.message(msg["content"]))
        output += [shape.call(c) for c in msg.get("tool_calls") or []]
        length = choice["finish_reason"] == "length"
        return JSONResponse(shape.envelope("incomplete" if length else "completed", output,
                                           data["usage"], length),
                            headers={"X-Sparecycles-Job-Id": job_id})
    return StreamingResponse(_events(shape, answer.body_iterator), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Sparecycles-Job-Id": job_id})


async def _events(shape: _Shape, chunks: AsyncIterable[Any]) -> AsyncIterator[str]:
    """The chat stream's chunks, re-told as the Responses API's typed events."""
    seq = 0

    def event(kind: str, **fields: Any) -> str:
        nonlocal seq
        seq += 1
        data = json.dumps({"type": kind, "sequence_number": seq, **fields})
        return f"event: {kind}\ndata: {data}\n\n"

    yield event("response.created", response=shape.envelope("in_progress", [], None))
    text, started, output, usage, finish = "", False, [], None, "stop"
    calls: dict[int, dict[str, Any]] = {}
    async for raw in chunks:
        line = raw if isinstance(raw, str) else raw.decode()
        if not line.startswith("data: ") or line.startswith("data: [DONE]"):
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
            yield event("error", code=chunk["error"].get("code"),
                        message=chunk["error"]["message"], param=chunk["error"].get("param"))
            return
        usage = chunk.get("usage") or usage
        for c in chunk.get("choices", []):
            delta = c.get("delta", {})
            finish = c.get("finish_reason") or finish
            if delta.get("content"):
                if not started:
                    started = True
                    yield event("response.output_item.added", output_index=0,
                                item=shape.message("", "in_progress"))
                    yield event("response.content_part.added", item_id=shape.msg_id,
                                output_index=0, content_index=0,
                                part={"type": "output_text", "text": "", "annotations": []})
                text += delta["content"]
                yield event("response.output_text.delta", item_id=shape.msg_id, output_index=0,
                            content_index=0, delta=delta["content"])
            for d in delta.get("tool_calls") or []:
                entry = calls.setdefault(d["index"], {"id": "", "type": "function",
                                                      "function": {"name": "", "arguments": ""}})
                entry["id"] = d.get("id") or entry["id"]
                fn = d.get("function") or {}
                entry["function"]["name"] = fn.get("name") or entry["function"]["name"]
                entry["function"]["arguments"] += fn.get("arguments") or ""
    if started:
        item = shape.message(text)
        yield event("response.output_text.done", item_id=shape.msg_id, output_index=0,
                    content_index=0, text=text)
        yield event("response.content_part.done", item_id=shape.msg_id, output_index=0,
                    content_index=0, part=item["content"][0])
        yield event("response.output_item.done", output_index=0, item=item)
        output.append(item)
    for _i, call in sorted(calls.items()):
        item = shape.call(call)
        index = len(output)
        yield event("response.output_item.added", output_index=index,
                    item={**item, "arguments": "", "status": "in_progress"})
        yield event("response.function_call_arguments.delta", item_id=item["id"],
                    output_index=index, delta=item["arguments"])
        yield event("response.function_call_arguments.done", item_id=item["id"],
                    output_index=index, arguments=item["arguments"])
        yield event("response.output_item.done", output_index=index, item=item)
        output.append(item)
    length = finish == "length"
    yield event("response.incomplete" if length else "response.completed",
                response=shape.envelope("incomplete" if length else "completed", output, usage,
                                        length))


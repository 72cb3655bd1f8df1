"""Request bodies of the client API, validated at the boundary (OpenAI's field names and ranges).

Every field of OpenAI's chat and completions APIs, and of vLLM's extensions to them, is either
honoured (a field below), accepted because it does not change the answer (``no_effect_fields``),
or refused with a 400 naming it (``refuse_unsupported``): a client never gets a silent 200 for a
parameter that did nothing. Known fields of the wrong type or out of range are a 400 too.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sparecycles import limits
from sparecycles.errors import InvalidRequest
from sparecycles.types import Workload

# Fields that change nothing about the answer: accepted and ignored (OpenAI's bookkeeping,
# caching and routing hints; vLLM's request id and priority).
no_effect_fields = frozenset({
    "user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier",
    "request_id", "priority", "cache_salt", "prompt_cache_retention",
})
# Fields accepted at the one value that is what this server does anyway; any other is a 400.
_only_value: dict[str, Any] = {
    "modalities": ["text"], "skip_special_tokens": True, "add_generation_prompt": True,
    "include_stop_str_in_output": False, "continue_final_message": False,
    "spaces_between_special_tokens": True, "use_beam_search": False, "add_special_tokens": False,
}


def refuse_unsupported(body: BaseModel, honoured_elsewhere: frozenset[str] = frozenset()) -> None:
    """A 400 naming the first field of ``body`` this server does not honour (None values pass:
    some clients send every field, unset ones as null)."""
    for name, value in (body.model_extra or {}).items():
        if name in no_effect_fields or value is None or name in honoured_elsewhere:
            continue
        if name in _only_value and value == _only_value[name]:
            continue
        raise InvalidRequest(f"Unsupported parameter: '{name}' is not supported by this server.",
                             param=name, code="unsupported_parameter")


def _bad_unicode_at(value: Any) -> list[str | int] | None:
    """Where (the path, innermost first) the first string or key in ``value`` is not valid
    Unicode, else None: JSON's ``\\ud800``-``\\udfff`` escapes can carry a lone UTF-16 surrogate,
    which no tokenizer, stop string or node message can take (it would fail deep in a job, not
    here). Cheap on every request: an ASCII string (most) is checked in O(1), and a list of
    numbers (token ids) is not walked: one that holds a string further on fails its type."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return []
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, str) and not k.isascii() and _bad_unicode_at(k) is not None:
                return [k.encode("utf-8", "replace").decode("utf-8")]
            if isinstance(v, str | dict | list) and (bad := _bad_unicode_at(v)) is not None:
                bad.append(k)
                return bad
    elif isinstance(value, list) and value and not isinstance(value[0], int | float):
        for i, v in enumerate(value):
            if isinstance(v, str | dict | list) and (bad := _bad_unicode_at(v)) is not None:
                bad.append(i)
                return bad
    return None


def null_is_default(cls: type[BaseModel], v: Any, info: Any) -> Any:
    """A ``field_validator(..., mode="before")``: null is the field's default, as OpenAI takes
    it (clients such as LiteLLM send null for every field they leave unset)."""
    return cls.model_fields[info.field_name].default if v is None else v


def refuse_bad_unicode(data: Any) -> Any:
    """A 400 naming the first field of a request body whose text is not valid Unicode (a lone
    surrogate); the body unchanged otherwise (a ``model_validator(mode="before")``)."""
    bad = _bad_unicode_at(data)
    if bad is not None:
        where = ".".join(str(p) for p in reversed(bad)) or "body"
        raise InvalidRequest(f"'{where}' is not valid Unicode text: it holds a lone UTF-16 "
                             "surrogate (an unpaired \\ud800-\\udfff escape)", param=where,
                             code="invalid_value")
    return data


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = Field(default=None, max_length=limits.message_chars_max)

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        if self.type not in ("text", "input_text") or self.text is None:
            raise ValueError(f"content parts of type '{self.type}' are not supported "
                             "(text only)")
        return self


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(max_length=64)
    arguments: str = Field(default="{}", max_length=limits.message_chars_max)


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str = Field(default="", max_length=200)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = Field(default=None)
    name: str | None = Field(default=None, max_length=200)
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=limits.tools_per_request_max)
    tool_call_id: str | None = Field(default=None, max_length=200)

    @field_validator("content")
    @classmethod
    def _content_size(cls, v: str | list[ContentPart] | None) -> str | list[ContentPart] | None:
        if isinstance(v, str) and len(v) > limits.message_chars_max:
            raise ValueError(f"message content exceeds {limits.message_chars_max} characters")
        return v

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as Hugging Face chat templates take it: tool calls with their arguments
        as a dict (JSON text where it does not parse), a tool result with its call's id."""
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name, "arguments": _json_or_text(
                     c.function.arguments)}}
                for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


# The nested objects below have a fixed set of fields in OpenAI's API: any other is a 400
# (``extra="forbid"``), not a key silently ignored (a schema under ``response_format.schema``
# instead of ``response_format.json_schema.schema`` gave unconstrained JSON). Messages stay open:
# clients send assistant messages back as they got them (``refusal``, ``annotations``, ...).
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    include_obfuscation: bool | None = None  # padding against side channels: none is sent

    _nulls = field_validator("include_usage", mode="before")(null_is_default)

    @field_validator("include_obfuscation")
    @classmethod
    def _no_obfuscation(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("obfuscation padding is not supported (send false or omit it)")
        return v


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object")
        return self


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = Field(default=None, max_length=limits.message_chars_max)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def parameters_schema(self) -> dict[str, Any]:
        return self.parameters or {"type": "object", "properties": {}}


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: NamedFunction


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=200)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=limits.n_choices_max)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(default=None,
                                                max_length=limits.logit_bias_entries_max)
    response_format: ResponseFormat | None = None
    # vLLM's sampling extensions
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=limits.repetition_penalty_max)
    top_k: int = Field(default=0, ge=-1, le=limits.top_k_max)  # 0 or -1: no cut
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    min_tokens: int = Field(default=0, ge=0, le=limits.completion_tokens_max)
    ignore_eos: bool = False
    # sparecycles extensions (ignored by other servers, harmless to send)
    # What the request is for is decided by the platform (the key's account: api/auth.workload_of),
    # never by the body: a body that names another workload than its key's gets a 400.
    workload: Workload | None = None
    trusted_only: bool = False

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data: Any) -> Any:
        return refuse_bad_unicode(data)

    # the chat's logprobs and parallel_tool_calls, the completion's echo: declared below
    _nulls = field_validator("temperature", "top_p", "presence_penalty", "frequency_penalty",
                             "repetition_penalty", "min_p", "n", "stream", "top_k", "min_tokens",
                             "ignore_eos", "trusted_only", "logprobs", "parallel_tool_calls",
                             "echo", mode="before", check_fields=False)(null_is_default)

    @field_validator("stream_options")
    @classmethod
    def _stream_options_with_stream(cls, v: StreamOptions | None, info: Any
                                    ) -> StreamOptions | None:
        if v is not None and not info.data.get("stream"):  # ``stream`` is read before it
            raise ValueError("stream_options is only allowed when stream is true")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_limits(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > limits.stop_sequences_max:
            raise ValueError(f"at most {limits.stop_sequences_max} stop sequences")
        if any(len(s) > limits.stop_sequence_chars_max for s in items):
            raise ValueError(f"stop sequences are at most {limits.stop_sequence_chars_max} chars")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not key.lstrip("-").isdigit() or int(key) < 0:
                raise ValueError(f"keys are token ids; '{key}' is not one")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"bias {bias} of token {key} is outside [-100, 100]")
        return v

    def stop_tuple(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def bias_tuple(self) -> tuple[tuple[int, float], ...]:
        return tuple(sorted((int(k), float(b)) for k, b in (self.logit_bias or {}).items()))

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1, max_length=limits.messages_per_request_max)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=limits.top_logprobs_max)
    tools: list[Tool] | None = Field(default=None, max_length=limits.tools_per_request_max)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _not_empty(self) -> ChatCompletionRequest:
        if not any(m.text().strip() or m.tool_calls for m in self.messages):
            raise ValueError("messages must contain some text")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(min_length=1)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=limits.top_logprobs_max)
    best_of: int | None = Field(default=None, ge=1, le=limits.n_choices_max)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: Any) -> Any:
        prompts = [v] if isinstance(v, str) or (v and isinstance(v[0], int)) else v
        if len(prompts) > limits.prompts_per_request_max:
            raise ValueError(f"at most {limits.prompts_per_request_max} prompts per request")
        for p in prompts:
            if isinstance(p, str):
                if len(p) > limits.message_chars_max:
                    raise ValueError(f"prompt exceeds {limits.message_chars_max} characters")
                if not p.strip():
                    raise ValueError("prompt must not be empty")
            elif not p:
                raise ValueError("a prompt of token ids must not be empty")
        return v

    def prompt_list(self) -> list[str | list[int]]:
        v = self.prompt
        if isinstance(v, str) or (v and isinstance(v[0], int)):
            return [v]  # type: ignore[list-item]
        return list(v)  # type: ignore[arg-type]

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

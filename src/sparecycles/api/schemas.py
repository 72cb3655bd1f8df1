"""Request bodies of the client API, validated at the boundary (OpenAI's field names and ranges).

Unknown fields are accepted and ignored (clients and SDKs send more than we use); known fields of
the wrong type or out of range are a 400 in OpenAI's error shape.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sparecycles import limits
from sparecycles.types import Workload


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str = Field(max_length=limits.message_chars_max)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(default=None)
    name: str | None = Field(default=None, max_length=200)

    @field_validator("content")
    @classmethod
    def _content_size(cls, v: str | list[TextPart] | None) -> str | list[TextPart] | None:
        if isinstance(v, str) and len(v) > limits.message_chars_max:
            raise ValueError(f"message content exceeds {limits.message_chars_max} characters")
        return v

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


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
    user: str | None = Field(default=None, max_length=200)
    # sparecycles extensions (ignored by other servers, harmless to send)
    # What the request is for is decided by the platform (the key's account: api/auth.workload_of),
    # never by the body: a body that names another workload than its key's gets a 400.
    workload: Workload | None = None
    trusted_only: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_limits(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > limits.stop_sequences_max:
            raise ValueError(f"at most {limits.stop_sequences_max} stop sequences")
        if any(len(s) > limits.stop_sequence_chars_max for s in items):
            raise ValueError(f"stop sequences are at most {limits.stop_sequence_chars_max} chars")
        return v

    def stop_tuple(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1, max_length=limits.messages_per_request_max)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _not_empty(self) -> ChatCompletionRequest:
        if not any(m.text().strip() for m in self.messages):
            raise ValueError("messages must contain some text")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] = Field(min_length=1)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str] | list[int]) -> str | list[str] | list[int]:
        if isinstance(v, str):
            if len(v) > limits.message_chars_max:
                raise ValueError(f"prompt exceeds {limits.message_chars_max} characters")
            if not v.strip():
                raise ValueError("prompt must not be empty")
        elif all(isinstance(x, str) for x in v) and len(v) != 1:
            raise ValueError("exactly one prompt per request is supported")
        return v

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

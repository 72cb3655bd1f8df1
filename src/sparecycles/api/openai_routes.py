"""The OpenAI-compatible client API: chat completions, completions, models, and a job's record.

A request is validated, tokenized with the model's own tokenizer, admitted (a hold on the
client's balance), placed by dispatch, and its tokens are turned into text here (``TextStream``),
so usage and text come from one tokenizer whatever node served the job.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from sparecycles import limits, modelfiles
from sparecycles.api.auth import require_key, workload_of
from sparecycles.api.errors import ERROR_RESPONSES, error_body
from sparecycles.api.schemas import ChatCompletionRequest, CompletionRequest
from sparecycles.api.sse import FLUSH, EventStreamResponse
from sparecycles.coordinator.jobs import JobEvent, LiveJob
from sparecycles.coordinator.service import Coordinator
from sparecycles.coordinator.textstream import TextStream
from sparecycles.errors import ContextLengthExceeded, InvalidRequest, NotFound, PermissionDenied
from sparecycles.secrets_util import new_id
from sparecycles.store import ApiKeyInfo
from sparecycles.types import SamplingParams

router = APIRouter(responses=ERROR_RESPONSES)
default_max_tokens = 512  # when a request names none; bounded by the model's context
# A prompt this short is rendered and tokenized on the event loop (a fraction of a millisecond),
# saving two thread switches on the request's path; a longer one goes to a worker thread so
# that it never stalls the other streams.
render_inline_chars_max = 1_000


def _coordinator(request: Request) -> Coordinator:
    return request.app.state.coordinator


@router.get("/v1/models")
async def list_models(request: Request, _: ApiKeyInfo = Depends(require_key)) -> dict[str, Any]:
    coord = _coordinator(request)
    return {
        "object": "list",
        "data": [
            {
                "id": name,
                "object": "model",
                "created": int(coord.started_at_s),
                "owned_by": "sparecycles",
                "context_length": spec.context_length,
            }
            for name, spec in coord.models.items()
        ],
    }


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, key: ApiKeyInfo = Depends(require_key)
) -> JSONResponse | EventStreamResponse:
    received_perf_s = time.perf_counter()
    coord = _coordinator(request)
    _spec, tokenizer = coord.model(body.model)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    chars = sum(len(m["content"]) for m in messages)
    prompt_ids = await _tokenize(modelfiles.render_chat, tokenizer, messages, chars)
    return await _run(coord, key, body, prompt_ids, "chat.completions", received_perf_s)


@router.post("/v1/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request, key: ApiKeyInfo = Depends(require_key)
) -> JSONResponse | EventStreamResponse:
    received_perf_s = time.perf_counter()
    coord = _coordinator(request)
    _spec, tokenizer = coord.model(body.model)
    if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], int):
        vocab = len(tokenizer)
        if any(not (0 <= t < vocab) for t in body.prompt):  # type: ignore[operator]
            raise InvalidRequest("prompt token ids must be in the model's vocabulary",
                                 param="prompt")
        prompt_ids = list(body.prompt)  # type: ignore[arg-type]
    else:
        text = body.prompt if isinstance(body.prompt, str) else str(body.prompt[0])
        prompt_ids = await _tokenize(modelfiles.render_completion, tokenizer, text, len(text))
    return await _run(coord, key, body, prompt_ids, "completions", received_perf_s)


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, request: Request, key: ApiKeyInfo = Depends(require_key)
                  ) -> dict[str, Any]:
    """A job's metering and money, for the client that sent it (sparecycles extension)."""
    coord = _coordinator(request)
    job_id = job_id.removeprefix("chatcmpl-").removeprefix("cmpl-")
    row = await asyncio.to_thread(coord.store.get_job, job_id)
    if row is None or row.client_id != key.client_id:
        raise NotFound(f"no job {job_id}")
    attempts = await asyncio.to_thread(coord.store.attempts, job_id)
    money = await asyncio.to_thread(coord.ledger.job_money, job_id)
    return {
        "id": row.id,
        "model": row.model,
        "state": row.state,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "finish_reason": row.finish_reason,
        "error": row.error,
        "time_to_first_token_s": row.time_to_first_token_s,
        "total_s": row.total_s,
        "attempts": [
            {
                "attempt": a.attempt,
                "node_id": a.node_id,
                "outcome": a.outcome,
                "completion_tokens": a.completion_tokens,
                "busy_s": a.busy_s,
                "energy_j": a.energy_j,
                "energy_source": a.energy_source,
            }
            for a in attempts
        ],
        "money": money,
    }


# ---- the shared path of both endpoints --------------------------------------------------------


async def _tokenize(render: Callable[[Any, Any], list[int]], tokenizer: Any, what: Any,
                    chars: int) -> list[int]:
    """``render(tokenizer, what)``: inline when short (``render_inline_chars_max``), else on a
    worker thread."""
    if chars <= render_inline_chars_max:
        return render(tokenizer, what)
    return await asyncio.to_thread(render, tokenizer, what)


async def _run(
    coord: Coordinator,
    key: ApiKeyInfo,
    body: ChatCompletionRequest | CompletionRequest,
    prompt_ids: list[int],
    endpoint: str,
    received_perf_s: float,
) -> JSONResponse | EventStreamResponse:
    spec, tokenizer = coord.model(body.model)
    room = spec.context_length - len(prompt_ids)
    if room < 1:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {spec.context_length} tokens; your "
            f"prompt has {len(prompt_ids)} tokens.", param="messages")
    asked = body.requested_max_tokens()
    if asked is not None and asked > min(room, limits.completion_tokens_max):
        raise ContextLengthExceeded(
            f"This model's maximum context length is {spec.context_length} tokens. However, you "
            f"requested {len(prompt_ids) + asked} tokens ({len(prompt_ids)} in the prompt, "
            f"{asked} for the completion). Please reduce the prompt or max_tokens.",
            param="max_tokens")
    workload = workload_of(key)
    if body.workload is not None and body.workload != workload:
        raise InvalidRequest(f"this key's requests are {workload}; the request body cannot make "
                             f"them {body.workload}", param="workload")
    max_tokens = asked or min(room, default_max_tokens)
    sampling = SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop_tuple(),
    )
    assert coord.dispatcher is not None
    if key.client_id is None:  # only a client's keys hold the inference scope (auth.py)
        raise PermissionDenied("This endpoint needs a client's API key.")
    job_id = new_id("job")
    # the key's limits (429 with Retry-After): in flight, rate, budget; released when it ends
    ticket = await coord.gate.admit(key.key_id, job_id, body.model, len(prompt_ids), max_tokens)
    try:
        job = await coord.dispatcher.admit(
            job_id=job_id,
            client_id=key.client_id,
            api_key_id=key.key_id,
            model=body.model,
            endpoint=endpoint,
            prompt_ids=prompt_ids,
            sampling=sampling,
            stream=body.stream,
            workload=workload,
            trusted_only=body.trusted_only or ticket.trusted_only,
            received_perf_s=received_perf_s,
        )
    except BaseException:
        coord.gate.release(job_id)
        raise
    text = TextStream(tokenizer, sampling.stop)
    chat = endpoint == "chat.completions"
    reply = _Reply(job, body.model, chat, len(prompt_ids))
    # Wait for the first event before answering, so that a job that cannot be placed gets a
    # proper HTTP status (503) rather than an error inside a 200 stream.
    try:
        first = await job.events.get()
    except asyncio.CancelledError:
        await _cancel(coord, job)
        raise
    coord.metrics.requests.labels(endpoint, "error" if first.kind == "error" else "ok").inc()
    if job.dispatched_perf_s is not None:
        coord.metrics.overhead.labels("admission").observe(job.dispatched_perf_s - received_perf_s)
    if first.kind == "error":
        assert first.error is not None
        raise first.error
    if body.stream:
        return EventStreamResponse(
            _stream(coord, job, first, text, reply, body.include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Sparecycles-Job-Id": job.job_id},
        )
    parts: list[str] = []
    event: JobEvent | None = first
    finish = "stop"
    while event is not None:
        if event.kind == "tokens":
            parts.append(text.push(event.token_ids))
            if text.stopped:
                await coord.dispatcher.cancel(
                    job.job_id, reason="stop", keep_tokens=text.tokens_used)
        elif event.kind == "done":
            finish = "stop" if text.stopped else (event.finish_reason or "stop")
            break
        elif event.kind == "error":
            assert event.error is not None
            if not job.generated:
                raise event.error
            finish = "error"
            break
        event = await job.events.get()
    parts.append(text.finish())
    usage = reply.usage(len(job.generated))
    return JSONResponse(
        reply.complete("".join(parts), finish, usage),
        headers={"X-Sparecycles-Job-Id": job.job_id},
    )


async def _stream(
    coord: Coordinator,
    job: LiveJob,
    first: JobEvent,
    text: TextStream,
    reply: _Reply,
    include_usage: bool,
) -> AsyncIterator[str]:
    assert coord.dispatcher is not None
    finished = False
    try:
        if reply.chat:
            yield _sse(reply.chunk({"role": "assistant", "content": ""}, None))
        event = first
        while True:
            if event.kind == "tokens":
                delta = text.push(event.token_ids)
                if delta:
                    yield _sse(reply.chunk_text(delta))
                coord.metrics.overhead.labels("relay").observe(
                    time.perf_counter() - event.at_perf_s)
                if text.stopped:
                    await coord.dispatcher.cancel(
                    job.job_id, reason="stop", keep_tokens=text.tokens_used)
            elif event.kind == "done":
                tail = text.finish()
                if tail:
                    yield _sse(reply.chunk_text(tail))
                finish = "stop" if text.stopped else (event.finish_reason or "stop")
                yield _sse(reply.chunk_finish(finish))
                finished = True
                break
            elif event.kind == "error":
                assert event.error is not None
                err = event.error
                yield _sse(error_body(err.message, err.error_type, err.param, err.code))
                finished = True
                break
            if job.events.empty():
                yield FLUSH  # about to wait for the node: what the client has not got goes out
            event = await job.events.get()
        if include_usage:
            yield _sse(reply.chunk_usage(reply.usage(len(job.generated))))
        yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client went away mid-stream: stop the work, charge what exists
            await _cancel(coord, job)


async def _cancel(coord: Coordinator, job: LiveJob) -> None:
    assert coord.dispatcher is not None
    await asyncio.shield(coord.dispatcher.cancel(job.job_id, reason="client"))


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {orjson.dumps(obj).decode()}\n\n"  # compact, UTF-8: ~15x json.dumps


class _Reply:
    """The JSON objects of one answer, in the chat or the legacy completions shape."""

    def __init__(self, job: LiveJob, model: str, chat: bool, prompt_tokens: int):
        self.chat, self.model, self.prompt_tokens = chat, model, prompt_tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + job.job_id
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def complete(self, text: str, finish: str, usage: dict[str, int]) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {**self._head(self.object), "choices": [choice], "usage": usage}

    def _chunk_obj(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def chunk(self, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {**self._head(self._chunk_obj()), "choices": [choice]}

    def chunk_text(self, text: str) -> dict[str, Any]:
        if self.chat:
            return self.chunk({"content": text}, None)
        choice = {"index": 0, "text": text, "finish_reason": None, "logprobs": None}
        return {**self._head(self._chunk_obj()), "choices": [choice]}

    def chunk_finish(self, finish: str) -> dict[str, Any]:
        if self.chat:
            return self.chunk({}, finish)
        choice = {"index": 0, "text": "", "finish_reason": finish, "logprobs": None}
        return {**self._head(self._chunk_obj()), "choices": [choice]}

    def chunk_usage(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self._head(self._chunk_obj()), "choices": [], "usage": usage}

"""The OpenAI-compatible client API: chat completions, completions, models, and a job's record.

A request is validated, tokenized with the model's own tokenizer, admitted (a hold on the
client's balance), placed by dispatch, and its tokens are turned into text here (``TextStream``),
so usage and text come from one tokenizer whatever node served the job.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from sparecycles import grammar, limits, modelfiles
from sparecycles.api import toolcalls
from sparecycles.api.auth import require_key, workload_of
from sparecycles.api.errors import ERROR_RESPONSES, error_body
from sparecycles.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ResponseFormat,
    refuse_unsupported,
)
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


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request, _: ApiKeyInfo = Depends(require_key)
                    ) -> dict[str, Any]:
    coord = _coordinator(request)
    spec, _tok = coord.model(model_id)  # ModelNotFound (404) otherwise
    return {"id": model_id, "object": "model", "created": int(coord.started_at_s),
            "owned_by": "sparecycles", "context_length": spec.context_length}


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, key: ApiKeyInfo = Depends(require_key)
) -> JSONResponse | EventStreamResponse:
    return await chat_completion(_coordinator(request), body, key)


async def chat_completion(coord: Coordinator, body: ChatCompletionRequest, key: ApiKeyInfo,
                          received_perf_s: float | None = None
                          ) -> JSONResponse | EventStreamResponse:
    """The answer to a chat request (validated, its key's inference scope checked): the route
    above, and the client API's fast path (api/fastpath.py), which calls it directly."""
    if received_perf_s is None:
        received_perf_s = time.perf_counter()
    refuse_unsupported(body)
    if body.top_logprobs and not body.logprobs:
        raise InvalidRequest("top_logprobs requires logprobs to be true", param="top_logprobs")
    _spec, tokenizer = coord.model(body.model)
    plan = toolcalls.plan_for(body, toolcalls.parser_for(tokenizer))
    tools = [t.model_dump(exclude_none=True) for t in plan.tools] or None
    if tools:
        size = len(json.dumps(tools, separators=(",", ":")))
        if size > limits.tool_schema_bytes_max:
            raise InvalidRequest(f"the tools take {size} bytes; the limit "
                                 f"(tool_schema_bytes_max) is {limits.tool_schema_bytes_max}",
                                 param="tools", code="tools_too_large")
    messages = [m.for_template() for m in body.messages]
    chars = sum(len(m["content"]) for m in messages)
    auto = plan.mode is toolcalls.ToolMode.AUTO
    prompt_ids = await _tokenize(
        lambda tok, m: modelfiles.render_chat(tok, m, tools, tools_must_show=auto), tokenizer,
        messages, chars + (len(json.dumps(tools)) if tools else 0))
    schema_param, schema = _constraint(body.response_format, plan)
    grammar_text = await _grammar(coord, body.model, tokenizer, schema_param, schema)
    base = _sampling(body, tokenizer, grammar_text, logprobs=body.logprobs,
                     top_logprobs=body.top_logprobs or 0)
    prompts = [_Prompt(prompt_ids, "")]
    return await _run(coord, key, body, prompts, base, body.n, "chat.completions", received_perf_s,
                      plan=plan, want_logprobs=body.logprobs)


@router.post("/v1/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request, key: ApiKeyInfo = Depends(require_key)
) -> JSONResponse | EventStreamResponse:
    return await completion(_coordinator(request), body, key)


async def completion(coord: Coordinator, body: CompletionRequest, key: ApiKeyInfo,
                     received_perf_s: float | None = None) -> JSONResponse | EventStreamResponse:
    """The answer to a legacy completions request (see ``chat_completion``)."""
    if received_perf_s is None:
        received_perf_s = time.perf_counter()
    refuse_unsupported(body)
    if body.suffix:
        raise InvalidRequest("suffix is not supported by this server", param="suffix")
    if body.echo and body.logprobs is not None:
        raise InvalidRequest("echo with logprobs (the prompt's log-probabilities) is not "
                             "supported", param="echo")
    best_of = body.best_of or body.n
    if best_of < body.n:
        raise InvalidRequest("best_of must be at least n", param="best_of")
    if best_of > body.n and body.stream:
        raise InvalidRequest("best_of cannot be streamed", param="best_of")
    _spec, tokenizer = coord.model(body.model)
    prompts = []
    for item in body.prompt_list():
        if isinstance(item, list):
            vocab = len(tokenizer)
            if any(not isinstance(t, int) or not (0 <= t < vocab) for t in item):
                raise InvalidRequest("prompt token ids must be in the model's vocabulary",
                                     param="prompt")
            text = tokenizer.decode(item, skip_special_tokens=True) if body.echo else ""
            prompts.append(_Prompt(list(item), text))
        else:
            ids = await _tokenize(modelfiles.render_completion, tokenizer, item, len(item))
            prompts.append(_Prompt(ids, item))
    if len(prompts) * best_of > limits.choices_per_request_max:
        raise InvalidRequest(f"{len(prompts)} prompts x {best_of} choices exceed "
                             f"choices_per_request_max ({limits.choices_per_request_max})",
                             param="n")
    schema_param, schema = _constraint(body.response_format, None)
    grammar_text = await _grammar(coord, body.model, tokenizer, schema_param, schema)
    n_lps = body.logprobs
    base = _sampling(body, tokenizer, grammar_text, logprobs=n_lps is not None or best_of > body.n,
                     top_logprobs=n_lps or 0)
    return await _run(coord, key, body, prompts, base, body.n, "completions", received_perf_s,
                      best_of=best_of, echo=body.echo, want_logprobs=n_lps is not None)


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


@dataclass(frozen=True, slots=True)
class _Prompt:
    ids: list[int]
    text: str  # for echo


def _constraint(fmt: ResponseFormat | None, plan: toolcalls.ToolPlan | None
                ) -> tuple[str, Any]:
    """(the parameter that asks, the JSON schema the output must match); ("", None) for free
    text, ("response_format", None) for any JSON object."""
    forced = plan is not None and plan.mode in (toolcalls.ToolMode.NAMED,
                                                toolcalls.ToolMode.REQUIRED)
    if fmt is not None and fmt.type != "text":
        if forced:
            raise InvalidRequest("response_format cannot be combined with a forced tool_choice",
                                 param="response_format")
        if fmt.type == "json_object":
            return "response_format", None
        assert fmt.json_schema is not None
        return "response_format", fmt.json_schema.schema_ or {}
    if forced:
        assert plan is not None
        return "tool_choice", plan.grammar_schema()
    return "", _FREE


_FREE = object()
# by id of the model's tokenizer (kept with it, so a reused id is never a stale compiler)
_compilers: dict[int, tuple[Any, grammar.GrammarCompiler]] = {}


async def _grammar(coord: Coordinator, model: str, tokenizer: Any, param: str, schema: Any
                   ) -> str | None:
    """The llguidance grammar for the schema, checked to compile against the model's vocabulary
    within ``limits.grammar_compile_s_max``; a 400 naming ``param`` otherwise."""
    if schema is _FREE:
        return None
    if not grammar.available():
        raise InvalidRequest("structured outputs need the grammar engine (llguidance), which "
                             "this coordinator lacks", param=param)
    if schema is not None:
        grammar.check_schema_size(schema, param)
    text = grammar.json_schema_grammar(schema, param)
    if len(text) > limits.grammar_bytes_max:
        raise InvalidRequest(f"the compiled grammar has {len(text)} bytes; the limit "
                             f"(grammar_bytes_max) is {limits.grammar_bytes_max}", param=param,
                             code="grammar_too_large")
    entry = _compilers.get(id(tokenizer))
    compiler = entry[1] if entry is not None and entry[0] is tokenizer else None
    if compiler is None:
        spec, _ = coord.model(model)
        compiler = grammar.GrammarCompiler(grammar.from_hf_tokenizer(
            tokenizer, max(len(tokenizer), getattr(spec, "vocab_size", 0) or 0),
            {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))
        _compilers[id(tokenizer)] = (tokenizer, compiler)
    try:
        async with asyncio.timeout(limits.grammar_compile_s_max):
            compiled = await asyncio.to_thread(compiler.matcher, text, param)
    except TimeoutError:
        raise InvalidRequest(f"the schema did not compile within grammar_compile_s_max "
                             f"({limits.grammar_compile_s_max} s)", param=param,
                             code="grammar_too_complex") from None
    # measured per request: sparecycles_coordinator_overhead_seconds{stage="grammar_compile"}
    coord.metrics.overhead.labels("grammar_compile").observe(compiled.compile_s)
    return text


def _sampling(body: ChatCompletionRequest | CompletionRequest, tokenizer: Any,
              grammar_text: str | None, *, logprobs: bool, top_logprobs: int) -> SamplingParams:
    bias = body.bias_tuple()
    vocab = len(tokenizer)
    if any(t >= vocab for t, _ in bias):
        raise InvalidRequest(f"logit_bias names token ids outside the vocabulary [0, {vocab})",
                             param="logit_bias")
    asked = body.requested_max_tokens()
    if asked is not None and body.min_tokens > asked:
        raise InvalidRequest("min_tokens must not exceed max_tokens", param="min_tokens")
    return SamplingParams(
        max_tokens=1,  # set per prompt in _run
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop_tuple(),
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
        logit_bias=bias,
        top_k=max(0, body.top_k),
        min_p=body.min_p,
        min_tokens=body.min_tokens,
        ignore_eos=body.ignore_eos,
        grammar=grammar_text,
        top_logprobs=top_logprobs,
        logprobs=logprobs,
    )


def _max_tokens(spec: Any, prompt_ids: list[int], asked: int | None,
                prompt_param: str = "messages") -> int:
    room = spec.context_length - len(prompt_ids)
    if room < 1:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {spec.context_length} tokens; your "
            f"prompt has {len(prompt_ids)} tokens.", param=prompt_param)
    if asked is not None and asked > min(room, limits.completion_tokens_max):
        raise ContextLengthExceeded(
            f"This model's maximum context length is {spec.context_length} tokens. However, you "
            f"requested {len(prompt_ids) + asked} tokens ({len(prompt_ids)} in the prompt, "
            f"{asked} for the completion). Please reduce the prompt or max_tokens.",
            param="max_tokens")
    return asked or min(room, default_max_tokens)


@dataclass(eq=False)
class _Choice:
    """One job of a request: a choice (or a best_of candidate) of one prompt."""

    prompt_index: int
    prompt: _Prompt
    sampling: SamplingParams
    text: TextStream
    job: LiveJob | None = None
    index: int = 0  # its index among the answer's choices
    parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # the tokens the text used
    lps: list[float | None] = field(default_factory=list)
    tops: list[list[tuple[int, float]]] = field(default_factory=list)
    finish: str = "stop"
    ended: bool = False
    # streaming state of tool calls
    emitted: int = 0  # characters of the text already sent as content or arguments
    in_call: bool = False  # auto mode: a tool call began; the rest waits for the end
    header_sent: bool = False  # named mode: the call's id and name went out
    call_id: str = ""

    def whole(self) -> str:
        return "".join(self.parts)

    def consume(self, event: JobEvent) -> str:
        """Text of a tokens event, recording the tokens (and log-probabilities) it used."""
        before = self.text.tokens_used
        delta = self.text.push(event.token_ids)
        used = self.text.tokens_used - before
        self.token_ids.extend(event.token_ids[:used])
        if event.logprobs is not None:
            self.lps.extend(event.logprobs[:used])
            tops = event.top_logprobs or ((),) * used
            self.tops.extend(list(t) for t in tops[:used])
        self.parts.append(delta)
        return delta

    def cumulative_logprob(self) -> float:
        return sum(x for x in self.lps if x is not None)


async def _run(
    coord: Coordinator,
    key: ApiKeyInfo,
    body: ChatCompletionRequest | CompletionRequest,
    prompts: list[_Prompt],
    base: SamplingParams,
    n: int,
    endpoint: str,
    received_perf_s: float,
    *,
    best_of: int | None = None,
    plan: toolcalls.ToolPlan | None = None,
    echo: bool = False,
    want_logprobs: bool = False,
) -> JSONResponse | EventStreamResponse:
    workload = workload_of(key)
    if body.workload is not None and body.workload != workload:
        raise InvalidRequest(f"this key's requests are {workload}; the request body cannot make "
                             f"them {body.workload}", param="workload")
    spec, tokenizer = coord.model(body.model)
    per_prompt = best_of or n
    choices: list[_Choice] = []
    for p_index, prompt in enumerate(prompts):
        max_tokens = _max_tokens(spec, prompt.ids, body.requested_max_tokens(),
                                 "messages" if endpoint == "chat.completions" else "prompt")
        for k in range(per_prompt):
            seed = base.seed
            if seed is not None and per_prompt > 1:  # each choice its own, reproducible draw
                seed = (seed + k + 2**63) % 2**64 - 2**63
            sampling = replace(base, max_tokens=max_tokens, seed=seed)
            choices.append(_Choice(p_index, prompt, sampling, TextStream(tokenizer, base.stop),
                                   index=p_index * n + k))
    assert coord.dispatcher is not None
    chat = endpoint == "chat.completions"
    if len(choices) > 1 and key.key_id is not None:
        await coord.gate.fits(key.key_id, len(choices), "best_of" if best_of and best_of > n
                              else "prompt" if len(prompts) > 1 and per_prompt == 1 else "n")
    try:
        for c in choices:
            c.job = await _admit(coord, key, body, c, endpoint, received_perf_s)
        # Wait for each first event before answering, so that a job that cannot be placed gets
        # a proper HTTP status (503) rather than an error inside a 200 stream.
        firsts = list(await asyncio.gather(*(_job(c).events.get() for c in choices)))
    except BaseException:
        for c in choices:
            if c.job is not None:
                await _cancel(coord, c.job)
        raise
    failed = next((f for f in firsts if f.kind == "error"), None)
    coord.metrics.requests.labels(endpoint, "error" if failed else "ok").inc()
    first_job = _job(choices[0])
    if first_job.dispatched_perf_s is not None:
        coord.metrics.overhead_admission.observe(first_job.dispatched_perf_s - received_perf_s)
        if first_job.placement_s is not None and first_job.hold_s is not None:
            coord.metrics.overhead_placement.observe(first_job.placement_s)
            coord.metrics.overhead_hold.observe(first_job.hold_s)
    if failed is not None:
        for c in choices:
            await _cancel(coord, _job(c))
        assert failed.error is not None
        raise failed.error
    reply = _Reply(first_job, body.model, chat, sum(len(p.ids) for p in prompts), tokenizer,
                   plan, want_logprobs)
    headers = {"X-Sparecycles-Job-Id": first_job.job_id}
    if len(choices) > 1:
        headers["X-Sparecycles-Job-Ids"] = ",".join(_job(c).job_id for c in choices)
    if body.stream:
        return EventStreamResponse(
            _stream(coord, choices, firsts, reply, body.include_usage, echo),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", **headers},
        )
    try:
        await asyncio.gather(*(_collect(coord, c, f) for c, f in zip(choices, firsts,
                                                                      strict=True)))
    except BaseException:
        for c in choices:
            await _cancel(coord, _job(c))
        raise
    usage = reply.usage(sum(len(_job(c).generated) for c in choices))
    shown = choices
    if best_of and best_of > n:  # the n likeliest of each prompt's best_of, by cumulative lp
        shown = []
        for p_index in range(len(prompts)):
            mine = [c for c in choices if c.prompt_index == p_index]
            mine.sort(key=lambda c: c.cumulative_logprob(), reverse=True)
            for k, c in enumerate(mine[:n]):
                c.index = p_index * n + k
                shown.append(c)
    return JSONResponse(reply.complete(shown, usage, echo), headers=headers)


def _job(c: _Choice) -> LiveJob:
    assert c.job is not None
    return c.job


async def _admit(coord: Coordinator, key: ApiKeyInfo,
                 body: ChatCompletionRequest | CompletionRequest, c: _Choice, endpoint: str,
                 received_perf_s: float) -> LiveJob:
    assert coord.dispatcher is not None
    if key.client_id is None:  # only a client's keys hold the inference scope (auth.py)
        raise PermissionDenied("This endpoint needs a client's API key.")
    workload = workload_of(key)  # decided by the key, never by the body (checked in _run)
    job_id = new_id("job")
    # the key's limits (429 with Retry-After): in flight, rate, budget; released when it ends
    ticket = await coord.gate.admit(key.key_id, job_id, body.model, len(c.prompt.ids),
                                    c.sampling.max_tokens)
    try:
        return await coord.dispatcher.admit(
            job_id=job_id,
            client_id=key.client_id,
            api_key_id=key.key_id,
            model=body.model,
            endpoint=endpoint,
            prompt_ids=c.prompt.ids,
            sampling=c.sampling,
            stream=body.stream,
            workload=workload,
            trusted_only=body.trusted_only or ticket.trusted_only,
            received_perf_s=received_perf_s,
        )
    except BaseException:
        coord.gate.release(job_id)
        raise


async def _collect(coord: Coordinator, c: _Choice, first: JobEvent) -> None:
    """Read a choice's events to its end (non-streaming)."""
    assert coord.dispatcher is not None
    job = _job(c)
    event: JobEvent = first
    while True:
        if event.kind == "tokens":
            c.consume(event)
            if c.text.stopped:
                await coord.dispatcher.cancel(job.job_id, reason="stop",
                                              keep_tokens=c.text.tokens_used)
        elif event.kind == "done":
            c.finish = "stop" if c.text.stopped else (event.finish_reason or "stop")
            break
        elif event.kind == "error":
            assert event.error is not None
            if not job.generated:
                raise event.error
            c.finish = "error"
            break
        event = await job.events.get()
    c.parts.append(c.text.finish())
    c.ended = True


async def _stream(
    coord: Coordinator,
    choices: list[_Choice],
    firsts: list[JobEvent],
    reply: _Reply,
    include_usage: bool,
    echo: bool = False,
) -> AsyncIterator[str]:
    assert coord.dispatcher is not None
    pumps: list[asyncio.Task[None]] = []
    relay = coord.metrics.overhead_relay
    if len(choices) == 1:  # one job: its own queue, read directly (no task, no second queue)
        only, events = choices[0], _job(choices[0]).events
        ahead: JobEvent | None = firsts[0]

        def ready() -> bool:
            return ahead is not None or not events.empty()

        async def next_event() -> tuple[_Choice, JobEvent]:
            nonlocal ahead
            if ahead is not None:
                event, ahead = ahead, None
                return only, event
            return only, await events.get()
    else:  # several: one task per job feeds a merged queue, in the order events come
        merged: asyncio.Queue[tuple[_Choice, JobEvent]] = asyncio.Queue()

        async def pump(c: _Choice) -> None:
            while True:
                event = await _job(c).events.get()
                await merged.put((c, event))
                if event.kind in ("done", "error"):
                    return

        for c, first in zip(choices, firsts, strict=True):
            merged.put_nowait((c, first))
            if first.kind == "tokens":
                pumps.append(asyncio.create_task(pump(c)))

        def ready() -> bool:
            return not merged.empty()

        next_event = merged.get
    finished = False
    open_choices = len(choices)
    try:
        if reply.chat:
            for c in choices:
                yield _sse(reply.chunk(c.index, {"role": "assistant", "content": ""}, None))
        elif echo:  # the prompt first, as the answer given whole begins with it
            for c in choices:
                if c.prompt.text:
                    yield reply.text_sse(c.index, c.prompt.text)
        while open_choices:
            if not ready():
                yield FLUSH  # about to wait for a node: what the client has not got goes out
            c, event = await next_event()
            if c.ended:
                continue
            if event.kind == "tokens":
                before = len(c.lps)
                delta = c.consume(event)
                lps = reply.logprobs_obj(c, before, len(c.lps))
                if lps is None and reply.plain:  # text alone: spliced into its encoded chunk
                    if delta:
                        yield reply.text_sse(c.index, delta)
                else:
                    for chunk in reply.deltas(c, delta, lps):
                        yield _sse(chunk)
                relay.observe(time.perf_counter() - event.at_perf_s)
                if c.text.stopped:
                    await coord.dispatcher.cancel(_job(c).job_id, reason="stop",
                                                  keep_tokens=c.text.tokens_used)
            elif event.kind == "done":
                tail = c.text.finish()
                c.parts.append(tail)
                c.finish = "stop" if c.text.stopped else (event.finish_reason or "stop")
                for chunk in reply.ending(c, tail):
                    yield _sse(chunk)
                c.ended = True
                open_choices -= 1
            elif event.kind == "error":
                assert event.error is not None
                err = event.error
                yield _sse(error_body(err.message, err.error_type, err.param, err.code))
                break
        else:
            finished = True
        if include_usage:
            yield _sse(reply.chunk_usage(reply.usage(sum(len(_job(c).generated)
                                                         for c in choices))))
        yield "data: [DONE]\n\n"
    finally:
        for task in pumps:
            task.cancel()
        if not finished:  # the client went away mid-stream: stop the work, charge what exists
            for c in choices:
                await _cancel(coord, _job(c))


async def _cancel(coord: Coordinator, job: LiveJob) -> None:
    assert coord.dispatcher is not None
    await asyncio.shield(coord.dispatcher.cancel(job.job_id, reason="client"))


_marker = "\x00"  # where the text goes in a chunk's template (JSON writes it "\u0000")
_marker_json = orjson.dumps(_marker).decode()


@dataclass(frozen=True, slots=True)
class _Indexed:
    index: int  # what _Reply._text_chunk reads of a choice


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {orjson.dumps(obj).decode()}\n\n"  # compact, UTF-8: ~15x json.dumps


class _Reply:
    """The JSON objects of one answer, in the chat or the legacy completions shape."""

    def __init__(self, job: LiveJob, model: str, chat: bool, prompt_tokens: int, tokenizer: Any,
                 plan: toolcalls.ToolPlan | None, want_logprobs: bool):
        self.chat, self.model, self.prompt_tokens = chat, model, prompt_tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + job.job_id
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.tokenizer = tokenizer
        self.plan = plan if plan is not None and plan.mode is not toolcalls.ToolMode.NONE \
            else None
        self.want_logprobs = want_logprobs
        # text goes out as it comes, in one chunk shape (no tool calls to hold back)
        self.plain = self.plan is None or not chat
        self._text_templates: dict[int, tuple[str, str]] = {}

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    # ---- log-probabilities --------------------------------------------------------------------

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def logprobs_obj(self, c: _Choice, lo: int, hi: int) -> dict[str, Any] | None:
        """The log-probabilities of the choice's tokens lo..hi, in the endpoint's shape."""
        if not self.want_logprobs:
            return None
        ids, lps, tops = c.token_ids[lo:hi], c.lps[lo:hi], c.tops[lo:hi]
        if self.chat:
            content = []
            raw = partial(modelfiles.token_bytes, self.tokenizer)  # a part of a character too
            for tid, lp, top in zip(ids, lps, tops, strict=True):
                content.append({
                    "token": self._token(tid), "logprob": lp, "bytes": list(raw(tid)),
                    "top_logprobs": [{"token": self._token(a), "logprob": b,
                                      "bytes": list(raw(a))} for a, b in top]})
            return {"content": content}
        offset = sum(len(self._token(t)) for t in c.token_ids[:lo])
        tokens, offsets = [], []
        for tid in ids:
            tokens.append(self._token(tid))
            offsets.append(offset)
            offset += len(tokens[-1])
        return {"tokens": tokens, "token_logprobs": list(lps),
                "top_logprobs": [{self._token(a): b for a, b in top} for top in tops],
                "text_offset": offsets}

    # ---- the whole answer ---------------------------------------------------------------------

    def complete(self, choices: list[_Choice], usage: dict[str, int], echo: bool
                 ) -> dict[str, Any]:
        out = []
        for c in sorted(choices, key=lambda c: c.index):
            text = c.whole()
            choice: dict[str, Any] = {"index": c.index, "finish_reason": c.finish,
                                      "logprobs": self.logprobs_obj(c, 0, len(c.lps))}
            if self.chat:
                message: dict[str, Any] = {"role": "assistant", "content": text}
                if self.plan is not None:
                    content, calls = toolcalls.parse_output(text, self.plan)
                    if calls:
                        message = {"role": "assistant", "content": content, "tool_calls": [
                            call.as_openai(toolcalls.new_call_id()) for call in calls]}
                        if c.finish != "length":
                            choice["finish_reason"] = "tool_calls"
                choice["message"] = message
            else:
                choice["text"] = (c.prompt.text if echo else "") + text
            out.append(choice)
        return {**self._head(self.object), "choices": out, "usage": usage}

    # ---- streaming ----------------------------------------------------------------------------

    def _chunk_obj(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def chunk(self, index: int, delta: dict[str, Any], finish: str | None,
              logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        return {**self._head(self._chunk_obj()), "choices": [choice]}

    def _text_chunk(self, c: _Choice | _Indexed, text: str, logprobs: dict[str, Any] | None,
                    finish: str | None = None) -> dict[str, Any]:
        if self.chat:
            return self.chunk(c.index, {"content": text} if text else {}, finish, logprobs)
        choice = {"index": c.index, "text": text, "finish_reason": finish, "logprobs": logprobs}
        return {**self._head(self._chunk_obj()), "choices": [choice]}

    def text_sse(self, index: int, text: str) -> str:
        """The event of new text of choice ``index`` of a plain answer, without log-probabilities:
        the same bytes as ``_sse`` of its chunk, from the chunk encoded once per choice with a
        marker where the text goes (a dict and a whole encoding per token cost ~4 us)."""
        template = self._text_templates.get(index)
        if template is None:
            encoded = orjson.dumps(self._text_chunk(_Indexed(index), _marker, None)).decode()
            if encoded.count(_marker_json) != 1:  # a model named with the marker: no template
                return _sse(self._text_chunk(_Indexed(index), text, None))
            head, tail = encoded.split(_marker_json)
            template = self._text_templates[index] = ("data: " + head, tail + "\n\n")
        return template[0] + orjson.dumps(text).decode() + template[1]

    def deltas(self, c: _Choice, delta: str, logprobs: dict[str, Any] | None
               ) -> list[dict[str, Any]]:
        """The chunks for new text of a choice (none while a tool call is being buffered)."""
        plan = self.plan
        if plan is None or not self.chat:
            return [self._text_chunk(c, delta, logprobs)] if delta or logprobs else []
        whole = c.whole()
        if plan.mode is toolcalls.ToolMode.NAMED:  # the text is the arguments, as it comes
            out = []
            if not c.header_sent:
                c.header_sent, c.call_id = True, toolcalls.new_call_id()
                out.append(self.chunk(c.index, {"tool_calls": [{
                    "index": 0, "id": c.call_id, "type": "function",
                    "function": {"name": plan.named, "arguments": ""}}]}, None))
            if delta:
                out.append(self.chunk(c.index, {"tool_calls": [{
                    "index": 0, "function": {"arguments": delta}}]}, None, logprobs))
            c.emitted = len(whole)
            return out
        if plan.mode is toolcalls.ToolMode.REQUIRED or plan.parser is not \
                toolcalls.ParserKind.HERMES:
            return []  # the calls are read from the whole output at the end
        if c.in_call:
            return []
        at = whole.find(toolcalls.HERMES_OPEN, c.emitted)
        if at >= 0:
            c.in_call = True
            safe = at
        else:
            safe = len(whole) - toolcalls.held_prefix(whole)
        if safe <= c.emitted:
            return []
        text, c.emitted = whole[c.emitted:safe], safe
        return [self.chunk(c.index, {"content": text}, None, logprobs)]

    def ending(self, c: _Choice, tail: str) -> list[dict[str, Any]]:
        """The last chunks of a choice: held-back text or its tool calls, and its finish."""
        plan = self.plan
        if plan is None or not self.chat:
            out = [self._text_chunk(c, tail, None)] if tail else []
            return [*out, self._text_chunk(c, "", None, c.finish)]
        whole = c.whole()
        if plan.mode is toolcalls.ToolMode.NAMED:
            out = self.deltas(c, tail, None) if tail or not c.header_sent else []
            finish = c.finish if c.finish == "length" else "tool_calls"
            return [*out, self.chunk(c.index, {}, finish)]
        content, calls = toolcalls.parse_output(whole, plan)
        out = []
        if not calls:
            rest = whole[c.emitted:]
            if rest:
                out.append(self.chunk(c.index, {"content": rest}, None))
            return [*out, self.chunk(c.index, {}, c.finish)]
        if plan.mode is toolcalls.ToolMode.AUTO and content and c.emitted < len(content):
            out.append(self.chunk(c.index, {"content": content[c.emitted:]}, None))
        for i, call in enumerate(calls):
            out.append(self.chunk(c.index, {"tool_calls": [
                call.as_openai(toolcalls.new_call_id(), index=i)]}, None))
        finish = c.finish if c.finish == "length" else "tool_calls"
        return [*out, self.chunk(c.index, {}, finish)]

    def chunk_usage(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self._head(self._chunk_obj()), "choices": [], "usage": usage}

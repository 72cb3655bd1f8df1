"""The transformers engine on the tiny model: batching never changes a request's tokens."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from sparecycles import modelfiles
from sparecycles.errors import ContextLengthExceeded
from sparecycles.node.backends.base import (
    EngineClosed,
    EngineFull,
    GenerationRequest,
    GenerationUpdate,
)
from sparecycles.node.backends.transformers import TransformersEngine
from sparecycles.types import FinishReason, SamplingParams

wait_s_max = 60.0  # a test request that takes longer than this has hung

QUESTIONS = (
    "What is the capital of France?",
    "Tell me a story about a fox who lived in a wood and ran down to the river every morning.",
    "Hi",
    "Who is Alice?",
)
TEXTS = ("It was the best of times, it was the worst of times,", "Alice was beginning to get")


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    final: GenerationUpdate | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def record(self, update: GenerationUpdate) -> None:
        self.tokens.extend(update.token_ids)
        if update.logprobs is not None:
            self.logprobs.extend(update.logprobs)
        if update.finished:
            self.final = update
            self.done.set()

    @property
    def reason(self) -> FinishReason | None:
        assert self.final is not None
        return self.final.finish_reason


def run(engine: TransformersEngine, *requests: GenerationRequest) -> dict[str, Result]:
    results = {r.request_id: Result() for r in requests}
    for r in requests:
        engine.submit(r, results[r.request_id].record)
    for result in results.values():
        assert result.done.wait(wait_s_max), "request did not finish"
    return results


def request(
    request_id: str, prompt: tuple[int, ...], *, max_tokens: int = 24, **params: Any
) -> GenerationRequest:
    want_logprobs = params.pop("want_logprobs", False)
    params.setdefault("temperature", 0.0)
    return GenerationRequest(
        request_id, prompt, SamplingParams(max_tokens=max_tokens, **params), want_logprobs
    )


@pytest.fixture(scope="module")
def engine(tiny_model_path: Path) -> Iterator[TransformersEngine]:
    engine = TransformersEngine.load("tiny", tiny_model_path)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def prompts(engine: TransformersEngine) -> list[tuple[int, ...]]:
    """Chat prompts for QUESTIONS, then plain prompts for TEXTS; all of different lengths."""
    tokenizer = engine.tokenizer
    chats = [modelfiles.render_chat(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    plain = [modelfiles.render_completion(tokenizer, text) for text in TEXTS]
    return [tuple(ids) for ids in chats + plain]


def _fresh_engine(tiny_model_path: Path, wrap: Callable[[Any], Any] = lambda m: m, **kwargs: Any):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    tokenizer = modelfiles.load_tokenizer(tiny_model_path)
    spec = modelfiles.model_spec("tiny", tiny_model_path, dtype=torch.float32)
    return TransformersEngine("tiny", wrap(model), tokenizer, spec, **kwargs)


def test_load_reports_the_spec_and_device(engine: TransformersEngine, tiny_model_path: Path):
    assert engine.device == "cpu"
    assert engine.spec.weights_sha256 == modelfiles.weights_sha256(tiny_model_path)
    assert engine.spec.bytes_per_param == 4.0


def test_greedy_tokens_are_the_same_alone_and_joining_a_running_batch(
    engine: TransformersEngine, prompts: list[tuple[int, ...]]
) -> None:
    # "first" must outlive the joiners: take the prompt with the longest greedy answer.
    lengths = run(engine, *(request(f"len-{i}", p, max_tokens=30) for i, p in enumerate(prompts)))
    longest = max(range(len(prompts)), key=lambda i: len(lengths[f"len-{i}"].tokens))
    first = request("first", prompts[longest], max_tokens=30)
    joiners = [
        request("long-prompt", prompts[1] + prompts[0], max_tokens=5),
        request("short-prompt", prompts[2], max_tokens=12),
        request("sampled", prompts[3], max_tokens=16, temperature=1.0, seed=5),
    ]
    alone = {r.request_id: run(engine, r)[r.request_id].tokens for r in [first, *joiners]}

    # The others join while "first" is decoding (from its third token on) and leave before it.
    before = engine.stats().batch_size_hist
    results = {r.request_id: Result() for r in [first, *joiners]}

    def first_update(update: GenerationUpdate) -> None:
        results["first"].record(update)
        if len(results["first"].tokens) == 3 and not update.finished:
            for r in joiners:
                engine.submit(r, results[r.request_id].record)

    engine.submit(first, first_update)
    for result in results.values():
        assert result.done.wait(wait_s_max)
    assert {rid: r.tokens for rid, r in results.items()} == alone
    assert len(alone["first"]) >= 6, "first must still run when the others join"
    after = engine.stats().batch_size_hist
    assert any(after.get(size, 0) > before.get(size, 0) for size in (2, 3, 4))


def test_requests_submitted_together_decode_in_one_batch(
    engine: TransformersEngine, prompts: list[tuple[int, ...]]
) -> None:
    before = engine.stats()
    requests = [request(f"together-{i}", p, max_tokens=8) for i, p in enumerate(prompts)]
    results = run(engine, *requests)
    after = engine.stats()
    grown = {
        size: n - before.batch_size_hist.get(size, 0)
        for size, n in after.batch_size_hist.items()
        if n > before.batch_size_hist.get(size, 0)
    }
    assert max(grown) > 1
    generated = sum(len(r.tokens) for r in results.values())
    assert after.tokens_generated - before.tokens_generated >= generated
    assert after.busy_s > before.busy_s
    assert (after.requests_active, after.requests_waiting) == (0, 0)


def test_the_same_seed_draws_the_same_tokens(
    engine: TransformersEngine, prompts: list[tuple[int, ...]]
) -> None:
    def sampled(rid: str, seed: int) -> GenerationRequest:
        return request(rid, prompts[0], max_tokens=20, temperature=1.0, top_p=0.9, seed=seed)

    alone = run(engine, sampled("s-alone", 11))["s-alone"].tokens
    again = run(engine, sampled("s-again", 11), request("other", prompts[1]))["s-again"].tokens
    assert again == alone
    others = [run(engine, sampled(f"s-{seed}", seed))[f"s-{seed}"].tokens for seed in (1, 2, 3)]
    assert any(tokens != alone for tokens in others)


def test_max_tokens_ends_with_length(
    engine: TransformersEngine, prompts: list[tuple[int, ...]]
) -> None:
    result = run(engine, request("short", prompts[1], max_tokens=3))["short"]
    assert len(result.tokens) == 3
    assert result.reason == FinishReason.LENGTH


def test_end_of_sequence_ends_with_stop_and_is_not_delivered(
    engine: TransformersEngine, prompts: list[tuple[int, ...]]
) -> None:
    eos_ids = {engine.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|eos|>")}
    requests = [request(f"eos-{i}", p, max_tokens=100) for i, p in enumerate(prompts)]
    results = run(engine, *requests).values()
    stopped = [r for r in results if r.reason == FinishReason.STOP]
    assert stopped, "the tiny model ends at least one of these answers by itself"
    for r in results:
        assert not eos_ids & set(r.tokens)
        assert len(r.tokens) < 100 or r.reason == FinishReason.LENGTH


def test_a_stop_string_ends_the_request_on_the_token_that_completes_it(
    engine: TransformersEngine, prompts: list[tuple[int, ...]]
) -> None:
    tokenizer = engine.tokenizer
    full = run(engine, request("nostop", prompts[1], max_tokens=30))["nostop"].tokens
    text = tokenizer.decode(full, skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 4]
    result = run(engine, request("stop", prompts[1], max_tokens=30, stop=(stop,)))["stop"]
    assert result.reason == FinishReason.STOP
    assert full[: len(result.tokens)] == result.tokens
    assert stop in tokenizer.decode(result.tokens, skip_special_tokens=True)
    assert stop not in tokenizer.decode(result.tokens[:-1], skip_special_tokens=True)


def test_logprobs_match_a_teacher_forced_pass(
    engine: TransformersEngine, prompts: list[tuple[int, ...]], tiny_model_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    rid = "lp"
    result = run(
        engine,
        request(rid, prompts[0], max_tokens=12, want_logprobs=True, temperature=0.7, seed=1),
        request("lp-neighbour", prompts[1], max_tokens=12),
    )[rid]
    assert len(result.logprobs) == len(result.tokens) > 0
    assert all(math.isfinite(lp) and lp <= 0.0 for lp in result.logprobs)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    ids = torch.tensor([list(prompts[0]) + result.tokens])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, len(prompts[0]) - 1 : -1]
    expected = torch.log_softmax(logits.float(), dim=-1)
    expected = expected.gather(-1, torch.tensor(result.tokens)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(result.logprobs), expected, atol=1e-4, rtol=1e-4)


def test_cancel_finishes_a_running_request_with_stop(
    engine: TransformersEngine, prompts: list[tuple[int, ...]]
) -> None:
    result = Result()

    def on_update(update: GenerationUpdate) -> None:
        result.record(update)
        if not update.finished:
            engine.cancel("cancel-me")  # from the engine thread, after the first token

    engine.submit(request("cancel-me", prompts[1], max_tokens=200), on_update)
    assert result.done.wait(wait_s_max)
    assert result.reason == FinishReason.STOP
    # Applied before the next step: the prefill's token and the same step's decode, no more.
    assert 1 <= len(result.tokens) <= 2


def test_a_request_id_can_be_reused_from_its_own_final_update(
    engine: TransformersEngine, prompts: list[tuple[int, ...]]
) -> None:
    expected = run(engine, request("reused", prompts[0], max_tokens=4))["reused"].tokens
    second = Result()

    def on_update(update: GenerationUpdate) -> None:
        if update.finished:  # still on the engine thread, before it drops the first sequence
            engine.submit(request("reused", prompts[0], max_tokens=4), second.record)

    engine.submit(request("reused", prompts[1], max_tokens=3), on_update)
    assert second.done.wait(wait_s_max)
    assert second.final is not None and second.final.error is None
    assert second.tokens == expected
    time.sleep(0.2)  # let the step that delivered the final update end
    steps = engine.stats().decode_steps
    time.sleep(0.2)
    assert engine.stats().decode_steps == steps, "a finished sequence is still being decoded"


def test_cancel_of_a_waiting_request_finishes_it_without_tokens(
    tiny_model_path: Path, prompts: list[tuple[int, ...]]
) -> None:
    engine = _fresh_engine(tiny_model_path, batch_size_max=1)
    try:
        running, waiting = Result(), Result()
        engine.submit(request("running", prompts[1], max_tokens=30), running.record)
        engine.submit(request("waiting", prompts[0], max_tokens=30), waiting.record)
        engine.cancel("waiting")
        assert waiting.done.wait(wait_s_max) and running.done.wait(wait_s_max)
        assert waiting.tokens == [] and waiting.reason == FinishReason.STOP
        assert max(engine.stats().batch_size_hist) == 1
    finally:
        engine.close()


def test_a_full_queue_refuses_with_engine_full(
    tiny_model_path: Path, prompts: list[tuple[int, ...]]
) -> None:
    engine = _fresh_engine(tiny_model_path, batch_size_max=1, queue_max=1)
    try:
        with pytest.raises(EngineFull):
            for i in range(3):  # one runs, one waits, and the queue is then full
                engine.submit(request(f"q{i}", prompts[1], max_tokens=30), Result().record)
    finally:
        engine.close()


def test_prompts_that_leave_no_room_are_refused_and_a_full_context_ends_with_length(
    engine: TransformersEngine,
) -> None:
    context = engine.spec.context_length
    the = engine.tokenizer.encode(" the", add_special_tokens=False)[0]
    with pytest.raises(ContextLengthExceeded):
        engine.submit(request("too-long", (the,) * context), Result().record)
    result = run(engine, request("nearly-full", (the,) * (context - 3), max_tokens=50))
    tokens, reason = result["nearly-full"].tokens, result["nearly-full"].reason
    assert len(tokens) <= 3
    assert reason == FinishReason.LENGTH or len(tokens) < 3


class _FailingOnce:
    """Delegates to the model, except that its first forward pass raises."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.failed = False

    def __call__(self, **kwargs: Any) -> Any:
        if not self.failed:
            self.failed = True
            raise RuntimeError("injected failure")
        return self.model(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(
    tiny_model_path: Path, prompts: list[tuple[int, ...]]
) -> None:
    engine = _fresh_engine(tiny_model_path, wrap=_FailingOnce)
    try:
        failed = run(engine, request("fails", prompts[0]))["fails"]
        assert failed.final is not None and failed.final.finished
        assert failed.final.error is not None and "injected failure" in failed.final.error
        assert failed.final.finish_reason is None

        def raising(update: GenerationUpdate) -> None:
            raise ValueError("a caller's bug")

        engine.submit(request("bad-callback", prompts[1], max_tokens=4), raising)
        ok = run(engine, request("after", prompts[0], max_tokens=4))["after"]
        assert ok.final is not None and ok.final.error is None and ok.tokens
    finally:
        engine.close()


def test_close_fails_running_requests_and_refuses_new_ones(
    tiny_model_path: Path, prompts: list[tuple[int, ...]]
) -> None:
    engine = _fresh_engine(tiny_model_path)
    result = Result()

    def on_update(update: GenerationUpdate) -> None:
        result.record(update)
        if not update.finished:
            engine.close()  # from the engine thread: must not wait for itself

    engine.submit(request("closing", prompts[1], max_tokens=200), on_update)
    assert result.done.wait(wait_s_max)
    assert result.final is not None and result.final.error == "engine closed"
    with pytest.raises(EngineClosed):
        engine.submit(request("late", prompts[0]), Result().record)
    engine.close()

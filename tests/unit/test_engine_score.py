"""Teacher-forced scoring on the real engine (the tiny model), and the test-only cheats."""

from __future__ import annotations

import threading

import pytest

from sparecycles import modelfiles, protocol
from sparecycles.errors import InvalidRequest
from sparecycles.identity import NodeIdentity
from sparecycles.identity import verify as verify_signature
from sparecycles.node import cheats
from sparecycles.node.backends.base import GenerationRequest
from sparecycles.node.backends.transformers import TransformersEngine
from sparecycles.trust import decisions as verify
from sparecycles.types import SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    e = TransformersEngine.load("tiny", tiny_model_path, device="cpu")
    yield e
    e.close()


def _prompt(engine, text: str = "Tell me about the garden.") -> tuple[int, ...]:
    return tuple(modelfiles.render_chat(engine.tokenizer, [{"role": "user", "content": text}]))


def _generate(engine, prompt, **params) -> tuple[list[int], list[float]]:
    done, ids, lps = threading.Event(), [], []

    def on_update(u) -> None:
        ids.extend(u.token_ids)
        lps.extend(u.logprobs or ())
        if u.finished:
            done.set()

    engine.submit(GenerationRequest(f"r{id(done)}", prompt, SamplingParams(**params),
                                    want_logprobs=True), on_update)
    assert done.wait(60)
    return ids, lps


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_scoring_agrees_with_generation(engine, temperature: float) -> None:
    prompt = _prompt(engine)
    ids, lps = _generate(engine, prompt, max_tokens=40, temperature=temperature, seed=5)
    assert ids and len(lps) == len(ids)
    r = engine.score(prompt, tuple(ids), temperature=temperature)
    assert len(r.logprobs) == len(ids) and r.busy_s > 0
    assert max(abs(a - b) for a, b in zip(lps, r.logprobs, strict=True)) < 1e-4
    claim = verify.Claim(tuple(ids), tuple(lps), temperature)
    scores = verify.Scores(r.logprobs, r.top_logprobs, r.mass_above, r.expected_logprobs,
                           r.logprob_vars)
    v = verify.judge_scores(claim, scores, verify.FP32_TOLERANCE)
    assert v.passed, v
    if temperature == 0:
        assert v.greedy_gap_max == 0 and all(m == 0 for m in r.mass_above)


def test_scoring_refuses_what_the_model_cannot_hold(engine) -> None:
    with pytest.raises(InvalidRequest):
        engine.score((1, 2), (10**9,))
    with pytest.raises(InvalidRequest):
        engine.score((1,) * engine.spec.context_length, (1,))
    with pytest.raises(InvalidRequest):
        engine.score((1, 2), ())


def test_a_lower_precision_copy_keeps_the_tokens_but_not_the_logprobs(tiny_model_path,
                                                                       engine) -> None:
    copy = TransformersEngine.load("tiny", tiny_model_path, device="cpu")
    try:
        cheats.degrade_weights(copy._model, "bf16")
        prompt = _prompt(engine, "Where does the river go?")
        ids, lps = _generate(copy, prompt, max_tokens=30, temperature=0)
        r = engine.score(prompt, tuple(ids), temperature=0)
        assert max(t - lp for t, lp in zip(r.top_logprobs, r.logprobs, strict=True)) < 1e-3
        diff = sum(abs(a - b) for a, b in zip(lps, r.logprobs, strict=True)) / len(ids)
        assert diff > verify.FP32_TOLERANCE.logprob_mean_max
    finally:
        copy.close()


def test_cheats_need_the_test_switch(monkeypatch) -> None:
    monkeypatch.delenv(cheats.ALLOW_ENV, raising=False)
    with pytest.raises(ValueError, match="tests only"):
        cheats.apply(object(), "random-tokens")
    monkeypatch.setenv(cheats.ALLOW_ENV, "1")
    with pytest.raises(ValueError, match="unknown cheat"):
        cheats.apply(object(), "steal-everything")


def test_a_forging_identity_proves_its_key_but_signs_results_with_another() -> None:
    real = NodeIdentity.generate()
    forger = cheats.ForgingIdentity(real)
    assert verify_signature(real.public_key_b64, b"nonce", forger.sign(b"nonce"))
    metering = protocol.Metering(prompt_tokens=1, completion_tokens=1,
                                 time_to_first_token_s=0, total_s=0, busy_s=0)
    payload = protocol.result_payload(job_id="j", attempt=1, weights_sha256="a" * 64,
                                      prompt_sha256="b" * 64, output_sha256="c" * 64,
                                      finish_reason="stop", metering=metering)
    assert not verify_signature(real.public_key_b64, payload, forger.sign(payload))

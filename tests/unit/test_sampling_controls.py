"""The row step of sampling (node/backends/sampling.py) and constrained jobs under verification.

The row step is pure NumPy, so its rules are checked on hand-made logits; the engine tests use
the tiny model: a grammar-constrained job always matches its schema, resumes mid-output, and a
spot check (teacher-forced scoring and replay, with the job's own processing) passes an honest
constrained node and catches one that ignored the constraint.
"""

from __future__ import annotations

import json
import threading
from dataclasses import replace

import jsonschema_rs
import numpy as np
import pytest

from sparecycles import grammar, modelfiles, protocol
from sparecycles.node.backends import sampling
from sparecycles.node.backends.base import GenerationRequest
from sparecycles.node.backends.transformers import TransformersEngine
from sparecycles.trust import decisions as verify
from sparecycles.types import SamplingParams

EOS = 0


def _row(logits_len: int = 8, **params):
    p = SamplingParams(max_tokens=10, **params)
    return sampling.start_row(p, [1, 2], [EOS]), np.zeros(logits_len, dtype=np.float32)


def test_logit_bias_and_eos_rules() -> None:
    row, logits = _row(logit_bias=((3, 5.0), (4, -100.0)), temperature=0)
    out = sampling.process_logits(logits, row)
    assert out[3] == 5.0 and out[4] == -100.0
    assert sampling.draw(out, row) == 3
    row, logits = _row(min_tokens=2, temperature=0)
    logits[EOS] = 10.0
    assert sampling.draw(sampling.process_logits(logits, row), row) != EOS
    sampling.accept(row, 5)
    sampling.accept(row, 6)
    assert sampling.draw(sampling.process_logits(logits, row), row) == EOS  # min_tokens reached
    row, _ = _row(ignore_eos=True)
    assert sampling.process_logits(logits, row)[EOS] == -np.inf


def test_penalties_follow_vllm() -> None:
    row, logits = _row(frequency_penalty=0.5, presence_penalty=0.25, repetition_penalty=2.0)
    logits[:] = [1, 2, -2, 4, 1, 1, 1, 1]
    for token in (3, 3, 5):
        sampling.accept(row, token)
    out = sampling.process_logits(logits, row)
    assert out[1] == pytest.approx(1.0)  # in the prompt: 2 / 2
    assert out[2] == pytest.approx(-4.0)  # in the prompt, negative: -2 * 2
    assert out[3] == pytest.approx(4 / 2 - 0.5 * 2 - 0.25)
    assert out[5] == pytest.approx(1 / 2 - 0.5 - 0.25)
    assert out[6] == pytest.approx(1.0)  # never seen


def test_cuts_and_seeded_draws() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    probs = sampling.draw_distribution(logits, SamplingParams(max_tokens=1, top_k=2))
    assert probs[2] == 0 and probs[3] == 0 and probs[:2].sum() == pytest.approx(1.0)
    probs = sampling.draw_distribution(logits, SamplingParams(max_tokens=1, min_p=0.4))
    assert list(probs > 0) == [True, True, False, False]  # 0.15 < 0.4 * 0.5
    probs = sampling.draw_distribution(logits, SamplingParams(max_tokens=1, top_p=0.7))
    assert list(probs > 0) == [True, True, False, False]
    p = SamplingParams(max_tokens=1, seed=3, top_k=3)
    draws = [[sampling.draw(logits, sampling.start_row(p, [1], [EOS])) for _ in range(1)]
             for _ in range(5)]
    assert all(d == draws[0] for d in draws)  # a seed gives the same draw


@pytest.mark.parametrize("seed", [-1, -(2**63), 2**63 - 1, 0])
def test_every_seed_a_client_may_send_draws(seed: int) -> None:
    """OpenAI's seed is any signed 64-bit number; numpy's generators take unsigned ones only
    (a negative seed made the node refuse the job: a 503 after ten seconds)."""
    from sparecycles.node.backends import npsampling

    logits = np.log(np.full(64, 1 / 64, dtype=np.float32))

    def draws(s: int) -> list[int]:
        p = SamplingParams(max_tokens=1, seed=s, temperature=1.0)
        row = sampling.start_row(p, [1], [EOS])
        rng = npsampling.make_rng(p)
        assert rng is not None
        return [sampling.draw(logits, row) for _ in range(8)] + [int(rng.integers(10**9))]

    assert draws(seed) == draws(seed)  # reproducible
    assert draws(seed) == draws(seed % 2**64)  # the same number, read unsigned
    if seed != 0:
        assert draws(seed) != draws(0)


def test_logprobs_of_are_the_raw_distribution() -> None:
    logits = np.array([2.0, 1.0, 0.0, -1.0], dtype=np.float32)
    lp, top = sampling.logprobs_of(logits, 1, 2)
    ref = logits - np.log(np.exp(logits).sum())
    assert lp == pytest.approx(ref[1])
    assert [t for t, _ in top] == [0, 1]
    assert [v for _, v in top] == pytest.approx([ref[0], ref[1]])


# ---- on the real engine --------------------------------------------------------------------------

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 10},
                         "n": {"type": "integer", "minimum": 0, "maximum": 999}},
          "required": ["name", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    e = TransformersEngine.load("tiny", tiny_model_path, device="cpu")
    yield e
    e.close()


def _prompt(engine, text: str = "Describe a person.") -> tuple[int, ...]:
    return tuple(modelfiles.render_chat(engine.tokenizer, [{"role": "user", "content": text}]))


def _generate(engine, prompt, params: SamplingParams, resumed: int = 0
              ) -> tuple[list[int], list[float], str | None]:
    done, ids, lps, why = threading.Event(), [], [], []

    def on_update(u) -> None:
        ids.extend(u.token_ids)
        lps.extend(u.logprobs or ())
        if u.finished:
            why.append(u.finish_reason)
            done.set()

    engine.submit(GenerationRequest(f"r{id(done)}", prompt, params, want_logprobs=True,
                                    resumed_tokens=resumed), on_update)
    assert done.wait(60)
    return ids, lps, why[0]


def _constrained(**kw) -> SamplingParams:
    return SamplingParams(max_tokens=80, grammar=grammar.json_schema_grammar(SCHEMA), **kw)


def test_engine_output_matches_the_schema_and_resumes_mid_output(engine) -> None:
    validator = jsonschema_rs.validator_for(SCHEMA)
    prompt = _prompt(engine)
    for seed in range(6):
        params = _constrained(temperature=1.0, seed=seed, presence_penalty=0.5)
        ids, _lps, reason = _generate(engine, prompt, params)
        assert reason == "stop"
        validator.validate(json.loads(engine.tokenizer.decode(ids)))
    # an attempt resumed after 5 tokens continues the same grammar (and the same penalties)
    params = _constrained(temperature=0, frequency_penalty=1.0)
    whole, _, _ = _generate(engine, prompt, params)
    rest, _, _ = _generate(engine, prompt + tuple(whole[:5]),
                           replace(params, max_tokens=80 - 5), resumed=5)
    assert whole[:5] + rest == whole


def _judge(engine, prompt, ids, lps, params) -> verify.Verdict:
    r = engine.score(prompt, tuple(ids), temperature=params.temperature, top_p=params.top_p,
                     params=None if params.is_plain else params)
    scores = verify.Scores(r.logprobs, r.top_logprobs, r.mass_above, r.expected_logprobs,
                           r.logprob_vars)
    claim = verify.Claim(tuple(ids), tuple(lps), params.temperature, params.top_p)
    return verify.judge_scores(claim, scores, verify.FP32_TOLERANCE)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_an_honest_constrained_node_passes_its_spot_check(engine, temperature) -> None:
    prompt = _prompt(engine)
    params = _constrained(temperature=temperature, seed=11, frequency_penalty=0.7,
                          logit_bias=((5, 3.0),), top_k=50)
    ids, lps, _ = _generate(engine, prompt, params)
    verdict = _judge(engine, prompt, ids, lps, params)
    assert verdict.passed, verdict
    # and a replay with the same constraint, penalties and bias gives the same tokens
    again, again_lps, _ = _generate(engine, prompt, params)
    assert verify.compare_reexecution(verify.Claim(tuple(ids), tuple(lps), temperature),
                                      again, again_lps, verify.FP32_TOLERANCE).passed
    if temperature == 0:
        # scored without the job's processing (as before sampling controls reached the
        # verifier), the honest greedy output would fail: its tokens are not the raw argmax
        plain = _judge(engine, prompt, ids, lps, SamplingParams(max_tokens=80, temperature=0))
        assert not plain.passed


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_node_that_ignores_the_constraint_is_caught(engine, temperature) -> None:
    prompt = _prompt(engine)
    params = _constrained(temperature=temperature, seed=2)
    ignored = replace(params, grammar=None)  # what a dishonest node decodes
    ids, lps, _ = _generate(engine, prompt, ignored)
    verdict = _judge(engine, prompt, ids, lps, params)
    assert verdict.outcome is verify.Outcome.FAIL
    assert "could never draw" in verdict.reason


def test_wire_sampling_round_trips() -> None:
    params = _constrained(temperature=0.5, seed=1, presence_penalty=0.1, frequency_penalty=-0.2,
                          repetition_penalty=1.3, logit_bias=((1, 2.0), (7, -1.0)), top_k=5,
                          min_p=0.1, min_tokens=3, ignore_eos=True, top_logprobs=4, logprobs=True)
    wire = protocol.Sampling.of(params)
    decoded = protocol.Sampling.model_validate_json(wire.model_dump_json()).params()
    assert decoded == params
    assert protocol.features_needed(params) == {protocol.FEATURE_GRAMMAR,
                                                protocol.FEATURE_SAMPLING_CONTROLS}
    assert protocol.features_needed(SamplingParams(max_tokens=3, top_p=0.5)) == frozenset()

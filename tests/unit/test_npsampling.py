"""The numpy sampler (llama.cpp backend) gives the torch sampler's numbers for the same logits."""

from __future__ import annotations

import numpy as np
import pytest

from sparecycles.node.backends import npsampling
from sparecycles.types import SamplingParams

torch = pytest.importorskip("torch")
from sparecycles.node.backends import sampling  # noqa: E402


def _logits(rows: int = 6, vocab: int = 300, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, (rows, vocab)).astype(np.float32)


def test_greedy_and_logprobs_match_torch() -> None:
    x = _logits()
    params = SamplingParams(max_tokens=1, temperature=0)
    ours = [npsampling.next_token(row, params, None) for row in x]
    theirs = sampling.next_tokens(torch.from_numpy(x), [params] * len(x), [None] * len(x))
    assert ours == theirs.tolist()
    lp = sampling.token_logprobs(torch.from_numpy(x), theirs).tolist()
    assert np.allclose([npsampling.token_logprob(r, t) for r, t in zip(x, ours, strict=True)],
                       lp, atol=1e-5)


@pytest.mark.parametrize(("temperature", "top_p"), [(0.0, 1.0), (0.7, 1.0), (1.0, 0.8)])
def test_scoring_statistics_match_torch(temperature: float, top_p: float) -> None:
    x = _logits(seed=1)
    tokens = [3, 17, 250, 0, 99, 5]
    ours = npsampling.score_positions(x, tokens, temperature, top_p)
    theirs = sampling.score_positions(torch.from_numpy(x), torch.tensor(tokens), temperature,
                                      top_p)
    for a, b in zip(ours, theirs, strict=True):
        assert np.allclose(a, b, atol=1e-4)


def test_draws_follow_the_nucleus_and_the_seed() -> None:
    x = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.7, seed=5)
    rng = npsampling.make_rng(params)
    draws = [npsampling.next_token(x, params, rng) for _ in range(4000)]
    counts = np.bincount(draws, minlength=4) / len(draws)
    assert counts[2] == counts[3] == 0  # outside the 0.7 nucleus {0, 1}
    assert abs(counts[0] - 0.5 / 0.8) < 0.03
    again = npsampling.make_rng(params)
    assert [npsampling.next_token(x, params, again) for _ in range(4000)] == draws

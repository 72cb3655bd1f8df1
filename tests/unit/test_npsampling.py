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


def _distribution_full_sort(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """The nucleus as a full float64 sort of the vocabulary gives it (what npsampling did before
    it sorted only the head)."""
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        sorted_probs = probs[order]
        outside = (np.cumsum(sorted_probs) - sorted_probs) >= top_p
        probs = probs.copy()
        probs[order[outside]] = 0.0
        probs /= probs.sum()
    return probs


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.95, 0.999, 1.0])
@pytest.mark.parametrize(("spread", "temperature"), [(1.0, 1.0), (4.0, 0.7), (0.05, 1.0)])
def test_nucleus_of_the_head_is_the_full_sorts(top_p: float, spread: float,
                                               temperature: float) -> None:
    """Sorting only the likeliest tokens keeps the same nucleus as sorting all 49k, whether it
    holds a few tokens (peaked) or most of the vocabulary (flat: the head grows to all)."""
    x = np.random.default_rng(3).normal(0, spread, 49152).astype(np.float32)
    x[:3] += 5 * spread
    ours = npsampling.distribution(x, temperature, top_p)
    full = _distribution_full_sort(x, temperature, top_p)
    assert np.array_equal(ours > 0, full > 0)
    assert np.allclose(ours, full, rtol=1e-5, atol=1e-12)


def test_nucleus_keeps_ties_in_index_order() -> None:
    probs = np.array([0.1, 0.2, 0.2, 0.05, 0.2, 0.25])
    assert npsampling.nucleus_order(probs, 0.5).tolist() == [5, 1, 2, 4, 0, 3]
    npsampling_k = npsampling.nucleus_first_k
    try:
        npsampling.nucleus_first_k = 2  # a head smaller than the ties at its edge
        head = npsampling.nucleus_order(probs, 0.5).tolist()
    finally:
        npsampling.nucleus_first_k = npsampling_k
    assert head == [5, 1, 2, 4]  # every 0.2, by index, before anything smaller


def test_logprob_over_a_wide_range_of_logits() -> None:
    """float32 exponentials summed in float64 give float64's log-probabilities to 1e-5, for
    logits far below the best (whose exponentials underflow to 0) as well."""
    x = np.random.default_rng(4).normal(0, 30, 49152).astype(np.float32)
    ref = x.astype(np.float64)
    ref = ref - ref.max() - np.log(np.exp(ref - ref.max()).sum())
    for token in (int(np.argmax(x)), 0, 17, int(np.argmin(x))):
        assert npsampling.token_logprob(x, token) == pytest.approx(
            max(ref[token], npsampling.logprob_floor), abs=1e-5)

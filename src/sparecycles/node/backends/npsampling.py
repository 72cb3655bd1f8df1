"""Choosing the next token from a numpy logits row, and noticing stop strings; no torch.

The seam between an engine and its sampling: an engine hands over each sequence's logits as a
numpy ``float32`` row of the vocabulary (llama.cpp's ``llama_get_logits_ith`` buffer; a torch
backend's ``logits.cpu().numpy()``), the request's ``SamplingParams`` and its own
``numpy.random.Generator``, and gets back a token id. Anything that changes the distribution
before the draw (logit bias, penalties, a grammar's mask of allowed tokens) is a function
``(logits row, request state) -> logits row`` applied by the engine before ``next_token``, so it
serves every backend that has such a row. ``sampling.py`` is the torch twin used by the
transformers backend for whole batches on the device; both give the same greedy token and the
same log-probabilities for the same logits (tests/unit/test_npsampling.py).

Each request draws from its own generator, seeded from ``params.seed``, so its tokens depend on
its seed only, never on which other requests share its batch.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import numpy as np

from sparecycles.types import SamplingParams

# A stop string of n characters is at most 4n UTF-8 bytes, and a byte-level token holds at least
# one byte, so the last 4n tokens (+1 for a character split across tokens) always contain it.
stop_tokens_per_char_max = 4
logprob_floor = -1e4  # keeps every number finite on the wire (JSON has no -inf)


def make_rng(params: SamplingParams) -> np.random.Generator | None:
    """A generator seeded from ``params.seed`` (random when unset); None for greedy decoding."""
    if params.temperature == 0:
        return None
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    return np.random.Generator(np.random.PCG64(seed))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    out: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    out: np.ndarray = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return out


def distribution(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """The probabilities a draw uses: softmax at ``temperature``, cut to the top-p nucleus (the
    smallest set of most likely tokens whose mass reaches ``top_p``; the first is always kept)
    and renormalised."""
    probs = _softmax(logits.astype(np.float64) / temperature)
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        sorted_probs = probs[order]
        outside = (np.cumsum(sorted_probs) - sorted_probs) >= top_p
        probs = probs.copy()
        probs[order[outside]] = 0.0
        probs /= probs.sum()
    return probs


def next_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator | None) -> int:
    """The token after ``logits`` (one row, float32): the argmax at temperature 0, else a draw
    from ``distribution``."""
    if params.temperature == 0 or rng is None:
        return int(np.argmax(logits))
    probs = distribution(logits, params.temperature, params.top_p)
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))


def token_logprob(logits: np.ndarray, token: int) -> float:
    """log p(token) under the model's own distribution (no temperature, no top-p)."""
    x = logits.astype(np.float64)
    m = x.max()
    return float(max(x[token] - m - np.log(np.exp(x - m).sum()), logprob_floor))


def score_positions(logits: np.ndarray, token_ids: Sequence[int], temperature: float,
                    top_p: float) -> tuple[tuple[float, ...], ...]:
    """Teacher-forced statistics of each row (a position) for verification (``protocol.Scored``);
    the same numbers as ``sampling.score_positions``.

    ``logits`` (positions x vocab) are the model's outputs before each claimed token. Returns
    (log p of the token, best log p, mass above the token at ``temperature``, mean and variance
    of log p(t) for t drawn the way ``next_token`` draws), each one float per row."""
    x = logits.astype(np.float64)
    rows = np.arange(len(token_ids))
    tokens = np.asarray(token_ids, dtype=np.int64)
    logp = _log_softmax(x)
    chosen = logp[rows, tokens]
    top = logp.max(axis=-1)
    if temperature > 0:
        probs = _softmax(x / temperature)
        tok_prob = probs[rows, tokens][:, None]
        above = (probs * (probs > tok_prob)).sum(axis=-1)
        drawn = np.stack([distribution(row, temperature, top_p) for row in x]) \
            if top_p < 1.0 else probs
        safe = np.where(drawn > 0, logp, 0.0)
        mean = (drawn * safe).sum(axis=-1)
        var = (drawn * safe * safe).sum(axis=-1) - mean * mean
    else:  # greedy: the draw is the best token, always
        probs = np.exp(logp)
        tok_prob = probs[rows, tokens][:, None]
        above = (probs * (probs > tok_prob)).sum(axis=-1)
        mean, var = top, np.zeros_like(top)
    return tuple(tuple(float(v) for v in np.maximum(t, logprob_floor))
                 for t in (chosen, top, above, mean, np.maximum(var, 0.0)))


def stop_window_tokens(stop: Sequence[str]) -> int:
    """How many of the last generated tokens to decode to be sure to see any of ``stop``."""
    return stop_tokens_per_char_max * max((len(s) for s in stop), default=0) + 1


def hits_stop(tail_text: str, stop: Sequence[str]) -> bool:
    """Whether the decoded tail of the generated text contains any stop string."""
    return any(s and s in tail_text for s in stop)

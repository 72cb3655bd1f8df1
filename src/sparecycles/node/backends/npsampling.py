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

This runs once per token and request on the engine's thread, over the whole vocabulary (49k
for SmolLM2), so its cost sits in every decode step (bench/node_speed.py). The exponentials are
taken in float32, whose numpy kernel is vectorised, and summed in float64 (numpy's float64
``exp`` is scalar on CPUs without AVX-512: 1.7 ms for 49k logits against 0.2 ms on the 2-core
machine of docs/benchmarks.md, a fifth of SmolLM2's step); a probability is then good to a
relative 1e-7, far inside what verification tolerates. The top-p nucleus sorts only the
likeliest tokens (those at or above the k-th largest probability, k growing until their mass
reaches ``top_p``), not the whole vocabulary: the same tokens, in the same order, as a full
sort, for a fraction of its 9 ms.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence

import numpy as np

from sparecycles.types import SamplingParams

# A stop string of n characters is at most 4n UTF-8 bytes, and a byte-level token holds at least
# one byte, so the last 4n tokens (+1 for a character split across tokens) always contain it.
stop_tokens_per_char_max = 4
logprob_floor = -1e4  # keeps every number finite on the wire (JSON has no -inf)
# The nucleus is first looked for among this many likeliest tokens, then 8 times more, ...: a
# peaked distribution's nucleus holds a few tokens, a flat one's thousands.
nucleus_first_k = 64
nucleus_growth = 8
draw_block = 256  # a draw finds its block of the vocabulary first, then the token inside it


def seed_of(params: SamplingParams) -> int:
    """``params.seed`` as numpy's generators take it (an unsigned 64-bit number: a client's seed
    is any signed 64-bit one, as OpenAI's; -1 and 2**64 - 1 draw alike), random when unset."""
    return params.seed % 2**64 if params.seed is not None else secrets.randbits(63)


def make_rng(params: SamplingParams) -> np.random.Generator | None:
    """A generator seeded from ``params.seed`` (random when unset); None for greedy decoding."""
    if params.temperature == 0:
        return None
    return np.random.Generator(np.random.PCG64(seed_of(params)))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    out: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    out: np.ndarray = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return out


def _exp_shifted(logits: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """exp((logits - max) * scale) in float32: every value in (0, 1], the largest 1."""
    x = np.asarray(logits, dtype=np.float32)
    shifted = x - x.max()
    if scale != 1.0:
        shifted *= np.float32(scale)
    out: np.ndarray = np.exp(shifted, out=shifted)
    return out


def nucleus_order(probs: np.ndarray, top_p: float) -> np.ndarray:
    """The indices of the likeliest tokens, most likely first (ties by index, as a stable sort
    of the whole row gives), at least until their mass reaches ``top_p`` (or all of them): the
    head of ``np.argsort(-probs, kind="stable")`` that decides the nucleus."""
    n = len(probs)
    k = nucleus_first_k
    while k < n:
        kth = np.partition(probs, n - k)[n - k]  # the k-th largest probability
        candidates = np.flatnonzero(probs >= kth)  # every tie of it too, by index
        order = candidates[np.argsort(-probs[candidates], kind="stable")]
        if np.cumsum(probs[order])[-1] >= top_p:  # summed as the full sort's cumsum sums it
            return order
        k *= nucleus_growth
    return np.argsort(-probs, kind="stable")


def distribution(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """The probabilities a draw uses (float64): softmax at ``temperature``, cut to the top-p
    nucleus (the smallest set of most likely tokens whose mass reaches ``top_p``; the first is
    always kept) and renormalised."""
    probs = _exp_shifted(logits, 1.0 / temperature).astype(np.float64)
    probs /= probs.sum()
    if top_p < 1.0:
        order = nucleus_order(probs, top_p)
        sorted_probs = probs[order]
        # the full sort's test, on its head: every token after the head lies outside, as the
        # mass before it is at least the head's, which reaches top_p
        inside = order[(np.cumsum(sorted_probs) - sorted_probs) < top_p]
        kept = probs[inside]
        probs.fill(0.0)  # in place: a fresh zeroed array costs page faults, ~1 ms here
        probs[inside] = kept
        probs /= probs.sum()
    return probs


def next_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator | None) -> int:
    """The token after ``logits`` (one row, float32): the argmax at temperature 0, else a draw
    from ``distribution``."""
    if params.temperature == 0 or rng is None:
        return int(np.argmax(logits))
    probs = distribution(logits, params.temperature, params.top_p)
    return inverse_cdf(probs, rng.random())


def inverse_cdf(probs: np.ndarray, u: float) -> int:
    """The first token whose cumulative probability exceeds ``u`` (in [0, 1)) of the total: the
    cumulative sum runs over the sums of blocks of ``draw_block`` tokens and then inside one
    block (a cumulative sum of the whole vocabulary is not vectorised: 0.6 ms for 49k)."""
    starts = np.arange(0, len(probs), draw_block)
    cum_blocks = np.cumsum(np.add.reduceat(probs, starts))
    target = u * cum_blocks[-1]
    b = min(int(np.searchsorted(cum_blocks, target, side="right")), len(starts) - 1)
    block = probs[starts[b] : starts[b] + draw_block]
    cdf = np.cumsum(block)
    within = target - (cum_blocks[b - 1] if b else 0.0)
    i = min(int(np.searchsorted(cdf, within, side="right")), len(block) - 1)
    if block[i] <= 0.0:  # rounding at a block's edge put the draw on an impossible token
        i = int(np.flatnonzero(block)[-1]) if block.any() else i
    return int(starts[b]) + i


def token_logprob(logits: np.ndarray, token: int) -> float:
    """log p(token) under the model's own distribution (no temperature, no top-p)."""
    x = np.asarray(logits, dtype=np.float32)
    best = float(x.max())
    shifted = x - np.float32(best)
    total = float(np.exp(shifted, out=shifted).sum(dtype=np.float64))
    return float(max(float(x[token]) - best - math.log(total), logprob_floor))


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

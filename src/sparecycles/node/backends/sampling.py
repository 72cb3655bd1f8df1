"""Choosing the next token of every sequence in a batch, and noticing stop strings.

Pure functions over tensors and lists, shared by any PyTorch backend. Each request draws from its
own ``torch.Generator`` so that its tokens depend on its seed only, never on which other requests
happen to share its batch.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence

import torch

from sparecycles.types import SamplingParams

# A stop string of n characters is at most 4n UTF-8 bytes, and a byte-level token holds at least
# one byte, so the last 4n tokens (+1 for a character split across tokens) always contain it.
stop_tokens_per_char_max = 4


def make_generator(params: SamplingParams, device: torch.device | str) -> torch.Generator | None:
    """A generator seeded from ``params.seed`` (random when unset); None for greedy decoding."""
    if params.temperature == 0:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
    return generator


def next_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """One token id per row of ``logits`` (rows x vocab, float32): argmax where the temperature is
    0, else a draw from the temperature-scaled distribution cut to its top-p nucleus."""
    chosen = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if not rows:
        return chosen
    index = torch.tensor(rows, device=logits.device)
    temperature = torch.tensor([params[i].temperature for i in rows], device=logits.device)
    probs = torch.softmax(logits.index_select(0, index) / temperature[:, None], dim=-1)
    if any(params[i].top_p < 1.0 for i in rows):
        # top_p >= 1 becomes inf so that such a row is never cut, whatever rounding cumsum does.
        cut = [params[i].top_p if params[i].top_p < 1.0 else math.inf for i in rows]
        probs = _nucleus(probs, torch.tensor(cut, device=logits.device))
    for k, i in enumerate(rows):
        drawn = torch.multinomial(probs[k], 1, generator=generators[i])
        chosen[i] = drawn[0]
    return chosen


def _nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero every token outside the smallest set of most likely tokens whose mass >= top_p."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep the most likely tokens until their mass reaches top_p (the first is always kept).
    outside = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p[:, None]
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log p(token) under the model's own distribution (no temperature, no top-p) for each row."""
    return torch.log_softmax(logits, dim=-1).gather(-1, token_ids[:, None])[:, 0]


def score_positions(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float,
                    top_p: float) -> tuple[tuple[float, ...], ...]:
    """Teacher-forced statistics of each row (a position) for verification (``protocol.Scored``).

    ``logits`` (positions x vocab, float32) are the model's outputs before each claimed token.
    Returns (log p of the token, best log p, mass above the token at ``temperature``, mean and
    variance of log p(t) for t drawn the way ``next_tokens`` draws), each one float per row."""
    logp = torch.log_softmax(logits, dim=-1)
    chosen = logp.gather(-1, token_ids[:, None])[:, 0]
    top = logp.max(dim=-1).values
    if temperature > 0:
        probs = torch.softmax(logits / temperature, dim=-1)
        tok_prob = probs.gather(-1, token_ids[:, None])
        above = (probs * (probs > tok_prob)).sum(dim=-1)
        if top_p < 1.0:
            drawn = _nucleus(probs, torch.full((len(probs),), top_p, device=logits.device))
        else:
            drawn = probs
        drawn = drawn / drawn.sum(dim=-1, keepdim=True)
        safe = torch.where(drawn > 0, logp, torch.zeros_like(logp))
        mean = (drawn * safe).sum(dim=-1)
        var = (drawn * safe * safe).sum(dim=-1) - mean * mean
    else:  # greedy: the draw is the best token, always
        probs = logp.exp()
        tok_prob = probs.gather(-1, token_ids[:, None])
        above = (probs * (probs > tok_prob)).sum(dim=-1)
        mean, var = top, torch.zeros_like(top)
    floor = -1e4  # keeps every number finite on the wire (JSON has no -inf)
    return tuple(tuple(float(x) for x in t.clamp(min=floor).tolist())
                 for t in (chosen, top, above, mean, var.clamp(min=0.0)))


def stop_window_tokens(stop: Sequence[str]) -> int:
    """How many of the last generated tokens to decode to be sure to see any of ``stop``."""
    return stop_tokens_per_char_max * max((len(s) for s in stop), default=0) + 1


def hits_stop(tail_text: str, stop: Sequence[str]) -> bool:
    """Whether the decoded tail of the generated text contains any stop string."""
    return any(s and s in tail_text for s in stop)

"""Choosing the next token of every sequence in a batch, and noticing stop strings.

Two paths, one meaning:

- ``next_tokens``: the batched fast path for plain requests (temperature, top_p, seed; see
  ``SamplingParams.is_plain``), over a PyTorch logits tensor. Each request draws from its own
  ``torch.Generator`` so its tokens depend on its seed only, never on its batch.
- the **row step**, backend-agnostic, over one request's logits as a 1-D NumPy array (a torch
  backend passes ``row.cpu().numpy()``, llama.cpp its ``scores`` row): ``start_row`` once per
  request, then at every position ``process_logits`` (logit_bias, the grammar's mask,
  min_tokens/ignore_eos, repetition/frequency/presence penalties), ``draw`` (argmax at
  temperature 0, else temperature, top_k, top_p and min_p, drawn with the request's seeded
  ``numpy.random.Generator``) and ``accept`` (counts and grammar advance); ``row_done`` says when
  the grammar admits nothing more. ``logprobs_of`` gives the chosen token's and the N best
  log-probabilities, from the raw logits (the model's distribution, as OpenAI and vLLM report).
  ``score_row`` is the verifier's side: the same processing, teacher-forced over a claim.

This module imports torch only inside the functions of the fast path, so a backend without
torch (llama.cpp) uses the row step alone.
"""

from __future__ import annotations

import math
import secrets
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from sparecycles.node.backends.npsampling import seed_of
from sparecycles.types import SamplingParams

if TYPE_CHECKING:
    import torch

def make_generator(params: SamplingParams, device: torch.device | str) -> torch.Generator | None:
    """A generator seeded from ``params.seed`` (random when unset); None for greedy decoding."""
    import torch

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
    import torch

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
    import torch

    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep the most likely tokens until their mass reaches top_p (the first is always kept).
    outside = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p[:, None]
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log p(token) under the model's own distribution (no temperature, no top-p) for each row."""
    import torch

    return torch.log_softmax(logits, dim=-1).gather(-1, token_ids[:, None])[:, 0]


def score_positions(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float,
                    top_p: float) -> tuple[tuple[float, ...], ...]:
    """Teacher-forced statistics of each row (a position) for verification (``protocol.Scored``).

    ``logits`` (positions x vocab, float32) are the model's outputs before each claimed token.
    Returns (log p of the token, best log p, mass above the token at ``temperature``, mean and
    variance of log p(t) for t drawn the way ``next_tokens`` draws), each one float per row."""
    import torch

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


# ---- the row step: one request's logits as a NumPy vector ---------------------------------------

score_floor = -1e4  # keeps every number finite on the wire (JSON has no -inf)


@dataclass(slots=True, eq=False)
class RowState:
    """One request's sampling state across its positions."""

    params: SamplingParams
    eos_ids: tuple[int, ...]
    rng: np.random.Generator | None  # None when greedy
    matcher: Any = None  # llguidance.LLMatcher when the request has a grammar
    seen: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # prompt ids
    counts: Counter[int] = field(default_factory=Counter)  # output token -> occurrences
    n_generated: int = 0
    _bias: tuple[np.ndarray, np.ndarray] | None = None
    _bitmask: np.ndarray | None = None


def start_row(params: SamplingParams, prompt_token_ids: Sequence[int], eos_ids: Sequence[int],
              *, resumed_tokens: int = 0, matcher: Any = None) -> RowState:
    """The state at the first position to draw. The last ``resumed_tokens`` of the prompt are
    this request's own output from an earlier attempt: counted as output, fed to the grammar."""
    rng = None
    if params.temperature > 0:
        rng = np.random.default_rng(seed_of(params))
    prompt = np.fromiter(prompt_token_ids, dtype=np.int64, count=len(prompt_token_ids))
    row = RowState(params, tuple(eos_ids), rng, matcher, np.unique(prompt))
    if params.logit_bias:
        ids = np.array([t for t, _ in params.logit_bias], dtype=np.int64)
        row._bias = (ids, np.array([b for _, b in params.logit_bias], dtype=np.float32))
    if resumed_tokens:
        for token in prompt_token_ids[len(prompt_token_ids) - resumed_tokens:]:
            accept(row, int(token))
    return row


def process_logits(logits: np.ndarray, row: RowState) -> np.ndarray:
    """A float32 copy of one position's logits with the request's controls applied; forbidden
    tokens are -inf. vLLM's order: bias, the grammar's mask, min_tokens and ignore_eos,
    penalties (temperature and the cuts come in ``draw``)."""
    p = row.params
    out = np.array(logits, dtype=np.float32, copy=True)
    vocab = out.shape[0]
    if row._bias is not None:
        ids, bias = row._bias
        ok = ids < vocab
        np.add.at(out, ids[ok], bias[ok])
    if row.matcher is not None:
        _apply_grammar(out, row)
    if row.eos_ids and (p.ignore_eos or row.n_generated < p.min_tokens):
        eos = np.array([e for e in row.eos_ids if e < vocab], dtype=np.int64)
        allowed_else = np.isfinite(out).sum() > len(eos)
        if allowed_else:  # never forbid the only ways out the grammar left
            out[eos] = -np.inf
    if p.repetition_penalty != 1.0:
        seen = np.union1d(row.seen, np.fromiter(row.counts, dtype=np.int64,
                                                count=len(row.counts)))
        seen = seen[seen < vocab]
        vals = out[seen]
        out[seen] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and row.counts:
        ids = np.fromiter(row.counts.keys(), dtype=np.int64, count=len(row.counts))
        n = np.fromiter(row.counts.values(), dtype=np.float32, count=len(row.counts))
        ok = ids < vocab
        out[ids[ok]] -= p.frequency_penalty * n[ok] + p.presence_penalty
    return out


def _apply_grammar(out: np.ndarray, row: RowState) -> None:
    import llguidance.numpy as llnp

    if row._bitmask is None:  # the matcher's tokenizer is built with the logits' vocab size
        row._bitmask = llnp.allocate_token_bitmask(1, out.shape[0])
    llnp.fill_next_token_bitmask(row.matcher, row._bitmask, 0)
    allowed = np.unpackbits(row._bitmask[0].view(np.uint8), bitorder="little")[: out.shape[0]]
    out[allowed == 0] = -np.inf


def draw_distribution(processed: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The probabilities ``draw`` samples from (float64): temperature, then the top_k, min_p and
    top_p cuts, renormalised. Greedy (temperature 0) puts all mass on the argmax."""
    if params.temperature == 0:
        probs = np.zeros(processed.shape[0], dtype=np.float64)
        probs[int(np.argmax(processed))] = 1.0
        return probs
    z = processed.astype(np.float64) / params.temperature
    if 0 < params.top_k < z.shape[0]:
        kth = np.partition(z, -params.top_k)[-params.top_k]
        z = np.where(z < kth, -np.inf, z)
    z = z - np.max(z)
    probs = np.exp(z)
    probs /= probs.sum()
    if params.min_p > 0:
        probs = np.where(probs < params.min_p * probs.max(), 0.0, probs)
        probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        sorted_p = probs[order]
        outside = (np.cumsum(sorted_p) - sorted_p) >= params.top_p
        sorted_p[outside] = 0.0
        probs = np.zeros_like(probs)
        probs[order] = sorted_p
        probs /= probs.sum()
    return probs


def draw(processed: np.ndarray, row: RowState) -> int:
    """The next token: argmax at temperature 0, else a draw with the request's generator."""
    if row.rng is None:
        return int(np.argmax(processed))
    probs = draw_distribution(processed, row.params)
    cdf = np.cumsum(probs)
    token = int(np.searchsorted(cdf, row.rng.random() * cdf[-1], side="right"))
    return min(token, probs.shape[0] - 1)


def accept(row: RowState, token: int) -> None:
    """Record a token drawn (or resumed): counts for the penalties, a step of the grammar."""
    row.counts[token] += 1
    row.n_generated += 1
    if row.matcher is not None and token not in row.eos_ids:
        row.matcher.consume_token(token)


def row_done(row: RowState) -> bool:
    """The grammar is complete and admits nothing more: the request ends here (reason stop)."""
    return row.matcher is not None and bool(row.matcher.is_stopped())


def row_error(row: RowState) -> str | None:
    if row.matcher is not None and row.matcher.is_error():
        return str(row.matcher.get_error())
    return None


def logprobs_of(logits: np.ndarray, token: int, n: int
                ) -> tuple[float, tuple[tuple[int, float], ...]]:
    """log p(token) and the ``n`` likeliest (token, log p), best first, under the model's raw
    distribution (no temperature, penalties or mask)."""
    x = np.asarray(logits, dtype=np.float64)
    m = float(np.max(x))
    logz = m + math.log(float(np.exp(x - m).sum()))
    lp = max(float(x[token]) - logz, score_floor)
    if n <= 0:
        return lp, ()
    n = min(n, x.shape[0])
    best = np.argpartition(-x, n - 1)[:n]
    best = best[np.argsort(-x[best], kind="stable")]
    return lp, tuple((int(t), max(float(x[t]) - logz, score_floor)) for t in best)


def score_row(logits: np.ndarray, token: int, row: RowState) -> tuple[float, ...]:
    """Teacher-forced statistics of one claimed token under the request's processing (the five
    lists of ``protocol.Scored``), then ``accept``s it. ``top_logprobs`` is the token's raw log p
    plus how far it trails the best token after processing, so that the verdict's greedy gap is
    measured where the node chose; ``mass_above`` and the expectations use the distribution the
    node drew from. A token the processing forbids (the grammar's mask) trails by the floor."""
    x = np.asarray(logits, dtype=np.float64)
    m = float(np.max(x))
    logp = x - (m + math.log(float(np.exp(x - m).sum())))
    processed = process_logits(logits, row).astype(np.float64)
    chosen = float(logp[token])
    best = float(np.max(processed))
    mine = float(processed[token])
    gap = best - mine if math.isfinite(mine) else -score_floor
    probs = draw_distribution(processed, row.params) if row.params.temperature > 0 else None
    if probs is None:  # greedy: mass above among the processed logits at temperature 1
        z = processed - best
        probs_t = np.exp(z)
        probs_t /= probs_t.sum()
        tok_p = probs_t[token]
        above = float(probs_t[probs_t > tok_p].sum())
        mean, var = float(logp[int(np.argmax(processed))]), 0.0
    else:
        z = processed / row.params.temperature
        z = z - np.max(z)
        probs_t = np.exp(z)
        probs_t /= probs_t.sum()
        tok_p = probs_t[token]
        above = float(probs_t[probs_t > tok_p].sum())
        safe = np.where(probs > 0, logp, 0.0)
        mean = float((probs * safe).sum())
        var = max(0.0, float((probs * safe * safe).sum()) - mean * mean)
    accept(row, token)
    return (max(chosen, score_floor), max(chosen + min(gap, -score_floor), score_floor),
            above, max(mean, score_floor), var)

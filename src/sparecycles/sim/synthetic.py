"""A synthetic long-context trace: multi-turn conversations over long documents.

No public trace has what issue 17 asks to test (heavy-tailed prompts up to 128k tokens, and
conversations whose turns resend their history), so this one is generated, from its seed, by the
rules below; ``python -m sparecycles.sim.synthetic`` writes the copy kept in the package
(``sparecycles/data/traces/synthetic_long_context.csv``, read as ``--trace long``). The numbers
are assumptions, chosen to resemble what long-context chat and document question-answering
look like (a held-out trace of long conversations in issue 17: prompts of about 12k tokens on
average, p99 about 85k, up to 126k; outputs about 340):

- **conversations** start as a Poisson process (``conversations_per_s``) over ``duration_s``;
- a conversation's **first prompt** (system prompt, pasted documents, code) is log-normal with
  median ``first_prompt_median`` and sigma ``first_prompt_sigma``: heavy-tailed, most prompts
  a few thousand tokens, one in a hundred around 80k;
- it has ``1 + Geometric(turn_continue)`` turns (mean ``1 / (1 - turn_continue)``); each later
  turn's prompt is the whole history (the previous prompt and its answer: the **shared
  prefix**) plus a new user message (log-normal, median ``message_median``), sent a think time
  (log-normal, median ``think_median_s``) after the previous answer could have ended;
- **outputs** are log-normal (median ``output_median``, capped at ``output_max``);
- a conversation stops when its next prompt and answer would not fit ``context_max`` (128k), or
  its next turn would come after ``duration_s``.

Columns: ``TIMESTAMP`` (as the Azure traces), ``ContextTokens``, ``GeneratedTokens``,
``ConversationId``, ``PrefixTokens`` (tokens shared with the conversation's previous turn's
prompt and answer: what a node that served that turn may still hold in its prefix cache).
"""

from __future__ import annotations

import argparse
import csv
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from sparecycles.sim.trace import Trace

EPOCH0_S = 1_700_158_546.0  # the Azure conv trace's start (2023-11-16 18:15:46 UTC)
FILE_NAME = "synthetic_long_context.csv"


@dataclass(frozen=True, slots=True)
class LongContextShape:
    duration_s: float = 3600.0
    conversations_per_s: float = 0.3
    first_prompt_median: float = 4500.0
    first_prompt_sigma: float = 1.45
    message_median: float = 150.0
    message_sigma: float = 1.0
    output_median: float = 220.0
    output_sigma: float = 0.9
    output_max: int = 4096
    turn_continue: float = 0.7  # probability of another turn after each
    think_median_s: float = 40.0
    think_sigma: float = 0.8
    decode_tokens_per_s: float = 30.0  # to place the next turn after the answer could end
    context_max: int = 131_072


def _lognormal(rng: np.random.Generator, median: float, sigma: float) -> float:
    return float(median * math.exp(sigma * rng.standard_normal()))


def generate(seed: int = 17, shape: LongContextShape = LongContextShape()) -> Trace:
    rng = np.random.default_rng(seed)
    rows: list[tuple[float, int, int, int, int]] = []
    t, conv = 0.0, 0
    while True:
        t += float(rng.exponential(1.0 / shape.conversations_per_s))
        if t >= shape.duration_s:
            break
        at, prefix = t, 0
        first = _lognormal(rng, shape.first_prompt_median, shape.first_prompt_sigma)
        prompt = max(16, round(first))
        while True:
            out = round(_lognormal(rng, shape.output_median, shape.output_sigma))
            out = max(1, min(shape.output_max, out))
            if prompt + out > shape.context_max:
                break
            if at >= shape.duration_s:
                break
            rows.append((at, prompt, out, conv, prefix))
            if rng.random() >= shape.turn_continue:
                break
            at += out / shape.decode_tokens_per_s + _lognormal(
                rng, shape.think_median_s, shape.think_sigma
            )
            prefix = prompt + out
            message = max(1, round(_lognormal(rng, shape.message_median, shape.message_sigma)))
            prompt = prefix + message
        conv += 1
    rows.sort()
    a = np.asarray(rows, dtype=float).reshape(-1, 5)
    return Trace(
        name="long",
        epoch0_s=EPOCH0_S,
        arrival_s=a[:, 0] - a[0, 0],
        prompt_tokens=a[:, 1].astype(np.int64),
        output_tokens=a[:, 2].astype(np.int64),
        conversation=a[:, 3].astype(np.int64),
        prefix_tokens=a[:, 4].astype(np.int64),
    )


def write_csv(trace: Trace, path: Path) -> None:
    assert trace.conversation is not None and trace.prefix_tokens is not None
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["TIMESTAMP", "ContextTokens", "GeneratedTokens", "ConversationId",
                    "PrefixTokens"])  # fmt: skip
        for i in range(len(trace)):
            stamp = datetime.fromtimestamp(trace.epoch0_s + float(trace.arrival_s[i]), tz=UTC)
            w.writerow([stamp.strftime("%Y-%m-%d %H:%M:%S.%f"), int(trace.prompt_tokens[i]),
                        int(trace.output_tokens[i]), int(trace.conversation[i]),
                        int(trace.prefix_tokens[i])])  # fmt: skip


def describe(trace: Trace) -> str:
    p, o = trace.prompt_tokens, trace.output_tokens
    conv = trace.conversation if trace.conversation is not None else np.arange(len(trace))
    shared = trace.prefix_tokens.sum() if trace.prefix_tokens is not None else 0
    return (
        f"{len(trace):,} requests in {len(np.unique(conv)):,} conversations over "
        f"{trace.duration_s / 60:.0f} min; prompt mean {p.mean():,.0f}, median "
        f"{np.median(p):,.0f}, p99 {np.percentile(p, 99):,.0f}, max {p.max():,}; output mean "
        f"{o.mean():,.0f}; prompt tokens shared with the previous turn: {shared / p.sum():.0%}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="write the synthetic long-context trace")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parents[1] / "data" / "traces" / FILE_NAME)
    args = parser.parse_args()
    trace = generate(args.seed)
    write_csv(trace, args.out)
    print(f"{args.out}: {describe(trace)}")


if __name__ == "__main__":
    main()

"""Disaggregated prefill/decode, live: what a KV-cache hand-off through the coordinator costs,
against the same request on one node, side by side in one run on loopback.

One coordinator (``disagg = always``) serves one model under two names: ``colo`` (one node holds
it: nowhere to hand off, so it prefills and decodes there) and ``split`` (two nodes hold it:
each request is prefilled on one, which streams the first token and sends its prompt's KV cache
through the coordinator to the other, which decodes the rest). Every process runs one torch
thread. For each prompt length the two are measured back to back, ``--rounds`` times, with the
same greedy request (streamed, ``ignore_eos``); the medians are reported.

Per prompt length: the KV cache's bytes (a token's keys and values, every layer, fp32), time to
first token and total time as the client saw them, split ÷ colo, the gap between the first and
the second token (colo: one decode step; split: the hand-off and the receiver's first step), and,
from the attempts' rows (the coordinator's clock), the hand-off's two legs: the sender's export
and upload (its first token to its ``done``, the chunks sent in between) and the relay, load and
first decode (the sender's ``done`` to the receiver's first token). Whether split's text equals
colo's is checked on every request. Run:

    PYTHONPATH=src nice -n 5 python bench/disagg_handoff.py [--model tiny|medium] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from openai import OpenAI

from sparecycles import modelfiles
from sparecycles.ledger.pricing import PriceBook
from sparecycles.ledger.service import Ledger
from sparecycles.store import Store
from sparecycles.tools.localnet import LocalNetwork

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fixtures_models import cached_model

WORDS = ["the", "river", "ran", "past", "the", "old", "mill", "and", "the", "children",
         "watched", "the", "boats", "go", "by"]


@dataclass
class Reply:
    text: str
    prompt_tokens: int
    tokens: int
    ttft_s: float
    second_gap_s: float  # first token to second, at the client
    total_s: float
    upload_s: float | None = None  # split: the sender's first token to its done (coordinator)
    relay_s: float | None = None  # split: the sender's done to the receiver's first token


def prompt_of(tokens: int) -> str:
    words = (WORDS * (tokens // len(WORDS) + 2))[: max(1, int(tokens * 0.95))]
    return " ".join(words)


def one(client: OpenAI, store: Store, model: str, prompt: str, max_tokens: int) -> Reply:
    started = time.perf_counter()
    first = second = None
    parts: list[str] = []
    job_id = ""
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                       temperature=0, stream=True,
                                       extra_body={"ignore_eos": True},
                                       stream_options={"include_usage": True})
    usage = None
    n_chunks = 0
    for chunk in stream:
        job_id = chunk.id
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].text:
            now = time.perf_counter()
            n_chunks += 1
            if first is None:
                first = now
            elif second is None:
                second = now
            parts.append(chunk.choices[0].text)
    total = time.perf_counter() - started
    assert first is not None and second is not None and usage is not None
    reply = Reply("".join(parts), usage.prompt_tokens, usage.completion_tokens, first - started,
                  second - first, total)
    attempts = store.attempts(job_id.split("-", 1)[1])
    if model == "split":
        assert len(attempts) == 2 and attempts[0].completion_tokens == 1, attempts
        a, b = attempts
        sender_first = a.started_at_s + (a.time_to_first_token_s or 0.0)
        assert a.ended_at_s is not None and b.time_to_first_token_s is not None
        reply.upload_s = a.ended_at_s - sender_first
        reply.relay_s = b.started_at_s + b.time_to_first_token_s - a.ended_at_s
    else:
        assert len(attempts) == 1, attempts
    return reply


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("tiny", "medium"), default="tiny")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompts", type=int, nargs="+", default=[100, 500, 1500])
    args = ap.parse_args()
    path = cached_model(args.model, 0)
    spec = modelfiles.model_spec(args.model, path, hash_weights=False)
    kv_token = 2 * spec.n_layers * spec.n_kv_heads * spec.head_dim * 4
    print(f"load: {' '.join(f'{x:.1f}' for x in os.getloadavg())} (1, 5, 15 min) on "
          f"{os.cpu_count()} cores; model {args.model} ({spec.n_layers} layers, "
          f"{spec.n_kv_heads} KV heads x {spec.head_dim}): KV {kv_token} bytes a token (fp32)")
    with tempfile.TemporaryDirectory() as root, LocalNetwork(
            root=Path(root), models={"colo": path, "split": path},
            env={"SPARECYCLES_VERIFICATION": "false", "SPARECYCLES_DISAGG": "always",
                 "OMP_NUM_THREADS": "1"}) as net:
        store = net.store()
        net.start_coordinator()
        net.start_node("one", "a", models={"colo": path})
        net.start_node("prefill", "b", models={"split": path})
        net.start_node("decode", "c", models={"split": path})
        net.wait_ready(3, timeout_s=600)
        _, key = store.create_api_key("bench", "disagg")
        Ledger(store.sessions, prices=PriceBook.default()).deposit(
            store.ensure_client("bench"), 10_000_000_000, reference="bench")
        client = OpenAI(base_url=net.url + "/v1", api_key=key, max_retries=0, timeout=600)
        for model in ("colo", "split"):  # warm up
            one(client, store, model, prompt_of(50), 4)
        rows = []
        for length in args.prompts:
            prompt = prompt_of(length)
            got: dict[str, list[Reply]] = {"colo": [], "split": []}
            for _ in range(args.rounds):
                for model in ("colo", "split"):
                    got[model].append(one(client, store, model, prompt, args.tokens))
            same = all(s.text == c.text for s, c in zip(got["split"], got["colo"], strict=True))
            rows.append((length, got, same))
    print()
    print("| prompt tokens | KV cache | TTFT colo / split (s) | total colo / split (s) | split ÷ "
          "colo total | 1st→2nd token colo / split (s) | upload (s) | relay + load + step (s)"
          " | same text |")
    print("|---|---|---|---|---|---|---|---|---|")

    def med(xs: list[float]) -> float:
        return statistics.median(xs)

    for _length, got, same in rows:
        c, s = got["colo"], got["split"]
        n = c[0].prompt_tokens
        ratio = med([b.total_s / a.total_s for a, b in zip(c, s, strict=True)])
        print(f"| {n} | {n * kv_token / 1024:,.0f} KiB | {med([r.ttft_s for r in c]):.3f} / "
              f"{med([r.ttft_s for r in s]):.3f} | {med([r.total_s for r in c]):.3f} / "
              f"{med([r.total_s for r in s]):.3f} | {ratio:.2f} | "
              f"{med([r.second_gap_s for r in c]):.3f} / {med([r.second_gap_s for r in s]):.3f}"
              f" | {med([r.upload_s or 0.0 for r in s]):.3f} | "
              f"{med([r.relay_s or 0.0 for r in s]):.3f} | {'yes' if same else 'NO'} |")
    print(f"\n{args.rounds} rounds, {args.tokens} tokens a request (ignore_eos), medians; "
          f"load after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()

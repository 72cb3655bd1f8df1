"""Decode speed of a chain against one node: the ~290M model (hidden 1024, 24 layers, fp32; the
``medium`` test model, random weights) split over two stage processes (layers 0:12 and 12:24)
against the same model whole on one node process, side by side in one run on loopback.

One coordinator serves the model under two names: ``whole`` (one node holds it all) and ``split``
(no node holds it all, so each request is driven through a chain of the two stage nodes). Every
process runs one torch thread (OMP_NUM_THREADS=1, as ``tools/localnet`` sets). For each
concurrency (1 and 4 requests at once) the two are measured back to back, ``--rounds`` times,
with the same greedy prompts; each round gives a ratio, and the median ratio is the result (the
machine is shared: rounds move with the other processes' load, and a ratio taken within one
round moves less than either number).

Reported per concurrency: decode tokens/s (the sum over the requests of their tokens after the
first ÷ the time from their first to their last token), split ÷ whole, and at concurrency 1 the
time per token split into the nodes' compute (``busy_s`` of the job's attempts, less a one-token
request's, which is the prefill) and the rest: for the whole model, one message per token from
the node; for the chain, four (token id to the first stage, its activation back, the activation
to the second stage, the token back), each encoded, sent and decoded by the coordinator. The hop
cost per token is the chain's rest less the whole model's. Run:

    PYTHONPATH=src nice -n 5 python bench/chain_speed.py [--rounds 5] [--tokens 48]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fixtures_models import cached_model
from sparecycles.ledger.pricing import PriceBook
from sparecycles.ledger.service import Ledger
from sparecycles.store import Store
from sparecycles.tools.localnet import LocalNetwork

PROMPTS = ("The garden behind the house", "Where does the river go when", "Once upon a time there",
           "The old man said that the")
TARGET = 0.8


@dataclass
class Reply:
    text: str
    tokens: int
    first_s: float  # perf_counter of the first streamed text
    last_s: float
    busy_s: float  # the nodes' compute for the job (all its attempts)

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.tokens - 1) / max(1e-9, self.last_s - self.first_s)


def one(client: OpenAI, store: Store, model: str, prompt: str, tokens: int) -> Reply:
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=tokens,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    parts, first, last, n, job = [], 0.0, 0.0, 0, ""
    for chunk in stream:
        job = chunk.id
        if chunk.choices and chunk.choices[0].text:
            last = time.perf_counter()
            first = first or last
            parts.append(chunk.choices[0].text)
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
    busy = 0.0
    for _ in range(50):  # the attempts' rows are written just after the reply
        attempts = store.attempts(job.split("-", 1)[1])
        if attempts and all(a.outcome != "running" for a in attempts):
            busy = sum(a.busy_s for a in attempts)
            break
        time.sleep(0.1)
    return Reply("".join(parts), n, first, last, busy)


def together(client: OpenAI, store: Store, model: str, prompts: list[str], tokens: int
             ) -> list[Reply]:
    out: list[Reply | None] = [None] * len(prompts)

    def run(i: int) -> None:
        out[i] = one(client, store, model, prompts[i], tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is not None for r in out)
    return [r for r in out if r is not None]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    args = ap.parse_args()
    path = cached_model("medium", 0)
    print(f"load: {' '.join(f'{x:.1f}' for x in os.getloadavg())} (1, 5, 15 min) on "
          f"{os.cpu_count()} cores; model {path.name}")
    with tempfile.TemporaryDirectory() as root, LocalNetwork(
            root=Path(root), models={"whole": path, "split": path},
            env={"SPARECYCLES_VERIFICATION": "false", "OMP_NUM_THREADS": "1"}) as net:
        store = net.store()
        net.start_coordinator()
        net.start_node("one", "a", models={"whole": path})
        info = ["--log-level", "info"]  # the stages log their passes by size when they stop
        net.start_node("s0", "b", extra_args=["--layers", "0:12", *info], models={"split": path})
        net.start_node("s1", "c", extra_args=["--layers", "12:24", *info],
                       models={"split": path})
        net.wait_ready(3, timeout_s=600)
        _, key = store.create_api_key("bench", "speed")
        Ledger(store.sessions, prices=PriceBook.default()).deposit(
            store.ensure_client("bench"), 10_000_000_000, reference="bench")
        client = OpenAI(base_url=net.url + "/v1", api_key=key, max_retries=0, timeout=600)
        prefill = {}
        for model in ("whole", "split"):  # warm up; a one-token reply's compute is the prefill
            one(client, store, model, PROMPTS[0], 4)
            prefill[model] = statistics.median(
                one(client, store, model, PROMPTS[0], 1).busy_s for _ in range(3))
        rows = []
        for c in args.concurrency:
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(c)]
            rounds: list[dict[str, list[Reply]]] = []
            for _ in range(args.rounds):  # whole then split, back to back, round by round
                rounds.append({m: together(client, store, m, prompts, args.tokens)
                               for m in ("whole", "split")})
            rows.append((c, rounds))
        passes = {}
        for name in ("s0", "s1"):  # each stage logs its passes by size when it stops
            net.signal_node(name, signal.SIGTERM)
            net.nodes[name].proc.wait(timeout=60)
            logged = [ln for ln in net.nodes[name].log_path.read_text().splitlines()
                      if "decode passes by the steps" in ln]
            passes[name] = logged[-1].split("each ran: ")[-1] if logged else "?"
    print(f"\n{'requests':>8} | {'round':>5} | {'whole tok/s':>11} | {'split tok/s':>11} | "
          f"{'split/whole':>11} | same text")
    summary = []
    for c, rounds in rows:
        ratios = []
        for k, r in enumerate(rounds):
            whole, split = (rate(r[m]) for m in ("whole", "split"))
            same = [x.text for x in r["whole"]] == [x.text for x in r["split"]]
            ratios.append(split / whole)
            print(f"{c:>8} | {k + 1:>5} | {whole:11.2f} | {split:11.2f} | {split / whole:11.2f} |"
                  f" {same}")
        summary.append((c, statistics.median(ratios)))
    print("\nmedian split/whole: " + ", ".join(f"{r:.2f} at {c} request{'s' * (c > 1)}"
                                               for c, r in summary))
    print("decode passes by the steps each ran (all concurrencies, warm-up included): "
          + "; ".join(f"{n} {v}" for n, v in passes.items()))
    for c, rounds in rows:
        if c != 1:
            continue
        print("\nper token at 1 request, median over the rounds (ms): wall = compute + the rest")
        rest, wall = {}, {}
        for model in ("whole", "split"):
            replies = [r[model][0] for r in rounds]
            wall[model] = statistics.median(
                (x.last_s - x.first_s) / max(1, x.tokens - 1) for x in replies)
            compute = statistics.median(
                max(0.0, x.busy_s - prefill[model]) / max(1, x.tokens - 1) for x in replies)
            rest[model] = wall[model] - compute
            print(f"  {model:5s}: {wall[model] * 1e3:7.1f} = {compute * 1e3:7.1f} + "
                  f"{rest[model] * 1e3:6.1f}")
        hop = rest["split"] - rest["whole"]
        print(f"  hop cost per token (split's rest - whole's): {hop * 1e3:.1f} ms "
              f"= {hop / wall['split']:.1%} of the chain's time per token")
    ratio = summary[0][1]
    print(f"\ntarget split/whole >= {TARGET} at {summary[0][0]} request(s): "
          f"{'met' if ratio >= TARGET else 'NOT met'} ({ratio:.2f}); "
          f"load after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


def rate(replies: list[Reply]) -> float:
    """Decode tokens/s of requests run together: the sum of each one's rate."""
    return sum(r.decode_tokens_per_s for r in replies)


if __name__ == "__main__":
    main()

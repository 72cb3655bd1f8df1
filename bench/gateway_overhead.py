"""What sparecycles adds on top of the backend it drives: latency and throughput, side by side.

Runs the same prompts at the same concurrency, in one run, two ways:
  direct   the TransformersEngine in this process (what a node does, without any network)
  network  the openai client -> coordinator (HTTP/SSE) -> node agent (WebSocket) -> the same
           engine in a node process, all on 127.0.0.1
and reports time to first token, tokens/s, and the coordinator's added latency.

Both sides run the engine with one torch thread (the node process gets OMP_NUM_THREADS=1 from
LocalNetwork), so the comparison is of the path, not of thread counts. With ``--backend
llamacpp`` both sides run a ``LlamaCppEngine`` on a GGUF file (SmolLM2-135M by default, the
demo's model) with ``--threads`` threads (default: all cores), the node started with the same
``--threads``; the direct engine is then loaded before anything imports torch, as in a node that
serves only GGUF files (llama.cpp in a process where torch was imported first decoded ~15 %
slower: docs/benchmarks.md, "OpenMP"), and the report says whether torch was in the process.

    python bench/gateway_overhead.py [--requests 24] [--max-tokens 64]
        [--endpoint chat|completions] [--preset tiny|medium] [--concurrency 1 4]
        [--backend transformers|llamacpp] [--model PATH] [--json PATH]

``--endpoint chat`` (the default) sends chat prompts, which the tiny model answers in a few
tokens: per-request costs dominate. ``--endpoint completions`` sends plain-text prompts whose
greedy continuation runs to ``max_tokens``: per-token costs dominate. ``--preset medium`` uses
the ~290M-parameter untrained model (whose decode step is a realistic tens of milliseconds on a
CPU core) instead of the tiny one (a millisecond or two).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from sparecycles import modelfiles
from sparecycles.ledger.pricing import PriceBook
from sparecycles.ledger.service import Ledger
from sparecycles.node.backends.base import Engine, GenerationRequest, GenerationUpdate
from sparecycles.node.backends.llamacpp import LlamaCppEngine
from sparecycles.tools.localnet import LocalNetwork
from sparecycles.tools.smollm2 import smollm2_path
from sparecycles.types import SamplingParams

PROMPTS = [f"Tell me about the garden number {i}." for i in range(64)]
# Plain-text openings whose greedy continuation by the tiny model runs to 128 tokens (checked
# with this engine; the medium model, untrained, runs to max_tokens on anything).
MODEL = "bench"  # the name the model is served under
OPENINGS = ["The old man and the sea", "It was a dark night and",
            "Alice was beginning to get very tired", "In the morning the", "She looked at the",
            "He said that the", "There was once a"]


def direct(engine: Engine, prompts: list[list[int]], max_tokens: int,
           concurrency: int) -> list[tuple[float, float, int]]:
    """(ttft_s, total_s, tokens) per request, submitting ``concurrency`` at a time."""

    def one(i: int) -> tuple[float, float, int]:
        done = threading.Event()
        first: list[float] = []
        count = [0]
        t0 = time.perf_counter()

        def on_update(u: GenerationUpdate) -> None:
            if u.token_ids and not first:
                first.append(time.perf_counter() - t0)
            count[0] += len(u.token_ids)
            if u.finished:
                done.set()

        engine.submit(GenerationRequest(f"r{i}-{time.monotonic_ns()}", tuple(prompts[i]),
                                        SamplingParams(max_tokens=max_tokens, temperature=0,
                                                       stop=())), on_update)
        done.wait(600)
        total_s = time.perf_counter() - t0
        return (first[0] if first else total_s), total_s, count[0]

    with cf.ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(len(prompts))))


def network(client, texts: list[str], max_tokens: int, concurrency: int, endpoint: str = "chat"
            ) -> list[tuple[float, float, int]]:
    def stream(i: int):
        if endpoint == "chat":
            return client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": texts[i]}],
                max_tokens=max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True})
        return client.completions.create(
            model=MODEL, prompt=texts[i], max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True})

    def one(i: int) -> tuple[float, float, int]:
        t0 = time.perf_counter()
        ttft, tokens = None, 0
        for chunk in stream(i):
            if chunk.choices and ttft is None and (
                    chunk.choices[0].delta.content if endpoint == "chat"
                    else chunk.choices[0].text):
                ttft = time.perf_counter() - t0
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return ttft or 0.0, time.perf_counter() - t0, tokens

    with cf.ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(len(texts))))


def node_busy_s(store, since_epoch_s: float) -> float:
    """The node's engine time (its signed metering) over the jobs admitted since then."""
    return sum(a.busy_s for j in store.list_jobs(limit=1000) if j.created_at_s >= since_epoch_s
               for a in store.attempts(j.id))


def summarize(rows: list[tuple[float, float, int]], wall_s: float) -> dict[str, float]:
    ttfts = sorted(r[0] for r in rows)
    return {
        "ttft_p50_ms": statistics.median(ttfts) * 1000,
        "ttft_p90_ms": ttfts[int(0.9 * (len(ttfts) - 1))] * 1000,
        "tokens_per_s": sum(r[2] for r in rows) / wall_s,
        "tokens": sum(r[2] for r in rows),
    }


def overhead_quantile(metrics_text: str, stage: str, q: float) -> float:
    """The q-quantile of the coordinator's own overhead, interpolated in its histogram."""
    buckets: list[tuple[float, float]] = []
    for line in metrics_text.splitlines():
        if line.startswith("sparecycles_coordinator_overhead_seconds_bucket") and \
                f'stage="{stage}"' in line:
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.split()[-1])))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0
    if not total:
        return float("nan")
    target, prev_le, prev_n = q * total, 0.0, 0.0
    for le, n in buckets:
        if n >= target:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (target - prev_n) / max(n - prev_n, 1e-9)
        prev_le, prev_n = le, n
    return prev_le


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds per concurrency, direct and network alternating who goes first")
    ap.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    ap.add_argument("--backend", choices=("transformers", "llamacpp"), default="transformers")
    ap.add_argument("--preset", choices=("tiny", "medium"), default="tiny")
    ap.add_argument("--model", type=Path, default=None,
                    help="a model directory (default: .sparecycles/bench/PRESET, built once) or,"
                         " with --backend llamacpp, a GGUF file (default: SmolLM2-135M)")
    ap.add_argument("--threads", type=int, default=None,
                    help="llama.cpp threads on both sides (default: all cores)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    llamacpp = args.backend == "llamacpp"
    engine: Engine
    node_args: list[str] = []
    if llamacpp:  # the engine first: nothing has imported torch yet
        args.model = args.model or smollm2_path()
        args.threads = args.threads or os.cpu_count() or 1
        torch_before_engine = "torch" in sys.modules
        engine = LlamaCppEngine.load(MODEL, args.model, threads=args.threads)
        node_args = ["--backend", "llamacpp", "--threads", str(args.threads)]
    else:
        import torch

        from sparecycles.node.backends.transformers import TransformersEngine
        from sparecycles.tools.tinymodel import build_tiny_model

        args.model = args.model or Path(".sparecycles/bench") / args.preset
        if not (args.model / "config.json").exists():
            build_tiny_model(args.model, preset=args.preset)
        torch.set_num_threads(1)
        torch_before_engine = True
        engine = TransformersEngine.load(MODEL, args.model, device="cpu")
    tok = modelfiles.load_tokenizer(str(args.model))
    texts = (PROMPTS if args.endpoint == "chat" else
             [OPENINGS[i % len(OPENINGS)] for i in range(64)])[: args.requests]
    if args.endpoint == "chat":
        ids = [modelfiles.render_chat(tok, [{"role": "user", "content": t}]) for t in texts]
    else:
        ids = [modelfiles.render_completion(tok, t) for t in texts]
    what = f"{args.backend}, {args.threads} threads" if llamacpp else args.preset
    print(f"model {args.model} ({what}), endpoint {args.endpoint}, "
          f"{len(texts)} requests, max_tokens {args.max_tokens}")
    # The tiny model stops early at its end-of-turn token; both paths see the same prompts and
    # greedy decoding, so they generate the same tokens.
    if llamacpp:
        print(f"torch in this process before the direct engine loaded: {torch_before_engine}; "
              f"by now: {'torch' in sys.modules}")
    report: dict[str, object] = {"backend": args.backend, "model": str(args.model),
                                 "endpoint": args.endpoint, "requests": len(texts),
                                 "max_tokens": args.max_tokens, "threads": args.threads,
                                 "torch_before_engine": torch_before_engine,
                                 "concurrency": {}}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp, LocalNetwork(
            root=Path(tmp), models={MODEL: args.model}) as net:
        from openai import OpenAI

        store = net.store()
        _kid, key = store.create_api_key("bench", "bench")
        Ledger(store.sessions, prices=PriceBook.default()).deposit(
            store.ensure_client("bench"), 100_000_000, reference="bench")
        net.start_coordinator()
        net.start_node("bench-node", "bench-owner", extra_args=node_args)
        net.wait_ready(1)
        client = OpenAI(base_url=net.url + "/v1", api_key=key, max_retries=0, timeout=600)
        network(client, texts[:2], 8, 1, args.endpoint)  # warm up both paths
        direct(engine, ids[:2], 8, 1)
        print(f"{'concurrency':>11} {'round':>5} {'path':>8} {'TTFT p50':>9} {'TTFT p90':>9} "
              f"{'tokens/s':>9} {'tokens':>7} {'engine ms/token':>15}")
        for c in args.concurrency:
            ratios, added = [], []
            per_path: dict[str, list[dict[str, float]]] = {"direct": [], "network": []}
            for rnd in range(args.rounds):  # alternate which path goes first: noise hits both
                results = {}
                order = ("direct", "network") if rnd % 2 == 0 else ("network", "direct")
                for name in order:
                    busy0, since = engine.stats().busy_s, time.time()
                    t0 = time.perf_counter()
                    rows = (direct(engine, ids, args.max_tokens, c) if name == "direct"
                            else network(client, texts, args.max_tokens, c, args.endpoint))
                    r = results[name] = summarize(rows, time.perf_counter() - t0)
                    busy = (engine.stats().busy_s - busy0 if name == "direct"
                            else node_busy_s(store, since))
                    r["engine_ms_per_token"] = busy / max(1, r["tokens"]) * 1000
                    per_path[name].append(r)
                    loads.append(os.getloadavg()[0])
                    print(f"{c:>11} {rnd + 1:>5} {name:>8} {r['ttft_p50_ms']:>7.1f}ms "
                          f"{r['ttft_p90_ms']:>7.1f}ms {r['tokens_per_s']:>9.1f} "
                          f"{r['tokens']:>7} {r['engine_ms_per_token']:>15.2f}")
                added.append(results["network"]["ttft_p50_ms"] - results["direct"]["ttft_p50_ms"])
                ratios.append(results["network"]["tokens_per_s"]
                              / results["direct"]["tokens_per_s"])
            print(f"{c:>11} {'':>5} {'median':>8} added TTFT {statistics.median(added):.1f} ms, "
                  f"throughput ratio network/direct {statistics.median(ratios):.3f} "
                  f"(rounds: {', '.join(f'{x:.3f}' for x in ratios)})")
            report["concurrency"][str(c)] = {  # type: ignore[index]
                "ratio_median": statistics.median(ratios), "ratios": ratios,
                "added_ttft_ms_median": statistics.median(added),
                **{f"{name}_{k}_median": statistics.median(r[k] for r in rs)
                   for name, rs in per_path.items() for k in rs[0]}}
        import httpx

        text = httpx.get(net.url + "/metrics").text
        for stage in ("admission", "relay"):
            p50, p90 = (overhead_quantile(text, stage, q) * 1000 for q in (0.5, 0.9))
            report[f"{stage}_overhead_ms"] = {"p50": p50, "p90": p90}
            print(f"coordinator's own {stage} overhead: p50 {p50:.2f} ms, p90 {p90:.2f} ms")
    engine.close()
    report["load_average"] = {"min": min(loads), "max": max(loads)}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

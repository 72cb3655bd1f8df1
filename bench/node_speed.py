"""Node decode speed (issue 15): share of the memory-bandwidth roofline, batching, the engine
against llama-cpp-python called directly, and where a step's time goes. All in one run.

    python bench/node_speed.py [--rounds 3] [--tokens 32] [--smol-tokens 64] [--network]
    SPARECYCLES_BENCH_MODELS=/tmp/models python bench/node_speed.py   # where the 1B GGUFs go
    make bench-node-speed

What is measured, side by side, in each round (the order of the paths reverses every round, so
a burst of other work on a shared machine does not always hit the same path). Every engine runs
in a process of its own (``EngineProcess``, spawned, importing only what that engine needs), as
a node serves one model: llama.cpp's OpenMP threads beside another engine's, or beside torch's,
decode 2-3x slower (docs/benchmarks.md, "OpenMP"), and this benchmark once measured every path
so crowded. The batch-8 case has an engine of its own too, so the batch-1 rows do not pay for
the cells its slots keep. The parent measures the bandwidths and times nothing else. At its
peak, with every engine loaded, it holds about 7 GB (each process its own copy of the weights,
repacked for this CPU). It needs llama.cpp built as ``make setup`` builds it: the ``Llama`` and
bare-loop paths have no guard against a build with AMX kernels (docs/benchmarks.md, "AMX"):

1. Decode at batch 1 as a share of the roofline, on models where reading the weights dominates
   a step: a generated Llama model of 1.17B parameters (``tools/ggufmodel.py``: Llama 3.2 1B's
   layers, SmolLM2's vocabulary, random weights) quantized by llama.cpp to Q8_0 and Q4_0, served
   by our ``LlamaCppEngine``, by llama-cpp-python's high-level ``Llama`` (greedy, the same
   threads) and by a bare loop over the C API (``llama_decode`` + llama.cpp's greedy sampler,
   the same context parameters as ours: the engine's floor); and the ~290M fp32 model of
   ``bench/perfmodel_validate.py`` on our ``TransformersEngine``.
   Roofline = bandwidth / bytes read per token, where the bytes come from the file's own tensor
   types (every tensor but the input embedding; ``ggufmodel.decode_weight_bytes``) plus the KV
   cache at the mean context. The bandwidth is measured right before each engine measurement,
   two ways: a multi-threaded read (each of ``--threads`` threads sums its share of a 512 MiB
   buffer, the way a multi-threaded engine streams its weights: the denominator of the share),
   and the node profiler's own copy bandwidth (``profile.measure_cpu_bandwidth``: read + write
   bytes of a copy, the best of numpy's one thread and torch's all threads), shown beside it.
2. Aggregate decode at 8 concurrent requests / 1 request, same model, both backends.
3. SmolLM2-135M (Q4_1, the demo's model): our engine (plain, and with the log-probabilities the
   network asks for when it verifies) against ``Llama`` and the bare loop, and where our step's
   time goes (``llama_decode``, choosing the token, the rest), timed inside the engine thread.
4. With ``--network``: the network against the engine called directly, SmolLM2 on the llama.cpp
   backend at concurrency 1 and 4, by running ``bench/gateway_overhead.py --backend llamacpp``.

Decode speed is given two ways: tokens over the run's time, and one over the median time between
two tokens (per request, summed over a batch), which the bursts of other engineers' work on a
shared machine move far less; the shares and ratios use the second. Prints a readable table
and, last, one JSON object. docs/benchmarks.md ("Node decode speed
(issue 15)") has the numbers and what they mean.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402

from sparecycles import gguffile  # noqa: E402
from sparecycles.node.backends.base import Engine, GenerationRequest, GenerationUpdate  # noqa: E402
from sparecycles.node.backends.llamacpp import LlamaCppEngine, _llama  # noqa: E402
from sparecycles.node.profile import measure_cpu_bandwidth  # noqa: E402
from sparecycles.tools import ggufmodel  # noqa: E402
from sparecycles.tools.smollm2 import smollm2_path  # noqa: E402
from sparecycles.types import SamplingParams  # noqa: E402

MODELS = Path(os.environ.get("SPARECYCLES_BENCH_MODELS",
                           Path.home() / ".cache" / "sparecycles" / "models"))
TARGETS = {"llamacpp_share": 0.80, "transformers_share": 0.70, "batch8_ratio": 3.0,
           "network_ratio": 0.9}
read_bytes = 512 * 1024 * 1024  # far beyond any last-level cache
read_tries = 5
kv_tokens = 1024  # the llama.cpp contexts' cells: prompt + answer fit many times over
f16_kv_bytes = 2  # llama.cpp's default KV cache type


# --- models --------------------------------------------------------------------------------


def models_1b() -> dict[str, Path]:
    """The generated 1B model in Q8_0 and Q4_0, written and quantized once (about two minutes
    and 0.8 GB of memory on 2 cores); the F16 intermediate is removed afterwards."""
    out = {k: MODELS / f"random-1b-{k}.gguf" for k in ("q8_0", "q4_0")}
    if all(p.is_file() for p in out.values()):
        return out
    f16 = MODELS / "random-1b-f16.gguf"
    if not f16.is_file():
        print("writing the 1B model (F16, random weights, SmolLM2's tokenizer)...", flush=True)
        ggufmodel.write_random_llama(f16, ggufmodel.shape_1b, smollm2_path(), name="random-1b")
    for kind, path in out.items():
        if not path.is_file():
            print(f"quantizing to {kind}...", flush=True)
            ggufmodel.quantize(f16, path, kind)
    f16.unlink()
    return out


def gguf_bytes_per_token(path: Path, context: int) -> float:
    """Weights read per decoded token (from the tensors' stored types) + the KV cache read at
    ``context`` tokens (f16)."""
    info = gguffile.read_gguf(path, arrays=False)
    layers = int(info.arch_value("block_count"))
    heads = int(info.arch_value("attention.head_count"))
    kv_heads = int(info.arch_value("attention.head_count_kv") or heads)
    head_dim = int(info.arch_value("embedding_length")) // heads
    kv = layers * 2 * kv_heads * head_dim * f16_kv_bytes * context
    return ggufmodel.decode_weight_bytes(info) + kv


# --- bandwidth ---------------------------------------------------------------------------------


class ReadBandwidth:
    """Bytes/s of a multi-threaded read: ``threads`` threads each sum their own share of a large
    buffer (numpy releases the GIL in the reduction); the best of a few tries."""

    def __init__(self, threads: int, nbytes: int = read_bytes) -> None:
        self.buffer = np.ones(nbytes // 8, dtype=np.int64)
        self.parts = np.array_split(self.buffer, threads)
        self.pool = cf.ThreadPoolExecutor(threads)
        self.nbytes = self.buffer.nbytes

    def measure(self) -> float:
        best = float("inf")
        for _ in range(read_tries):
            t0 = time.perf_counter()
            list(self.pool.map(np.sum, self.parts))
            best = min(best, time.perf_counter() - t0)
        return self.nbytes / best

    def close(self) -> None:
        self.pool.shutdown()


# --- decode paths ----------------------------------------------------------------------------


Rates = tuple[float, float]  # (tokens/s over the run, tokens/s of the median step)


def decode_rate(stamps: list[list[float]]) -> Rates:
    """Aggregate decode tokens/s of requests that ran together, two ways: over the window from
    the last first token to the first finish (every request decoding the whole time), and from
    each request's median time between two tokens in that window (the sum of 1 / median), which
    a few steps stalled by other work on a shared machine do not move."""
    first = max(s[0] for s in stamps)
    last = min(s[-1] for s in stamps)
    tokens = sum(sum(1 for t in s if first < t <= last) for s in stamps)
    per_step = 0.0
    for s in stamps:
        window = [t for t in s if first <= t <= last]
        gaps = np.diff(window)
        if len(gaps):
            per_step += 1.0 / max(1e-9, float(np.median(gaps)))
    return tokens / max(1e-9, last - first), per_step


def run_engine(engine: Engine, prompts: list[tuple[int, ...]], n: int, *,
               want_logprobs: bool = False) -> tuple[Rates, list[list[int]]]:
    """(aggregate decode tokens/s, tokens of each) for ``prompts`` submitted together."""
    stamps: list[list[float]] = [[] for _ in prompts]
    tokens: list[list[int]] = [[] for _ in prompts]
    left = threading.Semaphore(0)

    def recorder(k: int) -> Callable[[GenerationUpdate], None]:
        def record(u: GenerationUpdate) -> None:
            now = time.perf_counter()
            stamps[k].extend([now] * len(u.token_ids))
            tokens[k].extend(u.token_ids)
            if u.finished:
                left.release()
        return record

    tag = time.monotonic_ns()
    for k, prompt in enumerate(prompts):
        engine.submit(GenerationRequest(f"r{tag}-{k}", prompt,
                                        SamplingParams(max_tokens=n, temperature=0),
                                        want_logprobs=want_logprobs), recorder(k))
    for _ in prompts:
        if not left.acquire(timeout=1200):
            raise TimeoutError("the engine did not finish")
    return decode_rate(stamps), tokens


def run_llama(llm: Any, prompt: tuple[int, ...], n: int) -> tuple[Rates, list[list[int]]]:
    """llama-cpp-python's high-level ``Llama.generate``, greedy, from an empty cache."""
    lib = _llama()
    vocab = lib.llama_model_get_vocab(llm._model.model)
    llm.reset()
    stamps: list[float] = []
    tokens: list[int] = []
    for token in llm.generate(list(prompt), temp=0.0, top_k=1, reset=True):
        stamps.append(time.perf_counter())
        if lib.llama_vocab_is_eog(vocab, token):
            break
        tokens.append(token)
        if len(tokens) == n:
            break
    return decode_rate([stamps[: len(tokens)]]), [tokens]


class BareLoop:
    """The C API with nothing around it: ``llama_decode`` of one token, llama.cpp's greedy
    sampler, on a context made with our engine's parameters (``LlamaCppEngine.__init__``), over
    the model that ``Llama`` loaded (one copy of the weights)."""

    def __init__(self, model: Any, threads: int, seq_max: int) -> None:
        lib = self.lib = _llama()
        c = lib.llama_context_default_params()
        c.n_ctx, c.n_batch, c.n_ubatch = kv_tokens, 512, 512
        c.n_seq_max, c.kv_unified, c.no_perf = seq_max, True, True
        c.n_threads = c.n_threads_batch = threads
        self.ctx = lib.llama_init_from_model(model, c)
        self.vocab = lib.llama_model_get_vocab(model)
        self.sampler = lib.llama_sampler_init_greedy()

    def run(self, prompt: tuple[int, ...], n: int) -> tuple[Rates, list[list[int]]]:
        lib, ctx = self.lib, self.ctx
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        ids = (lib.llama_token * len(prompt))(*prompt)
        if lib.llama_decode(ctx, lib.llama_batch_get_one(ids, len(prompt))):
            raise RuntimeError("llama_decode failed")
        one = (lib.llama_token * 1)()
        stamps, tokens = [], []
        while True:
            token = lib.llama_sampler_sample(self.sampler, ctx, -1)
            stamps.append(time.perf_counter())
            if lib.llama_vocab_is_eog(self.vocab, token):
                break
            tokens.append(token)
            if len(tokens) == n:
                break
            one[0] = token
            if lib.llama_decode(ctx, lib.llama_batch_get_one(one, 1)):
                raise RuntimeError("llama_decode failed")
        return decode_rate([stamps[: len(tokens)]]), [tokens]

    def close(self) -> None:
        self.lib.llama_sampler_free(self.sampler)
        self.lib.llama_free(self.ctx)


# --- where our step's time goes --------------------------------------------------------------


class _TimedLib:
    """llama_cpp with ``llama_decode`` timed; everything else passed through."""

    def __init__(self, lib: Any) -> None:
        self._lib = lib
        self.decode_s = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lib, name)

    def llama_decode(self, ctx: Any, batch: Any) -> int:
        t0 = time.perf_counter()
        code = int(self._lib.llama_decode(ctx, batch))
        self.decode_s += time.perf_counter() - t0
        return code


def step_breakdown(engine: LlamaCppEngine, prompt: tuple[int, ...], n: int,
                   want_logprobs: bool) -> dict[str, float]:
    """One request through our engine with its step, ``llama_decode`` and token choice timed
    inside the engine thread: milliseconds per decoded token of each part."""
    lib = engine._lib
    timed = _TimedLib(lib)
    spent = {"step": 0.0, "choose": 0.0}
    step, choose = engine._step, engine._choose

    def timed_step() -> None:
        t0 = time.perf_counter()
        step()
        spent["step"] += time.perf_counter() - t0

    def timed_choose(rows: Any) -> None:
        t0 = time.perf_counter()
        choose(rows)
        spent["choose"] += time.perf_counter() - t0

    engine._lib, engine._step, engine._choose = timed, timed_step, timed_choose  # type: ignore
    t0 = time.perf_counter()
    try:
        _, tokens = run_engine(engine, [prompt], n, want_logprobs=want_logprobs)
    finally:
        wall = time.perf_counter() - t0
        engine._lib = lib
        del engine._step, engine._choose  # back to the class's methods
    k = max(1, len(tokens[0]))  # one step per token (the first also prefills)
    ms = 1000.0 / k
    return {"wall": wall * ms, "step": spent["step"] * ms, "llama_decode": timed.decode_s * ms,
            "choose": spent["choose"] * ms,
            "rest_of_step": (spent["step"] - timed.decode_s - spent["choose"]) * ms,
            "outside_step": (wall - spent["step"]) * ms}


# --- one engine, one process -------------------------------------------------------------


def _build(kind: str, path: str | None, threads: int, batch: int
           ) -> tuple[dict[str, Callable[..., Any]], Callable[[], None], dict[str, Any]]:
    """(operations, close, facts) of one engine: ``ours`` (LlamaCppEngine), ``llama``
    (llama-cpp-python's ``Llama``), ``bare`` (the C-API loop over a model ``Llama`` loaded) or
    ``transformers`` (TransformersEngine on the ~290M fp32 model)."""
    if kind == "ours":
        gguf = Path(str(path))
        engine = LlamaCppEngine.load(gguf.stem, gguf, threads=threads, batch_size_max=batch,
                                     kv_tokens=kv_tokens)
        return ({"run": lambda prompts, n, want_logprobs=False: run_engine(
                    engine, prompts, n, want_logprobs=want_logprobs),
                 "breakdown": lambda prompt, n, want_logprobs: step_breakdown(
                    engine, prompt, n, want_logprobs)},
                engine.close, {})
    if kind in ("llama", "bare"):
        import llama_cpp

        llm = llama_cpp.Llama(str(path), n_ctx=kv_tokens, n_threads=threads,
                              n_threads_batch=threads, flash_attn=True, verbose=False)
        ops: dict[str, Callable[..., Any]] = {
            "tokenize": lambda text: tuple(llm.tokenize(text.encode(), add_bos=False,
                                                        special=True))}
        if kind == "llama":
            ops["run"] = lambda prompt, n: run_llama(llm, prompt, n)
            return ops, llm.close, {}
        bare = BareLoop(llm._model.model, threads, batch + 1)
        ops["run"] = lambda prompt, n: bare.run(prompt, n)

        def close() -> None:
            bare.close()
            llm.close()
        return ops, close, {}
    if kind == "transformers":
        import torch
        from perfmodel_validate import build_engine

        torch.set_num_threads(threads)
        hf = build_engine(1024, 24, 4096, "cpu")
        spec = hf.spec
        facts = {k: getattr(spec, k) for k in ("n_params", "n_layers", "n_kv_heads", "head_dim",
                                                 "hidden_size")}
        return ({"run": lambda prompts, n: run_engine(hf, prompts, n)}, hf.close, facts)
    raise ValueError(f"no engine kind {kind!r}")


def _serve(conn: Any, kind: str, path: str | None, threads: int, batch: int) -> None:
    """The body of an engine's process: build it, say so, then answer (operation, arguments)
    until told to close."""
    try:
        ops, close, facts = _build(kind, path, threads, batch)
    except Exception:  # the parent raises it
        conn.send(("error", f"{kind} {path}:\n{traceback.format_exc()}"))
        return
    conn.send(("ok", facts))
    try:
        while True:
            op, kwargs = conn.recv()
            if op == "close":
                break
            try:
                conn.send(("ok", ops[op](**kwargs)))
            except Exception:
                conn.send(("error", f"{kind} {path} {op}:\n{traceback.format_exc()}"))
    finally:
        close()


class EngineProcess:
    """One engine in a spawned process of its own (a fresh interpreter: nothing of the parent's
    imports, torch in particular, is in it), driven over a pipe."""

    def __init__(self, kind: str, path: Path | None, threads: int, batch: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.name = f"{kind} {path.name if path else ''}".strip()
        self._proc = ctx.Process(target=_serve, args=(child, kind, str(path) if path else None,
                                                      threads, batch), daemon=True)
        self._proc.start()
        child.close()
        self.facts: dict[str, Any] = {}

    def ready(self) -> EngineProcess:
        self.facts = self._answer()
        return self

    def _answer(self) -> Any:
        try:
            status, value = self._conn.recv()
        except EOFError:
            raise self._ended() from None
        if status == "error":
            raise RuntimeError(value)
        return value

    def _ended(self) -> RuntimeError:
        self._proc.join(5)
        return RuntimeError(f"the process of {self.name} ended (exit code {self._proc.exitcode})")

    def __call__(self, op: str, **kwargs: Any) -> Any:
        try:
            self._conn.send((op, kwargs))
        except (BrokenPipeError, ConnectionResetError):
            raise self._ended() from None
        return self._answer()

    def close(self) -> None:
        if self._proc.is_alive():
            with contextlib.suppress(OSError):
                self._conn.send(("close", {}))
            self._proc.join(60)
        if self._proc.is_alive():
            self._proc.kill()
        self._conn.close()


# --- the run ---------------------------------------------------------------------------------


def median_range(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def fmt(r: dict[str, float], digits: int = 1, pct: bool = False) -> str:
    if pct:
        return f"{r['median']:.0%} ({r['min']:.0%}-{r['max']:.0%})"
    return f"{r['median']:.{digits}f} ({r['min']:.{digits}f}-{r['max']:.{digits}f})"


def random_prompts(count: int, length: int, vocab_lo: int, vocab_hi: int, seed: int
                   ) -> list[tuple[int, ...]]:
    rng = np.random.default_rng(seed)
    return [tuple(int(t) for t in rng.integers(vocab_lo, vocab_hi, length)) for _ in range(count)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per request, big models")
    ap.add_argument("--smol-tokens", type=int, default=64, help="new tokens per request, SmolLM2")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens, big models")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch", type=int, default=8, help="the concurrent requests of part 2")
    ap.add_argument("--parts", default="gguf,transformers,smol",
                    help="which of gguf, transformers, smol to run (comma-separated)")
    ap.add_argument("--network", action="store_true",
                    help="also run bench/gateway_overhead.py --backend llamacpp (SmolLM2)")
    ap.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = ap.parse_args()
    parts = set(args.parts.split(","))

    started = time.perf_counter()
    loads: list[float] = []
    reader = ReadBandwidth(args.threads)
    # (case, path) -> per-round measurements
    rounds: dict[tuple[str, str], list[dict[str, float]]] = {}
    matches: dict[str, bool] = {}
    closers: list[Callable[[], None]] = []

    def measure(case: str, path: str, fn: Callable[[], tuple[Rates, list[list[int]]]],
                bytes_per_token: float | None) -> list[list[int]]:
        read_bw = reader.measure()
        copy_bw = measure_cpu_bandwidth(1.0)
        loads.append(os.getloadavg()[0])
        (mean_rate, rate), tokens = fn()
        row = {"tok_s": rate, "tok_s_run": mean_rate, "read_gb_s": read_bw / 1e9,
               "copy_gb_s": copy_bw / 1e9, "load": loads[-1],
               "tokens": sum(len(t) for t in tokens)}
        if bytes_per_token:
            row["share_read"] = rate * bytes_per_token / read_bw
            row["share_copy"] = rate * bytes_per_token / copy_bw
        rounds.setdefault((case, path), []).append(row)
        share = f", {row['share_read']:.0%} of read roofline" if bytes_per_token else ""
        print(f"  {case:>14} {path:>26}: {rate:7.2f} tok/s (run {mean_rate:7.2f}; read "
              f"{read_bw / 1e9:5.1f} GB/s, copy {copy_bw / 1e9:5.1f} GB/s, load {loads[-1]:.1f})"
              f"{share}", flush=True)
        return tokens

    # (case name, [(path name, callable, bytes per token)]) for every round
    plans: list[tuple[str, list[tuple[str, Callable[[], tuple[Rates, list[list[int]]]],
                                      float | None]]]] = []
    info: dict[str, Any] = {"threads": args.threads, "tokens": args.tokens,
                            "smol_tokens": args.smol_tokens, "prompt": args.prompt}

    n = args.tokens
    procs: dict[tuple[str, str], EngineProcess] = {}  # (case, kind) -> its engine's process

    def start(case: str, kind: str, path: Path | None) -> None:
        procs[case, kind] = EngineProcess(kind, path, args.threads, args.batch)
        closers.append(procs[case, kind].close)

    gguf = models_1b() if "gguf" in parts else {}
    for kind, path in gguf.items():
        for engine_kind in ("ours", "llama", "bare"):
            start(f"1b-{kind}", engine_kind, path)
        if kind == "q4_0":
            start(f"1b-{kind} x{args.batch}", "ours", path)
    if "transformers" in parts:
        start("290m-fp32", "transformers", None)
    if "smol" in parts:
        for engine_kind in ("ours", "llama", "bare"):
            start("smollm2-q4_1", engine_kind, smollm2_path())
    print(f"loading {len(procs)} engines, each in a process of its own...", flush=True)
    for proc in procs.values():
        proc.ready()

    for kind, path in gguf.items():
        case = f"1b-{kind}"
        ours, llm, bare = (procs[case, k] for k in ("ours", "llama", "bare"))
        prompts = random_prompts(args.batch, args.prompt, 1000, 40000, seed=1)
        bpt = gguf_bytes_per_token(path, args.prompt + args.tokens // 2)
        info[f"{case} bytes/token"] = bpt
        plans.append((case, [
            ("ours (LlamaCppEngine)", lambda o=ours, p=prompts: o("run", prompts=p[:1], n=n),
             bpt),
            ("llama-cpp-python Llama", lambda m=llm, p=prompts: m("run", prompt=p[0], n=n), bpt),
            ("bare C-API loop", lambda b=bare, p=prompts: b("run", prompt=p[0], n=n), bpt),
        ]))
        # part 2 on the Q4_0 file: batch 1 is the row above; batch 8 here, same round, on an
        # engine of its own (its slots keep their cells for the prefix cache afterwards)
        if kind == "q4_0":
            many = procs[f"{case} x{args.batch}", "ours"]
            plans.append((f"{case} x{args.batch}", [
                ("ours (LlamaCppEngine)", lambda o=many, p=prompts: o("run", prompts=p, n=n),
                 None)]))

    if "transformers" in parts:
        hf = procs["290m-fp32", "transformers"]
        spec = hf.facts
        context = args.prompt + args.tokens // 2
        kv_bytes = spec["n_layers"] * 2 * spec["n_kv_heads"] * spec["head_dim"] * 4 * context
        bpt = (spec["n_params"] - 4096 * spec["hidden_size"]) * 4 + kv_bytes  # but the embedding
        info["290m-fp32 params"] = spec["n_params"]
        info["290m-fp32 bytes/token"] = bpt
        prompts = random_prompts(args.batch, args.prompt, 10, 4000, seed=2)
        plans.append(("290m-fp32", [
            ("ours (TransformersEngine)", lambda p=prompts: hf("run", prompts=p[:1], n=n), bpt)]))
        plans.append((f"290m-fp32 x{args.batch}", [
            ("ours (TransformersEngine)", lambda p=prompts: hf("run", prompts=p, n=n), None)]))

    breakdowns: dict[str, list[dict[str, float]]] = {}
    if "smol" in parts:
        path = smollm2_path()
        smol, llm_s, bare_s = (procs["smollm2-q4_1", k] for k in ("ours", "llama", "bare"))
        text = ("<|im_start|>user\nWrite a long story about a rabbit who lives in a garden, "
                "with many details.<|im_end|>\n<|im_start|>assistant\n")
        sp = llm_s("tokenize", text=text)
        bpt = gguf_bytes_per_token(path, len(sp) + args.smol_tokens // 2)
        info["smollm2 bytes/token"] = bpt
        ns = args.smol_tokens
        plans.append(("smollm2-q4_1", [
            ("ours (LlamaCppEngine)", lambda: smol("run", prompts=[sp], n=ns), bpt),
            ("ours, with logprobs",
             lambda: smol("run", prompts=[sp], n=ns, want_logprobs=True), bpt),
            ("llama-cpp-python Llama", lambda: llm_s("run", prompt=sp, n=ns), bpt),
            ("bare C-API loop", lambda: bare_s("run", prompt=sp, n=ns), bpt),
        ]))

    # warm up every path once (pages of the weights, threads, first-call costs)
    for _case, paths in plans:
        for _name, fn, _bpt in paths:
            fn()
    print(f"{args.rounds} rounds, {args.threads} threads, load average "
          f"{os.getloadavg()[0]:.1f} at the start", flush=True)
    for r in range(args.rounds):
        print(f"round {r + 1}", flush=True)
        for case, paths in plans:
            order = paths if r % 2 == 0 else paths[::-1]
            results = {}
            for name, fn, bpt in order:
                results[name] = measure(case, name, fn, bpt)
            seqs = list(results.values())
            same = all(s == seqs[0] for s in seqs)
            matches[case] = matches.get(case, True) and same
        if "smol" in parts:
            for lp in (False, True):
                key = "ours, with logprobs" if lp else "ours"
                breakdowns.setdefault(key, []).append(
                    smol("breakdown", prompt=sp, n=args.smol_tokens, want_logprobs=lp))

    summary: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "load_average": median_range(loads),
                               "load_average_end": os.getloadavg(), **info, "cases": {}}
    print(f"\nmedian (range) over {args.rounds} rounds; load average {fmt(median_range(loads))}")
    print(f"{'case':<16} {'path':<26} {'tok/s (median step)':>20} {'tok/s (run)':>20} "
          f"{'read GB/s':>18} {'share of read':>16} {'share of copy':>16}")
    for (case, path), rows in rounds.items():
        entry = {k: median_range([row[k] for row in rows]) for k in rows[0]}
        summary["cases"].setdefault(case, {})[path] = entry
        share_r = fmt(entry["share_read"], pct=True) if "share_read" in entry else "-"
        share_c = fmt(entry["share_copy"], pct=True) if "share_copy" in entry else "-"
        print(f"{case:<16} {path:<26} {fmt(entry['tok_s'], 2):>20} "
              f"{fmt(entry['tok_s_run'], 2):>20} "
              f"{fmt(entry['read_gb_s']):>18} {share_r:>16} {share_c:>16}")
    summary["same_tokens_on_every_path"] = matches

    # ratios paired within each round
    ratios: dict[str, dict[str, float]] = {}

    def paired(name: str, num: tuple[str, str], den: tuple[str, str]) -> None:
        if num in rounds and den in rounds:
            values = [a["tok_s"] / b["tok_s"] for a, b in zip(rounds[num], rounds[den],
                                                              strict=True)]
            ratios[name] = median_range(values)

    ours_l, llama_p, bare_p = "ours (LlamaCppEngine)", "llama-cpp-python Llama", "bare C-API loop"
    for case in ("1b-q8_0", "1b-q4_0", "smollm2-q4_1"):
        paired(f"{case}: ours / llama-cpp-python", (case, ours_l), (case, llama_p))
        paired(f"{case}: ours / bare loop", (case, ours_l), (case, bare_p))
    paired("smollm2-q4_1: ours with logprobs / bare loop", ("smollm2-q4_1", "ours, with logprobs"),
           ("smollm2-q4_1", bare_p))
    paired(f"1b-q4_0: batch {args.batch} / batch 1", (f"1b-q4_0 x{args.batch}", ours_l),
           ("1b-q4_0", ours_l))
    ours_t = "ours (TransformersEngine)"
    paired(f"290m-fp32: batch {args.batch} / batch 1", (f"290m-fp32 x{args.batch}", ours_t),
           ("290m-fp32", ours_t))
    summary["ratios"] = ratios
    print("\npaired ratios (median, range over the rounds)")
    for name, value in ratios.items():
        print(f"  {name:<48} {fmt(value, 2)}")
    if breakdowns:
        summary["smollm2_step_ms_per_token"] = {
            k: {part: median_range([b[part] for b in v]) for part in v[0]}
            for k, v in breakdowns.items()}
        print("\nSmolLM2, our engine: milliseconds per token (median, range), inside the engine")
        for k, parts_ in summary["smollm2_step_ms_per_token"].items():
            print(f"  {k}: " + ", ".join(f"{p} {fmt(v, 3)}" for p, v in parts_.items()))

    if args.network:
        for close in closers:
            close()
        closers = []
        out = Path("/tmp") / f"node_speed_network_{os.getpid()}.json"
        cmd = [sys.executable, str(ROOT / "bench" / "gateway_overhead.py"), "--backend",
               "llamacpp", "--endpoint", "completions", "--max-tokens", "64", "--requests", "8",
               "--rounds", str(args.rounds), "--threads", str(args.threads), "--json", str(out)]
        print("\n" + " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True)
        summary["network"] = json.loads(out.read_text())
        out.unlink()

    summary["targets"] = TARGETS
    summary["seconds"] = round(time.perf_counter() - started, 1)
    for close in closers:
        close()
    reader.close()
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

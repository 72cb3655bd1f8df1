"""The performance model against the node's real engine: measured tokens/s vs predicted.

    .venv/bin/python bench/perfmodel_validate.py                  # or: make bench-perfmodel
    SPARECYCLES_TINY_MODEL=/tmp/tiny2 .venv/bin/python bench/perfmodel_validate.py
    .venv/bin/python bench/perfmodel_validate.py --backend llamacpp [--gguf FILE ...]

Serves two models with the node's TransformersEngine (continuous batching): the tiny model
(``--tiny`` or $SPARECYCLES_TINY_MODEL; without either, a random model of about its size) and a
larger Llama-architecture model with random weights (``--hidden`` x ``--layers``, about 270 M
parameters by default; speed does not depend on the weights' values, so nothing is downloaded).
It measures decode tokens/s at each batch and the time to the first token of one long prompt,
and compares them with perfmodel's predictions for the device profile that the node's profiler
(node/profile.py) measures on this machine: memory bandwidth, FLOP/s, linear layers by rows of
input, the engine's overhead per pass. Nothing in the prediction is fitted to these models.

The machine may be shared, and its speed then moves from one minute to the next (on the 2-vCPU VM
of docs/benchmarks.md, the same copy measured 15 to 52 GB/s within two minutes). So each round
measures the profile and then, at once, the engine, and compares the two side by side; the
verdict is the median over ``--rounds`` rounds of each case's paired error, so that one round
disturbed by other work does not decide it. Every round is printed with the load average.

With ``--backend llamacpp`` the node's ``LlamaCppEngine`` serves GGUF files instead (``--gguf``;
by default the generated 1.2B model in Q4_0 and Q8_0 that bench/node_speed.py writes, where
$SPARECYCLES_BENCH_MODELS or ~/.cache/sparecycles/models holds it, and SmolLM2-135M Q4_1), and
the profile measures llama.cpp as a node that serves those files does
(node/llamacpp_profile.py: each tensor type's read rate by rows, the engine's cost per pass; the
probe models are written once and kept in --probe-dir). The prediction reads the file's own
tensor types (``ModelSpec.bytes_by_type``).

The target: decode predictions within 25% of the measurement.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sparecycles import modelfiles  # noqa: E402
from sparecycles.node import llamacpp_profile  # noqa: E402
from sparecycles.node.backends.base import Engine, GenerationRequest, GenerationUpdate  # noqa: E402
from sparecycles.node.profile import in_a_process_of_its_own, measure_profile  # noqa: E402
from sparecycles.scheduling import perfmodel  # noqa: E402
from sparecycles.types import DeviceProfile, ModelSpec, SamplingParams  # noqa: E402

TARGET = 0.25
BENCH_MODELS = Path(os.environ.get("SPARECYCLES_BENCH_MODELS",
                                   Path.home() / ".cache" / "sparecycles" / "models"))


def build_engine(hidden: int, layers: int, vocab: int, device: str) -> Any:
    """A Llama-architecture model with random weights, fp32 on a CPU, fp16 on a GPU."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from sparecycles.node.backends.transformers import TransformersEngine

    dtype = torch.float32 if device == "cpu" else torch.float16
    heads = max(1, hidden // 64)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 4 // 3 * 2,
        num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4), max_position_embeddings=4096,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None  # never stop early: every request runs to length
    spec = ModelSpec(
        name=f"random-{hidden}x{layers}",
        n_params=sum(p.numel() for p in model.parameters()),
        bytes_per_param=torch.finfo(dtype).bits / 8,
        n_layers=layers, hidden_size=hidden, n_kv_heads=config.num_key_value_heads,
        head_dim=hidden // heads, context_length=4096,
    )  # fmt: skip
    return TransformersEngine(spec.name, model, None, spec, batch_size_max=64)


def load_engine(path: str, device: str) -> Any:
    """A model directory (the tiny model), its end-of-sequence token switched off."""
    import torch
    from transformers import AutoModelForCausalLM

    from sparecycles.node.backends.transformers import TransformersEngine

    dtype = torch.float32 if device == "cpu" else torch.float16
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None
    spec = modelfiles.model_spec("tiny", path, dtype=model.dtype, hash_weights=False)
    return TransformersEngine(spec.name, model, None, spec, batch_size_max=64)


def gguf_engines(paths: list[Path]) -> list[Any]:
    """The node's llama.cpp engine on each GGUF file (its KV cache room for the batches)."""
    from sparecycles.node.backends.llamacpp import LlamaCppEngine

    return [LlamaCppEngine.load(p.stem, p, batch_size_max=64, kv_tokens=8192,
                                prefix_cache=False) for p in paths]


Measured = tuple[ModelSpec, dict[int, float], float]


def measure_engine(engine: Engine, batches: list[int], prompt: int, new: int,
                   prefill: int) -> Measured:
    """(the engine's spec, decode tokens/s by batch, seconds to the first token of a
    ``prefill``-token prompt)."""
    rates = {batch: run_batch(engine, batch, prompt, new)[0] for batch in batches}
    return engine.spec, rates, run_batch(engine, 1, prefill, 2)[1]


def measure_gguf(path: Path, batches: list[int], prompt: int, new: int,
                 prefill: int) -> Measured:
    """``measure_engine`` of one GGUF file, on an engine of its own, warmed up first. Run in a
    process of its own: llama.cpp's OpenMP threads beside another engine's (or torch's) made
    every engine of a shared process decode 2-3x slower (docs/benchmarks.md, "OpenMP"); a node
    serves one."""
    engine = gguf_engines([path])[0]
    try:
        run_batch(engine, 1, prompt, 4)  # warm up
        return measure_engine(engine, batches, prompt, new, prefill)
    finally:
        engine.close()


def default_ggufs() -> list[Path]:
    from sparecycles.tools.smollm2 import smollm2_path

    generated = [BENCH_MODELS / f"random-1b-{k}.gguf" for k in ("q4_0", "q8_0")]
    return [p for p in generated if p.is_file()] + [smollm2_path()]


def run_batch(engine: Engine, batch: int, prompt: int, new: int) -> tuple[float, float]:
    """(decode tokens/s of the whole batch, seconds to the first token) for ``batch`` requests
    submitted together: decode is timed from the last first token to the first finish."""
    vocab = getattr(engine, "vocab_size", None) or engine._vocab_size  # type: ignore[attr-defined]
    stamps: dict[str, list[float]] = {}
    done = threading.Event()
    lock = threading.Lock()
    finished = [0]

    def on_update(u: GenerationUpdate) -> None:
        now = time.perf_counter()
        with lock:
            stamps[u.request_id].extend([now] * len(u.token_ids))
            if u.finished:
                finished[0] += 1
                if finished[0] == batch:
                    done.set()

    start = time.perf_counter()
    for i in range(batch):
        rid = f"b{batch}-{i}-{start}"
        stamps[rid] = []
        ids = tuple((7 * i + j) % (vocab - 10) + 5 for j in range(prompt))
        params = SamplingParams(max_tokens=new, temperature=0.0)
        engine.submit(GenerationRequest(rid, ids, params), on_update)
    done.wait(600)
    first = max(s[0] for s in stamps.values())
    last = min(s[-1] for s in stamps.values())
    tokens = sum(sum(1 for t in s if first < t <= last) for s in stamps.values())
    ttft = statistics.median(s[0] - start for s in stamps.values())
    return tokens / max(1e-9, last - first), ttft


def roofline_only(profile: DeviceProfile) -> DeviceProfile:
    """The same profile without its measured linear layers and engine overhead: what the
    idealised roofline (Calibration defaults) predicts from bandwidth and FLOP/s alone."""
    return replace(profile, matmul_flops_by_rows=(), matmul_bytes_per_param=0.0,
                   llamacpp_read_by_rows=(), llamacpp_overhead=(),
                   llamacpp_narrow_read_by_rows=(), llamacpp_narrow_hidden=0,
                   overhead_step_s=0.0, overhead_layer_s=0.0, overhead_sequence_s=0.0,
                   overhead_sequence_layer_s=0.0, overhead_context_layer_s=0.0)  # fmt: skip


def without_llamacpp(profile: DeviceProfile) -> DeviceProfile:
    """The profile as a node measured it before it timed llama.cpp."""
    return replace(profile, llamacpp_read_by_rows=(), llamacpp_overhead=(),
                   llamacpp_narrow_read_by_rows=(), llamacpp_narrow_hidden=0)


def wide_only(profile: DeviceProfile) -> DeviceProfile:
    """The profile without its narrow probe: every model read at the 2048-wide probe's rates."""
    return replace(profile, llamacpp_narrow_read_by_rows=(), llamacpp_narrow_hidden=0)


def describe(profile: DeviceProfile) -> str:
    rows = ", ".join(f"{r}: {f / 1e9:.0f}" for r, f in profile.matmul_flops_by_rows)
    if profile.llamacpp_read_by_rows:
        reads = ", ".join(f"{t}x{r}: {b / 1e9:.1f}" for t, r, b in profile.llamacpp_read_by_rows)
        narrow = ", ".join(f"{t}x{r}: {b / 1e9:.1f}"
                           for t, r, b in profile.llamacpp_narrow_read_by_rows)
        terms = profile.llamacpp_overhead
        return (f"{profile.memory_bandwidth_bytes_per_s / 1e9:.1f} GB/s copy; llama.cpp reads "
                f"GB/s by type x rows {{{reads}}}, narrow probe "
                f"(hidden {profile.llamacpp_narrow_hidden}) {{{narrow}}}; "
                f"engine ms: step {terms[0] * 1e3:.3f}, "
                f"layer {terms[1] * 1e3:.3f}, sequence {terms[2] * 1e3:.3f}, "
                f"sequence-layer {terms[3] * 1e3:.4f}, context-layer {terms[4] * 1e6:.4f} us")
    return (
        f"{profile.memory_bandwidth_bytes_per_s / 1e9:.1f} GB/s copy, "
        f"{profile.peak_flops / 1e9:.0f} GFLOP/s square matmul; linear GFLOP/s by rows {{{rows}}}; "
        f"overhead ms: step {profile.overhead_step_s * 1e3:.2f}, "
        f"layer {profile.overhead_layer_s * 1e3:.3f}, "
        f"sequence {profile.overhead_sequence_s * 1e3:.3f}, "
        f"sequence-layer {profile.overhead_sequence_layer_s * 1e3:.3f}, "
        f"context-layer {profile.overhead_context_layer_s * 1e6:.4f} us"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tiny", default=os.environ.get("SPARECYCLES_TINY_MODEL"))
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=48)
    parser.add_argument("--prefill", type=int, default=512, help="the long prompt's tokens")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backend", default="transformers", choices=["transformers", "llamacpp"])
    parser.add_argument("--gguf", type=Path, action="append", default=None,
                        help="a GGUF file (llamacpp; repeat for several)")
    parser.add_argument("--probe-dir", type=Path,
                        default=Path("/tmp/sparecycles-llamacpp-probes"),
                        help="where llama.cpp's probe models are written once and kept")
    args = parser.parse_args()
    batches = [int(x) for x in args.batches.split(",")]
    types: tuple[str, ...] | None = None
    paths: list[Path] = []
    if args.backend == "llamacpp":
        paths = args.gguf or default_ggufs()
        types = llamacpp_profile.gguf_types(paths)
        print(f"GGUF files: {', '.join(p.name for p in paths)}; tensor types {types}")
        engines = []  # each file is measured in a process of its own, round by round
    else:
        engines = [
            load_engine(args.tiny, args.device) if args.tiny
            else build_engine(128, 4, 2816, args.device),  # the tiny model's shape
            build_engine(args.hidden, args.layers, 4096, args.device),
        ]  # fmt: skip
    for engine in engines:
        run_batch(engine, 1, args.prompt, 4)  # warm up
    context = args.prompt + args.new // 2  # the mean context while decoding
    # (model, batch) -> [(predicted, measured, roofline only)] per round; batch 0: the prefill
    pairs: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    # the last column: for transformers the idealised roofline; for llama.cpp the prediction
    # without the llama.cpp measurements (what perfmodel said before it had them: the copy's
    # bandwidth x 0.74, the transformers engine's overhead)
    other = roofline_only if args.backend == "transformers" else without_llamacpp
    other_name = "roofline only" if args.backend == "transformers" else "without llama.cpp's"
    loads = []
    for round_ in range(args.rounds):
        loads.append(os.getloadavg()[0])
        # in a process of its own, as a node measures before it loads a model: the engines
        # loaded here keep llama.cpp's (and torch's) threads, whose spinning after each pass
        # made the micro model's layers time 20-30x slower (0.38 ms a layer, not 0.014)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            profile = pool.submit(measure_profile, device=args.device, llamacpp_types=types,
                                  llamacpp_keep=args.probe_dir).result()
        print(f"round {round_ + 1} (load {loads[-1]:.1f}): {describe(profile)}", flush=True)
        sizes = {"batches": batches, "prompt": args.prompt, "new": args.new,
                 "prefill": args.prefill}
        measured = ([in_a_process_of_its_own(measure_gguf, path=p, **sizes) for p in paths]
                    + [measure_engine(e, **sizes) for e in engines])
        specs = [spec for spec, _, _ in measured]
        for spec, rates, ttft in measured:
            for batch in batches:
                rate = rates[batch]
                predicted = perfmodel.decode_tokens_per_s(spec, profile, batch, context)
                pure = perfmodel.decode_tokens_per_s(spec, other(profile), batch, context)
                wide = perfmodel.decode_tokens_per_s(spec, wide_only(profile), batch, context)
                pairs.setdefault((spec.name, batch), []).append((predicted, rate, pure, wide))
                bound = perfmodel.bound(spec, profile, batch, context)
                print(f"  {spec.name} batch {batch}: measured {rate:.1f} tok/s, predicted "
                      f"{predicted:.1f} ({predicted / rate - 1:+.0%}), {bound}-bound",
                      flush=True)  # fmt: skip
            predicted = perfmodel.prefill_s(spec, profile, args.prefill)
            pure = perfmodel.prefill_s(spec, other(profile), args.prefill)
            wide = perfmodel.prefill_s(spec, wide_only(profile), args.prefill)
            pairs.setdefault((spec.name, 0), []).append((predicted, ttft, pure, wide))
            print(f"  {spec.name} prefill {args.prefill}: measured {ttft:.3f} s, predicted "
                  f"{predicted:.3f} ({predicted / ttft - 1:+.0%})", flush=True)  # fmt: skip
    now = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nload average over the rounds: {min(loads):.1f} to {max(loads):.1f}; "
          f"at the end (1, 5, 15 min): {now}")  # fmt: skip
    print("medians over the rounds; error = median of the rounds' paired errors (range)\n")
    print(f"| model | params | batch | predicted | measured | error (range) | {other_name} "
          "| wide probe only |")
    print("|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for spec in specs:
        for batch in [*batches, 0]:
            rounds = pairs[spec.name, batch]
            errors = [p / m - 1.0 for p, m, _, _ in rounds]
            error = statistics.median(errors)
            spread = f"{min(errors):+.0%} to {max(errors):+.0%}"
            pure_error = statistics.median(r / m - 1.0 for _, m, r, _ in rounds)
            wide_error = statistics.median(w / m - 1.0 for _, m, _, w in rounds)
            predicted = statistics.median(p for p, _, _, _ in rounds)
            measured = statistics.median(m for _, m, _, _ in rounds)
            if batch:
                worst = max(worst, abs(error))
                what, unit, digits = str(batch), "tok/s", 1
            else:
                what, unit, digits = f"prefill {args.prefill}", "s", 3
            print(f"| {spec.name} | {spec.n_params / 1e6:.1f} M | {what} | "
                  f"{predicted:.{digits}f} {unit} | {measured:.{digits}f} {unit} | "
                  f"{error:+.0%} ({spread}) | {pure_error:+.0%} | {wide_error:+.0%} |")  # fmt: skip
    for engine in engines:
        engine.close()
    verdict = "PASS" if worst <= TARGET else "FAIL"
    print(f"\nworst decode error {worst:.0%}: {verdict} (target {TARGET:.0%})")


if __name__ == "__main__":
    main()

"""The performance model against the node's real engine: measured tokens/s vs predicted.

    .venv/bin/python bench/perfmodel_validate.py                 # this machine, CPU
    .venv/bin/python bench/perfmodel_validate.py --device cuda --hidden 2048 --layers 24

Builds a Llama-architecture model with random weights (speed does not depend on their values;
no download needed), serves it with the node's TransformersEngine (continuous batching), and
measures decode tokens/s at several batch sizes and the prefill time of one prompt. It compares
them with perfmodel's predictions for this device's *measured* profile (node/profile.py):

- "roofline": the pure model (Calibration defaults: 74% of bandwidth, 50% of FLOP/s);
- "+ overhead": the same plus the engine's fixed cost per step (Calibration.step_overhead_s),
  measured at each batch on a model with the same layers but a hidden size of 64, whose weights
  take no time to read: Python, kernel launches and sampling, not the roofline.

Each measurement is the best of three (on a shared machine other work only slows a run down).

The target: the calibrated prediction within 25% of the measurement.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from sparecycles import perfmodel  # noqa: E402
from sparecycles.node.backends.base import GenerationRequest, GenerationUpdate  # noqa: E402
from sparecycles.node.backends.transformers import TransformersEngine  # noqa: E402
from sparecycles.node.profile import profile_device  # noqa: E402
from sparecycles.types import ModelSpec, SamplingParams  # noqa: E402

VOCAB = 4096
REPEATS = 3


def build_engine(hidden: int, layers: int, device: str, dtype: torch.dtype) -> TransformersEngine:
    heads = max(1, hidden // 64)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 4 // 3 * 2,
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


def run_batch(engine: TransformersEngine, batch: int, prompt: int, new: int) -> tuple[float, float]:
    """(decode tokens/s of the whole batch, seconds to the first token) for ``batch`` requests
    submitted together: decode is timed from the last first token to the first finish."""
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
        ids = tuple((7 * i + j) % (VOCAB - 10) + 5 for j in range(prompt))
        params = SamplingParams(max_tokens=new, temperature=0.0)
        engine.submit(GenerationRequest(rid, ids, params), on_update)
    done.wait(600)
    first = max(s[0] for s in stamps.values())
    last = min(s[-1] for s in stamps.values())
    tokens = sum(sum(1 for t in s if first < t <= last) for s in stamps.values())
    ttft = statistics.median(s[0] - start for s in stamps.values())
    return tokens / max(1e-9, last - first), ttft


def best_rate(engine: TransformersEngine, batch: int, prompt: int, new: int) -> float:
    """The best of ``repeats`` decode measurements: other work on a shared machine only ever
    slows a run down, so the fastest is the least disturbed."""
    return max(run_batch(engine, batch, prompt, new)[0] for _ in range(REPEATS))


def step_overhead(layers: int, batches: list[int], prompt: int, new: int, device: str,
                  dtype: torch.dtype) -> dict[int, float]:  # fmt: skip
    """The engine's fixed cost per decode step at each batch: the step time of a model with
    the same layers but a hidden size of 64, whose weights and KV cache take no time to read."""
    engine = build_engine(64, layers, device, dtype)
    run_batch(engine, 1, 16, 8)  # warm up
    out = {b: b / best_rate(engine, b, prompt, new) for b in batches}
    engine.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=48)
    parser.add_argument("--batches", default="1,2,4,8")
    args = parser.parse_args()
    dtype = torch.float32 if args.device == "cpu" else torch.float16
    # the best of three profiles, for the same reason as the measurements below
    runs = [profile_device(None, device=args.device, refresh=True) for _ in range(REPEATS)]
    profile = replace(
        runs[0],
        memory_bandwidth_bytes_per_s=max(p.memory_bandwidth_bytes_per_s for p in runs),
        peak_flops=max(p.peak_flops for p in runs),
    )
    print(f"profile: {profile.memory_bandwidth_bytes_per_s / 1e9:.1f} GB/s, "
          f"{profile.peak_flops / 1e12:.2f} TFLOP/s, {profile.accelerator or 'CPU'}")  # fmt: skip
    batches = [int(x) for x in args.batches.split(",")]
    overhead = step_overhead(args.layers, batches, args.prompt, args.new, args.device, dtype)
    print("engine overhead per step (ms, by batch): "
          + ", ".join(f"{b}: {v * 1e3:.1f}" for b, v in overhead.items()))  # fmt: skip
    engine = build_engine(args.hidden, args.layers, args.device, dtype)
    spec = engine.spec
    print(f"model: {spec.n_params / 1e6:.0f} M params, {spec.weight_bytes / 1e9:.2f} GB")
    run_batch(engine, 1, args.prompt, 4)  # warm up
    context = args.prompt + args.new // 2
    worst = 0.0
    print("| batch | measured tok/s | roofline tok/s | + overhead tok/s | error | bound |")
    print("|---|---|---|---|---|---|")
    for batch in batches:
        measured = best_rate(engine, batch, args.prompt, args.new)
        calibrated = replace(perfmodel.DEFAULT_CALIBRATION, step_overhead_s=overhead[batch])
        pure = perfmodel.decode_tokens_per_s(spec, profile, batch, context)
        cal = perfmodel.decode_tokens_per_s(spec, profile, batch, context, calibrated)
        error = cal / measured - 1.0
        worst = max(worst, abs(error))
        bound = perfmodel.bound(spec, profile, batch, context)
        print(f"| {batch} | {measured:.1f} | {pure:.1f} | {cal:.1f} | {error:+.0%} | {bound} |")
    ttft = min(run_batch(engine, 1, 4 * args.prompt, 2)[1] for _ in range(REPEATS))
    calibrated = replace(perfmodel.DEFAULT_CALIBRATION, step_overhead_s=overhead[batches[0]])
    predicted = perfmodel.prefill_s(spec, profile, 4 * args.prompt, 0, calibrated)
    print(f"prefill of {4 * args.prompt} tokens: measured {ttft:.3f} s (time to first token), "
          f"predicted {predicted:.3f} s ({predicted / ttft - 1:+.0%})")  # fmt: skip
    engine.close()
    print(f"worst decode error {worst:.0%}: {'PASS' if worst <= 0.25 else 'FAIL'} (target 25%)")


if __name__ == "__main__":
    main()

"""The performance model against the node's real engine: measured tokens/s vs predicted.

    .venv/bin/python bench/perfmodel_validate.py                 # this machine, CPU
    .venv/bin/python bench/perfmodel_validate.py --device cuda --hidden 2048 --layers 24

Builds a Llama-architecture model with random weights (speed does not depend on their values;
no download needed), serves it with the node's TransformersEngine (continuous batching), and
measures decode tokens/s at several batch sizes and the prefill time of one prompt. It compares
them with perfmodel's predictions for this device's *measured* profile (node/profile.py):

- "roofline": the pure model (Calibration defaults: 74% of bandwidth, 50% of FLOP/s);
- "+ overhead": the same plus the engine's fixed cost per step, measured on two tiny models (2 and
  8 layers, whose weights take no time to read) and fitted as a + b * layers.

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


def step_overhead(device: str, dtype: torch.dtype) -> tuple[float, float]:
    """(a, b) of the engine's fixed cost per decode step, a + b * layers, from tiny models."""
    points = []
    for layers in (2, 8):
        engine = build_engine(64, layers, device, dtype)
        run_batch(engine, 1, 16, 8)  # warm up
        tokens_per_s, _ = run_batch(engine, 1, 16, 64)
        points.append((layers, 1.0 / tokens_per_s))
        engine.close()
    (l1, s1), (l2, s2) = points
    per_layer = max(0.0, (s2 - s1) / (l2 - l1))
    return max(0.0, s1 - per_layer * l1), per_layer


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
    profile = profile_device(None, device=args.device, refresh=True)
    print(f"profile: {profile.memory_bandwidth_bytes_per_s / 1e9:.1f} GB/s, "
          f"{profile.peak_flops / 1e12:.2f} TFLOP/s, {profile.accelerator or 'CPU'}")  # fmt: skip
    a, b = step_overhead(args.device, dtype)
    overhead = a + b * args.layers
    print(f"engine overhead per step: {a * 1e3:.2f} ms + {b * 1e3:.3f} ms/layer "
          f"= {overhead * 1e3:.2f} ms at {args.layers} layers")  # fmt: skip
    engine = build_engine(args.hidden, args.layers, args.device, dtype)
    spec = engine.spec
    print(f"model: {spec.n_params / 1e6:.0f} M params, {spec.weight_bytes / 1e9:.2f} GB")
    calibrated = replace(perfmodel.DEFAULT_CALIBRATION, step_overhead_s=overhead)
    run_batch(engine, 1, args.prompt, 4)  # warm up
    context = args.prompt + args.new // 2
    worst = 0.0
    print("| batch | measured tok/s | roofline tok/s | + overhead tok/s | error |")
    print("|---|---|---|---|---|")
    for batch in (int(x) for x in args.batches.split(",")):
        measured, _ = run_batch(engine, batch, args.prompt, args.new)
        pure = perfmodel.decode_tokens_per_s(spec, profile, batch, context)
        cal = perfmodel.decode_tokens_per_s(spec, profile, batch, context, calibrated)
        error = cal / measured - 1.0
        worst = max(worst, abs(error))
        print(f"| {batch} | {measured:.1f} | {pure:.1f} | {cal:.1f} | {error:+.0%} |")
    _, ttft = run_batch(engine, 1, 4 * args.prompt, 2)
    predicted = perfmodel.prefill_s(spec, profile, 4 * args.prompt, 0, calibrated)
    print(f"prefill of {4 * args.prompt} tokens: measured {ttft:.3f} s (time to first token), "
          f"predicted {predicted:.3f} s ({predicted / ttft - 1:+.0%})")  # fmt: skip
    engine.close()
    print(f"worst decode error {worst:.0%}: {'PASS' if worst <= 0.25 else 'FAIL'} (target 25%)")


if __name__ == "__main__":
    main()

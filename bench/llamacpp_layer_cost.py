"""What one layer of a given width costs llama.cpp at one row, measured as a difference.

For each shape, writes two random Llama models (``node/backends/ggufwrite.py``: byte vocabulary,
every matrix in one type) that differ only in depth (4 and 16 layers), times a decode step of each
(one greedy sequence, the node profiler's ``engine_step_s``, best of 4), and prints the time of one
layer (the difference over 12 layers: the step's fixed costs and the output head cancel) and the
layer's matrix bytes over it. It checks the node profiler's probes (node/llamacpp_profile.py),
whose rates come from one model's whole step less a separately measured overhead.

    PYTHONPATH=src python bench/llamacpp_layer_cost.py [--type q4_1] [--work /tmp/llamacpp-layers]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from sparecycles.node import llamacpp_profile as lp
from sparecycles.node import overhead as oh
from sparecycles.node.backends import ggufwrite

# (name, hidden, heads, kv heads, FFN): the narrow probe's width, SmolLM2-135M's, and two more
shapes = [("narrow probe", 512, 8, 4, 1408), ("SmolLM2-135M", 576, 9, 3, 1536),
          ("640", 640, 10, 5, 1792), ("1024", 1024, 16, 4, 2816)]
bytes_per_weight = {"q4_0": 18 / 32, "q4_1": 20 / 32, "q8_0": 34 / 32, "f16": 2.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--type", default="q4_1", choices=sorted(bytes_per_weight))
    ap.add_argument("--work", type=Path, default=Path("/tmp/llamacpp-layers"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"{args.type}, one row, load average {os.getloadavg()[0]:.1f}")
    for name, hidden, heads, kv_heads, ffn in shapes:
        step_s = {}
        for depth in (4, 16):
            shape = ggufwrite.LlamaShape(hidden=hidden, layers=depth, ffn=ffn, heads=heads,
                                         kv_heads=kv_heads, context_length=4096)
            path = lp._write(args.work / f"h{hidden}-{depth}-{args.type}.gguf", shape, args.type,
                             args.work)
            engine = lp._engine(path, 8, None)
            try:
                oh.engine_step_s(engine, 1, 16, 4)  # warm up
                step_s[depth] = min(oh.engine_step_s(engine, 1, 16, 24) for _ in range(4))
            finally:
                engine.close()
        layer_s = (step_s[16] - step_s[4]) / 12
        head_dim = hidden // heads
        weights = 2 * hidden * hidden + 2 * hidden * head_dim * kv_heads + 3 * hidden * ffn
        nbytes = weights * bytes_per_weight[args.type]
        print(f"  {name:>14} (hidden {hidden}): {layer_s * 1e3:.3f} ms a layer, "
              f"{nbytes / 1e6:.2f} MB of matrices -> {nbytes / layer_s / 1e9:.1f} GB/s")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

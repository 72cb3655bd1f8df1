"""Stage re-checks: how far an honest stage's hidden states are from a re-run of its inputs, and
how far a cheating or lower-precision stage's are (``trust/chains.StageTolerance``).

For the tiny and the ~290M model, split in two stages, float32 on the CPU: a greedy decode of
``--tokens`` tokens after a ``--prompt``-token prompt, sent as a chain sends it (the prompt in one
message, then one position a step); the first stage's hidden states are then compared with a
re-run of the same inputs in one message on another engine (what a spot check does), and with the
same inputs through a bfloat16 copy of the stage, and the two stage cheats. Also the time of the
first stage's serving steps against its re-check's one pass. Run:

    PYTHONPATH=src python bench/chain_check.py [--models tiny,medium]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fixtures_models import cached_model
from sparecycles.coordinator.verification_chains import activation_diff
from sparecycles.node.backends.transformers_stage import StageEngine
from sparecycles.node.cheats import CheatingStage
from sparecycles.node.stage_worker import to_activation
from sparecycles.trust.chains import FP32_STAGE_TOLERANCE
from sparecycles.types import SamplingParams


def measure(name: str, prompt_n: int, tokens_n: int) -> None:
    path = cached_model(name, 0)
    n_layers = StageEngine.load(name, path, first=0, end=1, device="cpu").spec.n_layers
    half = n_layers // 2

    def load(dtype: torch.dtype = torch.float32) -> StageEngine:
        return StageEngine.load(name, path, first=0, end=half, device="cpu", dtype=dtype)

    first, last = load(), StageEngine.load(name, path, first=half, device="cpu")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(5, 2000, (prompt_n,), generator=g).tolist()
    greedy = SamplingParams(max_tokens=tokens_n, temperature=0)
    inp, pos, outs, tokens, served_s = list(prompt), 0, [], [], 0.0
    for _ in range(tokens_n):
        t0 = time.perf_counter()
        r = first.forward("s", pos, token_ids=inp)
        served_s += time.perf_counter() - t0
        outs.append(r.hidden)
        t = last.forward("s", pos, hidden=r.hidden, choose=greedy)
        pos += len(inp)
        tokens.append(t.token)
        inp = [t.token]
    inputs = prompt + tokens[:-1]
    stage = [to_activation(h) for h in outs]
    other = load()
    t0 = time.perf_counter()
    rerun = [to_activation(other.forward("r", 0, token_ids=inputs).hidden)]
    check_s = time.perf_counter() - t0
    rows = {"honest fp32 (chunked vs one message)": stage}
    rows["bfloat16 copy of the stage"] = [to_activation(
        load(torch.bfloat16).forward("b", 0, token_ids=inputs).hidden.float())]
    for mode in ("stage-noise", "stage-skip"):
        rows[mode] = [to_activation(CheatingStage(load(), mode).forward(
            "c", 0, token_ids=inputs).hidden)]
    print(f"\n{name}: {n_layers} layers, stage 0:{half}, {len(inputs)} positions "
          f"({prompt_n} prompt + {tokens_n - 1} decoded); tolerance "
          f"{FP32_STAGE_TOLERANCE.row_rel_max:g}")
    for what, acts in rows.items():
        d = activation_diff(acts, rerun)
        print(f"  {what:38s} worst position {d.row_rel_max:10.3g}  mean {d.row_rel_mean:10.3g}")
    print(f"  serving the stage: {served_s:.3f} s; its re-check (one pass): {check_s:.3f} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny,medium")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"load: {os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} cores, torch "
          f"{torch.__version__}, 1 thread")
    for name in args.models.split(","):
        measure(name, args.prompt, args.tokens)


if __name__ == "__main__":
    main()

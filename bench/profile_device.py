"""What node/profile.py measures on this machine, and whether it is plausible.

The unit tests check the profiler's arithmetic with its clock replaced (tests/unit/test_profile.py);
the speeds themselves are measured here, where a busy machine makes a slow number, not a failed
test. Prints memory bandwidth, square-matmul FLOP/s, linear layers by rows and the engine's own
overhead per pass; exits 1 when a number falls outside broad bounds for any CPU made this decade.

    PYTHONPATH=src .venv/bin/python bench/profile_device.py [--budget-s 0.2]
"""

from __future__ import annotations

import argparse
import os
import sys

from sparecycles.node import overhead
from sparecycles.node import profile as prof

# (low, high): a phone-class core to a server's socket, with room on both sides
BANDWIDTH_BYTES_PER_S = (1e8, 1e13)
FLOPS = (1e8, 1e15)
LINEAR_FLOPS = (1e7, 1e15)
OVERHEAD_PER_PASS_S = (1e-5, 1.0)  # 8 layers, 1 sequence, 100 tokens of context


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget-s", type=float, default=0.2, help="time for each measurement")
    args = parser.parse_args()
    b = args.budget_s
    checks: list[tuple[str, float, tuple[float, float]]] = [
        ("memory bandwidth (B/s)", prof.measure_cpu_bandwidth(b, nbytes=32 << 20),
         BANDWIDTH_BYTES_PER_S),
        ("fp32 matmul 256 (FLOP/s)", prof.measure_cpu_flops(b, n=256), FLOPS),
    ]
    for rows, flops in prof.measure_cpu_matmul_rows(b, rows=(1, 8), n=128, stack_bytes=1 << 20):
        checks.append((f"linear layers, {rows} rows (FLOP/s)", flops, LINEAR_FLOPS))
    step, layer, seq, seq_layer, ctx_layer = overhead.measure_engine_overhead(b / 2)
    per_pass_s = step + 8 * layer + seq + 8 * (seq_layer + 100 * ctx_layer)
    checks.append(("engine overhead per pass (s)", per_pass_s, OVERHEAD_PER_PASS_S))
    print(f"load average {os.getloadavg()[0]:.2f} on {prof.cpu_cores()} cores")
    bad = 0
    for name, value, (low, high) in checks:
        ok = low < value < high
        bad += not ok
        print(f"{name:36s} {value:12.4g}  {'ok' if ok else f'OUTSIDE ({low:g}, {high:g})'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

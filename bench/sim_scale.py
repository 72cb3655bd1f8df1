"""How the simulator (and the production scheduler inside it) scales with nodes and requests.

    .venv/bin/python bench/sim_scale.py                      # 100,000 nodes, 1,000,000 requests
    .venv/bin/python bench/sim_scale.py --nodes 10000 --requests 100000
    .venv/bin/python bench/sim_scale.py --sweep              # the grid in docs/benchmarks.md

The fleet is examples/fleets/mixed.toml scaled to --nodes (the mix kept); the trace is the Azure
conv trace scaled to --requests by superposing shifted copies over its hour (so the arrival
rate grows with --requests). Each point runs in a fresh process, so peak memory is its own.
Prints one line per point: setup and run seconds, peak RSS, events, scheduler calls, SLO.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWEEP = [(10_000, 100_000), (100_000, 100_000), (10_000, 1_000_000), (100_000, 1_000_000)]


def one_point(nodes: int, requests: int, policy: str, seed: int) -> dict[str, float]:
    sys.path.insert(0, str(ROOT / "src"))
    from sparecycles.sim import load_fleet, load_trace, scaled, summarize
    from sparecycles.sim.loop import SimConfig, Simulation

    t0 = time.perf_counter()
    trace = scaled(load_trace("conv"), requests, seed)
    fleet = load_fleet(ROOT / "examples" / "fleets" / "mixed.toml").scaled(nodes)
    sim = Simulation(trace, fleet, SimConfig(policy=policy, seed=seed))
    t1 = time.perf_counter()
    result = sim.run()
    t2 = time.perf_counter()
    s = summarize(result)
    return {
        "nodes": fleet.node_count,
        "requests": requests,
        "setup_s": round(t1 - t0, 1),
        "run_s": round(t2 - t1, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "events": result.events,
        "scheduler_calls": result.scheduler_calls,
        "slo_attainment": round(s.slo_attainment, 4),
        "ttft_p99_s": round(s.ttft_p[2], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--policy", default="fastest")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--sweep", action="store_true", help="run the grid, one process each")
    parser.add_argument("--json", action="store_true", help="print one JSON line per point")
    args = parser.parse_args()
    if not args.sweep:
        point = one_point(args.nodes, args.requests, args.policy, args.seed)
        print(json.dumps(point) if args.json else point, flush=True)
        return
    for nodes, requests in SWEEP:
        cmd = [sys.executable, __file__, "--nodes", str(nodes), "--requests", str(requests),
               "--policy", args.policy, "--seed", str(args.seed), "--json"]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        print(out.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()

"""Scheduling policies compared on the same trace and fleet: ours against the baselines.

    .venv/bin/python bench/sim_policies.py            # both scenarios, markdown on stdout
    .venv/bin/python bench/sim_policies.py --quick    # a tenth of the requests

Scenarios (each policy sees the same arrivals, departures and node speeds: they come from the
seed, not from the policy):

1. "mixed": examples/fleets/mixed.toml (570 nodes: gaming PCs, laptops, parked cars, two A100s,
   four time zones; FTA Weibull churn, owners' windows, parked-car stays) under the Azure conv
   trace at twice its rate (38,732 requests over an hour);
2. "churny": examples/fleets/churny.toml (65 nodes whose stays last ~20 minutes, cars leaving on
   schedule, one A100) under the conv trace as it is (19,366 requests).

Uses the Azure LLM inference trace (Azure Public Dataset; Patel et al., "Splitwise", ISCA 2024;
CC-BY-4.0) and the Failure Trace Archive's availability fits (Javadi et al., JPDC 2013).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sparecycles.sim import SimConfig, load_fleet, load_trace, scaled, simulate, summarize  # noqa: E402
from sparecycles.sim.report import markdown  # noqa: E402

POLICIES = ["fastest", "fastest+hedge", "random", "round-robin", "least-loaded",
            "cheapest-within-deadline"]  # fmt: skip
SCENARIOS = {"mixed": ("mixed.toml", 2 * 19_366), "churny": ("churny.toml", 19_366)}


def run(scenario: str, fraction: float, seed: int) -> str:
    fleet_file, requests = SCENARIOS[scenario]
    fleet = load_fleet(ROOT / "examples" / "fleets" / fleet_file)
    trace = scaled(load_trace("conv"), max(1, int(requests * fraction)), seed)
    summaries = []
    for policy in POLICIES:
        t0 = time.perf_counter()
        summaries.append(summarize(simulate(trace, fleet, SimConfig(policy=policy, seed=seed))))
        print(f"  {scenario}/{policy}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    head = (f"**{scenario}**: {fleet.node_count} nodes, {len(trace):,} requests over "
            f"{trace.duration_s / 60:.0f} min, seed {seed}\n\n")  # fmt: skip
    return head + markdown(summaries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the requests")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), action="append")
    args = parser.parse_args()
    for scenario in args.scenario or list(SCENARIOS):
        print(run(scenario, 0.1 if args.quick else 1.0, args.seed), flush=True)


if __name__ == "__main__":
    main()

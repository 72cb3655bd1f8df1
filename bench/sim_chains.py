"""Chains in the simulator: a 70B model over consumer devices, three policies on the same seeds.

    .venv/bin/python bench/sim_chains.py                      # the table in docs/benchmarks.md
    .venv/bin/python bench/sim_chains.py --seeds 3 --minutes 10
    .venv/bin/python bench/sim_chains.py --churn churny --rate 0.05

Fleet: examples/fleets/consumer16.toml (Llama 3 70B in Q4_0, ~40 GB, over 32 RTX 3060 12 GB
gaming PCs holding 20 layers each and 24 M2 laptops holding 10: no node holds the model, every
request runs on a chain). Workload: the first ``--minutes`` of the Azure conv trace (Azure
Public Dataset; Patel et al., "Splitwise", ISCA 2024; CC-BY-4.0), thinned to ``--rate`` of its
requests (a 70B chain serves a few requests a second where the trace sends 5.5).

Churn:
- **steady**: the fleet file's, Failure Trace Archive Weibull fits (Javadi et al., JPDC 2013;
  ../shared/data/README.md): Skype06 for the PCs, Nd07cpu for the laptops; hours-long stays;
- **churny**: home machines that come and go (examples/fleets/churny.toml's): up Weibull(0.5,
  20 min), down Weibull(0.6, 15 min): most stays short, a few long, the case a stay model is for.

Policies (sim/chains.py): ``fastest`` (ours: the production planner, scheduling/chains.py, with
the nodes' learned expected stays weighed in), ``fixed-chain`` (one chain chosen at the first
request, a lost stage replaced only by a node of the same layers), ``petals`` (Petals' client
routing: least latency by servers' throughput and round trip, no departure prediction), and an
ablation: ours blind to stays (``SimConfig.stays = "none"``: every node up expected to stay for
ever), which leaves the job-time planning and takes the departure prediction away.
Each cell is the mean over the seeds (each seed: its own fleet speeds, availability and thinning;
the same for the three policies).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tomllib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sparecycles.sim import SimConfig, load_trace, parse_fleet, simulate, summarize  # noqa: E402
from sparecycles.sim.policies import CHAIN_POLICIES  # noqa: E402
from sparecycles.sim.report import Summary  # noqa: E402
from sparecycles.sim.trace import Trace, head, thinned  # noqa: E402

CHURN = {
    "steady": None,  # the fleet file's own
    "churny": {"up_shape": 0.5, "up_scale_h": 0.33, "down_shape": 0.6, "down_scale_h": 0.25},
}


def fleet_for(churn: str):  # type: ignore[no-untyped-def]
    data = tomllib.loads((ROOT / "examples" / "fleets" / "consumer16.toml").read_text())
    change = CHURN[churn]
    if change is not None:
        for c in data["class"]:
            c["availability"].pop("up", None)
            c["availability"].pop("down", None)
            c["availability"].update(change)
    return parse_fleet(data)


def trace_for(minutes: float, rate: float, seed: int) -> Trace:
    whole = load_trace("conv")
    n = int(np.searchsorted(whole.arrival_s, minutes * 60.0))
    return thinned(head(whole, max(1, n)), rate, seed)


BLIND = "fastest, blind to stays"  # ablation: ours with every node expected to stay for ever
RUNS = {**{p: {"policy": p} for p in CHAIN_POLICIES}, BLIND: {"policy": "fastest",
                                                              "stays": "none"}}


def run(churn: str, minutes: float, rate: float, seeds: int) -> dict[str, list[Summary]]:
    fleet = fleet_for(churn)
    out: dict[str, list[Summary]] = {p: [] for p in RUNS}
    for seed in range(1, seeds + 1):
        trace = trace_for(minutes, rate, seed)
        for policy, settings in RUNS.items():
            t0 = time.perf_counter()
            config = SimConfig(seed=seed, **settings)  # type: ignore[arg-type]
            out[policy].append(summarize(simulate(trace, fleet, config)))
            print(f"  {churn} x{rate:g} seed {seed} {policy}: {len(trace)} requests, "
                  f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return out


HEADER = ("| churn | policy | SLO met | goodput req/s | goodput tok/s | TTFT p50 / p99 s | "
          "failed | stage losses | repairs | repairs failed | ours ÷ policy (goodput) |")
RULE = "|---|---|---|---|---|---|---|---|---|---|---|"


def rows(name: str, by_policy: dict[str, list[Summary]]) -> list[str]:
    def mean(p: str, f) -> float:  # type: ignore[no-untyped-def]
        return float(np.mean([f(s) for s in by_policy[p]]))

    ours = mean("fastest", lambda s: s.goodput_rps)
    out = []
    for p, runs in by_policy.items():
        good = mean(p, lambda s: s.goodput_rps)
        ratio = "" if p == "fastest" else (f"x{ours / good:.2f}" if good > 0 else "inf")
        out.append(
            f"| {name} | {p} | {mean(p, lambda s: s.slo_attainment):.1%} | {good:.4f} | "
            f"{mean(p, lambda s: s.goodput_tokens_per_s):.1f} | "
            f"{mean(p, lambda s: s.ttft_p[0]):.1f} / {mean(p, lambda s: s.ttft_p[2]):.0f} | "
            f"{sum(s.failed for s in runs)} / {sum(s.requests for s in runs)} | "
            f"{sum(s.chain_stage_losses for s in runs)} | {sum(s.chain_repairs for s in runs)} | "
            f"{sum(s.chain_repairs_failed for s in runs)} | {ratio} |"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--rate", type=float, action="append",
                        help="share of the trace's requests kept (repeatable; "
                             "default 0.025 and 0.05)")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--churn", choices=sorted(CHURN), action="append")
    args = parser.parse_args()
    t0 = time.perf_counter()
    print(HEADER)
    print(RULE)
    for rate in args.rate or [0.025, 0.05]:
        for churn in args.churn or ["steady", "churny"]:
            by_policy = run(churn, args.minutes, rate, args.seeds)
            print("\n".join(rows(f"{churn} x{rate:g}", by_policy)), flush=True)
    print(f"\n{time.perf_counter() - t0:.0f} s wall, load average {os.getloadavg()[0]:.1f}",
          file=sys.stderr)


if __name__ == "__main__":
    main()

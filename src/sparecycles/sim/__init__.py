"""The discrete-event simulator: a workload trace against a fleet, driving the production
scheduler (scheduler.schedule) and ledger rules (ledger/pricing.py) with a simulated clock.

- trace.py: the Azure LLM traces, scaled by superposition
- fleet_file.py: the fleet file (TOML): device classes, counts, models, availability
- churn.py: availability realised as intervals (FTA Weibull fits, time windows, parked cars)
- node.py: a node's engine (continuous batching, prefill first)
- policies.py: the policies compared and the candidate nodes offered for each
- loop.py: the event loop
- chains.py: chains on fleets of layer ranges (a model no node holds), their repair, and the
  chain policies (ours, a fixed chain, Petals' rule)
- report.py: goodput, latency percentiles, SLO attainment, utilization, earnings, cost
"""

from sparecycles.sim.fleet_file import FleetSpec, load_fleet, parse_fleet
from sparecycles.sim.loop import SimConfig, SimResult
from sparecycles.sim.report import Summary, summarize
from sparecycles.sim.run import simulate
from sparecycles.sim.trace import Trace, load_trace, scaled

__all__ = [
    "FleetSpec",
    "SimConfig",
    "SimResult",
    "Summary",
    "Trace",
    "load_fleet",
    "load_trace",
    "parse_fleet",
    "scaled",
    "simulate",
    "summarize",
]

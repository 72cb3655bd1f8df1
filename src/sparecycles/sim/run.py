"""Which simulation a run needs: chains (sim/chains.py) for a fleet of layer ranges, else the
whole-model loop (sim/loop.py). Kept apart from both, as chains build on the loop."""

from __future__ import annotations

from collections.abc import Callable

from sparecycles.sim.chains import ChainSimulation
from sparecycles.sim.fleet_file import FleetSpec
from sparecycles.sim.loop import SimConfig, SimResult, Simulation
from sparecycles.sim.policies import CHAIN_BASELINES
from sparecycles.sim.trace import Trace


def simulate(
    trace: Trace,
    fleet: FleetSpec,
    config: SimConfig,
    progress: Callable[[int, int], None] | None = None,
) -> SimResult:
    """Run ``trace`` against ``fleet``: a fleet whose nodes hold layer ranges runs chains
    (sim/chains.py, the chain policies), any other the whole-model loop (sim/loop.py)."""
    if fleet.chained:
        return ChainSimulation(trace, fleet, config, progress).run()
    if config.policy in CHAIN_BASELINES:
        raise ValueError(f"policy {config.policy!r} is for fleets of layer ranges (chains)")
    return Simulation(trace, fleet, config, progress).run()

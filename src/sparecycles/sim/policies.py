"""The policies compared, and which nodes the simulator offers the scheduler for each.

Every policy is ``scheduler.schedule`` with a different ``SchedulerConfig``; the simulator never
places a job itself. What it does decide is which node snapshots to pass in: with a few hundred
nodes, all that accept work (the scheduler filters the rest itself); with 100,000 nodes, building
and scanning every snapshot per call would dominate, so it passes a bounded set that contains what
the policy would pick from the whole fleet:

- ``fastest``, ``cheapest-within-deadline`` (ours): per device class, the least-loaded nodes
  (enough for every waiting job plus ``extra_per_class``); within a class of one profile, the
  least-loaded nodes are the fastest ones, up to the measured speed and the stay. This bounds
  only our own policy's view (it can only make ours worse);
- the baselines (``random``, ``round-robin``, ``least-loaded``): every accepting node with a free
  slot, i.e. every node the policy could pick: a baseline never places on a full node, so the
  answer is the one it gives on the whole fleet (tests/unit/test_sim.py compares the two on
  random states). This costs O(free nodes) snapshots per call; the scale benchmark runs ours.

An earlier version offered round-robin only the first ``2·(jobs+3)`` nodes in
least-recently-assigned order, without checking that they had a free slot, and least-loaded only
the few least-loaded of each class: round-robin then often found every offered node full, and
least-loaded was steered toward the rare fast classes. A win against those was not a win.

A coordinator with a fleet that large would keep the same indexes (they are O(1) per change).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from sparecycles.scheduling.scheduler import SchedulerConfig

POLICY_CONFIGS: dict[str, SchedulerConfig] = {
    "fastest": SchedulerConfig(policy="fastest"),
    "fastest+hedge": SchedulerConfig(policy="fastest", hedge_after_factor=2.0),
    # ours, a long prompt may be prefilled on one node and decoded on another (hand-offs)
    "fastest+disagg": SchedulerConfig(policy="fastest", disaggregate=True),
    "cheapest-within-deadline": SchedulerConfig(policy="cheapest-within-deadline"),
    "random": SchedulerConfig(policy="random"),
    "round-robin": SchedulerConfig(policy="round-robin"),
    "least-loaded": SchedulerConfig(policy="least-loaded"),
}
BASELINES = ("random", "round-robin", "least-loaded")
# Chains (sim/chains.py), on fleets whose nodes hold layer ranges: "fastest" (ours: the planner
# of scheduling/chains.py with departures weighed in), and two baselines: "fixed-chain" (one
# chain chosen at the start, a lost stage replaced only by a node of the same layers) and
# "petals" (Petals' client routing: the fastest path by servers' throughput, no departures).
CHAIN_POLICIES = ("fastest", "fixed-chain", "petals")
CHAIN_BASELINES = ("fixed-chain", "petals")


def policy_config(name: str) -> SchedulerConfig:
    """The scheduler's settings for a policy (a chain baseline runs with ours' settings: the
    chain simulator reads only the stay rule's from them)."""
    if name in CHAIN_BASELINES:
        return POLICY_CONFIGS["fastest"]
    try:
        return POLICY_CONFIGS[name]
    except KeyError:
        known = ", ".join((*POLICY_CONFIGS, *CHAIN_BASELINES))
        raise ValueError(f"unknown policy {name!r}; known: {known}") from None


@dataclass(slots=True)
class _ModelPool:
    """Accepting nodes of one model, kept three ways."""

    lra: dict[int, None] = field(default_factory=dict)  # least recently assigned first
    free: dict[int, None] = field(default_factory=dict)  # accepting with a free slot
    order: list[int] = field(default_factory=list)  # for uniform sampling (swap-remove)
    pos: dict[int, int] = field(default_factory=dict)
    buckets: dict[int, list[dict[int, None]]] = field(default_factory=dict)  # class -> by load

    def add(self, node: int, cls: int, active: int, jobs_max: int) -> None:
        self.lra[node] = None
        if active < jobs_max:
            self.free[node] = None
        self.pos[node] = len(self.order)
        self.order.append(node)
        by_load = self.buckets.setdefault(cls, [])
        while len(by_load) <= max(active, jobs_max):
            by_load.append({})
        by_load[active][node] = None

    def remove(self, node: int, cls: int, active: int) -> None:
        del self.lra[node]
        self.free.pop(node, None)
        i = self.pos.pop(node)
        last = self.order.pop()
        if last != node:
            self.order[i] = last
            self.pos[last] = i
        del self.buckets[cls][active][node]


@dataclass(slots=True)
class CandidateIndex:
    all_max: int = 64  # up to this many accepting nodes of a model, offer them all
    extra_per_class: int = 3  # with one job waiting: 4 per class, weighed whole (no ranking)
    jobs_per_class_max: int = 5  # ... and at most 8 per class however many jobs wait
    pools: dict[str, _ModelPool] = field(default_factory=dict)
    where: dict[int, tuple[str, int, int, int]] = field(default_factory=dict)
    # node -> (model, class, load, jobs_max)

    def update(
        self, node: int, model: str, cls: int, active: int, jobs_max: int, accepting: bool
    ) -> None:
        """Record a node's state after any change (load, joining, leaving, draining)."""
        old = self.where.get(node)
        if old is not None:
            if accepting and old == (model, cls, active, jobs_max):
                return
            self.pools[old[0]].remove(node, old[1], old[2])
            del self.where[node]
        if accepting:
            self.pools.setdefault(model, _ModelPool()).add(node, cls, active, jobs_max)
            self.where[node] = (model, cls, active, jobs_max)

    def assigned(self, node: int) -> None:
        """A job was just placed on ``node``: it goes to the back of the round-robin order."""
        place = self.where.get(node)
        if place is not None:
            lra = self.pools[place[0]].lra
            del lra[node]
            lra[node] = None

    def candidates(self, model: str, n_jobs: int, policy: str, rng: random.Random) -> list[int]:
        pool = self.pools.get(model)
        if pool is None:
            return []
        if len(pool.order) <= self.all_max:
            return list(pool.lra)
        if policy in BASELINES:
            return list(pool.free)  # every node the policy could pick (see the module's doc)
        # a node keeps its place after taking a job (it has jobs_max slots), so a class needs
        # only a few more candidates than the scheduler weighs per group
        want = min(n_jobs, self.jobs_per_class_max) + self.extra_per_class
        out: list[int] = []
        for by_load in pool.buckets.values():
            taken = 0
            for bucket in by_load:
                for node in bucket:
                    out.append(node)
                    taken += 1
                    if taken >= want:
                        break
                if taken >= want:
                    break
        return out

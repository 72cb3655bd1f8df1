"""A node's reputation: a Beta posterior over how often its checked work is honest. Pure.

Each verification of a node's work is a Bernoulli trial: passed or failed. With a Beta(a, b)
prior over the node's honesty rate, the posterior after ``s`` passes and ``f`` failures is
Beta(a + s, b + w*f), where ``w`` (``failure_weight``) makes one failure count for more than one
pass (cheating once costs more trust than behaving once earns). What the rest of the system reads:

- ``reputation(trust)``: the posterior mean, 0 for a quarantined node, 1 for a node the operator
  designated as trusted. The scheduler gives no work below ``SchedulerConfig.reputation_min``
  (0.5) and places ``trusted_only`` jobs only at ``trusted_reputation_min`` (0.9) and above.
- ``honesty_lower_bound(trust)``: the 5% quantile of the posterior, shown to the owner ("at least
  X of this node's work is honest, with 95% confidence").
- ``record_check`` folds one verdict in and applies the quarantine rule: a node with at least
  ``quarantine_failures_min`` failures whose posterior mean fell below ``quarantine_mean_max``
  is quarantined (refused at hello, never placed) until an operator lifts it.

The prior Beta(3, 1) (mean 0.75) lets a new node work at once (above 0.5) without being trusted
(below 0.9); a node that always cheats is quarantined at its third failure (3/7 < 0.5); an honest
node needs about 9 clean checks to be trusted (12/13 > 0.9 after 9), and an honest node with a
long record survives a false positive (103/107 after 100 passes and 3 failures).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from sparecycles.errors import invariant


@dataclass(frozen=True, slots=True)
class ReputationConfig:
    prior_honest: float = 3.0  # Beta prior a
    prior_dishonest: float = 1.0  # Beta prior b
    failure_weight: float = 1.0  # evidence one failure adds to b
    quarantine_failures_min: int = 3
    quarantine_mean_max: float = 0.5  # quarantined below this posterior mean (with the failures)
    lower_bound_quantile: float = 0.05


DEFAULT_REPUTATION = ReputationConfig()


@dataclass(frozen=True, slots=True)
class NodeTrust:
    """What verification has learnt about one node."""

    node_id: str
    alpha: float
    beta: float
    checks: int = 0
    failures: int = 0
    consecutive_clean: int = 0  # passes since the last failure (drives the spot-check rate)
    quarantined: bool = False
    quarantine_reason: str = ""
    designated_trusted: bool = False  # the operator's own node: verifies others, never checked

    @property
    def mean(self) -> float:
        return self.alpha / (self.alpha + self.beta)


def new_trust(node_id: str, config: ReputationConfig = DEFAULT_REPUTATION, *,
              designated_trusted: bool = False) -> NodeTrust:
    return NodeTrust(node_id, config.prior_honest, config.prior_dishonest,
                     designated_trusted=designated_trusted)


def reputation(trust: NodeTrust) -> float:
    """The number the scheduler reads (``NodeSnapshot.reputation``)."""
    if trust.quarantined:
        return 0.0
    if trust.designated_trusted:
        return 1.0
    return trust.mean


def record_check(trust: NodeTrust, passed: bool, reason: str = "",
                 config: ReputationConfig = DEFAULT_REPUTATION) -> NodeTrust:
    """The trust after one more verdict; quarantines the node when the rule says so."""
    if passed:
        out = replace(trust, alpha=trust.alpha + 1.0, checks=trust.checks + 1,
                      consecutive_clean=trust.consecutive_clean + 1)
    else:
        out = replace(trust, beta=trust.beta + config.failure_weight, checks=trust.checks + 1,
                      failures=trust.failures + 1, consecutive_clean=0)
    invariant(out.alpha > 0 and out.beta > 0, "a Beta posterior needs positive parameters")
    if not out.quarantined and should_quarantine(out, config):
        out = replace(out, quarantined=True, quarantine_reason=(
            f"{out.failures} failed checks of {out.checks}; last: {reason}"[:500]))
    return out


def should_quarantine(trust: NodeTrust, config: ReputationConfig = DEFAULT_REPUTATION) -> bool:
    if trust.designated_trusted:
        return False
    return (trust.failures >= config.quarantine_failures_min
            and trust.mean < config.quarantine_mean_max)


def honesty_lower_bound(trust: NodeTrust,
                        config: ReputationConfig = DEFAULT_REPUTATION) -> float:
    """The ``lower_bound_quantile`` quantile of Beta(alpha, beta), by bisection on its CDF."""
    lo, hi = 0.0, 1.0
    for _ in range(60):  # 2**-60: far below any difference worth showing
        mid = (lo + hi) / 2
        if beta_cdf(mid, trust.alpha, trust.beta) < config.lower_bound_quantile:
            lo = mid
        else:
            hi = mid
    return lo


# ---- the regularized incomplete beta function (Numerical Recipes' continued fraction) ---------

_cf_iterations_max = 300
_cf_eps = 1e-14


def beta_cdf(x: float, a: float, b: float) -> float:
    """P(X <= x) for X ~ Beta(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_cf(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_cf(1.0 - x, b, a) / b


def _beta_cf(x: float, a: float, b: float) -> float:
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, _cf_iterations_max + 1):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((a + m2 - 1) * (a + m2)),
                    -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < _cf_eps:
            break
    return h

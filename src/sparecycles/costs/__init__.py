"""The cost engine: what a request, a client and a model cost the platform, and the margin made.

- ``costmodel``  what the platform pays that the ledger does not see (TOML, validated; pure)
- ``allocation`` every cost of a period onto requests, idle capacity or unallocated (pure)
- ``reports``    revenue, COGS, margins, fixed base costs, break-even, cost per token (pure)
- ``economics``  owner economics per device, and the estimate for a would-be owner (pure)
- ``focus``      the FinOps FOCUS 1.2 export and its validator (pure)
- ``reconcile``  metered usage vs ledger postings vs the FOCUS export (pure)

The SQL lives in ``store/cost_queries.py``; docs/costs.md has the definitions and the method.
"""

from sparecycles.costs.allocation import (
    Allocation,
    AttemptUsage,
    Correction,
    JobUsage,
    LedgerCost,
    NodeInfo,
    Period,
    PeriodUsage,
    allocate,
    largest_remainder,
)
from sparecycles.costs.costmodel import CostModel, load_cost_model, parse_cost_model

__all__ = [
    "Allocation",
    "AttemptUsage",
    "Correction",
    "CostModel",
    "JobUsage",
    "LedgerCost",
    "NodeInfo",
    "Period",
    "PeriodUsage",
    "allocate",
    "largest_remainder",
    "load_cost_model",
    "parse_cost_model",
]

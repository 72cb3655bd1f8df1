"""What a simulation run measured, and the tables that show it.

Definitions (also in docs/scheduling.md):

- A request **meets its SLO** when it completes, its first token reaches the client within
  ``slo.ttft_target_s(prompt)`` of arrival (``ttft_s`` plus ``ttft_s_per_ktok`` per 1,000
  prompt tokens; fleet_file.SLO says why), and the rest follow at ``slo.tpot_s`` per token or better
  (end - first token <= tpot_s * (output - 1)). Failed requests miss it.
- **Goodput**: requests (and their output tokens) that met the SLO, per second of the trace.
- **TTFT** and **end-to-end** percentiles are over completed requests, in client time (one
  network round trip to the node included).
- **Utilization** of a device class: busy node-seconds over available node-seconds.
- **KV over**: placements that left a node's KV-cache reservations (every admitted or queued
  sequence's context plus the tokens it may still generate) above its KV capacity.
- **Prefix hit**: the share of prompt tokens admitted by nodes' engines (every attempt's, a
  resumed one's included) that a node's prefix cache held, so that they were not prefilled.
- **Hand-offs** (disaggregated prefill/decode): requests with at least one attempt prefilled on
  one node and decoded on another, and the KV-cache bytes shipped between them.
- **Interrupted**: requests that lost at least one attempt to a departure; **recovered**: those of
  them that still completed (resumed elsewhere).
- **Chains** (fleets of layer ranges, sim/chains.py): **stage losses** are stages whose node
  left under a running chain, **repairs** the segments placed in their stead (each rebuilding
  its cache), **repairs failed** the chains that found none in time (or ran out of repairs):
  those requests fail.
- **Earnings**: each owner's share of the charges (ledger/pricing.py's rules), per hour the device
was
  available. **Cost per million tokens**: the clients' charges per million output tokens
  delivered; **busy cost**: what paying every busy second at the device class's hourly rate
  would cost per million output tokens (wasted work included: re-prefills, lost hedges).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rich.table import Table

from sparecycles.sim.loop import DONE, SimResult


@dataclass(frozen=True, slots=True)
class ClassStats:
    name: str
    nodes: int
    utilization: float
    earnings_per_hour_p50_micros: float
    earnings_per_hour_p90_micros: float
    earned_micros: int


@dataclass(frozen=True, slots=True)
class Summary:
    policy: str
    requests: int
    completed: int
    failed: int
    slo_met: int
    duration_s: float
    ttft_p: tuple[float, float, float]  # p50, p90, p99
    e2e_p: tuple[float, float, float]
    interrupted: int
    recovered: int
    recovered_in_slo: int
    hedged: int
    hedge_waste_tokens: int
    output_tokens: int
    goodput_tokens: int
    charges_micros: int
    busy_cost_micros: int
    classes: tuple[ClassStats, ...]
    wall_s: float
    scheduler_calls: int
    events: int
    kv_over_capacity_placements: int = 0  # placements that left a node's KV reservations > capacity
    prefix_hit_rate: float = 0.0  # prompt tokens admitted that a node's prefix cache held
    handed_off: int = 0  # requests with at least one hand-off (disaggregated prefill/decode)
    kv_bytes_moved: int = 0
    handoffs_interrupted: int = 0
    chain_stage_losses: int = 0  # chains (sim/chains.py): stages lost to departures
    chain_repairs: int = 0  # ... segments placed in their stead
    chain_repairs_failed: int = 0  # ... chains that found none in time: failed requests

    @property
    def handed_off_share(self) -> float:
        return self.handed_off / max(1, self.requests)

    @property
    def slo_attainment(self) -> float:
        return self.slo_met / max(1, self.requests)

    @property
    def goodput_rps(self) -> float:
        return self.slo_met / max(1e-9, self.duration_s)

    @property
    def goodput_tokens_per_s(self) -> float:
        return self.goodput_tokens / max(1e-9, self.duration_s)

    @property
    def cost_per_mtok_micros(self) -> float:
        return self.charges_micros / max(1, self.output_tokens) * 1e6

    @property
    def busy_cost_per_mtok_micros(self) -> float:
        return self.busy_cost_micros / max(1, self.output_tokens) * 1e6


def _percentiles(values: np.ndarray) -> tuple[float, float, float]:
    if len(values) == 0:
        return (float("nan"),) * 3
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return float(p50), float(p90), float(p99)


def slo_met(result: SimResult) -> np.ndarray:
    slo = result.fleet.slo
    done = result.status == DONE
    with np.errstate(invalid="ignore"):
        ttft_ok = (result.first_token - result.arrival) <= slo.ttft_target_s(result.prompt)
        tpot_ok = (result.end - result.first_token) <= slo.tpot_s * np.maximum(
            0, result.output - 1
        ) + 1e-9
    return done & ttft_ok & tpot_ok


def _class_stats(result: SimResult) -> tuple[ClassStats, ...]:
    out = []
    for ci, c in enumerate(result.fleet.classes):
        mask = result.node_class == ci
        avail = result.node_available_s[mask]
        busy = result.node_busy_s[mask].sum()
        earned = result.node_earned_micros[mask]
        hours = avail / 3600.0
        per_hour = earned[hours > 0] / hours[hours > 0]
        p50, p90 = np.percentile(per_hour, [50, 90]) if len(per_hour) else (0.0, 0.0)
        out.append(
            ClassStats(
                name=c.name,
                nodes=int(mask.sum()),
                utilization=float(busy / avail.sum()) if avail.sum() > 0 else 0.0,
                earnings_per_hour_p50_micros=float(p50),
                earnings_per_hour_p90_micros=float(p90),
                earned_micros=int(earned.sum()),
            )
        )
    return tuple(out)


def summarize(result: SimResult) -> Summary:
    done = result.status == DONE
    met = slo_met(result)
    interrupted = result.interrupted > 0
    duration = float(result.arrival[-1] - result.arrival[0]) if len(result.arrival) else 0.0
    return Summary(
        policy=result.policy,
        requests=len(result.status),
        completed=int(done.sum()),
        failed=int((~done).sum()),
        slo_met=int(met.sum()),
        duration_s=max(duration, 1e-9),
        ttft_p=_percentiles((result.first_token - result.arrival)[done]),
        e2e_p=_percentiles((result.end - result.arrival)[done]),
        interrupted=int(interrupted.sum()),
        recovered=int((interrupted & done).sum()),
        recovered_in_slo=int((interrupted & met).sum()),
        hedged=int((result.hedged > 0).sum()),
        hedge_waste_tokens=result.hedge_waste_tokens,
        output_tokens=int(result.output[done].sum()),
        goodput_tokens=int(result.output[met].sum()),
        charges_micros=result.charges_micros,
        busy_cost_micros=result.busy_cost_micros,
        classes=_class_stats(result),
        wall_s=result.wall_s,
        scheduler_calls=result.scheduler_calls,
        events=result.events,
        kv_over_capacity_placements=result.kv_over_capacity_placements,
        prefix_hit_rate=result.prompt_tokens_cached / max(1, result.prompt_tokens_admitted),
        handed_off=int((result.handed_off > 0).sum()),
        kv_bytes_moved=result.kv_bytes_moved,
        handoffs_interrupted=result.handoffs_interrupted,
        chain_stage_losses=int(result.extra.get("stage_losses", 0)),
        chain_repairs=int(result.extra.get("repairs", 0)),
        chain_repairs_failed=int(result.extra.get("repair_failed", 0)),
    )


# --- tables --------------------------------------------------------------------------------

COMPARISON_COLUMNS = (
    "policy", "SLO met", "goodput req/s", "goodput tok/s", "TTFT p50/p90/p99 s",
    "E2E p50/p90/p99 s", "failed", "interrupted (recovered)", "KV over", "prefix hit",
    "hand-offs (GB)", "hedged",
    "$/M tok", "busy $/M tok",
)  # fmt: skip


def _row(s: Summary) -> list[str]:
    return [
        s.policy,
        f"{s.slo_attainment:.1%}",
        f"{s.goodput_rps:.2f}",
        f"{s.goodput_tokens_per_s:,.0f}",
        "/".join(f"{v:.2f}" for v in s.ttft_p),
        "/".join(f"{v:.1f}" for v in s.e2e_p),
        f"{s.failed:,}",
        f"{s.interrupted:,} ({s.recovered:,})",
        f"{s.kv_over_capacity_placements:,}",
        f"{s.prefix_hit_rate:.0%}",
        f"{s.handed_off_share:.0%} ({s.kv_bytes_moved / 1e9:,.0f})",
        f"{s.hedged:,}" + (f" (+{s.hedge_waste_tokens:,} tok)" if s.hedged else ""),
        f"{s.cost_per_mtok_micros / 1e6:.3f}",
        f"{s.busy_cost_per_mtok_micros / 1e6:.3f}",
    ]


def comparison_table(summaries: list[Summary], title: str = "policies") -> Table:
    table = Table(title=title)
    for col in COMPARISON_COLUMNS:
        table.add_column(col, justify="left" if col == "policy" else "right")
    for s in summaries:
        table.add_row(*_row(s))
    return table


def _class_cell(k: ClassStats) -> str:
    return (
        f"{k.utilization:.0%}, ${k.earnings_per_hour_p50_micros / 1e6:.3f}"
        f" / ${k.earnings_per_hour_p90_micros / 1e6:.3f}"
    )


def class_table(summaries: list[Summary]) -> Table:
    table = Table(title="utilization and owners' earnings by device class (median, p90 per hour)")
    table.add_column("class")
    for s in summaries:
        table.add_column(s.policy, justify="right")
    for i, c in enumerate(summaries[0].classes):
        cells = [_class_cell(s.classes[i]) for s in summaries]
        table.add_row(f"{c.name} ({c.nodes})", *cells)
    return table


def markdown(summaries: list[Summary]) -> str:
    lines = ["| " + " | ".join(COMPARISON_COLUMNS) + " |"]
    lines.append("|" + "|".join("---" for _ in COMPARISON_COLUMNS) + "|")
    lines += ["| " + " | ".join(_row(s)) + " |" for s in summaries]
    lines += ["", "| class | " + " | ".join(s.policy for s in summaries) + " |"]
    lines.append("|---|" + "|".join("---" for _ in summaries) + "|")
    for i, c in enumerate(summaries[0].classes):
        cells = [_class_cell(s.classes[i]) for s in summaries]
        lines.append(f"| {c.name} ({c.nodes}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


CHAIN_COLUMNS = ("policy", "SLO met", "goodput req/s", "goodput tok/s", "TTFT p50/p99 s",
                 "E2E p50/p99 s", "failed", "stage losses", "repairs", "repairs failed")


def _chain_row(s: Summary) -> list[str]:
    return [
        s.policy, f"{s.slo_attainment:.1%}", f"{s.goodput_rps:.3f}",
        f"{s.goodput_tokens_per_s:,.1f}", f"{s.ttft_p[0]:.1f} / {s.ttft_p[2]:.1f}",
        f"{s.e2e_p[0]:.0f} / {s.e2e_p[2]:.0f}", f"{s.failed:,}", f"{s.chain_stage_losses:,}",
        f"{s.chain_repairs:,}", f"{s.chain_repairs_failed:,}",
    ]  # fmt: skip


def chain_table(summaries: list[Summary], title: str = "chains") -> Table:
    """The chain policies side by side (fleets of layer ranges)."""
    table = Table(title=title)
    for col in CHAIN_COLUMNS:
        table.add_column(col, justify="left" if col == "policy" else "right")
    for s in summaries:
        table.add_row(*_chain_row(s))
    return table


def chain_markdown(summaries: list[Summary]) -> str:
    lines = ["| " + " | ".join(CHAIN_COLUMNS) + " |",
             "|" + "|".join("---" for _ in CHAIN_COLUMNS) + "|"]
    lines += ["| " + " | ".join(_chain_row(s)) + " |" for s in summaries]
    return "\n".join(lines) + "\n"

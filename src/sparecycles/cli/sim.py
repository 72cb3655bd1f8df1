"""``sparecycles sim``: replay a workload trace against a fleet under several policies."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from sparecycles.cli.common import console, friendly
from sparecycles.sim import SimConfig, load_fleet, load_trace, scaled, simulate, summarize
from sparecycles.sim.policies import CHAIN_POLICIES, POLICY_CONFIGS
from sparecycles.sim.report import (
    Summary,
    chain_markdown,
    chain_table,
    class_table,
    comparison_table,
    markdown,
)
from sparecycles.sim.trace import thinned

DEFAULT_POLICIES = "fastest,random,round-robin,least-loaded"
# a fleet of layer ranges (chains, sim/chains.py): ours and the two baselines
DEFAULT_CHAIN_POLICIES = ",".join(CHAIN_POLICIES)


def run_policies(
    trace_name: str,
    fleet_path: Path,
    policies: list[str],
    *,
    seed: int = 1,
    requests: int = 0,
    nodes: int = 0,
    tick_s: float = 0.05,
    show_progress: bool = True,
    rate: float = 1.0,
) -> list[Summary]:
    """Run each policy on the same trace and fleet (same seed: same arrivals and departures).
    ``rate`` below 1 keeps that share of the requests (thinned), above 1 superposes copies."""
    fleet = load_fleet(fleet_path)
    known = CHAIN_POLICIES if fleet.chained else tuple(POLICY_CONFIGS)
    unknown = [p for p in policies if p not in known]
    if unknown:
        kind = "a fleet of layer ranges (chains)" if fleet.chained else "this fleet"
        raise ValueError(f"unknown policies {unknown} for {kind}; known: {', '.join(known)}")
    if not 0.0 < rate <= 64.0:
        raise ValueError("rate must be in (0, 64]")
    trace = load_trace(trace_name)
    if rate < 1.0:
        trace = thinned(trace, rate, seed)
    elif rate > 1.0:
        trace = scaled(trace, int(len(trace) * rate), seed)
    if requests:
        trace = scaled(trace, requests, seed)
    if nodes:
        fleet = fleet.scaled(nodes)
    console.print(
        f"trace {trace.name}: {len(trace):,} requests over {trace.duration_s / 60:.0f} min; "
        f"fleet {fleet.name}: {fleet.node_count:,} nodes; seed {seed}"
    )
    summaries = []
    columns = (TextColumn("{task.description:<26}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=console, disable=not show_progress) as progress:
        for policy in policies:
            task = progress.add_task(policy, total=len(trace))

            def report(done: int, total: int, task: TaskID = task) -> None:
                progress.update(task, completed=done, total=total)

            config = SimConfig(policy=policy, seed=seed, schedule_interval_s=tick_s)
            summaries.append(summarize(simulate(trace, fleet, config, report)))
    return summaries


@friendly
def sim(
    fleet: Path = typer.Option(..., "--fleet", "-f", help="Fleet file (TOML), see examples/"),
    trace: str = typer.Option(
        "conv", "--trace", "-t", help="conv, code, long (synthetic long-context), or a CSV path"
    ),
    policies: str = typer.Option(
        "", help="Comma-separated policies to compare (default: fastest and the baselines; "
        f"for a fleet of layer ranges: {DEFAULT_CHAIN_POLICIES})"),
    seed: int = typer.Option(1, help="Same seed, same run"),
    requests: int = typer.Option(0, help="Scale the trace to this many requests (0: as is)"),
    nodes: int = typer.Option(0, help="Scale the fleet to this many nodes (0: as is)"),
    tick_s: float = typer.Option(0.05, help="The coordinator's scheduling tick, seconds"),
    rate: float = typer.Option(
        1.0, help="Arrival rate over the trace's own: below 1 keeps that share of the requests"),
    markdown_out: Path = typer.Option(None, "--markdown", help="Also write the tables here"),
) -> None:
    """Replay a workload trace against a fleet with a simulated clock, driving the production
    scheduler, and compare policies on goodput, latency, SLO attainment, churn, earnings, cost."""
    chained = load_fleet(fleet).chained
    if not policies:
        policies = DEFAULT_CHAIN_POLICIES if chained else DEFAULT_POLICIES
    names = [p.strip() for p in policies.split(",") if p.strip()]
    summaries = run_policies(
        trace, fleet, names, seed=seed, requests=requests, nodes=nodes, tick_s=tick_s, rate=rate
    )
    if chained:
        console.print(chain_table(summaries, title="chains on the same trace and fleet"))
    else:
        console.print(comparison_table(summaries, title="policies on the same trace and fleet"))
    console.print(class_table(summaries))
    for s in summaries:
        console.print(
            f"{s.policy}: {s.wall_s:.1f} s wall, {s.scheduler_calls:,} scheduler calls, "
            f"{s.events:,} events"
        )
    if markdown_out is not None:
        markdown_out.write_text(chain_markdown(summaries) if chained else markdown(summaries))
        console.print(f"tables written to {markdown_out}")


def register(app: typer.Typer) -> None:
    app.command("sim")(sim)

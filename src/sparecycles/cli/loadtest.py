"""``sparecycles loadtest ...``: the control-plane load harness (a test tool, never a backend).

    sparecycles loadtest setup   --database URL --keys 8            -> node token + keys (JSON)
    sparecycles loadtest nodes   --url URL [--url URL2 ...] --token T --count 1000 --model tiny=DIR
    sparecycles loadtest clients --url URL [...] --keys-file creds.json --concurrency 64

The coordinators under test must run with ``SPARECYCLES_VERIFICATION=false``: fake nodes send
random tokens. ``bench/control_plane.py`` runs all of it and writes the results.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import typer
from rich.table import Table

from sparecycles.cli.common import console, friendly, setup_logging

loadtest_app = typer.Typer(
    help="Control-plane load harness: fake nodes and many clients. A test tool, not a backend; "
         "run it only against a coordinator under test (verification off).",
    no_args_is_help=True,
)


def _run_loop(main: object) -> object:
    try:
        import uvloop  # optional: the harness keeps up with more nodes per core

        return uvloop.run(main)  # type: ignore[arg-type]
    except ImportError:
        return asyncio.run(main)  # type: ignore[arg-type]


@loadtest_app.command("setup")
@friendly
def setup_cmd(
    database: str = typer.Option(..., "--database", help="The coordinators' database URL"),
    keys: int = typer.Option(8, help="API keys to make (each may stream 64 requests at once)"),
    model: str = typer.Option("", help="Give this model a small fixed price"),
    out: Path = typer.Option(None, help="Write {node_token, keys} here as JSON (mode 0600)"),
) -> None:
    """Make a node token, client keys and a large deposit for a load test."""
    from sparecycles.tools.loadtest.setup import prepare

    creds = prepare(database, keys=keys, model=model or None)
    text = json.dumps({"node_token": creds.node_token, "keys": list(creds.keys)})
    if out is None:
        print(text)
        return
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    console.print(f"node token and {len(creds.keys)} keys written to {out}")


@loadtest_app.command("nodes")
@friendly
def nodes_cmd(
    url: list[str] = typer.Option(..., "--url", help="Coordinator URL, repeatable (round-robin)"),
    token: str = typer.Option(None, "--token", help="Node token (else --keys-file's)"),
    keys_file: Path = typer.Option(None, help="JSON from `loadtest setup --out`"),
    count: int = typer.Option(100, help="Fake nodes in this process"),
    first_index: int = typer.Option(0, help="Index of the first node (keys derive from it)"),
    seed: str = typer.Option("loadtest", help="Key seed: same seed and index, same node id"),
    model: str = typer.Option(..., "--model", help="NAME=DIR of a registered model"),
    speed: str = typer.Option("", help="prefill=4000,decode=50,overhead=0.005 (tokens/s, s)"),
    jobs_max: int = typer.Option(8, help="Jobs each fake node takes at once"),
    tokens_per_message: int = typer.Option(1, help="Tokens per `tokens` message"),
    connect_rate: float = typer.Option(500.0, help="New sockets per second while ramping"),
    compression: bool = typer.Option(True, help="Offer permessage-deflate like the agent"),
    duration_s: float = typer.Option(0.0, help="Stop after this long (0: on SIGINT/SIGTERM)"),
    stats_out: Path = typer.Option(None, help="Write counters here as JSON, every second"),
    log_level: str = typer.Option("warning"),
) -> None:
    """Host COUNT fake nodes in this process until stopped. They replay a speed model's token
    timing with random token ids and sign their results; they never run a model."""
    from sparecycles.tools.loadtest.fakenodes import (
        FakeModel,
        FleetConfig,
        FleetStats,
        raise_open_files_limit,
        run_fleet,
    )
    from sparecycles.tools.loadtest.speed import SpeedModel

    setup_logging(log_level)
    if token is None:
        if keys_file is None:
            raise ValueError("give --token or --keys-file")
        token = json.loads(keys_file.read_text())["node_token"]
    name, sep, directory = model.partition("=")
    if not sep:
        raise ValueError("--model must be NAME=DIR")
    limit = raise_open_files_limit()
    if limit < count + 64:
        raise ValueError(f"open-file limit {limit} is too low for {count} sockets (ulimit -n)")
    config = FleetConfig(
        urls=tuple(url), token=token, model=FakeModel.from_dir(name, Path(directory)),
        count=count, first_index=first_index, seed=seed, speed=SpeedModel.parse(speed),
        jobs_max=jobs_max, tokens_per_message=tokens_per_message,
        connect_rate_per_s=connect_rate, compression=compression,
    )

    def write(stats: FleetStats) -> None:
        if stats_out is not None:
            tmp = stats_out.with_suffix(".tmp")
            tmp.write_text(json.dumps(stats.as_dict()))
            tmp.replace(stats_out)

    async def main() -> FleetStats:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if duration_s > 0:
            loop.call_later(duration_s, stop.set)
        return await run_fleet(config, stop, on_progress=write)

    stats = _run_loop(main())
    d = stats.as_dict()  # type: ignore[attr-defined]
    d.pop("lag_s")
    console.print(json.dumps(d))


@loadtest_app.command("clients")
@friendly
def clients_cmd(
    url: list[str] = typer.Option(..., "--url", help="Coordinator URL, repeatable"),
    key: list[str] = typer.Option(None, "--key", help="API key, repeatable"),
    keys_file: Path = typer.Option(None, help="JSON from `loadtest setup --out`"),
    model: str = typer.Option("tiny", help="Model name"),
    concurrency: int = typer.Option(16, help="Streams in flight at once"),
    requests: int = typer.Option(0, help="Stop after this many requests (0: duration only)"),
    duration_s: float = typer.Option(30.0, help="Stop starting requests after this long"),
    rate: float = typer.Option(0.0, help="Pace starts to this many per second (0: closed loop)"),
    trace: str = typer.Option("conv", help="Request sizes from: conv, code, a CSV, or 'fixed'"),
    prompt_tokens_max: int = typer.Option(256, help="Cap on a request's prompt length"),
    output_tokens_max: int = typer.Option(64, help="Cap on a request's max_tokens"),
    speed: str = typer.Option("", help="The fake nodes' --speed, to compute added latency"),
    out: Path = typer.Option(None, help="Write the summary and every sample here (JSON)"),
) -> None:
    """Stream chat completions from many concurrent clients and report requests/s, tokens/s,
    and latency (and, against fake nodes, the latency the coordinator added)."""
    from sparecycles.tools.loadtest.clients import (
        ClientConfig,
        Workload,
        run_clients,
        samples_to_json,
    )
    from sparecycles.tools.loadtest.speed import SpeedModel

    keys = list(key or [])
    if keys_file is not None:
        keys += json.loads(keys_file.read_text())["keys"]
    if not keys:
        raise ValueError("give --key or --keys-file")
    if trace == "fixed":
        workload = Workload.fixed(prompt_tokens_max, output_tokens_max)
    else:
        workload = Workload.from_trace(trace, prompt_tokens_max=prompt_tokens_max,
                                       output_tokens_max=output_tokens_max)
    speed_model = SpeedModel.parse(speed)
    config = ClientConfig(urls=tuple(url), keys=tuple(keys), model=model, workload=workload,
                          concurrency=concurrency, requests=requests, duration_s=duration_s,
                          rate_per_s=rate, speed=speed_model)
    result = _run_loop(run_clients(config))
    summary = result.summary(speed_model)  # type: ignore[attr-defined]
    table = Table("measure", "value")
    for k, v in summary.items():
        if k != "errors":
            table.add_row(k, f"{v:,}" if isinstance(v, int | float) else str(v))
    console.print(table)
    for err, n in summary["errors"].items():
        console.print(f"[red]{n} x[/red] {err}")
    if out is not None:
        out.write_text(json.dumps({"summary": summary,
                                   "config": result.config,  # type: ignore[attr-defined]
                                   "samples": samples_to_json(result.samples)}))  # type: ignore[attr-defined]


def register(app: typer.Typer) -> None:
    app.add_typer(loadtest_app, name="loadtest")

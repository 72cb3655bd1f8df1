"""The coordinator's control plane under load: fake nodes and many streaming clients.

Fake nodes (``sparecycles loadtest nodes``; a test tool, never a backend) are real protocol
clients that answer jobs with random tokens on a known schedule, so what the clients see beyond
that schedule is what the coordinator adds. Two phases, against one coordinator this script
starts (SQLite or PostgreSQL) or against coordinators already running (``--urls``):

  scale       connect 1,000 -> 5,000 -> 10,000 fake nodes (``--scale``); at each step record the
              time to connect, the coordinator's RSS and CPU while the nodes only heartbeat, and
              the latency it adds to a light probe load (placement over that many nodes)
  throughput  a fleet of ``--fleet`` nodes and closed-loop clients at each ``--concurrency``:
              routed requests/s, streamed tokens/s, p50/p99 added time to first token

Results: JSON and a markdown table in ``--out`` (default artifacts/control_plane/).

    python bench/control_plane.py --database sqlite --scale 1000,5000,10000 \\
        --fleet 200 --concurrency 16,64,256
    python bench/control_plane.py --database postgres ...
    # three replicas already running on one PostgreSQL and NATS (lead's multi-replica set-up):
    python bench/control_plane.py --urls http://127.0.0.1:8001,http://127.0.0.1:8002,... \\
        --database postgresql://127.0.0.1:5432/test --scale 0 --concurrency 256,1024
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sparecycles.tools.loadtest.clients import samples_from_json, summarize
from sparecycles.tools.loadtest.procs import proc_sample, spawn, stop
from sparecycles.tools.loadtest.setup import prepare
from sparecycles.tools.loadtest.speed import SpeedModel
from sparecycles.tools.localnet import free_port

console = Console()
PG_ADMIN = "postgresql://127.0.0.1:5432/postgres"
PG_DATABASE = "sparecycles_load"
MODEL = "tiny"
idle_window_s = 10.0  # coordinator CPU is measured over this while nodes only heartbeat
connect_timeout_s = 300.0


@dataclass
class Run:
    root: Path
    database: str
    urls: list[str]
    model_dir: Path
    speed: SpeedModel
    coordinator: subprocess.Popen[bytes] | None = None
    node_procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    nodes_started: int = 0
    creds: Path | None = None
    compression: bool = True  # fake nodes offer permessage-deflate, as the real agent does
    coordinator_pids: list[int] = field(default_factory=list)  # replicas started elsewhere

    def readyz(self) -> list[dict[str, Any]]:
        out = []
        for url in self.urls:
            try:
                out.append(httpx.get(url + "/readyz", timeout=5, trust_env=False).json())
            except (httpx.HTTPError, ValueError):
                out.append({})
        return out

    def nodes_online(self) -> int:
        return sum(r.get("nodes_online", 0) for r in self.readyz())

    def cpu_by_process(self) -> dict[str, float]:
        """CPU seconds so far of the coordinators (this script's own, or ``--coordinator-pids``),
        the fake nodes, and PostgreSQL's backends of this run's database (clients: below)."""
        coords = [self.coordinator.pid] if self.coordinator else self.coordinator_pids
        out = {"coordinators": _cpu_s(coords),
               "fake_nodes": _cpu_s([p.pid for p in self.node_procs])}
        if self.database.startswith("postgresql"):
            out["postgres"] = _cpu_s(_pg_backends(self.database))
        return out

    def coord_sample(self) -> dict[str, float]:
        if self.coordinator is None:
            return {}
        s = proc_sample(self.coordinator.pid)
        return {} if s is None else {"cpu_s": s.cpu_s, "rss_mib": s.rss_bytes / 2**20}


def _cpu_s(pids: list[int]) -> float:
    return sum(s.cpu_s for p in pids if (s := proc_sample(p)) is not None)


def _pg_backends(database: str) -> list[int]:
    """PIDs of the PostgreSQL server processes serving ``database`` (same host: /proc)."""
    import psycopg

    name = database.rsplit("/", 1)[-1].split("?")[0]
    admin = database.rsplit("/", 1)[0] + "/postgres"
    try:
        with psycopg.connect(admin.replace("+psycopg", ""), autocommit=True) as conn:
            rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s",
                                (name,)).fetchall()
    except psycopg.Error:
        return []
    return [r[0] for r in rows]


def _children_cpu_s() -> float:
    """CPU seconds of this script's finished (waited-for) children: the client processes."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def url_args(urls: list[str]) -> list[str]:
    return [arg for u in urls for arg in ("--url", u)]


def fresh_postgres() -> str:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {PG_DATABASE} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {PG_DATABASE}")
    return f"postgresql://127.0.0.1:5432/{PG_DATABASE}"


def start_coordinator(run: Run, log_level: str) -> None:
    port = free_port()
    run.coordinator = spawn(
        ["coordinator", "--port", str(port), "--database", run.database,
         "--model", f"{MODEL}={run.model_dir}", "--log-level", log_level,
         "--replica-id", f"loadtest-{port}"],
        run.root / "logs" / "coordinator.log",
        env={"SPARECYCLES_VERIFICATION": "false"})
    run.urls = [f"http://127.0.0.1:{port}"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if run.coordinator.poll() is not None:
            raise RuntimeError(f"coordinator exited; see {run.root / 'logs'}")
        if run.readyz()[0].get("status") == "ready":
            return
        time.sleep(0.3)
    raise TimeoutError("coordinator not ready")


def add_nodes(run: Run, target: int, per_process: int, progress: Progress) -> dict[str, Any]:
    """Start fake-node processes until ``target`` nodes run; wait until all are online."""
    t0 = time.monotonic()
    while run.nodes_started < target:
        count = min(per_process, target - run.nodes_started)
        i = len(run.node_procs)
        run.node_procs.append(spawn(
            ["loadtest", "nodes", *url_args(run.urls),
             "--keys-file", str(run.creds), "--count", str(count),
             "--first-index", str(run.nodes_started), "--model", f"{MODEL}={run.model_dir}",
             "--speed", run.speed.describe(), "--stats-out", str(run.root / f"nodes-{i}.json"),
             *([] if run.compression else ["--no-compression"])],
            run.root / "logs" / f"nodes-{i}.log"))
        run.nodes_started += count
    task = progress.add_task(f"connecting {target:,} nodes", total=target)
    online = 0
    while online < target:
        if time.monotonic() - t0 > connect_timeout_s:
            raise TimeoutError(f"only {online} of {target} nodes online after "
                               f"{connect_timeout_s:g} s")
        for p in run.node_procs:
            if p.poll() is not None:
                raise RuntimeError(f"a fake-node process exited ({p.returncode}); see logs")
        online = run.nodes_online()
        c = run.coord_sample()
        progress.update(task, completed=online, description=(
            f"connecting {target:,} nodes  coordinator RSS {c.get('rss_mib', 0):.0f} MiB"))
        time.sleep(0.5)
    progress.remove_task(task)
    return {"connect_s": round(time.monotonic() - t0, 1)}


def idle_cost(run: Run, progress: Progress) -> dict[str, Any]:
    """Coordinator CPU while the nodes only heartbeat, and its memory."""
    task = progress.add_task("idle: heartbeats only", total=idle_window_s)
    a, t0 = run.coord_sample(), time.monotonic()
    health_ms: list[float] = []  # /healthz round trips: how long the event loop keeps others
    while (el := time.monotonic() - t0) < idle_window_s:
        progress.update(task, completed=el)
        h0 = time.perf_counter()
        try:
            httpx.get(run.urls[0] + "/healthz", timeout=30, trust_env=False)
            health_ms.append((time.perf_counter() - h0) * 1000)
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    b = run.coord_sample()
    progress.remove_task(task)
    if not a or not b:
        return {}
    health_ms.sort()
    return {"idle_cpu_pct": round(100 * (b["cpu_s"] - a["cpu_s"]) / idle_window_s, 1),
            "rss_mib": round(b["rss_mib"], 1),
            "healthz_p50_ms": round(health_ms[len(health_ms) // 2], 1) if health_ms else None,
            "healthz_max_ms": round(health_ms[-1], 1) if health_ms else None}


def client_load(run: Run, concurrency: int, duration_s: float, processes: int,
                progress: Progress, label: str, args: argparse.Namespace) -> dict[str, Any]:
    """Closed-loop clients in ``processes`` processes; the merged summary."""
    procs, outs = [], []
    processes = max(1, min(processes, concurrency))
    a = run.coord_sample()
    cpu0, children0 = run.cpu_by_process(), _children_cpu_s()
    t0 = time.monotonic()
    for i in range(processes):
        out = run.root / f"clients-{label}-{i}.json"
        outs.append(out)
        share = concurrency // processes + (1 if i < concurrency % processes else 0)
        procs.append(spawn(
            ["loadtest", "clients", *url_args(run.urls),
             "--keys-file", str(run.creds), "--model", MODEL, "--concurrency", str(share),
             "--duration-s", str(duration_s), "--trace", args.trace,
             "--prompt-tokens-max", str(args.prompt_tokens_max),
             "--output-tokens-max", str(args.output_tokens_max),
             "--speed", run.speed.describe(), "--out", str(out)],
            run.root / "logs" / f"clients-{label}-{i}.log"))
    task = progress.add_task(f"{label}: {concurrency} streams", total=duration_s)
    while any(p.poll() is None for p in procs):
        progress.update(task, completed=min(duration_s, time.monotonic() - t0))
        time.sleep(0.5)
        if time.monotonic() - t0 > duration_s + 300:
            stop(procs)
    wall = time.monotonic() - t0
    for p in procs:
        p.wait()  # reaped, so that their CPU counts in RUSAGE_CHILDREN
    b = run.coord_sample()
    cpu1, children1 = run.cpu_by_process(), _children_cpu_s()
    progress.remove_task(task)
    samples, walls = [], []
    for out in outs:
        if not out.exists():
            raise RuntimeError(f"a client process wrote nothing; see {run.root / 'logs'}")
        data = json.loads(out.read_text())
        samples += samples_from_json(data["samples"])
        walls.append(data["summary"]["wall_s"])
    summary = summarize(samples, max(walls), run.speed)
    summary["concurrency"] = concurrency
    # CPU ms per request of each kind of process, over the whole level (its start-up included)
    n = max(1, summary["requests"])
    cpu_ms = {k: round((cpu1[k] - cpu0[k]) * 1000 / n, 2) for k in cpu1}
    cpu_ms["clients"] = round((children1 - children0) * 1000 / n, 2)
    summary["cpu_ms_per_request"] = cpu_ms
    if a and b:
        summary["coordinator_cpu_pct"] = round(100 * (b["cpu_s"] - a["cpu_s"]) / wall, 1)
        summary["coordinator_rss_mib"] = round(b["rss_mib"], 1)
    return summary


def fake_node_lag(run: Run) -> dict[str, float]:
    """The fake nodes' own lag behind their schedule (first token), p50 and p99 in ms."""
    from sparecycles.tools.loadtest.clients import _quantile

    lags: list[float] = []
    for f in run.root.glob("nodes-*.json"):
        with_lags = json.loads(f.read_text())
        lags += with_lags.get("lag_s", [])
    if not lags:
        return {}
    return {"node_lag_p50_ms": round(_quantile(lags, 0.5) * 1000, 2),
            "node_lag_p99_ms": round(_quantile(lags, 0.99) * 1000, 2)}


def _cpu_cell(row: dict[str, Any]) -> str:
    c = row.get("cpu_ms_per_request", {})
    return " / ".join(str(c.get(k, "-")) for k in ("coordinators", "fake_nodes", "clients",
                                                    "postgres"))


def markdown(results: dict[str, Any]) -> str:
    lines = [f"Database: {results['database_kind']}; replicas: {len(results['urls'])}; "
             f"fake node speed: {results['speed']}; node compression: "
             f"{results['compression']}; machine: {results['machine']}", ""]
    if results["scale"]:
        lines += ["| nodes | connect s | coordinator RSS MiB | idle CPU % | /healthz p50 / max ms "
                  "| probe req/s | added TTFT p50 ms | added TTFT p99 ms |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in results["scale"]:
            p = r.get("probe", {})
            lines.append(f"| {r['nodes']:,} | {r['connect_s']} | {r.get('rss_mib', '')} | "
                         f"{r.get('idle_cpu_pct', '')} | {r.get('healthz_p50_ms', '')} / "
                         f"{r.get('healthz_max_ms', '')} | {p.get('requests_per_s', '')} | "
                         f"{p.get('added_ttft_p50_ms', '')} | {p.get('added_ttft_p99_ms', '')} |")
        lines.append("")
    if results["throughput"]:
        lines += [f"Fleet of {results['fleet']:,} fake nodes.", "",
                  "| streams | req/s | tokens/s | added TTFT p50 ms | added TTFT p99 ms | "
                  "added total p50 ms | added total p99 ms | failed | coordinator CPU % | "
                  "CPU ms per request: coordinators / fake nodes / clients / PostgreSQL |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in results["throughput"]:
            lines.append(
                f"| {r['concurrency']} | {r['requests_per_s']} | {r['tokens_per_s']} | "
                f"{r.get('added_ttft_p50_ms', '')} | {r.get('added_ttft_p99_ms', '')} | "
                f"{r.get('added_total_p50_ms', '')} | {r.get('added_total_p99_ms', '')} | "
                f"{r['failed']} | {r.get('coordinator_cpu_pct', '')} | {_cpu_cell(r)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--database", default="sqlite",
                    help="sqlite (a fresh file), postgres (a fresh database), or a URL")
    ap.add_argument("--urls", default="", help="Coordinators already running (comma-separated)")
    ap.add_argument("--coordinator-pids", default="",
                    help="their process ids (comma-separated), for CPU per request")
    ap.add_argument("--model-dir", default=os.environ.get("SPARECYCLES_TINY_MODEL", "/tmp/tiny2"))
    ap.add_argument("--scale", default="1000,5000,10000", help="Node counts (0: skip)")
    ap.add_argument("--probe-concurrency", type=int, default=8)
    ap.add_argument("--probe-s", type=float, default=10.0)
    ap.add_argument("--fleet", type=int, default=200, help="Nodes for the throughput phase")
    ap.add_argument("--concurrency", default="16,64,256", help="Streams (0: skip)")
    ap.add_argument("--duration-s", type=float, default=20.0)
    ap.add_argument("--nodes-per-process", type=int, default=5000)
    ap.add_argument("--client-processes", type=int, default=1)
    ap.add_argument("--trace", default="conv")
    ap.add_argument("--prompt-tokens-max", type=int, default=256)
    ap.add_argument("--output-tokens-max", type=int, default=64)
    ap.add_argument("--speed", default="")
    ap.add_argument("--keys", type=int, default=0, help="API keys (default: enough streams)")
    ap.add_argument("--no-compression", action="store_true",
                    help="Fake nodes do not offer permessage-deflate (the real agent does)")
    ap.add_argument("--log-level", default="warning")
    ap.add_argument("--out", default="artifacts/control_plane")
    args = ap.parse_args()

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="control-plane-"))
    kind = args.database
    database = {"sqlite": f"sqlite:///{root / 'sparecycles.db'}",
                "postgres": None}.get(kind, kind)
    if kind == "postgres":
        database = fresh_postgres()
    assert database is not None
    scale = [int(x) for x in args.scale.split(",") if int(x) > 0]
    levels = [int(x) for x in args.concurrency.split(",") if int(x) > 0]
    keys = args.keys or max(2, -(-max([*levels, args.probe_concurrency]) // 48))
    creds = prepare(database, keys=keys, model=MODEL)
    creds_path = root / "creds.json"
    creds_path.write_text(json.dumps({"node_token": creds.node_token, "keys": list(creds.keys)}))
    run = Run(root=root, database=database, urls=[u for u in args.urls.split(",") if u],
              model_dir=Path(args.model_dir), speed=SpeedModel.parse(args.speed),
              creds=creds_path, compression=not args.no_compression,
              coordinator_pids=[int(p) for p in args.coordinator_pids.split(",") if p])
    results: dict[str, Any] = {
        "database_kind": kind if kind in ("sqlite", "postgres") else database.split(":")[0],
        "speed": run.speed.describe(), "compression": run.compression,
        "machine": f"{os.cpu_count()} cores, {platform.node()}",
        "scale": [], "throughput": [], "fleet": args.fleet, "args": vars(args)}
    console.print(f"work dir {root}; database {database}")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    try:
        with Progress(*columns, console=console) as progress:
            if not run.urls:
                start_coordinator(run, args.log_level)
            results["urls"] = run.urls
            for n in scale:
                row: dict[str, Any] = {"nodes": n}
                row |= add_nodes(run, n, args.nodes_per_process, progress)
                row |= idle_cost(run, progress)
                row["probe"] = client_load(run, args.probe_concurrency, args.probe_s, 1,
                                           progress, f"probe-{n}", args)
                results["scale"].append(row)
                console.print(f"{n:,} nodes: {json.dumps(row)}")
            if levels:
                if run.nodes_started > args.fleet:  # a fresh fleet of the asked size
                    stop(run.node_procs)
                    run.node_procs, run.nodes_started = [], 0
                    while run.nodes_online() > 0:
                        time.sleep(0.5)
                add_nodes(run, args.fleet, args.nodes_per_process, progress)
                for c in levels:
                    row = client_load(run, c, args.duration_s, args.client_processes, progress,
                                      f"load-{c}", args)
                    results["throughput"].append(row)
                    console.print(f"{c} streams: {json.dumps(row)}")
            results["fake_node_lag"] = fake_node_lag(run)
    finally:
        stop(run.node_procs)
        if run.coordinator is not None:
            stop([run.coordinator])
    stamp = f"{results['database_kind']}-{time.strftime('%Y%m%d-%H%M%S')}"
    (out_dir / f"{stamp}.json").write_text(json.dumps(results, indent=2))
    md = markdown(results)
    (out_dir / f"{stamp}.md").write_text(md)
    console.print(md)
    console.print(f"written to {out_dir}/{stamp}.json and .md")


if __name__ == "__main__":
    main()

"""The coordinator's own cost per request: CPU, admission and relay, one or more trees side by side.

For each source tree named (``--trees base=/path/to/other/worktree,new=.``) and each round, this
starts a fresh coordinator from that tree (its ``src`` first on ``PYTHONPATH``) on a fresh
database, connects nodes to it, warms it up, and then sends a fixed number of short streamed
chat requests at each concurrency. What it reports per run:

- **CPU ms per request of each process**: the coordinator, the nodes, the clients (this
  process) and the database's server processes (PostgreSQL: the backends of this run's
  database), from ``/proc/PID/stat`` (user + system) over exactly the measured requests;
- **admission** p50/p99 (request received to job sent to a node) and **relay** p50 (tokens
  received from the node to written to the client), from the coordinator's
  ``sparecycles_coordinator_overhead_seconds`` histogram, counted over the measured requests
  only (the buckets before are subtracted);
- with ``--relay-probe`` (fake nodes), the coordinator's **CPU per token message**: the same
  requests again with each answer sent as one message instead of one per token, and the
  difference in CPU per request divided by the difference in messages;
- the coordinator's read and write system calls, the voluntary context switches of its threads
  (wake-ups) and its system CPU share, per request: counts that a busy machine does not blur;
- the load average before and after, since this machine is shared; and, in the summary, the
  coordinator's CPU per request as a multiple of the clients' (the clients run the same code
  for every tree, so their cost moves only with the machine's load: on a busy shared machine
  the ratio is steadier than either figure).

Trees alternate round by round (base, new, base, new, ...), so that load from other work falls
on both. ``--pin`` gives the coordinator the first CPU to itself and puts the nodes, the clients
and this process on the others: on a two-core machine the load generator otherwise takes the
coordinator's core in turns, which inflates its admission latency (a quiet machine for the
coordinator, as the targets mean). ``--python LABEL=PATH`` runs that tree's coordinator with
another interpreter (a venv of another Python version with the project installed). Nodes are
fake (``--nodes fake``: ``sparecycles loadtest nodes``, a test tool answering random tokens on a
fixed schedule) or real (``--nodes real``: ``sparecycles node`` processes serving the tiny model
with its engine).

    python bench/coordinator_cost.py --nodes fake --fleet 50 --concurrency 256 --requests 3000 \\
        --trees base=/work/wt-coordcpu-base,new=. --rounds 2 --relay-probe
    python bench/coordinator_cost.py --nodes real --real-nodes 2 --concurrency 8,64 \\
        --requests 400 --trees base=/work/wt-coordcpu-base,new=. --rounds 2
    python bench/coordinator_cost.py --pin --trees py311=.,py313=. \\
        --python py313=/tmp/v3.13/bin/python          # the same tree on Python 3.13
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from sparecycles.tools.loadtest.clients import ClientConfig, Workload, run_clients
from sparecycles.tools.loadtest.procs import proc_sample, spawn, stop
from sparecycles.tools.loadtest.setup import prepare
from sparecycles.tools.localnet import free_port

MODEL = "tiny"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
ready_timeout_s = 180.0


@dataclass
class Net:
    tree: Path
    root: Path
    database: str
    pg_name: str | None
    coordinator: subprocess.Popen[bytes] | None = None
    url: str = ""
    nodes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    keys: tuple[str, ...] = ()
    node_token: str = ""

    def env(self) -> dict[str, str]:
        return {"PYTHONPATH": str(self.tree / "src"), "SPARECYCLES_VERIFICATION": "false",
                "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

    def readyz(self) -> dict[str, Any]:
        try:
            return httpx.get(self.url + "/readyz", timeout=5, trust_env=False).json()
        except (httpx.HTTPError, ValueError):
            return {}

    def wait(self, nodes: int) -> None:
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            for p in [self.coordinator, *self.nodes]:
                if p is not None and p.poll() is not None:
                    raise RuntimeError(f"a process exited ({p.returncode}); see {self.root}/logs")
            r = self.readyz()
            if r.get("status") == "ready" and r.get("nodes_online", 0) >= nodes:
                return
            time.sleep(0.3)
        raise TimeoutError(f"not ready with {nodes} nodes; see {self.root}/logs")

    def pg_backends(self) -> list[int]:
        if self.pg_name is None:
            return []
        import psycopg

        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s",
                                (self.pg_name,)).fetchall()
        return [r[0] for r in rows]


def cpu_s(pids: list[int]) -> float:
    return sum(s.cpu_s for p in pids if (s := proc_sample(p)) is not None)


def counters(pid: int) -> dict[str, float]:
    """A process's counts that CPU time on a busy machine blurs: read and write system calls
    (``/proc/PID/io``: socket writes and reads, the wake-ups of threads and of the event loop,
    SQLite's WAL writes), voluntary context switches summed over its threads (a thread that
    waits for work and is woken: the hand-offs), and its user and system CPU seconds."""
    out = {"syscr": 0.0, "syscw": 0.0, "vcsw": 0.0, "user_s": 0.0, "sys_s": 0.0}
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("syscr", "syscw"):
                out[key] = float(value)
        for task in Path(f"/proc/{pid}/task").iterdir():
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    out["vcsw"] += float(line.split()[1])
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        out["user_s"], out["sys_s"] = int(fields[11]) / tick, int(fields[12]) / tick
    except OSError:
        pass
    return out


def self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def histogram(url: str) -> dict[str, list[tuple[float, float]]]:
    text = httpx.get(url + "/metrics", timeout=30, trust_env=False).text
    out: dict[str, list[tuple[float, float]]] = {}
    for line in text.splitlines():
        if line.startswith("sparecycles_coordinator_overhead_seconds_bucket"):
            stage = line.split('stage="')[1].split('"')[0]
            le = line.split('le="')[1].split('"')[0]
            out.setdefault(stage, []).append(
                (float("inf") if le == "+Inf" else float(le), float(line.split()[-1])))
    return {k: sorted(v) for k, v in out.items()}


def quantile_ms(before: list[tuple[float, float]], after: list[tuple[float, float]],
                q: float) -> float | None:
    """The q-quantile, in ms, of what was observed between two readings of one histogram
    (linear inside a bucket)."""
    prior = dict(before)
    buckets = [(le, n - prior.get(le, 0.0)) for le, n in after]
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return None
    target, prev_le, prev_n = q * total, 0.0, 0.0
    for le, n in buckets:
        if n >= target:
            if le == float("inf"):
                return prev_le * 1000
            return (prev_le + (le - prev_le) * (target - prev_n) / max(n - prev_n, 1e-9)) * 1000
        prev_le, prev_n = le, n
    return prev_le * 1000


def start(tree: Path, args: argparse.Namespace, tokens_per_message: int,
          tree_label: str = "") -> Net:
    root = Path(tempfile.mkdtemp(prefix="coordinator-cost-"))
    pg_name = None
    if args.database == "postgres":
        import psycopg

        pg_name = f"sc_cost_{os.getpid()}_{int(time.time() * 1000) % 10**9}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {pg_name}")
        database = f"postgresql://postgres@127.0.0.1:5432/{pg_name}"
    else:
        database = f"sqlite:///{root / 'sparecycles.db'}"
    net = Net(tree=tree, root=root, database=database, pg_name=pg_name)
    most = max(args.concurrency)
    creds = prepare(database, keys=max(2, -(-most // 40)), model=MODEL)
    net.keys, net.node_token = creds.keys, creds.node_token
    port = free_port()
    net.url = f"http://127.0.0.1:{port}"
    net.coordinator = spawn(
        ["coordinator", "--port", str(port), "--database", database, "--log-level", "warning",
         "--model", f"{MODEL}={args.model_dir}", "--replica-id", f"cost-{port}"],
        root / "logs" / "coordinator.log", env=net.env(), cpus=args.coordinator_cpus,
        python=args.pythons.get(tree_label, ""))
    net.wait(0)
    if args.nodes == "fake":
        creds_path = root / "creds.json"
        creds_path.write_text(json.dumps({"node_token": net.node_token, "keys": list(net.keys)}))
        net.nodes.append(spawn(
            ["loadtest", "nodes", "--url", net.url, "--keys-file", str(creds_path),
             "--count", str(args.fleet), "--model", f"{MODEL}={args.model_dir}",
             "--speed", args.speed, "--jobs-max", str(args.jobs_max),
             "--tokens-per-message", str(tokens_per_message)],
            root / "logs" / "nodes.log", env=net.env(), cpus=args.other_cpus))
        net.wait(args.fleet)
    else:
        for i in range(args.real_nodes):
            cfg = Path(args.node_config_root) / f"node-{i}"  # the profile is kept between runs
            net.nodes.append(spawn(
                ["node", "--coordinator", net.url, "--token", net.node_token,
                 "--name", f"cost-{i}", "--config-dir", str(cfg), "--jobs-max", "8",
                 "--model", f"{MODEL}={args.model_dir}", "--log-level", "warning"],
                root / "logs" / f"node-{i}.log", env=net.env(), cpus=args.other_cpus))
        net.wait(args.real_nodes)
    return net


def finish(net: Net) -> None:
    stop(net.nodes)
    if net.coordinator is not None:
        stop([net.coordinator])
    if net.pg_name is not None:
        import psycopg

        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {net.pg_name} WITH (FORCE)")


def load(net: Net, concurrency: int, requests: int, max_tokens: int) -> dict[str, Any]:
    config = ClientConfig(urls=(net.url,), keys=net.keys, model=MODEL,
                          workload=Workload.fixed(8, max_tokens), concurrency=concurrency,
                          requests=requests, duration_s=0)
    return {"result": asyncio.run(run_clients(config))}


def measure(net: Net, concurrency: int, args: argparse.Namespace) -> dict[str, Any]:
    assert net.coordinator is not None
    load(net, concurrency, max(concurrency, args.warmup), args.max_tokens)  # not counted
    time.sleep(0.5)  # the warm-up's settlements land
    coord, nodes = [net.coordinator.pid], [p.pid for p in net.nodes]
    pg = net.pg_backends()
    h0, la0 = histogram(net.url), loadavg()
    c0, n0, p0, s0 = cpu_s(coord), cpu_s(nodes), cpu_s(pg), self_cpu_s()
    k0 = counters(coord[0])
    spy = None
    if args.py_spy:  # samples of the coordinator holding the GIL, over the measured requests
        out = Path(args.py_spy) / f"{net.tree.name}-c{concurrency}-{int(time.time())}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        spy = subprocess.Popen([py_spy(), "record", "--pid",
                                str(net.coordinator.pid), "--gil", "--rate", str(args.py_spy_rate),
                                "--format", "raw", "--output", str(out), "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
    tracer, trace_out = None, None
    if args.strace:  # the coordinator's system calls by kind (ptrace slows it: CPU not comparable)
        trace_out = Path(args.strace) / f"{net.tree.name}-c{concurrency}-{int(time.time())}.txt"
        trace_out.parent.mkdir(parents=True, exist_ok=True)
        tracer = subprocess.Popen(["strace", "-c", "-f", "-o", str(trace_out), "-p",
                                   str(net.coordinator.pid)], stderr=subprocess.DEVNULL)
        time.sleep(1.0)
    t0 = time.perf_counter()
    result = load(net, concurrency, args.requests, args.max_tokens)["result"]
    wall = time.perf_counter() - t0
    c1, n1, p1, s1 = cpu_s(coord), cpu_s(nodes), cpu_s(pg), self_cpu_s()
    k1 = counters(coord[0])
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(60)
    syscalls: dict[str, float] = {}
    if tracer is not None and trace_out is not None:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(60)
        syscalls = strace_counts(trace_out, max(1, len(result.samples)))
    h1, la1 = histogram(net.url), loadavg()
    ok = [s for s in result.samples if s.ok]
    n = max(1, len(result.samples))
    empty: list[tuple[float, float]] = []
    adm0, adm1 = h0.get("admission", empty), h1.get("admission", empty)
    return {
        "requests": len(result.samples), "failed": len(result.samples) - len(ok),
        "req_per_s": len(result.samples) / wall,
        "completion_tokens_mean": statistics.fmean(s.completion_tokens for s in ok) if ok else 0,
        "coordinator_cpu_ms": (c1 - c0) * 1000 / n,
        "nodes_cpu_ms": (n1 - n0) * 1000 / n,
        "clients_cpu_ms": (s1 - s0) * 1000 / n,
        "postgres_cpu_ms": (p1 - p0) * 1000 / n if pg else None,
        # the coordinator's system calls, thread wake-ups and CPU split, per request
        "coordinator_syscalls": (k1["syscr"] + k1["syscw"] - k0["syscr"] - k0["syscw"]) / n,
        "coordinator_writes": (k1["syscw"] - k0["syscw"]) / n,
        "coordinator_switches": (k1["vcsw"] - k0["vcsw"]) / n,
        "coordinator_sys_share": ((k1["sys_s"] - k0["sys_s"])
                                  / max(1e-9, k1["user_s"] + k1["sys_s"]
                                        - k0["user_s"] - k0["sys_s"])),
        "admission_p50_ms": quantile_ms(adm0, adm1, 0.5),
        "admission_p99_ms": quantile_ms(adm0, adm1, 0.99),
        "relay_p50_ms": quantile_ms(h0.get("relay", empty), h1.get("relay", empty), 0.5),
        # admission's parts: placing the job, and waiting for the hold's commit (newer trees)
        "placement_p50_ms": quantile_ms(h0.get("admission_placement", empty),
                                        h1.get("admission_placement", empty), 0.5),
        "hold_p50_ms": quantile_ms(h0.get("admission_hold", empty),
                                   h1.get("admission_hold", empty), 0.5),
        "hold_p99_ms": quantile_ms(h0.get("admission_hold", empty),
                                   h1.get("admission_hold", empty), 0.99),
        "load_before": la0, "load_after": la1,
        "errors": sorted({s.error[:120] for s in result.samples if not s.ok})[:3],
        "strace_per_request": syscalls,
    }


def strace_counts(path: Path, requests: int) -> dict[str, float]:
    """``strace -c`` output as calls per request by system call, and their total."""
    out: dict[str, float] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if (len(parts) >= 5 and parts[0].replace(".", "", 1).isdigit() and parts[3].isdigit()
                and parts[-1] != "total"):
            out[parts[-1]] = int(parts[3]) / requests
    out["total"] = sum(out.values())
    return out


def py_spy() -> str:
    """py-spy beside this interpreter (a dev install), else the one on ``PATH``."""
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else (shutil.which("py-spy") or str(here))


def fmt(v: Any, digits: int = 2) -> str:
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trees", default=f"this={Path(__file__).resolve().parents[1]}",
                    help="LABEL=PATH,... source trees to compare (each with src/)")
    ap.add_argument("--nodes", choices=("fake", "real"), default="fake")
    ap.add_argument("--fleet", type=int, default=50, help="fake nodes")
    ap.add_argument("--jobs-max", type=int, default=8, help="jobs per fake node at once")
    ap.add_argument("--speed", default="prefill=4000,decode=200,overhead=0.002",
                    help="fake nodes' timing (tools/loadtest/speed.py)")
    ap.add_argument("--real-nodes", type=int, default=2)
    ap.add_argument("--node-config-root", default="/tmp/coordinator-cost-nodes")
    ap.add_argument("--model-dir", default=os.environ.get("SPARECYCLES_TINY_MODEL", "/tmp/tiny2"))
    ap.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                    default=[8, 64])
    ap.add_argument("--requests", type=int, default=400, help="measured, per level")
    ap.add_argument("--warmup", type=int, default=64, help="requests before measuring")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--relay-probe", action="store_true",
                    help="fake nodes: again with one message per answer, for CPU per message")
    ap.add_argument("--py-spy", default="",
                    help="a folder: record the coordinator (GIL samples) during each level")
    ap.add_argument("--py-spy-rate", type=int, default=250, help="py-spy samples a second")
    ap.add_argument("--strace", default="",
                    help="folder: count the coordinator's system calls over the measured "
                         "requests (strace -c -f; slows it, so its CPU figures do not compare)")
    ap.add_argument("--pin", action="store_true",
                    help="the coordinator alone on the first CPU, and the nodes, the clients "
                         "and this process on the others: the coordinator's figures without "
                         "the load generator's contention (a quiet machine for it)")
    ap.add_argument("--python", action="append", default=[], metavar="LABEL=PATH",
                    help="run that tree's coordinator with another interpreter (a venv of "
                         "another Python version with the project installed); repeatable")
    ap.add_argument("--out", default="artifacts/coordinator_cost")
    args = ap.parse_args()
    labels = {t.partition("=")[0] for t in args.trees.split(",")}
    args.pythons = {}
    for given in args.python:
        label, eq, path = given.partition("=")
        if not eq or label not in labels:
            ap.error(f"--python {given!r}: expected LABEL=PATH with a LABEL of --trees "
                     f"({', '.join(sorted(labels))})")
        args.pythons[label] = path
    args.coordinator_cpus = args.other_cpus = None
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            ap.error("--pin needs two CPUs or more")
        args.coordinator_cpus, args.other_cpus = {cpus[0]}, set(cpus[1:])
        os.sched_setaffinity(0, args.other_cpus)  # the clients run in this process
    trees = [(label, Path(path).resolve()) for label, _, path in
             (t.partition("=") for t in args.trees.split(","))]
    probes = [1] + ([args.max_tokens] if args.relay_probe and args.nodes == "fake" else [])
    rows: list[dict[str, Any]] = []
    print(f"{args.nodes} nodes, {args.database}, {args.requests} requests a level, "
          f"max_tokens {args.max_tokens}; {os.cpu_count()} cores"
          + (f"; the coordinator pinned to CPU {min(args.coordinator_cpus)}, the rest to "
             f"{sorted(args.other_cpus)}" if args.pin else ""))
    head = (f"{'tree':>6} {'rnd':>3} {'tpm':>3} {'conc':>4} {'req/s':>6} {'coord ms':>8} "
            f"{'nodes':>6} {'client':>6} {'pg':>5} {'adm p50':>7} {'adm p99':>7} "
            f"{'relay50':>7} {'sysc':>5} {'wr':>5} {'csw':>5} {'sys%':>4} {'tok':>4} {'fail':>4} "
            f"{'load':>9}")
    print(head)
    for rnd in range(args.rounds):
        order = trees if rnd % 2 == 0 else list(reversed(trees))
        for label, tree in order:
            for tpm in probes:
                net = start(tree, args, tpm, label)
                try:
                    for c in args.concurrency:
                        r = measure(net, c, args) | {"tree": label, "round": rnd + 1,
                                                     "tokens_per_message": tpm,
                                                     "concurrency": c}
                        rows.append(r)
                        print(f"{label:>6} {rnd + 1:>3} {tpm:>3} {c:>4} {r['req_per_s']:>6.1f} "
                              f"{r['coordinator_cpu_ms']:>8.2f} {r['nodes_cpu_ms']:>6.2f} "
                              f"{r['clients_cpu_ms']:>6.2f} {fmt(r['postgres_cpu_ms']):>5} "
                              f"{fmt(r['admission_p50_ms']):>7} {fmt(r['admission_p99_ms']):>7} "
                              f"{fmt(r['relay_p50_ms']):>7} "
                              f"{r['coordinator_syscalls']:>5.1f} {r['coordinator_writes']:>5.1f} "
                              f"{r['coordinator_switches']:>5.1f} "
                              f"{100 * r['coordinator_sys_share']:>4.0f} "
                              f"{r['completion_tokens_mean']:>4.1f} {r['failed']:>4} "
                              f"{r['load_before']:>4.1f}-{r['load_after']:<4.1f}", flush=True)
                        if r["hold_p50_ms"] is not None:
                            print(f"{'':>14} admission's parts: placement p50 "
                                  f"{fmt(r['placement_p50_ms'])} ms, waiting for the hold's "
                                  f"commit p50 {fmt(r['hold_p50_ms'])} / p99 "
                                  f"{fmt(r['hold_p99_ms'])} ms")
                        if r["errors"]:
                            print("   errors:", r["errors"])
                        if r["strace_per_request"]:
                            calls = r["strace_per_request"]
                            top = sorted(((k, v) for k, v in calls.items() if k != "total"),
                                         key=lambda kv: -kv[1])[:10]
                            print(f"   system calls a request (strace): "
                                  f"{calls['total']:.1f}: "
                                  + ", ".join(f"{k} {v:.1f}" for k, v in top))
                finally:
                    finish(net)
    print("\nmedians over rounds (coordinator CPU ms/request; admission p50/p99 ms):")
    for label, _ in trees:
        for c in args.concurrency:
            one = [r for r in rows if r["tree"] == label and r["concurrency"] == c
                   and r["tokens_per_message"] == 1]
            cpu = statistics.median(r["coordinator_cpu_ms"] for r in one)
            adm = [r["admission_p50_ms"] for r in one if r["admission_p50_ms"] is not None]
            adm99 = [r["admission_p99_ms"] for r in one if r["admission_p99_ms"] is not None]
            # the clients run the same code for every tree: their CPU per request moves with
            # the machine's load alone, so this ratio is the figure least moved by other work
            ratio = statistics.median(r["coordinator_cpu_ms"] / r["clients_cpu_ms"] for r in one)
            sysc = statistics.median(r["coordinator_syscalls"] for r in one)
            csw = statistics.median(r["coordinator_switches"] for r in one)
            rps = statistics.median(r["req_per_s"] for r in one)
            line = (f"  {label:>6} c={c:<4} {rps:.0f} req/s, coordinator {cpu:.2f} ms/request "
                    f"({ratio:.2f}x the clients'), admission "
                    f"{fmt(statistics.median(adm) if adm else None)} / "
                    f"{fmt(statistics.median(adm99) if adm99 else None)} ms, "
                    f"{sysc:.1f} system calls and {csw:.1f} thread wake-ups a request")
            batched = [r for r in rows if r["tree"] == label and r["concurrency"] == c
                       and r["tokens_per_message"] > 1]
            if batched:
                msgs = args.max_tokens - 1  # messages saved per request
                per = statistics.median(
                    (a["coordinator_cpu_ms"] - b["coordinator_cpu_ms"]) / msgs
                    for a, b in zip(one, batched, strict=False))
                line += f", relay {per:.3f} ms CPU per token message"
            print(line)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.nodes}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2, default=str))
    print(f"written to {path}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

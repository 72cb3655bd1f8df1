"""The database work of short jobs as the coordinator does it, without HTTP, nodes or placement.

Each of ``--concurrency`` coroutines on one event loop runs jobs one after another the way
dispatch does: the hold with the job's row and its first attempt's row (``Ledger.hold_async(
job=..., attempt_start=...)``: a job placed as it is admitted), a pause standing for the answer's
streaming (``--stream-ms``), then the settlement with the job's final row and the attempt's end,
queued on dispatch's ``StoreWriter`` (``writer.queue``) as ``Dispatcher._finish_soon`` does.
With ``--placed-later`` the job is held without its attempt and placed after, its attempt's row
written by the writer in the background (``writer.background(store.start_attempt, ...)``): a job
that waited for a node. Beside them, as in the coordinator: a WAL checkpoint every second on its
own thread (``Store.checkpoint``), and the price book read every second (admission's cache).

What it reports per job, over the measured jobs only: the process's CPU milliseconds (user +
system, all threads), the voluntary context switches of its threads (each a thread that waited
and was woken: the hand-offs), and, with ``--strace``, the system calls by kind (``strace -c
-f`` attached for the measured part only). Trees alternate round by round, each run in a fresh
process with that tree's ``src`` first on ``PYTHONPATH``, on a fresh SQLite file (or a fresh
PostgreSQL database with ``--database postgres``)::

    python bench/ledger_path.py --trees base=/work/main,new=. --concurrency 8,64 --jobs 2000 \\
        --rounds 3 [--strace] [--placed-later]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _switches() -> int:
    """Voluntary context switches of every thread of this process so far."""
    total = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


async def _child(args: argparse.Namespace) -> dict[str, Any]:
    from sparecycles.coordinator.writer import StoreWriter
    from sparecycles.ledger.service import Ledger, WorkShare
    from sparecycles.store import Store
    from sparecycles.types import AttemptOutcome, JobFinal, JobRecord, JobState

    store = Store(args.url, background_checkpoints=True)
    store.migrate()
    ledger = Ledger(store.sessions)
    client = store.ensure_client("bench")
    ledger.deposit(client, 10**12, "fund")
    writer = StoreWriter(store)
    writer.start()
    stop = threading.Event()

    def checkpoints() -> None:  # the coordinator's housekeeping, once a second
        while not stop.wait(1.0):
            store.checkpoint()
            ledger.prices()

    side = threading.Thread(target=checkpoints, daemon=True)
    side.start()
    run = uuid.uuid4().hex[:6]
    share = [WorkShare("owner1", "node1", "gaming-pc", 20, 16, 0.08)]

    async def job(n: int) -> None:
        job_id = f"job-{run}-{n}"
        now = time.time()
        start = None if args.placed_later else dict(
            attempt=1, node_id="node1", prompt_tokens=20, outcome=str(AttemptOutcome.RUNNING),
            started_at_s=now)
        row = JobRecord(id=job_id, client_id=client, api_key_id=None, model="tiny",
                        endpoint="chat.completions", state=JobState.ADMITTED if start is None
                        else JobState.PLACED, stream=True, prompt_tokens=20, max_tokens=16,
                        replica_id="r1", created_at_s=now, node_id="node1" if start else None,
                        attempts=1 if start else 0)
        await ledger.hold_async(job_id, client, "tiny", 20, 16, job=row, attempt_start=start)
        if args.placed_later:
            writer.background(store.start_attempt, job_id=job_id, attempt=1, node_id="node1",
                              prompt_tokens=20)
        await asyncio.sleep(args.stream_ms / 1000)
        end = time.time()
        final = JobFinal(state=JobState.DONE, completion_tokens=16, finished_at_s=end,
                         total_s=end - now, finish_reason="stop", first_token_at_s=now + 0.01,
                         time_to_first_token_s=0.01)
        ends = [dict(attempt=1, outcome=str(AttemptOutcome.DONE), completion_tokens=16,
                     time_to_first_token_s=0.01, total_s=end - now, ended_at_s=end,
                     busy_s=0.08, energy_j=1.0, energy_source="estimated", signature="x" * 88)]

        async def settle() -> None:
            await ledger.settle_async(job_id, client, "tiny", 20, 16, share, job=final,
                                      attempt_ends=ends)

        await writer.queue(settle)

    async def worker(first: int, count: int) -> None:
        for n in range(first, first + count):
            await job(n)

    async def phase(base: int, total: int) -> None:
        c = args.concurrency
        per = [total // c + (i < total % c) for i in range(c)]
        firsts = [base + sum(per[:i]) for i in range(c)]
        await asyncio.gather(*(worker(f, k) for f, k in zip(firsts, per, strict=True)))

    await phase(0, args.warmup)
    print(json.dumps({"ready": os.getpid()}), flush=True)
    if args.strace:
        sys.stdin.readline()  # the runner attached strace
    cpu0, sw0, t0 = time.process_time(), _switches(), time.perf_counter()
    await phase(args.warmup, args.jobs)
    cpu, sw, wall = time.process_time() - cpu0, _switches() - sw0, time.perf_counter() - t0
    stop.set()
    await writer.drain()
    await writer.stop()
    problems = ledger.check()
    store.close()
    return {"cpu_ms_per_job": 1000 * cpu / args.jobs, "switches_per_job": sw / args.jobs,
            "jobs_per_s": args.jobs / wall, "problems": problems[:3]}


def _strace_counts(path: Path) -> dict[str, int]:
    """``strace -c`` output: calls by system call name."""
    out: dict[str, int] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0].replace(".", "", 1).isdigit() and parts[-1] != "total":
            try:
                out[parts[-1]] = int(parts[3])
            except ValueError:
                continue
    return out


def _fresh_database(kind: str, root: Path) -> tuple[str, str | None]:
    if kind == "sqlite":
        return f"sqlite:///{root}/bench-{uuid.uuid4().hex[:8]}.db", None
    from sqlalchemy import create_engine, text

    name = f"ledger_path_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN.replace("postgresql://", "postgresql+psycopg://"),
                          isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return PG_ADMIN.rsplit("/", 1)[0] + f"/{name}", name


def _drop_database(name: str) -> None:
    from sqlalchemy import create_engine, text

    admin = create_engine(PG_ADMIN.replace("postgresql://", "postgresql+psycopg://"),
                          isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    admin.dispose()


def _run_one(tree: Path, args: argparse.Namespace, concurrency: int, root: Path
             ) -> dict[str, Any]:
    url, pg_name = _fresh_database(args.database, root)
    cmd = [sys.executable, __file__, "--child", "--url", url, "--concurrency", str(concurrency),
           "--jobs", str(args.jobs), "--warmup", str(args.warmup), "--stream-ms",
           str(args.stream_ms)]
    cmd += ["--placed-later"] if args.placed_later else []
    cmd += ["--strace"] if args.strace else []
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                            text=True)
    assert proc.stdout is not None and proc.stdin is not None
    ready = json.loads(proc.stdout.readline())
    tracer, trace_out = None, root / f"strace-{uuid.uuid4().hex[:6]}.txt"
    if args.strace:
        tracer = subprocess.Popen(["strace", "-c", "-f", "-o", str(trace_out), "-p",
                                   str(ready["ready"])], stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # attached to every thread
        proc.stdin.write("go\n")
        proc.stdin.flush()
    result = json.loads(proc.stdout.readline())
    proc.wait(timeout=120)
    if tracer is not None:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=30)
        calls = _strace_counts(trace_out)
        result["syscalls_per_job"] = {k: round(v / args.jobs, 1) for k, v in
                                      sorted(calls.items(), key=lambda kv: -kv[1])[:8]}
        result["syscalls_total_per_job"] = round(sum(calls.values()) / args.jobs, 1)
    if pg_name:
        _drop_database(pg_name)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trees", default=f"this={Path(__file__).resolve().parents[1]}")
    ap.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    ap.add_argument("--concurrency", default="8,64")
    ap.add_argument("--jobs", type=int, default=2000, help="measured jobs per run")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--stream-ms", type=float, default=80.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--placed-later", action="store_true")
    ap.add_argument("--strace", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--url", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.concurrency = int(args.concurrency)
        print(json.dumps(asyncio.run(_child(args))), flush=True)
        return
    trees = [(n, Path(p).resolve()) for n, p in (t.split("=", 1) for t in args.trees.split(","))]
    print(f"# {args.database}, {args.jobs} jobs a run after {args.warmup}, stream "
          f"{args.stream_ms} ms, placed {'later' if args.placed_later else 'on admission'}; "
          f"load average {os.getloadavg()[0]:.2f} at start", flush=True)
    results: dict[tuple[int, str], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as d:
        for c in (int(x) for x in args.concurrency.split(",")):
            for r in range(args.rounds):
                for name, tree in trees:
                    res = _run_one(tree, args, c, Path(d))
                    results.setdefault((c, name), []).append(res)
                    print(f"  c={c} round {r + 1} {name}: {json.dumps(res)} "
                          f"(load {os.getloadavg()[0]:.2f})", flush=True)
    print("| streams | tree | CPU ms/job (rounds) | median | wake-ups/job | jobs/s |"
          + (" system calls/job |" if args.strace else ""))
    print("|---|---|---|---|---|---|" + ("---|" if args.strace else ""))
    for (c, name), rs in results.items():
        cpus = [x["cpu_ms_per_job"] for x in rs]
        line = (f"| {c} | {name} | {', '.join(f'{x:.3f}' for x in cpus)} | "
                f"{statistics.median(cpus):.3f} | "
                f"{statistics.median(x['switches_per_job'] for x in rs):.1f} | "
                f"{statistics.median(x['jobs_per_s'] for x in rs):.0f} |")
        if args.strace:
            line += f" {statistics.median(x['syscalls_total_per_job'] for x in rs):.0f} |"
        print(line)
        bad = [p for x in rs for p in x["problems"]]
        if bad:
            print(f"  LEDGER CHECK FAILED ({name}): {bad[0]}")
    print(f"# load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()

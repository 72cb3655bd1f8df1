"""Ledger settlements per second on SQLite and PostgreSQL, and how it grows with concurrency.

One settlement is what one finished job costs the ledger: a hold at admission, then a post of
the actual charge (the rest released), one owner's earning and the platform fee — two calls,
four transfers, at least two transactions when run alone.

Modes:
- ``calls``: each of N threads (one per client) calls ``hold`` then ``settle`` the way the
  coordinator does; concurrent calls are committed together by the ledger's group commit.
- ``batch``: N threads each submit their clients' holds, then settlements, ``--batch`` at a
  time, through ``Ledger.submit`` (one transaction per batch).

``--processes P`` (PostgreSQL) splits the threads over P processes, each with its own ``Ledger``
and connections, started together: what P coordinator replicas settling into one database do.
One Python process is bound by its GIL; several are bound by the cores and the database.

Run (writes nothing but a temporary SQLite file or a temporary PostgreSQL schema)::

    PYTHONPATH=src .venv/bin/python bench/ledger_bench.py --database sqlite \\
        --database postgresql://postgres@127.0.0.1:5432/test --threads 1,4,16,64

Results and the machine they came from are in docs/benchmarks.md ("Ledger").
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, text

from sparecycles.ledger.engine import HoldOp, SettleOp
from sparecycles.ledger.service import Ledger, WorkShare
from sparecycles.store.db import Base, make_engine
from sparecycles.store.ledger_queries import LedgerStore


@contextmanager
def database(url: str) -> Iterator[Engine]:
    """A fresh database: a temporary SQLite file, or a new schema on PostgreSQL."""
    if url == "sqlite":
        with tempfile.TemporaryDirectory() as d:
            engine = make_engine(f"sqlite:///{d}/bench.db")
            LedgerStore(engine).create_tables()
            yield engine
            engine.dispose()
        return
    schema = f"ledger_bench_{uuid.uuid4().hex[:10]}"
    url = url.replace("postgresql://", "postgresql+psycopg://", 1)
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f"CREATE SCHEMA {schema}"))
    engine = _pg_engine(url, schema)
    try:
        Base.metadata.create_all(engine)
        yield engine
    finally:
        engine.dispose()
        with admin.connect() as c:
            c.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


_schemas: dict[int, tuple[str, str]] = {}


def _pg_engine(url: str, schema: str) -> Engine:
    engine = create_engine(url, pool_size=70, max_overflow=10,
                           connect_args={"options": f"-csearch_path={schema}"})
    _schemas[id(engine)] = (url, schema)  # how another process reaches the same schema
    return engine


def _share(i: int) -> list[WorkShare]:
    return [WorkShare(f"owner{i % 50}", f"node{i % 200}", "gaming-pc", 200, 100, 1.5)]


def run(engine: Engine, mode: str, threads: int, per_thread: int, batch: int,
        processes: int = 1) -> float:
    if processes > 1:
        return _run_processes(engine, mode, threads, per_thread, batch, processes)
    return _run(engine, mode, threads, per_thread, batch)


def _run_processes(engine: Engine, mode: str, threads: int, per_thread: int, batch: int,
                   processes: int) -> float:
    """The threads split over ``processes`` processes on the same schema, started together;
    settlements over the span from the first start to the last finish."""
    url, schema = _schemas[id(engine)]
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    share = [threads // processes + (i < threads % processes) for i in range(processes)]
    procs = [ctx.Process(target=_worker, args=(url, schema, mode, n, per_thread, batch,
                                               barrier, results)) for n in share if n]
    for p in procs:
        p.start()
    spans = [results.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
    if any(isinstance(x, str) for x in spans):
        raise SystemExit("a bench process failed: " + next(x for x in spans if isinstance(x, str)))
    problems = Ledger(engine).check()
    if problems:
        raise SystemExit("ledger check failed after the run: " + problems[0])
    done = sum(n for n, _, _ in spans)
    return done / (max(e for _, _, e in spans) - min(b for _, b, _ in spans))


def _worker(url: str, schema: str, mode: str, threads: int, per_thread: int, batch: int,
            barrier: Any, results: Any) -> None:
    try:
        engine = _pg_engine(url, schema)
        span = _run(engine, mode, threads, per_thread, batch, barrier=barrier, check=False,
                    spans=True)
        results.put(span)
        engine.dispose()
    except BaseException as exc:  # reported by the parent
        results.put(f"{type(exc).__name__}: {exc}")


def _run(engine: Engine, mode: str, threads: int, per_thread: int, batch: int, *,
         barrier: Any = None, check: bool = True, spans: bool = False) -> Any:
    ledger = Ledger(engine, lanes=min(threads, 8) if engine.dialect.name != "sqlite" else 1)
    run_id = uuid.uuid4().hex[:6]
    for t in range(threads):  # funds and accounts first: not part of the measurement
        ledger.deposit(f"c{run_id}{t}", 10**12, f"fund-{run_id}-{t}")
    ledger.submit([SettleOp("warm", "x", "m", 0, 0, ())])  # compile statements (it fails)
    errors: list[BaseException] = []

    def calls(t: int) -> None:
        client = f"c{run_id}{t}"
        for i in range(per_thread):
            job = f"j{run_id}-{t}-{i}"
            ledger.hold(job, client, "bench-model", 200, 256)
            ledger.settle(job, client, "bench-model", 200, 100, _share(i))

    def batched(t: int) -> None:
        client = f"c{run_id}{t}"
        for start in range(0, per_thread, batch):
            jobs = [f"j{run_id}-{t}-{i}" for i in range(start, min(start + batch, per_thread))]
            results = ledger.submit([HoldOp(j, client, "bench-model", 200, 256) for j in jobs])
            results += ledger.submit([SettleOp(j, client, "bench-model", 200, 100, tuple(
                _share(i))) for i, j in enumerate(jobs)])
            bad = [r for r in results if isinstance(r, BaseException)]
            if bad:
                raise bad[0]

    target: Callable[[int], None] = calls if mode == "calls" else batched

    def guarded(t: int) -> None:
        try:
            target(t)
        except BaseException as exc:  # reported after the run
            errors.append(exc)

    workers = [threading.Thread(target=guarded, args=(t,)) for t in range(threads)]
    if barrier is not None:
        barrier.wait(600)  # every process funded and warm: start together
    wall0, start = time.time(), time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    if spans:
        return threads * per_thread, wall0, wall0 + elapsed
    problems = ledger.check() if check else []
    if problems:
        raise SystemExit("ledger check failed after the run: " + problems[0])
    return threads * per_thread / elapsed


def preload(engine: Engine, settlements: int) -> None:
    """History before the measurement: a ledger in steady state, with planner statistics."""
    ledger = Ledger(engine)
    ledger.deposit("preload", 10**15, "preload-fund")
    for start in range(0, settlements, 256):
        jobs = [f"pre{i}" for i in range(start, min(start + 256, settlements))]
        ledger.submit([HoldOp(j, "preload", "bench-model", 200, 256) for j in jobs])
        ledger.submit([SettleOp(j, "preload", "bench-model", 200, 100, tuple(_share(i)))
                       for i, j in enumerate(jobs)])
    with engine.begin() as c:
        c.execute(text("ANALYZE"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--database", action="append", default=[],
                   help="'sqlite' (a temporary file) or a postgresql:// URL; repeatable")
    p.add_argument("--threads", default="1,4,16,64")
    p.add_argument("--modes", default="calls,batch")
    p.add_argument("--settlements", type=int, default=4000, help="per configuration")
    p.add_argument("--batch", type=int, default=128, help="ops per transaction in batch mode")
    p.add_argument("--repeat", type=int, default=3, help="runs per configuration; median shown")
    p.add_argument("--preload", type=int, default=20_000, help="settled jobs before measuring")
    p.add_argument("--processes", default="1",
                   help="processes to split the threads over, e.g. 1,2 (PostgreSQL only)")
    args = p.parse_args()
    load = os.getloadavg()[0]
    print(f"# {os.cpu_count()} CPUs, load average {load:.1f} at start; settlements/s, median "
          f"of {args.repeat} runs of {args.settlements}; {args.preload} jobs preloaded")
    print("| store | mode | threads (clients) | settlements/s |")
    print("|---|---|---|---|")
    for url in args.database or ["sqlite"]:
        name = "SQLite" if url == "sqlite" else "PostgreSQL"
        with database(url) as engine:
            preload(engine, args.preload)
            for mode in args.modes.split(","):
                for threads in (int(t) for t in args.threads.split(",")):
                    per = max(1, args.settlements // threads)
                    for procs in (int(x) for x in args.processes.split(",")):
                        if procs > 1 and (name == "SQLite" or procs > threads):
                            continue
                        rates = [run(engine, mode, threads, per, args.batch, procs)
                                 for _ in range(args.repeat)]
                        label = f"{threads}" + (f" in {procs} processes" if procs > 1 else "")
                        print(f"| {name} | {mode} | {label} | "
                              f"{statistics.median(rates):,.0f} |", flush=True)
    print(f"# load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()

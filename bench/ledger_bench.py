"""Ledger settlements per second on SQLite and PostgreSQL, and how it grows with concurrency.

One settlement is what one finished job costs the ledger: a hold at admission, then a post of
the actual charge (the rest released), one owner's earning and the platform fee — two calls,
four transfers, at least two transactions when run alone.

Modes:
- ``calls``: each of N threads (one per client) calls ``hold`` then ``settle`` the way the
  coordinator does; concurrent calls are committed together by the ledger's group commit.
- ``batch``: N threads each submit their clients' holds, then settlements, ``--batch`` at a
  time, through ``Ledger.submit`` (one transaction per batch).

Run (writes nothing but a temporary SQLite file or a temporary PostgreSQL schema)::

    PYTHONPATH=src .venv/bin/python bench/ledger_bench.py --database sqlite \\
        --database postgresql://postgres@127.0.0.1:5432/test --threads 1,4,16,64

Results and the machine they came from are in docs/benchmarks.md ("Ledger").
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, text

from sparecycles.ledger import Ledger, WorkShare
from sparecycles.ledger_engine import HoldOp, SettleOp
from sparecycles.store.db import Base, make_engine
from sparecycles.store.ledger_store import LedgerStore


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
    engine = create_engine(url, pool_size=70, max_overflow=10,
                           connect_args={"options": f"-csearch_path={schema}"})
    try:
        Base.metadata.create_all(engine)
        yield engine
    finally:
        engine.dispose()
        with admin.connect() as c:
            c.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def _share(i: int) -> list[WorkShare]:
    return [WorkShare(f"owner{i % 50}", f"node{i % 200}", "gaming-pc", 200, 100, 1.5)]


def run(engine: Engine, mode: str, threads: int, per_thread: int, batch: int) -> float:
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
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    problems = ledger.check()
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
                    rates = [run(engine, mode, threads, per, args.batch)
                             for _ in range(args.repeat)]
                    print(f"| {name} | {mode} | {threads} | {statistics.median(rates):,.0f} |",
                          flush=True)
    print(f"# load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()

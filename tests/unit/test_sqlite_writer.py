"""SQLite's one writer connection (``store.db.SqliteWriter``), shared by the ledger and the store:
one transaction at a time on one connection, a failed transaction rolled back without losing
the writer, a broken connection replaced, writes on the event loop that never wait for another
writer (they go to a worker thread instead), and the ledger's and the store writer's coroutines
using it so."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

from sparecycles.coordinator.writer import StoreWriter
from sparecycles.ledger.service import Ledger, WorkShare
from sparecycles.store import Store
from sparecycles.store.db import SqliteWriter, busy_timeout_ms, sqlite_run, writer_of
from sparecycles.store.errors import WriterBusy, transient_store_errors
from sparecycles.types import AttemptOutcome, JobFinal, JobRecord, JobState


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = Store(f"sqlite:///{tmp_path / 'w.db'}", background_checkpoints=True)
    s.migrate()
    with s.engine.begin() as c:
        c.exec_driver_sql("CREATE TABLE counter (k INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
        c.exec_driver_sql("INSERT INTO counter VALUES (1, 0)")
    yield s
    s.close()


def _count(store: Store) -> int:
    with store.engine.connect() as c:
        return int(c.exec_driver_sql("SELECT n FROM counter WHERE k = 1").scalar_one())


def test_threads_write_one_at_a_time_on_one_connection(store: Store) -> None:
    writer = writer_of(store.engine)
    assert isinstance(writer, SqliteWriter) and writer_of(store.engine) is writer
    inside, overlaps, errors = [0], [0], []
    guard = threading.Lock()

    def bump(times: int) -> None:
        try:
            for _ in range(times):
                with writer.begin() as conn:
                    with guard:
                        inside[0] += 1
                        overlaps[0] += inside[0] > 1
                    sqlite_run(conn, "UPDATE counter SET n = n + 1 WHERE k = 1")
                    with guard:
                        inside[0] -= 1
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=bump, args=(100,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and overlaps == [0]
    assert _count(store) == 800
    assert writer.opened == 1  # one connection, kept


def test_a_failed_transaction_is_rolled_back_and_the_writer_goes_on(store: Store) -> None:
    writer = writer_of(store.engine)
    with pytest.raises(ValueError), writer.begin() as conn:
        sqlite_run(conn, "UPDATE counter SET n = n + 5 WHERE k = 1")
        raise ValueError("the caller's own failure")
    with pytest.raises(IntegrityError), writer.begin() as conn:  # the driver's, as SQLAlchemy's
        sqlite_run(conn, "UPDATE counter SET n = n + 7 WHERE k = 1")
        sqlite_run(conn, "INSERT INTO counter VALUES (1, 0)")
    assert _count(store) == 0  # neither landed
    with writer.begin() as conn:
        sqlite_run(conn, "UPDATE counter SET n = n + 1 WHERE k = 1")
    assert _count(store) == 1 and writer.opened == 1


def test_the_database_away_and_back(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer's connection broken under it: the next transaction opens another. The
    database unreachable: the write fails with a transient error (callers wait those out),
    and once it is back the writer writes again."""
    writer = writer_of(store.engine)
    assert isinstance(writer, SqliteWriter)
    with writer.begin() as conn:
        sqlite_run(conn, "UPDATE counter SET n = n + 1 WHERE k = 1")
        raw = conn.connection.dbapi_connection
    assert raw is not None
    raw.close()  # broken under the writer
    with writer.begin() as conn:
        sqlite_run(conn, "UPDATE counter SET n = n + 1 WHERE k = 1")
    assert _count(store) == 2 and writer.opened == 2

    with writer.begin() as conn:
        broken = conn.connection.dbapi_connection
    assert broken is not None
    broken.close()
    real = store.engine.connect

    def away() -> Any:
        raise OperationalError("connect", {}, sqlite3.OperationalError("unable to open database"))

    monkeypatch.setattr(store.engine, "connect", away)
    with pytest.raises(transient_store_errors), writer.begin():
        pass
    monkeypatch.setattr(store.engine, "connect", real)
    with writer.begin() as conn:
        sqlite_run(conn, "UPDATE counter SET n = n + 1 WHERE k = 1")
    assert _count(store) == 3


def test_a_write_that_must_not_wait_is_refused_at_once(store: Store, tmp_path: Path) -> None:
    """``begin(wait=False)`` (on the event loop): another thread writing, or another process
    holding the file's write lock, is ``WriterBusy`` at once, not a wait of up to the busy
    timeout; the connection's busy timeout is as before afterwards."""
    writer = writer_of(store.engine)
    assert isinstance(writer, SqliteWriter)
    with writer.lock:  # another thread is writing
        t0 = time.perf_counter()
        with pytest.raises(WriterBusy), writer.begin(wait=False):
            pytest.fail("ran while another thread wrote")
        assert time.perf_counter() - t0 < 0.5
    other = sqlite3.connect(tmp_path / "w.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process's write transaction
    try:
        t0 = time.perf_counter()
        with pytest.raises(WriterBusy), writer.begin(wait=False):
            pytest.fail("ran while another connection wrote")
        assert time.perf_counter() - t0 < 1.0
    finally:
        other.rollback()
        other.close()
    with writer.begin(wait=False) as conn:
        sqlite_run(conn, "UPDATE counter SET n = n + 1 WHERE k = 1")
        assert sqlite_run(conn, "PRAGMA busy_timeout").fetchone()[0] == busy_timeout_ms
    assert _count(store) == 1 and writer.opened == 1


def _job(client: str, job_id: str, now: float) -> tuple[JobRecord, dict[str, Any]]:
    row = JobRecord(id=job_id, client_id=client, model="m", endpoint="chat.completions",
                    prompt_tokens=10, max_tokens=8, created_at_s=now, state=JobState.PLACED,
                    node_id="n1", attempts=1)
    start = dict(attempt=1, node_id="n1", prompt_tokens=10, outcome=str(AttemptOutcome.RUNNING),
                 started_at_s=now)
    return row, start


def test_the_ledger_and_the_store_writer_write_on_the_loop_and_wait_on_a_thread(
        store: Store) -> None:
    """Coroutines' holds, settlements and metering writes run on the event loop while nobody
    else writes; while another thread writes, they wait for it on the worker thread, and the
    loop goes on meanwhile. Every job's money and rows land exactly once."""
    ledger = Ledger(store.sessions)
    client = store.ensure_client("acme")
    ledger.deposit(client, 10**9, "fund")
    lane = ledger._lanes[0]
    writer = writer_of(store.engine)
    assert isinstance(writer, SqliteWriter)
    share = [WorkShare("own1", "n1", "gaming-pc", 10, 8, 0.1)]

    async def one(job_id: str, sw: StoreWriter) -> None:
        now = time.time()
        row, start = _job(client, job_id, now)
        await ledger.hold_async(job_id, client, "m", 10, 8, job=row, attempt_start=start)
        sw.background(store.end_attempt, job_id, 1, outcome=str(AttemptOutcome.DONE),
                      completion_tokens=8)
        final = JobFinal(state=JobState.DONE, completion_tokens=8, finished_at_s=now,
                         total_s=0.1, finish_reason="stop")

        async def settle() -> None:
            await ledger.settle_async(job_id, client, "m", 10, 8, share, job=final)

        await sw.write(settle)

    row, start = _job(client, "warm", time.time())  # its accounts made: all known after it
    ledger.hold("warm", client, "m", 10, 8, job=row, attempt_start=start)
    ledger.settle("warm", client, "m", 10, 8, share)

    async def main() -> int:
        sw = StoreWriter(store)
        sw.start()
        before = lane.worker_batches
        await asyncio.gather(*(one(f"job{i}", sw) for i in range(20)))
        assert lane.worker_batches == before and lane.inline_batches > 0  # all on the loop
        ticks = [0]

        async def ticker() -> None:
            while True:
                ticks[0] += 1
                await asyncio.sleep(0.005)

        tick = asyncio.create_task(ticker())
        writer.lock.acquire()  # another thread writing, for 0.3 s
        threading.Timer(0.3, writer.lock.release).start()
        t0 = time.perf_counter()
        await asyncio.gather(*(one(f"late{i}", sw) for i in range(3)))
        waited = time.perf_counter() - t0
        tick.cancel()
        await sw.drain()
        await sw.stop()
        assert waited >= 0.25 and lane.worker_batches >= 1  # waited, on the worker
        return ticks[0]

    ticks = asyncio.run(main())
    assert ticks >= 10  # the loop ran on while the writes waited
    assert ledger.check() == []
    for job_id in [f"job{i}" for i in range(20)] + [f"late{i}" for i in range(3)]:
        job = store.get_job(job_id)
        assert job is not None and job.state == "done"
        [attempt] = store.attempts(job_id)
        assert attempt.outcome == "done" and attempt.completion_tokens == 8
        assert ledger.job_money(job_id)["state"] == "settled"

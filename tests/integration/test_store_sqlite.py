"""The SQLite store's durability settings: WAL, synchronous=NORMAL, and checkpoints that the
coordinator runs in the background instead of inside a request's commit."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from sparecycles.store import Store, db
from sparecycles.store.db import wal_autocheckpoint_pages, wal_backstop_pages


def _pragma(store: Store, name: str) -> object:
    with store.engine.connect() as c:
        return c.exec_driver_sql(f"PRAGMA {name}").fetchone()[0]


def test_commits_leave_checkpoints_to_the_background_when_asked(tmp_path: Path) -> None:
    plain = Store(f"sqlite:///{tmp_path / 'a.db'}")
    store = Store(f"sqlite:///{tmp_path / 'b.db'}", background_checkpoints=True)
    assert _pragma(plain, "wal_autocheckpoint") == wal_autocheckpoint_pages
    assert _pragma(store, "wal_autocheckpoint") == wal_backstop_pages
    assert _pragma(store, "journal_mode") == "wal" and _pragma(store, "synchronous") == 1
    store.migrate()
    client = store.ensure_client("acme")
    for i in range(300):  # more WAL pages than one automatic checkpoint would allow
        store.insert_job(id=f"job_{i}", client_id=client, model="m", endpoint="completions",
                         state="done", prompt_tokens=1, max_tokens=1, created_at_s=time.time(),
                         error="x" * 4000)
    wal = Path(str(tmp_path / "b.db") + "-wal")
    assert wal.stat().st_size > wal_autocheckpoint_pages * 4096  # no commit checkpointed it
    store.checkpoint()
    with store.engine.connect() as c:
        busy, frames, done = c.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert busy == 0 and frames == done  # every frame is in the database file now
    assert store.get_job("job_299") is not None
    Store("sqlite://").checkpoint()  # in memory: nothing to do
    plain.close()
    store.close()


def test_a_write_batch_is_one_transaction_all_or_nothing(tmp_path: Path) -> None:
    """Dispatch's writer commits queued metering writes together: one commit for all, and a
    failing one takes the others back with it (the writer then replays them one by one)."""
    store = Store(f"sqlite:///{tmp_path / 'w.db'}")
    store.migrate()
    client = store.ensure_client("acme")
    job = dict(client_id=client, model="m", endpoint="completions", state="admitted",
               prompt_tokens=1, max_tokens=4, created_at_s=time.time())
    store.insert_job(id="j1", **job)
    commits: list[int] = []
    event.listen(store.engine, "commit", lambda _conn: commits.append(1))
    store.write_batch([
        lambda: store.start_attempt(job_id="j1", attempt=1, node_id="n1", prompt_tokens=1),
        lambda: store.update_job("j1", state="streaming"),
        lambda: store.end_attempt("j1", 1, outcome="done", completion_tokens=4),
    ])
    assert len(commits) == 1
    assert store.get_job("j1").state == "streaming"
    assert [(a.outcome, a.completion_tokens) for a in store.attempts("j1")] == [("done", 4)]
    with pytest.raises(Exception):  # noqa: B017  (the second insert of j1 violates its key)
        store.write_batch([lambda: store.update_job("j1", state="done"),
                           lambda: store.insert_job(id="j1", **job)])
    assert store.get_job("j1").state == "streaming"  # the update went back with the batch
    with pytest.raises(RuntimeError, match="nest"):  # a second writer lock would deadlock
        store.write_batch([lambda: store.write_batch([lambda: None])])
    store.write_batch([lambda: store.update_job("j1", state="done")])  # and the store goes on
    assert store.get_job("j1").state == "done"
    store.close()


def test_a_write_batch_sends_its_attempt_writes_a_kind_at_a_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Twenty jobs placed and finished in one batch: three statements (the attempts' rows, the
    jobs' placement, the attempts' ends), not sixty; every row as if written one by one.
    Statements are counted as SQLAlchemy executes them and as they go straight to the driver
    (``db.sqlite_run``: SQLite's job writes)."""
    store = Store(f"sqlite:///{tmp_path / 'a.db'}")
    store.migrate()
    client = store.ensure_client("acme")
    for i in range(20):
        store.insert_job(id=f"j{i}", client_id=client, model="m", endpoint="completions",
                         state="admitted", prompt_tokens=1, max_tokens=4,
                         created_at_s=time.time())
    statements: list[str] = []
    event.listen(store.engine, "before_cursor_execute",
                 lambda _c, _cur, sql, *_a: statements.append(sql))
    real_run = db.sqlite_run

    def counted(conn: Any, sql: str, *a: Any, **kw: Any) -> Any:
        statements.append(sql)
        return real_run(conn, sql, *a, **kw)

    monkeypatch.setattr(db, "sqlite_run", counted)
    writes: list[Any] = []
    for i in range(20):
        writes.append(lambda i=i: store.start_attempt(job_id=f"j{i}", attempt=1, node_id="n1",
                                                      prompt_tokens=1))
    for i in range(20):
        more = {"signature": "sig"} if i % 2 else {}
        writes.append(lambda i=i, more=more: store.end_attempt(
            f"j{i}", 1, outcome="done", completion_tokens=i, **more))
    store.write_batch(writes)
    assert len([q for q in statements if not q.startswith(("BEGIN", "PRAGMA", "COMMIT"))]) == 4
    for i in range(20):  # (ends of two sets of columns: two statements)
        (att,) = store.attempts(f"j{i}")
        assert (att.outcome, att.completion_tokens, att.node_id) == ("done", i, "n1")
        assert att.signature == ("sig" if i % 2 else None)
        assert (store.get_job(f"j{i}").state, store.get_job(f"j{i}").node_id) == ("placed", "n1")
    store.close()

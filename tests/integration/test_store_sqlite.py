"""The SQLite store's durability settings: WAL, synchronous=NORMAL, and checkpoints that the
coordinator runs in the background instead of inside a request's commit."""

from __future__ import annotations

import time
from pathlib import Path

from sparecycles.store import Store
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

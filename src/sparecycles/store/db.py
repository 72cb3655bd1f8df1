"""Engines and sessions: SQLite (embedded default) or PostgreSQL, through SQLAlchemy 2.

Only modules inside ``sparecycles.store`` import this. SQLite runs in WAL mode with a busy
timeout so the coordinator and the CLI can share the file; ``sqlite://`` (no path) is the
in-memory twin used by unit tests.

SQLite durability: ``synchronous=NORMAL`` in WAL mode, so a commit is a write to the WAL without
an fsync (it survives the process being killed; the last commits may be lost to a power cut);
the fsyncs happen when the WAL is checkpointed into the database file. By default SQLite
checkpoints inside the commit that fills ``wal_autocheckpoint_pages``: that commit then takes
5-15 ms instead of 0.1. The coordinator checkpoints on a background thread instead
(``Store.checkpoint``) and keeps automatic checkpoints only as a backstop.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import Connection, Engine, MetaData, Table, bindparam, create_engine, event, insert
from sqlalchemy import update as sa_update
from sqlalchemy.orm import DeclarativeBase, sessionmaker
from sqlalchemy.pool import StaticPool

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


wal_autocheckpoint_pages = 1000  # SQLite's default: checkpoint in the commit that fills this
wal_backstop_pages = 16_384  # 64 MiB of 4 KiB pages: when checkpoints run in the background


_writers: weakref.WeakKeyDictionary[Engine, threading.Lock] = weakref.WeakKeyDictionary()
_writers_guard = threading.Lock()


def writer_lock(engine: Engine) -> Any:
    """What a write transaction on ``engine`` holds from its start to its end: on SQLite (one
    writer per file) one lock per engine, shared by the ledger and the store, since queueing
    writers here is fairer and far faster than SQLite's busy handler, which sleeps in steps of
    1, 2, 5, 10... ms; nothing on PostgreSQL."""
    if engine.dialect.name != "sqlite":
        return contextlib.nullcontext()
    with _writers_guard:
        return _writers.setdefault(engine, threading.Lock())


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    # every mapped class here declares a table (none maps a join or a select): typed so that
    # insert(), update() and the helpers below accept ``Model.__table__``
    __table__: ClassVar[Table]


def make_engine(url: str, *, autocheckpoint_pages: int = wal_autocheckpoint_pages) -> Engine:
    """An engine for ``url``; creates the SQLite file's folder if needed. On SQLite a commit
    that fills ``autocheckpoint_pages`` of WAL checkpoints it (see above)."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1] if "///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        else:
            engine = create_engine(
                "sqlite://",
                connect_args={"check_same_thread": False},
                poolclass=StaticPool,
            )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute(f"PRAGMA wal_autocheckpoint={int(autocheckpoint_pages)}")
            cur.close()

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)


def _by_columns(rows: Sequence[Mapping[str, Any]]) -> Iterator[list[Mapping[str, Any]]]:
    """Rows grouped by their set of columns, groups in first-seen order, rows in order."""
    groups: dict[frozenset[str], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(frozenset(row), []).append(row)
    yield from groups.values()


def insert_rows(conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert ``rows``: one statement per set of columns, each executed for all its rows at
    once (a multi-row INSERT), instead of a round trip per row."""
    for group in _by_columns(rows):
        conn.execute(insert(table), list(group))


def update_rows(conn: Connection, table: Table, keys: Sequence[str],
                rows: Sequence[Mapping[str, Any]]) -> None:  # fmt: skip
    """Update each row named by its ``keys`` columns with its other columns: one statement
    per set of columns, executed for all its rows at once (psycopg pipelines an executemany).
    Rows of one set of columns are applied in order, so a later row for the same key wins."""
    for group in _by_columns(rows):
        cols = [c for c in group[0] if c not in keys]
        stmt = sa_update(table).where(*(table.c[k] == bindparam(f"{k}_") for k in keys))
        stmt = stmt.values({c: bindparam(f"{c}_") for c in cols})
        conn.execute(stmt, [{f"{c}_": v for c, v in row.items()} for row in group])


def make_sessionmaker(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)

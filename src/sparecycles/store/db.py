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
import functools
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import (
    Boolean,
    Connection,
    Engine,
    Enum,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    create_engine,
    event,
    insert,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy import update as sa_update
from sqlalchemy.orm import DeclarativeBase, sessionmaker
from sqlalchemy.pool import StaticPool

from sparecycles.store.errors import WriterBusy

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


wal_autocheckpoint_pages = 1000  # SQLite's default: checkpoint in the commit that fills this
wal_backstop_pages = 16_384  # 64 MiB of 4 KiB pages: when checkpoints run in the background


busy_timeout_ms = 30_000  # how long a SQLite write waits for another process's (the CLI's)
writer_cache_kib = 16_384  # the SQLite writer connection's page cache (SQLite's default: 2 MiB)


class SqliteWriter:
    """The one connection that writes a SQLite file in this process, shared by the ledger's
    group commit and the store's writes (they share an engine), one transaction at a time.

    SQLite allows one writer per file anyway. Writing on one connection rather than on whichever
    the pool hands out keeps that connection's page cache valid from one transaction to the
    next: a connection whose cache another connection's commit made stale throws it all away
    and reads every page again (a commit on a pooled connection cost ~40 page reads a job).
    It also spares a pool checkout and check-in per transaction. Queueing writers on the lock
    here is fairer and far faster than SQLite's busy handler (it sleeps in steps of 1, 2, 5,
    10... ms). Readers keep their own pooled connections; another process (the CLI) writing the
    file meets this connection's ``busy_timeout`` as before.

    A transaction that fails is rolled back and the connection kept; a connection that cannot
    roll back, or that SQLAlchemy has invalidated (closed under it), is dropped and the next
    transaction opens a fresh one."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.lock = threading.Lock()
        self._conn: Connection | None = None
        self.opened = 0  # connections opened so far (a fresh one after a broken one)

    @contextlib.contextmanager
    def begin(self, *, wait: bool = True) -> Iterator[Connection]:
        """A write transaction (``BEGIN IMMEDIATE``) on the writer's connection, committed when
        the block ends, rolled back if it raises; the lock is held throughout. ``wait=False``
        (on an event loop): ``WriterBusy`` at once, nothing done, when another thread holds the
        lock or another connection (another process) holds the file's write lock."""
        if not self.lock.acquire(blocking=wait):
            raise WriterBusy("the SQLite writer is busy")
        try:
            conn = self._connection()
            try:
                self._begin(conn, wait)
            except Exception as exc:  # broken since its last transaction: another, once
                if not _broken(exc):
                    self._rollback(conn)
                    raise
                self._discard()
                conn = self._connection()
                self._begin(conn, wait)
            try:
                yield conn
                conn.commit()
            except BaseException:
                self._rollback(conn)
                raise
        finally:
            self.lock.release()

    @staticmethod
    def _begin(conn: Connection, wait: bool) -> None:
        """SQLAlchemy's transaction (its commit, rollback and their events), then SQLite's,
        ``IMMEDIATE`` (the driver would begin a deferred one at the first write)."""
        if not conn.in_transaction():
            conn.begin()
        if conn.connection.dbapi_connection.in_transaction:  # type: ignore[union-attr]
            return
        if wait:
            sqlite_run(conn, "BEGIN IMMEDIATE")
            return
        sqlite_run(conn, "PRAGMA busy_timeout=0")  # SQLite's busy handler would sleep here
        try:
            sqlite_run(conn, "BEGIN IMMEDIATE")
        except sa_exc.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise WriterBusy("another connection is writing the SQLite file") from exc
            raise
        finally:
            sqlite_run(conn, f"PRAGMA busy_timeout={busy_timeout_ms}")

    def close(self) -> None:
        with self.lock:
            self._discard(broken=False)

    def _connection(self) -> Connection:
        conn = self._conn
        if conn is None or conn.closed or conn.invalidated:
            self._discard(broken=conn is not None)
            conn = self.engine.connect()
            conn.exec_driver_sql(f"PRAGMA cache_size=-{int(writer_cache_kib)}")
            conn.commit()
            self._conn, self.opened = conn, self.opened + 1
        return conn

    def _rollback(self, conn: Connection) -> None:
        try:
            conn.rollback()
            raw = conn.connection.dbapi_connection
            if raw is not None and raw.in_transaction:  # BEGIN outside SQLAlchemy's knowledge
                raw.rollback()
        except Exception:  # closed or broken under us: the next transaction opens another
            self._discard()

    def _discard(self, *, broken: bool = True) -> None:
        """Let the connection go: invalidated when broken (never back into the pool), else
        closed (back into the pool: in memory, the one connection holding the database)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                if broken:
                    conn.invalidate()
                conn.close()


def _broken(exc: BaseException) -> bool:
    """Whether ``exc`` says the connection itself is unusable (closed under us)."""
    if isinstance(exc, sa_exc.DBAPIError):
        return exc.connection_invalidated or isinstance(exc.orig, sqlite3.ProgrammingError)
    return isinstance(exc, sqlite3.ProgrammingError)


class PooledWrites:
    """PostgreSQL's write transactions: a pooled connection each (many writers at once, row
    locks in the database), as a context like ``SqliteWriter.begin``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @contextlib.contextmanager
    def begin(self, *, wait: bool = True) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            try:
                yield conn
            except BaseException:
                conn.rollback()
                raise
            conn.commit()

    def close(self) -> None:
        pass


_writers_guard = threading.Lock()


def writer_of(engine: Engine) -> SqliteWriter | PooledWrites:
    """Where write transactions on ``engine`` run: SQLite's one writer connection (one per
    engine, kept on the engine: the ledger and the store share it), or PostgreSQL's pool."""
    if engine.dialect.name != "sqlite":
        return PooledWrites(engine)
    with _writers_guard:
        writer: SqliteWriter | None = engine.__dict__.get("_sparecycles_writer")
        if writer is None:
            writer = engine.__dict__["_sparecycles_writer"] = SqliteWriter(engine)
        return writer


def close_writes(engine: Engine) -> None:
    """Close SQLite's writer connection of ``engine`` (before ``engine.dispose()``)."""
    writer = engine.__dict__.get("_sparecycles_writer")
    if writer is not None:
        writer.close()


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
            # LIFO: a reader gets the connection used last, whose page cache is the warmest
            engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False},
                                   pool_use_lifo=True)
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
            cur.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
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


def sqlite_run(conn: Connection, sql: str, params: Any = (), *, many: bool = False) -> Any:
    """Run prepared SQL text straight on the SQLite connection under ``conn`` (in its
    transaction): no statement compiled, no execution context, for the statements every job
    runs. The driver's errors are raised as SQLAlchemy's (``IntegrityError``,
    ``OperationalError``...), as ``conn.execute`` would: callers retry and map them the same way.
    Returns the driver's cursor."""
    raw = conn.connection.dbapi_connection
    try:
        return raw.executemany(sql, params) if many else raw.execute(sql, params)  # type: ignore[union-attr]
    except sqlite3.Error as exc:
        raise sa_exc.DBAPIError.instance(sql, params, exc, sqlite3.Error,
                                         dialect=conn.dialect) from exc


_plain_types = (String, Integer, Float, Boolean)  # bound as they are by the driver (Text: String)


@functools.lru_cache(maxsize=64)
def _plain_defaults(table: Table) -> dict[str, Any] | None:
    """The Python-side defaults of ``table``'s columns if every column's value can be given to
    SQLite's driver as it is (strings, numbers, booleans; scalar defaults); None otherwise (a
    JSON column, a callable default: those go through SQLAlchemy)."""
    defaults: dict[str, Any] = {}
    for c in table.columns:
        if (not isinstance(c.type, _plain_types) or isinstance(c.type, Enum)
                or c.onupdate is not None):
            return None
        d = c.default
        if d is not None:
            if not d.is_scalar:
                return None
            defaults[c.name] = d.arg  # type: ignore[attr-defined]
    return defaults


@functools.lru_cache(maxsize=256)
def _insert_text(table: str, cols: tuple[str, ...]) -> str:
    return f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"


@functools.lru_cache(maxsize=256)
def _update_text(table: str, cols: tuple[str, ...], keys: tuple[str, ...]) -> str:
    return (f"UPDATE {table} SET {', '.join(f'{c} = ?' for c in cols)} "
            f"WHERE {' AND '.join(f'{k} = ?' for k in keys)}")


def insert_rows(conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert ``rows``: one statement per set of columns, each executed for all its rows at
    once (a multi-row INSERT), instead of a round trip per row. On SQLite, a table of plain
    columns is written with prepared SQL text (``sqlite_run``), the columns' defaults filled
    in as SQLAlchemy would."""
    defaults = _plain_defaults(table) if conn.dialect.name == "sqlite" else None
    for group in _by_columns(rows):
        if defaults is None:
            conn.execute(insert(table), list(group))
            continue
        missing = {c: v for c, v in defaults.items() if c not in group[0]}
        cols = (*group[0], *missing)
        fill = tuple(missing.values())
        sqlite_run(conn, _insert_text(table.name, cols),
                   [(*(row[c] for c in group[0]), *fill) for row in group], many=True)


def update_rows(conn: Connection, table: Table, keys: Sequence[str],
                rows: Sequence[Mapping[str, Any]]) -> None:  # fmt: skip
    """Update each row named by its ``keys`` columns with its other columns: one statement
    per set of columns, executed for all its rows at once (psycopg pipelines an executemany;
    on SQLite prepared SQL text, as ``insert_rows``). Rows of one set of columns are applied in
    order, so a later row for the same key wins."""
    plain = conn.dialect.name == "sqlite" and _plain_defaults(table) is not None
    for group in _by_columns(rows):
        cols = [c for c in group[0] if c not in keys]
        if plain:
            sqlite_run(conn, _update_text(table.name, tuple(cols), tuple(keys)),
                       [(*(row[c] for c in cols), *(row[k] for k in keys)) for row in group],
                       many=True)
            continue
        stmt = sa_update(table).where(*(table.c[k] == bindparam(f"{k}_") for k in keys))
        stmt = stmt.values({c: bindparam(f"{c}_") for c in cols})
        conn.execute(stmt, [{f"{c}_": v for c, v in row.items()} for row in group])


def make_sessionmaker(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)

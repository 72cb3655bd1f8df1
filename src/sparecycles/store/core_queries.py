"""Every query of the foundation (keys, owners, nodes, models, jobs) in one place.

``Store`` is synchronous: each method is one short transaction. The coordinator's async code
calls it through ``asyncio.to_thread`` so a slow database never stalls token streaming. The
ledger's queries are in ``store/ledger_queries.py``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from sparecycles.errors import Conflict, NotFound
from sparecycles.secrets_util import hash_secret, new_id, new_secret
from sparecycles.store.core_tables import (
    ApiKey,
    Client,
    JobAttempt,
    JobRow,
    Model,
    Node,
    NodeToken,
    Owner,
    ReplicaRow,
)
from sparecycles.store.db import (
    Base,
    close_writes,
    insert_rows,
    make_engine,
    make_sessionmaker,
    update_rows,
    wal_autocheckpoint_pages,
    wal_backstop_pages,
    writer_of,
)
from sparecycles.types import AttemptOutcome

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
migrate_lock_key = 0x5C_0DB_0001  # PostgreSQL advisory lock held while migrating


@dataclass(frozen=True, slots=True)
class ApiKeyInfo:
    key_id: str
    client_id: str | None  # a client's key (inference, admin)
    client_name: str
    scopes: frozenset[str]
    owner_id: str | None = None  # an owner's key (owner scope)


_jobs = JobRow.__table__
_attempts = JobAttempt.__table__


@dataclass(slots=True)
class _AttemptWrites:
    """Attempt writes of one transaction, written together (``write_batch``): the attempts'
    rows first, then the jobs' placement, then the attempts' ends, each kind as one statement
    per set of columns for all its rows; an attempt always starts before it ends in the queue,
    and a later write of the same row wins. Any other write of the batch first flushes what is
    queued, so writes land in the order they were made. Before, each was its own statement
    and round trip: a writer's batch of N jobs cost ~1.5 N of them."""

    starts: list[dict[str, Any]] = field(default_factory=list)
    jobs: list[dict[str, Any]] = field(default_factory=list)
    ends: list[dict[str, Any]] = field(default_factory=list)

    def flush(self, conn: Connection) -> None:
        insert_rows(conn, _attempts, self.starts)
        update_rows(conn, _jobs, ("id",), self.jobs)
        update_rows(conn, _attempts, ("job_id", "attempt"), self.ends)
        self.starts, self.jobs, self.ends = [], [], []


class Store:
    def __init__(self, url: str, *, engine: Engine | None = None,
                 background_checkpoints: bool = False):
        """``background_checkpoints``: the owner calls ``checkpoint`` every so often (the
        coordinator, once a second), so that no commit on a request's path pays for one."""
        self.url = url
        pages = wal_backstop_pages if background_checkpoints else wal_autocheckpoint_pages
        self.engine = engine or make_engine(url, autocheckpoint_pages=pages)
        self.sessions: sessionmaker = make_sessionmaker(self.engine)
        self._joined = threading.local()  # the transaction of a ``write_batch`` on this thread

    # ---- schema ---------------------------------------------------------------------------

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (creates it on an empty database)."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":  # replicas starting together: one at a time
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({migrate_lock_key})")
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def ping(self) -> None:
        """One round trip to the database (readiness)."""
        with self.engine.connect() as c:
            c.exec_driver_sql("SELECT 1")

    def create_all(self) -> None:
        """Create tables straight from the models (unit tests' in-memory twin only)."""
        Base.metadata.create_all(self.engine)

    def close(self) -> None:
        close_writes(self.engine)
        self.engine.dispose()

    def checkpoint(self) -> None:
        """Copy SQLite's WAL into the database file (and fsync it) without waiting for readers
        or writers (``PASSIVE``); nothing to do on PostgreSQL or an in-memory database."""
        if self.engine.dialect.name != "sqlite" or self.engine.url.database in (None, "",
                                                                                 ":memory:"):
            return
        with self.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    # ---- clients and keys -----------------------------------------------------------------

    def ensure_client(self, name: str) -> str:
        with self.sessions.begin() as s:
            row = s.scalar(select(Client).where(Client.name == name))
            if row is None:
                row = Client(id=new_id("cli"), name=name, created_at_s=time.time())
                s.add(row)
            return row.id

    def create_api_key(
        self, client_name: str, key_name: str, scopes: tuple[str, ...] = ("inference",)
    ) -> tuple[str, str]:
        """Make a key for a client (created if new); returns (key id, the key shown once)."""
        client_id = self.ensure_client(client_name)
        secret = new_secret("sk")
        key_id = new_id("key")
        with self.sessions.begin() as s:
            s.add(
                ApiKey(
                    id=key_id,
                    client_id=client_id,
                    name=key_name,
                    key_hash=hash_secret(secret),
                    prefix=secret[:10],
                    scopes=",".join(sorted(scopes)),
                    created_at_s=time.time(),
                )
            )
        return key_id, secret

    def authenticate_key(self, secret: str) -> ApiKeyInfo | None:
        with self.sessions() as s:
            row = s.execute(
                select(ApiKey, Client.name)
                .outerjoin(Client, Client.id == ApiKey.client_id)
                .where(ApiKey.key_hash == hash_secret(secret), ApiKey.revoked_at_s.is_(None))
            ).first()
            if row is None:
                return None
            key, client_name = row
            return ApiKeyInfo(key.id, key.client_id, client_name or "",
                              frozenset(key.scopes.split(",")), owner_id=key.owner_id)

    def revoke_api_key(self, key_id: str) -> None:
        with self.sessions.begin() as s:
            n = s.execute(
                update(ApiKey)
                .where(ApiKey.id == key_id, ApiKey.revoked_at_s.is_(None))
                .values(revoked_at_s=time.time())
            ).rowcount
            if not n:
                raise NotFound(f"no active key {key_id}")

    def list_api_keys(self) -> list[dict[str, Any]]:
        with self.sessions() as s:
            rows = s.execute(
                select(ApiKey, Client.name).join(Client).order_by(ApiKey.created_at_s)
            ).all()
            return [
                {
                    "id": k.id,
                    "client": c,
                    "name": k.name,
                    "prefix": k.prefix,
                    "scopes": k.scopes,
                    "revoked": k.revoked_at_s is not None,
                }
                for k, c in rows
            ]

    # ---- owners and node tokens -----------------------------------------------------------

    def ensure_owner(self, name: str) -> str:
        with self.sessions.begin() as s:
            row = s.scalar(select(Owner).where(Owner.name == name))
            if row is None:
                row = Owner(id=new_id("own"), name=name, created_at_s=time.time())
                s.add(row)
            return row.id

    def create_node_token(self, owner_name: str, token_name: str = "default") -> str:
        owner_id = self.ensure_owner(owner_name)
        secret = new_secret("nt")
        with self.sessions.begin() as s:
            s.add(
                NodeToken(
                    id=new_id("ntk"),
                    owner_id=owner_id,
                    name=token_name,
                    token_hash=hash_secret(secret),
                    created_at_s=time.time(),
                )
            )
        return secret

    def create_owner_key(self, owner_name: str, key_name: str = "dashboard") -> tuple[str, str]:
        """An owner's key for the dashboard (created owner if new); returns (key id, the key
        shown once). It has no client and only the ``owner`` scope, so the inference API
        refuses it: it shows an owner their devices and earnings, and spends nothing."""
        owner_id = self.ensure_owner(owner_name)
        secret = new_secret("ow")
        key_id = new_id("key")
        with self.sessions.begin() as s:
            s.add(ApiKey(id=key_id, client_id=None, owner_id=owner_id, name=key_name,
                         key_hash=hash_secret(secret), prefix=secret[:10], scopes="owner",
                         created_at_s=time.time()))
        return key_id, secret

    def owner_for_node_token(self, secret: str) -> str | None:
        with self.sessions() as s:
            return s.scalar(
                select(NodeToken.owner_id).where(
                    NodeToken.token_hash == hash_secret(secret), NodeToken.revoked_at_s.is_(None)
                )
            )

    # ---- models ---------------------------------------------------------------------------

    def upsert_model(self, name: str, source: str, weights_sha256: str, spec: dict) -> None:
        """Register or update a model. Replicas starting together may race to insert the same
        row: the loser's insert fails on the key, and its second try updates the row."""
        try:
            self._upsert_model(name, source, weights_sha256, spec)
        except IntegrityError:
            self._upsert_model(name, source, weights_sha256, spec)

    def _upsert_model(self, name: str, source: str, weights_sha256: str, spec: dict) -> None:
        with self.sessions.begin() as s:
            row = s.get(Model, name)
            if row is None:
                s.add(
                    Model(
                        name=name,
                        source=source,
                        weights_sha256=weights_sha256,
                        spec=spec,
                        created_at_s=time.time(),
                    )
                )
            else:
                row.source, row.weights_sha256, row.spec = source, weights_sha256, spec

    def list_models(self) -> list[Model]:
        with self.sessions() as s:
            return list(s.scalars(select(Model).order_by(Model.name)))

    # ---- nodes ----------------------------------------------------------------------------

    def node_availability(self, node_id: str) -> dict | None:
        with self.sessions() as s:
            row = s.get(Node, node_id)
            return None if row is None else dict(row.availability or {})

    def node_connected(
        self,
        *,
        node_id: str,
        owner_id: str,
        name: str,
        public_key: str,
        profile: dict,
        models: list[dict],
        availability: dict,
        agent_version: str,
        replica_id: str,
    ) -> None:
        """Record a node that has just said hello (first time or again)."""
        now = time.time()
        with self.sessions.begin() as s:
            row = s.get(Node, node_id)
            if row is not None and row.owner_id != owner_id:
                raise Conflict(f"node {node_id} belongs to another owner")
            if row is None:
                row = Node(id=node_id, owner_id=owner_id, first_seen_at_s=now)
                s.add(row)
            row.name = name or node_id
            row.public_key = public_key
            row.device_class = str(profile.get("device_class", "unknown"))
            row.profile, row.models = profile, models
            if (row.availability or {}).get("set_by") != "owner":
                row.availability = availability  # an owner's edit on the dashboard wins
            row.agent_version = agent_version
            row.status, row.replica_id, row.last_seen_at_s = "online", replica_id, now

    def set_node_status(self, node_id: str, status: str) -> None:
        with self.sessions.begin() as s:
            s.execute(
                update(Node)
                .where(Node.id == node_id)
                .values(status=status, last_seen_at_s=time.time())
            )

    def mark_replica_nodes_offline(self, replica_id: str) -> int:
        with self.sessions.begin() as s:
            return s.execute(
                update(Node)
                .where(Node.replica_id == replica_id, Node.status != "offline")
                .values(status="offline")
            ).rowcount

    def get_node(self, node_id: str) -> Node | None:
        with self.sessions() as s:
            return s.get(Node, node_id)

    def list_nodes(self) -> list[Node]:
        with self.sessions() as s:
            return list(s.scalars(select(Node).order_by(Node.first_seen_at_s)))

    # ---- jobs -----------------------------------------------------------------------------

    @property
    def inline_writes(self) -> bool:
        """Whether writes may run on the event loop (``write_batch(wait=False)``): SQLite."""
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def _writing(self, *, wait: bool = True) -> Iterator[Connection]:
        """A write transaction of the jobs' lifecycle (run on dispatch's writer thread beside
        the ledger's): on SQLite on the one writer connection the ledger writes on too
        (``db.SqliteWriter``: its lock, ``BEGIN IMMEDIATE``), so that it queues behind an
        admission's hold rather than meeting SQLite's busy handler; a pooled connection on
        PostgreSQL."""
        joined: Connection | None = getattr(self._joined, "conn", None)
        if joined is not None:
            queued = getattr(self._joined, "attempts", None)
            if queued is not None:  # the batch's attempt writes so far land before this one
                queued.flush(joined)
            yield joined
            return
        with writer_of(self.engine).begin(wait=wait) as conn:
            yield conn

    def write_batch(self, writes: Sequence[Callable[[], Any]], *, wait: bool = True
                    ) -> list[Any]:
        """Run several job writes (calls of this store's write methods) in one transaction, in
        order: dispatch's writer commits the metering writes that queued up together at once
        (one commit instead of one each). All land or none does. ``wait=False`` (SQLite, on
        the event loop): ``WriterBusy`` at once, nothing written, when the database is being
        written by another thread or process (``SqliteWriter.begin``)."""
        if getattr(self._joined, "conn", None) is not None:
            raise RuntimeError("write_batch does not nest")  # a second writer lock: deadlock
        with self._writing(wait=wait) as conn:
            self._joined.conn = conn
            self._joined.attempts = attempts = _AttemptWrites()
            try:
                results = [write() for write in writes]
                attempts.flush(conn)
                return results
            finally:
                self._joined.conn = None
                self._joined.attempts = None

    # The job writes below are statements on the writer's connection, not ORM units of work:
    # they run for every job on dispatch's writer, and the ORM's flush and bulk-update
    # machinery cost more than the statements themselves (on SQLite, prepared SQL text straight
    # on the driver: ``db.insert_rows``, ``db.update_rows``).

    def insert_job(self, **fields: Any) -> None:
        with self._writing() as conn:
            insert_rows(conn, _jobs, [fields])

    def update_job(self, job_id: str, **fields: Any) -> None:
        with self._writing() as conn:
            update_rows(conn, _jobs, ("id",), [{"id": job_id, **fields}])

    def get_job(self, job_id: str) -> JobRow | None:
        with self.sessions() as s:
            return s.get(JobRow, job_id)

    def list_jobs(self, *, limit: int = 100) -> list[JobRow]:
        with self.sessions() as s:
            return list(
                s.scalars(select(JobRow).order_by(JobRow.created_at_s.desc()).limit(limit))
            )

    def unfinished_jobs(self, replica_id: str | None = None) -> list[JobRow]:
        """Jobs not in a final state (of one replica, or all): what a restart must settle."""
        with self.sessions() as s:
            q = select(JobRow).where(JobRow.state.not_in(("done", "failed")))
            if replica_id is not None:
                q = q.where(JobRow.replica_id == replica_id)
            return list(s.scalars(q))

    # ---- replicas (several coordinators on one database) ---------------------------------------

    def replica_beat(self, replica_id: str, *, started_at_s: float, pid: int) -> None:
        """Renew this replica's lease."""
        now = time.time()
        with self.sessions.begin() as s:
            row = s.get(ReplicaRow, replica_id)
            if row is None:
                s.add(ReplicaRow(id=replica_id, started_at_s=started_at_s, last_seen_at_s=now,
                                 pid=pid))
            else:
                row.last_seen_at_s, row.started_at_s, row.pid = now, started_at_s, pid

    def replicas(self) -> list[ReplicaRow]:
        with self.sessions() as s:
            return list(s.scalars(select(ReplicaRow).order_by(ReplicaRow.id)))

    def claim_orphaned_jobs(self, me: str, *, lapsed_before_s: float, spare: set[str],
                            limit: int = 100) -> list[str]:
        """Take over unfinished jobs of replicas whose lease lapsed before ``lapsed_before_s``
        (not ``spare``: replicas still heard on the bus). Rows another replica is claiming are
        skipped (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), and the claim is a compare-and-set
        on ``replica_id``, so each orphan is claimed by exactly one replica."""
        with self.sessions.begin() as s:
            dead = [r for r in s.scalars(select(ReplicaRow.id).where(
                ReplicaRow.last_seen_at_s < lapsed_before_s, ReplicaRow.id != me))
                if r not in spare]
            if not dead:
                return []
            ids = list(s.scalars(
                select(JobRow.id)
                .where(JobRow.replica_id.in_(dead), JobRow.state.not_in(("done", "failed")))
                .limit(limit)
                .with_for_update(skip_locked=True)))
            claimed = []
            for job_id in ids:
                res = s.execute(update(JobRow).where(JobRow.id == job_id,
                                                     JobRow.replica_id.in_(dead))
                                .values(replica_id=me))
                if res.rowcount == 1:
                    claimed.append(job_id)
            return claimed

    def start_attempt(
        self, *, job_id: str, attempt: int, node_id: str, prompt_tokens: int,
        layers: tuple[int, int] | None = None, work_ppm: int | None = None,
    ) -> None:
        """An attempt's row; ``layers`` and ``work_ppm`` for a stage of a chain."""
        queued = getattr(self._joined, "attempts", None) or _AttemptWrites()
        row = dict(job_id=job_id, attempt=attempt, node_id=node_id,
                   outcome=str(AttemptOutcome.RUNNING), prompt_tokens=prompt_tokens,
                   started_at_s=time.time())
        if layers is not None:
            row.update(layer_first=layers[0], layer_end=layers[1], work_ppm=work_ppm)
        queued.starts.append(row)
        queued.jobs.append(dict(id=job_id, state="placed", attempts=attempt, node_id=node_id))
        self._write_attempts(queued)

    def end_attempt(self, job_id: str, attempt: int, **fields: Any) -> None:
        fields.setdefault("ended_at_s", time.time())
        queued = getattr(self._joined, "attempts", None) or _AttemptWrites()
        queued.ends.append(dict(job_id=job_id, attempt=attempt, **fields))
        self._write_attempts(queued)

    def _write_attempts(self, queued: _AttemptWrites) -> None:
        """Alone: write now. In a ``write_batch``: the batch writes them all at its end."""
        if queued is getattr(self._joined, "attempts", None):
            return
        with self._writing() as conn:
            queued.flush(conn)

    def attempts(self, job_id: str) -> list[JobAttempt]:
        with self.sessions() as s:
            return list(
                s.scalars(
                    select(JobAttempt)
                    .where(JobAttempt.job_id == job_id)
                    .order_by(JobAttempt.attempt)
                )
            )

    def job_counts(self) -> dict[str, int]:
        with self.sessions() as s:
            return dict(s.execute(select(JobRow.state, func.count()).group_by(JobRow.state)).all())

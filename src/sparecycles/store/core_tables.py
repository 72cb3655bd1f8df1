"""The tables of the foundation: who (owners, clients, keys), what (models, nodes), work (jobs).

Times are seconds since the Unix epoch in UTC (``*_at_s`` floats): the same on SQLite and
PostgreSQL, and what the pure parts (scheduler, cost allocation) compute with. The ledger's tables
are in ``store/ledger_tables.py``. Alembic migrations in ``migrations/`` build exactly this schema
(a test
compares them).
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from sparecycles.store.db import Base


class Owner(Base):
    """Someone whose devices run the node agent and who earns for their work."""

    __tablename__ = "owners"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at_s: Mapped[float] = mapped_column(Float)


class Client(Base):
    """Someone who sends requests and pays for them."""

    __tablename__ = "clients"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at_s: Mapped[float] = mapped_column(Float)


class ApiKey(Base):
    """A client's (or an admin's) API key, or an owner's key for the dashboard (``owner_id``
    set, ``client_id`` empty: it signs an owner in and never authenticates at ``/v1``).
    Only its SHA-256 is stored; the key is shown once."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    client_id: Mapped[str | None] = mapped_column(
        ForeignKey("clients.id"), index=True, nullable=True)
    owner_id: Mapped[str | None] = mapped_column(ForeignKey("owners.id"), index=True,
                                                 nullable=True)
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # first characters, to recognise a key
    scopes: Mapped[str] = mapped_column(String(200), default="inference")  # comma-separated
    created_at_s: Mapped[float] = mapped_column(Float)
    revoked_at_s: Mapped[float | None] = mapped_column(Float, nullable=True)


class NodeToken(Base):
    """A registration token an owner gives their node agents (``--token``). Stored hashed."""

    __tablename__ = "node_tokens"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner_id: Mapped[str] = mapped_column(ForeignKey("owners.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at_s: Mapped[float] = mapped_column(Float)
    revoked_at_s: Mapped[float | None] = mapped_column(Float, nullable=True)


class Model(Base):
    """The model registry: what the network serves, and the hash of the right weights."""

    __tablename__ = "models"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    source: Mapped[str] = mapped_column(Text)  # local path or hub id
    weights_sha256: Mapped[str] = mapped_column(String(64))
    spec: Mapped[dict] = mapped_column(JSON)  # ModelSpec fields
    created_at_s: Mapped[float] = mapped_column(Float)


class Node(Base):
    """A device running the agent. Its id is derived from its Ed25519 public key."""

    __tablename__ = "nodes"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner_id: Mapped[str] = mapped_column(ForeignKey("owners.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    public_key: Mapped[str] = mapped_column(String(100))  # base64 raw Ed25519 key
    device_class: Mapped[str] = mapped_column(String(40))
    profile: Mapped[dict] = mapped_column(JSON)  # DeviceProfile fields
    models: Mapped[list] = mapped_column(JSON)  # [{"name", "weights_sha256"}]
    availability: Mapped[dict] = mapped_column(JSON, default=dict)  # AvailabilityPolicy fields
    status: Mapped[str] = mapped_column(String(16), default="offline")  # online|draining|offline
    replica_id: Mapped[str | None] = mapped_column(String(80), nullable=True)
    agent_version: Mapped[str] = mapped_column(String(40), default="")
    first_seen_at_s: Mapped[float] = mapped_column(Float)
    last_seen_at_s: Mapped[float] = mapped_column(Float)


class ReplicaRow(Base):
    """A coordinator replica's lease: it renews ``last_seen_at_s`` while it lives. The jobs of a
    replica whose lease ran out are claimed and settled by another
    (coordinator/replication/leases.py)."""

    __tablename__ = "replicas"
    id: Mapped[str] = mapped_column(String(80), primary_key=True)
    started_at_s: Mapped[float] = mapped_column(Float)
    last_seen_at_s: Mapped[float] = mapped_column(Float)
    pid: Mapped[int] = mapped_column(Integer, default=0)


class JobRow(Base):
    """One request's work, from admission to its final state; its metering lives here too."""

    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    client_id: Mapped[str] = mapped_column(ForeignKey("clients.id"), index=True)
    api_key_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    model: Mapped[str] = mapped_column(String(200))  # no index: no query filters by it
    endpoint: Mapped[str] = mapped_column(String(40))  # "chat.completions" | "completions"
    workload: Mapped[str] = mapped_column(String(16), default="inference")
    state: Mapped[str] = mapped_column(String(16), index=True)
    stream: Mapped[bool] = mapped_column(Boolean, default=False)
    trusted_only: Mapped[bool] = mapped_column(Boolean, default=False)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    max_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    finish_reason: Mapped[str | None] = mapped_column(String(16), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    node_id: Mapped[str | None] = mapped_column(String(40), nullable=True)  # last node
    replica_id: Mapped[str | None] = mapped_column(String(80), nullable=True, index=True)
    created_at_s: Mapped[float] = mapped_column(Float, index=True)
    first_token_at_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    time_to_first_token_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    total_s: Mapped[float | None] = mapped_column(Float, nullable=True)


class JobAttempt(Base):
    """One node's part of a job (a usage record): a job resumed after a node left has several,
    a job served by a chain one per stage (and per replacement of a stage)."""

    __tablename__ = "job_attempts"
    __table_args__ = (
        UniqueConstraint("job_id", "attempt", name="uq_job_attempts_job_attempt"),
        Index("ix_job_attempts_node_started", "node_id", "started_at_s"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # looked up through the unique index on (job_id, attempt): no index of its own
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    attempt: Mapped[int] = mapped_column(Integer)
    node_id: Mapped[str] = mapped_column(String(40))
    outcome: Mapped[str] = mapped_column(String(16))  # running|done|node_lost|failed|cancelled
    prompt_tokens: Mapped[int] = mapped_column(Integer)  # including the resumed prefix
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    time_to_first_token_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    total_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    busy_s: Mapped[float] = mapped_column(Float, default=0.0)
    energy_j: Mapped[float] = mapped_column(Float, default=0.0)
    energy_source: Mapped[str] = mapped_column(String(16), default="estimated")
    signature: Mapped[str | None] = mapped_column(String(120), nullable=True)
    started_at_s: Mapped[float] = mapped_column(Float)
    ended_at_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    # a stage of a chain (coordinator/chains.py): the layers [layer_first, layer_end) it ran and
    # its part of each token's work in parts per million (the ledger's share); all three null
    # for an attempt on a node that held the whole model
    layer_first: Mapped[int | None] = mapped_column(Integer, nullable=True)
    layer_end: Mapped[int | None] = mapped_column(Integer, nullable=True)
    work_ppm: Mapped[int | None] = mapped_column(Integer, nullable=True)

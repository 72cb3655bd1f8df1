"""Every query of the foundation (keys, owners, nodes, models, jobs) in one place.

``Store`` is synchronous: each method is one short transaction. The coordinator's async code
calls it through ``asyncio.to_thread`` so a slow database never stalls token streaming. The
ledger's queries are in ``ledger_store.py``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import sessionmaker

from sparecycles.errors import Conflict, NotFound
from sparecycles.secrets_util import hash_secret, new_id, new_secret
from sparecycles.store import ledger_schema as _ledger_schema  # noqa: F401  (registers tables)
from sparecycles.store import trust_schema as _trust_schema  # noqa: F401  (registers tables)
from sparecycles.store.db import Base, make_engine, make_sessionmaker
from sparecycles.store.schema import (
    ApiKey,
    Client,
    JobAttempt,
    JobRow,
    Model,
    Node,
    NodeToken,
    Owner,
)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


@dataclass(frozen=True, slots=True)
class ApiKeyInfo:
    key_id: str
    client_id: str | None  # a client's key (inference, admin)
    client_name: str
    scopes: frozenset[str]
    owner_id: str | None = None  # an owner's key (owner scope)


class Store:
    def __init__(self, url: str, *, engine: Engine | None = None):
        self.url = url
        self.engine = engine or make_engine(url)
        self.sessions: sessionmaker = make_sessionmaker(self.engine)

    # ---- schema ---------------------------------------------------------------------------

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (creates it on an empty database)."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def create_all(self) -> None:
        """Create tables straight from the models (unit tests' in-memory twin only)."""
        Base.metadata.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

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

    def insert_job(self, **fields: Any) -> None:
        with self.sessions.begin() as s:
            s.add(JobRow(**fields))

    def update_job(self, job_id: str, **fields: Any) -> None:
        with self.sessions.begin() as s:
            s.execute(update(JobRow).where(JobRow.id == job_id).values(**fields))

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

    def start_attempt(
        self, *, job_id: str, attempt: int, node_id: str, prompt_tokens: int
    ) -> None:
        now = time.time()
        with self.sessions.begin() as s:
            s.add(
                JobAttempt(
                    job_id=job_id,
                    attempt=attempt,
                    node_id=node_id,
                    outcome="running",
                    prompt_tokens=prompt_tokens,
                    started_at_s=now,
                )
            )
            s.execute(
                update(JobRow)
                .where(JobRow.id == job_id)
                .values(state="placed", attempts=attempt, node_id=node_id)
            )

    def end_attempt(self, job_id: str, attempt: int, **fields: Any) -> None:
        fields.setdefault("ended_at_s", time.time())
        with self.sessions.begin() as s:
            s.execute(
                update(JobAttempt)
                .where(JobAttempt.job_id == job_id, JobAttempt.attempt == attempt)
                .values(**fields)
            )

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

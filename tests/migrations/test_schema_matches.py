"""The schema the Alembic migrations build equals the schema the models declare, on both stores."""

from __future__ import annotations

import uuid

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, text

import sparecycles.store.dashboard_tables
import sparecycles.store.ledger_tables
import sparecycles.store.trust_tables  # noqa: F401  (every table module: the whole metadata)
from sparecycles.store import Store
from sparecycles.store.db import Base

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _diff(engine) -> list:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(ctx, Base.metadata)


def test_sqlite_migrations_match_models(tmp_path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'm.db'}")
    store.migrate()
    assert _diff(store.engine) == []
    store.migrate()  # running again is a no-op


@pytest.mark.postgres
def test_postgres_migrations_match_models() -> None:
    schema = f"mig_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        engine = create_engine(PG_URL, connect_args={"options": f"-csearch_path={schema}"})
        store = Store(PG_URL, engine=engine)
        store.migrate()
        assert _diff(engine) == []
        engine.dispose()
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()

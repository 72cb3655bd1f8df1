"""Alembic environment: the same migrations build SQLite and PostgreSQL.

Run through ``Store.migrate()`` (which hands over a connection) or the ``alembic`` command with
``-x url=…``. SQLite needs batch mode for ALTERs, so it is on for every migration.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from sparecycles.store.db import Base

config = context.config
target_metadata = Base.metadata


def run_migrations() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise RuntimeError("no database: pass -x url=... or set sqlalchemy.url")
    engine = create_engine(url)
    with engine.begin() as conn:
        _run(conn)


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations()

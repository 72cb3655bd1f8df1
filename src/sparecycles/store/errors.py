"""The database's failures, as the rest of the coordinator may name them without importing the
database library: only ``store/`` touches SQLAlchemy and the driver."""

from __future__ import annotations

from sqlalchemy import exc as sa_exc

__all__ = ["DuplicateKey", "WriterBusy", "transient_store_errors"]

# A write refused because a row with its key is there already (an insert retried after it had
# in fact committed, or two writers of one row).
DuplicateKey = sa_exc.IntegrityError


class WriterBusy(Exception):
    """A write asked not to wait (``SqliteWriter.begin(wait=False)``, on an event loop) found
    the database being written by another thread or process: nothing was done."""


def _transient_errors() -> tuple[type[Exception], ...]:
    errors: tuple[type[Exception], ...] = (
        sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)
    try:  # psycopg is installed with PostgreSQL support only
        import psycopg
    except ImportError:
        return errors
    return (*errors, psycopg.OperationalError, psycopg.InterfaceError)


# Errors that mean "the database is away for now" (restarting, connections cut, a deadlock that
# outlasted the store's own retries): SQLAlchemy's, and psycopg's own from the ledger's raw COPY
# and pipelines. Writes after admission wait them out; a request meeting one gets a 503.
transient_store_errors = _transient_errors()

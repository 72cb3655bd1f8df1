"""The only code that touches the database. Each noun has its ``*_tables.py`` (the schema) and
``*_queries.py`` (everything the system does to those tables); ``Store`` is the core queries."""

from sparecycles.store import (  # noqa: F401  (register their tables)
    costs_tables,
    dashboard_tables,
    ledger_tables,
    trust_tables,
)
from sparecycles.store.core_queries import ApiKeyInfo, Store

__all__ = ["ApiKeyInfo", "Store"]

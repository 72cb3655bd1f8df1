"""The only code that touches the database. Each noun has its ``*_tables.py`` (the schema) and
``*_queries.py`` (everything the system does to those tables); ``Store`` is the core queries."""

from sparecycles.store import ledger_tables, trust_tables  # noqa: F401  (register their tables)
from sparecycles.store.core_queries import ApiKeyInfo, Store

__all__ = ["ApiKeyInfo", "Store"]

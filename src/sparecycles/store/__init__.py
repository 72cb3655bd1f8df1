"""The only code that touches the database. See ``queries.py`` for what the system does to it."""

from sparecycles.store.core_queries import ApiKeyInfo, Store

__all__ = ["ApiKeyInfo", "Store"]

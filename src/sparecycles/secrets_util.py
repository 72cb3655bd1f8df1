"""API keys and node tokens: made with a CSPRNG, shown once, stored only as SHA-256."""

from __future__ import annotations

import hashlib
import secrets


def new_secret(prefix: str) -> str:
    """A new secret such as ``sk-sc-…`` (client key) or ``nt-sc-…`` (node token)."""
    return f"{prefix}-sc-{secrets.token_urlsafe(32)}"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_id(kind: str) -> str:
    """An opaque id such as ``job_3f9c…``: 16 random hex digits after a kind prefix."""
    return f"{kind}_{secrets.token_hex(8)}"

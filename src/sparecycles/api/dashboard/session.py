"""Dashboard sign-in: who a key is, a signed session cookie, CSRF tokens, security headers.

A session is a cookie ``<payload>.<HMAC-SHA256>`` holding the key's id, a random nonce and an
expiry; it is HttpOnly, SameSite=Lax, scoped to ``/dashboard`` and Secure over HTTPS. Nothing is
trusted from it but the key id: every request looks the key up again, so revoking a key ends its
sessions at once. Every POST carries a CSRF token, an HMAC of the session's nonce (or, on the
sign-in form, of a short-lived ``sc_login`` cookie's nonce), and must come from our own origin.

The secret is ``$SPARECYCLES_SESSION_SECRET`` (set the same on every replica), else a random one
kept in ``session-secret`` (mode 0600) beside the SQLite database or in the data directory.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from fastapi import Request, Response

from sparecycles.settings import default_data_dir
from sparecycles.store.dashboard_queries import DashboardQueries, KeyRecord

SESSION_COOKIE = "sc_session"
LOGIN_COOKIE = "sc_login"
COOKIE_PATH = "/dashboard"
SECRET_ENV = "SPARECYCLES_SESSION_SECRET"
SECRET_FILE = "session-secret"
session_max_age_s = 12 * 3600
login_form_max_age_s = 15 * 60
cookie_chars_max = 512  # a longer cookie is not ours
_R = TypeVar("_R", bound=Response)
secret_bytes_min = 32

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data: blob:; connect-src 'self'; font-src 'self'; object-src 'none'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True, slots=True)
class Principal:
    """The signed-in key, what it may see, and the CSRF token of its session."""

    key_id: str
    key_name: str
    roles: frozenset[str]  # "client", "owner", "admin"
    client_id: str | None
    client_name: str | None
    owner_id: str | None
    owner_name: str | None
    csrf: str

    @property
    def display_name(self) -> str:
        return self.owner_name or self.client_name or self.key_name

    def home(self) -> str:
        for role, path in (("admin", "network"), ("owner", "owner"), ("client", "client")):
            if role in self.roles:
                return f"{COOKIE_PATH}/{path}"
        return f"{COOKIE_PATH}/login"


def roles_of(key: KeyRecord) -> frozenset[str]:
    """An owner key is an owner and nothing else; a client's key is a client if it may run
    inference and an admin if it has the admin scope."""
    if key.owner_id is not None:
        return frozenset({"owner"})
    roles = set()
    if key.client_id is not None and "inference" in key.scopes:
        roles.add("client")
    if "admin" in key.scopes:
        roles.add("admin")
    return frozenset(roles)


# ---- the secret and the signatures -------------------------------------------------------------


def _secret_path(database_url: str) -> Path:
    if database_url.startswith("sqlite:///") and not database_url.endswith(":memory:"):
        return Path(database_url.removeprefix("sqlite:///")).parent / SECRET_FILE
    return default_data_dir() / SECRET_FILE


def load_secret(database_url: str) -> bytes:
    """The environment's secret, else the one kept on disk (made on first use)."""
    configured = os.environ.get(SECRET_ENV, "")
    if configured:
        if len(configured) < secret_bytes_min:
            raise ValueError(f"{SECRET_ENV} must be at least {secret_bytes_min} characters")
        return configured.encode()
    if database_url.startswith("sqlite") and "///" not in database_url:
        return secrets.token_bytes(32)  # in-memory database: sessions last as long as it does
    path = _secret_path(database_url)
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    value = path.read_text().strip()
    if len(value) < secret_bytes_min:
        raise ValueError(f"{path} holds no usable secret; delete it to make a new one")
    return value.encode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, purpose: str, message: str) -> str:
    return _b64(hmac.new(secret, f"{purpose}|{message}".encode(), hashlib.sha256).digest())


def make_session(secret: bytes, key_id: str, now_s: float) -> str:
    payload = _b64(json.dumps({"k": key_id, "n": secrets.token_urlsafe(16),
                               "e": int(now_s + session_max_age_s)}).encode())
    return f"{payload}.{_mac(secret, 'session', payload)}"


def read_session(secret: bytes, value: str | None, now_s: float) -> tuple[str, str] | None:
    """(key id, nonce) of a valid, unexpired session cookie; None for anything else."""
    if not value or len(value) > cookie_chars_max or value.count(".") != 1:
        return None
    payload, mac = value.split(".")
    if not hmac.compare_digest(mac, _mac(secret, "session", payload)):
        return None
    try:
        data = json.loads(_unb64(payload))
        key_id, nonce, expires = str(data["k"]), str(data["n"]), float(data["e"])
    except (ValueError, KeyError, TypeError):
        return None
    return (key_id, nonce) if now_s < expires else None


def csrf_token(secret: bytes, nonce: str) -> str:
    return _mac(secret, "csrf", nonce)


def csrf_ok(secret: bytes, nonce: str | None, token: str | None) -> bool:
    if not nonce or not token or len(token) > cookie_chars_max:
        return False
    return hmac.compare_digest(token, csrf_token(secret, nonce))


# ---- per request -------------------------------------------------------------------------------


def secret_of(request: Request) -> bytes:
    state = request.app.state
    if getattr(state, "dashboard_secret", None) is None:
        state.dashboard_secret = load_secret(state.coordinator.store.url)
    return state.dashboard_secret


def queries_of(request: Request) -> DashboardQueries:
    state = request.app.state
    if getattr(state, "dashboard_queries", None) is None:
        state.dashboard_queries = DashboardQueries(state.coordinator.store.sessions)
    return state.dashboard_queries


async def principal_of(request: Request) -> Principal | None:
    """The signed-in key of this request, or None (no, bad, expired or revoked session)."""
    secret = secret_of(request)
    found = read_session(secret, request.cookies.get(SESSION_COOKIE), time.time())
    if found is None:
        return None
    key_id, nonce = found
    key = await asyncio.to_thread(queries_of(request).key_by_id, key_id)
    if key is None or not roles_of(key):
        return None
    return Principal(key.key_id, key.name, roles_of(key), key.client_id, key.client_name,
                     key.owner_id, key.owner_name, csrf_token(secret, nonce))


def same_origin(request: Request) -> bool:
    """A browser's POST names its page's origin; refuse one from elsewhere (with the CSRF
    token this is belt and braces). Requests without the header (not browsers) pass."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not origin:
        return True
    return urlsplit(origin).netloc == request.headers.get("host", "")


def set_cookie(response: Response, request: Request, name: str, value: str, max_age_s: int
               ) -> None:
    response.set_cookie(name, value, max_age=max_age_s, path=COOKIE_PATH, httponly=True,
                        samesite="lax", secure=request.url.scheme == "https")


def clear_cookie(response: Response, request: Request, name: str) -> None:
    response.delete_cookie(name, path=COOKIE_PATH, httponly=True, samesite="lax",
                           secure=request.url.scheme == "https")


def secure_headers(response: _R) -> _R:
    response.headers.update(SECURITY_HEADERS)
    return response

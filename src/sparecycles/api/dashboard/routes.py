"""The dashboard: server-rendered pages for owners, clients and the platform, served by the
coordinator under ``/dashboard``, with JSON under ``/dashboard/api`` that the pages poll.

Pages: ``network`` and ``finance`` (admin), ``owner`` (an owner key), ``client`` (a client's API
key). Sign-in, sessions and CSRF are in ``api/dashboard/session.py``; the figures in
``api/dashboard/views.py`` and ``api/dashboard/finance.py``; the forms in
``api/dashboard/forms.py``; every
query in ``store/dashboard_queries.py``. Every asset is served from the package (``static/``) or
from the installed plotly package; nothing comes from a CDN. docs/dashboard.md describes the
pages and the security model.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import re
import secrets
import time
from collections.abc import Callable
from functools import cache
from importlib import resources
from typing import Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from jinja2 import Environment, PackageLoader, select_autoescape

from sparecycles.api.dashboard import finance as dashboard_finance
from sparecycles.api.dashboard import forms as forms
from sparecycles.api.dashboard import session as sess
from sparecycles.api.dashboard import views as views
from sparecycles.api.dashboard.charts import RANGES, when
from sparecycles.coordinator.node_conn import policy_from_dict
from sparecycles.costs import focus
from sparecycles.errors import InvalidRequest, InvariantViolation, SpareCyclesError

router = APIRouter(prefix="/dashboard", include_in_schema=False)
poll_interval_s = 15  # how often a page refreshes its figures
STATIC_FILES = ("dashboard.css", "dashboard.js")
PAGES = (("network", "Network", "admin"), ("finance", "Finance", "admin"),
         ("owner", "My devices", "owner"), ("client", "Usage & keys", "client"))
RangeParam = Query(None, alias="range", max_length=8, description=", ".join(RANGES))
_period = re.compile(r"^[0-9]{4}-(0[1-9]|1[0-2])$")
_templates = Environment(loader=PackageLoader("sparecycles.api", "templates"),
                         autoescape=select_autoescape(default=True), trim_blocks=True,
                         lstrip_blocks=True)


# ---- assets --------------------------------------------------------------------------------------


@cache
def _asset(name: str) -> tuple[bytes, bytes, str]:
    """(bytes, gzipped bytes, etag) of a static file or of plotly.min.js from plotly."""
    if name == "plotly.min.js":
        data = resources.files("plotly").joinpath("package_data", name).read_bytes()
    else:
        data = resources.files("sparecycles.api").joinpath("static", name).read_bytes()
    return data, gzip.compress(data, 6), hashlib.sha256(data).hexdigest()[:16]


def asset_url(name: str) -> str:
    return f"/dashboard/static/{name}?v={_asset(name)[2]}"


@router.get("/static/{name}")
async def static(name: str, request: Request) -> Response:
    if name not in (*STATIC_FILES, "plotly.min.js"):
        return Response("not found", 404, media_type="text/plain")
    data, zipped, etag = await asyncio.to_thread(_asset, name)
    headers = {"ETag": f'"{etag}"', "Cache-Control": "public, max-age=604800, immutable",
               "X-Content-Type-Options": "nosniff", "Vary": "Accept-Encoding"}
    if request.headers.get("if-none-match") == f'"{etag}"':
        return Response(status_code=304, headers=headers)
    kind = "text/css" if name.endswith(".css") else "text/javascript"
    if "gzip" in request.headers.get("accept-encoding", ""):
        headers["Content-Encoding"] = "gzip"
        data = zipped
    return Response(data, media_type=f"{kind}; charset=utf-8", headers=headers)


# ---- rendering -----------------------------------------------------------------------------------


def _render(request: Request, template: str, principal: sess.Principal | None, *,
            status: int = 200, **context: Any) -> HTMLResponse:
    nav = [(f"/dashboard/{path}", label, path) for path, label, role in PAGES
           if principal is not None and role in principal.roles]
    html = _templates.get_template(template).render(
        principal=principal, nav=nav, asset=asset_url, ranges=list(RANGES),
        poll_s=poll_interval_s, now=when(time.time()), **context)
    return sess.secure_headers(HTMLResponse(html, status))


def _redirect(url: str) -> Response:
    return sess.secure_headers(RedirectResponse(url, 303))


async def _need(request: Request, role: str) -> sess.Principal | Response:
    """The signed-in principal if it has ``role``; else the sign-in page or a 403 page."""
    p = await sess.principal_of(request)
    if p is None:
        return _redirect("/dashboard/login")
    if role not in p.roles:
        return _render(request, "error.html", p, status=403,
                       message=f"This page needs the {role} role, which your key does not have.")
    return p


async def _need_json(request: Request, role: str) -> sess.Principal | Response:
    p = await sess.principal_of(request)
    if p is None:
        return sess.secure_headers(JSONResponse({"error": "not signed in"}, 401))
    if role not in p.roles:
        return sess.secure_headers(JSONResponse({"error": f"needs the {role} role"}, 403))
    return p


async def _posted(request: Request, p: sess.Principal) -> dict[str, str] | Response:
    """The form of a POST from our own page with this session's CSRF token, or a 403."""
    form = await forms.read_form(request)
    if not sess.same_origin(request) or form.get("csrf") != p.csrf:
        return _render(request, "error.html", p, status=403,
                       message="The form expired or came from another site. Reload and retry.")
    return form


def _coord(request: Request) -> Any:
    return request.app.state.coordinator


async def _build(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    return await asyncio.to_thread(fn, *args)


def _json(data: dict[str, Any]) -> Response:
    body: dict[str, Any] = {k: data[k] for k in ("stats", "charts") if k in data}
    body["updated"] = when(time.time())
    return sess.secure_headers(JSONResponse(body))


# ---- sign-in -------------------------------------------------------------------------------------


@router.get("", response_model=None)
@router.get("/", response_model=None)
async def home(request: Request) -> Response:
    p = await sess.principal_of(request)
    return _redirect(p.home() if p else "/dashboard/login")


def _login_page(request: Request, error: str | None = None, status: int = 200) -> Response:
    nonce = secrets.token_urlsafe(16)
    resp = _render(request, "login.html", None, status=status, error=error,
                   csrf=sess.csrf_token(sess.secret_of(request), nonce))
    sess.set_cookie(resp, request, sess.LOGIN_COOKIE, nonce, sess.login_form_max_age_s)
    return resp


@router.get("/login", response_model=None)
async def login_form(request: Request) -> Response:
    p = await sess.principal_of(request)
    return _redirect(p.home()) if p else _login_page(request)


@router.post("/login", response_model=None)
async def login(request: Request) -> Response:
    form = await forms.read_form(request)
    secret = sess.secret_of(request)
    if not sess.same_origin(request) or not sess.csrf_ok(
            secret, request.cookies.get(sess.LOGIN_COOKIE), form.get("csrf")):
        return _login_page(request, "The sign-in form expired. Please try again.", 403)
    key_text = form.get("key", "").strip()
    key = (await asyncio.to_thread(sess.queries_of(request).key_by_secret, key_text)
           if 0 < len(key_text) <= 200 else None)
    if key is None or not sess.roles_of(key):
        return _login_page(request, "That key does not open the dashboard: it is unknown, "
                           "revoked, or has no role here.", 401)
    p_home = sess.Principal(key.key_id, key.name, sess.roles_of(key), None, None, None, None,
                            "").home()
    resp = _redirect(p_home)
    sess.set_cookie(resp, request, sess.SESSION_COOKIE,
                    sess.make_session(secret, key.key_id, time.time()), sess.session_max_age_s)
    sess.clear_cookie(resp, request, sess.LOGIN_COOKIE)
    return resp


@router.post("/logout", response_model=None)
async def logout(request: Request) -> Response:
    p = await sess.principal_of(request)
    if p is not None:
        form = await _posted(request, p)
        if isinstance(form, Response):
            return form
    resp = _redirect("/dashboard/login")
    sess.clear_cookie(resp, request, sess.SESSION_COOKIE)
    return resp


# ---- network and finance (admin) -----------------------------------------------------------------


@router.get("/network", response_model=None)
async def network_page(request: Request, rng: str | None = RangeParam) -> Response:
    p = await _need(request, "admin")
    if isinstance(p, Response):
        return p
    data = await _build(views.network, sess.queries_of(request), _coord(request), rng,
                        time.time())
    return _render(request, "network.html", p, data=data, page="network",
                   api=f"/dashboard/api/network?range={data['range']}")


@router.get("/api/network", response_model=None)
async def network_json(request: Request, rng: str | None = RangeParam) -> Response:
    p = await _need_json(request, "admin")
    if isinstance(p, Response):
        return p
    return _json(await _build(views.network, sess.queries_of(request), _coord(request), rng,
                              time.time()))


def _period_param(period: str | None) -> str:
    if period and _period.match(period):
        return period
    return views.period_of(time.time())


@router.get("/finance", response_model=None)
async def finance_page(request: Request, period: str | None = None) -> Response:
    p = await _need(request, "admin")
    if isinstance(p, Response):
        return p
    label = _period_param(period)
    try:
        data = await _build(dashboard_finance.finance, _coord(request), label, time.time())
    except SpareCyclesError as exc:
        return _render(request, "error.html", p, status=exc.status_code, message=exc.message)
    return _render(request, "finance.html", p, data=data, page="finance",
                   api=f"/dashboard/api/finance?period={label}")


@router.get("/api/finance", response_model=None)
async def finance_json(request: Request, period: str | None = None) -> Response:
    p = await _need_json(request, "admin")
    if isinstance(p, Response):
        return p
    return _json(await _build(dashboard_finance.finance, _coord(request), _period_param(period),
                              time.time()))


@router.get("/finance/focus.csv", response_model=None)
async def finance_focus(request: Request, period: str | None = None) -> Response:
    """The FOCUS 1.2 export of a month, as ``GET /v1/admin/costs/focus.csv`` gives it."""
    p = await _need(request, "admin")
    if isinstance(p, Response):
        return p
    label = _period_param(period)

    def work() -> str:
        pc, _rec = views.period_costs_cached(_coord(request), label, time.time())
        text = pc.focus_csv()
        problems = focus.validate(*focus.read_csv(text))
        if problems:  # our own export breaking the spec is a bug
            raise InvariantViolation(f"FOCUS export of {label} breaks: {problems[:5]}")
        return text

    return sess.secure_headers(Response(await asyncio.to_thread(work), media_type=(
        "text/csv; charset=utf-8"), headers={
        "Content-Disposition": f'attachment; filename="sparecycles-focus-{label}.csv"'}))


# ---- owner ---------------------------------------------------------------------------------------


async def _owner_page(request: Request, p: sess.Principal, *, status: int = 200,
                      **context: Any) -> Response:
    assert p.owner_id is not None
    data = await _build(views.owner, sess.queries_of(request), _coord(request), p.owner_id,
                        time.time())
    return _render(request, "owner.html", p, status=status, data=data, page="owner",
                   api="/dashboard/api/owner", **context)


@router.get("/owner", response_model=None)
async def owner_page(request: Request, saved: str | None = None) -> Response:
    p = await _need(request, "owner")
    if isinstance(p, Response):
        return p
    return await _owner_page(request, p, saved=saved)


@router.get("/api/owner", response_model=None)
async def owner_json(request: Request) -> Response:
    p = await _need_json(request, "owner")
    if isinstance(p, Response):
        return p
    assert p.owner_id is not None
    return _json(await _build(views.owner, sess.queries_of(request), _coord(request), p.owner_id,
                              time.time()))


@router.post("/owner/nodes/{node_id}/policy", response_model=None)
async def owner_policy(node_id: str, request: Request) -> Response:
    """Set the availability policy of one of the owner's nodes: stored on the node's row and
    applied at once to the node's connection on this coordinator."""
    p = await _need(request, "owner")
    if isinstance(p, Response):
        return p
    form = await _posted(request, p)
    if isinstance(form, Response):
        return form
    try:
        policy = forms.parse_policy(form)
    except InvalidRequest as exc:
        return await _owner_page(request, p, status=400, error=exc.message, error_node=node_id)
    assert p.owner_id is not None
    found = await asyncio.to_thread(sess.queries_of(request).set_node_policy, p.owner_id,
                                    node_id, policy)
    if not found:
        return _render(request, "error.html", p, status=404, message="You have no such device.")
    d = _coord(request).dispatcher
    conn = d.nodes.get(node_id) if d is not None else None
    if conn is not None and conn.owner_id == p.owner_id:
        conn.policy = policy_from_dict(policy)
    return _redirect(f"/dashboard/owner?saved={node_id}#node-{node_id}")


# ---- client --------------------------------------------------------------------------------------


async def _client_page(request: Request, p: sess.Principal, range_name: str | None = None, *,
                       status: int = 200, **context: Any) -> Response:
    data = await _build(views.client, sess.queries_of(request), _coord(request), p.client_id,
                        range_name, time.time())
    return _render(request, "client.html", p, status=status, data=data, page="client",
                   api=f"/dashboard/api/client?range={data['range']}", **context)


@router.get("/client", response_model=None)
async def client_page(request: Request, rng: str | None = RangeParam) -> Response:
    p = await _need(request, "client")
    if isinstance(p, Response):
        return p
    return await _client_page(request, p, rng)


@router.get("/api/client", response_model=None)
async def client_json(request: Request, rng: str | None = RangeParam) -> Response:
    p = await _need_json(request, "client")
    if isinstance(p, Response):
        return p
    return _json(await _build(views.client, sess.queries_of(request), _coord(request),
                              p.client_id, rng, time.time()))


@router.post("/client/keys", response_model=None)
async def client_key_create(request: Request) -> Response:
    """Make an inference key for the signed-in client; its secret is shown on this page once."""
    p = await _need(request, "client")
    if isinstance(p, Response):
        return p
    form = await _posted(request, p)
    if isinstance(form, Response):
        return form
    assert p.client_id is not None
    try:
        made = await asyncio.to_thread(sess.queries_of(request).create_client_key, p.client_id,
                                       forms.parse_key_name(form))
    except InvalidRequest as exc:
        return await _client_page(request, p, status=400, error=exc.message)
    if made is None:
        return await _client_page(request, p, status=400, error="You hold the most keys "
                                  "allowed; revoke one first.")
    return await _client_page(request, p, new_key=made[1], new_key_id=made[0])


@router.post("/client/keys/{key_id}/{action}", response_model=None)
async def client_key_change(key_id: str, action: str, request: Request) -> Response:
    """``revoke`` a key, or set its ``limits`` (budget per month, requests per minute)."""
    p = await _need(request, "client")
    if isinstance(p, Response):
        return p
    form = await _posted(request, p)
    if isinstance(form, Response):
        return form
    assert p.client_id is not None
    q = sess.queries_of(request)
    try:
        if action == "revoke":
            ok = await asyncio.to_thread(q.revoke_client_key, p.client_id, key_id)
        elif action == "limits":
            budget, rpm = forms.parse_limits(form)
            ok = await asyncio.to_thread(q.set_key_limits, p.client_id, key_id, budget, rpm)
        else:
            ok = False
    except InvalidRequest as exc:
        return await _client_page(request, p, status=400, error=exc.message)
    if not ok:
        return _render(request, "error.html", p, status=404, message="You have no such key.")
    gate = getattr(_coord(request), "gate", None)  # the coordinator's per-key admission
    if gate is not None:
        gate.forget(key_id)  # applies the new limits here now, on other replicas within 5 s
    return _redirect("/dashboard/client#keys")

"""The dashboard in Debian's Chromium, against a real network after the demo workload: each page
renders real data with titled charts, forms work, figures update without a reload, nothing is
fetched from outside the coordinator, and owners and clients see only their own data (also
checked at the API). A screenshot of each page is saved (``artifacts/screenshots``,
``docs/screenshots``)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from browser_helpers import Watch, new_page, save_screenshot, sign_in, ui_timeout_ms

from sparecycles.costs import focus

pytestmark = [pytest.mark.browser, pytest.mark.timeout(900)]


@pytest.fixture
def page(browser: Any, net: Any) -> Iterator[Any]:
    pg = new_page(browser, viewport={"width": 1360, "height": 900})
    watch = Watch(pg, net.url)
    yield pg
    pg.context.close()
    watch.assert_clean()


def _tile(page: Any, name: str) -> str:
    return page.inner_text(f'[data-stat="{name}"]').strip()


def _chart_ready(page: Any, name: str) -> Any:
    return page.wait_for_selector(f'[data-chart="{name}"] .main-svg')


def _axis_titles(page: Any, name: str) -> list[str]:
    return page.eval_on_selector_all(
        f'[data-chart="{name}"] .g-xtitle text, [data-chart="{name}"] .g-ytitle text, '
        f'[data-chart="{name}"] .g-y2title text', "els => els.map(e => e.textContent)")


def _points(page: Any, name: str, *, zeros: bool = False) -> int:
    """Values plotted (read from the drawn figure), not counting missing ones nor, unless
    ``zeros``, zeros: none means the figure shows no data."""
    _chart_ready(page, name)
    return page.eval_on_selector(
        f'[data-chart="{name}"]',
        "(el, zeros) => (el.data || []).flatMap(t => t.y || [])"
        ".filter(v => v !== null && (zeros || v !== 0)).length", zeros)


def test_network_page(page: Any, net: Any) -> None:
    sign_in(page, net.url, net.keys["admin"])
    assert page.url.endswith("/dashboard/network")
    page.goto(net.url + "/dashboard/network?range=15m")
    page.wait_for_selector("body.charts-ready")
    assert _tile(page, "nodes_online") == "2"
    assert int(_tile(page, "requests").split()[0]) >= 12
    assert int(_tile(page, "departures")) >= 1
    for name, y_title in (("nodes_online", "nodes online (mean)"),
                          ("utilization", "utilization (%)"),
                          ("queue", "queue depth (jobs)"),
                          ("throughput", "requests per second"),
                          ("latency", "latency (s)"),
                          ("departures", "jobs interrupted (node left)")):
        _chart_ready(page, name)
        titles = _axis_titles(page, name)
        assert "time (UTC)" in titles and y_title in titles, (name, titles)
        # the queue is sampled between the workload's steps, when nothing waits: zeros
        assert _points(page, name, zeros=name == "queue") > 0, f"{name} shows no data"
    assert "tokens per second" in _axis_titles(page, "throughput")
    table = page.inner_text("table")
    assert "alice-gaming-pc" in table and "bob-laptop" in table
    # the requests served by a chain of two phones, each stage with its layers and earning
    chains = page.inner_text("table.chains")
    assert all(job in chains for job in net.chain_jobs), chains
    for stage in ("alice-phone", "bob-phone", "0:2", "2:4", "50.0 %"):
        assert stage in chains, stage
    page.goto(net.url + "/dashboard/network?range=5m")  # the workload fills this range best
    page.wait_for_selector("body.charts-ready")
    _chart_ready(page, "departures")
    save_screenshot(page, "network")


def test_owner_page_and_policy_form(page: Any, net: Any) -> None:
    sign_in(page, net.url, net.keys["alice"])
    assert page.url.endswith("/dashboard/owner")
    page.wait_for_selector("body.charts-ready")
    body = page.inner_text("main")
    assert "alice-gaming-pc" in body and "bob-laptop" not in body
    assert "USD" in _tile(page, "earned_30d") and _tile(page, "earned_30d") != "0.00 USD"
    for name, x_title in (("earnings", "day (UTC)"), ("profit", "device")):
        _chart_ready(page, name)
        titles = _axis_titles(page, name)
        assert x_title in titles and any("USD" in t for t in titles), titles
        assert _points(page, name) > 0, f"{name} shows no data"
    assert "Net profit" in body and "Signed results verified" in body
    assert "Reputation" in body and "Verification results" in body
    stages = page.inner_text("#stage-jobs + section")
    assert "alice-phone" in stages and "0:2" in stages and "bob-phone" not in stages, stages
    assert "0.00 USD" not in stages and "—" not in stages, stages  # each stage was paid
    # edit the availability policy of the device
    page.click("details.policy summary")
    page.fill("input[name=windows]", "22:00-07:00")
    page.fill("input[name=owner_load_max_pct]", "40")
    page.check("input[name=only_on_ac_power]")
    page.click("details.policy button[type=submit]")
    page.wait_for_selector(".notice.ok")
    assert page.input_value("input[name=windows]") == "22:00-07:00"
    assert page.is_checked("input[name=only_on_ac_power]")
    node = next(n for n in net.net.store().list_nodes() if n.name == "alice-gaming-pc")
    assert node.availability["windows"] == [[1320, 420]]
    assert node.availability["owner_load_max"] == 0.4
    page.goto(net.url + "/dashboard/owner")
    page.wait_for_selector("body.charts-ready")
    _chart_ready(page, "profit")
    save_screenshot(page, "owner")


def test_client_page_keys_and_limits(page: Any, net: Any) -> None:
    sign_in(page, net.url, net.keys["acme"])
    assert page.url.endswith("/dashboard/client")
    page.goto(net.url + "/dashboard/client?range=1h")
    page.wait_for_selector("body.charts-ready")
    body = page.inner_text("main")
    assert "acme-prod" in body and "acme-batch" in body and "globex" not in body
    assert int(_tile(page, "requests").replace(",", "")) >= 9
    for name, y_title in (("spend", "charged (USD)"), ("tokens", "tokens (prompt + output)")):
        _chart_ready(page, name)
        titles = _axis_titles(page, name)
        assert "time (UTC)" in titles and y_title in titles, titles
        assert _points(page, name) > 0
    legend = page.text_content('[data-chart="spend"] .legend') or ""
    assert "acme-prod" in legend and "acme-batch" in legend
    # a new key, shown once, that works at the API; then limits on it
    page.fill("#new-key-name", "notebook")
    page.click("form[action='/dashboard/client/keys'] button")
    secret = page.inner_text("#new-key").strip()
    assert secret.startswith("sk-sc-")
    assert net.client("acme").models.with_raw_response.list().http_response.status_code == 200
    r = httpx.get(net.url + "/v1/models", headers={"Authorization": f"Bearer {secret}"})
    assert r.status_code == 200
    row = page.locator("tr", has_text="notebook")
    row.locator("input[name=budget]").fill("5.00")
    row.locator("input[name=requests_per_minute]").fill("60")
    row.locator("button", has_text="Save limits").click()
    page.wait_for_url(re.compile(r".*/dashboard/client(#keys)?$"))
    row = page.locator("tr", has_text="notebook")
    assert row.locator("input[name=budget]").input_value() == "5.00"
    row.locator("button", has_text="Revoke").click()
    page.wait_for_url(re.compile(r".*/dashboard/client(#keys)?$"))
    assert "revoked" in page.locator("tr", has_text="notebook").inner_text()
    deadline = time.monotonic() + 30  # the coordinator caches a key's answer for 5 s
    while httpx.get(net.url + "/v1/models",
                    headers={"Authorization": f"Bearer {secret}"}).status_code != 401:
        assert time.monotonic() < deadline, "a revoked key still works"
        time.sleep(0.5)
    page.goto(net.url + "/dashboard/client?range=15m")
    page.wait_for_selector("body.charts-ready")
    _chart_ready(page, "spend")
    save_screenshot(page, "client")


def test_finance_page_and_focus_export(page: Any, net: Any) -> None:
    sign_in(page, net.url, net.keys["admin"])
    page.goto(net.url + "/dashboard/finance")
    page.wait_for_selector("body.charts-ready")
    assert _tile(page, "revenue") != "0.00 USD"
    assert _tile(page, "reconciled") == "all sources agree"
    assert page.inner_text("#reconciliation-status") == "all sources agree"
    for name in ("cogs", "margin", "per_mtok"):
        _chart_ready(page, name)
        titles = _axis_titles(page, name)
        assert any("USD" in t for t in titles), (name, titles)
        assert _points(page, name) > 0, f"{name} shows no data"
    body = page.inner_text("main")
    assert "break-even volume" in body and "gaming-pc" in body and "laptop" in body
    assert "(costs.toml)" in body and "/costs.toml" not in body  # a name, not a local path
    with page.expect_download() as dl:
        page.click("text=Download FOCUS export (CSV)")
    text = open(dl.value.path(), encoding="utf-8").read()  # noqa: SIM115
    assert focus.validate(*focus.read_csv(text)) == []
    save_screenshot(page, "finance")


def test_figures_update_without_a_reload(page: Any, net: Any) -> None:
    sign_in(page, net.url, net.keys["globex"])
    page.goto(net.url + "/dashboard/client?range=1h&poll=2")
    page.wait_for_selector("body.charts-ready")
    before = int(_tile(page, "requests").replace(",", ""))
    page.evaluate("window.__sameDocument = true")
    net.client("globex").chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "One more, please."}], max_tokens=8)
    deadline = time.monotonic() + ui_timeout_ms / 1000
    while int(_tile(page, "requests").replace(",", "")) <= before:  # the poll (every 2 s)
        assert time.monotonic() < deadline, "the figures did not update"
        page.wait_for_timeout(250)
    assert page.evaluate("window.__sameDocument") is True  # the page was not reloaded
    assert int(page.get_attribute("main", "data-polls") or 0) >= 1


def test_owners_and_clients_see_only_their_own(browser: Any, net: Any) -> None:
    page = new_page(browser)
    sign_in(page, net.url, net.keys["bob"])
    body = page.inner_text("main")
    assert "bob-laptop" in body and "alice-gaming-pc" not in body
    assert "bob-phone" in body and "alice-phone" not in body  # stage jobs: bob's own only
    assert page.goto(net.url + "/dashboard/client").status == 403
    assert page.goto(net.url + "/dashboard/network").status == 403
    sign_in(page, net.url, net.keys["globex"])
    page.goto(net.url + "/dashboard/client?range=1h")
    body = page.inner_text("main")
    assert "globex-app" in body and "acme" not in body
    page.context.close()
    # the same at the API, with a plain HTTP client holding each session
    with _session(net, "bob") as bob, _session(net, "globex") as globex:
        owner = bob.get("/dashboard/api/owner").json()
        assert "alice" not in str(owner) and "bob-laptop" in str(owner)
        alice_node = next(n for n in net.net.store().list_nodes() if n.owner_id != _owner_of(
            net, "bob")).id
        token = _csrf(bob.get("/dashboard/owner").text)
        r = bob.post(f"/dashboard/owner/nodes/{alice_node}/policy",
                     data={"csrf": token, "windows": "00:00-01:00"})
        assert r.status_code == 404
        spend = globex.get("/dashboard/api/client?range=30d").json()
        assert "acme" not in str(spend)
        token = _csrf(globex.get("/dashboard/client").text)
        r = globex.post(f"/dashboard/client/keys/{net.key_ids['acme']}/revoke",
                        data={"csrf": token})
        assert r.status_code == 404
        assert globex.get("/dashboard/api/network").status_code == 403
        assert globex.get("/dashboard/api/finance").status_code == 403
    assert httpx.get(net.url + "/v1/models",
                     headers={"Authorization": f"Bearer {net.keys['acme']}"}).status_code == 200


def test_phone_sized_viewport(browser: Any, net: Any) -> None:
    page = new_page(browser, viewport={"width": 390, "height": 844}, device_scale_factor=2,
                    is_mobile=True, has_touch=True)
    for who, path in (("admin", "/dashboard/network"), ("admin", "/dashboard/finance"),
                      ("acme", "/dashboard/client"), ("alice", "/dashboard/owner")):
        sign_in(page, net.url, net.keys[who])
        page.goto(net.url + path)
        page.wait_for_selector("body.charts-ready")
        page.wait_for_selector("[data-chart] .main-svg")
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 1, f"{path} is {overflow} px wider than the phone"
    _chart_ready(page, "earnings")
    save_screenshot(page, "owner-mobile")
    page.context.close()


# ---- helpers ---------------------------------------------------------------------------------


def _csrf(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m is not None
    return m[1]


def _owner_of(net: Any, name: str) -> str:
    return net.net.store().ensure_owner(name)


class _session:
    def __init__(self, net: Any, who: str):
        self.client = httpx.Client(base_url=net.url, follow_redirects=False)
        page = self.client.get("/dashboard/login")
        r = self.client.post("/dashboard/login",
                             data={"key": net.keys[who], "csrf": _csrf(page.text)})
        assert r.status_code == 303, r.text

    def __enter__(self) -> httpx.Client:
        return self.client

    def __exit__(self, *exc: object) -> None:
        self.client.close()

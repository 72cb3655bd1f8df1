"""The control-plane load harness against a real coordinator on loopback (bounded: 50 fake
nodes, 20 streamed requests): every request completes, each client receives exactly the tokens
its fake node sent (none lost, none repeated), and the ledger's audit passes."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from sparecycles import modelfiles
from sparecycles.coordinator.textstream import TextStream
from sparecycles.tools.loadtest.clients import ClientConfig, Workload, run_clients
from sparecycles.tools.loadtest.fakenodes import FakeModel, token_ids_for
from sparecycles.tools.loadtest.procs import spawn, stop
from sparecycles.tools.loadtest.setup import prepare
from sparecycles.tools.loadtest.speed import SpeedModel
from sparecycles.tools.localnet import LocalNetwork

pytestmark = pytest.mark.timeout(300)
NODES = 50
SPEED = SpeedModel(prefill_tokens_per_s=20_000, decode_tokens_per_s=200, overhead_s=0.002)


@pytest.fixture(scope="module")
def net(tmp_path_factory, tiny_model_path):
    root = tmp_path_factory.mktemp("loadtest")
    network = LocalNetwork(root=root, models={"tiny": tiny_model_path},
                           env={"SPARECYCLES_VERIFICATION": "false"})
    with network:
        network.start_coordinator()
        creds = prepare(network.database, keys=1, model="tiny")
        nodes = spawn(["loadtest", "nodes", "--url", network.url, "--token", creds.node_token,
                       "--count", str(NODES), "--model", f"tiny={tiny_model_path}",
                       "--speed", SPEED.describe(), "--connect-rate", "200"],
                      root / "logs" / "fake-nodes.log")
        try:
            network.wait_ready(NODES, timeout_s=60)
            network.keys = creds.keys  # type: ignore[attr-defined]
            yield network
        finally:
            stop([nodes])


def _text_of(tokenizer, ids: list[int]) -> str:
    """The text the coordinator streams for these token ids, one message per token."""
    stream = TextStream(tokenizer, ())
    return "".join(stream.push((t,)) for t in ids) + stream.finish()


def test_streams_complete_exactly_and_the_books_balance(net, tiny_model_path) -> None:
    config = ClientConfig(urls=(net.url,), keys=net.keys, model="tiny",
                          workload=Workload.fixed(20, 16), concurrency=10, requests=20,
                          duration_s=120, speed=SPEED)
    result = asyncio.run(run_clients(config, keep_text=True))
    assert len(result.samples) == 20
    failed = [s.error for s in result.samples if not s.ok]
    assert failed == []
    model = FakeModel.from_dir("tiny", tiny_model_path)
    tokenizer = modelfiles.load_tokenizer(str(tiny_model_path))
    for s in result.samples:
        assert s.completion_tokens == 16 and s.job_id
        expected = token_ids_for(model, s.job_id, 1, 16)  # one attempt: no node was lost
        assert s.text == _text_of(tokenizer, expected), s.job_id
    summary = result.summary(SPEED)
    assert summary["ok"] == 20 and summary["completion_tokens"] == 20 * 16
    assert summary["added_ttft_p50_ms"] >= 0
    check = subprocess.run(
        [sys.executable, "-m", "sparecycles", "ledger", "check", "--database", net.database,
         "--grace-s", "0"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "ledger OK" in check.stdout

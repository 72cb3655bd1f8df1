"""Three coordinator replicas on PostgreSQL and NATS, real tiny-model nodes, the openai client.

Replica ``a`` holds no node: every request sent to it is served by a node connected to ``b`` or
``c``, its tokens crossing replicas over NATS. Then replicas die (SIGKILL): the replica holding a
node's socket mid-stream (the node dials another, the stream goes on exactly), and the replica
holding a client's connection (the client gets an error, another replica settles the job, the
client pays nothing). Processes start once for the module; each killed replica is restarted.
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from openai import OpenAI

from sparecycles.ledger.pricing import PriceBook
from sparecycles.ledger.service import Ledger
from sparecycles.tools.localnet import Cluster, postgres_database

pytestmark = [pytest.mark.timeout(600), pytest.mark.postgres]
LEASE_S = 4.0  # replica lease, short for the test (production default: 15 s)
PROMPTS = ("The old man and the sea", "It was a dark night and",
           "Alice was beginning to get very tired", "Once upon a time", "The rabbit said")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_path):
    root = tmp_path_factory.mktemp("cluster")
    with postgres_database(prefix="sc_e2e") as pg_url:
        net = Cluster(root=root, models={"tiny": tiny_model_path},
                      coordinator_args=["--placement-wait-s", "10"],
                      env={"SPARECYCLES_REPLICA_LEASE_S": str(LEASE_S)},
                      postgres_url=pg_url, bus=Cluster.namespace_bus())
        with net:
            store = net.store()
            for name in ("a", "b", "c"):
                net.start_replica(name, wait=False)
            for name in ("a", "b", "c"):
                net.wait_replica(name, 0)
            args = ["--duty-cycle", "0.25"]  # slow enough to kill things mid-stream
            net.start_node_at("pc-b", "alice", "b", extra_args=args)
            net.start_node_at("pc-c", "bob", "c", extra_args=args)
            net.wait_replica("b", 1)
            net.wait_replica("c", 1)
            net.wait_replica("a", 2, key="fleet_nodes_available", timeout_s=30)
            _key_id, key = store.create_api_key("acme", "e2e")
            Ledger(store.sessions, prices=PriceBook.default()).deposit(
                store.ensure_client("acme"), 50_000_000, reference="e2e-topup")
            net.key = key  # type: ignore[attr-defined]
            yield net
            problems = Ledger(store.sessions, prices=PriceBook.default()).check()
            assert problems == [], problems
            store.close()


def _client(cluster: Cluster, replica: str) -> OpenAI:
    return OpenAI(base_url=cluster.replicas[replica].url + "/v1", api_key=cluster.key,
                  max_retries=0, timeout=60)


def _job(cluster: Cluster, replica: str, job_id: str) -> dict:
    return httpx.get(f"{cluster.replicas[replica].url}/v1/jobs/{job_id}",
                     headers={"Authorization": f"Bearer {cluster.key}"}).json()


def _long_prompt(client: OpenAI, tokens_min: int = 20) -> tuple[str, str]:
    for prompt in PROMPTS:
        resp = client.completions.create(model="tiny", prompt=prompt, max_tokens=60,
                                         temperature=0)
        if resp.usage.completion_tokens >= tokens_min:
            return prompt, resp.choices[0].text
    pytest.fail(f"the tiny model continues every candidate prompt in < {tokens_min} tokens")


def _host_of(cluster: Cluster, node_id: str) -> str:
    """The replica holding the node's socket now."""
    return cluster.store().get_node(node_id).replica_id


def test_a_replica_with_no_nodes_serves_through_the_others(cluster) -> None:
    ready = httpx.get(cluster.replicas["a"].url + "/readyz").json()
    assert ready["status"] == "ready" and ready["bus"] == "connected"
    assert ready["nodes_online"] == 0 and ready["fleet_nodes_available"] == 2
    assert set(ready["peers"]) == {"b", "c"}
    client = _client(cluster, "a")
    resp = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Tell me about the garden."}],
        max_tokens=16, temperature=0)
    assert resp.usage.completion_tokens >= 1
    job = _job(cluster, "a", resp.id)
    assert job["state"] == "done" and job["money"]["charged_micros"] > 0
    assert _host_of(cluster, job["attempts"][-1]["node_id"]) in ("b", "c")
    # the same request through a replica that holds a node: the same greedy answer
    again = _client(cluster, "b").chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Tell me about the garden."}],
        max_tokens=16, temperature=0)
    assert again.choices[0].message.content == resp.choices[0].message.content


def test_streams_cross_replicas_concurrently_without_a_token_repeated(cluster) -> None:
    import concurrent.futures as cf

    prompt, reference = _long_prompt(_client(cluster, "b"))

    def stream(replica: str) -> str:
        parts = []
        for chunk in _client(cluster, replica).completions.create(
                model="tiny", prompt=prompt, max_tokens=60, temperature=0, stream=True):
            parts.append(chunk.choices[0].text if chunk.choices else "")
        return "".join(parts)

    with cf.ThreadPoolExecutor(6) as pool:
        texts = list(pool.map(stream, ["a", "b", "c", "a", "b", "c"]))
    assert texts == [reference] * 6


def test_the_replica_holding_the_node_dies_mid_stream_and_the_answer_goes_on(cluster) -> None:
    client = _client(cluster, "a")
    prompt, reference = _long_prompt(client)
    parts, job_id, killed = [], None, None
    for chunk in client.completions.create(model="tiny", prompt=prompt, max_tokens=60,
                                           temperature=0, stream=True):
        job_id = chunk.id
        parts.append(chunk.choices[0].text if chunk.choices else "")
        if killed is None and len("".join(parts)) >= 10:
            job = _job(cluster, "a", job_id)
            killed = _host_of(cluster, job["attempts"][-1]["node_id"])
            cluster.kill_replica(killed)  # the car's replica, not the car: its node redials
    assert killed in ("b", "c")
    assert "".join(parts) == reference  # nothing repeated, nothing lost
    job = _job(cluster, "a", job_id)
    assert job["state"] == "done"
    outcomes = [a["outcome"] for a in job["attempts"]]
    assert outcomes[0] == "replica_lost" and outcomes[-1] == "done"
    assert sum(a["completion_tokens"] for a in job["attempts"]) == job["completion_tokens"]
    cluster.start_replica(killed)
    cluster.wait_replica("a", 2, key="fleet_nodes_available", timeout_s=60)


def test_the_replica_holding_the_client_dies_and_the_client_pays_nothing_undelivered(
        cluster) -> None:
    client = _client(cluster, "a")
    prompt, _reference = _long_prompt(client)
    job_id, got = None, ""
    with pytest.raises((openai.APIConnectionError, httpx.HTTPError)):
        for chunk in client.completions.create(model="tiny", prompt=prompt, max_tokens=60,
                                               temperature=0, stream=True):
            job_id = chunk.id
            got += chunk.choices[0].text if chunk.choices else ""
            if len(got) >= 10:
                cluster.kill_replica("a")
    assert job_id is not None
    job_id = job_id.removeprefix("cmpl-")
    store = cluster.store()
    deadline = time.monotonic() + LEASE_S + 30
    while time.monotonic() < deadline and store.get_job(job_id).state not in ("done", "failed"):
        time.sleep(0.5)
    row = store.get_job(job_id)
    assert row.state == "failed" and "replica" in row.error
    assert row.replica_id in ("b", "c")  # claimed and settled by a live replica
    money = Ledger(store.sessions, prices=PriceBook.default()).job_money(job_id)
    assert money["state"] == "voided" and money["charged_micros"] == 0
    for name in ("b", "c"):  # the survivors still see the whole fleet
        cluster.wait_replica(name, 2, key="fleet_nodes_available", timeout_s=30)
    cluster.start_replica("a")
    cluster.wait_replica("a", 2, key="fleet_nodes_available", timeout_s=60)
    store.close()


def test_after_the_faults_every_replica_serves_again(cluster) -> None:
    for name in ("a", "b", "c"):
        resp = _client(cluster, name).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hello there."}],
            max_tokens=8, temperature=0)
        assert resp.usage.completion_tokens >= 1


def test_clients_reach_the_replicas_through_the_shipped_haproxy_config(cluster, tmp_path
                                                                       ) -> None:
    """deploy/haproxy.cfg as shipped, with loopback addresses and a self-signed certificate:
    TLS, /readyz health checks, SSE streams through the proxy."""
    import re
    import shutil
    import signal
    import subprocess
    from pathlib import Path

    if shutil.which("haproxy") is None or shutil.which("openssl") is None:
        pytest.skip("haproxy is not installed (.ci/run installs it)")
    from sparecycles.tools.localnet import free_port

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(cert.read_text() + key.read_text())
    https, http = free_port(), free_port()
    cfg = (Path(__file__).parents[2] / "deploy" / "haproxy.cfg").read_text()
    cfg = cfg.replace("/etc/haproxy/certs/sparecycles.pem", str(bundle))
    cfg = cfg.replace("bind :443", f"bind 127.0.0.1:{https}").replace(
        "bind :80", f"bind 127.0.0.1:{http}")
    servers = "\n".join(f"    server {n} 127.0.0.1:{r.port} check"
                        for n, r in cluster.replicas.items())
    cfg = re.sub(r"(    server c\d .*\n)+", servers + "\n", cfg)
    cfg = re.sub(r"maxconn \d+", "maxconn 2000", cfg)  # within this machine's open-file limit
    (tmp_path / "haproxy.cfg").write_text(cfg)
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(tmp_path / "haproxy.cfg")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        base = f"https://127.0.0.1:{https}"
        with httpx.Client(verify=False, timeout=10) as h:
            deadline = time.monotonic() + 20
            while True:
                try:
                    if h.get(base + "/readyz").json()["status"] == "ready":
                        break
                except httpx.HTTPError:
                    if time.monotonic() > deadline:
                        raise
                time.sleep(0.3)
            assert h.get(f"http://127.0.0.1:{http}/healthz").status_code == 301  # to https
        client = OpenAI(base_url=base + "/v1", api_key=cluster.key, max_retries=0,
                        http_client=httpx.Client(verify=False, timeout=60))
        text = "".join(
            (c.choices[0].text if c.choices else "")
            for c in client.completions.create(model="tiny", prompt="Once upon a time",
                                               max_tokens=12, temperature=0, stream=True))
        direct = _client(cluster, "b").completions.create(
            model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0)
        assert text == direct.choices[0].text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)

"""Faults under load, three replicas: SIGKILL a replica, cut PostgreSQL off, drop NATS, kill 30% of
the nodes, each while streamed requests run through every replica (bounded: 30 fake nodes, a
few hundred requests, loopback only).

After each fault every request is accounted for: it completed with exactly the tokens its nodes
sent (rebuilt from the job's attempts: none lost, none repeated), or it failed with a clear error
and its job (if one was admitted) was charged only for what was delivered; no job is left open;
`sparecycles ledger check` passes. The fake nodes are the control-plane test tool
(sparecycles.tools.loadtest); NATS is a private nats-server so it can be stopped; PostgreSQL is cut
off for this test's database only (connections terminated, new ones refused for a while).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import psycopg
import pytest

from sparecycles import modelfiles
from sparecycles.coordinator.textstream import TextStream
from sparecycles.ledger.pricing import PriceBook
from sparecycles.ledger.service import Ledger
from sparecycles.tools.loadtest.clients import ClientConfig, Sample, Workload, run_clients
from sparecycles.tools.loadtest.fakenodes import FakeModel, token_ids_for
from sparecycles.tools.loadtest.procs import spawn
from sparecycles.tools.loadtest.setup import prepare
from sparecycles.tools.loadtest.speed import SpeedModel
from sparecycles.tools.localnet import Cluster, free_port, postgres_database

pytestmark = [pytest.mark.timeout(900), pytest.mark.postgres]
ADMIN_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
SPEED = SpeedModel(prefill_tokens_per_s=20_000, decode_tokens_per_s=60, overhead_s=0.002)
GROUPS = (7, 7, 7, 9)  # fake nodes per process: killing the last kills 30% of them
LEASE_S = 4.0


class Nats:
    """A private nats-server that the test may stop and start again on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(["nats-server", "-a", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_path):
    if shutil.which("nats-server") is None:
        pytest.skip("nats-server is not installed (.ci/run installs it)")
    root = tmp_path_factory.mktemp("faults")
    nats = Nats()
    nats.start()
    with postgres_database(ADMIN_PG, prefix="sc_faults") as pg_url:
        net = Cluster(root=root, models={"tiny": tiny_model_path},
                      coordinator_args=["--placement-wait-s", "5"],
                      env={"SPARECYCLES_VERIFICATION": "false",
                           "SPARECYCLES_REPLICA_LEASE_S": str(LEASE_S)},
                      postgres_url=pg_url,
                      bus=f"nats://127.0.0.1:{nats.port}/faults")
        try:
            with net:
                creds = prepare(pg_url, keys=4, model="tiny")
                for name in ("a", "b", "c"):
                    net.start_replica(name, wait=False)
                for name in ("a", "b", "c"):
                    net.wait_replica(name, 0)
                urls = [net.replicas[n].url for n in ("a", "b", "c")]
                groups, first = [], 0
                for i, count in enumerate(GROUPS):
                    args = ["loadtest", "nodes", "--token", creds.node_token, "--count",
                            str(count), "--first-index", str(first), "--model",
                            f"tiny={tiny_model_path}", "--speed", SPEED.describe()]
                    for u in urls[i % 3:] + urls[: i % 3]:  # each group prefers another replica
                        args += ["--url", u]
                    groups.append(spawn(args, root / "logs" / f"fake-nodes-{i}.log"))
                    first += count
                net.wait_replica("a", sum(GROUPS), key="fleet_nodes_available", timeout_s=90)
                net.keys = creds.keys  # type: ignore[attr-defined]
                net.groups = groups  # type: ignore[attr-defined]
                net.nats = nats  # type: ignore[attr-defined]
                net.pg_name = pg_url.rsplit("/", 1)[1]  # type: ignore[attr-defined]
                yield net
                for p in groups:
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
        finally:
            nats.stop()


def _load(net: Cluster, fault, *, at_s: float = 2.0, duration_s: float = 9.0) -> list[Sample]:
    """Run streamed requests through every replica; ``fault()`` fires ``at_s`` into the run."""
    config = ClientConfig(urls=tuple(r.url for r in net.replicas.values()), keys=net.keys,
                          model="tiny", workload=Workload.fixed(12, 24), concurrency=12,
                          duration_s=duration_s, speed=SPEED)
    timer = threading.Timer(at_s, fault)
    timer.start()
    try:
        result = asyncio.run(run_clients(config, keep_text=True))
    finally:
        timer.join()
    return result.samples


def _account_for(net: Cluster, samples: list[Sample], tiny_model_path) -> dict[str, int]:
    """Every request completed exactly or failed clearly; every admitted job is closed."""
    store = net.store()
    ledger = Ledger(store.sessions, prices=PriceBook.default())
    model = FakeModel.from_dir("tiny", tiny_model_path)
    tokenizer = modelfiles.load_tokenizer(str(tiny_model_path))
    deadline = time.monotonic() + LEASE_S + 60
    jobs = [s.job_id for s in samples if s.job_id]
    while time.monotonic() < deadline:
        open_ = [j for j in jobs if (row := store.get_job(j)) is not None
                 and row.state not in ("done", "failed")]
        if not open_:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"jobs left open: {open_[:5]}")
    counts = {"ok": 0, "failed": 0, "resumed": 0}
    for s in samples:
        if s.ok:
            counts["ok"] += 1
            row = store.get_job(s.job_id)
            assert row.state == "done" and row.completion_tokens == s.completion_tokens
            expected: list[int] = []
            attempts = store.attempts(s.job_id)
            for a in attempts:
                expected += token_ids_for(model, s.job_id, a.attempt, a.completion_tokens)
            counts["resumed"] += len(attempts) > 1
            stream = TextStream(tokenizer, ())
            text = "".join(stream.push((t,)) for t in expected) + stream.finish()
            assert s.text == text, (s.job_id, [(a.attempt, a.outcome) for a in attempts])
        else:
            counts["failed"] += 1
            assert s.error, "a failure without a message"
            row = store.get_job(s.job_id) if s.job_id else None
            if row is not None:  # admitted: charged for what was delivered, no more
                money = ledger.job_money(s.job_id)
                if row.completion_tokens == 0:
                    assert money["charged_micros"] == 0, (s.job_id, money)
    check = subprocess.run(
        [sys.executable, "-m", "sparecycles", "ledger", "check", "--database", net.database,
         "--grace-s", "0"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    store.close()
    counts["requests"] = len(samples)
    print(f"\n{sys._getframe(1).f_code.co_name}: {counts}")  # shown with -s; docs/benchmarks.md
    return counts


def test_sigkill_a_replica_under_load(env, tiny_model_path) -> None:
    samples = _load(env, lambda: env.kill_replica("c"))
    counts = _account_for(env, samples, tiny_model_path)
    assert counts["ok"] > 20, counts  # the two live replicas kept serving
    env.start_replica("c")
    env.wait_replica("a", sum(GROUPS), key="fleet_nodes_available", timeout_s=90)


def test_postgres_cut_off_under_load(env, tiny_model_path) -> None:
    def outage() -> None:
        with psycopg.connect(ADMIN_PG, autocommit=True) as c:
            c.execute(f'ALTER DATABASE "{env.pg_name}" ALLOW_CONNECTIONS false')
            c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = %s AND pid <> pg_backend_pid()", (env.pg_name,))
            time.sleep(3.0)
            c.execute(f'ALTER DATABASE "{env.pg_name}" ALLOW_CONNECTIONS true')

    samples = _load(env, outage, duration_s=10.0)
    counts = _account_for(env, samples, tiny_model_path)
    assert counts["ok"] > 20, counts
    late = [s for s in samples if s.ok and s.started_s > 7.0]
    assert late, "nothing completed after the database came back"


def test_nats_dropped_under_load(env, tiny_model_path) -> None:
    def outage() -> None:
        env.nats.stop()
        time.sleep(3.0)
        env.nats.start()

    samples = _load(env, outage, duration_s=12.0)
    counts = _account_for(env, samples, tiny_model_path)
    assert counts["ok"] > 20, counts
    env.wait_replica("a", sum(GROUPS), key="fleet_nodes_available", timeout_s=60)


def _victims_busy(net: Cluster, names: list[str], timeout_s: float = 6.0) -> None:
    """Wait (bounded) until one of the named nodes has just started an answer (each takes about
    0.4 s), so that the kill cuts a stream and the test sees it resumed elsewhere."""
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(net.database.replace("+psycopg", ""), autocommit=True) as c:
        while time.monotonic() < deadline:
            busy = c.execute(
                "SELECT count(*) FROM job_attempts a JOIN nodes n ON n.id = a.node_id "
                "WHERE a.outcome = 'running' AND n.name = ANY(%s) AND a.started_at_s > %s",
                (names, time.time() - 0.15)).fetchone()  # started lately: it has tokens to go
            if busy and busy[0] > 0:
                return
            time.sleep(0.02)


def test_thirty_percent_of_nodes_killed_under_load(env, tiny_model_path) -> None:
    victims = env.groups[-1]
    first = sum(GROUPS[:-1])
    names = [f"fake-{i}" for i in range(first, first + GROUPS[-1])]

    def kill() -> None:
        _victims_busy(env, names)
        victims.send_signal(signal.SIGKILL)

    samples = _load(env, kill)
    counts = _account_for(env, samples, tiny_model_path)
    assert counts["ok"] > 20, counts
    assert counts["resumed"] >= 1, counts  # some streams moved to other nodes mid-answer

"""A whole network on one machine, as real processes on loopback: the demo and the e2e tests.

``LocalNetwork`` runs the same ``sparecycles coordinator`` and ``sparecycles node`` commands a
user runs, each in its own process, against an embedded SQLite file in its own folder, and knows
how to wait for them, kill them and restart them. ``Cluster`` does the same for several
coordinator replicas sharing one PostgreSQL database and one NATS server.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from sparecycles.store import Store

ready_timeout_s = 120.0  # loading torch and a model in a fresh process takes a few seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class NodeProc:
    name: str
    owner: str
    token: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    extra_args: list[str] = field(default_factory=list)
    coordinator_url: str | None = None
    models: dict[str, Path] | None = None  # what it serves (None: every model of the network)


@dataclass
class LocalNetwork:
    root: Path
    models: dict[str, Path]
    port: int = field(default_factory=free_port)
    coordinator: subprocess.Popen[bytes] | None = None
    nodes: dict[str, NodeProc] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    coordinator_args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def database(self) -> str:
        return f"sqlite:///{self.root / 'sparecycles.db'}"

    def store(self) -> Store:
        store = Store(self.database)
        store.migrate()
        return store

    def _env(self) -> dict[str, str]:
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        env.setdefault("OMP_NUM_THREADS", "1")  # two nodes share two cores on small machines
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        return env

    def _spawn(self, args: list[str], log_name: str) -> tuple[subprocess.Popen[bytes], Path]:
        log_path = self.root / "logs" / log_name
        log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(log_path, "ab")  # noqa: SIM115 - the child process owns it
        proc = subprocess.Popen(
            [sys.executable, "-m", "sparecycles", *args],
            stdout=out, stderr=subprocess.STDOUT, env=self._env(), start_new_session=True,
        )
        out.close()
        return proc, log_path

    def start_coordinator(self, *, wait: bool = True) -> None:
        args = ["coordinator", "--port", str(self.port), "--database", self.database,
                "--log-level", "warning", *self.coordinator_args]
        for name, path in self.models.items():
            args += ["--model", f"{name}={path}"]
        self.coordinator, _ = self._spawn(args, "coordinator.log")
        if wait:
            self.wait_ready(0)

    def start_node(self, name: str, owner: str, *, extra_args: list[str] | None = None,
                   token: str | None = None, coordinator_url: str | None = None,
                   models: dict[str, Path] | None = None) -> NodeProc:
        """A node serving ``models`` (None: every model the network has)."""
        token = token or self.store().create_node_token(owner, name)
        url = coordinator_url or self.url
        args = ["node", "--coordinator", url, "--token", token, "--name", name,
                "--config-dir", str(self.root / "nodes" / name), "--jobs-max", "8",
                "--log-level", "warning", *(extra_args or [])]
        for model, path in (self.models if models is None else models).items():
            args += ["--model", f"{model}={path}"]
        proc, log_path = self._spawn(args, f"node-{name}.log")
        node = NodeProc(name, owner, token, proc, log_path, extra_args or [], url, models)
        self.nodes[name] = node
        return node

    def restart_node(self, name: str) -> NodeProc:
        old = self.nodes[name]
        return self.start_node(name, old.owner, extra_args=old.extra_args, token=old.token,
                               coordinator_url=old.coordinator_url, models=old.models)

    def wait_ready(self, nodes_online: int, timeout_s: float = ready_timeout_s,
                   *, key: str = "nodes_online", url: str | None = None,
                   proc: subprocess.Popen[bytes] | None = None,
                   log_name: str = "coordinator.log") -> dict[str, Any]:
        """Wait until the coordinator answers and ``nodes_online`` nodes are connected (or, with
        ``key="nodes_available"``, connected and taking work)."""
        deadline = time.monotonic() + timeout_s
        last: Any = None
        url = url or self.url
        proc = proc or self.coordinator
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"coordinator exited: {self.tail(log_name)}")
            for n in self.nodes.values():
                if n.proc.poll() is not None and n.proc.returncode not in (0, -9, -15):
                    raise RuntimeError(f"node {n.name} exited: {self.tail(n.log_path.name)}")
            try:
                last = httpx.get(url + "/readyz", timeout=2).json()
                if last.get("status") == "ready" and last.get(key, 0) >= nodes_online:
                    return last
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"network not ready after {timeout_s:g} s (last: {last})")

    def tail(self, log_name: str, lines: int = 40) -> str:
        path = self.root / "logs" / log_name
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def kill_node(self, name: str, sig: int = signal.SIGKILL) -> None:
        node = self.nodes[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.proc.pid, sig)
        node.proc.wait(timeout=30)

    def signal_node(self, name: str, sig: int) -> None:
        os.kill(self.nodes[name].proc.pid, sig)

    def kill_coordinator(self, sig: int = signal.SIGKILL) -> None:
        if self.coordinator is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.coordinator.pid, sig)
            self.coordinator.wait(timeout=30)

    def stop(self) -> None:
        """Stop every process: nodes first (SIGTERM, then SIGKILL after a grace)."""
        procs = [n.proc for n in self.nodes.values()]
        if self.coordinator is not None:
            procs.append(self.coordinator)
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)

    def __enter__(self) -> LocalNetwork:
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def postgres_database(admin_url: str = "postgresql://postgres@127.0.0.1:5432/postgres",
                      prefix: str = "sparecycles") -> Iterator[str]:
    """A fresh, empty PostgreSQL database for the duration (dropped after); yields its URL."""
    import psycopg

    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Replica:
    name: str
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Cluster(LocalNetwork):
    """Several replicas of the coordinator on one PostgreSQL database and one NATS server (a
    namespace of its own, so clusters sharing the server never hear each other), and nodes that
    each dial a preferred replica first and the others after it, as behind a load balancer."""

    postgres_url: str = ""
    bus: str = ""
    replicas: dict[str, Replica] = field(default_factory=dict)

    @property
    def database(self) -> str:
        return self.postgres_url

    @classmethod
    def namespace_bus(cls, nats_url: str = "nats://127.0.0.1:4222") -> str:
        return f"{nats_url}/cluster{uuid.uuid4().hex[:10]}"

    def start_replica(self, name: str, *, wait: bool = True) -> Replica:
        replica = self.replicas.get(name) or Replica(name, free_port())
        self.replicas[name] = replica
        args = ["coordinator", "--port", str(replica.port), "--database", self.database,
                "--bus", self.bus, "--replica-id", name, "--log-level", "warning",
                *self.coordinator_args]
        for model, path in self.models.items():
            args += ["--model", f"{model}={path}"]
        replica.proc, _ = self._spawn(args, f"replica-{name}.log")
        if wait:
            self.wait_replica(name, 0)
        return replica

    def wait_replica(self, name: str, nodes: int, *, key: str = "nodes_online",
                     timeout_s: float = ready_timeout_s) -> dict[str, Any]:
        r = self.replicas[name]
        return self.wait_ready(nodes, timeout_s, key=key, url=r.url, proc=r.proc,
                               log_name=f"replica-{name}.log")

    def kill_replica(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.replicas[name].proc
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            proc.wait(timeout=30)

    def urls(self, first: str) -> str:
        """Every replica's URL, ``first`` first: what a node is given."""
        order = [first] + [n for n in self.replicas if n != first]
        return ",".join(self.replicas[n].url for n in order)

    def start_node_at(self, name: str, owner: str, replica: str, *,
                      extra_args: list[str] | None = None) -> NodeProc:
        return self.start_node(name, owner, extra_args=extra_args,
                               coordinator_url=self.urls(replica))

    def stop(self) -> None:
        for r in self.replicas.values():
            if r.proc is not None and r.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(r.proc.pid, signal.SIGTERM)
        super().stop()
        for r in self.replicas.values():
            if r.proc is not None:
                try:
                    r.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(r.proc.pid, signal.SIGKILL)

"""Many fake nodes in one process, each a real protocol client. A test tool, not a backend.

Every fake node has its own Ed25519 key (derived from a seed and its index, so a rerun brings
the same node ids back), answers the coordinator's challenge with a signed ``hello`` offering a
registered model with the registry's weights hash, heartbeats, and answers each ``job`` with
random valid token ids on the schedule of a ``SpeedModel``, then a ``done`` report signed over
exactly what it sent. It honours ``cancel`` (a signed ``done`` with ``finish_reason
"cancelled"``), refuses ``score`` (it cannot score), and on a lost socket reconnects to the next
coordinator URL in its list, as a node behind a load balancer would.

It never loads a model and its tokens mean nothing: run it only against a coordinator under load
test, with verification off.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import websockets
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sparecycles import __version__, limits, protocol
from sparecycles.errors import ProtocolError
from sparecycles.identity import NodeIdentity
from sparecycles.tools.loadtest.speed import SpeedModel
from sparecycles.types import DeviceProfile

log = logging.getLogger("sparecycles.tools.loadtest.nodes")

lag_samples_max = 100_000  # first-token lag samples kept per process (a reservoir beyond)
connect_timeout_s = 30.0  # a coordinator busy accepting thousands of sockets answers slowly
reconnect_backoff_s_min = 0.5
FAKE_DEVICE_CLASS = "loadtest-fake"


@dataclass(frozen=True, slots=True)
class FakeModel:
    """What a fake node offers: a registered model's name, its weights hash, and token ids that
    decode to ordinary text (specials left out, so a stream never ends early on an EOS)."""

    name: str
    weights_sha256: str
    token_ids: tuple[int, ...]

    @classmethod
    def from_dir(cls, name: str, directory: Path) -> FakeModel:
        """Read the hash as the registry computes it, and the vocabulary from config.json and
        tokenizer.json (no tokenizer library is loaded)."""
        from sparecycles import modelfiles

        config = json.loads((directory / "config.json").read_text())
        specials: set[int] = set()
        tok_file = directory / "tokenizer.json"
        if tok_file.is_file():
            specials = {t["id"] for t in json.loads(tok_file.read_text()).get("added_tokens", [])}
        vocab = int(config["vocab_size"])
        ids = tuple(i for i in range(vocab) if i not in specials)
        return cls(name, modelfiles.weights_sha256(directory), ids)


@dataclass(frozen=True, slots=True)
class FleetConfig:
    urls: tuple[str, ...]  # coordinator base URLs; nodes spread round-robin over them
    token: str  # the owner's node token
    model: FakeModel
    count: int
    first_index: int = 0  # node i's key comes from (seed, first_index + i)
    seed: str = "loadtest"
    speed: SpeedModel = field(default_factory=SpeedModel)
    jobs_max: int = 8
    tokens_per_message: int = 1  # the real agent sends one message per engine step
    connect_rate_per_s: float = 500.0  # new sockets per second while ramping up
    compression: bool = True  # permessage-deflate, as the real agent negotiates it
    pings: bool = True  # websockets' keepalive pings every 20 s, as the real agent has


def fake_identity(seed: str, index: int) -> NodeIdentity:
    """A deterministic key pair: the same (seed, index) is the same node on every run."""
    raw = hashlib.sha256(f"sparecycles-loadtest:{seed}:{index}".encode()).digest()
    return NodeIdentity(Ed25519PrivateKey.from_private_bytes(raw))


def fake_profile() -> DeviceProfile:
    """A mid-range gaming PC with a GPU; every fake node reports the same one."""
    return DeviceProfile(
        device_class=FAKE_DEVICE_CLASS, cpu_cores=8, ram_bytes=32 << 30,
        memory_bandwidth_bytes_per_s=400e9, peak_flops=40e12,
        accelerator="cuda:fake", accelerator_memory_bytes=12 << 30,
        network_rtt_s=0.0, power_idle_w=40.0, power_busy_w=250.0,
    )


def token_ids_for(model: FakeModel, job_id: str, attempt: int, count: int) -> list[int]:
    """The token ids a fake node sends for an attempt: a pure function of the job, so a test
    can tell exactly which text a client must receive."""
    rng = random.Random(f"{job_id}:{attempt}")
    ids = model.token_ids
    return [ids[rng.randrange(len(ids))] for _ in range(count)]


@dataclass
class FleetStats:
    """Counters of one process's fake nodes, written as JSON for the harness to merge."""

    nodes: int = 0
    connected: int = 0  # welcomed and not yet lost
    connects: int = 0
    disconnects: int = 0
    rejects: int = 0
    jobs_started: int = 0
    jobs_done: int = 0
    jobs_cancelled: int = 0
    jobs_abandoned: int = 0  # the socket closed mid-job
    tokens_sent: int = 0
    scores_refused: int = 0
    heartbeats_sent: int = 0
    first_connected_s: float | None = None  # seconds from start to all nodes welcomed
    lag_s: list[float] = field(default_factory=list)  # first token: sent minus scheduled
    _lag_seen: int = 0
    _started: float = field(default_factory=time.monotonic)

    def record_lag(self, lag_s: float) -> None:
        self._lag_seen += 1
        if len(self.lag_s) < lag_samples_max:
            self.lag_s.append(lag_s)
        else:  # reservoir sampling keeps an unbiased sample of a long run
            j = random.randrange(self._lag_seen)
            if j < lag_samples_max:
                self.lag_s[j] = lag_s

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        d["uptime_s"] = time.monotonic() - self._started
        return d


def ws_url(base: str) -> str:
    base = base.rstrip("/").replace("https://", "wss://", 1).replace("http://", "ws://", 1)
    return base + protocol.WS_PATH


class _Rejected(Exception):
    pass


class FakeNode:
    """One fake node: a connect loop over the coordinator URLs and one session at a time."""

    def __init__(self, index: int, config: FleetConfig, stats: FleetStats):
        self.index = index
        self.config = config
        self.stats = stats
        self.identity = fake_identity(config.seed, config.first_index + index)
        self.name = f"fake-{config.first_index + index}"
        self.url_index = (config.first_index + index) % len(config.urls)
        self.running: dict[str, tuple[int, asyncio.Task[None]]] = {}  # job -> (attempt, task)
        self.cancelled: set[tuple[str, int]] = set()
        self.welcomed = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        backoff_s = reconnect_backoff_s_min
        cfg = self.config
        while not stop.is_set():
            url = ws_url(cfg.urls[self.url_index % len(cfg.urls)])
            session_worked = False
            try:
                async with websockets.connect(
                    url, max_size=limits.ws_message_bytes_max, open_timeout=connect_timeout_s,
                    compression="deflate" if cfg.compression else None, proxy=None,
                    ping_interval=20 if cfg.pings else None,
                ) as ws:
                    session_worked = await self._session(ws, stop)
            except (_Rejected, ProtocolError) as exc:
                self.stats.rejects += 1
                log.warning("%s refused: %s", self.name, exc)
                backoff_s = limits.node_reconnect_backoff_s_max
            except (OSError, websockets.WebSocketException, TimeoutError) as exc:
                log.debug("%s: connection to %s lost: %s", self.name, url, exc)
            finally:
                self._abandon_all()
            if stop.is_set():
                return
            if session_worked:
                self.stats.disconnects += 1
                backoff_s = reconnect_backoff_s_min
            self.url_index += 1  # the next replica, like a node behind a load balancer
            delay = min(limits.node_reconnect_backoff_s_max, backoff_s) * random.uniform(0.5, 1)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop.wait()
            backoff_s *= 2

    def _hello(self, nonce: str) -> str:
        cfg = self.config
        return protocol.encode(protocol.Hello(
            token=cfg.token, public_key=self.identity.public_key_b64, name=self.name,
            agent_version=f"loadtest-{__version__}", profile=asdict(fake_profile()),
            availability={},
            models=[protocol.ModelOffer(name=cfg.model.name,
                                        weights_sha256=cfg.model.weights_sha256)],
            jobs_max=cfg.jobs_max, nonce_signature=self.identity.sign(nonce.encode()),
        ))

    async def _session(self, ws: Any, stop: asyncio.Event) -> bool:
        """Serve one socket until it closes or ``stop``; True when it got past hello."""
        challenge = protocol.decode_coordinator_message(await ws.recv())
        if not isinstance(challenge, protocol.Challenge):
            raise _Rejected("expected a challenge")
        await ws.send(self._hello(challenge.nonce))
        welcome = protocol.decode_coordinator_message(await ws.recv())
        if isinstance(welcome, protocol.Reject):
            raise _Rejected(welcome.reason)
        if not isinstance(welcome, protocol.Welcome):
            raise _Rejected("expected welcome")
        if self.config.model.name not in welcome.accepted_models:
            raise _Rejected(f"model refused: {welcome.rejected_models}")
        self.stats.connects += 1
        self.stats.connected += 1
        self.welcomed.set()
        heartbeat = asyncio.create_task(self._heartbeats(ws, welcome.heartbeat_interval_s))
        stopping = asyncio.create_task(stop.wait())
        try:
            while True:
                recv = asyncio.create_task(ws.recv())
                done, _ = await asyncio.wait({recv, stopping}, return_when="FIRST_COMPLETED")
                if stopping in done:
                    recv.cancel()
                    return True
                msg = protocol.decode_coordinator_message(recv.result())
                if isinstance(msg, protocol.JobAssign):
                    self._start_job(ws, msg)
                elif isinstance(msg, protocol.Cancel):
                    self._cancel(msg.job_id, msg.attempt)
                elif isinstance(msg, protocol.Score):
                    self.stats.scores_refused += 1
                    await ws.send(protocol.encode(protocol.Scored(
                        score_id=msg.score_id, error="a load-test fake node cannot score")))
                elif isinstance(msg, protocol.Reject):
                    raise _Rejected(msg.reason)
        except (websockets.ConnectionClosed, OSError):
            return True
        finally:
            self.stats.connected -= 1
            self.welcomed.clear()
            heartbeat.cancel()
            stopping.cancel()

    async def _heartbeats(self, ws: Any, interval_s: float) -> None:
        # a random phase, so that thousands of nodes that connected together do not beat together
        await asyncio.sleep(random.uniform(0, interval_s))
        with contextlib.suppress(websockets.ConnectionClosed, OSError):
            while True:
                await ws.send(json.dumps({"type": "heartbeat", "v": 1,
                                          "active_jobs": len(self.running), "available": True}))
                self.stats.heartbeats_sent += 1
                await asyncio.sleep(interval_s)

    # ---- jobs ---------------------------------------------------------------------------------

    def _start_job(self, ws: Any, job: protocol.JobAssign) -> None:
        if len(self.running) >= self.config.jobs_max or job.model != self.config.model.name:
            asyncio.get_running_loop().create_task(self._send_quiet(ws, protocol.encode(
                protocol.JobError(job_id=job.job_id, attempt=job.attempt,
                                  message="fake node full or model not offered"))))
            return
        task = asyncio.get_running_loop().create_task(self._run_job(ws, job))
        self.running[job.job_id] = (job.attempt, task)
        self.stats.jobs_started += 1

    @staticmethod
    async def _send_quiet(ws: Any, frame: str) -> None:
        with contextlib.suppress(websockets.ConnectionClosed, OSError):
            await ws.send(frame)

    def _cancel(self, job_id: str, attempt: int) -> None:
        entry = self.running.get(job_id)
        if entry is not None and entry[0] == attempt:
            self.cancelled.add((job_id, attempt))
            entry[1].cancel()

    def _abandon_all(self) -> None:
        for _attempt, task in self.running.values():
            task.cancel()
            self.stats.jobs_abandoned += 1
        self.running.clear()
        self.cancelled.clear()

    async def _run_job(self, ws: Any, job: protocol.JobAssign) -> None:
        cfg, loop = self.config, asyncio.get_running_loop()
        received = loop.time()
        prompt_tokens = len(job.prompt_token_ids)
        count = job.sampling.max_tokens
        ids = token_ids_for(cfg.model, job.job_id, job.attempt, count)
        sent = 0
        first_sent: float | None = None
        reason: protocol.FinishReasonName = "length"
        try:
            while sent < count:
                n = min(cfg.tokens_per_message, limits.tokens_per_message_max, count - sent)
                due = received + cfg.speed.token_due_s(prompt_tokens, sent + n - 1)
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if first_sent is None:
                    first_sent = loop.time()
                    self.stats.record_lag(first_sent - due)
                part = ids[sent : sent + n]
                msg: dict[str, Any] = {"type": "tokens", "v": 1, "job_id": job.job_id,
                                       "attempt": job.attempt, "index": sent, "token_ids": part}
                if job.want_logprobs:
                    msg["logprobs"] = [-1.0] * n
                await ws.send(json.dumps(msg, separators=(",", ":")))
                sent += n
                self.stats.tokens_sent += n
        except asyncio.CancelledError:
            if (job.job_id, job.attempt) not in self.cancelled:
                raise  # the socket is gone: the coordinator resumes the job elsewhere
            reason = "cancelled"
        except (websockets.ConnectionClosed, OSError):
            return
        finally:
            self.cancelled.discard((job.job_id, job.attempt))
            if self.running.get(job.job_id, (0, None))[0] == job.attempt:
                self.running.pop(job.job_id, None)
        now = loop.time()
        metering = protocol.Metering(
            prompt_tokens=prompt_tokens, completion_tokens=sent,
            time_to_first_token_s=(first_sent or now) - received, total_s=now - received,
            busy_s=now - received, energy_j=0.0, energy_source="estimated")
        output_sha = protocol.tokens_sha256(ids[:sent])
        payload = protocol.result_payload(
            job_id=job.job_id, attempt=job.attempt, weights_sha256=cfg.model.weights_sha256,
            prompt_sha256=job.prompt_sha256, output_sha256=output_sha, finish_reason=reason,
            metering=metering)
        done = protocol.Done(job_id=job.job_id, attempt=job.attempt, finish_reason=reason,
                             metering=metering, output_sha256=output_sha,
                             signature=self.identity.sign(payload))
        await self._send_quiet(ws, protocol.encode(done))
        if reason == "cancelled":
            self.stats.jobs_cancelled += 1
        else:
            self.stats.jobs_done += 1


async def run_fleet(config: FleetConfig, stop: asyncio.Event, *,
                    on_progress: Callable[[FleetStats], None] | None = None,
                    progress_interval_s: float = 1.0) -> FleetStats:
    """Start ``config.count`` fake nodes (ramping at ``connect_rate_per_s``) and serve until
    ``stop`` is set; returns the process's counters."""
    stats = FleetStats(nodes=config.count)
    nodes = [FakeNode(i, config, stats) for i in range(config.count)]
    tasks: list[asyncio.Task[None]] = []
    reporter = asyncio.create_task(_report(stats, stop, on_progress, progress_interval_s))
    try:
        gap_s = 1.0 / config.connect_rate_per_s
        t0 = time.monotonic()
        for i, node in enumerate(nodes):
            if stop.is_set():
                break
            tasks.append(asyncio.create_task(node.run(stop), name=node.name))
            delay = t0 + (i + 1) * gap_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        all_in = asyncio.create_task(_all_welcomed(nodes))
        stopping = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({all_in, stopping}, return_when="FIRST_COMPLETED")
        if all_in in done:
            stats.first_connected_s = time.monotonic() - stats._started
        all_in.cancel()
        await stopping
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
    return stats


async def _all_welcomed(nodes: Sequence[FakeNode]) -> None:
    for node in nodes:
        await node.welcomed.wait()


async def _report(stats: FleetStats, stop: asyncio.Event,
                  on_progress: Callable[[FleetStats], None] | None, interval_s: float) -> None:
    if on_progress is None:
        return
    while not stop.is_set():
        on_progress(stats)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval_s):
                await stop.wait()
    on_progress(stats)


def raise_open_files_limit() -> int:
    """Raise this process's open-file limit to its hard limit (each node is one socket);
    returns the new soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]

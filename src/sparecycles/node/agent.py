"""The node agent: dials out to the coordinator, serves jobs from loaded engines, reports signed.

Behind home NAT a device cannot be called, so the agent keeps one WebSocket open to the
coordinator, reconnecting with capped exponential backoff. Jobs arrive on it; each is submitted
to the engine of its model (one engine per model, loaded once, batching every job of that model);
tokens go back as they are produced; the attempt ends with a ``done`` report signed with the
node's Ed25519 key. When the owner's availability policy says stop (window over, on battery, the
owner busy, too hot) the agent drains: no new jobs, running ones get ``drain_grace_s`` to finish,
the rest are handed back so the coordinator resumes them elsewhere.

Disaggregated prefill/decode (``protocol.FEATURE_KV_HANDOFF``): a job with ``kv_export`` is
prefilled here, its first token sent, and its prompt's KV cache sent as ``kv_chunk`` messages
before the ``done``; a job with ``kv_import`` waits (at most ``kv_handoff_s_max``) for the chunks
the coordinator relays from the node that prefilled it, loads them and prefills only the rest of
its prompt. A cache that does not arrive whole, or does not fit the model, is dropped and the
prompt prefilled here: the job's tokens are the same either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import websockets

from sparecycles import __version__, availability, limits, protocol
from sparecycles.identity import NodeIdentity
from sparecycles.node.backends.base import Engine, GenerationRequest, GenerationUpdate, KvPrefix
from sparecycles.node.energy import EnergyMeter, EnergyReading
from sparecycles.types import AvailabilityPolicy, DeviceProfile, FinishReason

log = logging.getLogger("sparecycles.node")
policy_check_interval_s = 1.0


@dataclass
class _Running:
    job: protocol.JobAssign
    updates: asyncio.Queue[GenerationUpdate]
    started_s: float
    busy_start_s: float
    tokens_start: int
    first_token_s: float | None = None
    last_sent_s: float = 0.0  # when tokens last went to the coordinator
    sent: int = 0
    task: asyncio.Task[None] | None = None
    handed_back: bool = False
    energy_start: EnergyReading | None = None
    kv_positions: int = 0  # prompt tokens loaded from a handed-over cache, not prefilled here


@dataclass
class _KvImport:
    """A handed-over KV cache arriving for a job (its ``JobAssign.kv_import``)."""

    layout: protocol.KvLayout
    chunks: list[tuple[bytes, bytes]] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # all in, broken, or cancelled
    error: str | None = None
    cancelled: bool = False


@dataclass
class NodeAgent:
    coordinator_url: str  # one URL, or several separated by commas (replicas: tried in turn)
    token: str
    identity: NodeIdentity
    profile: DeviceProfile
    engines: dict[str, Engine]
    policy: AvailabilityPolicy = field(default_factory=AvailabilityPolicy)
    name: str = ""
    jobs_max: int = 8
    # After a job's first token (sent at once), its tokens go out at most this often, merged
    # into one message: a fast engine otherwise spends its CPU, the coordinator's and the
    # client's on one message per token (docs/benchmarks.md, gateway). 0: each as it comes.
    stream_interval_s: float = 0.01
    owner_costs: dict[str, Any] = field(default_factory=dict)  # tariff, hardware price, life
    status_probe: Any = None  # callable returning availability.DeviceStatus; None: always fine
    stages: Any = None  # node/stage_worker.StageWorker: the layer ranges this node holds
    running: dict[str, _Running] = field(default_factory=dict)
    owner_paused: bool = False  # the owner took the device back (``sparecycles pause``)
    meter: EnergyMeter | None = None  # RAPL or NVML where the hardware tells, else an estimate
    draining: bool = False
    _welcomed: bool = False  # the last session got past hello (its backoff starts over)
    _url_index: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _policy_changed: asyncio.Event = field(default_factory=asyncio.Event)
    _imports: dict[tuple[str, int], _KvImport] = field(default_factory=dict)  # (job, attempt)

    @property
    def coordinator_urls(self) -> list[str]:
        return [u.strip() for u in self.coordinator_url.split(",") if u.strip()]

    @property
    def ws_url(self) -> str:
        urls = self.coordinator_urls
        base = urls[self._url_index % len(urls)].rstrip("/")
        base = base.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        return base + protocol.WS_PATH

    def stop(self) -> None:
        self._stop.set()

    def pause(self) -> None:
        """The owner takes the device back now: drain, then stay connected but idle."""
        self.owner_paused = True
        self._policy_changed.set()

    def resume(self) -> None:
        self.owner_paused = False
        self._policy_changed.set()

    async def run(self) -> None:
        """Connect, serve, and reconnect until stopped."""
        backoff_s = 0.5
        while not self._stop.is_set():
            self._welcomed, rejected = False, False
            try:
                async with websockets.connect(
                    self.ws_url, max_size=limits.ws_message_bytes_max, open_timeout=10
                ) as ws:
                    await self._session(ws)
            except (OSError, websockets.WebSocketException, TimeoutError) as exc:
                log.warning("connection to %s lost: %s", self.ws_url, exc)
            except _Rejected as exc:
                log.error("the coordinator refused this node: %s", exc)
                rejected = True
            if rejected:  # refused (e.g. quarantined): do not knock again soon
                backoff_s = limits.node_reconnect_backoff_s_max
            elif self._welcomed:  # a session that worked: reconnect quickly
                backoff_s = 0.5
            self._abandon_all()
            if self._stop.is_set():
                break
            # the next replica (if several were given): the one just lost may be gone for good
            self._url_index = (self._url_index + 1) % len(self.coordinator_urls)
            delay = min(limits.node_reconnect_backoff_s_max, backoff_s) * random.uniform(0.5, 1.0)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()
            if self._url_index == 0:  # every replica tried: wait longer before the next round
                backoff_s *= 2

    async def _session(self, ws: Any) -> None:
        challenge = protocol.decode_coordinator_message(await ws.recv())
        if not isinstance(challenge, protocol.Challenge):
            raise _Rejected("expected a challenge")
        hello = protocol.Hello(
            token=self.token,
            public_key=self.identity.public_key_b64,
            name=self.name,
            agent_version=__version__,
            profile=asdict(self.profile) | self.owner_costs,
            availability=_policy_dict(self.policy),
            models=[
                protocol.ModelOffer(name=n, weights_sha256=e.spec.weights_sha256)
                for n, e in self.engines.items()
            ] + (self.stages.offers() if self.stages is not None else []),
            jobs_max=self.jobs_max,
            nonce_signature=self.identity.sign(challenge.nonce.encode()),
            features=sorted(_common_features(self.engines.values())),
        )
        await ws.send(protocol.encode(hello))
        welcome = protocol.decode_coordinator_message(await ws.recv())
        if isinstance(welcome, protocol.Reject):
            raise _Rejected(welcome.reason)
        if not isinstance(welcome, protocol.Welcome):
            raise _Rejected("expected welcome")
        for model, why in welcome.rejected_models.items():
            log.warning("model %s refused by the coordinator: %s", model, why)
        log.info("connected as %s serving %s", welcome.node_id, welcome.accepted_models)
        self._welcomed = True
        send_lock = asyncio.Lock()

        async def send(msg: Any) -> None:
            async with send_lock:
                await ws.send(protocol.encode(msg))

        tasks = [
            asyncio.create_task(self._heartbeats(send, welcome.heartbeat_interval_s)),
            asyncio.create_task(self._watch_policy(send)),
        ]
        stop_wait = asyncio.create_task(self._stop.wait())
        try:
            while True:
                recv = asyncio.create_task(ws.recv())
                done, _ = await asyncio.wait({recv, stop_wait}, return_when="FIRST_COMPLETED")
                if stop_wait in done:
                    recv.cancel()
                    await self._drain(send, grace_s=self.policy.drain_grace_s, reason="stopping")
                    return
                msg = protocol.decode_coordinator_message(recv.result())
                if isinstance(msg, protocol.JobAssign):
                    self._start_job(msg, send)
                elif isinstance(msg, protocol.Cancel):
                    self._cancel_job(msg.job_id, msg.attempt)
                elif isinstance(msg, protocol.KvChunk):
                    self._kv_chunk(msg)
                elif isinstance(msg, protocol.Score):
                    self._spawn(self._score(msg, send))
                elif isinstance(msg, protocol.StageForward | protocol.StageRelease):
                    if self.stages is not None:  # a draining node's chains move elsewhere
                        self._spawn(self.stages.handle(msg, send, refuse=self.draining))
                elif isinstance(msg, protocol.Reject):
                    raise _Rejected(msg.reason)
        finally:
            stop_wait.cancel()
            for t in tasks:
                t.cancel()

    # ---- jobs ---------------------------------------------------------------------------------

    def _start_job(self, job: protocol.JobAssign, send: Any, *, loaded: bool = False,
                   prefix: KvPrefix | None = None) -> None:
        engine = self.engines.get(job.model)
        loop = asyncio.get_running_loop()
        if engine is None or self.draining or len(self.running) >= self.jobs_max:
            why = "draining" if self.draining else f"cannot take model {job.model} now"
            self._refuse(send, job, why)
            return
        if job.kv_import is not None and not loaded:  # its cache first (or give up on it)
            key = (job.job_id, job.attempt)
            if len(self._imports) >= self.jobs_max or key in self._imports:
                self._refuse(send, job, "too many KV caches arriving")
                return
            self._imports[key] = _KvImport(job.kv_import)
            self._spawn(self._start_after_import(job, send))
            return
        stats = engine.stats()
        run = _Running(job=job, updates=asyncio.Queue(), started_s=time.monotonic(),
                       busy_start_s=stats.busy_s, tokens_start=stats.tokens_generated,
                       energy_start=self._meter().read())
        self.running[job.job_id] = run
        run.kv_positions = prefix.positions if prefix is not None else 0

        def on_update(update: GenerationUpdate) -> None:
            loop.call_soon_threadsafe(run.updates.put_nowait, update)

        try:
            self._submit(engine, job, on_update, prefix)
        except Exception as exc:  # full, closed, or a prompt it cannot take
            self.running.pop(job.job_id, None)
            self._refuse(send, job, f"engine refused: {exc}"[:2000])
            return
        run.task = loop.create_task(self._forward(engine, run, send))

    def _kv_chunk(self, msg: protocol.KvChunk) -> None:
        """A chunk of a cache a job waits for: taken in order, or the import given up."""
        imp = self._imports.get((msg.job_id, msg.attempt))
        if imp is None or imp.ended.is_set():
            return  # late, or for an import already given up: dropped
        if msg.layout != imp.layout or msg.index != len(imp.chunks):
            imp.error = f"KV chunk {msg.index} out of order or of another layout"
            imp.chunks.clear()
            imp.ended.set()
            return
        try:
            imp.chunks.append((protocol.unb64(msg.keys), protocol.unb64(msg.values)))
        except Exception as exc:  # ProtocolError: bad base64
            imp.error = str(exc)
            imp.chunks.clear()
            imp.ended.set()
            return
        if len(imp.chunks) == len(protocol.kv_chunks(imp.layout)):
            imp.ended.set()

    async def _start_after_import(self, job: protocol.JobAssign, send: Any) -> None:
        """Wait for a job's handed-over cache, load it, and start the job on it; a cache that
        does not come whole in time or does not fit is dropped and the prompt prefilled here."""
        key = (job.job_id, job.attempt)
        imp = self._imports[key]
        try:
            try:
                async with asyncio.timeout(limits.kv_handoff_s_max):
                    await imp.ended.wait()
            except TimeoutError:
                imp.error = f"the KV cache did not arrive within {limits.kv_handoff_s_max:g} s"
        finally:
            self._imports.pop(key, None)
        if imp.cancelled:
            return
        prefix = None
        engine = self.engines.get(job.model)
        if imp.error is None and engine is not None:
            try:
                prefix = await asyncio.to_thread(engine.import_kv, imp.layout, imp.chunks)
            except Exception as exc:  # InvalidRequest: it does not fit this model
                imp.error = str(exc)
        imp.chunks = []
        if prefix is not None and prefix.positions >= len(job.prompt_token_ids):
            prefix, imp.error = None, "the KV cache covers the whole prompt"
        if imp.error is not None:
            log.warning("job %s: handed-over KV cache dropped (%s); prefilling it here",
                        job.job_id, imp.error)
        self._start_job(job, send, loaded=True, prefix=prefix)

    async def _send_kv(self, engine: Engine, job: protocol.JobAssign, prefix: KvPrefix,
                       send: Any) -> None:
        """The prompt's cache of a ``kv_export`` job, to the coordinator in chunks (before the
        job's ``done``); one over the protocol's bounds is not sent (the coordinator then lets
        the decoding node prefill the prompt itself)."""
        try:
            layout, parts = await asyncio.to_thread(engine.export_kv, prefix)
        except Exception as exc:
            log.warning("job %s: its KV cache cannot be handed off: %s", job.job_id, exc)
            return
        for index, (keys, values) in enumerate(parts):
            await send(protocol.KvChunk(job_id=job.job_id, attempt=job.attempt, index=index,
                                        layout=layout, keys=protocol.b64(keys),
                                        values=protocol.b64(values)))

    def _refuse(self, send: Any, job: protocol.JobAssign, why: str) -> None:
        """Hand a job back at once; the coordinator places it elsewhere."""
        self._spawn(send(protocol.JobError(job_id=job.job_id, attempt=job.attempt, message=why)))

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _score(self, msg: protocol.Score, send: Any) -> None:
        """Verification work: one teacher-forced pass, answered with ``scored``."""
        engine = self.engines.get(msg.model)
        try:
            if engine is None or self.draining:
                raise RuntimeError("draining" if self.draining else f"no model {msg.model}")
            params = msg.sampling.params() if msg.sampling is not None else None
            r = await asyncio.to_thread(engine.score, tuple(msg.prompt_token_ids),
                                        tuple(msg.output_token_ids),
                                        temperature=msg.temperature, top_p=msg.top_p,
                                        params=params, resumed_tokens=msg.resumed_tokens)
        except Exception as exc:
            await send(protocol.Scored(score_id=msg.score_id, error=f"{exc}"[:2000] or "failed"))
            return
        await send(protocol.Scored(
            score_id=msg.score_id, logprobs=list(r.logprobs), top_logprobs=list(r.top_logprobs),
            mass_above=list(r.mass_above), expected_logprobs=list(r.expected_logprobs),
            logprob_vars=list(r.logprob_vars), busy_s=r.busy_s))

    @staticmethod
    def _submit(engine: Engine, job: protocol.JobAssign, on_update: Any,
                prefix: KvPrefix | None = None) -> None:
        engine.submit(
            GenerationRequest(
                request_id=f"{job.job_id}:{job.attempt}",
                prompt_token_ids=tuple(job.prompt_token_ids),
                params=job.sampling.params(),
                want_logprobs=job.want_logprobs,
                resumed_tokens=job.resumed_tokens,
                export_kv=job.kv_export,
                kv_prefix=prefix,
            ),
            on_update,
        )

    async def _forward(self, engine: Engine, run: _Running, send: Any) -> None:
        job = run.job
        produced: list[int] = []
        client_lps = job.sampling.logprobs or job.sampling.top_logprobs > 0
        sent_lps: list[float] = []  # the client's log-probabilities, hashed into the signed Done
        sent_top: list[list[tuple[int, float]]] = []
        carry: GenerationUpdate | None = None
        try:
            while True:
                hold_until = run.last_sent_s + self.stream_interval_s if produced else 0.0
                update, carry = await _coalesced(run.updates, carry, hold_until)
                if update.error:
                    await send(protocol.JobError(job_id=job.job_id, attempt=job.attempt,
                                                 message=update.error[:2000]))
                    return
                if update.token_ids and not run.handed_back:
                    if run.first_token_s is None:
                        run.first_token_s = time.monotonic()
                    ids = list(update.token_ids)
                    lps = list(update.logprobs) if update.logprobs is not None else None
                    tops = ([list(t) for t in update.top_logprobs]
                            if client_lps and update.top_logprobs is not None else None)
                    for i in range(0, len(ids), limits.tokens_per_message_max):
                        part = ids[i : i + limits.tokens_per_message_max]
                        lp = lps[i : i + len(part)] if lps is not None else None
                        top = tops[i : i + len(part)] if tops is not None else None
                        await send(protocol.Tokens(job_id=job.job_id, attempt=job.attempt,
                                                   index=len(produced), token_ids=part,
                                                   logprobs=lp, top_logprobs=top))
                        produced.extend(part)
                        if client_lps:
                            sent_lps.extend(lp or [])
                            sent_top.extend(top or [])
                    run.last_sent_s = time.monotonic()
                if update.finished:
                    break
            if run.handed_back:
                return
            if job.kv_export and update.kv is not None:
                await self._send_kv(engine, job, update.kv, send)
            lps_sha = protocol.logprobs_sha256(sent_lps, sent_top) if client_lps else None
            await send(self._report(engine, run, produced, update, lps_sha))
        except Exception as exc:  # a bug of ours, not the job's: hand it back rather than go silent
            log.exception("job %s: forwarding its updates failed", job.job_id)
            with contextlib.suppress(Exception):
                engine.cancel(f"{job.job_id}:{job.attempt}")
            with contextlib.suppress(Exception):  # the socket may be what failed
                await send(protocol.JobError(job_id=job.job_id, attempt=job.attempt,
                                             message=f"node error: {type(exc).__name__}"))
        finally:
            if self.running.get(job.job_id) is run:  # not a newer attempt of the same job
                del self.running[job.job_id]

    def _report(self, engine: Engine, run: _Running, produced: list[int],
                last: GenerationUpdate, logprobs_sha256: str | None = None) -> protocol.Done:
        job = run.job
        now = time.monotonic()
        stats = engine.stats()
        # The engine's busy time over this job's life, shared by tokens: this job's part.
        engine_tokens = max(1, stats.tokens_generated - run.tokens_start)
        busy_s = (stats.busy_s - run.busy_start_s) * min(1.0, len(produced) / engine_tokens)
        meter = self._meter()
        energy_j, energy_source = meter.joules_between(
            run.energy_start or meter.read(), meter.read(), busy_s)
        metering = protocol.Metering(  # the prompt tokens it prefilled (not those it was sent)
            prompt_tokens=len(job.prompt_token_ids) - run.kv_positions,
            completion_tokens=len(produced),
            time_to_first_token_s=(run.first_token_s or now) - run.started_s,
            total_s=now - run.started_s,
            busy_s=busy_s,
            energy_j=energy_j,
            energy_source=energy_source,
        )
        reason = _wire_reason(last.finish_reason)
        output_sha = protocol.tokens_sha256(produced)
        payload = protocol.result_payload(
            job_id=job.job_id, attempt=job.attempt,
            weights_sha256=engine.spec.weights_sha256, prompt_sha256=job.prompt_sha256,
            output_sha256=output_sha, finish_reason=reason, metering=metering,
            logprobs_sha256=logprobs_sha256,
        )
        return protocol.Done(job_id=job.job_id, attempt=job.attempt, finish_reason=reason,
                             metering=metering, output_sha256=output_sha,
                             signature=self.identity.sign(payload),
                             logprobs_sha256=logprobs_sha256)

    def _meter(self) -> EnergyMeter:
        if self.meter is None:
            self.meter = EnergyMeter.detect(self.profile)
        return self.meter

    def _cancel_job(self, job_id: str, attempt: int) -> None:
        imp = self._imports.get((job_id, attempt))
        if imp is not None:  # still waiting for its cache: it never starts
            imp.cancelled = True
            imp.ended.set()
        run = self.running.get(job_id)
        if run is not None and run.job.attempt == attempt:
            self.engines[run.job.model].cancel(f"{job_id}:{attempt}")

    def _abandon_all(self) -> None:
        """The socket is gone: the coordinator resumes these jobs elsewhere, so stop them."""
        for imp in self._imports.values():
            imp.cancelled = True
            imp.ended.set()
        for run in list(self.running.values()):
            run.handed_back = True
            self.engines[run.job.model].cancel(f"{run.job.job_id}:{run.job.attempt}")
            if run.task is not None:
                run.task.cancel()
        self.running.clear()

    # ---- owner's policy -----------------------------------------------------------------------

    async def _heartbeats(self, send: Any, interval_s: float) -> None:
        while True:
            status = self._status()
            await send(protocol.Heartbeat(active_jobs=len(self.running),
                                          available=not self.draining,
                                          on_ac_power=status.on_ac_power,
                                          charging=status.charging,
                                          owner_load=status.owner_load,
                                          temperature_c=status.temperature_c))
            await asyncio.sleep(interval_s)

    def _status(self) -> availability.DeviceStatus:
        return self.status_probe() if self.status_probe else availability.DeviceStatus()

    async def _watch_policy(self, send: Any) -> None:
        """Drain when the owner's policy says stop; take work again when it says go."""
        while True:
            ok = not self.owner_paused and availability.is_available(
                self.policy, self._status(), time.time())
            if not ok and not self.draining:
                log.info("the owner's availability policy says stop: draining")
                await self._drain(send, grace_s=self.policy.drain_grace_s, reason="policy")
            elif ok and self.draining and not self._stop.is_set():
                log.info("the owner's availability policy allows work again")
                self.draining = False
                await send(protocol.Heartbeat(active_jobs=len(self.running), available=True))
            with contextlib.suppress(TimeoutError):  # the owner's pause/resume acts at once
                async with asyncio.timeout(policy_check_interval_s):
                    await self._policy_changed.wait()
            self._policy_changed.clear()

    async def _drain(self, send: Any, *, grace_s: float, reason: str) -> None:
        """Take no new jobs; give running ones ``grace_s``; hand the rest back."""
        self.draining = True
        await send(protocol.Draining(grace_s=grace_s, reason=reason))
        deadline = time.monotonic() + grace_s
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for run in list(self.running.values()):
            run.handed_back = True
            self.engines[run.job.model].cancel(f"{run.job.job_id}:{run.job.attempt}")
            await send(protocol.JobError(job_id=run.job.job_id, attempt=run.job.attempt,
                                         message=f"node draining ({reason})"))


class _Rejected(Exception):
    pass


def _policy_dict(policy: AvailabilityPolicy) -> dict[str, Any]:
    d = asdict(policy)
    d["windows"] = [list(w) for w in policy.windows]
    return d


async def _coalesced(updates: asyncio.Queue[GenerationUpdate], carry: GenerationUpdate | None,
                     hold_until_s: float = 0.0
                     ) -> tuple[GenerationUpdate, GenerationUpdate | None]:
    """The next update of a job, merged with those that queued up behind it while this loop was
    busy, and with those that arrive before ``hold_until_s`` (monotonic; the stream interval):
    one ``tokens`` message instead of one per token. The end of the job is never held back, and
    an error is never merged: it is handed back as the ``carry`` for the next call, so that the
    tokens before it are sent first."""
    update = carry if carry is not None else await updates.get()
    while not update.error and not update.finished:
        if not updates.empty():
            nxt = updates.get_nowait()
        else:
            wait_s = hold_until_s - time.monotonic()
            if wait_s <= 0:
                break
            try:  # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
                async with asyncio.timeout(wait_s):
                    nxt = await updates.get()
            except TimeoutError:
                break
        if nxt.error:
            return update, nxt
        update = replace(update, token_ids=update.token_ids + nxt.token_ids,
                         logprobs=_joined_logprobs(update, nxt),
                         top_logprobs=_joined_top(update, nxt), finished=nxt.finished,
                         finish_reason=nxt.finish_reason, kv=nxt.kv or update.kv)
    return update, None


def _joined_logprobs(a: GenerationUpdate, b: GenerationUpdate) -> tuple[float, ...] | None:
    """The log-probabilities of two merged updates' tokens; an update without tokens (the end
    of a job) carries none and takes none away."""
    if not b.token_ids:
        return a.logprobs
    if not a.token_ids:
        return b.logprobs
    return a.logprobs + b.logprobs if a.logprobs is not None and b.logprobs is not None else None


def _wire_reason(reason: FinishReason | None) -> protocol.FinishReasonName:
    """An engine's finish reason as ``done`` says it; none means the job was cancelled."""
    match reason:
        case None:
            return "cancelled"
        case FinishReason.STOP:
            return "stop"
        case FinishReason.LENGTH:
            return "length"


def _joined_top(a: GenerationUpdate, b: GenerationUpdate
                ) -> tuple[tuple[tuple[int, float], ...], ...] | None:
    """As ``_joined_logprobs``, for the alternatives at each position."""
    if not b.token_ids:
        return a.top_logprobs
    if not a.token_ids:
        return b.top_logprobs
    if a.top_logprobs is None or b.top_logprobs is None:
        return None
    return a.top_logprobs + b.top_logprobs


def _common_features(engines: Any) -> set[str]:
    """The features every loaded engine honours (a job may go to any of the node's models)."""
    sets = [set(getattr(e, "features", frozenset())) for e in engines]
    return set.intersection(*sets) if sets else set()

"""The coordinator as a service: the store, the ledger, the model registry and dispatch, assembled.

The HTTP surface (``api/``) holds one ``Coordinator`` and calls into it; nothing here knows HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from dataclasses import asdict
from typing import Any

from cachetools import TTLCache

from sparecycles import modelfiles
from sparecycles.coordinator.admission import KeyGate
from sparecycles.coordinator.dispatch import Dispatcher
from sparecycles.coordinator.metrics import Metrics
from sparecycles.coordinator.replication.bus import open_bus
from sparecycles.coordinator.replication.fleet import Fleet
from sparecycles.coordinator.replication.leases import ReplicaLease
from sparecycles.coordinator.router import NodeRouter
from sparecycles.coordinator.verification import Verifier
from sparecycles.errors import ModelNotFound
from sparecycles.ledger.pricing import PriceBook
from sparecycles.ledger.service import Ledger
from sparecycles.scheduling.stays import StayLearner
from sparecycles.settings import CoordinatorSettings, parse_model_args
from sparecycles.store import ApiKeyInfo, Store
from sparecycles.store.dashboard_queries import DashboardQueries, node_sample_interval_s
from sparecycles.store.trust_queries import TrustQueries
from sparecycles.types import ModelSpec

log = logging.getLogger("sparecycles.coordinator.service")
key_cache_ttl_s = 5.0  # a revoked key stops working within this
key_cache_entries_max = 10_000  # past it the least recently used key is looked up again
range_hashes_max = 4096  # layer-range hashes remembered (a model of L layers has L(L+1)/2)
wal_checkpoint_interval_s = 1.0  # SQLite's WAL is checkpointed off the requests' path this often


class Coordinator:
    def __init__(self, settings: CoordinatorSettings, *, store: Store | None = None):
        self.settings = settings
        self.replica_id = settings.replica_id or f"{socket.gethostname()}:{settings.port}"
        self.store = store or Store(settings.database, background_checkpoints=True)
        self.prices = PriceBook.default()
        self.ledger = Ledger(self.store.sessions, currency=settings.currency, prices=self.prices)
        self.models: dict[str, ModelSpec] = {}
        self.tokenizers: dict[str, Any] = {}
        self.sources: dict[str, str] = {}  # model -> where its files are (range hashes)
        self._range_hashes: dict[tuple[str, int, int], str] = {}
        self.metrics = Metrics()
        self.dispatcher: Dispatcher | None = None
        self.fleet: Fleet | None = None  # the other replicas' nodes, over the bus
        self.router: NodeRouter | None = None  # where each local node's message goes
        self.lease: ReplicaLease | None = None  # this replica's lease; settles dead ones' jobs
        self.verifier = (Verifier(store=self.store, ledger=self.ledger)
                         if settings.verification else None)
        self.gate = KeyGate(TrustQueries(self.store.sessions), self.ledger)  # per-key limits
        self.started_at_s = time.time()
        self.stays = StayLearner()  # sessions seen -> nodes' expected stays (scheduling/stays.py)
        self._sampler: asyncio.Task[None] | None = None
        self._checkpointer: asyncio.Task[None] | None = None
        # secret -> its key (None: no such key), for key_cache_ttl_s; written by the threads
        # that look keys up and read on the event loop, hence the lock
        self._keys: TTLCache[str, ApiKeyInfo | None] = TTLCache(
            maxsize=key_cache_entries_max, ttl=key_cache_ttl_s, timer=time.monotonic)
        self._keys_lock = threading.Lock()

    async def start(self) -> None:
        await asyncio.to_thread(self.store.migrate)
        await asyncio.to_thread(self._load_models)
        self.dispatcher = Dispatcher(
            store=self.store,
            ledger=self.ledger,
            models=self.models,
            replica_id=self.replica_id,
            placement_wait_s=self.settings.placement_wait_s,
            token_gap_s=self.settings.token_gap_s,
            policy=self.settings.scheduler_policy,
            disagg=self.settings.disagg,
            on_finished=self._job_finished,
            verifier=self.verifier,
        )
        self.dispatcher.prefix_aware = self.settings.prefix_aware
        self.dispatcher.chains.when_faster = self.settings.chains_when_faster
        self.dispatcher.chains.speedup_min = self.settings.chain_speedup_min
        self.dispatcher.chains.vocab_sizes = {n: len(t) for n, t in self.tokenizers.items()}
        await self.dispatcher.start()
        self.fleet = Fleet(open_bus(self.settings.bus, name=self.replica_id), self.replica_id,
                           self.dispatcher)
        await self.fleet.start()
        link = self.verifier.link if self.verifier is not None else None
        self.router = NodeRouter(self.dispatcher, verification=link, scores=link,
                                 relay=self.fleet)
        self.lease = ReplicaLease(self.store, self.ledger, self.replica_id,
                                  alive_on_bus=self.fleet.peer_ids,
                                  lease_s=self.settings.replica_lease_s)
        await self.lease.start()
        if self.verifier is not None:
            await self.verifier.start(self.dispatcher)
        self._sampler = asyncio.create_task(self._sample_fleet(), name="fleet-sampler")
        if self.store.engine.dialect.name == "sqlite":
            self._checkpointer = asyncio.create_task(self._checkpoints(), name="checkpointer")
        log.info("coordinator %s ready (pid %d) serving %s", self.replica_id, os.getpid(),
                 ", ".join(self.models) or "no models yet")

    def _job_finished(self, job: Any, state: str) -> None:
        """After a job's settlement: metrics, then (off the client's path) a spot check."""
        self.metrics.job_finished(job, state)
        self.gate.release(job.job_id)
        if self.verifier is not None:
            self.verifier.on_job_finished(job, state)

    async def _sample_fleet(self) -> None:
        """Record nodes online, busy and queue depth for the dashboard's charts. Any replica
        may run it: a sample is skipped when another replica took one moments ago."""
        queries = DashboardQueries(self.store.sessions)
        while True:
            try:
                await asyncio.to_thread(queries.record_node_sample, time.time())
            except Exception:  # a missed sample is not worth stopping the coordinator
                log.exception("fleet sample failed")
            await asyncio.sleep(node_sample_interval_s)

    async def _checkpoints(self) -> None:
        """SQLite's WAL checkpoints, here on a worker thread rather than inside whichever commit
        fills the WAL (5-15 ms of fsync on an admission's path; see store/db.py)."""
        while True:
            await asyncio.sleep(wal_checkpoint_interval_s)
            try:
                await asyncio.to_thread(self.store.checkpoint)
            except Exception:  # the backstop (automatic checkpoints) still bounds the WAL
                log.exception("WAL checkpoint failed")

    async def stop(self) -> None:
        for task in (self._sampler, self._checkpointer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.verifier is not None:
            await self.verifier.stop()
        if self.lease is not None:
            await self.lease.stop()
        if self.fleet is not None:
            await self.fleet.stop()
        if self.dispatcher is not None:
            await self.dispatcher.stop()
        self.store.close()

    def _load_models(self) -> None:
        """Register the configured models (hash and spec) and load their tokenizers."""
        for name, source in parse_model_args(self.settings.models).items():
            spec = modelfiles.model_spec(name, source)
            self.store.upsert_model(name, source, spec.weights_sha256, asdict(spec))
        for row in self.store.list_models():
            try:
                self.tokenizers[row.name] = modelfiles.load_tokenizer(row.source)
            except Exception as exc:
                log.error("model %s from %s cannot be loaded: %s", row.name, row.source, exc)
                continue
            if not getattr(self.tokenizers[row.name], "chat_template", None):
                log.warning("model %s (%s) has no chat template: /v1/chat/completions will"
                            " answer 400, /v1/completions works", row.name, row.source)
            self.models[row.name] = ModelSpec(**row.spec)
            self.sources[row.name] = row.source
        # each model is priced by its size unless the platform set its price (admin API)
        self.prices = self.prices.with_specs(self.models.values())
        self.ledger.book = self.prices

    def layers_sha256(self, name: str, first: int, end: int) -> str | None:
        """The hash a stage holding layers ``[first, end)`` of ``name`` must declare (computed
        from the registry's copy once per range; blocking: call it off the event loop); None
        when the range is not one of the model's."""
        spec, source = self.models.get(name), self.sources.get(name)
        if spec is None or source is None or not 0 <= first < end <= spec.n_layers:
            return None
        key = (name, first, end)
        if key not in self._range_hashes:
            if len(self._range_hashes) >= range_hashes_max:
                self._range_hashes.clear()
            self._range_hashes[key] = modelfiles.layers_sha256(source, first, end, spec.n_layers)
        return self._range_hashes[key]

    def model(self, name: str) -> tuple[ModelSpec, Any]:
        spec = self.models.get(name)
        if spec is None:
            raise ModelNotFound(
                f"The model '{name}' does not exist or you do not have access to it.",
                param="model",
            )
        return spec, self.tokenizers[name]

    def forget_keys(self) -> None:
        """Drop cached key lookups (a key was revoked): it stops working at once."""
        with self._keys_lock:
            self._keys.clear()

    def cached_key(self, secret: str) -> tuple[bool, ApiKeyInfo | None]:
        """(whether the cache answered, its answer), without touching the database: cheap
        enough for the event loop, so a request with a known key costs no hop to a thread."""
        with self._keys_lock:
            try:
                return True, self._keys[secret]
            except KeyError:  # never seen, expired or evicted
                return False, None

    def authenticate(self, secret: str) -> ApiKeyInfo | None:
        """Look up a key, caching answers briefly so a request costs no query in the common case."""
        cached, info = self.cached_key(secret)
        if cached:
            return info
        info = self.store.authenticate_key(secret)
        with self._keys_lock:
            self._keys[secret] = info  # when full, the least recently used entry goes
        return info

"""Prometheus metrics of one coordinator: requests, tokens, latency, nodes, queue.

Each coordinator has its own registry (so tests can run several in one process); ``/metrics``
serves it in the text exposition format.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from sparecycles.coordinator.jobs import LiveJob

_latency_buckets_s = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sparecycles_requests", "Client API requests", ["endpoint", "status"], registry=r
        )
        self.tokens = Counter(
            "sparecycles_tokens", "Tokens processed", ["model", "kind"], registry=r
        )
        self.jobs = Counter("sparecycles_jobs", "Jobs ended", ["model", "state"], registry=r)
        self.latency = Histogram(
            "sparecycles_request_duration_seconds",
            "Time from admission to the last token",
            ["model"],
            buckets=_latency_buckets_s,
            registry=r,
        )
        self.ttft = Histogram(
            "sparecycles_time_to_first_token_seconds",
            "Time from admission to the first token",
            ["model"],
            buckets=_latency_buckets_s,
            registry=r,
        )
        self.nodes_online = Gauge(
            "sparecycles_nodes_online", "Nodes connected", ["device_class"], registry=r
        )
        self.jobs_waiting = Gauge(
            "sparecycles_jobs_waiting", "Jobs waiting for a node", registry=r
        )
        self.jobs_running = Gauge("sparecycles_jobs_running", "Jobs on nodes", registry=r)
        self.overhead = Histogram(
            "sparecycles_coordinator_overhead_seconds",
            "Time the coordinator itself adds: admission (request received to job sent to a "
            "node; of it, admission_placement: choosing the node, and admission_hold: waiting "
            "for the hold's commit) and relay (tokens received from a node to written to the "
            "client)",
            ["stage"],
            # fine around the 2 ms target, so quantiles read from the histogram mean something
            buckets=(0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005,
                     0.0075, 0.01, 0.025, 0.05, 0.1),
            registry=r,
        )
        self.resumptions = Counter(
            "sparecycles_job_resumptions", "Attempts ended by a node leaving", registry=r
        )
        # the labelled series of the hot path, looked up once (``labels`` takes a lock and
        # builds a key on every call: once per token message for the relay)
        self.overhead_relay = self.overhead.labels("relay")
        self.overhead_admission = self.overhead.labels("admission")
        # two parts of it: placement on admission, and waiting for the hold's commit
        self.overhead_placement = self.overhead.labels("admission_placement")
        self.overhead_hold = self.overhead.labels("admission_hold")
        self._per_model: dict[tuple[str, str], tuple[Any, ...]] = {}

    def job_finished(self, job: LiveJob, state: str) -> None:
        series = self._per_model.get((job.model, state))
        if series is None:  # models and states are few: kept for the process's life
            series = (self.jobs.labels(job.model, state), self.tokens.labels(job.model, "prompt"),
                      self.tokens.labels(job.model, "completion"), self.ttft.labels(job.model),
                      self.latency.labels(job.model))
            self._per_model[(job.model, state)] = series
        jobs, prompt, completion, ttft, latency = series
        jobs.inc()
        prompt.inc(len(job.prompt_ids))
        completion.inc(len(job.generated))
        if job.first_token_mono_s is not None:
            ttft.observe(job.first_token_mono_s - job.admitted_mono_s)
        latency.observe(time.monotonic() - job.admitted_mono_s)
        if len(job.attempts) > 1:
            self.resumptions.inc(len(job.attempts) - 1)

    def render(self, dispatcher: Any | None) -> bytes:
        if dispatcher is not None:
            self.jobs_waiting.set(len(dispatcher.waiting))
            self.jobs_running.set(len(dispatcher.jobs) - len(dispatcher.waiting))
            self.nodes_online.clear()
            counts: dict[str, int] = {}
            for n in dispatcher.nodes.values():
                counts[n.profile.device_class] = counts.get(n.profile.device_class, 0) + 1
            for cls, count in counts.items():
                self.nodes_online.labels(cls).set(count)
        return generate_latest(self.registry)

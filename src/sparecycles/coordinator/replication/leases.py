"""Replica leases, and the settling of jobs that a dead replica left open.

Each replica renews a lease row (``replicas``) every ``beat_s``. A job belongs to the replica that
admitted it (its client's connection is there). When a replica dies, its clients' connections die
with it, so its open jobs cannot deliver anything more: some other replica must release their
holds. Every replica looks for them every ``reap_every_s``; the jobs of a replica whose lease
lapsed ``lease_s`` ago, and which is not heard on the bus either (a replica cut off from the
database only, e.g. while PostgreSQL restarts, still owns its jobs), are claimed by exactly one
replica (``Store.claim_orphaned_jobs``: SKIP LOCKED + compare-and-set) and settled:

- a job whose settlement had been posted before the crash is marked done (the charge stands);
- any other job has its hold voided and is marked failed: the client is charged nothing.

A replica that restarts under the same id settles its own open jobs at once (``Dispatcher``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable

from sparecycles.ledger.engine import VoidOutcome
from sparecycles.ledger.service import Ledger
from sparecycles.store import Store

log = logging.getLogger("sparecycles.coordinator.replication.leases")

beat_s = 2.0
lease_s = 15.0  # a lease not renewed for this long has lapsed
reap_every_s = 5.0


def settle_abandoned(store: Store, ledger: Ledger, job_id: str, why: str) -> str:
    """Close a job nobody can finish: void its hold (a no-op if it was settled). Returns the
    job's final state. Harmless to repeat."""
    outcome = ledger.void(job_id)
    state = "done" if outcome == VoidOutcome.SETTLED else "failed"
    fields: dict[str, object] = {"state": state, "finished_at_s": time.time()}
    if state == "failed":
        fields["error"] = why
    store.update_job(job_id, **fields)
    return state


class ReplicaLease:
    def __init__(self, store: Store, ledger: Ledger, replica_id: str,
                 alive_on_bus: Callable[[], set[str]] = set, *,
                 lease_s: float | None = None) -> None:
        self.store, self.ledger, self.replica_id = store, ledger, replica_id
        self.lease_s = lease_s or globals()["lease_s"]
        self.alive_on_bus = alive_on_bus
        self.started_at_s = time.time()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await asyncio.to_thread(self.beat)
        self._task = asyncio.create_task(self._loop(), name="replica-lease")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def beat(self) -> None:
        self.store.replica_beat(self.replica_id, started_at_s=self.started_at_s, pid=os.getpid())

    def reap(self) -> list[str]:
        """Claim and settle the open jobs of dead replicas; returns the job ids settled."""
        settled: list[str] = []
        while True:
            claimed = self.store.claim_orphaned_jobs(
                self.replica_id, lapsed_before_s=time.time() - self.lease_s,
                spare=self.alive_on_bus())
            for job_id in claimed:
                state = settle_abandoned(self.store, self.ledger, job_id,
                                         "the coordinator replica holding the request stopped; "
                                         "nothing undelivered was charged")
                log.warning("job %s of a dead replica: %s", job_id, state)
                settled.append(job_id)
            if len(claimed) < 100:
                return settled

    async def _loop(self) -> None:
        last_reap = 0.0
        while True:
            await asyncio.sleep(beat_s)
            try:
                await asyncio.to_thread(self.beat)
                if time.monotonic() - last_reap >= min(reap_every_s, self.lease_s / 3):
                    last_reap = time.monotonic()
                    await asyncio.to_thread(self.reap)
            except Exception as exc:  # the database is away (restarting): try again next beat
                log.warning("replica lease: %s", exc)

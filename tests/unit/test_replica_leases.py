"""Replica leases and the settling of a dead replica's open jobs (SQLite; PostgreSQL with
concurrent claimers in tests/integration/test_replicas_postgres.py)."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import update

from sparecycles.coordinator.replication import leases as replicas
from sparecycles.coordinator.replication.leases import ReplicaLease
from sparecycles.ledger.pricing import PriceBook
from sparecycles.ledger.service import Ledger, WorkShare
from sparecycles.store import Store
from sparecycles.store.core_tables import ReplicaRow


def open_jobs(store: Store, ledger: Ledger, replica_id: str, n: int, *, client: str,
              prefix: str = "job") -> list[str]:
    """``n`` admitted jobs of ``replica_id``, each with its hold."""
    ids = []
    for i in range(n):
        job_id = f"{prefix}_{replica_id.replace(':', '-')}_{i}"
        store.insert_job(id=job_id, client_id=client, api_key_id=None, model="m",
                         endpoint="chat.completions", workload="inference", state="streaming",
                         stream=True, trusted_only=False, prompt_tokens=10, max_tokens=20,
                         replica_id=replica_id, created_at_s=time.time())
        ledger.hold(job_id, client, "m", 10, 20)
        ids.append(job_id)
    return ids


def age_lease(store: Store, replica_id: str, seconds: float) -> None:
    with store.sessions.begin() as s:
        s.execute(update(ReplicaRow).where(ReplicaRow.id == replica_id)
                  .values(last_seen_at_s=time.time() - seconds))


def books(store: Store) -> tuple[Ledger, str, str]:
    ledger = Ledger(store.sessions, prices=PriceBook.default())
    client = store.ensure_client("acme")
    ledger.deposit(client, 50_000_000, reference="topup")
    return ledger, client, store.ensure_owner("alice")


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    s.migrate()
    return s


def test_a_dead_replica_s_jobs_are_settled_once_by_a_live_one(store) -> None:
    ledger, client, owner = books(store)
    dead, live = ReplicaLease(store, ledger, "dead:1"), ReplicaLease(store, ledger, "live:2")
    dead.beat()
    live.beat()
    jobs = open_jobs(store, ledger, "dead:1", 3, client=client)
    mine = open_jobs(store, ledger, "live:2", 1, client=client)
    # one job was settled just before the crash: its charge stands
    ledger.settle(jobs[0], client, "m", 10, 5,
                  [WorkShare(owner, "node1", "laptop", 10, 5, 0.0)])
    assert live.reap() == []  # the lease is fresh: nothing is touched
    age_lease(store, "dead:1", replicas.lease_s + 1)
    settled = live.reap()
    assert sorted(settled) == sorted(jobs)
    states = {j: store.get_job(j).state for j in jobs}
    assert states == {jobs[0]: "done", jobs[1]: "failed", jobs[2]: "failed"}
    assert "replica" in store.get_job(jobs[1]).error
    assert ledger.job_money(jobs[1])["state"] == "voided"
    assert ledger.job_money(jobs[0])["state"] == "settled"
    assert store.get_job(mine[0]).state == "streaming"  # the live replica's own job is its own
    assert live.reap() == []  # nothing twice
    ledger.void(mine[0])
    store.update_job(mine[0], state="failed", finished_at_s=time.time())
    assert ledger.check() == []


def test_a_replica_still_heard_on_the_bus_keeps_its_jobs(store) -> None:
    ledger, client, _owner = books(store)
    ReplicaLease(store, ledger, "cut-off:1").beat()
    live = ReplicaLease(store, ledger, "live:2", alive_on_bus=lambda: {"cut-off:1"})
    jobs = open_jobs(store, ledger, "cut-off:1", 2, client=client)
    age_lease(store, "cut-off:1", replicas.lease_s + 1)
    assert live.reap() == []  # its database connection is away, not the replica
    assert all(store.get_job(j).state == "streaming" for j in jobs)

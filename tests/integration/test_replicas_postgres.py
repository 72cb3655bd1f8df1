"""Several replicas claim a dead replica's jobs at once on PostgreSQL: each job is settled by
exactly one of them (SKIP LOCKED + compare-and-set), and the books balance."""

from __future__ import annotations

import os
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from sparecycles.coordinator.replication import leases as replicas
from sparecycles.coordinator.replication.leases import ReplicaLease
from sparecycles.store import Store
from sparecycles.store.db import Base

PG_URL = os.environ.get("SPARECYCLES_TEST_POSTGRES",
                        "postgresql+psycopg://postgres@127.0.0.1:5432/test")
pytestmark = pytest.mark.postgres
sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))  # its helpers: test_replica_leases.py


@pytest.fixture
def pg_store() -> Iterator[Store]:
    schema = f"replicas_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f"CREATE SCHEMA {schema}"))
    engine = create_engine(PG_URL, pool_size=8, max_overflow=8,
                           connect_args={"options": f"-csearch_path={schema}"})
    Base.metadata.create_all(engine)
    yield Store(PG_URL, engine=engine)
    engine.dispose()
    with admin.connect() as c:
        c.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


def test_concurrent_reapers_settle_each_orphan_exactly_once(pg_store: Store) -> None:
    from test_replica_leases import age_lease, books, open_jobs

    ledger, client, _owner = books(pg_store)
    ReplicaLease(pg_store, ledger, "dead").beat()
    jobs = open_jobs(pg_store, ledger, "dead", 150, client=client)
    age_lease(pg_store, "dead", replicas.lease_s + 1)
    reapers = [ReplicaLease(pg_store, ledger, f"live{i}") for i in range(4)]
    for r in reapers:
        r.beat()
    results: dict[str, list[str]] = {}
    barrier = threading.Barrier(len(reapers))

    def run(r: ReplicaLease) -> None:
        barrier.wait()
        results[r.replica_id] = r.reap()

    threads = [threading.Thread(target=run, args=(r,)) for r in reapers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    claimed = [j for ids in results.values() for j in ids]
    assert sorted(claimed) == sorted(jobs)  # every orphan once, none twice
    assert all(pg_store.get_job(j).state == "failed" for j in jobs)
    assert ledger.check() == []

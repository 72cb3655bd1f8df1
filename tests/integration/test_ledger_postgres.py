"""The ledger on real databases: the same behaviour tests on a SQLite file and on PostgreSQL,
the property test and the seeded simulation on PostgreSQL, and concurrency: many settlements
at once against one client account lose no update and never overdraw.

Each test gets its own PostgreSQL schema, named after this run, dropped at the end, so runs never
clash. Needs PostgreSQL at ``SPARECYCLES_TEST_POSTGRES`` (default 127.0.0.1:5432, database test).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from sqlalchemy import Engine, create_engine, text

from sparecycles.errors import Conflict, InsufficientBalance
from sparecycles.ledger import payouts
from sparecycles.ledger.pricing import charge_micros
from sparecycles.ledger.service import Ledger, WorkShare
from sparecycles.store.db import Base, make_engine

PG_URL = os.environ.get("SPARECYCLES_TEST_POSTGRES",
                        "postgresql+psycopg://postgres@127.0.0.1:5432/test")
RUN = f"ledger_{os.getpid()}_{uuid.uuid4().hex[:6]}"
pytestmark = pytest.mark.postgres


def _unit(name: str) -> Any:
    """The unit-test module ``name`` (this file re-runs its tests on other stores)."""
    if name in sys.modules:
        return sys.modules[name]
    unit_dir = Path(__file__).parents[1] / "unit"
    if str(unit_dir) not in sys.path:
        sys.path.insert(0, str(unit_dir))
    spec = importlib.util.spec_from_file_location(name, unit_dir / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


flows = _unit("test_ledger_flows")
properties = _unit("test_ledger_properties")
sim = _unit("test_ledger_sim")
Books = flows.Books
globals().update({k: v for k, v in vars(flows).items() if k.startswith("test_")})


def _postgres_ok() -> bool:
    try:
        engine = create_engine(PG_URL)
        with engine.connect() as c:
            c.execute(text("SELECT 1"))
        engine.dispose()
        return True
    except Exception:
        return False


POSTGRES = _postgres_ok()
_engines: list[tuple[Engine, str | None]] = []


def pg_engine(pool_size: int = 5) -> Engine:
    """A fresh schema of this run; dropped at the end of the module."""
    if not POSTGRES:
        pytest.skip("PostgreSQL is not reachable at " + PG_URL)
    schema = f"{RUN}_{len(_engines)}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f"CREATE SCHEMA {schema}"))
    admin.dispose()
    engine = create_engine(PG_URL, pool_size=pool_size, max_overflow=10,
                           connect_args={"options": f"-csearch_path={schema}"})
    Base.metadata.create_all(engine)
    _engines.append((engine, schema))
    return engine


def sqlite_file_engine() -> Engine:
    import tempfile

    engine = make_engine(f"sqlite:///{tempfile.mkdtemp()}/ledger.db")
    Base.metadata.create_all(engine)
    _engines.append((engine, None))
    return engine


def pg_books(**kw: Any) -> Any:
    return Books(pg_engine(), **kw)


@pytest.fixture(scope="module", autouse=True)
def _drop_schemas() -> Iterator[None]:
    yield
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT") if POSTGRES else None
    for engine, schema in _engines:
        engine.dispose()
        if schema and admin is not None:
            with admin.connect() as c:
                c.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
    if admin is not None:
        admin.dispose()


@pytest.fixture(params=["sqlite-file", "postgres"])
def make_books(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """Overrides the unit tests' fixture: every behaviour test runs on both stores."""
    if request.param == "postgres":
        return pg_books
    return lambda **kw: Books(sqlite_file_engine(), **kw)


# ---- the property test and the simulation on PostgreSQL ------------------------------------


class PostgresLedgerMachine(properties.LedgerMachine):
    books = staticmethod(pg_books)


PostgresLedgerMachine.TestCase.settings = settings(
    max_examples=8, stateful_step_count=25, deadline=None,
    suppress_health_check=list(HealthCheck))
TestLedgerPropertiesPostgres = PostgresLedgerMachine.TestCase


@pytest.mark.parametrize("seed", [100, 101, 102])
def test_simulation_on_postgres(seed: int) -> None:
    sim.simulate(pg_books, seed, steps=150)


# ---- concurrency -----------------------------------------------------------------------------


def _hammer(engine: Engine, *, replicas: int, threads: int, jobs: int, clients: list[str]
            ) -> tuple[Ledger, list[int], list[BaseException]]:
    """``replicas`` Ledgers (as coordinator replicas) x ``threads`` threads, each admitting
    and settling ``jobs`` jobs for one of ``clients``. Returns the charges that were made."""
    ledgers = [Ledger(engine, lanes=2) for _ in range(replicas)]
    charges: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(r: int, t: int) -> None:
        L = ledgers[r]
        for i in range(jobs):
            job, client = f"r{r}t{t}j{i}", clients[(t + i) % len(clients)]
            try:
                L.hold(job, client, "m", 1000, 1000)
            except InsufficientBalance:
                continue
            except BaseException as exc:
                errors.append(exc)
                return
            try:
                s = L.settle(job, client, "m", 1000, 500 + i % 3,
                             [WorkShare(f"o{i % 3}", f"n{t % 5}", "gaming-pc", 1000, 500)])
                with lock:
                    charges.append(s.charge_micros)
            except BaseException as exc:
                errors.append(exc)
                return

    pool = [threading.Thread(target=work, args=(r, t))
            for r in range(replicas) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    return ledgers[0], charges, errors


@pytest.mark.parametrize("store", ["postgres", "sqlite-file"])
def test_concurrent_settlements_on_one_client_lose_no_update_and_never_overdraw(
        store: str) -> None:
    engine = pg_engine(pool_size=20) if store == "postgres" else sqlite_file_engine()
    first = Ledger(engine)
    hold = 1000 * 60_000 // 1_000_000 + 1000 * 180_000 // 1_000_000  # 240 micros
    first.deposit("shared", 60 * hold, "fund")  # not enough for every job
    L, charges, errors = _hammer(engine, replicas=3, threads=6, jobs=12, clients=["shared"])
    assert errors == []
    bal = L.client_balance("shared")
    assert bal.held_micros == 0
    assert bal.balance_micros == 60 * hold - sum(charges)  # no update lost
    assert bal.balance_micros >= 0  # never overdrawn
    assert 0 < len(charges) < 3 * 6 * 12  # some were refused with 402
    assert L.check() == []


def test_concurrent_settlements_payouts_and_withholds_never_deadlock() -> None:
    engine = pg_engine(pool_size=20)
    first = Ledger(engine)
    clients = [f"c{i}" for i in range(6)]
    for c in clients:
        first.deposit(c, 10**9, f"fund-{c}")
    stop = threading.Event()
    side_errors: list[BaseException] = []

    def payouts_and_withholds() -> None:
        import tempfile

        n = 0
        d = Path(tempfile.mkdtemp())
        while not stop.is_set():
            n += 1
            try:
                payouts.run_payouts(first, 10_000, d, batch_id=f"b{n}")
                first.withhold(f"r0t0j{n}", "spot check")
            except Conflict:
                pass  # that job is not settled yet
            except BaseException as exc:
                side_errors.append(exc)
                return

    side = threading.Thread(target=payouts_and_withholds)
    side.start()
    try:
        L, charges, errors = _hammer(engine, replicas=2, threads=6, jobs=15, clients=clients)
    finally:
        stop.set()
        side.join()
    assert errors == [] and side_errors == []
    assert len(charges) == 2 * 6 * 15
    assert L.check() == []


def test_the_same_completion_from_two_replicas_is_charged_once() -> None:
    engine = pg_engine(pool_size=20)
    a, b = Ledger(engine), Ledger(engine)
    a.deposit("alice", 10**9, "fund")
    for i in range(30):
        a.hold(f"j{i}", "alice", "m", 1000, 1000)
    results: list[Any] = []

    def settle(L: Ledger, i: int) -> None:
        results.append(L.settle(f"j{i}", "alice", "m", 1000, 700,
                                [WorkShare("olga", "n1", "gaming-pc", 1000, 700)]))

    pool = [threading.Thread(target=settle, args=(L, i)) for i in range(30) for L in (a, b, a)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    assert len(results) == 90 and sum(not r.replayed for r in results) == 30
    price = a.book.price_of("m")
    assert a.client_balance("alice").balance_micros == 10**9 - 30 * charge_micros(
        price, 1000, 700, 10**9)
    assert a.check() == []

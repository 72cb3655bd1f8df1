"""The ledger's group commit under mixed load: threads (``submit_many``) and coroutines on
several event loops (``submit_async``) queue ops on one lane at once, the lead passing between
waiting threads and the lane's worker. A fake transaction stands in for the database, so the
hand-off itself is what is tested: one batch at a time per lane, every op run exactly once, in
each caller's order, and every caller told its own op's result. An op that breaks a shared
transaction is run again alone, as are the others of that batch: it fails on its own, they
commit."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from sparecycles.ledger.group_commit import GroupCommit


class Refused(Exception):
    """A per-op error (a SpareCyclesError in the real ledger): only its own op fails."""


class TxFailed(Exception):
    """The whole transaction failed (a poison op in it): the lane reruns each op alone."""


@dataclass(frozen=True)
class GroupFailed:
    """What ``submit_many`` raised for a thread's list of ops."""

    error: TxFailed
    ops: tuple[FakeOp, ...]


@dataclass(frozen=True)
class FakeOp:
    caller: str
    n: int  # the caller's n-th op
    kind: str = "ok"  # ok | refused | poison (fails its whole transaction)


@dataclass
class FakeDb:
    """Applies batches one after another; notices when two of a lane's batches overlap."""

    ops_max: int
    seed: int
    applied: list[FakeOp] = field(default_factory=list)
    batches: list[list[FakeOp]] = field(default_factory=list)
    failed: set[int] = field(default_factory=set)  # indexes of failed batches
    overlaps: int = 0
    _running: int = 0
    _guard: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def run(self, ops: list[Any], afters: list[Any]) -> list[Any]:
        with self._guard:
            self._running += 1
            if self._running > 1:
                self.overlaps += 1
            jitter = self._rng.random()
        try:
            assert 1 <= len(ops) <= self.ops_max
            time.sleep(jitter * 0.0005)  # widen the windows between the lane's steps
            with self._guard:
                self.batches.append(list(ops))
                if any(op.kind == "poison" for op in ops):  # rolled back: nothing applied
                    self.failed.add(len(self.batches) - 1)
                    raise TxFailed(f"batch {len(self.batches) - 1}")
                start = len(self.applied)
                self.applied.extend(ops)
            return [Refused(op) if op.kind == "refused" else start + i
                    for i, op in enumerate(ops)]
        finally:
            with self._guard:
                self._running -= 1


def _kind(rng: random.Random) -> str:
    x = rng.random()
    return "poison" if x < 0.02 else "refused" if x < 0.1 else "ok"


def _check(db: FakeDb, outcomes: dict[FakeOp, Any], submitted: list[FakeOp]) -> None:
    """Every op but the poison committed once, each caller's ops in its order, each poison op
    failed alone (in a batch of its own), and each op got its own outcome."""
    assert db.overlaps == 0
    healthy = [op for op in submitted if op.kind != "poison"]
    assert sorted(db.applied, key=repr) == sorted(healthy, key=repr)  # each exactly once
    position = {op: i for i, op in enumerate(db.applied)}
    alone = {ops[0]: b for b, ops in enumerate(db.batches) if b in db.failed and len(ops) == 1}
    assert all(op in alone for op in submitted if op.kind == "poison")
    for b in db.failed:  # every op of a failed shared batch was run again alone
        assert all(op in alone or op in position for op in db.batches[b])
    by_caller: dict[str, list[FakeOp]] = {}
    for op in submitted:
        by_caller.setdefault(op.caller, []).append(op)
    for ops in by_caller.values():
        committed = [position[op] for op in ops if op in position]
        assert committed == sorted(committed)
    for op in submitted:
        got = outcomes[op]
        if isinstance(got, GroupFailed):  # raised: the first poison op of the list's error
            first = next(o for o in got.ops if o.kind == "poison")
            assert str(got.error) == f"batch {alone[first]}", (op, got)
        elif op.kind == "poison":
            assert isinstance(got, TxFailed) and str(got) == f"batch {alone[op]}", (op, got)
        elif op.kind == "refused":
            assert isinstance(got, Refused) and got.args == (op,), (op, got)
        else:
            assert got == position[op], (op, got)


def _thread_caller(lane: GroupCommit, name: str, rng: random.Random, rounds: int,
                   outcomes: dict[FakeOp, Any], submitted: list[FakeOp]) -> None:
    n = 0
    for _ in range(rounds):
        ops = [FakeOp(name, n + i, _kind(rng)) for i in range(rng.choice((1, 1, 2, 5)))]
        n += len(ops)
        submitted.extend(ops)
        try:
            results = lane.submit_many(ops, [None] * len(ops))
        except TxFailed as exc:  # raised for all: the first of its ops' failed transactions
            results = [GroupFailed(exc, tuple(ops))] * len(ops)
        outcomes.update(zip(ops, results, strict=True))
        if rng.random() < 0.3:
            time.sleep(rng.random() * 0.0005)


def _loop_thread(lane: GroupCommit, name: str, seed: int, coroutines: int, rounds: int,
                 outcomes: dict[FakeOp, Any], submitted: list[FakeOp],
                 loop_errors: list[Any]) -> None:
    """An event loop of its own, with coroutines queueing ops one after another; a few give
    up waiting (cancelled), and one in a while calls the blocking API on the loop itself."""

    async def one(c: int) -> None:
        rng = random.Random(seed * 1000 + c)
        for n in range(rounds):
            op = FakeOp(f"{name}-{c}", n, _kind(rng))
            submitted.append(op)
            x = rng.random()
            if x < 0.05:  # a blocking call on the loop's own thread: the worker must not need it
                try:
                    outcomes[op] = lane.submit_many([op], [None])[0]
                except TxFailed as exc:
                    outcomes[op] = exc
                continue
            fut = lane.submit_async(op)
            if x < 0.15:  # this coroutine stops waiting: the op still runs, once
                fut.cancel()
                outcomes[op] = CANCELLED
                await asyncio.sleep(0)
                continue
            try:
                outcomes[op] = await fut
            except (Refused, TxFailed) as exc:
                outcomes[op] = exc
            if rng.random() < 0.2:
                await asyncio.sleep(0)

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: loop_errors.append(ctx))
        await asyncio.wait_for(asyncio.gather(*(one(c) for c in range(coroutines))), 30)

    asyncio.run(main())


CANCELLED = object()


@dataclass
class SometimesInline:
    """An ``inline`` for the lane (SQLite's, on the event loop): busy a third of the time
    (None: nothing done), else the transaction itself, whose failure the worker sees again."""

    db: FakeDb
    seed: int
    calls: int = 0
    _guard: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed + 7)

    def __call__(self, ops: list[Any], afters: list[Any]) -> Any:
        with self._guard:
            self.calls += 1
            busy = self.calls > 1 and self._rng.random() < 0.3
        return None if busy else self.db.run(ops, afters)


@pytest.mark.parametrize("inline", [False, True], ids=["worker", "inline"])
@pytest.mark.parametrize("seed", range(6))
def test_threads_and_coroutines_share_a_lane_without_overlap_or_loss(seed: int,
                                                                      inline: bool) -> None:
    db = FakeDb(ops_max=[1, 3, 64][seed % 3], seed=seed)
    fake = SometimesInline(db, seed) if inline else None
    lane = GroupCommit(db.run, db.ops_max, inline=fake)
    outcomes: dict[FakeOp, Any] = {}
    submitted: list[FakeOp] = []
    loop_errors: list[Any] = []
    workers: list[threading.Thread] = []
    for t in range(4):
        workers.append(threading.Thread(target=_thread_caller, args=(
            lane, f"t{t}", random.Random(seed * 100 + t), 60, outcomes, submitted)))
    for e in range(2):
        workers.append(threading.Thread(target=_loop_thread, args=(
            lane, f"e{e}", seed * 10 + e, 12, 15, outcomes, submitted, loop_errors)))
    if fake is not None:  # a first op alone: an idle lane is led by the loop, inline
        warm = FakeOp("warm", 0)
        submitted.append(warm)

        async def first() -> Any:
            return await lane.submit_async(warm)

        outcomes[warm] = asyncio.run(first())
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert not any(w.is_alive() for w in workers), "a caller never finished: a lost wake-up"
    assert loop_errors == []
    _wait_idle(lane)
    for op, got in list(outcomes.items()):
        if got is CANCELLED:
            del outcomes[op]
    cancelled = [op for op in submitted if op not in outcomes]
    _check(db, {**outcomes, **{op: _expected(db, op) for op in cancelled}}, submitted)
    if fake is not None:  # both kinds of leader led: the loops inline, the others the rest
        assert lane.inline_batches > 0 and lane.worker_batches > 0


def _expected(db: FakeDb, op: FakeOp) -> Any:
    """What a cancelled coroutine would have been told (its op ran all the same)."""
    if op.kind == "poison":  # its last transaction: the one it ran in alone
        b = max(i for i, ops in enumerate(db.batches) if ops == [op])
        return TxFailed(f"batch {b}")
    return Refused(op) if op.kind == "refused" else db.applied.index(op)


def _wait_idle(lane: GroupCommit, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while lane.load() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert lane.load() == 0, "ops left queued with nobody leading"


def test_a_closed_loop_does_not_stop_the_lane() -> None:
    """A coroutine's loop closes while its op waits in the queue: the op still runs, the
    result goes nowhere, and the lane goes on serving everyone else."""
    gate = threading.Event()
    seen: list[list[Any]] = []

    def run(ops: list[Any], _afters: list[Any]) -> list[Any]:
        gate.wait(5)
        seen.append(list(ops))
        return [f"r{op}" for op in ops]

    lane = GroupCommit(run, 8)

    async def queue_and_leave() -> None:
        lane.submit_async("a")
        lane.submit_async("b")

    asyncio.run(queue_and_leave())  # the loop is closed with both ops still queued
    gate.set()
    assert lane.submit("c") == "rc"
    _wait_idle(lane)
    assert [op for ops in seen for op in ops] == ["a", "b", "c"]

    async def again() -> Any:
        return await lane.submit_async("d")

    assert asyncio.run(again()) == "rd"


def test_coroutines_of_one_loop_are_woken_once_per_transaction() -> None:
    woken: list[int] = []
    gate = threading.Event()

    def run(ops: list[Any], _afters: list[Any]) -> list[Any]:
        gate.wait(5)
        return list(ops)

    lane = GroupCommit(run, 100)

    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe

        def counting(cb: Callable[..., Any], *args: Any, **kw: Any) -> Any:
            woken.append(1)
            return real(cb, *args, **kw)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        futs = [lane.submit_async(i) for i in range(50)]
        gate.set()
        return await asyncio.gather(*futs)

    assert asyncio.run(main()) == list(range(50))
    assert len(woken) <= 2  # the first op's batch, then the other 49 together


def test_the_lead_goes_from_the_worker_to_a_thread_and_back() -> None:
    """In turn: the worker runs a coroutine's op while a thread and then another coroutine
    queue; the thread, at the head, is promoted and runs its own op; the coroutine's op, at
    the head again, goes back to the worker. One batch at a time, each by the right leader."""
    started, gate = threading.Event(), threading.Event()
    ran: list[tuple[str, list[Any]]] = []

    def run(ops: list[Any], _afters: list[Any]) -> list[Any]:
        ran.append((threading.current_thread().name, list(ops)))
        if ops == ["a"]:
            started.set()
            gate.wait(5)
        return [f"r{op}" for op in ops]

    lane = GroupCommit(run, 1)
    told: list[Any] = []

    async def main() -> list[Any]:
        fa = lane.submit_async("a")
        await asyncio.to_thread(started.wait, 5)
        t = threading.Thread(target=lambda: told.append(lane.submit("t")), name="caller")
        t.start()
        while len(lane._queue) < 1:  # the thread's op is queued behind the worker's batch
            await asyncio.sleep(0.001)
        fb = lane.submit_async("b")
        gate.set()
        out = await asyncio.wait_for(asyncio.gather(fa, fb), 5)
        await asyncio.to_thread(t.join, 5)
        return out

    assert asyncio.run(main()) == ["ra", "rb"] and told == ["rt"]
    assert [(who.split("_")[0], ops) for who, ops in ran] == [
        ("ledger-lane", ["a"]), ("caller", ["t"]), ("ledger-lane", ["b"])]
    _wait_idle(lane)


class _NoThreads:
    """A ThreadPoolExecutor that cannot start its thread (out of threads, or the interpreter
    shutting down)."""

    def __init__(self, *_a: Any, **_kw: Any) -> None:
        pass

    def submit(self, *_a: Any, **_kw: Any) -> Any:
        raise RuntimeError("can't start new thread")


def test_without_a_worker_thread_the_lane_is_led_where_it_stands(monkeypatch) -> None:
    """No thread to be had for the lane's worker: the op is not left queued with the lane
    marked busy and nobody leading (which would stop every later call on the lane); the
    caller at hand leads instead."""
    from sparecycles.ledger import group_commit as ledger_module

    monkeypatch.setattr(ledger_module, "ThreadPoolExecutor", _NoThreads)
    lane = GroupCommit(lambda ops, _afters: [f"r{op}" for op in ops], 8)

    async def one(op: str) -> Any:
        return await lane.submit_async(op)

    assert asyncio.run(one("a")) == "ra"
    done: list[Any] = []
    t = threading.Thread(target=lambda: done.append(lane.submit("t")), daemon=True)
    t.start()
    t.join(5)
    assert done == ["rt"], "the lane was left busy with nobody leading"
    _wait_idle(lane)


def test_a_thread_that_cannot_hand_on_to_the_worker_leads_on(monkeypatch) -> None:
    """A thread leads; a coroutine's op queues behind; no worker thread can be started: the
    thread runs that op too, rather than raise (its own op did commit) and leave the
    coroutine waiting for ever."""
    from sparecycles.ledger import group_commit as ledger_module

    started, gate = threading.Event(), threading.Event()

    def run(ops: list[Any], _afters: list[Any]) -> list[Any]:
        if ops == ["t"]:
            started.set()
            gate.wait(5)
        return [f"r{op}" for op in ops]

    lane = GroupCommit(run, 8)
    monkeypatch.setattr(ledger_module, "ThreadPoolExecutor", _NoThreads)
    told: list[Any] = []

    def caller() -> None:
        try:
            told.append(lane.submit("t"))
        except BaseException as exc:  # the test reports what it was told
            told.append(exc)

    async def main() -> Any:
        t = threading.Thread(target=caller, daemon=True)
        t.start()
        await asyncio.to_thread(started.wait, 5)
        fut = lane.submit_async("c")  # queued behind the thread's batch
        gate.set()
        try:
            return await asyncio.wait_for(fut, 5)
        finally:
            await asyncio.to_thread(t.join, 5)

    assert asyncio.run(main()) == "rc"
    assert told == ["rt"]
    _wait_idle(lane)


def test_coroutines_batches_run_on_their_loop_when_the_database_can_be_written() -> None:
    """SQLite's inline lane: the ops queued by one loop's callbacks at hand share one batch,
    run on that loop's own thread; no worker thread is started, the loop is not woken from
    another thread, and the results come back in order."""
    ran: list[tuple[str, list[Any]]] = []

    def inline(ops: list[Any], _afters: list[Any]) -> list[Any]:
        ran.append((threading.current_thread().name, list(ops)))
        return [f"r{op}" for op in ops]

    lane = GroupCommit(lambda ops, _a: pytest.fail("the worker ran"), 100, inline=inline)

    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *_a, **_k: pytest.fail("woken from a thread")  # type: ignore[method-assign]
        try:
            first = await asyncio.gather(*(lane.submit_async(i) for i in range(5)))
            return [*first, await lane.submit_async("x")]
        finally:
            loop.call_soon_threadsafe = real  # type: ignore[method-assign]

    assert asyncio.run(main()) == ["r0", "r1", "r2", "r3", "r4", "rx"]
    me = threading.current_thread().name
    assert ran == [(me, [0, 1, 2, 3, 4]), (me, ["x"])]
    assert lane._worker is None and lane.inline_batches == 2 and lane.worker_batches == 0
    _wait_idle(lane)


def test_a_batch_that_cannot_run_inline_goes_to_the_worker_in_order() -> None:
    """Busy (None) or failed (raised, rolled back): the batch, and what queued behind it, run
    on the worker thread in their order; the failure's op learns the worker's outcome."""
    tries: list[list[Any]] = []
    ran: list[tuple[str, list[Any]]] = []

    def inline(ops: list[Any], _afters: list[Any]) -> list[Any] | None:
        tries.append(list(ops))
        if ops[0] == "busy":
            return None
        if "bad" in ops:
            raise TxFailed("inline")
        return [f"r{op}" for op in ops]

    def run(ops: list[Any], _afters: list[Any]) -> list[Any]:
        ran.append((threading.current_thread().name.split("_")[0], list(ops)))
        return [Refused(op) if op == "bad" else f"w{op}" for op in ops]

    lane = GroupCommit(run, 100, inline=inline)

    async def idle() -> None:  # the worker has handed the lane back: the next op leads
        while lane.load():
            await asyncio.sleep(0.001)

    async def main() -> list[Any]:
        busy = await asyncio.gather(lane.submit_async("busy"), lane.submit_async("a"))
        await idle()
        bad = await asyncio.gather(lane.submit_async("b"), lane.submit_async("bad"),
                                   return_exceptions=True)
        await idle()
        return [*busy, *bad, await lane.submit_async("c")]

    out = asyncio.run(main())
    assert out[:3] == ["wbusy", "wa", "wb"] and isinstance(out[3], Refused) and out[4] == "rc"
    assert tries == [["busy", "a"], ["b", "bad"], ["c"]]
    assert ran == [("ledger-lane", ["busy", "a"]), ("ledger-lane", ["b", "bad"])]
    _wait_idle(lane)


def test_a_blocking_call_on_the_loop_takes_over_the_inline_lead_it_would_wait_for() -> None:
    """A coroutine's op schedules an inline lead on its loop; before the loop gets to it, code
    on that loop's thread calls the blocking API: waiting for that lead would wait for ever
    (the loop is blocked in the call), so the call leads, and runs both ops in order."""
    ran: list[list[Any]] = []

    def run(ops: list[Any], _afters: list[Any]) -> list[Any]:
        ran.append(list(ops))
        return [f"r{op}" for op in ops]

    lane = GroupCommit(run, 100, inline=run)

    async def main() -> list[Any]:
        fut = lane.submit_async("a")
        done: list[Any] = []
        t = threading.Thread(target=lambda: done.append(lane.submit("b")), daemon=True)
        got = lane.submit("c")  # on the loop's own thread, the inline lead still pending
        t.start()
        t.join(5)
        return [await asyncio.wait_for(fut, 5), got, *done]

    assert asyncio.run(main()) == ["ra", "rc", "rb"]
    assert [op for ops in ran for op in ops] == ["a", "c", "b"]
    _wait_idle(lane)

"""The ledger's group commit: concurrent calls share one database transaction.

A ``Ledger`` keeps one ``GroupCommit`` per lane (``Ledger(lanes=...)``); each runs the ops queued
on it in batches of at most ``ops_max`` through the ledger's ``_apply_batch``. Threads queue with
``submit``/``submit_many`` and wait; coroutines queue with ``submit_async`` and await a future.

On SQLite the coroutines' batches run on the event loop itself (``inline``) when the database
can be written at once: a transaction there is a few hundred microseconds of CPU with no network
round trip, and running it on a worker thread cost more than the transaction (a wake-up of the
thread and one of the loop per transaction, the GIL passed back and forth around every SQLite
call: ~60 ``futex`` calls a job). When it cannot (another thread or process is writing, or the
transaction failed), the batch goes to the lane's worker thread as before, which waits, retries
and reports errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from sparecycles.ledger.engine import Op

if TYPE_CHECKING:
    from sparecycles.store.ledger_queries import LedgerTx

__all__ = ["After", "GroupCommit"]


# Work done inside an op's own transaction once its result is known (the result: its value, or
# the SpareCyclesError it raised): how an admission writes its job row with its hold.
After = Callable[["LedgerTx", Any], None]
# ``run`` without waiting: the results, or None when the database cannot be written at once.
Inline = Callable[[list[Op], list["After | None"]], "list[Any] | None"]


# Turns of the event loop an inline lead lets pass before it runs its batch: the ops that the
# next turn's events queue (other streams' admissions and settlements) join it. One transaction
# per turn cost ~3x the page writes of the worker thread's batches at 256 streams.
inline_wait_turns = 1


class _NotNow(Exception):
    """The inline batch did not run (busy, or failed): its ops go to the lane's worker."""


class _Caller:
    """One caller waiting on its ops: woken when all of them are done, or to lead."""

    __slots__ = ("event", "left", "promoted")

    def __init__(self, ops: int):
        self.event, self.left, self.promoted = threading.Event(), ops, False


class _Pending:
    """One queued op: of a thread waiting (``caller``) or of a coroutine (``future``)."""

    __slots__ = ("after", "caller", "error", "future", "op", "result")

    def __init__(self, op: Op, after: After | None, caller: _Caller | None,
                 future: asyncio.Future[Any] | None = None):  # fmt: skip
        self.op, self.after, self.caller, self.future = op, after, caller, future
        self.result: Any = None
        self.error: BaseException | None = None


def _resolve(done: list[_Pending]) -> None:
    """On the event loop: hand each coroutine its op's result (or the error)."""
    for p in done:
        fut = p.future
        if fut is None or fut.done():
            continue
        if p.error is not None:
            fut.set_exception(p.error)
        elif isinstance(p.result, BaseException):
            fut.set_exception(p.result)
        else:
            fut.set_result(p.result)


class GroupCommit:
    """Commit concurrent calls together: the first caller leads and runs every queued op in one
    transaction, then hands the lead to the next waiter. A single caller pays no wait; under load
    one commit (the expensive part) serves up to ``batch_ops_max`` operations. Safe because
    ``apply`` gives each op in a batch the same result it would have alone, in queue order.
    A caller may queue many ops at once (``Ledger.submit``): they stay in order, and are run in
    as few transactions as fit them, shared with other callers' ops.

    Coroutines queue ops too (``submit_async``) without holding a thread each while they wait:
    when the op at the head of the queue is a coroutine's, the lane's own worker thread leads
    (and hands the lead back to a waiting thread when one is at the head again). With
    ``inline`` (SQLite), the coroutine's event loop leads instead, in a callback after the
    ones at hand (so the ops they queue share the batch), and hands a batch it cannot run now
    to the worker. A thread of that loop that must wait on the lane while such a lead is still
    scheduled takes the lead itself (the loop, blocked in that thread, could not run it)."""

    def __init__(self, run: Callable[[list[Op], list[After | None]], list[Any]], ops_max: int,
                 transient: tuple[type[BaseException], ...] = (), *,
                 inline: Inline | None = None):
        """``run`` applies ops in one transaction; ``transient`` are the errors that mean the
        database is away (every op of the batch learns it, none is retried alone). ``inline``
        (SQLite) applies them without waiting, on the event loop: None when it cannot now."""
        self._run, self._ops_max, self._transient = run, ops_max, transient
        self._inline = inline
        # an inline lead scheduled on this loop and not started yet (a thread of that loop
        # that must wait on the lane takes the lead instead: the loop cannot run it meanwhile)
        self._scheduled: tuple[asyncio.AbstractEventLoop, asyncio.Handle] | None = None
        self.inline_batches = self.worker_batches = 0  # counted, for tests and benchmarks
        self._lock = threading.Lock()
        self._queue: deque[_Pending] = deque()
        self._busy = False
        self._worker: ThreadPoolExecutor | None = None

    def load(self) -> int:
        """Ops queued or running (a hint for choosing a lane; read without the lock)."""
        return len(self._queue) + self._busy

    def submit(self, op: Op, after: After | None = None) -> Any:
        p = self.submit_many([op], [after])[0]
        if isinstance(p, BaseException):
            raise p
        return p

    def submit_many(self, ops: Sequence[Op], afters: Sequence[After | None]) -> list[Any]:
        """Each op's result (its value or the SpareCyclesError it raised), in order; raises
        what made the transaction of one of them fail (a transaction that fails for one op's
        sake is run again op by op, so the others of the list may have committed)."""
        me = _Caller(len(ops))
        mine = [_Pending(op, after, me) for op, after in zip(ops, afters, strict=True)]
        with self._lock:
            self._queue.extend(mine)
            lead = not self._busy
            self._busy = True
            lead = lead or self._take_scheduled(asyncio._get_running_loop())
        if not lead:
            me.event.wait()
            if not me.promoted:
                return self._results(mine)
        while me.left:
            self._run_one_batch(me)
        self._hand_on()
        return self._results(mine)

    def submit_async(self, op: Op, after: After | None = None) -> asyncio.Future[Any]:
        """Queue ``op`` from a coroutine; the future is done when its transaction is."""
        loop = asyncio.get_running_loop()
        p = _Pending(op, after, None, loop.create_future())
        with self._lock:
            self._queue.append(p)
            lead = not self._busy or self._take_scheduled(None)
            self._busy = True
            if lead and self._inline is not None:  # after the callbacks at hand: their ops join
                self._scheduled = (loop, loop.call_soon(self._lead_inline))
        if lead and self._inline is None:
            self._start_worker()
        return p.future  # type: ignore[return-value]

    def _take_scheduled(self, running: asyncio.AbstractEventLoop | None) -> bool:
        """(Under the lock.) Take over an inline lead that is scheduled but cannot start: its
        loop is this thread's, about to block waiting on the lane, or it was closed first."""
        sched = self._scheduled
        if sched is None or not (sched[0] is running or sched[0].is_closed()):
            return False
        sched[1].cancel()
        self._scheduled = None
        return True

    def _lead_inline(self, turns_left: int = inline_wait_turns) -> None:
        """On the event loop, as leader: after ``inline_wait_turns`` more turns of the loop (the
        ops queued meanwhile join the batch), run batches while a coroutine's op is at the head,
        each without waiting; the first that cannot run now goes, with the rest, to the worker."""
        with self._lock:
            if turns_left > 0 and self._scheduled is not None:
                loop = self._scheduled[0]
                self._scheduled = (loop, loop.call_soon(self._lead_inline, turns_left - 1))
                return
            self._scheduled = None
        while True:
            with self._lock:
                head = self._queue[0] if self._queue else None
            if head is None or head.caller is not None:
                break
            if not self._run_one_batch(None, inline=True):
                self._start_worker()
                return
        self._hand_on()

    def _start_worker(self) -> None:
        """Give the lead to the lane's worker thread. When no thread can be had (the process
        is out of threads, or the interpreter is shutting down) the caller at hand leads: the
        lane is busy, so left without a leader it would stop every later call on it."""
        try:
            if self._worker is None:
                self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-lane")
            self._worker.submit(self._lead_for_coroutines)
        except RuntimeError:
            # A failed thread start leaves the task queued in that executor: never use it again
            # (were its thread to start later, the task would lead beside whoever leads then).
            self._worker = None
            self._lead_for_coroutines()

    def _lead_for_coroutines(self) -> None:
        """The worker's turn as leader: run batches while a coroutine's op is at the head."""
        while True:
            with self._lock:
                head = self._queue[0] if self._queue else None
            if head is None or head.caller is not None:
                break
            self._run_one_batch(None)
        self._hand_on()

    def _run_one_batch(self, me: _Caller | None, *, inline: bool = False) -> bool:
        """Run the next batch; False (inline only) when it did not run and is queued again."""
        with self._lock:
            batch = [self._queue.popleft() for _ in range(min(self._ops_max, len(self._queue)))]
        if inline:
            try:
                results = self._inline([p.op for p in batch], [p.after for p in batch])  # type: ignore[misc]
                if results is None:
                    raise _NotNow
            except Exception:  # busy, or failed (rolled back): the worker runs it as ever
                with self._lock:
                    self._queue.extendleft(reversed(batch))
                return False
            for p, r in zip(batch, results, strict=True):
                p.result = r
            self.inline_batches += 1
            self._tell(batch, me)
            return True
        self.worker_batches += 1
        try:
            results = self._run([p.op for p in batch], [p.after for p in batch])
            for p, r in zip(batch, results, strict=True):
                p.result = r
        except Exception as exc:
            if len(batch) == 1 or isinstance(exc, self._transient):
                for p in batch:  # the database is away (its retries are spent): all learn why
                    p.error = exc
            else:  # one op broke the transaction: run each alone, so it costs only itself
                for p in batch:
                    try:
                        p.result = self._run([p.op], [p.after])[0]
                    except Exception as alone:
                        p.error = alone
        except BaseException as exc:  # KeyboardInterrupt, SystemExit: every op learns why
            for p in batch:
                p.error = exc
        self._tell(batch, me)
        return True

    @staticmethod
    def _tell(batch: list[_Pending], me: _Caller | None) -> None:
        """Wake the batch's waiting threads, and resolve its coroutines' futures: at once on
        the running loop, else one wake-up of each loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[_Pending]] = {}
        for p in batch:
            if p.caller is None:
                fut = p.future
                if fut is not None:
                    by_loop.setdefault(fut.get_loop(), []).append(p)
                continue
            p.caller.left -= 1
            if not p.caller.left and p.caller is not me:
                p.caller.event.set()
        running = asyncio._get_running_loop()
        for loop, done in by_loop.items():  # one wake-up of each loop per transaction
            if loop is running:
                _resolve(done)
                continue
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(_resolve, done)

    def _hand_on(self) -> None:
        """The leader is done: the lead goes to the op at the head of the queue, if any."""
        with self._lock:
            if not self._queue:
                self._busy = False
                return
            head = self._queue[0]
            if head.caller is not None:
                head.caller.promoted = True
                head.caller.event.set()
                return
            loop = asyncio._get_running_loop()  # a thread leader on an event loop's thread
            if (self._inline is not None and head.future is not None
                    and head.future.get_loop() is loop and loop is not None):
                self._scheduled = (loop, loop.call_soon(self._lead_inline))
                return
        self._start_worker()  # another loop's op: that loop's thread may be waiting on the lane

    @staticmethod
    def _results(mine: list[_Pending]) -> list[Any]:
        for p in mine:
            if p.error is not None:
                raise p.error
        return [p.result for p in mine]

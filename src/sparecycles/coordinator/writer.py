"""The coordinator's store writer: the writes after admission, in one ordered queue.

Dispatch never waits on the database while tokens stream. Metering writes (an attempt's start
and end) are queued without waiting (``background``); a job's settlement is queued in its place
(``queue``) and awaited by whoever tells the client. So an attempt's row is written before its
end, and every metering write of a job before its settlement. The writer applies a round at a
time (what queued together, see ``StoreWriter._loop``) and waits out a database outage for up
to ``store_retry_s`` (``apply``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sparecycles.errors import InvariantViolation
from sparecycles.store import Store
from sparecycles.store.errors import DuplicateKey, transient_store_errors

log = logging.getLogger(__name__)

store_retry_s = 120.0  # how long writes after admission wait out a database outage
write_batch_max = 256  # background writes committed together at most


@dataclass(slots=True)
class Write:
    fn: Callable[[], Any]
    future: asyncio.Future[Any] | None  # None: nobody waits for it (a metering write)
    store_method: bool = False  # a write method of the writer's store (may run on the loop)

    def tell(self, outcome: Any) -> bool:
        """Give the waiter its outcome (a result, or an exception to raise); False when nobody
        waits for it (any more)."""
        if self.future is None or self.future.done():
            return False
        if isinstance(outcome, BaseException):
            self.future.set_exception(outcome)
        else:
            self.future.set_result(outcome)
        return True


class StoreWriter:
    """One coordinator's queue of store writes after admission, and the task applying it."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._writes: asyncio.Queue[Write] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="dispatch-writer")

    @property
    def started(self) -> bool:
        return self._task is not None

    @property
    def idle(self) -> bool:
        """Nothing queued (a write may still be running)."""
        return self._writes.empty()

    async def drain(self) -> None:
        """Return once everything queued before this call has landed."""
        if self._task is not None:
            await self.write(lambda: None)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def background(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Queue a store write without waiting for it (metering updates)."""
        own = getattr(fn, "__self__", None) is self.store
        self._writes.put_nowait(Write(lambda: fn(*args, **kwargs), None, own))

    def queue(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        """Queue a store write after all earlier ones, now; the future gives its result. ``fn``
        runs on a worker thread, or is awaited if it is a coroutine function."""
        if self._task is None:  # not started (unit tests driving parts directly)
            return asyncio.ensure_future(call(fn))
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._writes.put_nowait(Write(fn, fut))
        return fut

    async def write(self, fn: Callable[[], Any]) -> Any:
        """Queue a store write after all earlier ones and wait for its result."""
        return await self.queue(fn)

    async def apply(self, fn: Callable[[], Any], *, landed_if_duplicate: bool = True) -> Any:
        """Run a store write, retrying while the database is away (PostgreSQL restarting) for
        up to ``store_retry_s``: writes after admission are metering and settlements, which must
        not be lost to a short outage. Every one is idempotent (settlements by transfer id), and
        a retried insert that had in fact landed is recognised by its key (for one write; a
        batch's duplicate may be any one of its writes, so a batch raises instead)."""
        delay_s, deadline = 0.2, time.monotonic() + store_retry_s
        retried = False
        while True:
            try:
                return await call(fn)
            except DuplicateKey:
                if retried and landed_if_duplicate:
                    return None  # the earlier try committed before its connection dropped
                raise
            except transient_store_errors as exc:
                if time.monotonic() + delay_s > deadline:
                    raise
                log.warning("store write failed (%s); retrying in %.1f s",
                            str(exc).splitlines()[0][:120], delay_s)
                await asyncio.sleep(delay_s)
                delay_s, retried = min(2 * delay_s, 2.0), True

    async def _loop(self) -> None:
        """Apply queued writes, a round at a time: what queued up together. The round's
        background (metering) writes commit first, as one transaction (``Store.write_batch``);
        then the writes someone waits for (settlements) run side by side, so the ledger's group
        commit settles them in one transaction too, and each waiter learns its result when the
        whole round is done (a drain marker thus means what was queued before it has landed).
        A job's attempt writes are queued before its settlement, so they land before it; a
        background write queued after a settlement may land first (they touch other rows)."""
        while True:
            todo = [await self._writes.get()]
            while not self._writes.empty() and len(todo) < write_batch_max:
                todo.append(self._writes.get_nowait())
            background = [w for w in todo if w.future is None]
            waited = [w for w in todo if w.future is not None]
            if len(background) > 1:
                await self.run_batch(background)
            elif background:
                await self.run_write(background[0])
            if waited:
                results = await asyncio.gather(*(self.apply(w.fn) for w in waited),
                                               return_exceptions=True)
                for w, result in zip(waited, results, strict=True):
                    w.tell(result)

    def _inline(self, batch: list[Write]) -> bool:
        """On SQLite, background writes of the store's own write methods run here on the event
        loop, in one transaction, when the database can be written at once (``Store.
        write_batch(wait=False)``): a hand-off to a worker thread and back cost more than the
        writes. False when they did not (another callable, busy, or they failed and were rolled
        back): nothing was written, and they go the usual way, on a worker thread."""
        if not self.store.inline_writes or not all(w.store_method for w in batch):
            return False
        try:
            results = self.store.write_batch([w.fn for w in batch], wait=False)
        except Exception:
            return False
        for r in results:
            if inspect.isawaitable(r):
                if inspect.iscoroutine(r):
                    r.close()
                raise InvariantViolation("a store write returned an awaitable: pass an async def")
        return True

    async def run_batch(self, batch: list[Write]) -> None:
        if self._inline(batch):
            return
        fns = [w.fn for w in batch]
        try:
            await self.apply(lambda: self.store.write_batch(fns), landed_if_duplicate=False)
        except transient_store_errors as exc:  # the outage outlasted store_retry_s: as alone
            log.error("%d store writes lost to a database outage", len(batch), exc_info=exc)
        except Exception as exc:  # one by one, in order: one bad write costs only itself
            log.warning("%d store writes failed together (%s); one by one", len(batch),
                        str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__)
            for w in batch:
                await self.run_write(w)

    async def run_write(self, w: Write) -> None:
        if w.future is None and self._inline([w]):
            return
        try:
            outcome = await self.apply(w.fn)
        except Exception as exc:
            outcome = exc
        if not w.tell(outcome) and isinstance(outcome, Exception):
            log.error("store write failed", exc_info=outcome)


async def call(fn: Callable[[], Any]) -> Any:
    """Await a coroutine function; run a plain one on a worker thread. A plain function that
    returns a coroutine (``lambda: ledger.settle_async(...)``) is a bug that would skip the
    write: refused loudly."""
    if inspect.iscoroutinefunction(fn):
        return await fn()
    result = await asyncio.to_thread(fn)
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()
        raise InvariantViolation("a store write returned an awaitable: pass an async def")
    return result

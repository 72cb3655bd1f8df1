"""Messages between coordinator replicas: one small interface, two implementations.

``memory``  the default for one machine: subjects are matched inside this process, so a single
            coordinator (or several in one test process) needs no broker.
``nats://`` core NATS, for replicas on several machines sharing one PostgreSQL database.
            A path names the network's subject namespace (``nats://nats:4222/prod``; default
            ``sc``), so several networks can share one NATS server without hearing each other.

Subjects follow NATS's rules: dot-separated tokens, ``*`` matches one token and ``>`` the rest.
Delivery is at most once and in order per publisher and subject, which is all replicas need:
nothing on the bus must survive a restart, because every durable fact (jobs, attempts, money)
lives in the database, and a lost message shows up as a gap or a silence that the job protocol
already recovers from (an attempt's tokens carry their index; a silent attempt is resumed).
So the bus uses core NATS, not JetStream; see docs/architecture.md ("Several replicas").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger("sparecycles.coordinator.replication.bus")

Handler = Callable[[str, bytes], Awaitable[None]]


class Subscription(Protocol):
    async def unsubscribe(self) -> None: ...


class Bus(Protocol):
    """What a replica needs from a message bus."""

    url: str
    namespace: str  # the first token of every subject this network uses

    @property
    def connected(self) -> bool: ...

    async def connect(self) -> None: ...

    async def publish(self, subject: str, data: bytes) -> None: ...

    async def subscribe(self, subject: str, handler: Handler) -> Subscription: ...

    async def close(self) -> None: ...


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, a final ``>`` is one or more tokens."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return i == len(p) - 1 and len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


def check_subject(subject: str, *, pattern: bool = False) -> str:
    tokens = subject.split(".")
    if not subject or any(not t or any(c.isspace() for c in t) for t in tokens):
        raise ValueError(f"invalid bus subject {subject!r}")
    if not pattern and any(t in ("*", ">") for t in tokens):
        raise ValueError(f"a published subject may not hold wildcards: {subject!r}")
    return subject


# ---- in-process ----------------------------------------------------------------------------


@dataclass(eq=False)
class _MemorySub:
    bus: MemoryBus
    pattern: str
    handler: Handler
    queue: asyncio.Queue[tuple[str, bytes] | None] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while (item := await self.queue.get()) is not None:
            try:
                await self.handler(*item)
            except Exception:  # one bad handler must not stop delivery to the others
                log.exception("bus handler for %s failed", self.pattern)

    async def unsubscribe(self) -> None:
        with contextlib.suppress(ValueError):
            self.bus._subs.remove(self)
        self.queue.put_nowait(None)
        if self.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


class MemoryBus:
    """Subjects matched in this process; each subscription's handler runs in order on its own
    task, as a NATS subscription's does. Several coordinators in one process may share one, or
    each take a ``connection`` of it: closing a connection ends its own subscriptions only, as
    one replica's going away leaves the others' NATS connections alone."""

    def __init__(self, url: str = "memory", namespace: str = "sc") -> None:
        self.url, self.namespace = url, namespace
        self._subs: list[_MemorySub] = []  # every subscription on this bus, any connection's
        self._mine: list[_MemorySub] = []  # those made through this object
        self._open = False

    def connection(self) -> MemoryBus:
        """Another client of the same subjects."""
        other = MemoryBus(self.url, self.namespace)
        other._subs = self._subs
        return other

    @property
    def connected(self) -> bool:
        return self._open

    async def connect(self) -> None:
        self._open = True

    async def publish(self, subject: str, data: bytes) -> None:
        check_subject(subject)
        for sub in list(self._subs):
            if subject_matches(sub.pattern, subject):
                sub.queue.put_nowait((subject, data))

    async def subscribe(self, subject: str, handler: Handler) -> Subscription:
        sub = _MemorySub(self, check_subject(subject, pattern=True), handler)
        sub.task = asyncio.create_task(sub._run(), name=f"bus-sub-{subject}")
        self._subs.append(sub)
        self._mine.append(sub)
        return sub

    async def close(self) -> None:
        for sub in self._mine:
            await sub.unsubscribe()
        self._mine = []
        self._open = False


# ---- NATS ----------------------------------------------------------------------------------


class NatsBus:
    """Core NATS through nats-py: reconnects forever, buffering what is published meanwhile."""

    def __init__(self, url: str, *, name: str = "sparecycles") -> None:
        self.url, self.name = url, name
        self.servers, self.namespace = parse_nats_url(url)
        self._nc: Any = None

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def connect(self) -> None:
        import nats  # the optional dependency of several replicas: imported only when asked for

        async def _disconnected() -> None:
            log.warning("bus: disconnected from %s", self.url)

        async def _reconnected() -> None:
            log.warning("bus: reconnected to %s", self.url)

        async def _error(exc: Exception) -> None:
            log.warning("bus: %s", exc)

        self._nc = await nats.connect(
            servers=self.servers,
            name=self.name,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            connect_timeout=5,
            allow_reconnect=True,
            disconnected_cb=_disconnected,
            reconnected_cb=_reconnected,
            error_cb=_error,
        )

    async def publish(self, subject: str, data: bytes) -> None:
        await self._nc.publish(check_subject(subject), data)

    async def subscribe(self, subject: str, handler: Handler) -> Subscription:
        async def _deliver(msg: Any) -> None:
            try:
                await handler(msg.subject, msg.data)
            except Exception:
                log.exception("bus handler for %s failed", subject)

        return await self._nc.subscribe(check_subject(subject, pattern=True), cb=_deliver,
                                        pending_msgs_limit=1_000_000,
                                        pending_bytes_limit=512 * 1024 * 1024)

    async def close(self) -> None:
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.drain()
            self._nc = None


def parse_nats_url(url: str) -> tuple[list[str], str]:
    """``nats://a:4222,nats://b:4222/prod`` -> (["nats://a:4222", "nats://b:4222"], "prod")."""
    servers, namespace = [], "sc"
    for part in (u.strip() for u in url.split(",")):
        scheme, _, rest = part.partition("://")
        host, _, path = rest.partition("/")
        if path.strip("/"):
            namespace = path.strip("/")
        servers.append(f"{scheme}://{host}")
    check_subject(namespace)
    if "." in namespace:
        raise ValueError(f"the bus namespace must be one subject token, got {namespace!r}")
    return servers, namespace


def open_bus(url: str, *, name: str = "sparecycles") -> Bus:
    """The bus a URL names: ``memory`` or ``nats://host:port[,nats://...]``."""
    if url in ("", "memory"):
        return MemoryBus()
    if url.startswith(("nats://", "tls://")):
        return NatsBus(url, name=name)
    raise ValueError(f"unknown bus {url!r}: use 'memory' or nats://host:4222")

"""The NATS bus against the real server (127.0.0.1:4222, started by .ci/run): the same behaviour
as the in-process bus, which the fleet's unit tests use."""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest

from sparecycles.coordinator.replication.bus import MemoryBus, NatsBus, open_bus, parse_nats_url

NATS_URL = os.environ.get("SPARECYCLES_TEST_NATS", "nats://127.0.0.1:4222")


def test_urls_name_servers_and_a_namespace() -> None:
    assert parse_nats_url("nats://a:4222,nats://b:4222/prod") == (
        ["nats://a:4222", "nats://b:4222"], "prod")
    assert parse_nats_url("nats://127.0.0.1:4222") == (["nats://127.0.0.1:4222"], "sc")
    with pytest.raises(ValueError):
        parse_nats_url("nats://a:4222/two.tokens")
    assert isinstance(open_bus("memory"), MemoryBus)
    with pytest.raises(ValueError):
        open_bus("kafka://x")


@pytest.mark.parametrize("kind", ["memory", "nats"])
async def test_wildcards_order_and_isolation(kind: str) -> None:
    ns = f"t{uuid.uuid4().hex[:8]}"
    bus = MemoryBus(namespace=ns) if kind == "memory" else NatsBus(f"{NATS_URL}/{ns}")
    await bus.connect()
    assert bus.connected and bus.namespace == ns
    got: list[tuple[str, bytes]] = []
    done = asyncio.Event()

    async def handler(subject: str, data: bytes) -> None:
        got.append((subject, data))
        if len(got) == 101:
            done.set()

    sub = await bus.subscribe(f"{ns}.fleet.*", handler)
    await bus.publish(f"{ns}.fleet.beat.extra", b"not matched: one token too many")
    await bus.publish(f"{ns}x.fleet.beat", b"another namespace")
    for i in range(100):
        await bus.publish(f"{ns}.fleet.beat", str(i).encode())
    await bus.publish(f"{ns}.fleet.up", b"last")
    async with asyncio.timeout(10):
        await done.wait()
    assert [d for _s, d in got[:100]] == [str(i).encode() for i in range(100)]  # in order
    assert got[100] == (f"{ns}.fleet.up", b"last")
    await sub.unsubscribe()
    await bus.close()

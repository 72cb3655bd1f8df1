"""The node agent merges the updates of a job that queued up while it was busy into one tokens
message, never across an error, and never waits for more when nothing is queued."""

from __future__ import annotations

import asyncio

from sparecycles.node.agent import _coalesced
from sparecycles.node.backends.base import GenerationUpdate
from sparecycles.types import FinishReason


def _queue(*updates: GenerationUpdate) -> asyncio.Queue[GenerationUpdate]:
    q: asyncio.Queue[GenerationUpdate] = asyncio.Queue()
    for u in updates:
        q.put_nowait(u)
    return q


def test_queued_tokens_go_as_one_update_and_keep_their_order() -> None:
    async def run() -> None:
        q = _queue(GenerationUpdate("r", (1,), (-0.1,)),
                   GenerationUpdate("r", (2, 3), (-0.2, -0.3)),
                   GenerationUpdate("r", (4,), (-0.4,), finished=True,
                                    finish_reason=FinishReason.LENGTH))
        update, carry = await _coalesced(q, None)
        assert update.token_ids == (1, 2, 3, 4) and update.logprobs == (-0.1, -0.2, -0.3, -0.4)
        assert update.finished and update.finish_reason == FinishReason.LENGTH and carry is None
        assert q.empty()

    asyncio.run(run())


def test_an_error_is_not_merged_the_tokens_before_it_go_first() -> None:
    async def run() -> None:
        q = _queue(GenerationUpdate("r", (1,)), GenerationUpdate("r", (2,)),
                   GenerationUpdate("r", error="out of memory"), GenerationUpdate("r", (9,)))
        update, carry = await _coalesced(q, None)
        assert update.token_ids == (1, 2) and update.error is None
        assert carry is not None and carry.error == "out of memory"
        again, none = await _coalesced(q, carry)
        assert again is carry and none is None and q.qsize() == 1  # not merged past the error

    asyncio.run(run())


def test_an_update_alone_goes_at_once() -> None:
    async def run() -> None:
        q = _queue(GenerationUpdate("r", (5,)))
        update, carry = await asyncio.wait_for(_coalesced(q, None), 1)
        assert update.token_ids == (5,) and carry is None

    asyncio.run(run())

"""The node agent merges the updates of a job that queued up while it was busy into one tokens
message, never across an error, and never waits for more when nothing is queued."""

from __future__ import annotations

import asyncio
import time

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


def test_tokens_arriving_within_the_stream_interval_are_held_and_merged() -> None:
    async def run() -> None:
        q: asyncio.Queue[GenerationUpdate] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        q.put_nowait(GenerationUpdate("r", (1,)))
        loop.call_later(0.02, q.put_nowait, GenerationUpdate("r", (2,)))
        loop.call_later(0.04, q.put_nowait, GenerationUpdate("r", (3,)))
        loop.call_later(0.30, q.put_nowait, GenerationUpdate("r", (4,)))
        t0 = time.monotonic()
        update, _ = await _coalesced(q, None, t0 + 0.15)
        assert update.token_ids == (1, 2, 3)  # held until the interval ended, then sent
        assert 0.14 <= time.monotonic() - t0 < 0.29
        last, _ = await _coalesced(q, None, 0.0)  # nothing to hold for: the next one as it comes
        assert last.token_ids == (4,)

    asyncio.run(run())


def test_the_end_of_a_job_is_never_held_back() -> None:
    async def run() -> None:
        q = _queue(GenerationUpdate("r", (1,)),
                   GenerationUpdate("r", (), finished=True, finish_reason=FinishReason.STOP))
        t0 = time.monotonic()
        update, _ = await _coalesced(q, None, t0 + 5.0)
        assert update.finished and update.token_ids == (1,) and time.monotonic() - t0 < 1.0

    asyncio.run(run())


def test_the_end_of_a_job_keeps_the_logprobs_of_the_tokens_before_it() -> None:
    """Verification needs a log-probability for every token a job that asked for them sends:
    the last update (no tokens, no logprobs) must not wipe those merged before it."""
    async def run() -> None:
        q = _queue(GenerationUpdate("r", (1,), (-0.5,)), GenerationUpdate("r", (2,), (-0.25,)),
                   GenerationUpdate("r", (), None, finished=True,
                                    finish_reason=FinishReason.STOP))
        update, _ = await _coalesced(q, None)
        assert update.token_ids == (1, 2) and update.logprobs == (-0.5, -0.25)
        assert update.finished

    asyncio.run(run())


def test_a_failure_while_forwarding_hands_the_job_back_at_once() -> None:
    """An exception in the agent's own forwarding (here: building the signed report) ends the
    attempt with a job_error, so the coordinator resumes the job now rather than waiting for
    the node to be silent for token_gap_s (the task used to die unseen)."""
    from sparecycles import protocol
    from sparecycles.node.agent import NodeAgent, _Running

    class _Engine:
        def __init__(self) -> None:
            self.cancelled: list[str] = []

        def cancel(self, request_id: str) -> None:
            self.cancelled.append(request_id)

    def broken_report(*_args: object) -> protocol.Done:
        raise TypeError("a bug")

    async def run() -> None:
        agent = object.__new__(NodeAgent)
        agent.running = {}
        agent.stream_interval_s = 0.0
        agent._report = broken_report  # type: ignore[method-assign]
        job = protocol.JobAssign(job_id="j1", attempt=1, model="m", prompt_token_ids=[1, 2],
                                 sampling=protocol.Sampling(max_tokens=4), prompt_sha256="x")
        run_ = _Running(job, _queue(GenerationUpdate("j1:1", (5,), finished=True,
                                                     finish_reason=FinishReason.LENGTH)),
                        started_s=time.monotonic(), busy_start_s=0.0, tokens_start=0)
        agent.running["j1"] = run_
        sent: list[object] = []

        async def send(msg: object) -> None:
            sent.append(msg)

        engine = _Engine()
        await agent._forward(engine, run_, send)  # type: ignore[arg-type]
        assert [type(m).__name__ for m in sent] == ["Tokens", "JobError"]
        assert engine.cancelled == ["j1:1"] and "j1" not in agent.running

    asyncio.run(run())

"""The node's side of chains: ``stage_forward`` and ``stage_release`` messages, answered.

A node that holds a range of a model's layers (``sparecycles node --layers``) gets chain work as
``stage_forward`` messages: the inputs of some new positions of one sequence. This worker checks
the activation it was sent (shape, dtype, size, finite values) and queues the step; the stage's
one worker thread takes every step waiting when it is free and runs them through the engine at
once (``StageEngine.run``: the decode steps of different chains in one forward pass), then each
step is answered ``stage_output`` with its hidden states (or the last stage's token). Steps that
arrive while a pass runs wait for the next one, which is how chains stepping at about the same
time come to share passes. A bad input ends that step with an error answer; it never stops the
node, nor the other steps of its pass.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from sparecycles import limits, protocol
from sparecycles.node.backends.transformers_stage import (
    StageEngine,
    StageResult,
    StageScoreAsk,
    StageStep,
)
from sparecycles.types import SamplingParams

log = logging.getLogger("sparecycles.node.stages")

_torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_wire_dtype = {v: k for k, v in _torch_dtype.items()}


def to_activation(hidden: torch.Tensor) -> protocol.Activation:
    """A (positions x hidden) tensor as the wire carries it."""
    t = hidden.detach().to("cpu").contiguous()
    name = _wire_dtype.get(t.dtype)
    if name is None:
        t, name = t.float(), "float32"
    raw = t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else (
        t.numpy().tobytes())
    return protocol.Activation(dtype=name, shape=(int(t.shape[0]), int(t.shape[1])),  # type: ignore[arg-type]
                               data=protocol.b64(raw))


def from_activation(act: protocol.Activation) -> torch.Tensor:
    """The tensor an activation carries (its sizes were checked when the message was decoded)."""
    raw = bytearray(act.raw())
    rows, cols = act.shape
    return torch.frombuffer(raw, dtype=_torch_dtype[act.dtype]).reshape(rows, cols)


Send = Callable[[Any], Awaitable[None]]
_score_fields = ("logprobs", "top_logprobs", "mass_above", "expected_logprobs", "logprob_vars")


# Steps queued for one stage and not yet taken by its thread: at most one per open sequence in
# a well-behaved chain (the coordinator awaits each answer), bounded all the same.
steps_waiting_max = limits.engine_queue_max
# A pass's answers reach the next stage one by one (each through the coordinator), and the first
# would start a pass alone there, splitting the chains into passes of one that each read all the
# stage's weights. So when sequences that are decoding here have no step waiting yet, the thread
# waits for them: at most gather_share times the last decode pass (they may be in a pass of the
# stage before, about as long), and never over gather_wait_s_max. Those that do not come in time
# are left out and not waited for again until they share a pass with others (a chain stalled by
# a repair elsewhere, or stages of unequal speed, costs one wait, not one per step).
gather_share = 1.5
gather_wait_s_max = 1.0


@dataclass(slots=True)
class _Waiting:
    step: StageStep
    answer: asyncio.Future[StageResult]
    loop: asyncio.AbstractEventLoop


@dataclass
class StageWorker:
    stages: dict[str, StageEngine]  # model name -> the stage of it this node holds
    gather_share: float = gather_share
    gather_wait_s_max: float = gather_wait_s_max
    _threads: dict[str, concurrent.futures.ThreadPoolExecutor] = field(default_factory=dict)
    _waiting: dict[str, list[_Waiting]] = field(default_factory=dict)  # by model, in arrival order
    # sequences whose release has arrived and not yet run: a pass does not wait for their steps
    _releasing: dict[str, set[str]] = field(default_factory=dict)  # by model
    _arrived: threading.Condition = field(default_factory=threading.Condition)  # guards both
    _sweeper: asyncio.Task[None] | None = None

    def offers(self) -> list[protocol.ModelOffer]:
        return [protocol.ModelOffer(name=n, weights_sha256=s.layers_sha256,
                                    layers=(s.first, s.end)) for n, s in self.stages.items()]

    def _thread(self, model: str) -> concurrent.futures.ThreadPoolExecutor:
        if model not in self._threads:  # one thread per stage: its calls run in order
            self._threads[model] = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"stage:{model}")
        return self._threads[model]

    async def handle(self, msg: protocol.StageForward | protocol.StageRelease, send: Send, *,
                     refuse: bool = False) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        engine = self.stages.get(msg.model)
        loop = asyncio.get_running_loop()
        if isinstance(msg, protocol.StageRelease):
            if engine is not None:
                with self._arrived:
                    self._releasing.setdefault(msg.model, set()).add(msg.sequence_id)
                    self._arrived.notify_all()
                await loop.run_in_executor(self._thread(msg.model), self._release, msg.model,
                                           engine, msg.sequence_id)
            return
        try:
            if engine is None or refuse:
                raise ValueError("node draining" if refuse else f"no stage of {msg.model} here")
            hidden = from_activation(msg.hidden) if msg.hidden is not None else None
            choose = None
            if msg.choose is not None:
                c = msg.choose
                choose = SamplingParams(max_tokens=c.max_tokens, temperature=c.temperature,
                                        top_p=c.top_p, seed=c.seed)
            score = None if msg.score is None else StageScoreAsk(
                msg.score.offset, tuple(msg.score.targets), msg.score.temperature,
                msg.score.top_p)
            step = StageStep(msg.sequence_id, msg.start, msg.token_ids, hidden, choose, score)
            answer: asyncio.Future[StageResult] = loop.create_future()
            with self._arrived:
                queue = self._waiting.setdefault(msg.model, [])
                if len(queue) >= steps_waiting_max:
                    raise ValueError(f"{len(queue)} steps already wait for this stage")
                queue.append(_Waiting(step, answer, loop))
                self._arrived.notify_all()
            # Each step asks the thread for one pass; a pass takes every step waiting, so a
            # step an earlier pass served finds its answer ready and its own pass takes nothing.
            await loop.run_in_executor(self._thread(msg.model), self._pass, msg.model, engine)
            result = await answer
        except Exception as exc:  # a bad input or an engine error: this step fails, not the node
            log.warning("stage %s step %d failed: %s", msg.sequence_id, msg.step, exc)
            await send(protocol.StageOutput(sequence_id=msg.sequence_id, step=msg.step,
                                            error=f"{exc}"[:2000] or type(exc).__name__))
            return
        await send(protocol.StageOutput(
            sequence_id=msg.sequence_id, step=msg.step,
            hidden=to_activation(result.hidden) if result.hidden is not None else None,
            token=result.token, eos=result.eos, busy_s=min(result.busy_s,
                                                            limits.stage_step_s_max * 10),
            scores=None if result.scores is None else protocol.StageScores(
                **{k: list(v) for k, v in zip(_score_fields, result.scores, strict=True)})))

    def _pass(self, model: str, engine: StageEngine) -> None:
        """On the stage's thread: run every step waiting for ``model`` and settle each answer
        (waiting first, briefly, for the companions of the decode steps waiting)."""
        deadline: float | None = None
        with self._arrived:
            while True:
                taken = self._waiting.get(model, [])
                if not taken:
                    return
                releasing = self._releasing.get(model, set())
                missing = [k for k in engine.expected([w.step.sequence_id for w in taken])
                           if k not in releasing]
                now = time.monotonic()
                if deadline is None:
                    deadline = now + min(self.gather_wait_s_max,
                                         self.gather_share * engine.last_decode_pass_s)
                if not missing:
                    break
                if now >= deadline:
                    engine.mark_late(missing)
                    break
                self._arrived.wait(deadline - now)
            self._waiting[model] = []
        try:
            outcomes: list[StageResult | Exception] = list(
                engine.run([w.step for w in taken]))
        except Exception as exc:  # a bug in the engine: every step taken fails, the node goes on
            log.exception("stage %s: a pass of %d steps failed", model, len(taken))
            outcomes = [exc] * len(taken)
        for w, outcome in zip(taken, outcomes, strict=True):
            w.loop.call_soon_threadsafe(_settle, w.answer, outcome)

    def _release(self, model: str, engine: StageEngine, sequence_id: str) -> None:
        engine.release(sequence_id)
        with self._arrived:
            self._releasing.get(model, set()).discard(sequence_id)

    async def _sweep(self) -> None:
        """Drop caches a coordinator forgot (it restarted, or lost this node's socket)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(limits.stage_idle_s_max / 10)
            for model, engine in self.stages.items():
                await loop.run_in_executor(self._thread(model), engine.release_idle,
                                           limits.stage_idle_s_max)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for pool in self._threads.values():
            pool.shutdown(wait=False, cancel_futures=True)
        for model, engine in self.stages.items():
            log.info("stage %s %d:%d: decode passes by the steps each ran: %s", model,
                     engine.first, engine.end, dict(sorted(engine.batch_size_hist.items())))
            engine.close()


def _settle(answer: asyncio.Future[StageResult], outcome: StageResult | Exception) -> None:
    if answer.done():  # its handler was cancelled (the node is stopping)
        return
    if isinstance(outcome, Exception):
        answer.set_exception(outcome)
    else:
        answer.set_result(outcome)

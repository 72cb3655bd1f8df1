"""The node's side of chains: ``stage_forward`` and ``stage_release`` messages, answered.

A node that holds a range of a model's layers (``sparecycles node --layers``) gets chain work as
``stage_forward`` messages: the inputs of some new positions of one sequence. This worker checks
the activation it was sent (shape, dtype, size, finite values), runs it through the stage engine
on the engine's one worker thread, and answers ``stage_output`` with the hidden states (or the
last stage's token). A bad input ends that step with an error answer; it never stops the node.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from sparecycles import limits, protocol
from sparecycles.node.backends.transformers_stage import StageEngine, StageScoreAsk
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


@dataclass
class StageWorker:
    stages: dict[str, StageEngine]  # model name -> the stage of it this node holds
    _threads: dict[str, concurrent.futures.ThreadPoolExecutor] = field(default_factory=dict)
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
                await loop.run_in_executor(self._thread(msg.model), engine.release,
                                           msg.sequence_id)
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
            result = await loop.run_in_executor(
                self._thread(msg.model), lambda: engine.forward(
                    msg.sequence_id, msg.start, token_ids=msg.token_ids, hidden=hidden,
                    choose=choose, score=score))
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
        for engine in self.stages.values():
            engine.close()

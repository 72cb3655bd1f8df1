"""Verification work on a verifier node's socket: what is sent, and the answers matched to it.

Two kinds, both bounded by ``limits.verification_timeout_s``:

- ``replay``: an ordinary ``job`` with the checked attempt's prompt and sampling (re-execution);
  the verifier answers with ``tokens`` and ``done`` like for any client job.
- ``score``: a ``score`` message (teacher forcing), answered with ``scored``.

The node router (coordinator/router.py) hands this link the answers to its work (``owns`` a
replay's job id; ``on_scored``), so that dispatch never sees them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace

from sparecycles import limits, protocol
from sparecycles.coordinator.node_conn import NodeConn
from sparecycles.secrets_util import new_id
from sparecycles.types import SamplingParams


@dataclass
class Replay:
    node_id: str
    done: asyncio.Future[bool]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    busy_s: float = 0.0


class VerifierLink:
    def __init__(self) -> None:
        self._scores: dict[str, tuple[str, asyncio.Future[protocol.Scored]]] = {}
        self._replays: dict[str, Replay] = {}

    @property
    def idle(self) -> bool:
        return not self._scores and not self._replays

    def on_scored(self, node: NodeConn, msg: protocol.Scored) -> None:
        """A teacher-forced pass's answer (a late or unknown one is dropped)."""
        owner, fut = self._scores.get(msg.score_id, (None, None))
        if fut is not None and owner == node.node_id and not fut.done():
            fut.set_result(msg)

    def owns(self, node: NodeConn, job_id: str) -> bool:
        """Is ``job_id`` a replay running on ``node``?"""
        replay = self._replays.get(job_id)
        return replay is not None and replay.node_id == node.node_id

    def take(self, node: NodeConn, msg: protocol.Tokens | protocol.Done | protocol.JobError,
             raw: str = "") -> None:
        """A message of a replay this link owns (``owns``)."""
        replay = self._replays.get(msg.job_id)
        if replay is None or replay.node_id != node.node_id:
            return
        if isinstance(msg, protocol.Tokens):
            skip = len(replay.tokens) - msg.index
            if skip < 0 and not replay.done.done():
                replay.done.set_result(False)  # a gap: the replay is unusable
            elif skip >= 0:
                new = msg.token_ids[skip:]
                replay.tokens.extend(new)
                lps = msg.logprobs if msg.logprobs and len(msg.logprobs) == len(msg.token_ids) \
                    else [None] * len(msg.token_ids)
                replay.logprobs.extend(lps[skip:])
        elif not replay.done.done():
            if isinstance(msg, protocol.Done):
                replay.busy_s = msg.metering.busy_s
            replay.done.set_result(isinstance(msg, protocol.Done))

    async def replay(self, node: NodeConn, model: str, prompt: list[int],
                     sampling: SamplingParams, max_tokens: int, resumed_tokens: int = 0
                     ) -> Replay | None:
        """Decode ``prompt`` on ``node`` as an ordinary-looking job; None if it failed. The last
        ``resumed_tokens`` of the prompt are the job's earlier output."""
        job_id = new_id("job")
        msg = protocol.JobAssign(
            job_id=job_id, attempt=1, model=model, prompt_token_ids=prompt,
            # the same sampling, constraint, penalties and bias; no client log-probabilities
            sampling=protocol.Sampling.of(replace(sampling, logprobs=False, top_logprobs=0),
                                          max_tokens=max_tokens),
            prompt_sha256=protocol.tokens_sha256(prompt), want_logprobs=True,
            resumed_tokens=resumed_tokens)
        replay = Replay(node.node_id, asyncio.get_running_loop().create_future())
        self._replays[job_id] = replay
        node.jobs.add(job_id)  # it takes a slot there, as the scheduler should see
        try:
            if not node.send(protocol.encode(msg)):
                return None
            async with asyncio.timeout(limits.verification_timeout_s):
                ok = await replay.done
            return replay if ok else None
        except TimeoutError:
            node.send(protocol.encode(protocol.Cancel(job_id=job_id, attempt=1)))
            return None
        finally:
            self._replays.pop(job_id, None)
            node.jobs.discard(job_id)

    async def score(self, node: NodeConn, model: str, prompt: list[int], output: list[int],
                    temperature: float, top_p: float, sampling: SamplingParams | None = None
                    ) -> protocol.Scored:
        """One teacher-forced pass on ``node``; a ``Scored`` with ``error`` if it failed. With
        ``sampling`` (a job that was not plain) each position is processed as the job was."""
        score_id = new_id("scr")
        wire = None
        if sampling is not None:
            wire = protocol.Sampling.of(replace(sampling, logprobs=False, top_logprobs=0),
                                        max_tokens=max(1, min(sampling.max_tokens,
                                                              limits.completion_tokens_max)))
        msg = protocol.Score(score_id=score_id, model=model, prompt_token_ids=prompt,
                             output_token_ids=output, temperature=temperature, top_p=top_p,
                             sampling=wire)
        fut: asyncio.Future[protocol.Scored] = asyncio.get_running_loop().create_future()
        self._scores[score_id] = (node.node_id, fut)
        try:
            if not node.send(protocol.encode(msg)):
                return protocol.Scored(score_id=score_id, error="the verifier's socket is closed")
            async with asyncio.timeout(limits.verification_timeout_s):
                return await fut
        except TimeoutError:
            return protocol.Scored(score_id=score_id, error="the verifier did not answer in time")
        finally:
            self._scores.pop(score_id, None)

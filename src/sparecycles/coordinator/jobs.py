"""A job while this coordinator holds it: the live records dispatch keeps, the verifier reads
and the API streams from.

``LiveJob`` is one job (its prompt, the tokens delivered so far, its attempts); ``Attempt`` is one
node's part of it; ``JobEvent`` is what the API's request handler receives on the job's queue.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sparecycles import protocol
from sparecycles.coordinator.handoff import KvHandoff
from sparecycles.errors import SpareCyclesError
from sparecycles.types import Job, JobState, SamplingParams, Workload

if TYPE_CHECKING:
    from sparecycles.coordinator.fleet_node import FleetNode
    from sparecycles.trust.decisions import Verdict


@dataclass
class Attempt:
    number: int
    node_id: str
    owner_id: str
    device_class: str
    token_base: int  # len(job.generated) when the attempt started
    started_mono_s: float
    first_token_mono_s: float | None = None
    tokens: int = 0
    last_token_mono_s: float = 0.0
    logprobs: list[float | None] = field(default_factory=list)  # reported, one per token
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # the client's
    # a stage of a chain (coordinator/chains.py): its layers, and its part of each token's work
    layers: tuple[int, int] | None = None
    work_ppm: int = 1_000_000
    busy_s: float = 0.0
    # disaggregated prefill/decode (coordinator/handoff.py): the positions of the KV cache this
    # attempt was sent, and the prompt tokens it prefilled itself (its signed metering; None:
    # the whole prompt it was sent, as any attempt)
    kv_positions: int = 0
    prefilled_tokens: int | None = None
    # protocol.tokens_sha256 of the prompt the attempt was sent (what its signed result names);
    # empty: not kept, computed again from the job when its result comes
    prompt_sha256: str = ""
    # seconds more than the token gap its node may take to its first token: the prefill it was
    # sent, with what its node still had to prefill, at a pessimistic rate (Dispatcher's
    # first_token_grace_s); a long prompt on a slow device is not silence
    first_token_grace_s: float = 0.0
    # ended (done, resumed elsewhere, cancelled): its node's later messages are stale, dropped
    # (a node found silent could still answer for it while the job waits for another node)
    ended: bool = False


class JobEventKind(enum.StrEnum):
    """What the API's request handler hears on a job's queue."""

    TOKENS = "tokens"  # more tokens, in order
    DONE = "done"  # the job is settled; ``finish_reason`` says why it ended
    ERROR = "error"  # the job failed; ``error`` says why


@dataclass
class JobEvent:
    kind: JobEventKind
    token_ids: tuple[int, ...] = ()
    at_perf_s: float = field(default_factory=time.perf_counter)  # when dispatch produced it
    finish_reason: str | None = None
    error: SpareCyclesError | None = None
    # the tokens' log-probabilities and alternatives, when the client asked for them
    logprobs: tuple[float | None, ...] | None = None
    top_logprobs: tuple[list[tuple[int, float]], ...] | None = None


@dataclass
class LiveJob:
    """A job while this coordinator holds it. ``generated`` is the authoritative output."""

    job_id: str
    client_id: str
    model: str
    prompt_ids: list[int]
    sampling: SamplingParams
    workload: Workload
    trusted_only: bool
    admitted_epoch_s: float
    admitted_mono_s: float = field(default_factory=time.monotonic)
    state: JobState = JobState.ADMITTED
    generated: list[int] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    events: asyncio.Queue[JobEvent] = field(default_factory=asyncio.Queue)
    waiting_since_mono_s: float = 0.0
    first_token_mono_s: float | None = None
    avoid_nodes: set[str] = field(default_factory=set)  # nodes that failed it: never again
    received_perf_s: float = 0.0  # perf_counter when the API received the request
    dispatched_perf_s: float | None = None  # perf_counter when the first attempt was sent to a node
    # parts of admission, timed (the API's overhead metrics): choosing its node when it was
    # admitted, and waiting for its hold's transaction to commit (seconds)
    placement_s: float | None = None
    hold_s: float | None = None
    chain: Any = None  # the coordinator/chains.ChainRun driving it, when served by a chain
    # attempts ended and not yet written (``job_attempts`` columns, with ``attempt``): they ride
    # with the job's settlement, or are queued when the job goes on to another attempt
    attempt_ends: list[dict[str, Any]] = field(default_factory=list)
    handoff: KvHandoff | None = None  # its prefill's KV cache on its way to another node

    @property
    def current(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None

    def as_job(self) -> Job:
        return Job(
            job_id=self.job_id,
            model=self.model,
            prompt_tokens=len(self.prompt_ids),
            max_tokens=self.sampling.max_tokens,
            client_id=self.client_id,
            admitted_at_s=self.admitted_epoch_s,
            generated_tokens=len(self.generated),
            trusted_only=self.trusted_only,
            workload=self.workload,
            avoid_nodes=tuple(sorted(self.avoid_nodes)),
            needs=protocol.features_needed(self.sampling),
        )


def observed_decode_tokens_per_s(att: Attempt, now_mono_s: float) -> float:
    """The decode speed an attempt showed: tokens after the first over the time from the first
    token to the end. Tokens that arrive in a burst (a node or network that held them back, a
    node running late and catching up) would make that time tiny and the node look hundreds of
    times faster than it is, and placement would then queue every job on it; so the decode time
    is taken as at least half the decode tokens' even share of the whole attempt (assignment to
    end): a burst can make a node look at most about twice as fast as its attempt did, and a
    steady stream (decode at least half the attempt) is measured exactly. 0 when there is
    nothing to measure."""
    if att.tokens <= 1:
        return 0.0
    total_s = now_mono_s - att.started_mono_s
    decode_s = now_mono_s - (att.first_token_mono_s or att.started_mono_s)
    decode_s = max(decode_s, total_s * (att.tokens - 1) / (2 * att.tokens))
    return (att.tokens - 1) / decode_s if decode_s > 0 else 0.0


class JobObserver(Protocol):
    """Told of every result dispatch receives (the verifier: coordinator/verification.py)."""

    def on_result(self, node: FleetNode, job: LiveJob, att: Attempt,
                  metering: protocol.Metering) -> None:
        """A signed result verified, before the job is settled."""
        ...

    def on_bad_signature(self, node: FleetNode, job: LiveJob, att: Attempt) -> None:
        """A result that does not verify; the attempt is resumed elsewhere."""
        ...

    def on_refused(self, node: FleetNode, job: LiveJob, att: Attempt, verdict: Verdict) -> None:
        """A result refused before it reached the books (metering out of bounds)."""
        ...

"""A simulated node: how its engine works through the jobs placed on it.

The engine model is continuous batching with prefill first, as llama.cpp and vLLM (without
chunked prefill) do it: prompts are prefilled one at a time, in order, and while a prompt is being
prefilled the running sequences wait; otherwise every running sequence gets one token per decode
step, and a step takes the performance model's time at the current batch and mean context,
divided by the node's true speed (which the scheduler does not know; it learns it). The prefill
produces the first token.

KV-cache memory: a sequence is admitted (its prefill started) only when its whole KV need (the
context it prefills plus every token it may still generate, its ``max_tokens``) fits the node's
KV capacity beside the sequences already admitted; until then it waits in the node's queue. That
is what Hugging Face TGI's router does (it admits a request only while the batch's input plus
max_new_tokens stays within ``max_batch_total_tokens``); an engine that admits on the prompt
alone (vLLM) preempts and recomputes later instead, which costs at least as much. A placement
that leaves the node's reservations above its capacity is counted
(``SimNode.kv_over_capacity_placements``): the scheduler never makes one.

Between two events the batch is constant, so progress is linear and each node needs one pending
event: the end of the current prefill, or the first sequence to finish decoding.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from sparecycles.availability import StayModel
from sparecycles.scheduling import perfmodel
from sparecycles.sim.churn import Interval
from sparecycles.types import AvailabilityPolicy, DeviceProfile, Job, ModelSpec, NodeSnapshot


@dataclass(slots=True, eq=False)
class Attempt:
    """One try of one request on one node."""

    req: int
    job: Job
    node: SimNode
    assigned_t: float
    predicted_finish_t: float
    target: int  # tokens this attempt must generate to finish the request
    context0: int  # tokens prefilled: prompt plus tokens earlier attempts delivered
    done: float = 0.0  # tokens generated so far
    first_token_t: float = -1.0  # node time the prefill finished, -1 before
    decode_batch: int = 1  # batch when it started decoding (to compare with the prediction)
    is_hedge: bool = False
    live: bool = True
    kv_need: int = 0  # KV tokens it may fill: context0 + the tokens the job may still generate


@dataclass(slots=True, eq=False)
class SimNode:
    idx: int
    node_id: str
    cls: int
    profile: DeviceProfile
    spec: ModelSpec
    costs: perfmodel.Costs  # the roofline of spec on profile
    jobs_max: int
    speed: float  # true speed over the roofline prediction
    price_micros_per_mtok: int
    reputation: float
    policy: AvailabilityPolicy
    stay_model: StayModel | None
    intervals: tuple[Interval, ...]
    # availability
    accepting: bool = False
    draining: bool = False
    drains: int = 0  # departures so far: tells a drain's end from an older one's
    up_since: float = 0.0
    # the engine
    queue: deque[Attempt] = field(default_factory=deque)
    prefilling: Attempt | None = None
    prefill_end: float = 0.0
    decoding: list[Attempt] = field(default_factory=list)
    rate: float = 0.0  # tokens/s of each decoding sequence, when not prefilling
    last_t: float = 0.0
    version: int = 0
    busy_s: float = 0.0
    # what the coordinator keeps about it
    factor: dict[str, float] = field(default_factory=dict)
    last_assigned_t: float = float("-inf")
    snapshot: NodeSnapshot | None = None
    snapshot_t: float = float("-inf")
    stay: float = 0.0  # expected stay, recomputed at most every SimConfig.stay_refresh_s
    stay_t: float = float("-inf")
    earned_micros: int = 0
    tokens_out: int = 0
    kv_over_capacity_placements: int = 0

    @property
    def active(self) -> int:
        return len(self.queue) + len(self.decoding) + (self.prefilling is not None)

    def attempts(self) -> list[Attempt]:
        out = list(self.queue) + self.decoding
        if self.prefilling is not None:
            out.append(self.prefilling)
        return out

    def advance(self, t: float) -> None:
        """Bring progress and busy time up to ``t`` (nothing changes shape in between)."""
        dt = t - self.last_t
        if dt > 0.0:
            if self.prefilling is None and self.decoding:
                gained = self.rate * dt
                for a in self.decoding:
                    a.done += gained
            if self.prefilling is not None or self.decoding:
                self.busy_s += dt
        self.last_t = t

    def kv_reserved(self) -> int:
        """KV tokens the admitted and queued sequences may fill (see the module's doc)."""
        return sum(a.kv_need for a in self.attempts())

    def kv_admitted(self) -> int:
        total = sum(a.kv_need for a in self.decoding)
        return total + (self.prefilling.kv_need if self.prefilling is not None else 0)

    def prefill_s(self, attempt: Attempt) -> float:
        return self.costs.prefill_s(attempt.context0) / self.speed

    def step_s(self) -> float:
        b = len(self.decoding)
        context = sum(a.context0 + a.done for a in self.decoding) / b
        return self.costs.decode_step_s(b, int(context)) / self.speed

    def start_prefill(self, t: float) -> None:
        """Admit the head of the queue if nothing is being prefilled and its KV need fits."""
        if self.prefilling is None and self.queue:
            head = self.queue[0]
            if self.decoding and self.kv_admitted() + head.kv_need > self.costs.kv_capacity_tokens:
                return  # waits for running sequences to free their KV cache
            self.prefilling = self.queue.popleft()
            self.prefill_end = t + self.prefill_s(self.prefilling)

    def next_event_t(self, t: float) -> float | None:
        """When this node next changes shape (and recompute the decode rate); None if idle."""
        if self.prefilling is not None:
            return self.prefill_end
        if not self.decoding:
            return None
        step = self.step_s()
        self.rate = 1.0 / step
        left = min(a.target - a.done for a in self.decoding)
        return t + max(0.0, left) * step

    def finished(self) -> list[Attempt]:
        """Decoding sequences that reached their target (taken out of the batch)."""
        done = [a for a in self.decoding if a.done >= a.target - 1e-6]
        if done:
            self.decoding = [a for a in self.decoding if a.done < a.target - 1e-6]
        return done

    def remove(self, attempt: Attempt) -> None:
        if self.prefilling is attempt:
            self.prefilling = None
        elif attempt in self.decoding:
            self.decoding.remove(attempt)
        else:
            self.queue.remove(attempt)

    def queued_tokens(self) -> int:
        return int(sum(a.target - a.done for a in self.attempts()))

    def prefill_backlog(self, t: float) -> tuple[int, float]:
        """Prompt tokens placed here and not yet prefilled, and the prefill seconds the
        coordinator predicts for them (its speed factor, not the node's true speed; the prompt
        being prefilled counts for the share of its predicted time not yet elapsed)."""
        factor = self.factor.get(self.spec.name, 1.0)
        tokens, seconds = 0, 0.0
        for a in self.queue:
            tokens += a.context0
            seconds += self.costs.prefill_s(a.context0) / factor
        p = self.prefilling
        if p is not None:
            predicted = self.costs.prefill_s(p.context0) / factor
            true = self.prefill_s(p)
            left = max(0.0, self.prefill_end - t) / true if true > 0 else 0.0
            tokens += int(p.context0 * left)
            seconds += predicted * left
        return tokens, seconds

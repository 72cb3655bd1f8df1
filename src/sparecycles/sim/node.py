"""A simulated node: how its engine works through the jobs placed on it.

The engine is continuous batching, in one of two ways (``SimConfig.prefill_chunk_tokens``):

- **chunked prefill** (the default, 512 tokens: llama.cpp's ``n_ubatch``, vLLM's chunked
  prefill): every step decodes one token of each running sequence *and* processes up to a chunk
  of the prompt at the head of the queue, so a long prompt slows the running sequences' steps
  instead of stopping them. A step's time is the roofline of that mixed pass
  (``perfmodel.Costs.chunked_step_s``): the weights read once, the decodes' KV caches and the
  prompt's processed part read, the matmuls over ``batch + chunk`` rows, attention of each chunk
  token over the prompt so far (taken at its mean over the rest of the prompt, so that the step
  is constant between events);
- **prefill first** (0): prompts are prefilled one at a time while the running sequences wait
  (llama.cpp and vLLM without chunking).

Either way a step's time is divided by the node's true speed (which the scheduler does not know;
it learns it). The end of a prompt's prefill produces its first token.

**Prefix cache**: when a request of a multi-turn conversation completes, the node keeps its KV
cache (prompt and answer) for the conversation's next turn, least recently used first out,
within the KV capacity that admitted sequences leave free. A next turn admitted here reuses the
cached tokens it shares with it (``min(cached, prefix)``) and prefills only the rest, attending
to the cached part. A node that leaves loses its cache.

KV-cache memory: a sequence is admitted (its prefill started) only when its whole KV need (the
context it prefills plus every token it may still generate, its ``max_tokens``) fits the node's
KV capacity beside the sequences already admitted; until then it waits in the node's queue. That
is what Hugging Face TGI's router does (it admits a request only while the batch's input plus
max_new_tokens stays within ``max_batch_total_tokens``); an engine that admits on the prompt
alone (vLLM) preempts and recomputes later instead, which costs at least as much. A placement
that leaves the node's reservations above its capacity is counted
(``SimNode.kv_over_capacity_placements``): the scheduler never makes one.

**Disaggregated prefill/decode** (a hand-off, ``SimConfig`` policy ``fastest+disagg``): a job
is two linked attempts. The *sender*'s (``handoff`` set) is queued and prefilled like any other,
its KV need only its context and first token; its prefill samples the first token, and then it
waits in ``sending`` (its KV cache still held) while the cache crosses the link. The
*receiver*'s (``source`` set until the cache arrives) sits in ``incoming`` from the placement
on, its whole KV need reserved (so the receiver is never over-committed when the cache lands)
and a slot taken; when the cache arrives it joins the decoding batch with its first token done.
A cache runs at the slower of the sender's uplink and the receiver's downlink, after the
hand-offs sent before it on either: each link is taken in order for its own share of the bytes
(``uplink_free_t``, ``downlink_free_t``), so a fast sender feeds several slower receivers at once.

Between two events the batch is constant, so progress is linear and each node needs one pending
event: the end of the current prefill, or the first sequence to finish decoding. Hand-offs'
arrivals are the loop's events (sim/loop.py).
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
    conversation: str = ""  # multi-turn traces: the prefix cache's key
    prefix: int = 0  # tokens of its prompt shared with the conversation's previous turn
    cached: int = 0  # of which the node's prefix cache held (known once admitted)
    # disaggregated prefill/decode: on the sender, the receiver's attempt it ships its KV cache
    # to; on the receiver, the sender's attempt until the cache arrives
    handoff: Attempt | None = None
    source: Attempt | None = None
    # the sender's: the hand-off's predicted time on its uplink and on the receiver's downlink,
    # counted in their backlogs while it is placed and not yet sent
    uplink_s: float = 0.0
    downlink_s: float = 0.0
    handed: bool = False  # the receiver's: its prompt was prefilled on another node


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
    chunk: int = 512  # prefill chunk, tokens per step (0: prefill first)
    # availability
    accepting: bool = False
    draining: bool = False
    drains: int = 0  # departures so far: tells a drain's end from an older one's
    up_since: float = 0.0
    # the engine
    queue: deque[Attempt] = field(default_factory=deque)
    prefilling: Attempt | None = None
    prefill_left: float = 0.0  # tokens of its prompt still to process
    prefill_total_s: float = 0.0  # prefill-first: its whole prefill's time
    prefill_rate: float = 0.0  # prompt tokens/s, as the batch stands
    decoding: list[Attempt] = field(default_factory=list)
    sending: list[Attempt] = field(default_factory=list)  # prefilled, KV cache on its way out
    incoming: list[Attempt] = field(default_factory=list)  # to decode, KV cache not yet here
    uplink_free_t: float = 0.0  # when the link is done with the hand-offs sent so far
    downlink_free_t: float = 0.0
    uplink_due_s: float = 0.0  # link seconds of hand-offs placed and not yet sent
    downlink_due_s: float = 0.0
    rate: float = 0.0  # tokens/s of each decoding sequence, as the batch stands
    last_t: float = 0.0
    version: int = 0
    busy_s: float = 0.0
    cache: dict[str, int] = field(default_factory=dict)  # conversation -> tokens, LRU first
    cached_tokens: int = 0
    prompt_tokens_admitted: int = 0
    prompt_tokens_cached: int = 0
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
        return (len(self.queue) + len(self.decoding) + (self.prefilling is not None)
                + len(self.sending) + len(self.incoming))  # fmt: skip

    def attempts(self) -> list[Attempt]:
        out = list(self.queue) + self.decoding
        if self.prefilling is not None:
            out.append(self.prefilling)
        if self.sending or self.incoming:
            out += self.sending + self.incoming
        return out

    def advance(self, t: float) -> None:
        """Bring progress and busy time up to ``t`` (nothing changes shape in between)."""
        dt = t - self.last_t
        if dt > 0.0:
            if self.prefilling is not None:
                self.prefill_left = max(0.0, self.prefill_left - self.prefill_rate * dt)
            if self.decoding and self.rate > 0.0:
                gained = self.rate * dt
                for a in self.decoding:
                    a.done += gained
            if self.prefilling is not None or self.decoding:
                self.busy_s += dt
        self.last_t = t

    # --- memory ------------------------------------------------------------------------------

    def kv_reserved(self) -> int:
        """KV tokens the admitted and queued sequences may fill (see the module's doc)."""
        return sum(a.kv_need for a in self.attempts())

    def kv_admitted(self) -> int:
        """KV tokens the engine holds now: decoding sequences', the prompt being prefilled's and
        those of prefilled prompts whose cache is on its way out."""
        total = sum(a.kv_need for a in self.decoding)
        if self.sending:
            total += sum(a.kv_need for a in self.sending)
        return total + (self.prefilling.kv_need if self.prefilling is not None else 0)

    def _evict(self, room: int) -> None:
        """Drop least recently used prefixes until the cache fits in ``room`` tokens."""
        while self.cache and self.cached_tokens > room:
            key = next(iter(self.cache))
            self.cached_tokens -= self.cache.pop(key)

    def remember(self, conversation: str, tokens: int) -> None:
        """A conversation's turn finished here: keep its KV cache for the next turn."""
        if not conversation:
            return
        self.cached_tokens -= self.cache.pop(conversation, 0)
        room = self.costs.kv_capacity_tokens - self.kv_admitted()
        if tokens > room:
            return
        self.cache[conversation] = tokens
        self.cached_tokens += tokens
        self._evict(room)

    def forget_cache(self) -> None:
        self.cache.clear()
        self.cached_tokens = 0

    def cached_for(self, a: Attempt) -> int:
        return min(self.cache.get(a.conversation, 0), a.prefix) if a.conversation else 0

    # --- the engine --------------------------------------------------------------------------

    def start_prefill(self, t: float) -> None:
        """Admit the head of the queue if nothing is being prefilled and its KV need fits."""
        if self.prefilling is not None or not self.queue:
            return
        head = self.queue[0]
        if self.decoding and self.kv_admitted() + head.kv_need > self.costs.kv_capacity_tokens:
            return  # waits for running sequences to free their KV cache
        self.queue.popleft()
        hit = self.cached_for(head)
        if head.conversation in self.cache:  # the sequence owns those KV blocks now
            self.cached_tokens -= self.cache.pop(head.conversation)
        head.cached = hit
        self._evict(self.costs.kv_capacity_tokens - self.kv_admitted() - head.kv_need)
        self.prefilling = head
        self.prefill_left = float(max(1, head.context0 - hit))
        self.prefill_total_s = self.costs.prefill_s(int(self.prefill_left), hit) / self.speed
        self.prompt_tokens_admitted += head.context0
        self.prompt_tokens_cached += hit

    def prefill_done(self) -> bool:
        return self.prefilling is not None and self.prefill_left <= 1e-6

    def next_event_t(self, t: float) -> float | None:
        """When this node next changes shape (and recompute the rates); None if idle."""
        head, b = self.prefilling, len(self.decoding)
        if head is None and not b:
            return None
        at = float("inf")
        if head is not None and self.chunk <= 0:  # prefill first: the batch waits
            self.rate = 0.0
            self.prefill_rate = max(1.0, head.context0 - head.cached) / max(
                1e-12, self.prefill_total_s)
            return t + self.prefill_left / self.prefill_rate
        context = sum(a.context0 + a.done for a in self.decoding) / b if b else 0.0
        if head is not None:
            chunk = min(float(self.chunk), self.prefill_left)
            total = head.context0
            position = total - self.prefill_left  # cached and processed tokens of its prompt
            step = self.costs.chunked_step_s(b, int(context), int(max(1.0, chunk)),
                                             (position + total) / 2.0) / self.speed  # fmt: skip
            self.prefill_rate = chunk / step
            at = t + self.prefill_left / self.prefill_rate
        else:
            step = self.costs.decode_step_s(b, int(context)) / self.speed
            self.prefill_rate = 0.0
        if b:
            self.rate = 1.0 / step
            left = min(a.target - a.done for a in self.decoding)
            at = min(at, t + max(0.0, left) * step)
        else:
            self.rate = 0.0
        return at

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
        elif attempt in self.sending:
            self.sending.remove(attempt)
        elif attempt in self.incoming:
            self.incoming.remove(attempt)
        else:
            self.queue.remove(attempt)

    # --- hand-offs ---------------------------------------------------------------------------

    def receive(self, attempt: Attempt, t: float) -> None:
        """A hand-off's KV cache arrived: the sequence joins the decoding batch, its first
        token already sampled by the sender; the prefix cache makes room for it."""
        self.incoming.remove(attempt)
        attempt.first_token_t = t  # its decode starts now (what the speed factor compares)
        attempt.decode_batch = len(self.decoding) + 1
        self.decoding.append(attempt)
        self._evict(self.costs.kv_capacity_tokens - self.kv_admitted())

    def link_backlog_s(self, t: float) -> tuple[float, float]:
        """Seconds of hand-offs queued on the uplink and the downlink, from ``t``: those sent
        and not yet through, and those placed and not yet sent."""
        return (max(0.0, self.uplink_free_t - t) + self.uplink_due_s,
                max(0.0, self.downlink_free_t - t) + self.downlink_due_s)  # fmt: skip

    def queued_tokens(self) -> int:
        return int(sum(a.target - a.done for a in self.attempts()))

    def prefill_backlog(self, t: float) -> tuple[int, float]:
        """Prompt tokens placed here and not yet prefilled, and the prefill seconds the
        coordinator predicts for them (its speed factor, not the node's true speed; the prompt
        being prefilled counts for what is left of it)."""
        factor = self.factor.get(self.spec.name, 1.0)
        tokens, seconds = 0, 0.0
        for a in self.queue:
            hit = self.cached_for(a)
            tokens += a.context0 - hit
            seconds += self.costs.prefill_s(a.context0 - hit, hit) / factor
        p = self.prefilling
        if p is not None:
            left = self.prefill_left
            if t > self.last_t:  # not yet advanced to t: what the rate says is left
                left = max(0.0, left - self.prefill_rate * (t - self.last_t))
            tokens += int(left)
            seconds += self.costs.prefill_s(int(left), p.context0 - int(left)) / factor
        return tokens, seconds

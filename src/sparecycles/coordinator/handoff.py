"""Disaggregated prefill/decode, live: a job prefilled on one node and decoded on another.

Nodes dial out and cannot reach each other, so the KV cache goes through the coordinator, on
the sockets that already carry the job:

1. Placement names two nodes (the scheduler's ``Assignment.decode_node_id`` under the roofline
   rule, ``disagg = "auto"``; or, ``"always"``, any other free node that can take a cache:
   ``pick_receiver``). The sender's attempt is a ``job`` with ``kv_export`` and ``max_tokens``
   1: it prefills the prompt, streams the first token to the client as any attempt does, sends
   its prompt's cache as ``kv_chunk`` messages, then its signed ``done``.
2. Each chunk is checked here as it comes (``KvHandoff.add``): its layout must be the model's
   (layers, KV heads, head size, from the registry's spec) over exactly the prompt the sender
   was sent, the chunks in ``protocol.kv_chunks`` order; the cache is held here, bounded by
   ``limits.kv_handoff_bytes_max`` per job and ``kv_held_bytes_max`` for every job together.
3. At the sender's ``done`` (stop: the answer was one token, nothing to hand off), the job's next
   attempt goes to the receiver: a ``job`` with ``kv_import`` (the prompt plus the first token,
   as any resumed attempt), then the chunks, renumbered to its attempt. The receiver loads them
   and prefills only the first token; a cache that does not come whole in time or does not fit
   its model it drops, and prefills the prompt itself.

Failures take the paths that already exist, so no token is repeated or lost and the hold is
settled once: a sender that leaves or fails before its ``done`` is resumed as any attempt (the
hand-off is forgotten); a cache refused here, or a receiver gone, busy or draining by the
sender's ``done``, puts the job back in the queue with its first token, where the scheduler
places it (on the sender, often) as a resumed job; a receiver that leaves mid-decode is resumed
as any attempt. Money: each attempt is a share of the job's one settlement; the receiver's share
counts the prompt tokens it prefilled (its signed metering), not those it was sent.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from sparecycles import protocol
from sparecycles.types import ModelSpec

# every hand-off's cache held here at once (each at most limits.kv_handoff_bytes_max): past it, a
# new chunk fails its hand-off (that job's receiver prefills the prompt itself)
kv_held_bytes_max = 512 * 1024 * 1024


class Disagg(enum.StrEnum):
    """When dispatch hands a job's decode to another node (the ``disagg`` setting)."""

    OFF = "off"
    AUTO = "auto"  # when the scheduler's roofline predicts the pair beats any single node
    ALWAYS = "always"  # whenever another node can take the cache (tests, demos, benchmarks)


@dataclass
class KvHandoff:
    """A job's hand-off in flight: the sender's attempt, the receiver, the cache so far."""

    receiver_id: str
    sender_attempt: int
    positions: int  # the prompt the sender was sent: the positions its cache must hold
    chunks: list[protocol.KvChunk] = field(default_factory=list)
    held_bytes: int = 0
    error: str | None = None  # why it failed; its chunks are dropped

    @property
    def layout(self) -> protocol.KvLayout | None:
        return self.chunks[0].layout if self.chunks else None

    @property
    def complete(self) -> bool:
        layout = self.layout
        return (self.error is None and layout is not None
                and len(self.chunks) == len(protocol.kv_chunks(layout)))

    def add(self, chunk: protocol.KvChunk, spec: ModelSpec, held_elsewhere_bytes: int) -> int:
        """Take the next chunk (or fail the hand-off: ``error`` set, chunks dropped); returns the
        change of the bytes held here."""
        if self.error is not None:
            return 0
        problem = chunk_problem(chunk, spec, self.positions, self.layout, len(self.chunks))
        size = 2 * chunk.place[2] * chunk.layout.row_bytes
        if problem is None and held_elsewhere_bytes + self.held_bytes + size > kv_held_bytes_max:
            problem = "the coordinator holds too many KV caches"
        if problem is not None:
            return self.fail(problem)
        self.chunks.append(chunk)
        self.held_bytes += size
        return size

    def fail(self, why: str) -> int:
        """Give the hand-off up; returns the (negative) change of the bytes held here."""
        freed = -self.held_bytes
        self.error = self.error or why
        self.chunks, self.held_bytes = [], 0
        return freed


def chunk_problem(chunk: protocol.KvChunk, spec: ModelSpec, positions: int,
                  layout: protocol.KvLayout | None, index: int) -> str | None:
    """What is wrong with a hand-off's next chunk, None if nothing: its layout must be the
    model's over the prompt sent, the same as its predecessors', and it must come next."""
    got = chunk.layout
    if (got.layers, got.kv_heads, got.head_dim) != (spec.n_layers, spec.n_kv_heads,
                                                    spec.head_dim):
        return (f"a KV cache of {got.layers} layers x {got.kv_heads} heads x {got.head_dim} for"
                f" {spec.name} ({spec.n_layers} x {spec.n_kv_heads} x {spec.head_dim})")
    if got.positions != positions:
        return f"a KV cache of {got.positions} positions for a prompt of {positions}"
    if layout is not None and got != layout:
        return "KV chunks of different layouts"
    if chunk.index != index:
        return f"KV chunk {chunk.index} where {index} was next"
    return None


def relayed(chunk: protocol.KvChunk, attempt: int) -> str:
    """A chunk as the receiver gets it: the same cache, for its own attempt."""
    return protocol.encode(chunk.model_copy(update={"attempt": attempt}))


def pick_receiver(candidates: list[tuple[str, int, int]], sender_id: str,
                  avoid: set[str] | frozenset[str]) -> str | None:
    """``disagg = "always"``: the decoding node for a job prefilled on ``sender_id``, among
    ``candidates`` (node id, jobs held, jobs max) that serve the model and can take a cache:
    the least busy one with a free slot, then the smallest id; None when there is none."""
    free = [(jobs, node_id) for node_id, jobs, jobs_max in candidates
            if node_id != sender_id and node_id not in avoid and jobs < jobs_max]
    return min(free)[1] if free else None

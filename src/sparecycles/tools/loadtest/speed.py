"""How fast a fake node "generates": a pure timing model shared by fake nodes and clients.

A fake node answers a job of ``p`` prompt tokens with its first token at
``overhead_s + p / prefill_tokens_per_s`` after it received the job, then one token every
``1 / decode_tokens_per_s``. Clients compute the same schedule from the prompt length the
coordinator reports in ``usage``, so the latency the coordinator adds is what they observe minus
this. The defaults are a mid-range consumer GPU on a 1-3B model (prefill a few thousand tokens/s,
decode about 50 tokens/s per sequence).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from sparecycles.errors import invariant


@dataclass(frozen=True, slots=True)
class SpeedModel:
    prefill_tokens_per_s: float = 4000.0
    decode_tokens_per_s: float = 50.0
    overhead_s: float = 0.005  # fixed cost before prefill: the engine picking the job up

    def __post_init__(self) -> None:
        invariant(self.prefill_tokens_per_s > 0, "prefill_tokens_per_s must be positive")
        invariant(self.decode_tokens_per_s > 0, "decode_tokens_per_s must be positive")
        invariant(self.overhead_s >= 0, "overhead_s must not be negative")

    @property
    def inter_token_s(self) -> float:
        return 1.0 / self.decode_tokens_per_s

    def ttft_s(self, prompt_tokens: int) -> float:
        """Seconds from receiving a job to sending its first token."""
        return self.overhead_s + prompt_tokens / self.prefill_tokens_per_s

    def token_due_s(self, prompt_tokens: int, index: int) -> float:
        """Seconds from receiving a job to sending its token number ``index`` (from 0)."""
        return self.ttft_s(prompt_tokens) + index * self.inter_token_s

    def total_s(self, prompt_tokens: int, completion_tokens: int) -> float:
        return self.token_due_s(prompt_tokens, max(0, completion_tokens - 1))

    def describe(self) -> str:
        return (f"prefill={self.prefill_tokens_per_s:g},decode={self.decode_tokens_per_s:g},"
                f"overhead={self.overhead_s:g}")

    @classmethod
    def parse(cls, text: str) -> SpeedModel:
        """``"prefill=4000,decode=50,overhead=0.005"`` (any subset; the rest default)."""
        names = {"prefill": "prefill_tokens_per_s", "decode": "decode_tokens_per_s",
                 "overhead": "overhead_s"}
        known = {f.name for f in fields(cls)}
        out = cls()
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            name = names.get(key.strip(), key.strip())
            if not sep or name not in known:
                raise ValueError(f"speed must look like prefill=4000,decode=50,overhead=0.005; "
                                 f"got {part!r}")
            out = replace(out, **{name: float(value)})
        return out

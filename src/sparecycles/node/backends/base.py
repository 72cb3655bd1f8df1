"""The backend interface: what the node agent needs from an inference engine.

An ``Engine`` holds one loaded model and decodes every request submitted to it together in
batches (continuous batching: requests join and leave the batch between decode steps). The node
agent never loads a model twice; it submits each job to the engine of that model.

Engines are thread-based: ``submit`` and ``cancel`` may be called from any thread; ``on_update``
callbacks run on the engine's own thread and must not block (the agent hands them to its event
loop with ``call_soon_threadsafe``).

Backends: ``transformers`` (Hugging Face on PyTorch, CPU or CUDA) and ``llamacpp`` (GGUF on
llama.cpp), each an optional extra, both built on ``batching.BatchingEngine`` (the queues, the
engine thread's frame and the per-token endings they share); vLLM could be added implementing
the same interface.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sparecycles import protocol
from sparecycles.types import FinishReason, ModelSpec, SamplingParams


@dataclass(frozen=True, slots=True)
class KvPrefix:
    """The keys and values of a prompt's first ``positions`` tokens, one (keys, values) pair per
    layer, each (kv heads, positions, head dim) as the backend's own arrays: what a node that
    prefilled a prompt hands to the node that decodes it (disaggregated prefill/decode)."""

    layers: tuple[tuple[Any, Any], ...]
    positions: int


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    want_logprobs: bool = False
    # the last ``resumed_tokens`` of the prompt are this request's output from an earlier
    # attempt (the grammar, penalties and min_tokens count them as output)
    resumed_tokens: int = 0
    # disaggregated prefill/decode (engines with protocol.FEATURE_KV_HANDOFF): ``export_kv``
    # asks for the prompt's KV cache in the final update (a request of max_tokens 1, finished
    # after its prefill's token); ``kv_prefix`` holds the KV cache of the prompt's first tokens,
    # which the engine loads instead of prefilling them
    export_kv: bool = False
    kv_prefix: KvPrefix | None = None


@dataclass(frozen=True, slots=True)
class GenerationUpdate:
    """New tokens of one request since its previous update; the last update has ``finished``.

    ``token_ids`` never include the end-of-sequence token that finished a request: it is not part
    of the completion's text, and a resumed job must not feed it back as prompt.
    """

    request_id: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] | None = None  # log-probability of each token in token_ids
    # the params.top_logprobs likeliest (token, log p) at each token's position
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None  # set when the request failed inside the engine
    kv: KvPrefix | None = None  # the final update of an ``export_kv`` request: its prompt's cache


@dataclass(frozen=True, slots=True)
class ScoreResult:
    """A teacher-forced pass over claimed output tokens, one entry per token (see
    ``protocol.Scored`` for what each list means)."""

    logprobs: tuple[float, ...]
    top_logprobs: tuple[float, ...]
    mass_above: tuple[float, ...]
    expected_logprobs: tuple[float, ...]
    logprob_vars: tuple[float, ...]
    busy_s: float = 0.0


@dataclass(slots=True)
class EngineStats:
    requests_active: int = 0
    requests_waiting: int = 0
    tokens_generated: int = 0
    decode_steps: int = 0
    busy_s: float = 0.0  # wall time the engine spent computing (prefill + decode)
    prompt_tokens: int = 0  # prompt tokens of the requests admitted so far
    prompt_tokens_cached: int = 0  # of those, tokens found in the prefix cache (not prefilled)
    batch_size_hist: dict[int, int] = field(default_factory=dict)


UpdateCallback = Callable[[GenerationUpdate], None]


class Engine(abc.ABC):
    """One loaded model serving many concurrent requests."""

    name: str
    spec: ModelSpec  # includes weights_sha256 of the loaded files
    device: str  # "cpu", "cuda:0", ...
    # protocol.FEATURE_* this engine honours beyond plain sampling (the agent says them in hello)
    features: frozenset[str] = frozenset()
    # its maths runs on the CPU's OpenMP threads (libgomp): llama.cpp's default build, torch on a
    # CPU; ``openmp_barriers``: its speed rests on libgomp spinning at barriers (llama.cpp's
    # many small operations a step), which stops once the process has more such threads than
    # cores (``openmp_crowded``)
    uses_openmp: bool = False
    openmp_barriers: bool = False

    @abc.abstractmethod
    def submit(self, request: GenerationRequest, on_update: UpdateCallback) -> None:
        """Queue a request. Raises ``EngineFull`` when ``engine_queue_max`` are waiting,
        ``EngineClosed`` after ``close``, and ``InvalidRequest`` (``ContextLengthExceeded`` for a
        prompt that leaves no room in the model's context) for a request it can never serve."""

    @abc.abstractmethod
    def cancel(self, request_id: str) -> None:
        """Stop a request; its final update (finished, reason STOP) is still delivered."""

    @abc.abstractmethod
    def stats(self) -> EngineStats: ...

    def score(self, prompt_token_ids: tuple[int, ...], output_token_ids: tuple[int, ...], *,
              temperature: float = 1.0, top_p: float = 1.0,
              params: SamplingParams | None = None, resumed_tokens: int = 0) -> ScoreResult:
        """Score ``output_token_ids`` after the prompt in one forward pass (teacher forcing), for
        verification. Blocks until done; callable from any thread; runs between decode steps.
        With ``params`` that are not plain, each position is processed as the job's sampling
        processed it (``sampling.score_row``; the last ``resumed_tokens`` of the prompt are
        earlier output). Raises ``InvalidRequest`` for tokens outside the vocabulary or the
        context."""
        raise NotImplementedError(f"{type(self).__name__} cannot score")

    def export_kv(self, prefix: KvPrefix) -> tuple[protocol.KvLayout, list[tuple[bytes, bytes]]]:
        """A cache this engine exported, as the wire carries it: its layout and each chunk's
        (keys, values) bytes, in ``protocol.kv_chunks`` order. Raises ``InvalidRequest`` when it
        is over the protocol's bounds. Callable from any thread."""
        raise NotImplementedError(f"{type(self).__name__} cannot hand off a KV cache")

    def import_kv(self, layout: protocol.KvLayout, chunks: list[tuple[bytes, bytes]]
                  ) -> KvPrefix:
        """The cache a hand-off sent, checked against this engine's model (layers, heads, head
        size), ready for ``GenerationRequest.kv_prefix``; ``InvalidRequest`` if it does not fit.
        Callable from any thread."""
        raise NotImplementedError(f"{type(self).__name__} cannot load a KV cache")

    @abc.abstractmethod
    def close(self) -> None:
        """Stop the engine thread; requests still running finish with an error update."""


class EngineFull(Exception):
    """The engine's waiting queue is at its limit."""


class EngineClosed(Exception):
    """The engine was closed; it takes no more requests."""


def openmp_crowded(engines: Iterable[Engine]) -> bool:
    """True when a llama.cpp engine on OpenMP shares this process with another OpenMP user.
    libgomp counts every engine's threads; once they outnumber the cores it stops spinning at
    barriers, and llama.cpp decoded SmolLM2 2-3x slower beside a second model on a 2-core
    machine (docs/benchmarks.md, "OpenMP")."""
    crowd = [e for e in engines if e.uses_openmp]
    return len(crowd) > 1 and any(e.openmp_barriers for e in crowd)

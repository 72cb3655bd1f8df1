"""Dishonest node behaviours, for the adversary tests and the verification benchmark only.

``sparecycles node --cheat MODE`` (a hidden option) makes a real node agent cheat in one of the
ways an owner could try to earn without doing the work asked. It is honoured only when the
environment has ``SPARECYCLES_ALLOW_CHEATS=1`` (the tests set it); otherwise the node refuses to
start. Every mode wraps the honest engine or agent; none changes what the node reports at hello
(the weights hash of the files on disk), which is exactly what makes them cheats.

- ``random-tokens``: sends random token ids (and made-up log-probabilities) instead of decoding.
- ``different-model``: decodes with other weights of the same shape (re-drawn at random).
- ``bf16`` / ``int8``: decodes with a lower-precision copy of the right weights (rounded to
  bfloat16, or to 8 bits per weight with one scale per row), as a node saving memory would.
- ``other-file=PATH``: serves the weights of another file (a coarser quantization of the same
  model, Q4_0 sold as Q8_0; or another model) while it claims the file it was started with.
- ``replay``: answers every job with the output it produced for its first job.
- ``forged-signature``: signs its results with a key other than the one it said hello with.
- ``overclaim``: reports (and signs) more tokens and busy time than it produced.
- ``kv-nan`` / ``kv-short`` (disaggregated prefill/decode): the KV cache the node hands off has
  NaN in its first chunk (the decoding node refuses it), or says one position fewer than the
  prompt (the coordinator refuses it); the hand-off fails, and the job must still end right.
- ``stage-noise`` (a node holding a layer range, ``--layers``): computes on its inputs with noise
  as large as they are (the first stage: returns its outputs so), so what it returns, hidden
  states or (the last stage) tokens, is not what its layers make of what it was sent.
- ``stage-skip`` (likewise): returns its inputs as its outputs, as if its layers did nothing (the
  first stage returns the token embeddings); a last stage has no output to skip to, and stays
  honest.

The stage cheats still run their layers (the cache's positions must advance as an honest stage's
would) and cheat on every step, checks included: a check looks like any chain's work.

On a llama.cpp node (GGUF) every mode applies except the three that rewrite a PyTorch model's
weights in place (``different-model``, ``bf16``, ``int8``): llama.cpp's weights are a read-only
mapping of the file, quantized in blocks. Their GGUF form is ``other-file=PATH``: the owner
serves a cheaper file they already have (a coarser quantization, or a different model) and
claims the hash of the file the network asked for.
"""

from __future__ import annotations

import dataclasses
import os
import random
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from sparecycles import protocol
from sparecycles.identity import NodeIdentity
from sparecycles.node.backends.base import (
    Engine,
    EngineStats,
    GenerationRequest,
    GenerationUpdate,
    KvPrefix,
    ScoreResult,
    UpdateCallback,
)
from sparecycles.types import FinishReason, SamplingParams

ALLOW_ENV = "SPARECYCLES_ALLOW_CHEATS"
MODES = ("random-tokens", "different-model", "bf16", "int8", "other-file", "replay",
         "forged-signature", "overclaim", "stage-noise", "stage-skip", "kv-nan", "kv-short")
WEIGHTS_MODES = ("different-model", "bf16", "int8")  # rewrite a PyTorch model's weights


def apply(agent: Any, mode: str, *, seed: int = 0, **load_options: Any) -> None:
    """Make ``agent`` (a ``NodeAgent``) cheat; refuses unless ``SPARECYCLES_ALLOW_CHEATS=1``.

    ``mode`` is one of ``MODES``; ``other-file`` takes its file as ``other-file=PATH``, loaded
    with ``load_options`` (the node's threads, device, duty cycle) by the engine's own backend."""
    if os.environ.get(ALLOW_ENV) != "1":
        raise ValueError(f"--cheat is for tests only; set {ALLOW_ENV}=1 to allow it")
    mode, _, arg = mode.partition("=")
    if mode not in MODES:
        raise ValueError(f"unknown cheat {mode!r}; choose from {', '.join(MODES)}")
    if (mode == "other-file") != bool(arg):
        raise ValueError("other-file takes a file (other-file=PATH); no other cheat takes one")
    if mode in WEIGHTS_MODES:
        for name, engine in agent.engines.items():
            if _is_llamacpp(engine):
                raise ValueError(f"--cheat {mode} rewrites PyTorch weights; {name} runs on "
                                 "llama.cpp: use other-file=PATH (a coarser quantization or "
                                 "another model's GGUF)")
            degrade_weights(engine._model, mode, seed=seed)
    elif mode == "other-file":
        agent.engines = {n: serve_other_file(e, Path(arg), **load_options)
                         for n, e in agent.engines.items()}
    elif mode == "random-tokens":
        agent.engines = {n: RandomTokens(e, seed) for n, e in agent.engines.items()}
    elif mode == "replay":
        agent.engines = {n: Replay(e) for n, e in agent.engines.items()}
    elif mode in ("kv-nan", "kv-short"):
        agent.engines = {n: BadKvCache(e, mode) for n, e in agent.engines.items()}
    elif mode == "forged-signature":
        agent.identity = ForgingIdentity(agent.identity)
    elif mode == "overclaim":
        _overclaim(agent)
    elif mode in ("stage-noise", "stage-skip"):
        if agent.stages is None:
            raise ValueError(f"--cheat {mode} needs a layer range (--layers)")
        agent.stages.stages = {n: CheatingStage(e, mode, seed)
                               for n, e in agent.stages.stages.items()}


def _is_llamacpp(engine: Engine) -> bool:
    return type(engine).__module__.endswith(".llamacpp")


def serve_other_file(engine: Engine, path: Path, **load_options: Any) -> Engine:
    """An engine of ``path`` on ``engine``'s backend that claims to be ``engine`` (its model spec,
    weights hash included); ``engine`` is closed."""
    from sparecycles.node.backends import Backend, load_engine

    backend = Backend.LLAMACPP if _is_llamacpp(engine) else Backend.TRANSFORMERS
    other: Engine = load_engine(engine.name, path, backend, **load_options)
    if other.spec.weights_sha256 == engine.spec.weights_sha256:
        other.close()
        raise ValueError(f"{path} is the file the node claims: no cheat")
    other.spec = engine.spec
    engine.close()
    return other


def degrade_weights(model: Any, mode: str, *, seed: int = 0) -> None:
    """Change a loaded PyTorch model's weights in place: another model, or a lower-precision
    copy."""
    import torch  # a llama.cpp node has no torch; these modes are PyTorch's

    g = torch.Generator().manual_seed(seed + 1234)
    with torch.no_grad():
        for p in model.parameters():
            if mode == "different-model":
                p.copy_(torch.randn(p.shape, generator=g).to(p)
                        * p.float().std().clamp(min=1e-3))
            elif mode == "bf16":
                p.copy_(p.to(torch.bfloat16).to(p.dtype))
            elif mode == "int8":
                w = p.float()
                rows = w.reshape(w.shape[0], -1) if w.dim() > 1 else w.reshape(1, -1)
                scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
                p.copy_(((rows / scale).round().clamp(-127, 127) * scale)
                        .reshape(p.shape).to(p))
            else:
                raise ValueError(f"not a weights cheat: {mode}")


class _Wrapped(Engine):
    """An engine that delegates everything to the honest one it wraps."""

    def __init__(self, inner: Engine):
        self.inner = inner
        self.name, self.spec, self.device = inner.name, inner.spec, inner.device
        self.features = inner.features

    def submit(self, request: GenerationRequest, on_update: UpdateCallback) -> None:
        self.inner.submit(request, on_update)

    def cancel(self, request_id: str) -> None:
        self.inner.cancel(request_id)

    def stats(self) -> EngineStats:
        return self.inner.stats()

    def close(self) -> None:
        self.inner.close()

    def score(self, prompt_token_ids: tuple[int, ...], output_token_ids: tuple[int, ...], *,
              temperature: float = 1.0, top_p: float = 1.0, params: SamplingParams | None = None,
              resumed_tokens: int = 0) -> ScoreResult:
        return self.inner.score(prompt_token_ids, output_token_ids, temperature=temperature,
                                top_p=top_p, params=params, resumed_tokens=resumed_tokens)

    def export_kv(self, prefix: KvPrefix) -> tuple[protocol.KvLayout, list[tuple[bytes, bytes]]]:
        return self.inner.export_kv(prefix)

    def import_kv(self, layout: protocol.KvLayout, chunks: list[tuple[bytes, bytes]]
                  ) -> KvPrefix:
        return self.inner.import_kv(layout, chunks)


class BadKvCache(_Wrapped):
    """Hands off a broken KV cache: NaN in its first chunk (``kv-nan``), or (``kv-short``) a
    cache said to hold one position fewer than the prompt (its chunks cut to match)."""

    def __init__(self, inner: Engine, mode: str):
        super().__init__(inner)
        self.mode = mode

    def export_kv(self, prefix: KvPrefix) -> tuple[protocol.KvLayout, list[tuple[bytes, bytes]]]:
        if self.mode == "kv-short" and prefix.positions > 1:
            prefix = KvPrefix(tuple((k[:, :-1], v[:, :-1]) for k, v in prefix.layers),
                              prefix.positions - 1)
        layout, parts = self.inner.export_kv(prefix)
        if self.mode == "kv-nan":
            nan = {"float32": b"\x00\x00\xc0\x7f", "float16": b"\x00\x7e",
                   "bfloat16": b"\xc0\x7f"}[layout.dtype]  # a quiet NaN, little-endian
            keys, values = parts[0]
            parts[0] = (nan * (len(keys) // len(nan)), values)
        return layout, parts


class RandomTokens(_Wrapped):
    """Runs the real engine (so timing looks right) but sends random ids in place of its own."""

    def __init__(self, inner: Engine, seed: int = 0):
        super().__init__(inner)
        self._rng = random.Random(seed)
        self._vocab = int(getattr(inner, "vocab_size", 0)  # llama.cpp
                          or getattr(getattr(inner, "tokenizer", None), "vocab_size", 0) or 1000)

    def submit(self, request: GenerationRequest, on_update: UpdateCallback) -> None:
        def fake(u: GenerationUpdate) -> None:
            ids = tuple(self._rng.randrange(self._vocab) for _ in u.token_ids)
            lps = tuple(-self._rng.uniform(0.1, 5.0) for _ in ids) if u.logprobs else u.logprobs
            # the alternatives no longer match the tokens sent: a cheat drops them
            on_update(dataclasses.replace(u, token_ids=ids, logprobs=lps, top_logprobs=None))

        self.inner.submit(request, fake)


class Replay(_Wrapped):
    """Decodes its first job honestly and answers every later one with that same output."""

    def __init__(self, inner: Engine):
        super().__init__(inner)
        self._recorded: tuple[tuple[int, ...], tuple[float, ...]] | None = None

    def submit(self, request: GenerationRequest, on_update: UpdateCallback) -> None:
        if self._recorded is None:
            ids: list[int] = []
            lps: list[float] = []

            def record(u: GenerationUpdate) -> None:
                ids.extend(u.token_ids)
                lps.extend(u.logprobs or (0.0,) * len(u.token_ids))
                if u.finished and u.error is None and ids:
                    self._recorded = (tuple(ids), tuple(lps))
                on_update(u)

            self.inner.submit(request, record)
            return
        ids_r, lps_r = self._recorded
        n = min(len(ids_r), request.params.max_tokens)
        update = GenerationUpdate(request.request_id, ids_r[:n],
                                  lps_r[:n] if request.want_logprobs else None, finished=True,
                                  finish_reason=FinishReason.LENGTH)
        threading.Timer(0.01, on_update, args=(update,)).start()  # "after some work"


class ForgingIdentity:
    """Proves its real key at hello, then signs results with another key."""

    def __init__(self, real: NodeIdentity):
        self._real, self._other = real, NodeIdentity.generate()
        self.public_key_b64, self.node_id = real.public_key_b64, real.node_id

    def sign(self, payload: bytes) -> str:
        result = payload.startswith(b'{"attempt"')  # a result payload, not the hello nonce
        return (self._other if result else self._real).sign(payload)


def _overclaim(agent: Any) -> None:
    honest_report = agent._report

    def report(engine: Engine, run: Any, produced: list[int], last: Any,
               logprobs_sha256: str | None = None) -> protocol.Done:
        done = honest_report(engine, run, produced, last, logprobs_sha256)
        m = done.metering.model_copy(update={
            "completion_tokens": done.metering.completion_tokens * 2 + 5,
            "busy_s": done.metering.busy_s * 2})
        payload = protocol.result_payload(
            job_id=done.job_id, attempt=done.attempt, weights_sha256=engine.spec.weights_sha256,
            prompt_sha256=run.job.prompt_sha256, output_sha256=done.output_sha256,
            finish_reason=done.finish_reason, metering=m, logprobs_sha256=done.logprobs_sha256)
        return done.model_copy(update={"metering": m, "signature": agent.identity.sign(payload)})

    agent._report = report


class CheatingStage:
    """A stage engine (``StageEngine``) that runs its layers and then lies about their output."""

    def __init__(self, inner: Any, mode: str, seed: int = 0):
        self.inner, self.mode = inner, mode
        import torch  # a stage node runs PyTorch; a llama.cpp node never builds this

        self._g = torch.Generator().manual_seed(seed + 4321)

    def __getattr__(self, name: str) -> Any:  # first, end, layers_sha256, release, close, ...
        return getattr(self.inner, name)

    def forward(self, sequence_id: str, start: int, *, token_ids: list[int] | None = None,
                hidden: torch.Tensor | None = None, choose: SamplingParams | None = None,
                **kw: Any) -> Any:
        if self.mode == "stage-noise" and hidden is not None:  # computes on corrupted inputs
            hidden = self._noisy(hidden)
        result = self.inner.forward(sequence_id, start, token_ids=token_ids, hidden=hidden,
                                    choose=choose, **kw)
        if result.hidden is None:  # the last stage: its tokens come from the noisy inputs
            return result
        out = result.hidden
        if self.mode == "stage-noise":
            out = out if hidden is not None else self._noisy(out)
        elif hidden is not None:  # stage-skip: its input, untouched
            out = hidden.to(out.dtype)
        else:  # stage-skip, first stage: the embeddings of its tokens
            import torch

            with torch.inference_mode():
                ids = torch.tensor([token_ids or []], device=self.inner.device)
                out = self.inner._base.embed_tokens(ids)[0].to("cpu", out.dtype)
        return dataclasses.replace(result, hidden=out)

    def run(self, steps: list[Any]) -> list[Any]:
        """The stage worker's batched entry: each step alone, through the lie above."""
        out: list[Any] = []
        for step in steps:
            try:
                out.append(self.forward(step.sequence_id, step.start, token_ids=step.token_ids,
                                        hidden=step.hidden, choose=step.choose,
                                        score=step.score))
            except Exception as exc:
                out.append(exc)
        return out

    def _noisy(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` plus Gaussian noise as large as each row's root mean square."""
        scale = x.float().pow(2).mean(dim=-1, keepdim=True).sqrt()
        import torch

        return (x.float() + torch.randn(x.shape, generator=self._g) * scale).to(x.dtype)

"""The transformers backend: one Hugging Face model, one thread, continuous batching.

The engine thread loops: apply cancellations, prefill the requests that waited (together, in one
forward pass) and merge them into the running batch, then decode one token for every running
request in one forward pass, and drop the requests that finished. Requests therefore join and
leave between decode steps, and concurrent requests share the loaded weights and each step's
read of them, which is what makes decoding on a memory-bound device cheap per token.

The running batch keeps one KV cache, left-padded (``kvbatch.KVBatch``): row i holds request
i's keys and values right-aligned, an attention mask marks its real columns, and explicit
position ids give each request its own positions, so padding never changes which tokens a
request attends to. A request's greedy tokens are the same alone or in any batch (a test checks
this on the tiny fp32 model); bit-for-bit equal logits are not promised, since kernels may sum in
a different order for a different batch shape.

Only models whose cache layers are plain full-attention ``DynamicLayer``s are supported (Llama,
Qwen2, Mistral without a sliding window, ...); others are refused at load with a clear error.
"""

from __future__ import annotations

import collections
import concurrent.futures
import inspect
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from sparecycles import gguffile, grammar, limits, modelfiles, protocol
from sparecycles.errors import ContextLengthExceeded, InvalidRequest
from sparecycles.node.backends import sampling
from sparecycles.node.backends.base import (
    Engine,
    EngineClosed,
    EngineFull,
    EngineStats,
    GenerationRequest,
    GenerationUpdate,
    ScoreResult,
    UpdateCallback,
)
from sparecycles.node.backends.kvbatch import KVBatch, check_full_attention, left_padded
from sparecycles.types import FinishReason, ModelSpec, SamplingParams

log = logging.getLogger(__name__)

# Prompts prefilled in one forward pass hold at most this many (padded) tokens, which bounds the
# activation memory of a prefill; a longer prompt is still prefilled, alone.
prefill_tokens_max = 8192
idle_wait_s = 1.0  # the engine thread re-checks for work at least this often when idle
close_join_s = 30.0  # how long close() waits for a step in progress to end


@dataclass(slots=True, eq=False)
class _ScoreJob:
    """A teacher-forced scoring request waiting for the engine thread."""

    prompt: tuple[int, ...]
    output: tuple[int, ...]
    temperature: float
    top_p: float
    future: concurrent.futures.Future[ScoreResult]
    row: sampling.RowState | None = None  # the job's processing, when not plain


@dataclass(slots=True, eq=False)
class _Sequence:
    """One request inside the engine."""

    request: GenerationRequest
    on_update: UpdateCallback
    generator: torch.Generator | None
    n_cached: int = 0  # tokens of this request in the KV cache (also its next position id)
    pending: int = -1  # the last token chosen, fed to the model at the next decode step
    generated: list[int] = field(default_factory=list)
    finished: bool = False  # set once, under the engine's lock, when the final update goes out
    row: sampling.RowState | None = None  # the row step's state, for a request that is not plain


class TransformersEngine(Engine):
    """One model loaded with ``AutoModelForCausalLM``, serving concurrent requests in batches."""

    def __init__(
        self,
        name: str,
        model: Any,
        tokenizer: Any,
        spec: ModelSpec,
        *,
        batch_size_max: int = limits.batch_size_max,
        queue_max: int = limits.engine_queue_max,
        duty_cycle: float = 1.0,
    ) -> None:
        if batch_size_max < 1 or queue_max < 1:
            raise InvalidRequest("batch_size_max and queue_max must be >= 1")
        check_full_attention(model.config, name)
        self.name = name
        self.spec = spec
        self.device = str(model.device)
        self.tokenizer = tokenizer
        self._model = model
        self._batch_size_max = batch_size_max
        self._queue_max = queue_max
        if not 0.0 < duty_cycle <= 1.0:
            raise InvalidRequest("duty_cycle must be in (0, 1]")
        # The owner's cap on the share of time the device computes for the network (as BOINC's
        # "use at most N% of CPU time"): after a step of t seconds the engine rests
        # t * (1/duty_cycle - 1), so the device stays cool and responsive for its owner.
        self._duty_cycle = duty_cycle
        self._eos_ids = _eos_ids(model, tokenizer)
        self._vocab_size = model.get_input_embeddings().num_embeddings
        self.features = frozenset({protocol.FEATURE_SAMPLING_CONTROLS}
                                  | ({protocol.FEATURE_GRAMMAR} if grammar.available() else set()))
        self._grammars: grammar.GrammarCompiler | None = None  # built at the first grammar
        self._keep_last_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._waiting: collections.deque[_Sequence] = collections.deque()
        # Requests are tracked as objects, not ids: an id may be reused the moment its final
        # update is out, while the engine thread still holds the old sequence.
        self._active: dict[str, _Sequence] = {}  # waiting or running, by request id
        self._cancelled: set[_Sequence] = set()
        self._scores: list[_ScoreJob] = []  # verification passes, run between decode steps
        self._closing = False
        self._stats = EngineStats()

        # Touched by the engine thread only.
        self._batch: list[_Sequence] = []  # row i of self._kv is self._batch[i]
        self._kv: KVBatch | None = None

        self._thread = threading.Thread(target=self._run, name=f"engine:{name}", daemon=True)
        self._thread.start()

    @classmethod
    def load(
        cls,
        name: str,
        source: str | Path,
        *,
        device: str = "auto",
        dtype: str | torch.dtype | None = None,
        batch_size_max: int = limits.batch_size_max,
        queue_max: int = limits.engine_queue_max,
        duty_cycle: float = 1.0,
    ) -> TransformersEngine:
        """Load ``source`` (a local directory, a GGUF file, or a hub id where the hub is
        reachable).

        ``device="auto"`` picks CUDA when available, else the CPU. Without ``dtype`` the CPU gets
        float32 (half precision is slow or unsupported in CPU kernels) and CUDA the config's dtype.
        """
        path = modelfiles.resolve_source(source)
        if device == "auto":
            device = "cuda:0" if torch.cuda.is_available() else "cpu"
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype.removeprefix("torch."))
        if dtype is None:
            dtype = torch.float32 if device == "cpu" else "auto"
        if path.is_file():  # a GGUF: transformers dequantizes it (needs gguf and accelerate)
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    path.parent, gguf_file=path.name, dtype=dtype)
            except (ValueError, NotImplementedError, KeyError) as exc:
                raise gguffile.GGUFError(f"{path.name}: transformers cannot load it: {exc}"
                                         ) from exc
            model = model.to(device).eval()  # type: ignore[arg-type]
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            # PreTrainedModel.to is functools.wraps(nn.Module.to), and typeshed's _Wrapped has
            # no __get__: mypy does not bind self, and takes the device for it
            model = model.to(device).eval()  # type: ignore[arg-type]
        tokenizer = modelfiles.load_tokenizer(path)
        spec = modelfiles.model_spec(name, path, dtype=model.dtype)
        return cls(name, model, tokenizer, spec, batch_size_max=batch_size_max, queue_max=queue_max,
                   duty_cycle=duty_cycle)

    # --- the interface, called from any thread ------------------------------------------------

    def submit(self, request: GenerationRequest, on_update: UpdateCallback) -> None:
        n_prompt = len(request.prompt_token_ids)
        if n_prompt == 0:
            raise InvalidRequest("the prompt has no tokens")
        if n_prompt >= self.spec.context_length:
            raise ContextLengthExceeded(
                f"the prompt has {n_prompt} tokens; {self.name} holds {self.spec.context_length}"
                " including at least one generated token"
            )
        if request.params.max_tokens < 1:
            raise InvalidRequest("max_tokens must be >= 1", param="max_tokens")
        if not all(0 <= t < self._vocab_size for t in request.prompt_token_ids):
            raise InvalidRequest(f"prompt token ids must lie in [0, {self._vocab_size})")
        if not 0 <= request.resumed_tokens < n_prompt:
            raise InvalidRequest("resumed_tokens must be shorter than the prompt")
        row = self._row(request.params, request.prompt_token_ids, request.resumed_tokens)
        generator = None if row is not None else sampling.make_generator(request.params,
                                                                         self.device)
        sequence = _Sequence(request, on_update, generator, row=row)
        with self._lock:
            if self._closing:
                raise EngineClosed(f"engine {self.name} is closed")
            if len(self._waiting) >= self._queue_max:
                raise EngineFull(f"{len(self._waiting)} requests already wait for {self.name}")
            if request.request_id in self._active:
                raise InvalidRequest(f"request {request.request_id!r} is already running")
            self._active[request.request_id] = sequence
            self._waiting.append(sequence)
            self._wakeup.notify()

    def cancel(self, request_id: str) -> None:
        with self._lock:
            sequence = self._active.get(request_id)
            if sequence is not None:
                self._cancelled.add(sequence)
                self._wakeup.notify()

    def _row(self, params: SamplingParams, prompt: tuple[int, ...], resumed: int
             ) -> sampling.RowState | None:
        """The row step's state for a request that is not plain (compiles its grammar here, on
        the caller's thread, so the batch never waits for it); None for the batched path."""
        if params.is_plain:
            return None
        matcher = None
        if params.grammar is not None:
            if self._grammars is None:
                self._grammars = grammar.GrammarCompiler(grammar.from_hf_tokenizer(
                    self.tokenizer, self._vocab_size, self._eos_ids))
            matcher = self._grammars.matcher(params.grammar).matcher
        row = sampling.start_row(params, prompt, sorted(self._eos_ids), resumed_tokens=resumed,
                                 matcher=matcher)
        if error := sampling.row_error(row):
            raise InvalidRequest(f"the resumed output breaks the grammar: {error}")
        return row

    def score(self, prompt_token_ids: tuple[int, ...], output_token_ids: tuple[int, ...], *,
              temperature: float = 1.0, top_p: float = 1.0,
              params: SamplingParams | None = None, resumed_tokens: int = 0) -> ScoreResult:
        n = len(prompt_token_ids) + len(output_token_ids)
        if not prompt_token_ids or not output_token_ids:
            raise InvalidRequest("scoring needs a prompt and at least one output token")
        if n > self.spec.context_length:
            raise ContextLengthExceeded(f"{n} tokens exceed {self.name}'s context")
        if not all(0 <= t < self._vocab_size for t in (*prompt_token_ids, *output_token_ids)):
            raise InvalidRequest(f"token ids must lie in [0, {self._vocab_size})")
        row = None
        if params is not None:
            row = self._row(params, tuple(prompt_token_ids), resumed_tokens)
        job = _ScoreJob(tuple(prompt_token_ids), tuple(output_token_ids), temperature, top_p,
                        concurrent.futures.Future(), row)
        with self._lock:
            if self._closing:
                raise EngineClosed(f"engine {self.name} is closed")
            if len(self._scores) >= self._queue_max:
                raise EngineFull(f"{len(self._scores)} scoring passes already wait")
            self._scores.append(job)
            self._wakeup.notify()
        return job.future.result(timeout=limits.verification_timeout_s)

    def stats(self) -> EngineStats:
        with self._lock:
            s = self._stats
            return EngineStats(
                requests_active=len(self._active) - len(self._waiting),
                requests_waiting=len(self._waiting),
                tokens_generated=s.tokens_generated,
                decode_steps=s.decode_steps,
                busy_s=s.busy_s,
                batch_size_hist=dict(s.batch_size_hist),
            )

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._wakeup.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(close_join_s)

    # --- the engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        error = "engine closed"
        try:
            with torch.inference_mode():
                self._loop()
        except BaseException as exc:  # the loop itself broke: say so, and refuse new work
            log.exception("engine %s: thread stopped", self.name)
            error = f"engine stopped: {exc}"
        with self._lock:
            self._closing = True
            leftovers = self._batch + list(self._waiting)
            self._waiting.clear()
            scores, self._scores = self._scores, []
        self._fail(leftovers, error)
        for job in scores:
            job.future.set_exception(EngineClosed(error))
        self._reset_batch()
        self._model = None  # let the weights go: a closed engine is an unloaded model
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._closing or self._waiting or self._batch or self._cancelled
                           or self._scores):
                    self._wakeup.wait(idle_wait_s)
                if self._closing:
                    return
                cancelled, self._cancelled = self._cancelled, set()
                scores, self._scores = self._scores, []
                for s in self._waiting.copy():
                    if s in cancelled:
                        self._waiting.remove(s)
                admitted = self._take_admissible()
            for job in scores:
                self._run_score(job)
            try:
                self._step(cancelled, admitted)
            except Exception as exc:  # a bug, not a model error: fail what runs, carry on
                log.exception("engine %s: step failed", self.name)
                self._fail(self._batch + admitted, f"engine error: {exc}")
                self._reset_batch()

    def _take_admissible(self) -> list[_Sequence]:
        """Waiting requests that fit the batch and one prefill's token budget (lock held)."""
        taken: list[_Sequence] = []
        longest = 0
        while self._waiting and len(self._batch) + len(taken) < self._batch_size_max:
            n = len(self._waiting[0].request.prompt_token_ids)
            if taken and max(longest, n) * (len(taken) + 1) > prefill_tokens_max:
                break
            longest = max(longest, n)
            taken.append(self._waiting.popleft())
        return taken

    def _step(self, cancelled: set[_Sequence], admitted: list[_Sequence]) -> None:
        for s in cancelled:  # waiting or running; finishing twice is a no-op
            self._finish(s, FinishReason.STOP)
        self._drop([s for s in self._batch if s.finished])
        if admitted:
            started = time.perf_counter()
            try:
                kv = self._prefill(admitted)
            except Exception as exc:  # e.g. out of memory: only this group fails
                log.exception("engine %s: prefill failed", self.name)
                self._fail(admitted, f"prefill failed: {exc}")
            else:
                if self._kv is None:
                    self._kv = kv
                else:
                    self._kv.merge(kv)
                self._batch.extend(admitted)
                self._drop([s for s in admitted if s.finished])
            self._add_busy(time.perf_counter() - started, 0, 0)
        if self._batch:
            started = time.perf_counter()
            batch = list(self._batch)
            try:
                finished = self._decode(batch)
            except Exception as exc:
                log.exception("engine %s: decode step failed", self.name)
                self._fail(batch, f"decode failed: {exc}")
                self._reset_batch()
                finished = []
            self._add_busy(time.perf_counter() - started, len(batch), 1)
            self._drop(finished)

    def _prefill(self, group: list[_Sequence]) -> KVBatch:
        """Run the group's prompts (left-padded) through the model; emit each first token."""
        prompts = [s.request.prompt_token_ids for s in group]
        ids, mask, positions = left_padded(prompts, self.device)
        cache = DynamicCache(config=self._model.config)
        extra = {"logits_to_keep": 1} if self._keep_last_logits else {}
        out = self._model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            **extra,
        )
        kv = KVBatch(cache, mask)
        kv.zero_padding()
        for s in group:
            s.n_cached = len(s.request.prompt_token_ids)
        self._choose(group, out.logits[:, -1, :])
        return kv

    def _decode(self, batch: list[_Sequence]) -> list[_Sequence]:
        """One forward pass over the running batch; returns the sequences that finished."""
        assert self._kv is not None
        ids = torch.tensor([[s.pending] for s in batch], device=self.device)
        positions = torch.tensor([[s.n_cached] for s in batch], device=self.device)
        out = self._model(
            input_ids=ids,
            attention_mask=self._kv.grow(),
            position_ids=positions,
            past_key_values=self._kv.cache,
            use_cache=True,
        )
        for s in batch:
            s.n_cached += 1
        self._choose(batch, out.logits[:, -1, :])
        return [s for s in batch if s.finished]

    def _run_score(self, job: _ScoreJob) -> None:
        started = time.perf_counter()
        try:
            result = self._score(job)
        except Exception as exc:  # e.g. out of memory: only this pass fails
            log.exception("engine %s: scoring failed", self.name)
            job.future.set_exception(exc)
            return
        busy_s = time.perf_counter() - started
        if self._duty_cycle < 1.0:
            time.sleep(busy_s * (1.0 / self._duty_cycle - 1.0))
        logprobs, top, above, expected, variances = result
        job.future.set_result(ScoreResult(logprobs, top, above, expected, variances, busy_s=busy_s))

    def _score(self, job: _ScoreJob) -> tuple[tuple[float, ...], ...]:
        """One forward pass over prompt + output; statistics of each output position."""
        n_out = len(job.output)
        ids = torch.tensor([job.prompt + job.output], device=self.device)
        extra = {"logits_to_keep": n_out + 1} if self._keep_last_logits else {}
        logits = self._model(input_ids=ids, use_cache=False, **extra).logits[0]
        # position p predicts token p + 1: the rows before each output token
        logits = logits[-(n_out + 1) : -1].float()
        if job.row is not None:
            rows = [sampling.score_row(logits[i].cpu().numpy(), token, job.row)
                    for i, token in enumerate(job.output)]
            return tuple(tuple(r[k] for r in rows) for k in range(5))
        return sampling.score_positions(
            logits, torch.tensor(job.output, device=self.device), job.temperature, job.top_p)

    def _choose(self, batch: list[_Sequence], logits: torch.Tensor) -> None:
        """Pick each sequence's next token, tell its caller, and finish it where it ends."""
        logits = logits.float()
        chosen = self._draw(batch, logits)
        want = any(s.request.want_logprobs for s in batch)
        logprobs = None
        if want:
            index = torch.tensor(chosen, device=logits.device)
            logprobs = sampling.token_logprobs(logits, index).tolist()
        for row, (s, token) in enumerate(zip(batch, chosen, strict=True)):
            p = s.request.params
            lp = (logprobs[row],) if logprobs is not None and s.request.want_logprobs else None
            top = None
            if p.logprobs or p.top_logprobs:  # the client's: from the raw row, on the CPU
                one, best = sampling.logprobs_of(logits[row].cpu().numpy(), token,
                                                 p.top_logprobs)
                lp, top = (one,), (best,)
            if token in self._eos_ids:
                self._finish(s, FinishReason.STOP, logprobs=() if lp is not None else None,
                             top_logprobs=() if top is not None else None)
                continue
            s.generated.append(token)
            s.pending = token
            reason = self._finish_reason(s)
            if s.row is not None:
                sampling.accept(s.row, token)
                if error := sampling.row_error(s.row):
                    self._finish(s, None, error=f"grammar: {error}")
                    continue
                if reason is None and sampling.row_done(s.row):
                    reason = FinishReason.STOP
            if reason is None:
                self._deliver(s, GenerationUpdate(s.request.request_id, (token,), lp,
                                                  top_logprobs=top))
            else:
                self._finish(s, reason, token_ids=(token,), logprobs=lp, top_logprobs=top)
        with self._lock:
            self._stats.tokens_generated += len(batch)

    def _draw(self, batch: list[_Sequence], logits: torch.Tensor) -> list[int]:
        """Each row's next token: the batched fast path for plain requests, the row step
        (``sampling.process_logits`` and ``draw``, on the CPU) for the others."""
        plain = [i for i, s in enumerate(batch) if s.row is None]
        chosen = [0] * len(batch)
        if plain:
            sub = logits if len(plain) == len(batch) else logits[plain]
            drawn = sampling.next_tokens(sub, [batch[i].request.params for i in plain],
                                         [batch[i].generator for i in plain]).tolist()
            for i, token in zip(plain, drawn, strict=True):
                chosen[i] = token
        for i, s in enumerate(batch):
            if s.row is not None:
                processed = sampling.process_logits(logits[i].cpu().numpy(), s.row)
                chosen[i] = sampling.draw(processed, s.row)
        return chosen

    def _finish_reason(self, s: _Sequence) -> FinishReason | None:
        params = s.request.params
        if params.stop:
            window = s.generated[-sampling.stop_window_tokens(params.stop) :]
            tail = self.tokenizer.decode(window, skip_special_tokens=True)
            if sampling.hits_stop(tail, params.stop):
                return FinishReason.STOP
        if len(s.generated) >= params.max_tokens:
            return FinishReason.LENGTH
        if len(s.request.prompt_token_ids) + len(s.generated) >= self.spec.context_length:
            return FinishReason.LENGTH
        return None

    def _drop(self, leaving: list[_Sequence]) -> None:
        """Remove finished sequences from the running batch."""
        if not leaving:
            return
        gone = {id(s) for s in leaving}
        keep = [row for row, s in enumerate(self._batch) if id(s) not in gone]
        if not keep:
            self._reset_batch()
            return
        assert self._kv is not None
        self._kv.keep(keep)
        self._batch = [self._batch[row] for row in keep]

    def _reset_batch(self) -> None:
        self._batch, self._kv = [], None

    # --- telling callers ------------------------------------------------------------------------

    def _finish(
        self,
        s: _Sequence,
        reason: FinishReason | None,
        *,
        token_ids: tuple[int, ...] = (),
        logprobs: tuple[float, ...] | None = None,
        top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None,
        error: str | None = None,
    ) -> None:
        with self._lock:
            if s.finished:
                return  # already finished (a cancel that raced its natural end)
            s.finished = True
            if self._active.get(s.request.request_id) is s:
                del self._active[s.request.request_id]
        update = GenerationUpdate(
            request_id=s.request.request_id,
            token_ids=token_ids,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            finished=True,
            finish_reason=reason if error is None else None,
            error=error,
        )
        self._deliver(s, update)

    def _fail(self, sequences: list[_Sequence], error: str) -> None:
        for s in sequences:
            self._finish(s, None, error=error)

    def _deliver(self, s: _Sequence, update: GenerationUpdate) -> None:
        try:
            s.on_update(update)
        except Exception:  # the caller's bug must not stop everyone else's requests
            log.exception("engine %s: on_update raised for %s", self.name, update.request_id)

    def _add_busy(self, seconds: float, batch_size: int, steps: int) -> None:
        if self._duty_cycle < 1.0:
            time.sleep(seconds * (1.0 / self._duty_cycle - 1.0))
        with self._lock:
            self._stats.busy_s += seconds
            if steps:
                self._stats.decode_steps += steps
                hist = self._stats.batch_size_hist
                hist[batch_size] = hist.get(batch_size, 0) + 1


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(getattr(tokenizer, "eos_token_id", None))
    return frozenset(i for i in ids if isinstance(i, int))

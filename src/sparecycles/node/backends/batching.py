"""What every continuously batching engine shares, whatever runs its forward passes.

A backend (``transformers``, ``llamacpp``) subclasses ``BatchingEngine`` and writes only what
touches its library: loading, one step of the running batch, teacher-forced scoring, turning
token ids back into text, and freeing what a finished request held. Everything around that is
here, once:

- the interface's checks and queues: ``submit`` (prompt, context, vocabulary, resumed output),
  ``cancel``, ``score`` (waits for the engine thread), ``stats`` and ``close``;
- the row step's state for requests that are not plain (``sampling.start_row``; the grammar
  compiled on the caller's thread so the batch never waits for it);
- the engine thread's frame: wait for work, take the cancellations, and on the way out fail
  whatever still runs and every scoring pass still queued;
- what happens after a token is chosen (``_emit``): end-of-generation, stop strings,
  ``max_tokens`` and the context, the grammar's verdict, the update to the caller;
- telling callers (each request's final update exactly once, even when a cancel races its end)
  and the owner's duty cycle (after t seconds of work, rest t * (1/duty_cycle - 1)).

Thread rules are those of ``base.Engine``: ``submit``, ``cancel`` and ``score`` from any thread;
``on_update`` callbacks on the engine thread. State shared with callers is guarded by
``self._lock``; the running batch belongs to the engine thread alone.
"""

from __future__ import annotations

import abc
import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from sparecycles import grammar, limits, protocol
from sparecycles.errors import ContextLengthExceeded, InvalidRequest
from sparecycles.node.backends import npsampling, sampling
from sparecycles.node.backends.base import (
    Engine,
    EngineClosed,
    EngineFull,
    EngineStats,
    GenerationRequest,
    GenerationUpdate,
    KvPrefix,
    ScoreResult,
    UpdateCallback,
)
from sparecycles.types import FinishReason, SamplingParams

log = logging.getLogger(__name__)

idle_wait_s = 1.0  # the engine thread re-checks for work at least this often when idle
close_join_s = 30.0  # how long close() waits for a step in progress to end

TopLogprobs = tuple[tuple[tuple[int, float], ...], ...]


@dataclass(slots=True, eq=False)
class ScoreJob:
    """A teacher-forced scoring request waiting for the engine thread."""

    prompt: tuple[int, ...]
    output: tuple[int, ...]
    temperature: float
    top_p: float
    future: concurrent.futures.Future[ScoreResult]
    row: sampling.RowState | None = None  # the job's processing, when not plain


@dataclass(slots=True, eq=False)
class Sequence:
    """One request inside an engine; a backend's subclass adds what its batch needs."""

    request: GenerationRequest
    on_update: UpdateCallback
    pending: int = -1  # the last token chosen, fed to the model at the next step
    generated: list[int] = field(default_factory=list)
    finished: bool = False  # set once, under the engine's lock, when the final update goes out
    row: sampling.RowState | None = None  # the row step's state, for a request that is not plain


S = TypeVar("S", bound=Sequence)


class BatchingEngine(Engine, Generic[S]):
    """The shared frame of an engine thread serving concurrent requests in batches.

    A subclass sets ``name``, ``spec``, ``device``, ``features``, ``vocab_size`` and
    ``_eos_ids``, calls ``_start_engine`` at the end of its ``__init__``, and implements the
    abstract methods below.
    """

    vocab_size: int
    _eos_ids: frozenset[int]  # every end-of-generation token

    def _start_engine(self, *, batch_size_max: int, queue_max: int, duty_cycle: float) -> None:
        """Set up the queues and start the engine thread (the model must be loaded by now)."""
        self._batch_size_max = batch_size_max
        self._queue_max = queue_max
        # The owner's cap on the share of time the device computes for the network (as BOINC's
        # "use at most N% of CPU time"): after a step of t seconds the engine rests
        # t * (1/duty_cycle - 1), so the device stays cool and responsive for its owner.
        self._duty_cycle = duty_cycle
        self._grammars: grammar.GrammarCompiler | None = None  # built at the first grammar
        self._grammars_lock = threading.Lock()
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._waiting: collections.deque[S] = collections.deque()
        # Requests are tracked as objects, not ids: an id may be reused the moment its final
        # update is out, while the engine thread still holds the old sequence.
        self._active: dict[str, S] = {}  # waiting or running, by request id
        self._cancelled: set[S] = set()
        self._scores: collections.deque[ScoreJob] = collections.deque()
        self._closing = False
        self._stats = EngineStats()
        self._thread = threading.Thread(target=self._run, name=f"engine:{self.name}",
                                        daemon=True)
        self._thread.start()

    @staticmethod
    def check_limits(batch_size_max: int, queue_max: int, duty_cycle: float) -> None:
        if batch_size_max < 1 or queue_max < 1:
            raise InvalidRequest("batch_size_max and queue_max must be >= 1")
        if not 0.0 < duty_cycle <= 1.0:
            raise InvalidRequest("duty_cycle must be in (0, 1]")

    # --- what a backend writes ------------------------------------------------------------------

    @abc.abstractmethod
    def _new_sequence(self, request: GenerationRequest, on_update: UpdateCallback,
                      row: sampling.RowState | None) -> S:
        """The backend's sequence for a checked request (its random generator, KV reservation,
        ...); ``row`` is the row step's state, None for a plain request."""

    @abc.abstractmethod
    def _loop(self) -> None:
        """The engine thread's work until ``_wait_for_work`` says the engine is closing."""

    @abc.abstractmethod
    def _running_sequences(self) -> list[S]:
        """The requests in the running batch (engine thread)."""

    @abc.abstractmethod
    def _score(self, job: ScoreJob) -> tuple[tuple[float, ...], ...]:
        """One teacher-forced pass: (chosen, top, mass above, expected, variance) per output
        position (engine thread)."""

    @abc.abstractmethod
    def _teardown(self) -> None:
        """Let the model go after the loop ended and every caller was told (engine thread)."""

    @abc.abstractmethod
    def detokenize(self, token_ids: list[int]) -> str:
        """The text of ``token_ids``, special tokens left out (stop strings are matched on it)."""

    @abc.abstractmethod
    def _grammar_tokenizer(self) -> grammar.GrammarCompiler:
        """llguidance's compiler over this model's vocabulary (built once, on first use)."""

    def _on_finished(self, s: S) -> None:
        """Free what ``s`` held, before its caller hears it ended (engine thread only)."""

    def _exported_kv(self, s: S) -> KvPrefix | None:
        """The prompt's KV cache of an ``export_kv`` request that ends now (engine thread only);
        None where there is none to give."""
        return None

    # --- the interface, called from any thread ------------------------------------------------

    def submit(self, request: GenerationRequest, on_update: UpdateCallback) -> None:
        n_prompt = len(request.prompt_token_ids)
        if n_prompt == 0:
            raise InvalidRequest("the prompt has no tokens")
        if n_prompt >= self.spec.context_length:
            raise ContextLengthExceeded(
                f"the prompt has {n_prompt} tokens; {self.name} holds {self.spec.context_length}"
                " here, including at least one generated token"
            )
        if request.params.max_tokens < 1:
            raise InvalidRequest("max_tokens must be >= 1", param="max_tokens")
        if not all(0 <= t < self.vocab_size for t in request.prompt_token_ids):
            raise InvalidRequest(f"prompt token ids must lie in [0, {self.vocab_size})")
        if not 0 <= request.resumed_tokens < n_prompt:
            raise InvalidRequest("resumed_tokens must be shorter than the prompt")
        if ((request.kv_prefix is not None or request.export_kv)
                and protocol.FEATURE_KV_HANDOFF not in self.features):
            raise InvalidRequest(f"{self.name} cannot hand off a KV cache")
        if request.kv_prefix is not None and not 0 < request.kv_prefix.positions < n_prompt:
            raise InvalidRequest("a KV prefix must leave at least one prompt token to prefill")
        row = self._row(request.params, request.prompt_token_ids, request.resumed_tokens)
        sequence = self._new_sequence(request, on_update, row)
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

    def score(self, prompt_token_ids: tuple[int, ...], output_token_ids: tuple[int, ...], *,
              temperature: float = 1.0, top_p: float = 1.0, params: SamplingParams | None = None,
              resumed_tokens: int = 0) -> ScoreResult:
        n = len(prompt_token_ids) + len(output_token_ids)
        if not prompt_token_ids or not output_token_ids:
            raise InvalidRequest("scoring needs a prompt and at least one output token")
        if n > self.spec.context_length:
            raise ContextLengthExceeded(f"{n} tokens exceed {self.name}'s context here")
        if not all(0 <= t < self.vocab_size for t in (*prompt_token_ids, *output_token_ids)):
            raise InvalidRequest(f"token ids must lie in [0, {self.vocab_size})")
        row = None
        if params is not None:
            row = self._row(params, tuple(prompt_token_ids), resumed_tokens)
        job = ScoreJob(tuple(prompt_token_ids), tuple(output_token_ids), temperature, top_p,
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
                prompt_tokens=s.prompt_tokens,
                prompt_tokens_cached=s.prompt_tokens_cached,
                batch_size_hist=dict(s.batch_size_hist),
            )

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._wakeup.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(close_join_s)

    def _row(self, params: SamplingParams, prompt: tuple[int, ...], resumed: int
             ) -> sampling.RowState | None:
        """The row step's state for a request that is not plain (its grammar compiled here, on
        the caller's thread, so the batch never waits for it); None for the plain path."""
        if params.is_plain:
            return None
        matcher = None
        if params.grammar is not None:
            with self._grammars_lock:
                if self._grammars is None:
                    self._grammars = self._grammar_tokenizer()
                compiler = self._grammars
            matcher = compiler.matcher(params.grammar).matcher
        row = sampling.start_row(params, prompt, sorted(self._eos_ids), resumed_tokens=resumed,
                                 matcher=matcher)
        if error := sampling.row_error(row):
            raise InvalidRequest(f"the resumed output breaks the grammar: {error}")
        return row

    # --- the engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        error = "engine closed"
        try:
            self._loop()
        except BaseException as exc:  # the loop itself broke: say so, and refuse new work
            log.exception("engine %s: thread stopped", self.name)
            error = f"engine stopped: {exc}"
        with self._lock:
            self._closing = True
            leftovers = self._running_sequences() + list(self._waiting)
            self._waiting.clear()
            scores, self._scores = list(self._scores), collections.deque()
        self._fail(leftovers, error)
        for job in scores:
            job.future.set_exception(EngineClosed(error))
        self._teardown()

    def _wait_for_work(self) -> set[S] | None:
        """Wait until there is something to do (lock held by the caller); None when closing,
        else the requests cancelled since the last call, taken out of the waiting queue."""
        while not (self._closing or self._waiting or self._running_sequences() or self._cancelled
                   or self._scores):
            self._wakeup.wait(idle_wait_s)
        if self._closing:
            return None
        cancelled, self._cancelled = self._cancelled, set()
        if cancelled:
            for s in self._waiting.copy():
                if s in cancelled:
                    self._waiting.remove(s)
        return cancelled

    def _emit(self, s: S, token: int, lp: tuple[float, ...] | None,
              top: TopLogprobs | None) -> None:
        """``token`` was chosen for ``s``: end it at an end-of-generation token, a stop string,
        its length or the context, or where its grammar ends or breaks; else send it on."""
        if token in self._eos_ids:
            self._finish(s, FinishReason.STOP, logprobs=() if lp is not None else None,
                         top_logprobs=() if top is not None else None)
            return
        s.generated.append(token)
        s.pending = token
        reason = self._finish_reason(s)
        if s.row is not None:
            sampling.accept(s.row, token)
            if error := sampling.row_error(s.row):
                self._finish(s, None, error=f"grammar: {error}")
                return
            if reason is None and sampling.row_done(s.row):
                reason = FinishReason.STOP
        if reason is None:
            self._deliver(s, GenerationUpdate(s.request.request_id, (token,), lp,
                                              top_logprobs=top))
        else:
            self._finish(s, reason, token_ids=(token,), logprobs=lp, top_logprobs=top)

    def _finish_reason(self, s: S) -> FinishReason | None:
        params = s.request.params
        if params.stop:
            window = s.generated[-npsampling.stop_window_tokens(params.stop) :]
            if npsampling.hits_stop(self.detokenize(window), params.stop):
                return FinishReason.STOP
        if len(s.generated) >= params.max_tokens:
            return FinishReason.LENGTH
        if len(s.request.prompt_token_ids) + len(s.generated) >= self.spec.context_length:
            return FinishReason.LENGTH
        return None

    def _run_score(self, job: ScoreJob) -> None:
        started = time.perf_counter()
        try:
            result = self._score(job)
        except Exception as exc:  # e.g. out of memory: only this pass fails
            log.exception("engine %s: scoring failed", self.name)
            job.future.set_exception(exc)
            return
        busy_s = time.perf_counter() - started
        self._rest(busy_s)
        chosen, top, above, expected, variances = result
        job.future.set_result(ScoreResult(chosen, top, above, expected, variances, busy_s=busy_s))

    # --- telling callers ------------------------------------------------------------------------

    def _finish(
        self,
        s: S,
        reason: FinishReason | None,
        *,
        token_ids: tuple[int, ...] = (),
        logprobs: tuple[float, ...] | None = None,
        top_logprobs: TopLogprobs | None = None,
        error: str | None = None,
    ) -> None:
        with self._lock:
            if s.finished:
                return  # already finished (a cancel that raced its natural end)
            s.finished = True
            if self._active.get(s.request.request_id) is s:
                del self._active[s.request.request_id]
        kv = None
        if threading.current_thread() is self._thread:
            if s.request.export_kv and reason is FinishReason.LENGTH and error is None:
                kv = self._exported_kv(s)
            self._on_finished(s)
        update = GenerationUpdate(
            request_id=s.request.request_id,
            token_ids=token_ids,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            finished=True,
            finish_reason=reason if error is None else None,
            error=error,
            kv=kv,
        )
        self._deliver(s, update)

    def _fail(self, sequences: list[S], error: str) -> None:
        for s in sequences:
            self._finish(s, None, error=error)

    def _deliver(self, s: S, update: GenerationUpdate) -> None:
        try:
            s.on_update(update)
        except Exception:  # the caller's bug must not stop everyone else's requests
            log.exception("engine %s: on_update raised for %s", self.name, update.request_id)

    def _rest(self, busy_s: float) -> None:
        if self._duty_cycle < 1.0:
            time.sleep(busy_s * (1.0 / self._duty_cycle - 1.0))

    def _count_tokens(self, n: int) -> None:
        with self._lock:
            self._stats.tokens_generated += n

    def _add_busy(self, seconds: float, batch_size: int, steps: int) -> None:
        """Count a step's work (and rest for the duty cycle): ``steps`` decode steps of
        ``batch_size`` sequences."""
        self._rest(seconds)
        with self._lock:
            self._stats.busy_s += seconds
            if steps:
                self._stats.decode_steps += steps
                hist = self._stats.batch_size_hist
                hist[batch_size] = hist.get(batch_size, 0) + 1

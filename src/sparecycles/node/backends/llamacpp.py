"""The llama.cpp backend: one GGUF model, one thread, continuous batching; no torch.

Built on llama-cpp-python's low-level binding (the C API one to one), as llama.cpp's own server
works: one context whose KV cache holds every running request, each request a sequence of its
own (``seq_id`` = its slot) with its own cells. Each step builds one ``llama_batch`` with, for
every running request, its last chosen token (position = tokens it has in the cache), and then
the prompts that wait, cut to the batch's token budget (a long prompt is fed over several steps,
so it never stalls the others' decoding for long). One ``llama_decode`` computes them all;
the logits of each row that wants one go through ``npsampling`` (numpy) for a plain request,
or through the row step of ``sampling`` (penalties, logit_bias, top_k, min_p, min_tokens,
ignore_eos, and an llguidance grammar built on llama.cpp's own vocabulary) for one that is not
(``SamplingParams.is_plain``). A request that ends frees its slot for the next.

The prefix cache, as llama.cpp's server does it: a slot whose request ended keeps that request's
cells (prompt and answer), and a new request takes the free slot whose kept tokens share the
longest prefix with its prompt, cuts the rest (``llama_memory_seq_rm`` from the first differing
position) and prefills only what follows. The next turn of a conversation resends the whole
history, so it prefills only the new message. Kept cells are evicted, least recently used
first, whenever a request or a scoring pass needs their room; they never hold up admission.

The KV cache is one buffer shared by all sequences (``kv_unified``) of ``kv_tokens`` cells. A
request is admitted only when the cells it may need (prompt + max_tokens, up to the context)
fit beside those the running requests reserved, so a decode never runs out of cells mid-way;
the model's context as this node serves it is therefore ``min(trained context, kv_tokens)``.

Teacher-forced scoring (verification) runs between steps on a slot of its own: prompt + claimed
output in as many batches as needed, with the logits of every position before a claimed token;
a job that was not plain is scored with its own processing (``sampling.score_row``).
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import functools
import logging
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sparecycles import gguffile, grammar, limits, modelfiles, protocol
from sparecycles.errors import InvalidRequest
from sparecycles.node.backends import npsampling, sampling
from sparecycles.node.backends.base import GenerationRequest, UpdateCallback
from sparecycles.node.backends.batching import BatchingEngine, ScoreJob, Sequence
from sparecycles.types import FinishReason, ModelSpec

log = logging.getLogger(__name__)

# KV cells shared by all of one model's requests (the most tokens it holds at once, and the
# longest context it serves): 8,192 cost SmolLM2-135M 190 MB in f16 (30 layers x 3 KV heads
# x 64 dims x 2 x 2 bytes = 23 KB a token); a bigger model costs more per cell.
kv_tokens_default = 8192
# Tokens per llama_decode call (decode tokens first, then prompt chunks): llama.cpp's default
# physical batch; a prompt longer than this is fed over several steps.
batch_tokens_default = 512
load_errors_kept = 20  # llama.cpp log lines kept to explain a failed load
# ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (llama-cpp-python's _logger.py still
# maps the older numbering, so its own names are not used)
ggml_log_level_error = 4
# llama.cpp built with -march=native on a CPU with AMX (pip's default build does so) compiles in
# its AMX matrix kernels, and on a 2-vCPU Xeon cloud VM with AMX they crashed the process at the
# first decode (2026-12-07, llama-cpp-python 0.3.36: SIGSEGV in ggml_backend_amx_mul_mat,
# SmolLM2 Q4_1). They run from llama.cpp's "extra" weight buffers, to be had all or none, so a
# model is loaded without any (no AMX, and no weights repacked for this CPU's vector units) when
# the library has AMX kernels, unless the owner vouches for them with this variable set to 1.
# ``make setup`` builds llama.cpp without AMX and keeps the repacked kernels (Makefile).
amx_trust_env = "SPARECYCLES_LLAMACPP_AMX"


def extra_buffers_allowed(system_info: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether weights may go into llama.cpp's extra buffers (AMX, repacked): not when this
    build has AMX kernels (``system_info``: ``llama_print_system_info()``), unless trusted."""
    return "AMX_INT8 = 1" not in system_info or environ.get(amx_trust_env) == "1"


def _llama() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise InvalidRequest(
            "the llamacpp backend needs llama-cpp-python: pip install 'sparecycles[llamacpp]'"
        ) from exc
    _install_log_callback(llama_cpp)
    return llama_cpp


_log_lines: collections.deque[str] = collections.deque(maxlen=load_errors_kept)
_log_callback: Any = None  # kept referenced: llama.cpp holds a pointer to it


def _install_log_callback(llama_cpp: Any) -> None:
    """Route llama.cpp's own log into Python logging (debug), keeping the last errors, which
    say why a load failed (unknown architecture, tensor type, ...)."""
    global _log_callback
    if _log_callback is not None:
        return

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, _user: Any) -> None:
        line = text.decode("utf-8", errors="replace").rstrip()
        if level == ggml_log_level_error and line:
            _log_lines.append(line)
        if line:
            log.debug("llama.cpp: %s", line)

    _log_callback = callback
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


@dataclass(slots=True, eq=False)
class _Sequence(Sequence):
    """One request inside the engine."""

    rng: np.random.Generator | None = None
    cells: int = 0  # KV cells reserved: prompt + max_tokens, up to the context
    slot: int = -1  # the llama.cpp seq_id while admitted
    reserved: bool = False  # its cells count in the engine's reservation
    n_past: int = 0  # tokens of this request in the KV cache (also the next position)

    @property
    def prefilling(self) -> bool:
        return self.n_past < len(self.request.prompt_token_ids)


class LlamaCppEngine(BatchingEngine[_Sequence]):
    """One GGUF model in llama.cpp, serving concurrent requests in batches."""

    def __init__(
        self,
        name: str,
        path: Path,
        spec: ModelSpec,
        *,
        threads: int | None = None,
        batch_size_max: int = limits.batch_size_max,
        queue_max: int = limits.engine_queue_max,
        duty_cycle: float = 1.0,
        kv_tokens: int = kv_tokens_default,
        batch_tokens: int = batch_tokens_default,
        prefix_cache: bool = True,
    ) -> None:
        self.check_limits(batch_size_max, queue_max, duty_cycle)
        if kv_tokens < 2 or batch_tokens < 1:
            raise InvalidRequest("kv_tokens must be >= 2 and batch_tokens >= 1")
        lib = _llama()
        self._lib = lib
        self.name = name
        self.device = "cpu"
        system_info = lib.llama_print_system_info().decode(errors="replace")
        self.uses_openmp = self.openmp_barriers = "OPENMP = 1" in system_info
        self.path = path
        threads = threads or os.cpu_count() or 1

        _log_lines.clear()
        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = 0
        if not extra_buffers_allowed(system_info):
            mparams.use_extra_bufts = False
            _warn_amx_once()
        model = lib.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            raise gguffile.GGUFError(f"{path.name}: llama.cpp cannot load it: {_why()}")
        self._model = model
        self._vocab = lib.llama_model_get_vocab(model)
        self.vocab_size = int(lib.llama_vocab_n_tokens(self._vocab))
        # every end-of-generation token (eos, eot, ...): min_tokens/ignore_eos forbid them all
        self._eos_ids = frozenset(t for t in range(self.vocab_size)
                                  if lib.llama_vocab_is_eog(self._vocab, t))
        self.features = frozenset({protocol.FEATURE_SAMPLING_CONTROLS}
                                  | ({protocol.FEATURE_GRAMMAR} if grammar.available() else set())
                                  | ({protocol.FEATURE_PREFIX_CACHE} if prefix_cache else set()))
        context = min(spec.context_length, kv_tokens)
        self.spec = dataclasses.replace(spec, context_length=context)
        self._kv_tokens = kv_tokens
        self._batch_tokens = batch_tokens

        cparams = lib.llama_context_default_params()
        cparams.n_ctx = kv_tokens
        cparams.n_batch = batch_tokens
        cparams.n_ubatch = batch_tokens
        cparams.n_seq_max = batch_size_max + 1  # the last slot is verification's
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.kv_unified = True
        cparams.no_perf = True
        ctx = lib.llama_init_from_model(model, cparams)
        if not ctx:
            lib.llama_model_free(model)
            raise InvalidRequest(f"{path.name}: llama.cpp could not make a context: {_why()}")
        self._ctx = ctx
        self._memory = lib.llama_get_memory(ctx)
        self._llama_batch = lib.llama_batch_init(batch_tokens, 0, 1)
        self._score_slot = batch_size_max
        self._pieces: dict[int, bytes] = {}

        # Touched by the engine thread only.
        self._batch: list[_Sequence] = []  # the running requests
        self._free_slots = list(range(batch_size_max - 1, -1, -1))
        self._cells_reserved = 0
        # The prefix cache: an idle slot keeps the cells of the request it served last (tokens
        # by position), oldest first; counted apart from the reservations of running requests.
        self._prefix_cache = prefix_cache
        self._kept: dict[int, tuple[int, ...]] = {}
        self._cells_kept = 0
        self._start_engine(batch_size_max=batch_size_max, queue_max=queue_max,
                           duty_cycle=duty_cycle)

    @classmethod
    def load(
        cls,
        name: str,
        source: str | Path,
        *,
        threads: int | None = None,
        batch_size_max: int = limits.batch_size_max,
        queue_max: int = limits.engine_queue_max,
        duty_cycle: float = 1.0,
        kv_tokens: int = kv_tokens_default,
        prefix_cache: bool = True,
    ) -> LlamaCppEngine:
        """Load a GGUF file (or a directory holding one). A truncated or corrupt file, or one
        llama.cpp cannot run (architecture, tensor type), raises ``GGUFError`` naming the file."""
        path = modelfiles.gguf_source(source)
        if path is None:
            raise InvalidRequest(f"{source}: the llamacpp backend serves GGUF files only")
        gguffile.read_gguf(path, arrays=False)  # a clear error for a truncated or bad header
        spec = modelfiles.model_spec(name, path)
        return cls(name, path, spec, threads=threads, batch_size_max=batch_size_max,
                   queue_max=queue_max, duty_cycle=duty_cycle, kv_tokens=kv_tokens,
                   prefix_cache=prefix_cache)

    # --- what the shared frame asks of a backend --------------------------------------------

    def _new_sequence(self, request: GenerationRequest, on_update: UpdateCallback,
                      row: sampling.RowState | None) -> _Sequence:
        cells = min(len(request.prompt_token_ids) + request.params.max_tokens,
                    self.spec.context_length)
        rng = None if row is not None else npsampling.make_rng(request.params)
        return _Sequence(request, on_update, row=row, rng=rng, cells=cells)

    def _grammar_tokenizer(self) -> grammar.GrammarCompiler:
        """llguidance's tokenizer over llama.cpp's vocabulary (about a second)."""
        import llguidance.llamacpp

        with warnings.catch_warnings():  # it calls a deprecated binding once a token
            warnings.simplefilter("ignore", DeprecationWarning)
            ll = llguidance.llamacpp.lltokenizer_from_vocab(
                self._vocab, n_vocab=self.vocab_size, eos_token=sorted(self._eos_ids) or None)
        return grammar.GrammarCompiler(ll)

    def detokenize(self, token_ids: list[int]) -> str:
        """The text of ``token_ids`` (special tokens left out), as llama.cpp spells it."""
        return b"".join(self._piece(t) for t in token_ids).decode("utf-8", errors="ignore")

    def _running_sequences(self) -> list[_Sequence]:
        return list(self._batch)

    def _on_finished(self, s: _Sequence) -> None:
        self._free(s)  # before the caller hears it ended: its cells are free by then

    def _teardown(self) -> None:
        self._batch = []
        lib = self._lib
        lib.llama_batch_free(self._llama_batch)
        lib.llama_free(self._ctx)
        lib.llama_model_free(self._model)

    # --- the engine thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                cancelled = self._wait_for_work()
                if cancelled is None:
                    return
                score = self._take_score()
                admitted = self._take_admissible() if not self._scores else []
            for s in cancelled:  # waiting or running; finishing twice is a no-op
                self._finish(s, FinishReason.STOP)
            self._release([s for s in self._batch if s.finished])
            if score is not None:
                self._run_score(score)
            self._batch.extend(admitted)
            if self._batch:
                try:
                    self._step()
                except Exception as exc:  # a bug or llama.cpp refusing: fail what runs, go on
                    log.exception("engine %s: step failed", self.name)
                    self._fail(self._batch, f"engine error: {exc}")
                    self._release(list(self._batch))
                    with self._lock:  # what the failed step left in the cache is not trusted
                        self._evict(self._kv_tokens)

    def _take_admissible(self) -> list[_Sequence]:
        """Waiting requests, in order, for which a slot and their KV cells are free (lock held;
        engine thread). Each takes the free slot whose kept cells share the longest prefix with
        its prompt, keeps that prefix and skips prefilling it; kept cells of other idle slots
        are evicted, least recently used first, when the request needs their room."""
        taken: list[_Sequence] = []
        while self._waiting and len(self._batch) + len(taken) < self._batch_size_max:
            s = self._waiting[0]
            prompt = s.request.prompt_token_ids
            slot, common = self._best_slot(prompt)
            # taking the slot moves all its kept cells out of the kept pool: the shared prefix
            # into this request's reservation, the rest freed below
            need = s.cells - len(self._kept.get(slot, ()))
            if need > self._cells_free():
                self._evict(need, spare=slot)
                if need > self._cells_free():
                    break
            self._waiting.popleft()
            self._free_slots.remove(slot)
            kept = self._kept.pop(slot, ())
            self._cells_kept -= len(kept)
            if len(kept) > common and not self._lib.llama_memory_seq_rm(
                    self._memory, slot, common, -1):  # a cache that cannot cut a sequence
                self._lib.llama_memory_seq_rm(self._memory, slot, -1, -1)
                common = 0
            s.slot, s.n_past, s.reserved = slot, common, True
            self._cells_reserved += s.cells
            self._stats.prompt_tokens += len(prompt)
            self._stats.prompt_tokens_cached += common
            taken.append(s)
        return taken

    def _cells_free(self) -> int:
        return self._kv_tokens - self._cells_reserved - self._cells_kept

    def _best_slot(self, prompt: tuple[int, ...]) -> tuple[int, int]:
        """The free slot to serve ``prompt`` and how many of its first tokens that slot's kept
        cells already hold (at most all but the last: its logits are needed). Without a shared
        prefix: an empty slot, else the least recently kept."""
        best, best_common = -1, 0
        for slot in self._free_slots:
            kept = self._kept.get(slot)
            if not kept:
                continue
            common = _common_prefix(kept, prompt, len(prompt) - 1)
            if common > best_common:
                best, best_common = slot, common
        if best >= 0:
            return best, best_common
        empty = [slot for slot in self._free_slots if slot not in self._kept]
        if empty:
            return empty[-1], 0
        return next(iter(self._kept)), 0  # every free slot keeps cells: the oldest goes

    def _evict(self, need: int, spare: int = -1) -> None:
        """Drop kept cells of idle slots, least recently used first, until ``need`` cells are
        free or none is left but ``spare``'s (lock held; engine thread)."""
        for slot in list(self._kept):
            if self._cells_free() >= need:
                return
            if slot == spare:
                continue
            self._lib.llama_memory_seq_rm(self._memory, slot, -1, -1)
            self._cells_kept -= len(self._kept.pop(slot))

    def _take_score(self) -> ScoreJob | None:
        """The next scoring pass if its cells are free now (lock held); else it waits, and no
        new request is admitted before it."""
        if not self._scores:
            return None
        job = self._scores[0]
        need = len(job.prompt) + len(job.output)
        if need > self._cells_free():
            self._evict(need)
            if need > self._cells_free():
                return None
        return self._scores.popleft()

    def _step(self) -> None:
        """One llama_decode over every running request: decode tokens, then prompt chunks."""
        lib, batch = self._lib, self._llama_batch
        rows: list[tuple[int, _Sequence]] = []  # (batch index with logits, its sequence)
        n = 0
        decoding = [s for s in self._batch if not s.prefilling]
        for s in decoding:
            self._put(n, s.pending, s.n_past, s.slot, True)
            rows.append((n, s))
            n += 1
        fed: list[tuple[_Sequence, int]] = []
        for s in self._batch:
            if not s.prefilling or n >= self._batch_tokens:
                continue
            prompt = s.request.prompt_token_ids
            chunk = prompt[s.n_past : s.n_past + self._batch_tokens - n]
            for k, token in enumerate(chunk):
                last = s.n_past + k == len(prompt) - 1
                self._put(n, token, s.n_past + k, s.slot, last)
                if last:
                    rows.append((n, s))
                n += 1
            fed.append((s, len(chunk)))
        batch.n_tokens = n
        started = time.perf_counter()
        code = lib.llama_decode(self._ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")
        for s in decoding:
            s.n_past += 1
        for s, k in fed:
            s.n_past += k
        self._choose(rows)
        self._add_busy(time.perf_counter() - started, len(decoding), 1 if decoding else 0)
        self._release([s for s in self._batch if s.finished])

    def _put(self, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        b = self._llama_batch
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = logits

    def _logits(self, i: int) -> np.ndarray:
        ptr = self._lib.llama_get_logits_ith(self._ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.vocab_size,))

    def _choose(self, rows: list[tuple[int, _Sequence]]) -> None:
        """Pick each row's next token, tell its caller, and finish it where it ends."""
        for i, s in rows:
            logits = self._logits(i)
            p = s.request.params
            if s.row is None:
                token = npsampling.next_token(logits, p, s.rng)
            else:
                token = sampling.draw(sampling.process_logits(logits, s.row), s.row)
            lp = (npsampling.token_logprob(logits, token),) if s.request.want_logprobs else None
            top = None
            if p.logprobs or p.top_logprobs:  # the client's: from the raw row
                one, best = sampling.logprobs_of(logits, token, p.top_logprobs)
                lp, top = (one,), (best,)
            self._emit(s, token, lp, top)
        self._count_tokens(len(rows))

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(256)
            n = self._lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            piece = buf.raw[: max(n, 0)]
            self._pieces[token] = piece
        return piece

    def _release(self, leaving: list[_Sequence]) -> None:
        """Take requests out of the running batch, freeing their KV cells and slots."""
        if not leaving:
            return
        gone = {id(s) for s in leaving}
        for s in leaving:
            self._free(s)
        self._batch = [s for s in self._batch if id(s) not in gone]

    def _free(self, s: _Sequence) -> None:
        """Give back a request's slot and reservation (engine thread; once, however often
        called). With the prefix cache on, its cells stay as the slot's kept cells, for a later
        request that starts the same way (the next turn of a conversation); else they go."""
        if s.slot >= 0:
            held = (s.request.prompt_token_ids + tuple(s.generated))[: s.n_past]
            with self._lock:
                if self._prefix_cache and held:
                    self._kept[s.slot] = held  # the most recently kept last
                    self._cells_kept += len(held)
                else:
                    self._lib.llama_memory_seq_rm(self._memory, s.slot, -1, -1)
                self._free_slots.append(s.slot)
                s.slot = -1
        if s.reserved:
            s.reserved = False
            with self._lock:
                self._cells_reserved -= s.cells

    # --- verification ---------------------------------------------------------------------------

    def _score(self, job: ScoreJob) -> tuple[tuple[float, ...], ...]:
        """Prompt + output through the model on the scoring slot; the logits before each
        output token give the statistics of that position."""
        try:
            return self._score_on_slot(job)
        finally:
            self._lib.llama_memory_seq_rm(self._memory, self._score_slot, -1, -1)

    def _score_on_slot(self, job: ScoreJob) -> tuple[tuple[float, ...], ...]:
        tokens = job.prompt + job.output
        first = len(job.prompt) - 1  # the position whose logits predict the first output token
        rows: list[np.ndarray] = []
        for start in range(0, len(tokens), self._batch_tokens):
            chunk = tokens[start : start + self._batch_tokens]
            wanted = []
            for k, token in enumerate(chunk):
                pos = start + k
                want = first <= pos < len(tokens) - 1
                self._put(k, token, pos, self._score_slot, want)
                if want:
                    wanted.append(k)
            self._llama_batch.n_tokens = len(chunk)
            code = self._lib.llama_decode(self._ctx, self._llama_batch)
            if code != 0:
                raise RuntimeError(f"llama_decode returned {code}")
            rows.extend(self._logits(k).copy() for k in wanted)
        if job.row is not None:
            scored = [sampling.score_row(logits, token, job.row)
                      for logits, token in zip(rows, job.output, strict=True)]
            return tuple(tuple(r[k] for r in scored) for k in range(5))
        return npsampling.score_positions(np.stack(rows), job.output, job.temperature, job.top_p)


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...], most: int) -> int:
    """How many first tokens ``a`` and ``b`` share, at most ``most``."""
    n = min(len(a), len(b), most)
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]: bisect on slice equality (C speed)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


@functools.cache
def _warn_amx_once() -> None:
    log.warning("this llama.cpp was built with its AMX kernels, which crashed at the first "
                "decode on an AMX CPU (docs/benchmarks.md, \"AMX\"): models load without them "
                "and without repacked weights, so decode may be slower. Reinstall "
                "llama-cpp-python built without AMX (the README gives the command), or set "
                "%s=1 to use them", amx_trust_env)


def _why() -> str:
    lines = [line.split(": ", 1)[-1] for line in _log_lines if line]
    return "; ".join(lines[-2:]) if lines else "no reason given (see the log at debug level)"

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

Chunked prefill: a prompt longer than ``prefill_chunk_tokens`` is not prefilled in one pass with
every decode paused; it is prefilled alone, a chunk per engine step, into a cache of its own,
between the running batch's decode steps, and joins the batch when its last chunk has chosen its
first token. A sequence handed a KV cache (``GenerationRequest.kv_prefix``, disaggregated
prefill/decode) takes the same path from the cache's end; one asked to ``export_kv`` too, so its
prompt's cache is its own when it ends.

Only models whose cache layers are plain full-attention ``DynamicLayer``s are supported (Llama,
Qwen2, Mistral without a sliding window, ...); others are refused at load with a clear error.
"""

from __future__ import annotations

import collections
import inspect
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from sparecycles import gguffile, grammar, limits, modelfiles, protocol
from sparecycles.errors import InvalidRequest
from sparecycles.node.backends import sampling
from sparecycles.node.backends.base import GenerationRequest, KvPrefix, UpdateCallback
from sparecycles.node.backends.batching import BatchingEngine, ScoreJob, Sequence
from sparecycles.node.backends.kvbatch import (
    KVBatch,
    check_full_attention,
    filled_kv,
    left_padded,
)
from sparecycles.types import FinishReason, ModelSpec

log = logging.getLogger(__name__)

# Prompts prefilled in one forward pass hold at most this many (padded) tokens, which bounds the
# activation memory of a prefill; a longer prompt is still prefilled, alone.
prefill_tokens_max = 8192
# A prompt longer than this is prefilled in chunks of this many tokens, one chunk per step between
# the running batch's decode steps (0: every prompt in one pass, decodes paused meanwhile).
prefill_chunk_tokens_default = 512


@dataclass(slots=True, eq=False)
class _Sequence(Sequence):
    """One request inside the engine."""

    generator: torch.Generator | None = None
    n_cached: int = 0  # tokens of this request in the KV cache (also its next position id)
    own: KVBatch | None = None  # its cache while it is prefilled in chunks, before it joins


class TransformersEngine(BatchingEngine[_Sequence]):
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
        prefill_chunk_tokens: int = prefill_chunk_tokens_default,
    ) -> None:
        self.check_limits(batch_size_max, queue_max, duty_cycle)
        if prefill_chunk_tokens < 0:
            raise InvalidRequest("prefill_chunk_tokens must be >= 0")
        check_full_attention(model.config, name)
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.name = name
        self.spec = spec
        self.device = str(model.device)
        self.uses_openmp = self.device == "cpu"  # torch's CPU kernels run on libgomp
        self.tokenizer = tokenizer
        self._model = model
        self._eos_ids = _eos_ids(model, tokenizer)
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.features = frozenset({protocol.FEATURE_SAMPLING_CONTROLS,
                                   protocol.FEATURE_KV_HANDOFF}
                                  | ({protocol.FEATURE_GRAMMAR} if grammar.available() else set()))
        self._keep_last_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        # Touched by the engine thread only.
        self._batch: list[_Sequence] = []  # row i of self._kv is self._batch[i]
        self._kv: KVBatch | None = None
        self._prefilling: list[_Sequence] = []  # prefilled a chunk a step, first come first
        self._start_engine(batch_size_max=batch_size_max, queue_max=queue_max,
                           duty_cycle=duty_cycle)

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
        prefill_chunk_tokens: int = prefill_chunk_tokens_default,
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
                   duty_cycle=duty_cycle, prefill_chunk_tokens=prefill_chunk_tokens)

    # --- what the shared frame asks of a backend --------------------------------------------

    def _new_sequence(self, request: GenerationRequest, on_update: UpdateCallback,
                      row: sampling.RowState | None) -> _Sequence:
        generator = None if row is not None else sampling.make_generator(request.params,
                                                                         self.device)
        return _Sequence(request, on_update, row=row, generator=generator)

    def _grammar_tokenizer(self) -> grammar.GrammarCompiler:
        return grammar.GrammarCompiler(grammar.from_hf_tokenizer(
            self.tokenizer, self.vocab_size, self._eos_ids))

    def detokenize(self, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    def _running_sequences(self) -> list[_Sequence]:
        return [*self._batch, *self._prefilling]

    def _teardown(self) -> None:
        self._reset_batch()
        self._prefilling = []
        self._model = None  # let the weights go: a closed engine is an unloaded model
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    # --- the engine thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    cancelled = self._wait_for_work()
                    if cancelled is None:
                        return
                    scores, self._scores = list(self._scores), collections.deque()
                    admitted = self._take_admissible()
                for job in scores:
                    self._run_score(job)
                try:
                    self._step(cancelled, admitted)
                except Exception as exc:  # a bug, not a model error: fail what runs, carry on
                    log.exception("engine %s: step failed", self.name)
                    self._fail([*self._batch, *self._prefilling, *admitted],
                               f"engine error: {exc}")
                    self._reset_batch()
                    self._prefilling = []

    def _take_admissible(self) -> list[_Sequence]:
        """Waiting requests that fit the batch and one prefill's token budget (lock held)."""
        taken: list[_Sequence] = []
        longest, together = 0, 0
        while (self._waiting and len(self._batch) + len(self._prefilling) + len(taken)
               < self._batch_size_max):
            n = len(self._waiting[0].request.prompt_token_ids)
            alone = self._chunked(self._waiting[0])
            if not alone and together and max(longest, n) * (together + 1) > prefill_tokens_max:
                break
            if not alone:
                longest, together = max(longest, n), together + 1
            taken.append(self._waiting.popleft())
            self._stats.prompt_tokens += n
            if taken[-1].request.kv_prefix is not None:
                self._stats.prompt_tokens_cached += taken[-1].request.kv_prefix.positions
        return taken

    def _chunked(self, s: _Sequence) -> bool:
        """Is ``s`` prefilled alone, a chunk a step (long, handed a cache, or exporting one)?"""
        r = s.request
        return (r.kv_prefix is not None or r.export_kv
                or 0 < self.prefill_chunk_tokens < len(r.prompt_token_ids))

    def _step(self, cancelled: set[_Sequence], admitted: list[_Sequence]) -> None:
        for s in cancelled:  # waiting or running; finishing twice is a no-op
            self._finish(s, FinishReason.STOP)
        self._drop([s for s in self._batch if s.finished])
        self._prefilling = [s for s in self._prefilling if not s.finished]
        group = [s for s in admitted if not self._chunked(s)]
        for s in admitted:
            if self._chunked(s):
                if s.request.kv_prefix is not None:
                    s.own = self._loaded(s.request.kv_prefix)
                    s.n_cached = s.request.kv_prefix.positions
                self._prefilling.append(s)
        if group:
            started = time.perf_counter()
            try:
                kv = self._prefill(group)
            except Exception as exc:  # e.g. out of memory: only this group fails
                log.exception("engine %s: prefill failed", self.name)
                self._fail(group, f"prefill failed: {exc}")
            else:
                self._join(group, kv)
            self._add_busy(time.perf_counter() - started, 0, 0)
        if self._prefilling:  # one chunk of the first prompt in line, then everyone decodes
            started = time.perf_counter()
            s = self._prefilling[0]
            try:
                done = self._prefill_chunk(s)
            except Exception as exc:
                log.exception("engine %s: chunked prefill failed", self.name)
                self._fail([s], f"prefill failed: {exc}")
                done = True
            if done:
                self._prefilling.pop(0)
                own, s.own = s.own, None
                if own is not None and not s.finished:
                    self._join([s], own)
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

    def _join(self, group: list[_Sequence], kv: KVBatch) -> None:
        """Prefilled sequences join the running batch (those that already ended do not stay)."""
        if self._kv is None:
            self._kv = kv
        else:
            self._kv.merge(kv)
        self._batch.extend(group)
        self._drop([s for s in group if s.finished])

    def _prefill_chunk(self, s: _Sequence) -> bool:
        """The next chunk of ``s``'s prompt into its own cache; True once the whole prompt is in
        (its first token then chosen, from the last position's logits)."""
        prompt = s.request.prompt_token_ids
        start = s.n_cached
        n = len(prompt) - start
        if self.prefill_chunk_tokens:
            n = min(n, self.prefill_chunk_tokens)
        cache = s.own.cache if s.own is not None else DynamicCache(config=self._model.config)
        ids = torch.tensor([prompt[start : start + n]], device=self.device)
        positions = torch.arange(start, start + n, device=self.device)[None, :]
        mask = torch.ones((1, start + n), dtype=torch.long, device=self.device)
        extra = {"logits_to_keep": 1} if self._keep_last_logits else {}
        out = self._model(input_ids=ids, attention_mask=mask, position_ids=positions,
                          past_key_values=cache, use_cache=True, **extra)
        s.own = KVBatch(cache, mask)
        s.n_cached = start + n
        if s.n_cached < len(prompt):
            return False
        self._choose([s], out.logits[:, -1, :])
        return True

    def _loaded(self, prefix: KvPrefix) -> KVBatch:
        """A one-row cache holding a handed-over prefix (``import_kv`` checked its shapes)."""
        cache = DynamicCache(config=self._model.config)
        for layer, (keys, values) in enumerate(prefix.layers):
            cache.update(keys[None].to(self.device), values[None].to(self.device), layer)
        mask = torch.ones((1, prefix.positions), dtype=torch.long, device=self.device)
        return KVBatch(cache, mask)

    def _exported_kv(self, s: _Sequence) -> KvPrefix | None:
        if s.own is None:  # it did not end in its own prefill (it is not max_tokens 1)
            return None
        layers = tuple((keys[0].detach().to("cpu"), values[0].detach().to("cpu"))
                       for keys, values in filled_kv(s.own.cache))
        return KvPrefix(layers, s.n_cached)

    # --- KV hand-off: the wire's bytes, checked against this model --------------------------

    def _kv_shape(self) -> tuple[int, int, int]:
        """(layers, kv heads, head size) of this model's cache."""
        c = self._model.config
        heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return c.num_hidden_layers, heads, head_dim

    def export_kv(self, prefix: KvPrefix) -> tuple[protocol.KvLayout, list[tuple[bytes, bytes]]]:
        layers, heads, head_dim = self._kv_shape()
        dtype = str(prefix.layers[0][0].dtype).removeprefix("torch.")
        try:
            layout = protocol.KvLayout(layers=layers, kv_heads=heads, head_dim=head_dim,
                                       positions=prefix.positions, dtype=dtype)  # type: ignore[arg-type]
        except ValueError as exc:
            raise InvalidRequest(f"this KV cache cannot be handed off: {exc}") from None
        parts = []
        for layer, start, n in protocol.kv_chunks(layout):
            keys, values = prefix.layers[layer]
            parts.append((_tensor_bytes(keys[:, start : start + n, :]),
                          _tensor_bytes(values[:, start : start + n, :])))
        return layout, parts

    def import_kv(self, layout: protocol.KvLayout, chunks: list[tuple[bytes, bytes]]
                  ) -> KvPrefix:
        layers, heads, head_dim = self._kv_shape()
        if (layout.layers, layout.kv_heads, layout.head_dim) != (layers, heads, head_dim):
            raise InvalidRequest(
                f"a KV cache of {layout.layers} layers x {layout.kv_heads} heads x "
                f"{layout.head_dim} does not fit {self.name} ({layers} x {heads} x {head_dim})")
        plan = protocol.kv_chunks(layout)
        if len(chunks) != len(plan):
            raise InvalidRequest(f"{len(chunks)} KV chunks where {len(plan)} were promised")
        dtype = getattr(torch, layout.dtype)
        keys: list[list[torch.Tensor]] = [[] for _ in range(layers)]
        values: list[list[torch.Tensor]] = [[] for _ in range(layers)]
        for (layer, _start, n), (k, v) in zip(plan, chunks, strict=True):
            want = n * layout.row_bytes
            if len(k) != want or len(v) != want:
                raise InvalidRequest(f"a KV chunk of layer {layer} is not {want} bytes")
            keys[layer].append(_tensor_of(k, dtype, (heads, n, head_dim)))
            values[layer].append(_tensor_of(v, dtype, (heads, n, head_dim)))
        out = []
        for k_parts, v_parts in zip(keys, values, strict=True):
            k_t = torch.cat(k_parts, dim=1).to(self._model.dtype)
            v_t = torch.cat(v_parts, dim=1).to(self._model.dtype)
            if not (bool(torch.isfinite(k_t).all()) and bool(torch.isfinite(v_t).all())):
                raise InvalidRequest("a KV cache with NaN or infinite values")
            out.append((k_t, v_t))
        return KvPrefix(tuple(out), layout.positions)

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

    def _score(self, job: ScoreJob) -> tuple[tuple[float, ...], ...]:
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
            self._emit(s, token, lp, top)
        self._count_tokens(len(batch))

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


def _tensor_bytes(t: torch.Tensor) -> bytes:
    """A tensor's bytes, little-endian, row-major (what ``protocol.KvChunk`` carries)."""
    return bytes(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())


def _tensor_of(data: bytes, dtype: torch.dtype, shape: tuple[int, int, int]) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(getattr(tokenizer, "eos_token_id", None))
    return frozenset(i for i in ids if isinstance(i, int))

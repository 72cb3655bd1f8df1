"""One stage of a chain: a contiguous range of a model's layers, on the transformers backend.

A model too large for any one device is served by a chain of nodes, each holding some of its
layers (docs/architecture.md, "Chains"). This engine holds layers ``[first, end)``: with the
first stage the token embeddings, with the last the final norm and the LM head. ``forward``
takes the inputs of some new positions of one sequence (token ids for the first stage, the
previous stage's hidden states otherwise), appends their keys and values to that sequence's KV
cache of this stage's layers, and returns the hidden states of those positions, or (last stage)
the next token chosen from the last position's logits.

Only the stage's tensors are read from the safetensors files and allocated (the model is built on
PyTorch's meta device, then the stage's modules get memory), so a node never needs the whole
model's memory; ``memory_max_bytes`` (``sparecycles node --memory-max``) refuses a range whose
weights exceed the owner's cap.

Each sequence has its own cache (no batching across sequences yet: next step in the
architecture notes). Calls come from one thread at a time (the agent runs them on one worker
thread); the engine checks that positions arrive in order.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from sparecycles import limits, modelfiles
from sparecycles.errors import InvalidRequest
from sparecycles.node.backends import sampling
from sparecycles.node.backends.kvbatch import check_full_attention
from sparecycles.types import ModelSpec, SamplingParams


@dataclass(slots=True)
class _StageSequence:
    cache: DynamicCache
    generator: torch.Generator | None
    params: SamplingParams | None
    n_cached: int = 0
    last_used_s: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class StageScoreAsk:
    """Score positions ``offset ..`` of a step, position ``offset + j`` followed by
    ``targets[j]`` (``protocol.StageScore``)."""

    offset: int
    targets: tuple[int, ...]
    temperature: float
    top_p: float


@dataclass(frozen=True, slots=True)
class StageResult:
    hidden: torch.Tensor | None  # (positions, hidden_size) for a stage that is not the last
    token: int | None  # the last stage's next token (None: not asked to choose one)
    eos: bool  # that token ends the sequence
    busy_s: float
    # the last stage's teacher-forced statistics of the positions ``score`` asked for (a spot
    # check): as ``sampling.score_positions`` returns them
    scores: tuple[tuple[float, ...], ...] | None = None


class StageEngine:
    """Layers ``[first, end)`` of one model, serving the sequences of the chains it is part of."""

    def __init__(self, name: str, model: Any, spec: ModelSpec, *, first: int, end: int,
                 layers_sha256: str, weight_bytes: int, eos_ids: frozenset[int],
                 sequences_max: int = limits.jobs_per_node_max, duty_cycle: float = 1.0) -> None:
        self.name, self.spec = name, spec
        self.first, self.end = first, end
        self.layers_sha256 = layers_sha256
        self.weight_bytes = weight_bytes
        self.device = str(next(model.parameters()).device)
        self.dtype = next(model.parameters()).dtype
        self._model = model
        self._base = model.model
        self._eos_ids = eos_ids
        self._sequences: dict[str, _StageSequence] = {}
        self._sequences_max = sequences_max
        if not 0.0 < duty_cycle <= 1.0:
            raise InvalidRequest("duty_cycle must be in (0, 1]")
        self._duty_cycle = duty_cycle
        self.busy_s = 0.0

    @property
    def is_first(self) -> bool:
        return self.first == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.spec.n_layers

    @classmethod
    def load(cls, name: str, source: str | Path, *, first: int, end: int | None = None,
             device: str = "auto", dtype: str | torch.dtype | None = None,
             memory_max_bytes: int | None = None, duty_cycle: float = 1.0,
             sequences_max: int = limits.jobs_per_node_max) -> StageEngine:
        """Load layers ``[first, end)`` of ``source`` (``end`` None: to the last layer)."""
        path = modelfiles.resolve_source(source)
        if device == "auto":
            device = "cuda:0" if torch.cuda.is_available() else "cpu"
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype.removeprefix("torch."))
        if dtype is None or dtype == "auto":
            dtype = torch.float32 if device == "cpu" else torch.float16
        assert isinstance(dtype, torch.dtype)
        config = AutoConfig.from_pretrained(path)
        n_layers = int(config.num_hidden_layers)
        end = n_layers if end is None else end
        stored = modelfiles.stage_tensors(path, first, end, n_layers)
        weight_bytes = sum(
            _numel(e["shape"]) for _, _, e in stored) * torch.tensor([], dtype=dtype).element_size()
        if memory_max_bytes is not None and weight_bytes > memory_max_bytes:
            raise InvalidRequest(
                f"{name}: layers {first}:{end} hold {weight_bytes / 1e9:.2f} GB, more than the "
                f"owner's --memory-max of {memory_max_bytes / 1e9:.2f} GB")
        check_full_attention(config, name)
        stage_config = copy.deepcopy(config)
        stage_config.num_hidden_layers = end - first
        if getattr(stage_config, "layer_types", None):
            stage_config.layer_types = list(config.layer_types[first:end])
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(stage_config, dtype=dtype)
        base = model.model
        tied = bool(getattr(config, "tie_word_embeddings", False))
        if first != 0 and not (tied and end == n_layers):
            base.embed_tokens = None
        if end != n_layers:
            base.norm = torch.nn.Identity()
            model.lm_head = None
        elif tied:
            model.lm_head = None  # the head is the embedding matrix (see _logits)
        model = model.to_empty(device=device)
        rotary = type(base.rotary_emb)(config=stage_config)
        base.rotary_emb = rotary.to(device)
        _load_stage_tensors(model, stored, first, device, dtype)
        model.eval()
        spec = modelfiles.model_spec(name, path, dtype=dtype, hash_weights=False)
        sha = modelfiles.layers_sha256(path, first, end, n_layers)
        generation = json.loads((path / "generation_config.json").read_text()) if (
            path / "generation_config.json").is_file() else {}
        eos = generation.get("eos_token_id", config.eos_token_id)
        eos_ids = frozenset(i for i in (eos if isinstance(eos, list) else [eos])
                            if isinstance(i, int))
        return cls(name, model, spec, first=first, end=end, layers_sha256=sha,
                   weight_bytes=weight_bytes, eos_ids=eos_ids, sequences_max=sequences_max,
                   duty_cycle=duty_cycle)

    # --- the work ------------------------------------------------------------------------------

    def forward(self, sequence_id: str, start: int, *, token_ids: list[int] | None = None,
                hidden: torch.Tensor | None = None, choose: SamplingParams | None = None,
                score: StageScoreAsk | None = None) -> StageResult:
        """Run positions ``start ..`` of ``sequence_id`` through this stage's layers.

        ``start`` must equal the positions already cached for the sequence (0 opens it). The
        first stage takes ``token_ids``, the others ``hidden`` (positions x hidden_size). The
        last stage chooses the next token when ``choose`` is given (the first ``choose`` of a
        sequence fixes its sampling, seed included). ``score`` (last stage): the teacher-forced
        statistics of some of these positions, for verification."""
        started = time.perf_counter()
        if score is not None and not self.is_last:
            raise InvalidRequest("only the last stage scores positions")
        seq = self._sequences.get(sequence_id)
        if start == 0:
            if seq is not None:
                raise InvalidRequest(f"sequence {sequence_id} is already open")
            if len(self._sequences) >= self._sequences_max:
                raise InvalidRequest(f"{len(self._sequences)} sequences already open here")
            seq = _StageSequence(DynamicCache(config=self._base.config), None, None)
            self._sequences[sequence_id] = seq
        elif seq is None or seq.n_cached != start:
            have = None if seq is None else seq.n_cached
            raise InvalidRequest(f"sequence {sequence_id}: position {start} out of order "
                                 f"(holds {have})")
        with torch.inference_mode():
            if self.is_first:
                if not token_ids:
                    raise InvalidRequest("the first stage takes token ids")
                if not all(0 <= t < self.spec_vocab for t in token_ids):
                    raise InvalidRequest("token ids outside the vocabulary")
                embeds = self._base.embed_tokens(
                    torch.tensor([token_ids], dtype=torch.long, device=self.device))
            else:
                if hidden is None or hidden.dim() != 2 or hidden.shape[1] != self.spec.hidden_size:
                    raise InvalidRequest("a later stage takes hidden states (positions x hidden)")
                if not bool(torch.isfinite(hidden).all()):
                    raise InvalidRequest("hidden states hold NaN or infinity")
                embeds = hidden.to(device=self.device, dtype=self.dtype)[None]
            n = embeds.shape[1]
            if start + n > self.spec.context_length:
                raise InvalidRequest(f"{start + n} positions exceed the context")
            positions = torch.arange(start, start + n, device=self.device)[None]
            mask = torch.ones((1, start + n), dtype=torch.long, device=self.device)
            out = self._base(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                             cache=seq.cache, use_cache=True)
            seq.n_cached = start + n
            seq.last_used_s = time.monotonic()
            states = out.last_hidden_state[0]
            token, eos, result, scores = None, False, None, None
            if self.is_last:
                if choose is not None:
                    if seq.params is None:
                        seq.params = choose
                        seq.generator = sampling.make_generator(choose, self.device)
                    logits = self._logits(states[-1:]).float()
                    token = int(sampling.next_tokens(logits, [seq.params], [seq.generator])[0])
                    eos = token in self._eos_ids
                if score is not None:
                    scores = self._score(states, score)
            else:
                result = states.detach().to("cpu")
        busy = time.perf_counter() - started
        self.busy_s += busy
        if self._duty_cycle < 1.0:
            time.sleep(busy * (1.0 / self._duty_cycle - 1.0))
        return StageResult(result, token, eos, busy, scores)

    def _score(self, states: torch.Tensor, score: StageScoreAsk) -> tuple[tuple[float, ...], ...]:
        """Statistics of positions ``offset ..`` of ``states``, each followed by its target."""
        if score.offset + len(score.targets) > states.shape[0]:
            raise InvalidRequest(f"{len(score.targets)} targets from position {score.offset} "
                                 f"of {states.shape[0]}")
        logits = self._logits(states[score.offset : score.offset + len(score.targets)]).float()
        if not all(0 <= t < logits.shape[-1] for t in score.targets):
            raise InvalidRequest("targets outside the vocabulary")
        return sampling.score_positions(
            logits, torch.tensor(list(score.targets), device=logits.device), score.temperature,
            score.top_p)

    @property
    def spec_vocab(self) -> int:
        return int(self._base.embed_tokens.num_embeddings)

    def _logits(self, states: torch.Tensor) -> torch.Tensor:
        if self._model.lm_head is not None:
            return self._model.lm_head(states)
        return states @ self._base.embed_tokens.weight.T

    def release(self, sequence_id: str) -> None:
        """Drop a sequence's cache (its chain ended, or moved elsewhere)."""
        self._sequences.pop(sequence_id, None)

    def release_idle(self, idle_s: float) -> list[str]:
        """Drop the caches of sequences unused for ``idle_s``: a coordinator that forgot them."""
        now = time.monotonic()
        gone = [k for k, s in self._sequences.items() if now - s.last_used_s > idle_s]
        for k in gone:
            del self._sequences[k]
        return gone

    @property
    def sequences(self) -> int:
        return len(self._sequences)

    def close(self) -> None:
        self._sequences.clear()
        self._model = None


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _load_stage_tensors(model: Any, stored: list[tuple[Path, str, dict[str, Any]]], first: int,
                        device: str, dtype: torch.dtype) -> None:
    """Copy the stage's tensors from the files into ``model`` (its layers renumbered from 0);
    every parameter of the stage must be filled exactly once."""
    params = dict(model.named_parameters())
    filled: set[str] = set()
    by_file: dict[Path, list[str]] = {}
    for path, name, _ in stored:
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in names:
                target = _local_name(name, first)
                if target not in params:
                    if target.endswith("embed_tokens.weight") and "lm_head.weight" in params:
                        target = "lm_head.weight"
                    else:
                        continue  # e.g. the embeddings of a tied head with no embeddings here
                with torch.no_grad():
                    params[target].copy_(f.get_tensor(name).to(device=device, dtype=dtype))
                filled.add(target)
    missing = sorted(set(params) - filled)
    if missing:
        raise InvalidRequest(f"the weight files lack {missing[:3]} for this stage")


def _local_name(name: str, first: int) -> str:
    """``model.layers.7.mlp...`` -> ``model.layers.{7 - first}.mlp...``."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            parts[i + 1] = str(int(parts[i + 1]) - first)
            break
    return ".".join(parts)

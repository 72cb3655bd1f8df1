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

Several chains' steps run in one forward pass (``run``): the decode steps (one position each)
of the sequences whose steps arrived together, as the whole-model engine batches its running
requests; prefill chunks run alone. The caches live in groups, each a left-padded batch
(``kvbatch.KVBatch``) of the sequences that last stepped together; a step of exactly one group's
sequences runs on it as it is, and any other set is regrouped first (rows taken out of their
groups and merged), so chains that keep stepping together pay no copy. Each sequence is fed its
own position ids and masked padding, so its activations are those it would get alone, up to the
order kernels sum in (a unit test holds them within fp32 tolerance, and greedy chains equal the
unsplit model). Calls come from one thread at a time (``node/stage_worker.py`` runs them on one
worker thread); the engine checks that positions arrive in order.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from sparecycles import limits, modelfiles
from sparecycles.errors import InvalidRequest, InvariantViolation
from sparecycles.node.backends import sampling
from sparecycles.node.backends.kvbatch import KVBatch, check_full_attention
from sparecycles.types import ModelSpec, SamplingParams

log = logging.getLogger(__name__)
_Scores = tuple[tuple[float, ...], ...]


@dataclass(frozen=True, slots=True)
class StageScoreAsk:
    """Score positions ``offset ..`` of a step, position ``offset + j`` followed by
    ``targets[j]`` (``protocol.StageScore``)."""

    offset: int
    targets: tuple[int, ...]
    temperature: float
    top_p: float


@dataclass(frozen=True, slots=True)
class StageStep:
    """One ``stage_forward``'s work: positions ``start ..`` of one sequence. The first stage takes
    ``token_ids``, the others ``hidden`` (positions x hidden_size); ``choose`` (last stage)
    asks for the next token; ``score`` (last stage) the teacher-forced statistics of some of
    its positions, for verification."""

    sequence_id: str
    start: int
    token_ids: list[int] | None = None
    hidden: torch.Tensor | None = None
    choose: SamplingParams | None = None
    score: StageScoreAsk | None = None

    @property
    def positions(self) -> int:
        if self.token_ids is not None:
            return len(self.token_ids)
        if self.hidden is not None and self.hidden.dim() == 2:
            return int(self.hidden.shape[0])
        return 0


@dataclass(slots=True, eq=False)
class _StageSequence:
    sequence_id: str
    group: _Group | None = None  # where its keys and values are: a row of that group's batch
    generator: torch.Generator | None = None
    params: SamplingParams | None = None
    n_cached: int = 0
    last_used_s: float = field(default_factory=time.monotonic)
    decoding: bool = False  # its last step was a decode step: its next is expected soon
    late: bool = False  # a pass waited for its step in vain: not waited for until it joins one


@dataclass(slots=True, eq=False)
class _Group:
    """Sequences whose caches are the rows of one left-padded batch (row i: ``rows[i]``): the
    sequences that last stepped together. A step of exactly these runs on it as it is; any other
    set is regrouped first (``StageEngine._gather``), which copies the caches concerned once."""

    kv: KVBatch
    rows: list[_StageSequence]


@dataclass(frozen=True, slots=True)
class StageResult:
    hidden: torch.Tensor | None  # (positions, hidden_size) for a stage that is not the last
    token: int | None  # the last stage's next token (None: not asked to choose one)
    eos: bool  # that token ends the sequence
    busy_s: float  # this step's share of the forward pass it ran in
    # the last stage's teacher-forced statistics of the positions ``score`` asked for (a spot
    # check): as ``sampling.score_positions`` returns them
    scores: tuple[tuple[float, ...], ...] | None = None


class StageEngine:
    """Layers ``[first, end)`` of one model, serving the sequences of the chains it is part of."""

    def __init__(self, name: str, model: Any, spec: ModelSpec, *, first: int, end: int,
                 layers_sha256: str, weight_bytes: int, eos_ids: frozenset[int],
                 sequences_max: int = limits.jobs_per_node_max,
                 batch_size_max: int = limits.batch_size_max, duty_cycle: float = 1.0) -> None:
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
        if batch_size_max < 1:
            raise InvalidRequest("batch_size_max must be >= 1")
        self._batch_size_max = batch_size_max
        if not 0.0 < duty_cycle <= 1.0:
            raise InvalidRequest("duty_cycle must be in (0, 1]")
        self._duty_cycle = duty_cycle
        self.busy_s = 0.0
        self.batch_size_hist: dict[int, int] = {}  # decode passes by the steps they ran
        self.last_decode_pass_s = 0.0  # how long the last pass of decode steps took

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
             sequences_max: int = limits.jobs_per_node_max,
             batch_size_max: int = limits.batch_size_max) -> StageEngine:
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
                   batch_size_max=batch_size_max, duty_cycle=duty_cycle)

    # --- the work ------------------------------------------------------------------------------

    def forward(self, sequence_id: str, start: int, *, token_ids: list[int] | None = None,
                hidden: torch.Tensor | None = None, choose: SamplingParams | None = None,
                score: StageScoreAsk | None = None) -> StageResult:
        """Run positions ``start ..`` of ``sequence_id`` through this stage's layers, alone.

        ``start`` must equal the positions already cached for the sequence (0 opens it). The
        first stage takes ``token_ids``, the others ``hidden`` (positions x hidden_size). The
        last stage chooses the next token when ``choose`` is given (the first ``choose`` of a
        sequence fixes its sampling, seed included). ``score`` (last stage): the teacher-forced
        statistics of some of these positions, for verification."""
        out = self.run([StageStep(sequence_id, start, token_ids, hidden, choose, score)])[0]
        if isinstance(out, Exception):
            raise out
        return out

    def run(self, steps: list[StageStep]) -> list[StageResult | Exception]:
        """Run steps that arrived together, each one's outcome in its place.

        Decode steps (one position of an open sequence) run together, up to ``batch_size_max``
        in one forward pass, as the whole-model engine's decode does; other steps (opening a
        sequence, a prefill chunk) run alone. A sequence's steps keep the order given. A step
        with bad input gets its ``InvalidRequest`` and the others run; a forward pass that
        raises fails its steps and drops their sequences (their caches may be half-written),
        so their chains rebuild them (``coordinator/chains.py``, repair)."""
        out: list[StageResult | Exception | None] = [None] * len(steps)
        together: list[int] = []

        def flush() -> None:
            for i, r in zip(together, self._guarded([steps[i] for i in together]), strict=True):
                out[i] = r
            together.clear()

        for i, step in enumerate(steps):
            if (len(together) >= self._batch_size_max
                    or any(steps[j].sequence_id == step.sequence_id for j in together)):
                flush()
            if self._is_decode(step):
                together.append(i)
            else:
                out[i] = self._guarded([step])[0]
        flush()
        done = [r for r in out if r is not None]
        assert len(done) == len(steps)
        return done

    def _is_decode(self, step: StageStep) -> bool:
        seq = self._sequences.get(step.sequence_id)
        return (seq is not None and step.start > 0 and seq.n_cached == step.start
                and step.positions == 1 and step.score is None)

    def _guarded(self, steps: list[StageStep]) -> list[StageResult | Exception]:
        """Check each step's input, then run the good ones in one pass: decode steps of
        different sequences, or one step of any length."""
        out: list[StageResult | Exception | None] = [None] * len(steps)
        good: list[tuple[int, _StageSequence, torch.Tensor]] = []
        for i, step in enumerate(steps):
            try:
                good.append((i, *self._checked(step)))
            except InvalidRequest as exc:
                out[i] = exc
        if good:
            for (i, _, _), r in zip(good, self._pass([steps[i] for i, _, _ in good],
                                                     [(s, x) for _, s, x in good]), strict=True):
                out[i] = r
        return [r for r in out if r is not None]

    def _checked(self, step: StageStep) -> tuple[_StageSequence, torch.Tensor]:
        """The step's sequence (a new one, not yet registered, for ``start`` 0) and its input
        (token ids as a long tensor, or hidden states on the device); InvalidRequest if bad."""
        if step.score is not None and not self.is_last:
            raise InvalidRequest("only the last stage scores positions")
        seq = self._sequences.get(step.sequence_id)
        if step.start == 0:
            if seq is not None:
                raise InvalidRequest(f"sequence {step.sequence_id} is already open")
            if len(self._sequences) >= self._sequences_max:
                raise InvalidRequest(f"{len(self._sequences)} sequences already open here")
            seq = _StageSequence(step.sequence_id)
        elif seq is None or seq.n_cached != step.start:
            have = None if seq is None else seq.n_cached
            raise InvalidRequest(f"sequence {step.sequence_id}: position {step.start} out of "
                                 f"order (holds {have})")
        if self.is_first:
            if not step.token_ids:
                raise InvalidRequest("the first stage takes token ids")
            if not all(0 <= t < self.spec_vocab for t in step.token_ids):
                raise InvalidRequest("token ids outside the vocabulary")
            x = torch.tensor(step.token_ids, dtype=torch.long, device=self.device)
        else:
            hidden = step.hidden
            if hidden is None or hidden.dim() != 2 or hidden.shape[1] != self.spec.hidden_size:
                raise InvalidRequest("a later stage takes hidden states (positions x hidden)")
            if not bool(torch.isfinite(hidden).all()):
                raise InvalidRequest("hidden states hold NaN or infinity")
            x = hidden.to(device=self.device, dtype=self.dtype)
        if step.start + x.shape[0] > self.spec.context_length:
            raise InvalidRequest(f"{step.start + x.shape[0]} positions exceed the context")
        return seq, x

    def _pass(self, steps: list[StageStep], checked: list[tuple[_StageSequence, torch.Tensor]]
              ) -> list[StageResult | Exception]:
        """One forward pass over checked steps of distinct sequences, all of one length."""
        started = time.perf_counter()
        seqs = [s for s, _ in checked]
        for s in seqs:
            if s.sequence_id not in self._sequences:  # opened now
                self._sequences[s.sequence_id] = s
        try:
            with torch.inference_mode():
                results = self._forward_group(steps, checked)
        except Exception as exc:  # e.g. out of memory: these steps fail, their caches go
            log.exception("stage %s: forward pass of %d steps failed", self.name, len(steps))
            for s in seqs:
                self.release(s.sequence_id)
            return [RuntimeError(f"the stage's forward pass failed: {exc}")] * len(steps)
        busy = time.perf_counter() - started
        self.busy_s += busy
        if len(steps) > 1 or (steps[0].start > 0 and steps[0].positions == 1):
            self.batch_size_hist[len(steps)] = self.batch_size_hist.get(len(steps), 0) + 1
            self.last_decode_pass_s = busy
        if self._duty_cycle < 1.0:
            time.sleep(busy * (1.0 / self._duty_cycle - 1.0))
        share = busy / len(steps)
        return [StageResult(h, t, e, share, sc) for h, t, e, sc in results]

    def _forward_group(self, steps: list[StageStep],
                       checked: list[tuple[_StageSequence, torch.Tensor]]
                       ) -> list[tuple[torch.Tensor | None, int | None, bool, _Scores | None]]:
        seqs = [s for s, _ in checked]
        group = self._gather(seqs)
        row_of = {id(s): r for r, s in enumerate(group.rows)}
        order = sorted(range(len(seqs)), key=lambda k: row_of[id(seqs[k])])
        n = int(checked[0][1].shape[0])
        if any(x.shape[0] != n for _, x in checked):
            raise InvariantViolation("steps run together must have one length")
        xs = torch.stack([checked[k][1] for k in order])
        embeds = self._base.embed_tokens(xs) if self.is_first else xs
        kv = group.kv
        mask = F.pad(kv.mask, (0, n), value=1)
        positions = torch.tensor([[s.n_cached + j for j in range(n)] for s in group.rows],
                                 dtype=torch.long, device=self.device)
        out = self._base(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                         cache=kv.cache, use_cache=True)
        kv.mask = mask
        now = time.monotonic()
        for s in group.rows:
            s.decoding = n == 1 and s.n_cached > 0
            s.late = s.late and len(group.rows) == 1
            s.n_cached += n
            s.last_used_s = now
        states = out.last_hidden_state  # (rows, n, hidden)
        tokens: dict[int, tuple[int, bool]] = {}  # row -> (token, eos)
        if self.is_last:
            choosing: list[int] = []  # rows asked for a token
            params: list[SamplingParams] = []
            for r, k in enumerate(order):
                s, p = group.rows[r], steps[k].choose
                if p is None:
                    continue
                if s.params is None:  # the sequence's first choice fixes its sampling
                    s.params, s.generator = p, sampling.make_generator(p, self.device)
                choosing.append(r)
                params.append(s.params)
            if choosing:
                logits = self._logits(states[choosing, -1]).float()
                drawn = sampling.next_tokens(logits, params,
                                             [group.rows[r].generator for r in choosing])
                for r, t in zip(choosing, drawn.tolist(), strict=True):
                    tokens[r] = (int(t), int(t) in self._eos_ids)
        by_step: list[tuple[torch.Tensor | None, int | None, bool, _Scores | None]] = [
            (None, None, False, None)] * len(steps)
        for r, k in enumerate(order):
            hidden = None if self.is_last else states[r].detach().to("cpu")
            token, eos = tokens.get(r, (None, False))
            ask = steps[k].score
            scores = None if ask is None else self._score(states[r], ask)
            by_step[k] = (hidden, token, eos, scores)
        return by_step

    def _score(self, states: torch.Tensor, score: StageScoreAsk) -> _Scores:
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

    def expected(self, waiting: list[str]) -> list[str]:
        """Sequences decoding here whose next step is not among ``waiting`` (and that have not
        kept a pass waiting in vain): a pass that waits a little for them runs them all together
        instead of splitting the chains into passes of one (``node/stage_worker.py``)."""
        have = set(waiting)
        return [k for k, s in self._sequences.items()
                if s.decoding and not s.late and k not in have]

    def mark_late(self, sequence_ids: list[str]) -> None:
        """These were waited for and did not come: passes stop waiting for them until they step
        in a pass with others again."""
        for k in sequence_ids:
            if (s := self._sequences.get(k)) is not None:
                s.late = True

    def _gather(self, seqs: list[_StageSequence]) -> _Group:
        """The group holding exactly ``seqs``' caches: theirs if they are one already, else a
        new one, their rows moved out of the groups they were in (the rest stay there)."""
        first = seqs[0].group
        if first is not None and len(first.rows) == len(seqs) and all(
                s.group is first for s in seqs):
            return first
        if first is None:  # a new sequence: an empty cache of its own
            if len(seqs) != 1:
                raise InvariantViolation("a new sequence opens alone")
            empty = torch.zeros((1, 0), dtype=torch.long, device=self.device)
            group = _Group(KVBatch(DynamicCache(config=self._base.config), empty), [seqs[0]])
            seqs[0].group = group
            return group
        wanted = {id(s) for s in seqs}
        parts: list[KVBatch] = []
        rows: list[_StageSequence] = []
        for old in dict.fromkeys(s.group for s in seqs):
            if old is None:
                raise InvariantViolation("a new sequence opens alone")
            moving = [r for r, s in enumerate(old.rows) if id(s) in wanted]
            staying = [r for r, s in enumerate(old.rows) if id(s) not in wanted]
            if staying:
                parts.append(old.kv.take(moving))
                old.kv.keep(staying)
                old.rows, moved = ([old.rows[r] for r in staying],
                                   [old.rows[r] for r in moving])
            else:
                parts.append(old.kv)
                moved = old.rows
            rows.extend(moved)
        kv = parts[0]
        for part in parts[1:]:
            kv.merge(part)
        group = _Group(kv, rows)
        for s in rows:
            s.group = group
        return group

    @property
    def spec_vocab(self) -> int:
        return int(self._base.embed_tokens.num_embeddings)

    def _logits(self, states: torch.Tensor) -> torch.Tensor:
        if self._model.lm_head is not None:
            return self._model.lm_head(states)
        return states @ self._base.embed_tokens.weight.T

    def release(self, sequence_id: str) -> None:
        """Drop a sequence's cache (its chain ended, or moved elsewhere)."""
        seq = self._sequences.pop(sequence_id, None)
        if seq is None or seq.group is None:
            return
        group, seq.group = seq.group, None
        staying = [r for r, s in enumerate(group.rows) if s is not seq]
        if staying:
            group.kv.keep(staying)
            group.rows = [group.rows[r] for r in staying]

    def release_idle(self, idle_s: float) -> list[str]:
        """Drop the caches of sequences unused for ``idle_s``: a coordinator that forgot them."""
        now = time.monotonic()
        gone = [k for k, s in self._sequences.items() if now - s.last_used_s > idle_s]
        for k in gone:
            self.release(k)
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

"""The node protocol: typed, versioned messages between a node agent and the coordinator.

One WebSocket, dialled out by the node (so it works behind home NAT), carries JSON text frames,
one message each, with a ``type`` field. Messages are validated on decode and tolerate unknown
fields, so old and new agents share one network; a message that fails validation is a
``ProtocolError`` and the node is disconnected. ``docs/protocol.md`` documents the same schemas
for agents written in other languages.

The node agent and the coordinator both import this module and never import each other.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from sparecycles import limits
from sparecycles.errors import ProtocolError
from sparecycles.types import SamplingParams

PROTOCOL_VERSION = 1
WS_PATH = "/v1/node/ws"

# What a node can do beyond version 1's sampling (temperature, top_p, seed, stop), said in its
# ``Hello.features``. A job that needs one is placed only on nodes that said it, so an older node
# (which would ignore the new ``Sampling`` fields it does not know) never gets such a job.
FEATURE_SAMPLING_CONTROLS = "sampling-controls"  # penalties, logit_bias, top_k, min_p,
#                                                  min_tokens, ignore_eos, top log-probabilities
FEATURE_GRAMMAR = "grammar"  # Sampling.grammar: llguidance grammars (JSON schemas, tool calls)
# the engine keeps the KV cells of its last requests and prefills only what a new prompt adds to
# one of them (coordinator/prefixes.py places a conversation's next turn there)
FEATURE_PREFIX_CACHE = "prefix-cache"
# disaggregated prefill/decode: the engine exports a prefilled prompt's KV cache (``JobAssign.
# kv_export``, answered in ``kv_chunk`` messages) and decodes from one it is sent (``kv_import``)
FEATURE_KV_HANDOFF = "kv-handoff"


# No NaN or infinity anywhere in the protocol: every model refuses them (``allow_inf_nan``) and
# the decoder refuses the ``NaN``/``Infinity`` literals that Python's json accepts by default.
_WIRE = ConfigDict(extra="ignore", allow_inf_nan=False)


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)
    v: int = PROTOCOL_VERSION


# ---- shared pieces --------------------------------------------------------------------------

EnergySource = Literal["rapl", "nvml", "estimated"]  # how a node measured a job's energy
FinishReasonName = Literal["stop", "length", "cancelled"]  # why a job's attempt ended


class ModelOffer(BaseModel):
    """A model a node serves: the whole of it, or (``layers``) the contiguous range of its layers
    ``[first, end)``, whose ``weights_sha256`` is then ``modelfiles.layers_sha256`` of that range.
    A coordinator that predates ranges ignores ``layers`` and refuses the offer (the hash is not
    the whole model's), so an old coordinator never places a whole job on a stage."""

    model_config = _WIRE
    name: str = Field(min_length=1, max_length=200)
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    layers: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _range(self) -> ModelOffer:
        if self.layers is not None and not 0 <= self.layers[0] < self.layers[1] <= 100_000:
            raise ValueError("layers must be [first, end) with 0 <= first < end")
        return self


ActivationDType = Literal["float32", "float16", "bfloat16"]
activation_itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}


class Activation(BaseModel):
    """Hidden states between two stages of a chain: ``shape`` = (positions, hidden size) of
    ``dtype``, little-endian, row-major, base64 in ``data``. Bounded and checked on decode: the
    bytes must be exactly what the shape and dtype say, and at most ``activation_bytes_max``.
    (Base64 in JSON rather than binary frames: docs/protocol.md, "Activations", says why.)"""

    model_config = _WIRE
    dtype: ActivationDType
    shape: tuple[int, int]
    data: str = Field(max_length=(limits.activation_bytes_max + 2) // 3 * 4)

    @model_validator(mode="after")
    def _sizes(self) -> Activation:
        rows, cols = self.shape
        if not (1 <= rows <= limits.activation_positions_max
                and 1 <= cols <= limits.activation_hidden_max):
            raise ValueError(f"activation shape {self.shape} out of bounds")
        want = rows * cols * activation_itemsize[self.dtype]
        if want > limits.activation_bytes_max:
            raise ValueError(f"activation of {want} bytes exceeds {limits.activation_bytes_max}")
        if len(self.data) != (want + 2) // 3 * 4:
            raise ValueError(f"activation data is not {want} bytes of base64")
        return self

    def raw(self) -> bytes:
        """The tensor's bytes (checked base64)."""
        return unb64(self.data)


class KvLayout(BaseModel):
    """The KV cache of a hand-off (disaggregated prefill/decode): for each of ``layers`` layers,
    keys and values of shape (``kv_heads``, ``positions``, ``head_dim``) of ``dtype``, the
    prompt's first ``positions`` tokens. It travels as ``kv_chunks(self)``: layer by layer, each
    layer's positions in ranges of at most ``kv_chunk_bytes_max`` (keys and values together), so
    sender, coordinator and receiver all know which chunk comes next and check it."""

    model_config = _WIRE
    layers: int = Field(ge=1, le=limits.kv_layers_max)
    kv_heads: int = Field(ge=1, le=limits.kv_heads_max)
    head_dim: int = Field(ge=1, le=limits.kv_head_dim_max)
    positions: int = Field(ge=1, le=limits.kv_handoff_bytes_max)
    dtype: ActivationDType

    @model_validator(mode="after")
    def _bounds(self) -> KvLayout:
        if self.total_bytes > limits.kv_handoff_bytes_max:
            raise ValueError(f"a KV cache of {self.total_bytes} bytes exceeds "
                             f"{limits.kv_handoff_bytes_max}")
        if self.row_bytes * 2 > limits.kv_chunk_bytes_max:
            raise ValueError("one position of one layer exceeds kv_chunk_bytes_max")
        if len(kv_chunks(self)) > limits.kv_chunks_max:
            raise ValueError(f"a KV cache of more than {limits.kv_chunks_max} chunks")
        return self

    @property
    def row_bytes(self) -> int:
        """Bytes of one position's keys (or values) in one layer."""
        return self.kv_heads * self.head_dim * activation_itemsize[self.dtype]

    @property
    def total_bytes(self) -> int:
        return 2 * self.layers * self.positions * self.row_bytes


def kv_chunks(layout: KvLayout) -> list[tuple[int, int, int]]:
    """The chunks a KV cache travels in, in order: (layer, first position, positions)."""
    per_chunk = max(1, limits.kv_chunk_bytes_max // (2 * layout.row_bytes))
    return [(layer, start, min(per_chunk, layout.positions - start))
            for layer in range(layout.layers)
            for start in range(0, layout.positions, per_chunk)]


_kv_b64_chars_max = (limits.kv_chunk_bytes_max + 2) // 3 * 4


class Sampling(BaseModel):
    """``types.SamplingParams`` on the wire. Fields after ``stop`` need a node feature
    (``features_needed``); their defaults change nothing, so version-1 nodes read plain jobs."""

    model_config = _WIRE
    max_tokens: int = Field(ge=1, le=limits.completion_tokens_max)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list, max_length=limits.stop_sequences_max)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=limits.repetition_penalty_max)
    logit_bias: list[tuple[int, float]] = Field(default_factory=list,
                                                max_length=limits.logit_bias_entries_max)
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    min_tokens: int = Field(default=0, ge=0, le=limits.completion_tokens_max)
    ignore_eos: bool = False
    grammar: str | None = Field(default=None, max_length=limits.grammar_bytes_max)
    top_logprobs: int = Field(default=0, ge=0, le=limits.top_logprobs_max)
    logprobs: bool = False

    @classmethod
    def of(cls, params: SamplingParams, max_tokens: int | None = None) -> Sampling:
        fields = {f: getattr(params, f) for f in cls.model_fields if f not in ("stop",
                                                                                "logit_bias")}
        fields["max_tokens"] = params.max_tokens if max_tokens is None else max_tokens
        return cls(stop=list(params.stop), logit_bias=list(params.logit_bias), **fields)

    def params(self) -> SamplingParams:
        fields = {f: getattr(self, f) for f in type(self).model_fields
                  if f not in ("stop", "logit_bias")}
        return SamplingParams(stop=tuple(self.stop),
                              logit_bias=tuple((int(t), float(b)) for t, b in self.logit_bias),
                              **fields)


def features_needed(params: SamplingParams) -> frozenset[str]:
    """The node features (``Hello.features``) a job with these parameters needs."""
    needs = set()
    if params.grammar is not None:
        needs.add(FEATURE_GRAMMAR)
    if not params.is_plain or params.top_logprobs:
        needs.add(FEATURE_SAMPLING_CONTROLS)
    return frozenset(needs)


class Metering(BaseModel):
    """What the node measured for one attempt of a job; part of the signed report."""

    model_config = _WIRE
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    time_to_first_token_s: float = Field(ge=0)
    total_s: float = Field(ge=0)
    busy_s: float = Field(ge=0)
    energy_j: float = Field(default=0.0, ge=0)
    energy_source: EnergySource = "estimated"


# ---- node -> coordinator --------------------------------------------------------------------


class Hello(_Message):
    """First message on a new socket: who the node is and what it can serve."""

    type: Literal["hello"] = "hello"
    token: str = Field(min_length=8, max_length=200)  # the owner's node token
    public_key: str = Field(min_length=40, max_length=60)  # base64 raw Ed25519 public key
    name: str = Field(default="", max_length=200)
    agent_version: str = Field(default="", max_length=40)
    profile: dict[str, Any]  # DeviceProfile fields
    availability: dict[str, Any] = Field(default_factory=dict)  # AvailabilityPolicy fields
    models: list[ModelOffer] = Field(max_length=limits.models_per_node_max)
    jobs_max: int = Field(default=8, ge=1, le=limits.jobs_per_node_max)
    nonce_signature: str = ""  # signature over the coordinator's challenge; see Challenge
    features: list[str] = Field(default_factory=list, max_length=16)  # FEATURE_* it serves


class Heartbeat(_Message):
    type: Literal["heartbeat"] = "heartbeat"
    active_jobs: int = Field(default=0, ge=0)
    available: bool = True
    on_ac_power: bool = True
    charging: bool = False
    owner_load: float = Field(default=0.0, ge=0.0, le=1.0)
    temperature_c: float | None = None


class Tokens(_Message):
    """New tokens of a job, in order; ``index`` is the position of the first one in the attempt."""

    type: Literal["tokens"] = "tokens"
    job_id: str = Field(max_length=40)
    attempt: int = Field(ge=1)
    index: int = Field(ge=0)
    token_ids: list[int] = Field(min_length=1, max_length=limits.tokens_per_message_max)
    # log p of each token under the model (no temperature), when the job asked want_logprobs
    logprobs: list[float] | None = Field(default=None, max_length=limits.tokens_per_message_max)
    # the Sampling.top_logprobs likeliest tokens at each position: [[token id, log p], ...]
    top_logprobs: list[list[tuple[int, float]]] | None = Field(
        default=None, max_length=limits.tokens_per_message_max)


class Done(_Message):
    """The end of an attempt, with the node's metering, signed with the node's key."""

    type: Literal["done"] = "done"
    job_id: str = Field(max_length=40)
    attempt: int = Field(ge=1)
    finish_reason: FinishReasonName
    metering: Metering
    output_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    signature: str = Field(min_length=40, max_length=120)
    # logprobs_sha256 of the attempt's log-probabilities, when the client asked for them (signed)
    logprobs_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")


class JobError(_Message):
    type: Literal["job_error"] = "job_error"
    job_id: str = Field(max_length=40)
    attempt: int = Field(ge=1)
    message: str = Field(max_length=2000)


class Draining(_Message):
    """The owner is taking the device back: no new jobs; running ones end within grace_s."""

    type: Literal["draining"] = "draining"
    grace_s: float = Field(ge=0, le=3600)
    reason: str = Field(default="", max_length=200)


FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
ScoreList = Annotated[list[FiniteFloat], Field(max_length=limits.score_tokens_max)]


class Scored(_Message):
    """A verifier's teacher-forced pass over a ``score`` request: one entry per output token.

    ``logprobs``: log p(token) under the model, untempered; ``top_logprobs``: the best log p at
    that position; ``mass_above``: probability of the tokens likelier than it, at the request's
    temperature; ``expected_logprobs`` / ``logprob_vars``: mean and variance of log p(t) for t
    drawn with the request's temperature and top_p. ``error`` instead when it could not score."""

    type: Literal["scored"] = "scored"
    score_id: str = Field(max_length=40)
    logprobs: ScoreList = Field(default_factory=list)
    top_logprobs: ScoreList = Field(default_factory=list)
    mass_above: ScoreList = Field(default_factory=list)
    expected_logprobs: ScoreList = Field(default_factory=list)
    logprob_vars: ScoreList = Field(default_factory=list)
    busy_s: float = Field(default=0.0, ge=0, le=limits.verification_timeout_s * 10)
    error: str | None = Field(default=None, max_length=2000)


StageScoreList = Annotated[list[FiniteFloat], Field(max_length=limits.activation_positions_max)]


class StageScores(BaseModel):
    """A last stage's teacher-forced statistics of the positions a ``StageScore`` asked for, one
    entry per target, with the meanings of ``Scored``'s fields."""

    model_config = _WIRE
    logprobs: StageScoreList
    top_logprobs: StageScoreList
    mass_above: StageScoreList
    expected_logprobs: StageScoreList
    logprob_vars: StageScoreList


class StageOutput(_Message):
    """A stage's answer to one ``stage_forward``: the hidden states of the positions it ran (a
    stage that is not the last), or the next token (the last stage, when asked to choose one),
    or ``error``. ``busy_s`` is the node's compute time for the step (metering, not trusted).
    ``scores``: the last stage's answer to ``StageForward.score`` (verification)."""

    type: Literal["stage_output"] = "stage_output"
    sequence_id: str = Field(max_length=80)
    step: int = Field(ge=0)
    hidden: Activation | None = None
    token: int | None = Field(default=None, ge=0)
    eos: bool = False
    busy_s: float = Field(default=0.0, ge=0, le=limits.stage_step_s_max * 10)
    error: str | None = Field(default=None, max_length=2000)
    scores: StageScores | None = None


class KvChunk(_Message):
    """One chunk of a hand-off's KV cache (``KvLayout``, ``kv_chunks``): layer ``layer``'s keys
    and values of positions ``start .. start + positions``, each (kv_heads, positions, head_dim)
    of ``dtype``, little-endian, row-major, base64. From the prefilling node (its attempt) to the
    coordinator, then from the coordinator to the decoding node (that node's attempt). Checked
    on decode: the bytes are exactly what the shape says, at most ``kv_chunk_bytes_max``."""

    type: Literal["kv_chunk"] = "kv_chunk"
    job_id: str = Field(max_length=40)
    attempt: int = Field(ge=1)
    index: int = Field(ge=0, lt=limits.kv_chunks_max)  # its place in kv_chunks(layout)
    layout: KvLayout
    keys: str = Field(max_length=_kv_b64_chars_max)
    values: str = Field(max_length=_kv_b64_chars_max)

    @model_validator(mode="after")
    def _sizes(self) -> KvChunk:
        plan = kv_chunks(self.layout)
        if self.index >= len(plan):
            raise ValueError(f"chunk {self.index} of a cache of {len(plan)} chunks")
        want = plan[self.index][2] * self.layout.row_bytes
        chars = (want + 2) // 3 * 4
        if len(self.keys) != chars or len(self.values) != chars:
            raise ValueError(f"kv chunk data is not {want} bytes of base64 each")
        return self

    @property
    def place(self) -> tuple[int, int, int]:
        """(layer, first position, positions) of this chunk."""
        return kv_chunks(self.layout)[self.index]


NodeMessage = Annotated[
    Hello | Heartbeat | Tokens | Done | JobError | Draining | Scored | StageOutput | KvChunk,
    Field(discriminator="type"),
]

# ---- coordinator -> node --------------------------------------------------------------------


class Challenge(_Message):
    """Sent first by the coordinator; the node signs ``nonce`` in its Hello to prove its key."""

    type: Literal["challenge"] = "challenge"
    nonce: str


class Welcome(_Message):
    type: Literal["welcome"] = "welcome"
    node_id: str
    owner_id: str
    heartbeat_interval_s: float
    accepted_models: list[str]
    rejected_models: dict[str, str] = Field(default_factory=dict)  # name -> reason


class JobAssign(_Message):
    """Work for the node. ``prompt_token_ids`` already include tokens of earlier attempts."""

    type: Literal["job"] = "job"
    job_id: str
    attempt: int
    model: str
    prompt_token_ids: list[int]
    sampling: Sampling
    prompt_sha256: str
    want_logprobs: bool = False  # send ``Tokens.logprobs`` (spot checks compare them)
    # the last ``resumed_tokens`` of the prompt are this job's output from earlier attempts: the
    # grammar, penalties and min_tokens count them as output
    resumed_tokens: int = Field(default=0, ge=0)
    # disaggregated prefill/decode (FEATURE_KV_HANDOFF): ``kv_export`` asks the node to send the
    # prompt's KV cache (``kv_chunk`` messages, before its ``done``) once it has sampled the
    # first token (such a job has ``max_tokens`` 1); ``kv_import`` says the coordinator will
    # send this attempt the KV cache of the prompt's first ``positions`` tokens right after this
    # message: the node loads it and prefills only the rest (or, when it does not all arrive
    # intact within ``kv_handoff_s_max``, prefills the whole prompt itself).
    kv_export: bool = False
    kv_import: KvLayout | None = None


class Score(_Message):
    """Verification work: score ``output_token_ids`` after ``prompt_token_ids`` in one prefill
    pass (teacher forcing) and answer ``scored``. The node serves it between decode steps."""

    type: Literal["score"] = "score"
    score_id: str
    model: str
    prompt_token_ids: list[int]
    output_token_ids: list[int] = Field(min_length=1, max_length=limits.score_tokens_max)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    # the job's whole sampling, when it used more than temperature and top_p: the verifier
    # processes each position's logits as the node did (grammar, penalties, bias, cuts)
    sampling: Sampling | None = None
    resumed_tokens: int = Field(default=0, ge=0)  # the prompt's last tokens that are output


class Cancel(_Message):
    type: Literal["cancel"] = "cancel"
    job_id: str
    attempt: int


class Reject(_Message):
    """Sent before closing a socket the coordinator will not serve (bad token, bad message)."""

    type: Literal["reject"] = "reject"
    reason: str


class StageScore(BaseModel):
    """Verification through a chain (``StageForward.score``, last stage only): score positions
    ``offset ..`` of this message as a ``score`` request scores a whole model's, position
    ``offset + j`` being followed by ``targets[j]``; answered in ``StageOutput.scores``."""

    model_config = _WIRE
    offset: int = Field(ge=0, lt=limits.activation_positions_max)
    targets: list[int] = Field(min_length=1, max_length=limits.activation_positions_max)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)


class StageForward(_Message):
    """Chain work for a stage: run positions ``start ..`` of sequence ``sequence_id`` through the
    node's layers of ``model``, keeping their keys and values, and answer ``stage_output``.
    The first stage gets ``token_ids``, the others the previous stage's ``hidden``; ``start`` 0
    opens the sequence (a replacement stage rebuilds its cache that way, from every input the
    stage it replaces had received). ``choose`` (last stage only) asks for the next token;
    ``score`` (last stage only) for teacher-forced statistics of some of the positions (a spot
    check of a chain's answer: ``coordinator/verification_chains.py``)."""

    type: Literal["stage_forward"] = "stage_forward"
    sequence_id: str = Field(max_length=80)
    model: str = Field(max_length=200)
    step: int = Field(ge=0)
    start: int = Field(ge=0)
    token_ids: list[int] | None = Field(default=None, max_length=limits.activation_positions_max)
    hidden: Activation | None = None
    choose: Sampling | None = None
    score: StageScore | None = None


class StageRelease(_Message):
    """The chain of ``sequence_id`` is over (or moved on): drop that sequence's cache."""

    type: Literal["stage_release"] = "stage_release"
    sequence_id: str = Field(max_length=80)
    model: str = Field(max_length=200)


CoordinatorMessage = Annotated[
    Challenge | Welcome | JobAssign | Score | Cancel | Reject | StageForward | StageRelease
    | KvChunk,
    Field(discriminator="type"),
]

_node_adapter: TypeAdapter[
    Hello | Heartbeat | Tokens | Done | JobError | Draining | Scored | StageOutput | KvChunk
] = TypeAdapter(NodeMessage)
_coord_adapter: TypeAdapter[
    Challenge | Welcome | JobAssign | Score | Cancel | Reject | StageForward | StageRelease
    | KvChunk
] = TypeAdapter(CoordinatorMessage)
_Decoded = TypeVar("_Decoded")


def _loads(raw: str | bytes) -> Any:
    """Strict JSON: ``orjson`` refuses ``NaN``, ``Infinity`` and ``-Infinity`` (not JSON, but
    accepted by Python's decoder by default), numbers that overflow to infinity (``1e999``) and
    text that is not UTF-8. About ten times faster than ``json.loads`` with the hooks it took to
    refuse the same (every token message of every node goes through here; docs/benchmarks.md,
    issue 19)."""
    return orjson.loads(raw)


def _decode(adapter: TypeAdapter[_Decoded], raw: str | bytes) -> _Decoded:
    if len(raw) > limits.ws_message_bytes_max:
        raise ProtocolError(f"message of {len(raw)} bytes exceeds {limits.ws_message_bytes_max}")
    try:
        data = _loads(raw)
    except ValueError as exc:  # orjson.JSONDecodeError, bad UTF-8 or nesting too deep included
        raise ProtocolError(f"message is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError("message must be a JSON object")
    version = data.get("v", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r} not supported ({PROTOCOL_VERSION})")
    try:
        return adapter.validate_python(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise ProtocolError(f"invalid message at {where or 'top'}: {first['msg']}") from None


def decode_node_message(
    raw: str | bytes,
) -> Hello | Heartbeat | Tokens | Done | JobError | Draining | Scored | StageOutput | KvChunk:
    """Parse a frame from a node; raises ``ProtocolError`` for anything not in the protocol."""
    return _decode(_node_adapter, raw)


def decode_coordinator_message(
    raw: str | bytes,
) -> (Challenge | Welcome | JobAssign | Score | Cancel | Reject | StageForward | StageRelease
      | KvChunk):
    return _decode(_coord_adapter, raw)


def encode(message: BaseModel) -> str:
    return message.model_dump_json()


# ---- what a result signature covers ----------------------------------------------------------


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tokens_sha256(token_ids: list[int] | tuple[int, ...]) -> str:
    """Hash of a token sequence: the decimal ids joined by commas, UTF-8."""
    return sha256_hex(",".join(str(t) for t in token_ids).encode())


def result_payload(
    *,
    job_id: str,
    attempt: int,
    weights_sha256: str,
    prompt_sha256: str,
    output_sha256: str,
    finish_reason: str,
    metering: Metering,
    logprobs_sha256: str | None = None,
) -> bytes:
    """The exact bytes a node signs for a result: canonical JSON (sorted keys, no spaces).
    ``logprobs_sha256`` is part of it only when set (older nodes never set it)."""
    body: dict[str, Any] = {
        "job_id": job_id,
        "attempt": attempt,
        "weights_sha256": weights_sha256,
        "prompt_sha256": prompt_sha256,
        "output_sha256": output_sha256,
        "finish_reason": finish_reason,
        "metering": metering.model_dump(mode="json"),
    }
    if logprobs_sha256 is not None:
        body["logprobs_sha256"] = logprobs_sha256
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def logprobs_sha256(logprobs: list[float], top_logprobs: list[list[tuple[int, float]]] | None
                    ) -> str:
    """Hash of an attempt's log-probabilities as sent in its ``tokens`` messages: canonical JSON
    (no spaces) of ``[logprobs, top_logprobs]``, floats in Python's shortest round-trip form."""
    top = [[[int(t), float(lp)] for t, lp in row] for row in top_logprobs or []]
    body = [[float(x) for x in logprobs], top]
    return sha256_hex(json.dumps(body, separators=(",", ":")).encode())


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise ProtocolError("invalid base64") from None

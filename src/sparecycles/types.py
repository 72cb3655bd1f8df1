"""The shared vocabulary: the plain dataclasses that every part of sparecycles speaks.

The coordinator, the node agent, the scheduler, the ledger, the cost engine and the simulator all
exchange these and nothing richer. They hold no behaviour beyond derived properties, so a pure
decision (placement, prediction, pricing, allocation) is a function from these to these.

Units are last in every name (``_s``, ``_bytes``, ``_micros``). Money is always an integer count of
micro-units of an explicit currency (1 USD = 1_000_000 micros); physics (bandwidth, FLOP/s,
seconds) is float.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

MICROS_PER_UNIT = 1_000_000


class Workload(enum.StrEnum):
    """What a job is for; decides whether its cost is COGS (inference) or operating expense."""

    INFERENCE = "inference"
    TRAINING = "training"  # inference used inside training pipelines (data generation, RL, eval)
    RND = "rnd"


class JobState(enum.StrEnum):
    """The job lifecycle (see coordinator/dispatch.py): admitted -> placed -> streaming -> done |
    failed.

    A job whose node leaves goes back to ``admitted`` with the tokens it already produced and is
    placed again (resumed elsewhere); its attempts are recorded separately.
    """

    ADMITTED = "admitted"
    PLACED = "placed"
    STREAMING = "streaming"
    DONE = "done"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED)


class AttemptOutcome(enum.StrEnum):
    """How one attempt of a job ended (the ``outcome`` of its row in ``job_attempts``)."""

    RUNNING = "running"  # not ended yet
    DONE = "done"  # a signed result that verified
    CANCELLED = "cancelled"  # the client went away, or its text reached a stop string
    FAILED = "failed"  # the node handed the job back
    DRAINED = "drained"  # handed back because its owner took the device back
    NODE_LOST = "node_lost"  # the node's socket closed
    NODE_SILENT = "node_silent"  # no token for token_gap_s
    PROTOCOL_GAP = "protocol_gap"  # the node skipped tokens
    BAD_SIGNATURE = "bad_signature"  # the result does not verify
    BAD_METERING = "bad_metering"  # its metering is out of bounds (trust.decisions)
    REPLICA_LOST = "replica_lost"  # the replica holding its socket died: not the node's fault


class FinishReason(enum.StrEnum):
    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens reached, or the model's context is full


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to draw tokens. ``temperature == 0`` means greedy decoding.

    The controls after ``stop`` change the logits before the draw, in the order vLLM applies
    them (``node/backends/sampling.py``): ``logit_bias``, the grammar's mask, ``min_tokens`` (no
    end of sequence before it) and ``ignore_eos``, the repetition, frequency and presence
    penalties; then temperature and the ``top_k``, ``top_p`` and ``min_p`` cuts. Their defaults
    change nothing, and ``is_plain`` says a request uses none of them.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0  # subtracted once from every token already in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # logits of prompt or output tokens divided (or x) by it
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), id order
    top_k: int = 0  # 0: no cut
    min_p: float = 0.0  # drop tokens less likely than min_p x the best one
    min_tokens: int = 0  # end of sequence forbidden before this many tokens
    ignore_eos: bool = False  # end of sequence forbidden: the job runs to max_tokens
    grammar: str | None = None  # llguidance grammar (JSON) the output must match
    top_logprobs: int = 0  # the client asked for log-probabilities: the N best at each token
    logprobs: bool = False  # the client asked for the chosen tokens' log-probabilities

    @property
    def is_plain(self) -> bool:
        """Temperature, top_p, seed and stop only: the batched fast path samples it."""
        return (self.presence_penalty == 0 and self.frequency_penalty == 0
                and self.repetition_penalty == 1 and not self.logit_bias and self.top_k == 0
                and self.min_p == 0 and self.min_tokens == 0 and not self.ignore_eos
                and self.grammar is None)


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    """What a node's hardware can do, measured by the agent where it can be (see node/profile.py).

    Decoding a token reads every weight once, so ``memory_bandwidth_bytes_per_s`` (measured, not
    the datasheet figure) is what bounds decode speed; ``peak_flops`` bounds prefill.
    """

    device_class: str  # "gaming-pc", "laptop", "car", "server", "datacenter-gpu", ...
    cpu_cores: int
    ram_bytes: int
    memory_bandwidth_bytes_per_s: float
    peak_flops: float
    accelerator: str | None = None  # e.g. "cuda:NVIDIA H100 80GB HBM3"; None for CPU only
    accelerator_memory_bytes: int = 0
    network_rtt_s: float = 0.0
    power_idle_w: float = 0.0
    power_busy_w: float = 0.0
    # Measured by node/profile.py where torch is present; empty or zero means "not measured", and
    # the performance model then falls back to the idealised roofline (presets, old nodes).
    # FLOP/s of a linear layer whose weights stream from memory, by the rows of its input (the
    # batch in decode, the prompt's tokens in prefill): ((rows, FLOP/s), ...), rows ascending.
    matmul_flops_by_rows: tuple[tuple[int, float], ...] = ()
    matmul_bytes_per_param: float = 0.0  # the precision those were measured in (4 = fp32)
    # The inference engine's own time per forward pass outside the maths (Python, op dispatch,
    # sampling), measured on a model too small to compute (node/overhead.py): step + layers *
    # layer + batch * (sequence + layers * (sequence_layer + context * context_layer)) seconds.
    overhead_step_s: float = 0.0
    overhead_layer_s: float = 0.0
    overhead_sequence_s: float = 0.0
    overhead_sequence_layer_s: float = 0.0
    overhead_context_layer_s: float = 0.0  # per sequence, token of context and layer
    # Measured where the node runs llama.cpp (node/llamacpp_profile.py): the rate llama.cpp's
    # kernels consume each weight type's bytes in a decode step of ``rows`` sequences,
    # ((type, rows, bytes/s), ...), and the llama.cpp engine's own time per pass outside the
    # weights' maths, the five terms of overhead_* above in the same order. Empty: not measured.
    llamacpp_read_by_rows: tuple[tuple[str, int, float], ...] = ()
    llamacpp_overhead: tuple[float, ...] = ()
    # The same rates on a narrow probe (a model of hidden size ``llamacpp_narrow_hidden``; the
    # rates above are of one of ``llamacpp_wide_hidden``): each output row's dot product has a
    # fixed cost, so narrow matrices are read slower. perfmodel interpolates a model's rates by
    # its hidden size. Empty / 0: not measured (an older profile): every model at the rates above.
    llamacpp_narrow_read_by_rows: tuple[tuple[str, int, float], ...] = ()
    llamacpp_narrow_hidden: int = 0
    llamacpp_wide_hidden: int = 0
    # The node's network link, bytes/s each way (home broadband is asymmetric: often 10-50
    # Mbit/s up against hundreds down); 0 means not known, and the scheduler then never ships a
    # KV cache from or to the node (disaggregated prefill/decode, docs/scheduling.md).
    uplink_bytes_per_s: float = 0.0
    downlink_bytes_per_s: float = 0.0

    def __post_init__(self) -> None:
        # JSON (a cached profile, a node's hello) gives lists; keep the profile hashable
        rows = tuple((int(r), float(f)) for r, f in self.matmul_flops_by_rows)
        object.__setattr__(self, "matmul_flops_by_rows", rows)
        reads = tuple((str(t), int(r), float(b)) for t, r, b in self.llamacpp_read_by_rows)
        object.__setattr__(self, "llamacpp_read_by_rows", reads)
        narrow = tuple((str(t), int(r), float(b))
                       for t, r, b in self.llamacpp_narrow_read_by_rows)
        object.__setattr__(self, "llamacpp_narrow_read_by_rows", narrow)
        terms = tuple(float(x) for x in self.llamacpp_overhead)
        object.__setattr__(self, "llamacpp_overhead", terms)

    @property
    def usable_memory_bytes(self) -> int:
        """Memory that holds weights and KV cache: the accelerator's if present, else RAM."""
        return self.accelerator_memory_bytes if self.accelerator else self.ram_bytes


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What the performance model and the scheduler need to know about a model."""

    name: str
    n_params: int
    bytes_per_param: float  # 2 for bf16/fp16, 4 for fp32, ~0.56 for 4-bit GGUF
    n_layers: int
    hidden_size: int
    n_kv_heads: int
    head_dim: int
    context_length: int
    weights_sha256: str = ""
    # A GGUF's weights read per decode step by tensor type, ((type, bytes), ...) sorted: every
    # tensor but the input embedding (unless tied to the output). Empty for other formats. With
    # a profile that measured llama.cpp's kernels per type, perfmodel times each type's share.
    bytes_by_type: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        # JSON (the coordinator's stored specs) gives lists; keep the spec hashable
        pairs = tuple((str(t), int(n)) for t, n in self.bytes_by_type)
        object.__setattr__(self, "bytes_by_type", pairs)

    @property
    def weight_bytes(self) -> int:
        return int(self.n_params * self.bytes_per_param)

    @property
    def decode_weight_bytes(self) -> int:
        """Weights read per decode step: ``bytes_by_type``'s sum where known, else all."""
        if self.bytes_by_type:
            return sum(n for _, n in self.bytes_by_type)
        return self.weight_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """Keys and values for every layer, at the weights' precision."""
        return int(2 * self.n_layers * self.n_kv_heads * self.head_dim * self.bytes_per_param)


@dataclass(frozen=True, slots=True)
class AvailabilityPolicy:
    """When an owner lets the device work. All conditions must hold.

    ``windows`` are (start_minute, end_minute) of the owner's local day, end exclusive; a window
    that wraps midnight has start > end. Empty means "any time". The local day is that of
    ``time_zone`` (an IANA name such as ``Europe/Berlin``, daylight saving included) when it is
    set, else UTC shifted by ``utc_offset_minutes`` all year round (policies written before
    time zones existed; such a window slips an hour at each daylight-saving change).
    """

    windows: tuple[tuple[int, int], ...] = ()
    utc_offset_minutes: int = 0
    time_zone: str = ""  # IANA time zone of the windows; "" means utc_offset_minutes
    only_on_ac_power: bool = False
    only_while_charging: bool = False  # e.g. a parked car lends its computer only while charging
    owner_load_max: float = 1.0  # the owner's own CPU/GPU load, 0..1, above which we yield
    temperature_max_c: float | None = None
    drain_grace_s: float = 30.0  # time to finish work once the owner takes the device back


@dataclass(frozen=True, slots=True)
class Job:
    """One request's work, as the scheduler sees it."""

    job_id: str
    model: str
    prompt_tokens: int
    max_tokens: int
    client_id: str
    admitted_at_s: float
    generated_tokens: int = 0  # tokens already produced by earlier attempts (resumption)
    deadline_s: float | None = None
    trusted_only: bool = False
    workload: Workload = Workload.INFERENCE
    avoid_nodes: tuple[str, ...] = ()  # never place here: a hedge's first node, one that failed it
    needs: frozenset[str] = frozenset()  # node features (protocol.FEATURE_*) the job needs
    # multi-turn conversations: the key of the KV-cache prefix this job shares with an earlier
    # one (its conversation) and how many of its prompt tokens that prefix covers
    prefix_key: str = ""
    prefix_tokens: int = 0

    @property
    def remaining_tokens(self) -> int:
        return max(0, self.max_tokens - self.generated_tokens)


@dataclass(frozen=True, slots=True)
class NodeSnapshot:
    """A node as the scheduler sees it at one instant."""

    node_id: str
    owner_id: str
    profile: DeviceProfile
    models: tuple[str, ...]  # models loaded and verified (weights hash matches the registry)
    active_jobs: int = 0
    jobs_max: int = 8
    queued_tokens: int = 0  # tokens still to generate for the jobs already on it
    # Prompt tokens of jobs placed here whose prefill has not finished (the prefill backlog: a
    # new job's first token comes after them), and their predicted prefill seconds (0: not
    # predicted by the caller; the scheduler then predicts the prefill of that many tokens)
    prefill_backlog_tokens: int = 0
    prefill_backlog_s: float = 0.0
    # KV-cache tokens the jobs already on the node may fill: each its prompt (with what earlier
    # attempts generated) plus the tokens it may still generate. 0 with active_jobs > 0: not
    # reported; the scheduler then counts each running job at the new job's full context.
    kv_reserved_tokens: int = 0
    measured_decode_tokens_per_s: dict[str, float] = field(default_factory=dict)  # per job
    # the batch (jobs running on the node) those per-job speeds were measured at, averaged the
    # same way: a job's speed at batch 8 is compared with the prediction at batch 8
    measured_decode_batch: dict[str, float] = field(default_factory=dict)
    available: bool = True
    expected_stay_s: float = float("inf")
    reputation: float = 1.0
    draining: bool = False
    # measured / predicted decode speed per model, an EWMA kept by scheduler.update_speed_factor;
    # a model absent here is taken at the performance model's word (1.0)
    decode_speed_factor: dict[str, float] = field(default_factory=dict)
    price_micros_per_mtok: int = 0  # the owner's asking price per million tokens (prompt + output)
    last_assigned_s: float = float("-inf")  # when a job was last placed here (round-robin order)
    relayed: bool = False  # connected to another coordinator replica: its tokens cross the bus
    features: frozenset[str] = frozenset()  # protocol.FEATURE_* the node said it serves
    # prefix cache: tokens of KV cache the node holds per prefix key (Job.prefix_key); a job
    # whose prefix is held here prefills only the rest of its prompt
    cached_prefixes: Mapping[str, int] = field(default_factory=dict)
    # model -> (first, end): the layers of a model it holds as a stage of chains (hash checked);
    # such a model is not in ``models`` (it cannot take a whole job)
    layer_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    # seconds of KV-cache transfers (disaggregated prefill/decode) queued on the node's uplink
    # and downlink, those not yet started included: a new one waits for them
    uplink_backlog_s: float = 0.0
    downlink_backlog_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Assignment:
    job_id: str
    node_id: str
    predicted_finish_s: float
    # disaggregated prefill/decode: node_id prefills the prompt (and samples the first token),
    # then ships the KV cache to this node, which decodes the rest; "" when node_id does both
    decode_node_id: str = ""


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """What one attempt of a job did on one node, as metered there (and signed)."""

    job_id: str
    attempt: int
    node_id: str
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float
    total_s: float
    busy_s: float
    energy_j: float = 0.0
    energy_source: str = "estimated"  # "rapl", "nvml" or "estimated"


@dataclass(frozen=True, slots=True)
class Transfer:
    """One immutable double-entry movement of money between two accounts.

    ``transfer_id`` is derived from the job and the event (``job:<id>:charge``), so a retried
    posting is recognised and never applied twice.
    """

    transfer_id: str
    debit_account: str
    credit_account: str
    amount_micros: int
    currency: str
    kind: str
    job_id: str | None = None
    pending_id: str | None = None  # for post/void: the hold this settles


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A job's row as admission writes it (the store's ``jobs`` table), in the transaction of
    its hold (``Ledger.hold(job=...)``). A refused hold writes it ``failed`` with the reason."""

    id: str
    client_id: str
    model: str
    endpoint: str  # "chat.completions" | "completions"
    prompt_tokens: int
    max_tokens: int
    created_at_s: float  # epoch
    api_key_id: str | None = None
    workload: Workload = Workload.INFERENCE
    state: JobState = JobState.ADMITTED
    stream: bool = False
    trusted_only: bool = False
    replica_id: str | None = None
    error: str | None = None
    finished_at_s: float | None = None  # epoch
    # placed as it was admitted: its first attempt's node (the attempt's row rides along)
    node_id: str | None = None
    attempts: int = 0

    def as_row(self) -> dict[str, object]:
        """The columns, enums as their plain string values (what the database holds)."""
        row: dict[str, object] = {
            "id": self.id, "client_id": self.client_id, "api_key_id": self.api_key_id,
            "model": self.model, "endpoint": self.endpoint, "workload": str(self.workload),
            "state": str(self.state), "stream": self.stream, "trusted_only": self.trusted_only,
            "prompt_tokens": self.prompt_tokens, "max_tokens": self.max_tokens,
            "replica_id": self.replica_id, "created_at_s": self.created_at_s,
        }
        if self.error is not None or self.finished_at_s is not None:
            row.update(error=self.error, finished_at_s=self.finished_at_s)
        if self.attempts:
            row.update(node_id=self.node_id, attempts=self.attempts)
        return row


@dataclass(frozen=True, slots=True)
class JobFinal:
    """A job's final fields, written in the transaction of its settlement or void
    (``Ledger.settle(job=...)``, ``Ledger.void(job=...)``): a job closes exactly when its money
    does. Times are epoch seconds (``*_at_s``) or durations (``*_s``)."""

    state: JobState
    completion_tokens: int
    finished_at_s: float
    total_s: float
    finish_reason: str | None = None
    error: str | None = None
    first_token_at_s: float | None = None  # with time_to_first_token_s: only once a token came
    time_to_first_token_s: float | None = None

    def as_row(self) -> dict[str, object]:
        row: dict[str, object] = {
            "state": str(self.state), "completion_tokens": self.completion_tokens,
            "finish_reason": self.finish_reason, "error": self.error,
            "finished_at_s": self.finished_at_s, "total_s": self.total_s,
        }
        if self.first_token_at_s is not None:
            row.update(first_token_at_s=self.first_token_at_s,
                       time_to_first_token_s=self.time_to_first_token_s)
        return row


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    """Limits of one API key; ``None`` means no limit of that kind. Kept by the store
    (``store/trust_queries.py``), applied by ``coordinator/ratelimit.py``."""

    requests_per_minute: int | None = None
    burst: int | None = None  # requests allowed at once before the rate applies (default: rpm)
    budget_micros: int | None = None  # spend cap per ``budget_period`` (holds count)
    budget_period: str = "month"
    monthly_budget_micros: int | None = None  # the client's own cap from the dashboard
    streams_max: int | None = None  # requests in flight at once
    trusted_only: bool = False  # every job of this key runs on trusted nodes only

    @property
    def unlimited(self) -> bool:
        return (self.requests_per_minute is None and self.budget_micros is None
                and self.monthly_budget_micros is None and self.streams_max is None)

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


class FinishReason(enum.StrEnum):
    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens reached, or the model's context is full


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to draw tokens. ``temperature == 0`` means greedy decoding."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


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

    def __post_init__(self) -> None:
        # JSON (a cached profile, a node's hello) gives lists; keep the profile hashable
        rows = tuple((int(r), float(f)) for r, f in self.matmul_flops_by_rows)
        object.__setattr__(self, "matmul_flops_by_rows", rows)

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

    @property
    def weight_bytes(self) -> int:
        return int(self.n_params * self.bytes_per_param)

    @property
    def kv_bytes_per_token(self) -> int:
        """Keys and values for every layer, at the weights' precision."""
        return int(2 * self.n_layers * self.n_kv_heads * self.head_dim * self.bytes_per_param)


@dataclass(frozen=True, slots=True)
class AvailabilityPolicy:
    """When an owner lets the device work. All conditions must hold.

    ``windows`` are (start_minute, end_minute) of the owner's local day, end exclusive; a window
    that wraps midnight has start > end. Empty means "any time".
    """

    windows: tuple[tuple[int, int], ...] = ()
    utc_offset_minutes: int = 0
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
    # prefix cache: tokens of KV cache the node holds per prefix key (Job.prefix_key); a job
    # whose prefix is held here prefills only the rest of its prompt
    cached_prefixes: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Assignment:
    job_id: str
    node_id: str
    predicted_finish_s: float


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

"""The performance model: roofline predictions from a device profile and a model spec.

Pure arithmetic, no I/O. The scheduler, the owner's earnings estimate, ``sparecycles plan`` and the
simulator all call these functions, so they agree on what a device can do.

The physics, in short (docs/scheduling.md has the long form):

- **Decode** makes one token per running sequence per step. A step reads every weight once (shared
  by the whole batch) plus each sequence's KV cache, and does about ``2 * n_params`` FLOPs per
  sequence plus the attention over its context. Its time is the larger of bytes / bandwidth and
  FLOPs / FLOP/s: at small batches the weights dominate and decode is **memory-bound**; past the
  ridge batch it is **compute-bound**.
- **Prefill** processes the whole prompt in one pass: the same weight read, but ``n`` tokens'
  worth of FLOPs, so it is compute-bound for any prompt longer than a few tokens.
- **Memory** holds the weights and, in what is left, the KV cache of every running sequence; that
  bounds the batch at a given context and the context at a given batch.

Where the device profile carries what node/profile.py measured, two corrections replace
assumptions with measurements (docs/benchmarks.md shows why both matter on a CPU):

- **Linear layers at their real shape.** ``matmul_flops_by_rows`` is the FLOP/s of linear layers
  whose weights stream from memory, by rows of input. The weight matmuls of a pass over ``r`` rows
  (the batch in decode, the prompt's tokens in prefill) take ``r * 2 * n_params / F(r)``, with
  ``F`` interpolated between the measured points. One row is a matrix-vector product: the weight
  read as the engine does it, which is slower than a plain copy of memory.
- **The engine's own cost per pass** (``engine_overhead_s``): Python, operator dispatch and
  sampling, measured on a model too small to compute, as a fixed cost per pass, per layer, per
  sequence and per sequence-layer. It is added to the roofline time, not overlapped with it: on a
  CPU the same cores do both.

Every achievable fraction lives in ``Calibration`` with the reason for its value. Units are last in
every name.
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
from dataclasses import dataclass
from typing import Literal, NamedTuple

from cachetools import LRUCache

from sparecycles.types import DeviceProfile, ModelSpec

Bound = Literal["memory", "compute"]


@dataclass(frozen=True, slots=True)
class Calibration:
    """The fractions of the roofline a real engine reaches. One instance is shared by everyone."""

    # Decode reaches this fraction of the profile's memory bandwidth. Calibrated on the llama.cpp
    # reference in shared/data/README.md: a 7B model in 4 bits (about 3.8 GB) decodes at 3.9
    # tokens/s on a desktop with about 20 GB/s, i.e. 3.8 GB * 3.9 /s = 14.8 GB/s = 74% of the
    # bandwidth bound (llama.cpp issue 34). Tuned GPU kernels reach a similar or higher share of
    # HBM/GDDR bandwidth, so one figure serves both until bench/perfmodel_validate.py says
    # otherwise.
    bandwidth_fraction: float = 0.74
    # Prefill and large-batch decode reach this fraction of ``peak_flops``. An assumption, not a
    # calibration: dense transformer forward passes commonly run at 40-60% of datasheet peak on
    # GPUs. It applies to the idealised roofline (presets, profiles without measured linear
    # layers) and to attention; a profile's ``matmul_flops_by_rows`` is already what the linear
    # layers reach, and the engine's other work is its measured overhead, so it is not applied
    # to them again.
    compute_fraction: float = 0.5
    # Fixed cost of one decode step or one prefill pass outside the roofline, on top of what the
    # profile measured (DeviceProfile.overhead_*): kernel launches, sampling, Python in the
    # engine loop. Zero: a node's own engine overhead is measured by its profiler instead.
    step_overhead_s: float = 0.0
    # Share of accelerator memory the engine may fill with weights and KV cache; vLLM's default
    # gpu_memory_utilization is 0.9, the rest is the CUDA context and activations.
    accelerator_memory_fraction: float = 0.90
    # Share of system RAM a CPU-only node lends. The owner is using the same machine (browser,
    # games, the OS page cache), so we take at most about half.
    ram_fraction: float = 0.5
    # Quantized weights (under 2 bytes per parameter) still keep the KV cache in 16-bit floats,
    # the default of llama.cpp and vLLM; so the KV cache is never costed below 2 bytes a value.
    kv_bytes_per_value_min: float = 2.0


DEFAULT_CALIBRATION = Calibration()


# --- sizes ---------------------------------------------------------------------------------


def kv_bytes_per_token(spec: ModelSpec, calib: Calibration = DEFAULT_CALIBRATION) -> int:
    """Bytes of KV cache one token of context occupies: keys and values for every layer."""
    value_bytes = max(spec.bytes_per_param, calib.kv_bytes_per_value_min)
    return int(2 * spec.n_layers * spec.n_kv_heads * spec.head_dim * value_bytes)


def usable_memory_bytes(profile: DeviceProfile, calib: Calibration = DEFAULT_CALIBRATION) -> int:
    """Memory the engine may fill (weights + KV cache) on this device."""
    if profile.accelerator:
        return int(profile.accelerator_memory_bytes * calib.accelerator_memory_fraction)
    return int(profile.ram_bytes * calib.ram_fraction)


def kv_capacity_tokens(
    spec: ModelSpec, profile: DeviceProfile, calib: Calibration = DEFAULT_CALIBRATION
) -> int:
    """Tokens of KV cache that fit beside the weights, over all sequences together; 0 if the
    weights alone do not fit."""
    free_bytes = usable_memory_bytes(profile, calib) - spec.weight_bytes
    if free_bytes <= 0:
        return 0
    return free_bytes // max(1, kv_bytes_per_token(spec, calib))


def fits(
    spec: ModelSpec,
    profile: DeviceProfile,
    batch: int,
    context_tokens: int,
    calib: Calibration = DEFAULT_CALIBRATION,
) -> bool:
    """Whether ``batch`` sequences of ``context_tokens`` each fit in memory beside the weights."""
    if context_tokens > spec.context_length:
        return False
    return batch * context_tokens <= kv_capacity_tokens(spec, profile, calib)


def max_batch(
    spec: ModelSpec,
    profile: DeviceProfile,
    context_tokens: int,
    calib: Calibration = DEFAULT_CALIBRATION,
) -> int:
    """The largest number of sequences of ``context_tokens`` each that fit; 0 if none."""
    if context_tokens > spec.context_length:
        return 0
    return kv_capacity_tokens(spec, profile, calib) // max(1, context_tokens)


def max_context(
    spec: ModelSpec,
    profile: DeviceProfile,
    batch: int = 1,
    calib: Calibration = DEFAULT_CALIBRATION,
) -> int:
    """The longest context each of ``batch`` sequences can have, capped at the model's own."""
    return min(spec.context_length, kv_capacity_tokens(spec, profile, calib) // max(1, batch))


# --- time ----------------------------------------------------------------------------------

# Decode batches whose linear-layer time ``Costs`` precomputes (the scheduler's inner loop reads
# it); a larger batch is interpolated on demand.
decode_batch_table_max = 64


Overhead = tuple[float, float, float, float, float]  # step, layer, sequence, seq-layer, ctx-layer


def runs_on_llamacpp(spec: ModelSpec, profile: DeviceProfile) -> bool:
    """Whether ``spec`` is a GGUF whose decode the profile measured through llama.cpp
    (node/llamacpp_profile.py): its weights' rates by type and the llama.cpp engine's own cost
    then replace torch's linear layers and the transformers engine's overhead."""
    return bool(spec.bytes_by_type) and bool(profile.llamacpp_read_by_rows)


def overhead_terms(spec: ModelSpec, profile: DeviceProfile) -> Overhead:
    """The engine overhead's five terms that apply to ``spec`` on ``profile``: the llama.cpp
    engine's for a GGUF on a node that measured llama.cpp, else the transformers engine's."""
    if runs_on_llamacpp(spec, profile) and len(profile.llamacpp_overhead) == 5:
        step, layer, sequence, sequence_layer, context_layer = profile.llamacpp_overhead
        return step, layer, sequence, sequence_layer, context_layer
    return (profile.overhead_step_s, profile.overhead_layer_s, profile.overhead_sequence_s,
            profile.overhead_sequence_layer_s, profile.overhead_context_layer_s)


def engine_overhead_s(
    profile: DeviceProfile, n_layers: int, batch: int, context_tokens: float = 0.0,
    terms: Overhead | None = None,
) -> float:
    """The engine's measured time of one forward pass of ``batch`` sequences of
    ``context_tokens`` each through ``n_layers``, outside the maths (node/overhead.py); 0 for a
    profile that did not measure it. ``terms``: the five terms to use (``overhead_terms``);
    by default the profile's transformers engine's."""
    if terms is None:
        terms = (profile.overhead_step_s, profile.overhead_layer_s, profile.overhead_sequence_s,
                 profile.overhead_sequence_layer_s, profile.overhead_context_layer_s)
    step, layer, sequence, sequence_layer, context_layer = terms
    per_layer_s = sequence_layer + context_tokens * context_layer
    per_sequence_s = sequence + n_layers * per_layer_s
    return step + n_layers * layer + batch * per_sequence_s


def _interpolate(points: tuple[tuple[int, float], ...], rows: int) -> float:
    """Seconds of the linear layers over ``rows`` rows, from ``points`` ((rows, seconds), rows
    ascending): linear between points (each extra row adds about the same work), the first
    point's time below the first, and the last point's FLOP/s beyond the last."""
    r0, s0 = points[0]
    if rows <= r0:
        return s0
    for r1, s1 in points[1:]:
        if rows <= r1:
            return s0 + (s1 - s0) * (rows - r0) / (r1 - r0)
        r0, s0 = r1, s1
    return s0 * rows / r0


def linear_points(
    spec: ModelSpec, profile: DeviceProfile, calib: Calibration = DEFAULT_CALIBRATION
) -> tuple[tuple[int, float], ...]:
    """((rows, seconds), ...): the measured time of all of ``spec``'s weight matmuls at each
    measured row count on ``profile``; empty when the profile measured none in ``spec``'s
    precision (a 4-bit model's kernels are not an fp32 matmul's). A GGUF on a node that
    measured llama.cpp: the sum over its tensor types of bytes / the rate llama.cpp read that
    type at with that many rows (``gguf_points``)."""
    if runs_on_llamacpp(spec, profile):
        return gguf_points(spec, profile, calib)
    if not profile.matmul_flops_by_rows:
        return ()
    if abs(profile.matmul_bytes_per_param - spec.bytes_per_param) > 1e-9:
        return ()
    return tuple(
        (rows, rows * 2.0 * spec.n_params / flops)
        for rows, flops in profile.matmul_flops_by_rows
        if flops > 0
    )


def gguf_points(
    spec: ModelSpec, profile: DeviceProfile, calib: Calibration = DEFAULT_CALIBRATION
) -> tuple[tuple[int, float], ...]:
    """((rows, seconds), ...) of a GGUF's weights in a llama.cpp pass over ``rows`` rows (a
    decode step of that many sequences; at the profile's prompt point, one prompt's pass): each
    tensor type's bytes (``spec.bytes_by_type``) at the rate the profile measured for that type
    and rows; a type it did not measure (the F32 norms, a type no served file had) at the
    achievable bandwidth, as the idealised roofline reads it. A pass over more rows never takes
    less time than one over fewer (a noisy or a faster kernel's point is held at the one
    before)."""
    rates = llamacpp_rates(spec, profile)
    rows = sorted({r for _, r in rates})
    bandwidth = max(1.0, profile.memory_bandwidth_bytes_per_s * calib.bandwidth_fraction)
    seconds = itertools.accumulate(
        (sum(n / rates.get((t, r), bandwidth) for t, n in spec.bytes_by_type) for r in rows),
        max,
    )
    return tuple(zip(rows, seconds, strict=True))


def llamacpp_rates(spec: ModelSpec, profile: DeviceProfile) -> dict[tuple[str, int], float]:
    """{(type, rows): bytes/s} at which llama.cpp reads ``spec``'s weights on ``profile``. Where
    the node timed a narrow probe too, the rate for ``spec``'s hidden size lies between the two
    probes' on a log-log line (clamped to the narrower's below it, the wider's above): each
    output row of a matrix costs a fixed time besides its bytes, which a narrow row pays over
    fewer of them."""
    wide = {(t, r): rate for t, r, rate in profile.llamacpp_read_by_rows if rate > 0}
    narrow = {(t, r): rate for t, r, rate in profile.llamacpp_narrow_read_by_rows if rate > 0}
    h0, h1 = profile.llamacpp_narrow_hidden, profile.llamacpp_wide_hidden
    if not narrow or not 0 < h0 < h1 or spec.hidden_size >= h1:
        return wide
    f = max(0.0, math.log(spec.hidden_size / h0) / math.log(h1 / h0))
    return {key: (narrow[key] ** (1 - f)) * (rate ** f) if key in narrow else rate
            for key, rate in wide.items()}


@dataclass(frozen=True, slots=True)
class Costs:
    """The roofline of one model on one device, reduced to a few constants, so that a prediction
    in the scheduler's inner loop is a handful of multiplications. ``costs()`` builds it."""

    weight_read_s: float  # every weight read once: weight bytes / achievable bandwidth
    kv_s_per_token: float  # one token's KV cache read (or written) / achievable bandwidth
    weight_flops_s_per_token: float  # 2 * n_params FLOPs per token / achievable FLOP/s
    # attention: QK^T and AV are each one multiply-add (2 FLOPs) per query, key and hidden unit
    # in every layer, so 4 * n_layers * hidden_size FLOPs per (query, key) pair
    attention_s_per_pair: float
    overhead_s: float  # per forward pass, outside the roofline (Calibration + measured)
    kv_capacity_tokens: int
    context_length: int
    overhead_s_per_sequence: float = 0.0  # ... and per sequence in it (measured)
    overhead_s_per_sequence_token: float = 0.0  # ... and per token of each one's context
    # the measured time of the weight matmuls by rows (see linear_points); empty: the roofline's
    # rows * weight_flops_s_per_token
    linear_points: tuple[tuple[int, float], ...] = ()
    linear_s_by_batch: tuple[float, ...] = ()  # linear_s(b) for b = 1, 2, ..., precomputed
    kv_bytes_per_token: int = 0  # one token's KV cache, bytes (what shipping it moves)

    def linear_s(self, rows: int) -> float:
        """Seconds of the weight matmuls of one pass over ``rows`` rows of input."""
        if self.linear_points:
            return _interpolate(self.linear_points, rows)
        return rows * self.weight_flops_s_per_token

    def decode_times_s(self, batch: int, context_tokens: int) -> tuple[float, float]:
        """(memory time, compute time) of one decode step of ``batch`` sequences whose contexts
        average ``context_tokens``; the step takes the larger of the two (the roofline)."""
        b = batch if batch > 1 else 1
        table = self.linear_s_by_batch
        linear_s = table[b - 1] if b <= len(table) else self.linear_s(b)
        memory_s = self.weight_read_s + b * context_tokens * self.kv_s_per_token
        compute_s = linear_s + b * self.attention_s_per_pair * context_tokens
        return memory_s, compute_s

    def decode_step_s(self, batch: int, context_tokens: int) -> float:
        # decode_times_s inlined: this is the scheduler's innermost arithmetic
        b = batch if batch > 1 else 1
        table = self.linear_s_by_batch
        linear_s = table[b - 1] if b <= len(table) else self.linear_s(b)
        memory_s = self.weight_read_s + b * context_tokens * self.kv_s_per_token
        compute_s = linear_s + b * self.attention_s_per_pair * context_tokens
        per_sequence_s = self.overhead_s_per_sequence
        per_sequence_s += context_tokens * self.overhead_s_per_sequence_token
        worse_s = memory_s if memory_s >= compute_s else compute_s
        return worse_s + self.overhead_s + b * per_sequence_s

    def prefill_s(self, n_tokens: int, cached_tokens: int = 0) -> float:
        if n_tokens <= 0:
            return 0.0
        # each new token attends to the cached ones and, causally, to half the new ones
        memory_s = self.weight_read_s + (cached_tokens + n_tokens) * self.kv_s_per_token
        compute_s = self.linear_s(n_tokens) + n_tokens * self.attention_s_per_pair * (
            cached_tokens + n_tokens / 2.0
        )
        worse_s = memory_s if memory_s >= compute_s else compute_s
        context = cached_tokens + n_tokens
        return (
            worse_s
            + self.overhead_s
            + self.overhead_s_per_sequence
            + context * self.overhead_s_per_sequence_token
        )

    def chunked_step_s(
        self, batch: int, context_tokens: int, chunk_tokens: int, chunk_context_tokens: float
    ) -> float:
        """One pass of chunked prefill: ``batch`` decoding sequences (contexts averaging
        ``context_tokens``) and ``chunk_tokens`` prompt tokens, each attending to
        ``chunk_context_tokens`` earlier tokens of its prompt on average. The weights are read
        once for both; the matmuls run over ``batch + chunk_tokens`` rows."""
        b, c = max(0, batch), max(0, chunk_tokens)
        rows = b + c
        table = self.linear_s_by_batch
        linear_s = table[rows - 1] if 0 < rows <= len(table) else self.linear_s(max(1, rows))
        pairs = b * context_tokens + c * chunk_context_tokens
        memory_s = self.weight_read_s + (b * context_tokens + chunk_context_tokens) * (
            self.kv_s_per_token
        )
        compute_s = linear_s + self.attention_s_per_pair * pairs
        sequences = b + (1 if c else 0)
        per_sequence_s = self.overhead_s_per_sequence
        per_sequence_s += (context_tokens if b else chunk_context_tokens) * (
            self.overhead_s_per_sequence_token
        )
        worse_s = memory_s if memory_s >= compute_s else compute_s
        return worse_s + self.overhead_s + sequences * per_sequence_s

    def fits(self, batch: int, context_tokens: int) -> bool:
        return context_tokens <= self.context_length and (
            batch * context_tokens <= self.kv_capacity_tokens
        )


@functools.lru_cache(maxsize=4096)
def costs(
    spec: ModelSpec, profile: DeviceProfile, calib: Calibration = DEFAULT_CALIBRATION
) -> Costs:
    """The roofline constants of ``spec`` on ``profile`` (memoised: the inputs are frozen)."""
    bandwidth = max(1.0, profile.memory_bandwidth_bytes_per_s * calib.bandwidth_fraction)
    flops = max(1.0, profile.peak_flops * calib.compute_fraction)
    weight_read_s = spec.decode_weight_bytes / bandwidth
    points = linear_points(spec, profile, calib)
    if points and runs_on_llamacpp(spec, profile):
        # llama.cpp's own kernels measured reading each type at one row: the rate its decode
        # reads the weights at, in place of the copy's bandwidth and its assumed fraction
        weight_read_s = _interpolate(points, 1)
    elif points:
        # one row streams every weight once, as decode's weight read does: where the engine's
        # matrix-vector product is slower than a plain copy, that is the rate it reads at
        weight_read_s = max(weight_read_s, _interpolate(points, 1))
    terms = overhead_terms(spec, profile)
    overhead_1 = engine_overhead_s(profile, spec.n_layers, 1, terms=terms)
    overhead_0 = engine_overhead_s(profile, spec.n_layers, 0, terms=terms)
    return Costs(
        weight_read_s=weight_read_s,
        kv_s_per_token=kv_bytes_per_token(spec, calib) / bandwidth,
        weight_flops_s_per_token=2.0 * spec.n_params / flops,
        attention_s_per_pair=4.0 * spec.n_layers * spec.hidden_size / flops,
        overhead_s=calib.step_overhead_s + overhead_0,
        kv_capacity_tokens=kv_capacity_tokens(spec, profile, calib),
        context_length=spec.context_length,
        overhead_s_per_sequence=overhead_1 - overhead_0,
        overhead_s_per_sequence_token=spec.n_layers * terms[4],
        linear_points=points,
        kv_bytes_per_token=kv_bytes_per_token(spec, calib),
        linear_s_by_batch=tuple(
            _interpolate(points, b) for b in range(1, decode_batch_table_max + 1)
        )
        if points
        else (),
    )


costs_by_identity_max = 65_536  # distinct (model, device) pairs remembered, least recent out
_costs_by_identity: LRUCache[tuple[int, int, int], tuple[object, object, object, Costs]] = (
    LRUCache(costs_by_identity_max))
_costs_lock = threading.Lock()  # an LRU cache reorders itself on every read


def costs_of(
    spec: ModelSpec, profile: DeviceProfile, calib: Calibration = DEFAULT_CALIBRATION
) -> Costs:
    """``costs()`` looked up by the objects' identity, for hot loops: hashing three frozen
    dataclasses costs more than the prediction. The entry keeps the objects alive, so an id is
    never reused while it is remembered."""
    key = (id(spec), id(profile), id(calib))
    with _costs_lock:
        hit = _costs_by_identity.get(key)
    if hit is not None:
        return hit[3]
    c = costs(spec, profile, calib)
    with _costs_lock:
        _costs_by_identity[key] = (spec, profile, calib, c)
    return c


# --- the network: shipping a KV cache (disaggregated prefill/decode) -----------------------


def link_bytes_per_s(sender: DeviceProfile, receiver: DeviceProfile) -> float:
    """The rate a KV cache goes from ``sender`` to ``receiver``: the slower of the sender's
    uplink and the receiver's downlink (the path between them is taken to be no slower); 0 when
    either is not known."""
    return min(sender.uplink_bytes_per_s, receiver.downlink_bytes_per_s)


def pair_rtt_s(sender: DeviceProfile, receiver: DeviceProfile) -> float:
    """The round trip of a hand-off: each node's own round trip (``network_rtt_s``, to the
    coordinator) added, as the KV cache goes through the coordinator or at best as far."""
    return sender.network_rtt_s + receiver.network_rtt_s


class KvTransfer(NamedTuple):
    """A KV cache's trip from one node to another (seconds)."""

    uplink_s: float  # the sender's uplink is busy with it (bytes / uplink)
    downlink_s: float  # the receiver's downlink is busy with it (bytes / downlink)
    arrive_s: float  # from its start until it has all arrived: bytes / the slower, + round trip


NO_TRANSFER = KvTransfer(math.inf, math.inf, math.inf)


def kv_transfer(
    kv_tokens: int, costs: Costs, sender: DeviceProfile, receiver: DeviceProfile
) -> KvTransfer:
    """The hand-off of ``kv_tokens`` tokens' KV cache from ``sender`` to ``receiver``: it runs at
    the slower of the sender's uplink and the receiver's downlink, then one round trip; each
    link is taken for its own share of the bytes (a 100 Gbit/s sender feeds four 25 Gbit/s
    receivers at once). ``NO_TRANSFER`` (inf) when a link is not known."""
    link = link_bytes_per_s(sender, receiver)
    if link <= 0.0:
        return NO_TRANSFER
    size = kv_tokens * costs.kv_bytes_per_token
    return KvTransfer(size / sender.uplink_bytes_per_s, size / receiver.downlink_bytes_per_s,
                      size / link + pair_rtt_s(sender, receiver))  # fmt: skip


def decode_times_s(
    spec: ModelSpec,
    profile: DeviceProfile,
    batch: int,
    context_tokens: int,
    calib: Calibration = DEFAULT_CALIBRATION,
) -> tuple[float, float]:
    """(memory time, compute time) of one decode step; see ``Costs.decode_times_s``."""
    return costs(spec, profile, calib).decode_times_s(batch, context_tokens)


def decode_step_s(
    spec: ModelSpec,
    profile: DeviceProfile,
    batch: int,
    context_tokens: int,
    calib: Calibration = DEFAULT_CALIBRATION,
) -> float:
    """Seconds for one decode step (one new token for each of ``batch`` sequences)."""
    return costs(spec, profile, calib).decode_step_s(batch, context_tokens)


def decode_tokens_per_s(
    spec: ModelSpec,
    profile: DeviceProfile,
    batch: int,
    context_tokens: int,
    calib: Calibration = DEFAULT_CALIBRATION,
) -> float:
    """Decode throughput of the whole batch, tokens/s; each sequence gets ``1/batch`` of it."""
    return max(1, batch) / decode_step_s(spec, profile, batch, context_tokens, calib)


def bound(
    spec: ModelSpec,
    profile: DeviceProfile,
    batch: int,
    context_tokens: int,
    calib: Calibration = DEFAULT_CALIBRATION,
) -> Bound:
    """Whether decoding at this batch and context is limited by memory or by compute."""
    memory_s, compute_s = decode_times_s(spec, profile, batch, context_tokens, calib)
    return "memory" if memory_s >= compute_s else "compute"


def ridge_batch(
    spec: ModelSpec,
    profile: DeviceProfile,
    context_tokens: int,
    calib: Calibration = DEFAULT_CALIBRATION,
) -> float:
    """The batch at which decode turns from memory-bound to compute-bound (may be fractional);
    ``inf`` when the KV cache traffic alone outruns compute and decode never turns. With measured
    linear layers, the first whole batch (up to ``decode_batch_table_max``) that is
    compute-bound."""
    c = costs(spec, profile, calib)
    if c.linear_points:
        for b in range(1, decode_batch_table_max + 1):
            memory_s, compute_s = c.decode_times_s(b, context_tokens)
            if compute_s > memory_s:
                return float(b)
        return math.inf
    per_seq_compute_s = c.weight_flops_s_per_token + c.attention_s_per_pair * context_tokens
    per_seq_kv_s = context_tokens * c.kv_s_per_token
    if per_seq_compute_s <= per_seq_kv_s:
        return math.inf
    return c.weight_read_s / (per_seq_compute_s - per_seq_kv_s)


def prefill_s(
    spec: ModelSpec,
    profile: DeviceProfile,
    n_tokens: int,
    cached_tokens: int = 0,
    calib: Calibration = DEFAULT_CALIBRATION,
) -> float:
    """Seconds to process ``n_tokens`` of prompt in one pass, after ``cached_tokens`` already in
    the KV cache (0 for a fresh request; a resumed job re-prefills everything)."""
    return costs(spec, profile, calib).prefill_s(n_tokens, cached_tokens)


def decode_s(
    spec: ModelSpec,
    profile: DeviceProfile,
    n_tokens: int,
    batch: int,
    context_start_tokens: int,
    calib: Calibration = DEFAULT_CALIBRATION,
) -> float:
    """Seconds to generate ``n_tokens`` for one sequence running in a batch of ``batch``, its
    context growing from ``context_start_tokens``; the step time is taken at the mean context."""
    if n_tokens <= 0:
        return 0.0
    mean_context = context_start_tokens + n_tokens // 2
    return n_tokens * decode_step_s(spec, profile, batch, mean_context, calib)


def request_s(
    spec: ModelSpec,
    profile: DeviceProfile,
    prompt_tokens: int,
    output_tokens: int,
    batch: int = 1,
    calib: Calibration = DEFAULT_CALIBRATION,
) -> tuple[float, float]:
    """(time to first token, end-to-end time) of one request on an otherwise idle device running
    ``batch`` sequences, including one network round trip."""
    ttft_s = (
        profile.network_rtt_s
        + prefill_s(spec, profile, prompt_tokens, 0, calib)
        + decode_step_s(spec, profile, batch, prompt_tokens, calib)
    )
    rest_s = decode_s(spec, profile, max(0, output_tokens - 1), batch, prompt_tokens + 1, calib)
    return ttft_s, ttft_s + rest_s


@dataclass(frozen=True, slots=True)
class RooflinePoint:
    """Everything ``sparecycles plan`` prints for one batch size."""

    batch: int
    context_tokens: int
    step_s: float
    memory_s: float
    compute_s: float
    bound: Bound
    tokens_per_s: float  # the whole batch
    tokens_per_s_per_sequence: float
    fits: bool


def roofline(
    spec: ModelSpec,
    profile: DeviceProfile,
    batch: int,
    context_tokens: int,
    calib: Calibration = DEFAULT_CALIBRATION,
) -> RooflinePoint:
    c = costs(spec, profile, calib)
    memory_s, compute_s = c.decode_times_s(batch, context_tokens)
    step = c.decode_step_s(batch, context_tokens)
    return RooflinePoint(
        batch=batch,
        context_tokens=context_tokens,
        step_s=step,
        memory_s=memory_s,
        compute_s=compute_s,
        bound="memory" if memory_s >= compute_s else "compute",
        tokens_per_s=max(1, batch) / step,
        tokens_per_s_per_sequence=1.0 / step,
        fits=fits(spec, profile, batch, context_tokens, calib),
    )

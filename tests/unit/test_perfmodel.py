"""The roofline: hand-computed cases, the llama.cpp calibration point, and monotonicity."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparecycles.scheduling import perfmodel as pm
from sparecycles.scheduling.presets import DEVICE_PRESETS, MODEL_PRESETS
from sparecycles.types import DeviceProfile, ModelSpec

GB = 1_000_000_000

# A toy model with round numbers: 1e9 params in 2 bytes = 2 GB of weights; KV per token =
# 2 * 10 layers * 4 heads * 100 dims * 2 bytes = 16,000 bytes.
TOY = ModelSpec("toy", 1_000_000_000, 2.0, 10, 1000, 4, 100, 4096)
# 100 GB/s, 10 TFLOP/s, 10 GB of RAM (CPU only: half is lent = 5 GB).
CPU = DeviceProfile("laptop", 8, 10 * GB, 100 * GB, 10e12)
IDEAL = pm.Calibration(bandwidth_fraction=1.0, compute_fraction=1.0)


def test_decode_step_is_weight_read_at_batch_one() -> None:
    # 2 GB + 1 * 0 context / 100 GB/s = 20 ms; compute 2e9 FLOPs / 10e12 = 0.2 ms
    assert pm.decode_step_s(TOY, CPU, 1, 0, IDEAL) == pytest.approx(0.020)
    assert pm.decode_tokens_per_s(TOY, CPU, 1, 0, IDEAL) == pytest.approx(50.0)
    assert pm.bound(TOY, CPU, 1, 0, IDEAL) == "memory"


def test_kv_cache_traffic_and_attention_counted() -> None:
    # context 1000 at batch 4: bytes = 2e9 + 4 * 1000 * 16,000 = 2.064e9 -> 20.64 ms
    memory_s, compute_s = pm.decode_times_s(TOY, CPU, 4, 1000, IDEAL)
    assert memory_s == pytest.approx(0.02064)
    # flops = 4 * (2e9 + 4 * 10 layers * 1000 hidden * 1000 context) = 4 * 2.04e9
    assert compute_s == pytest.approx(4 * 2.04e9 / 10e12)


def test_turns_compute_bound_past_the_ridge_batch() -> None:
    ridge = pm.ridge_batch(TOY, CPU, 0, IDEAL)
    # weights 20 ms vs 0.2 ms of compute per sequence: ridge at 100
    assert ridge == pytest.approx(100.0)
    assert pm.bound(TOY, CPU, 99, 0, IDEAL) == "memory"
    assert pm.bound(TOY, CPU, 101, 0, IDEAL) == "compute"
    # throughput grows almost linearly while memory-bound, then flattens
    assert pm.decode_tokens_per_s(TOY, CPU, 8, 0, IDEAL) == pytest.approx(8 * 50.0)
    flat = pm.decode_tokens_per_s(TOY, CPU, 400, 0, IDEAL) / pm.decode_tokens_per_s(
        TOY, CPU, 200, 0, IDEAL
    )
    assert flat == pytest.approx(1.0)


def test_ridge_is_infinite_when_kv_traffic_outruns_compute() -> None:
    fast = replace(CPU, peak_flops=1e18)
    assert math.isinf(pm.ridge_batch(TOY, fast, 1000, IDEAL))
    assert pm.bound(TOY, fast, 10_000, 1000, IDEAL) == "memory"


def test_prefill_is_compute_bound_and_includes_causal_attention() -> None:
    n = 1000
    flops = 2e9 * n + 4 * 10 * 1000 * n * (n / 2)
    assert pm.prefill_s(TOY, CPU, n, 0, IDEAL) == pytest.approx(flops / 10e12)
    assert pm.prefill_s(TOY, CPU, 0) == 0.0
    # a single token's prefill is a weight read, like a decode step
    assert pm.prefill_s(TOY, CPU, 1, 0, IDEAL) == pytest.approx(0.020, rel=1e-3)


def test_memory_fit() -> None:
    # 5 GB lent - 2 GB weights = 3 GB of KV = 187,500 tokens
    assert pm.kv_capacity_tokens(TOY, CPU) == 187_500
    assert pm.max_context(TOY, CPU) == 4096  # the model's own limit
    assert pm.max_context(TOY, CPU, batch=100) == 1875
    assert pm.max_batch(TOY, CPU, 4096) == 45
    assert pm.fits(TOY, CPU, 45, 4096) and not pm.fits(TOY, CPU, 46, 4096)
    assert not pm.fits(TOY, CPU, 1, 5000)  # beyond the model's context
    tiny = replace(CPU, ram_bytes=3 * GB)  # 1.5 GB lent < 2 GB of weights
    assert pm.kv_capacity_tokens(TOY, tiny) == 0
    assert pm.max_batch(TOY, tiny, 1) == 0


def test_accelerator_memory_used_when_present() -> None:
    gpu = replace(CPU, accelerator="cuda:x", accelerator_memory_bytes=4 * GB)
    assert pm.usable_memory_bytes(gpu) == int(4 * GB * 0.9)


def test_quantized_weights_keep_a_16_bit_kv_cache() -> None:
    q4 = MODEL_PRESETS["llama-3-8b-q4"]
    assert pm.kv_bytes_per_token(q4) == 2 * 32 * 8 * 128 * 2
    assert pm.kv_bytes_per_token(replace(q4, bytes_per_param=4.0)) == 2 * 32 * 8 * 128 * 4


def test_calibrated_on_the_llama_cpp_reference() -> None:
    """shared/data/README.md: a 7B model in 4 bits (~3.8 GB) decodes at 3.9 tokens/s on a desktop
    with about 20 GB/s of memory bandwidth."""
    spec = MODEL_PRESETS["llama-7b-q4"]
    assert spec.weight_bytes == pytest.approx(3.8 * GB, rel=0.01)
    desktop = DeviceProfile("gaming-pc", 8, 16 * GB, 20 * GB, 0.5e12)
    assert pm.decode_tokens_per_s(spec, desktop, 1, 128) == pytest.approx(3.9, rel=0.03)


def test_request_time_adds_network_prefill_and_decode() -> None:
    dev = replace(CPU, network_rtt_s=0.05)
    ttft, total = pm.request_s(TOY, dev, 100, 11, calib=IDEAL)
    assert ttft == pytest.approx(
        0.05 + pm.prefill_s(TOY, dev, 100, 0, IDEAL) + pm.decode_step_s(TOY, dev, 1, 100, IDEAL)
    )
    assert total - ttft == pytest.approx(10 * pm.decode_step_s(TOY, dev, 1, 106, IDEAL))


def test_roofline_point_matches_the_parts() -> None:
    point = pm.roofline(TOY, CPU, 4, 1000)
    assert point.tokens_per_s == pytest.approx(pm.decode_tokens_per_s(TOY, CPU, 4, 1000))
    assert point.bound == pm.bound(TOY, CPU, 4, 1000)
    assert point.fits


def test_presets_behave_plausibly() -> None:
    q4 = MODEL_PRESETS["llama-3-8b-q4"]
    speeds = {n: pm.decode_tokens_per_s(q4, d, 1, 1000) for n, d in DEVICE_PRESETS.items()}
    assert speeds["h100"] > speeds["a100"] > speeds["gaming-pc"] > speeds["laptop"]
    assert not pm.fits(MODEL_PRESETS["llama-3-8b"], DEVICE_PRESETS["gaming-pc"], 1, 1)


@settings(deadline=None)
@given(
    batch=st.integers(1, 256),
    context=st.integers(0, 8192),
    more=st.integers(1, 64),
)
def test_step_time_grows_with_batch_and_context(batch: int, context: int, more: int) -> None:
    for name in ("gaming-pc", "laptop-cpu", "h100"):
        dev = DEVICE_PRESETS[name]
        spec = MODEL_PRESETS["llama-3-8b-q4"]
        base = pm.decode_step_s(spec, dev, batch, context)
        assert pm.decode_step_s(spec, dev, batch + more, context) >= base
        assert pm.decode_step_s(spec, dev, batch, context + more) >= base
        # batching never lowers throughput
        bigger = pm.decode_tokens_per_s(spec, dev, batch + more, context)
        assert bigger >= pm.decode_tokens_per_s(spec, dev, batch, context) * (1 - 1e-12)
        assert pm.max_batch(spec, dev, max(1, context)) * max(1, context) <= pm.kv_capacity_tokens(
            spec, dev
        )


# A profile as node/profile.py measures one: linear layers by rows of input (in the toy's 2-byte
# precision) and the engine's overhead per pass.
MEASURED = replace(
    CPU,
    matmul_flops_by_rows=((1, 50e9), (8, 200e9), (64, 1e12)),
    matmul_bytes_per_param=2.0,
    overhead_step_s=0.001,
    overhead_layer_s=0.0001,
    overhead_sequence_s=0.0002,
    overhead_sequence_layer_s=0.00001,
    overhead_context_layer_s=1e-8,
)


def test_engine_overhead_has_a_term_per_pass_layer_sequence_and_both() -> None:
    # 1 ms + 10 layers * 0.1 ms + batch * (0.2 ms + 10 * 0.01 ms)
    assert pm.engine_overhead_s(MEASURED, 10, 1) == pytest.approx(0.0023)
    assert pm.engine_overhead_s(MEASURED, 10, 8) == pytest.approx(0.002 + 8 * 0.0003)
    # and 10 layers * 1e-8 s per token of context per sequence: 0.1 ms for 1000 tokens
    assert pm.engine_overhead_s(MEASURED, 10, 8, 1000) == pytest.approx(0.0044 + 8 * 0.0001)
    # in a decode step beside the roofline's (compute-bound at batch 8: attention, not KV bytes)
    attention_s = 8 * 1000 * 4 * 10 * 1000 / 10e12
    assert pm.decode_step_s(TOY, MEASURED, 8, 1000, IDEAL) == pytest.approx(
        pm.decode_step_s(TOY, MEASURED, 8, 0, IDEAL) + 8 * 0.0001 + attention_s
    )
    assert pm.engine_overhead_s(CPU, 10, 8) == 0.0  # not measured: the idealised roofline


def test_measured_linear_layers_replace_the_peak_flops() -> None:
    # one row: 2e9 FLOPs at 50 GFLOP/s = 40 ms, slower than the 20 ms copy: that is the weight read
    assert pm.decode_step_s(TOY, MEASURED, 1, 0, IDEAL) == pytest.approx(0.040 + 0.0023)
    assert pm.bound(TOY, MEASURED, 1, 0, IDEAL) == "memory"
    # eight rows: 8 * 2e9 at 200 GFLOP/s = 80 ms; four rows lie on the line between
    assert pm.decode_step_s(TOY, MEASURED, 8, 0, IDEAL) == pytest.approx(0.080 + 0.0044)
    memory_s, compute_s = pm.decode_times_s(TOY, MEASURED, 4, 0, IDEAL)
    assert (memory_s, compute_s) == pytest.approx((0.040, 0.040 + 0.040 * 3 / 7))
    assert pm.ridge_batch(TOY, MEASURED, 0, IDEAL) == 2.0
    # beyond the last point, its FLOP/s: 100 rows at 1 TFLOP/s = 0.2 s, plus causal attention
    attention_s = 100 * 4 * 10 * 1000 * 50 / 10e12
    expected = 0.2 + attention_s + 0.0023 + 100 * 10 * 1e-8  # overhead: a pass, 100 tokens
    assert pm.prefill_s(TOY, MEASURED, 100, 0, IDEAL) == pytest.approx(expected)
    assert pm.roofline(TOY, MEASURED, 8, 0, IDEAL).step_s == pytest.approx(0.0844)


def test_linear_layers_measured_in_another_precision_are_not_used() -> None:
    fp32 = replace(TOY, bytes_per_param=4.0)  # 4 GB / 100 GB/s = 40 ms, overhead still counts
    assert pm.decode_step_s(fp32, MEASURED, 1, 0, IDEAL) == pytest.approx(0.040 + 0.0023)
    assert pm.decode_step_s(fp32, MEASURED, 8, 0, IDEAL) == pytest.approx(0.040 + 0.0044)


def test_a_profile_read_from_json_stays_hashable() -> None:
    data = {"device_class": "desktop", "cpu_cores": 2, "ram_bytes": GB,
            "memory_bandwidth_bytes_per_s": 1e10, "peak_flops": 1e11,
            "matmul_flops_by_rows": [[1, 5e9], [8, 2e10]], "matmul_bytes_per_param": 4.0}
    profile = DeviceProfile(**data)
    assert profile.matmul_flops_by_rows == ((1, 5e9), (8, 2e10))
    assert hash(profile) == hash(replace(profile))
    assert pm.decode_step_s(TOY, profile, 1, 0) > 0


# A GGUF as modelfiles reads one (weights read per step by tensor type), and a node that timed
# llama.cpp's kernels on those types (node/llamacpp_profile.py) and its engine's cost per pass.
GGUF = replace(TOY, bytes_per_param=0.5, bytes_by_type=(
    ("F32", 1_000_000), ("Q4_0", 600_000_000), ("Q6_K", 100_000_000)))
LLAMACPP = replace(
    MEASURED,
    llamacpp_read_by_rows=(("Q4_0", 1, 30e9), ("Q4_0", 8, 10e9), ("Q6_K", 1, 20e9),
                           ("Q6_K", 8, 5e9)),
    llamacpp_overhead=(0.0005, 0.0002, 0.0001, 0.0, 0.0),
)


def test_a_gguf_is_read_at_llamacpps_measured_rate_for_each_type() -> None:
    # one row: 600 MB at 30 GB/s + 100 MB at 20 GB/s + the F32 norms' 1 MB at the bandwidth
    # (100 GB/s, not measured) = 25.01 ms; llama.cpp's overhead 0.5 + 10 * 0.2 + 0.1 ms
    one = 0.020 + 0.005 + 0.00001
    assert pm.decode_step_s(GGUF, LLAMACPP, 1, 0, IDEAL) == pytest.approx(one + 0.0026)
    # eight rows: 600 MB at 10 GB/s + 100 MB at 5 GB/s; four rows on the line between
    eight = 0.060 + 0.020 + 0.00001
    assert pm.decode_step_s(GGUF, LLAMACPP, 8, 0, IDEAL) == pytest.approx(
        eight + 0.0025 + 8 * 0.0001)
    _, compute_s = pm.decode_times_s(GGUF, LLAMACPP, 4, 0, IDEAL)
    assert compute_s == pytest.approx(one + (eight - one) * 3 / 7)
    # the same file on a node that did not time llama.cpp: the bytes read per step (not the
    # input embedding) at the copy's bandwidth, and the transformers engine's overhead
    assert pm.decode_step_s(GGUF, MEASURED, 1, 0, IDEAL) == pytest.approx(701e6 / 100e9 + 0.0023)
    # a model that is not a GGUF, on the node that timed llama.cpp: as before
    assert pm.decode_step_s(TOY, LLAMACPP, 8, 0, IDEAL) == pm.decode_step_s(TOY, MEASURED, 8, 0,
                                                                             IDEAL)


def test_a_prompt_pass_prices_prefill_and_more_rows_never_cost_less() -> None:
    # the profile's prompt point (64 rows): 600 MB of Q4_0 at 64 x 1.5 GB/s per row, faster per
    # row than 8 rows' decode step; a 128-token prefill is priced at twice the 64-row pass
    profile = replace(LLAMACPP, llamacpp_read_by_rows=(
        *LLAMACPP.llamacpp_read_by_rows, ("Q4_0", 64, 1.5e9), ("Q6_K", 64, 0.6e9)))
    points = dict(pm.gguf_points(GGUF, profile, IDEAL))
    assert points[64] == pytest.approx(600e6 / 1.5e9 + 100e6 / 0.6e9 + 1e6 / 100e9)
    assert pm.costs(GGUF, profile, IDEAL).linear_s(128) == pytest.approx(2 * points[64])
    # a point measured faster than one of fewer rows is held at that one
    odd = replace(LLAMACPP, llamacpp_read_by_rows=(
        *LLAMACPP.llamacpp_read_by_rows, ("Q4_0", 64, 1e12), ("Q6_K", 64, 1e12)))
    seconds = [s for _, s in pm.gguf_points(GGUF, odd, IDEAL)]
    assert seconds == sorted(seconds) and seconds[-1] == seconds[-2]


def test_a_narrow_models_rate_lies_between_the_two_probes_by_hidden_size() -> None:
    # the wide probe (hidden 2048) read Q4_0 at 30 GB/s, the narrow one (512) at 10 GB/s
    profile = replace(LLAMACPP, llamacpp_narrow_read_by_rows=(("Q4_0", 1, 10e9),
                                                               ("Q4_0", 8, 5e9)),
                      llamacpp_narrow_hidden=512, llamacpp_wide_hidden=2048)
    at = {h: pm.llamacpp_rates(replace(GGUF, hidden_size=h), profile) for h in (256, 512, 1024,
                                                                               2048, 4096)}
    assert at[512][("Q4_0", 1)] == pytest.approx(10e9)
    assert at[256] == at[512]  # below the narrow probe: its rates (no extrapolation)
    assert at[2048] == at[4096] == dict(((t, r), b) for t, r, b in LLAMACPP.llamacpp_read_by_rows)
    # halfway in log(hidden): the geometric mean
    assert at[1024][("Q4_0", 1)] == pytest.approx((10e9 * 30e9) ** 0.5)
    assert at[1024][("Q4_0", 8)] == pytest.approx((5e9 * 10e9) ** 0.5)
    assert at[1024][("Q6_K", 1)] == 20e9  # a type the narrow probe did not measure: the wide rate
    # and the step time follows: a 512-wide GGUF's Q4_0 takes 3x as long as at 2048
    narrow_step = pm.decode_step_s(replace(GGUF, hidden_size=512), profile, 1, 0, IDEAL)
    wide_step = pm.decode_step_s(replace(GGUF, hidden_size=2048), profile, 1, 0, IDEAL)
    assert narrow_step - wide_step == pytest.approx(600e6 / 10e9 - 600e6 / 30e9)
    # a profile from before the narrow probe: every model at the wide rates
    assert pm.llamacpp_rates(replace(GGUF, hidden_size=512), LLAMACPP) == at[2048]


def test_llamacpp_measurements_read_from_json_stay_hashable() -> None:
    profile = DeviceProfile("desktop", 2, GB, 1e10, 1e11,
                            llamacpp_read_by_rows=[["Q4_0", 1, 3e10]],  # type: ignore[arg-type]
                            llamacpp_overhead=[0, 1e-4, 0, 0, 0])  # type: ignore[arg-type]
    spec = ModelSpec("g", 10**9, 0.56, 16, 2048, 8, 64, 4096,
                     bytes_by_type=[["Q4_0", 5 * 10**8]])  # type: ignore[arg-type]
    assert profile.llamacpp_read_by_rows == (("Q4_0", 1, 3e10),)
    assert spec.bytes_by_type == (("Q4_0", 5 * 10**8),)
    assert hash(profile) and hash(spec)
    assert pm.decode_step_s(spec, profile, 1, 0, IDEAL) == pytest.approx(5e8 / 3e10 + 16e-4)


def test_empty_lists_read_from_json_stay_hashable() -> None:
    # a transformers model's spec and a node that measured no llama.cpp, as stored JSON gives
    # them back (empty lists): costs() is memoised on both, so both must hash
    profile = DeviceProfile("desktop", 2, GB, 1e10, 1e11,
                            llamacpp_read_by_rows=[], llamacpp_overhead=[])  # type: ignore[arg-type]
    spec = ModelSpec("t", 10**6, 4.0, 4, 128, 4, 32, 512,
                     bytes_by_type=[])  # type: ignore[arg-type]
    assert hash(profile) and hash(spec)
    assert pm.decode_step_s(spec, profile, 1, 0, IDEAL) > 0

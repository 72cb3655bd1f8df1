"""Named device profiles and model specs for planning and simulation.

Device figures are published datasheet numbers (sources beside each), not measurements: a real
node measures its own (node/profile.py), and the performance model applies the achievable
fractions (perfmodel.Calibration) to either. Model figures come from each model's published
config.json; a model directory on disk can be read instead (cli/plan.py).
"""

from __future__ import annotations

from sparecycles.errors import NotFound
from sparecycles.types import DeviceProfile, ModelSpec

GB = 1_000_000_000
GIB = 1 << 30
MBIT = 125_000  # bytes/s in one Mbit/s

# Network links (DeviceProfile.uplink_bytes_per_s / downlink_bytes_per_s), what shipping a KV
# cache between two nodes runs at (disaggregated prefill/decode). Home broadband is asymmetric:
# cable and DSL lines upload at 10-50 Mbit/s against a few hundred down; we take 20 up and 200
# down for a home (wired or Wi-Fi, the line is the limit), and an owner on fibre says otherwise
# in the fleet file (``uplink_mbit_s``). A car on LTE or a garage's Wi-Fi: 10 up, 50 down. A
# data-centre server's NIC: 25 Gbit/s each way; a data-centre GPU server's: 100 Gbit/s (8-GPU
# boxes carry 200-400 Gbit/s per GPU for GPU-to-GPU traffic; one NIC per node is the modest
# case).
HOME_UP, HOME_DOWN = 20 * MBIT, 200 * MBIT

DEVICE_PRESETS: dict[str, DeviceProfile] = {
    # A gaming PC with an NVIDIA GeForce RTX 3060 12 GB (the most common RTX card in Steam's
    # hardware survey for years): 360 GB/s GDDR6 (192-bit, 15 Gbit/s); about 25 TFLOP/s of dense
    # FP16 tensor math with FP32 accumulation (a quarter of the 101 "tensor TFLOPs" NVIDIA quotes
    # with sparsity and FP16 accumulation); 170 W board power. Home broadband: ~30 ms round trip.
    "gaming-pc": DeviceProfile(
        device_class="gaming-pc",
        cpu_cores=8,
        ram_bytes=32 * GIB,
        memory_bandwidth_bytes_per_s=360 * GB,
        peak_flops=25.5e12,
        accelerator="cuda:NVIDIA GeForce RTX 3060",
        accelerator_memory_bytes=12 * GIB,
        network_rtt_s=0.030,
        power_idle_w=60.0,
        power_busy_w=250.0,
        uplink_bytes_per_s=HOME_UP,
        downlink_bytes_per_s=HOME_DOWN,
    ),
    # A high-end gaming PC, NVIDIA GeForce RTX 4090: 24 GB GDDR6X at 1,008 GB/s; 165 TFLOP/s
    # dense FP16 tensor with FP32 accumulation (Ada Lovelace whitepaper); 450 W board power.
    "gaming-pc-4090": DeviceProfile(
        device_class="gaming-pc",
        cpu_cores=16,
        ram_bytes=64 * GIB,
        memory_bandwidth_bytes_per_s=1008 * GB,
        peak_flops=165e12,
        accelerator="cuda:NVIDIA GeForce RTX 4090",
        accelerator_memory_bytes=24 * GIB,
        network_rtt_s=0.030,
        power_idle_w=80.0,
        power_busy_w=550.0,
        uplink_bytes_per_s=HOME_UP,
        downlink_bytes_per_s=HOME_DOWN,
    ),
    # A laptop with Apple M2 and 16 GB unified memory: 100 GB/s, GPU 3.6 TFLOP/s (Apple's M2
    # announcement, June 2022). macOS lets the GPU use about two thirds of unified memory.
    # Wi-Fi at home: ~40 ms round trip.
    "laptop": DeviceProfile(
        device_class="laptop",
        cpu_cores=8,
        ram_bytes=16 * GIB,
        memory_bandwidth_bytes_per_s=100 * GB,
        peak_flops=3.6e12,
        accelerator="metal:Apple M2",
        accelerator_memory_bytes=int(16 * GIB * 2 / 3),
        network_rtt_s=0.040,
        power_idle_w=3.0,
        power_busy_w=20.0,
        uplink_bytes_per_s=HOME_UP,
        downlink_bytes_per_s=HOME_DOWN,
    ),
    # A CPU-only x86 laptop: 8 cores, dual-channel DDR5-5600 (2 x 64 bit x 5600 MT/s = 89.6 GB/s);
    # 8 cores x 32 FP32 FLOP/cycle (two 256-bit FMA units) x ~2.5 GHz sustained = 0.64 TFLOP/s.
    "laptop-cpu": DeviceProfile(
        device_class="laptop",
        cpu_cores=8,
        ram_bytes=16 * GIB,
        memory_bandwidth_bytes_per_s=89.6 * GB,
        peak_flops=0.64e12,
        network_rtt_s=0.040,
        power_idle_w=5.0,
        power_busy_w=45.0,
        uplink_bytes_per_s=HOME_UP,
        downlink_bytes_per_s=HOME_DOWN,
    ),
    # A parked car's computer, NVIDIA DRIVE AGX / Jetson AGX Orin 64 GB class: 204.8 GB/s
    # LPDDR5 (Jetson AGX Orin data sheet); GPU 5.3 TFLOP/s FP32 and 170 sparse INT8 TOPS, i.e.
    # about 42.5 TFLOP/s of dense FP16 tensor math (halved for sparsity, halved again for FP16).
    # Its own driving software keeps part of the 64 GB; we assume half is lent. Module power 15-60
    # W. Connected over LTE or garage Wi-Fi: ~60 ms round trip.
    "car": DeviceProfile(
        device_class="car",
        cpu_cores=12,
        ram_bytes=64 * GIB,
        memory_bandwidth_bytes_per_s=204.8 * GB,
        peak_flops=42.5e12,
        accelerator="cuda:NVIDIA Orin",
        accelerator_memory_bytes=32 * GIB,
        network_rtt_s=0.060,
        power_idle_w=15.0,
        power_busy_w=60.0,
        uplink_bytes_per_s=10 * MBIT,
        downlink_bytes_per_s=50 * MBIT,
    ),
    # A small CPU server, AMD EPYC 9654 (96 Zen 4 cores): 12 channels of DDR5-4800 = 460.8 GB/s;
    # 96 cores x 32 FP32 FLOP/cycle x 2.4 GHz = 7.4 TFLOP/s; 360 W TDP. In a data centre: ~10 ms.
    "server": DeviceProfile(
        device_class="server",
        cpu_cores=96,
        ram_bytes=384 * GIB,
        memory_bandwidth_bytes_per_s=460.8 * GB,
        peak_flops=7.4e12,
        network_rtt_s=0.010,
        power_idle_w=150.0,
        power_busy_w=500.0,
        uplink_bytes_per_s=25_000 * MBIT,
        downlink_bytes_per_s=25_000 * MBIT,
    ),
    # NVIDIA A100 SXM 80 GB: 2,039 GB/s HBM2e, 312 TFLOP/s dense BF16, 400 W (A100 datasheet).
    "a100": DeviceProfile(
        device_class="datacenter-gpu",
        cpu_cores=32,
        ram_bytes=512 * GIB,
        memory_bandwidth_bytes_per_s=2039 * GB,
        peak_flops=312e12,
        accelerator="cuda:NVIDIA A100-SXM4-80GB",
        accelerator_memory_bytes=80 * GIB,
        network_rtt_s=0.005,
        power_idle_w=100.0,
        power_busy_w=500.0,
        uplink_bytes_per_s=100_000 * MBIT,
        downlink_bytes_per_s=100_000 * MBIT,
    ),
    # NVIDIA H100 SXM5 80 GB: 3.35 TB/s HBM3, 989 TFLOP/s dense BF16 (1,979 with sparsity),
    # 700 W (H100 datasheet).
    "h100": DeviceProfile(
        device_class="datacenter-gpu",
        cpu_cores=32,
        ram_bytes=512 * GIB,
        memory_bandwidth_bytes_per_s=3350 * GB,
        peak_flops=989e12,
        accelerator="cuda:NVIDIA H100 80GB HBM3",
        accelerator_memory_bytes=80 * GIB,
        network_rtt_s=0.005,
        power_idle_w=100.0,
        power_busy_w=800.0,
        uplink_bytes_per_s=100_000 * MBIT,
        downlink_bytes_per_s=100_000 * MBIT,
    ),
}

# 4-bit GGUF Q4_0 stores 32 weights in 18 bytes (16 bytes of nibbles + a 2-byte scale):
# 4.5 bits, 0.5625 bytes per parameter.
Q4_0_BYTES_PER_PARAM = 0.5625

MODEL_PRESETS: dict[str, ModelSpec] = {
    # Qwen/Qwen2.5-0.5B-Instruct config.json: 24 layers, hidden 896, 2 KV heads of 64.
    "qwen2.5-0.5b": ModelSpec("qwen2.5-0.5b", 494_032_768, 2.0, 24, 896, 2, 64, 32_768),
    # Qwen/Qwen2.5-1.5B-Instruct: 28 layers, hidden 1536, 2 KV heads of 128.
    "qwen2.5-1.5b": ModelSpec("qwen2.5-1.5b", 1_543_714_304, 2.0, 28, 1536, 2, 128, 32_768),
    # Qwen/Qwen2.5-7B-Instruct: 28 layers, hidden 3584, 4 KV heads of 128.
    "qwen2.5-7b": ModelSpec("qwen2.5-7b", 7_615_616_512, 2.0, 28, 3584, 4, 128, 32_768),
    # meta-llama/Meta-Llama-3-8B: 32 layers, hidden 4096, 8 KV heads of 128, 8k context.
    "llama-3-8b": ModelSpec("llama-3-8b", 8_030_261_248, 2.0, 32, 4096, 8, 128, 8192),
    "llama-3-8b-q4": ModelSpec(
        "llama-3-8b-q4", 8_030_261_248, Q4_0_BYTES_PER_PARAM, 32, 4096, 8, 128, 8192
    ),
    # meta-llama/Meta-Llama-3-70B: 80 layers, hidden 8192, 8 KV heads of 128.
    "llama-3-70b": ModelSpec("llama-3-70b", 70_553_706_496, 2.0, 80, 8192, 8, 128, 8192),
    "llama-3-70b-q4": ModelSpec(
        "llama-3-70b-q4", 70_553_706_496, Q4_0_BYTES_PER_PARAM, 80, 8192, 8, 128, 8192
    ),
    # 128k-context models (issue 17's long-context scenarios). meta-llama/Llama-3.1-8B: the
    # architecture of Llama 3 8B with max_position_embeddings 131,072 (RoPE scaling "llama3");
    # Llama-3.1-70B likewise. The KV cache grows with the context: 131,072 tokens of the 8B
    # model at 16 bits is 16 GiB (2 * 32 layers * 8 heads * 128 * 2 bytes = 128 KiB a token).
    "llama-3.1-8b": ModelSpec("llama-3.1-8b", 8_030_261_248, 2.0, 32, 4096, 8, 128, 131_072),
    "llama-3.1-8b-q4": ModelSpec(
        "llama-3.1-8b-q4", 8_030_261_248, Q4_0_BYTES_PER_PARAM, 32, 4096, 8, 128, 131_072
    ),
    "llama-3.1-70b-q4": ModelSpec(
        "llama-3.1-70b-q4", 70_553_706_496, Q4_0_BYTES_PER_PARAM, 80, 8192, 8, 128, 131_072
    ),
    # Qwen/Qwen2.5-7B-Instruct with YaRN to 131,072 tokens (its model card's long-context setup).
    "qwen2.5-7b-128k": ModelSpec(
        "qwen2.5-7b-128k", 7_615_616_512, 2.0, 28, 3584, 4, 128, 131_072
    ),
    # The llama.cpp calibration reference: LLaMA 7B (6.74 B params, 32 layers, 32 heads of 128)
    # in Q4_0 is 3.79 GB, the "about 3.8 GB" of shared/data/README.md.
    "llama-7b-q4": ModelSpec(
        "llama-7b-q4", 6_738_415_616, Q4_0_BYTES_PER_PARAM, 32, 4096, 32, 128, 2048
    ),
}


def device_preset(name: str) -> DeviceProfile:
    try:
        return DEVICE_PRESETS[name]
    except KeyError:
        known = ", ".join(sorted(DEVICE_PRESETS))
        raise NotFound(f"no device preset {name!r}; known: {known}") from None


def model_preset(name: str) -> ModelSpec:
    try:
        return MODEL_PRESETS[name]
    except KeyError:
        known = ", ".join(sorted(MODEL_PRESETS))
        raise NotFound(f"no model preset {name!r}; known: {known}") from None

"""The inference engine's own cost per forward pass, measured on this device.

A decode step is more than its maths: Python in the engine loop and in the model's ``forward``,
one dispatch per operator in every layer, the attention mask and the cache bookkeeping, choosing
each sequence's token and telling its caller. On a CPU with Hugging Face transformers this is
milliseconds per step, which is all of a tiny model's step and a good part of a small one's, and
the pure roofline has no term for it.

So it is measured, not assumed: the node's real ``TransformersEngine`` serves a Llama-architecture
model whose maths takes no time (hidden size 64, a vocabulary of 256), at two depths, two batch
sizes and two context lengths, and the step times give the five terms of

    overhead(layers, batch, context) = step + layers * layer
        + batch * (sequence + layers * sequence_layer + layers * context * context_layer)

which ``perfmodel`` adds to every forward pass. The last term is the per-token work the engine
does beside reading the KV cache (the attention mask, appending to the cache, the attention
kernel's own per-key cost); the cache's bytes are the roofline's. The model is built from a
config with random weights, so nothing is downloaded. Without torch and transformers every term
is 0.
"""

from __future__ import annotations

import threading
import time
from typing import Any

overhead_layers = (2, 8)  # depths of the micro model; a model's own depth is interpolated
overhead_batches = (1, 8)
overhead_prompts = (16, 272)  # prompt tokens: a short context, and one longer by 256 tokens
overhead_new_tokens = 24  # decode steps timed per run
overhead_tries = 4
overhead_tries_min = 2  # ... even past the budget: one run alone is too easily disturbed
overhead_wait_s = 60.0  # a run that takes longer than this is broken: give up on it
micro_hidden_size = 64
micro_vocab_size = 256
micro_context_tokens = 1024

# (step, layer, sequence, sequence_layer, context_layer) seconds
Overhead = tuple[float, float, float, float, float]
NO_OVERHEAD: Overhead = (0.0, 0.0, 0.0, 0.0, 0.0)


def _micro_engine(layers: int, device: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from sparecycles.node.backends.transformers import TransformersEngine
    from sparecycles.types import ModelSpec

    # two query heads sharing one key-value head: grouped-query attention, as in current models,
    # so the operators that repeat the shared keys and values are timed too
    config = LlamaConfig(
        vocab_size=micro_vocab_size, hidden_size=micro_hidden_size,
        intermediate_size=2 * micro_hidden_size, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=micro_context_tokens,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device).eval()
    model.generation_config.eos_token_id = None  # run every request to its length
    spec = ModelSpec(
        name=f"micro-{layers}", n_params=sum(p.numel() for p in model.parameters()),
        bytes_per_param=4.0, n_layers=layers, hidden_size=micro_hidden_size, n_kv_heads=1,
        head_dim=micro_hidden_size // 2, context_length=micro_context_tokens,
    )  # fmt: skip
    return TransformersEngine(spec.name, model, None, spec, batch_size_max=max(overhead_batches))


def probe_prompt(tokens: int, i: int = 0) -> tuple[int, ...]:
    """The ``i``-th probe request's prompt of ``tokens`` ids, each within the micro vocabulary
    (neither 0 nor its last id), different from one request to the next."""
    return tuple((7 * i + j) % (micro_vocab_size - 2) + 1 for j in range(tokens))


def engine_step_s(engine: Any, batch: int, prompt_tokens: int, new_tokens: int) -> float:
    """Seconds per decode step of ``batch`` greedy requests submitted together to ``engine``:
    timed from the last first token (every request running) to the first finish."""
    from sparecycles.node.backends.base import GenerationRequest, GenerationUpdate
    from sparecycles.types import SamplingParams

    stamps: dict[str, list[float]] = {}
    finished = [0]
    lock, done = threading.Lock(), threading.Event()

    def on_update(u: GenerationUpdate) -> None:
        now = time.perf_counter()
        with lock:
            stamps[u.request_id].extend([now] * max(1, len(u.token_ids)))
            finished[0] += u.finished
            if finished[0] == batch:
                done.set()

    tag = time.perf_counter_ns()
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0)
    for i in range(batch):
        rid = f"overhead-{tag}-{i}"
        stamps[rid] = []
        engine.submit(GenerationRequest(rid, probe_prompt(prompt_tokens, i), params), on_update)
    if not done.wait(overhead_wait_s):
        raise TimeoutError("the engine did not finish the overhead run")
    first = max(s[0] for s in stamps.values())
    last = min(s[-1] for s in stamps.values())
    steps = sum(1 for t in next(iter(stamps.values())) if first < t <= last)
    return (last - first) / max(1, steps)


def _mean_context(prompt_tokens: int) -> float:
    """The mean context of the decode steps ``engine_step_s`` times after such a prompt."""
    return prompt_tokens + overhead_new_tokens / 2


def fit_overhead(step_s: dict[tuple[int, int, int], float]) -> Overhead:
    """The five terms from step times ``{(layers, batch, prompt tokens): seconds}`` at both
    depths and batches with the short prompt, and at the deeper, larger batch with the long one.
    Each term is at least 0: a noisy measurement must not predict a negative cost."""
    (l1, l2), (b1, b2), (p1, p2) = overhead_layers, overhead_batches, overhead_prompts
    extra_tokens = _mean_context(p2) - _mean_context(p1)
    context_layer = max(0.0, (step_s[l2, b2, p2] - step_s[l2, b2, p1]) / (l2 * b2 * extra_tokens))
    # what is left at the short context once its per-token part is taken out
    base = {
        (n, b): step_s[n, b, p1] - b * n * _mean_context(p1) * context_layer
        for n in (l1, l2)
        for b in (b1, b2)
    }
    per_seq = {n: (base[n, b2] - base[n, b1]) / (b2 - b1) for n in (l1, l2)}
    per_step = {n: base[n, b1] - b1 * per_seq[n] for n in (l1, l2)}
    layer = max(0.0, (per_step[l2] - per_step[l1]) / (l2 - l1))
    seq_layer = max(0.0, (per_seq[l2] - per_seq[l1]) / (l2 - l1))
    step = max(0.0, per_step[l1] - l1 * layer)
    sequence = max(0.0, per_seq[l1] - l1 * seq_layer)
    return step, layer, sequence, seq_layer, context_layer


def measure_engine_overhead(budget_s: float, device: str = "cpu") -> Overhead:
    """The five overhead terms on ``device``, each step time the best of a few runs within about
    ``budget_s``; zeros where torch or transformers is missing."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return NO_OVERHEAD
    (l1, l2), (b1, b2), (p1, p2) = overhead_layers, overhead_batches, overhead_prompts
    cases = [(l1, b1, p1), (l1, b2, p1), (l2, b1, p1), (l2, b2, p1), (l2, b2, p2)]
    engines = {layers: _micro_engine(layers, device) for layers in overhead_layers}
    step_s: dict[tuple[int, int, int], float] = {}
    try:
        for layers, batch, prompt in cases:  # warm up: the first runs of a shape allocate
            engine_step_s(engines[layers], batch, prompt, 4)
        # the budget starts once the engines are built (the first build imports the model code)
        deadline = time.perf_counter() + budget_s
        for tries in range(overhead_tries):  # in turns, so that a burst of load hits one try
            for layers, batch, prompt in cases:
                run_s = engine_step_s(engines[layers], batch, prompt, overhead_new_tokens)
                key = (layers, batch, prompt)
                step_s[key] = min(run_s, step_s.get(key, run_s))
            if tries + 1 >= overhead_tries_min and time.perf_counter() > deadline:
                break
    finally:
        for engine in engines.values():
            engine.close()
    return fit_overhead(step_s)

"""How fast llama.cpp runs on this device, measured through the node's own ``LlamaCppEngine``.

The profile's bandwidth is a copy's, and its linear layers are torch's fp32 matrix-vector
products; neither is how llama.cpp decodes. llama.cpp streams quantized blocks (Q4_0, Q8_0,
Q6_K ...) through kernels that unpack each block and multiply it against the activations
quantized to 8 bits: on a few CPU cores that work, not the memory, often sets the pace, and its
rate differs by type (a Q4_0 byte holds two weights to unpack, a Q8_0 byte one). So a node that
runs llama.cpp measures llama.cpp itself, on models it writes (``ggufwrite``: random weights, a
byte vocabulary, nothing downloaded):

- **the engine's own cost per pass** outside the weights' maths, on a micro model (hidden size
  64) at two depths, two batches and two contexts, fitted to the same five terms as the
  transformers engine's (node/overhead.py: step, layer, sequence, sequence-layer,
  context-layer);
- **the rate each weight type is read at**: a probe model of 12 layers of hidden 2048, FFN 5632
  (537 M parameters, every matrix in one type: 300 MB in Q4_0, far beyond the caches) decodes
  ``rows`` sequences at once, for rows 1 to 16; the step's time less
  the engine's cost above is the time its matrices took, and their bytes over that time is the
  type's rate at that many rows. At 64 rows it times, besides, one prompt's pass (64 tokens of
  one sequence, to its first token): prefill and chunked steps run the matrix products over a
  prompt's many rows, where llama.cpp's kernels go faster per row than at 16 (extrapolated from
  16 rows, a 128-token prefill was over-predicted by 23-46 %), while 64 sequences decoding
  together pay for attention over all their cells at once (a unified cache) and went slower
  (docs/benchmarks.md).

``perfmodel`` then times a GGUF's decode step as the sum over its tensor types of bytes / rate
(``ModelSpec.bytes_by_type``), plus the engine's cost; nothing is fitted to the model predicted.
The types measured are those of the GGUF files the node serves (``gguf_types``). Writing the
probe (1 GB in F16, then each type) takes tens of seconds and a GB of disk for a moment, the
timing a few seconds per type; the node caches the profile (node/profile.py), so this happens
once per device and set of types.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from sparecycles import gguffile, modelfiles
from sparecycles.node import overhead as torch_overhead
from sparecycles.node.backends import ggufwrite

log = logging.getLogger(__name__)

# 12 layers of 2048 x 5632 (537 M parameters: 300 MB in Q4_0, 570 MB in Q8_0). Far beyond any
# last-level cache: a 4-layer probe (100 MB in Q4_0) read at 55 GB/s on the 2-vCPU EPYC VM of
# docs/benchmarks.md, where a 1.2B Q4_0 model's matrices came at 30 (its host's L3 may hold
# 96 MB per chiplet, more than the VM's 32 MiB shown)
probe_shape = ggufwrite.LlamaShape(hidden=2048, layers=12, ffn=5632, heads=16, kv_heads=4,
                                   context_length=4096)
# A second, narrow probe: llama.cpp reads a type's bytes at about half the rate in matrices
# 512-576 wide as in 2048-wide ones (SmolLM2's Q4_1 layers at 7.8 GB/s where the wide probe's
# came at 14-16 on the 2-vCPU VM): each output row's dot product has a fixed cost, which a
# narrow row pays over fewer bytes. perfmodel interpolates a model's rate between the two by its
# hidden size. 32 layers of 512 x 1408 (92 M parameters, 52 MB in Q4_0): a small model's size.
narrow_shape = ggufwrite.LlamaShape(hidden=512, layers=32, ffn=1408, heads=8, kv_heads=4,
                                    context_length=4096)
probe_rows = (1, 2, 4, 8, 16)  # decode batches timed on the probe
prefill_rows = 64  # ... and one prompt pass of this many tokens (not one of probe_rows)
probe_prompt_tokens = 16
probe_new_tokens = 12  # decode steps timed per run
probe_tries = 3
probe_tries_min = 2  # ... even past the budget
micro_hidden = 64
kv_tokens = 4096  # cells of the probes' contexts: 8 x (272 + 24) for the overhead's longest case
default_types = ("Q4_0", "Q8_0")  # measured when the node does not say which it serves
type_to_kind = {k.upper(): k for k in ggufwrite.quant_kinds if "_k" not in k} | {
    "Q2_K": "q2_k", "Q3_K": "q3_k", "Q4_K": "q4_k", "Q5_K": "q5_k", "Q6_K": "q6_k"}

Overhead = torch_overhead.Overhead


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def gguf_types(paths: Iterable[Path]) -> tuple[str, ...]:
    """The tensor types of the matrices a decode step reads in ``paths`` (GGUF files), those
    llama.cpp's quantizer can write (a probe of each is timed); 1-D tensors (norms) aside."""
    types: set[str] = set()
    for path in paths:
        info = gguffile.read_gguf(path, arrays=False)
        types.update(t for t, n in info.decode_bytes_by_type().items() if n and t in type_to_kind
                     and t != "F32")
    return tuple(sorted(types))


def _engine(path: Path, batch: int, threads: int | None) -> Any:
    from sparecycles.node.backends.llamacpp import LlamaCppEngine

    spec = modelfiles.model_spec(path.stem, path, hash_weights=False)
    return LlamaCppEngine(path.stem, path, spec, threads=threads, batch_size_max=batch,
                          kv_tokens=kv_tokens, prefix_cache=False)


@contextlib.contextmanager
def _workdir(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix="sparecycles-llamacpp-probe-") as tmp:
        yield Path(tmp)


def _write(path: Path, shape: ggufwrite.LlamaShape, kind: str, work: Path,
           f16: Path | None = None) -> Path:
    """``path`` (a pure ``kind`` model of ``shape``), written unless already there; quantized
    from ``f16`` when given (kept), else from an F16 model written for it and removed."""
    if path.is_file():
        return path
    own = f16 is None
    f16 = f16 or work / f"{path.stem}-f16.gguf"
    if not f16.is_file():
        ggufwrite.write_random_llama(f16, shape, ggufwrite.byte_vocabulary(), name=path.stem)
    if kind == "f16":
        f16.rename(path)
        return path
    try:
        return ggufwrite.quantize(f16, path, kind, pure=True, threads=os.cpu_count() or 1)
    finally:
        if own:
            f16.unlink(missing_ok=True)


def measure_overhead(budget_s: float, work: Path, threads: int | None = None) -> Overhead:
    """The llama.cpp engine's five overhead terms (node/overhead.py's form), each case's step
    time the best of a few runs within about ``budget_s``."""
    (l1, l2), (b1, b2), (p1, p2) = (torch_overhead.overhead_layers,
                                    torch_overhead.overhead_batches,
                                    torch_overhead.overhead_prompts)
    cases = [(l1, b1, p1), (l1, b2, p1), (l2, b1, p1), (l2, b2, p1), (l2, b2, p2)]
    step_s: dict[tuple[int, int, int], float] = {}
    # One engine at a time: llama.cpp's OpenMP threads keep spinning a while after each pass,
    # and a second engine's passes (on a thread of its own, with threads of its own) would be
    # timed against them (on 2 cores, a 0.1 ms step measured 2 ms so).
    # The long prompts' case on an engine of its own too: after it, the short cases ran
    # several times slower on the same context (their cells placed past the long ones').
    groups = [[c for c in cases if c[0] == l1], [c for c in cases if c[0] == l2 and c[2] == p1],
              [c for c in cases if c[2] == p2]]
    for n, mine in enumerate(groups):
        depth = mine[0][0]
        shape = ggufwrite.LlamaShape(hidden=micro_hidden, layers=depth, ffn=2 * micro_hidden,
                                     heads=2, kv_heads=1, context_length=kv_tokens)
        path = _write(work / f"micro-{depth}.gguf", shape, "f16", work)
        engine = _engine(path, b2, threads)
        try:
            for _, batch, prompt in mine:  # warm up
                torch_overhead.engine_step_s(engine, batch, prompt, 4)
            deadline = time.perf_counter() + budget_s * (n + 1) / len(groups)
            for tries in range(torch_overhead.overhead_tries):
                for key in mine:
                    run_s = torch_overhead.engine_step_s(engine, key[1], key[2],
                                                         torch_overhead.overhead_new_tokens)
                    step_s[key] = min(run_s, step_s.get(key, run_s))
                if (tries + 1 >= torch_overhead.overhead_tries_min
                        and time.perf_counter() > deadline):
                    break
        finally:
            engine.close()
    return torch_overhead.fit_overhead(step_s)


def overhead_s(terms: Overhead, layers: int, batch: int, context: float) -> float:
    step, layer, sequence, sequence_layer, context_layer = terms
    per_sequence = sequence + layers * (sequence_layer + context * context_layer)
    return step + layers * layer + batch * per_sequence


def measure_reads(budget_s: float, types: Iterable[str], terms: Overhead, work: Path,
                  threads: int | None = None, shape: ggufwrite.LlamaShape | None = None,
                  name: str = "probe") -> tuple[tuple[str, int, float], ...]:
    """((type, rows, bytes/s), ...): for each type, the rate the probe model's matrices (all in
    that type; ``shape``, by default ``probe_shape``) are read at in a decode step of ``rows``
    sequences, the engine's cost (``terms``) taken out of the step; each the best of a few runs,
    within about ``budget_s`` in all."""
    shape = shape or probe_shape
    types = [t for t in types if t in type_to_kind]
    out: list[tuple[str, int, float]] = []
    f16 = work / f"{name}-f16-source.gguf"  # written once, quantized to each type
    try:
        for t in types:
            deadline = time.perf_counter() + budget_s / len(types)
            out.extend(_measure_type(t, f16, terms, work, threads, deadline, shape, name))
    finally:
        f16.unlink(missing_ok=True)
    return tuple(out)


def _measure_type(t: str, f16: Path, terms: Overhead, work: Path, threads: int | None,
                  deadline: float, shape: ggufwrite.LlamaShape, name: str
                  ) -> list[tuple[str, int, float]]:
    """One type's rates by rows (``measure_reads``), the probe quantized from ``f16``."""
    assert prefill_rows not in probe_rows, "a row count is timed one way only"
    path = _write(work / f"{name}-{t.lower()}.gguf", shape, type_to_kind[t], work, f16)
    nbytes = gguffile.read_gguf(path, arrays=False).decode_bytes_by_type()[t]
    engine = _engine(path, max(probe_rows), threads)
    best: dict[int, float] = {}
    try:
        torch_overhead.engine_step_s(engine, max(probe_rows), probe_prompt_tokens, 2)
        for tries in range(probe_tries):  # in turns: a burst of load hits one try
            for rows in probe_rows:
                run_s = torch_overhead.engine_step_s(engine, rows, probe_prompt_tokens,
                                                     probe_new_tokens)
                best[rows] = min(run_s, best.get(rows, run_s))
            run_s = prefill_pass_s(engine, prefill_rows)
            best[prefill_rows] = min(run_s, best.get(prefill_rows, run_s))
            if tries + 1 >= probe_tries_min and time.perf_counter() > deadline:
                break
    finally:
        engine.close()
    context = probe_prompt_tokens + probe_new_tokens / 2
    out = []
    for rows in (*probe_rows, prefill_rows):
        # the prompt pass: one sequence's cost at its context; its 64 query rows' attention
        # (~2,000 pairs) stays in, so the rate errs a little low
        engine_s = (overhead_s(terms, shape.layers, rows, context) if rows in probe_rows
                    else overhead_s(terms, shape.layers, 1, rows))
        # the engine's cost measured apart may exceed a noisy step: never below a tenth
        weights_s = max(best[rows] - engine_s, best[rows] / 10)
        out.append((t, rows, nbytes / weights_s))
    return out


def prefill_pass_s(engine: Any, tokens: int) -> float:
    """Seconds from submitting one greedy request of ``tokens`` prompt tokens to ``engine``
    (idle, no prefix cache) to its first token: one prompt pass."""
    from sparecycles.node.backends.base import GenerationRequest, GenerationUpdate
    from sparecycles.types import SamplingParams

    first: list[float] = []
    errors: list[str] = []
    done = threading.Event()

    def on_update(u: GenerationUpdate) -> None:
        if not first and (u.token_ids or u.finished):
            first.append(time.perf_counter())
            if u.error:
                errors.append(str(u.error))
            done.set()

    request = GenerationRequest(f"prefill-{time.perf_counter_ns()}",
                                torch_overhead.probe_prompt(tokens),
                                SamplingParams(max_tokens=1, temperature=0.0))
    started = time.perf_counter()
    engine.submit(request, on_update)
    if not done.wait(torch_overhead.overhead_wait_s):
        raise TimeoutError("the probe's prompt pass did not finish")
    if errors:
        raise RuntimeError(f"the probe's prompt pass failed: {errors[0]}")
    return first[0] - started


Reads = tuple[tuple[str, int, float], ...]


def measure_llamacpp(budget_s: float, types: Iterable[str] = default_types, *,
                     threads: int | None = None, keep: Path | None = None
                     ) -> tuple[Reads, Overhead, Reads]:
    """(read rates by type and rows on the wide probe, the engine's overhead terms, the same
    rates on the narrow probe) of llama.cpp on this device. The probe models are written in a
    temporary folder, or in ``keep`` to be reused."""
    types = tuple(types) or default_types
    with _workdir(keep) as work:
        terms = measure_overhead(budget_s / 4, work, threads)
        reads = measure_reads(budget_s / 2, types, terms, work, threads)
        narrow = measure_reads(budget_s / 4, types, terms, work, threads, narrow_shape, "narrow")
    return reads, terms, narrow

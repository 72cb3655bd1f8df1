"""Llama-architecture GGUF models with random weights for benchmarks: the writer and quantizer
of ``node/backends/ggufwrite.py`` with a real model's tokenizer copied in.

Decode speed depends on the model's shapes and the types its weights are stored in, not on the
weights' values, so a benchmark of the llama.cpp backend at a realistic size (~1B parameters,
where reading the weights dominates a step) needs no download: ``write_random_llama`` writes
one, F16 matrices and F32 norms, tensor by tensor (memory stays near the largest tensor, ~0.4 GB
for the 1B shape, never the whole model), with the tokenizer (vocabulary, merges, special token
ids, chat template) copied from another GGUF file (SmolLM2's) so llama.cpp and the coordinator
load it like any other model. ``quantize`` then makes Q8_0 / Q4_0 copies with llama.cpp's own
quantizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparecycles import gguffile
from sparecycles.errors import InvalidRequest
from sparecycles.node.backends.ggufwrite import (
    LlamaShape,
    quant_kinds,
    quantize,
    silent_tokens,
)
from sparecycles.node.backends.ggufwrite import write_random_llama as _write

__all__ = ["LlamaShape", "decode_weight_bytes", "quant_kinds", "quantize", "shape_1b",
           "silent_tokens", "tokenizer_metadata", "write_random_llama"]

# ~1.2B parameters with SmolLM2's 49,152-token vocabulary (1.07B read per decoded token: all but
# the input embedding): Llama 3.2 1B's layers (hidden 2048, 16 layers, FFN 8192, GQA 32/8).
shape_1b = LlamaShape(hidden=2048, layers=16, ffn=8192, heads=32, kv_heads=8)


def tokenizer_metadata(source: Path) -> dict[str, Any]:
    """The ``tokenizer.*`` entries of a GGUF file's header (vocabulary, merges, special ids,
    chat template)."""
    info = gguffile.read_gguf(source)
    meta = {k: v for k, v in info.metadata.items() if k.startswith("tokenizer.")}
    if not isinstance(meta.get("tokenizer.ggml.tokens"), list):
        raise InvalidRequest(f"{source.name}: no tokenizer.ggml.tokens to copy")
    return meta


def write_random_llama(out: Path, shape: LlamaShape, tokenizer_from: Path, *, seed: int = 0,
                       name: str = "random-llama") -> Path:
    """A Llama GGUF of ``shape`` with random weights and the tokenizer of ``tokenizer_from``
    (``ggufwrite.write_random_llama``)."""
    return _write(out, shape, tokenizer_metadata(tokenizer_from), seed=seed, name=name)


def decode_weight_bytes(info: gguffile.GGUFInfo) -> int:
    """Bytes of weights one decode step reads (``GGUFInfo.decode_bytes_by_type``)."""
    return sum(info.decode_bytes_by_type().values())

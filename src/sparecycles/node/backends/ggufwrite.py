"""Llama-architecture GGUF models with random weights, written offline, and quantized.

Decode speed depends on the model's shapes and the types its weights are stored in, not on the
weights' values, so measuring llama.cpp at a given size needs no download: ``write_random_llama``
writes a model, F16 matrices and F32 norms, tensor by tensor (memory stays near the largest
tensor, never the whole model), with a tokenizer given as GGUF metadata: another file's
(``tools/ggufmodel.py`` copies SmolLM2's) or ``byte_vocabulary()``, 256 byte tokens and three
special ones, which llama.cpp loads like any SentencePiece vocabulary. ``quantize`` then makes
quantized copies with llama.cpp's own quantizer (through llama-cpp-python's binding of
``llama_model_quantize``); ``pure`` gives every matrix the same type, as the node profiler's
probes need (node/llamacpp_profile.py).

The rows of the output matrix that belong to end-of-generation and other control tokens are
zero: their logit is always 0 while the other random logits reach far above it, so greedy
decoding never stops early and every request runs to ``max_tokens``.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sparecycles.errors import InvalidRequest

gguf_token_type_unknown = 2  # gguf.TokenType.UNKNOWN
gguf_token_type_control = 3  # gguf.TokenType.CONTROL: <|im_end|>, <|endoftext|>, ...
gguf_token_type_byte = 6  # gguf.TokenType.BYTE: <0x0A>, ...
weight_std = 0.02  # the initialiser's scale (Llama's initializer_range)
rms_norm_eps = 1e-5
rope_freq_base = 10000.0


@dataclass(frozen=True, slots=True)
class LlamaShape:
    """The hyperparameters of a Llama-architecture model (vocabulary aside)."""

    hidden: int
    layers: int
    ffn: int
    heads: int
    kv_heads: int
    context_length: int = 4096

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensor_shapes(self, vocab: int) -> Iterator[tuple[str, tuple[int, ...]]]:
        """(GGUF tensor name, numpy shape: rows = outputs) in the order the file holds them."""
        kv = self.kv_heads * self.head_dim
        yield "token_embd.weight", (vocab, self.hidden)
        for i in range(self.layers):
            b = f"blk.{i}."
            yield b + "attn_norm.weight", (self.hidden,)
            yield b + "attn_q.weight", (self.hidden, self.hidden)
            yield b + "attn_k.weight", (kv, self.hidden)
            yield b + "attn_v.weight", (kv, self.hidden)
            yield b + "attn_output.weight", (self.hidden, self.hidden)
            yield b + "ffn_norm.weight", (self.hidden,)
            yield b + "ffn_gate.weight", (self.ffn, self.hidden)
            yield b + "ffn_up.weight", (self.ffn, self.hidden)
            yield b + "ffn_down.weight", (self.hidden, self.ffn)
        yield "output_norm.weight", (self.hidden,)
        yield "output.weight", (vocab, self.hidden)

    def n_params(self, vocab: int) -> int:
        return sum(math.prod(s) for _, s in self.tensor_shapes(vocab))


def _add_value(writer: Any, key: str, value: Any) -> None:
    """One metadata entry typed as llama.cpp reads it: ids and counts u32, flags bool, token
    types i32 and scores f32 (the gguf package's own conventions)."""
    from gguf import GGUFValueType as T

    if isinstance(value, bool):
        writer.add_key_value(key, value, T.BOOL)
    elif isinstance(value, int):
        writer.add_key_value(key, value, T.UINT32)
    elif isinstance(value, float):
        writer.add_key_value(key, value, T.FLOAT32)
    elif isinstance(value, str):
        writer.add_key_value(key, value, T.STRING)
    elif isinstance(value, list) and value:
        first = value[0]
        sub = (T.STRING if isinstance(first, str) else T.FLOAT32 if isinstance(first, float)
               else T.INT32)
        writer.add_key_value(key, value, T.ARRAY, sub_type=sub)
    else:
        raise InvalidRequest(f"cannot copy metadata {key!r} of type {type(value).__name__}")


def silent_tokens(meta: dict[str, Any]) -> list[int]:
    """Token ids the generated model never chooses: control tokens and the end ids."""
    types = meta.get("tokenizer.ggml.token_type") or []
    ids = {i for i, t in enumerate(types) if t == gguf_token_type_control}
    for key in ("eos", "eot", "eom"):
        value = meta.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(value, int):
            ids.add(value)
    return sorted(ids)


def byte_vocabulary() -> dict[str, Any]:
    """The ``tokenizer.*`` metadata of a SentencePiece vocabulary of 256 byte tokens and
    ``<unk>``, ``<s>``, ``</s>``: enough for llama.cpp to load a model and decode token ids."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [0.0] * len(tokens),
            "tokenizer.ggml.token_type": [gguf_token_type_unknown] + [gguf_token_type_control] * 2
            + [gguf_token_type_byte] * 256,
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2}


def write_random_llama(out: Path, shape: LlamaShape, tokenizer: dict[str, Any], *,
                       seed: int = 0, name: str = "random-llama", file_type: int = 1) -> Path:
    """Write a Llama GGUF of ``shape`` with random F16 matrices (F32 norms) and ``tokenizer``
    (``tokenizer.*`` metadata), streaming one tensor at a time; written to a temporary name and
    renamed, so an interrupted run leaves no partial ``out``."""
    import gguf

    meta = tokenizer
    if not isinstance(meta.get("tokenizer.ggml.tokens"), list):
        raise InvalidRequest("the tokenizer has no tokenizer.ggml.tokens")
    vocab = len(meta["tokenizer.ggml.tokens"])
    silent = silent_tokens(meta)
    arch = "llama"
    writer = gguf.GGUFWriter(None, arch)
    writer.add_name(name)
    writer.add_file_type(file_type)  # LLAMA_FTYPE_MOSTLY_F16
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(rope_freq_base)
    writer.add_layer_norm_rms_eps(rms_norm_eps)
    writer.add_vocab_size(vocab)
    for key, value in meta.items():
        _add_value(writer, key, value)
    shapes = list(shape.tensor_shapes(vocab))
    for tname, tshape in shapes:
        dtype = np.float32 if len(tshape) == 1 else np.float16
        writer.add_tensor_info(tname, tshape, np.dtype(dtype),
                               math.prod(tshape) * np.dtype(dtype).itemsize)
    tmp = out.with_name(out.name + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tname, tshape in shapes:
            writer.write_tensor_data(_random_tensor(rng, tname, tshape, silent))
        writer.close()
        tmp.rename(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _random_tensor(rng: np.random.Generator, name: str, shape: tuple[int, ...],
                   silent: list[int]) -> np.ndarray:
    if len(shape) == 1:  # an RMS norm's scale
        return np.ones(shape, dtype=np.float32)
    x = rng.standard_normal(shape, dtype=np.float32)
    x *= weight_std
    if name == "output.weight" and silent:
        x[silent] = 0.0
    return x.astype(np.float16)


# quantization kind -> llama.cpp's file type (LLAMA_FTYPE_*); with ``pure``, every matrix is
# stored in the kind's own tensor type (Q4_K_M's is Q4_K, ...)
quant_kinds = {
    "f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
    "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1",
    "q2_k": "MOSTLY_Q2_K", "q3_k": "MOSTLY_Q3_K_M", "q4_k": "MOSTLY_Q4_K_M",
    "q5_k": "MOSTLY_Q5_K_M", "q6_k": "MOSTLY_Q6_K",
}


def quantize(source: Path, out: Path, kind: str, *, threads: int = 2, pure: bool = False) -> Path:
    """``source`` converted to ``kind`` (one of ``quant_kinds``, a GGUF tensor type's name in
    lower case) by llama.cpp's quantizer (requantizing from a quantized file is allowed, as
    ``llama-quantize --allow-requantize`` does); ``pure``: every matrix in that type, none
    chosen apart (llama.cpp otherwise keeps the output matrix at Q6_K or Q8_0). Written to a
    temporary name and renamed."""
    from sparecycles.node.backends.llamacpp import _llama

    kind = kind.lower()
    if kind not in quant_kinds:
        raise InvalidRequest(f"unknown quantization {kind!r} (known: {', '.join(quant_kinds)})")
    lib = _llama()
    params = lib.llama_model_quantize_default_params()
    params.ftype = getattr(lib, f"LLAMA_FTYPE_{quant_kinds[kind]}")
    params.allow_requantize = True
    params.pure = pure
    params.nthread = threads
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        if lib.llama_model_quantize(str(source).encode(), str(tmp).encode(),
                                    ctypes.byref(params)):
            raise InvalidRequest(f"llama.cpp could not quantize {source.name} to {kind}")
        tmp.rename(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out

"""GGUF model files: read the header, check the file is whole, describe its tensors.

A GGUF file (llama.cpp's format) is one file holding the weights, the model's hyperparameters, its
tokenizer and its chat template. This module reads the header (key-value metadata and the table
of tensors) with ``struct`` alone, checks that every tensor lies inside the file (a truncated
download is caught here, not by a crash in the engine), and says what the tensors are stored in,
so that the coordinator, the node and ``sparecycles plan`` all read one file one way.

Why not ``gguf.GGUFReader``: it builds a numpy array for every string of the vocabulary and
takes seconds per file (9 s for SmolLM2's on this machine while busy); this reader takes tens of
milliseconds, and needs neither numpy nor torch. Type sizes come from the ``gguf`` package,
llama.cpp's own Python description of the format.
"""

from __future__ import annotations

import math
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from sparecycles.errors import InvalidRequest

gguf_magic = b"GGUF"
gguf_versions = (2, 3)
gguf_alignment_default = 32  # bytes, when the file does not set general.alignment
gguf_string_bytes_max = 64 * (1 << 20)  # a chat template or merges entry beyond this is corrupt
gguf_array_items_max = 1 << 26  # vocabularies hold ~10^5 entries; 10^7+ means a bad header
gguf_kv_count_max = 1 << 16
gguf_tensor_count_max = 1 << 20
gguf_tensor_dims_max = 8

# value types of the metadata (gguf.GGUFValueType)
_SCALARS: dict[int, str] = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f",
                            7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFError(InvalidRequest):
    """A GGUF file that cannot be used: the message names the file and the reason."""


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type_id: int
    type_name: str  # "Q4_1", "F32", ...
    offset: int  # from the start of the data section
    n_elements: int
    n_bytes: int


@dataclass(frozen=True, slots=True)
class GGUFInfo:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    data_offset: int  # where tensor data starts in the file
    file_bytes: int

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_value(self, key: str) -> Any:
        """``<architecture>.<key>`` (e.g. ``block_count``), or None."""
        return self.metadata.get(f"{self.architecture}.{key}")

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @property
    def bytes_per_param(self) -> float:
        """Bytes per weight as stored, from each tensor's own type (Q4_1 is 0.625, Q8_0
        1.0625, F32 4): what a decode step reads per parameter."""
        return self.tensor_bytes / self.n_params if self.n_params else 0.0

    def params_by_type(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for t in self.tensors:
            out[t.type_name] += t.n_elements
        return out

    def decode_bytes_by_type(self) -> Counter[str]:
        """Bytes of weights one decode step reads, by tensor type: every tensor but the input
        embedding (a step reads one row of it), unless the model has no ``output`` matrix and
        computes its logits with the embedding (tied weights), which it then reads whole."""
        tied = not any(t.name == "output.weight" for t in self.tensors)
        out: Counter[str] = Counter()
        for t in self.tensors:
            if tied or t.name != "token_embd.weight":
                out[t.type_name] += t.n_bytes
        return out

    @property
    def chat_template(self) -> str | None:
        value = self.metadata.get("tokenizer.chat_template")
        return value if isinstance(value, str) and value.strip() else None


def is_gguf(path: Path) -> bool:
    """Whether ``path`` is a file starting with GGUF's magic bytes."""
    try:
        with path.open("rb") as f:
            return f.read(4) == gguf_magic
    except OSError:
        return False


def read_gguf(path: str | Path, *, arrays: bool = True) -> GGUFInfo:
    """The header of the GGUF file at ``path``; raises ``GGUFError`` naming the file and why
    for anything but a whole, well-formed file. ``arrays=False`` skips the contents of metadata
    arrays (the vocabulary, the merges), keeping their lengths only: enough for a model spec."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            return _read(f, path, size, arrays)
    except GGUFError:
        raise
    except (OSError, struct.error, UnicodeDecodeError, ValueError, EOFError) as exc:
        raise GGUFError(
            f"{path.name}: not a readable GGUF file ({type(exc).__name__}: {exc})") from exc


def _read(f: BinaryIO, path: Path, size: int, arrays: bool) -> GGUFInfo:
    def fail(why: str) -> GGUFError:
        return GGUFError(f"{path.name}: {why}")

    def read(n: int) -> bytes:
        data = f.read(n)
        if len(data) != n:
            raise fail(f"truncated or corrupt GGUF (the header ends early at byte {f.tell()}"
                       f" of {size})")
        return data

    def u32() -> int:
        return int(struct.unpack("<I", read(4))[0])

    def u64() -> int:
        return int(struct.unpack("<Q", read(8))[0])

    def string() -> str:
        n = u64()
        if n > gguf_string_bytes_max or f.tell() + n > size:
            raise fail(f"truncated or corrupt GGUF (a string of {n} bytes at byte {f.tell()})")
        return read(n).decode("utf-8", errors="replace")

    def value(kind: int, keep: bool = True) -> Any:
        if kind in _SCALARS:
            fmt = _SCALARS[kind]
            return struct.unpack(fmt, read(struct.calcsize(fmt)))[0]
        if kind == _STRING:
            return string()
        if kind == _ARRAY:
            item_kind, n = u32(), u64()
            if n > gguf_array_items_max:
                raise fail(f"corrupt GGUF (an array of {n} items)")
            if item_kind in _SCALARS:
                width = struct.calcsize(_SCALARS[item_kind])
                raw = read(width * n)
                if not keep:
                    return _Skipped(n)
                return list(struct.unpack(f"<{n}{_SCALARS[item_kind][1]}", raw))
            items = [value(item_kind) for _ in range(n)]
            return items if keep else _Skipped(n)
        raise fail(f"corrupt GGUF (unknown metadata value type {kind})")

    if read(4) != gguf_magic:
        raise fail("not a GGUF file (no GGUF magic bytes at the start)")
    version = u32()
    if version not in gguf_versions:
        raise fail(f"unsupported GGUF version {version} (supported: {gguf_versions})")
    n_tensors, n_kv = u64(), u64()
    if n_tensors > gguf_tensor_count_max or n_kv > gguf_kv_count_max:
        raise fail(f"corrupt GGUF header ({n_tensors} tensors, {n_kv} metadata entries)")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = string()
        metadata[key] = value(u32(), keep=arrays or not key.startswith("tokenizer.ggml."))

    sizes = _type_sizes()
    tensors = []
    for _ in range(n_tensors):
        name = string()
        n_dims = u32()
        if n_dims > gguf_tensor_dims_max:
            raise fail(f"corrupt GGUF (tensor {name!r} has {n_dims} dimensions)")
        shape = tuple(u64() for _ in range(n_dims))
        type_id, offset = u32(), u64()
        n = math.prod(shape)
        if type_id in sizes:
            type_name, block, type_bytes = sizes[type_id]
            if n % block:
                raise fail(f"corrupt GGUF (tensor {name!r} of {n} elements in blocks of {block})")
            n_bytes = n // block * type_bytes
        else:  # a type newer than the gguf package (or a corrupt header): no size to check
            raise fail(f"tensor {name!r} has quantization type {type_id}, which this"
                       " installation does not know (a newer format? upgrade gguf and the"
                       " backend)")
        tensors.append(TensorInfo(name, shape, type_id, type_name, offset, n, n_bytes))

    alignment = int(metadata.get("general.alignment", gguf_alignment_default) or 1)
    data_offset = -(-f.tell() // alignment) * alignment
    for t in tensors:
        end = data_offset + t.offset + t.n_bytes
        if end > size:
            raise fail(f"truncated GGUF: tensor {t.name!r} ends at byte {end}, the file has {size}"
                       " (an interrupted download or copy?)")
    return GGUFInfo(path, version, metadata, tuple(tensors), data_offset, size)


@dataclass(frozen=True, slots=True)
class _Skipped:
    """A metadata array read past without keeping its items (``arrays=False``)."""

    length: int


_sizes_cache: dict[int, tuple[str, int, int]] = {}


def _type_sizes() -> dict[int, tuple[str, int, int]]:
    """{type id: (name, elements per block, bytes per block)} from the gguf package."""
    if not _sizes_cache:
        from gguf.constants import GGML_QUANT_SIZES

        for kind, (block, type_bytes) in GGML_QUANT_SIZES.items():
            _sizes_cache[int(kind)] = (kind.name, block, type_bytes)
    return _sizes_cache

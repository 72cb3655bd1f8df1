"""A model's files: where they are, what they hash to, what shape the model has, its tokenizer.

Shared by the coordinator and the node so that both read a model the same way: the coordinator's
registry records the weights hash and model spec, and a node proves it holds the same weights by
computing the same hash over its own copy. A source is a local directory in the Hugging Face
layout, a GGUF file (llama.cpp's one-file format: weights, hyperparameters, tokenizer and chat
template; ``gguffile.py``), or a directory holding exactly one GGUF file and no config.json; a hub
id (``Qwen/Qwen2.5-0.5B-Instruct``) is fetched into the local hub cache first, which needs a
network that can reach the hub.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import re
import struct
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from sparecycles import gguffile
from sparecycles.errors import InvalidRequest, ModelNotFound
from sparecycles.types import ModelSpec

hash_chunk_bytes = 1 << 20  # stream weights through SHA-256 1 MiB at a time; memory stays flat
hash_cache_name = ".sparecycles-weights-sha256.json"  # written next to the weights when allowed
safetensors_header_bytes_max = 100 * (1 << 20)  # the safetensors format's own cap on its header

# Files fetched for a hub id: the config, the tokenizer and the weights, nothing else.
_hub_patterns = ["*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken"]
_hub_id = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_not_weights = {"training_args.bin", "optimizer.bin", "scheduler.bin", "rng_state.bin"}

# Bytes per parameter by dtype name, as written in config.json (torch_dtype / dtype), by torch
# ("torch.bfloat16") and in safetensors headers ("BF16").
_dtype_bytes = {
    "float64": 8.0, "f64": 8.0, "double": 8.0,
    "float32": 4.0, "f32": 4.0, "float": 4.0, "fp32": 4.0,
    "float16": 2.0, "f16": 2.0, "half": 2.0, "fp16": 2.0,
    "bfloat16": 2.0, "bf16": 2.0,
    "float8_e4m3fn": 1.0, "float8_e5m2": 1.0, "f8_e4m3": 1.0, "f8_e5m2": 1.0,
    "int8": 1.0, "i8": 1.0, "uint8": 1.0, "u8": 1.0,
    "int32": 4.0, "i32": 4.0, "int64": 8.0, "i64": 8.0, "int16": 2.0, "i16": 2.0,
    "bool": 1.0,
}  # fmt: skip


def resolve_source(source: str | Path) -> Path:
    """The local model ``source`` names: a GGUF file, else a directory, else a hub id.

    A directory with no config.json and exactly one ``*.gguf`` resolves to that file (several:
    ``InvalidRequest``, as the choice is the owner's). A hub id is downloaded (config, tokenizer
    and weights only) into the Hugging Face cache, or found there when ``HF_HUB_OFFLINE=1``.
    Without a network that reaches the hub, only models already in that cache resolve; anything
    else raises ``ModelNotFound``.
    """
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf" and not gguffile.is_gguf(path):
            raise InvalidRequest(f"{path}: a model file must be a GGUF file (.gguf)")
        return path
    if path.is_dir():
        if not (path / "config.json").is_file():
            found = sorted(path.glob("*.gguf"))
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                names = ", ".join(p.name for p in found)
                raise InvalidRequest(f"{path} holds several GGUF files ({names}): name one")
        return path
    name = str(source)
    if not _hub_id.match(name):
        raise ModelNotFound(f"model directory {name!r} does not exist")
    return _download_from_hub(name)


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        local = Path(snapshot_download(repo_id, allow_patterns=[*_hub_patterns, "*.safetensors"]))
        if not weight_files(local, missing_ok=True):  # an older repo: PyTorch pickles only
            local = Path(snapshot_download(repo_id, allow_patterns=[*_hub_patterns, "*.bin"]))
    except Exception as exc:  # network, auth, unknown repo: all mean "not available here"
        raise ModelNotFound(
            f"{repo_id!r} is not a local directory and the hub could not provide it "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    return local


def gguf_source(source: str | Path) -> Path | None:
    """The GGUF file ``source`` resolves to, or None for a Hugging Face directory."""
    path = resolve_source(source)
    return path if path.is_file() else None


def weight_files(directory: Path, *, missing_ok: bool = False) -> list[Path]:
    """The files that hold the weights, sorted by name (a GGUF file: itself).

    The shard index (``model.safetensors.index.json``) decides when there is one, so that extra
    copies some repos carry (``consolidated.safetensors``) count neither in the hash nor in the
    parameter count. Without an index: every ``*.safetensors``, else every PyTorch ``*.bin``.
    """
    if directory.is_file():
        return [directory]
    for index_name, pattern in (
        ("model.safetensors.index.json", "*.safetensors"),
        ("pytorch_model.bin.index.json", "*.bin"),
    ):
        index = directory / index_name
        if index.is_file():
            names = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            return sorted((directory / name for name in names), key=lambda p: p.name)
        files = sorted(
            (p for p in directory.glob(pattern) if p.name not in _not_weights),
            key=lambda p: p.name,
        )
        if files:
            return files
    if missing_ok:
        return []
    raise ModelNotFound(f"no weight files (*.safetensors or *.bin) in {directory}")


def weights_sha256(source: str | Path, *, cache_dir: Path | None = None) -> str:
    """SHA-256 of the weight files' bytes concatenated in name order, as lowercase hex.

    The same as ``LC_ALL=C cat $(weight files) | sha256sum``; for a GGUF, ``sha256sum FILE``
    (the whole file: weights, tokenizer and template). A gigabyte takes seconds to hash,
    so the result is remembered in a small JSON file next to the weights (or, where that
    directory is read-only, in ``cache_dir``, by default ``~/.cache/sparecycles``), keyed by each
    file's name, size, mtime and inode: replacing or rewriting a file invalidates it.
    """
    directory = resolve_source(source).resolve()
    files = weight_files(directory)
    key = _files_key(files)
    shared_cache = (cache_dir or _default_cache_dir()) / "weights-sha256.json"
    local_cache = directory / hash_cache_name
    if directory.is_file():  # one cache file per GGUF, as a folder may hold several
        local_cache = directory.parent / f".{directory.name}.sparecycles-sha256.json"
    for cached in (_read_json(local_cache), _read_json(shared_cache).get(str(directory))):
        if not isinstance(cached, dict):
            continue
        sha = cached.get("sha256")
        if isinstance(sha, str) and cached.get("files") == key:
            return sha

    digest = hashlib.sha256()
    buffer = bytearray(hash_chunk_bytes)
    view = memoryview(buffer)
    for path in files:
        with path.open("rb") as f:
            while n := f.readinto(buffer):
                digest.update(view[:n])
    sha = digest.hexdigest()

    entry = {"files": key, "sha256": sha}
    try:
        _write_json_atomic(local_cache, entry)
    except OSError:  # read-only model directory: fall back to the user's cache
        with contextlib.suppress(OSError):
            shared = _read_json(shared_cache)
            shared[str(directory)] = entry
            _write_json_atomic(shared_cache, shared)
    return sha


def _files_key(files: list[Path]) -> list[list[Any]]:
    key = []
    for path in files:
        st = path.stat()
        key.append([path.name, st.st_size, st.st_mtime_ns, st.st_ino])
    return key


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sparecycles"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json_atomic(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: tensor names, dtypes, shapes; no tensor is read."""
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise InvalidRequest(f"{path.name}: not a safetensors file (shorter than 8 bytes)")
        (size,) = struct.unpack("<Q", raw)
        if size > safetensors_header_bytes_max:
            raise InvalidRequest(f"{path.name}: safetensors header of {size} bytes is too large")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def count_params(files: list[Path]) -> tuple[int, str | None]:
    """(number of parameters stored, the dtype holding most of them) over the weight files.

    Tied weights are stored once and counted once, which is what decoding reads.
    """
    n_params = 0
    by_dtype: Counter[str] = Counter()
    for path in files:
        if path.suffix == ".safetensors":
            tensors = [(t["dtype"], t["shape"]) for t in safetensors_header(path).values()]
        else:
            import torch

            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            tensors = [(str(t.dtype), list(t.shape)) for t in state.values()]
        for dtype, shape in tensors:
            n = math.prod(shape)
            n_params += n
            by_dtype[dtype] += n
    top = by_dtype.most_common(1)
    return n_params, (top[0][0] if top else None)


def bytes_per_param(dtype: object) -> float:
    """Bytes one parameter takes in ``dtype`` (a config string, a torch dtype or a header code)."""
    name = str(dtype).lower().removeprefix("torch.")
    if name not in _dtype_bytes:
        raise InvalidRequest(f"unknown dtype {dtype!r}")
    return _dtype_bytes[name]


def _first(config: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return None


def model_spec(
    name: str, source: str | Path, dtype: object | None = None, *, hash_weights: bool = True
) -> ModelSpec:
    """The model spec of ``source`` from its config.json and weight file headers.

    ``dtype`` is the precision the weights are (or will be) held in when loaded; without it, the
    config's ``torch_dtype``/``dtype``, else the dtype most parameters are stored in. The
    weights are not loaded; with ``hash_weights`` they are hashed (see ``weights_sha256``).
    A GGUF's spec comes from its header, its bytes per parameter from its tensors' own types.
    """
    directory = resolve_source(source)
    if directory.is_file():
        return _gguf_spec(name, directory, dtype, hash_weights)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelNotFound(f"no config.json in {directory}")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    text = config.get("text_config") or config  # multimodal wrappers keep the LM's numbers here

    n_layers = _first(text, "num_hidden_layers", "n_layer", "num_layers")
    hidden_size = _first(text, "hidden_size", "n_embd", "d_model")
    n_heads = _first(text, "num_attention_heads", "n_head")
    context_length = _first(
        text, "max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"
    )
    if None in (n_layers, hidden_size, n_heads, context_length):
        raise InvalidRequest(f"{config_path}: missing layers, hidden size, heads or context length")
    n_kv_heads = _first(text, "num_key_value_heads", "n_kv_heads") or n_heads
    head_dim = _first(text, "head_dim") or hidden_size // n_heads

    files = weight_files(directory)
    n_params, stored_dtype = count_params(files)
    dtype = dtype if dtype not in (None, "auto") else None
    chosen = dtype or _first(text, "torch_dtype", "dtype") or _first(config, "torch_dtype", "dtype")
    return ModelSpec(
        name=name,
        n_params=n_params,
        bytes_per_param=bytes_per_param(chosen or stored_dtype or "float32"),
        n_layers=int(n_layers),
        hidden_size=int(hidden_size),
        n_kv_heads=int(n_kv_heads),
        head_dim=int(head_dim),
        context_length=int(context_length),
        weights_sha256=weights_sha256(directory) if hash_weights else "",
    )


def _gguf_spec(name: str, path: Path, dtype: object | None, hash_weights: bool) -> ModelSpec:
    info = gguffile.read_gguf(path, arrays=False)
    n_layers = info.arch_value("block_count")
    hidden_size = info.arch_value("embedding_length")
    n_heads = info.arch_value("attention.head_count")
    context_length = info.arch_value("context_length")
    if None in (n_layers, hidden_size, n_heads, context_length):
        raise gguffile.GGUFError(
            f"{path.name}: the header lacks {info.architecture}.block_count, embedding_length,"
            " attention.head_count or context_length")
    n_kv_heads = info.arch_value("attention.head_count_kv") or n_heads
    if isinstance(n_kv_heads, list):  # per layer in some architectures: the most any layer holds
        n_kv_heads = max(n_kv_heads)
    if isinstance(n_heads, list):
        n_heads = max(n_heads)
    head_dim = info.arch_value("attention.key_length") or hidden_size // n_heads
    dtype = dtype if dtype not in (None, "auto") else None
    return ModelSpec(
        name=name,
        n_params=info.n_params,
        # as stored (llama.cpp computes on the quantized blocks), unless loaded into another dtype
        bytes_per_param=bytes_per_param(dtype) if dtype else info.bytes_per_param,
        n_layers=int(n_layers),
        hidden_size=int(hidden_size),
        n_kv_heads=int(n_kv_heads),
        head_dim=int(head_dim),
        context_length=int(context_length),
        weights_sha256=weights_sha256(path) if hash_weights else "",
        # as llama.cpp reads them; a GGUF loaded into another dtype (transformers) has none
        bytes_by_type=() if dtype else tuple(sorted(info.decode_bytes_by_type().items())),
    )


def load_tokenizer(source: str | Path):  # -> transformers.PreTrainedTokenizerBase
    """The model's tokenizer (AutoTokenizer; for a GGUF, built from the file's own vocabulary,
    merges and chat template). A hub id works only where the hub is reachable or the model is
    already in the local hub cache (see ``resolve_source``)."""
    path = resolve_source(source)
    if path.is_file():
        return gguf_tokenizer(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def gguf_tokenizer(path: Path):  # -> transformers.PreTrainedTokenizerFast
    """A fast tokenizer from a GGUF's metadata, through transformers' own GGUF converter.

    Not ``AutoTokenizer.from_pretrained(gguf_file=...)``: that path reads the file with a reader
    that imports torch and took 29 s here; this reads the header with ``gguffile`` and hands the
    same fields to the same converter, so the coordinator needs no torch. Its token ids equal
    llama.cpp's own tokenizer's on the test prompts (tests/unit/test_gguf.py).
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        _SPECIAL_TOKENS,
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    info = gguffile.read_gguf(path)
    meta = info.metadata
    grouped = {
        group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items()
                if f"tokenizer.{key}" in meta}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    fields, config = grouped["tokenizer"], grouped["tokenizer_config"]
    if "tokens" not in fields:
        raise gguffile.GGUFError(f"{path.name}: no tokenizer in the file (tokenizer.ggml.tokens)")
    if fields.get("tokenizer_type") == "llama":  # as transformers' own GGUF loading does
        config.setdefault("add_bos_token", True)
    for special, key in _SPECIAL_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        config[special] = fields["tokens"][token_id] if token_id is not None else None
    try:
        backend, extra = convert_gguf_tokenizer(info.architecture, fields)
    except Exception as exc:  # the converter has no builder for this tokenizer
        raise gguffile.GGUFError(
            f"{path.name}: its tokenizer ({fields.get('tokenizer_type')}) cannot be built here:"
            f" {type(exc).__name__}: {exc}") from exc
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)
    tokenizer.name_or_path = path.name
    return tokenizer


def render_chat(tokenizer: Any, messages: list[dict[str, Any]],
                tools: list[dict[str, Any]] | None = None, *,
                tools_must_show: bool = False) -> list[int]:
    """Token ids of ``messages`` through the model's chat template, opening the assistant's turn.

    The template is rendered to text and then tokenized without adding special tokens: templates
    write their own BOS where the model wants one, and adding another would double it. ``tools``
    (OpenAI's tool definitions) go to the template, which renders them in the model's own format.
    With ``tools_must_show`` (``tool_choice: auto``: the model decides from what it is shown), a
    template that renders the same text without them (it has no place for tools) is a 400:
    the tools would be silently ignored.
    """
    if not getattr(tokenizer, "chat_template", None):
        source = getattr(tokenizer, "name_or_path", "") or "this model"
        raise InvalidRequest(
            f"{Path(str(source)).name} has no chat template (a GGUF keeps it in"
            " tokenizer.chat_template); use /v1/completions with a plain prompt instead",
            param="messages",
        )
    import jinja2

    try:
        text = tokenizer.apply_chat_template(messages, tools=tools or None,
                                             add_generation_prompt=True, tokenize=False)
        if tools and tools_must_show and text == tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False):
            source = getattr(tokenizer, "name_or_path", "") or "this model"
            raise InvalidRequest(
                f"{Path(str(source)).name}'s chat template does not show tools to the model, so "
                "with tool_choice 'auto' they would be ignored: name a function in tool_choice, "
                "or use 'required' (both constrain the output to the tools' schemas), or a model "
                "whose template renders tools", param="tools", code="tools_not_supported")
    except (jinja2.TemplateError, KeyError, TypeError, ValueError) as exc:
        message = f"the chat template rejected these messages: {exc}"
        raise InvalidRequest(message, param="messages") from exc
    return encode_text(tokenizer, text, add_special_tokens=False)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, read back: the character each byte is written as in a
    byte-level BPE vocabulary (printable bytes as themselves, the rest from U+0100 on)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_DECODER = _byte_decoder()
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The raw bytes of one token (OpenAI's ``bytes`` of a log-probability): a token that holds
    part of a multi-byte character decodes alone to U+FFFD, and its bytes are what lets a client
    put the text back together. Byte-level BPE (GPT-2's, Llama 3's, Qwen's, SmolLM2's): its
    vocabulary's characters read back as bytes; SentencePiece's byte tokens (``<0xE2>``): that
    byte; any other token (added and special ones included): its text in UTF-8."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    byte_level, added = _vocabulary_kind(tokenizer)
    if isinstance(piece, str) and int(token_id) not in added:
        if byte_level:
            with contextlib.suppress(KeyError):
                return bytes(_BYTE_DECODER[ch] for ch in piece)
        if (m := _BYTE_TOKEN.fullmatch(piece)) is not None:
            return bytes([int(m.group(1), 16)])
    return str(tokenizer.decode([int(token_id)], skip_special_tokens=False)).encode("utf-8")


@functools.lru_cache(maxsize=32)
def _vocabulary_kind(tokenizer: Any) -> tuple[bool, frozenset[int]]:
    """(byte-level BPE, the added tokens' ids) of a tokenizer, read once: transformers builds
    ``added_tokens_decoder`` anew at every read (~76 us with Llama 3's 256 added tokens), and
    ``token_bytes`` runs for every token and top log-probability of an answer."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    added = frozenset(int(i) for i in getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return decoder is not None and type(decoder).__name__ == "ByteLevel", added


def render_completion(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a plain prompt, with the special tokens the tokenizer adds (Llama's BOS)."""
    return encode_text(tokenizer, prompt, add_special_tokens=True)


def encode_text(tokenizer: Any, text: str, *, add_special_tokens: bool) -> list[int]:
    """``tokenizer.encode(text, add_special_tokens=...)``. A fast tokenizer's Rust backend is
    called directly when transformers would call it as it stands (no truncation or padding set
    on it, special tokens split or not as the tokenizer says): the same ids without
    transformers' Python layer around the call (~34 us against ~20 us for a short chat prompt
    here, once a request; docs/benchmarks.md, issue 19, fourth pass). Anything else goes
    through ``encode``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (backend is not None and backend.truncation is None and backend.padding is None
            and backend.encode_special_tokens
            == bool(getattr(tokenizer, "split_special_tokens", False))):
        ids: list[int] = backend.encode(text, add_special_tokens=add_special_tokens).ids
        return ids
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


# ---- a contiguous range of a model's layers (chains: docs/architecture.md) ------------------

_layer_name = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_embed_suffixes = ("embed_tokens.weight", "wte.weight")
_head_names = ("lm_head.weight",)
_final_norm_suffixes = ("model.norm.weight", "model.norm.bias")


def _tied(directory: Path) -> bool:
    config = _read_json(directory / "config.json")
    text = config.get("text_config") or config
    return bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))


def stage_tensors(source: str | Path, first: int, end: int, n_layers: int
                  ) -> list[tuple[Path, str, dict[str, Any]]]:
    """(file, tensor name, safetensors header entry) of every tensor a stage holding layers
    ``[first, end)`` of an ``n_layers`` model needs, sorted by name: its layers; the embeddings
    with the first stage; the final norm and the LM head with the last (the embeddings too when
    the head is tied to them). Safetensors files only; no tensor is read."""
    if not 0 <= first < end <= n_layers:
        raise InvalidRequest(f"layers {first}:{end} are not a range of the model's {n_layers}")
    directory = resolve_source(source)
    tied = _tied(directory)
    out = []
    for path in weight_files(directory):
        if path.suffix != ".safetensors":
            raise InvalidRequest(f"{path.name}: layer ranges need safetensors weights")
        for name, entry in safetensors_header(path).items():
            m = _layer_name.search(name)
            if m is not None:
                keep = first <= int(m.group(1)) < end
            elif name.endswith(_embed_suffixes):
                keep = first == 0 or (tied and end == n_layers)
            elif name in _head_names or name in _final_norm_suffixes:
                keep = end == n_layers
            else:  # a tensor of no layer (e.g. rotary buffers saved by old exporters)
                keep = False
            if keep:
                out.append((path, name, entry))
    return sorted(out, key=lambda t: t[1])


def stage_weight_bytes(source: str | Path, first: int, end: int, n_layers: int) -> int:
    """Bytes of the tensors a stage of layers ``[first, end)`` holds, as stored."""
    return sum(e["data_offsets"][1] - e["data_offsets"][0]
               for _, _, e in stage_tensors(source, first, end, n_layers))


def layers_sha256(source: str | Path, first: int, end: int, n_layers: int) -> str:
    """SHA-256 over what a stage of layers ``[first, end)`` holds: for each of its tensors in
    name order, the name, dtype and shape as one line of JSON, then the tensor's bytes. The node
    declares it at hello and the coordinator computes it from the registry's copy; a whole-model
    range hashes to the same value on both sides only if every one of those bytes is equal."""
    h = hashlib.sha256()
    for path, name, entry in stage_tensors(source, first, end, n_layers):
        h.update(json.dumps([name, entry["dtype"], entry["shape"]]).encode() + b"\n")
        start, stop = entry["data_offsets"]
        with path.open("rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8))
            f.seek(8 + header_size + start)
            left = stop - start
            while left > 0:
                chunk = f.read(min(hash_chunk_bytes, left))
                if not chunk:
                    raise InvalidRequest(f"{path.name}: truncated tensor {name}")
                h.update(chunk)
                left -= len(chunk)
    return h.hexdigest()

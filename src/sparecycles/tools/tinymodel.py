"""Build small Llama-architecture models offline, in the standard Hugging Face layout.

There is no model hub on a developer's machine or in CI, yet the node's engine, the coordinator's
tokenizer handling and the performance model all need a real model to run against. This module
makes one from the English corpus shipped in the package (``data/corpus.txt``):

- ``tiny``: a byte-level BPE tokenizer trained on the corpus and a ~1.1M parameter Llama trained
  for 160 AdamW steps on the corpus formatted as short chat exchanges. It writes English-looking
  words and usually ends its answer with ``<|im_end|>`` (it barely reads the question). Built in
  about 20 s of one CPU core.
- ``medium``: the same tokenizer and a ~290M parameter Llama, randomly initialised and untrained:
  the right *shape* and size for benchmarking decode speed, not for reading its output.

The files (config.json, generation_config.json, model.safetensors, tokenizer.json,
tokenizer_config.json with a ``chat_template``, special_tokens_map.json) load with
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``.

A build is deterministic from its seed: the same seed gives a byte-identical ``model.safetensors``
on one machine and software stack (training runs on one thread, so the core count does not
matter). Floating-point kernels differ between CPU instruction sets and library versions, so the
bytes are not promised to match across those.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from sparecycles.errors import InvalidRequest

ProgressCallback = Callable[[int, int, float], None]  # (step, total steps, loss)

BOS, EOS, IM_START, IM_END, PAD = "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, IM_START, IM_END, PAD)  # trained first, so their ids are 0..4

# ChatML: every message is <|im_start|>role\ncontent<|im_end|>\n; the generation prompt opens the
# assistant's turn, and the model ends it with <|im_end|> (its eos token). With ``tools``, Qwen
# 2.5's (Hermes) tool format: the tools' JSON in a system message, assistant calls as
# <tool_call>{"name", "arguments"}</tool_call>, tool results as <tool_response> in a user turn.
# Messages without tools render exactly as before, so the trained model is unchanged.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{ '<|im_start|>system\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{%- endif %}"
    "{{ '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}"
    "{%- for tool in tools %}{{ '\n' + (tool | tojson) }}{%- endfor %}"
    "{{ '\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": "
    "<function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if tools and loop.first and message['role'] == 'system' %}"
    "{%- elif message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{{ '<|im_start|>assistant\n' + (message['content'] or '') }}"
    "{%- for call in message['tool_calls'] %}"
    "{{ '<tool_call>\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' }}"
    "{%- if call['function']['arguments'] is string %}{{ call['function']['arguments'] }}"
    "{%- else %}{{ call['function']['arguments'] | tojson }}{%- endif %}"
    "{{ '}\n</tool_call>' }}"
    "{%- endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\n<tool_response>\n' + message['content'] + "
    "'\n</tool_response><|im_end|>\n' }}"
    "{%- else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)

# The BPE trainer stops before this when no pair occurs twice; on the shipped corpus (~68 KB) it
# ends near 2,800 tokens, which keeps the embedding small next to the layers.
tokenizer_vocab_size_max = 3072
tokenizer_pair_count_min = 2
embedding_rows_multiple = 64  # round the vocabulary up so matrix shapes stay kernel-friendly

# Training runs on one thread, always. The result then does not depend on the machine's core count
# (reductions split across threads add in a different order and change the last bits), and a
# build stays fast on a busy machine: two OpenMP threads on two cores shared with another process
# spin at every barrier and ran 4x slower than one thread in our measurements.
train_threads = 1
train_warmup_steps = 20
train_grad_norm_max = 1.0
exchange_sentences_max = 3  # an assistant turn made from prose holds at most this many sentences


@dataclass(frozen=True, slots=True)
class Preset:
    """The shape of one model size and how long to train it."""

    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    context_length: int
    train_steps: int
    train_batch_size: int = 8
    train_window_tokens: int = 64  # an exchange is ~40 tokens, so a window sees one or two
    learning_rate: float = 3e-3


PRESETS: dict[str, Preset] = {
    # ~1.1M parameters. A training step (8 x 64 tokens) costs ~0.1 s of one core, compute bound,
    # so 160 steps (~80k tokens, ~4 passes over the 21k-token corpus) keep a build near 20 s.
    "tiny": Preset(
        hidden_size=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        intermediate_size=384,
        context_length=2048,
        train_steps=160,
        learning_rate=4e-3,
    ),
    # ~290M parameters (~1.2 GB in fp32): big enough that decoding is bound by memory bandwidth,
    # which is what the performance-model benchmark measures. Never trained.
    "medium": Preset(
        hidden_size=1024,
        n_layers=24,
        n_heads=16,
        n_kv_heads=8,
        intermediate_size=2816,
        context_length=4096,
        train_steps=0,
    ),
}


def corpus_text() -> str:
    """The English text shipped in the package (see data/CORPUS.md for its source and licence)."""
    return resources.files("sparecycles").joinpath("data/corpus.txt").read_text(encoding="utf-8")


def train_tokenizer(text: str, vocab_size_max: int = tokenizer_vocab_size_max) -> Tokenizer:
    """A byte-level BPE (the GPT-2 / Llama 3 / Qwen kind): any UTF-8 text round-trips exactly."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size_max,
        min_frequency=tokenizer_pair_count_min,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([text], trainer=trainer)
    return tokenizer


def chat_exchanges(text: str) -> list[tuple[str, str]]:
    """(user, assistant) pairs from the corpus: its Q:/A: pairs, and prose cut into turns.

    Prose becomes "say one sentence, get the next few": it teaches the model the shape of a
    turn and when to end it, which is all a test model needs.
    """
    exchanges: list[tuple[str, str]] = []
    sentences: list[str] = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.strip().splitlines() if line.strip()]
        if not lines or lines[0].startswith("=="):
            exchanges.extend(_prose_exchanges(sentences))
            sentences = []
            lines = lines[1:]
        if len(lines) == 2 and lines[0].startswith("Q: ") and lines[1].startswith("A: "):
            exchanges.append((lines[0][3:], lines[1][3:]))
        elif lines:
            sentences.extend(_sentence_end.split(" ".join(lines)))
    exchanges.extend(_prose_exchanges(sentences))
    return exchanges


_sentence_end = re.compile(r"(?<!\bMr\.)(?<!\bMrs\.)(?<!\bDr\.)(?<=[.!?\"])\s+")


def _prose_exchanges(sentences: list[str]) -> Iterator[tuple[str, str]]:
    step = 1 + exchange_sentences_max
    for i in range(0, len(sentences) - 1, step):
        yield sentences[i], " ".join(sentences[i + 1 : i + step])


def render_exchange(user: str, assistant: str) -> str:
    """One exchange exactly as the chat template renders it, plus the assistant's closing."""
    return f"{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n{assistant}{IM_END}\n"


def write_tokenizer_files(path: Path, tokenizer: Tokenizer, context_length: int) -> None:
    """tokenizer.json plus the two small JSON files that tell transformers which token is which.

    Written by hand rather than by ``save_pretrained`` so that the ``chat_template`` sits inside
    tokenizer_config.json, where both transformers 4 and 5 read it.
    """
    tokenizer.save(str(path / "tokenizer.json"))
    special = {
        "bos_token": BOS,
        "eos_token": IM_END,
        "pad_token": PAD,
        "additional_special_tokens": [EOS, IM_START],
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(path / "tokenizer_config.json", config)
    _write_json(path / "special_tokens_map.json", special)


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _llama_config(preset: Preset, tokenizer: Tokenizer):  # -> transformers.LlamaConfig
    from transformers import LlamaConfig

    n_tokens = tokenizer.get_vocab_size()
    vocab_size = math.ceil(n_tokens / embedding_rows_multiple) * embedding_rows_multiple
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=preset.hidden_size,
        num_hidden_layers=preset.n_layers,
        num_attention_heads=preset.n_heads,
        num_key_value_heads=preset.n_kv_heads,
        intermediate_size=preset.intermediate_size,
        max_position_embeddings=preset.context_length,
        tie_word_embeddings=True,
        bos_token_id=ids[BOS],
        eos_token_id=ids[IM_END],
        pad_token_id=ids[PAD],
        dtype="float32",
    )


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _no_transformers_progress_bars() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _train(
    model: torch.nn.Module,
    token_ids: list[int],
    preset: Preset,
    *,
    steps: int,
    seed: int,
    progress: ProgressCallback | None,
) -> None:
    """AdamW on random windows of the token stream; warmup, then cosine decay to zero."""
    window = preset.train_window_tokens
    if len(token_ids) <= window:
        raise InvalidRequest(f"training text has {len(token_ids)} tokens; need > {window}")
    data = torch.tensor(token_ids, dtype=torch.long)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=preset.learning_rate, betas=(0.9, 0.95), weight_decay=0.0
    )
    model.train()
    for step in range(1, steps + 1):
        lr_scale = min(1.0, step / train_warmup_steps)
        lr_scale *= 0.5 * (1 + math.cos(math.pi * (step - 1) / steps))
        for group in optimizer.param_groups:
            group["lr"] = preset.learning_rate * lr_scale
        starts = [rng.randrange(len(token_ids) - window) for _ in range(preset.train_batch_size)]
        batch = torch.stack([data[s : s + window] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_grad_norm_max)
        optimizer.step()
        if progress is not None:
            progress(step, steps, float(loss.detach()))
    model.eval()


def build_tiny_model(
    path: str | Path,
    *,
    preset: str = "tiny",
    seed: int = 0,
    train_steps: int | None = None,
    progress: ProgressCallback | None = None,
) -> Path:
    """Write a model of ``preset`` ("tiny" or "medium") into the directory ``path``; return it.

    ``train_steps`` overrides the preset's (0 leaves the weights at their random init);
    ``progress(step, total, loss)`` is called after every training step.
    """
    from transformers import GenerationConfig, LlamaForCausalLM

    if preset not in PRESETS:
        raise InvalidRequest(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    shape = PRESETS[preset]
    steps = shape.train_steps if train_steps is None else train_steps
    if steps < 0:
        raise InvalidRequest(f"train_steps must be >= 0, got {steps}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)

    text = corpus_text()
    tokenizer = train_tokenizer(text)
    config = _llama_config(shape, tokenizer)
    with _torch_threads(train_threads):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        if steps:
            exchanges = chat_exchanges(text)
            random.Random(seed).shuffle(exchanges)
            stream = "".join(render_exchange(user, assistant) for user, assistant in exchanges)
            token_ids = tokenizer.encode(stream).ids
            _train(model, token_ids, shape, steps=steps, seed=seed, progress=progress)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[tokenizer.token_to_id(IM_END), tokenizer.token_to_id(EOS)],
        pad_token_id=config.pad_token_id,
    )
    with _no_transformers_progress_bars():  # the caller draws its own (see ``progress``)
        model.save_pretrained(out, safe_serialization=True)
    write_tokenizer_files(out, tokenizer, shape.context_length)
    return out

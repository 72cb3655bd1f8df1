"""tinymodel: the offline test model loads with the Auto classes, is deterministic, and talks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sparecycles.errors import InvalidRequest
from sparecycles.tools import tinymodel


def test_loads_with_the_auto_classes(tiny_model_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    config = model.config
    assert config.model_type == "llama"
    assert (config.hidden_size, config.num_hidden_layers) == (128, 4)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.max_position_embeddings == 2048
    assert model.dtype == torch.float32
    assert 2000 <= len(tokenizer) <= config.vocab_size <= 4096
    assert tokenizer.eos_token == "<|im_end|>"
    eos_ids = model.generation_config.eos_token_id
    assert set(eos_ids) == {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|eos|>")}
    tokenizer_config = json.loads((tiny_model_path / "tokenizer_config.json").read_text())
    assert "chat_template" in tokenizer_config
    assert (tiny_model_path / "special_tokens_map.json").is_file()


@pytest.mark.parametrize(
    "text",
    ["Call me Ishmael.", "  two  spaces,\ttabs\nand lines ", "Café, naïve, 東京, 🙂", ""],
)
def test_tokenizer_round_trips_text(tiny_model_path: Path, text: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_special_tokens_are_single_tokens(tiny_model_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    for token in tinymodel.SPECIAL_TOKENS:
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1


def test_same_seed_gives_identical_weights(tmp_path: Path) -> None:
    # Two training steps exercise the whole path (init, data order, AdamW) in a few seconds.
    seen: list[tuple[int, int, float]] = []
    a = tinymodel.build_tiny_model(
        tmp_path / "a", seed=3, train_steps=2, progress=lambda s, t, loss: seen.append((s, t, loss))
    )
    b = tinymodel.build_tiny_model(tmp_path / "b", seed=3, train_steps=2)
    c = tinymodel.build_tiny_model(tmp_path / "c", seed=4, train_steps=0)
    weights = [(p / "model.safetensors").read_bytes() for p in (a, b, c)]
    assert weights[0] == weights[1]
    assert weights[0] != weights[2]
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()
    assert [(s, t) for s, t, _ in seen] == [(1, 2), (2, 2)]
    assert all(loss > 0 for _, _, loss in seen)


def test_trained_model_writes_words_and_ends_its_turn(tiny_model_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ended = 0
    words: list[str] = []
    for question in ("What is the capital of France?", "Who is Alice?"):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=40, do_sample=False)[0, ids.shape[1] :]
        ended += int(im_end in out.tolist())
        words += tokenizer.decode(out, skip_special_tokens=True).lower().split()
    assert ended >= 1
    common = {"the", "of", "a", "and", "is", "to", "in"}
    assert sum(w.strip(".,;!?\"'") in common for w in words) >= 3


def test_chat_exchanges_pair_questions_and_cut_prose() -> None:
    text = (
        "== A heading ==\n\nIt rained. Mr. Smith stayed in! He read a book. It was long.\n\n"
        "Q: What is snow?\nA: Frozen rain.\n"
    )
    exchanges = tinymodel.chat_exchanges(text)
    assert ("What is snow?", "Frozen rain.") in exchanges
    assert ("It rained.", "Mr. Smith stayed in! He read a book. It was long.") in exchanges
    rendered = tinymodel.render_exchange("hi", "hello")
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"


def test_corpus_is_shipped_and_sized_for_a_quick_build() -> None:
    assert 60_000 <= len(tinymodel.corpus_text().encode()) <= 150_000


def test_medium_preset_has_a_few_hundred_million_parameters() -> None:
    from transformers import LlamaForCausalLM

    tokenizer = tinymodel.train_tokenizer(tinymodel.corpus_text())
    config = tinymodel._llama_config(tinymodel.PRESETS["medium"], tokenizer)
    with torch.device("meta"):  # shapes only: nothing is allocated
        n_params = LlamaForCausalLM(config).num_parameters()
    assert 250e6 <= n_params <= 350e6


def test_unknown_preset_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="unknown preset"):
        tinymodel.build_tiny_model(tmp_path, preset="huge")

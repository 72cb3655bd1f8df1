"""modelfiles: the weights hash, the model spec, and prompt rendering, on local files only."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sparecycles import modelfiles
from sparecycles.errors import InvalidRequest, ModelNotFound

Shards = dict[str, dict[str, torch.Tensor]]  # file name -> tensors


def _write_model(directory: Path, config: dict, tensors: Shards) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    for filename, state in tensors.items():
        save_file(state, str(directory / filename))
    return directory


@pytest.fixture()
def two_shards(tmp_path: Path) -> Path:
    config = {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 8,
        "max_position_embeddings": 512,
        "torch_dtype": "bfloat16",
    }
    return _write_model(
        tmp_path / "model",
        config,
        {
            "model-00002-of-00002.safetensors": {"b": torch.ones(3, 5)},
            "model-00001-of-00002.safetensors": {"a": torch.zeros(7), "c": torch.zeros(2, 2)},
        },
    )


def test_hash_is_sha256_of_weight_files_concatenated_in_name_order(two_shards: Path) -> None:
    files = sorted(two_shards.glob("*.safetensors"))
    expected = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()
    assert modelfiles.weights_sha256(two_shards) == expected


def test_hash_is_remembered_until_a_weight_file_changes(two_shards: Path) -> None:
    real = modelfiles.weights_sha256(two_shards)
    cache = two_shards / modelfiles.hash_cache_name
    entry = json.loads(cache.read_text())
    entry["sha256"] = "remembered"
    cache.write_text(json.dumps(entry))
    assert modelfiles.weights_sha256(two_shards) == "remembered"  # not hashed again

    shard = two_shards / "model-00002-of-00002.safetensors"
    save_file({"b": torch.full((3, 5), 2.0)}, str(shard))  # same size, different bytes
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    changed = modelfiles.weights_sha256(two_shards)
    assert changed not in ("remembered", real)


def test_hash_falls_back_to_the_cache_dir_when_the_model_dir_is_read_only(
    two_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write = modelfiles._write_json_atomic

    def refuse_model_dir(path: Path, obj: object) -> None:
        if path.parent == two_shards.resolve():
            raise PermissionError(path)
        write(path, obj)

    monkeypatch.setattr(modelfiles, "_write_json_atomic", refuse_model_dir)
    cache_dir = tmp_path / "cache"
    sha = modelfiles.weights_sha256(two_shards, cache_dir=cache_dir)
    shared = json.loads((cache_dir / "weights-sha256.json").read_text())
    assert shared[str(two_shards.resolve())]["sha256"] == sha


def test_weight_files_follow_the_shard_index(tmp_path: Path) -> None:
    directory = _write_model(
        tmp_path / "m",
        {},
        {
            "model-00001-of-00001.safetensors": {"w": torch.zeros(4)},
            "consolidated.safetensors": {"w": torch.zeros(4)},  # a second copy some repos carry
        },
    )
    index = {"weight_map": {"w": "model-00001-of-00001.safetensors"}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    assert [p.name for p in modelfiles.weight_files(directory)] == [
        "model-00001-of-00001.safetensors"
    ]


def test_spec_counts_parameters_from_headers_and_reads_the_config(two_shards: Path) -> None:
    spec = modelfiles.model_spec("m", two_shards)
    assert spec.n_params == 7 + 4 + 15
    assert spec.bytes_per_param == 2.0  # bfloat16 from the config, although stored as fp32
    assert (spec.n_layers, spec.hidden_size, spec.context_length) == (2, 64, 512)
    assert spec.n_kv_heads == 8  # no num_key_value_heads: plain multi-head attention
    assert spec.head_dim == 8  # no head_dim: hidden_size / heads
    assert spec.weights_sha256 == modelfiles.weights_sha256(two_shards)
    assert modelfiles.model_spec("m", two_shards, dtype=torch.float32).bytes_per_param == 4.0
    assert modelfiles.model_spec("m", two_shards, hash_weights=False).weights_sha256 == ""


def test_spec_of_the_tiny_model_matches_its_config(tiny_model_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    spec = modelfiles.model_spec("tiny", tiny_model_path)
    config = json.loads((tiny_model_path / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert spec.n_params == sum(p.numel() for p in model.parameters())
    assert spec.n_layers == config["num_hidden_layers"]
    assert spec.hidden_size == config["hidden_size"]
    assert spec.n_kv_heads == config["num_key_value_heads"]
    assert spec.head_dim == config["hidden_size"] // config["num_attention_heads"]
    assert spec.context_length == config["max_position_embeddings"]
    assert spec.bytes_per_param == 4.0
    assert len(spec.weights_sha256) == 64


def test_missing_directory_is_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound):
        modelfiles.resolve_source(tmp_path / "absent")


def test_unreachable_hub_is_model_not_found(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def offline(*args: object, **kwargs: object) -> str:
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelNotFound, match="hub could not provide it"):
        modelfiles.resolve_source("Qwen/Qwen2.5-0.5B-Instruct")


def test_render_chat_applies_the_template_and_opens_the_assistant_turn(
    tiny_model_path: Path,
) -> None:
    tokenizer = modelfiles.load_tokenizer(tiny_model_path)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    ids = modelfiles.render_chat(tokenizer, messages)
    assert tokenizer.decode(ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # one token, not its text


def test_render_chat_without_a_template_is_an_invalid_request(tiny_model_path: Path) -> None:
    tokenizer = modelfiles.load_tokenizer(tiny_model_path)
    tokenizer.chat_template = None
    with pytest.raises(InvalidRequest, match="no chat template"):
        modelfiles.render_chat(tokenizer, [{"role": "user", "content": "hi"}])


def test_render_completion_round_trips(tiny_model_path: Path) -> None:
    tokenizer = modelfiles.load_tokenizer(tiny_model_path)
    prompt = "It was the best of times, it was the worst of times"
    assert tokenizer.decode(modelfiles.render_completion(tokenizer, prompt)) == prompt


@pytest.mark.parametrize("text", [
    "It was the best of times", "", "  two  spaces ", "<|im_start|>user\nhi<|im_end|>\n",
    "Ünïcödé café — 日本語 <|eos|> and <|im_end|>", "\n\n\t x",
])
@pytest.mark.parametrize("special", [False, True])
def test_the_direct_encoder_gives_what_encode_gives(tiny_model_path: Path, text: str,
                                                    special: bool) -> None:
    """The Rust backend called directly gives transformers' ids; with truncation set on the
    backend, or special tokens to split, the call goes through transformers (the same ids)."""
    tokenizer = modelfiles.load_tokenizer(tiny_model_path)
    want = list(tokenizer.encode(text, add_special_tokens=special))
    assert modelfiles.encode_text(tokenizer, text, add_special_tokens=special) == want
    backend = tokenizer.backend_tokenizer
    calls = []
    real = type(tokenizer).encode

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    type(tokenizer).encode = counted  # type: ignore[method-assign]
    try:
        assert modelfiles.encode_text(tokenizer, text, add_special_tokens=special) == want
        assert not calls  # the direct path
        backend.enable_truncation(max_length=3)
        assert modelfiles.encode_text(tokenizer, text, add_special_tokens=special) == want
        assert calls  # through transformers, which turns the truncation off for its call
    finally:
        type(tokenizer).encode = real  # type: ignore[method-assign]
        backend.no_truncation()
    tokenizer.split_special_tokens = True
    split = list(tokenizer.encode(text, add_special_tokens=special))
    tokenizer.split_special_tokens = False
    backend.encode_special_tokens = False
    tokenizer.split_special_tokens = True
    assert modelfiles.encode_text(tokenizer, text, add_special_tokens=special) == split


def test_bytes_per_param_reads_every_spelling() -> None:
    assert modelfiles.bytes_per_param("bfloat16") == 2.0
    assert modelfiles.bytes_per_param(torch.float16) == 2.0
    assert modelfiles.bytes_per_param("F32") == 4.0
    with pytest.raises(InvalidRequest):
        modelfiles.bytes_per_param("float3")


def test_tools_a_template_cannot_show_are_refused_for_an_auto_choice(tiny_model_path: Path) -> None:
    """With tool_choice auto the model decides from what it is shown: a template with no place
    for tools (SmolLM2's) rendered them away, and the request was answered as if none were
    sent. Named and required choices constrain the output instead, and may go on."""
    tokenizer = modelfiles.load_tokenizer(tiny_model_path)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    shown = modelfiles.render_chat(tokenizer, messages, tools, tools_must_show=True)
    assert len(shown) > len(modelfiles.render_chat(tokenizer, messages))  # this one shows them
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                               "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                               "<|im_start|>assistant\n")
    with pytest.raises(InvalidRequest) as caught:
        modelfiles.render_chat(tokenizer, messages, tools, tools_must_show=True)
    assert (caught.value.param, caught.value.code) == ("tools", "tools_not_supported")
    assert modelfiles.render_chat(tokenizer, messages, tools) == modelfiles.render_chat(
        tokenizer, messages)  # not required to show: the same prompt


def test_token_bytes_put_the_text_back_together(tiny_model_path: Path) -> None:
    """A token that holds part of a multi-byte character decodes alone to U+FFFD; its bytes
    (OpenAI's logprobs ``bytes``) are the real ones, so the tokens' bytes make the text."""
    tokenizer = modelfiles.load_tokenizer(tiny_model_path)
    text = "🌟 héllo, 世界 🌟<|im_end|>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert "\ufffd" in [tokenizer.decode([i]) for i in ids]  # some token is part of a character
    assert b"".join(modelfiles.token_bytes(tokenizer, i) for i in ids) == text.encode()

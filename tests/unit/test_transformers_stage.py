"""Stages of the tiny model in one process: split greedy output equals the unsplit model's, a
stage holds only its own tensors, bad inputs are refused, the range hash tells ranges apart, and
steps of several sequences run in one pass give what each gives run alone."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from sparecycles import modelfiles, protocol
from sparecycles.errors import InvalidRequest
from sparecycles.node.backends.transformers_stage import StageEngine, StageStep
from sparecycles.node.stage_worker import StageWorker, from_activation, to_activation
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


# ---- batching: several chains' steps in one forward pass ---------------------------------------

def _steps_input(stage: StageEngine, n: int, gen: torch.Generator) -> dict:
    if stage.is_first:
        return {"token_ids": torch.randint(5, 200, (n,), generator=gen).tolist()}
    return {"hidden": torch.randn(n, stage.spec.hidden_size, generator=gen)}


def _same(a, b) -> None:
    """Two outcomes of one step: the same token, or activations within fp32 tolerance."""
    assert a.token == b.token and a.eos == b.eos
    if a.hidden is None:
        assert b.hidden is None
    else:
        torch.testing.assert_close(b.hidden, a.hidden, rtol=1e-4, atol=1e-5)


# (sequence, positions) steps arriving together, round by round; "-x" releases x. Sequences of
# different lengths join (prefill beside decode steps), leave, step alone, and step in
# different company, so groups form, split and merge.
SCHEDULE = [
    [("a", 7), ("b", 3)],
    [("a", 1), ("b", 1)],
    [("a", 1), ("b", 1)],
    [("a", 1), ("c", 12), ("b", 1)],
    [("c", 1), ("a", 1), ("b", 1)],
    [("a", 1), ("b", 1), ("c", 1)],
    ["-b", ("a", 1), ("c", 1)],
    [("a", 1)],
    [("c", 1), ("d", 5)],
    [("a", 1), ("c", 1), ("d", 1)],
    [("d", 1), ("a", 1)],
    [("c", 1), ("a", 1), ("d", 1)],
]


@pytest.mark.parametrize("bounds", [(0, 1), (1, 3), (3, 4)], ids=["first", "middle", "last"])
def test_batched_steps_equal_steps_run_one_at_a_time(tiny_model_path, bounds) -> None:
    alone, batched = (StageEngine.load("tiny", tiny_model_path, first=bounds[0], end=bounds[1],
                                       device="cpu") for _ in range(2))
    gen = torch.Generator().manual_seed(1)
    held: dict[str, int] = {}
    compared = 0
    for round_ in SCHEDULE:
        steps = []
        for item in round_:
            if isinstance(item, str):
                alone.release(item[1:])
                batched.release(item[1:])
                held.pop(item[1:])
                continue
            name, n = item
            choose = GREEDY if alone.is_last else None
            steps.append(StageStep(name, held.get(name, 0), choose=choose,
                                   **_steps_input(alone, n, gen)))
            held[name] = held.get(name, 0) + n
        want = [alone.forward(s.sequence_id, s.start, token_ids=s.token_ids, hidden=s.hidden,
                              choose=s.choose) for s in steps]
        got = batched.run(steps)
        for w, g in zip(want, got, strict=True):
            assert not isinstance(g, Exception), g
            _same(w, g)
            compared += 1
    assert compared == sum(1 for r in SCHEDULE for i in r if not isinstance(i, str))
    # decode steps really ran together: passes of three sequences, not one at a time
    assert batched.batch_size_hist.get(3, 0) >= 4, batched.batch_size_hist
    assert alone.batch_size_hist.keys() == {1}
    seqs = batched._sequences
    assert seqs["a"].group is seqs["c"].group is seqs["d"].group  # the last round's group


def test_a_bad_step_fails_alone_and_its_sequence_can_go_on(tiny_model_path) -> None:
    middle = StageEngine.load("tiny", tiny_model_path, first=1, end=3, device="cpu")
    width = middle.spec.hidden_size
    gen = torch.Generator().manual_seed(2)
    middle.run([StageStep("a", 0, hidden=torch.randn(4, width, generator=gen)),
                StageStep("b", 0, hidden=torch.randn(6, width, generator=gen))])
    good = torch.randn(1, width, generator=gen)
    out = middle.run([StageStep("a", 4, hidden=good),
                      StageStep("b", 6, hidden=torch.full((1, width), float("nan"))),
                      StageStep("c", 9, hidden=good)])
    assert isinstance(out[1], InvalidRequest) and "NaN" in str(out[1])
    assert isinstance(out[2], InvalidRequest) and "out of order" in str(out[2])
    assert out[0].hidden.shape == (1, width)
    again = middle.run([StageStep("b", 6, hidden=good)])[0]  # b's cache was not touched
    assert not isinstance(again, Exception) and again.hidden.shape == (1, width)


def test_the_worker_answers_steps_that_waited_together_from_one_pass(tiny_model_path) -> None:
    first = StageEngine.load("tiny", tiny_model_path, first=0, end=2, device="cpu")
    worker = StageWorker({"tiny": first})
    answers: list = []

    async def send(msg) -> None:
        answers.append(msg)

    def forward(seq: str, step: int, start: int, ids: list[int]) -> protocol.StageForward:
        return protocol.StageForward(sequence_id=seq, model="tiny", step=step, start=start,
                                     token_ids=ids)

    async def scenario() -> None:
        await asyncio.gather(*(worker.handle(forward(s, i, 0, PROMPT[: 3 + i]), send)
                               for i, s in enumerate("xyz")))
        gate = threading.Event()
        loop = asyncio.get_running_loop()
        busy = loop.run_in_executor(worker._thread("tiny"), gate.wait)  # the thread is busy...
        handled = [asyncio.create_task(worker.handle(forward(s, 10 + i, 3 + i, [9]), send))
                   for i, s in enumerate("xyz")]
        await asyncio.sleep(0.05)  # ...while the three steps arrive, so one pass takes them all
        gate.set()
        await busy
        await asyncio.gather(*handled)

    try:
        asyncio.run(scenario())
    finally:
        worker.close()
    decoded = [a for a in answers if a.step >= 10]
    assert sorted(a.sequence_id for a in decoded) == ["x", "y", "z"]
    assert all(a.error is None and a.hidden is not None and a.hidden.shape == (1, 128)
               for a in decoded), decoded
    assert first.batch_size_hist == {3: 1}


def test_a_pass_waits_for_the_sequences_decoding_here_but_not_again_for_a_late_one(
        tiny_model_path) -> None:
    first = StageEngine.load("tiny", tiny_model_path, first=0, end=2, device="cpu")
    worker = StageWorker({"tiny": first}, gather_share=1e6, gather_wait_s_max=0.5)
    answers: list = []
    steps = iter(range(1000))

    async def send(msg) -> None:
        answers.append(msg)

    def step(seq: str, start: int, n: int = 1) -> protocol.StageForward:
        return protocol.StageForward(sequence_id=seq, model="tiny", step=next(steps),
                                     start=start, token_ids=PROMPT[:n])

    async def scenario() -> None:
        await asyncio.gather(*(worker.handle(step(s, 0, 3), send) for s in "xyz"))
        gate = threading.Event()
        busy = asyncio.get_running_loop().run_in_executor(worker._thread("tiny"), gate.wait)
        first_round = [asyncio.create_task(worker.handle(step(s, 3), send)) for s in "xyz"]
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(busy, *first_round)  # one pass of 3: they now decode together
        x = asyncio.create_task(worker.handle(step("x", 4), send))
        await asyncio.sleep(0.05)  # x's pass waits for y and z, decoding here
        await asyncio.gather(x, *(worker.handle(step(s, 4), send) for s in "yz"))
        assert first.batch_size_hist == {3: 2}
        await asyncio.gather(*(worker.handle(step(s, 5), send) for s in "xy"))  # z never comes
        assert first._sequences["z"].late and first.batch_size_hist == {3: 2, 2: 1}
        await asyncio.gather(*(worker.handle(step(s, 6), send) for s in "xy"))
        assert first.batch_size_hist == {3: 2, 2: 2}
        await worker.handle(protocol.StageRelease(sequence_id="z", model="tiny"), send)
        assert first.expected(["x", "y"]) == []

    try:
        asyncio.run(scenario())
    finally:
        worker.close()
    assert all(a.error is None for a in answers), [a.error for a in answers if a.error]

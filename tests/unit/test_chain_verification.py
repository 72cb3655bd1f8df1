"""Spot checks of chains: the pure decisions (which chain jobs, which stage to blame), a last
stage's scores against the whole model's, the tolerance against honest re-runs and against the
stage cheats, and the whole check on a live dispatcher and verifier with stages of the tiny model
run in this process (real ``StageWorker``s behind in-memory sockets).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from sparecycles import modelfiles, protocol
from sparecycles.coordinator.dispatch import Dispatcher
from sparecycles.coordinator.node_conn import NodeConn
from sparecycles.coordinator.router import NodeRouter
from sparecycles.coordinator.verification import Verifier
from sparecycles.coordinator.verification_chains import activation_diff
from sparecycles.errors import ProtocolError
from sparecycles.identity import NodeIdentity
from sparecycles.ledger.pricing import ModelPrice, PriceBook
from sparecycles.ledger.service import Ledger
from sparecycles.node.backends.sampling import score_positions
from sparecycles.node.backends.transformers_stage import StageEngine, StageScoreAsk
from sparecycles.node.cheats import CheatingStage
from sparecycles.node.stage_worker import StageWorker, to_activation
from sparecycles.store import Store
from sparecycles.store.trust_queries import TrustQueries
from sparecycles.trust import chains as decide
from sparecycles.trust.decisions import Method, Outcome, Verdict
from sparecycles.trust.reputation import NodeTrust, new_trust
from sparecycles.types import AvailabilityPolicy, DeviceProfile, SamplingParams

# ---- the pure decisions ----------------------------------------------------------------------


def _established(node_id: str) -> NodeTrust:
    return replace(new_trust(node_id), alpha=40.0, checks=37, consecutive_clean=37)


def test_a_chain_job_is_checked_when_any_of_its_stages_nodes_draws() -> None:
    rng = random.Random(3)
    # a new node in a chain of established ones: every job is checked
    assert all(decide.select_chain([_established("a"), new_trust("b"), _established("c")], 0.0,
                                   rng) for _ in range(200))
    # established nodes only: each draws at its own rate (1% here), so ~2% of two-stage jobs
    n = sum(decide.select_chain([_established("a"), _established("b")], 0.0, rng)
            for _ in range(5000))
    assert 40 <= n <= 170, n
    trusted = replace(new_trust("t"), designated_trusted=True)
    assert not any(decide.select_chain([trusted, trusted], 0.0, rng) for _ in range(200))


def test_chain_selection_replays_from_its_seed() -> None:
    stages = [_established("a"), new_trust("b")]
    runs = [[decide.select_chain(stages, 0.0, r) for _ in range(50)]
            for r in (random.Random(9), random.Random(9))]
    assert runs[0] == runs[1]
    a, b = random.Random(9), random.Random(9)
    decide.select_chain(stages, 0.0, a)
    for _ in range(2 * len(stages)):  # two draws per stage, whatever the answer
        b.random()
    assert a.random() == b.random()


def _diff(err: float, rows: int = 5, rerun: int = 5) -> decide.ActivationDiff:
    return decide.ActivationDiff(rows, rerun, err, err / 2, 3)


def test_hidden_states_within_the_tolerance_pass_and_beyond_it_fail() -> None:
    tol = decide.FP32_STAGE_TOLERANCE
    assert decide.judge_activations(_diff(3e-7), tol).outcome is Outcome.PASS
    failed = decide.judge_activations(_diff(0.9), tol)
    assert failed.outcome is Outcome.FAIL and failed.method is Method.STAGE_RECHECK
    assert "position 3" in failed.reason and failed.tokens_checked == 5
    assert decide.judge_activations(_diff(0.01), decide.HALF_STAGE_TOLERANCE).passed
    assert decide.stage_tolerance_for(4) == decide.FP32_STAGE_TOLERANCE
    assert decide.stage_tolerance_for(2) == decide.HALF_STAGE_TOLERANCE
    # a comparison that cannot be made blames nobody
    for diff in (_diff(0.0, rows=5, rerun=4), _diff(float("nan")), _diff(0.0, 0, 0)):
        assert decide.judge_activations(diff, tol).outcome is Outcome.INCONCLUSIVE


PASS = Verdict(Outcome.PASS, Method.TEACHER_FORCED, "consistent")
FAIL = Verdict(Outcome.FAIL, Method.TEACHER_FORCED, "greedy token 2 is not the model's choice")
HUNCH = Verdict(Outcome.INCONCLUSIVE, Method.TEACHER_FORCED, "no verifier available")
RC_PASS = Verdict(Outcome.PASS, Method.STAGE_RECHECK, "match")
RC_FAIL = Verdict(Outcome.FAIL, Method.STAGE_RECHECK, "differ")


def test_attribution_blames_the_stage_whose_recheck_differs() -> None:
    assert {n: v.outcome for n, v in decide.attribute(PASS, {}, [1, 2, 3]).items()} == {
        1: Outcome.PASS, 2: Outcome.PASS, 3: Outcome.PASS}
    assert all(v.outcome is Outcome.INCONCLUSIVE
               for v in decide.attribute(HUNCH, {}, [1, 2]).values())
    blamed = decide.attribute(FAIL, {1: RC_PASS, 2: RC_FAIL, 3: RC_PASS}, [1, 2, 3])
    assert {n: v.outcome for n, v in blamed.items()} == {
        1: Outcome.PASS, 2: Outcome.FAIL, 3: Outcome.PASS}
    # the answer failed but every stage's re-check matches: nobody can be blamed
    unexplained = decide.attribute(FAIL, {1: RC_PASS, 2: RC_PASS}, [1, 2])
    assert all(v.outcome is Outcome.INCONCLUSIVE and "no stage" in v.reason
               for v in unexplained.values())
    partial = decide.attribute(FAIL, {2: RC_FAIL}, [1, 2])
    assert partial[1].outcome is Outcome.INCONCLUSIVE and partial[2].outcome is Outcome.FAIL


def test_an_untrusted_recheck_failure_needs_a_second_one() -> None:
    assert decide.confirmed(RC_PASS, None) is RC_PASS
    assert decide.confirmed(RC_FAIL, None).outcome is Outcome.INCONCLUSIVE
    assert decide.confirmed(RC_FAIL, replace(RC_FAIL, outcome=Outcome.INCONCLUSIVE)
                            ).outcome is Outcome.INCONCLUSIVE
    assert decide.confirmed(RC_FAIL, RC_PASS).outcome is Outcome.INCONCLUSIVE
    both = decide.confirmed(RC_FAIL, RC_FAIL)
    assert both.outcome is Outcome.FAIL and "confirmed" in both.reason


def test_activation_diff_reads_every_wire_dtype() -> None:
    x = torch.randn(6, 16) * 3
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        same = activation_diff([to_activation(x.to(dtype))], [to_activation(x.to(dtype))])
        assert same.row_rel_max == 0 and same.rows == 6
    parts = [to_activation(x[:4]), to_activation(x[4:])]  # chunks against one message
    assert activation_diff(parts, [to_activation(x)]).row_rel_max == 0
    off = activation_diff([to_activation(x + torch.randn(6, 16))], [to_activation(x)])
    assert off.row_rel_max > 0.1
    assert activation_diff(parts[:1], [to_activation(x)]).rows_rerun == 6  # a void comparison


# ---- stages of the tiny model ---------------------------------------------------------------

GREEDY = SamplingParams(max_tokens=16, temperature=0)


def _run(stages: list, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decode through ``stages`` as a chain sends it (the prompt, then one token at a
    time); the tokens and the first stage's hidden states of each step."""
    out, firsts, inp, pos = [], [], list(prompt), 0
    for _ in range(n):
        h = None
        for i, s in enumerate(stages):
            r = s.forward("seq", pos, token_ids=inp if i == 0 else None, hidden=h,
                          choose=GREEDY if i == len(stages) - 1 else None)
            if i == 0:
                firsts.append(r.hidden)
            h = r.hidden
        pos += len(inp)
        out.append(r.token)
        inp = [r.token]
    return out, firsts


def test_the_last_stage_scores_positions_as_the_whole_model(tiny_model_path) -> None:
    first = StageEngine.load("tiny", tiny_model_path, first=0, end=2, device="cpu")
    last = StageEngine.load("tiny", tiny_model_path, first=2, end=4, device="cpu")
    prompt, output = [5, 100, 200, 300, 7, 42, 9], [18, 3, 203, 2, 542]
    ids = prompt + output[:-1]
    h = first.forward("s", 0, token_ids=ids).hidden
    for temperature, top_p in ((0.0, 1.0), (0.8, 0.9)):
        ask = StageScoreAsk(len(prompt) - 1, tuple(output), temperature, top_p)
        got = last.forward(f"t{temperature}", 0, hidden=h, score=ask).scores
        model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
        with torch.inference_mode():
            logits = model(torch.tensor([ids])).logits[0, len(prompt) - 1 :]
        want = score_positions(logits.float(), torch.tensor(output), temperature, top_p)
        assert got is not None
        for g, w in zip(got, want, strict=True):
            assert g == pytest.approx(w, abs=1e-4)
    with pytest.raises(Exception, match="only the last stage"):
        first.forward("u", 0, token_ids=ids, score=StageScoreAsk(0, (1,), 0.0, 1.0))


def test_an_honest_rerun_is_far_inside_the_tolerance_and_the_cheats_far_outside(
        tiny_model_path) -> None:
    """The tolerance is set from this: the first stage's hidden states as a chain produced them
    (the prompt, then one position a step) against one re-run of the same inputs in one message
    on another engine; and the same against the two stage cheats."""
    load = lambda: StageEngine.load("tiny", tiny_model_path, first=0, end=2, device="cpu")  # noqa: E731
    rest = StageEngine.load("tiny", tiny_model_path, first=2, end=4, device="cpu")
    prompt = [5, 100, 200, 300, 7, 42, 9]
    tokens, firsts = _run([load(), rest], prompt, 12)
    inputs = prompt + tokens[:-1]
    stage = [to_activation(h) for h in firsts]
    rerun = [to_activation(load().forward("r", 0, token_ids=inputs).hidden)]
    honest = activation_diff(stage, rerun)
    assert honest.rows == len(inputs)
    assert honest.row_rel_max < decide.FP32_STAGE_TOLERANCE.row_rel_max / 100, honest
    for mode in ("stage-noise", "stage-skip"):
        cheat = CheatingStage(load(), mode)
        lied = [to_activation(cheat.forward("c", 0, token_ids=inputs).hidden)]
        diff = activation_diff(lied, rerun)
        assert diff.row_rel_max > 100 * decide.FP32_STAGE_TOLERANCE.row_rel_max, (mode, diff)
        assert decide.judge_activations(diff).outcome is Outcome.FAIL


# ---- the whole check, on a live dispatcher and verifier --------------------------------------

PROFILE = DeviceProfile(device_class="laptop", cpu_cores=8, ram_bytes=16 << 30,
                        memory_bandwidth_bytes_per_s=20e9, peak_flops=2e11)


class Node:
    """A node in this process behind an in-memory socket: a real ``StageWorker`` over a stage
    of the tiny model, or (``whole``) the whole model answering ``score``."""

    def __init__(self, world: ChainWorld, name: str, owner_id: str, *,
                 layers: tuple[int, int] | None = None, cheat: str | None = None):
        self.world, self.identity = world, NodeIdentity.generate()
        self.worker: StageWorker | None = None
        self.whole: AutoModelForCausalLM | None = None
        if layers is not None:
            engine = StageEngine.load("tiny", world.path, first=layers[0], end=layers[1],
                                      device="cpu")
            self.worker = StageWorker({"tiny": CheatingStage(engine, cheat) if cheat else engine})
        else:
            self.whole = AutoModelForCausalLM.from_pretrained(world.path, dtype=torch.float32)
        self.forwards = self.scores = 0
        self.conn = NodeConn(
            node_id=self.identity.node_id, owner_id=owner_id, name=name,
            public_key=self.identity.public_key_b64, profile=PROFILE,
            policy=AvailabilityPolicy(), models=() if layers else ("tiny",),
            weights={} if layers else {"tiny": world.spec.weights_sha256}, jobs_max=8,
            send_raw=self._receive, layer_ranges={"tiny": layers} if layers else {})

    async def _receive(self, frame: str) -> None:
        msg = protocol.decode_coordinator_message(frame)
        if isinstance(msg, protocol.StageForward | protocol.StageRelease):
            assert self.worker is not None
            self.forwards += isinstance(msg, protocol.StageForward)
            self.world.spawn(self.worker.handle(msg, self._reply))
        elif isinstance(msg, protocol.Score):
            self.scores += 1
            self.world.spawn(self._score(msg))

    async def _score(self, msg: protocol.Score) -> None:
        assert self.whole is not None
        ids = msg.prompt_token_ids + msg.output_token_ids
        with torch.inference_mode():
            logits = self.whole(torch.tensor([ids])).logits[0, len(msg.prompt_token_ids) - 1 : -1]
        r = score_positions(logits.float(), torch.tensor(msg.output_token_ids), msg.temperature,
                            msg.top_p)
        await self._reply(protocol.Scored(
            score_id=msg.score_id, logprobs=list(r[0]), top_logprobs=list(r[1]),
            mass_above=list(r[2]), expected_logprobs=list(r[3]), logprob_vars=list(r[4]),
            busy_s=0.01))

    async def _reply(self, msg: protocol.StageOutput | protocol.Scored) -> None:
        assert self.world.router.route(self.conn, msg, protocol.encode(msg)) is None


class ChainWorld:
    def __init__(self, tmp_path, path) -> None:
        self.path = path
        self.spec = modelfiles.model_spec("tiny", path)
        self.tokenizer = modelfiles.load_tokenizer(str(path))
        self.store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
        self.store.create_all()
        self.ledger = Ledger(self.store.sessions, prices=PriceBook.default())
        self.ledger.set_price("tiny", ModelPrice(10_000_000, 30_000_000))
        self.client = self.store.ensure_client("acme")
        self.ledger.deposit(self.client, 500_000_000, reference="topup")
        self.verifier = Verifier(store=self.store, ledger=self.ledger, rng=random.Random(7))
        self.d = Dispatcher(store=self.store, ledger=self.ledger, models={"tiny": self.spec},
                            replica_id="r1", verifier=self.verifier, on_finished=self._finished)
        self.d.chains.vocab_sizes = {"tiny": len(self.tokenizer)}
        self.router = NodeRouter(self.d, verification=self.verifier.link,
                                 scores=self.verifier.link)
        self.finished: set[str] = set()
        self.nodes: list[Node] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.n = 0

    def _finished(self, job, state: str) -> None:
        self.finished.add(job.job_id)
        self.verifier.on_job_finished(job, state)

    def spawn(self, work) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def start(self) -> None:
        await self.d.start()
        await self.verifier.start(self.d)

    async def stop(self) -> None:
        await self.verifier.stop()
        await self.d.stop()
        for n in self.nodes:
            if n.worker is not None:
                n.worker.close()

    async def add(self, name: str, owner: str, **kw) -> Node:
        owner_id = self.store.ensure_owner(owner)
        node = await asyncio.to_thread(Node, self, name, owner_id, **kw)
        node.conn.start()
        self.store.node_connected(node_id=node.conn.node_id, owner_id=owner_id, name=name,
                                  public_key=node.conn.public_key, profile={}, models=[],
                                  availability={}, agent_version="", replica_id="r1")
        node.conn.reputation = await self.verifier.admit_node(node.conn.node_id, owner_id)
        self.d.on_node_ready(node.conn)
        self.nodes.append(node)
        return node

    async def job(self, *, on: list[Node], max_tokens: int = 10) -> str:
        """One greedy job on a chain of the nodes ``on`` (the others kept out until it has
        started), then its check; returns the job id."""
        self.n += 1
        job_id = f"job_{self.n}"
        others = [n for n in self.nodes if n not in on]
        for n in others:
            n.conn.draining = True
        before = [n.forwards for n in on]
        prompt = modelfiles.render_completion(self.tokenizer, "Once upon a time there was")
        await self.d.admit(job_id=job_id, client_id=self.client, api_key_id=None, model="tiny",
                           endpoint="completions", prompt_ids=prompt,
                           sampling=SamplingParams(max_tokens=max_tokens, temperature=0),
                           stream=False)
        await self.until(lambda: job_id in self.finished or all(
            n.forwards > k for n, k in zip(on, before, strict=True)))
        for n in others:
            n.conn.draining = False
        await self.until(lambda: job_id in self.finished)
        await self.until(self.idle)
        return job_id

    def idle(self) -> bool:
        v = self.verifier
        return (v._queue.empty() and v._chain_tasks == 0 and not v._tasks
                and not v._apply_lock.locked())

    async def until(self, condition, timeout_s: float = 60.0) -> None:
        for _ in range(int(timeout_s / 0.01)):
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("condition not met in time")

    def verdicts(self, job_id: str) -> dict[str, tuple[str, str]]:
        rows = TrustQueries(self.store.sessions).verifications(job_id=job_id)
        return {r["node_id"]: (r["method"], r["outcome"]) for r in rows}


@pytest.fixture
async def chain_world(tmp_path, tiny_model_path):
    w = ChainWorld(tmp_path, tiny_model_path)
    await w.start()
    yield w
    await w.stop()


async def test_an_honest_chain_passes_end_to_end_on_another_chain(chain_world) -> None:
    w = chain_world
    a = await w.add("a", "alice", layers=(0, 2))
    b = await w.add("b", "bob", layers=(2, 4))
    v0 = await w.add("v0", "victor", layers=(0, 2))
    v1 = await w.add("v1", "victor", layers=(2, 4))
    job_id = await w.job(on=[a, b])
    assert w.verdicts(job_id) == {a.conn.node_id: ("teacher_forced", "pass"),
                                  b.conn.node_id: ("teacher_forced", "pass")}
    assert v0.forwards and v1.forwards  # the check ran through the other owner's stages
    money = w.ledger.job_money(job_id)
    assert money["withheld_micros"] == 0 and money["earnings"][a.conn.node_id] > 0
    assert w.verifier.trust_of(a.conn.node_id).consecutive_clean == 1
    assert w.ledger.check() == []


@pytest.mark.parametrize("mode", ["stage-noise", "stage-skip"])
async def test_a_cheating_stage_is_blamed_not_paid_and_the_honest_stage_is_paid(
        chain_world, mode) -> None:
    w = chain_world
    cheat = await w.add("c", "mallory", layers=(0, 2), cheat=mode)
    b = await w.add("b", "bob", layers=(2, 4))
    await w.add("v0", "ops", layers=(0, 2))
    await w.add("v1", "ops", layers=(2, 4))
    await w.verifier.set_owner_trusted("ops", True)
    job_id = await w.job(on=[cheat, b])
    assert w.verdicts(job_id) == {cheat.conn.node_id: ("stage_recheck", "fail"),
                                  b.conn.node_id: ("stage_recheck", "pass")}
    money = w.ledger.job_money(job_id)
    earned = money["earnings"]
    assert earned[cheat.conn.node_id] > 0 and earned[b.conn.node_id] > 0
    assert money["withheld_micros"] == earned[cheat.conn.node_id]
    t = w.verifier.trust_of(cheat.conn.node_id)
    assert (t.failures, t.checks) == (1, 1) and cheat.conn.reputation < 0.75
    assert w.verifier.trust_of(b.conn.node_id).failures == 0
    assert w.ledger.check() == []


async def test_a_whole_model_node_checks_a_chain_and_untrusted_blame_needs_a_second_opinion(
        chain_world) -> None:
    w = chain_world
    a = await w.add("a", "alice", layers=(0, 2))
    cheat = await w.add("c", "mallory", layers=(2, 4), cheat="stage-noise")
    whole = await w.add("w", "wendy")  # no chains while it serves: kept out until one starts
    v0 = await w.add("v0", "victor", layers=(0, 2))
    v1 = await w.add("v1", "victor", layers=(2, 4))
    job_id = await w.job(on=[a, cheat])
    # the whole-model node scored the answer (it failed); victor's stages re-checked the two
    # stages, and with nobody trusted and no third owner, the blame is not confirmed: nobody
    # is blamed, and nothing is learnt
    assert w.verdicts(job_id) == {a.conn.node_id: ("stage_recheck", "inconclusive"),
                                  cheat.conn.node_id: ("stage_recheck", "inconclusive")}
    assert w.ledger.job_money(job_id)["withheld_micros"] == 0
    assert whole.scores == 1 and v0.forwards and v1.forwards
    await w.add("z1", "zoe", layers=(2, 4))  # a third owner: the second re-check agrees
    job_id = await w.job(on=[a, cheat])
    assert w.verdicts(job_id)[cheat.conn.node_id] == ("stage_recheck", "fail")
    assert w.ledger.job_money(job_id)["withheld_micros"] > 0
    assert w.verifier.trust_of(cheat.conn.node_id).failures == 1
    assert w.ledger.check() == []


def test_stage_scores_on_the_wire_are_bounded() -> None:
    ok = protocol.StageScore(offset=2, targets=[1, 2], temperature=0.0)
    msg = protocol.StageForward(sequence_id="j.1", model="m", step=1, start=0,
                                token_ids=[1, 2, 3, 4], score=ok)
    back = protocol.decode_coordinator_message(protocol.encode(msg))
    assert isinstance(back, protocol.StageForward) and back.score == ok
    with pytest.raises(ValueError):
        protocol.StageScore(offset=0, targets=[])
    raw = ('{"type": "stage_output", "sequence_id": "j.1", "step": 1, "scores": {"logprobs": '
           '[NaN], "top_logprobs": [0], "mass_above": [0], "expected_logprobs": [0], '
           '"logprob_vars": [0]}}')
    with pytest.raises(ProtocolError):
        protocol.decode_node_message(raw)

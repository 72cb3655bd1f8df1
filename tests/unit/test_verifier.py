"""Spot checks end to end with in-memory twins: a SQLite store, the real ledger, dispatch and
verifier, and fake nodes that run a small deterministic "model" (random logits per context).

The fake nodes answer ``score`` with ``sampling.score_positions``, the same function the real
engine uses, so the verdicts here are the ones a real verifier would produce.
"""

from __future__ import annotations

import asyncio
import json
import random
import zlib

import pytest
import torch

from sparecycles import protocol
from sparecycles.coordinator.dispatch import Dispatcher
from sparecycles.coordinator.node_conn import NodeConn
from sparecycles.coordinator.router import NodeRouter
from sparecycles.coordinator.verification import Verifier
from sparecycles.errors import ProtocolError
from sparecycles.identity import NodeIdentity
from sparecycles.ledger.pricing import PriceBook
from sparecycles.ledger.service import Ledger
from sparecycles.node.backends.sampling import score_positions
from sparecycles.store import Store
from sparecycles.store.trust_queries import TrustQueries
from sparecycles.trust.decisions import SpotCheckConfig
from sparecycles.types import AvailabilityPolicy, DeviceProfile, ModelSpec, SamplingParams

VOCAB = 32
SPEC = ModelSpec(name="m", n_params=5_000_000, bytes_per_param=4, n_layers=4, hidden_size=128,
                 n_kv_heads=2, head_dim=32, context_length=2048, weights_sha256="a" * 64)
PROFILE = DeviceProfile(device_class="laptop", cpu_cores=8, ram_bytes=16 << 30,
                        memory_bandwidth_bytes_per_s=20e9, peak_flops=2e11)


def logits_after(context: list[int], shift: int = 0) -> torch.Tensor:
    """The fake model: logits depend on the last two tokens (``shift`` makes another model)."""
    g = torch.Generator().manual_seed(zlib.crc32(repr(context[-2:]).encode()) + shift)
    return torch.randn(VOCAB, generator=g) * 3


class FakeNode:
    """A node the test drives; ``mode`` is how it behaves."""

    def __init__(self, name: str, owner_id: str, mode: str = "honest"):
        self.identity, self.mode, self.sent = NodeIdentity.generate(), mode, []
        self.seen: set[str] = set()

        async def send_raw(frame: str) -> None:
            self.sent.append(json.loads(frame))

        self.conn = NodeConn(
            node_id=self.identity.node_id, owner_id=owner_id, name=name,
            public_key=self.identity.public_key_b64, profile=PROFILE,
            policy=AvailabilityPolicy(), models=("m",), weights={"m": SPEC.weights_sha256},
            jobs_max=8, send_raw=send_raw)
        self.conn.start()

    def generate(self, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
        out, lps = [], []
        for _ in range(n):
            logp = torch.log_softmax(logits_after(prompt + out), -1)
            t = int(logp.argmax()) if self.mode != "random" else random.randrange(VOCAB)
            out.append(t)
            lps.append(float(logp[t]))
        return out, lps

    def scored(self, msg: dict) -> protocol.Scored:
        ctx, out = msg["prompt_token_ids"], msg["output_token_ids"]
        shift = 1 if self.mode == "lying-verifier" else 0
        logits = torch.stack([logits_after(ctx + out[:i], shift) for i in range(len(out))])
        r = score_positions(logits, torch.tensor(out), msg["temperature"], msg["top_p"])
        return protocol.Scored(score_id=msg["score_id"], logprobs=list(r[0]),
                               top_logprobs=list(r[1]), mass_above=list(r[2]),
                               expected_logprobs=list(r[3]), logprob_vars=list(r[4]),
                               busy_s=0.01)

    def respond(self, d: Dispatcher, v: Verifier) -> None:
        """Answer every new message as the node's agent would, through the node router."""
        router = NodeRouter(d, verification=v.link, scores=v.link)
        for msg in self.sent:
            key = msg.get("job_id", "") + str(msg.get("attempt", "")) + msg.get("score_id", "")
            if msg["type"] not in ("job", "score") or key in self.seen:
                continue
            self.seen.add(key)
            replies = [self.scored(msg)] if msg["type"] == "score" else self.run_job(msg)
            for reply in replies:
                assert router.route(self.conn, reply, protocol.encode(reply)) is None

    def run_job(self, job: dict) -> list:
        out, lps = self.generate(job["prompt_token_ids"], job["sampling"]["max_tokens"])
        tokens = protocol.Tokens(job_id=job["job_id"], attempt=job["attempt"], index=0,
                                 token_ids=out, logprobs=lps)
        claimed = len(out) * (3 if self.mode == "overclaim" else 1)
        metering = protocol.Metering(prompt_tokens=len(job["prompt_token_ids"]),
                                     completion_tokens=claimed, time_to_first_token_s=0.01,
                                     total_s=0.05, busy_s=0.04)
        sha = protocol.tokens_sha256(out)
        payload = protocol.result_payload(
            job_id=job["job_id"], attempt=job["attempt"], weights_sha256=SPEC.weights_sha256,
            prompt_sha256=job["prompt_sha256"], output_sha256=sha, finish_reason="length",
            metering=metering)
        signer = NodeIdentity.generate() if self.mode == "forge" else self.identity
        return [tokens, protocol.Done(job_id=job["job_id"], attempt=job["attempt"],
                                      finish_reason="length", metering=metering,
                                      output_sha256=sha, signature=signer.sign(payload))]


class World:
    def __init__(self, tmp_path, **verifier_kw):
        self.store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
        self.store.create_all()
        self.ledger = Ledger(self.store.sessions, prices=PriceBook.default())
        self.client = self.store.ensure_client("acme")
        self.ledger.deposit(self.client, 50_000_000, reference="topup")
        self.verifier = Verifier(store=self.store, ledger=self.ledger, rng=random.Random(7),
                                 **verifier_kw)
        self.d = Dispatcher(store=self.store, ledger=self.ledger, models={"m": SPEC},
                            replica_id="r1", verifier=self.verifier,
                            on_finished=self._finished)
        self.finished: set[str] = set()
        self.nodes: list[FakeNode] = []
        self.n = 0

    def _finished(self, job, state: str) -> None:
        self.finished.add(job.job_id)
        self.verifier.on_job_finished(job, state)

    async def start(self) -> None:
        await self.d.start()
        await self.verifier.start(self.d)

    async def stop(self) -> None:
        await self.verifier.stop()
        await self.d.stop()

    async def add(self, name: str, owner: str, mode: str = "honest") -> FakeNode:
        owner_id = self.store.ensure_owner(owner)
        node = FakeNode(name, owner_id, mode)
        self.store.node_connected(node_id=node.conn.node_id, owner_id=owner_id, name=name,
                                  public_key=node.conn.public_key, profile={}, models=[],
                                  availability={}, agent_version="", replica_id="r1")
        node.conn.reputation = await self.verifier.admit_node(node.conn.node_id, owner_id)
        self.d.on_node_ready(node.conn)
        self.nodes.append(node)
        return node

    async def pump(self, until, timeout_s: float = 30.0) -> None:
        for _ in range(int(timeout_s / 0.01)):
            for node in self.nodes:
                node.respond(self.d, self.verifier)
            if until():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("condition not met in time")

    async def job(self, on: FakeNode, *, temperature: float = 0.0, seed: int | None = None,
                  max_tokens: int = 12) -> str:
        """Run one job on ``on`` (the other nodes are kept out) and wait for its checks."""
        self.n += 1
        job_id = f"job_{self.n}"
        others = [n for n in self.nodes if n is not on]
        for n in others:
            n.conn.draining = True
        await self.d.admit(job_id=job_id, client_id=self.client, api_key_id=None, model="m",
                           endpoint="completions", prompt_ids=[1, 2, self.n % VOCAB],
                           sampling=SamplingParams(max_tokens=max_tokens,
                                                   temperature=temperature, seed=seed),
                           stream=False)
        await self.pump(lambda: any(m.get("job_id") == job_id for m in on.sent))
        for n in others:
            n.conn.draining = False
        await self.pump(lambda: job_id in self.finished)
        await self.pump(self.idle)
        return job_id

    def idle(self) -> bool:
        v = self.verifier
        return (v._queue.empty() and v.link.idle and not v._tasks
                and not v._apply_lock.locked())

    def trust(self, node: FakeNode):
        return self.verifier.trust_of(node.conn.node_id)


@pytest.fixture
async def world(tmp_path):
    w = World(tmp_path)
    await w.start()
    yield w
    await w.stop()


async def test_honest_work_passes_and_builds_reputation(world: World) -> None:
    alice = await world.add("a", "alice")
    await world.add("b", "bob")
    for _ in range(4):
        await world.job(alice)
    t = world.trust(alice)
    assert (t.checks, t.failures, t.consecutive_clean) == (4, 0, 4)
    assert alice.conn.reputation == pytest.approx(7 / 8)
    rows = TrustQueries(world.store.sessions).verifications(node_id=alice.conn.node_id)
    assert [r["outcome"] for r in rows] == ["pass"] * 4
    assert all(r["reason"] == "identical" if r["method"] == "reexecution"
               else r["greedy_gap_max"] == 0 and r["logprob_diff_max"] < 1e-4 for r in rows)
    assert world.ledger.check() == []


async def test_random_tokens_are_withheld_and_the_node_quarantined(world: World) -> None:
    cheat = await world.add("c", "carol", "random")
    await world.add("a", "alice")
    await world.add("b", "bob")
    for i in range(3):
        job_id = await world.job(cheat)
        money = world.ledger.job_money(job_id)
        assert money["withheld_micros"] == money["owner_earned_micros"] > 0, i
    t = world.trust(cheat)
    assert t.failures == 3 and t.quarantined
    assert cheat.conn.closed and cheat.conn.reputation == 0
    await world.pump(lambda: any(m["type"] == "reject" and "quarantined" in m["reason"]
                                 for m in cheat.sent))  # its writer sends it soon after
    with pytest.raises(ProtocolError, match="quarantined"):
        await world.verifier.admit_node(cheat.conn.node_id, cheat.conn.owner_id)
    stored = TrustQueries(world.store.sessions).load_trust(cheat.conn.node_id)
    assert stored is not None and stored.quarantined
    assert world.ledger.check() == []


async def test_an_untrusted_verifiers_false_failure_is_not_believed(world: World) -> None:
    honest = await world.add("a", "alice")
    await world.add("liar", "bob", "lying-verifier")
    await world.add("c", "carol")
    liar = world.nodes[1]
    for n in world.nodes[2:]:
        n.conn.jobs_max = 0  # carol's node only as the second opinion: it has no free slot yet
    world.verifier.rng = random.Random(1)
    job_id = await world.job(honest)
    rows = TrustQueries(world.store.sessions).verifications(job_id=job_id)
    by_node = {r["node_id"]: r["outcome"] for r in rows}
    # with no third owner free, the liar's verdict stays unconfirmed and changes nothing
    assert by_node == {honest.conn.node_id: "inconclusive"}
    assert world.trust(honest).failures == 0
    for n in world.nodes[2:]:
        n.conn.jobs_max = 8
    liar.conn.reputation = 0.8  # ranks above carol's 0.75: it verifies first again
    job_id = await world.job(honest)
    rows = TrustQueries(world.store.sessions).verifications(job_id=job_id)
    by_node = {r["node_id"]: r["outcome"] for r in rows}
    assert by_node[honest.conn.node_id] == "pass"
    assert by_node[liar.conn.node_id] == "fail"  # contradicted by the second verifier
    assert world.trust(liar).failures == 1 and world.trust(honest).failures == 0


async def test_overclaimed_metering_and_forged_signatures_count_against_the_node(
        world: World) -> None:
    over = await world.add("o", "oscar", "overclaim")
    await world.add("a", "alice")
    job_id = await world.job(over)
    rows = TrustQueries(world.store.sessions).verifications(node_id=over.conn.node_id)
    assert {(r["method"], r["outcome"]) for r in rows} >= {("metering", "fail")}
    assert world.ledger.job_money(job_id)["withheld_micros"] > 0
    world.nodes.remove(over)
    over.conn.closed = True
    forger = await world.add("f", "frank", "forge")
    job_id = await world.job(forger)  # resumed on an honest node after the bad result
    rows = TrustQueries(world.store.sessions).verifications(node_id=forger.conn.node_id)
    assert [(r["method"], r["outcome"]) for r in rows] == [("signature", "fail")]
    money = world.ledger.job_money(job_id)
    assert money["withheld_micros"] == money["earnings"][forger.conn.node_id] > 0
    assert world.trust(forger).failures == 1


async def test_reexecution_of_greedy_and_seeded_jobs(tmp_path) -> None:
    w = World(tmp_path, spot_checks=SpotCheckConfig(reexecution_share=1.0))
    await w.start()
    try:
        alice = await w.add("a", "alice")
        bob = await w.add("b", "bob")
        await w.verifier.set_owner_trusted("bob", True)
        await w.job(alice)
        replays = [m for m in bob.sent if m["type"] == "job"]
        assert len(replays) == 1 and replays[0]["sampling"]["temperature"] == 0
        rows = TrustQueries(w.store.sessions).verifications(node_id=alice.conn.node_id)
        assert [(r["method"], r["outcome"], r["reason"]) for r in rows] == [
            ("reexecution", "pass", "identical")]
        alice.mode = "random"  # now it lies: re-execution diverges, scoring judges
        await w.job(alice)
        rows = TrustQueries(w.store.sessions).verifications(node_id=alice.conn.node_id)
        assert rows[0]["method"] == "reexecution" and rows[0]["outcome"] == "fail"
        assert rows[0]["first_divergence"] is not None
    finally:
        await w.stop()


async def test_unseeded_sampled_jobs_are_scored_not_replayed(tmp_path) -> None:
    w = World(tmp_path, spot_checks=SpotCheckConfig(reexecution_share=1.0))
    await w.start()
    try:
        alice = await w.add("a", "alice")
        bob = await w.add("b", "bob")
        await w.job(alice, temperature=1.0, max_tokens=8)
        assert not [m for m in bob.sent if m["type"] == "job"]
        assert [m["type"] for m in bob.sent if m["type"] == "score"] == ["score"]
    finally:
        await w.stop()

"""Verification on a live coordinator: spot checks after settlement, reputation, withholding.

The decisions are ``trust/decisions.py`` (which job, which method, what the evidence says) and
``trust/reputation.py`` (the Beta posterior, quarantine); this module is their I/O:

1. Dispatch tells it about every result (``on_result``: the metering claim is checked against
   what was received; ``on_bad_signature``) and every finished job (``on_job_finished``, called
   after the ledger settled it, so the client's answer is never delayed by a check).
2. A finished job is selected or not (``verify.select`` with this coordinator's random source, so
   no node can predict it); a selected job waits in a bounded queue for a worker.
3. A worker picks a verifier node of another owner (``verify.choose_verifier``) and sends it a
   ``score`` (teacher forcing: one prefill pass) or, for greedy or seeded jobs now and then, a
   plain ``job`` with the same prompt and sampling (re-execution; the verifier cannot tell it from
   client work). A divergence in re-execution is judged by scoring.
4. A failure reported by a verifier that is not trusted is confirmed by a second verifier of a
   third owner before it counts; if the second contradicts it, the first verifier is the one
   that failed.
5. A verdict updates the node's posterior (stored), sets the reputation the scheduler reads, and
   on failure withholds that job's earning of that node (``Ledger.withhold``, a refund to the
   client). A quarantined node is sent ``reject`` and refused at every later hello.

A job served by a chain of stages is selected when any of its stages' nodes draws a check, and
checked end to end, then stage by stage to find the stage to blame
(``coordinator/verification_chains.py``); each stage's verdict is applied as above, to its node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from sparecycles import limits, protocol
from sparecycles.coordinator.node_conn import NodeConn
from sparecycles.coordinator.verification_chains import ChainChecker, ChainCheckTask, chain_task
from sparecycles.coordinator.verification_link import VerifierLink
from sparecycles.errors import ProtocolError, SpareCyclesError
from sparecycles.ledger.service import Ledger
from sparecycles.store import Store
from sparecycles.store.trust_queries import TrustQueries
from sparecycles.trust import chains as chain_checks
from sparecycles.trust import decisions as verify
from sparecycles.trust.decisions import Method, Outcome, Verdict
from sparecycles.trust.reputation import (
    DEFAULT_REPUTATION,
    NodeTrust,
    ReputationConfig,
    new_trust,
    record_check,
    reputation,
)
from sparecycles.types import SamplingParams

if TYPE_CHECKING:
    from sparecycles.coordinator.chains import ChainRegistry
    from sparecycles.coordinator.fleet_node import FleetNode
    from sparecycles.coordinator.jobs import Attempt, LiveJob
    from sparecycles.scheduling.scheduler import SchedulerConfig
    from sparecycles.types import ModelSpec

log = logging.getLogger("sparecycles.coordinator.verification")


@dataclass(frozen=True, slots=True)
class AttemptWork:
    """One node's share of a finished job, frozen when the job finished."""

    number: int
    node_id: str
    owner_id: str
    token_base: int  # index in the job's output of this attempt's first token
    token_ids: tuple[int, ...]
    logprobs: tuple[float | None, ...] | None


@dataclass(frozen=True, slots=True)
class CheckTask:
    job_id: str
    model: str
    prompt_ids: tuple[int, ...]
    generated: tuple[int, ...]
    sampling: SamplingParams
    attempts: tuple[AttemptWork, ...]
    method: Method


class DispatchView(Protocol):
    """What the verifier reads of dispatch (``Dispatcher`` satisfies it): this replica's nodes,
    the model registry, placement's config and the chains it drives (whose messaging a chain's
    check uses)."""

    nodes: dict[str, NodeConn]
    models: dict[str, ModelSpec]
    config: SchedulerConfig
    chains: ChainRegistry


class Verifier:
    def __init__(self, *, store: Store, ledger: Ledger, rng: random.Random | None = None,
                 spot_checks: verify.SpotCheckConfig = verify.DEFAULT_SPOT_CHECKS,
                 tolerance: verify.Tolerance | None = None,  # None: by the model's precision
                 reputation_config: ReputationConfig = DEFAULT_REPUTATION,
                 trusted_min: float = 0.9, workers: int = limits.verifications_running_max):
        self.db = TrustQueries(store.sessions)
        self.ledger = ledger
        self.rng = rng or random.SystemRandom()  # unpredictable to nodes
        self.spot_checks, self.tolerance = spot_checks, tolerance
        self.reputation_config, self.trusted_min = reputation_config, trusted_min
        self.trust: dict[str, NodeTrust] = {}
        self.trusted_owners: set[str] = set()
        self.dispatcher: DispatchView | None = None
        self.serving_busy_s = 0.0
        self.verification_busy_s = 0.0
        self.counts: Counter[str] = Counter()
        self._workers_n = workers
        self._queue: asyncio.Queue[CheckTask | ChainCheckTask] = asyncio.Queue(
            limits.verifications_waiting_max)
        self._chain_tasks = 0  # chain checks waiting or running (each holds activations)
        self.chain_checker = ChainChecker(self)
        self._workers: list[asyncio.Task[None]] = []
        self._penalties: dict[str, list[tuple[int, str, Verdict]]] = {}
        self.link = VerifierLink()
        self._apply_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self, dispatcher: DispatchView) -> None:
        self.dispatcher = dispatcher
        self.trusted_min = dispatcher.config.trusted_reputation_min
        self.trusted_owners = await asyncio.to_thread(self.db.trusted_owner_ids)
        self._workers = [asyncio.create_task(self._work(), name=f"verifier-{i}")
                         for i in range(self._workers_n)]

    async def stop(self) -> None:
        for t in [*self._workers, *self._tasks]:
            t.cancel()
        for t in [*self._workers, *self._tasks]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    @property
    def overhead_ratio(self) -> float:
        return verify.overhead_ratio(self.verification_busy_s, self.serving_busy_s)

    def summary(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "serving_busy_s": self.serving_busy_s,
                "verification_busy_s": self.verification_busy_s,
                "overhead_ratio": self.overhead_ratio, "waiting": self._queue.qsize()}

    # ---- nodes --------------------------------------------------------------------------------

    async def admit_node(self, node_id: str, owner_id: str) -> float:
        """A node said hello: its reputation, or ``ProtocolError`` if it is quarantined."""
        trust = self.trust.get(node_id) or await asyncio.to_thread(self.db.load_trust, node_id)
        designated = owner_id in self.trusted_owners
        trust = replace(trust, designated_trusted=designated) if trust else new_trust(
            node_id, self.reputation_config, designated_trusted=designated)
        self.trust[node_id] = trust
        if trust.quarantined:
            raise ProtocolError(f"this node is quarantined ({trust.quarantine_reason}); "
                                "its owner may ask the operator to review it")
        return reputation(trust)

    def trust_of(self, node_id: str) -> NodeTrust:
        return self.trust.get(node_id) or new_trust(node_id, self.reputation_config)

    async def set_owner_trusted(self, owner_name: str, trusted: bool) -> None:
        owner_id = await asyncio.to_thread(self.db.set_owner_trusted, owner_name, trusted)
        (self.trusted_owners.add if trusted else self.trusted_owners.discard)(owner_id)
        for node in self.local_nodes().values():
            if node.owner_id == owner_id:
                t = replace(self.trust_of(node.node_id), designated_trusted=trusted)
                self.trust[node.node_id] = t
                node.reputation = reputation(t)

    async def lift_quarantine(self, node_id: str) -> NodeTrust:
        """An operator's decision after review: the node starts again from the prior."""
        t = new_trust(node_id, self.reputation_config)
        self.trust[node_id] = t
        await asyncio.to_thread(self.db.save_trust, t)
        return t

    # ---- what dispatch tells us ---------------------------------------------------------------

    def on_result(self, node: FleetNode, job: LiveJob, att: Attempt,
                  metering: protocol.Metering) -> None:
        """A signed result verified: count its compute, and check its metering claim."""
        self.serving_busy_s += metering.busy_s
        verdict = verify.check_metering(
            claimed_prompt_tokens=metering.prompt_tokens,
            claimed_completion_tokens=metering.completion_tokens,
            sent_prompt_tokens=len(job.prompt_ids) + att.token_base, received_tokens=att.tokens)
        if verdict is not None:
            self._penalties.setdefault(job.job_id, []).append((att.number, node.node_id, verdict))

    def on_bad_signature(self, node: FleetNode, job: LiveJob, att: Attempt) -> None:
        self.on_refused(node, job, att, Verdict(
            Outcome.FAIL, Method.SIGNATURE, "the signed result does not verify",
            tokens_checked=att.tokens))

    def on_refused(self, node: FleetNode, job: LiveJob, att: Attempt, verdict: Verdict) -> None:
        """A result refused before it reached the books (bad signature, metering out of
        bounds): the verdict is applied when the job has finished."""
        self._penalties.setdefault(job.job_id, []).append((att.number, node.node_id, verdict))

    def on_job_finished(self, job: LiveJob, state: str) -> None:
        """After settlement: apply penalties found on the way, then maybe spot-check the job."""
        if job.chain is not None:
            self._chain_finished(job)
            return
        penalized = set()
        for number, node_id, verdict in self._penalties.pop(job.job_id, []):
            penalized.add(number)
            self._spawn(self._apply(job.job_id, number, node_id, verdict, None, 0.0))
        if not job.generated:
            return
        work = tuple(
            AttemptWork(a.number, a.node_id, a.owner_id, a.token_base,
                        tuple(job.generated[a.token_base : a.token_base + a.tokens]),
                        tuple(a.logprobs[: a.tokens]) if len(a.logprobs) >= a.tokens else None)
            for a in job.attempts if a.tokens > 0 and a.number not in penalized)
        reproducible = job.sampling.temperature == 0 or job.sampling.seed is not None
        chosen = [(w, m) for w in work if (m := verify.select(
            self.trust_of(w.node_id), self.overhead_ratio, reproducible, self.rng,
            self.spot_checks)) is not None]
        if not chosen:
            return
        method = chosen[0][1] if len(chosen) == 1 else Method.TEACHER_FORCED
        task = CheckTask(job.job_id, job.model, tuple(job.prompt_ids), tuple(job.generated),
                         job.sampling, tuple(w for w, _ in chosen), method)
        try:
            self._queue.put_nowait(task)
            self.counts["selected"] += 1
        except asyncio.QueueFull:
            self.counts["dropped"] += 1

    def _chain_finished(self, job: LiveJob) -> None:
        """A chain job: its stages' compute counts as serving; it is checked when any of its
        stages' nodes draws a check (``trust/chains.select_chain``)."""
        self.serving_busy_s += sum(a.busy_s for a in job.attempts)
        task = chain_task(job)
        if task is None or not chain_checks.select_chain(
                [self.trust_of(s.node_id) for s in task.stages], self.overhead_ratio, self.rng,
                self.spot_checks):
            return
        if self._chain_tasks >= limits.chain_checks_waiting_max:
            self.counts["dropped"] += 1
            return
        try:
            self._queue.put_nowait(task)
        except asyncio.QueueFull:
            self.counts["dropped"] += 1
            return
        self._chain_tasks += 1
        self.counts["selected"] += 1

    # ---- running checks -----------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            task = await self._queue.get()
            try:
                if isinstance(task, ChainCheckTask):
                    await self._check_chain(task)
                else:
                    await self._check(task)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("verification of job %s failed", task.job_id)
            finally:
                if isinstance(task, ChainCheckTask):
                    self._chain_tasks -= 1

    async def _check_chain(self, task: ChainCheckTask) -> None:
        """A chain job: each stage's verdict, applied to its node (a failed stage's earning is
        withheld; the others are paid)."""
        judged = await self.chain_checker.judge(task, time.time())
        if all(v.outcome is Outcome.INCONCLUSIVE and v.reason.startswith("no verifier")
               for v in judged.verdicts.values()):
            self.counts["no_verifier"] += 1
        share = judged.busy_s / max(1, len(judged.verdicts))
        for stage in task.stages:
            verdict = judged.verdicts.get(stage.number)
            if verdict is not None:
                await self._apply(task.job_id, stage.number, stage.node_id, verdict,
                                  judged.verifiers.get(stage.number), share)

    async def _check(self, task: CheckTask) -> None:
        owners = {a.owner_id for a in task.attempts}
        pick = self.pick_verifier(task.model, owners, protocol.features_needed(task.sampling))
        if pick is None:
            self.counts["no_verifier"] += 1
            for a in task.attempts:
                await self._apply(task.job_id, a.number, a.node_id, Verdict(
                    Outcome.INCONCLUSIVE, task.method, "no verifier available"), None, 0.0)
            return
        verifier, trusted = pick
        verdicts, busy_s = await self._judge(task, verifier, task.method)
        failed = [a for a in task.attempts if verdicts[a.number].outcome is Outcome.FAIL]
        if failed and not trusted:
            await self._confirm(task, verifier, failed, verdicts)
        share = busy_s / max(1, len(task.attempts))
        for a in task.attempts:
            await self._apply(task.job_id, a.number, a.node_id, verdicts[a.number],
                              verifier.node_id, share)

    async def _confirm(self, task: CheckTask, first: NodeConn, failed: list[AttemptWork],
                       verdicts: dict[int, Verdict]) -> None:
        """An untrusted verifier's failure counts only if a second verifier, of a third owner,
        agrees; if the second passes the work, the first verifier is the one that failed."""
        owners = {a.owner_id for a in task.attempts} | {first.owner_id}
        pick = self.pick_verifier(task.model, owners, protocol.features_needed(task.sampling))
        again = (await self._judge(task, pick[0], Method.TEACHER_FORCED))[0] if pick else {}
        for a in failed:
            v2 = again.get(a.number)
            if pick is None or v2 is None or v2.outcome is Outcome.INCONCLUSIVE:
                v = verdicts[a.number]
                verdicts[a.number] = replace(v, outcome=Outcome.INCONCLUSIVE,
                                             reason=v.reason + "; not confirmed")
            elif v2.outcome is Outcome.PASS:
                verdicts[a.number] = v2
                await self._apply(task.job_id, a.number, first.node_id, Verdict(
                    Outcome.FAIL, Method.TEACHER_FORCED,
                    f"its verdict on {a.node_id} was contradicted by {pick[0].node_id}"),
                    pick[0].node_id, 0.0)

    def tolerance_of(self, model: str) -> verify.Tolerance:
        if self.tolerance is not None:
            return self.tolerance
        spec = self.model_spec(model)
        return verify.tolerance_for(spec.bytes_per_param if spec else 2.0)

    def model_spec(self, model: str) -> ModelSpec | None:
        return self.dispatcher.models.get(model) if self.dispatcher is not None else None

    def local_nodes(self) -> dict[str, NodeConn]:
        return self.dispatcher.nodes if self.dispatcher is not None else {}

    def chain_registry(self) -> ChainRegistry | None:
        return self.dispatcher.chains if self.dispatcher is not None else None

    def pick_verifier(self, model: str, exclude_owners: set[str],
                       needs: frozenset[str] = frozenset()) -> tuple[NodeConn, bool] | None:
        nodes = self.local_nodes()
        candidates = [
            verify.Candidate(n.node_id, n.owner_id, n.reputation,
                             self.trust_of(n.node_id).designated_trusted)
            for n in nodes.values()
            if not n.closed and not n.draining and model in n.models and len(n.jobs) < n.jobs_max
            and needs <= n.features  # it can process the job's logits as the job asked
        ]
        pick = verify.choose_verifier(candidates, exclude_owners, self.rng, self.trusted_min)
        return None if pick is None else (nodes[pick[0].node_id], pick[1])

    async def _judge(self, task: CheckTask, node: NodeConn, method: Method
                     ) -> tuple[dict[int, Verdict], float]:
        busy_s = 0.0
        divergence: int | None = None
        if method is Method.REEXECUTION and len(task.attempts) == 1:
            att = task.attempts[0]
            replay = await self.link.replay(
                node, task.model, list(task.prompt_ids + task.generated[: att.token_base]),
                task.sampling, len(att.token_ids), resumed_tokens=att.token_base)
            if replay is not None:
                busy_s += replay.busy_s
                self.verification_busy_s += replay.busy_s
                v = verify.compare_reexecution(self._claim(task, att), replay.tokens,
                                               replay.logprobs, self.tolerance_of(task.model))
                if v.passed:
                    return {att.number: v}, busy_s
                divergence = v.first_divergence
        verdicts, score_s = await self._teacher_forced(task, node)
        if divergence is not None:
            verdicts = {k: replace(v, method=Method.REEXECUTION, first_divergence=divergence)
                        for k, v in verdicts.items()}
        return verdicts, busy_s + score_s

    @staticmethod
    def _claim(task: CheckTask, att: AttemptWork) -> verify.Claim:
        return verify.Claim(att.token_ids, att.logprobs, task.sampling.temperature,
                            task.sampling.top_p)

    async def _teacher_forced(self, task: CheckTask, node: NodeConn
                              ) -> tuple[dict[int, Verdict], float]:
        n = min(len(task.generated), limits.score_tokens_max)
        scored = await self.link.score(node, task.model, list(task.prompt_ids),
                                       list(task.generated[:n]), task.sampling.temperature,
                                       task.sampling.top_p,
                                       None if task.sampling.is_plain else task.sampling)
        self.verification_busy_s += scored.busy_s
        out: dict[int, Verdict] = {}
        for a in task.attempts:
            lo, hi = a.token_base, min(a.token_base + len(a.token_ids), n)
            if scored.error or hi <= lo:
                why = f"no verdict: {scored.error}" if scored.error else "beyond the scored window"
                out[a.number] = Verdict(Outcome.INCONCLUSIVE, Method.TEACHER_FORCED, why)
                continue
            claim = self._claim(task, a)
            claim = replace(claim, token_ids=claim.token_ids[: hi - lo],
                            logprobs=None if claim.logprobs is None else claim.logprobs[: hi - lo])
            scores = verify.Scores(*(tuple(getattr(scored, f)[lo:hi]) for f in (
                "logprobs", "top_logprobs", "mass_above", "expected_logprobs", "logprob_vars")))
            out[a.number] = verify.judge_scores(claim, scores, self.tolerance_of(task.model))
        return out, scored.busy_s

    # ---- verdicts ---------------------------------------------------------------------------

    async def _apply(self, job_id: str, attempt: int, node_id: str, verdict: Verdict,
                     verifier_node_id: str | None, busy_s: float) -> None:
        """Record a verdict; on failure withhold the earning and lower the reputation."""
        async with self._apply_lock:
            self.counts[f"{verdict.method}:{verdict.outcome}"] += 1
            withheld = 0
            if verdict.outcome is Outcome.FAIL:
                log.warning("job %s: node %s failed %s: %s", job_id, node_id, verdict.method,
                            verdict.reason)
                try:
                    withheld = await asyncio.to_thread(
                        self.ledger.withhold, job_id, f"verification: {verdict.reason}", node_id)
                except SpareCyclesError as exc:  # not settled (nothing was delivered)
                    log.info("job %s: nothing withheld: %s", job_id, exc.message)
            trust = self.trust.get(node_id) or await asyncio.to_thread(
                self.db.load_trust, node_id) or new_trust(node_id, self.reputation_config)
            if verdict.outcome is not Outcome.INCONCLUSIVE:
                trust = record_check(trust, verdict.passed, verdict.reason,
                                     self.reputation_config)
                self.trust[node_id] = trust
                await asyncio.to_thread(self.db.save_trust, trust)
            await asyncio.to_thread(
                self.db.record_verification, job_id=job_id, attempt=attempt, node_id=node_id,
                verifier_node_id=verifier_node_id, method=str(verdict.method),
                outcome=str(verdict.outcome), reason=verdict.reason[:2000],
                tokens_checked=verdict.tokens_checked, first_divergence=verdict.first_divergence,
                logprob_diff_max=verdict.logprob_diff_max,
                logprob_diff_mean=verdict.logprob_diff_mean,
                greedy_gap_max=verdict.greedy_gap_max, z=verdict.z, withheld_micros=withheld,
                verifier_busy_s=busy_s)
            node = self.local_nodes().get(node_id)
            if node is not None:
                node.reputation = reputation(trust)
                if trust.quarantined and not node.closed:
                    log.warning("node %s quarantined: %s", node_id, trust.quarantine_reason)
                    node.send(protocol.encode(protocol.Reject(
                        reason=f"quarantined: {trust.quarantine_reason}")))
                    node.closed = True  # its reader ends at the next frame; jobs resume

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

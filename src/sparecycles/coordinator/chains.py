"""Chains, driven from here: one request served by several nodes, each holding some layers.

Nodes dial out, so they cannot reach each other; the coordinator drives every chain over the
sockets it has. For each step (a chunk of the prompt, then one token at a time) it sends the
first stage the token ids, each later stage the hidden states the stage before it returned, and
the last stage chooses the next token, which goes to the client exactly as a whole-model node's
would (``job.events``). Each stage keeps the KV cache of its own layers for the sequence.

Repair. The coordinator keeps every input each stage has received (token ids, or activations as
they came over the wire), as Petals' client does. When a stage's node leaves, goes silent for
``stage_step_s_max``, answers an error or a malformed activation, the chain is repaired: a new
segment of nodes covering that stage's layers is planned (``scheduling/chains.plan_segment``,
without the nodes that failed the job), its caches are rebuilt by sending it those inputs again
(merged into as few messages as the size bound allows), and the step that failed is retried on
it. The stages before and after keep their caches, so the client's stream continues with no
token repeated or lost. A chain that cannot be repaired within ``stage_repairs_max`` or the
placement wait ends the job as a whole-model job that lost its node for good does: charged for
the tokens delivered, its hold voided when there were none.

Money. Each stage is an attempt of the job (``jobs.Attempt`` with ``layers`` and ``work_ppm``),
written to the job's attempts like a whole-model node's (its ``job_attempts`` row carries its
layers and ``work_ppm``, which the dashboard and the cost report read); the settlement splits
the owners' part of the charge over them by tokens processed times the bytes their layers read
per token, in the job's one settlement transaction (``ledger/pricing.split_charge``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sparecycles import limits, protocol
from sparecycles.coordinator.fleet_node import FleetNode
from sparecycles.coordinator.jobs import Attempt, JobEvent, JobEventKind, LiveJob
from sparecycles.errors import JobFailed, SpareCyclesError
from sparecycles.scheduling import chains as planner
from sparecycles.types import AttemptOutcome, JobState, ModelSpec, NodeSnapshot

if TYPE_CHECKING:
    from sparecycles.coordinator.writer import StoreWriter
    from sparecycles.scheduling.scheduler import SchedulerConfig
    from sparecycles.store import Store


class Now(Protocol):
    """One reading of dispatch's clocks (``dispatch.Now``)."""

    @property
    def epoch_s(self) -> float: ...

    @property
    def mono_s(self) -> float: ...

    @property
    def perf_s(self) -> float: ...


class ChainHost(Protocol):
    """What a chain needs of dispatch (which satisfies it; dispatch imports this module)."""

    models: dict[str, ModelSpec]
    placement_wait_s: float
    writer: StoreWriter
    store: Store
    config: SchedulerConfig

    @property
    def clock(self) -> Callable[[], Now]: ...

    def node(self, node_id: str) -> FleetNode | None: ...

    def all_nodes(self) -> list[FleetNode]: ...

    def _finish_soon(self, job: LiveJob, now: Any, *, finish_reason: str | None = None,
                     error: SpareCyclesError | None = None, cancelled_by: str | None = None
                     ) -> asyncio.Future[None] | None: ...

def eligible(snapshots: list[NodeSnapshot], job: LiveJob, config: SchedulerConfig
             ) -> list[NodeSnapshot]:
    """The nodes a stage of ``job`` may run on, by reputation as the scheduler's rule for
    whole-model nodes (``reputation_min``; ``trusted_reputation_min`` for trusted-only jobs)."""
    least = config.trusted_reputation_min if job.trusted_only else config.reputation_min
    return [s for s in snapshots if s.reputation >= least]


log = logging.getLogger("sparecycles.coordinator.chains")
repair_poll_s = 0.1  # how often a repair looks again for a node to replace a stage with


class StageFailed(Exception):
    """One stage's step did not complete: the node left, went silent or answered badly."""

    def __init__(self, message: str, outcome: AttemptOutcome = AttemptOutcome.FAILED) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.stage: _Stage | None = None  # set where a repair's rebuild failed


StageInput = list[int] | protocol.Activation  # token ids (first stage) or hidden states


@dataclass
class _Stage:
    first: int
    end: int
    node: FleetNode
    attempt: Attempt
    sequence_id: str
    inputs: list[StageInput] = field(default_factory=list)  # every input it has completed
    # what it answered to each of them (a stage that is not the last): a spot check re-runs the
    # inputs elsewhere and compares (coordinator/verification_chains.py)
    outputs: list[protocol.Activation] = field(default_factory=list)
    positions: int = 0  # positions in its cache (the sum of its inputs' lengths)
    lost: AttemptOutcome | None = None  # its node left (or its host replica died): why


def _length(inp: StageInput) -> int:
    return len(inp) if isinstance(inp, list) else inp.shape[0]


def positions_per_message(spec: ModelSpec) -> int:
    """Positions of one step whose hidden states (float32) fit one message."""
    return max(1, limits.activation_bytes_max // (spec.hidden_size * 4))


def merged_inputs(inputs: Sequence[StageInput],
                  token_positions_max: int = limits.activation_positions_max) -> list[StageInput]:
    """``inputs`` joined into as few messages as ``activation_bytes_max`` allows, in order:
    the inputs a replacement stage rebuilds its cache from. Token ids are joined up to
    ``token_positions_max`` per message: the positions whose hidden states fit one message."""
    out: list[StageInput] = []
    for inp in inputs:
        last = out[-1] if out else None
        if isinstance(inp, list) and isinstance(last, list):
            if len(last) + len(inp) <= token_positions_max:
                out[-1] = last + inp
                continue
        elif (isinstance(inp, protocol.Activation) and isinstance(last, protocol.Activation)
              and inp.dtype == last.dtype and inp.shape[1] == last.shape[1]):
            rows = last.shape[0] + inp.shape[0]
            size = rows * inp.shape[1] * protocol.activation_itemsize[inp.dtype]
            if rows <= limits.activation_positions_max and size <= limits.activation_bytes_max:
                out[-1] = protocol.Activation(dtype=inp.dtype, shape=(rows, inp.shape[1]),
                                              data=protocol.b64(last.raw() + inp.raw()))
                continue
        out.append(inp)
    return out


class ChainRun:
    """One job driven through a chain of stages."""

    def __init__(self, registry: ChainRegistry, job: LiveJob, spec: ModelSpec) -> None:
        self.registry, self.job, self.spec = registry, job, spec
        self.stages: list[_Stage] = []
        self.history: list[_Stage] = []  # every stage it opened, replaced ones too (spot checks)
        self.step = 0
        self.repairs = 0
        self.task: asyncio.Task[None] | None = None
        self.repair_s: list[float] = []  # loss to the next completed step, per repair
        self.repair_started_mono_s: float | None = None

    @property
    def d(self) -> ChainHost:
        return self.registry.dispatcher

    # ---- stages --------------------------------------------------------------------------------

    def _open(self, node: FleetNode, first: int, end: int, now: Now) -> _Stage:
        job = self.job
        number = len(job.attempts) + 1
        att = Attempt(number=number, node_id=node.node_id, owner_id=node.owner_id,
                      device_class=node.profile.device_class, token_base=len(job.generated),
                      started_mono_s=now.mono_s, last_token_mono_s=now.mono_s,
                      layers=(first, end), work_ppm=planner.stage_work_ppm(self.spec, first, end))
        job.attempts.append(att)
        node.jobs.add(job.job_id)
        stage = _Stage(first, end, node, att, f"{job.job_id}.{number}")
        self.registry.sequences[stage.sequence_id] = stage
        self.history.append(stage)
        self.d.writer.background(self.d.store.start_attempt, job_id=job.job_id, attempt=number,
                                 node_id=node.node_id,
                                 prompt_tokens=len(job.prompt_ids) + att.token_base,
                                 layers=(first, end), work_ppm=att.work_ppm)
        return stage

    def _close(self, stage: _Stage, outcome: AttemptOutcome, now: Now) -> None:
        node, att = stage.node, stage.attempt
        node.jobs.discard(self.job.job_id)
        self.registry.sequences.pop(stage.sequence_id, None)
        self.registry.waiters.pop(stage.sequence_id, None)
        if not node.closed:
            node.send(protocol.encode(protocol.StageRelease(sequence_id=stage.sequence_id,
                                                            model=self.job.model)))
        self.d.writer.background(
            self.d.store.end_attempt, self.job.job_id, att.number, outcome=str(outcome),
            completion_tokens=att.tokens, busy_s=att.busy_s,
            # a stage meters no energy: its busy seconds at the device's busy power, as a node
            # without a power counter estimates its own (node/energy.py)
            energy_j=att.busy_s * max(0.0, node.profile.power_busy_w), energy_source="estimated",
            time_to_first_token_s=(att.first_token_mono_s - att.started_mono_s)
            if att.first_token_mono_s else None,
            total_s=now.mono_s - att.started_mono_s)

    def start(self, plan: planner.ChainPlan, now: Now) -> None:
        for sp in plan.stages:
            node = self.d.node(sp.node_id)
            assert node is not None
            self.stages.append(self._open(node, sp.first, sp.end, now))
        self.job.state = JobState.PLACED
        self.task = asyncio.get_running_loop().create_task(
            self._drive(), name=f"chain-{self.job.job_id}")

    # ---- the drive -----------------------------------------------------------------------------

    async def _drive(self) -> None:
        job = self.job
        try:
            finish = await self._generate()
        except asyncio.CancelledError:
            raise
        except JobFailed as exc:
            self._end_all(AttemptOutcome.FAILED)
            await self._finish(error=exc)
            return
        except Exception as exc:  # a bug: the job fails cleanly, the coordinator goes on
            log.exception("chain of job %s failed", job.job_id)
            self._end_all(AttemptOutcome.FAILED)
            await self._finish(error=JobFailed(f"the chain failed: {exc}"))
            return
        if finish is None:  # the job ended elsewhere (cancelled by its client)
            return
        self._end_all(AttemptOutcome.DONE)
        await self._finish(finish_reason=finish)

    async def _finish(self, **kw: object) -> None:
        if self.job.state.is_final:
            return
        ending = self.d._finish_soon(self.job, self.d.clock(), **kw)  # type: ignore[arg-type]
        if ending is not None:
            await ending

    def _end_all(self, outcome: AttemptOutcome) -> None:
        now = self.d.clock()
        for stage in self.stages:
            self._close(stage, outcome, now)
        self.stages = []

    async def _generate(self) -> str | None:
        """Prefill, then decode until a stop; the finish reason (None: ended from outside)."""
        job, spec = self.job, self.spec
        context = job.prompt_ids + job.generated
        chunk = positions_per_message(spec)
        pieces = [context[i : i + chunk] for i in range(0, len(context), chunk)]
        token, eos = -1, False
        for k, piece in enumerate(pieces):
            token, eos = await self._through(list(piece), choose=k == len(pieces) - 1)
        while True:
            if job.state.is_final:
                return None
            if eos:
                return "stop"
            self._deliver(token)
            if len(job.generated) >= job.sampling.max_tokens:
                return "length"
            if len(job.prompt_ids) + len(job.generated) >= spec.context_length:
                return "length"
            token, eos = await self._through([token], choose=True)

    def _deliver(self, token: int) -> None:
        job, now = self.job, self.d.clock()
        job.generated.append(token)
        for stage in self.stages:
            att = stage.attempt
            att.tokens += 1
            att.logprobs.append(None)
            att.last_token_mono_s = now.mono_s
            if att.first_token_mono_s is None:
                att.first_token_mono_s = now.mono_s
        if job.first_token_mono_s is None:
            job.first_token_mono_s = now.mono_s
            job.state = JobState.STREAMING
        job.events.put_nowait(JobEvent(JobEventKind.TOKENS, (token,), at_perf_s=now.perf_s))

    async def _through(self, token_ids: list[int], *, choose: bool) -> tuple[int, bool]:
        """One step through every stage: (the token chosen, whether it ends the sequence)."""
        inp: StageInput = token_ids
        out: protocol.StageOutput | None = None
        i = 0
        while i < len(self.stages):
            if self.job.state.is_final:
                raise asyncio.CancelledError
            stage = self.stages[i]
            last = i == len(self.stages) - 1
            try:
                out = await self._step(stage, inp, choose=choose and last, last=last)
            except StageFailed as exc:
                await self._repair(i, exc)  # replaces stage i (by one or more); retry there
                continue
            stage.inputs.append(inp)
            stage.positions += _length(inp)
            stage.attempt.busy_s += out.busy_s
            if not last:
                assert out.hidden is not None
                stage.outputs.append(out.hidden)
                inp = out.hidden
            i += 1
        self.step += 1
        if self.repair_started_mono_s is not None:
            self.repair_s.append(self.d.clock().mono_s - self.repair_started_mono_s)
            self.repair_started_mono_s = None
        assert out is not None
        if not choose:
            return -1, False
        assert out.token is not None
        return out.token, out.eos

    async def _step(self, stage: _Stage, inp: StageInput, *, choose: bool, last: bool
                    ) -> protocol.StageOutput:
        """Send one input to one stage and wait for its checked answer."""
        job = self.job
        if stage.lost is not None:
            raise StageFailed("its node left", stage.lost)
        msg = protocol.StageForward(
            sequence_id=stage.sequence_id, model=job.model, step=next(self.registry.steps),
            start=stage.positions,
            token_ids=inp if isinstance(inp, list) else None,
            hidden=inp if isinstance(inp, protocol.Activation) else None,
            choose=protocol.Sampling(max_tokens=max(1, job.sampling.max_tokens),
                                     temperature=job.sampling.temperature,
                                     top_p=job.sampling.top_p, seed=job.sampling.seed)
            if choose else None)
        out = await self.registry.exchange(stage.node, msg)
        if out.error is not None:
            raise StageFailed(f"it answered: {out.error[:200]}")
        n = _length(inp)
        if last:
            if choose and (out.token is None or out.token >= self.registry.vocab_of(job.model)):
                raise StageFailed("it answered no valid token", AttemptOutcome.PROTOCOL_GAP)
        elif out.hidden is None or out.hidden.shape != (n, self.spec.hidden_size):
            raise StageFailed(f"its activation is not {n} x {self.spec.hidden_size}",
                              AttemptOutcome.PROTOCOL_GAP)
        return out

    # ---- repair --------------------------------------------------------------------------------

    async def _repair(self, i: int, why: StageFailed) -> None:
        """Replace stage ``i`` by a segment of other nodes holding its layers, rebuilt from the
        inputs it had completed; raises JobFailed when that cannot be done in time."""
        job = self.job
        old = self.stages.pop(i)
        now = self.d.clock()
        if self.repair_started_mono_s is None:
            self.repair_started_mono_s = now.mono_s
        log.warning("job %s: stage %d:%d on node %s failed (%s); repairing", job.job_id,
                    old.first, old.end, old.node.node_id, why)
        self._close(old, why.outcome, now)
        failed: _Stage | None = old
        outcome = why.outcome
        while True:
            if failed is not None:
                if outcome is not AttemptOutcome.REPLICA_LOST:  # not the node's fault: it may
                    job.avoid_nodes.add(failed.node.node_id)  # serve again via another replica
                self.repairs += 1
                self.registry.repairs += 1
                if self.repairs > limits.stage_repairs_max:
                    raise JobFailed(f"the chain lost a stage {self.repairs} times; giving up")
            plan = await self._plan_replacement(old)
            now = self.d.clock()
            fresh = []
            for sp in plan.stages:
                node = self.d.node(sp.node_id)
                assert node is not None
                fresh.append(self._open(node, sp.first, sp.end, now))
            try:
                await self._rebuild(fresh, old.inputs)
            except StageFailed as exc:
                failed, outcome = exc.stage, exc.outcome
                for stage in fresh:
                    self._close(stage, exc.outcome if stage is failed else
                                AttemptOutcome.CANCELLED, self.d.clock())
                continue
            self.stages[i:i] = fresh
            return

    async def _plan_replacement(self, old: _Stage) -> planner.ChainPlan:
        job = self.job
        deadline = self.d.clock().mono_s + self.d.placement_wait_s
        while True:
            if job.state.is_final:
                raise asyncio.CancelledError
            in_chain = {s.node.node_id for s in self.stages}
            snapshots = eligible([n.snapshot(self.d.clock().epoch_s) for n in self.d.all_nodes()
                                  if not n.closed and not n.draining], job, self.d.config)
            plan = planner.plan_segment(
                self.spec, snapshots, old.first, old.end,
                context_tokens=len(job.prompt_ids) + len(job.generated),
                avoid=job.avoid_nodes | in_chain)
            if plan is not None:
                return plan
            if self.d.clock().mono_s > deadline:
                log.warning("job %s: no replacement for %d:%d among %s (avoiding %s)",
                            job.job_id, old.first, old.end,
                            [(n.node_id, n.layer_ranges, n.available, n.active_jobs)
                             for n in snapshots], sorted(job.avoid_nodes | in_chain))
                raise JobFailed(f"no node holds layers {old.first}:{old.end} to replace the "
                                "stage that left")
            await asyncio.sleep(repair_poll_s)

    async def _rebuild(self, fresh: list[_Stage], inputs: list[StageInput]) -> None:
        """Fill the new stages' caches: the old stage's inputs through them, stage by stage,
        merged into as few messages as the size bound allows."""
        per_message = positions_per_message(self.spec)
        xs = merged_inputs(inputs, per_message)
        for stage in fresh:
            last = stage.end == self.spec.n_layers
            outs: list[StageInput] = []
            for x in xs:
                try:
                    out = await self._step(stage, x, choose=False, last=last)
                except StageFailed as exc:
                    exc.stage = stage
                    raise
                stage.inputs.append(x)
                stage.positions += _length(x)
                stage.attempt.busy_s += out.busy_s
                if out.hidden is not None:
                    stage.outputs.append(out.hidden)
                    outs.append(out.hidden)
            xs = merged_inputs(outs, per_message)

    def cancel(self) -> None:
        """The job ended from outside (its client left, the coordinator stops)."""
        if self.task is not None:
            self.task.cancel()
        self._end_all(AttemptOutcome.CANCELLED)


class ChainRegistry:
    """Every chain this coordinator drives, and the answers its stages send."""

    def __init__(self, dispatcher: ChainHost, *,
                 step_timeout_s: float = limits.stage_step_s_max) -> None:
        self.dispatcher = dispatcher
        self.step_timeout_s = step_timeout_s
        self.runs: dict[str, ChainRun] = {}  # by job id
        self.sequences: dict[str, _Stage] = {}  # every open stage, by its sequence id
        # the step each sequence waits on (a chain's stage, or a spot check's), the node it asked
        self.waiters: dict[str, tuple[int, asyncio.Future[protocol.StageOutput], FleetNode]] = {}
        self.steps = itertools.count()
        self.vocab_sizes: dict[str, int] = {}  # model -> tokenizer vocabulary (tokens checked)
        self.repairs = 0
        self.repair_s: list[float] = []  # the last repairs' times, loss to the next step
        # a chain also for a model whole-model nodes serve, when predicted faster by this factor
        # (settings ``chains_when_faster``, ``chain_speedup_min``)
        self.when_faster = True
        self.speedup_min = planner.chain_speedup_min_default

    def vocab_of(self, model: str) -> int:
        return self.vocab_sizes.get(model, 1 << 31)

    def plan_for(self, job: LiveJob, snapshots: list[NodeSnapshot]) -> planner.ChainPlan | None:
        """The chain ``job`` should be served by now, or None (a whole-model node serves it, or
        no chain covers its model).

        A chain is chosen when no node serves the model whole; and, with ``when_faster``, also
        when whole-model nodes could serve it but the chain's predicted token time is at least
        ``speedup_min`` times shorter than the best of them (``planner.chain_is_faster``). The
        whole-model nodes compared are those the job may use (eligible by reputation, available,
        not draining, not among the nodes that failed it), busy or not: a chain is not chosen
        because the whole nodes are full, only because it is faster."""
        spec = self.dispatcher.models.get(job.model)
        if spec is None or not any(job.model in s.layer_ranges for s in snapshots):
            return None
        nodes = eligible(snapshots, job, self.dispatcher.config)
        whole: list[NodeSnapshot] = []
        if any(job.model in s.models for s in snapshots):
            if not self.when_faster:
                return None
            whole = [s for s in nodes if job.model in s.models and s.available
                     and not s.draining and s.node_id not in job.avoid_nodes]
            if not whole:  # served whole, by nodes it may not use now: it waits for them
                return None
        context = len(job.prompt_ids) + len(job.generated)
        plan = planner.plan_chain(spec, nodes, context_tokens=context, avoid=job.avoid_nodes)
        if plan is None or not planner.chain_is_faster(plan, spec, whole, context,
                                                       self.speedup_min):
            return None
        return plan

    def place(self, jobs: list[LiveJob], snapshots: list[NodeSnapshot], now: Now) -> list[str]:
        """Chains for the waiting jobs ``plan_for`` gives one; returns the job ids placed."""
        placed = []
        for job in jobs:
            plan = self.plan_for(job, snapshots)
            if plan is None:
                continue
            run = ChainRun(self, job, self.dispatcher.models[job.model])
            job.chain = run
            self.runs[job.job_id] = run
            run.start(plan, now)
            assert run.task is not None
            run.task.add_done_callback(functools.partial(self._forget, job.job_id))
            placed.append(job.job_id)
            busy = {sp.node_id for sp in plan.stages}
            snapshots = [s for s in snapshots if s.node_id not in busy or
                         s.active_jobs + 1 < s.jobs_max]
        return placed

    def _forget(self, job_id: str, _task: object) -> None:
        run = self.runs.pop(job_id, None)
        if run is not None:
            self.repair_s.extend(run.repair_s)
            del self.repair_s[: -100]

    async def exchange(self, node: FleetNode, msg: protocol.StageForward) -> protocol.StageOutput:
        """Send ``msg`` to ``node`` and wait for its answer (which may be an ``error``); raises
        StageFailed when the node leaves, its socket is gone or it is silent too long."""
        if node.closed:
            raise StageFailed("its node left", AttemptOutcome.NODE_LOST)
        waiter: asyncio.Future[protocol.StageOutput] = asyncio.get_running_loop().create_future()
        self.waiters[msg.sequence_id] = (msg.step, waiter, node)
        try:
            if not node.send(protocol.encode(msg)):
                raise StageFailed("its socket is gone", AttemptOutcome.NODE_LOST)
            async with asyncio.timeout(self.step_timeout_s):
                return await waiter
        except TimeoutError:
            raise StageFailed(f"silent for {self.step_timeout_s:g} s",
                              AttemptOutcome.NODE_SILENT) from None
        finally:
            if self.waiters.get(msg.sequence_id, (None,))[0] == msg.step:
                del self.waiters[msg.sequence_id]

    def on_output(self, node: FleetNode, msg: protocol.StageOutput) -> None:
        """A stage's answer: handed to the step waiting for it; a stale one is dropped."""
        waiting = self.waiters.get(msg.sequence_id)
        if waiting is None or waiting[0] != msg.step:
            return
        if waiting[2].node_id != node.node_id:
            return  # only the node that was asked may answer
        if not waiting[1].done():
            waiting[1].set_result(msg)

    def on_node_lost(self, node: FleetNode,
                     outcome: AttemptOutcome = AttemptOutcome.NODE_LOST) -> None:
        """A node left: every step waiting on it fails now, and every stage on it fails at its
        next step (their chains repair). ``REPLICA_LOST``: its host replica died or it moved to
        another; the node is not blamed."""
        for stage in self.sequences.values():
            if stage.node is node and stage.lost is None:
                stage.lost = outcome
        for _step, waiter, asked in list(self.waiters.values()):
            if asked is node and not waiter.done():
                waiter.set_exception(StageFailed("its node left", outcome))

    def on_bad_output(self, node: FleetNode, why: str) -> None:
        """An answer of ``node`` that could not be read (relayed by another replica): every
        step waiting on it fails now, as a malformed answer."""
        for _step, waiter, asked in list(self.waiters.values()):
            if asked is node and not waiter.done():
                waiter.set_exception(StageFailed(f"its answer is invalid: {why[:200]}",
                                                 AttemptOutcome.PROTOCOL_GAP))

    async def stop(self) -> None:
        for run in list(self.runs.values()):
            if run.task is not None:
                run.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await run.task

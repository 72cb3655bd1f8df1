"""Several replicas, one fleet: each replica sees the nodes connected to the others, over the bus.

A node keeps one socket to one replica (its *host*). A client's request is held by the replica it
reached (the job's *owner*), whose dispatcher may place it on any node of the fleet:

    owner replica A                          bus                       host replica B
    Dispatcher ── RemoteNode.send(assign) ──> sc.replica.B.to_node ──> NodeConn.send ──> node
    Dispatcher.on_tokens/on_done <── sc.replica.A.from_node <── Fleet.take <── node

So the owner runs the very same job lifecycle for a remote node as for a local one: the tokens
carry their attempt and index, the result is signed by the node's key, silence is resumed.

Chains cross replicas the same way (coordinator/chains.py). A node holding a range of a model's
layers is announced with its ranges, so every replica's planner may put it in a chain; the
owner's ``stage_forward`` goes to the host like any frame, and the host notes the sequence
(``_RelayedStage``) so that the node's ``stage_output`` for it goes back to the owner, until the
owner's ``stage_release`` (or the owner's death, or ``stage_idle_s_max`` unused). A host that
dies is a stage whose node left: the owner's chain repairs that stage (without holding it
against the node, which may come back through another replica).

A node's frame crosses the bus as it came: a one-line JSON header (who sends it, for which node),
a newline, then the frame's bytes, never re-escaped, so a relayed message is at most
``ws_message_bytes_max`` plus ``bus_header_bytes_max``, within ``bus_message_bytes_max`` (NATS's
default max payload); an activation is validated by the node's host on receipt (a malformed one
closes the node's socket) and again by the owner. A peer whose beat does not say it reads that
form (an older replica: ``relay_form``) is sent the frame inside one JSON object, as before.

What each replica publishes (JSON; ``sc`` is the default namespace, see
coordinator/replication/bus.py):

``sc.fleet.beat``    every ``beat_interval_s``: "I am alive" (and how many nodes I host)
``sc.fleet.up``      nodes I host (static description + state), on connect and when asked
``sc.fleet.down``    a node left me
``sc.fleet.state``   the state of my nodes that changed (load, availability, draining)
``sc.fleet.hello``   "I just met you": every replica answers by announcing all its nodes again

A replica that has not beaten for ``replica_timeout_s`` is taken for dead: the owner resumes the
jobs that were on its nodes (from the tokens already delivered, on another node), and the host
cancels the jobs it relayed for it (their clients are gone). The nodes of a dead replica dial
another replica (behind a load balancer, or from their list of coordinator URLs) and are announced
again by their new host. Replicas only publish node state once they know of another replica, so
one replica alone pays nothing for this.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from sparecycles import limits, protocol
from sparecycles.coordinator.node_conn import Backlog, NodeConn, fold_speed, profile_from_dict
from sparecycles.coordinator.replication.bus import Bus, Subscription
from sparecycles.coordinator.watch import Watched
from sparecycles.errors import ProtocolError
from sparecycles.types import AttemptOutcome, DeviceProfile, NodeSnapshot

if TYPE_CHECKING:
    from sparecycles.coordinator.fleet_node import FleetNode

log = logging.getLogger("sparecycles.coordinator.replication.fleet")

beat_interval_s = 0.5
replica_timeout_s = 3.0  # no beat for this long: the replica is taken for dead
full_state_every_s = 10.0  # resend every node's state, healing any lost update
announce_chunk = 200  # nodes per ``up`` message (NATS's default max payload is 1 MiB)
# The newest form of relayed frames this replica reads, said in each beat: 2 = a header line,
# then the frame's bytes (``pack_frame``); 1 = the frame as a string inside one JSON object (what
# older replicas read, and say nothing). Each replica reads both, and sends each peer the form
# it reads: form 1 to a peer until its beat says 2.
relay_form = 2


def subject_token(replica_id: str) -> str:
    """A replica id as one subject token (ids hold ':' and '.')."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", replica_id)


def pack_frame(header: dict[str, Any], frame: str | None) -> bytes:
    """A relayed message: the header as one line of JSON, then (if any) the frame as it is."""
    head = json.dumps(header, separators=(",", ":")).encode()
    return head if frame is None else head + b"\n" + frame.encode()


def unpack_frame(data: bytes) -> tuple[dict[str, Any], str | None]:
    """(header, frame) of a relayed message; also reads the older form, one JSON object with
    the frame inside as a string (``frame``), so replicas of both versions may share a bus."""
    head, newline, rest = data.partition(b"\n")
    if len(head) > limits.bus_header_bytes_max and newline:
        raise ProtocolError(f"relay header of {len(head)} bytes")
    header = json.loads(head)
    if not isinstance(header, dict):
        raise ProtocolError("relay header is not an object")
    if newline:
        return header, rest.decode()
    frame = header.get("frame")
    return header, frame if isinstance(frame, str) else None


_TYPE = re.compile(r'"type"\s*:\s*"([a-z_]+)"')


def frame_type(frame: str) -> str | None:
    """The ``type`` of an encoded message, read from its start (protocol.encode writes ``v``
    and ``type`` first), else from the whole frame."""
    found = _TYPE.search(frame, 0, 64)
    if found is not None:
        return found.group(1)
    with contextlib.suppress(ValueError):
        kind = orjson.loads(frame).get("type")
        return kind if isinstance(kind, str) else None
    return None


def ranges_from(desc: Any) -> dict[str, tuple[int, int]]:
    """A node's layer ranges as another replica described them (``_describe``), checked."""
    out: dict[str, tuple[int, int]] = {}
    if not isinstance(desc, dict):
        return out
    for model, rng in list(desc.items())[: limits.models_per_node_max]:
        if (isinstance(model, str) and isinstance(rng, list | tuple) and len(rng) == 2
                and all(isinstance(x, int) for x in rng) and 0 <= rng[0] < rng[1]):
            out[model] = (int(rng[0]), int(rng[1]))
    return out


@dataclass(eq=False)
class RemoteNode(Watched):
    """A node hosted by another replica, as this replica's dispatcher sees it.

    It quacks like ``NodeConn`` where the dispatcher needs it to: ``send`` goes over the bus to
    the host, and the load is the host's last report plus what this replica sent since."""

    node_id: str
    owner_id: str
    name: str
    public_key: str
    profile: DeviceProfile
    models: tuple[str, ...]
    weights: dict[str, str]
    jobs_max: int
    host: str  # the replica holding its socket
    fleet: Fleet
    jobs: set[str] = field(default_factory=set)  # this replica's jobs on it
    queued_tokens: int = 0
    backlog: Backlog = field(default_factory=Backlog)  # this replica's jobs' (node_conn.Backlog)
    draining: bool = False
    closed: bool = False
    available: bool = True
    expected_stay_s: float = float("inf")
    reputation: float = 1.0
    measured_tps: dict[str, float] = field(default_factory=dict)
    measured_batch: dict[str, float] = field(default_factory=dict)  # batch of each speed
    host_active: int = 0  # all replicas' jobs on it, as its host last said
    host_queued: int = 0
    sent_since_report: int = 0  # jobs this replica placed on it since that report
    features: frozenset[str] = frozenset()  # protocol.FEATURE_* from its hello
    layer_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)  # stages it holds
    _snap: tuple[tuple[Any, ...], NodeSnapshot] | None = None  # (inputs, snapshot)
    is_local = False

    def send(self, frame: str) -> bool:
        """False when the node is gone, or the frame cannot cross the bus (too large)."""
        if self.closed:
            return False
        return self.fleet.to_node(self, frame)

    async def stop(self) -> None:
        self.closed = True

    def observe_speed(self, model: str, tokens_per_s: float, batch: int | None = None) -> None:
        """As ``NodeConn.observe_speed``: the batch is the node's jobs now, as far as known."""
        fold_speed(self.measured_tps, self.measured_batch, model, tokens_per_s,
                   batch or max(1, self.host_active, len(self.jobs)))
        self.changed("measured_tps")

    def apply_state(self, state: list[Any]) -> None:
        active, queued, available, stay, draining, reputation, tps, *more = state
        for model, batch in (more[0] if more else {}).items():
            self.measured_batch.setdefault(model, float(batch))
        self.host_active, self.host_queued = int(active), int(queued)
        self.available, self.draining = bool(available), bool(draining)
        self.expected_stay_s = float("inf") if stay is None else float(stay)
        self.reputation = float(reputation)
        for model, speed in (tps or {}).items():
            self.measured_tps.setdefault(model, float(speed))
        self.sent_since_report = 0
        self.changed("measured_tps")

    def snapshot(self, now_epoch_s: float) -> NodeSnapshot:
        """The scheduler's view of the node: reused while its inputs are unchanged (the host's
        reports carry no clock), so placement's memo of scores finds it again."""
        inputs = (self.host_active, self.sent_since_report, len(self.jobs), self.host_queued,
                  self.queued_tokens, self.available, self.draining, self.expected_stay_s,
                  self.reputation, self.backlog.totals(self.jobs))
        cached = self._snap
        if (cached is not None and cached[0] == inputs
                and cached[1].measured_decode_tokens_per_s == self.measured_tps
                and cached[1].measured_decode_batch == self.measured_batch):
            return cached[1]
        snap = self._build_snapshot()
        self._snap = (inputs, snap)
        return snap

    def _build_snapshot(self) -> NodeSnapshot:
        prefill_tokens, kv_tokens = self.backlog.totals(self.jobs)
        return NodeSnapshot(
            node_id=self.node_id,
            owner_id=self.owner_id,
            profile=self.profile,
            models=self.models,
            active_jobs=max(self.host_active + self.sent_since_report, len(self.jobs)),
            jobs_max=self.jobs_max,
            queued_tokens=max(self.host_queued, self.queued_tokens),
            prefill_backlog_tokens=prefill_tokens,
            kv_reserved_tokens=kv_tokens,
            measured_decode_tokens_per_s=dict(self.measured_tps),
            measured_decode_batch=dict(self.measured_batch),
            available=self.available and not self.draining,
            expected_stay_s=self.expected_stay_s,
            reputation=self.reputation,
            draining=self.draining,
            relayed=True,
            features=self.features,
            layer_ranges=dict(self.layer_ranges),
        )


@dataclass
class _Relayed:
    """A job this replica relays between its node and the job's owner replica."""

    owner: str
    node_id: str
    attempt: int
    remaining: int  # tokens the node may still send (its queued_tokens share)


@dataclass
class _RelayedStage:
    """A chain's stage sequence on this replica's node, driven by another replica (the owner)."""

    owner: str
    node_id: str
    model: str
    used_mono_s: float  # its last frame either way: unused for stage_idle_s_max, it is dropped


def _state_of(node: NodeConn, now_epoch_s: float) -> list[Any]:
    snap = node.snapshot(now_epoch_s)
    stay = None if snap.expected_stay_s == float("inf") else round(snap.expected_stay_s, 1)
    return [snap.active_jobs, snap.queued_tokens, snap.available, stay, snap.draining,
            round(snap.reputation, 4),
            {m: round(v, 2) for m, v in snap.measured_decode_tokens_per_s.items()},
            {m: round(v, 2) for m, v in snap.measured_decode_batch.items()}]


def _describe(node: NodeConn) -> dict[str, Any]:
    return {"id": node.node_id, "owner": node.owner_id, "name": node.name,
            "key": node.public_key, "profile": asdict(node.profile), "models": list(node.models),
            "weights": node.weights, "jobs_max": node.jobs_max,
            "features": sorted(node.features),
            "layers": {m: list(r) for m, r in node.layer_ranges.items()}}


class FleetDispatch(Protocol):
    """What the fleet needs of dispatch (``Dispatcher`` satisfies it): the nodes of this replica
    and of the others, told when a node comes or goes, and the messages of relayed nodes."""

    nodes: dict[str, NodeConn]
    remote: dict[str, FleetNode]

    def on_node_ready(self, node: FleetNode) -> None: ...

    async def on_node_lost(self, node: FleetNode, *,
                           outcome: AttemptOutcome = ...) -> None: ...

    def on_tokens(self, node: FleetNode, msg: protocol.Tokens) -> None: ...

    def done_received(self, node: FleetNode,
                      msg: protocol.Done) -> asyncio.Future[None] | None: ...  # fmt: skip

    async def on_job_error(self, node: FleetNode, msg: protocol.JobError) -> None: ...

    @property
    def chains(self) -> StageAnswers: ...


class StageAnswers(Protocol):
    """Where the answers of relayed stages go (coordinator/chains.ChainRegistry)."""

    def on_output(self, node: FleetNode, msg: protocol.StageOutput) -> None: ...

    def on_bad_output(self, node: FleetNode, why: str) -> None: ...


class Fleet:
    """This replica's end of the fleet: announces its nodes, tracks the others', relays jobs."""

    def __init__(self, bus: Bus, replica_id: str, dispatcher: FleetDispatch) -> None:
        self.bus, self.replica_id, self.dispatcher = bus, replica_id, dispatcher
        self.me = subject_token(replica_id)
        self.ns = bus.namespace  # subjects: <ns>.fleet.*, <ns>.replica.<id>.*
        self.peers: dict[str, float] = {}  # replica token -> monotonic time of its last beat
        self.peer_names: dict[str, str] = {}  # replica token -> replica id
        self.peer_forms: dict[str, int] = {}  # replica token -> the relay form it reads
        self.relayed: dict[str, _Relayed] = {}  # job id -> where its node's messages go
        self.stages: dict[str, _RelayedStage] = {}  # sequence id -> where its answers go
        self._sent_state: dict[str, list[Any]] = {}
        self._last_full_s = 0.0
        self._outbox: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._subs: list[Subscription] = []
        self._tasks: list[asyncio.Task[None]] = []

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self.bus.connect()
        handlers = {
            f"{self.ns}.fleet.beat": self._on_beat,
            f"{self.ns}.fleet.hello": self._on_hello,
            f"{self.ns}.fleet.up": self._on_up,
            f"{self.ns}.fleet.down": self._on_down,
            f"{self.ns}.fleet.state": self._on_state,
            f"{self.ns}.replica.{self.me}.to_node": self._on_to_node,
            f"{self.ns}.replica.{self.me}.from_node": self._on_from_node,
        }
        for subject, handler in handlers.items():
            self._subs.append(await self.bus.subscribe(subject, handler))
        self._tasks = [asyncio.create_task(self._send_loop(), name="fleet-send"),
                       asyncio.create_task(self._beat_loop(), name="fleet-beat")]
        self._publish(f"{self.ns}.fleet.hello", {"r": self.me})

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await self.bus.close()

    def _remote(self, node_id: str) -> RemoteNode | None:
        """The dispatcher's node of another replica (all of them are this fleet's)."""
        node = self.dispatcher.remote.get(node_id)
        return node if isinstance(node, RemoteNode) else None

    @property
    def connected(self) -> bool:
        return self.bus.connected

    def peer_ids(self) -> set[str]:
        """Replicas heard on the bus lately (by id)."""
        return {self.peer_names.get(t, t) for t in self.peers}

    def _publish(self, subject: str, body: dict[str, Any]) -> None:
        """Queue a message; one task publishes in order (the dispatcher never awaits the bus)."""
        self._outbox.put_nowait((subject, json.dumps(body, separators=(",", ":")).encode()))

    def _publish_frame(self, peer: str, box: str, header: dict[str, Any], frame: str | None
                       ) -> bool:
        """Queue a relayed frame for replica ``peer`` (its ``to_node`` or ``from_node``): as
        ``pack_frame`` makes it, or in the older form to a peer whose beat does not say it
        reads that (``relay_form``); False, and nothing sent, when it would exceed
        ``bus_message_bytes_max`` (a NATS server refuses it)."""
        subject = f"{self.ns}.replica.{peer}.{box}"
        if self.peer_forms.get(peer, 1) >= 2:  # one whose beat was not heard yet: form 1
            data = pack_frame(header, frame)
        else:
            data = json.dumps(header if frame is None else {**header, "frame": frame},
                              separators=(",", ":")).encode()
        if len(data) > limits.bus_message_bytes_max:
            log.error("a %s frame of %d bytes exceeds the bus's %d: not sent to %s",
                      frame_type(frame or "") or "?", len(data), limits.bus_message_bytes_max,
                      subject)
            return False
        self._outbox.put_nowait((subject, data))
        return True

    async def _send_loop(self) -> None:
        while True:
            subject, data = await self._outbox.get()
            try:
                await self.bus.publish(subject, data)
            except Exception as exc:  # the bus is down: the message is lost, as on NATS
                log.warning("bus publish to %s failed: %s", subject, exc)

    # ---- this replica's nodes ----------------------------------------------------------------

    def local_up(self, node: NodeConn) -> None:
        if self.peers:
            self._announce([node])

    def local_down(self, node: NodeConn) -> None:
        self._sent_state.pop(node.node_id, None)
        for job_id, rel in list(self.relayed.items()):
            if rel.node_id == node.node_id:  # the owner resumes it when it hears of the loss
                del self.relayed[job_id]
        for seq, stage in list(self.stages.items()):
            if stage.node_id == node.node_id:  # the owner repairs its chain when it hears
                del self.stages[seq]
        if self.peers:
            self._publish(f"{self.ns}.fleet.down", {"r": self.me, "id": node.node_id})

    def _announce(self, nodes: list[NodeConn]) -> None:
        now = time.time()
        for i in range(0, len(nodes), announce_chunk):
            chunk = nodes[i:i + announce_chunk]
            self._publish(f"{self.ns}.fleet.up", {"r": self.me, "nodes": [
                {**_describe(n), "state": _state_of(n, now)} for n in chunk]})
            for n in chunk:
                self._sent_state[n.node_id] = _state_of(n, now)

    async def _beat_loop(self) -> None:
        while True:
            try:
                self._publish(f"{self.ns}.fleet.beat", {"r": self.me, "id": self.replica_id,
                                                "nodes": len(self.dispatcher.nodes),
                                                "relay": relay_form})
                self._expire_peers()
                self._expire_stages(time.monotonic())
                if self.peers:
                    self._publish_state()
            except Exception:
                log.exception("fleet beat failed")
            await asyncio.sleep(beat_interval_s)

    def _publish_state(self) -> None:
        now_epoch, now = time.time(), time.monotonic()
        full = now - self._last_full_s >= full_state_every_s
        if full:
            self._last_full_s = now
        changed: dict[str, list[Any]] = {}
        for node in list(self.dispatcher.nodes.values()):
            if node.closed:
                continue
            state = _state_of(node, now_epoch)
            if full or self._sent_state.get(node.node_id) != state:
                changed[node.node_id] = state
                self._sent_state[node.node_id] = state
        items = list(changed.items())
        for i in range(0, len(items), announce_chunk * 5):
            self._publish(f"{self.ns}.fleet.state", {"r": self.me,
                                             "nodes": dict(items[i:i + announce_chunk * 5])})

    # ---- the other replicas ------------------------------------------------------------------

    async def _on_beat(self, _subject: str, data: bytes) -> None:
        body = json.loads(data)
        peer = body["r"]
        if peer == self.me:
            return
        new = peer not in self.peers
        self.peers[peer] = time.monotonic()
        self.peer_names[peer] = body.get("id", peer)
        self.peer_forms[peer] = int(body.get("relay", 1))
        if new:  # a replica we did not know (or had given up on): exchange fleets
            log.info("replica %s joined", peer)
            self._publish(f"{self.ns}.fleet.hello", {"r": self.me})
            self._announce(list(self.dispatcher.nodes.values()))

    async def _on_hello(self, _subject: str, data: bytes) -> None:
        peer = json.loads(data)["r"]
        if peer == self.me:
            return
        if peer not in self.peers:
            self.peers[peer] = time.monotonic()
        self._announce(list(self.dispatcher.nodes.values()))

    async def _on_up(self, _subject: str, data: bytes) -> None:
        body = json.loads(data)
        host = body["r"]
        if host == self.me:
            return
        self.peers.setdefault(host, time.monotonic())
        d = self.dispatcher
        for desc in body["nodes"]:
            node_id = desc["id"]
            if node_id in d.nodes:
                continue  # its socket is here: a stale announcement from its old host
            old = self._remote(node_id)
            if old is not None and old.host == host:  # announced again (its socket may be new)
                old.models, old.weights = tuple(desc["models"]), dict(desc["weights"])
                old.layer_ranges = ranges_from(desc.get("layers"))
                old.apply_state(desc["state"])
                continue
            if old is not None:  # it moved to another replica: its jobs there are gone
                await old.stop()
                await d.on_node_lost(old, outcome=AttemptOutcome.REPLICA_LOST)
            remote = RemoteNode(
                node_id=node_id, owner_id=desc["owner"], name=desc["name"],
                public_key=desc["key"], profile=profile_from_dict(desc["profile"]),
                models=tuple(desc["models"]), weights=dict(desc["weights"]),
                jobs_max=int(desc["jobs_max"]), host=host, fleet=self,
                features=frozenset(desc.get("features", ())),
                layer_ranges=ranges_from(desc.get("layers")))
            remote.apply_state(desc["state"])
            d.on_node_ready(remote)

    async def _on_down(self, _subject: str, data: bytes) -> None:
        body = json.loads(data)
        node = self._remote(body["id"])
        if node is not None and node.host == body["r"]:
            await node.stop()
            await self.dispatcher.on_node_lost(node)

    async def _on_state(self, _subject: str, data: bytes) -> None:
        body = json.loads(data)
        host = body["r"]
        if host == self.me:
            return
        for node_id, state in body["nodes"].items():
            node = self._remote(node_id)
            if node is not None and node.host == host:
                was_available = node.available and not node.draining
                node.apply_state(state)
                if not was_available and node.available and not node.draining:
                    self.dispatcher.on_node_ready(node)

    def _expire_peers(self) -> None:
        now = time.monotonic()
        for peer, seen in list(self.peers.items()):
            if now - seen > replica_timeout_s:
                del self.peers[peer]
                log.warning("replica %s silent for %.1f s: taken for dead", peer, now - seen)
                asyncio.get_running_loop().create_task(self._peer_lost(peer))

    async def _peer_lost(self, peer: str) -> None:
        d = self.dispatcher
        gone = [n for n in d.remote.values() if isinstance(n, RemoteNode) and n.host == peer]
        for node in gone:  # all of them at once: a chain's repair must not pick the next one
            await node.stop()
        for node in gone:  # its jobs resume elsewhere, its chains' stages are repaired
            await d.on_node_lost(node, outcome=AttemptOutcome.REPLICA_LOST)
        for job_id, rel in list(self.relayed.items()):
            if rel.owner == peer:  # the client was there; nobody will read these tokens
                self._cancel_relayed(job_id, rel)
        for seq, stage in list(self.stages.items()):
            if stage.owner == peer:  # its chain died with it: the node may drop the cache
                self._release_stage(seq, stage)

    # ---- relaying jobs -----------------------------------------------------------------------

    def to_node(self, node: RemoteNode, frame: str) -> bool:
        """Owner side: a frame for a node another replica hosts; False if it cannot be sent."""
        if not self._publish_frame(node.host, "to_node",
                                   {"r": self.me, "node": node.node_id}, frame):
            return False
        if frame_type(frame) == "job":
            node.sent_since_report += 1
        return True

    async def _on_to_node(self, _subject: str, data: bytes) -> None:
        """Host side: pass a frame from the job's owner to the node, and note where its
        answers go."""
        body, frame = unpack_frame(data)
        owner, node_id = str(body["r"]), str(body["node"])
        if frame is None:
            return
        node = self.dispatcher.nodes.get(node_id)
        msg = orjson.loads(frame)
        job_id, kind = msg.get("job_id"), msg.get("type")
        if node is None or node.closed:
            # the node left this replica: the owner must resume at once, not wait for silence
            self._publish_frame(owner, "from_node",
                                {"r": self.me, "node": node_id, "lost": True}, None)
            return
        if kind in ("stage_forward", "stage_release") and not self._note_stage(owner, node, msg):
            return
        if kind == "job" and job_id:
            remaining = int(msg.get("sampling", {}).get("max_tokens", 0))
            self.relayed[job_id] = _Relayed(owner=owner, node_id=node.node_id,
                                            attempt=int(msg.get("attempt", 1)),
                                            remaining=remaining)
            node.jobs.add(job_id)
            node.queued_tokens += remaining
        elif kind == "cancel" and job_id in self.relayed:
            self._end_relay(job_id)
        node.send(frame)

    def _note_stage(self, owner: str, node: NodeConn, msg: dict[str, Any]) -> bool:
        """Host side: a chain's frame for a stage on ``node``: where its answers go (a
        ``stage_forward``), or that they go nowhere now (``stage_release``). False when the
        frame is not to be passed on (this replica relays ``stage_relays_max`` already)."""
        seq = str(msg.get("sequence_id", ""))
        if msg.get("type") == "stage_release":
            self._end_stage(seq)
            return True
        now = time.monotonic()
        stage = self.stages.get(seq)
        if stage is None:
            if len(self.stages) >= limits.stage_relays_max:
                log.warning("relaying %d stages already: sequence %s refused", len(self.stages),
                            seq)
                refusal = protocol.StageOutput(
                    sequence_id=seq[:80], step=max(0, int(msg.get("step", 0))),
                    error=f"its host replica relays {limits.stage_relays_max} stages already")
                self._publish_frame(owner, "from_node",
                                    {"r": self.me, "node": node.node_id},
                                    protocol.encode(refusal))
                return False
            stage = self.stages[seq] = _RelayedStage(owner, node.node_id,
                                                     str(msg.get("model", "")), now)
            node.jobs.add(seq)  # a slot there, as every replica's scheduler should see
        stage.owner, stage.used_mono_s = owner, now
        return True

    def owns_stage(self, node: NodeConn, sequence_id: str) -> bool:
        """Host side: is ``sequence_id`` on local ``node`` another replica's chain's stage?"""
        stage = self.stages.get(sequence_id)
        return stage is not None and stage.node_id == node.node_id

    def take_stage(self, node: NodeConn, msg: protocol.StageOutput, raw: str) -> None:
        """Host side: a local node's answer to a relayed stage (``owns_stage``), to its owner
        as it came (the host's socket reader has validated it)."""
        stage = self.stages.get(msg.sequence_id)
        if stage is None or stage.node_id != node.node_id:
            return
        stage.used_mono_s = time.monotonic()
        self._publish_frame(stage.owner, "from_node",
                            {"r": self.me, "node": node.node_id}, raw)

    def _end_stage(self, sequence_id: str) -> None:
        stage = self.stages.pop(sequence_id, None)
        if stage is not None and (node := self.dispatcher.nodes.get(stage.node_id)) is not None:
            node.jobs.discard(sequence_id)

    def _release_stage(self, sequence_id: str, stage: _RelayedStage) -> None:
        node = self.dispatcher.nodes.get(stage.node_id)
        if node is not None and stage.model:
            node.send(protocol.encode(protocol.StageRelease(sequence_id=sequence_id,
                                                            model=stage.model)))
        self._end_stage(sequence_id)

    def _expire_stages(self, now_mono_s: float) -> None:
        """Forget the stages no frame crossed for ``stage_idle_s_max`` (their owner forgot
        them; the node drops such a cache itself)."""
        for seq, stage in list(self.stages.items()):
            if now_mono_s - stage.used_mono_s > limits.stage_idle_s_max:
                self._end_stage(seq)

    def owns(self, node: NodeConn, job_id: str) -> bool:
        """Host side: is ``job_id`` on local ``node`` another replica's job, relayed here?"""
        rel = self.relayed.get(job_id)
        return rel is not None and rel.node_id == node.node_id

    def take(self, node: NodeConn, msg: protocol.Tokens | protocol.Done | protocol.JobError,
             raw: str) -> None:
        """Host side: send a local node's message about a relayed job (``owns``) to the job's
        owner replica."""
        rel = self.relayed.get(msg.job_id)
        if rel is None or rel.node_id != node.node_id:
            return
        if isinstance(msg, protocol.Tokens):
            n = len(msg.token_ids)
            rel.remaining -= n
            node.queued_tokens = max(0, node.queued_tokens - n)
        else:
            self._end_relay(msg.job_id)
        self._publish_frame(rel.owner, "from_node",
                            {"r": self.me, "node": node.node_id}, raw)

    def _end_relay(self, job_id: str) -> None:
        rel = self.relayed.pop(job_id, None)
        if rel is None:
            return
        node = self.dispatcher.nodes.get(rel.node_id)
        if node is not None:
            node.jobs.discard(job_id)
            node.queued_tokens = max(0, node.queued_tokens - max(0, rel.remaining))

    def _cancel_relayed(self, job_id: str, rel: _Relayed) -> None:
        node = self.dispatcher.nodes.get(rel.node_id)
        if node is not None:
            node.send(protocol.encode(protocol.Cancel(job_id=job_id, attempt=rel.attempt)))
        self._end_relay(job_id)

    async def _on_from_node(self, _subject: str, data: bytes) -> None:
        """Owner side: a node's message about one of this replica's jobs or chains, via its
        host; validated again here."""
        body, frame = unpack_frame(data)
        node = self._remote(str(body["node"]))
        if node is None or node.host != body["r"]:
            return  # we already gave up on that node; the attempt has been resumed
        if body.get("lost"):
            await node.stop()
            await self.dispatcher.on_node_lost(node)
            return
        if frame is None:
            return
        d = self.dispatcher
        try:
            msg = protocol.decode_node_message(frame)
        except ProtocolError as exc:  # its host checked it: a bug or a bad replica, not fatal
            log.warning("a message of node %s relayed by %s is invalid: %s", node.node_id,
                        node.host, exc.message)
            d.chains.on_bad_output(node, exc.message)  # its chain steps fail, and repair
            return
        if isinstance(msg, protocol.StageOutput):
            d.chains.on_output(node, msg)
        elif isinstance(msg, protocol.Tokens):
            d.on_tokens(node, msg)
        elif isinstance(msg, protocol.Done):
            d.done_received(node, msg)  # the settlement is not waited for: the bus reads on
        elif isinstance(msg, protocol.JobError):
            await d.on_job_error(node, msg)

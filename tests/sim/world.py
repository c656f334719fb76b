"""A seeded discrete-event world that runs real :class:`NodeCore` objects.

Everything that happens is an event on one heap of ``(time, seq, callback)``; the world owns the
only source of randomness (``random.Random``), so one seed always replays the same run. There is
no wall clock, no thread and no asyncio here. Time is in milliseconds.

What the world models:

- Nodes: each runs a real ``NodeCore``. A crash discards the object with its timers, its pending
  disk writes and its client operations (these end *indeterminate*); a restart builds a new
  ``NodeCore`` with ``incarnation + 1`` whose ``load`` reads the simulated disk.
- Amnesia: :meth:`World.wipe` crashes a node and empties its disk. It comes back *amnesiac*: its
  acceptor refuses to vote (``set_voting``) until a driver (``tests.sim.rebuild``) rebuilds it,
  and it counts as down until then. Its lost acceptances leave the oracle at the wipe.
- Disk: one dict ``key -> AcceptorState`` per node. A ``Persist`` lands after a random delay
  (writes of one key land in the order they were issued), then ``on_persisted`` is called. A
  crash before that loses the write.
- Network: every request and reply may be lost, delayed (sometimes for long), duplicated and so
  reordered, at rates each seed picks for itself. A request that reaches a crashed node makes the
  sender see ``Unreachable`` with some probability, otherwise it vanishes. A reply is delivered
  only to the same incarnation that sent the request (a real connection dies with its process).
- Oracle: every accepted state that reached a disk is recorded per ``(key, ballot)``, which tells
  what was truly chosen (accepted by a majority at one ballot, counting only acceptances still
  on a disk that was not wiped since) and when; a majority reached only by counting acceptances
  lost to a wipe is recorded too, marked ``lost`` (see :class:`Oracle`).

The world checks, as they happen: a Promise/Accepted/State reply leaves a node only once the disk
holds that state (fsync before reply); a node's durable state never goes backwards; at most one
proposal is chosen per key; no operation outlives its deadline.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

from respreg.core.node import (
    Alarm,
    NodeConfig,
    NodeCore,
    NodeEffect,
    OpDone,
    OpTimer,
    PeerRespond,
    PeerSend,
    Persist,
)
from respreg.core.proposer import Chosen, Empty, Outcome
from respreg.core.types import (
    EMPTY_STATE,
    FAST_ROUND,
    NO_BALLOT,
    Accept,
    Accepted,
    AcceptorState,
    Ballot,
    Learn,
    NodeId,
    Promise,
    Proposal,
    Reply,
    Request,
    State,
    Unreachable,
    Voted,
)

#: Why an amnesiac node's acceptor refuses (what ``set_voting`` gets).
AMNESIAC = "amnesiac"

# ---- fault profile ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Faults:
    """How hostile the world is. Each seed draws its own profile with :meth:`draw`."""

    loss: float = 0.0
    dup: float = 0.0
    delay_min_ms: float = 0.5
    delay_max_ms: float = 3.0
    #: Chance that a message takes a long time, up to ``slow_max_ms``.
    slow: float = 0.0
    slow_max_ms: float = 0.0
    #: Chance that a request reaching a crashed node makes its sender see ``Unreachable``.
    unreachable: float = 0.5
    #: Chance that the sender of a delivered request also sees ``Unreachable`` (a driver timeout).
    spurious_unreachable: float = 0.0
    #: Mean time between crash attempts; None: no random crashes.
    crash_every_ms: float | None = None
    down_min_ms: float = 10.0
    down_max_ms: float = 500.0
    persist_min_ms: float = 0.05
    persist_max_ms: float = 2.0
    #: Chance that a node crashes at once after it sent a Promise or Accepted reply.
    crash_after_reply: float = 0.0
    #: Chance that a node crashes in the middle of broadcasting an Accept: the requests after
    #: that one, and its own acceptor's write, never happen.
    crash_mid_accept: float = 0.0

    @staticmethod
    def draw(rng: random.Random) -> Faults:
        delay_min = rng.choice([0.05, 0.5, 1.0])
        return Faults(
            loss=rng.choice([0.0, 0.01, 0.05, 0.15, 0.3]),
            dup=rng.choice([0.0, 0.02, 0.1, 0.3]),
            delay_min_ms=delay_min,
            delay_max_ms=delay_min + rng.choice([0.5, 3.0, 10.0, 40.0]),
            slow=rng.choice([0.0, 0.01, 0.05, 0.15]),
            slow_max_ms=rng.choice([100.0, 700.0, 2500.0]),
            unreachable=rng.choice([0.0, 0.5, 0.9, 1.0]),
            spurious_unreachable=rng.choice([0.0, 0.0, 0.01, 0.05]),
            crash_every_ms=rng.choice([None, 200.0, 600.0, 2000.0]),
            down_min_ms=rng.choice([1.0, 20.0]),
            down_max_ms=rng.choice([100.0, 600.0, 2000.0]),
            persist_min_ms=rng.choice([0.01, 0.2]),
            persist_max_ms=rng.choice([0.5, 3.0, 20.0]),
        )

    def healed(self) -> Faults:
        """No loss, no duplicates, short delays, no crashes; the disk keeps its speed."""
        return replace(
            self,
            loss=0.0,
            dup=0.0,
            delay_min_ms=0.2,
            delay_max_ms=3.0,
            slow=0.0,
            spurious_unreachable=0.0,
            crash_every_ms=None,
            crash_after_reply=0.0,
            crash_mid_accept=0.0,
        )


# ---- records ---------------------------------------------------------------------------------


@dataclass
class OpRecord:
    """One client operation as the client saw it."""

    op_id: int
    client: int
    node: int
    kind: str  # "write" or "read"
    key: bytes
    proposal: Proposal | None  # what a write proposed; None for a read
    invoke: float
    complete: float | None = None
    outcome: Outcome | None = None
    #: The node crashed while the operation ran: it may or may not have taken effect.
    crashed: bool = False
    phase: str = "safety"

    @property
    def done(self) -> bool:
        return self.outcome is not None or self.crashed

    def describe(self) -> str:
        what = (
            f"SETONCE {self.key!r} pid={self.proposal.pid!r} value={self.proposal.value!r}"
            if self.proposal
            else (f"GET {self.key!r}")
        )
        if self.crashed:
            res = "indeterminate (node crashed)"
        elif self.outcome is None:
            res = "pending"
        else:
            res = describe_outcome(self.outcome, self.proposal)
        end = "?" if self.complete is None else f"{self.complete:.3f}"
        return f"op#{self.op_id} c{self.client}@n{self.node} [{self.invoke:.3f}..{end}] {what} -> {res}"


def describe_outcome(outcome: Outcome, own: Proposal | None) -> str:
    if isinstance(outcome, Chosen):
        p = outcome.proposal
        if own is not None:
            tag = "+OK" if p.pid == own.pid else "nil"
            return f"{tag} (chosen pid={p.pid!r} value={p.value!r})"
        return f"{p.value!r} (pid={p.pid!r})"
    if isinstance(outcome, Empty):
        return "nil (empty)"
    return f"-{outcome.kind.value} {outcome.reason}"


@dataclass(frozen=True)
class ChosenRecord:
    time: float
    ballot: Ballot
    proposal: Proposal
    #: A majority accepted the ballot only if acceptances since lost to a wipe are counted.
    lost: bool = False


class Oracle:
    """What acceptors made durable, hence what was truly chosen, per key.

    A proposal is chosen once a majority holds it durably at one ballot; a node whose disk is
    wiped stops counting at that moment (:meth:`forget`). Besides, the oracle records when a
    majority had *ever* accepted a ballot, lost acceptances included (``lost=True``): that is
    what a proposer counts when its Accepted replies crossed a wipe (an acceptor answered, then
    lost its disk, then another one accepted), and what the rebuild must keep chosen (docs/
    design.md, argument (a)). Such a record is the earliest moment a client may see the value;
    every record of a key, of either kind, must carry the same proposal.
    """

    def __init__(self, majority: int) -> None:
        self.majority = majority
        #: Nodes whose disk holds (or held, before being overwritten) the proposal at the ballot;
        #: none wiped since. Keyed by ballot *and* proposal id: at the reserved round 0 two
        #: acceptors may hold different proposals at one ballot (docs/design.md, a cluster of
        #: three), and "chosen" means a majority holding one proposal at one ballot.
        self.acceptors: dict[tuple[bytes, Ballot, bytes], set[int]] = {}
        #: Every node that ever made the proposal at the ballot durable, wipes notwithstanding.
        self.ever: dict[tuple[bytes, Ballot, bytes], set[int]] = {}
        self.proposal_at: dict[tuple[bytes, Ballot], Proposal] = {}
        self.chosen: dict[bytes, list[ChosenRecord]] = {}
        self.violations: list[str] = []

    def on_durable(self, now: float, node: int, key: bytes, state: AcceptorState) -> ChosenRecord | None:
        if state.accepted == NO_BALLOT or state.proposal is None:
            return None
        if state.accepted.round != FAST_ROUND or self.majority > 2:
            # A ballot carries one proposal, except round 0 in a cluster of three (see above).
            known = self.proposal_at.setdefault((key, state.accepted), state.proposal)
            if known != state.proposal:
                self.violations.append(
                    f"t={now:.3f} ballot {tuple(state.accepted)} of key {key!r} carries two proposals: "
                    f"{known} and {state.proposal}"
                )
        kb = (key, state.accepted, state.proposal.pid)
        ever = self.ever.setdefault(kb, set())
        ever_now = node not in ever and len(ever) + 1 == self.majority
        ever.add(node)
        nodes = self.acceptors.setdefault(kb, set())
        if node in nodes:
            return None
        nodes.add(node)
        if len(nodes) == self.majority:
            rec = ChosenRecord(now, state.accepted, state.proposal)
        elif ever_now:
            rec = ChosenRecord(now, state.accepted, state.proposal, lost=True)
        else:
            return None
        earlier = self.chosen.setdefault(key, [])
        for other in earlier:
            if other.proposal != rec.proposal:
                self.violations.append(
                    f"t={now:.3f} SAFETY: key {key!r} has two chosen proposals: {other.proposal} at ballot "
                    f"{tuple(other.ballot)} (t={other.time:.3f}) and {rec.proposal} at ballot {tuple(rec.ballot)}"
                )
        earlier.append(rec)
        return rec

    def forget(self, node: int) -> None:
        """``node`` lost its disk: its acceptances count no more (those made later count again)."""
        for nodes in self.acceptors.values():
            nodes.discard(node)

    def first_chosen(self, key: bytes) -> ChosenRecord | None:
        recs = self.chosen.get(key)
        return recs[0] if recs else None


# ---- the world -------------------------------------------------------------------------------


class Host:
    """A machine: its disk survives crashes, its ``NodeCore`` does not."""

    def __init__(self, nid: NodeId) -> None:
        self.id = nid
        #: Counts the processes this host ran; replies and timers reach only the one that asked.
        self.incarnation = 0
        #: ``incarnation`` of the first start on the current disk: a node whose disk was wiped
        #: may start counting its incarnations again (see ``WorldOptions.wipe_resets_incarnation``).
        self.disk_born = 0
        self.core: NodeCore | None = None
        self.disk: dict[bytes, AcceptorState] = {}
        #: The chosen log (respreg.chosenlog): (key, packed entry) of every proposal the node
        #: learned is chosen, appended without fsync; ``log_synced`` of them survive any crash.
        self.chosen_log: list[tuple[bytes, bytes]] = []
        self.log_synced = 0
        #: When the last write issued for a key lands (writes of one key land in order).
        self.disk_busy: dict[bytes, float] = {}
        self.ops: dict[int, OpRecord] = {}
        self.ops_done: dict[int, Callable[[OpRecord], None]] = {}
        #: GETs that took the operation of another GET (NodeCore.join_read_round), by its op id:
        #: they end with its outcome, as the asyncio driver's do.
        self.joined: dict[int, list[int]] = {}
        #: Operations the driver runs for itself (repairs), with their start time and callback.
        self.internal: dict[int, tuple[float, Callable[[Outcome], None]]] = {}
        #: The disk was wiped after this node voted: it must not vote until it is rebuilt (what
        #: the real node records as its status in ``node.meta``, so it survives restarts).
        self.amnesiac = False
        #: The disk was wiped at least once: like the real node (status ``rebuilt`` in node.meta),
        #: it never writes at the reserved round 0 again.
        self.ever_wiped = False

    @property
    def core_incarnation(self) -> int:
        """The incarnation the node itself believes in (counted from its disk's first start)."""
        return self.incarnation - self.disk_born

    @property
    def up(self) -> bool:
        return self.core is not None


@dataclass(frozen=True)
class _Wire:
    """A request in flight, under the world-wide id the receiving core sees as ``req_id``."""

    src: NodeId
    src_inc: int
    req_id: int
    dst: NodeId
    msg: Request


Event = tuple[float, int, Callable[[], None]]


@dataclass
class WorldOptions:
    node_config: NodeConfig = field(default_factory=NodeConfig)
    trace: bool = False
    max_down: int | None = None  # default: a minority
    #: Call ``on_persisted`` before the write reaches the disk (a broken fsync, to test the check).
    lying_disk: bool = False
    #: A wiped node counts its incarnations from the start again, as a real node did on a new data
    #: directory before ``storage.open_node`` drew a random first incarnation (kept as a stress
    #: case). Off: incarnations keep growing across wipes, which is what random draws amount to.
    wipe_resets_incarnation: bool = False
    #: Nodes keep a chosen log and read it back when they restart (as real nodes do).
    chosen_log: bool = True
    #: With a seed: every few simulated milliseconds one node's phase timeout is set to a drawn
    #: value (NodeCore.set_attempt_timeout), as a real node follows its peers' answer times.
    retime_seed: str | None = None


class World:
    def __init__(self, rng: random.Random, n_nodes: int, faults: Faults, options: WorldOptions | None = None) -> None:
        self.rng = rng
        self.faults = faults
        self.initial_faults = faults
        self.options = options or WorldOptions()
        self.node_config = self.options.node_config
        self.deadline_ms = self.node_config.proposer.deadline_ms
        self.now = 0.0
        self._heap: list[Event] = []
        self._seq = 0
        self.node_ids = [NodeId(i) for i in range(1, n_nodes + 1)]
        self.hosts = {nid: Host(nid) for nid in self.node_ids}
        self.majority = n_nodes // 2 + 1
        self.max_down = self.options.max_down if self.options.max_down is not None else n_nodes - self.majority
        self.oracle = Oracle(self.majority)
        self.history: list[OpRecord] = []
        self.violations: list[str] = []
        self.trace: list[str] | None = [] if self.options.trace else None
        self._wire: dict[int, _Wire] = {}
        self._next_wire = 1
        self._next_op = 1
        self._next_pid = 1
        self._pending = 0
        self.crashes_enabled = faults.crash_every_ms is not None
        self.stats = {
            "messages": 0,
            "fast_accepts": 0,
            "lost": 0,
            "duplicated": 0,
            "crashes": 0,
            "events": 0,
            "reads_joined": 0,
        }
        #: Called after every boot (a driver starts its rebuild of an amnesiac node here).
        self.on_boot: Callable[[Host], None] | None = None
        for h in self.hosts.values():
            self._boot(h)
        if faults.crash_every_ms is not None:
            self._schedule_crash_attempt()
        self._retime_rng: random.Random | None = None
        if self.options.retime_seed is not None:
            self._retime_rng = random.Random(self.options.retime_seed)
            self.after(self._retime_rng.uniform(5.0, 200.0), self._retime)

    def _retime(self) -> None:
        """One node's phases from now on wait a drawn time (a quarter of the configured one up to
        half the deadline): what a real node's driver does as its peers' answers speed up or
        slow down. It changes when proposers retry, never what an answer means."""
        r = self._retime_rng
        assert r is not None
        h = self.hosts[r.choice(self.node_ids)]
        if h.up and h.core is not None:
            base = self.node_config.proposer.attempt_timeout_ms
            h.core.set_attempt_timeout(r.uniform(base / 4, max(base, self.deadline_ms / 2)))
        self.after(r.uniform(5.0, 200.0), self._retime)

    # ---- event loop --------------------------------------------------------------------------

    def at(self, time: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (max(time, self.now), self._seq, fn))

    def after(self, delay: float, fn: Callable[[], None]) -> None:
        self.at(self.now + delay, fn)

    def run_until(self, time: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= time:
            t, _, fn = heapq.heappop(heap)
            self.now = t
            self.stats["events"] += 1
            fn()
        self.now = max(self.now, time)

    def run_while(self, busy: Callable[[], bool], limit: float) -> None:
        """Run events while ``busy()`` holds, but not past ``limit``."""
        heap = self._heap
        while heap and heap[0][0] <= limit and busy():
            t, _, fn = heapq.heappop(heap)
            self.now = t
            self.stats["events"] += 1
            fn()

    def log(self, text: str) -> None:
        if self.trace is not None:
            self.trace.append(f"{self.now:10.3f}  {text}")

    def fresh_pid(self) -> bytes:
        pid = b"p%d" % self._next_pid
        self._next_pid += 1
        return pid

    # ---- nodes -------------------------------------------------------------------------------

    def _boot(self, h: Host) -> None:
        h.core = NodeCore(
            h.id,
            self.node_ids,
            h.core_incarnation,
            partial(self._load, h),
            self.rng.random,
            self.node_config,
            partial(self._logged, h) if self.options.chosen_log else None,
        )
        # What the real node does while it starts serving: read its chosen log back.
        h.core.preload_chosen(h.chosen_log)
        h.disk_busy = {}
        if h.ever_wiped:
            h.core.fast_writes = False
        if h.amnesiac:
            # What a real node does when it finds it was known under another identity.
            h.core.set_voting(AMNESIAC)
        if self.on_boot is not None:
            self.on_boot(h)

    @staticmethod
    def _logged(h: Host, key: bytes, entry: bytes) -> None:
        h.chosen_log.append((key, entry))

    @staticmethod
    def _load(h: Host, key: bytes) -> AcceptorState:
        return h.disk.get(key, EMPTY_STATE)

    def down_count(self) -> int:
        """Nodes that do not vote: crashed, or amnesiac and not yet rebuilt."""
        return sum(1 for h in self.hosts.values() if not h.up or h.amnesiac)

    def amnesiac_nodes(self) -> list[NodeId]:
        return [nid for nid in self.node_ids if self.hosts[nid].amnesiac]

    def wipe(self, nid: NodeId, down_for: float, amnesiac: bool = True) -> bool:
        """Crash ``nid`` and lose its whole disk; it restarts after ``down_for`` ms.

        It comes back amnesiac (refusing to vote until rebuilt), or, with ``amnesiac=False``,
        voting at once with an empty state: the hazard the rebuild exists for.
        """
        h = self.hosts[nid]
        if not self.crash(nid, down_for):
            return False
        if self.trace is not None:
            how = "amnesiac" if amnesiac else "voting"
            self.log(f"n{nid} WIPE: its disk of {len(h.disk)} keys is gone; it comes back {how}")
        h.disk = {}
        h.disk_busy = {}
        h.chosen_log = []
        h.log_synced = 0
        h.amnesiac = amnesiac
        h.ever_wiped = True
        if self.options.wipe_resets_incarnation:
            h.disk_born = h.incarnation + 1
        self.oracle.forget(int(nid))
        return True

    def set_voting(self, nid: NodeId) -> None:
        """The rebuild of ``nid`` finished: its acceptor votes again."""
        h = self.hosts[nid]
        assert h.core is not None and h.amnesiac
        h.amnesiac = False
        h.core.set_voting(None)
        if self.trace is not None:
            self.log(f"n{nid} VOTING again (rebuilt)")

    def write_disk(self, nid: NodeId, key: bytes, state: AcceptorState) -> None:
        """Put ``state`` on the disk of ``nid`` at once, as durable (a driver adopting states)."""
        self._write_disk(self.hosts[nid], key, state)

    def start_repair(self, nid: NodeId, key: bytes, on_done: Callable[[Outcome], None]) -> None:
        """Run ``NodeCore.begin_repair`` on ``nid``; ``on_done`` gets the outcome, unless it crashes."""
        h = self.hosts[nid]
        assert h.core is not None
        op_id = self._next_op
        self._next_op += 1
        h.internal[op_id] = (self.now, on_done)
        if self.trace is not None:
            self.log(f"n{nid} REPAIR {key!r} (op#{op_id})")
        self._apply(h, h.incarnation, h.core.begin_repair(op_id, key))

    def crash(self, nid: NodeId, down_for: float | None) -> bool:
        """Crash ``nid`` now; restart it after ``down_for`` ms (None: stays down)."""
        h = self.hosts[nid]
        if not h.up:
            return False
        self.stats["crashes"] += 1
        if self.trace is not None:
            self.log(f"n{nid} CRASH (incarnation {h.incarnation})")
        h.core = None
        h.internal = {}
        h.joined = {}
        # The log is never fsynced: a crash keeps any prefix of what was appended since the file
        # system last wrote it back (at least what it already had).
        keep = self.rng.randint(h.log_synced, len(h.chosen_log))
        del h.chosen_log[keep:]
        h.log_synced = keep
        ops, h.ops = h.ops, {}
        self._pending -= len(ops)
        callbacks, h.ops_done = h.ops_done, {}
        for op_id, rec in ops.items():
            rec.crashed = True
            if self.trace is not None:
                self.log(f"  {rec.describe()}")
            cb = callbacks.get(op_id)
            if cb is not None:
                cb(rec)
        if down_for is not None:
            self.after(down_for, partial(self.restart, nid))
        return True

    def restart(self, nid: NodeId) -> None:
        h = self.hosts[nid]
        if h.up:
            return
        h.incarnation += 1
        if self.trace is not None:
            self.log(f"n{nid} RESTART as incarnation {h.incarnation}")
        self._boot(h)

    def restart_all(self) -> None:
        for nid in self.node_ids:
            self.restart(nid)

    def _schedule_crash_attempt(self) -> None:
        every = self.faults.crash_every_ms
        if every is None or not self.crashes_enabled:
            return
        self.after(self.rng.expovariate(1.0 / every), self._crash_attempt)

    def _crash_attempt(self) -> None:
        if not self.crashes_enabled:
            return
        self._crash_random()
        self._schedule_crash_attempt()

    def _crash_random(self, only: NodeId | None = None) -> None:
        if self.down_count() >= self.max_down:
            # Only a node that counts as down already (amnesiac) may crash now, and not every
            # time: each of its restarts begins its rebuild's wait again.
            up = [nid for nid in self.node_ids if self.hosts[nid].up and self.hosts[nid].amnesiac]
            if not up or (only is not None and only not in up) or self.rng.random() < 0.9:
                return
        else:
            up = [nid for nid in self.node_ids if self.hosts[nid].up]
        if not up:
            return
        nid = only if only is not None else self.rng.choice(up)
        f = self.faults
        self.crash(nid, self.rng.uniform(f.down_min_ms, f.down_max_ms))

    # ---- client operations -------------------------------------------------------------------

    def submit(
        self,
        nid: NodeId,
        client: int,
        key: bytes,
        proposal: Proposal | None,
        phase: str,
        on_done: Callable[[OpRecord], None] | None = None,
    ) -> OpRecord | None:
        """Start a SETONCE (``proposal`` given) or a GET on node ``nid``; None if it is down."""
        h = self.hosts[nid]
        core = h.core
        if core is None:
            return None
        op_id = self._next_op
        self._next_op += 1
        rec = OpRecord(op_id, client, int(nid), "write" if proposal else "read", key, proposal, self.now, phase=phase)
        self.history.append(rec)
        h.ops[op_id] = rec
        self._pending += 1
        if on_done is not None:
            h.ops_done[op_id] = on_done
        if self.trace is not None:
            self.log(f"n{nid} INVOKE {rec.describe()}")
        if proposal is not None:
            effects = core.begin_write(op_id, key, proposal)
        else:
            shared = core.join_read_round(key)
            if shared is not None and shared in h.ops:
                h.joined.setdefault(shared, []).append(op_id)
                self.stats["reads_joined"] += 1
                return rec
            effects = core.begin_read(op_id, key)
        self._apply(h, h.incarnation, effects)
        return rec

    def _op_done(self, h: Host, op_id: int, outcome: Outcome) -> None:
        rec = h.ops.pop(op_id, None)
        internal = h.internal.pop(op_id, None) if rec is None else None
        if internal is not None:
            started, callback = internal
            if self.trace is not None:
                self.log(f"n{h.id} REPAIR DONE op#{op_id}: {describe_outcome(outcome, None)}")
            if self.now - started > self.deadline_ms + 1e-6:
                self.violations.append(f"repair op#{op_id} took {self.now - started:.3f} ms, past its deadline")
            callback(outcome)
            return
        if rec is None:
            self.violations.append(f"t={self.now:.3f} n{h.id}: OpDone for unknown or finished op {op_id}")
            return
        self._pending -= 1
        rec.complete = self.now
        rec.outcome = outcome
        if self.trace is not None:
            self.log(f"n{h.id} DONE {rec.describe()}")
        if rec.complete - rec.invoke > self.deadline_ms + 1e-6:
            self.violations.append(
                f"op#{op_id} took {rec.complete - rec.invoke:.3f} ms, longer than its deadline {self.deadline_ms} ms"
            )
        cb = h.ops_done.pop(op_id, None)
        if cb is not None:
            cb(rec)
        for follower in h.joined.pop(op_id, ()):
            self._op_done(h, follower, outcome)

    def pending_ops(self) -> int:
        """Client operations running on nodes that are up."""
        return self._pending

    # ---- effects -----------------------------------------------------------------------------

    def _apply(self, h: Host, inc: int, effects: list[NodeEffect]) -> None:
        for e in effects:
            if isinstance(e, Persist):
                self._persist(h, inc, e)
            elif isinstance(e, PeerSend):
                self._send_request(h, inc, e)
                if (
                    self.faults.crash_mid_accept
                    and isinstance(e.msg, Accept)
                    and self.rng.random() < self.faults.crash_mid_accept
                    and self.down_count() < self.max_down
                ):
                    f = self.faults
                    self.crash(h.id, self.rng.uniform(f.down_min_ms, f.down_max_ms))
                    return  # the rest of this batch dies with the node's memory
            elif isinstance(e, PeerRespond):
                self._send_reply(h, e)
            elif isinstance(e, OpTimer):
                self.after(e.delay_ms, partial(self._timer, h, inc, e.op_id, e.token))
            elif isinstance(e, OpDone):
                self._op_done(h, e.op_id, e.outcome)
            else:
                assert isinstance(e, Alarm)
                self.violations.append(f"t={self.now:.3f} n{h.id}: unexpected alarm for {e.key!r}: {e.reason}")

    def _alive(self, h: Host, inc: int) -> NodeCore | None:
        if h.incarnation != inc:
            return None
        return h.core

    def _timer(self, h: Host, inc: int, op_id: int, token: int) -> None:
        core = self._alive(h, inc)
        if core is not None:
            self._apply(h, inc, core.on_timer(op_id, token))

    # ---- disk --------------------------------------------------------------------------------

    def _persist(self, h: Host, inc: int, e: Persist) -> None:
        f = self.faults
        t = max(self.now + self.rng.uniform(f.persist_min_ms, f.persist_max_ms), h.disk_busy.get(e.key, 0.0))
        h.disk_busy[e.key] = t
        if self.options.lying_disk:
            # A broken fsync: report success at once, let the data reach the disk later.
            self.after(0.0, partial(self._persisted, h, inc, e, False))
            self.at(t, partial(self._persist_lands, h, inc, e))
        else:
            self.at(t, partial(self._persisted, h, inc, e, True))

    def _persist_lands(self, h: Host, inc: int, e: Persist) -> None:
        if self._alive(h, inc) is not None:
            self._write_disk(h, e.key, e.state)

    def _persisted(self, h: Host, inc: int, e: Persist, write: bool) -> None:
        core = self._alive(h, inc)
        if core is None:
            if self.trace is not None:
                self.log(f"n{h.id} persist of {e.key!r} v{e.version} lost in crash")
            return
        if write:
            self._write_disk(h, e.key, e.state)
        self._apply(h, inc, core.on_persisted(e.key, e.version, None))

    def _write_disk(self, h: Host, key: bytes, state: AcceptorState) -> None:
        old = h.disk.get(key, EMPTY_STATE)
        if state.promised < old.promised or state.accepted < old.accepted:
            self.violations.append(
                f"t={self.now:.3f} n{h.id}: durable state of {key!r} went backwards: {fmt_state(old)} -> "
                f"{fmt_state(state)}"
            )
        h.disk[key] = state
        if self.trace is not None:
            self.log(f"n{h.id} DISK {key!r} := {fmt_state(state)}")
        rec = self.oracle.on_durable(self.now, int(h.id), key, state)
        if rec is not None and self.trace is not None:
            how = " (counting acceptances lost to a wipe)" if rec.lost else ""
            self.log(f"ORACLE {key!r} CHOSEN {rec.proposal.pid!r}={rec.proposal.value!r} at {tuple(rec.ballot)}{how}")

    # ---- network -----------------------------------------------------------------------------

    def _delay(self) -> float:
        f = self.faults
        if f.slow and self.rng.random() < f.slow:
            return self.rng.uniform(f.delay_max_ms, max(f.slow_max_ms, f.delay_max_ms))
        return self.rng.uniform(f.delay_min_ms, f.delay_max_ms)

    def _transmit(self, fn: Callable[[], None], kind: str, w: int, src: NodeId, dst: NodeId) -> None:
        """Carry a message over the faulty network: maybe lose it, maybe deliver it twice."""
        f = self.faults
        self.stats["messages"] += 1
        copies = 2 if f.dup and self.rng.random() < f.dup else 1
        if copies == 2:
            self.stats["duplicated"] += 1
        for _ in range(copies):
            if f.loss and self.rng.random() < f.loss:
                self.stats["lost"] += 1
                if self.trace is not None:
                    self.log(f"  LOST {kind} {w} n{src}->n{dst}")
                continue
            self.after(self._delay(), fn)

    def _send_request(self, h: Host, inc: int, e: PeerSend) -> None:
        if isinstance(e.msg, Accept) and e.msg.ballot.round == FAST_ROUND:
            self.stats["fast_accepts"] += 1
        if e.req_id == 0:
            assert isinstance(e.msg, (Learn, Voted))
            w = 0
        else:
            w = self._next_wire
            self._next_wire += 1
            self._wire[w] = _Wire(h.id, inc, e.req_id, e.to, e.msg)
        if self.trace is not None:
            self.log(f"n{h.id} -> n{e.to} req {w}: {fmt_msg(e.msg)}")
        self._transmit(partial(self._deliver_request, h.id, e.to, w, e.msg), "req", w, h.id, e.to)

    def _deliver_request(self, src: NodeId, dst: NodeId, w: int, msg: Request) -> None:
        h = self.hosts[dst]
        core = h.core
        if core is None:
            if w and self.rng.random() < self.faults.unreachable:
                if self.trace is not None:
                    self.log(f"n{dst} is down: req {w} from n{src} -> Unreachable")
                self.after(self.rng.uniform(0.1, 2.0), partial(self._deliver_reply, w, Unreachable()))
            else:
                if self.trace is not None:
                    self.log(f"n{dst} is down: req {w} from n{src} vanishes")
            return
        if self.trace is not None:
            self.log(f"n{dst} <- n{src} req {w}: {fmt_msg(msg)}")
        if w and self.faults.spurious_unreachable and self.rng.random() < self.faults.spurious_unreachable:
            self.after(self.rng.uniform(0.1, 2.0), partial(self._deliver_reply, w, Unreachable()))
        self._apply(h, h.incarnation, core.on_request(src, w, msg))

    def _send_reply(self, h: Host, e: PeerRespond) -> None:
        wire = self._wire.get(e.req_id)
        if wire is None or wire.dst != h.id or wire.src != e.to:
            self.violations.append(f"t={self.now:.3f} n{h.id}: reply to an unknown request {e}")
            return
        self._check_durable(h, wire, e.reply)
        if self.trace is not None:
            self.log(f"n{h.id} -> n{e.to} reply {e.req_id}: {fmt_reply(e.reply)}")
        self._transmit(partial(self._deliver_reply, e.req_id, e.reply), "reply", e.req_id, h.id, e.to)
        if (
            self.faults.crash_after_reply
            and isinstance(e.reply, (Promise, Accepted))
            and self.rng.random() < self.faults.crash_after_reply
        ):
            # Crash before anything else happens on this node, reply already on the wire.
            self.after(0.0, partial(self._crash_random, h.id))

    def _deliver_reply(self, w: int, reply: Reply) -> None:
        wire = self._wire[w]
        core = self._alive(self.hosts[wire.src], wire.src_inc)
        if core is None:
            return
        if self.trace is not None:
            self.log(f"n{wire.src} <- n{wire.dst} reply {w}: {fmt_reply(reply)}")
        self._apply(self.hosts[wire.src], wire.src_inc, core.on_peer_reply(wire.req_id, reply))

    def _check_durable(self, h: Host, wire: _Wire, reply: Reply) -> None:
        """Fsync before reply: what a reply says about the acceptor must already be on disk."""
        key = wire.msg.key
        disk = h.disk.get(key, EMPTY_STATE)
        bad = ""
        if isinstance(reply, Promise):
            if disk.promised < reply.ballot or disk.accepted < reply.accepted:
                bad = "Promise"
        elif isinstance(reply, Accepted):
            if disk.accepted < reply.ballot or disk.promised < reply.ballot:
                bad = "Accepted"
        elif isinstance(reply, State):
            if disk.accepted < reply.accepted:
                bad = "State"
        if bad:
            self.violations.append(
                f"t={self.now:.3f} FSYNC: n{h.id} sent {fmt_reply(reply)} for {key!r} to n{wire.src} while its disk "
                f"holds {fmt_state(disk)}"
            )


# ---- formatting ------------------------------------------------------------------------------


def fmt_ballot(b: Ballot) -> str:
    return "-" if b == NO_BALLOT else f"{b.round}.{b.node}.{b.incarnation}"


def fmt_proposal(p: Proposal | None) -> str:
    return "None" if p is None else f"{p.pid.decode()}={p.value.decode(errors='replace')}"


def fmt_state(s: AcceptorState) -> str:
    return f"promised={fmt_ballot(s.promised)} accepted={fmt_ballot(s.accepted)} {fmt_proposal(s.proposal)}"


def fmt_msg(m: Request) -> str:
    name = type(m).__name__
    parts = [repr(m.key)]
    ballot = getattr(m, "ballot", None)
    if isinstance(ballot, Ballot):
        parts.append(fmt_ballot(ballot))
    prop = getattr(m, "proposal", None)
    if isinstance(prop, Proposal):
        parts.append(fmt_proposal(prop))
    return f"{name}({' '.join(parts)})"


def fmt_reply(r: Reply) -> str:
    if isinstance(r, Promise):
        acc = f"acc={fmt_ballot(r.accepted)} {fmt_proposal(r.proposal)}"
        return f"Promise({fmt_ballot(r.ballot)} {acc} chosen={r.chosen})"
    if isinstance(r, Accepted):
        return f"Accepted({fmt_ballot(r.ballot)})"
    if isinstance(r, State):
        return f"State(acc={fmt_ballot(r.accepted)} {fmt_proposal(r.proposal)} chosen={r.chosen})"
    return repr(r)


__all__ = [
    "AMNESIAC",
    "ChosenRecord",
    "Faults",
    "Host",
    "OpRecord",
    "Oracle",
    "World",
    "WorldOptions",
    "describe_outcome",
    "fmt_state",
]

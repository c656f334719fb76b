"""One respreg node as a sans-IO state machine: acceptors for every key, proposers for client ops.

The driver (``respreg.server`` under asyncio, ``tests/sim`` under the simulator) calls the
``begin_*`` and ``on_*`` methods and carries out the returned effects:

- :class:`Persist` – make a key's acceptor state durable, then call ``on_persisted``.
- :class:`PeerSend` – send a request to another node; call ``on_peer_reply`` with its reply,
  or with :class:`~respreg.core.types.Unreachable` if it cannot be delivered or answered.
- :class:`PeerRespond` – send a reply back to the node that asked.
- :class:`OpTimer` – call ``on_timer`` later.  :class:`OpDone` – a client operation finished.
- :class:`Alarm` – something an operator must see (a corrupt state file).

Ordering rule that makes acceptors safe across crashes: a reply computed from a key's state is
held back until that state is durable. The core enforces it, so every driver gets it for free.
Messages to this node's own acceptor never leave the core; they follow the same rule.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import islice

from . import acceptor
from .chosen import ChosenCache
from .proposer import (
    DEADLINE_TOKEN,
    Chosen,
    Declined,
    Done,
    Effect,
    Empty,
    Failed,
    Failure,
    Outcome,
    Proposer,
    ProposerConfig,
    Send,
    SetTimer,
)
from .types import (
    EMPTY_STATE,
    FAST_ROUND,
    Accept,
    Accepted,
    AcceptorState,
    Ballot,
    Learn,
    Nack,
    NodeId,
    Prepare,
    Proposal,
    Propose,
    Read,
    Refused,
    Reply,
    Request,
    Voted,
    Written,
    owner_in,
)

__all__ = [
    "Alarm",
    "Chosen",
    "Empty",
    "Failed",
    "NodeConfig",
    "NodeCore",
    "NodeEffect",
    "OpDone",
    "OpTimer",
    "Outcome",
    "PeerRespond",
    "PeerSend",
    "Persist",
]


# Each effect spells out its __init__: see the docstring of respreg.core.types.
@dataclass(frozen=True, slots=True)
class Persist:
    key: bytes
    state: AcceptorState
    version: int

    def __init__(self, key: bytes, state: AcceptorState, version: int) -> None:
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "state", state)
        object.__setattr__(self, "version", version)


@dataclass(frozen=True, slots=True)
class PeerSend:
    to: NodeId
    req_id: int
    msg: Request

    def __init__(self, to: NodeId, req_id: int, msg: Request) -> None:
        object.__setattr__(self, "to", to)
        object.__setattr__(self, "req_id", req_id)
        object.__setattr__(self, "msg", msg)


@dataclass(frozen=True, slots=True)
class PeerRespond:
    to: NodeId
    req_id: int
    reply: Reply

    def __init__(self, to: NodeId, req_id: int, reply: Reply) -> None:
        object.__setattr__(self, "to", to)
        object.__setattr__(self, "req_id", req_id)
        object.__setattr__(self, "reply", reply)


@dataclass(frozen=True, slots=True)
class OpTimer:
    op_id: int
    delay_ms: float
    token: int

    def __init__(self, op_id: int, delay_ms: float, token: int) -> None:
        object.__setattr__(self, "op_id", op_id)
        object.__setattr__(self, "delay_ms", delay_ms)
        object.__setattr__(self, "token", token)


@dataclass(frozen=True, slots=True)
class OpDone:
    op_id: int
    outcome: Outcome

    def __init__(self, op_id: int, outcome: Outcome) -> None:
        object.__setattr__(self, "op_id", op_id)
        object.__setattr__(self, "outcome", outcome)


@dataclass(frozen=True, slots=True)
class Alarm:
    key: bytes
    reason: str

    def __init__(self, key: bytes, reason: str) -> None:
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "reason", reason)


NodeEffect = Persist | PeerSend | PeerRespond | OpTimer | OpDone | Alarm


@dataclass(frozen=True, slots=True)
class NodeConfig:
    proposer: ProposerConfig = field(default_factory=ProposerConfig)
    #: Acceptor states kept in memory once clean (durable, no reply waiting); others reload lazily.
    state_cache_keys: int = 50_000
    #: Chosen proposals remembered for local reads, bounded by count and by bytes.
    chosen_cache_keys: int = 2_000_000
    #: Counted as key + id + value + CHOSEN_ENTRY_OVERHEAD bytes per entry
    #: (respreg.core.chosen): close to what the process really spends on it.
    chosen_cache_bytes: int = 200 * 1024 * 1024
    #: Let this node write the keys it owns in one round trip at the reserved round 0 (see
    #: docs/design.md). The driver may switch it off at run time through ``NodeCore.fast_writes``.
    fast_writes: bool = False
    #: With ``fast_writes``, in a cluster of three: write a key another node owns at round 0
    #: here, with the other non-owner, and forward it to the owner only when that is declined
    #: (see NodeCore._begin_fast_here). Off: forward every such write at once.
    fast_writes_here: bool = True


#: Timer token of an operation waiting behind another of its key (a read for the next shared
#: read round, a write for the write in flight): its deadline.
WAIT_TOKEN = -3
#: Forwarded writes remembered to drop duplicates. TCP never duplicates a request; a network
#: that does (the simulator's) repeats one within a few delays, far fewer requests than this.
PROPOSES_REMEMBERED = 65_536
#: Keys remembered whose round-0 write did not end chosen (see NodeCore._begin_fast_peers).
FAST_SPENT_REMEMBERED = 65_536
#: Round-0 writes of other nodes' keys (NodeCore._begin_fast_here): the share of recent attempts
#: that were declined is followed as a moving average, each attempt weighing this much ...
CONTENTION_WEIGHT = 0.1
#: ... and above this share, such writes go to the owner at once, ...
CONTENTION_HIGH = 0.25
#: ... but one in this many still tries round 0 here, so the average notices when it ends.
CONTENTION_PROBE = 32


# The operations' bookkeeping below spells out its __init__ too (the effects' comment above;
# private and built in one place each, these are not among the classes that test checks).
@dataclass(slots=True)
class _ReadRound:
    """Linearizable reads of one key sharing read rounds (see NodeCore.begin_read)."""

    leader: int  # the operation whose proposer runs the round in flight
    riders: list[int]  # reads that started before that round and take its outcome
    waiting: list[int]  # reads that started during that round: they need the next one
    deadlines: dict[int, float]

    def __init__(self, leader: int, riders: list[int], waiting: list[int], deadlines: dict[int, float]) -> None:
        self.leader = leader
        self.riders = riders
        self.waiting = waiting
        self.deadlines = deadlines


@dataclass(slots=True)
class _WriteQueue:
    """The write of a key this node runs, and the writes of that key waiting for it."""

    running: int
    waiting: list[tuple[int, Proposal, float]]

    def __init__(self, running: int, waiting: list[tuple[int, Proposal, float]]) -> None:
        self.running = running
        self.waiting = waiting


@dataclass(slots=True)
class _Forward:
    """A SETONCE this node forwarded to the key's owner (see NodeCore._forward)."""

    key: bytes
    proposal: Proposal
    deadline_ms: float
    #: Nodes that vouched, durably, that they hold this proposal at a round-0 ballot (Voted).
    votes: dict[NodeId, Ballot] = field(default_factory=dict)

    def __init__(self, key: bytes, proposal: Proposal, deadline_ms: float) -> None:
        self.key = key
        self.proposal = proposal
        self.deadline_ms = deadline_ms
        self.votes = {}


class _Slot:
    """A key's acceptor as this node holds it: state, versions, and replies waiting for fsync."""

    __slots__ = ("state", "version", "durable", "waiting", "held")

    def __init__(self, state: AcceptorState, version: int) -> None:
        self.state = state
        self.version = version
        self.durable = version
        #: Replies waiting for a version to be durable: (version, to, req_id, reply, and the vote
        #: to send a forwarding node with it, if any; see Voted).
        self.waiting: list[tuple[int, NodeId, int, Reply, tuple[NodeId, Voted] | None]] = []
        #: Sends of a fast write, held until this node's own accept (that version) is durable.
        self.held: list[tuple[int, int, list[Send]]] = []


_NO_REMOTE: tuple[NodeId | None, int] = (None, 0)


class NodeCore:
    def __init__(
        self,
        me: NodeId,
        nodes: Sequence[NodeId],
        incarnation: int,
        load: Callable[[bytes], AcceptorState],
        random: Callable[[], float],
        config: NodeConfig | None = None,
        on_learn: Callable[[bytes, bytes], None] | None = None,
    ) -> None:
        """``on_learn(key, entry)`` hears of every proposal this node learns is chosen and did not
        know (``entry`` packed by :func:`respreg.core.chosen.pack`): the driver may keep it
        (a node keeps a log of them, so its knowledge survives a restart)."""
        if me not in nodes:
            raise ValueError(f"node {me} is not among the members {list(nodes)}")
        self.me = me
        self.nodes = tuple(sorted(nodes))
        self.incarnation = incarnation
        self.config = config or NodeConfig()
        self._load = load
        self._random = random
        self._round = 0
        # One version counter for all keys, so a reply can never be released by the fsync of an
        # earlier, forgotten incarnation of the same key's slot.
        self._version = 0
        self._slots: OrderedDict[bytes, _Slot] = OrderedDict()
        # key -> chosen (proposal id, value), packed in one bytes object: nothing the cyclic
        # garbage collector scans (Proposal instances would all be scanned by every full pass).
        self._chosen = ChosenCache(self.config.chosen_cache_keys, self.config.chosen_cache_bytes)
        #: The cache itself, for a driver's hot path: ``chosen_cache.value(key)`` is the value of
        #: :meth:`chosen` without building a Proposal (a direct call where the code is compiled).
        self.chosen_cache = self._chosen
        self._on_learn = on_learn
        self._ops: dict[int, Proposer] = {}
        self._op_reqs: dict[int, list[int]] = {}
        self._outstanding: dict[int, tuple[int, int, NodeId]] = {}  # req_id -> (op, seq, to)
        self._next_req = 1
        #: None while this node's acceptor votes; otherwise why it refuses to (see set_voting).
        self.not_voting: str | None = None
        #: Whether writes of owned keys may take the one-round-trip path. The driver clears it
        #: for good on a node whose acceptor state was ever lost and rebuilt (docs/design.md).
        self.fast_writes = self.config.fast_writes
        #: Forward SETONCEs of keys owned by another node to it (static: what the cluster runs).
        self.forward_writes = self.config.fast_writes
        #: What new proposers get (see set_attempt_timeout).
        self._proposer_config = self.config.proposer
        self._forwards: dict[int, _Forward] = {}
        #: Operations run on behalf of another node (a forwarded write): op id -> (node, req id).
        #: Their ids are negative, so they never collide with the driver's.
        self._remote_ops: dict[int, tuple[NodeId, int]] = {}
        self._next_internal = -1
        #: Recent forwarded writes by (sender, request id): a duplicated request must not start
        #: a second operation, whose sends could contradict a NOQUORUM answer to the first.
        self._proposes_seen: OrderedDict[tuple[NodeId, int], None] = OrderedDict()
        self._peers_down: set[NodeId] = set()
        self._read_rounds: dict[bytes, _ReadRound] = {}
        self._write_queues: dict[bytes, _WriteQueue] = {}
        self._queued_writes: dict[int, bytes] = {}
        #: Round-0 writes to the two other nodes in flight (op id -> key), and the keys whose
        #: round-0 attempt did not end chosen: round 0 is not used for them again (best effort,
        #: bounded; acceptors make a reuse safe anyway, see _begin_fast_peers).
        self._fast_ops: dict[int, bytes] = {}
        self._fast_spent: OrderedDict[bytes, None] = OrderedDict()
        #: Round-0 attempts of other nodes' keys in flight, and the moving share of such
        #: attempts that were declined (see _contended).
        self._here_ops: set[int] = set()
        self.contention = 0.0
        self._skipped = 0
        self.stats: dict[str, int] = {
            "prepare_received": 0,
            "accept_received": 0,
            "read_received": 0,
            "learn_received": 0,
            "nack_sent": 0,
            "refused_sent": 0,
            "persist_requested": 0,
            "writes_started": 0,
            "reads_started": 0,
            "reads_local": 0,
            "writes_local_nil": 0,
            "ops_chosen": 0,
            "ops_empty": 0,
            "ops_noquorum": 0,
            "ops_uncertain": 0,
            "ballots_started": 0,
            "fast_writes": 0,
            "fast_writes_declined": 0,
            "writes_forwarded": 0,
            "forwards_received": 0,
            "forwards_fell_back": 0,
            "forwards_settled_by_votes": 0,
            "reads_shared": 0,
            "writes_queued": 0,
        }
        #: Reads that took another read's operation (join_read_round): counted apart from
        #: ``stats``, since a native attribute costs less per GET than a dict entry.
        self.reads_joined = 0

    # ---- client operations -------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """``stats`` with the reads that joined another read's operation counted in."""
        out = dict(self.stats)
        out["reads_started"] += self.reads_joined
        out["reads_shared"] += self.reads_joined
        return out

    def chosen(self, key: bytes) -> Proposal | None:
        """The proposal this node knows is chosen for ``key``, if any (never changes once set)."""
        p = self._chosen.get(key)
        return None if p is None else Proposal(p[0], p[1])

    def begin_write(
        self, op_id: int, key: bytes, proposal: Proposal, deadline_ms: float | None = None
    ) -> list[NodeEffect]:
        """Start a SETONCE; ``deadline_ms`` overrides the configured deadline for this one."""
        self.stats["writes_started"] += 1
        known = self.chosen(key)
        if known is not None:
            # Chosen before this call began: the write fails (linearizes right at its start).
            self.stats["writes_local_nil"] += 1
            return self._op_done(op_id, Chosen(known))
        queue = self._write_queues.get(key)
        if queue is not None:
            # This node already writes the key. Racing it would only make the two proposals
            # pre-empt each other; the earlier write almost always settles the key, and then
            # this one fails at once from memory (see _write_done).
            self.stats["writes_queued"] += 1
            queue.waiting.append(
                (op_id, proposal, self.config.proposer.deadline_ms if deadline_ms is None else deadline_ms)
            )
            self._queued_writes[op_id] = key
            return [OpTimer(op_id, queue.waiting[-1][2], WAIT_TOKEN)]
        self._write_queues[key] = _WriteQueue(op_id, [])
        return self._start_write(op_id, key, proposal, deadline_ms)

    def _start_write(self, op_id: int, key: bytes, proposal: Proposal, deadline_ms: float | None) -> list[NodeEffect]:
        owner = owner_in(key, self.nodes)
        if owner == self.me:
            # With a majority known to be out of reach, full Paxos fails with NOQUORUM before
            # anything is accepted; the fast path would accept here first and be UNCERTAIN.
            reachable = len(self.nodes) - len(self._peers_down)
            if self.fast_writes and self.not_voting is None and reachable > len(self.nodes) // 2:
                fast = self._begin_fast(op_id, key, proposal, deadline_ms)
                if fast is not None:
                    return fast
        elif self.forward_writes and op_id >= 0:
            if self.config.fast_writes_here and len(self.nodes) == 3 and not self._contended():
                here = self._begin_fast_here(op_id, owner, key, proposal, deadline_ms)
                if here is not None:
                    return here
            if owner not in self._peers_down:
                return self._forward(op_id, owner, key, proposal, deadline_ms)
        return self._begin(op_id, key, proposal, deadline_ms)

    @property
    def attempt_timeout_ms(self) -> float:
        """How long a phase of a proposer started now waits for missing answers (its first attempt)."""
        return self._proposer_config.attempt_timeout_ms

    def set_attempt_timeout(self, ms: float) -> None:
        """Let the phases of proposers started from now on wait ``ms`` for missing answers before
        they retry with a higher ballot (or a round-0 write is handed on). The driver follows how
        long the peers take to answer (docs/design.md, *Timeouts follow the answers*): a phase
        that times out while its answers are only slow adds a ballot's disk writes to a load
        that is already more than the disks keep up with. Only when and how hard a proposer
        retries changes, never what any answer means."""
        if ms <= 0:
            raise ValueError("the attempt timeout must be positive")
        if ms != self._proposer_config.attempt_timeout_ms:
            self._proposer_config = self._proposer_config.with_attempt_timeout(ms)

    def set_peer_up(self, node: NodeId, up: bool) -> None:
        """The driver's view of its link to ``node``: writes are not forwarded to a node that is
        down (they run full Paxos here instead)."""
        if up:
            self._peers_down.discard(node)
        else:
            self._peers_down.add(node)

    def _forward(
        self, op_id: int, owner: NodeId, key: bytes, proposal: Proposal, deadline_ms: float | None
    ) -> list[NodeEffect]:
        """Ask ``owner`` to write ``proposal``: it can use its one-round-trip path, this node
        cannot. If the link to the owner fails, or the owner's own attempt fails, this node runs
        full Paxos for the same proposal itself (safe alongside the owner's attempt: both
        propose the same proposal id, so the outcome is reported exactly)."""
        if op_id in self._ops or op_id in self._forwards:
            raise ValueError(f"operation {op_id} already running")
        deadline = self.config.proposer.deadline_ms if deadline_ms is None else deadline_ms
        self.stats["writes_forwarded"] += 1
        req_id = self._next_req
        self._next_req += 1
        self._outstanding[req_id] = (op_id, 0, owner)
        self._op_reqs[op_id] = [req_id]
        self._forwards[op_id] = _Forward(key, proposal, deadline)
        # The owner answers within three quarters of the deadline, so that a failure there (the
        # owner cut off from a majority this node may still reach) leaves time to try from here.
        # A dead or paused owner is noticed by the link (Unreachable), well within that.
        return [
            PeerSend(owner, req_id, Propose(key, proposal, max(int(deadline * 3 / 4), 1))),
            OpTimer(op_id, deadline, DEADLINE_TOKEN),
        ]

    def _forward_reply(self, op_id: int, reply: Reply) -> list[NodeEffect]:
        if isinstance(reply, Written):
            if reply.kind == "CHOSEN" and reply.proposal is not None:
                return self._forward_chosen(op_id, reply.proposal)
            # The owner could not reach a majority; this node may. A NOQUORUM from the owner
            # speaks for one copy of the forward only: a duplicate delivered later, to an owner
            # that restarted since (and so forgot it had seen the forward), would write it. So
            # this node's attempt never answers NOQUORUM either.
        # Unreachable (the link failed, maybe after the owner received it) or Refused.
        return self._fall_back(op_id, maybe_sent=True)

    def _forward_chosen(self, op_id: int, proposal: Proposal) -> list[NodeEffect]:
        """A forwarded write ended with ``proposal`` chosen (said by the owner, or by votes)."""
        fwd = self._forwards.pop(op_id)
        for req_id in self._op_reqs.pop(op_id, ()):
            self._outstanding.pop(req_id, None)  # the owner's answer, if it still comes, is moot
        outcome = Chosen(proposal)
        self._learn(fwd.key, proposal)
        self._count_outcome(outcome)
        return [OpDone(op_id, outcome), *self._write_done(fwd.key, op_id)]

    def _on_voted(self, sender: NodeId, msg: Voted) -> list[NodeEffect]:
        """A node vouches that it durably holds ``msg.pid`` at round-0 ballot ``msg.ballot``.

        Only a write this node forwarded and still waits for counts votes, and only votes for
        its own proposal id from nodes other than the key's owner. When a majority of nodes
        vouch for one round-0 ballot, the write is chosen: in a cluster of three these are the
        only two nodes that ever hold round-0 proposals of the key, and both holding this one
        is exactly what the owner itself waits for before it calls the write chosen
        (docs/design.md, "Votes to the forwarding node").
        """
        queue = self._write_queues.get(msg.key)
        if queue is None:
            return []
        op_id = queue.running
        fwd = self._forwards.get(op_id)
        if (
            fwd is None
            or fwd.proposal.pid != msg.pid
            or msg.ballot.round != FAST_ROUND
            or sender == owner_in(msg.key, self.nodes)
        ):
            return []
        fwd.votes[sender] = msg.ballot
        if sum(1 for b in fwd.votes.values() if b == msg.ballot) <= len(self.nodes) // 2:
            return []
        self.stats["forwards_settled_by_votes"] += 1
        return self._forward_chosen(op_id, fwd.proposal)

    def _vote(self, to: NodeId, vote: Voted) -> list[NodeEffect]:
        if to == self.me:
            return self._on_voted(self.me, vote)
        return [PeerSend(to, 0, vote)]

    def _fall_back(self, op_id: int, maybe_sent: bool) -> list[NodeEffect]:
        """The owner did not write it: write the same proposal through full Paxos from here.
        If the owner may have sent it for acceptance, a failure here is UNCERTAIN, never
        NOQUORUM. The forward's own deadline timer still bounds the whole operation."""
        fwd = self._forwards.pop(op_id)
        for req_id in self._op_reqs.pop(op_id, ()):
            self._outstanding.pop(req_id, None)
        self.stats["forwards_fell_back"] += 1
        p = self._new_proposer(op_id, fwd.key, fwd.proposal, fwd.deadline_ms, True)
        p.sent_own = maybe_sent
        return self._run(op_id, p.start())

    def _op_done(self, op_id: int, outcome: Outcome) -> list[NodeEffect]:
        """An operation ended: tell the driver, or the node that forwarded it."""
        remote = self._remote_ops.pop(op_id, None)
        if remote is None:
            return [OpDone(op_id, outcome)]
        if isinstance(outcome, Chosen):
            reply = Written("CHOSEN", outcome.proposal, "")
        elif isinstance(outcome, Failed):
            reply = Written(outcome.kind.value, None, outcome.reason)
        else:
            reply = Written("UNCERTAIN", None, "unexpected outcome")
        return self._respond(remote[0], remote[1], reply)

    def _begin_fast(
        self, op_id: int, key: bytes, proposal: Proposal, deadline_ms: float | None
    ) -> list[NodeEffect] | None:
        """The one-round-trip write of a key this node owns, or None when it may not be used.

        In a cluster of three, see :meth:`_begin_fast_peers`. With five or more nodes:
        Round 0 of ``key`` belongs to this node alone, and this node's own acceptor records its
        use durably *before* any other node hears of it. So an empty acceptor state here proves
        that no lifetime of this data directory ever proposed at round 0 for ``key``: the ballot
        ``(0, me, incarnation)`` is then below every ballot anyone else can use, nothing can have
        been chosen below it, and it carries exactly one proposal. Phase 1 has nothing to find,
        and the proposal goes straight to the accept phase (docs/design.md has the argument).
        """
        if len(self.nodes) == 3:
            return self._begin_fast_peers(op_id, key, proposal, deadline_ms)
        slot = self._empty_slot(key)
        if slot is None:
            return None
        p = self._new_proposer(op_id, key, proposal, deadline_ms, True)
        self.stats["fast_writes"] += 1
        effects = p.start_fast(Ballot(FAST_ROUND, int(self.me), self.incarnation))
        own = [e for e in effects if isinstance(e, Send) and e.to == self.me]
        rest = [e for e in effects if not (isinstance(e, Send) and e.to == self.me)]
        out = self._run(op_id, own)
        # The own acceptor accepted, and the state waits for its fsync: the other nodes hear of
        # the proposal only after that. If it did not accept (it cannot, being empty, but do
        # not rely on it), the sends are dropped and the phase timeout falls back to Paxos.
        pending = slot.durable < slot.version and self._slots.get(key) is slot
        sends = [e for e in rest if isinstance(e, Send)]
        out += self._run(op_id, [e for e in rest if not isinstance(e, Send)])
        if pending and sends:
            slot.held.append((slot.version, op_id, sends))
        return out

    def _empty_slot(self, key: bytes) -> _Slot | None:
        """This node's acceptor slot of ``key`` if it holds nothing (never promised, never
        accepted, nothing waiting for a fsync), else None; None too for an unreadable state,
        which the normal path then reports."""
        try:
            slot = self._slot(key)
        except Exception:  # noqa: BLE001 - see the docstring
            return None
        if slot.state != EMPTY_STATE or slot.waiting or slot.held:
            return None
        return slot

    def _begin_fast_peers(
        self, op_id: int, key: bytes, proposal: Proposal, deadline_ms: float | None
    ) -> list[NodeEffect] | None:
        """The one-round-trip write of an owned key in a cluster of three: the round-0 accept
        goes to the two other nodes only, and the proposal is chosen when both accepted it.
        This node's own acceptor never takes a round-0 proposal of a key it owns, so nothing
        waits for a fsync here before the accepts leave.

        Safe because the two other nodes are the only acceptors that ever hold a round-0
        proposal of ``key``, each takes one only while it has accepted nothing, and a round-0
        proposal is chosen only when both hold it: then no acceptor holds any other round-0
        proposal of the key, now or later, whatever an earlier life of this node sent (see
        docs/design.md). With one of them known down, full Paxos runs instead; a refusal or a
        failed link during the attempt falls back to full Paxos at once.
        """
        acceptors = [n for n in self.nodes if n != self.me]
        remote = self._remote_ops.get(op_id)
        # A write another node forwarded: both acceptors also tell that node once they hold
        # the proposal durably, so it can answer its client without waiting for this node.
        notify = int(remote[0]) if remote is not None and remote[0] in acceptors else 0
        return self._round_zero(op_id, key, proposal, deadline_ms, acceptors, notify, False)

    def _round_zero(
        self,
        op_id: int,
        key: bytes,
        proposal: Proposal,
        deadline_ms: float | None,
        acceptors: list[NodeId],
        notify: int,
        hand_back: bool,
    ) -> list[NodeEffect] | None:
        """A round-0 write at ``(0, me, incarnation)`` to ``acceptors`` alone, chosen when every
        one of them accepted it (_begin_fast_peers, _begin_fast_here); None when one of them is
        known down, the key's round 0 was already spent here, or this node's acceptor holds
        something for the key. ``hand_back``: the attempt ends Declined instead of falling back
        to full Paxos."""
        if any(n in self._peers_down for n in acceptors) or key in self._fast_spent:
            return None
        # Any state here means full Paxos touched the key (it prepares on every node, this one
        # included): a round-0 write would only be refused, and could repeat ballot
        # (0, me, incarnation) of an earlier round-0 attempt for another proposal.
        if self._empty_slot(key) is None:
            return None
        p = self._new_proposer(op_id, key, proposal, deadline_ms, True)
        self.stats["fast_writes"] += 1
        self._fast_ops[op_id] = key
        if hand_back:
            self._here_ops.add(op_id)
        ballot = Ballot(FAST_ROUND, int(self.me), self.incarnation)
        return self._run(op_id, p.start_fast(ballot, acceptors, notify, hand_back))

    def _begin_fast_here(
        self, op_id: int, owner: NodeId, key: bytes, proposal: Proposal, deadline_ms: float | None
    ) -> list[NodeEffect] | None:
        """The one-round-trip write, in a cluster of three, of a key another node owns: the
        round-0 accept, at ballot ``(0, me, incarnation)``, goes to the two non-owners (this
        node's own acceptor and the other one), and the proposal is chosen when both accepted
        it. None when it may not be used (then the write is forwarded to the owner).

        Safe by the argument of :meth:`_begin_fast_peers`, which does not depend on which node
        proposes: the non-owners are still the only acceptors that ever hold a round-0 proposal
        of ``key``, each takes one only while it has accepted nothing, and a round-0 proposal is
        chosen only when both hold it. This node takes round 0 only while its own acceptor
        holds nothing for the key, and its own acceptance then holds the proposal durably, so
        it cannot propose a second one at this ballot (nor after a restart: new incarnation).

        When the attempt is not chosen (the other non-owner refused, its link failed, or the
        phase timed out: two nodes racing for the key hold one proposal each), the proposer
        ends Declined and the write goes to the owner (see _declined), which funnels a
        contended key into one node instead of duelling prepares from several.
        """
        if not self.fast_writes or self.not_voting is not None:
            return None
        acceptors = [n for n in self.nodes if n != owner]  # this node and the other non-owner
        return self._round_zero(op_id, key, proposal, deadline_ms, acceptors, 0, True)

    def _contended(self) -> bool:
        """Whether to forward a write of another node's key at once instead of trying round 0
        here: while many recent attempts were declined (keys raced from several nodes), which
        would only add a round-0 attempt before the forward; one write in CONTENTION_PROBE
        still tries, to see when that ends. A choice of path, not of safety: both are safe."""
        if self.contention <= CONTENTION_HIGH:
            return False
        self._skipped += 1
        return self._skipped % CONTENTION_PROBE != 0

    def _here_ended(self, op_id: int, declined: bool) -> None:
        if op_id in self._here_ops:
            self._here_ops.discard(op_id)
            self.contention = self.contention * (1 - CONTENTION_WEIGHT) + (CONTENTION_WEIGHT if declined else 0.0)

    def _declined(self, op_id: int, p: Proposer) -> list[NodeEffect]:
        """A round-0 write begun here (_begin_fast_here) was not chosen at round 0: forward it
        to the key's owner, or, with the owner known down, run full Paxos here; the same
        proposal either way. Its proposal went out in accepts, so it may yet be chosen: any
        failure from now on is UNCERTAIN, never NOQUORUM. The deadline timer set when the write
        began still bounds it."""
        self.stats["fast_writes_declined"] += 1
        self._here_ended(op_id, declined=True)
        self._drop_op(op_id)
        assert p.own is not None
        owner = owner_in(p.key, self.nodes)
        if owner not in self._peers_down:
            return self._forward(op_id, owner, p.key, p.own, p.config.deadline_ms)
        again = self._new_proposer(op_id, p.key, p.own, p.config.deadline_ms, True)
        again.sent_own = True
        return self._run(op_id, again.start())

    def begin_read(self, op_id: int, key: bytes, deadline_ms: float | None = None) -> list[NodeEffect]:
        self.stats["reads_started"] += 1
        known = self.chosen(key)
        if known is not None:
            self.stats["reads_local"] += 1
            return [OpDone(op_id, Chosen(known))]
        deadline = self.config.proposer.deadline_ms if deadline_ms is None else deadline_ms
        rnd = self._read_rounds.get(key)
        if rnd is not None:
            # A read round of this key is in flight, but it may have begun before this read did,
            # so its answer could be stale for this one: wait for the next round, which begins
            # after every read waiting for it began. One round then answers all of them.
            self.stats["reads_shared"] += 1
            rnd.waiting.append(op_id)
            rnd.deadlines[op_id] = deadline
            return [OpTimer(op_id, deadline, WAIT_TOKEN)]
        self._read_rounds[key] = _ReadRound(op_id, [], [], {})
        return self._begin(op_id, key, None, deadline)

    def join_read_round(self, key: bytes) -> int | None:
        """For a read of ``key`` that begins now: the read it may share an operation with, or None.

        That is the first read waiting for the next read round of ``key`` (see begin_read): the
        next round begins after the read beginning now, so its outcome answers this read too, as
        it answers every read waiting for it. The driver hands this read that operation's
        outcome, and the core does no work for it. (It ends by that operation's deadline, at
        most its own.)
        """
        rnd = self._read_rounds.get(key)
        if rnd is None or not rnd.waiting:
            return None
        self.reads_joined += 1  # counted as started and as shared (see counters)
        return rnd.waiting[0]

    def _read_round_done(self, key: bytes, op_id: int, outcome: Outcome) -> list[NodeEffect]:
        """The round led by ``op_id`` ended: its riders share the outcome; the reads that waited
        start the next round together."""
        rnd = self._read_rounds.get(key)
        if rnd is None or rnd.leader != op_id:
            return []
        out: list[NodeEffect] = [OpDone(r, outcome) for r in rnd.riders]
        for r in rnd.riders:
            self._count_outcome(outcome)
            rnd.deadlines.pop(r, None)
        if not rnd.waiting:
            del self._read_rounds[key]
            return out
        leader, *riders = rnd.waiting
        self._read_rounds[key] = nxt = _ReadRound(leader, riders, [], rnd.deadlines)
        deadline = nxt.deadlines.pop(leader)
        return out + self._begin(leader, key, None, deadline)

    def _write_done(self, key: bytes, op_id: int) -> list[NodeEffect]:
        """The write ``op_id`` of ``key`` ended: the writes queued behind it fail from memory if
        the key is now chosen, otherwise the first of them starts."""
        queue = self._write_queues.get(key)
        if queue is None or queue.running != op_id:
            return []
        known = self.chosen(key)
        out: list[NodeEffect] = []
        while queue.waiting:
            w_op, w_proposal, w_deadline = queue.waiting.pop(0)
            del self._queued_writes[w_op]
            if known is not None:
                # Chosen before this write took effect (it began earlier, but nothing of it was
                # sent): it linearizes after the choice and fails, as in begin_write.
                self.stats["writes_local_nil"] += 1
                outcome = Chosen(known)
                self._count_outcome(outcome)
                out += self._op_done(w_op, outcome)
                continue
            queue.running = w_op
            return out + self._start_write(w_op, key, w_proposal, w_deadline)
        del self._write_queues[key]
        return out

    def _wait_expired(self, op_id: int) -> list[NodeEffect] | None:
        """An operation's deadline passed while it waited behind another of its key: a write
        never sent (NOQUORUM), or a read waiting for or riding on a shared round."""
        key = self._queued_writes.pop(op_id, None)
        if key is not None:
            queue = self._write_queues[key]
            queue.waiting = [w for w in queue.waiting if w[0] != op_id]
            outcome = Failed(Failure.NOQUORUM, "deadline passed behind an earlier write of the same key; not sent")
            self._count_outcome(outcome)
            return self._op_done(op_id, outcome)
        return self._ride_expired(op_id)

    def _ride_expired(self, op_id: int) -> list[NodeEffect] | None:
        """A read's deadline passed while it waited for or rode on a shared round."""
        for rnd in self._read_rounds.values():
            if op_id in rnd.waiting or op_id in rnd.riders:
                (rnd.waiting if op_id in rnd.waiting else rnd.riders).remove(op_id)
                deadline = rnd.deadlines.pop(op_id, 0.0)
                outcome = Failed(Failure.NOQUORUM, f"no majority answered within {deadline:.0f} ms")
                self._count_outcome(outcome)
                return [OpDone(op_id, outcome)]
        return None

    def begin_repair(self, op_id: int, key: bytes) -> list[NodeEffect]:
        """Make sure whatever may be chosen for ``key`` is chosen by nodes other than this one.

        Used while this node does not vote (its acceptor refuses, so every quorum is made of
        other nodes): a read through Paxos that ignores the chosen cache and learned flags, so
        it ends only when a majority of other nodes accepted one proposal at one ballot, or
        showed that nothing was accepted.
        """
        assert self.not_voting is not None, "a repair needs this node's acceptor out of the quorums"
        return self._begin(op_id, key, None, None, trust_learned=False)

    def _begin(
        self,
        op_id: int,
        key: bytes,
        proposal: Proposal | None,
        deadline_ms: float | None,
        trust_learned: bool = True,
    ) -> list[NodeEffect]:
        read_first = self._read_first(key) if proposal is None and trust_learned else None
        p = self._new_proposer(op_id, key, proposal, deadline_ms, trust_learned, read_first)
        return self._run(op_id, p.start())

    def _read_first(self, key: bytes) -> tuple[NodeId, ...] | None:
        """The majority a read asks first, or None to ask every acceptor at once.

        In a cluster of three that writes at round 0, the two nodes other than the key's owner:
        they are the ones that hold a round-0 write (the owner's acceptor stays out of round 0),
        so for most keys their two answers settle the read, and the owner's file read and
        messages are saved. Which majority answers does not matter for safety (docs/design.md,
        "Read path"); when the two disagree or one fails, the read asks the owner too.
        """
        if len(self.nodes) != 3 or not self.forward_writes:
            return None
        owner = owner_in(key, self.nodes)
        return tuple(n for n in self.nodes if n != owner)

    def _new_proposer(
        self,
        op_id: int,
        key: bytes,
        proposal: Proposal | None,
        deadline_ms: float | None,
        trust_learned: bool,
        read_first: tuple[NodeId, ...] | None = None,
    ) -> Proposer:
        if op_id in self._ops:
            raise ValueError(f"operation {op_id} already running")
        config = self._proposer_config
        if deadline_ms is not None and deadline_ms != config.deadline_ms:
            config = config.with_deadline(deadline_ms)
        p = Proposer(
            key,
            self.me,
            self.nodes,
            self.incarnation,
            proposal,
            self._alloc_round,
            self._random,
            config,
            trust_learned,
            read_first,
        )
        self._ops[op_id] = p
        self._op_reqs[op_id] = []
        return p

    def _alloc_round(self, at_least: int) -> int:
        self._round = max(self._round + 1, at_least)
        self.stats["ballots_started"] += 1
        return self._round

    def on_timer(self, op_id: int, token: int) -> list[NodeEffect]:
        if token == WAIT_TOKEN:
            expired = self._wait_expired(op_id)
            if expired is not None:
                return expired
            # It leads a round by now: its deadline still runs from when it began.
            token = DEADLINE_TOKEN
        fwd = self._forwards.get(op_id)
        if fwd is not None:
            if token == DEADLINE_TOKEN:
                self._forwards.pop(op_id)
                for req_id in self._op_reqs.pop(op_id, ()):
                    self._outstanding.pop(req_id, None)
                outcome = Failed(Failure.UNCERTAIN, f"the key's owner did not answer within {fwd.deadline_ms:.0f} ms")
                self._count_outcome(outcome)
                return [OpDone(op_id, outcome), *self._write_done(fwd.key, op_id)]
            return []
        p = self._ops.get(op_id)
        if p is None:
            return []
        return self._run(op_id, p.on_timer(token))

    def on_peer_reply(self, req_id: int, reply: Reply) -> list[NodeEffect]:
        entry = self._outstanding.pop(req_id, None)
        if entry is None:
            return []
        op_id, seq, sender = entry
        if op_id in self._forwards:
            return self._forward_reply(op_id, reply)
        p = self._ops.get(op_id)
        if p is None:
            return []
        return self._run(op_id, p.on_reply(sender, seq, reply))

    def _run(self, op_id: int, effects: Sequence[Effect]) -> list[NodeEffect]:
        out: list[NodeEffect] = []
        local: list[tuple[int, Request]] = []
        for e in effects:
            if isinstance(e, Send):
                if isinstance(e.msg, Learn):
                    if e.to == self.me:
                        self._learn(e.msg.key, e.msg.proposal)
                    elif self._remote_ops.get(op_id, _NO_REMOTE)[0] != e.to:
                        # A node that forwarded this write learns the outcome from the reply.
                        out.append(PeerSend(e.to, 0, e.msg))
                    continue
                req_id = self._next_req
                self._next_req += 1
                self._outstanding[req_id] = (op_id, e.seq, e.to)
                self._op_reqs[op_id].append(req_id)
                if e.to == self.me:
                    local.append((req_id, e.msg))
                else:
                    out.append(PeerSend(e.to, req_id, e.msg))
            elif isinstance(e, SetTimer):
                out.append(OpTimer(op_id, e.delay_ms, e.token))
            elif isinstance(e, Declined):
                out += self._declined(op_id, self._ops[op_id])
            elif isinstance(e, Done):
                out += self._op_done(op_id, e.outcome)
                self._count_outcome(e.outcome)
                p = self._ops[op_id]
                if isinstance(e.outcome, Chosen):
                    self._learn(p.key, e.outcome.proposal)
                self._drop_op(op_id)
                if p.is_write:
                    out += self._write_done(p.key, op_id)
                elif p.trust_learned:
                    out += self._read_round_done(p.key, op_id, e.outcome)
        for req_id, msg in local:
            out += self.on_request(self.me, req_id, msg)
        return out

    def _count_outcome(self, outcome: Outcome) -> None:
        if isinstance(outcome, Chosen):
            self.stats["ops_chosen"] += 1
        elif isinstance(outcome, Empty):
            self.stats["ops_empty"] += 1
        elif outcome.kind.value == "NOQUORUM":
            self.stats["ops_noquorum"] += 1
        else:
            self.stats["ops_uncertain"] += 1

    def _drop_op(self, op_id: int) -> None:
        self._here_ended(op_id, declined=False)
        key = self._fast_ops.pop(op_id, None)
        if key is not None and key not in self._chosen:
            self._fast_spent[key] = None
            if len(self._fast_spent) > FAST_SPENT_REMEMBERED:
                self._fast_spent.popitem(last=False)
        self._ops.pop(op_id, None)
        for req_id in self._op_reqs.pop(op_id, ()):
            self._outstanding.pop(req_id, None)

    def _respond(self, to: NodeId, req_id: int, reply: Reply) -> list[NodeEffect]:
        if to == self.me:
            return self.on_peer_reply(req_id, reply)
        return [PeerRespond(to, req_id, reply)]

    # ---- acceptor side -----------------------------------------------------------------------

    def on_request(self, sender: NodeId, req_id: int, msg: Request) -> list[NodeEffect]:
        """A proposer (on a peer, or on this node) asks this node's acceptor for ``msg.key``."""
        if isinstance(msg, Learn):
            self.stats["learn_received"] += 1
            self._learn(msg.key, msg.proposal)
            return []
        if isinstance(msg, Voted):
            return self._on_voted(sender, msg)
        if isinstance(msg, Propose):
            # A write forwarded by another node: run it as this node's own, answer when done.
            if (sender, req_id) in self._proposes_seen:
                return []  # a duplicate: the first copy's operation answers
            self._proposes_seen[(sender, req_id)] = None
            if len(self._proposes_seen) > PROPOSES_REMEMBERED:
                self._proposes_seen.popitem(last=False)
            self.stats["forwards_received"] += 1
            op_id = self._next_internal
            self._next_internal -= 1
            self._remote_ops[op_id] = (sender, req_id)
            return self.begin_write(op_id, msg.key, msg.proposal, float(msg.deadline_ms))
        if self.not_voting is not None:
            self.stats["refused_sent"] += 1
            return self._respond(sender, req_id, Refused(self.not_voting))
        try:
            slot = self._slot(msg.key)
        except Exception as exc:  # noqa: BLE001 - any load failure means: do not vote on this key
            self.stats["refused_sent"] += 1
            reason = f"state of this key is unreadable: {exc}"
            return [Alarm(msg.key, reason), *self._respond(sender, req_id, Refused(reason))]
        old = slot.state
        # "chosen" vouches for the proposal the reply carries, which is this acceptor's own
        # accepted one: it may be an older proposal than the chosen one this node learned.
        known = self._chosen.get(msg.key)
        chosen = known is not None and old.proposal is not None and known == (old.proposal.pid, old.proposal.value)
        reply: Reply
        if isinstance(msg, Prepare):
            self.stats["prepare_received"] += 1
            slot.state, reply = acceptor.on_prepare(old, msg, chosen)
        elif isinstance(msg, Accept):
            self.stats["accept_received"] += 1
            slot.state, reply = acceptor.on_accept(old, msg)
        else:
            assert isinstance(msg, Read)
            self.stats["read_received"] += 1
            reply = acceptor.on_read(old, msg, chosen)
        if isinstance(reply, Nack):
            self.stats["nack_sent"] += 1
        effects: list[NodeEffect] = []
        if slot.state is not old:
            self._version += 1
            slot.version = self._version
            self.stats["persist_requested"] += 1
            effects.append(Persist(msg.key, slot.state, slot.version))
        vote: tuple[NodeId, Voted] | None = None
        if isinstance(msg, Accept) and msg.notify and isinstance(reply, Accepted) and msg.ballot.round == FAST_ROUND:
            proposal = slot.state.proposal
            assert proposal is not None and slot.state.accepted == msg.ballot  # what Accepted means
            vote = (NodeId(msg.notify), Voted(msg.key, msg.ballot, proposal.pid))
        if slot.durable >= slot.version:
            effects += self._release(sender, req_id, reply, vote)
        else:
            slot.waiting.append((slot.version, sender, req_id, reply, vote))
        return effects

    def _release(self, to: NodeId, req_id: int, reply: Reply, vote: tuple[NodeId, Voted] | None) -> list[NodeEffect]:
        """Send a reply whose state is durable, and the vote that goes with it."""
        effects = self._respond(to, req_id, reply)
        if vote is not None:
            effects += self._vote(*vote)
        return effects

    def on_persisted(self, key: bytes, version: int, error: BaseException | None) -> list[NodeEffect]:
        slot = self._slots.get(key)
        if slot is None:
            return []
        effects: list[NodeEffect] = []
        if error is not None:
            # What reached the disk is unknown: refuse everything that waited, forget the
            # in-memory state, and reload it from disk on the next request.
            reason = f"could not make state durable: {error}"
            waiting, slot.waiting = slot.waiting, []  # their votes are dropped: none is durable
            del self._slots[key]
            effects.append(Alarm(key, reason))
            for _, to, req_id, _, _ in waiting:
                self.stats["refused_sent"] += 1
                effects += self._respond(to, req_id, Refused(reason))
            return effects
        if slot.durable < version <= slot.version:
            slot.durable = version
        if slot.held:
            released = [h for h in slot.held if h[0] <= slot.durable]
            slot.held = [h for h in slot.held if h[0] > slot.durable]
            for _, op_id, sends in released:
                p = self._ops.get(op_id)
                live = [e for e in sends if p is not None and isinstance(e, Send) and e.seq == p.seq]
                if live:
                    effects += self._run(op_id, live)
        ready = [w for w in slot.waiting if w[0] <= slot.durable]
        if ready:
            slot.waiting = [w for w in slot.waiting if w[0] > slot.durable]
            for _, to, req_id, reply, vote in ready:
                effects += self._release(to, req_id, reply, vote)
        self._evict()
        return effects

    def _slot(self, key: bytes) -> _Slot:
        slot = self._slots.get(key)
        if slot is None:
            state = self._load(key)
            # Make room first: the slot being inserted is in use and must not be evicted.
            self._evict(reserve=1)
            slot = _Slot(state, self._version)
            self._slots[key] = slot
        else:
            self._slots.move_to_end(key)
        return slot

    def _evict(self, reserve: int = 0) -> None:
        """Drop the least recently used clean slots beyond the cache size (minus ``reserve``).

        Once over the size it drops a sixty-fourth of the size more (none below 64 slots), so
        that the inserts after it find room without a scan each (measured: the scan of one or
        two slots per insert took 2-3 % of a node's CPU under a write load)."""
        cap = self.config.state_cache_keys
        excess = len(self._slots) + reserve - cap
        if excess <= 0:
            return
        excess += cap >> 6
        for key in list(islice(self._slots, excess * 2)):
            s = self._slots[key]
            if s.durable >= s.version and not s.waiting:
                del self._slots[key]
                excess -= 1
                if excess <= 0:
                    return

    def _learn(self, key: bytes, proposal: Proposal) -> None:
        entry = self._chosen.add(key, proposal.pid, proposal.value)
        if entry is not None and self._on_learn is not None:
            self._on_learn(key, entry)

    def preload_chosen(self, entries: Iterable[tuple[bytes, bytes]]) -> int:
        """Take (key, packed entry) pairs a driver kept from ``on_learn`` (say, before a restart):
        each one records a proposal this node once learned is chosen, which stays true forever.
        Not passed to ``on_learn`` again. Returns how many were new to the cache."""
        return self._chosen.extend(entries)

    def set_voting(self, reason_not: str | None) -> None:
        """Let this node's acceptor vote (None), or make it refuse every prepare, accept and read
        with the given reason: a node whose durable state may be lost must not vote, and must not
        report "nothing accepted" for a key it may have forgotten."""
        self.not_voting = reason_not

    # ---- introspection -----------------------------------------------------------------------

    def ops_in_flight(self) -> int:
        return len(self._ops)

    def cached_states(self) -> int:
        return len(self._slots)

    def cached_chosen(self) -> int:
        return len(self._chosen)

    def chosen_records(self) -> list[tuple[bytes, bytes]]:
        """Every (key, packed entry) the cache holds, least recently used first."""
        return self._chosen.items()

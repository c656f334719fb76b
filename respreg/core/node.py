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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from itertools import islice

from . import acceptor
from .proposer import Chosen, Done, Effect, Empty, Failed, Outcome, Proposer, ProposerConfig, Send, SetTimer
from .types import (
    Accept,
    AcceptorState,
    Learn,
    Nack,
    NodeId,
    Prepare,
    Proposal,
    Read,
    Refused,
    Reply,
    Request,
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


@dataclass(frozen=True, slots=True)
class Persist:
    key: bytes
    state: AcceptorState
    version: int


@dataclass(frozen=True, slots=True)
class PeerSend:
    to: NodeId
    req_id: int
    msg: Request


@dataclass(frozen=True, slots=True)
class PeerRespond:
    to: NodeId
    req_id: int
    reply: Reply


@dataclass(frozen=True, slots=True)
class OpTimer:
    op_id: int
    delay_ms: float
    token: int


@dataclass(frozen=True, slots=True)
class OpDone:
    op_id: int
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class Alarm:
    key: bytes
    reason: str


NodeEffect = Persist | PeerSend | PeerRespond | OpTimer | OpDone | Alarm


@dataclass(frozen=True, slots=True)
class NodeConfig:
    proposer: ProposerConfig = field(default_factory=ProposerConfig)
    #: Acceptor states kept in memory once clean (durable, no reply waiting); others reload lazily.
    state_cache_keys: int = 100_000
    #: Chosen proposals remembered for local reads, bounded by count and by bytes.
    chosen_cache_keys: int = 1_000_000
    chosen_cache_bytes: int = 128 * 1024 * 1024


class _Slot:
    """A key's acceptor as this node holds it: state, versions, and replies waiting for fsync."""

    __slots__ = ("state", "version", "durable", "waiting")

    def __init__(self, state: AcceptorState, version: int) -> None:
        self.state = state
        self.version = version
        self.durable = version
        self.waiting: list[tuple[int, NodeId, int, Reply]] = []


class NodeCore:
    def __init__(
        self,
        me: NodeId,
        nodes: Sequence[NodeId],
        incarnation: int,
        load: Callable[[bytes], AcceptorState],
        random: Callable[[], float],
        config: NodeConfig | None = None,
    ) -> None:
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
        self._chosen: OrderedDict[bytes, Proposal] = OrderedDict()
        self._chosen_bytes = 0
        self._ops: dict[int, Proposer] = {}
        self._op_reqs: dict[int, list[int]] = {}
        self._outstanding: dict[int, tuple[int, int, NodeId]] = {}  # req_id -> (op, seq, to)
        self._next_req = 1
        #: None while this node's acceptor votes; otherwise why it refuses to (see set_voting).
        self.not_voting: str | None = None
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
        }

    # ---- client operations -------------------------------------------------------------------

    def chosen(self, key: bytes) -> Proposal | None:
        """The proposal this node knows is chosen for ``key``, if any (never changes once set)."""
        p = self._chosen.get(key)
        if p is not None:
            self._chosen.move_to_end(key)
        return p

    def begin_write(
        self, op_id: int, key: bytes, proposal: Proposal, deadline_ms: float | None = None
    ) -> list[NodeEffect]:
        """Start a SETONCE; ``deadline_ms`` overrides the configured deadline for this one."""
        self.stats["writes_started"] += 1
        known = self.chosen(key)
        if known is not None:
            # Chosen before this call began: the write fails (linearizes right at its start).
            self.stats["writes_local_nil"] += 1
            return [OpDone(op_id, Chosen(known))]
        return self._begin(op_id, key, proposal, deadline_ms)

    def begin_read(self, op_id: int, key: bytes, deadline_ms: float | None = None) -> list[NodeEffect]:
        self.stats["reads_started"] += 1
        known = self.chosen(key)
        if known is not None:
            self.stats["reads_local"] += 1
            return [OpDone(op_id, Chosen(known))]
        return self._begin(op_id, key, None, deadline_ms)

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
        if op_id in self._ops:
            raise ValueError(f"operation {op_id} already running")
        config = self.config.proposer
        if deadline_ms is not None:
            config = replace(config, deadline_ms=deadline_ms)
        p = Proposer(
            key, self.me, self.nodes, self.incarnation, proposal, self._alloc_round, self._random, config, trust_learned
        )
        self._ops[op_id] = p
        self._op_reqs[op_id] = []
        return self._run(op_id, p.start())

    def _alloc_round(self, at_least: int) -> int:
        self._round = max(self._round + 1, at_least)
        self.stats["ballots_started"] += 1
        return self._round

    def on_timer(self, op_id: int, token: int) -> list[NodeEffect]:
        p = self._ops.get(op_id)
        if p is None:
            return []
        return self._run(op_id, p.on_timer(token))

    def on_peer_reply(self, req_id: int, reply: Reply) -> list[NodeEffect]:
        entry = self._outstanding.pop(req_id, None)
        if entry is None:
            return []
        op_id, seq, sender = entry
        p = self._ops.get(op_id)
        if p is None:
            return []
        return self._run(op_id, p.on_reply(sender, seq, reply))

    def _run(self, op_id: int, effects: list[Effect]) -> list[NodeEffect]:
        out: list[NodeEffect] = []
        local: list[tuple[int, Request]] = []
        for e in effects:
            if isinstance(e, Send):
                if isinstance(e.msg, Learn):
                    if e.to == self.me:
                        self._learn(e.msg.key, e.msg.proposal)
                    else:
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
            elif isinstance(e, Done):
                out.append(OpDone(op_id, e.outcome))
                self._count_outcome(e.outcome)
                if isinstance(e.outcome, Chosen):
                    self._learn(self._ops[op_id].key, e.outcome.proposal)
                self._drop_op(op_id)
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
        chosen = known is not None and known == old.proposal
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
        if slot.durable >= slot.version:
            effects += self._respond(sender, req_id, reply)
        else:
            slot.waiting.append((slot.version, sender, req_id, reply))
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
            waiting, slot.waiting = slot.waiting, []
            del self._slots[key]
            effects.append(Alarm(key, reason))
            for _, to, req_id, _ in waiting:
                self.stats["refused_sent"] += 1
                effects += self._respond(to, req_id, Refused(reason))
            return effects
        if slot.durable < version <= slot.version:
            slot.durable = version
        ready = [w for w in slot.waiting if w[0] <= slot.durable]
        if ready:
            slot.waiting = [w for w in slot.waiting if w[0] > slot.durable]
            for _, to, req_id, reply in ready:
                effects += self._respond(to, req_id, reply)
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
        """Drop the least recently used clean slots beyond the cache size (minus ``reserve``)."""
        excess = len(self._slots) + reserve - self.config.state_cache_keys
        if excess <= 0:
            return
        for key in list(islice(self._slots, excess * 2)):
            s = self._slots[key]
            if s.durable >= s.version and not s.waiting:
                del self._slots[key]
                excess -= 1
                if excess <= 0:
                    return

    def _learn(self, key: bytes, proposal: Proposal) -> None:
        if key in self._chosen:
            self._chosen.move_to_end(key)
            return
        self._chosen[key] = proposal
        self._chosen_bytes += len(key) + len(proposal.value) + len(proposal.pid)
        while self._chosen and (
            len(self._chosen) > self.config.chosen_cache_keys or self._chosen_bytes > self.config.chosen_cache_bytes
        ):
            k, p = self._chosen.popitem(last=False)
            self._chosen_bytes -= len(k) + len(p.value) + len(p.pid)

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

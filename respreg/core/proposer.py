"""The Paxos proposer of one client operation (a SETONCE or a linearizable GET), sans-IO.

A :class:`Proposer` is a state machine. The driver feeds it events (``start``, ``on_reply``,
``on_timer``) and carries out the effects it returns (:class:`Send`, :class:`SetTimer`,
:class:`Done`). It never reads a clock, draws randomness or touches a socket: the random source
and the round allocator are handed in, so the same code runs under asyncio and under the
deterministic simulator.

Write (SETONCE): prepare at a fresh ballot; with a majority of promises, propose the proposal
accepted at the highest ballot among them, or our own if none; with a majority of accepted, the
proposal is chosen. A lost race (nack) retries with a higher ballot after a random backoff until
the deadline.

Read (GET): first ask the acceptors what they accepted (no state change, no fsync): every one,
or a given majority first and the others only when that majority's answers do not settle the
read (see ``read_first``). A majority
with nothing accepted means nothing was chosen before the read began: answer nil. A majority that
accepted one ballot, or any node that already learned the chosen proposal, gives the value.
Anything in between is completed through full Paxos (prepare, then accept the highest proposal)
before it is returned, so a value is returned only once it is chosen.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .types import (
    FAST_ROUND,
    NO_BALLOT,
    Accept,
    Accepted,
    Ballot,
    Learn,
    Nack,
    NodeId,
    Prepare,
    Promise,
    Proposal,
    Read,
    Refused,
    Reply,
    Request,
    State,
    Unreachable,
)

# ---- effects ---------------------------------------------------------------------------------


# Each effect spells out its __init__: see the docstring of respreg.core.types.
@dataclass(frozen=True, slots=True)
class Send:
    """Deliver ``msg`` to node ``to`` (possibly this node); its reply comes back tagged ``seq``."""

    to: NodeId
    msg: Request
    seq: int

    def __init__(self, to: NodeId, msg: Request, seq: int) -> None:
        object.__setattr__(self, "to", to)
        object.__setattr__(self, "msg", msg)
        object.__setattr__(self, "seq", seq)


@dataclass(frozen=True, slots=True)
class SetTimer:
    """Call ``on_timer(token)`` after ``delay_ms`` milliseconds."""

    delay_ms: float
    token: int

    def __init__(self, delay_ms: float, token: int) -> None:
        object.__setattr__(self, "delay_ms", delay_ms)
        object.__setattr__(self, "token", token)


@dataclass(frozen=True, slots=True)
class Chosen:
    """Outcome: ``proposal`` is the register's value."""

    proposal: Proposal

    def __init__(self, proposal: Proposal) -> None:
        object.__setattr__(self, "proposal", proposal)


@dataclass(frozen=True, slots=True)
class Empty:
    """Outcome of a read: nothing was chosen when the read began."""

    def __init__(self) -> None:
        pass


class Failure(enum.Enum):
    NOQUORUM = "NOQUORUM"
    UNCERTAIN = "UNCERTAIN"


@dataclass(frozen=True, slots=True)
class Failed:
    """Outcome: no answer. NOQUORUM for a write means its proposal was never sent for acceptance."""

    kind: Failure
    reason: str

    def __init__(self, kind: Failure, reason: str) -> None:
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "reason", reason)


Outcome = Chosen | Empty | Failed


@dataclass(frozen=True, slots=True)
class Done:
    outcome: Outcome

    def __init__(self, outcome: Outcome) -> None:
        object.__setattr__(self, "outcome", outcome)


@dataclass(frozen=True, slots=True)
class Declined:
    """A round-0 write started with ``hand_back`` (see :meth:`Proposer.start_fast`) was not
    chosen at round 0: the proposer stops without an outcome, and its driver goes on."""

    def __init__(self) -> None:
        pass


Effect = Send | SetTimer | Done | Declined


@dataclass(frozen=True, slots=True)
class ProposerConfig:
    attempt_timeout_ms: float = 500.0
    backoff_min_ms: float = 2.0
    backoff_max_ms: float = 100.0
    deadline_ms: float = 3000.0
    #: How long a read waits for a missing answer that could still settle it (see
    #: _progress_read) before it completes the key through Paxos instead.
    straggler_ms: float = 20.0

    def __init__(
        self,
        attempt_timeout_ms: float = 500.0,
        backoff_min_ms: float = 2.0,
        backoff_max_ms: float = 100.0,
        deadline_ms: float = 3000.0,
        straggler_ms: float = 20.0,
    ) -> None:
        object.__setattr__(self, "attempt_timeout_ms", attempt_timeout_ms)
        object.__setattr__(self, "backoff_min_ms", backoff_min_ms)
        object.__setattr__(self, "backoff_max_ms", backoff_max_ms)
        object.__setattr__(self, "deadline_ms", deadline_ms)
        object.__setattr__(self, "straggler_ms", straggler_ms)

    def with_deadline(self, deadline_ms: float) -> ProposerConfig:
        """This config with another deadline (what ``dataclasses.replace`` does, without its cost
        on every forwarded write)."""
        return ProposerConfig(
            self.attempt_timeout_ms, self.backoff_min_ms, self.backoff_max_ms, deadline_ms, self.straggler_ms
        )

    def with_attempt_timeout(self, attempt_timeout_ms: float) -> ProposerConfig:
        """This config with another attempt timeout (see NodeCore.set_attempt_timeout)."""
        return ProposerConfig(
            attempt_timeout_ms, self.backoff_min_ms, self.backoff_max_ms, self.deadline_ms, self.straggler_ms
        )


DEADLINE_TOKEN = -1
STRAGGLER_TOKEN = -2
#: A read that asked only some acceptors (see ``read_first``) asks the others as well.
EXTEND_TOKEN = -4


class _Phase(enum.Enum):
    IDLE = 0
    READ = 1
    PREPARE = 2
    ACCEPT = 3
    BACKOFF = 4
    DONE = 5


class Proposer:
    """Drives one operation on one key to an :data:`Outcome`.

    ``proposal`` is the value to write, or None for a read. ``alloc_round(n)`` returns a round
    number at least ``n`` that this node has never handed out before in its current incarnation.
    ``random()`` returns a float in [0, 1).
    """

    def __init__(
        self,
        key: bytes,
        me: NodeId,
        nodes: Sequence[NodeId],
        incarnation: int,
        proposal: Proposal | None,
        alloc_round: Callable[[int], int],
        random: Callable[[], float],
        config: ProposerConfig,
        trust_learned: bool = True,
        read_first: Sequence[NodeId] | None = None,
    ) -> None:
        self.key = key
        self.me = me
        self.nodes = tuple(nodes)
        self.majority = len(self.nodes) // 2 + 1
        self.incarnation = incarnation
        self.own = proposal
        self._alloc_round = alloc_round
        self._random = random
        self.config = config
        #: Finish early when an acceptor's node reports the proposal as learned. A repair (see
        #: NodeCore.begin_repair) must not: it needs the value chosen by a majority it can name.
        self.trust_learned = trust_learned
        self.phase = _Phase.IDLE
        self.seq = 0
        self.attempts = 0
        self.sent_own = False
        self.outcome: Outcome | None = None
        self._ballot = NO_BALLOT
        self._highest_seen = NO_BALLOT
        self._value: Proposal | None = None
        # Per phase: who answered what (sets, so duplicated replies count once).
        self._ok: dict[NodeId, Reply] = {}
        self._nacked: set[NodeId] = set()
        self._down: set[NodeId] = set()
        #: The acceptors a round-0 accept went to, when not all of them (see start_fast).
        self._only: tuple[NodeId, ...] | None = None
        #: A round-0 write that is not chosen at round 0 ends Declined (see start_fast).
        self._hand_back = False
        #: The read phase (its seq) that waits for a missing answer (see _progress_read).
        self._straggler = -1
        #: A majority to ask first in a read phase; the others are asked only when these
        #: answers do not settle the read, or do not all come within ``straggler_ms``.
        self._read_first = tuple(read_first) if read_first is not None else None
        #: The acceptors the current read phase has asked.
        self._asked: tuple[NodeId, ...] = self.nodes

    @property
    def is_write(self) -> bool:
        return self.own is not None

    # ---- events ------------------------------------------------------------------------------

    def start(self) -> list[Effect]:
        assert self.phase is _Phase.IDLE
        effects: list[Effect] = [SetTimer(self.config.deadline_ms, DEADLINE_TOKEN)]
        if self.is_write:
            effects += self._begin_prepare()
        else:
            effects += self._begin_read()
        return effects

    def start_fast(
        self, ballot: Ballot, only: Sequence[NodeId] | None = None, notify: int = 0, hand_back: bool = False
    ) -> list[Effect]:
        """Start a write at a round-0 ``ballot``, skipping prepare.

        Safe only under the conditions docs/design.md gives, which the caller (NodeCore)
        guarantees. With ``only``, the accept goes to those acceptors alone and the proposal is
        chosen when every one of them accepted it; a nack or an unreachable one falls back to
        full Paxos at once. Otherwise it goes to all and a majority chooses it. A timeout falls
        back to full Paxos at round 1 or above. ``notify`` goes in these round-0 accepts only
        (:class:`Accept`: the node that forwarded the write, or 0). With ``hand_back`` (and
        ``only``), instead of falling back, the proposer ends with :class:`Declined`.
        """
        assert self.phase is _Phase.IDLE and self.own is not None and ballot.round == FAST_ROUND
        self.attempts += 1
        self._ballot = ballot
        self._only = tuple(only) if only is not None else None
        self._hand_back = hand_back and only is not None
        effects: list[Effect] = [SetTimer(self.config.deadline_ms, DEADLINE_TOKEN)]
        return effects + self._begin_accept(self.own, notify)

    def on_timer(self, token: int) -> list[Effect]:
        if self.phase is _Phase.DONE:
            return []
        if token == DEADLINE_TOKEN:
            return self._fail(f"no majority answered within {self.config.deadline_ms:.0f} ms")
        if token == STRAGGLER_TOKEN:
            if self.phase is _Phase.READ and self._straggler == self.seq:
                return self._begin_prepare()
            return []
        if token == EXTEND_TOKEN:
            if self.phase is _Phase.READ and len(self._asked) < len(self.nodes):
                return self._extend_read()
            return []
        if token != self.seq:
            return []  # a timer of an earlier phase
        if self.phase is _Phase.BACKOFF:
            return self._begin_prepare()
        if self._hand_back:
            return self._decline()
        # The phase timed out with replies missing: try again with a higher ballot.
        return self._retry()

    def on_reply(self, sender: NodeId, seq: int, reply: Reply) -> list[Effect]:
        if self.phase is _Phase.DONE or seq != self.seq or sender not in self.nodes:
            return []
        if sender in self._ok or sender in self._nacked or sender in self._down:
            return []  # duplicate
        if isinstance(reply, (Unreachable, Refused)):
            self._down.add(sender)
        elif isinstance(reply, Nack):
            self._nacked.add(sender)
            if reply.promised > self._highest_seen:
                self._highest_seen = reply.promised
        else:
            if self.trust_learned and isinstance(reply, (State, Promise)) and reply.chosen and reply.proposal:
                return self._finish(reply.proposal, learned=True)
            if not self._expected(reply):
                return []
            self._ok[sender] = reply
            for b in self._ballots_in(reply):
                if b > self._highest_seen:
                    self._highest_seen = b
        return self._progress()

    # ---- phases ------------------------------------------------------------------------------

    def _new_phase(self, phase: _Phase) -> None:
        self.phase = phase
        self.seq += 1
        self._ok = {}
        self._nacked = set()
        self._down = set()

    def _broadcast(self, msg: Request, to: Sequence[NodeId] | None = None) -> list[Effect]:
        if to is None:
            to = self.nodes if self._only is None else self._only
        effects: list[Effect] = [Send(n, msg, self.seq) for n in to]
        # The phase timeout doubles with every attempt: a timeout usually means the acceptors are
        # slow (a long fsync queue), and retrying fast with new ballots would only add disk work.
        timeout = self.config.attempt_timeout_ms * (2 ** min(max(self.attempts - 1, 0), 8))
        effects.append(SetTimer(timeout, self.seq))
        return effects

    def _begin_read(self) -> list[Effect]:
        self._new_phase(_Phase.READ)
        first = self._read_first
        if first is None or len(first) >= len(self.nodes):
            self._asked = self.nodes
            return self._broadcast(Read(self.key))
        # Any majority's answers settle a read by the same rules, so a majority is asked first
        # and the rest only when needed: the others' file reads and messages are saved.
        self._asked = first
        effects = self._broadcast(Read(self.key), first)
        effects.append(SetTimer(self.config.straggler_ms, EXTEND_TOKEN))
        return effects

    def _extend_read(self) -> list[Effect]:
        """Ask the acceptors this read phase has not asked yet (same phase: every answer counts)."""
        rest = [n for n in self.nodes if n not in self._asked]
        self._asked = self.nodes
        return [Send(n, Read(self.key), self.seq) for n in rest]

    def _begin_prepare(self) -> list[Effect]:
        self._only = None
        self.attempts += 1
        self._new_phase(_Phase.PREPARE)
        rnd = self._alloc_round(max(self._highest_seen.round + 1, FAST_ROUND + 1))
        self._ballot = Ballot(rnd, int(self.me), self.incarnation)
        return self._broadcast(Prepare(self.key, self._ballot))

    def _begin_accept(self, proposal: Proposal, notify: int = 0) -> list[Effect]:
        self._new_phase(_Phase.ACCEPT)
        self._value = proposal
        if self.own is not None and proposal.pid == self.own.pid:
            self.sent_own = True
        return self._broadcast(Accept(self.key, self._ballot, proposal, notify))

    def _retry(self) -> list[Effect]:
        """Back off for a random time that grows with the attempts, then prepare again."""
        self._new_phase(_Phase.BACKOFF)
        ceiling = min(self.config.backoff_max_ms, self.config.backoff_min_ms * (2 ** min(self.attempts, 16)))
        delay = self.config.backoff_min_ms + self._random() * max(ceiling - self.config.backoff_min_ms, 0.0)
        return [SetTimer(delay, self.seq)]

    def _expected(self, reply: Reply) -> bool:
        if self.phase is _Phase.READ:
            return isinstance(reply, State)
        if self.phase is _Phase.PREPARE:
            return isinstance(reply, Promise) and reply.ballot == self._ballot
        if self.phase is _Phase.ACCEPT:
            return isinstance(reply, Accepted) and reply.ballot == self._ballot
        return False

    @staticmethod
    def _ballots_in(reply: Reply) -> tuple[Ballot, ...]:
        if isinstance(reply, (Promise, State)):
            return (reply.accepted,)
        return ()

    def _progress(self) -> list[Effect]:
        """Decide what the answers gathered so far in this phase allow."""
        n = len(self.nodes)
        if self.phase is _Phase.READ:
            return self._progress_read()
        if self._only is not None:
            if len(self._ok) == len(self._only):
                assert self._value is not None
                return self._finish(self._value, learned=False)
            if self._nacked or self._down:
                return self._decline() if self._hand_back else self._begin_prepare()
            return []
        if len(self._ok) >= self.majority:
            if self.phase is _Phase.PREPARE:
                promises = [r for r in self._ok.values() if isinstance(r, Promise)]
                best = max(promises, key=lambda p: p.accepted)
                if best.proposal is not None:
                    return self._begin_accept(best.proposal)
                if self.own is None:
                    return self._finish_empty()
                return self._begin_accept(self.own)
            assert self._value is not None
            return self._finish(self._value, learned=False)
        if len(self._down) > n - self.majority:
            return self._fail(f"{len(self._down)} of {n} nodes unreachable")
        if len(self._ok) + len(self._nacked) + len(self._down) == n or (len(self._nacked) > n - self.majority):
            # A majority is out of reach in this round because of competing ballots.
            return self._retry()
        return []

    def _progress_read(self) -> list[Effect]:
        n = len(self.nodes)
        states = [r for r in self._ok.values() if isinstance(r, State)]
        empty = sum(1 for s in states if s.proposal is None)
        if empty >= self.majority:
            return self._finish_empty()
        # Counted by ballot *and* proposal: two acceptors may hold different proposals at one
        # round-0 ballot (an owner that retried round 0 for a key after a failed attempt), and
        # then neither is chosen.
        held: dict[tuple[Ballot, bytes], int] = {}
        for s in states:
            if s.proposal is not None:
                at = (s.accepted, s.proposal.pid)
                held[at] = held.get(at, 0) + 1
                if held[at] >= self.majority:
                    return self._finish(s.proposal, learned=False)
        if len(self._down) > n - self.majority:
            return self._fail(f"{len(self._down)} of {n} nodes unreachable")
        if len(self._asked) < n:
            # Only some acceptors were asked: once all of them answered (or failed) without
            # settling the read, ask the others too.
            if all(a in self._ok or a in self._down for a in self._asked):
                return self._extend_read()
            return []
        if len(states) >= self.majority:
            # Wait while the answers still missing could make a majority for one proposal, or
            # for nothing: in a cluster of three the owner of a key holds no round-0 proposal,
            # so its answer and one other can disagree while the third agrees with the other.
            missing = n - len(states) - len(self._down)
            if missing and max(max(held.values(), default=0), empty) + missing >= self.majority:
                if self._straggler == self.seq:
                    return []
                self._straggler = self.seq
                return [SetTimer(self.config.straggler_ms, STRAGGLER_TOKEN)]
            # Something was accepted but is not known to be chosen: complete it through Paxos.
            return self._begin_prepare()
        return []

    # ---- endings -----------------------------------------------------------------------------

    def _finish(self, proposal: Proposal, learned: bool) -> list[Effect]:
        self.phase = _Phase.DONE
        self.outcome = Chosen(proposal)
        effects: list[Effect] = []
        if not learned:
            self.seq += 1
            effects += [Send(n, Learn(self.key, proposal), self.seq) for n in self.nodes]
        effects.append(Done(self.outcome))
        return effects

    def _decline(self) -> list[Effect]:
        self.phase = _Phase.DONE
        self.seq += 1  # answers still on their way belong to no phase
        return [Declined()]

    def _finish_empty(self) -> list[Effect]:
        self.phase = _Phase.DONE
        self.outcome = Empty()
        return [Done(self.outcome)]

    def _fail(self, reason: str) -> list[Effect]:
        self.phase = _Phase.DONE
        if self.is_write and self.sent_own:
            self.outcome = Failed(Failure.UNCERTAIN, f"value may or may not be written: {reason}")
        else:
            self.outcome = Failed(Failure.NOQUORUM, reason)
        return [Done(self.outcome)]

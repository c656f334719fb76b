"""Values shared by the Paxos core: ballots, proposals, acceptor state and peer messages.

Pure data only. This module imports nothing from the runtime (no asyncio, sockets, files,
clocks or randomness); everything under ``respreg.core`` follows the same rule.

Words follow Lamport's *Paxos Made Simple*: a proposer sends *prepare* for a ballot, acceptors
*promise*; the proposer sends *accept*, acceptors answer *accepted*; a proposal accepted by a
majority at one ballot is *chosen*, and nodes *learn* it.

The frozen dataclasses here (and the core's effects in node.py and proposer.py) spell out their
``__init__``, which sets each field with ``object.__setattr__`` as the one ``dataclasses``
generates does: compiled by mypyc it runs as C, about 50 ns per object against 650 ns for the
generated one, which the interpreter runs, and a write builds a dozen or more such objects on
every node (benchmarks/PROFILE.md). tests/test_core_types.py checks that each matches its fields.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, NewType

NodeId = NewType("NodeId", int)


class Ballot(NamedTuple):
    """A totally ordered, cluster-wide unique proposal number.

    ``incarnation`` counts the starts of node ``node``: a restarted node has forgotten which rounds
    it used, so its new ballots differ from every ballot of its earlier lives even when ``round``
    repeats. Compared as a tuple: round first, then node, then incarnation.
    """

    round: int
    node: int
    incarnation: int


#: Lower than every real ballot: "never promised" / "never accepted".
NO_BALLOT = Ballot(-1, -1, -1)

#: Round 0 is reserved: only a key's owner uses it, once per key, for the one-round-trip write
#: (see :func:`owner_of` and docs/design.md). Every other ballot has a round of 1 or more.
FAST_ROUND = 0


def owner_of(key: bytes, nodes: Sequence[NodeId]) -> NodeId:
    """The node that may write ``key`` at the reserved round 0: the same answer on every node
    (a checksum of the key picks one of the sorted members)."""
    return owner_in(key, sorted(nodes))


def owner_in(key: bytes, ordered: Sequence[NodeId]) -> NodeId:
    """:func:`owner_of` for members already sorted (no list sorted per call)."""
    return ordered[zlib.crc32(key) % len(ordered)]


@dataclass(frozen=True, slots=True)
class Proposal:
    """A value as a proposer proposes it: the bytes plus an id unique to one client call.

    The id lets a proposer recognise *its own* proposal when another proposer completed it, so that
    call answers +OK while a different call that wrote equal bytes still gets nil.
    """

    pid: bytes
    value: bytes

    def __init__(self, pid: bytes, value: bytes) -> None:
        object.__setattr__(self, "pid", pid)
        object.__setattr__(self, "value", value)


@dataclass(frozen=True, slots=True)
class AcceptorState:
    """The durable state of one key's acceptor (what the per-key file holds)."""

    promised: Ballot = NO_BALLOT
    accepted: Ballot = NO_BALLOT
    proposal: Proposal | None = None

    def __init__(
        self, promised: Ballot = NO_BALLOT, accepted: Ballot = NO_BALLOT, proposal: Proposal | None = None
    ) -> None:
        object.__setattr__(self, "promised", promised)
        object.__setattr__(self, "accepted", accepted)
        object.__setattr__(self, "proposal", proposal)


EMPTY_STATE = AcceptorState()


# ---- messages a proposer sends to acceptors -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prepare:
    key: bytes
    ballot: Ballot

    def __init__(self, key: bytes, ballot: Ballot) -> None:
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "ballot", ballot)


@dataclass(frozen=True, slots=True)
class Accept:
    key: bytes
    ballot: Ballot
    proposal: Proposal
    #: The node to send a :class:`Voted` once this acceptance is durable, or 0 for none: the
    #: node that forwarded a round-0 write to the key's owner.
    notify: int = 0

    def __init__(self, key: bytes, ballot: Ballot, proposal: Proposal, notify: int = 0) -> None:
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "ballot", ballot)
        object.__setattr__(self, "proposal", proposal)
        object.__setattr__(self, "notify", notify)


@dataclass(frozen=True, slots=True)
class Read:
    """Ask an acceptor what it has accepted, without changing its state."""

    key: bytes

    def __init__(self, key: bytes) -> None:
        object.__setattr__(self, "key", key)


@dataclass(frozen=True, slots=True)
class Learn:
    """Tell a node that ``proposal`` is chosen for ``key`` (no reply)."""

    key: bytes
    proposal: Proposal

    def __init__(self, key: bytes, proposal: Proposal) -> None:
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "proposal", proposal)


@dataclass(frozen=True, slots=True)
class Propose:
    """A SETONCE forwarded to the key's owner, which writes it (in one round trip when it can)
    and answers with :class:`Written` within ``deadline_ms``."""

    key: bytes
    proposal: Proposal
    deadline_ms: int

    def __init__(self, key: bytes, proposal: Proposal, deadline_ms: int) -> None:
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "proposal", proposal)
        object.__setattr__(self, "deadline_ms", deadline_ms)


@dataclass(frozen=True, slots=True)
class Voted:
    """Tell the node that forwarded a round-0 write that this acceptor holds proposal ``pid``
    at ``ballot``, durably (no reply). A forwarding node that both other nodes of a cluster of
    three vouch for (itself included) knows the write is chosen before the owner answers."""

    key: bytes
    ballot: Ballot
    pid: bytes

    def __init__(self, key: bytes, ballot: Ballot, pid: bytes) -> None:
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "ballot", ballot)
        object.__setattr__(self, "pid", pid)


Request = Prepare | Accept | Read | Learn | Propose | Voted


# ---- replies from acceptors -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Promise:
    """Answer to Prepare(ballot): promised; here is what I accepted before (if anything)."""

    ballot: Ballot
    accepted: Ballot
    proposal: Proposal | None
    chosen: bool

    def __init__(self, ballot: Ballot, accepted: Ballot, proposal: Proposal | None, chosen: bool) -> None:
        object.__setattr__(self, "ballot", ballot)
        object.__setattr__(self, "accepted", accepted)
        object.__setattr__(self, "proposal", proposal)
        object.__setattr__(self, "chosen", chosen)


@dataclass(frozen=True, slots=True)
class Accepted:
    ballot: Ballot

    def __init__(self, ballot: Ballot) -> None:
        object.__setattr__(self, "ballot", ballot)


@dataclass(frozen=True, slots=True)
class Nack:
    """Refused: the acceptor promised ``promised``, which is higher than the ballot asked for."""

    ballot: Ballot
    promised: Ballot

    def __init__(self, ballot: Ballot, promised: Ballot) -> None:
        object.__setattr__(self, "ballot", ballot)
        object.__setattr__(self, "promised", promised)


@dataclass(frozen=True, slots=True)
class State:
    """Answer to Read: what the acceptor accepted, and whether its node knows it is chosen."""

    accepted: Ballot
    proposal: Proposal | None
    chosen: bool

    def __init__(self, accepted: Ballot, proposal: Proposal | None, chosen: bool) -> None:
        object.__setattr__(self, "accepted", accepted)
        object.__setattr__(self, "proposal", proposal)
        object.__setattr__(self, "chosen", chosen)


@dataclass(frozen=True, slots=True)
class Refused:
    """The acceptor cannot answer for this key (corrupt state file, storage error, ...)."""

    reason: str

    def __init__(self, reason: str) -> None:
        object.__setattr__(self, "reason", reason)


@dataclass(frozen=True, slots=True)
class Unreachable:
    """Synthesised by the driver: the message could not be delivered (peer down or timed out)."""

    def __init__(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class Written:
    """Answer to Propose: ``proposal`` is chosen (kind "CHOSEN"), or the owner's write failed
    with kind "NOQUORUM" (its proposal was never sent for acceptance) or "UNCERTAIN"."""

    kind: str
    proposal: Proposal | None
    reason: str

    def __init__(self, kind: str, proposal: Proposal | None, reason: str) -> None:
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "proposal", proposal)
        object.__setattr__(self, "reason", reason)


Reply = Promise | Accepted | Nack | State | Refused | Unreachable | Written

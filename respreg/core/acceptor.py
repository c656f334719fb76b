"""The Paxos acceptor of one key, as pure functions of (state, message).

Each function returns the new state and the reply. The caller must make the new state durable
(fsync) *before* the reply leaves the node whenever the state changed; ``respreg.core.node`` does
that ordering for every driver. No I/O, clocks or randomness here.
"""

from __future__ import annotations

from .types import (
    FAST_ROUND,
    NO_BALLOT,
    Accept,
    Accepted,
    AcceptorState,
    Nack,
    Prepare,
    Promise,
    Read,
    State,
)


def on_prepare(state: AcceptorState, msg: Prepare, chosen: bool) -> tuple[AcceptorState, Promise | Nack]:
    """Promise never to accept a ballot lower than ``msg.ballot``, if no higher one was promised.

    Promising the very ballot already promised again is allowed (a retransmitted prepare).
    """
    if msg.ballot < state.promised:
        return state, Nack(msg.ballot, state.promised)
    new = state if msg.ballot == state.promised else AcceptorState(msg.ballot, state.accepted, state.proposal)
    return new, Promise(msg.ballot, state.accepted, state.proposal, chosen)


def on_accept(state: AcceptorState, msg: Accept) -> tuple[AcceptorState, Accepted | Nack]:
    """Accept ``msg.proposal`` at ``msg.ballot`` unless a higher ballot was promised.

    A round-0 ballot (the owner's unprepared write, see docs/design.md) is accepted only by an
    acceptor that has accepted nothing yet, or that holds exactly this proposal at exactly this
    ballot (a retransmission): an acceptor's round-0 acceptance, once made, never changes to
    another proposal, whichever incarnation of the owner sends it.
    """
    if msg.ballot < state.promised:
        return state, Nack(msg.ballot, state.promised)
    if msg.ballot.round == FAST_ROUND and state.accepted != NO_BALLOT:
        if state.accepted == msg.ballot and state.proposal == msg.proposal:
            return state, Accepted(msg.ballot)
        return state, Nack(msg.ballot, max(state.promised, state.accepted))
    if state.accepted == msg.ballot and state.promised == msg.ballot:
        # Retransmission: a ballot carries one proposal only, so nothing changes.
        return state, Accepted(msg.ballot)
    return AcceptorState(msg.ballot, msg.ballot, msg.proposal), Accepted(msg.ballot)


def on_read(state: AcceptorState, msg: Read, chosen: bool) -> State:
    """Report what was accepted; reading never changes the state."""
    del msg
    return State(state.accepted, state.proposal, chosen)

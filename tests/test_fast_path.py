"""The one-round-trip write of an owned key, and the forwarding of writes to the owner.

Exact interleavings on real NodeCore objects (tests/sim/script.py); the randomized simulator
runs the same paths under loss, duplication, crashes and amnesia (tests/test_simulation.py).
"""

from __future__ import annotations

import pytest

from respreg.core import acceptor
from respreg.core.node import NodeConfig, NodeCore
from respreg.core.proposer import DEADLINE_TOKEN, EXTEND_TOKEN, Chosen, Empty, Failed, Failure
from respreg.core.types import (
    EMPTY_STATE,
    FAST_ROUND,
    Accept,
    Accepted,
    AcceptorState,
    Ballot,
    Nack,
    NodeId,
    Prepare,
    Proposal,
    Propose,
    Unreachable,
    Voted,
    Written,
    owner_of,
)

from .sim.script import Scripted

FAST = NodeConfig(fast_writes=True)
#: Every write of a key another node owns is forwarded to the owner at once (no round-0 attempt
#: from the node that received it): what a declined attempt leads to, tested on its own.
FORWARD = NodeConfig(fast_writes=True, fast_writes_here=False)
IDS = [NodeId(1), NodeId(2), NodeId(3)]
IDS5 = [NodeId(i) for i in range(1, 6)]


def key_owned_by(node: int, prefix: bytes = b"k", ids: list[NodeId] = IDS) -> bytes:
    for i in range(10_000):
        key = prefix + b"%d" % i
        if owner_of(key, ids) == node:
            return key
    raise AssertionError("no key found")


def test_owner_of_spreads_keys_and_agrees_everywhere() -> None:
    owners = [owner_of(b"key:%d" % i, IDS) for i in range(3000)]
    assert {owners.count(NodeId(n)) for n in (1, 2, 3)} <= set(range(850, 1150))
    # Member order does not matter: every node computes the same owner.
    assert all(owner_of(b"key:%d" % i, list(reversed(IDS))) == o for i, o in enumerate(owners))


def test_owner_of_three_sends_round_zero_to_both_others_and_stores_nothing_itself() -> None:
    s = Scripted(config=FAST)
    key = key_owned_by(1)
    s.write(1, 1, key, b"p1", b"v")
    # No fsync on the owner first: the accepts leave at once, to the two other nodes only.
    assert s.persists == []
    sent = [(r.dst, r.msg) for r in s.requests]
    assert sorted(dst for dst, _ in sent) == [2, 3]
    assert all(isinstance(m, Accept) and m.ballot == Ballot(FAST_ROUND, 1, 0) for _, m in sent)
    s.deliver(src=1, dst=2)
    s.flush(2)
    s.deliver(src=2, dst=1)
    assert 1 not in s.outcomes, "one acceptance of round 0 is not enough: both others must hold it"
    s.settle([1, 2, 3])
    outcome = s.outcomes[1]
    assert isinstance(outcome, Chosen) and outcome.proposal.pid == b"p1"
    assert key not in s.disk[NodeId(1)]
    assert all(s.disk[n][key].accepted == Ballot(FAST_ROUND, 1, 0) for n in (NodeId(2), NodeId(3)))
    assert s.cores[NodeId(1)].stats["fast_writes"] == 1
    assert all(s.cores[n].stats["prepare_received"] == 0 for n in IDS)
    assert all(s.cores[n].chosen(key) == outcome.proposal for n in IDS)


def test_round_zero_nacked_by_one_other_node_falls_back_to_paxos_at_once() -> None:
    """Node 3 already holds another round-0 proposal (an earlier life of the owner sent it):
    it refuses, and the owner prepares at once. Neither proposal was chosen, so Paxos may
    complete either; whichever it is, a majority holds it and every node agrees."""
    s = Scripted(config=FAST)
    key = key_owned_by(1)
    earlier = Proposal(b"old", b"earlier")
    s.disk[NodeId(3)][key] = AcceptorState(Ballot(FAST_ROUND, 1, 7), Ballot(FAST_ROUND, 1, 7), earlier)
    s.write(1, 1, key, b"p1", b"v")
    s.deliver(src=1, dst=3)
    assert s.cores[NodeId(3)].stats["nack_sent"] == 1
    s.deliver(src=3, dst=1)
    prepares = [r.msg for r in s.requests if isinstance(r.msg, Prepare)]
    assert len(prepares) == 2 and all(m.ballot.round >= 1 for m in prepares)  # its own is local
    s.settle([1, 2, 3])
    outcome = s.outcomes[1]
    assert isinstance(outcome, Chosen) and outcome.proposal.pid in (b"p1", b"old")
    holders = [n for n in IDS if (st := s.disk[n].get(key)) is not None and st.proposal == outcome.proposal]
    assert len(holders) >= 2
    assert all(s.cores[n].chosen(key) == outcome.proposal for n in IDS)


def test_round_zero_with_one_other_node_unreachable_falls_back_at_once() -> None:
    s = Scripted(config=FAST)
    key = key_owned_by(1)
    s.write(1, 1, key, b"p1", b"v")
    (to3,) = [r for r in s.requests if r.dst == 3]
    s.requests.remove(to3)
    s.apply(NodeId(1), s.cores[NodeId(1)].on_peer_reply(to3.req_id, Unreachable()))
    assert any(isinstance(r.msg, Prepare) for r in s.requests)
    s.settle([1, 2])
    outcome = s.outcomes[1]
    assert isinstance(outcome, Chosen) and outcome.proposal.pid == b"p1"


def test_owner_with_another_node_known_down_runs_full_paxos() -> None:
    s = Scripted(config=FAST)
    key = key_owned_by(1)
    s.cores[NodeId(1)].set_peer_up(NodeId(3), False)
    s.write(1, 1, key, b"p1", b"v")
    assert s.requests and all(isinstance(r.msg, Prepare) for r in s.requests)
    s.settle([1, 2])
    assert isinstance(s.outcomes[1], Chosen)


def test_restarted_owner_cannot_choose_a_second_value_at_round_zero() -> None:
    """The owner's first life got its round-0 proposal chosen by nodes 2 and 3 and died before
    anyone learned it. Its next life (a new incarnation, nothing on its own disk) tries round 0
    with another value: both others refuse, and Paxos returns the first value."""
    s = Scripted(config=FAST)
    key = key_owned_by(1)
    s.write(1, 1, key, b"p1", b"first")
    s.settle([2, 3], learn=False)
    s.deliver(src=1)  # the accepts reach nodes 2 and 3 ...
    s.flush(2)
    s.flush(3)
    s.drop()  # ... and the owner dies before their answers arrive
    assert 1 not in s.outcomes
    disk1 = s.disk[NodeId(1)]
    s.cores[NodeId(1)] = NodeCore(NodeId(1), IDS, 1, lambda k: disk1.get(k, EMPTY_STATE), s.rng.random, FAST)
    s.write(1, 2, key, b"p2", b"second")
    s.settle([1, 2, 3])
    outcome = s.outcomes[2]
    assert isinstance(outcome, Chosen) and outcome.proposal.pid == b"p1"


def test_non_owner_of_three_forwards_and_the_owner_writes_at_round_zero_through_the_others() -> None:
    s = Scripted(config=FORWARD)
    key = key_owned_by(2)
    s.write(1, 7, key, b"p7", b"v")
    assert [(r.dst, type(r.msg)) for r in s.requests] == [(2, Propose)]
    s.deliver(src=1, dst=2)
    # The owner asks nodes 1 and 3 to accept at round 0; it stores nothing itself.
    assert sorted((r.dst, type(r.msg)) for r in s.requests) == [(1, Accept), (3, Accept)]
    assert s.persists == []
    s.settle([1, 2, 3])
    outcome = s.outcomes[7]
    assert isinstance(outcome, Chosen) and outcome.proposal.pid == b"p7"
    assert key not in s.disk[NodeId(2)]
    assert all(s.disk[n][key].accepted == Ballot(FAST_ROUND, 2, 0) for n in (NodeId(1), NodeId(3)))
    assert all(s.cores[n].chosen(key) == outcome.proposal for n in IDS)
    # The forwarding node learned the outcome from the owner's reply, not from a learn message.
    assert [s.cores[n].stats["learn_received"] for n in IDS] == [0, 0, 1]


def test_contended_key_of_three_funnels_into_its_owner_and_settles_in_one_round() -> None:
    """Forwarding at once: nodes 1 and 3 both write a key node 2 owns, both forward, the owner
    runs the first write at round 0 and the second fails from memory once the first is chosen."""
    s = Scripted(config=FORWARD)
    key = key_owned_by(2)
    s.write(1, 1, key, b"p1", b"one")
    s.write(3, 3, key, b"p3", b"three")
    s.settle([1, 2, 3])
    o1, o3 = s.outcomes[1], s.outcomes[3]
    assert isinstance(o1, Chosen) and isinstance(o3, Chosen) and o1.proposal == o3.proposal
    owner = s.cores[NodeId(2)]
    assert owner.stats["forwards_received"] == 2 and owner.stats["writes_queued"] == 1
    assert owner.stats["fast_writes"] == 1 and owner.stats["ballots_started"] == 0
    assert all(s.cores[n].chosen(key) == o1.proposal for n in IDS)


def test_non_owner_of_three_writes_at_round_zero_with_the_other_non_owner() -> None:
    """Node 1 writes a key node 2 owns: the round-0 accept goes to its own acceptor and node 3's,
    no prepare, no forward; the owner hears of the write only when it learns the outcome."""
    s = Scripted(config=FAST)
    key = key_owned_by(2)
    s.write(1, 7, key, b"p7", b"v")
    assert [(r.dst, type(r.msg)) for r in s.requests] == [(3, Accept)]
    accept = s.requests[0].msg
    assert isinstance(accept, Accept) and accept.ballot == Ballot(FAST_ROUND, 1, 0)
    s.deliver(src=1, dst=3)
    s.flush(3)
    s.deliver(src=3, dst=1)
    assert 7 not in s.outcomes, "node 1's own acceptance is not durable yet"
    s.flush(1)
    outcome = s.outcomes[7]
    assert isinstance(outcome, Chosen) and outcome.proposal.pid == b"p7"
    s.settle([1, 2, 3])
    assert key not in s.disk[NodeId(2)]
    assert all(s.disk[n][key].accepted == Ballot(FAST_ROUND, 1, 0) for n in (NodeId(1), NodeId(3)))
    assert all(s.cores[n].chosen(key) == outcome.proposal for n in IDS)
    assert all(s.cores[n].stats["prepare_received"] == 0 for n in IDS)
    assert s.cores[NodeId(1)].stats["writes_forwarded"] == 0
    assert s.cores[NodeId(2)].stats["accept_received"] == 0
    assert [s.cores[n].stats["learn_received"] for n in IDS] == [0, 1, 1]


def test_two_non_owners_racing_at_round_zero_are_declined_and_funnelled_into_the_owner() -> None:
    """Nodes 1 and 3 both write a key node 2 owns, at once: each non-owner takes its own round-0
    proposal, so each refuses the other's and neither is chosen at round 0. Both writes then go
    to the owner (the same proposals), which settles the key; exactly one of them wins."""
    s = Scripted(config=FAST)
    key = key_owned_by(2)
    s.write(1, 1, key, b"p1", b"one")
    s.write(3, 3, key, b"p3", b"three")
    s.settle([1, 2, 3])
    o1, o3 = s.outcomes[1], s.outcomes[3]
    assert isinstance(o1, Chosen) and isinstance(o3, Chosen) and o1.proposal == o3.proposal
    assert o1.proposal.pid in (b"p1", b"p3")
    assert [s.cores[NodeId(n)].stats["fast_writes_declined"] for n in (1, 3)] == [1, 1]
    assert s.cores[NodeId(2)].stats["forwards_received"] == 2
    assert all(s.cores[n].chosen(key) == o1.proposal for n in IDS)
    holders = [n for n in IDS if (st := s.disk[n].get(key)) is not None and st.proposal == o1.proposal]
    assert len(holders) >= 2


def test_a_node_whose_round_zero_writes_are_often_declined_forwards_at_once_and_probes() -> None:
    """Keys raced from several nodes: trying round 0 first only adds an attempt before the
    forward. Once many of a node's attempts were declined it forwards at once, but one write in
    32 still tries round 0, and successes there lower the share of declines again."""
    s = Scripted(config=FAST)
    for i in range(5):
        key = key_owned_by(2, b"race%d-" % i)
        s.write(1, 10 + i, key, b"a%d" % i, b"one")
        s.write(3, 20 + i, key, b"b%d" % i, b"three")
        s.settle([1, 2, 3])
    core = s.cores[NodeId(1)]
    # Three declines in a row pass the mark (1 - 0.9 ** 3 > 0.25): the last races went on at once.
    assert core.stats["fast_writes_declined"] == 3 and core.contention > 0.25
    tried, share = core.stats["fast_writes"], core.contention
    s.write(1, 99, key_owned_by(2, b"calm-first-"), b"c", b"v")
    assert [(r.dst, type(r.msg)) for r in s.requests] == [(2, Propose)], "forwarded at once"
    s.settle([1, 2, 3])
    for i in range(32):
        s.write(1, 100 + i, key_owned_by(2, b"calm%d-" % i), b"c%d" % i, b"v")
        s.settle([1, 2, 3])
        outcome = s.outcomes[100 + i]
        assert isinstance(outcome, Chosen) and outcome.proposal.pid == b"c%d" % i
    assert core.stats["fast_writes"] > tried, "a probe tried round 0 here again"
    assert core.stats["fast_writes_declined"] == 3
    assert core.contention < share


def test_round_zero_here_is_declined_when_its_phase_times_out() -> None:
    s = Scripted(config=FAST)
    key = key_owned_by(2)
    s.write(1, 7, key, b"p7", b"v")
    s.drop(src=1, dst=3)
    s.flush(1)
    (seq_timer,) = [t for n, t in s.timers if n == 1 and t.op_id == 7 and t.token >= 0]
    s.fire(1, 7, seq_timer.token)
    assert [(r.dst, type(r.msg)) for r in s.requests] == [(2, Propose)]
    s.settle([1, 2, 3])
    outcome = s.outcomes[7]
    assert isinstance(outcome, Chosen) and outcome.proposal.pid == b"p7"


def test_the_attempt_timeout_set_by_the_driver_is_what_new_phases_wait() -> None:
    """NodeCore.set_attempt_timeout (the driver follows how long its peers take to answer):
    phases of writes started after it wait the new time, those started before keep theirs."""
    s = Scripted(config=FAST)
    default = FAST.proposer.attempt_timeout_ms
    s.write(1, 7, key_owned_by(2), b"p7", b"v")
    s.cores[NodeId(1)].set_attempt_timeout(4 * default)
    assert s.cores[NodeId(1)].attempt_timeout_ms == 4 * default
    s.write(1, 8, key_owned_by(3), b"p8", b"v")
    s.write(1, 9, key_owned_by(1), b"p9", b"v")  # the owner's own round 0, with nodes 2 and 3
    phases = {t.op_id: t.delay_ms for n, t in s.timers if n == 1 and t.token >= 0}
    assert phases == {7: default, 8: 4 * default, 9: 4 * default}
    with pytest.raises(ValueError):
        s.cores[NodeId(1)].set_attempt_timeout(0)
    s.settle([1, 2, 3])
    assert all(isinstance(s.outcomes[op], Chosen) for op in (7, 8, 9))


def test_round_zero_here_with_the_other_non_owner_known_down_forwards_at_once() -> None:
    s = Scripted(config=FAST)
    key = key_owned_by(2)
    s.cores[NodeId(1)].set_peer_up(NodeId(3), False)
    s.write(1, 7, key, b"p7", b"v")
    assert [(r.dst, type(r.msg)) for r in s.requests] == [(2, Propose)]
    assert s.cores[NodeId(1)].stats["fast_writes"] == 0


def test_declined_round_zero_with_the_owner_down_is_completed_here_and_never_noquorum() -> None:
    """Node 3 refuses (it holds another round-0 proposal) and the owner is known down: node 1
    runs full Paxos itself. Its proposal went out in an accept, so failing is UNCERTAIN."""
    key = key_owned_by(2)
    earlier = Proposal(b"old", b"earlier")

    def written_with_the_owner_down() -> Scripted:
        s = Scripted(config=FAST)
        s.disk[NodeId(3)][key] = AcceptorState(Ballot(FAST_ROUND, 3, 7), Ballot(FAST_ROUND, 3, 7), earlier)
        s.cores[NodeId(1)].set_peer_up(NodeId(2), False)
        s.write(1, 7, key, b"p7", b"v")
        return s

    s = written_with_the_owner_down()
    s.deliver(src=1, dst=3)
    s.deliver(src=3, dst=1)
    assert s.cores[NodeId(1)].stats["fast_writes_declined"] == 1
    assert any(isinstance(r.msg, Prepare) for r in s.requests)
    for r in list(s.requests):
        s.requests.remove(r)
        s.apply(NodeId(1), s.cores[NodeId(1)].on_peer_reply(r.req_id, Unreachable()))
    s.flush(1)
    outcome = s.outcomes[7]
    assert isinstance(outcome, Failed) and outcome.kind is Failure.UNCERTAIN
    # And with node 3 reachable the same situation settles: node 3's proposal is the higher
    # round-0 ballot, so Paxos completes it; the write answers nil, exactly.
    s2 = written_with_the_owner_down()
    s2.settle([1, 3])
    outcome = s2.outcomes[7]
    assert isinstance(outcome, Chosen) and outcome.proposal == earlier


def _written_at_round_zero(owner: int) -> tuple[Scripted, bytes, Proposal]:
    """A key owned by ``owner`` written at round 0, and a fresh cluster on the same disks (new
    processes: nothing learned in memory)."""
    s = Scripted(config=FAST)
    key = key_owned_by(owner)
    s.write(owner, 1, key, b"p1", b"v")
    s.settle([1, 2, 3], learn=False)
    written = s.outcomes[1]
    assert isinstance(written, Chosen)
    fresh = Scripted(config=FAST)
    fresh.disk = s.disk
    return fresh, key, written.proposal


def test_owner_reading_its_key_asks_the_two_holders_instead_of_running_paxos() -> None:
    """The owner holds nothing for a key written at round 0, so its read asks the two other
    nodes, which hold the write: both answers settle it. Neither answer alone does, and
    starting Paxos there would cost a durable promise on every node for a plain read."""
    fresh, key, proposal = _written_at_round_zero(1)
    fresh.read(1, 2, key)
    assert sorted(r.dst for r in fresh.requests) == [2, 3]  # not its own acceptor
    fresh.deliver(src=1, dst=2)
    fresh.deliver(src=2, dst=1)
    assert 2 not in fresh.outcomes
    assert not any(isinstance(r.msg, Prepare) for r in fresh.requests)
    fresh.deliver(src=1, dst=3)
    fresh.deliver(src=3, dst=1)
    outcome = fresh.outcomes[2]
    assert isinstance(outcome, Chosen) and outcome.proposal == proposal
    assert all(fresh.cores[n].stats["prepare_received"] == 0 for n in IDS)
    assert fresh.cores[NodeId(1)].stats["read_received"] == 0
    assert fresh.persists == []


def test_a_read_in_a_cluster_of_three_asks_the_two_nodes_other_than_the_owner() -> None:
    """A non-owner's read asks its own acceptor and the other non-owner, the two nodes that hold
    a round-0 write: their answers settle it, and the owner is not asked at all."""
    fresh, key, proposal = _written_at_round_zero(2)
    fresh.read(1, 2, key)
    assert [r.dst for r in fresh.requests] == [3]  # its own acceptor answered at once
    fresh.settle([1, 2, 3], learn=False)
    outcome = fresh.outcomes[2]
    assert isinstance(outcome, Chosen) and outcome.proposal == proposal
    assert [fresh.cores[n].stats["read_received"] for n in IDS] == [1, 0, 1]
    # A missing key: both answers say nothing, which settles it as nil the same way.
    fresh.read(1, 3, key_owned_by(2, prefix=b"missing"))
    fresh.settle([1, 2, 3])
    assert isinstance(fresh.outcomes[3], Empty)
    assert fresh.cores[NodeId(2)].stats["read_received"] == 0


def test_a_read_asks_the_owner_when_the_other_non_owner_is_unreachable() -> None:
    fresh, key, proposal = _written_at_round_zero(2)
    fresh.read(1, 2, key)
    (to3,) = fresh.requests
    fresh.requests.remove(to3)
    fresh.apply(NodeId(1), fresh.cores[NodeId(1)].on_peer_reply(to3.req_id, Unreachable()))
    assert [r.dst for r in fresh.requests] == [2]
    fresh.settle([1, 2])  # node 1 holds the write, the owner nothing: Paxos completes it
    outcome = fresh.outcomes[2]
    assert isinstance(outcome, Chosen) and outcome.proposal == proposal


def test_a_read_asks_the_owner_when_the_other_answer_is_late() -> None:
    fresh, key, proposal = _written_at_round_zero(2)
    fresh.read(1, 2, key)
    fresh.fire(1, 2, EXTEND_TOKEN)  # node 3 has not answered within straggler_ms
    assert sorted(r.dst for r in fresh.requests) == [2, 3]
    fresh.deliver(src=1, dst=3)
    fresh.deliver(src=3, dst=1)
    outcome = fresh.outcomes[2]
    assert isinstance(outcome, Chosen) and outcome.proposal == proposal


def test_a_read_asks_the_owner_when_the_two_non_owners_disagree() -> None:
    """A key written through full Paxos by nodes 1 and 2 (its owner) while node 3 missed it: the
    non-owners' answers disagree, and the owner's answer makes the majority."""
    s = Scripted(config=FAST)
    key = key_owned_by(2)
    proposal = Proposal(b"p9", b"v")
    ballot = Ballot(1, 2, 0)
    for n in (NodeId(1), NodeId(2)):
        s.disk[n][key] = AcceptorState(ballot, ballot, proposal)
    s.read(3, 1, key)
    assert [r.dst for r in s.requests] == [1]
    s.deliver(src=3, dst=1)
    s.deliver(src=1, dst=3)
    assert [r.dst for r in s.requests] == [2]
    s.settle([1, 2, 3])
    outcome = s.outcomes[1]
    assert isinstance(outcome, Chosen) and outcome.proposal == proposal
    assert all(s.cores[n].stats["prepare_received"] == 0 for n in IDS)


def test_owner_of_five_accepts_locally_first_then_sends_accept_at_round_zero_without_prepare() -> None:
    s = Scripted(n=5, config=FAST)
    ids5 = IDS5
    key = key_owned_by(1, ids=IDS5)
    s.write(1, 1, key, b"p1", b"v")
    # Nothing leaves node 1 before its own acceptance of round 0 is on disk.
    assert s.requests == []
    assert [(n, p.state.accepted) for n, p in s.persists] == [(1, Ballot(FAST_ROUND, 1, 0))]
    s.flush(1)
    sent = [(r.dst, r.msg) for r in s.requests]
    assert sorted(dst for dst, _ in sent) == [2, 3, 4, 5]
    assert all(isinstance(m, Accept) and m.ballot == Ballot(FAST_ROUND, 1, 0) for _, m in sent)
    s.settle(range(1, 6))
    outcome = s.outcomes[1]
    assert isinstance(outcome, Chosen) and outcome.proposal.pid == b"p1"
    assert all(s.disk[n][key].accepted == Ballot(FAST_ROUND, 1, 0) for n in ids5)
    assert all(s.cores[n].stats["prepare_received"] == 0 for n in ids5)


def test_owner_that_ever_promised_the_key_runs_full_paxos() -> None:
    for n in (3, 5):
        s = Scripted(n=n, config=FAST)
        ids = [NodeId(i) for i in range(1, n + 1)]
        key = next(k for k in (b"k%d" % i for i in range(1000)) if owner_of(k, ids) == 1)
        s.disk[NodeId(1)][key] = AcceptorState(promised=Ballot(FAST_ROUND + 1, 2, 0))
        s.write(1, 1, key, b"p1", b"v")
        msgs = [r.msg for r in s.requests]
        assert msgs and all(isinstance(m, Prepare) and m.ballot.round >= 1 for m in msgs)
        s.settle(range(1, n + 1))
        assert isinstance(s.outcomes[1], Chosen)


def test_acceptor_takes_a_round_zero_proposal_only_while_it_holds_nothing() -> None:
    b0 = Ballot(FAST_ROUND, 1, 5)
    p = Proposal(b"p", b"v")
    state, reply = acceptor.on_accept(EMPTY_STATE, Accept(b"k", b0, p))
    assert isinstance(reply, Accepted) and state.proposal == p and state.accepted == b0
    # The same proposal again (a retransmission): accepted, nothing changes.
    again, reply = acceptor.on_accept(state, Accept(b"k", b0, p))
    assert isinstance(reply, Accepted) and again == state
    # Another proposal at the same round-0 ballot, or at a later incarnation's: refused.
    for ballot in (b0, Ballot(FAST_ROUND, 1, 6)):
        after, reply = acceptor.on_accept(state, Accept(b"k", ballot, Proposal(b"q", b"w")))
        assert isinstance(reply, Nack) and after == state
    # Rounds from 1 up follow plain Paxos.
    b1 = Ballot(1, 2, 0)
    after, reply = acceptor.on_accept(state, Accept(b"k", b1, Proposal(b"q", b"w")))
    assert isinstance(reply, Accepted) and after.accepted == b1


def test_read_never_takes_two_proposals_at_one_ballot_for_a_chosen_value() -> None:
    """Nodes 2 and 3 hold different proposals at the same round-0 ballot (possible only after
    an owner retried round 0 for the key): neither is chosen, so a read must complete one
    through Paxos before answering, and what it answers is then held by a majority."""
    s = Scripted(config=FAST)
    key = key_owned_by(1)
    b0 = Ballot(FAST_ROUND, 1, 0)
    s.disk[NodeId(2)][key] = AcceptorState(b0, b0, Proposal(b"a", b"A"))
    s.disk[NodeId(3)][key] = AcceptorState(b0, b0, Proposal(b"b", b"B"))
    s.read(2, 1, key)  # node 2's own answer (A at b0) is there at once
    s.deliver(src=2, dst=3)
    s.deliver(src=3, dst=2)  # B at b0: two answers at one ballot, but not one proposal
    assert 1 not in s.outcomes
    s.deliver(src=2, dst=1)
    s.deliver(src=1, dst=2)  # node 1 holds nothing: no majority for anything, so Paxos runs
    assert 1 not in s.outcomes
    assert any(isinstance(r.msg, Prepare) for r in s.requests)
    s.settle([1, 2, 3])
    outcome = s.outcomes[1]
    assert isinstance(outcome, Chosen)
    holders = [n for n in IDS if (st := s.disk[n].get(key)) is not None and st.proposal == outcome.proposal]
    assert len(holders) >= 2


def test_second_write_of_a_key_waits_for_the_first_and_fails_from_memory() -> None:
    s = Scripted(config=FAST)
    key = key_owned_by(1)
    s.write(1, 1, key, b"p1", b"first")
    s.write(1, 2, key, b"p2", b"second")
    core = s.cores[NodeId(1)]
    assert core.stats["fast_writes"] == 1 and core.stats["writes_queued"] == 1
    s.settle([1, 2, 3])
    o1, o2 = s.outcomes[1], s.outcomes[2]
    assert isinstance(o1, Chosen) and o1.proposal.pid == b"p1"
    assert isinstance(o2, Chosen) and o2.proposal.pid == b"p1"  # nil for the second call
    # The second write never sent anything: no prepare anywhere, no second acceptance.
    assert all(s.cores[n].stats["prepare_received"] == 0 for n in IDS)
    assert [s.cores[n].stats["accept_received"] for n in IDS] == [0, 1, 1]


def test_queued_write_runs_when_the_first_fails() -> None:
    s = Scripted(config=NodeConfig())
    s.write(1, 1, b"k", b"p1", b"first")
    s.write(1, 2, b"k", b"p2", b"second")
    s.drop()
    s.fire(1, 1, DEADLINE_TOKEN)  # the first write gets no answer at all
    assert isinstance(s.outcomes[1], Failed)
    assert s.requests, "the queued write starts once the first one ended"
    s.settle([1, 2, 3])
    o2 = s.outcomes[2]
    assert isinstance(o2, Chosen) and o2.proposal.value in (b"first", b"second")


def test_queued_write_that_times_out_is_noquorum() -> None:
    s = Scripted(config=NodeConfig())
    s.write(1, 1, b"k", b"p1", b"first")
    s.write(1, 2, b"k", b"p2", b"second")
    s.fire(1, 2)
    o2 = s.outcomes[2]
    assert isinstance(o2, Failed) and o2.kind is Failure.NOQUORUM  # it was never sent


def test_fast_writes_switched_off_at_run_time() -> None:
    s = Scripted(config=FAST)
    s.cores[NodeId(1)].fast_writes = False  # what the server does for a rebuilt node
    key = key_owned_by(1)
    s.write(1, 1, key, b"p1", b"v")
    assert s.requests and all(isinstance(r.msg, Prepare) for r in s.requests)


def test_non_owner_of_five_forwards_to_the_owner() -> None:
    """With five nodes only the owner writes at round 0; the others forward to it."""
    s = Scripted(n=5, config=FAST)
    key = key_owned_by(2, ids=IDS5)
    s.write(1, 7, key, b"p7", b"v")
    assert [(r.dst, type(r.msg)) for r in s.requests] == [(2, Propose)]
    s.settle(range(1, 6))
    outcome = s.outcomes[7]
    assert isinstance(outcome, Chosen) and outcome.proposal.pid == b"p7"
    assert s.cores[NodeId(2)].stats["fast_writes"] == 1
    assert s.cores[NodeId(1)].stats["writes_forwarded"] == 1
    # The forwarding node learned the value from the reply: its later reads are answered from
    # memory. Every other node but the owner got a learn message.
    assert s.cores[NodeId(1)].chosen(key) == outcome.proposal
    assert [s.cores[n].stats["learn_received"] for n in IDS5] == [0, 0, 1, 1, 1]


def _fail_forward(s: Scripted, reply: Unreachable | Written) -> None:
    """Answer node 1's pending forward to node 2 with ``reply`` (what the link or owner says)."""
    (fwd,) = [r for r in s.requests if isinstance(r.msg, Propose)]
    s.requests.remove(fwd)
    s.apply(NodeId(1), s.cores[NodeId(1)].on_peer_reply(fwd.req_id, reply))


def test_forward_over_a_failed_link_falls_back_to_paxos_with_the_same_proposal() -> None:
    s = Scripted(n=5, config=FAST)
    key = key_owned_by(2, ids=IDS5)
    s.write(1, 7, key, b"p7", b"v")
    _fail_forward(s, Unreachable())
    msgs = [r.msg for r in s.requests]
    assert msgs and all(isinstance(m, Prepare) and m.ballot.round >= 1 for m in msgs)
    s.settle([1, 3, 4])
    outcome = s.outcomes[7]
    assert isinstance(outcome, Chosen) and outcome.proposal.pid == b"p7"
    assert s.cores[NodeId(1)].stats["forwards_fell_back"] == 1


def test_failed_forward_is_uncertain_never_noquorum() -> None:
    """The owner may have sent the proposal for acceptance: NOQUORUM would be a lie."""
    s = Scripted(n=5, config=FAST)
    s.write(1, 7, key_owned_by(2, ids=IDS5), b"p7", b"v")
    s.drop()
    s.fire(1, 7, DEADLINE_TOKEN)  # no answer at all
    outcome = s.outcomes[7]
    assert isinstance(outcome, Failed) and outcome.kind is Failure.UNCERTAIN
    # The link failed, and the fallback to Paxos found no majority either.
    s.write(1, 8, key_owned_by(2, b"other", IDS5), b"p8", b"v")
    _fail_forward(s, Unreachable())
    assert s.requests, "the fallback sends prepares"
    s.drop()
    s.fire(1, 8, DEADLINE_TOKEN)
    outcome = s.outcomes[8]
    assert isinstance(outcome, Failed) and outcome.kind is Failure.UNCERTAIN
    # The owner answered UNCERTAIN, and the fallback found no majority.
    s.write(1, 9, key_owned_by(2, b"third", IDS5), b"p9", b"v")
    _fail_forward(s, Written("UNCERTAIN", None, "owner cut off"))
    s.drop()
    s.fire(1, 9, DEADLINE_TOKEN)
    outcome = s.outcomes[9]
    assert isinstance(outcome, Failed) and outcome.kind is Failure.UNCERTAIN


def test_owner_noquorum_lets_this_node_try_and_stay_exact() -> None:
    """The owner's NOQUORUM speaks for one copy of the forward only (a duplicate may reach it
    after a restart, when it no longer knows it saw one): this node tries itself, and if that
    fails too it answers UNCERTAIN, never NOQUORUM."""
    s = Scripted(n=5, config=FAST)
    s.write(1, 7, key_owned_by(2, ids=IDS5), b"p7", b"v")
    _fail_forward(s, Written("NOQUORUM", None, "3 of 5 nodes unreachable"))
    assert s.requests and all(isinstance(r.msg, Prepare) for r in s.requests)
    s.drop()
    s.fire(1, 7, DEADLINE_TOKEN)
    outcome = s.outcomes[7]
    assert isinstance(outcome, Failed) and outcome.kind is Failure.UNCERTAIN
    # And when this node does reach a majority, the write succeeds.
    s.write(1, 8, key_owned_by(2, b"other", IDS5), b"p8", b"v")
    _fail_forward(s, Written("NOQUORUM", None, "3 of 5 nodes unreachable"))
    s.settle([1, 3, 4])
    outcome = s.outcomes[8]
    assert isinstance(outcome, Chosen) and outcome.proposal.pid == b"p8"


def test_writes_are_not_forwarded_to_an_owner_known_down() -> None:
    s = Scripted(n=5, config=FAST)
    key = key_owned_by(2, ids=IDS5)
    s.cores[NodeId(1)].set_peer_up(NodeId(2), False)
    s.write(1, 7, key, b"p7", b"v")
    assert s.requests and all(isinstance(r.msg, Prepare) for r in s.requests)
    s.settle([1, 3, 4])
    assert isinstance(s.outcomes[7], Chosen)


def test_duplicated_forward_runs_one_operation() -> None:
    s = Scripted(n=5, config=FAST)
    key = key_owned_by(2, ids=IDS5)
    s.write(1, 7, key, b"p7", b"v")
    s.requests.append(s.requests[0])  # the network delivers the request twice
    s.deliver(src=1, dst=2)
    assert s.cores[NodeId(2)].stats["forwards_received"] == 1
    assert s.cores[NodeId(2)].ops_in_flight() == 1
    s.settle(range(1, 6))
    assert isinstance(s.outcomes[7], Chosen)


def test_concurrent_reads_of_a_key_share_the_next_round_never_an_earlier_one() -> None:
    """A read that begins while a read round of its key is in flight waits for the next round:
    the round in flight may have begun before a write that completed before this read began."""
    s = Scripted(config=NodeConfig())
    key = b"shared"
    s.read(1, 1, key)  # its read of node 1's own acceptor is answered at once: nothing accepted
    s.deliver(src=1, dst=2)  # node 2 sees the read before the write: it will answer "nothing"
    s.write(2, 2, key, b"p2", b"v")
    # The write is chosen by nodes 2 and 3 alone (node 2's answer to the read stays queued).
    s.requests = [r for r in s.requests if (r.src, r.dst) != (2, 1)]
    s.settle([2, 3], learn=False)
    written = s.outcomes[2]
    assert isinstance(written, Chosen) and written.proposal.pid == b"p2"
    s.read(1, 3, key)  # begins after the write completed: must return its value
    s.read(1, 4, key)
    assert s.cores[NodeId(1)].stats["reads_shared"] == 2
    s.deliver(src=2, dst=1)  # node 2's answer ends the first round: nil, which is linearizable
    assert isinstance(s.outcomes[1], Empty)
    assert 3 not in s.outcomes
    s.settle([1, 2, 3])
    for op in (3, 4):
        outcome = s.outcomes[op]
        assert isinstance(outcome, Chosen) and outcome.proposal.value == b"v"
    # Both waiting reads were answered by one round: one read per acceptor, not two.
    assert s.cores[NodeId(3)].stats["read_received"] == 2  # the first round and the shared one


def test_a_read_may_join_only_a_read_round_that_has_not_begun() -> None:
    """join_read_round names the read waiting for the next round, never the round in flight:
    that one may have begun before the joining read, and a write may have completed since."""
    s = Scripted(config=NodeConfig())
    core = s.cores[NodeId(1)]
    assert core.join_read_round(b"k") is None
    s.read(1, 1, b"k")  # leads a round, in flight
    assert core.join_read_round(b"k") is None
    s.read(1, 2, b"k")  # waits for the next round
    assert core.join_read_round(b"k") == 2
    counted = core.counters()  # the joined read counts as started and as shared (INFO paxos)
    assert (counted["reads_started"], counted["reads_shared"]) == (3, 2)
    s.deliver(src=1)
    s.deliver(dst=1)  # the first round ends: the next one begins, led by read 2
    assert isinstance(s.outcomes[1], Empty)
    assert 2 not in s.outcomes
    assert core.join_read_round(b"k") is None
    s.settle([1, 2, 3])
    assert isinstance(s.outcomes[2], Empty)


def test_a_read_waiting_for_the_next_round_fails_at_its_deadline() -> None:
    s = Scripted(config=NodeConfig())
    s.read(1, 1, b"k")
    s.read(1, 2, b"k")
    s.fire(1, 2)
    outcome = s.outcomes[2]
    assert isinstance(outcome, Failed) and outcome.kind is Failure.NOQUORUM
    assert 1 not in s.outcomes


# ---- votes: a forwarding node learns the outcome from the acceptors ---------------------------


def _forwarded_and_accepted(s: Scripted, key: bytes) -> None:
    """Node 1 forwards op 7 to the owner, node 2, which sends its round-0 accepts."""
    s.write(1, 7, key, b"p7", b"v")
    s.deliver(src=1, dst=2)
    assert sorted((r.dst, r.msg.notify) for r in s.requests if isinstance(r.msg, Accept)) == [(1, 1), (3, 1)]
    s.deliver(src=2)  # both accepts arrive; nothing is durable yet


def test_forwarding_node_answers_once_both_acceptors_vouch_before_the_owner_does() -> None:
    s = Scripted(config=FORWARD)
    key = key_owned_by(2)
    _forwarded_and_accepted(s, key)
    s.flush(3)
    assert [(r.src, r.dst, type(r.msg)) for r in s.requests] == [(3, 1, Voted)]
    s.deliver(src=3, dst=1)
    assert 7 not in s.outcomes  # node 1's own acceptance is not durable yet
    s.flush(1)
    outcome = s.outcomes[7]
    assert isinstance(outcome, Chosen) and outcome.proposal.pid == b"p7"
    assert s.cores[NodeId(1)].stats["forwards_settled_by_votes"] == 1
    # The owner has not heard a single acceptance yet: the answer did not wait for it.
    assert sorted(r.src for r in s.replies if r.dst == 2 and isinstance(r.reply, Accepted)) == [1, 3]
    assert s.cores[NodeId(2)].stats["ops_chosen"] == 0
    # The owner's own answer arrives later and changes nothing.
    s.outcomes.clear()
    s.settle([1, 2, 3])
    assert 7 not in s.outcomes
    assert all(s.cores[n].chosen(key) == outcome.proposal for n in IDS)


def test_votes_for_another_proposal_or_from_the_owner_do_not_count() -> None:
    s = Scripted(config=FORWARD)
    key = key_owned_by(2)
    _forwarded_and_accepted(s, key)
    s.flush(1)
    core = s.cores[NodeId(1)]
    b = Ballot(FAST_ROUND, 2, 0)
    s.apply(NodeId(1), core.on_request(NodeId(3), 0, Voted(key, b, b"p8")))  # another proposal
    s.apply(NodeId(1), core.on_request(NodeId(2), 0, Voted(key, b, b"p7")))  # the owner
    s.apply(NodeId(1), core.on_request(NodeId(3), 0, Voted(key, Ballot(1, 2, 0), b"p7")))  # not round 0
    s.apply(NodeId(1), core.on_request(NodeId(3), 0, Voted(key, Ballot(FAST_ROUND, 2, 5), b"p7")))  # other ballot
    assert 7 not in s.outcomes
    s.apply(NodeId(1), core.on_request(NodeId(3), 0, Voted(key, b, b"p7")))
    assert isinstance(s.outcomes[7], Chosen)


def test_no_vote_for_an_acceptance_whose_sync_failed() -> None:
    s = Scripted(config=FORWARD)
    key = key_owned_by(2)
    _forwarded_and_accepted(s, key)
    (_, p3) = next((n, p) for n, p in s.persists if n == 3)
    s.persists.remove((NodeId(3), p3))
    s.apply(NodeId(3), s.cores[NodeId(3)].on_persisted(p3.key, p3.version, OSError("EIO")))
    assert not any(isinstance(r.msg, Voted) for r in s.requests)
    s.flush(1)
    s.deliver(src=3, dst=1)
    assert 7 not in s.outcomes


def test_a_write_node_one_runs_itself_sends_no_notify() -> None:
    """Only forwarded writes ask for votes: the owner's own clients get its answer directly."""
    s = Scripted(config=FAST)
    key = key_owned_by(1)
    s.write(1, 7, key, b"p7", b"v")
    assert {r.msg.notify for r in s.requests if isinstance(r.msg, Accept)} == {0}
    s.settle([1, 2, 3])
    assert isinstance(s.outcomes[7], Chosen)
    assert not any(s.cores[n].stats["forwards_settled_by_votes"] for n in IDS)

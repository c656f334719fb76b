"""The one-round-trip write of an owned key, and the forwarding of writes to the owner.

Exact interleavings on real NodeCore objects (tests/sim/script.py); the randomized simulator
runs the same paths under loss, duplication, crashes and amnesia (tests/test_simulation.py).
"""

from __future__ import annotations

from respreg.core.node import NodeConfig
from respreg.core.proposer import DEADLINE_TOKEN, Chosen, Empty, Failed, Failure
from respreg.core.types import (
    FAST_ROUND,
    Accept,
    AcceptorState,
    Ballot,
    NodeId,
    Prepare,
    Propose,
    Unreachable,
    Written,
    owner_of,
)

from .sim.script import Scripted

FAST = NodeConfig(fast_writes=True)
IDS = [NodeId(1), NodeId(2), NodeId(3)]


def key_owned_by(node: int, prefix: bytes = b"k") -> bytes:
    for i in range(10_000):
        key = prefix + b"%d" % i
        if owner_of(key, IDS) == node:
            return key
    raise AssertionError("no key found")


def test_owner_of_spreads_keys_and_agrees_everywhere() -> None:
    owners = [owner_of(b"key:%d" % i, IDS) for i in range(3000)]
    assert {owners.count(NodeId(n)) for n in (1, 2, 3)} <= set(range(850, 1150))
    # Member order does not matter: every node computes the same owner.
    assert all(owner_of(b"key:%d" % i, list(reversed(IDS))) == o for i, o in enumerate(owners))


def test_owner_accepts_locally_first_then_sends_accept_at_round_zero_without_prepare() -> None:
    s = Scripted(config=FAST)
    key = key_owned_by(1)
    s.write(1, 1, key, b"p1", b"v")
    # Nothing leaves node 1 before its own acceptance of round 0 is on disk.
    assert s.requests == []
    assert [(n, p.state.accepted) for n, p in s.persists] == [(1, Ballot(FAST_ROUND, 1, 0))]
    s.flush(1)
    sent = [(r.dst, r.msg) for r in s.requests]
    assert sorted(dst for dst, _ in sent) == [2, 3]
    assert all(isinstance(m, Accept) and m.ballot == Ballot(FAST_ROUND, 1, 0) for _, m in sent)
    s.settle([1, 2, 3])
    outcome = s.outcomes[1]
    assert isinstance(outcome, Chosen) and outcome.proposal.pid == b"p1"
    assert all(s.disk[n][key].accepted == Ballot(FAST_ROUND, 1, 0) for n in IDS)
    assert s.cores[NodeId(1)].stats["fast_writes"] == 1
    assert all(s.cores[n].stats["prepare_received"] == 0 for n in IDS)


def test_owner_that_ever_promised_the_key_runs_full_paxos() -> None:
    s = Scripted(config=FAST)
    key = key_owned_by(1)
    s.disk[NodeId(1)][key] = AcceptorState(promised=Ballot(FAST_ROUND, 1, 0))
    s.write(1, 1, key, b"p1", b"v")
    msgs = [r.msg for r in s.requests]
    assert msgs and all(isinstance(m, Prepare) and m.ballot.round >= 1 for m in msgs)
    s.settle([1, 2, 3])
    assert isinstance(s.outcomes[1], Chosen)


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
    assert all(s.cores[n].stats["accept_received"] == 1 for n in IDS)


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


def test_non_owner_forwards_to_the_owner() -> None:
    s = Scripted(config=FAST)
    key = key_owned_by(2)
    s.write(1, 7, key, b"p7", b"v")
    assert [(r.dst, type(r.msg)) for r in s.requests] == [(2, Propose)]
    s.settle([1, 2, 3])
    outcome = s.outcomes[7]
    assert isinstance(outcome, Chosen) and outcome.proposal.pid == b"p7"
    assert s.cores[NodeId(2)].stats["fast_writes"] == 1
    assert s.cores[NodeId(1)].stats["writes_forwarded"] == 1
    # The forwarding node learned the value: its later reads are answered from memory.
    assert s.cores[NodeId(1)].chosen(key) == outcome.proposal


def _fail_forward(s: Scripted, reply: Unreachable | Written) -> None:
    """Answer node 1's pending forward to node 2 with ``reply`` (what the link or owner says)."""
    (fwd,) = [r for r in s.requests if isinstance(r.msg, Propose)]
    s.requests.remove(fwd)
    s.apply(NodeId(1), s.cores[NodeId(1)].on_peer_reply(fwd.req_id, reply))


def test_forward_over_a_failed_link_falls_back_to_paxos_with_the_same_proposal() -> None:
    s = Scripted(config=FAST)
    key = key_owned_by(2)
    s.write(1, 7, key, b"p7", b"v")
    _fail_forward(s, Unreachable())
    msgs = [r.msg for r in s.requests]
    assert msgs and all(isinstance(m, Prepare) and m.ballot.round >= 1 for m in msgs)
    s.settle([1, 3])
    outcome = s.outcomes[7]
    assert isinstance(outcome, Chosen) and outcome.proposal.pid == b"p7"
    assert s.cores[NodeId(1)].stats["forwards_fell_back"] == 1


def test_failed_forward_is_uncertain_never_noquorum() -> None:
    """The owner may have sent the proposal for acceptance: NOQUORUM would be a lie."""
    s = Scripted(config=FAST)
    s.write(1, 7, key_owned_by(2), b"p7", b"v")
    s.drop()
    s.fire(1, 7, DEADLINE_TOKEN)  # no answer at all
    outcome = s.outcomes[7]
    assert isinstance(outcome, Failed) and outcome.kind is Failure.UNCERTAIN
    # The link failed, and the fallback to Paxos found no majority either.
    s.write(1, 8, key_owned_by(2, b"other"), b"p8", b"v")
    _fail_forward(s, Unreachable())
    assert s.requests, "the fallback sends prepares"
    s.drop()
    s.fire(1, 8, DEADLINE_TOKEN)
    outcome = s.outcomes[8]
    assert isinstance(outcome, Failed) and outcome.kind is Failure.UNCERTAIN
    # The owner answered UNCERTAIN, and the fallback found no majority.
    s.write(1, 9, key_owned_by(2, b"third"), b"p9", b"v")
    _fail_forward(s, Written("UNCERTAIN", None, "owner cut off"))
    s.drop()
    s.fire(1, 9, DEADLINE_TOKEN)
    outcome = s.outcomes[9]
    assert isinstance(outcome, Failed) and outcome.kind is Failure.UNCERTAIN


def test_owner_noquorum_lets_this_node_try_and_stay_exact() -> None:
    """The owner never sent it: this node tries itself, and may still answer NOQUORUM."""
    s = Scripted(config=FAST)
    s.write(1, 7, key_owned_by(2), b"p7", b"v")
    _fail_forward(s, Written("NOQUORUM", None, "2 of 3 nodes unreachable"))
    assert s.requests and all(isinstance(r.msg, Prepare) for r in s.requests)
    s.drop()
    s.fire(1, 7, DEADLINE_TOKEN)
    outcome = s.outcomes[7]
    assert isinstance(outcome, Failed) and outcome.kind is Failure.NOQUORUM
    # And when this node does reach a majority, the write succeeds.
    s.write(1, 8, key_owned_by(2, b"other"), b"p8", b"v")
    _fail_forward(s, Written("NOQUORUM", None, "2 of 3 nodes unreachable"))
    s.settle([1, 3])
    outcome = s.outcomes[8]
    assert isinstance(outcome, Chosen) and outcome.proposal.pid == b"p8"


def test_writes_are_not_forwarded_to_an_owner_known_down() -> None:
    s = Scripted(config=FAST)
    key = key_owned_by(2)
    s.cores[NodeId(1)].set_peer_up(NodeId(2), False)
    s.write(1, 7, key, b"p7", b"v")
    assert s.requests and all(isinstance(r.msg, Prepare) for r in s.requests)
    s.settle([1, 3])
    assert isinstance(s.outcomes[7], Chosen)


def test_duplicated_forward_runs_one_operation() -> None:
    s = Scripted(config=FAST)
    key = key_owned_by(2)
    s.write(1, 7, key, b"p7", b"v")
    s.requests.append(s.requests[0])  # the network delivers the request twice
    s.deliver(src=1, dst=2)
    assert s.cores[NodeId(2)].stats["forwards_received"] == 1
    assert s.cores[NodeId(2)].ops_in_flight() == 1
    s.settle([1, 2, 3])
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


def test_a_read_waiting_for_the_next_round_fails_at_its_deadline() -> None:
    s = Scripted(config=NodeConfig())
    s.read(1, 1, b"k")
    s.read(1, 2, b"k")
    s.fire(1, 2)
    outcome = s.outcomes[2]
    assert isinstance(outcome, Failed) and outcome.kind is Failure.NOQUORUM
    assert 1 not in s.outcomes

"""The one-round-trip write of an owned key, and the forwarding of writes to the owner.

Exact interleavings on real NodeCore objects (tests/sim/script.py); the randomized simulator
runs the same paths under loss, duplication, crashes and amnesia (tests/test_simulation.py).
"""

from __future__ import annotations

from respreg.core.node import FORWARD_TOKEN, NodeConfig
from respreg.core.proposer import DEADLINE_TOKEN, Chosen, Failed, Failure
from respreg.core.types import FAST_ROUND, Accept, AcceptorState, Ballot, NodeId, Prepare, Propose, owner_of

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


def test_second_write_while_the_first_fast_write_is_pending_uses_paxos() -> None:
    s = Scripted(config=FAST)
    key = key_owned_by(1)
    s.write(1, 1, key, b"p1", b"first")
    s.write(1, 2, key, b"p2", b"second")
    assert s.cores[NodeId(1)].stats["fast_writes"] == 1
    s.settle([1, 2, 3])
    # The prepare of the second write pre-empted the first at round 0: it backs off and retries.
    while 1 not in s.outcomes:
        phase_timers = {t.token for n, t in s.timers if n == 1 and t.op_id == 1 and t.token >= 0}
        assert phase_timers, "the first write neither finished nor waits for a retry"
        for token in phase_timers:
            s.fire(1, 1, token)
        s.settle([1, 2, 3])
    o1, o2 = s.outcomes[1], s.outcomes[2]
    assert isinstance(o1, Chosen) and isinstance(o2, Chosen)
    assert o1.proposal == o2.proposal  # one value, and exactly one of the two calls wrote it
    assert o1.proposal.pid in (b"p1", b"p2")


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


def test_forward_to_a_silent_owner_falls_back_to_paxos_with_the_same_proposal() -> None:
    s = Scripted(config=FAST)
    key = key_owned_by(2)
    s.write(1, 7, key, b"p7", b"v")
    s.drop(dst=2)
    s.fire(1, 7, FORWARD_TOKEN)
    msgs = [r.msg for r in s.requests]
    assert msgs and all(isinstance(m, Prepare) and m.ballot.round >= 1 for m in msgs)
    s.settle([1, 3])
    outcome = s.outcomes[7]
    assert isinstance(outcome, Chosen) and outcome.proposal.pid == b"p7"
    assert s.cores[NodeId(1)].stats["forwards_fell_back"] == 1


def test_failed_forward_is_uncertain_never_noquorum() -> None:
    """The owner may have sent the proposal for acceptance: NOQUORUM would be a lie."""
    s = Scripted(config=FAST)
    key = key_owned_by(2)
    s.write(1, 7, key, b"p7", b"v")
    s.drop()
    s.fire(1, 7, DEADLINE_TOKEN)
    outcome = s.outcomes[7]
    assert isinstance(outcome, Failed) and outcome.kind is Failure.UNCERTAIN
    # Also after the fallback to Paxos started and found no majority.
    s.write(1, 8, key_owned_by(2, b"other"), b"p8", b"v")
    s.drop()
    s.fire(1, 8, FORWARD_TOKEN)
    assert s.requests, "the fallback sends prepares"
    s.drop()
    s.fire(1, 8, DEADLINE_TOKEN)
    outcome = s.outcomes[8]
    assert isinstance(outcome, Failed) and outcome.kind is Failure.UNCERTAIN


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

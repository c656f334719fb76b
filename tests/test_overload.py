"""Admission control (docs/design.md, "Overload"): a node runs at most --max-writes-in-flight
client writes at once; more wait, in arrival order, for at most half their deadline, and one
that could not start answers -NOQUORUM, having sent nothing. Real processes, real sockets."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from .cluster import Cluster, running

DEADLINE_MS = 4000


@pytest.fixture
def one_write_at_a_time(tmp_path: Path) -> Iterator[Cluster]:
    # Peers that stop answering are not declared down within a deadline: a write to a cluster
    # whose other nodes are paused runs (and holds its slot) until resumed or until its deadline.
    options = ["--max-writes-in-flight", "1", "--peer-timeout-ms", str(3 * DEADLINE_MS)]
    with running(tmp_path, deadline_ms=DEADLINE_MS, extra_args=options) as c:
        yield c


def _paxos(c: Cluster, node: int) -> dict[str, int]:
    info = c.client(node).info("paxos")
    return {k: int(v) for k, v in info.items() if k.startswith("writes_")}


def _wait_for(c: Cluster, node: int, field: str, value: int) -> dict[str, int]:
    give_up = time.monotonic() + 10
    while True:
        stats = _paxos(c, node)
        if stats[field] == value or time.monotonic() > give_up:
            assert stats[field] == value, stats
            return stats
        time.sleep(0.02)


def _setonce(c: Cluster, key: str) -> object:
    client = c.client(1, socket_timeout=DEADLINE_MS / 1000 + 10)
    try:
        return client.execute_command("SETONCE", key, "v")
    except redis.ResponseError as exc:
        return exc


def test_writes_beyond_the_limit_wait_and_start_as_running_ones_end(one_write_at_a_time: Cluster) -> None:
    c = one_write_at_a_time
    settings = c.client(1).config_get("respreg-max-writes-in-flight", "respreg-peer-timeout-ms")
    assert settings == {"respreg-max-writes-in-flight": "1", "respreg-peer-timeout-ms": str(3 * DEADLINE_MS)}
    c.kill(2, signal.SIGSTOP)
    c.kill(3, signal.SIGSTOP)  # the running write can reach no majority: it holds the one slot
    try:
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(_setonce, c, "first")
            _wait_for(c, 1, "writes_running", 1)
            rest = [pool.submit(_setonce, c, f"next{i}") for i in range(2)]
            stats = _wait_for(c, 1, "writes_waiting", 2)
            assert stats["writes_running"] == 1 and stats["writes_delayed"] == 2
            c.kill(2, signal.SIGCONT)
            c.kill(3, signal.SIGCONT)
            replies = [f.result(timeout=30) for f in (first, *rest)]
    finally:
        c.kill(2, signal.SIGCONT)
        c.kill(3, signal.SIGCONT)
    assert replies == [b"OK"] * 3, replies
    stats = _paxos(c, 1)
    assert stats["writes_waiting"] == 0 and stats["writes_running"] == 0 and stats["writes_shed"] == 0, stats
    for key in ("first", "next0", "next1"):
        assert {c.client(n).get(key) for n in (1, 2, 3)} == {b"v"}


def test_a_write_that_cannot_start_within_half_its_deadline_is_noquorum_and_never_written(
    one_write_at_a_time: Cluster,
) -> None:
    c = one_write_at_a_time
    c.kill(2, signal.SIGSTOP)
    c.kill(3, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(_setonce, c, "first")
            _wait_for(c, 1, "writes_running", 1)
            late: Future[object] = pool.submit(_setonce, c, "late")
            # The first write runs until its own deadline, later than half of this one's.
            reply = late.result(timeout=30)
            assert isinstance(reply, redis.ResponseError), reply
            assert str(reply).startswith("NOQUORUM node overloaded"), reply
            assert not first.done()
            stats = _paxos(c, 1)
            assert stats["writes_shed"] == 1 and stats["writes_waiting"] == 0, stats
            outcome = first.result(timeout=30)
    finally:
        c.kill(2, signal.SIGCONT)
        c.kill(3, signal.SIGCONT)
    assert isinstance(outcome, redis.ResponseError), outcome
    c.wait_peers()
    # NOQUORUM means no node ever saw the late value: it is not there, and can be written now.
    assert all(c.client(n).get("late") is None for n in (1, 2, 3))
    assert c.client(2).execute_command("SETONCE", "late", "w") == b"OK"
    assert {c.client(n).get("late") for n in (1, 2, 3)} == {b"w"}

"""The chosen cache (respreg.core.chosen) and the chosen log (respreg.chosenlog): a node keeps
what it learned is chosen across restarts, in bounded memory."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import redis

from respreg.chosenlog import LOG_NAME, ChosenLog, write_log
from respreg.core.chosen import LARGE_ENTRY, ChosenCache, cost, pack, unpack
from tests.cluster import Cluster, running

# ---- the cache ---------------------------------------------------------------------------------


@pytest.mark.parametrize("pid_len", [0, 1, 18, 254, 255, 300, 70_000])
def test_pack_round_trips_any_id_length(pid_len: int) -> None:
    pid = bytes(range(256)) * (pid_len // 256) + bytes(range(pid_len % 256))
    for value in (b"", b"v", b"\xff" * 300):
        e = pack(pid, value)
        assert unpack(e) == (pid, value)
        cache = ChosenCache(max_keys=10, max_bytes=1 << 30)
        cache.add(b"k", pid, value)
        assert cache.value(b"k") == value


def test_cache_keeps_its_key_bound_and_forgets_the_least_used() -> None:
    c = ChosenCache(max_keys=100, max_bytes=1 << 30)
    for i in range(100):
        assert c.add(b"k%d" % i, b"p", b"v%d" % i) == pack(b"p", b"v%d" % i)
    assert len(c) == 100
    for i in range(50):  # used again: these must outlive the others
        assert c.value(b"k%d" % i) == b"v%d" % i
    for i in range(100, 150):
        c.add(b"k%d" % i, b"p", b"v%d" % i)
        assert len(c) <= 100
    assert all(c.value(b"k%d" % i) == b"v%d" % i for i in range(50))
    assert all(b"k%d" % i not in c for i in range(50, 100))
    assert all(c.get(b"k%d" % i) == (b"p", b"v%d" % i) for i in range(100, 150))


def test_cache_keeps_its_byte_bound() -> None:
    one = cost(b"k000", pack(b"pid", b"v" * 100))
    c = ChosenCache(max_keys=10**6, max_bytes=10 * one)
    for i in range(1000):
        c.add(b"k%03d" % i, b"pid", b"v" * 100)
        assert c.size_bytes <= 10 * one
    assert len(c) == 10
    assert c.add(b"k999", b"pid", b"other") is None  # known: never replaced
    assert c.value(b"k999") == b"v" * 100
    too_big = ChosenCache(max_keys=10, max_bytes=100)
    assert too_big.add(b"k", b"p", b"v" * 200) is not None and b"k" not in too_big


def test_cache_extend_takes_only_new_keys() -> None:
    c = ChosenCache(max_keys=10, max_bytes=1 << 20)
    c.add(b"a", b"p1", b"first")
    assert c.extend([(b"a", pack(b"p2", b"second")), (b"b", pack(b"p3", b"x"))]) == 1
    assert c.get(b"a") == (b"p1", b"first")
    assert sorted(k for k, _ in c.items()) == [b"a", b"b"]


def test_a_large_value_is_answered_without_a_copy_and_logged_like_any_other() -> None:
    big = b"x" * (LARGE_ENTRY * 4)
    c = ChosenCache(max_keys=10, max_bytes=1 << 20)
    assert c.add(b"big", b"pid", big) == pack(b"pid", big)  # what goes to the log
    assert c.value(b"big") is big  # the very object: no slice of a packed entry
    assert c.get(b"big") == (b"pid", big)
    assert c.size_bytes == cost(b"big", (b"pid", big)) > len(big)
    assert dict(c.items()) == {b"big": pack(b"pid", big)}
    # Read back from a log: held the same way, counted the same.
    d = ChosenCache(max_keys=10, max_bytes=1 << 20)
    assert d.extend([(b"big", pack(b"pid", big)), (b"small", pack(b"p", b"s"))]) == 2
    assert d.value(b"big") == big and d.get(b"small") == (b"p", b"s")
    assert d.size_bytes == cost(b"big", (b"pid", big)) + cost(b"small", pack(b"p", b"s"))
    # And bounded by bytes like the rest.
    e = ChosenCache(max_keys=100, max_bytes=3 * cost(b"k0", (b"pid", big)))
    for i in range(10):
        e.add(b"k%d" % i, b"pid", big)
        assert e.size_bytes <= e.max_bytes
    assert len(e) == 3


# ---- the log file --------------------------------------------------------------------------------


def _load_all(clog: ChosenLog) -> list[tuple[bytes, bytes]]:
    return [r for batch in clog.load() for r in batch]


def test_log_returns_what_was_appended_in_order(tmp_path: Path) -> None:
    clog = ChosenLog(tmp_path, 1 << 20)
    assert _load_all(clog) == []
    records = [(b"key%d" % i, pack(b"pid%d" % i, b"value%d" % i)) for i in range(20_000)]
    clog.append(records[:5])
    clog.append(records[5:])
    clog.append([(b"big", pack(b"p", b"x" * (2 << 20)))])  # larger than a block
    clog.close()
    again = ChosenLog(tmp_path, 4 << 20)
    assert _load_all(again) == [*records, (b"big", pack(b"p", b"x" * (2 << 20)))]
    assert again.records == 20_001
    again.close()


@pytest.mark.parametrize("damage", ["torn", "flipped", "garbage"])
def test_log_stops_at_a_damaged_block_and_appends_after_the_valid_part(tmp_path: Path, damage: str) -> None:
    clog = ChosenLog(tmp_path, 1 << 20)
    _load_all(clog)
    clog.append([(b"a", pack(b"p", b"1"))])
    good = clog.size
    clog.append([(b"b", pack(b"p", b"2"))])
    full = clog.size
    clog.close()
    path = tmp_path / LOG_NAME
    data = bytearray(path.read_bytes())
    if damage == "torn":
        data = data[:-3]
    elif damage == "flipped":
        data[-1] ^= 0x01
    else:
        data += b"\x00" * 40
    path.write_bytes(bytes(data))
    again = ChosenLog(tmp_path, 1 << 20)
    both = [(b"a", pack(b"p", b"1")), (b"b", pack(b"p", b"2"))]
    if damage == "garbage":  # after the last block: both survive
        assert _load_all(again) == both
        assert path.stat().st_size == full
    else:
        assert _load_all(again) == both[:1]
        assert path.stat().st_size == good  # the torn block is cut before anything is appended
    again.append([(b"c", pack(b"p", b"3"))])
    again.close()
    third = ChosenLog(tmp_path, 1 << 20)
    assert _load_all(third)[-1] == (b"c", pack(b"p", b"3"))
    third.close()


def test_a_file_that_is_not_a_log_is_replaced(tmp_path: Path) -> None:
    (tmp_path / LOG_NAME).write_bytes(b"something else entirely")
    clog = ChosenLog(tmp_path, 1 << 20)
    assert _load_all(clog) == []
    clog.append([(b"a", pack(b"p", b"1"))])
    clog.close()
    again = ChosenLog(tmp_path, 1 << 20)
    assert _load_all(again) == [(b"a", pack(b"p", b"1"))]
    again.close()


def test_rewrite_replaces_the_log_and_appends_continue(tmp_path: Path) -> None:
    clog = ChosenLog(tmp_path, 1 << 20)
    _load_all(clog)
    clog.append([(b"k%d" % (i % 10), pack(b"p", b"v")) for i in range(1000)])
    assert clog.wants_rewrite(10) is False  # far from the threshold yet
    keep = [(b"k%d" % i, pack(b"p", b"v")) for i in range(10)]
    clog.reopen(clog.write_file(keep), len(keep))
    clog.append([(b"new", pack(b"p", b"w"))])
    clog.close()
    again = ChosenLog(tmp_path, 1 << 20)
    assert _load_all(again) == [*keep, (b"new", pack(b"p", b"w"))]
    assert again.records == 11
    again.close()
    assert not (tmp_path / (LOG_NAME + ".tmp")).exists()


# ---- real nodes ------------------------------------------------------------------------------------


def _info(c: Cluster, node_id: int) -> dict[str, str]:
    out: dict[str, str] = {}
    for section in ("persistence", "paxos"):
        out.update({k: str(v) for k, v in c.client(node_id).info(section).items()})
    return out


def _wait_loaded(c: Cluster, node_id: int) -> dict[str, str]:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        info = _info(c, node_id)
        if info["chosen_log_loaded"] == "1":
            return info
        time.sleep(0.05)
    raise TimeoutError(f"node {node_id} did not load its chosen log")


def test_a_restarted_node_answers_what_it_learned_even_without_a_majority(tmp_path: Path) -> None:
    with running(tmp_path) as c:
        written = {b"logged%d" % i: b"value%d" % i for i in range(50)}
        for i, (k, v) in enumerate(written.items()):
            assert c.client(1 + i % 3).execute_command("SETONCE", k, v) in (b"OK", True)
        # Node 1 learns every value (it coordinated a third, and heard of the rest).
        for k, v in written.items():
            assert c.client(1).get(k) == v
        info = _info(c, 1)
        assert int(info["chosen_log_records"]) >= len(written)
        for n in (1, 2, 3):
            c.kill(n, signal.SIGKILL)
        c.start(1)  # alone: no majority
        info = _wait_loaded(c, 1)
        assert int(info["cached_chosen"]) >= len(written)
        n1 = c.client(1)
        for k, v in written.items():
            assert n1.get(k) == v
            assert n1.execute_command("SETONCE", k, b"other") is None
        # Anything it did not learn still needs a majority: an error, never a guess.
        with pytest.raises(redis.ResponseError, match="NOQUORUM"):
            n1.get(b"never-written")
        assert int(_info(c, 1)["reads_started"]) == 1


def test_a_node_with_a_damaged_log_serves_and_learns_again(tmp_path: Path) -> None:
    with running(tmp_path) as c:
        assert c.client(1).execute_command("SETONCE", b"a", b"1") in (b"OK", True)
        assert c.client(2).execute_command("SETONCE", b"b", b"2") in (b"OK", True)
        assert c.client(1).get(b"b") == b"2"
        c.kill(1, signal.SIGTERM)
        path = c.node(1).data_dir / LOG_NAME
        path.write_bytes(path.read_bytes()[:-2])  # the last block torn
        c.start(1)
        c.wait_peers()
        info = _wait_loaded(c, 1)
        assert info["chosen_log_ok"] == "1"
        n1 = c.client(1)
        assert n1.get(b"a") == b"1" and n1.get(b"b") == b"2"  # the lost one asked the others
        assert "ignoring its tail" in c.node(1).log_path.read_text()


def test_a_log_prepared_offline_is_served(tmp_path: Path) -> None:
    """What benchmarks/scale.py relies on: a log written by write_log is read by a node."""
    c = Cluster(tmp_path)
    try:
        for n in c.nodes:
            n.data_dir.mkdir(parents=True)
        # Only node 1 has it, and only node 1 runs: it answers from the log, alone.
        write_log(c.node(1).data_dir, [(b"offline%d" % i, pack(b"pid", b"v%d" % i)) for i in range(100)])
        c.start(1)
        _wait_loaded(c, 1)
        assert c.client(1).get(b"offline7") == b"v7"
    finally:
        c.close()


def test_a_node_whose_log_cannot_be_read_serves_without_it(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    try:
        for n in c.nodes:
            n.data_dir.mkdir(parents=True)
        (c.node(1).data_dir / LOG_NAME).mkdir()  # not a file: reading it fails
        c.start()
        c.wait_peers()
        info = _wait_loaded(c, 1)
        assert info["chosen_log_ok"] == "0"
        assert c.client(1).execute_command("SETONCE", b"k", b"v") in (b"OK", True)
        assert c.client(1).get(b"k") == b"v"
        assert "learned values are no longer logged" in c.node(1).log_path.read_text()
    finally:
        c.close()


def test_a_log_grown_past_the_cache_is_rewritten_from_it(tmp_path: Path) -> None:
    """Keys forgotten by a small cache and learned again would grow the log without end: the
    node rewrites it from what it holds, and a restart reads the rewritten log."""
    import asyncio

    from respreg.core.proposer import Chosen
    from respreg.server import NodeServer
    from tests.cluster import one_node_config

    config = one_node_config(tmp_path / "node1", chosen_cache_keys=10)

    async def run(keys: range, reads: int) -> tuple[int, int]:
        server = NodeServer(config)
        await server.start()
        try:
            clog = server.chosen_log
            assert clog is not None
            clog.rewrite_slack = 50
            while not clog.loaded:
                await asyncio.sleep(0.01)
            for i in keys:
                fut, _ = server.write(b"k%d" % i, b"v%d" % i)
                assert isinstance(await asyncio.wait_for(fut, 5), Chosen)
            for _ in range(reads):  # evicted keys read again: learned again, logged again
                for i in keys:
                    out = await asyncio.wait_for(server.read(b"k%d" % i), 5)
                    assert isinstance(out, Chosen) and out.proposal.value == b"v%d" % i
            for _ in range(100):
                await asyncio.sleep(0.01)
                if not server._learned_busy:
                    break
            return clog.records, clog.size
        finally:
            await server.stop()

    records, size = asyncio.run(run(range(100), 2))
    # 300 records were learned in all; the log was rewritten at least once down to the cache's 10.
    assert records < 300 and size == (tmp_path / "node1" / LOG_NAME).stat().st_size
    again = ChosenLog(tmp_path / "node1", 1 << 20)
    loaded = _load_all(again)
    again.close()
    assert len(loaded) == records
    assert all(unpack(e)[1] == b"v" + k[1:] for k, e in loaded)
    assert not (tmp_path / "node1" / (LOG_NAME + ".tmp")).exists()

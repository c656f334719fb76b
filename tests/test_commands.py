"""Every reply of the contract, through real redis-py (RESP2 and RESP3) against a real 3-node cluster."""

from __future__ import annotations

from typing import Any

import pytest
import redis

import respreg

from .cluster import Cluster


def raw(c: redis.Redis, *args: str) -> Any:
    """Send one command on a redis-py connection and return the reply without redis-py's callbacks."""
    conn = c.connection_pool.get_connection()
    try:
        conn.send_command(*args)
        return conn.read_response()
    finally:
        c.connection_pool.release(conn)


@pytest.fixture(params=[2, 3], ids=["resp2", "resp3"])
def protocol(request: pytest.FixtureRequest) -> int:
    return int(request.param)


def test_setonce_first_writer_wins_on_every_node(cluster: Cluster, protocol: int) -> None:
    c1, c2, c3 = (cluster.client(i, protocol=protocol) for i in (1, 2, 3))
    assert c1.execute_command("SETONCE", "k", "v") is True or c1.get("k") == b"v"
    assert c2.execute_command("SETONCE", "k", "w") is None
    assert c3.get("k") == b"v"
    assert c2.get("k") == b"v"
    assert c1.get("missing") is None
    assert c3.get("missing") is None


def test_setonce_reply_is_plain_ok(cluster: Cluster) -> None:
    raw = cluster.client(1, protocol=2)
    # redis-py turns +OK into True for SET; for an unknown command it returns the raw status.
    assert raw.execute_command("SETONCE", "ok-key", "x") in (b"OK", True)


def test_equal_value_from_another_call_gets_nil(cluster: Cluster, protocol: int) -> None:
    c1, c2 = cluster.client(1, protocol=protocol), cluster.client(2, protocol=protocol)
    assert c1.execute_command("SETONCE", "same", "v") in (b"OK", True)
    assert c2.execute_command("SETONCE", "same", "v") is None
    assert c1.execute_command("SETONCE", "same", "v") is None


def test_set_nx_and_set_nx_get_like_redis7(cluster: Cluster, protocol: int) -> None:
    c = cluster.client(1, protocol=protocol)
    assert c.set("nx", "a", nx=True) is True
    assert c.set("nx", "b", nx=True) is None
    assert c.set("nxget", "a", nx=True, get=True) is None  # wrote: nil, like Redis 7
    assert c.set("nxget", "b", nx=True, get=True) == b"a"  # already held: the value
    assert cluster.client(3, protocol=protocol).get("nxget") == b"a"
    assert c.setnx("snx", "1") is True
    assert c.setnx("snx", "2") is False


def test_mutations_answer_write_once_errors(cluster: Cluster, protocol: int) -> None:
    c = cluster.client(2, protocol=protocol)
    c.set("m", "1", nx=True)
    for call in (
        lambda: c.set("m", "2"),
        lambda: c.set("m", "2", xx=True),
        lambda: c.set("m", "2", nx=True, ex=10),
        lambda: c.delete("m"),
        lambda: c.expire("m", 10),
        lambda: c.incr("m"),
        lambda: c.getdel("m"),
        lambda: c.mset({"m": "3"}),
    ):
        with pytest.raises(redis.ResponseError, match="write-once"):
            call()
    assert c.get("m") == b"1"


def test_redis_style_errors(cluster: Cluster, protocol: int) -> None:
    c = cluster.client(1, protocol=protocol)
    with pytest.raises(redis.ResponseError) as e:
        c.execute_command("NOSUCH", "a", "b")
    assert str(e.value) == "unknown command 'NOSUCH', with args beginning with: 'a' 'b' "
    with pytest.raises(redis.ResponseError) as e:
        c.execute_command("GET")
    assert str(e.value) == "wrong number of arguments for 'get' command"
    with pytest.raises(redis.ResponseError) as e:
        c.execute_command("SETONCE", "k")
    assert str(e.value) == "wrong number of arguments for 'setonce' command"
    with pytest.raises(redis.ResponseError, match="syntax error"):
        c.execute_command("SET", "k", "v", "NX", "BOGUS")
    with pytest.raises(redis.ResponseError, match="DB index is out of range"):
        c.execute_command("SELECT", "1")


def test_connection_commands(cluster: Cluster, protocol: int) -> None:
    c = cluster.client(1, protocol=protocol)
    assert c.ping() is True
    assert c.echo("hello") == b"hello"
    assert c.execute_command("SELECT", "0") in (b"OK", True, "OK")
    assert c.client_setname("worker-1") is True
    assert c.client_getname() in (b"worker-1", "worker-1")
    cid = c.client_id()
    assert isinstance(cid, int) and cid > 0
    assert c.client_info()["name"] == "worker-1"
    assert c.execute_command("CLIENT", "SETINFO", "LIB-NAME", "mylib") in (b"OK", True, "OK")
    with pytest.raises(redis.ResponseError, match="Client names cannot contain spaces"):
        c.client_setname("bad name")


def test_hello_3_returns_a_real_map(cluster: Cluster) -> None:
    c = cluster.client(1, protocol=3)
    hello = c.execute_command("HELLO", "3")
    assert isinstance(hello, dict)
    assert hello[b"proto"] == 3
    assert hello[b"server"] == b"redis"
    with pytest.raises(redis.ResponseError, match="NOPROTO"):
        c.execute_command("HELLO", "4")


def test_resp3_nulls_and_maps_on_the_wire(cluster: Cluster) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", cluster.node(1).port)) as s:
        s.sendall(b"HELLO 3\r\n")
        data = b""
        while b"modules" not in data:
            data += s.recv(4096)
        assert data.startswith(b"%7\r\n")
        s.sendall(b"GET resp3-missing\r\n")
        assert s.recv(64) == b"_\r\n"
        s.sendall(b"HELLO 2\r\nGET resp3-missing\r\n")
        data = b""
        while not data.endswith(b"$-1\r\n"):
            data += s.recv(4096)
        assert data.startswith(b"*14\r\n")


def test_command_count_docs_and_info(cluster: Cluster, protocol: int) -> None:
    c = cluster.client(1, protocol=protocol)
    count = c.command_count()
    assert isinstance(count, int) and count > 5
    docs = raw(c, "COMMAND", "DOCS", "SETONCE")
    if protocol == 2:  # a flat array: name, then the doc's own flat key/value array
        assert docs[0] == b"setonce"
        doc = dict(zip(docs[1][::2], docs[1][1::2], strict=True))
    else:
        doc = docs[b"setonce"]
    assert doc[b"group"] == b"string"
    assert [a[b"name"] if isinstance(a, dict) else a[1] for a in doc[b"arguments"]] == [b"key", b"value"]
    cmds = c.command()
    assert "setonce" in cmds and cmds["get"]["arity"] == 2
    info = c.info()
    assert info["redis_mode"] == "standalone"
    assert int(info["tcp_port"]) == cluster.node(1).port
    # The node runs the modules this test process runs: compiled, unless built without a compiler.
    assert int(info["respreg_compiled"]) == int(respreg.compiled())
    paxos = c.info("paxos")
    assert int(paxos["cluster_size"]) == 3 and int(paxos["quorum"]) == 2
    assert int(paxos["peers_up"]) == 2
    assert c.config_get("appendonly") == {"appendonly": "no"}


def test_info_counts_every_command_processed(cluster: Cluster, protocol: int) -> None:
    """GETs answered from memory by the fast path count like every other command."""
    c = cluster.client(1, protocol=protocol)
    before = int(c.info("stats")["total_commands_processed"])  # counts itself
    assert c.execute_command("SETONCE", "counted", "v") in (b"OK", True)
    pipe = c.pipeline(transaction=False)
    for i in range(5):
        pipe.ping()
        pipe.get("counted")  # known chosen on node 1: the fast path
        pipe.get(f"counted:missing:{i}")  # a quorum read
    assert pipe.execute() == [True, b"v", None] * 5
    after = int(c.info("stats")["total_commands_processed"])
    assert after - before == 1 + 15 + 1


def test_binary_keys_and_values(cluster: Cluster, protocol: int) -> None:
    c1, c3 = cluster.client(1, protocol=protocol), cluster.client(3, protocol=protocol)
    key = bytes(range(256)) + b"\r\n\x00/../"
    value = b"\x00\xff\r\n" * 1000
    assert c1.execute_command("SETONCE", key, value) in (b"OK", True)
    assert c3.get(key) == value
    assert c3.execute_command("SETONCE", key, b"other") is None
    assert c1.execute_command("SETONCE", b"", b"") in (b"OK", True)
    assert c3.get(b"") == b""


def test_limits_give_clear_errors(cluster: Cluster) -> None:
    c = cluster.client(1)
    with pytest.raises(redis.ResponseError, match="value is too large"):
        c.execute_command("SETONCE", "big", b"x" * (1024 * 1024 + 1))
    with pytest.raises(redis.ResponseError, match="key is too long"):
        c.execute_command("SETONCE", b"k" * (64 * 1024 + 1), "v")
    assert c.execute_command("SETONCE", "big", b"x" * (1024 * 1024)) in (b"OK", True)
    assert cluster.client(2).get("big") == b"x" * (1024 * 1024)


def test_mget_and_exists(cluster: Cluster, protocol: int) -> None:
    c = cluster.client(2, protocol=protocol)
    c.set("a1", "1", nx=True)
    c.set("a2", "2", nx=True)
    assert c.mget("a1", "nope", "a2") == [b"1", None, b"2"]
    assert c.exists("a1", "a2", "nope") == 2


def test_pipelined_reads_before_a_write_of_the_key_answer_nil(cluster: Cluster) -> None:
    """Per connection, commands on one key take effect in the order sent: GETs pipelined before
    the SETONCE of a missing key answer nil (the write waits for them, even when they share one
    read operation), and GETs after it answer the value."""
    c = cluster.client(2, protocol=2)
    pipe = c.pipeline(transaction=False)
    for k in range(40):
        for _ in range(20):
            pipe.get(f"order:{k}")
        pipe.execute_command("SETONCE", f"order:{k}", f"v{k}")
        for _ in range(3):
            pipe.get(f"order:{k}")
    replies = pipe.execute()
    for k in range(40):
        got = replies[24 * k : 24 * (k + 1)]
        assert got == [None] * 20 + [b"OK"] + [f"v{k}".encode()] * 3, (k, got)


def test_pipelined_gets_of_missing_keys_between_other_replies_answer_each_in_order(
    cluster: Cluster, protocol: int
) -> None:
    """Runs of GETs that share one read operation, broken up by other commands and by GETs of
    another key, each get their own reply, in request order (RESP2 and RESP3 nils differ)."""
    c = cluster.client(1, protocol=protocol)
    c.execute_command("SETONCE", "runs:known", "v")
    c.execute_command("SETONCE", "runs:known2", "w")
    started = int(c.info("paxos")["reads_started"])
    pipe = c.pipeline(transaction=False)
    expected: list[object] = []
    reads = 0
    for round_ in range(30):
        for _ in range(round_ % 7 + 1):
            pipe.get("runs:missing")
            expected.append(None)
            reads += 1
        if round_ % 3 == 0:
            pipe.ping()
            expected.append(True)
        if round_ % 4 == 1:
            pipe.get("runs:other")
            expected.append(None)
            reads += 1
        for _ in range(round_ % 3 + 1):
            pipe.get("runs:known")
            expected.append(b"v")
        if round_ % 2:
            pipe.get("runs:known2")
            expected.append(b"w")
    assert pipe.execute() == expected
    # Every GET that needed a read round counts as one started, also the ones that took the
    # operation of the GET before them without asking the core.
    assert int(c.info("paxos")["reads_started"]) - started == reads


def test_gets_of_more_keys_than_the_reply_cache_holds_answer_each_its_own_value(
    cluster: Cluster, protocol: int
) -> None:
    """A node keeps the GET replies of chosen values formatted, a bounded number of them: past
    the bound it starts over, and every GET still gets its own key's value (RESP2 and RESP3),
    a key longer than what is kept included."""
    from respreg.client import REPLY_CACHE_KEYS

    c = cluster.client(2, protocol=protocol)
    keys = [f"replies:{protocol}:{i}" for i in range(REPLY_CACHE_KEYS + 300)]
    long_key = "replies:long:" + "k" * 2000
    pipe = c.pipeline(transaction=False)
    for k in keys + [long_key]:
        pipe.execute_command("SETONCE", k, f"value of {k[:40]}")
    assert all(r in (b"OK", True) for r in pipe.execute())
    for _ in range(2):
        pipe = c.pipeline(transaction=False)
        for k in keys + [long_key]:
            pipe.get(k)
        assert pipe.execute() == [f"value of {k[:40]}".encode() for k in keys + [long_key]]
    cached = int(c.info("paxos")["cached_replies"])
    assert 0 < cached <= REPLY_CACHE_KEYS


def test_pipelined_commands_answer_in_order(cluster: Cluster, protocol: int) -> None:
    c = cluster.client(3, protocol=protocol)
    pipe = c.pipeline(transaction=False)
    for i in range(200):
        pipe.execute_command("SETONCE", f"p{i % 50}", f"v{i}")
        pipe.get(f"p{i % 50}")
    replies = pipe.execute()
    for i in range(200):
        w, r = replies[2 * i], replies[2 * i + 1]
        if i < 50:
            assert w in (b"OK", True), (i, w)
        else:
            assert w is None, (i, w)
        assert r == f"v{i % 50}".encode()

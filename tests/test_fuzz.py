"""Hostile and broken input against real nodes: the peer port, the client port, slow and many
connections, and huge declared lengths.

Each test ends by checking that the node it attacked is still the node it was: the process is
alive, answers PING, writes and reads through it still work, and (for the peer port) its real
peer links never went down. The test marked xfail(strict) shows a known gap; its reason says
where. Every loop is bounded in count and in time; every process is started by
:class:`tests.cluster.Cluster` and ended by its PID.
"""

from __future__ import annotations

import re
import resource
import signal
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import hiredis
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from respreg.storage import META_NAME, NodeMeta

from .cluster import HOST, Cluster, Node

IO_LIMIT_S = 15.0
#: A generous bound on a node's resident memory; an idle node uses about 30 MB.
RSS_BOUND_KB = 300 * 1024

PROTO_BULK = b"-ERR Protocol error: invalid bulk length\r\n"
PROTO_MBULK = b"-ERR Protocol error: invalid multibulk length\r\n"
NESTED = b"-ERR Protocol error: expected '$', got '*'\r\n"
NOT_A_PEER = b"-NOAUTH this is a respreg peer port: clients belong on the client port\r\n"
WRONG_SECRET = b"-NOAUTH peer authentication failed: wrong cluster secret\r\n"
MALFORMED_PX = b"-ERR Protocol error: malformed peer request\r\n"
UNKNOWN_PEER_CMD = b"-ERR Protocol error: unknown peer command\r\n"
MAX_CLIENTS = b"-ERR max number of clients reached\r\n"


# ---- helpers -----------------------------------------------------------------------------------


def multibulk(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def recv_exactly(sock: socket.socket, n: int, limit_s: float = IO_LIMIT_S) -> bytes:
    buf = bytearray()
    deadline = time.monotonic() + limit_s
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out after {len(buf)} of {n} bytes: {bytes(buf[-200:])!r}")
        sock.settimeout(left)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise AssertionError(f"connection closed after {len(buf)} of {n} bytes: {bytes(buf[-200:])!r}")
        buf += chunk
    return bytes(buf)


def read_to_eof(sock: socket.socket, limit_s: float = IO_LIMIT_S, max_bytes: int = 64 << 20) -> bytes:
    """Everything received until the server closes; fails after limit_s or max_bytes."""
    buf = bytearray()
    deadline = time.monotonic() + limit_s
    while len(buf) <= max_bytes:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"connection still open after {limit_s}s; received {bytes(buf[-200:])!r}")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(buf)
        if not chunk:
            return bytes(buf)
        buf += chunk
    raise AssertionError(f"more than {max_bytes} bytes received")


def send_quietly(sock: socket.socket, data: bytes) -> None:
    """Send, tolerating a server that already closed (it may answer and close before reading all)."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


def converse(port: int, data: bytes, close_write: bool = False) -> bytes:
    """Send ``data`` on a new connection and return everything received until the server closes."""
    with socket.create_connection((HOST, port), timeout=IO_LIMIT_S) as s:
        send_quietly(s, data)
        if close_write:
            try:
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        return read_to_eof(s)


def raw_ping(port: int) -> bool:
    with socket.create_connection((HOST, port), timeout=IO_LIMIT_S) as s:
        s.sendall(b"PING\r\n")
        return recv_exactly(s, 7) == b"+PONG\r\n"


def vm_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def info(cluster: Cluster, node_id: int, section: str) -> dict[str, object]:
    with cluster.client(node_id, protocol=2) as r:
        data = r.info(section)
    assert isinstance(data, dict)
    return data


def link_state(cluster: Cluster) -> dict[tuple[int, int], str]:
    """Every running node's view of each of its peer links: ``up=..,connects=..`` per (node, peer)."""
    out: dict[tuple[int, int], str] = {}
    for n in cluster.nodes:
        if not n.running():
            continue
        paxos = info(cluster, n.node_id, "paxos")
        for other in cluster.nodes:
            if other.node_id != n.node_id:
                # "addr=..,up=1,connects=N" (redis-py splits it into a dict)
                link = paxos[f"peer{other.node_id}"]
                fields = link if isinstance(link, dict) else dict(f.split("=", 1) for f in str(link).split(","))
                out[(n.node_id, other.node_id)] = f"up={fields['up']},connects={fields['connects']}"
    return out


def assert_links_unchanged(cluster: Cluster, before: dict[tuple[int, int], str]) -> None:
    """Every real peer link is up and was never re-established since ``before`` was taken."""
    after = link_state(cluster)
    assert after == before, f"peer links changed: {before} -> {after}"
    for n in cluster.nodes:
        assert int(str(info(cluster, n.node_id, "paxos")["peers_up"])) == cluster.size - 1


def assert_serving(cluster: Cluster, node_id: int) -> None:
    """The node is alive, answers PING, and a SETONCE through it is readable on another node."""
    node = cluster.node(node_id)
    assert node.running(), cluster.logs()
    assert raw_ping(node.port)
    key = f"health:{uuid.uuid4().hex}"
    with cluster.client(node_id, protocol=2) as r:
        assert r.execute_command("SETONCE", key, "ok") in (b"OK", True)
        assert r.get(key) == b"ok"
    with cluster.client(node_id % cluster.size + 1, protocol=2) as r:
        assert r.get(key) == b"ok"


def raise_nofile(wanted: int) -> int:
    """Raise this process's RLIMIT_NOFILE soft limit towards ``wanted`` (as far as the hard limit
    allows; children inherit it); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return new


def require_nofile(wanted: int) -> None:
    """Skip unless this process (and the nodes it started, which inherited its limit) can hold
    ``wanted`` descriptors."""
    have = raise_nofile(wanted)
    if have < wanted:
        pytest.skip(f"RLIMIT_NOFILE is {have}: this test needs {wanted} descriptors")


def open_many(port: int, count: int) -> list[socket.socket]:
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            socks.append(socket.create_connection((HOST, port), timeout=IO_LIMIT_S))
    except BaseException:
        close_all(socks)
        raise
    return socks


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A 3-node cluster for the tests that leave it as they found it (each uses its own keys).

    The descriptor limit is raised first so that the nodes (which inherit it) can hold thousands
    of connections."""
    raise_nofile(8192)
    c = Cluster(tmp_path_factory.mktemp("fuzz-cluster"), deadline_ms=10_000)
    try:
        c.start()
        c.wait_peers()
        yield c
    finally:
        c.close()


@pytest.fixture
def links(shared: Cluster) -> Iterator[dict[tuple[int, int], str]]:
    """The peer links as they were before the test; afterwards they must be the same."""
    before = link_state(shared)
    yield before
    assert_links_unchanged(shared, before)


# ---- peer port: non-peers are refused and disconnected -----------------------------------------


@dataclass(frozen=True)
class Hs:
    """What a handshake needs: the cluster secret, and the fields after ``<from> <to>`` that the
    sender's data directory calls for (its identity, when node.meta carries one)."""

    secret: bytes
    extra: tuple[bytes, ...]

    def hello(self, sender: bytes, target: bytes, secret: bytes | None = None, more: tuple[bytes, ...] = ()) -> bytes:
        secret = self.secret if secret is None else secret
        return multibulk(b"PEER.HELLO", secret, sender, target, *self.extra, *more)


def handshake(cluster: Cluster, sender: int) -> Hs:
    meta = NodeMeta.decode((cluster.node(sender).data_dir / META_NAME).read_bytes())
    identity: bytes = getattr(meta, "identity", b"")
    return Hs(cluster.secret.encode(), (identity.hex().encode(),) if identity else ())


def peer_login(cluster: Cluster, sender: int, target: int) -> bytes:
    """A correct handshake, as node ``sender`` opening a link to node ``target``."""
    return handshake(cluster, sender).hello(b"%d" % sender, b"%d" % target)


def _not_member(sender: bytes, target: bytes) -> bytes:
    return b"-ERR peer handshake names %s -> %s, not a member link to node 1\r\n" % (
        repr(sender).encode(),
        repr(target).encode(),
    )


@dataclass(frozen=True)
class PeerCase:
    id: str
    data: Callable[[Hs], bytes]  # what a would-be peer sends to node 1's peer port
    reply: bytes  # everything node 1 sends before it closes the connection
    authenticated: bool = False  # a correct PEER.HELLO (as node 2) is sent first


def _static(data: bytes) -> Callable[[Hs], bytes]:
    return lambda _h: data


PEER_CASES: list[PeerCase] = [
    PeerCase("client-command", _static(b"GET key\r\n"), NOT_A_PEER),
    PeerCase("client-multibulk", _static(multibulk(b"SETONCE", b"k", b"v")), NOT_A_PEER),
    PeerCase("px-without-hello", _static(multibulk(b"PX", b"1", b"R", b"k")), NOT_A_PEER),
    PeerCase("hello-without-arguments", _static(multibulk(b"PEER.HELLO")), NOT_A_PEER),
    PeerCase("hello-missing-target", lambda h: multibulk(b"PEER.HELLO", h.secret, b"2"), NOT_A_PEER),
    PeerCase("hello-extra-argument", lambda h: h.hello(b"2", b"1", more=(b"x",)), NOT_A_PEER),
    PeerCase("wrong-secret", lambda h: h.hello(b"2", b"1", b"not-the-secret"), WRONG_SECRET),
    PeerCase("empty-secret", lambda h: h.hello(b"2", b"1", b""), WRONG_SECRET),
    PeerCase("secret-prefix", lambda h: h.hello(b"2", b"1", h.secret[:-1]), WRONG_SECRET),
    PeerCase("secret-plus-a-byte", lambda h: h.hello(b"2", b"1", h.secret + b"x"), WRONG_SECRET),
    PeerCase("secret-different-case", lambda h: h.hello(b"2", b"1", h.secret.upper()), WRONG_SECRET),
    PeerCase(
        "inline-hello-wrong-secret", lambda h: b" ".join([b"PEER.HELLO nope 2 1", *h.extra]) + b"\r\n", WRONG_SECRET
    ),
    PeerCase(
        "wrong-secret-then-px",
        lambda h: h.hello(b"2", b"1", b"x") + multibulk(b"PX", b"1", b"R", b"k"),
        WRONG_SECRET,
    ),
    PeerCase("unknown-sender", lambda h: h.hello(b"99", b"1"), _not_member(b"99", b"1")),
    PeerCase("sender-zero", lambda h: h.hello(b"0", b"1"), _not_member(b"0", b"1")),
    PeerCase("sender-is-the-node-itself", lambda h: h.hello(b"1", b"1"), _not_member(b"1", b"1")),
    PeerCase("link-meant-for-another-node", lambda h: h.hello(b"2", b"3"), _not_member(b"2", b"3")),
    PeerCase("ids-not-numbers", lambda h: h.hello(b"two", b"one"), _not_member(b"two", b"one")),
    PeerCase("huge-bulk-before-hello", _static(b"*5\r\n$10\r\nPEER.HELLO\r\n$100000000\r\n"), PROTO_BULK),
    PeerCase("negative-bulk-length", _static(b"*1\r\n$-7\r\n"), PROTO_BULK),
    PeerCase("too-many-arguments", _static(b"*17\r\n" + b"$1\r\nx\r\n" * 17), PROTO_MBULK),
    PeerCase("huge-argument-count", _static(b"*2147483648\r\n"), PROTO_MBULK),
    PeerCase("deeply-nested-arrays", _static(b"*1\r\n" * 10_000 + b"$4\r\nPING\r\n"), NESTED),
    PeerCase(
        "integer-instead-of-bulk", _static(b"*2\r\n:1\r\n:2\r\n"), b"-ERR Protocol error: expected '$', got ':'\r\n"
    ),
    PeerCase("binary-garbage", _static(b"\x00\xff\xfe\x80garbage\x01\r\n"), NOT_A_PEER),
    PeerCase(
        "tls-client-hello",
        _static(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)) + b"\n"),
        NOT_A_PEER,
    ),
    PeerCase("http-request", _static(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), NOT_A_PEER),
    PeerCase("long-inline-line", _static(b"x" * 70_000), b"-ERR Protocol error: too big inline request\r\n"),
    PeerCase("ping-then-client-command", _static(b"PING\r\nGET k\r\n"), b"+PONG\r\n" + NOT_A_PEER),
    # With the right secret: anything but a well-formed PX or PING ends the link.
    PeerCase("px-request-id-not-a-number", _static(multibulk(b"PX", b"abc", b"R", b"k")), MALFORMED_PX, True),
    PeerCase("px-unknown-kind", _static(multibulk(b"PX", b"1", b"Z", b"k")), MALFORMED_PX, True),
    PeerCase(
        "px-prepare-missing-ballot-part", _static(multibulk(b"PX", b"1", b"P", b"k", b"1", b"2")), MALFORMED_PX, True
    ),
    PeerCase(
        "px-prepare-extra-field",
        _static(multibulk(b"PX", b"1", b"P", b"k", b"1", b"2", b"3", b"4")),
        MALFORMED_PX,
        True,
    ),
    PeerCase(
        "px-ballot-not-a-number", _static(multibulk(b"PX", b"1", b"P", b"k", b"one", b"2", b"3")), MALFORMED_PX, True
    ),
    PeerCase(
        "px-accept-missing-value",
        _static(multibulk(b"PX", b"1", b"A", b"k", b"1", b"2", b"3", b"pid")),
        MALFORMED_PX,
        True,
    ),
    PeerCase("px-read-extra-field", _static(multibulk(b"PX", b"1", b"R", b"k", b"x")), MALFORMED_PX, True),
    PeerCase("px-learn-missing-value", _static(multibulk(b"PX", b"0", b"L", b"k", b"pid")), MALFORMED_PX, True),
    PeerCase(
        "px-ballot-has-4301-digits",
        _static(multibulk(b"PX", b"1", b"P", b"k", b"9" * 4301, b"2", b"3")),
        MALFORMED_PX,
        True,
    ),
    PeerCase("px-too-short", _static(multibulk(b"PX", b"1", b"R")), UNKNOWN_PEER_CMD, True),
    PeerCase("unknown-command", _static(multibulk(b"FLUSHALL")), UNKNOWN_PEER_CMD, True),
    PeerCase("client-command-after-hello", _static(b"GET k\r\n"), UNKNOWN_PEER_CMD, True),
    PeerCase("second-hello", lambda h: h.hello(b"2", b"1"), UNKNOWN_PEER_CMD, True),
    PeerCase(
        "huge-bulk-after-hello",
        _static(b"*8\r\n$2\r\nPX\r\n$1\r\n1\r\n$1\r\nA\r\n$100000000\r\n"),
        PROTO_BULK,
        True,
    ),
    PeerCase("too-many-arguments-after-hello", _static(b"*17\r\n"), PROTO_MBULK, True),
    PeerCase("deeply-nested-after-hello", _static(b"*1\r\n" * 10_000), NESTED, True),
    PeerCase("binary-garbage-after-hello", _static(b"\x00\xff\xfe\x80garbage\x01\r\n"), UNKNOWN_PEER_CMD, True),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in PEER_CASES])
def test_non_peer_on_peer_port_is_refused_and_disconnected(
    shared: Cluster, links: dict[tuple[int, int], str], case: PeerCase
) -> None:
    node = shared.node(1)
    h = handshake(shared, 2)
    prefix = h.hello(b"2", b"1") if case.authenticated else b""
    expected = (b"+OK\r\n" if case.authenticated else b"") + case.reply
    got = converse(node.peer_port, prefix + case.data(h))  # read_to_eof: the node must close the link
    assert got == expected
    assert_serving(shared, 1)


def test_peer_port_answers_ping_and_keeps_a_silent_connection_open(shared: Cluster) -> None:
    # The two inputs a non-peer may send without being disconnected: PING, and nothing.
    node = shared.node(1)
    with socket.create_connection((HOST, node.peer_port), timeout=IO_LIMIT_S) as s:
        s.sendall(b"PING\r\n" + multibulk(b"PING"))
        assert recv_exactly(s, 14) == b"+PONG\r\n+PONG\r\n"
        s.settimeout(0.2)
        with pytest.raises(TimeoutError):
            s.recv(1)
        s.settimeout(IO_LIMIT_S)
        s.sendall(b"GET k\r\n")
        assert read_to_eof(s) == NOT_A_PEER
    assert_serving(shared, 1)


def _px_reply(sock: socket.socket, reader: hiredis.Reader, limit_s: float = IO_LIMIT_S) -> object:
    deadline = time.monotonic() + limit_s
    while True:
        r = reader.gets()
        if r is not False:
            return r
        left = deadline - time.monotonic()
        assert left > 0, "no reply"
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            return b"<closed>"
        reader.feed(chunk)


def test_px_ballot_beyond_64_bits_is_malformed(shared: Cluster, links: dict[tuple[int, int], str]) -> None:
    node = shared.node(1)
    before = info(shared, 1, "persistence")["fsync_errors"], info(shared, 1, "paxos")["alarms"]
    run = uuid.uuid4().hex.encode()
    # One packet: a prepare at ballot 2**63 for one key, and a well-formed prepare for another.
    data = (
        peer_login(shared, 2, 1)
        + multibulk(b"PX", b"1", b"P", b"fuzz:bigballot:" + run, b"%d" % 2**63, b"2", b"1")
        + multibulk(b"PX", b"2", b"P", b"fuzz:innocent:" + run, b"1", b"2", b"1")
    )
    replies: list[object] = []
    with socket.create_connection((HOST, node.peer_port), timeout=IO_LIMIT_S) as s:
        s.sendall(data)
        reader = hiredis.Reader()
        for _ in range(3):
            replies.append(_px_reply(s, reader))
            if replies[-1] == b"<closed>" or len(replies) == 3:
                break
    after = info(shared, 1, "persistence")["fsync_errors"], info(shared, 1, "paxos")["alarms"]
    refused = [r for r in replies if isinstance(r, list) and r[1] == b"X"]
    assert replies[0] == b"OK"
    assert not refused and after == before, f"replies {replies!r}; fsync_errors, alarms {before} -> {after}"


def test_px_learn_with_a_request_id_is_malformed(shared: Cluster, links: dict[tuple[int, int], str]) -> None:
    key = b"fuzz:learn-id:" + uuid.uuid4().hex.encode()
    prefix = peer_login(shared, 2, 1)
    got = converse(shared.node(1).peer_port, prefix + multibulk(b"PX", b"7", b"L", key, b"pid", b"v"), close_write=True)
    assert got == b"+OK\r\n" + MALFORMED_PX


class Impostor:
    """Listens on a stopped node's peer address and answers like a peer, without the secret:
    +OK to any PEER.HELLO, +PONG to PING, a read with a "chosen" forged value, and a refusal to
    anything else. Runs in a thread for at most ``limit_s``; records the handshakes it saw."""

    def __init__(self, port: int, forged: bytes, limit_s: float = 30.0) -> None:
        self.forged = forged
        self.hellos: list[list[bytes]] = []
        self._stop = threading.Event()
        self._deadline = time.monotonic() + limit_s
        self._srv = socket.socket()
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind((HOST, port))
        self._srv.listen(16)
        self._srv.settimeout(0.05)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _answer(self, msg: list[bytes]) -> bytes:
        if msg[0] == b"PEER.HELLO":
            self.hellos.append(msg)
            return b"+OK\r\n"
        if msg[0] == b"PING":
            return b"+PONG\r\n"
        if msg[0] == b"PX" and msg[2] == b"R":
            pid = b"\x00\x02" + b"\x00" * 16
            return b"*8\r\n:%s\r\n$1\r\nS\r\n:1\r\n:2\r\n:1\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n:1\r\n" % (
                msg[1],
                len(pid),
                pid,
                len(self.forged),
                self.forged,
            )
        if msg[0] == b"PX" and msg[1] != b"0":
            return b"*3\r\n:%s\r\n$1\r\nX\r\n$4\r\nbusy\r\n" % msg[1]
        return b""

    def _run(self) -> None:
        conns: list[tuple[socket.socket, hiredis.Reader]] = []
        try:
            while not self._stop.is_set() and time.monotonic() < self._deadline:
                try:
                    conn, _ = self._srv.accept()
                    conn.settimeout(0.01)
                    conns.append((conn, hiredis.Reader()))
                except TimeoutError:
                    pass
                for conn, reader in list(conns):
                    try:
                        data = conn.recv(65536)
                    except TimeoutError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        conns.remove((conn, reader))
                        conn.close()
                        continue
                    reader.feed(data)
                    for _ in range(10_000):
                        msg = reader.gets()
                        if msg is False:
                            break
                        if isinstance(msg, list) and msg:
                            try:
                                conn.sendall(self._answer(msg))
                            except OSError:
                                break
        finally:
            for conn, _ in conns:
                conn.close()
            self._srv.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@pytest.mark.xfail(
    strict=True,
    reason="the peer handshake authenticates only the dialing side (respreg/peer.py PeerLink._run, "
    "data_received): a node sends the cluster secret in clear to whatever listens at a peer's "
    "address and counts the link up on any +OK, so a listener without the secret learns it and its "
    "forged 'chosen' read reply is answered to clients",
)
def test_impostor_at_a_peer_address_is_not_trusted(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    impostor: Impostor | None = None
    try:
        c.start()
        c.wait_peers()
        c.kill(3, signal.SIGTERM)
        c.kill(2, signal.SIGTERM)
        impostor = Impostor(c.node(2).peer_port, b"forged-by-impostor")
        # Node 1 redials node 2's address (backoff up to 1 s) and meets the impostor.
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and int(str(info(c, 1, "paxos")["peers_up"])) == 0:
            time.sleep(0.05)
        with c.client(1, protocol=2) as r:
            try:
                answer: object = r.get("never-written")
            except redis.ResponseError as exc:
                answer = str(exc)
        leaked = any(len(h) > 1 and h[1] == c.secret.encode() for h in impostor.hellos)
        # Expected: the secret stays with the members, and a GET never answers a value no client wrote.
        assert not leaked and answer != b"forged-by-impostor", f"secret sent in clear: {leaked}; GET: {answer!r}"
    finally:
        if impostor is not None:
            impostor.close()
        c.close()


# ---- peer port: generated garbage --------------------------------------------------------------

PEER_FRAGMENTS = [
    b"*", b"$", b":", b"+", b"-", b"\r\n", b"\n", b"\r", b"-1", b"0", b"1", b"2", b"3", b"4", b"8", b"17",
    b"99999999999999999999", b"9223372036854775808", b" ", b"\x00", b"\xff", b'"', b"'", b"PEER.HELLO",
    b"PX", b"P", b"A", b"R", b"L", b"PING", b"GET", b"k", b"pid", b"value", b"$100000000\r\n",
]  # fmt: skip

peer_tokens = st.lists(st.one_of(st.sampled_from(PEER_FRAGMENTS), st.binary(max_size=8)), max_size=50).map(b"".join)
px_commands = st.lists(
    st.sampled_from([b"PX", b"0", b"1", b"-1", b"P", b"A", b"R", b"L", b"k", b"fz", b"5", b"2", b"x", b""]),
    min_size=1,
    max_size=10,
).map(lambda args: multibulk(*args))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.one_of(st.binary(max_size=400), peer_tokens, st.lists(px_commands, max_size=4).map(b"".join)),
    authenticated=st.booleans(),
)
def test_garbage_on_peer_port(shared: Cluster, data: bytes, authenticated: bool) -> None:
    before = link_state(shared)
    node = shared.node(2)
    prefix = peer_login(shared, 3, 2) if authenticated else b""
    got = converse(node.peer_port, prefix + data, close_write=True)
    if authenticated:
        assert got.startswith(b"+OK\r\n")
    else:
        # Without the secret: nothing but PONGs, then at most one error (the link is then closed).
        assert re.fullmatch(rb"(\+PONG\r\n)*(-[^\r\n]*\r\n)?", got), got[:300]
    assert_serving(shared, 2)
    assert_links_unchanged(shared, before)


# ---- client port: structured but wrong RESP ----------------------------------------------------

WORDS = [b"PING", b"ECHO", b"GET", b"MGET", b"EXISTS", b"SETONCE", b"SETNX", b"INFO", b"SELECT", b"k", b"0", b"x"]


def _bulk(body: bytes, delta: int) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(body) + delta, body)


resp_leaf = st.one_of(
    st.builds(_bulk, st.sampled_from(WORDS) | st.binary(max_size=10), st.just(0)),  # a correct bulk
    st.builds(_bulk, st.sampled_from(WORDS), st.integers(-6, 6)),  # a bulk whose length lies
    st.integers(-(2**70), 2**70).map(lambda i: b":%d\r\n" % i),  # an integer where a bulk belongs
    st.sampled_from([b"+OK\r\n", b"-ERR x\r\n", b"$-1\r\n", b"*-1\r\n", b"_\r\n", b"#t\r\n", b",1.5\r\n"]),
    st.sampled_from([b"$8388609\r\n", b"$100000000\r\n", b"$99999999999999999999\r\n", b"$-2\r\n"]),
    st.sampled_from([b"*2147483648\r\n", b"*-5\r\n", b"*99999999999999999999\r\n", b"%1\r\n", b">2\r\n"]),
)
resp_values = st.recursive(
    resp_leaf,
    lambda children: st.tuples(st.lists(children, max_size=4), st.integers(-2, 2)).map(
        lambda t: b"*%d\r\n" % (len(t[0]) + t[1]) + b"".join(t[0])
    ),
    max_leaves=12,
)
deep_arrays = st.integers(1, 3000).map(lambda depth: b"*1\r\n" * depth + b"$4\r\nPING\r\n")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(st.one_of(resp_values, deep_arrays), min_size=1, max_size=5), node_id=st.integers(1, 3))
def test_structured_wrong_resp_on_client_port(shared: Cluster, values: list[bytes], node_id: int) -> None:
    node = shared.node(node_id)
    got = converse(node.port, b"".join(values), close_write=True)
    # Whatever the node answered is well-formed RESP, and a protocol error is its last word.
    reader = hiredis.Reader()
    reader.feed(got)
    replies: list[object] = []
    for _ in range(len(got) + 1):
        r = reader.gets()
        if r is False:
            break
        replies.append(r)
    assert not reader.has_data(), f"a partial reply at the end: {got[-300:]!r}"
    errors = [i for i, r in enumerate(replies) if isinstance(r, hiredis.ReplyError) and "Protocol error" in str(r)]
    assert errors in ([], [len(replies) - 1]), replies[-5:]
    assert_serving(shared, node_id)


# ---- slow clients ------------------------------------------------------------------------------

SLOW_CLIENTS = 200
SLOW_PEERS = 30  # the peer port accepts 8 x members + 16 connections (40 here)
SLOW_ROUNDS = 12


def test_slowloris_on_both_ports(shared: Cluster, links: dict[tuple[int, int], str]) -> None:
    """200 clients and 50 would-be peers each dribble one byte per round; everyone else is served."""
    node = shared.node(1)
    run = uuid.uuid4().hex[:8].encode()
    commands = [multibulk(b"SETONCE", b"slow:%s:%d" % (run, i), b"v%d" % i) for i in range(SLOW_CLIENTS)]
    peer_hello = handshake(shared, 2).hello(b"2", b"1", b"x" * 40)
    clients = open_many(node.port, SLOW_CLIENTS)
    peers = open_many(node.peer_port, SLOW_PEERS)
    try:
        for s in clients + peers:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peak = 0
        for step in range(SLOW_ROUNDS):
            for i, s in enumerate(clients):
                s.sendall(commands[i][step : step + 1])
            for s in peers:
                s.sendall(peer_hello[step : step + 1])
            # Meanwhile the node serves everyone else, and its peer links stay up.
            with shared.client(1, protocol=2) as r:
                assert r.ping()
                key = b"slow:other:%s:%d" % (run, step)
                assert r.execute_command("SETONCE", key, b"w") in (b"OK", True)
            with shared.client(2, protocol=2) as r:
                assert r.get(key) == b"w"
            assert int(str(info(shared, 1, "paxos")["peers_up"])) == 2
            peak = max(peak, vm_rss_kb(node.pid))
            time.sleep(0.03)
        assert peak < RSS_BOUND_KB, f"VmRSS reached {peak} kB with {SLOW_CLIENTS + SLOW_PEERS} slow connections"
        # The slow clients finish their commands and are answered.
        for i, s in enumerate(clients):
            s.sendall(commands[i][SLOW_ROUNDS:])
        for s in clients:
            assert recv_exactly(s, 5) == b"+OK\r\n"
        for s in peers:
            s.sendall(peer_hello[SLOW_ROUNDS:])
        for s in peers:
            assert read_to_eof(s) == WRONG_SECRET
    finally:
        close_all(clients + peers)
    with shared.client(3, protocol=2) as r:
        assert r.get(b"slow:%s:%d" % (run, SLOW_CLIENTS - 1)) == b"v%d" % (SLOW_CLIENTS - 1)
    assert_serving(shared, 1)


# ---- many connections --------------------------------------------------------------------------

MANY = 2000


def test_two_thousand_connections_are_all_served(shared: Cluster) -> None:
    require_nofile(MANY + 1024)
    node = shared.node(2)
    socks = open_many(node.port, MANY)
    try:
        for i, s in enumerate(socks):
            s.sendall(b"ECHO c%d\r\n" % i)
        for i, s in enumerate(socks):
            want = b"$%d\r\nc%d\r\n" % (len(b"c%d" % i), i)
            assert recv_exactly(s, len(want)) == want
        assert int(str(info(shared, 2, "clients")["connected_clients"])) >= MANY
        assert_serving(shared, 2)
    finally:
        close_all(socks)
    deadline = time.monotonic() + IO_LIMIT_S
    while int(str(info(shared, 2, "clients")["connected_clients"])) > 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert int(str(info(shared, 2, "clients")["connected_clients"])) <= 5
    assert node.running()


@pytest.fixture
def small_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A cluster whose nodes accept at most 100 client connections each."""
    c = Cluster(tmp_path, extra_args=["--maxclients", "100"])
    try:
        c.start()
        c.wait_peers()
        yield c
    finally:
        c.close()


def _served_or_refused(socks: list[socket.socket]) -> Counter[str]:
    """Send PING on every connection; classify each as served (+PONG) or refused (exact Redis text)."""
    outcome: Counter[str] = Counter()
    for s in socks:
        send_quietly(s, b"PING\r\n")
    for s in socks:
        first = recv_exactly(s, 1)
        if first == b"+":
            assert recv_exactly(s, 6) == b"PONG\r\n"
            outcome["served"] += 1
        else:
            got = first + read_to_eof(s)
            assert got == MAX_CLIENTS, got
            outcome["refused"] += 1
    return outcome


def test_maxclients_refuses_with_redis_text(small_cluster: Cluster) -> None:
    require_nofile(1024)
    node = small_cluster.node(1)
    socks = open_many(node.port, 300)
    try:
        outcome = _served_or_refused(socks)
    finally:
        close_all(socks)
    # The limit counts every connection, so between 90 and 100 of ours got in (some slots may
    # still be held by the harness's own clients).
    assert 90 <= outcome["served"] <= 100 and outcome["refused"] == 300 - outcome["served"], outcome
    assert node.running()
    deadline = time.monotonic() + IO_LIMIT_S
    while time.monotonic() < deadline:
        try:
            if int(str(info(small_cluster, 1, "clients")["connected_clients"])) <= 1:
                break
        except redis.ConnectionError:
            pass  # refused: the node has not yet seen all of our connections close
        time.sleep(0.05)
    assert int(str(info(small_cluster, 1, "stats")["rejected_connections"])) >= outcome["refused"]
    assert_serving(small_cluster, 1)
    # Room again: a fresh batch is served up to the limit, never beyond it.
    socks = open_many(node.port, 150)
    try:
        again = _served_or_refused(socks)
    finally:
        close_all(socks)
    assert 90 <= again["served"] <= 100 and again["refused"] == 150 - again["served"], again
    assert node.running()


_LOW_NOFILE = 256
_WRAP_NOFILE = (
    "import os, resource, sys; "
    f"resource.setrlimit(resource.RLIMIT_NOFILE, ({_LOW_NOFILE}, {_LOW_NOFILE})); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


@dataclass
class LowFdCluster(Cluster):
    """Node 1 runs with RLIMIT_NOFILE 256 (and the default maxclients, 10000); the same PID."""

    low: set[int] = field(default_factory=lambda: {1})

    def command(self, n: Node) -> list[str]:
        cmd = super().command(n)
        return [sys.executable, "-c", _WRAP_NOFILE, *cmd] if n.node_id in self.low else cmd


def test_connections_beyond_the_descriptor_limit_are_refused_cleanly(tmp_path: Path) -> None:
    c = LowFdCluster(tmp_path)
    try:
        c.start()
        c.wait_peers()
        with c.client(1, protocol=2) as control:
            assert control.ping()
            socks = open_many(c.node(1).port, 400)
            try:
                outcome: Counter[str] = Counter()
                for s in socks:
                    send_quietly(s, b"PING\r\n")
                for s in socks:
                    got = _first_reply(s)
                    outcome[got.decode("utf-8", "replace")] += 1
                writes = [control.execute_command("SETONCE", f"lowfd:{i}", "v") for i in range(3)]
                alarms = int(str(control.info("paxos")["alarms"]))
            finally:
                close_all(socks)
        assert c.node(1).running()
        assert set(outcome) <= {"+PONG\r\n", MAX_CLIENTS.decode()}, outcome
        assert all(w in (b"OK", True) for w in writes) and alarms == 0, (writes, alarms)
    finally:
        c.close()


def _first_reply(s: socket.socket) -> bytes:
    """The first line the server sends, or b"<closed>" if it closes without a word."""
    buf = bytearray()
    deadline = time.monotonic() + IO_LIMIT_S
    while not buf.endswith(b"\r\n"):
        left = deadline - time.monotonic()
        assert left > 0, bytes(buf)
        s.settimeout(left)
        try:
            chunk = s.recv(1)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return bytes(buf) or b"<closed>"
        buf += chunk
    return bytes(buf)


# ---- huge declared lengths ---------------------------------------------------------------------


def test_huge_declared_bulk_is_rejected_from_its_header(shared: Cluster) -> None:
    node = shared.node(3)
    rss_before = vm_rss_kb(node.pid)
    header = b"*3\r\n$7\r\nSETONCE\r\n$4\r\nhuge\r\n$100000000\r\n"
    socks = open_many(node.port, 20)
    try:
        for s in socks:
            s.sendall(header)
        for s in socks:
            # Answered before a single payload byte was sent.
            assert recv_exactly(s, len(PROTO_BULK)) == PROTO_BULK
        for _ in range(5):  # then the payload, slowly: nobody reads it
            for s in socks:
                send_quietly(s, b"x" * 1000)
            time.sleep(0.02)
        for s in socks:
            assert read_to_eof(s) == b""
    finally:
        close_all(socks)
    with socket.create_connection((HOST, node.peer_port), timeout=IO_LIMIT_S) as s:
        s.sendall(b"*4\r\n$10\r\nPEER.HELLO\r\n$100000000\r\n")
        assert recv_exactly(s, len(PROTO_BULK)) == PROTO_BULK
        send_quietly(s, b"x" * 1000)
        assert read_to_eof(s) == b""
    assert vm_rss_kb(node.pid) < max(RSS_BOUND_KB, rss_before + 32 * 1024)
    with shared.client(3, protocol=2) as r:
        assert r.get("huge") is None
    assert_serving(shared, 3)


PREAUTH_CONNECTIONS = 24
PREAUTH_BOUND_KB = 64 * 1024


def test_unauthenticated_peer_connections_cannot_grow_the_node(shared: Cluster) -> None:
    node = shared.node(3)
    with shared.client(3, protocol=2) as r:
        config = r.config_get("proto-max-bulk-len")
    assert isinstance(config, dict)
    max_bulk = int(next(iter(config.values())))
    rss_before = vm_rss_kb(node.pid)
    socks = open_many(node.peer_port, PREAUTH_CONNECTIONS)
    grown_kb = 0
    try:
        for s in socks:
            s.settimeout(2.0)
            try:
                # A "secret" as long as the parser allows, all but its last byte.
                s.sendall(b"*5\r\n$10\r\nPEER.HELLO\r\n$%d\r\n" % max_bulk)
                s.sendall(b"s" * (max_bulk - 1))
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                pass  # refused, or the node stopped reading: both keep it small
        # Let the node take up what was sent: watch until it grows past the bound (bounded wait).
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and grown_kb < PREAUTH_BOUND_KB:
            grown_kb = max(grown_kb, vm_rss_kb(node.pid) - rss_before)
            time.sleep(0.05)
        assert node.running()
        assert_serving(shared, 3)
    finally:
        close_all(socks)
    assert grown_kb < PREAUTH_BOUND_KB, (
        f"{PREAUTH_CONNECTIONS} unauthenticated peer-port connections grew VmRSS by {grown_kb} kB"
    )

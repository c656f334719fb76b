"""Hostile and broken input against real nodes: the peer port, the client port, slow and many
connections, and huge declared lengths.

Each test ends by checking that the node it attacked is still the node it was: the process is
alive, answers PING, writes and reads through it still work, and (for the peer port) its real
peer links never went down. The peer handshake is a challenge-response (PEER.HELLO, +CHALLENGE,
PEER.AUTH, +OK; see respreg/peer.py): tests that need it completed do it interactively, checking
the node's proof, before sending their payload. Every loop is bounded in count and in time; every
process is started by :class:`tests.cluster.Cluster` and ended by its PID.
"""

from __future__ import annotations

import os
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
from typing import Literal

import hiredis
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from respreg.peer import handshake_mac
from respreg.storage import META_NAME, NodeMeta

from .cluster import HOST, Cluster, Node, multibulk, read_to_eof, recv_exactly, running

IO_LIMIT_S = 15.0
#: A generous bound on a node's resident memory; an idle node uses about 30 MB.
RSS_BOUND_KB = 300 * 1024

PROTO_BULK = b"-ERR Protocol error: invalid bulk length\r\n"
PROTO_MBULK = b"-ERR Protocol error: invalid multibulk length\r\n"
NESTED = b"-ERR Protocol error: expected '$', got '*'\r\n"
NOT_A_PEER = b"-NOAUTH this is a respreg peer port: clients belong on the client port\r\n"
WRONG_SECRET = b"-NOAUTH peer authentication failed: wrong cluster secret\r\n"
SHORT_NONCE = b"-ERR peer handshake needs a 16-byte nonce\r\n"
MALFORMED_PX = b"-ERR Protocol error: malformed peer request\r\n"
UNKNOWN_PEER_CMD = b"-ERR Protocol error: unknown peer command\r\n"
MAX_CLIENTS = b"-ERR max number of clients reached\r\n"


# ---- helpers -----------------------------------------------------------------------------------


def send_quietly(sock: socket.socket, data: bytes) -> None:
    """Send, tolerating a server that already closed (it may answer and close before reading all)."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


def read_line(sock: socket.socket, limit_s: float = IO_LIMIT_S) -> bytes:
    """One reply line, read a byte at a time so that nothing after it is consumed."""
    buf = bytearray()
    deadline = time.monotonic() + limit_s
    while not buf.endswith(b"\r\n"):
        left = deadline - time.monotonic()
        if left <= 0 or len(buf) > 4096:
            raise AssertionError(f"no reply line after {limit_s}s: {bytes(buf[-200:])!r}")
        sock.settimeout(left)
        chunk = sock.recv(1)
        if not chunk:
            raise AssertionError(f"connection closed after {bytes(buf)!r}")
        buf += chunk
    return bytes(buf)


def finish(sock: socket.socket, data: bytes, close_write: bool = False) -> bytes:
    """Send ``data`` on ``sock`` and return everything received until the server closes."""
    send_quietly(sock, data)
    if close_write:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    return read_to_eof(sock)


def converse(port: int, data: bytes, close_write: bool = False) -> bytes:
    """Send ``data`` on a new connection and return everything received until the server closes."""
    with socket.create_connection((HOST, port), timeout=IO_LIMIT_S) as s:
        return finish(s, data, close_write)


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
    with running(tmp_path_factory.mktemp("fuzz-cluster"), deadline_ms=10_000) as c:
        yield c


@pytest.fixture
def links(shared: Cluster) -> Iterator[dict[tuple[int, int], str]]:
    """The peer links as they were before the test; afterwards they must be the same."""
    before = link_state(shared)
    yield before
    assert_links_unchanged(shared, before)


# ---- peer port: the handshake ------------------------------------------------------------------

CHALLENGE_LINE = re.compile(rb"\+CHALLENGE ([0-9a-f]{32}) ([0-9a-f]{64})\r\n")


@dataclass
class Dialer:
    """One side of a peer handshake: node ``sender`` opening a link to node ``target``.

    Holds the cluster secret, the sender's identity (from its node.meta), this attempt's nonce,
    and, once the node answered PEER.HELLO, the node's nonce."""

    secret: bytes
    identity: bytes
    sender: bytes
    target: bytes
    nonce: bytes = field(default_factory=lambda: os.urandom(16))
    server_nonce: bytes = b""

    def hello(
        self,
        sender: bytes | None = None,
        target: bytes | None = None,
        *,
        identity: bytes | None = None,
        nonce: bytes | None = None,
        more: tuple[bytes, ...] = (),
    ) -> bytes:
        """``PEER.HELLO <from> <to> <identity-hex> <nonce-hex>``; ``identity`` and ``nonce``
        override the hex text sent."""
        return multibulk(
            b"PEER.HELLO",
            self.sender if sender is None else sender,
            self.target if target is None else target,
            self.identity.hex().encode() if identity is None else identity,
            self.nonce.hex().encode() if nonce is None else nonce,
            *more,
        )

    def inline_hello(self) -> bytes:
        return b"PEER.HELLO %s %s %s %s\r\n" % (
            self.sender,
            self.target,
            self.identity.hex().encode(),
            self.nonce.hex().encode(),
        )

    def take_challenge(self, line: bytes) -> None:
        """Parse the node's ``+CHALLENGE`` and check its proof that it knows the cluster secret."""
        m = CHALLENGE_LINE.fullmatch(line)
        assert m, f"not a challenge: {line!r}"
        self.server_nonce = bytes.fromhex(m[1].decode("ascii"))
        want = handshake_mac(self.secret, b"S", self.sender, self.target, self.nonce, self.server_nonce)
        assert m[2] == want.hex().encode(), "the node's proof of the cluster secret does not check out"

    def proof(
        self,
        *,
        secret: bytes | None = None,
        role: bytes = b"C",
        link: tuple[bytes, bytes] | None = None,
        fields: tuple[bytes, ...] | None = None,
    ) -> bytes:
        """The dialer's mac, hex: by default the right one; each keyword replaces one ingredient."""
        sender, target = (self.sender, self.target) if link is None else link
        parts = (self.identity, self.nonce, self.server_nonce) if fields is None else fields
        return handshake_mac(self.secret if secret is None else secret, role, sender, target, *parts).hex().encode()

    def auth(self, mac: bytes | None = None, *, secret: bytes | None = None) -> bytes:
        """``PEER.AUTH <mac-hex>``: the given mac text, or the proof under ``secret`` (default the right one)."""
        return multibulk(b"PEER.AUTH", self.proof(secret=secret) if mac is None else mac)


def handshake(cluster: Cluster, sender: int, target: int) -> Dialer:
    """A fresh dialer for node ``sender``'s link to node ``target``, knowing the right secret."""
    meta = NodeMeta.decode((cluster.node(sender).data_dir / META_NAME).read_bytes())
    assert len(meta.identity) == 16, meta
    return Dialer(cluster.secret.encode(), meta.identity, b"%d" % sender, b"%d" % target)


def challenge(sock: socket.socket, d: Dialer, inline: bool = False) -> None:
    """Send PEER.HELLO and take the node's challenge (checking its proof)."""
    sock.sendall(d.inline_hello() if inline else d.hello())
    d.take_challenge(read_line(sock))


def authenticate(sock: socket.socket, d: Dialer) -> None:
    """The full handshake, interactively: HELLO, CHALLENGE, AUTH, +OK."""
    challenge(sock, d)
    sock.sendall(d.auth())
    assert read_line(sock) == b"+OK\r\n"


def peer_session(cluster: Cluster, sender: int, target: int) -> socket.socket:
    """A connection to node ``target``'s peer port, authenticated as node ``sender``."""
    sock = socket.create_connection((HOST, cluster.node(target).peer_port), timeout=IO_LIMIT_S)
    try:
        authenticate(sock, handshake(cluster, sender, target))
    except BaseException:
        sock.close()
        raise
    return sock


def _not_member(sender: bytes, target: bytes) -> bytes:
    return b"-ERR peer handshake names %s -> %s, not a member link to node 1\r\n" % (
        repr(sender).encode(),
        repr(target).encode(),
    )


# ---- peer port: non-peers are refused and disconnected -----------------------------------------

Stage = Literal["fresh", "challenged", "authenticated"]


@dataclass(frozen=True)
class PeerCase:
    id: str
    data: Callable[[Dialer], bytes]  # what a would-be peer (as node 2) sends to node 1's peer port
    reply: bytes  # everything node 1 sends after the handshake steps, until it closes the connection
    # What happens first on the connection: nothing ("fresh"); a correct PEER.HELLO answered by a
    # checked +CHALLENGE ("challenged"); or the full handshake ending in +OK ("authenticated").
    stage: Stage = "fresh"
    inline: bool = False  # the PEER.HELLO of the "challenged" stage is an inline command


def _static(data: bytes) -> Callable[[Dialer], bytes]:
    return lambda _d: data


def _hex(data: bytes) -> bytes:
    return data.hex().encode()


PEER_CASES: list[PeerCase] = [
    # Before any handshake.
    PeerCase("client-command", _static(b"GET key\r\n"), NOT_A_PEER),
    PeerCase("client-multibulk", _static(multibulk(b"SETONCE", b"k", b"v")), NOT_A_PEER),
    PeerCase("px-without-hello", _static(multibulk(b"PX", b"1", b"R", b"k")), NOT_A_PEER),
    PeerCase("auth-before-hello", lambda d: d.auth(), NOT_A_PEER),
    PeerCase("auth-before-hello-then-hello", lambda d: d.auth() + d.hello(), NOT_A_PEER),
    PeerCase("hello-without-arguments", _static(multibulk(b"PEER.HELLO")), NOT_A_PEER),
    PeerCase("hello-missing-target", _static(multibulk(b"PEER.HELLO", b"2")), NOT_A_PEER),
    PeerCase("hello-missing-nonce", lambda d: multibulk(b"PEER.HELLO", b"2", b"1", _hex(d.identity)), NOT_A_PEER),
    PeerCase("hello-extra-argument", lambda d: d.hello(more=(b"x",)), NOT_A_PEER),
    PeerCase(
        "old-one-step-hello-with-the-secret",
        lambda d: multibulk(b"PEER.HELLO", d.secret, b"2", b"1", _hex(d.identity)),
        _not_member(b"test-cluster-secret", b"2"),
    ),
    PeerCase("unknown-sender", lambda d: d.hello(b"99", b"1"), _not_member(b"99", b"1")),
    PeerCase("sender-zero", lambda d: d.hello(b"0", b"1"), _not_member(b"0", b"1")),
    PeerCase("sender-is-the-node-itself", lambda d: d.hello(b"1", b"1"), _not_member(b"1", b"1")),
    PeerCase("link-meant-for-another-node", lambda d: d.hello(b"2", b"3"), _not_member(b"2", b"3")),
    PeerCase("ids-not-numbers", lambda d: d.hello(b"two", b"one"), _not_member(b"two", b"one")),
    PeerCase("sender-id-leading-zero", lambda d: d.hello(sender=b"02"), _not_member(b"02", b"1")),
    PeerCase("sender-id-with-space", lambda d: d.hello(sender=b" 2"), _not_member(b" 2", b"1")),
    PeerCase("identity-empty", lambda d: d.hello(identity=b""), _not_member(b"2", b"1")),
    PeerCase("identity-not-hex", lambda d: d.hello(identity=b"zz"), _not_member(b"2", b"1")),
    # (the node blames the ids for a nonce that is not hex: the same error path)
    PeerCase("nonce-not-hex", lambda d: d.hello(nonce=b"n" * 32), SHORT_NONCE),
    PeerCase("nonce-empty", lambda d: d.hello(nonce=b""), SHORT_NONCE),
    PeerCase("nonce-15-bytes", lambda d: d.hello(nonce=_hex(d.nonce[:15])), SHORT_NONCE),
    PeerCase("nonce-17-bytes", lambda d: d.hello(nonce=_hex(d.nonce + b"x")), SHORT_NONCE),
    PeerCase("nonce-then-auth-in-one-packet", lambda d: d.hello(nonce=b"00") + d.auth(), SHORT_NONCE),
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
    # PEER.HELLO answered: only a PEER.AUTH with the right proof (or PING) is acceptable now.
    PeerCase("wrong-secret", lambda d: d.auth(secret=b"not-the-secret"), WRONG_SECRET, "challenged"),
    PeerCase("empty-secret", lambda d: d.auth(secret=b""), WRONG_SECRET, "challenged"),
    PeerCase("secret-prefix", lambda d: d.auth(secret=d.secret[:-1]), WRONG_SECRET, "challenged"),
    PeerCase("secret-plus-a-byte", lambda d: d.auth(secret=d.secret + b"x"), WRONG_SECRET, "challenged"),
    PeerCase("secret-different-case", lambda d: d.auth(secret=d.secret.upper()), WRONG_SECRET, "challenged"),
    PeerCase(
        "inline-hello-wrong-secret",
        lambda d: b"PEER.AUTH %s\r\n" % d.proof(secret=b"nope"),
        WRONG_SECRET,
        "challenged",
        inline=True,
    ),
    PeerCase(
        "wrong-secret-then-px",
        lambda d: d.auth(secret=b"x") + multibulk(b"PX", b"1", b"R", b"k"),
        WRONG_SECRET,
        "challenged",
    ),
    PeerCase(
        "ping-then-wrong-secret",
        lambda d: multibulk(b"PING") + d.auth(secret=b"x"),
        b"+PONG\r\n" + WRONG_SECRET,
        "challenged",
    ),
    PeerCase(
        "proof-for-another-identity",
        lambda d: d.auth(d.proof(fields=(os.urandom(16), d.nonce, d.server_nonce))),
        WRONG_SECRET,
        "challenged",
    ),
    PeerCase(
        "proof-without-the-identity",
        lambda d: d.auth(d.proof(fields=(d.nonce, d.server_nonce))),
        WRONG_SECRET,
        "challenged",
    ),
    PeerCase(
        "proof-with-swapped-nonces",
        lambda d: d.auth(d.proof(fields=(d.identity, d.server_nonce, d.nonce))),
        WRONG_SECRET,
        "challenged",
    ),
    PeerCase("proof-for-another-link", lambda d: d.auth(d.proof(link=(b"3", b"1"))), WRONG_SECRET, "challenged"),
    PeerCase("proof-in-the-nodes-role", lambda d: d.auth(d.proof(role=b"S")), WRONG_SECRET, "challenged"),
    PeerCase(
        "the-nodes-own-proof-reflected",
        lambda d: d.auth(d.proof(role=b"S", fields=(d.nonce, d.server_nonce))),
        WRONG_SECRET,
        "challenged",
    ),
    PeerCase("proof-truncated", lambda d: d.auth(d.proof()[:-1]), WRONG_SECRET, "challenged"),
    PeerCase("proof-empty", lambda d: d.auth(b""), WRONG_SECRET, "challenged"),
    PeerCase("proof-not-hex", lambda d: d.auth(b"z" * 64), WRONG_SECRET, "challenged"),
    PeerCase("auth-without-proof", _static(multibulk(b"PEER.AUTH")), NOT_A_PEER, "challenged"),
    PeerCase("auth-extra-argument", lambda d: multibulk(b"PEER.AUTH", d.proof(), b"x"), NOT_A_PEER, "challenged"),
    PeerCase("second-hello-after-challenge", lambda d: d.hello(), NOT_A_PEER, "challenged"),
    PeerCase("second-hello-with-a-new-nonce", lambda d: d.hello(nonce=_hex(os.urandom(16))), NOT_A_PEER, "challenged"),
    PeerCase("px-after-challenge", _static(multibulk(b"PX", b"1", b"R", b"k")), NOT_A_PEER, "challenged"),
    PeerCase("client-command-after-challenge", _static(b"GET k\r\n"), NOT_A_PEER, "challenged"),
    PeerCase(
        "huge-bulk-after-challenge", _static(b"*2\r\n$9\r\nPEER.AUTH\r\n$100000000\r\n"), PROTO_BULK, "challenged"
    ),
    PeerCase(
        "proof-beyond-the-preauth-bulk-limit",
        _static(b"*2\r\n$9\r\nPEER.AUTH\r\n$1025\r\n"),
        PROTO_BULK,
        "challenged",
    ),
    PeerCase("too-many-arguments-after-challenge", _static(b"*17\r\n"), PROTO_MBULK, "challenged"),
    # Authenticated: anything but a well-formed PX or PING ends the link.
    PeerCase(
        "px-request-id-not-a-number", _static(multibulk(b"PX", b"abc", b"R", b"k")), MALFORMED_PX, "authenticated"
    ),
    PeerCase("px-unknown-kind", _static(multibulk(b"PX", b"1", b"Z", b"k")), MALFORMED_PX, "authenticated"),
    PeerCase(
        "px-prepare-missing-ballot-part",
        _static(multibulk(b"PX", b"1", b"P", b"k", b"1", b"2")),
        MALFORMED_PX,
        "authenticated",
    ),
    PeerCase(
        "px-prepare-extra-field",
        _static(multibulk(b"PX", b"1", b"P", b"k", b"1", b"2", b"3", b"4")),
        MALFORMED_PX,
        "authenticated",
    ),
    PeerCase(
        "px-ballot-not-a-number",
        _static(multibulk(b"PX", b"1", b"P", b"k", b"one", b"2", b"3")),
        MALFORMED_PX,
        "authenticated",
    ),
    PeerCase(
        "px-accept-missing-value",
        _static(multibulk(b"PX", b"1", b"A", b"k", b"1", b"2", b"3", b"pid")),
        MALFORMED_PX,
        "authenticated",
    ),
    PeerCase("px-read-extra-field", _static(multibulk(b"PX", b"1", b"R", b"k", b"x")), MALFORMED_PX, "authenticated"),
    PeerCase(
        "px-learn-missing-value", _static(multibulk(b"PX", b"0", b"L", b"k", b"pid")), MALFORMED_PX, "authenticated"
    ),
    PeerCase(
        "px-ballot-has-4301-digits",
        _static(multibulk(b"PX", b"1", b"P", b"k", b"9" * 4301, b"2", b"3")),
        MALFORMED_PX,
        "authenticated",
    ),
    PeerCase("px-too-short", _static(multibulk(b"PX", b"1", b"R")), UNKNOWN_PEER_CMD, "authenticated"),
    PeerCase("unknown-command", _static(multibulk(b"FLUSHALL")), UNKNOWN_PEER_CMD, "authenticated"),
    PeerCase("client-command-after-handshake", _static(b"GET k\r\n"), UNKNOWN_PEER_CMD, "authenticated"),
    PeerCase("second-hello", lambda d: d.hello(), UNKNOWN_PEER_CMD, "authenticated"),
    PeerCase("second-auth", lambda d: d.auth(), UNKNOWN_PEER_CMD, "authenticated"),
    PeerCase(
        "huge-bulk-after-handshake",
        _static(b"*8\r\n$2\r\nPX\r\n$1\r\n1\r\n$1\r\nA\r\n$100000000\r\n"),
        PROTO_BULK,
        "authenticated",
    ),
    PeerCase("too-many-arguments-after-handshake", _static(b"*17\r\n"), PROTO_MBULK, "authenticated"),
    PeerCase("deeply-nested-after-handshake", _static(b"*1\r\n" * 10_000), NESTED, "authenticated"),
    PeerCase(
        "binary-garbage-after-handshake",
        _static(b"\x00\xff\xfe\x80garbage\x01\r\n"),
        UNKNOWN_PEER_CMD,
        "authenticated",
    ),
]


def open_stage(sock: socket.socket, d: Dialer, stage: Stage, inline: bool = False) -> None:
    """Bring a fresh connection to ``stage`` of the handshake, interactively."""
    if stage == "challenged":
        challenge(sock, d, inline)
    elif stage == "authenticated":
        authenticate(sock, d)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in PEER_CASES])
def test_non_peer_on_peer_port_is_refused_and_disconnected(
    shared: Cluster, links: dict[tuple[int, int], str], case: PeerCase
) -> None:
    node = shared.node(1)
    d = handshake(shared, 2, 1)
    with socket.create_connection((HOST, node.peer_port), timeout=IO_LIMIT_S) as s:
        open_stage(s, d, case.stage, case.inline)
        got = finish(s, case.data(d))  # read_to_eof: the node must close the link
    assert got == case.reply
    assert_serving(shared, 1)


def test_a_recorded_handshake_does_not_open_another_link(shared: Cluster, links: dict[tuple[int, int], str]) -> None:
    """An eavesdropper replays a whole successful handshake on a new connection: the node's new
    nonce makes the recorded PEER.AUTH worthless."""
    node = shared.node(1)
    d = handshake(shared, 2, 1)
    with socket.create_connection((HOST, node.peer_port), timeout=IO_LIMIT_S) as s:
        authenticate(s, d)
        hello, auth, first_nonce = d.hello(), d.auth(), d.server_nonce
    with socket.create_connection((HOST, node.peer_port), timeout=IO_LIMIT_S) as s:
        s.sendall(hello)
        d.take_challenge(read_line(s))  # the node proves itself again, over its new nonce
        assert d.server_nonce != first_nonce
        got = finish(s, auth)
    assert got == WRONG_SECRET
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
    # Also between the challenge and PEER.AUTH: PING is answered, silence waits.
    d = handshake(shared, 2, 1)
    with socket.create_connection((HOST, node.peer_port), timeout=IO_LIMIT_S) as s:
        challenge(s, d)
        s.sendall(b"PING\r\n")
        assert recv_exactly(s, 7) == b"+PONG\r\n"
        s.settimeout(0.2)
        with pytest.raises(TimeoutError):
            s.recv(1)
        s.sendall(d.auth())
        assert read_line(s) == b"+OK\r\n"
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
    before = info(shared, 1, "persistence")["fsync_errors"], info(shared, 1, "paxos")["alarms"]
    run = uuid.uuid4().hex.encode()
    # One packet: a prepare at ballot 2**63 for one key, and a well-formed prepare for another.
    data = multibulk(b"PX", b"1", b"P", b"fuzz:bigballot:" + run, b"%d" % 2**63, b"2", b"1") + multibulk(
        b"PX", b"2", b"P", b"fuzz:innocent:" + run, b"1", b"2", b"1"
    )
    replies: list[object] = []
    with peer_session(shared, 2, 1) as s:
        s.sendall(data)
        reader = hiredis.Reader()
        for _ in range(2):
            replies.append(_px_reply(s, reader))
            if replies[-1] == b"<closed>":
                break
    after = info(shared, 1, "persistence")["fsync_errors"], info(shared, 1, "paxos")["alarms"]
    refused = [r for r in replies if isinstance(r, list) and r[1] == b"X"]
    assert not refused and after == before, f"replies {replies!r}; fsync_errors, alarms {before} -> {after}"


def test_px_learn_with_a_request_id_is_malformed(shared: Cluster, links: dict[tuple[int, int], str]) -> None:
    key = b"fuzz:learn-id:" + uuid.uuid4().hex.encode()
    with peer_session(shared, 2, 1) as s:
        got = finish(s, multibulk(b"PX", b"7", b"L", key, b"pid", b"v"), close_write=True)
    assert got == MALFORMED_PX


ImpostorMode = Literal["ok", "challenge", "challenge-and-ok", "garbled-challenge"]


class Impostor:
    """Listens on a stopped node's peer address and answers like a peer, but without the secret.

    To PEER.HELLO it answers, by ``mode``: "ok" +OK at once; "challenge" a +CHALLENGE whose mac
    is made with a guessed secret (and +OK to any PEER.AUTH); "challenge-and-ok" that challenge
    and +OK in one write; "garbled-challenge" a +CHALLENGE that is not hex. +PONG to PING, a read
    with a "chosen" forged value, and a refusal to anything else. Runs in a thread for at most
    ``limit_s``; records every message it received."""

    GUESSED_SECRET = b"guessed-secret"

    def __init__(self, port: int, forged: bytes, mode: ImpostorMode, limit_s: float = 30.0) -> None:
        self.forged = forged
        self.mode = mode
        self.received: list[list[bytes]] = []
        self._stop = threading.Event()
        self._deadline = time.monotonic() + limit_s
        self._srv = socket.socket()
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind((HOST, port))
        self._srv.listen(16)
        self._srv.settimeout(0.05)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def hellos(self) -> list[list[bytes]]:
        return [m for m in self.received if m[0] == b"PEER.HELLO"]

    def _challenge(self, msg: list[bytes]) -> bytes:
        mine = os.urandom(16)
        if self.mode == "garbled-challenge":
            return b"+CHALLENGE %s\r\n" % (b"zz" * 16)
        try:
            nonce = bytes.fromhex(msg[4].decode("ascii"))
            mac = handshake_mac(self.GUESSED_SECRET, b"S", msg[1], msg[2], nonce, mine)
        except (IndexError, ValueError):
            mac = os.urandom(32)
        line = b"+CHALLENGE %s %s\r\n" % (_hex(mine), _hex(mac))
        return line + b"+OK\r\n" if self.mode == "challenge-and-ok" else line

    def _answer(self, msg: list[bytes]) -> bytes:
        self.received.append(msg)
        if msg[0] == b"PEER.HELLO":
            return b"+OK\r\n" if self.mode == "ok" else self._challenge(msg)
        if msg[0] == b"PEER.AUTH":
            return b"+OK\r\n"
        if msg[0] == b"PING":
            return b"+PONG\r\n"
        if msg[0] == b"PX" and len(msg) > 2 and msg[2] == b"R":
            pid = b"\x00\x02" + b"\x00" * 16
            return b"*8\r\n:%s\r\n$1\r\nS\r\n:1\r\n:2\r\n:1\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n:1\r\n" % (
                msg[1],
                len(pid),
                pid,
                len(self.forged),
                self.forged,
            )
        if msg[0] == b"PX" and len(msg) > 1 and msg[1] != b"0":
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
                        if isinstance(msg, list) and msg and all(isinstance(a, bytes) for a in msg):
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


@pytest.mark.parametrize("mode", ["ok", "challenge", "challenge-and-ok", "garbled-challenge"])
def test_impostor_at_a_peer_address_is_not_trusted(tmp_path: Path, mode: ImpostorMode) -> None:
    c = Cluster(tmp_path)
    impostor: Impostor | None = None
    try:
        c.start()
        c.wait_peers()
        c.kill(3, signal.SIGTERM)
        c.kill(2, signal.SIGTERM)
        impostor = Impostor(c.node(2).peer_port, b"forged-by-impostor", mode)
        # Node 1 redials node 2's address (backoff up to 1 s) and meets the impostor, again and
        # again; not once may it count that link up.
        ups: list[int] = []
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and len(impostor.hellos()) < 3:
            ups.append(int(str(info(c, 1, "paxos")["peers_up"])))
            time.sleep(0.02)
        with c.client(1, protocol=2) as r:
            try:
                answer: object = r.get("never-written")
            except redis.ResponseError as exc:
                answer = str(exc)
        ups.append(int(str(info(c, 1, "paxos")["peers_up"])))
        impostor.close()
        received = list(impostor.received)
        up_samples = sum(1 for u in ups if u)
        assert up_samples == 0, (
            f"node 1 counted the impostor's link up ({up_samples}/{len(ups)} samples); sent {received}"
        )
        assert answer != b"forged-by-impostor"
        assert len(impostor.hellos()) >= 3, f"node 1 did not keep dialing the impostor: {received}"
        # The secret never crosses the wire, and node 1 proves nothing to (and asks nothing of) a
        # listener that failed to prove itself.
        secret = c.secret.encode()
        assert not any(secret in arg for m in received for arg in m), received
        assert {m[0] for m in received} == {b"PEER.HELLO"}, received
        if mode in ("challenge", "challenge-and-ok"):
            assert "does not know the cluster secret" in c.node(1).log_path.read_text(errors="replace")
    finally:
        if impostor is not None:
            impostor.close()
        c.close()


# ---- peer port: generated garbage --------------------------------------------------------------

PEER_FRAGMENTS = [
    b"*", b"$", b":", b"+", b"-", b"\r\n", b"\n", b"\r", b"-1", b"0", b"1", b"2", b"3", b"4", b"8", b"17",
    b"99999999999999999999", b"9223372036854775808", b" ", b"\x00", b"\xff", b'"', b"'", b"PEER.HELLO",
    b"PEER.AUTH", b"PX", b"P", b"A", b"R", b"L", b"PING", b"GET", b"k", b"pid", b"value", b"$100000000\r\n",
    b"00112233445566778899aabbccddeeff",
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
    stage=st.sampled_from(["fresh", "challenged", "authenticated"]),
)
def test_garbage_on_peer_port(shared: Cluster, data: bytes, stage: Stage) -> None:
    before = link_state(shared)
    node = shared.node(2)
    d = handshake(shared, 3, 2)
    with socket.create_connection((HOST, node.peer_port), timeout=IO_LIMIT_S) as s:
        open_stage(s, d, stage)
        got = finish(s, data, close_write=True)
    if stage != "authenticated":
        # Without the full handshake: nothing but PONGs, then at most one error (the link is then
        # closed); never a challenge (this garbage holds no well-formed PEER.HELLO) and never +OK.
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
    """200 clients and 30 would-be peers each dribble one byte per round (the peers: of a correct
    PEER.HELLO, then a PEER.AUTH with the wrong secret); everyone else is served."""
    node = shared.node(1)
    run = uuid.uuid4().hex[:8].encode()
    commands = [multibulk(b"SETONCE", b"slow:%s:%d" % (run, i), b"v%d" % i) for i in range(SLOW_CLIENTS)]
    dialers = [handshake(shared, 2, 1) for _ in range(SLOW_PEERS)]
    hellos = [d.hello() for d in dialers]
    clients = open_many(node.port, SLOW_CLIENTS)
    peers = open_many(node.peer_port, SLOW_PEERS)
    try:
        for s in clients + peers:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peak = 0
        for step in range(SLOW_ROUNDS):
            for i, s in enumerate(clients):
                s.sendall(commands[i][step : step + 1])
            for i, s in enumerate(peers):
                s.sendall(hellos[i][step : step + 1])
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
        # The slow peers finish their PEER.HELLO and are challenged; without the secret their
        # PEER.AUTH is refused and the link closed.
        for i, s in enumerate(peers):
            s.sendall(hellos[i][SLOW_ROUNDS:])
        for d, s in zip(dialers, peers, strict=True):
            d.take_challenge(read_line(s))
            s.sendall(d.auth(secret=b"x" * 40))
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
        s.sendall(b"*5\r\n$10\r\nPEER.HELLO\r\n$100000000\r\n")
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
        # Half of the connections first pass PEER.HELLO: a challenged connection is still
        # unauthenticated, and held to the same limits.
        for s in socks[: PREAUTH_CONNECTIONS // 2]:
            challenge(s, handshake(shared, 1, 3))
        for i, s in enumerate(socks):
            s.settimeout(2.0)
            head = b"*2\r\n$9\r\nPEER.AUTH\r\n" if i < PREAUTH_CONNECTIONS // 2 else b"*5\r\n$10\r\nPEER.HELLO\r\n"
            try:
                # A first argument (a proof, or a node id) as long as the client port's parser
                # allows, all but its last byte.
                s.sendall(head + b"$%d\r\n" % max_bulk)
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

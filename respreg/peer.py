"""The peer channel: Paxos messages between nodes, as RESP over persistent TCP connections.

Separate from the client port. Each node dials every other node (a :class:`PeerLink` per peer,
bound to the node's own address, reconnecting with backoff) and serves inbound links with
:class:`PeerServerProtocol`. Requests are multibulk commands; replies are RESP arrays tagged
with the request id, so a reply waiting for an fsync never holds up others.

Wire format (every field a bulk string on the request side)::

    PEER.HELLO <from> <to> <identity-hex> <nonce-hex>   -> +CHALLENGE <nonce-hex> <server-mac-hex>
    PEER.AUTH <client-mac-hex>                          -> +OK, or +REMEMBERS <identity-hex> when the
                                                           receiver knew node <from> under another
                                                           identity; an error closes the link
    (both sides prove they know the cluster secret with HMAC-SHA256 over both nonces; the secret
    itself never crosses the wire)
    PING                                           -> +PONG (heartbeat)
    PX <req> P <key> <round> <node> <inc>          prepare
    PX <req> A <key> <round> <node> <inc> <pid> <value>   accept
    PX <req> R <key>                               read
    PX 0 L <key> <pid> <value>                     learn (no reply)
    PX <req> W <key> <pid> <value> <deadline-ms>   a SETONCE forwarded to the key's owner
    PEER.DUMP <req> <cursor>                       durable states after file name <cursor>, for
                                                   rebuilding an amnesiac member (see server.py)
    PEER.IDENTITY                                  the sender was rebuilt: remember the identity
                                                   of this link's handshake (no reply)

    reply  [req, "P", round, node, inc, acc-round, acc-node, acc-inc, pid|nil, value|nil, chosen]
           [req, "A", round, node, inc]
           [req, "N", round, node, inc, promised-round, promised-node, promised-inc]
           [req, "S", acc-round, acc-node, acc-inc, pid|nil, value|nil, chosen]
           [req, "X", reason]
           [req, "W", CHOSEN|NOQUORUM|UNCERTAIN, pid|nil, value|nil, reason]
           [req, "D", next-cursor|nil, name, key, p-round, p-node, p-inc, a-round, a-node, a-inc,
            pid|nil, value|nil, name, key, ...]
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Callable
from typing import Final, cast

import hiredis

from .core.types import (
    Accept,
    Accepted,
    AcceptorState,
    Ballot,
    Learn,
    Nack,
    NodeId,
    Prepare,
    Promise,
    Proposal,
    Propose,
    Read,
    Refused,
    Reply,
    Request,
    State,
    Unreachable,
    Voted,
    Written,
)
from .resp import ProtocolError, RequestParser, bulk, error

log = logging.getLogger("respreg.peer")

_NOT_ENOUGH = object()


# ---- codec -----------------------------------------------------------------------------------


def handshake_mac(secret: bytes, role: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 of the handshake fields; role b"S" for the answering node, b"C" for the dialer."""
    return hmac.new(secret, b"|".join((role, *parts)), hashlib.sha256).digest()


def _cmd(*parts: bytes) -> bytes:
    return b"*%d\r\n%s" % (len(parts), b"".join(bulk(p) for p in parts))


def _b(b: Ballot) -> tuple[bytes, bytes, bytes]:
    return (b"%d" % b.round, b"%d" % b.node, b"%d" % b.incarnation)


def encode_request(req_id: int, msg: Request) -> bytes:
    rid = b"%d" % req_id
    if isinstance(msg, Prepare):
        return _cmd(b"PX", rid, b"P", msg.key, *_b(msg.ballot))
    if isinstance(msg, Accept):
        notify = (b"%d" % msg.notify,) if msg.notify else ()
        return _cmd(b"PX", rid, b"A", msg.key, *_b(msg.ballot), msg.proposal.pid, msg.proposal.value, *notify)
    if isinstance(msg, Read):
        return _cmd(b"PX", rid, b"R", msg.key)
    if isinstance(msg, Propose):
        return _cmd(b"PX", rid, b"W", msg.key, msg.proposal.pid, msg.proposal.value, b"%d" % msg.deadline_ms)
    if isinstance(msg, Voted):
        return _cmd(b"PX", b"0", b"V", msg.key, *_b(msg.ballot), msg.pid)
    return _cmd(b"PX", b"0", b"L", msg.key, msg.proposal.pid, msg.proposal.value)


_I64_MIN: Final = -(2**63)
_I64_MAX: Final = 2**63 - 1
#: A number written in this many characters or fewer is within 64 bits (|n| < 10**18 < 2**63).
_I64_SHORT: Final = 18


def _i64(text: bytes) -> int:
    value = int(text)
    if len(text) > _I64_SHORT and not _I64_MIN <= value <= _I64_MAX:
        raise ValueError("number out of range")
    return value


def _ballot(args: list[bytes]) -> Ballot:
    # tuple.__new__ is what Ballot(...) runs, without the interpreted __new__ a NamedTuple has.
    return tuple.__new__(Ballot, (_i64(args[0]), _i64(args[1]), _i64(args[2])))


def decode_request(args: list[bytes]) -> tuple[int, Request]:
    """Parse ``PX ...`` arguments (without the ``PX``); raises ValueError on anything malformed.

    Numbers must fit the signed 64-bit fields of the state files; only a learn and a vote have
    request id 0.
    """
    req_id = _i64(args[0])
    kind = args[1]
    key = args[2]
    if (req_id == 0) != (kind in (b"L", b"V")) or req_id < 0:
        raise ValueError("bad request id")
    if kind == b"P" and len(args) == 6:
        return req_id, Prepare(key, _ballot(args[3:6]))
    if kind == b"A" and len(args) in (8, 9):
        notify = _i64(args[8]) if len(args) == 9 else 0
        if len(args) == 9 and notify <= 0:
            raise ValueError("bad node to notify")  # the encoder leaves out a 0
        return req_id, Accept(key, _ballot(args[3:6]), Proposal(args[6], args[7]), notify)
    if kind == b"V" and len(args) == 7:
        return req_id, Voted(key, _ballot(args[3:6]), args[6])
    if kind == b"R" and len(args) == 3:
        return req_id, Read(key)
    if kind == b"L" and len(args) == 5:
        return req_id, Learn(key, Proposal(args[3], args[4]))
    if kind == b"W" and len(args) == 6:
        deadline = _i64(args[5])
        if not 0 < deadline <= 3_600_000:
            raise ValueError("deadline out of range")
        return req_id, Propose(key, Proposal(args[3], args[4]), deadline)
    raise ValueError("malformed PX request")


def _opt(p: Proposal | None) -> bytes:
    if p is None:
        return b"$-1\r\n$-1\r\n"
    return bulk(p.pid) + bulk(p.value)


def _ib(b: Ballot) -> bytes:
    return b":%d\r\n:%d\r\n:%d\r\n" % (b.round, b.node, b.incarnation)


def encode_reply(req_id: int, reply: Reply) -> bytes:
    head = b":%d\r\n" % req_id
    if isinstance(reply, Promise):
        return (
            b"*11\r\n"
            + head
            + b"$1\r\nP\r\n"
            + _ib(reply.ballot)
            + _ib(reply.accepted)
            + _opt(reply.proposal)
            + (b":1\r\n" if reply.chosen else b":0\r\n")
        )
    if isinstance(reply, Accepted):
        return b"*5\r\n" + head + b"$1\r\nA\r\n" + _ib(reply.ballot)
    if isinstance(reply, Nack):
        return b"*8\r\n" + head + b"$1\r\nN\r\n" + _ib(reply.ballot) + _ib(reply.promised)
    if isinstance(reply, State):
        return (
            b"*8\r\n"
            + head
            + b"$1\r\nS\r\n"
            + _ib(reply.accepted)
            + _opt(reply.proposal)
            + (b":1\r\n" if reply.chosen else b":0\r\n")
        )
    if isinstance(reply, Written):
        return (
            b"*6\r\n"
            + head
            + b"$1\r\nW\r\n"
            + bulk(reply.kind.encode())
            + _opt(reply.proposal)
            + bulk(reply.reason.encode("utf-8", "replace"))
        )
    reason = reply.reason if isinstance(reply, Refused) else "unreachable"
    return b"*3\r\n" + head + b"$1\r\nX\r\n" + bulk(reason.encode("utf-8", "replace"))


def _proposal(pid: object, value: object) -> Proposal | None:
    if pid is None:
        return None
    assert isinstance(pid, bytes) and isinstance(value, bytes)
    return Proposal(pid, value)


def decode_reply(r: list[object]) -> tuple[int, Reply]:
    """Parse a reply array as hiredis returns it; raises on anything malformed."""
    req_id = r[0]
    kind = r[1]
    assert isinstance(req_id, int)
    ints = r[2:]
    if kind == b"P":
        b = Ballot(*ints[0:3])  # type: ignore[arg-type]
        a = Ballot(*ints[3:6])  # type: ignore[arg-type]
        return req_id, Promise(b, a, _proposal(r[8], r[9]), r[10] == 1)
    if kind == b"A":
        return req_id, Accepted(Ballot(*ints[0:3]))  # type: ignore[arg-type]
    if kind == b"N":
        return req_id, Nack(Ballot(*ints[0:3]), Ballot(*ints[3:6]))  # type: ignore[arg-type]
    if kind == b"S":
        return req_id, State(Ballot(*ints[0:3]), _proposal(r[5], r[6]), r[7] == 1)  # type: ignore[arg-type]
    if kind == b"W":
        outcome, reason = r[2], r[5]
        assert isinstance(outcome, bytes) and isinstance(reason, bytes)
        if outcome not in (b"CHOSEN", b"NOQUORUM", b"UNCERTAIN"):
            raise ValueError(f"unknown write outcome {outcome!r}")
        return req_id, Written(outcome.decode(), _proposal(r[3], r[4]), reason.decode("utf-8", "replace"))
    if kind == b"X":
        reason = r[2]
        assert isinstance(reason, bytes)
        return req_id, Refused(reason.decode("utf-8", "replace"))
    raise ValueError(f"unknown peer reply kind {kind!r}")


class _Batcher:
    """Collects what one event-loop iteration sends on a link and writes it in one syscall."""

    __slots__ = ("_out", "_scheduled", "transport", "_loop")

    def __init__(self) -> None:
        self._out: list[bytes] = []
        self._scheduled = False
        self.transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def write(self, data: bytes) -> None:
        self._out.append(data)
        if not self._scheduled:
            self._scheduled = True
            if self._loop is None:
                self._loop = asyncio.get_running_loop()  # cached: each lookup calls getpid()
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if self._out and self.transport is not None:
            self.transport.write(b"".join(self._out))
        self._out.clear()

    def detach(self) -> None:
        """The link is gone: drop what was not written yet."""
        self.transport = None
        self._out.clear()


def _canonical_id(text: bytes) -> int:
    """A node id written the one canonical way (digits, no sign or leading zero), else -1."""
    return int(text) if text.isdigit() and text == b"%d" % int(text) else -1


def _hex_or_empty(text: bytes) -> bytes:
    try:
        return bytes.fromhex(text.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return b""


# ---- inbound links ---------------------------------------------------------------------------


class PeerServerProtocol(asyncio.Protocol):
    """Serves one inbound peer link: authenticates it, then hands each request to ``on_request``.

    ``on_request(sender, req_id, msg, link)`` must eventually call ``link.respond`` for every
    request with req_id != 0.
    """

    def __init__(
        self,
        me: int,
        members: frozenset[int],
        secret: str,
        on_request: Callable[[NodeId, int, Request, PeerServerProtocol], None],
        max_bulk: int,
        check_identity: Callable[[NodeId, bytes], bytes | None],
        connections: set[PeerServerProtocol],
        max_connections: int,
        on_dump: Callable[[PeerServerProtocol, int, str], None] | None = None,
        on_identity: Callable[[NodeId, bytes], None] | None = None,
    ) -> None:
        self._on_dump = on_dump
        self._on_identity = on_identity
        self._me = me
        self._connections = connections
        self._max_connections = max_connections
        self._members = members
        self._secret = secret.encode()
        self._on_request = on_request
        self._check_identity = check_identity
        # Until the handshake, only a short PEER.HELLO is acceptable: a stranger cannot make this
        # node buffer large arguments.
        # Small limits until the peer has authenticated; the fast path waits for the final ones.
        self._parser = RequestParser(max_bulk=1024, max_args=16, split=False)
        self._max_bulk = max_bulk
        self._transport: asyncio.Transport | None = None
        self._peer: NodeId | None = None
        self._hello: tuple[NodeId, bytes, bytes, bytes] | None = None  # sender, identity, nonces
        self._batch = _Batcher()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = self._batch.transport = cast(asyncio.Transport, transport)
        if len(self._connections) >= self._max_connections:
            self._reject("ERR max number of peer connections reached")
            return
        self._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._batch.detach()
        self._connections.discard(self)

    def pause_writing(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.resume_reading()

    def _reject(self, text: str) -> None:
        assert self._transport is not None
        self._batch.flush()  # replies queued before the offending request go first
        self._batch.detach()
        self._transport.write(error(text))
        self._transport.close()
        self.closed = True

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self._parser.feed(data)
        while not self.closed:
            try:
                args = self._parser.next()
            except ProtocolError as exc:
                self._reject(f"ERR {exc}")
                return
            if args is None:
                return
            self._command(args)

    def _command(self, args: list[bytes]) -> None:
        name = args[0].upper()
        if self._peer is None:
            if name == b"PEER.HELLO" and len(args) == 5 and self._hello is None:
                sender = _canonical_id(args[1])
                target = _canonical_id(args[2])
                identity = _hex_or_empty(args[3])
                nonce = _hex_or_empty(args[4])
                if sender not in self._members or target != self._me or sender == self._me or not identity:
                    self._reject(
                        f"ERR peer handshake names {args[1]!r} -> {args[2]!r}, not a member link to node {self._me}"
                    )
                elif len(nonce) != 16:
                    self._reject("ERR peer handshake needs a 16-byte nonce")
                else:
                    mine = os.urandom(16)
                    self._hello = (NodeId(sender), identity, nonce, mine)
                    proof = handshake_mac(self._secret, b"S", args[1], args[2], nonce, mine)
                    self._send(b"+CHALLENGE %s %s\r\n" % (mine.hex().encode(), proof.hex().encode()))
                return
            if name == b"PEER.AUTH" and len(args) == 2 and self._hello is not None:
                sender, identity, nonce, mine = self._hello
                expected = handshake_mac(
                    self._secret, b"C", b"%d" % sender, b"%d" % self._me, identity, nonce, mine
                ).hex()
                if not hmac.compare_digest(args[1], expected.encode()):
                    self._reject("NOAUTH peer authentication failed: wrong cluster secret")
                    return
                try:
                    remembered = self._check_identity(sender, identity)
                except OSError as exc:
                    log.error("cannot record the identity of node %d: %s", sender, exc)
                    self._reject("ERR this node cannot record peer identities now (disk error)")
                    return
                self._peer = sender
                self._parser.max_bulk = self._max_bulk
                self._parser.max_args = 16
                self._parser.split = True
                self._send(b"+OK\r\n" if remembered is None else b"+REMEMBERS " + remembered.hex().encode() + b"\r\n")
                return
            if name == b"PING":
                self._send(b"+PONG\r\n")
                return
            self._reject("NOAUTH this is a respreg peer port: clients belong on the client port")
            return
        if name == b"PX" and len(args) >= 4:
            try:
                req_id, msg = decode_request(args[1:])
            except (ValueError, IndexError):
                self._reject("ERR Protocol error: malformed peer request")
                return
            self._on_request(self._peer, req_id, msg, self)
        elif name == b"PEER.DUMP" and len(args) == 3 and args[1].isdigit() and self._on_dump is not None:
            self._on_dump(self, int(args[1]), args[2].decode("ascii", "replace"))
        elif name == b"PEER.IDENTITY" and len(args) == 1 and self._on_identity is not None and self._hello:
            self._on_identity(self._peer, self._hello[1])
        elif name == b"PING":
            self._send(b"+PONG\r\n")
        else:
            self._reject("ERR Protocol error: unknown peer command")

    def respond(self, req_id: int, reply: Reply) -> None:
        if not self.closed:
            self._send(encode_reply(req_id, reply))

    def respond_dump(self, req_id: int, entries: list[tuple[str, bytes, AcceptorState]] | str, more: bool) -> None:
        """Answer a PEER.DUMP with a page of states, or with a refusal reason."""
        if self.closed:
            return
        if isinstance(entries, str):
            self._send(encode_reply(req_id, Refused(entries)))
            return
        parts = [b":%d\r\n$1\r\nD\r\n" % req_id, bulk(entries[-1][0].encode()) if more and entries else b"$-1\r\n"]
        for name, key, state in entries:
            parts += [bulk(name.encode()), bulk(key), _ib(state.promised), _ib(state.accepted), _opt(state.proposal)]
        self._send(b"*%d\r\n" % (3 + 10 * len(entries)) + b"".join(parts))

    def _send(self, data: bytes) -> None:
        self._batch.write(data)


# ---- outbound links --------------------------------------------------------------------------


class PeerLink(asyncio.Protocol):
    """This node's connection to one peer: connects, authenticates, sends requests, routes replies.

    ``send`` returns False when the link is not up, so the caller can answer Unreachable at once.
    Requests left unanswered for ``timeout_s`` close the link; their waiters get Unreachable.
    """

    def __init__(
        self,
        me: int,
        peer: NodeId,
        host: str,
        port: int,
        bind: str | None,
        secret: str,
        on_reply: Callable[[int, Reply], None],
        timeout_s: float,
        identity: bytes,
        on_hello: Callable[[NodeId, bytes | None], None],
    ) -> None:
        self.me = me
        self.peer = peer
        self.host = host
        self.port = port
        self.bind = bind
        self._secret = secret.encode()
        self._on_reply = on_reply
        self._identity = identity
        self._on_hello = on_hello
        self._nonce = b""
        self._authed = False
        self._dumps: dict[int, asyncio.Future[list[object]]] = {}
        self._next_dump = 1 << 62  # apart from the core's request ids
        self.timeout_s = timeout_s
        self._transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader(notEnoughData=_NOT_ENOUGH)
        self.up = False
        self._pending: set[int] = set()  # request ids sent and not yet answered
        self._waiting_pong = 0
        self._last_rx = 0.0
        self._batch = _Batcher()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self.connects = 0
        self.ups = 0
        self.failures = 0
        #: How long the peer takes to answer a request (the acceptor's disk wait included),
        #: followed the way TCP follows round trips (Jacobson's estimator, one request timed at a
        #: time): smoothed time and mean deviation, in seconds, 0 until the first answer.
        self.srtt = 0.0
        self.rttvar = 0.0
        self._timed = 0  # the request id being timed, 0 when none
        self._timed_at = 0.0
        #: Called after each new answer time (the driver adapts its phase timeouts).
        self.on_timed: Callable[[], None] | None = None

    def answer_timeout(self) -> float:
        """Seconds after which an answer is later than this peer's recent ones (as TCP's
        retransmission timeout: srtt + 4 rttvar); 0 before the first answer."""
        return self.srtt + 4 * self.rttvar

    def _timed_answer(self) -> None:
        sample = time.monotonic() - self._timed_at
        self._timed = 0
        if self.srtt == 0.0:
            self.srtt, self.rttvar = sample, sample / 2
        else:
            self.rttvar += (abs(self.srtt - sample) - self.rttvar) / 4
            self.srtt += (sample - self.srtt) / 8
        if self.on_timed is not None:
            self.on_timed()

    # lifecycle

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._drop("node stopping")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.05
        while not self._stopping:
            ups = self.ups
            try:
                self._reader = hiredis.Reader(notEnoughData=_NOT_ENOUGH)
                local = (self.bind, 0) if self.bind else None
                await asyncio.wait_for(
                    loop.create_connection(lambda: self, self.host, self.port, local_addr=local),
                    timeout=self.timeout_s,
                )
                if self._transport is None:
                    # Accepted, then closed or reset at once (a proxy in front of a dead node,
                    # a node shutting down): connection_lost already ran. Dial again.
                    raise ConnectionResetError("connection closed while it was being set up")
                self._nonce = os.urandom(16)
                self._authed = False
                self._transport.write(
                    _cmd(
                        b"PEER.HELLO",
                        b"%d" % self.me,
                        b"%d" % self.peer,
                        self._identity.hex().encode(),
                        self._nonce.hex().encode(),
                    )
                )
                self._last_rx = last = loop.time()
                # Up once the handshake is answered (a paused peer accepts TCP but never answers).
                interval = min(self.timeout_s / 4, 0.25)
                while self._transport is not None and not self._stopping:
                    await asyncio.sleep(interval)
                    now = loop.time()
                    self._discount(now, now - last - interval)
                    last = now
                    self._check(now)
                if self.ups != ups:
                    backoff = 0.05
            except (TimeoutError, OSError) as exc:
                self.failures += 1
                log.debug("peer %s link failed: %s", self.peer, exc)
                self._drop(str(exc))
            except Exception:  # noqa: BLE001 - whatever goes wrong, this link must keep redialling
                self.failures += 1
                log.exception("peer %s link failed unexpectedly; redialling", self.peer)
                self._drop("unexpected error")
            if self._stopping:
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    def _discount(self, now: float, late: float) -> None:
        """This check ran ``late`` seconds after it was due: this process was not running (a
        pause, a stopped or starved process, a busy loop), and a peer's answers sent meanwhile
        may wait unread in the socket, behind this timer. That time is not the peer's silence."""
        if late > 0:
            self._last_rx = min(now, self._last_rx + late)

    def _check(self, now: float) -> None:
        """Heartbeat and liveness: close the link if the peer stopped answering."""
        if self._transport is None:
            return
        waiting = bool(self._pending) or self._waiting_pong > 0 or not self.up
        if waiting and now - self._last_rx > self.timeout_s:
            log.warning("peer %s did not answer for %.1fs; reconnecting", self.peer, now - self._last_rx)
            self._transport.abort()
            self._drop("peer timed out")
            return
        # Ping also while requests wait: a peer busy with fsyncs still answers PING from its
        # event loop, and that is what tells a slow peer from a dead or paused one.
        if self.up and self._waiting_pong == 0 and now - self._last_rx > self.timeout_s / 4:
            self._waiting_pong += 1
            self._write(b"*1\r\n$4\r\nPING\r\n")

    def _drop(self, reason: str) -> None:
        del reason
        self.up = False
        self._transport = None
        self._waiting_pong = 0
        self._batch.detach()
        self._timed = 0
        pending, self._pending = self._pending, set()
        for req_id in pending:
            self._on_reply(req_id, Unreachable())
        for fut in self._dumps.values():
            if not fut.done():
                fut.set_exception(ConnectionError(f"link to node {self.peer} failed"))

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = self._batch.transport = cast(asyncio.Transport, transport)
        self.connects += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._drop(str(exc) if exc else "closed by peer")

    def data_received(self, data: bytes) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()  # cached: each lookup calls getpid()
        self._last_rx = self._loop.time()
        self._reader.feed(data)
        while True:
            try:
                r = self._reader.gets()
            except hiredis.ProtocolError as exc:
                self._fail(f"protocol error from peer: {exc}")
                return
            if r is _NOT_ENOUGH:
                return
            if isinstance(r, hiredis.ReplyError):
                self._fail(f"peer refused the link: {r}")
                return
            if not self.up and not self._authed and isinstance(r, bytes) and r.startswith(b"CHALLENGE "):
                if not self._answer_challenge(r):
                    return
                continue
            if not self.up and self._authed and isinstance(r, bytes) and (r == b"OK" or r.startswith(b"REMEMBERS ")):
                self.up = True
                self.ups += 1
                try:
                    remembered = None if r == b"OK" else bytes.fromhex(r[10:].decode("ascii"))
                except ValueError:
                    self._fail("malformed handshake reply")
                    return
                self._on_hello(self.peer, remembered)
                continue
            if r == b"PONG":
                self._waiting_pong = max(0, self._waiting_pong - 1)
                continue
            if isinstance(r, list) and len(r) >= 2 and isinstance(r[0], int) and r[0] in self._dumps:
                self._dump_reply(r)
                continue
            try:
                assert isinstance(r, list)
                req_id, reply = decode_reply(r)
            except (AssertionError, ValueError, IndexError, TypeError) as exc:
                self._fail(f"malformed reply from peer: {exc}")
                return
            if req_id in self._pending:
                self._pending.discard(req_id)
                if req_id == self._timed:
                    self._timed_answer()
                self._on_reply(req_id, reply)

    async def dump(self, cursor: str) -> tuple[str | None, list[tuple[str, bytes, AcceptorState]]]:
        """One page of the peer's durable states after file name ``cursor``; raises
        ConnectionError if the link is down or fails, RuntimeError if the peer refuses."""
        if not self.up or self._transport is None:
            raise ConnectionError(f"link to node {self.peer} is down")
        self._next_dump += 1
        req_id = self._next_dump
        fut: asyncio.Future[list[object]] = asyncio.get_running_loop().create_future()
        self._dumps[req_id] = fut
        self._write(_cmd(b"PEER.DUMP", b"%d" % req_id, cursor.encode()))
        try:
            r = await asyncio.wait_for(fut, timeout=self.timeout_s * 10)
        finally:
            self._dumps.pop(req_id, None)
        if r[1] == b"X":
            raise RuntimeError(f"node {self.peer} refused the dump: {r[2]!r}")
        nxt = r[2]
        entries: list[tuple[str, bytes, AcceptorState]] = []
        for i in range(3, len(r), 10):
            name, key = r[i], r[i + 1]
            assert isinstance(name, bytes) and isinstance(key, bytes)
            ints = r[i + 2 : i + 8]
            promised = Ballot(*ints[0:3])  # type: ignore[arg-type]
            accepted = Ballot(*ints[3:6])  # type: ignore[arg-type]
            entries.append(
                (name.decode("ascii"), key, AcceptorState(promised, accepted, _proposal(r[i + 8], r[i + 9])))
            )
        return (nxt.decode("ascii") if isinstance(nxt, bytes) else None), entries

    def _dump_reply(self, r: list[object]) -> None:
        fut = self._dumps.get(r[0])  # type: ignore[call-overload]
        if fut is not None and not fut.done():
            fut.set_result(r)

    def announce_identity(self) -> None:
        """Tell the peer this node was rebuilt, so it remembers this link's identity from now on."""
        if self.up:
            self._write(b"*1\r\n$13\r\nPEER.IDENTITY\r\n")

    def _answer_challenge(self, reply: bytes) -> bool:
        """Check that the peer knows the secret, then prove that this node does too."""
        try:
            _, theirs, proof = reply.split(b" ")
            nonce = bytes.fromhex(theirs.decode("ascii"))
        except ValueError:
            self._fail("malformed handshake challenge")
            return False
        me, peer = b"%d" % self.me, b"%d" % self.peer
        expected = handshake_mac(self._secret, b"S", me, peer, self._nonce, nonce).hex().encode()
        if not hmac.compare_digest(proof, expected):
            self._fail(f"the node at {self.host}:{self.port} does not know the cluster secret; not trusting it")
            return False
        answer = handshake_mac(self._secret, b"C", me, peer, self._identity, self._nonce, nonce)
        self._authed = True
        self._write(_cmd(b"PEER.AUTH", answer.hex().encode()))
        return True

    def _fail(self, reason: str) -> None:
        log.warning("peer %s: %s", self.peer, reason)
        if self._transport is not None:
            self._transport.abort()
        self._drop(reason)

    def pause_writing(self) -> None:
        pass  # bounded by the requests in flight, which are bounded by client operations

    def resume_writing(self) -> None:
        pass

    # sending

    def send(self, req_id: int, msg: Request) -> bool:
        if not self.up or self._transport is None:
            return False
        if req_id:
            self._pending.add(req_id)
            if not self._timed:
                self._timed, self._timed_at = req_id, time.monotonic()
        self._write(encode_request(req_id, msg))
        return True

    def _write(self, data: bytes) -> None:
        self._batch.write(data)

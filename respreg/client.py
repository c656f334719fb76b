"""The client port: one :class:`ClientProtocol` per Redis client connection, and the commands.

Pipelining: every command read from a packet is dispatched at once; its reply is either ready
(bytes) or pending on Paxos (a future). Replies leave strictly in request order, batched into
one write per connection per event-loop iteration: like redis-server, which writes replies just
before it waits for events again, a node reads every connection that is ready and then writes
all their replies in one burst (see NodeServer.flush_soon). Memory is bounded per connection:
reading pauses while the socket's send buffer is over its high-water mark (a client that does
not read its replies) or while too many commands wait on Paxos, and the parser rejects
oversized arguments from their headers.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import os
import platform
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, cast

from . import __version__, compiled
from .commands import BY_NAME, MUTATIONS, SPECS, command_docs, command_info, write_once_error
from .core.node import Chosen, Empty, Failed, Outcome
from .core.types import Proposal
from .resp import NIL2, NIL3, OK, PONG, ProtocolError, RequestParser, Simple, Value, Verbatim, bulk, encode, error

if TYPE_CHECKING:
    from .server import NodeServer

#: A reply not known yet: the future of a Paxos operation and how to turn its result into bytes.
Deferred = tuple["asyncio.Future[Any]", Callable[[Any], bytes]]
Handler = Callable[["ClientProtocol", list[bytes]], "bytes | Deferred"]

REDIS_COMPAT_VERSION = "7.0.0"
#: Ready replies of one packet are handed to the transport whenever this many bytes collect.
_WRITE_CHUNK = 64 * 1024
#: The GET replies of chosen values a node keeps formatted (NodeServer.get_replies): at most this
#: many, each with its key at most _REPLY_CACHED_BYTES long (so at most about 4 MiB in all);
#: when full it is emptied and fills again with the keys read since.
REPLY_CACHE_KEYS = 4096
_REPLY_CACHED_BYTES = 1024

log = logging.getLogger("respreg.client")


class _Slot:
    """A reply in request order: its bytes, or the operation it waits for and its formatter
    (None for a GET's, the one the hot path calls without a Python-level call); ``count`` GETs
    in a row that share one operation (NodeServer.read) share one slot and get one reply each."""

    __slots__ = ("data", "fut", "fmt", "count")

    def __init__(
        self, data: bytes | None, fut: asyncio.Future[Any] | None = None, fmt: Callable[[Any], bytes] | None = None
    ) -> None:
        self.data = data
        self.fut = fut
        self.fmt = fmt
        self.count = 1


class ClientProtocol(asyncio.Protocol):
    def __init__(self, server: NodeServer) -> None:
        self.srv = server
        cfg = server.config
        assert server.core is not None, "clients are served only once the node has started"
        #: The GET hot path's cache (see _process).
        self._chosen = server.core.chosen_cache
        self._replies = server.get_replies
        self._max_key_bytes = cfg.max_key_bytes
        self.parser = RequestParser(max_bulk=cfg.proto_max_bulk_len)
        self.max_inflight = cfg.max_inflight_per_client
        self.transport: asyncio.Transport | None = None
        self.id = 0
        self.resp3 = False
        self.name = b""
        self.lib_name = b""
        self.lib_ver = b""
        self.addr = "?"
        self.laddr = "?"
        self.created = time.monotonic()
        self.last_cmd = "NULL"
        self.queue: deque[_Slot] = deque()
        #: Per key, the commands of this connection still running on it (see _dispatch).
        self.key_busy: dict[bytes, list[asyncio.Future[Any]]] = {}
        #: Per key, the last write of this connection still running on it.
        self.key_write: dict[bytes, asyncio.Future[Any]] = {}
        self._flush_scheduled = False
        self._pending_out: list[bytes] = []
        self._loop = asyncio.get_running_loop()  # cached: each lookup is a getpid() system call
        #: Set while a command that waited behind earlier ones starts: what is left of its deadline.
        self.budget_ms: float | None = None
        #: Queued replies still waiting for their operation (or, done, for an earlier reply).
        self.inflight = 0
        self.closing = False
        self.closed = False
        self.write_paused = False
        self.read_paused = False

    # ---- connection --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        if len(self.srv.clients) >= self.srv.maxclients:
            self.srv.stats["rejected_connections"] += 1
            transport.write(b"-ERR max number of clients reached\r\n")
            transport.close()
            self.closed = True
            return
        self.id = self.srv.register_client(self)
        transport.set_write_buffer_limits(high=256 * 1024)
        peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("sockname")
        if isinstance(peer, tuple):
            self.addr = f"{peer[0]}:{peer[1]}"
        if isinstance(sock, tuple):
            self.laddr = f"{sock[0]}:{sock[1]}"

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.srv.unregister_client(self.id)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def pause_writing(self) -> None:
        self.write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._update_reading()
        self._process()

    def _update_reading(self) -> None:
        if self.transport is None or self.closed:
            return
        want_pause = self.write_paused or self.inflight >= self.max_inflight
        if want_pause and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()
        elif not want_pause and self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()

    # ---- input -------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.closing or self.closed:
            return
        self.parser.feed(data)
        self._process()

    def _process(self) -> None:
        # Replies of finished operations not written yet go first (see _complete).
        out, self._pending_out = self._pending_out, []
        out_size = 0
        queue = self.queue
        srv = self.srv
        srv_stats = srv.stats
        chosen = self._chosen
        replies = self._replies
        key_write = self.key_write
        processed = 0
        # The key of the GET parsed just before, if the next GET of that key gets the same
        # answer: its reply (a chosen value), or, with no reply, the operation it joined, which
        # is the tail of the queue (see below).
        last_key: bytes | None = None
        last_reply: bytes | None = None
        joined = 0
        parser = self.parser
        while not self.closing and not self.write_paused and self.inflight < self.max_inflight:
            # A GET in its usual form comes without its list of arguments (see next_get).
            key = parser.next_get()
            if key is None:
                try:
                    args = parser.next()
                except ProtocolError as exc:
                    srv_stats["protocol_errors"] += 1
                    reply = error(f"ERR {exc}")
                    self.closing = True
                    if queue:
                        queue.append(_Slot(reply))
                    else:
                        out.append(reply)
                    break
                if args is None:
                    break
                if len(args) == 2 and (args[0] == b"GET" or args[0] == b"get"):
                    key = args[1]
            else:
                args = None
            processed += 1
            # The hot path, GET, unless an earlier write of this connection on the key still
            # runs: what _dispatch, _call_tracked and cmd_get would do, without their lookups
            # and calls (nothing blocks a read of a key this connection is not writing).
            if key is not None and not (key_write and key in key_write):
                self.last_cmd = "get"
                result: bytes | Deferred | None
                if key == last_key:
                    # The same key as the GET just before it (a client polling a key, or
                    # pipelining reads of one key): nothing this loop does between two commands
                    # can choose a value or start a read round, so it gets the same answer.
                    if last_reply is None:
                        # That GET joined the operation of the first read waiting for the next
                        # round (NodeServer.read) and took the queue's tail: this one joins it
                        # too, as NodeServer.read and _wait_for would have it do.
                        self.inflight += 1
                        queue[-1].count += 1
                        joined += 1
                        continue
                    result = last_reply
                else:
                    last_key = None
                    # A value known to be chosen never changes, so memory answers it, and its reply
                    # (the same in RESP2 and RESP3) is kept formatted for the next GETs of the key.
                    result = replies.get(key)
                    if result is not None:
                        last_key, last_reply = key, result
                    elif (known := chosen.value(key)) is not None:
                        result = bulk(known)
                        if len(key) + len(result) <= _REPLY_CACHED_BYTES:
                            if len(replies) >= REPLY_CACHE_KEYS:
                                replies.clear()
                            replies[key] = result
                        last_key, last_reply = key, result
                    elif len(key) <= self._max_key_bytes and self.budget_ms is None:
                        # A linearizable read (_read_get); many share one operation (NodeServer.read).
                        try:
                            fut = srv.read(key)
                        except Exception as exc:  # noqa: BLE001 - as in _call
                            result = _internal_error([b"GET", key] if args is None else args, exc)
                        else:
                            if not fut.done():
                                running = self.key_busy.get(key)
                                if running is None or running[-1] is not fut:
                                    # What _mark_busy does, with one callback for it and
                                    # _wait_for. (Otherwise this connection's previous read of
                                    # the key shares the operation, registered already.)
                                    self.key_busy.setdefault(key, []).append(fut)
                                    self._wait_for(fut, None, partial(self._read_done, key))
                                else:
                                    self._wait_for(fut, None)  # no formatter: a GET's (see _complete)
                                if srv.read_joined:
                                    last_key, last_reply = key, None
                                continue
                            result = _value_reply(self.nil(), fut.result())
                    else:
                        result = self._call_tracked(_read_get, [b"GET", key], [key], True)
            else:
                last_key = None
                if args is None:  # a GET from next_get, of a key this connection is writing
                    assert key is not None
                    args = [b"GET", key]
                result = self._dispatch(args)
            if not isinstance(result, bytes):
                op, fmt = result
                if not op.done():
                    self._wait_for(op, fmt)
                    continue
                result = fmt(op.result())
            if queue:
                queue.append(_Slot(result))
            else:
                out.append(result)
                out_size += len(result)
                if out_size >= _WRITE_CHUNK:
                    out_size = self._write_out(out)
        srv_stats["total_commands_processed"] += processed
        if joined:
            srv.count_joined_reads(joined)
        if out and self.transport is not None and not self.closed:
            if self.closing:
                self.transport.write(b"".join(out) if len(out) > 1 else out[0])
            else:
                # Written once every ready connection has been read (see NodeServer.flush_soon).
                self._pending_out = out
                if not self._flush_scheduled:
                    self._flush_scheduled = True
                    self.srv.flush_soon(self)
        if self.read_paused or self.write_paused or self.inflight >= self.max_inflight:
            self._update_reading()
        if self.closing and not queue and self.transport is not None:
            self.transport.close()

    def _wait_for(
        self,
        fut: asyncio.Future[Any],
        fmt: Callable[[Any], bytes] | None,
        on_done: Callable[[asyncio.Future[Any]], None] | None = None,
    ) -> None:
        """Queue the reply of an operation still running, in request order; ``on_done`` (which
        must call _complete) replaces _complete as the operation's callback on this connection."""
        queue = self.queue
        self.inflight += 1
        # One callback per operation and connection is enough: it drains every reply at the
        # head of the queue whose operation is done (reads of one key share operations).
        tail = queue[-1] if queue else None
        if tail is not None and tail.fut is fut:
            assert on_done is None, "the operation's callback on this connection is registered"
            if fmt is None and tail.fmt is None:
                tail.count += 1  # another GET sharing the operation: the same reply again
                return
        else:
            fut.add_done_callback(self._complete if on_done is None else on_done)
        queue.append(_Slot(None, fut, fmt))

    def _write_out(self, out: list[bytes]) -> int:
        """Hand a big batch of replies to the transport as it grows (if the client does not read,
        pause_writing stops the parse loop before replies pile up in memory); the bytes left."""
        if self.transport is None or self.closed:
            return sum(map(len, out))
        self.transport.write(b"".join(out))
        out.clear()
        return 0

    def _complete(self, _: asyncio.Future[Any]) -> None:
        """An operation ended: collect the replies at the head of the queue that are ready."""
        if self.closed:
            return
        queue = self.queue
        out = self._pending_out
        while queue:
            slot = queue[0]
            data = slot.data
            if data is None:
                fut = slot.fut
                assert fut is not None
                if not fut.done():
                    break
                fmt = slot.fmt
                data = _value_reply(self.nil(), fut.result()) if fmt is None else fmt(fut.result())
                self.inflight -= slot.count
            queue.popleft()
            if slot.count == 1:
                out.append(data)
            else:
                out.extend([data] * slot.count)
        if not self._flush_scheduled:
            # Many operations finish in one event-loop iteration (a shared read round, a group
            # commit): their replies leave in one write, after that iteration's callbacks ran.
            self._flush_scheduled = True
            self.srv.flush_soon(self)

    def flush(self) -> None:
        """Write the replies collected since the last write; resume reading if it was paused."""
        self._flush_scheduled = False
        if self.closed:
            return
        out, self._pending_out = self._pending_out, []
        if out and self.transport is not None:
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])
        if self.closing:
            if not self.queue and self.transport is not None:
                self.transport.close()
            return
        self._update_reading()
        # Parse on if commands wait (held back by the in-flight limit or a paused write).
        if not self.read_paused and not self.parser.idle():
            self._process()

    # ---- dispatch ----------------------------------------------------------------------------

    def _dispatch(self, args: list[bytes]) -> bytes | Deferred:
        name = args[0].lower()
        handler = HANDLERS.get(name)
        if handler is None:
            if name in MUTATIONS:
                return error(write_once_error(name.decode("utf-8", "replace")))
            return error(unknown_command(args))
        spec = BY_NAME[name]
        n = len(args)
        if (spec.arity > 0 and n != spec.arity) or (spec.arity < 0 and n < -spec.arity):
            return error(f"ERR wrong number of arguments for '{spec.name}' command")
        self.last_cmd = spec.name
        if spec.first_key == 0:
            return self._call(handler, args)
        # Commands of one connection on one key take effect in the order they were sent, as in
        # redis-server, even when pipelined: a write waits for this connection's earlier commands
        # on the same keys, a read for its earlier writes. Reads of one key run concurrently:
        # each is linearizable, and a register only ever goes from nil to its one value, so a
        # later read can never return an older state than an earlier one (replies still leave
        # in request order). Commands on other keys run concurrently.
        last = len(args) - 1 if spec.last_key < 0 else spec.last_key
        keys = args[spec.first_key : last + 1 : spec.step]
        readonly = spec.readonly
        if self.key_busy:
            if readonly:
                blockers = {self.key_write[k] for k in keys if k in self.key_write}
            else:
                blockers = {f for k in keys for f in self.key_busy.get(k, ())}
            if blockers:
                return self._after(blockers, handler, args, keys, readonly)
        return self._call_tracked(handler, args, keys, readonly)

    def _call_tracked(self, handler: Handler, args: list[bytes], keys: list[bytes], readonly: bool) -> bytes | Deferred:
        """Run a command on ``keys``; while it runs, later commands of this connection on them
        wait for it as they must (see _dispatch)."""
        result = self._call(handler, args)
        if not isinstance(result, bytes) and not result[0].done():
            self._mark_busy(keys, result[0], readonly)
        return result

    def _call(self, handler: Handler, args: list[bytes]) -> bytes | Deferred:
        try:
            return handler(self, args)
        except Exception as exc:  # noqa: BLE001 - a bug must cost one reply, never the server
            return _internal_error(args, exc)

    def _mark_busy(self, keys: list[bytes], fut: asyncio.Future[Any], readonly: bool) -> None:
        if readonly and len(keys) == 1:
            running = self.key_busy.get(keys[0])
            if running and running[-1] is fut:
                # A read sharing the operation of this connection's previous read of the key
                # (see NodeServer.read): that operation is registered already, and ends for both.
                return
        for k in keys:
            self.key_busy.setdefault(k, []).append(fut)
            if not readonly:
                self.key_write[k] = fut
        fut.add_done_callback(partial(self._unbusy, keys))

    def _read_done(self, key: bytes, fut: asyncio.Future[Any]) -> None:
        """A GET's read operation ended (registered by the hot path in _process)."""
        self._unbusy([key], fut)
        self._complete(fut)

    def _unbusy(self, keys: list[bytes], fut: asyncio.Future[Any]) -> None:
        for k in keys:
            running = self.key_busy.get(k)
            if running is not None:
                try:
                    running.remove(fut)
                except ValueError:
                    pass
                if not running:
                    del self.key_busy[k]
            if self.key_write.get(k) is fut:
                del self.key_write[k]

    def _after(
        self,
        blockers: set[asyncio.Future[Any]],
        handler: Handler,
        args: list[bytes],
        keys: list[bytes],
        readonly: bool,
    ) -> Deferred:
        """Run ``handler`` once every blocker is done; the returned future carries its reply."""
        loop = asyncio.get_running_loop()
        outer: asyncio.Future[bytes] = loop.create_future()
        self._mark_busy(keys, outer, readonly)
        remaining = len(blockers)
        # The deadline runs from arrival, so a chain of commands on one key stays bounded too.
        deadline = loop.time() + self.srv.config.deadline_ms / 1000

        def finished(fut: asyncio.Future[Any], fmt: Callable[[Any], bytes]) -> None:
            try:
                outer.set_result(fmt(fut.result()))
            except Exception as exc:  # noqa: BLE001
                log.exception("command %r failed", args[0][:64])
                outer.set_result(error(f"ERR internal error: {type(exc).__name__}"))

        def go(_: asyncio.Future[Any]) -> None:
            nonlocal remaining
            remaining -= 1
            if remaining:
                return
            budget_ms = (deadline - loop.time()) * 1000
            if budget_ms <= 0:
                outer.set_result(
                    error("NOQUORUM deadline passed behind earlier commands on the same key; not attempted")
                )
                return
            self.budget_ms = budget_ms
            try:
                result = self._call(handler, args)
            finally:
                self.budget_ms = None
            if isinstance(result, bytes):
                outer.set_result(result)
            else:
                result[0].add_done_callback(partial(finished, fmt=result[1]))

        for b in blockers:
            b.add_done_callback(go)
        return outer, _same

    def nil(self) -> bytes:
        return NIL3 if self.resp3 else NIL2

    def info_line(self) -> str:
        age = int(time.monotonic() - self.created)
        return (
            f"id={self.id} addr={self.addr} laddr={self.laddr} fd=-1 name={self.name.decode('utf-8', 'replace')} "
            f"age={age} idle=0 flags=N db=0 sub=0 psub=0 ssub=0 multi=-1 qbuf={self.parser.buffered()} "
            f"argv-mem=0 multi-mem=0 obl=0 oll={len(self.queue)} omem=0 tot-mem=0 events=r cmd={self.last_cmd} "
            f"user=default redir=-1 resp={3 if self.resp3 else 2} "
            f"lib-name={self.lib_name.decode('utf-8', 'replace')} lib-ver={self.lib_ver.decode('utf-8', 'replace')}"
        )


def _same(reply: bytes) -> bytes:
    return reply


def unknown_command(args: list[bytes]) -> bytes:
    """redis-server's wording for an unknown command, echoing the bytes sent (128 at most)."""
    shown = b""
    for a in args[1:]:
        if len(shown) >= 128:
            break
        shown += b"'" + a[: 128 - len(shown)] + b"' "
    return b"ERR unknown command '" + args[0][:128] + b"', with args beginning with: " + shown


# ---- register commands -----------------------------------------------------------------------


def _internal_error(args: list[bytes], exc: Exception) -> bytes:
    log.exception("command %r failed", args[0][:64], exc_info=exc)
    return error(f"ERR internal error: {type(exc).__name__}")


def _failure_reply(outcome: Failed) -> bytes:
    return error(f"{outcome.kind.value} {outcome.reason}")


def _limit_error(c: ClientProtocol, key: bytes, value: bytes | None = None) -> bytes | None:
    cfg = c.srv.config
    if len(key) > cfg.max_key_bytes:
        return error(f"ERR key is too long ({len(key)} bytes, max-key-bytes is {cfg.max_key_bytes})")
    if value is not None and len(value) > cfg.max_value_bytes:
        return error(f"ERR value is too large ({len(value)} bytes, max-value-bytes is {cfg.max_value_bytes})")
    return None


def _write(c: ClientProtocol, key: bytes, value: bytes, ok: bytes, taken: Callable[[bytes], bytes]) -> bytes | Deferred:
    """Start a SETONCE. ``ok`` is the reply when this call's value was chosen, ``taken(value)``
    the reply when another proposal holds the register."""
    bad = _limit_error(c, key, value)
    if bad is not None:
        return bad
    known = c.srv.chosen_value(key)
    if known is not None:
        return taken(known)
    fut, pid = c.srv.write(key, value, c.budget_ms)

    def fmt(outcome: Outcome) -> bytes:
        if isinstance(outcome, Chosen):
            return ok if outcome.proposal.pid == pid else taken(outcome.proposal.value)
        assert isinstance(outcome, Failed)
        return _failure_reply(outcome)

    return fut, fmt


def cmd_setonce(c: ClientProtocol, args: list[bytes]) -> bytes | Deferred:
    return _write(c, args[1], args[2], OK, lambda _v: c.nil())


def cmd_setnx(c: ClientProtocol, args: list[bytes]) -> bytes | Deferred:
    return _write(c, args[1], args[2], b":1\r\n", lambda _v: b":0\r\n")


def cmd_set(c: ClientProtocol, args: list[bytes]) -> bytes | Deferred:
    nx = xx = get = False
    expiry = False
    i = 3
    while i < len(args):
        opt = args[i].upper()
        if opt == b"NX" and not xx:
            nx = True
        elif opt == b"XX" and not nx:
            xx = True
        elif opt == b"GET":
            get = True
        elif opt == b"KEEPTTL":
            expiry = True
        elif opt in (b"EX", b"PX", b"EXAT", b"PXAT") and i + 1 < len(args):
            expiry = True
            i += 1
        else:
            return error("ERR syntax error")
        i += 1
    if expiry:
        return error("ERR registers are write-once and never expire: SET does not take EX, PX, EXAT, PXAT or KEEPTTL")
    if not nx:
        return error(
            "ERR registers are write-once: use SET key value NX (or SETONCE key value); SET without NX would overwrite"
        )
    if get:
        return _write(c, args[1], args[2], c.nil(), bulk)
    return _write(c, args[1], args[2], OK, lambda _v: c.nil())


def _value_reply(nil: bytes, outcome: Outcome) -> bytes:
    """The reply to a GET that ran a read: the value, nil, or the failure."""
    if isinstance(outcome, Chosen):
        return bulk(outcome.proposal.value)
    if isinstance(outcome, Empty):
        return nil
    assert isinstance(outcome, Failed)
    return _failure_reply(outcome)


#: How a GET that ran a read formats its outcome, by protocol (RESP2, RESP3: their nils differ).
_GET_REPLY = (partial(_value_reply, NIL2), partial(_value_reply, NIL3))


def cmd_get(c: ClientProtocol, args: list[bytes]) -> bytes | Deferred:
    # The hot path: a value known to be chosen never changes, so memory answers it.
    known = c.srv.chosen_value(args[1])
    if known is not None:
        return bulk(known)
    return _read_get(c, args)


def _read_get(c: ClientProtocol, args: list[bytes]) -> bytes | Deferred:
    """GET of a key this node does not know to be chosen (callers check): a linearizable read."""
    key = args[1]
    bad = _limit_error(c, key)
    if bad is not None:
        return bad
    return c.srv.read(key, c.budget_ms), _GET_REPLY[c.resp3]


def _multi_read(
    c: ClientProtocol, keys: list[bytes], combine: Callable[[list[bytes | None]], bytes]
) -> bytes | Deferred:
    for k in keys:
        bad = _limit_error(c, k)
        if bad is not None:
            return bad
    loop = asyncio.get_running_loop()
    futs: list[asyncio.Future[Outcome]] = []
    for k in keys:
        known = c.srv.chosen_value(k)
        if known is not None:
            f: asyncio.Future[Outcome] = loop.create_future()
            f.set_result(Chosen(Proposal(b"", known)))
            futs.append(f)
        else:
            futs.append(c.srv.read(k, c.budget_ms))
    gathered = asyncio.gather(*futs)

    def done(outcomes: list[Outcome]) -> bytes:
        values: list[bytes | None] = []
        for o in outcomes:
            if isinstance(o, Failed):
                return _failure_reply(o)
            values.append(o.proposal.value if isinstance(o, Chosen) else None)
        return combine(values)

    return gathered, done


def cmd_mget(c: ClientProtocol, args: list[bytes]) -> bytes | Deferred:
    return _multi_read(c, args[1:], lambda vs: encode(list(vs), c.resp3))


def cmd_exists(c: ClientProtocol, args: list[bytes]) -> bytes | Deferred:
    return _multi_read(c, args[1:], lambda vs: b":%d\r\n" % sum(v is not None for v in vs))


def cmd_dbsize(c: ClientProtocol, args: list[bytes]) -> bytes:
    return error("ERR DBSIZE is not supported: respreg keeps no global key count (registers are independent)")


# ---- connection commands ---------------------------------------------------------------------


def cmd_ping(c: ClientProtocol, args: list[bytes]) -> bytes:
    if len(args) > 2:
        return error("ERR wrong number of arguments for 'ping' command")
    return bulk(args[1]) if len(args) == 2 else PONG


def cmd_echo(c: ClientProtocol, args: list[bytes]) -> bytes:
    return bulk(args[1])


def cmd_quit(c: ClientProtocol, args: list[bytes]) -> bytes:
    c.closing = True
    return OK


def cmd_select(c: ClientProtocol, args: list[bytes]) -> bytes:
    try:
        db = int(args[1])
    except ValueError:
        return error("ERR value is not an integer or out of range")
    if db != 0:
        return error("ERR DB index is out of range")
    return OK


def cmd_reset(c: ClientProtocol, args: list[bytes]) -> bytes:
    c.resp3 = False
    c.name = b""
    return b"+RESET\r\n"


def _valid_name(name: bytes) -> bool:
    return all(33 <= b <= 126 for b in name)


def cmd_hello(c: ClientProtocol, args: list[bytes]) -> bytes:
    proto = 3 if c.resp3 else 2
    i = 1
    if len(args) >= 2:
        try:
            proto = int(args[1])
        except ValueError:
            return error("ERR Protocol version is not an integer or out of range")
        if proto not in (2, 3):
            return error("NOPROTO unsupported protocol version")
        i = 2
    name: bytes | None = None
    while i < len(args):
        opt = args[i].upper()
        if opt == b"AUTH" and i + 2 < len(args):
            if args[i + 1] != b"default":
                return error("WRONGPASS invalid username-password pair or user is disabled.")
            i += 3
        elif opt == b"SETNAME" and i + 1 < len(args):
            name = args[i + 1]
            if not _valid_name(name):
                return error("ERR Client names cannot contain spaces, newlines or special characters.")
            i += 2
        else:
            return error(f"ERR Syntax error in HELLO option '{args[i].decode('utf-8', 'replace')}'")
    c.resp3 = proto == 3
    if name is not None:
        c.name = name
    return encode(
        {
            "server": "redis",
            "version": REDIS_COMPAT_VERSION,
            "proto": proto,
            "id": c.id,
            "mode": "standalone",
            "role": "master",
            "modules": [],
        },
        c.resp3,
    )


def cmd_client(c: ClientProtocol, args: list[bytes]) -> bytes:
    sub = args[1].lower()
    n = len(args)

    def arity() -> bytes:
        return error(f"ERR wrong number of arguments for 'client|{sub.decode('utf-8', 'replace')}' command")

    if sub == b"id":
        return b":%d\r\n" % c.id if n == 2 else arity()
    if sub == b"getname":
        if n != 2:
            return arity()
        return bulk(c.name) if c.name else c.nil()
    if sub == b"setname":
        if n != 3:
            return arity()
        if not _valid_name(args[2]):
            return error("ERR Client names cannot contain spaces, newlines or special characters.")
        c.name = args[2]
        return OK
    if sub == b"setinfo":
        if n != 4:
            return arity()
        attr = args[2].lower()
        if not _valid_name(args[3]) and args[3]:
            return error(
                f"ERR {attr.decode('utf-8', 'replace')} cannot contain spaces, newlines or special characters."
            )
        if attr == b"lib-name":
            c.lib_name = args[3]
        elif attr == b"lib-ver":
            c.lib_ver = args[3]
        else:
            return error(f"ERR Unrecognized option '{args[2].decode('utf-8', 'replace')}'")
        return OK
    if sub == b"info":
        return encode(Verbatim(c.info_line() + "\n"), c.resp3) if n == 2 else arity()
    if sub == b"list":
        text = "".join(cl.info_line() + "\n" for cl in list(c.srv.clients.values()))
        return encode(Verbatim(text), c.resp3)
    if sub in (b"no-evict", b"no-touch"):
        if n != 3 or args[2].lower() not in (b"on", b"off"):
            return error("ERR syntax error")
        return OK
    if sub == b"help":
        return encode(
            [
                Simple(line)
                for line in (
                    "CLIENT <subcommand> [<arg> ...]. Subcommands are:",
                    "ID",
                    "GETNAME",
                    "SETNAME <name>",
                    "SETINFO <LIB-NAME|LIB-VER> <value>",
                    "INFO",
                    "LIST",
                    "NO-EVICT (ON|OFF)",
                    "NO-TOUCH (ON|OFF)",
                    "HELP",
                )
            ],
            c.resp3,
        )
    return error(f"ERR unknown subcommand '{args[1].decode('utf-8', 'replace')}'. Try CLIENT HELP.")


def cmd_command(c: ClientProtocol, args: list[bytes]) -> bytes:
    if len(args) == 1:
        return encode([command_info(s) for s in SPECS], c.resp3)
    sub = args[1].lower()
    if sub == b"count":
        return b":%d\r\n" % len(SPECS)
    if sub == b"list":
        return encode([s.name for s in SPECS], c.resp3)
    if sub == b"info":
        wanted = [a.lower() for a in args[2:]] or [s.name.encode() for s in SPECS]
        info: list[Value] = []
        for w in wanted:
            spec = BY_NAME.get(w)
            info.append(command_info(spec) if spec is not None else None)
        return encode(info, c.resp3)
    if sub == b"docs":
        names = [a.lower() for a in args[2:]] or [s.name.encode() for s in SPECS]
        docs: dict[str, Value] = {}
        for w in names:
            spec = BY_NAME.get(w)
            if spec is not None:
                docs[spec.name] = command_docs(spec)
        return encode(docs, c.resp3)
    if sub == b"getkeys" and len(args) >= 3:
        spec = BY_NAME.get(args[2].lower())
        if spec is None or spec.first_key == 0:
            return error("ERR The command has no key arguments")
        last = len(args) - 2 if spec.last_key < 0 else spec.last_key
        return encode([args[2 + i] for i in range(spec.first_key, min(last, len(args) - 3) + 1, spec.step)], c.resp3)
    return error(f"ERR unknown subcommand '{args[1].decode('utf-8', 'replace')}'. Try COMMAND HELP.")


# ---- server commands -------------------------------------------------------------------------


def config_values(c: ClientProtocol) -> dict[str, str]:
    cfg = c.srv.config
    return {
        "port": str(cfg.port),
        "bind": cfg.bind,
        "dir": str(cfg.data_dir),
        "maxclients": str(c.srv.maxclients),
        "proto-max-bulk-len": str(cfg.proto_max_bulk_len),
        "databases": "1",
        "save": "",
        "appendonly": "no",
        "appendfsync": "always",
        "timeout": "0",
        "respreg-node-id": str(cfg.node_id),
        "respreg-peer-port": str(cfg.peer_port),
        "respreg-deadline-ms": f"{cfg.deadline_ms:g}",
        "respreg-max-key-bytes": str(cfg.max_key_bytes),
        "respreg-max-value-bytes": str(cfg.max_value_bytes),
        "respreg-max-writes-in-flight": str(cfg.max_writes_in_flight),
        "respreg-peer-timeout-ms": f"{cfg.peer_timeout_ms:g}",
    }


def cmd_config(c: ClientProtocol, args: list[bytes]) -> bytes:
    sub = args[1].lower()
    if sub == b"get":
        if len(args) < 3:
            return error("ERR wrong number of arguments for 'config|get' command")
        values = config_values(c)
        found: dict[str, Value] = {}
        for pat in args[2:]:
            p = pat.decode("utf-8", "replace").lower()
            for k, v in values.items():
                if fnmatch.fnmatchcase(k, p):
                    found[k] = v
        return encode(found, c.resp3)
    if sub == b"set":
        return error("ERR CONFIG SET is not supported: respreg takes its settings from command-line flags at start")
    if sub == b"resetstat":
        for k in c.srv.stats:
            c.srv.stats[k] = 0
        return OK
    return error(f"ERR unknown subcommand '{args[1].decode('utf-8', 'replace')}'. Try CONFIG HELP.")


def info_text(c: ClientProtocol, sections: list[str]) -> str:
    srv = c.srv
    cfg = srv.config
    generic: dict[str, dict[str, str | int]] = {
        "server": {
            "redis_version": REDIS_COMPAT_VERSION,
            "respreg_version": __version__,
            "redis_mode": "standalone",
            "os": f"{platform.system()} {platform.release()} {platform.machine()}",
            "arch_bits": 64,
            "process_id": os.getpid(),
            "run_id": srv.run_id,
            "tcp_port": cfg.port,
            "peer_port": cfg.peer_port,
            "uptime_in_seconds": int(time.time() - srv.started),
            "python_version": platform.python_version(),
            "respreg_compiled": int(compiled()),
        },
        "clients": {
            "connected_clients": len(srv.clients),
            "maxclients": srv.maxclients,
        },
        "stats": dict(srv.stats),
    }
    generic.update(srv.info_fields())
    order = ["server", "clients", "stats", "persistence", "paxos"]
    wanted = [s.lower() for s in sections]
    if not wanted or any(w in ("all", "everything", "default") for w in wanted):
        chosen = order
    else:
        chosen = [s for s in order if s in wanted]
    parts = []
    for name in chosen:
        lines = [f"# {name.capitalize()}"] + [f"{k}:{v}" for k, v in generic[name].items()]
        parts.append("\r\n".join(lines) + "\r\n")
    return "\r\n".join(parts)


def cmd_info(c: ClientProtocol, args: list[bytes]) -> bytes:
    text = info_text(c, [a.decode("utf-8", "replace") for a in args[1:]])
    return encode(Verbatim(text), c.resp3)


HANDLERS: dict[bytes, Handler] = {
    b"setonce": cmd_setonce,
    b"get": cmd_get,
    b"mget": cmd_mget,
    b"exists": cmd_exists,
    b"set": cmd_set,
    b"setnx": cmd_setnx,
    b"ping": cmd_ping,
    b"echo": cmd_echo,
    b"quit": cmd_quit,
    b"select": cmd_select,
    b"hello": cmd_hello,
    b"client": cmd_client,
    b"command": cmd_command,
    b"info": cmd_info,
    b"config": cmd_config,
    b"reset": cmd_reset,
    b"dbsize": cmd_dbsize,
}

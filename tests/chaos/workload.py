"""Concurrent redis-py clients that drive a cluster and record every operation in a History.

Each client is a thread bound to one node (client i talks to node ``i mod N``, so a paused or
partitioned node holds up only its own clients and the others keep measuring the rest of the
cluster), with no client-side retries and a socket timeout a little past the server's deadline.
Operations (SETONCE, ``SET k v NX GET``, GET, and runs of GETs of one key pipelined on one
connection) go to the client's node, on:

- hot keys: a few keys per ``hot_period_s`` time slot, shared by every client, so writes race
  (registers are write-once: races only happen while a key is young, hence the rotation);
- older keys: any key used before, read (mostly) or written again, to see values persist;
- fresh keys: one client's own new key.

Every write carries a value unique in the run, ``c<client>-<seq>``, so a value names its write.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.connection import Connection
from redis.retry import Retry

from tests.chaos.history import History, Op, OpKind, Outcome

Endpoints = Mapping[int, tuple[str, int]]


def connection(host: str, port: int, timeout_s: float, connect_timeout_s: float = 1.0) -> Connection:
    """A bare redis-py connection: no retries, no handshake beyond the socket, RESP2."""
    return Connection(
        host=host,
        port=port,
        socket_timeout=timeout_s,
        socket_connect_timeout=connect_timeout_s,
        retry=Retry(NoBackoff(), 0),
        driver_info=None,
    )


def command(kind: OpKind, key: bytes, value: bytes | None) -> tuple[bytes, ...]:
    if kind == "setonce":
        assert value is not None
        return (b"SETONCE", key, value)
    if kind == "set-nx-get":
        assert value is not None
        return (b"SET", key, value, b"NX", b"GET")
    return (b"GET", key)


def classify_reply(kind: OpKind, reply: Any) -> tuple[Outcome, bytes | None, str]:
    """Outcome, returned value and error text of a reply (not an error) to ``kind``."""
    if kind == "setonce":
        if reply in (b"OK", "OK", True):
            return Outcome.OK, None, ""
        if reply is None:
            return Outcome.NIL, None, ""
    elif reply is None:
        return Outcome.NIL, None, ""
    elif isinstance(reply, bytes):
        return Outcome.VALUE, reply, ""
    return Outcome.OTHER_ERROR, None, f"unexpected reply {reply!r}"


def classify_error(exc: BaseException) -> tuple[Outcome, str]:
    text = str(exc)
    if isinstance(exc, redis.ResponseError):
        word = text.split(" ", 1)[0]
        if word == "NOQUORUM":
            return Outcome.NOQUORUM, text
        if word == "UNCERTAIN":
            return Outcome.UNCERTAIN, text
        return Outcome.OTHER_ERROR, text
    if isinstance(exc, redis.TimeoutError):
        return Outcome.TIMEOUT, text
    if isinstance(exc, (redis.ConnectionError, OSError)):
        return Outcome.CONNECTION_ERROR, text
    return Outcome.OTHER_ERROR, f"{type(exc).__name__}: {text}"


class Caller:
    """One client's connections to every node; ``call`` runs one recorded operation."""

    def __init__(self, name: str, endpoints: Endpoints, history: History, timeout_s: float) -> None:
        self.name = name
        self.endpoints = dict(endpoints)
        self.history = history
        self.timeout_s = timeout_s
        self.conns: dict[int, Connection] = {}

    def _conn(self, node: int) -> Connection:
        c = self.conns.get(node)
        if c is None:
            host, port = self.endpoints[node]
            c = self.conns[node] = connection(host, port, self.timeout_s)
        return c

    def call(self, node: int, kind: OpKind, key: bytes, value: bytes | None = None) -> Op:
        h = self.history
        conn = self._conn(node)
        op = h.invoke(self.name, node, kind, key, value, time.monotonic())
        try:
            conn.connect()
        except Exception as exc:  # noqa: BLE001 - any failure to connect: the request never left
            conn.disconnect()
            h.complete(op, Outcome.CONNECTION_ERROR, time.monotonic(), error=classify_error(exc)[1], sent=False)
            return op
        try:
            conn.send_command(*command(kind, key, value))
            reply = conn.read_response()
        except Exception as exc:  # noqa: BLE001 - every error is an outcome to record
            now = time.monotonic()
            outcome, text = classify_error(exc)
            if outcome not in (Outcome.NOQUORUM, Outcome.UNCERTAIN) and not isinstance(exc, redis.ResponseError):
                conn.disconnect()  # a late reply must never be read as the next command's
            h.complete(op, outcome, now, error=text)
            return op
        now = time.monotonic()
        outcome, result, text = classify_reply(kind, reply)
        h.complete(op, outcome, now, result=result, error=text)
        return op

    def poll(self, node: int, key: bytes, n: int) -> list[Op]:
        """``n`` GETs of ``key`` pipelined on one connection (a client polling a key): a node
        answers a run of GETs of one key in one pass over its input (docs/design.md, fast path 6)."""
        return pipelined_gets(self._conn(node), self.history, self.name, node, [key] * n)

    def close(self) -> None:
        for c in self.conns.values():
            try:
                c.disconnect()
            except Exception:  # noqa: BLE001 - closing a broken socket may fail; nothing to do
                pass
        self.conns.clear()


@dataclass
class Keyspace:
    """The keys of a run; thread-safe."""

    prefix: str
    t0: float = field(default_factory=time.monotonic)
    hot_keys: int = 5
    hot_period_s: float = 1.0
    used: list[bytes] = field(default_factory=list)
    _seen: set[bytes] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def hot(self, rng: random.Random) -> bytes:
        slot = int((time.monotonic() - self.t0) / self.hot_period_s)
        if slot > 0 and rng.random() < 0.2:
            slot -= 1  # the previous slot's keys too: reads and late writes of just-settled keys
        return f"{self.prefix}hot-{slot}-{rng.randrange(self.hot_keys)}".encode()

    def old(self, rng: random.Random) -> bytes | None:
        with self._lock:
            return rng.choice(self.used) if self.used else None

    def fresh(self, client: int, seq: int) -> bytes:
        return f"{self.prefix}fresh-{client}-{seq}".encode()

    def note(self, key: bytes) -> None:
        with self._lock:
            if key not in self._seen:
                self._seen.add(key)
                self.used.append(key)


def _pick(rng: random.Random, weights: Sequence[tuple[OpKind, float]]) -> OpKind:
    return rng.choices([k for k, _ in weights], [w for _, w in weights])[0]


HOT_MIX: tuple[tuple[OpKind, float], ...] = (("setonce", 0.35), ("set-nx-get", 0.25), ("get", 0.40))
OLD_MIX: tuple[tuple[OpKind, float], ...] = (("setonce", 0.1), ("set-nx-get", 0.1), ("get", 0.8))
FRESH_MIX: tuple[tuple[OpKind, float], ...] = (("setonce", 0.6), ("set-nx-get", 0.4))
#: The share of GETs sent as a pipeline of 2 to 8 GETs of the same key (Caller.poll).
POLL_SHARE = 0.3


class Workload:
    """``clients`` threads issuing operations until ``stop()``; bounded by the socket timeouts."""

    def __init__(
        self,
        endpoints: Endpoints,
        history: History,
        seed: int,
        clients: int = 16,
        timeout_s: float = 5.0,
        keyspace: Keyspace | None = None,
        think_s: float = 0.0,
    ) -> None:
        self.endpoints = dict(endpoints)
        self.history = history
        self.seed = seed
        self.clients = clients
        self.timeout_s = timeout_s
        self.keys = keyspace or Keyspace(prefix=f"s{seed}:")
        self.think_s = think_s
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=f"chaos-client-{i}", daemon=True)
            for i in range(1, clients + 1)
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """Stop issuing; wait (bounded) for operations in flight to complete."""
        self._stop.set()
        deadline = time.monotonic() + self.timeout_s + 10
        for t in self._threads:
            t.join(timeout=max(0.1, deadline - time.monotonic()))

    def _run(self, cid: int) -> None:
        rng = random.Random(self.seed * 1_000_003 + cid)
        caller = Caller(f"c{cid}", self.endpoints, self.history, self.timeout_s)
        nodes = sorted(self.endpoints)
        node = nodes[(cid - 1) % len(nodes)]
        seq = 0
        try:
            while not self._stop.is_set():
                seq += 1
                r = rng.random()
                key: bytes | None = None
                if r < 0.6:
                    key, kind = self.keys.hot(rng), _pick(rng, HOT_MIX)
                elif r < 0.85:
                    key, kind = self.keys.old(rng), _pick(rng, OLD_MIX)
                if key is None:
                    key, kind = self.keys.fresh(cid, seq), _pick(rng, FRESH_MIX)
                value = f"c{cid}-{seq}".encode() if kind != "get" else None
                if kind == "get" and rng.random() < POLL_SHARE:
                    op = caller.poll(node, key, rng.randint(2, 8))[-1]
                else:
                    op = caller.call(node, kind, key, value)
                self.keys.note(key)
                if op.outcome in (Outcome.CONNECTION_ERROR, Outcome.NOQUORUM, Outcome.UNCERTAIN):
                    # Down, or no majority: errors come back at once; do not spin on them.
                    self._stop.wait(rng.uniform(0.02, 0.1))
                elif self.think_s:
                    self._stop.wait(rng.uniform(0, 2 * self.think_s))
        finally:
            caller.close()


def probe_writes(
    endpoints: Endpoints,
    history: History,
    prefix: str,
    timeout_s: float,
    nodes: Iterable[int] | None = None,
    on_progress: Callable[[int, float], None] | None = None,
    op_timeout_s: float = 5.0,
) -> dict[int, float | None]:
    """Write a fresh key through each node until one is answered (+OK or nil); returns, per node,
    the seconds that took (None: not within ``timeout_s``). The writes are recorded."""
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    out: dict[int, float | None] = {}
    caller = Caller("probe", endpoints, history, op_timeout_s)
    try:
        for node in nodes if nodes is not None else sorted(endpoints):
            out[node] = None
            i = 0
            while time.monotonic() < deadline:
                i += 1
                key = f"{prefix}probe-{node}-{int(t0 * 1000)}-{i}".encode()
                op = caller.call(node, "setonce", key, f"probe-{node}-{int(t0 * 1000)}-{i}".encode())
                if op.wrote() or op.refused():
                    out[node] = time.monotonic() - t0
                    if on_progress is not None:
                        on_progress(node, out[node] or 0.0)
                    break
                time.sleep(0.1)
    finally:
        caller.close()
    return out


def final_reads(
    endpoints: Endpoints,
    keys: Sequence[bytes],
    history: History,
    timeout_s: float = 60.0,
    batch: int = 500,
    op_timeout_s: float = 10.0,
    passes: int = 3,
) -> dict[bytes, dict[int, Op]]:
    """GET every key on every node (pipelined), then again, on every node, each key whose answers
    differ or failed, up to ``passes`` rounds; within a round, failed GETs are retried for up to
    ``timeout_s``. Returns the last GET of each key on each node; every GET is recorded (client
    ``final``).

    Why more than one round: a write answered UNCERTAIN (or timed out) may take effect at any
    later time, also during the final reads, when a GET finds its value accepted by some node and
    completes it. So node 1 may read nil and node 3, a moment later, the value. Once a value was
    read, every later GET must return it: the last round must agree."""
    out: dict[bytes, dict[int, Op]] = {k: {} for k in keys}
    todo = list(keys)
    for round_no in range(passes):
        if round_no:
            time.sleep(0.2)
        deadline = time.monotonic() + timeout_s
        for node, (host, port) in sorted(endpoints.items()):
            conn = connection(host, port, op_timeout_s)
            try:
                left = list(todo)
                while left:
                    failed: list[bytes] = []
                    for start in range(0, len(left), batch):
                        failed += _read_batch(conn, node, left[start : start + batch], history, out)
                    left = failed
                    if left:
                        if time.monotonic() > deadline:
                            break
                        time.sleep(0.5)
            finally:
                conn.disconnect()
        todo = [k for k in todo if not _settled(out[k])]
        if not todo:
            break
    return out


def _settled(per_node: Mapping[int, Op]) -> bool:
    answers = {(op.outcome, op.result) for op in per_node.values()}
    return len(answers) == 1 and next(iter(answers))[0] in (Outcome.NIL, Outcome.VALUE)


def pipelined_gets(conn: Connection, history: History, client: str, node: int, keys: Sequence[bytes]) -> list[Op]:
    """GET every key of ``keys`` in one pipeline on ``conn``: each GET is recorded as its own
    operation, invoked when the pipeline is sent and completed when its own reply is read."""
    invoke = time.monotonic()
    ops = [history.invoke(client, node, "get", k, None, invoke) for k in keys]
    try:
        conn.connect()
    except Exception as exc:  # noqa: BLE001
        conn.disconnect()
        now = time.monotonic()
        for op in ops:
            history.complete(op, Outcome.CONNECTION_ERROR, now, error=str(exc), sent=False)
        return ops
    try:
        conn.send_packed_command(conn.pack_commands([("GET", k) for k in keys]))
    except Exception as exc:  # noqa: BLE001
        conn.disconnect()
        now = time.monotonic()
        outcome, text = classify_error(exc)
        for op in ops:
            history.complete(op, outcome, now, error=text)
        return ops
    broken: tuple[Outcome, str] | None = None
    for op in ops:
        if broken is not None:
            history.complete(op, broken[0], time.monotonic(), error=broken[1])
            continue
        try:
            reply = conn.read_response()
        except redis.ResponseError as exc:
            outcome, text = classify_error(exc)
            history.complete(op, outcome, time.monotonic(), error=text)
        except Exception as exc:  # noqa: BLE001
            conn.disconnect()  # a late reply must never be read as the next command's
            broken = classify_error(exc)
            history.complete(op, broken[0], time.monotonic(), error=broken[1])
        else:
            outcome, result, text = classify_reply("get", reply)
            history.complete(op, outcome, time.monotonic(), result=result, error=text)
    return ops


def _read_batch(conn: Connection, node: int, chunk: Sequence[bytes], history: History,
                out: dict[bytes, dict[int, Op]]) -> list[bytes]:  # fmt: skip
    failed: list[bytes] = []
    for op in pipelined_gets(conn, history, "final", node, chunk):
        out[op.key][node] = op
        if op.outcome not in (Outcome.NIL, Outcome.VALUE):
            failed.append(op.key)
    return failed

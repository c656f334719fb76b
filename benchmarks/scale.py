"""Scale benchmark: a 3-node respreg cluster holding 1,000,000 written keys against one holding 10,000.

    .venv/bin/python benchmarks/scale.py [--keys 1000000] [--json benchmarks/scale.json]
                                         [--results-md benchmarks/RESULTS.md] [--help for the rest]

What it checks (the issue's requirement): with N keys written, a node starts serving in under 2 s,
its resident memory stays under 300 MB, and GET and SETONCE throughput stay within 20 % of the
figures of a cluster holding 10,000 keys.

For each size (10,000 keys first, then --keys), in a fresh temp dir on --tmp-root:

1. A real 3-node cluster (`respreg serve` x 3) starts on empty data directories, so node.meta,
   peers.meta and the member identities are real; once every node votes, it is stopped.
2. The keys `scale:key:%012d` (0 .. N-1, the names redis-benchmark's `__rand_int__` expands to
   with `-r N`) are written offline into every node's directory through the project's storage
   API (`respreg.storage.KeyFiles.write_many`, so file names, fan-out and encoding are the
   project's own), in a process pool. Each file holds the state a chosen SETONCE leaves on an
   acceptor: promised == accepted == the proposer's ballot (round, node, incarnation from that
   node's node.meta), and the proposal (a distinct id, as a real proposer makes it, and the
   value). Proposers rotate over the 3 nodes. By default the pool skips the per-file fsync
   (`os.fsync` is a no-op inside the pool's worker processes only) and one `sync` follows;
   --populate-fsync keeps every fsync (much slower). Each node whose chosen log
   (`chosen.log`) recorded all the probe writes of step 1 (what a node does when it learns a
   write was chosen) gets every populated key appended to its log as well, through
   `respreg.chosenlog.ChosenLog`: the log a node keeps after it learned all those writes.
3. The cluster is started again; the time from the exec of each `respreg serve` to its first
   +PONG and to its first correct GET of a populated key is measured; then RSS (VmRSS, VmHWM of
   /proc/PID/status) and the nodes' cache sizes (INFO paxos) after start, after two runs of
   redis-benchmark GET over random populated keys, after reading every key once (a sweep that
   also checks every value), after a further GET run, after SETONCE of fresh keys, and after a
   restart of node 1 (timed the same way).

Everything runs on loopback; each process started here is stopped by its PID and the temp
dirs are removed at the end (--keep-temp keeps them). Writes a markdown section (printed, and
put at the end of --results-md, replacing an earlier "## Scale" section there) and a JSON file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    HOST,
    SCALE_SECTION_PREFIX,
    CommandLog,
    Server,
    ServerGroup,
    machine_facts,
    proc_cpu_seconds,
    run_measured,
    split_scale_section,
    tool_version,
)
from run import finite, git_describe, parse_benchmark_csv

from respreg import storage
from respreg.chosenlog import ChosenLog
from respreg.core import types as core_types
from respreg.core.chosen import pack
from respreg.core.types import AcceptorState, Ballot, Proposal

HERE = Path(__file__).resolve().parent
KEY_FORMAT = "scale:key:{:012d}"
VALUE_FORMAT = "scale-value-{:012d}"
NODES = 3
SECTION_PREFIX = SCALE_SECTION_PREFIX
START_LIMIT_S = 2.0
RSS_LIMIT_MB = 300.0
THROUGHPUT_FLOOR = 0.8


def storage_fingerprint() -> str:
    """Hash of respreg/storage.py as it is on disk now (it is edited concurrently: the populate and
    the servers must have used the same layout)."""
    return hashlib.sha256(Path(storage.__file__).read_bytes()).hexdigest()[:16]


STORAGE_AT_IMPORT = storage_fingerprint()


def key_of(i: int) -> bytes:
    return KEY_FORMAT.format(i).encode()


def value_of(i: int) -> bytes:
    return VALUE_FORMAT.format(i).encode()


# ---- a small RESP client (redis-benchmark does not check replies; this does) --------------------


class RespError(Exception):
    """An error reply (-ERR, -NOQUORUM, ...)."""


class Conn:
    """One blocking client connection with pipelining and a minimal RESP2 reply parser."""

    def __init__(self, port: int, timeout_s: float = 10.0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def encode(*args: bytes) -> bytes:
        parts = [b"*%d\r\n" % len(args)]
        for a in args:
            parts.append(b"$%d\r\n%s\r\n" % (len(a), a))
        return b"".join(parts)

    def send(self, payload: bytes) -> None:
        self.sock.sendall(payload)

    def _line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[: end + 2]
                return line
            self._fill()

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("connection closed by the server")
        self.buf += chunk

    def reply(self) -> bytes | int | None:
        """The next reply: bytes for simple and bulk strings, int for integers, None for nil."""
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            raise RespError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"_":
            return None
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self._fill()
            data = bytes(self.buf[:n])
            del self.buf[: n + 2]
            return data
        raise ConnectionError(f"unexpected reply {line[:80]!r}")

    def call(self, *args: bytes) -> bytes | int | None:
        self.send(self.encode(*args))
        return self.reply()


def info_paxos(port: int) -> dict[str, str]:
    with Conn(port, timeout_s=5.0) as c:
        raw = c.call(b"INFO", b"paxos")
    out: dict[str, str] = {}
    if isinstance(raw, bytes):
        for line in raw.decode(errors="replace").splitlines():
            name, sep, value = line.partition(":")
            if sep:
                out[name] = value.strip()
    return out


def proc_memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a live process, in kB."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    out[name] = int(rest.split()[0])
    except OSError:
        pass
    return out


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "0 0 0"


def pick_ports(n: int, start: int) -> list[int]:
    """n loopback ports from ``start`` upward that nobody listens on or is bound to now."""
    out: list[int] = []
    port = start
    while len(out) < n:
        if port > 65535:
            raise RuntimeError(f"no {n} free ports at or above {start}")
        s = socket.socket()
        try:
            s.bind((HOST, port))
            out.append(port)
        except OSError:
            pass
        finally:
            s.close()
        port += 1
    return out


# ---- offline population through the storage API --------------------------------------------------


def _no_fsync(fd: object) -> None:
    return None


def _populate_init(fsync: bool) -> None:
    """Pool worker start-up: without --populate-fsync, fsync is a no-op in this worker process."""
    if not fsync:
        os.fsync = _no_fsync


OWNER_ROUND_0 = "owner-round-0"
OTHERS_ROUND_0 = "others-round-0"
RECEIVER_ROUND_0 = "receiver-round-0"
RECEIVER_ROUNDS = "receiver-rounds"
#: The rules under which the key's owner holds nothing.
OWNER_OUT = (OTHERS_ROUND_0, RECEIVER_ROUND_0)
PROBES = 12


def owner_of_key(key: bytes, nodes: Sequence[int]) -> int | None:
    """The key's owner by respreg's own rule, or None where this respreg has no owners."""
    fn = getattr(core_types, "owner_of", None)
    return None if fn is None else int(fn(key, [core_types.NodeId(n) for n in nodes]))


@dataclass(frozen=True)
class Shape:
    """The state a chosen SETONCE leaves on every acceptor, as the probe writes showed it.

    Key i's write is taken to have reached node ``nodes[i % 3]`` (the receiver), as its
    ``seq_base + i // 3``-th operation, so its proposal id (receiver, receiver's incarnation,
    operation) is unique. Ballot rules seen in real writes:

    - ``owner-round-0``: promised = accepted = (0, owner of the key, owner's incarnation), the
      one-round-trip write of the key's owner (a write reaching another node is forwarded to it);
    - ``others-round-0``: the same on the two nodes other than the owner, nothing on the owner
      (a cluster of three, where the owner's acceptor stays out of round 0);
    - ``receiver-round-0``: promised = accepted = (0, receiver, receiver's incarnation) on the two
      nodes other than the owner, nothing on the owner (a cluster of three, where any node
      writes at round 0 itself with the two non-owners);
    - ``receiver-rounds``: promised = accepted = (operation, receiver, receiver's incarnation), the
      receiver running both Paxos phases itself.
    """

    rule: str
    incarnations: tuple[tuple[int, int], ...]  # (node id, incarnation of its populated life)
    seq_base: int = 1000

    def nodes(self) -> list[int]:
        return [n for n, _ in self.incarnations]

    def incarnation(self, node: int) -> int:
        return dict(self.incarnations)[node]

    def state(self, i: int) -> AcceptorState:
        nodes = self.nodes()
        receiver = nodes[i % len(nodes)]
        seq = self.seq_base + i // len(nodes)
        pid = struct.pack(">HQQ", receiver, self.incarnation(receiver), seq)  # as NodeServer.write makes it
        if self.rule in (OWNER_ROUND_0, OTHERS_ROUND_0):
            owner = owner_of_key(key_of(i), nodes)
            assert owner is not None
            ballot = Ballot(0, owner, self.incarnation(owner))
        elif self.rule == RECEIVER_ROUND_0:
            ballot = Ballot(0, receiver, self.incarnation(receiver))
        else:
            ballot = Ballot(seq, receiver, self.incarnation(receiver))
        return AcceptorState(promised=ballot, accepted=ballot, proposal=Proposal(pid, value_of(i)))

    def state_on(self, i: int, node: int) -> AcceptorState | None:
        """What node ``node`` holds for key i: :meth:`state`, or nothing on an owner that stays
        out of round 0."""
        if self.rule in OWNER_OUT and owner_of_key(key_of(i), self.nodes()) == node:
            return None
        return self.state(i)


def probe_key(i: int) -> bytes:
    return b"scale:probe:%04d" % i


def infer_shape(probes: dict[bytes, list[AcceptorState | None]], incarnations: dict[int, int], via: int) -> Shape:
    """Which ballot rule the probe writes (all sent to node ``via``) follow; raise if none fits."""
    nodes = sorted(incarnations)
    rules = {OWNER_ROUND_0, OTHERS_ROUND_0, RECEIVER_ROUND_0, RECEIVER_ROUNDS}
    problems: list[str] = []
    for key, states in probes.items():
        owner = owner_of_key(key, nodes)
        held = [st for st in states if st is not None]
        first = held[0] if held else None
        if first is None or first.proposal is None or any(st != first for st in held):
            problems.append(f"{key!r}: not one accepted state on the nodes that hold one: {states!r}")
            continue
        if len(held) == len(states):
            rules.discard(OTHERS_ROUND_0)
            rules.discard(RECEIVER_ROUND_0)
        elif len(held) == len(states) - 1 and owner in nodes and states[nodes.index(owner)] is None:
            rules.discard(OWNER_ROUND_0)
            rules.discard(RECEIVER_ROUNDS)
        else:
            problems.append(f"{key!r}: held by {len(held)} of {len(states)} nodes: {states!r}")
            continue
        b = first.accepted
        if first.promised != b or b.incarnation != incarnations.get(b.node):
            problems.append(f"{key!r}: promised {first.promised}, accepted {b} (incarnations {incarnations})")
        try:
            pid = struct.unpack(">HQQ", first.proposal.pid)
        except struct.error:
            pid = ()
        if pid[:2] != (via, incarnations[via]):
            problems.append(f"{key!r}: proposal id {first.proposal.pid.hex()} is not (node {via}, its incarnation, op)")
        if not (b.round == 0 and b.node == owner):
            rules.discard(OWNER_ROUND_0)
            rules.discard(OTHERS_ROUND_0)
        if not (b.round == 0 and b.node == via):
            rules.discard(RECEIVER_ROUND_0)
        if not (b.round >= 1 and b.node == via):
            rules.discard(RECEIVER_ROUNDS)
    if problems or len(rules) != 1:
        raise RuntimeError(
            "the probe writes left states this benchmark cannot replicate; update Shape: "
            + "; ".join(problems or [f"rules that fit: {sorted(rules)}: {probes!r}"])
        )
    return Shape(rules.pop(), tuple(sorted(incarnations.items())))


def _populate_chunk(roots: list[str], lo: int, hi: int, shape: Shape, batch: int) -> int:
    """Write keys lo..hi-1 into every node's store; ``roots`` are in the order of shape.nodes()."""
    files = [storage.KeyFiles(Path(r), workers=1, spares=0) for r in roots]
    try:
        for start in range(lo, hi, batch):
            for node, kf in zip(shape.nodes(), files, strict=True):
                items = [
                    (key_of(i), st)
                    for i in range(start, min(hi, start + batch))
                    if (st := shape.state_on(i, node)) is not None
                ]
                kf.write_many(items)
    finally:
        for kf in files:
            kf.close()
    return hi - lo


def populate(roots: list[Path], keys: int, shape: Shape, procs: int, fsync: bool) -> dict[str, Any]:
    chunk = 5000
    t0 = time.monotonic()
    done = 0
    last_print = t0
    with ProcessPoolExecutor(max_workers=procs, initializer=_populate_init, initargs=(fsync,)) as pool:
        futures = [
            pool.submit(_populate_chunk, [str(r) for r in roots], lo, min(keys, lo + chunk), shape, 1000)
            for lo in range(0, keys, chunk)
        ]
        for fut in futures:
            done += fut.result()
            now = time.monotonic()
            if now - last_print > 30:
                last_print = now
                rate = done / (now - t0)
                print(f"    populated {done:,}/{keys:,} keys x {len(roots)} nodes ({rate:,.0f} keys/s)", flush=True)
    write_s = time.monotonic() - t0
    files = keys * (len(roots) - (1 if shape.rule in OWNER_OUT else 0))
    t1 = time.monotonic()
    os.sync()
    sync_s = time.monotonic() - t1
    return {
        "keys": keys,
        "files": files,
        "processes": procs,
        "per_file_fsync": fsync,
        "write_s": round(write_s, 2),
        "sync_s": round(sync_s, 2),
        "total_s": round(write_s + sync_s, 2),
        "files_per_s": round(files / max(write_s + sync_s, 1e-9)),
    }


def learned_probes(data_dir: Path, probes: dict[bytes, AcceptorState]) -> int:
    """How many probe writes a node's chosen log records, with the proposal that was chosen."""
    clog = ChosenLog(data_dir, 0)
    try:
        logged = {k: e for batch in clog.load() for k, e in batch}
    finally:
        clog.close()
    p = {k: st.proposal for k, st in probes.items()}
    return sum(1 for k, x in p.items() if x is not None and logged.get(k) == pack(x.pid, x.value))


def populate_logs(data_dirs: list[Path], keys: int, shape: Shape) -> dict[str, Any]:
    """Append key i's chosen proposal to each given node's chosen log, what a node that learned
    every write keeps (through ChosenLog, so the format is the server's own)."""
    t0 = time.monotonic()
    size = 0
    for data_dir in data_dirs:
        clog = ChosenLog(data_dir, 0)
        for _ in clog.load():
            pass
        for start in range(0, keys, 10_000):
            records = []
            for i in range(start, min(keys, start + 10_000)):
                p = shape.state(i).proposal
                assert p is not None
                records.append((key_of(i), pack(p.pid, p.value)))
            clog.append(records)
        if clog.failed is not None:
            raise RuntimeError(f"chosen log of {data_dir}: {clog.failed}")
        size = clog.size
        clog.close()
    return {"nodes": len(data_dirs), "s": round(time.monotonic() - t0, 2), "bytes_per_node": size}


def check_populated_sample(roots: list[Path], keys: int, shape: Shape, n: int) -> int:
    """Load n random keys per node back through KeyFiles.load and compare; returns keys checked."""
    rng = random.Random(7)
    checked = 0
    for node, root in zip(shape.nodes(), roots, strict=True):
        kf = storage.KeyFiles(root, workers=1, spares=0)
        try:
            for i in rng.sample(range(keys), min(n, keys)):
                state = kf.load(key_of(i))
                if state != shape.state_on(i, node):
                    raise RuntimeError(f"populated key {i} in {root} reads back as {state!r}")
                checked += 1
        finally:
            kf.close()
    return checked


# ---- the cluster ---------------------------------------------------------------------------------


@dataclass
class StartTiming:
    node: int
    key: str
    ping_s: float | None = None
    get_s: float | None = None
    attempts_get: int = 0
    last_get_reply: str = ""


class Cluster:
    """Three `respreg serve` processes on loopback, each started (and restartable) by node id."""

    def __init__(self, root: Path, commands: CommandLog, base_port: int) -> None:
        self.root = root
        self.commands = commands
        ports = pick_ports(2 * NODES, base_port)
        self.client_ports = ports[:NODES]
        self.peer_ports = ports[NODES:]
        self.secret = root / "cluster.secret"
        self.secret.write_text("scale-benchmark-secret\n")
        self.secret.chmod(0o600)
        self.peers = ",".join(f"{i + 1}={HOST}:{self.peer_ports[i]}" for i in range(NODES))
        self.group = ServerGroup(f"respreg ({root.name})", commands)
        self.procs: dict[int, Server] = {}

    def data_dir(self, node: int) -> Path:
        return self.root / f"node{node}"

    def keys_dir(self, node: int) -> Path:
        return self.data_dir(node) / storage.KEYS_DIR_NAME

    def port(self, node: int) -> int:
        return self.client_ports[node - 1]

    def argv(self, node: int) -> list[str]:
        return [
            sys.executable, "-m", "respreg", "serve",
            "--id", str(node),
            "--port", str(self.port(node)),
            "--peer-port", str(self.peer_ports[node - 1]),
            "--bind", HOST,
            "--data-dir", str(self.data_dir(node)),
            "--peers", self.peers,
            "--cluster-secret-file", str(self.secret),
            "--log-level", "WARNING",
        ]  # fmt: skip

    def start(self, node: int) -> float:
        """Exec node ``node``; returns the monotonic time just before the exec."""
        t0 = time.monotonic()
        self.procs[node] = self.group.start(f"node {node}", self.argv(node), self.root / f"node{node}.log")
        return t0

    def stop(self, node: int) -> None:
        server = self.procs.pop(node)
        if server.proc.poll() is None:
            os.kill(server.pid, signal.SIGTERM)
        try:
            server.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(server.pid, signal.SIGKILL)
            server.proc.wait(timeout=20)
        self.group.servers.remove(server)

    def stop_all(self) -> None:
        self.group.stop()
        self.group.servers.clear()
        self.procs.clear()

    def pid(self, node: int) -> int:
        return self.procs[node].pid

    def check_alive(self) -> None:
        self.group.check_alive()

    def cpu_s(self) -> float:
        return sum(proc_cpu_seconds(s.pid) for s in self.procs.values())

    def wait_voting(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                infos = [info_paxos(self.port(n)) for n in self.procs]
                if all(i.get("acceptor") == "voting" and i.get("peers_up") == str(NODES - 1) for i in infos):
                    return
            except (OSError, RespError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"cluster in {self.root} not voting within {timeout_s:.0f} s")


def time_start(port: int, t0: float, index: int, out: StartTiming, timeout_s: float) -> None:
    """From exec time ``t0``: poll PING until +PONG, then GET of populated key ``index`` until it
    answers the right value (errors such as -NOQUORUM while peer links come up are retried)."""
    deadline = t0 + timeout_s
    key, value = key_of(index), value_of(index)
    while time.monotonic() < deadline:
        try:
            with Conn(port, timeout_s=2.0) as c:
                if c.call(b"PING") == b"PONG":
                    out.ping_s = time.monotonic() - t0
                    break
        except (OSError, RespError):
            pass
        time.sleep(0.002)
    while out.ping_s is not None and time.monotonic() < deadline:
        out.attempts_get += 1
        try:
            with Conn(port, timeout_s=5.0) as c:
                got = c.call(b"GET", key)
            if got == value:
                out.get_s = time.monotonic() - t0
                return
            out.last_get_reply = repr(got)[:200]
        except (OSError, RespError) as exc:
            out.last_get_reply = str(exc)[:200]
        time.sleep(0.002)


def start_timed(cluster: Cluster, nodes: list[int], keys: int, rng: random.Random) -> list[StartTiming]:
    """Exec the given nodes at once and time each from its own exec."""
    timings: list[StartTiming] = []
    threads: list[threading.Thread] = []
    for node in nodes:
        index = rng.randrange(keys)
        t0 = cluster.start(node)
        timing = StartTiming(node, key_of(index).decode())
        timings.append(timing)
        th = threading.Thread(target=time_start, args=(cluster.port(node), t0, index, timing, 60.0), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    for timing in timings:
        if timing.get_s is None:
            raise RuntimeError(f"node {timing.node} did not answer GET correctly: {timing.last_get_reply}")
    return timings


def verify_sample(port: int, keys: int, n: int, rng: random.Random) -> dict[str, Any]:
    """GET n random populated keys (pipelined) and compare each reply with the written value."""
    indexes = [rng.randrange(keys) for _ in range(n)]
    return read_keys(port, indexes, 500)


def read_keys(port: int, indexes: Sequence[int], batch: int) -> dict[str, Any]:
    wrong = errors = 0
    texts: dict[str, int] = {}
    with Conn(port, timeout_s=60.0) as c:
        for start in range(0, len(indexes), batch):
            part = indexes[start : start + batch]
            c.send(b"".join(Conn.encode(b"GET", key_of(i)) for i in part))
            for i in part:
                try:
                    if c.reply() != value_of(i):
                        wrong += 1
                except RespError as exc:
                    errors += 1
                    text = str(exc)[:80]
                    if text in texts or len(texts) < 10:
                        texts[text] = texts.get(text, 0) + 1
    return {"read": len(indexes), "wrong": wrong, "errors": errors, "error_texts": texts}


class StallMonitor:
    """PINGs every node of a cluster every 50 ms on its own connection while a workload runs. PING
    is answered by the node's event loop, so a slow PING is a node whose loop was blocked (or not
    scheduled): the same stall that makes its peers declare the link dead after 1 s."""

    def __init__(self, cluster: Cluster, interval_s: float = 0.05) -> None:
        self.ports = {node: cluster.port(node) for node in sorted(cluster.procs)}
        self.interval_s = interval_s
        self.stop = threading.Event()
        self.stats: dict[int, dict[str, float]] = {
            n: {"max_ms": 0.0, "over_250ms": 0, "over_1s": 0, "pings": 0, "errors": 0} for n in self.ports
        }
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in self.ports]

    def __enter__(self) -> StallMonitor:
        for th in self.threads:
            th.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for th in self.threads:
            th.join()

    def _run(self, node: int) -> None:
        st = self.stats[node]
        conn: Conn | None = None
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = Conn(self.ports[node], timeout_s=30.0)
                t = time.monotonic()
                conn.call(b"PING")
                ms = 1000.0 * (time.monotonic() - t)
                st["pings"] += 1
                st["max_ms"] = max(st["max_ms"], round(ms, 1))
                st["over_250ms"] += ms > 250
                st["over_1s"] += ms > 1000
            except (OSError, RespError):
                st["errors"] += 1
                if conn is not None:
                    conn.close()
                conn = None
            self.stop.wait(self.interval_s)
        if conn is not None:
            conn.close()

    def result(self) -> dict[str, dict[str, float]]:
        return {str(n): dict(v) for n, v in self.stats.items()}


# ---- measurements --------------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    title: str
    command: str = ""
    requests: int = 0
    clients: int = 0
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    wall_s: float = 0.0
    server_cpu_us_per_op: float | None = None
    node1_counters: dict[str, int] = field(default_factory=dict)
    load_avg_1m: float = 0.0
    status: str = "ok"
    ping_stalls: dict[str, dict[str, float]] = field(default_factory=dict)


def name_is_get(name: str) -> bool:
    return name.startswith("get-")


COUNTERS = ("reads_started", "reads_local", "writes_started", "ops_chosen", "ops_empty", "read_received")


class SizeRun:
    """Everything measured on one cluster size."""

    def __init__(self, args: argparse.Namespace, keys: int, root: Path, commands: CommandLog, base_port: int) -> None:
        self.args = args
        self.keys = keys
        self.root = root
        self.commands = commands
        self.cluster = Cluster(root, commands, base_port)
        self.rng = random.Random(keys)
        self.result: dict[str, Any] = {"keys": keys, "data_dir": str(root)}
        self.memory: list[dict[str, Any]] = []
        self.workloads: list[Workload] = []

    # -- phases --

    def prepare(self) -> None:
        c = self.cluster
        print(f"  [{self.keys:,} keys] first start on empty directories, {PROBES} probe SETONCEs", flush=True)
        t = time.monotonic()
        for node in range(1, NODES + 1):
            c.start(node)
        try:
            c.wait_voting(60)
            with Conn(c.port(1)) as conn:
                for i in range(PROBES):
                    reply = conn.call(b"SETONCE", probe_key(i), b"probe-%d" % i)
                    if reply != b"OK":
                        raise RuntimeError(f"probe SETONCE {probe_key(i)!r} answered {reply!r}")
        finally:
            c.stop_all()
        init_s = time.monotonic() - t
        incarnations: dict[int, int] = {}
        for node in range(1, NODES + 1):
            meta = storage.NodeMeta.decode((c.data_dir(node) / storage.META_NAME).read_bytes())
            if meta.status != storage.VOTING:
                raise RuntimeError(f"node {node} is not voting after its first start: status {meta.status}")
            incarnations[meta.node_id] = meta.incarnation
        roots = [c.keys_dir(n) for n in range(1, NODES + 1)]
        probes: dict[bytes, list[AcceptorState | None]] = {probe_key(i): [] for i in range(PROBES)}
        for root in roots:
            kf = storage.KeyFiles(root, workers=1, spares=0)
            try:
                for key, states in probes.items():
                    states.append(kf.load(key))
                leaf_example = str(kf.path_for(key_of(0)).relative_to(self.root))
            finally:
                kf.close()
        shape = infer_shape(probes, incarnations, 1)
        # Which nodes' chosen logs the probe writes reached: every probe, or none (a node that
        # learned some but not all would be a shape this benchmark cannot replicate).
        chosen = {k: next(st for st in states if st is not None) for k, states in probes.items()}
        learned = {n: learned_probes(c.data_dir(n), chosen) for n in range(1, NODES + 1)}
        if any(0 < v < PROBES for v in learned.values()):
            raise RuntimeError(f"probe writes reached some chosen logs only in part: {learned}")
        log_nodes = [n for n, v in learned.items() if v == PROBES]
        before = shutil.disk_usage(self.root)
        print(
            f"  [{self.keys:,} keys] populating the stores of {NODES} nodes ({self.args.procs} processes, "
            f"ballot rule {shape.rule} as the probes showed)",
            flush=True,
        )
        pop = populate(roots, self.keys, shape, self.args.procs, self.args.populate_fsync)
        pop["chosen_logs"] = populate_logs([c.data_dir(n) for n in log_nodes], self.keys, shape)
        pop["chosen_logs"]["probes_learned"] = learned
        after = shutil.disk_usage(self.root)
        pop["disk_used_delta_mb"] = round((after.used - before.used) / 2**20, 1)
        pop["first_start_s"] = round(init_s, 2)
        pop["sample_checked"] = check_populated_sample(roots, self.keys, shape, 200)
        pop["shape"] = {"rule": shape.rule, "incarnations": dict(shape.incarnations), "seq_base": shape.seq_base}
        pop["probe_example"] = repr(next(st for st in probes[probe_key(0)] if st is not None))
        pop["populated_example"] = repr(shape.state(0))
        pop["leaf_example"] = leaf_example
        pop["storage_py_sha256"] = storage_fingerprint()
        self.result["populate"] = pop
        print(
            f"  [{self.keys:,} keys] populated in {pop['total_s']:.1f} s "
            f"(write {pop['write_s']:.1f} s + sync {pop['sync_s']:.1f} s, {pop['files_per_s']:,} files/s)",
            flush=True,
        )

    def snapshot(self, phase: str) -> None:
        c = self.cluster
        entry: dict[str, Any] = {"phase": phase, "nodes": {}}
        for node in sorted(c.procs):
            mem = proc_memory_kb(c.pid(node))
            try:
                info = info_paxos(c.port(node))
            except (OSError, RespError):
                info = {}
            entry["nodes"][str(node)] = {
                "pid": c.pid(node),
                "rss_mb": round(mem.get("VmRSS", 0) / 1024, 1),
                "hwm_mb": round(mem.get("VmHWM", 0) / 1024, 1),
                "cached_states": int(info.get("cached_states", "-1")),
                "cached_chosen": int(info.get("cached_chosen", "-1")),
            }
        self.memory.append(entry)
        worst = max(n["rss_mb"] for n in entry["nodes"].values())
        chosen = max(n["cached_chosen"] for n in entry["nodes"].values())
        print(f"    RSS {phase}: max {worst:.1f} MB over the nodes (cached_chosen max {chosen:,})", flush=True)

    def start_cluster(self) -> None:
        print(f"  [{self.keys:,} keys] timed start of the 3 nodes", flush=True)
        timings = start_timed(self.cluster, list(range(1, NODES + 1)), self.keys, self.rng)
        self.result["cluster_start"] = [asdict(t) for t in timings]
        for t in timings:
            print(f"    node {t.node}: PING after {t.ping_s:.3f} s, correct GET after {t.get_s:.3f} s", flush=True)
        self.snapshot("after start")
        self.result["verify_after_start"] = {
            str(n): verify_sample(self.cluster.port(n), self.keys, 300, self.rng) for n in range(1, NODES + 1)
        }
        self.snapshot("after start and 300 verified GETs per node")

    def node1_counters(self) -> dict[str, int]:
        info = info_paxos(self.cluster.port(1))
        return {k: int(info.get(k, "0")) for k in COUNTERS}

    def bench(self, w: Workload, argv: list[str]) -> None:
        """Run one redis-benchmark; a failure (redis-benchmark exits at the first error reply) is
        recorded in the workload's status and the run goes on."""
        c = self.cluster
        before = self.node1_counters()
        cpu0 = c.cpu_s()
        with StallMonitor(c) as stalls:
            m = run_measured(f"{w.name} ({self.keys:,} keys)", argv, self.commands, timeout_s=900)
        cpu1 = c.cpu_s()
        after = self.node1_counters()
        w.command = self.commands.entries[-1][1]
        w.wall_s = round(m.wall_s, 2)
        w.node1_counters = {k: after[k] - before[k] for k in COUNTERS}
        w.load_avg_1m = float(loadavg().split()[0])
        w.ping_stalls = stalls.result()
        self.workloads.append(w)
        if m.timed_out or m.returncode != 0 or "Error from server" in m.stdout + m.stderr:
            text = " ".join((m.stderr + m.stdout).split())
            w.status = f"failed after {m.wall_s:.1f} s (exit {m.returncode}): {text[-300:]}"
            print(f"    {w.title}: {w.status}", flush=True)
            c.check_alive()
            return
        parsed = parse_benchmark_csv(m.stdout)
        w.rps = parsed["rps"]
        w.p50_ms = parsed.get("p50_latency_ms")
        w.p99_ms = parsed.get("p99_latency_ms")
        w.server_cpu_us_per_op = round(1e6 * (cpu1 - cpu0) / max(w.requests, 1), 1)
        c.check_alive()
        started = w.node1_counters["reads_started"]
        extra = f", {started:,} of {w.requests:,} GETs needed a Paxos read" if name_is_get(w.name) else ""
        worst = max((v["max_ms"] for v in w.ping_stalls.values()), default=0.0)
        print(
            f"    {w.title}: {w.rps:,.0f} ops/s (p50 {w.p50_ms} ms, p99 {w.p99_ms} ms{extra}; "
            f"slowest PING {worst:.0f} ms)",
            flush=True,
        )

    def redis_benchmark(self, clients: int, n: int, rand: int, command: list[str]) -> list[str]:
        return [
            "redis-benchmark", "-h", HOST, "-p", str(self.cluster.port(1)),
            "-c", str(clients), "-n", str(n), "-P", "1", "--csv", "-r", str(rand), *command,
        ]  # fmt: skip

    def get_run(self, name: str, title: str) -> None:
        a = self.args
        w = Workload(name, title, requests=a.get_requests, clients=a.get_clients)
        argv = self.redis_benchmark(a.get_clients, a.get_requests, self.keys, ["GET", "scale:key:__rand_int__"])
        self.bench(w, argv)

    def sweep(self) -> None:
        """GET every populated key once through node 1 (checking each value): the worst case for the
        chosen-value cache, which the random GET runs only partly fill."""
        count = int(self.keys * self.args.sweep_fraction)
        print(f"  [{self.keys:,} keys] sweep: GET of {count:,} keys in order, values checked", flush=True)
        t = time.monotonic()
        with StallMonitor(self.cluster) as stalls:
            res = read_keys(self.cluster.port(1), range(count), 512)
        wall = time.monotonic() - t
        self.result["sweep"] = {
            **res,
            "wall_s": round(wall, 1),
            "keys_per_s": round(count / max(wall, 1e-9)),
            "ping_stalls": stalls.result(),
        }
        print(f"    sweep: {count / wall:,.0f} keys/s, {res['wrong']} wrong, {res['errors']} errors", flush=True)

    def profile(self) -> None:
        """py-spy samples node 1 during an extra GET run (not a measured one): where the time goes."""
        secs = self.args.profile_seconds
        out = self.root / "node1-get.pyspy.txt"
        argv = ["py-spy", "record", "-p", str(self.cluster.pid(1)), "-d", str(secs), "-r", "50", "-f", "raw"]
        argv += ["-o", str(out), "--native"]  # native frames show the garbage collector; they need pauses
        pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        argv[0] = pyspy
        self.commands.add(f"profile of node 1 during GET ({self.keys:,} keys)", argv)
        prof = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            load = self.redis_benchmark(self.args.get_clients, 10_000_000, self.keys, ["GET", "scale:key:__rand_int__"])
            self.commands.add("load while profiling (stopped when py-spy ends)", load)
            gen = subprocess.Popen(load, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                prof.wait(timeout=secs + 60)
            finally:
                gen.kill()
                gen.wait()
        finally:
            if prof.poll() is None:
                prof.kill()
            _, err = prof.communicate()
        self.result["profile_get"] = summarize_pyspy(out) if out.exists() else {"error": err.decode()[-500:]}

    def write_warmup(self) -> None:
        a = self.args
        warm = Workload("setonce-warmup", "SETONCE warm-up", requests=a.write_clients * 4, clients=a.write_clients)
        cmd = ["SETONCE", f"scale:fresh:{self.keys}:{os.getpid()}:w:__rand_int__", "v"]
        self.bench(warm, self.redis_benchmark(a.write_clients, warm.requests, 100_000_000, cmd))

    def write_run(self, name: str) -> None:
        a = self.args
        w = Workload(
            name,
            f"SETONCE of fresh keys, {a.write_clients} clients ({name[-1]})",
            requests=a.write_requests,
            clients=a.write_clients,
        )
        cmd = ["SETONCE", f"scale:fresh:{self.keys}:{os.getpid()}:{name}:__rand_int__", "v"]
        self.bench(w, self.redis_benchmark(a.write_clients, a.write_requests, 100_000_000, cmd))

    def restart_node1(self) -> None:
        """Stop node 1 and exec it again while nodes 2 and 3 run, --restarts times, each timed."""
        timings = []
        for n in range(self.args.restarts):
            self.cluster.stop(1)
            (timing,) = start_timed(self.cluster, [1], self.keys, self.rng)
            timings.append(asdict(timing))
            print(
                f"  [{self.keys:,} keys] restart {n + 1} of node 1 (nodes 2 and 3 running): PING after "
                f"{timing.ping_s:.3f} s, correct GET after {timing.get_s:.3f} s",
                flush=True,
            )
        self.result["restarts_node1"] = timings
        self.snapshot("node 1 restarted")

    def profile_start(self) -> None:
        """One more start of node 1, under py-spy for its first seconds (py-spy ends the process):
        what a start spends its CPU on, beside the timed starts."""
        secs = 3
        out = self.root / "node1-start.pyspy.txt"
        self.cluster.stop(1)
        pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        argv = [pyspy, "record", "-d", str(secs), "-r", "250", "-f", "raw", "-o", str(out), "--"]
        argv += self.cluster.argv(1)
        self.commands.add(f"profile of a start of node 1 ({self.keys:,} keys)", argv)
        log = open(self.root / "node1-pyspy.log", "ab")
        prof = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        child: int | None = None
        try:
            deadline = time.monotonic() + secs + 60
            while prof.poll() is None and time.monotonic() < deadline:
                if child is None:
                    try:
                        kids = Path(f"/proc/{prof.pid}/task/{prof.pid}/children").read_text().split()
                        child = int(kids[0]) if kids else None
                    except OSError:
                        pass
                time.sleep(0.05)
        finally:
            log.close()
            if prof.poll() is None:
                prof.kill()
            prof.wait()
            if child is not None and Path(f"/proc/{child}").exists():
                try:
                    os.kill(child, signal.SIGKILL)  # the node py-spy started, if py-spy did not end it
                except ProcessLookupError:
                    pass
        self.result["profile_start"] = summarize_pyspy(out) if out.exists() else {"error": "py-spy wrote nothing"}

    def finish(self) -> None:
        self.cluster.stop_all()
        logs: dict[str, Any] = {}
        for node in range(1, NODES + 1):
            try:
                lines = (self.root / f"node{node}.log").read_text(errors="replace").splitlines()
            except OSError:
                continue
            noted = [ln for ln in lines if " WARNING " in ln or " ERROR " in ln or "Traceback" in ln]
            logs[str(node)] = {"warnings_or_errors": len(noted), "first": noted[:8]}
        self.result["node_logs"] = logs
        if "populate" in self.result:
            # What every start pays in the storage layer, timed alone (page cache warm by now).
            times = []
            for _ in range(3):
                t = time.monotonic()
                kf = storage.KeyFiles(self.cluster.keys_dir(1), workers=1, spares=0)
                times.append(round(time.monotonic() - t, 3))
                kf.close()
            self.result["keyfiles_open_s"] = times
        self.result["memory"] = self.memory
        self.result["workloads"] = [asdict(w) for w in self.workloads]


def measure(base: SizeRun, big: SizeRun, args: argparse.Namespace) -> None:
    """Both clusters run side by side and every workload runs on one right after the other, so that
    other work on the machine (it is shared) weighs on both figures of a pair alike."""
    both = (base, big)
    for s in both:
        s.prepare()
    args.storage_before_start = storage_fingerprint()
    for s in both:
        s.start_cluster()
    for name, title in (
        ("get-1", "GET random populated keys, run 1 (first after start)"),
        ("get-2", "GET random populated keys, run 2"),
    ):
        for s in both:
            s.get_run(name, title)
            s.snapshot(f"after GET {name[-1]}")
    if args.profile_seconds > 0:
        big.profile()
        big.snapshot("after the profiled GET load")
    if args.sweep_fraction > 0:
        for s in both:
            s.sweep()
            s.snapshot("after the sweep")
        for s, name in ((base, "get-3a"), (big, "get-3a"), (big, "get-3b"), (base, "get-3b")):
            s.get_run(name, f"GET random populated keys after the sweep ({name[-1]})")
        for s in both:
            s.snapshot("after GET 3")
    for s in both:
        s.write_warmup()
    # ABBA order: a drift of the background load over the four runs cancels out in the means.
    for s, name in ((base, "setonce-a"), (big, "setonce-a"), (big, "setonce-b"), (base, "setonce-b")):
        s.write_run(name)
    for s in both:
        s.snapshot("after SETONCE")
    for s in both:
        s.restart_node1()
    if args.profile_start:
        for s in both:
            s.profile_start()


def summarize_pyspy(path: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares per function (line numbers dropped) from py-spy's raw
    (folded) output; frames found in nearly every sample (the interpreter and event-loop entry
    points) are left out of the inclusive list."""
    self_counts: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = importing = collecting = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        total += count
        frames = [_function_of(f) for f in stack.split(";") if f.strip()]
        if any("importlib._bootstrap" in f for f in frames):
            importing += count
        if any(f.startswith("gc_collect_main ") for f in frames):
            collecting += count
        if frames:
            self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + count
        for f in set(frames):
            incl[f] = incl.get(f, 0) + count

    def share(d: dict[str, int], skip_above: float) -> list[tuple[str, float]]:
        items = [(name, 100.0 * c / max(total, 1)) for name, c in sorted(d.items(), key=lambda kv: -kv[1])]
        return [(name, round(pct, 1)) for name, pct in items if pct <= skip_above][:top]

    wrappers = ("respreg/__main__.py", "respreg/cli.py", "run_forever (")
    own = {name: c for name, c in incl.items() if "respreg/" in name and not any(w in name for w in wrappers)}
    return {
        "samples": total,
        "importing_pct": round(100.0 * importing / max(total, 1), 1),
        "gc_pct": round(100.0 * collecting / max(total, 1), 1),
        "self_pct": share(self_counts, 100.0),
        "inclusive_pct": share(incl, 95.0),
        "respreg_inclusive_pct": share(own, 100.0),
    }


def _function_of(frame: str) -> str:
    """'NodeCore.chosen (respreg/core/node.py:231)' -> 'NodeCore.chosen (respreg/core/node.py)'."""
    frame = frame.strip()
    head, sep, loc = frame.rpartition(" (")
    if not sep:
        return frame
    return f"{head} ({loc.rstrip(')').rsplit(':', 1)[0]})"


# ---- report --------------------------------------------------------------------------------------


def _mb(x: float | None) -> str:
    return "–" if x is None else f"{x:,.0f} MB"


def _s(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f} s"


def _rps(x: float | None) -> str:
    return "–" if x is None else f"{x:,.0f}"


def _max_mem(run: dict[str, Any], phase_prefix: str, what: str) -> float | None:
    vals = [
        node[what]
        for entry in run.get("memory", [])
        if entry["phase"].startswith(phase_prefix)
        for node in entry["nodes"].values()
    ]
    return max(vals) if vals else None


def _workload(run: dict[str, Any], name: str) -> dict[str, Any] | None:
    for w in run.get("workloads", []):
        if w["name"] == name:
            return dict(w)
    return None


def _failed(run: dict[str, Any], names: Sequence[str]) -> list[dict[str, Any]]:
    return [w for w in run.get("workloads", []) if w["name"] in names and w.get("status", "ok") != "ok"]


def _mean_rps(run: dict[str, Any], names: Sequence[str]) -> float | None:
    vals = [w["rps"] for w in run.get("workloads", []) if w["name"] in names and w["rps"] is not None]
    return sum(vals) / len(vals) if vals else None


def _restart_max(run: dict[str, Any], what: str) -> float | None:
    vals = [t[what] for t in run.get("restarts_node1", []) if t[what] is not None]
    return max(vals) if vals else None


def _texts(texts: dict[str, int] | None) -> str:
    if not texts:
        return ""
    return " (" + ", ".join(f"{n:,} × `{t}`" for t, n in sorted(texts.items(), key=lambda kv: -kv[1])) + ")"


def _stalls(stalls: dict[str, dict[str, float]]) -> str:
    if not stalls:
        return "–"
    return " / ".join(f"{stalls[k]['max_ms']:,.0f}" for k in sorted(stalls))


def _verdict(ok: bool | None) -> str:
    return "–" if ok is None else ("meets" if ok else "**fails**")


def render(results: dict[str, Any]) -> str:
    meta = results["meta"]
    base, big = results["runs"]["baseline"], results["runs"]["scale"]
    nb, nk = base["keys"], big["keys"]
    lines: list[str] = [f"{SECTION_PREFIX}{nk:,} keys)", ""]
    lines.append(
        f"Reproduce with `{meta['command']}` (written by `benchmarks/scale.py`; every figure and command is also "
        f"in `benchmarks/scale.json`). Run started {meta['started_utc']}, took {meta['duration_s']:.0f} s, on "
        f"{meta['machine']['nproc']} cores ({meta['machine']['cpu_model']}), data in a temp dir on "
        f"{meta['machine']['temp_dir_filesystem']}. Load average (1/5/15 min) before: {meta['load_average_before']}, "
        f"after: {meta['load_average_after']}."
    )
    lines.append("")
    lines.append(
        f"Two 3-node clusters (`respreg serve` x 3 on loopback), one holding {nb:,} written keys and one holding "
        f"{nk:,}, running side by side and taking turns for every workload (the machine is shared; see the load "
        f"column). Keys `scale:key:%012d` (0 .. N-1, what redis-benchmark's `__rand_int__` expands to with `-r N`) "
        f"with values `scale-value-%012d` were written offline into each node's data directory through "
        f"`respreg.storage.KeyFiles.write_many` (the project's own file names, fan-out and encoding; e.g. "
        f"`{big['populate']['leaf_example']}`), each file holding the state a chosen SETONCE leaves on an acceptor. "
        f"The shape was taken from {PROBES} real SETONCEs sent to node 1 during a first start of each cluster on "
        f"empty directories (which also made node.meta and peers.meta real); they showed the ballot rule "
        f"`{big['populate']['shape']['rule']}`, e.g. `{big['populate']['probe_example']}`, so key i holds "
        f"e.g. `{big['populate']['populated_example']}` (key 0): a distinct proposal id per key, receivers "
        f"rotating over the 3 nodes."
    )
    lines.append("")
    lines.append(f"| figure | {nb:,} keys | {nk:,} keys | requirement | verdict at {nk:,} |")
    lines.append("|---|---:|---:|---|---|")

    def start_max(run: dict[str, Any], what: str) -> float | None:
        vals = [t[what] for t in run.get("cluster_start", []) if t[what] is not None]
        return max(vals) if vals else None

    for label, what in (("first +PONG", "ping_s"), ("first correct GET of a populated key", "get_s")):
        b, k = start_max(base, what), start_max(big, what)
        ok = None if k is None else k < START_LIMIT_S
        lines.append(
            f"| cluster start: exec of `respreg serve` to {label} (slowest of 3 nodes) | {_s(b)} | {_s(k)} | "
            f"< {START_LIMIT_S:.0f} s | {_verdict(ok)} |"
        )
    for label, what in (("first +PONG", "ping_s"), ("first correct GET", "get_s")):
        b2, k2 = _restart_max(base, what), _restart_max(big, what)
        ok = None if k2 is None else k2 < START_LIMIT_S
        lines.append(
            f"| restart of node 1 while 2 and 3 run: exec to {label} (slowest of "
            f"{len(big.get('restarts_node1', []))}) | {_s(b2)} | {_s(k2)} | < {START_LIMIT_S:.0f} s | "
            f"{_verdict(ok)} |"
        )
    for label, prefix in (
        ("RSS after start (largest node)", "after start and"),
        ("RSS after GET runs 1 and 2", "after GET 2"),
        ("RSS after reading every key once (sweep)", "after the sweep"),
        ("RSS after SETONCE", "after SETONCE"),
    ):
        b3, k3 = _max_mem(base, prefix, "rss_mb"), _max_mem(big, prefix, "rss_mb")
        ok = None if k3 is None else k3 < RSS_LIMIT_MB
        lines.append(f"| {label} | {_mb(b3)} | {_mb(k3)} | < {RSS_LIMIT_MB:.0f} MB | {_verdict(ok)} |")
    b4, k4 = _max_mem(base, "", "hwm_mb"), _max_mem(big, "", "hwm_mb")
    ok4 = None if k4 is None else k4 < RSS_LIMIT_MB
    lines.append(
        f"| peak RSS (VmHWM), largest node, whole run | {_mb(b4)} | {_mb(k4)} | < {RSS_LIMIT_MB:.0f} MB | "
        f"{_verdict(ok4)} |"
    )
    rows: list[tuple[str, list[str], list[str]]] = []
    for name in ("get-1", "get-2"):
        if _workload(base, name) is not None or _workload(big, name) is not None:
            title = str((_workload(big, name) or _workload(base, name) or {}).get("title", name))
            rows.append((title, [name], [name]))
    if _workload(big, "get-3a") is not None:
        rows.append(
            ("GET random populated keys after the sweep (mean of 2 runs, ABBA order)", ["get-3a", "get-3b"], [])
        )
    title = f"SETONCE of fresh keys, {meta['write_clients']} clients (mean of 2 runs, ABBA order)"
    rows.append((title, ["setonce-a", "setonce-b"], []))
    for title, names, _ in rows:
        rb, rk = _mean_rps(base, names), _mean_rps(big, names)
        failed = [f"{run['keys']:,} keys {w['name']}" for run in (base, big) for w in _failed(run, names)]
        ratio = rk / rb if rb and rk else None
        if failed:
            verdict = f"**fails**: {', '.join(failed)} ended with an error reply (below)"
        elif ratio is None:
            verdict = "–"
        else:
            verdict = f"{_verdict(ratio >= THROUGHPUT_FLOOR)}: {ratio:.2f} × the {nb:,}-key figure"
        lines.append(
            f"| {title}, ops/s | {_rps(rb)} | {_rps(rk)} | ≥ {THROUGHPUT_FLOOR:.1f} × the {nb:,}-key figure | "
            f"{verdict} |"
        )
    lines.append("")

    lines.extend(observations(base, big))
    fp = meta["storage_py_sha256"]
    if len(set(fp.values())) > 1:
        lines.append(
            f"**Warning:** `respreg/storage.py` changed during the run (sha256 prefixes {fp}): the populated "
            f"layout and the servers' may differ, so start-up figures may include a layout migration."
        )
        lines.append("")
    lines.append("Populate (offline, not part of any figure above):")
    lines.append("")
    for run in (base, big):
        p = run["populate"]
        fs = "fsync per file" if p["per_file_fsync"] else "no per-file fsync (pool workers only), one `sync` after"
        lines.append(
            f"- {run['keys']:,} keys: {p['files']:,} files written in {p['write_s']:.1f} s + `sync` "
            f"{p['sync_s']:.1f} s = {p['total_s']:.1f} s ({p['files_per_s']:,} files/s, {p['processes']} processes, "
            f"{fs}); disk use grew by about {p['disk_used_delta_mb']:,.0f} MB; first real start on empty "
            f"directories {p['first_start_s']:.1f} s; {p['sample_checked']} files read back through "
            f"`KeyFiles.load` and compared."
        )
        logs = p.get("chosen_logs")
        if logs:
            lines.append(
                f"  Chosen logs: the probe writes were in the logs of nodes "
                f"{', '.join(str(n) for n, v in sorted(logs['probes_learned'].items()) if v)} (of "
                f"{len(logs['probes_learned'])}); {logs['nodes']} logs of {logs['bytes_per_node'] / 2**20:,.1f} MiB "
                f"each written in {logs['s']:.1f} s through `respreg.chosenlog.ChosenLog`."
            )
    for run in (base, big):
        if run.get("keyfiles_open_s"):
            lines.append(
                f"- Opening a node's store at {run['keys']:,} keys (`respreg.storage.KeyFiles(...)`, which every "
                f"start runs before serving), timed alone after the run: {run['keyfiles_open_s']} s."
            )
    lines.append("")

    lines.append(
        "Node start, from the exec of each `respreg serve` (all 3 of a cluster started at once, then node 1 "
        "restarted while nodes 2 and 3 ran); a GET answered -NOQUORUM until the node's peer links were up, and "
        "was retried every 2 ms:"
    )
    lines.append("")
    lines.append("| keys | node | first +PONG | first correct GET | GET attempts |")
    lines.append("|---:|---|---:|---:|---:|")
    for run in (base, big):
        starts = [*run.get("cluster_start", [])]
        starts += [{**t, "node": f"1, restart {i + 1}"} for i, t in enumerate(run.get("restarts_node1", []))]
        for t in starts:
            lines.append(
                f"| {run['keys']:,} | {t['node']} | {_s(t['ping_s'])} | {_s(t['get_s'])} | {t['attempts_get']} |"
            )
    lines.append("")
    floor = meta.get("import_floor_s")
    if floor:
        lines.append(
            f"- For scale: starting the interpreter and importing the server alone "
            f"(`python -c 'import respreg.server, respreg.client'`) took {floor} s on this machine."
        )
    for run in (base, big):
        prof = run.get("profile_start")
        if prof and "inclusive_pct" in prof:
            shares = ", ".join(f"`{name}` {pct} %" for name, pct in prof["respreg_inclusive_pct"][:8])
            lines.append(
                f"- A further start of node 1 at {run['keys']:,} keys under py-spy (`record -r 250 -f raw -d 3`: "
                f"its first 3 s): {prof['samples']:,} non-idle samples of 4 ms, {prof['importing_pct']} % of them "
                f"importing modules; inclusive shares of respreg functions: {shares}."
            )
    lines.append("")
    lines.append(
        "Memory per phase: RSS of each node, the largest peak RSS (VmHWM) so far, and what the caches held "
        "(`INFO paxos` cached_states / cached_chosen, the largest over the 3 nodes):"
    )
    lines.append("")
    lines.append("| keys | phase | RSS node 1 / 2 / 3 | VmHWM max | cached_states max | cached_chosen max |")
    lines.append("|---:|---|---|---:|---:|---:|")
    for run in (base, big):
        for entry in run.get("memory", []):
            nodes = entry["nodes"]
            rss = " / ".join(f"{nodes[k]['rss_mb']:.0f}" for k in sorted(nodes))
            hwm = max(n["hwm_mb"] for n in nodes.values())
            states = max(n["cached_states"] for n in nodes.values())
            chosen = max(n["cached_chosen"] for n in nodes.values())
            lines.append(f"| {run['keys']:,} | {entry['phase']} | {rss} MB | {hwm:.0f} MB | {states:,} | {chosen:,} |")
    lines.append("")

    lines.append(
        "Workloads (redis-benchmark against node 1, `-P 1`, in the order run; the two clusters ran side by side "
        "and took turns. *Paxos reads* is node 1's INFO paxos `reads_started` delta: GETs its chosen-value cache "
        "could not answer, each a read phase to every node (and a file read on each):"
    )
    lines.append("")
    lines.append(
        "| keys | workload | requests | ops/s | p50 ms | p99 ms | server CPU µs/op | Paxos reads | "
        "slowest PING ms, node 1/2/3 | load 1m |"
    )
    lines.append("|---:|---|---:|---:|---:|---:|---:|---:|---|---:|")
    failures: list[str] = []
    for run in (base, big):
        for w in run.get("workloads", []):
            c = w["node1_counters"]
            reads = f"{c['reads_started']:,}" if name_is_get(w["name"]) else "–"
            cpu = "–" if w["server_cpu_us_per_op"] is None else f"{w['server_cpu_us_per_op']:,}"
            ok = w.get("status", "ok") == "ok"
            rps = _rps(w["rps"]) if ok else "**failed**"
            lines.append(
                f"| {run['keys']:,} | {w['title']} | {w['requests']:,} | {rps} | {w['p50_ms'] or '–'} | "
                f"{w['p99_ms'] or '–'} | {cpu} | {reads} | {_stalls(w.get('ping_stalls', {}))} | {w['load_avg_1m']} |"
            )
            if not ok:
                failures.append(f"- {run['keys']:,} keys, {w['title']}: {w['status']}")
    lines.append("")
    lines.append(
        "*Slowest PING*: a separate connection to every node of the cluster under test sent PING every 50 ms "
        "during the run; PING is answered by the node's event loop, so this is the longest time a node's loop "
        "did not run (peers declare a link dead after 1 s without an answer)."
    )
    lines.append("")
    if failures:
        lines.append("Failed runs (redis-benchmark stops at the first error reply):")
        lines.append("")
        lines.extend(failures)
        lines.append("")
    for run in (base, big):
        sw = run.get("sweep")
        if sw:
            lines.append(
                f"- Sweep at {run['keys']:,} keys: {sw['read']:,} GETs in key order through node 1, one pipelined "
                f"connection (512 per batch), {sw['wall_s']} s ({sw['keys_per_s']:,} keys/s); wrong values "
                f"{sw['wrong']}, error replies {sw['errors']}{_texts(sw.get('error_texts'))}; slowest PING (ms, "
                f"node 1/2/3) {_stalls(sw.get('ping_stalls', {}))}."
            )
        vs = run.get("verify_after_start", {})
        if vs:
            bad = sum(v["wrong"] + v["errors"] for v in vs.values())
            lines.append(
                f"- After start at {run['keys']:,} keys: 300 random populated keys read on each node and compared, "
                f"{bad} wrong or failed."
            )
    lines.append("")
    for run in (base, big):
        for node, info in sorted(run.get("node_logs", {}).items()):
            if info["warnings_or_errors"]:
                first = "; ".join(f"`{ln[-160:]}`" for ln in info["first"][:3])
                lines.append(
                    f"- Log of node {node} at {run['keys']:,} keys: {info['warnings_or_errors']} warning or error "
                    f"lines, the first: {first}"
                )
    lines.append("")
    prof = big.get("profile_get")
    if prof and "error" in prof:
        lines.append(f"The py-spy profile of node 1 during GETs failed: {prof['error']}")
        lines.append("")
    if prof and "self_pct" in prof:
        lines.append(
            f"Where node 1 spends its time during random GETs at {nk:,} keys before the sweep (py-spy "
            f"`record -r 50 -f raw --native`, {prof['samples']:,} non-idle samples during an extra, "
            f"unmeasured GET run; {prof.get('gc_pct', '?')} % of them inside CPython's cyclic garbage collector, "
            f"`gc_collect_main`): share of samples inside each respreg function (inclusive), and where the "
            f"samples ended (self, native frames included):"
        )
        lines.append("")
        lines.append("| inclusive % | respreg function | self % | function |")
        lines.append("|---:|---|---:|---|")
        inclusive = prof.get("respreg_inclusive_pct") or prof["inclusive_pct"]
        for (iname, ipct), (sname, spct) in zip(inclusive, prof["self_pct"], strict=False):
            lines.append(f"| {ipct} | `{iname}` | {spct} | `{sname}` |")
        lines.append("")
    lines.append("Commands (ports and temp paths differ on every run):")
    lines.append("")
    lines.append("```")
    for c in results["commands"]:
        lines.append(f"# {c['purpose']}")
        lines.append(c["command"])
    lines.append("```")
    lines.append("")
    m = meta["machine"]
    lines.append(
        f"Machine: nproc {m['nproc']}, {m['cpu_model']}, {m['memory']}, kernel {m['kernel']}, {m['os']}, "
        f"python {m['python']}; respreg {meta['versions']['respreg']}; {meta['versions']['redis-benchmark']}."
    )
    return "\n".join(lines) + "\n"


def observations(base: dict[str, Any], big: dict[str, Any]) -> list[str]:
    """Facts computed from the figures that say what limits the large cluster."""
    nb, nk = base["keys"], big["keys"]
    out: list[str] = [f"What the figures show at {nk:,} keys:", ""]
    opened = big.get("keyfiles_open_s")
    prof = big.get("profile_start", {})
    if opened:
        shares = [
            f"`{name}` {pct} %"
            for name, pct in prof.get("respreg_inclusive_pct", [])
            if not any(w in name for w in ("run_forever", "NodeServer.start", "<module>"))
        ][:3]
        out.append(
            f"- Opening a node's store (`respreg.storage.KeyFiles(...)`) took {min(opened)} s at {nk:,} keys "
            f"against {min(base.get('keyfiles_open_s') or [0])} s at {nb:,}"
            + (f"; in the profiled start the largest respreg shares were {', '.join(shares)}." if shares else ".")
        )
    mem = {e["phase"]: e["nodes"] for e in big.get("memory", [])}
    base_mem = {e["phase"]: e["nodes"] for e in base.get("memory", [])}
    start, swept = mem.get("after start and 300 verified GETs per node"), mem.get("after the sweep")
    if start and swept:
        node = max(swept, key=lambda k: swept[k]["rss_mb"])
        grown = swept[node]["rss_mb"] - start[node]["rss_mb"]
        keys = swept[node]["cached_chosen"] - start[node]["cached_chosen"]
        low = base_mem.get("after start and 300 verified GETs per node")
        if keys <= 0 and low and node in low:
            # Everything was cached at start (read back from the chosen log): compare with the
            # small cluster's node instead.
            grown = start[node]["rss_mb"] - low[node]["rss_mb"]
            keys = start[node]["cached_chosen"] - low[node]["cached_chosen"]
            how = (
                f"node {node} held {start[node]['cached_chosen']:,} chosen values once it had read its chosen "
                f"log back at start, at {start[node]['rss_mb']:.0f} MB against {low[node]['rss_mb']:.0f} MB for "
                f"{low[node]['cached_chosen']:,} at {nb:,} keys"
            )
        else:
            how = (
                f"node {node} went from {start[node]['rss_mb']:.0f} MB to {swept[node]['rss_mb']:.0f} MB while its "
                f"caches grew to {swept[node]['cached_chosen']:,} chosen values and "
                f"{swept[node]['cached_states']:,} acceptor states"
            )
        per_key = 1e6 * grown * 1.048576 / max(keys, 1)
        if keys > 0:
            out.append(
                f"- Memory grows with the chosen-value cache: {how}, about {per_key:,.0f} bytes of RSS per cached "
                f"key, within the caches' bounds (server defaults: {_server_cache_defaults()})."
            )
    stalls = [w for w in big.get("workloads", []) if w.get("ping_stalls")]
    worst = max((v["max_ms"] for w in stalls for v in w["ping_stalls"].values()), default=0.0)
    sweep = big.get("sweep", {})
    worst = max([worst, *(v["max_ms"] for v in sweep.get("ping_stalls", {}).values())])
    logs = big.get("node_logs", {}).values()
    warnings = sum(info["warnings_or_errors"] for info in logs)
    first = next((info["first"][0] for info in logs if info["first"]), "")
    said = f" (e.g. `{first.split(': ', 1)[-1][:100]}`)" if first else ""
    gc_pct = big.get("profile_get", {}).get("gc_pct")
    out.append(
        f"- Event-loop stalls: the slowest PING to a node of the {nk:,}-key cluster took {worst:,.0f} ms (at "
        f"{nb:,} keys: {_worst_ping(base):,.0f} ms); the nodes' logs hold {warnings} warning or error lines{said}; "
        f"the sweep got {sweep.get('errors', 0):,} error replies"
        + (f"; {gc_pct} % of node 1's samples during GETs were in the cyclic garbage collector" if gc_pct else "")
        + "."
    )
    cold, warm = _workload(big, "get-1"), _workload(base, "get-2")
    if cold and warm and cold.get("server_cpu_us_per_op") and warm.get("server_cpu_us_per_op"):
        reads = (cold.get("node1_counters") or {}).get("reads_started")
        cpu = (
            f"{cold['server_cpu_us_per_op']:,} µs of server CPU per GET in the first run at {nk:,} keys against "
            f"{warm['server_cpu_us_per_op']:,} µs in the second run at {nb:,} keys"
        )
        if reads == 0:
            out.append(
                f"- No GET of the first run needed a Paxos read: each node read its chosen log back at start "
                f"(in the profiled start above), so every populated key was answered from memory; {cpu}."
            )
        else:
            out.append(
                "- A GET of a key the node does not know is chosen (not in its chosen log, or not cached) is a "
                "Paxos read phase (in a cluster of three, to the two nodes other than the key's owner first, and "
                "to the owner only when their answers do not settle it; a file read on each): "
                f"{reads:,} of the first run's GETs were; {cpu}."
            )
    out.append("")
    return out


def _server_cache_defaults() -> str:
    """The cache bounds of ``respreg serve`` as this checkout defines them."""
    from respreg.config import ServerConfig
    from respreg.core.chosen import CHOSEN_ENTRY_OVERHEAD

    fields = ServerConfig.__dataclass_fields__
    states = fields["state_cache_keys"].default
    keys = fields["chosen_cache_keys"].default
    size = fields["chosen_cache_bytes"].default
    assert isinstance(states, int) and isinstance(keys, int) and isinstance(size, int)
    return (
        f"state_cache_keys {states:,}, chosen_cache_keys {keys:,}, chosen_cache_bytes {size // 2**20} MiB "
        f"counting key + value + id + {CHOSEN_ENTRY_OVERHEAD} bytes per entry"
    )


def _worst_ping(run: dict[str, Any]) -> float:
    vals = [v["max_ms"] for w in run.get("workloads", []) for v in w.get("ping_stalls", {}).values()]
    vals += [v["max_ms"] for v in run.get("sweep", {}).get("ping_stalls", {}).values()]
    return max(vals, default=0.0)


def write_section(path: Path, section: str) -> None:
    """Put ``section`` at the end of ``path``, replacing an earlier scale section that ends the file."""
    text = split_scale_section(path.read_text() if path.exists() else "")[0]
    if text and not text.endswith("\n\n"):
        text = text.rstrip("\n") + "\n\n"
    path.write_text(text + section)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", type=int, default=1_000_000, help="keys of the large cluster (default 1000000)")
    p.add_argument("--baseline-keys", type=int, default=10_000, help="keys of the reference cluster (default 10000)")
    p.add_argument("--procs", type=int, default=os.cpu_count() or 2, help="populate processes (default: nproc)")
    p.add_argument("--populate-fsync", action="store_true", help="fsync every populated file (slow)")
    p.add_argument("--get-requests", type=int, default=200_000, help="requests per GET run (default 200000)")
    p.add_argument("--get-clients", type=int, default=50, help="redis-benchmark clients for GET (default 50)")
    p.add_argument("--write-requests", type=int, default=4000, help="requests of the SETONCE run (default 4000)")
    p.add_argument("--write-clients", type=int, default=64, help="redis-benchmark clients for SETONCE (default 64)")
    p.add_argument(
        "--sweep-fraction", type=float, default=1.0, help="share of the keys read once in order (0 skips; default 1)"
    )
    p.add_argument(
        "--profile-seconds", type=int, default=0, help="py-spy node 1 of the large cluster during extra GET load"
    )
    p.add_argument("--restarts", type=int, default=3, help="timed restarts of node 1 per cluster (default 3)")
    p.add_argument(
        "--no-profile-start", dest="profile_start", action="store_false", help="skip the py-spy run of a start"
    )
    p.add_argument("--base-port", type=int, default=7300, help="first port tried for the nodes (default 7300)")
    p.add_argument("--tmp-root", type=Path, default=Path("/work"), help="parent of the temp dir (default /work)")
    p.add_argument("--keep-temp", action="store_true", help="keep the data directories and logs")
    p.add_argument("--json", type=Path, default=HERE / "scale.json", help="JSON output (default benchmarks/scale.json)")
    p.add_argument(
        "--results-md",
        type=Path,
        default=HERE / "RESULTS.md",
        help="markdown file whose trailing scale section is replaced ('' to only print)",
    )
    p.add_argument(
        "--render-only", type=Path, default=None, help="only rebuild the markdown from this JSON (no measurement)"
    )
    args = p.parse_args(argv)
    if args.render_only is not None:
        loaded: dict[str, Any] = json.loads(args.render_only.read_text())
        loaded["markdown"] = section = render(loaded)
        args.render_only.write_text(json.dumps(finite(loaded), indent=2, allow_nan=False) + "\n")
        print(section)
        if str(args.results_md) not in ("", "."):
            write_section(args.results_md, section)
        return 0
    if args.keys < 1 or args.baseline_keys < 1:
        p.error("--keys and --baseline-keys must be positive")
    for tool in ("redis-benchmark",):
        if shutil.which(tool) is None:
            print(f"{tool} is missing (Debian: apt-get install redis-tools)", file=sys.stderr)
            return 2

    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    load_before = loadavg()
    args.tmp_root.mkdir(parents=True, exist_ok=True)
    top = Path(tempfile.mkdtemp(prefix="respreg-scale-", dir=args.tmp_root))
    commands = CommandLog()
    commands.add("this benchmark", [sys.executable, *sys.argv])
    runs: dict[str, Any] = {}
    cleanup: dict[str, float] = {}
    import_floor = []
    for _ in range(3):
        t = time.monotonic()
        subprocess.run([sys.executable, "-c", "import respreg.server, respreg.client"], check=True)
        import_floor.append(round(time.monotonic() - t, 3))
    print(f"scale benchmark in {top}: {args.baseline_keys:,} keys, then {args.keys:,} keys", flush=True)
    try:
        sizes: dict[str, SizeRun] = {}
        for i, (label, keys) in enumerate((("baseline", args.baseline_keys), ("scale", args.keys))):
            root = top / f"keys-{keys}"
            root.mkdir()
            sizes[label] = SizeRun(args, keys, root, commands, args.base_port + 20 * i)
        try:
            measure(sizes["baseline"], sizes["scale"], args)
        finally:
            for label, size in sizes.items():
                size.finish()
                runs[label] = size.result
        machine = machine_facts(top)
    finally:
        if args.keep_temp:
            print(f"kept {top}")
        else:
            for sub in sorted(top.iterdir()):
                t = time.monotonic()
                shutil.rmtree(sub, ignore_errors=True)
                cleanup[sub.name] = round(time.monotonic() - t, 1)
                print(f"  removed {sub} in {cleanup[sub.name]:.1f} s", flush=True)
            shutil.rmtree(top, ignore_errors=True)
    meta: dict[str, Any] = {
        "started_utc": started.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - t0, 1),
        "command": " ".join([".venv/bin/python", "benchmarks/scale.py", *sys.argv[1:]]),
        "argv": [sys.executable, *sys.argv],
        "machine": machine,
        "load_average_before": load_before,
        "load_average_after": loadavg(),
        "cleanup_s": cleanup,
        "write_clients": args.write_clients,
        "import_floor_s": import_floor,
        "storage_py_sha256": {
            "at_import_and_populate": STORAGE_AT_IMPORT,
            "before_cluster_start": getattr(args, "storage_before_start", None),
            "at_end": storage_fingerprint(),
        },
        "server_config": f"defaults: {_server_cache_defaults()}",
        "versions": {
            "respreg": f"{tool_version([sys.executable, '-m', 'respreg', '--version'])} ({git_describe()})",
            "redis-benchmark": tool_version(["redis-benchmark", "--version"]),
        },
    }
    results: dict[str, Any] = {
        "meta": meta,
        "runs": runs,
        "commands": [{"purpose": p_, "command": c} for p_, c in commands.entries],
    }
    section = render(results)
    results["markdown"] = section
    args.json.write_text(json.dumps(finite(results), indent=2, allow_nan=False) + "\n")
    print()
    print(section)
    if str(args.results_md) not in ("", "."):
        write_section(args.results_md, section)
        print(f"wrote {args.json} and the section at the end of {args.results_md}")
    else:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Real clusters for tests: separate ``respreg serve`` processes on loopback, on free ports.

Every process started here is ended by its PID in ``Cluster.close`` (a pytest finalizer calls it
even when the test fails).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from respreg.config import PeerAddress, ServerConfig

HOST = "127.0.0.1"


def free_ports(n: int) -> list[int]:
    """n distinct ports that were free a moment ago (the kernel picked them)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def one_node_config(data_dir: Path, **options: Any) -> ServerConfig:
    """The config of a one-node cluster on free loopback ports (for a NodeServer run in-process)."""
    port, peer_port = free_ports(2)
    peers = (PeerAddress(1, HOST, peer_port),)
    return ServerConfig(node_id=1, port=port, peer_port=peer_port, data_dir=data_dir, peers=peers, **options)


def wait_ping(
    port: int, timeout_s: float = 15.0, proc: subprocess.Popen[bytes] | None = None, host: str = HOST
) -> None:
    """Wait until a node answers PING on its client port (bounded)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"node on {host}:{port} exited with code {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"node on {host}:{port} did not answer PING within {timeout_s}s")


def stop_process(proc: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    """End a process this test started, if it still runs: SIGTERM, then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def reference_redis(workdir: Path, *extra: str) -> Iterator[int]:
    """A real redis-server on a free loopback port (the reference replies are compared with);
    skips the test when redis-server is not installed. Yields the port."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed: cannot compare with the reference implementation")
    port = free_ports(1)[0]
    args = [exe, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
    args += ["--protected-mode", "no", "--daemonize", "no", "--dir", str(workdir), *extra]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_ping(port, proc=proc)
        yield port
    finally:
        stop_process(proc)


def multibulk(*args: bytes) -> bytes:
    """A command as a RESP array of bulk strings."""
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def recv_exactly(sock: socket.socket, n: int, limit_s: float = 15.0) -> bytes:
    """Read exactly n bytes (fails on EOF or after limit_s)."""
    buf = bytearray()
    deadline = time.monotonic() + limit_s
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out after {len(buf)} of {n} bytes: {bytes(buf[-200:])!r}")
        sock.settimeout(left)
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise AssertionError(f"connection closed after {len(buf)} of {n} bytes: {bytes(buf[-200:])!r}")
        buf += chunk
    return bytes(buf)


def read_to_eof(sock: socket.socket, limit_s: float = 15.0, max_bytes: int = 64 << 20) -> bytes:
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


@contextmanager
def running(root: Path, **options: Any) -> Iterator[Cluster]:
    """A started cluster (``Cluster(root, **options)``) with its peer links up; stopped after."""
    c = Cluster(root, **options)
    try:
        c.start()
        c.wait_peers()
        yield c
    finally:
        c.close()


@dataclass
class Node:
    node_id: int
    port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Cluster:
    root: Path
    size: int = 3
    deadline_ms: int = 2000
    extra_args: list[str] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    secret: str = "test-cluster-secret"

    def __post_init__(self) -> None:
        ports = free_ports(2 * self.size)
        for i in range(self.size):
            nid = i + 1
            self.nodes.append(
                Node(nid, ports[i], ports[self.size + i], self.root / f"node{nid}", self.root / f"node{nid}.log")
            )

    @property
    def peers_arg(self) -> str:
        return ",".join(f"{n.node_id}={HOST}:{n.peer_port}" for n in self.nodes)

    def command(self, n: Node) -> list[str]:
        return [
            sys.executable, "-m", "respreg", "serve",
            "--id", str(n.node_id),
            "--port", str(n.port),
            "--peer-port", str(n.peer_port),
            "--bind", HOST,
            "--data-dir", str(n.data_dir),
            "--peers", self.peers_arg,
            "--cluster-secret", self.secret,
            "--deadline-ms", str(self.deadline_ms),
            "--log-level", "INFO",
            *self.extra_args,
        ]  # fmt: skip

    def start(self, *which: int, wait: bool = True) -> None:
        targets = [n for n in self.nodes if not which or n.node_id in which]
        for n in targets:
            assert not n.running(), f"node {n.node_id} already running"
            log = open(n.log_path, "ab")  # noqa: SIM115 - owned by the process for its lifetime
            n.proc = subprocess.Popen(self.command(n), stdout=log, stderr=log, start_new_session=True)
            log.close()
        if wait:
            for n in targets:
                wait_ping(n.port, proc=n.proc)

    def kill(self, node_id: int, sig: int = signal.SIGKILL) -> None:
        n = self.node(node_id)
        assert n.proc is not None
        n.proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
            n.proc.wait(timeout=15)

    def node(self, node_id: int) -> Node:
        return self.nodes[node_id - 1]

    def client(self, node_id: int, **kw: object) -> redis.Redis:
        n = self.node(node_id)
        kw.setdefault("socket_timeout", 10)
        # No silent client-side retries: a test must see every error the server gives.
        kw.setdefault("retry", Retry(NoBackoff(), 0))
        return redis.Redis(host=HOST, port=n.port, **kw)  # type: ignore[arg-type]

    def wait_peers(self, timeout_s: float = 15.0) -> None:
        """Wait until every running node has its links to every other running node up, and has
        noticed that the links to stopped nodes are down."""
        deadline = time.monotonic() + timeout_s
        running = [n for n in self.nodes if n.running()]
        while time.monotonic() < deadline:
            ok = True
            for n in running:
                info = self.client(n.node_id).info("paxos")
                if int(info["peers_up"]) != len(running) - 1:
                    ok = False
                    break
            if ok:
                return
            time.sleep(0.05)
        raise TimeoutError("peer links did not come up")

    def logs(self) -> str:
        out = []
        for n in self.nodes:
            if n.log_path.exists():
                out.append(f"--- node {n.node_id} ---\n" + n.log_path.read_text(errors="replace")[-4000:])
        return "\n".join(out)

    def close(self) -> None:
        for n in self.nodes:
            if n.proc is not None and n.proc.poll() is None:
                try:
                    os.kill(n.proc.pid, signal.SIGCONT)  # in case a test paused it
                except ProcessLookupError:
                    pass
                n.proc.send_signal(signal.SIGTERM)
        for n in self.nodes:
            if n.proc is not None:
                try:
                    n.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    n.proc.kill()
                    n.proc.wait()

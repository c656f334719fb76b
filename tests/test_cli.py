"""The command line: ``respreg serve`` (one node) and ``respreg cluster`` (a local cluster).

Every process started here is ended by its PID in a ``finally`` block, and every wait is bounded.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from .cluster import HOST, free_ports, stop_process

RESPREG = [sys.executable, "-m", "respreg"]
LIMIT_S = 30.0


# ---- helpers -----------------------------------------------------------------------------------


def run_respreg(args: Sequence[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RESPREG, *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=LIMIT_S,
        check=False,
    )


def assert_one_line_failure(res: subprocess.CompletedProcess[str], prog: str, *needles: str) -> str:
    """The run failed with exactly one line on stderr that names the problem."""
    assert res.returncode != 0, res
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    line = lines[0]
    assert line.startswith(f"{prog}: error: "), line
    for needle in needles:
        assert needle in line, line
    assert "Traceback" not in res.stderr
    return line


def ping(port: int) -> bytes:
    """Reply to one PING on a new connection (empty on EOF)."""
    with socket.create_connection((HOST, port), timeout=LIMIT_S) as s:
        s.sendall(b"PING\r\n")
        return s.recv(64)


def port_is_free(port: int) -> bool:
    """Nothing listens on ``port``: it can be bound the way respreg binds (SO_REUSEADDR, so
    connections of an ended process lingering in TIME_WAIT do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def is_respreg_node(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"respreg" in cmdline and b"serve" in cmdline


kill_by_pid = stop_process


class LineReader:
    """Lines of a pipe, read by a thread so that waiting for one can be bounded."""

    def __init__(self, stream: object) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: object) -> None:
        assert hasattr(stream, "readline")
        for line in iter(stream.readline, ""):
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, needle: str, limit_s: float = LIMIT_S) -> str:
        deadline = time.monotonic() + limit_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line containing {needle!r} within {limit_s}s; saw {self.seen}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"output ended without a line containing {needle!r}; saw {self.seen}")
            self.seen.append(line)
            if needle in line:
                return line

    def rest(self, limit_s: float = LIMIT_S) -> list[str]:
        """Every remaining line, up to the end of the output."""
        out: list[str] = []
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                continue
            if line is None:
                return out
            self.seen.append(line)
            out.append(line)
        raise AssertionError(f"output did not end within {limit_s}s; saw {self.seen}")


# ---- respreg serve -----------------------------------------------------------------------------


@dataclass
class Serve:
    """Arguments of one ``respreg serve`` run (a one-node cluster by default)."""

    data_dir: Path
    port: int = 0
    peer_port: int = 0
    node_id: int = 1
    peers: str = ""
    extra: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.port or not self.peer_port:
            self.port, self.peer_port = free_ports(2)
        if not self.peers:
            self.peers = f"{self.node_id}={HOST}:{self.peer_port}"

    def args(self) -> list[str]:
        return [
            "serve",
            "--id", str(self.node_id),
            "--port", str(self.port),
            "--peer-port", str(self.peer_port),
            "--bind", HOST,
            "--data-dir", str(self.data_dir),
            "--peers", self.peers,
            "--cluster-secret", "cli-test-secret",
            *self.extra,
        ]  # fmt: skip


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts; each is ended by its PID afterwards."""
    procs: list[subprocess.Popen[str]] = []
    try:
        yield procs
    finally:
        for p in procs:
            kill_by_pid(p)
        for p in procs:
            for stream in (p.stdout, p.stderr):
                if stream is not None:
                    stream.close()


def start_serve(cfg: Serve, started: list[subprocess.Popen[str]]) -> tuple[subprocess.Popen[str], LineReader]:
    proc = subprocess.Popen(
        [*RESPREG, *cfg.args()],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    started.append(proc)
    return proc, LineReader(proc.stderr)


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        ([], ["the following arguments are required", "--id", "--peer-port", "--data-dir", "--peers"]),
        (["--id", "1"], ["the following arguments are required: --peer-port, --data-dir, --peers"]),
        (["--id", "x", "--peer-port", "1", "--data-dir", "d", "--peers", "1=a:1"], ["argument --id", "'x'"]),
        (["--id", "1", "--peer-port", "1", "--data-dir", "d", "--peers", "1=a:1", "--bogus"], ["--bogus"]),
        (["--id", "1", "--peer-port", "1", "--data-dir", "d", "--peers", "1=x"], ["bad --peers entry '1=x'"]),
        (["--id", "1", "--peer-port", "1", "--data-dir", "d", "--peers", "1=h:0"], ["bad --peers entry", "TCP port"]),
        (["--id", "1", "--peer-port", "1", "--data-dir", "d", "--peers", ","], ["--peers is empty"]),
        (["--id", "1", "--peer-port", "1", "--data-dir", "d", "--peers", "1=a:1,1=b:2,3=c:3"], ["node id twice"]),
        (["--id", "1", "--peer-port", "1", "--data-dir", "d", "--peers", "1=a:1", "--port", "70000"], ["70000"]),
        (["--id", "1", "--peer-port", "1", "--data-dir", "d", "--peers", "1=a:1", "--log-level", "LOUD"], ["LOUD"]),
        (["--id", "1", "--peer-port", "1", "--data-dir", "d", "--peers", "1=a:1", "--sync", "never"], ["never"]),
    ],
    ids=["no-flags", "missing-flags", "bad-id", "unknown-flag", "bad-peer", "peer-port-0", "empty-peers", "dup-id",
         "port-out-of-range", "bad-log-level", "bad-sync"],
)  # fmt: skip
def test_serve_rejects_bad_flags(tmp_path: Path, argv: list[str], needles: list[str]) -> None:
    res = run_respreg(["serve", *argv], tmp_path)
    assert_one_line_failure(res, "respreg serve", *needles)
    assert not (tmp_path / "d").exists()  # nothing was created


def test_serve_rejects_id_missing_from_peers(tmp_path: Path) -> None:
    cfg = Serve(tmp_path / "data", node_id=2, peers=f"1={HOST}:1")
    res = run_respreg(cfg.args(), tmp_path)
    assert_one_line_failure(res, "respreg serve", "--peers must list this node (id 2)")


def test_serve_rejects_an_even_number_of_peers(tmp_path: Path) -> None:
    cfg = Serve(tmp_path / "data")
    cfg.peers = f"1={HOST}:{cfg.peer_port},2={HOST}:1"
    res = run_respreg(cfg.args(), tmp_path)
    assert_one_line_failure(res, "respreg serve", "odd number of nodes", "lists 2")


def test_serve_rejects_a_regular_file_as_data_dir(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory\n")
    res = run_respreg(Serve(tmp_path / "file").args(), tmp_path)
    assert_one_line_failure(res, "respreg serve", "data directory", "is not a directory")
    res = run_respreg(Serve(tmp_path / "file" / "sub").args(), tmp_path)
    assert_one_line_failure(res, "respreg serve", "cannot create data directory", "Not a directory")
    assert (tmp_path / "file").read_text() == "not a directory\n"


@pytest.mark.parametrize("which", ["client", "peer"])
def test_serve_rejects_a_port_in_use(tmp_path: Path, which: str) -> None:
    cfg = Serve(tmp_path / "data")
    busy = cfg.port if which == "client" else cfg.peer_port
    with socket.socket() as holder:
        holder.bind((HOST, busy))
        holder.listen()
        res = run_respreg(cfg.args(), tmp_path)
    line = assert_one_line_failure(res, "respreg serve", "cannot listen", str(busy))
    assert "address already in use" in line.lower()


def test_serve_reports_a_missing_secret_file(tmp_path: Path) -> None:
    cfg = Serve(tmp_path / "data", extra=["--cluster-secret-file", str(tmp_path / "absent")])
    res = run_respreg(cfg.args(), tmp_path)
    assert_one_line_failure(res, "respreg serve", "--cluster-secret-file")


def test_single_node_serves_as_soon_as_it_says_so(tmp_path: Path, started: list[subprocess.Popen[str]]) -> None:
    cfg = Serve(tmp_path / "data")
    proc, stderr = start_serve(cfg, started)
    line = stderr.wait_for("serving clients")
    assert f"{HOST}:{cfg.port}" in line and f"pid {proc.pid}" in line
    # No retry: the port answers from the moment the node announces it.
    assert ping(cfg.port) == b"+PONG\r\n"
    r = redis.Redis(host=HOST, port=cfg.port, protocol=2, socket_timeout=LIMIT_S)
    assert r.execute_command("SETONCE", "solo", "1") in (b"OK", True)
    assert r.execute_command("SETONCE", "solo", "2") is None
    assert r.get("solo") == b"1"
    paxos = r.info("paxos")
    assert (paxos["cluster_size"], paxos["quorum"]) == (1, 1)
    r.close()

    # The data directory is locked while the node runs.
    other = Serve(tmp_path / "data")
    res = run_respreg(other.args(), tmp_path)
    assert_one_line_failure(res, "respreg serve", "in use by another process")

    # SIGTERM: a clean exit, and the value survives a restart on the same directory.
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=LIMIT_S) == 0
    assert port_is_free(cfg.port)
    proc2, stderr2 = start_serve(Serve(tmp_path / "data", port=cfg.port, peer_port=cfg.peer_port), started)
    first = int(line.split("(incarnation ", 1)[1].split(",", 1)[0])
    assert f"(incarnation {first + 1}," in stderr2.wait_for("serving clients")
    r = redis.Redis(host=HOST, port=cfg.port, protocol=2, socket_timeout=LIMIT_S)
    assert r.get("solo") == b"1"
    r.close()
    proc2.send_signal(signal.SIGINT)
    assert proc2.wait(timeout=LIMIT_S) == 0


def test_serve_maxclients(tmp_path: Path, started: list[subprocess.Popen[str]]) -> None:
    cfg = Serve(tmp_path / "data", extra=["--maxclients", "2"])
    _, stderr = start_serve(cfg, started)
    stderr.wait_for("serving clients")
    with (
        socket.create_connection((HOST, cfg.port), timeout=LIMIT_S) as a,
        socket.create_connection((HOST, cfg.port), timeout=LIMIT_S) as b,
    ):
        for s in (a, b):
            s.sendall(b"PING\r\n")
            assert s.recv(64) == b"+PONG\r\n"
        with socket.create_connection((HOST, cfg.port), timeout=LIMIT_S) as c:
            got = b""
            for _ in range(100):
                chunk = c.recv(256)
                if not chunk:
                    break
                got += chunk
            assert got == b"-ERR max number of clients reached\r\n"  # then closed, as redis-server does
    assert ping(cfg.port) == b"+PONG\r\n"  # a slot is free again


# ---- respreg cluster ---------------------------------------------------------------------------


def free_port_block(count: int, offset: int) -> int:
    """A base port P with P..P+count-1 and P+offset..P+offset+count-1 all free just now.

    Bases are drawn below the kernel's ephemeral range so ports picked by the kernel for other
    tests are unlikely to collide."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(10_000, 32_000 - offset - count)
        ports = [*range(base, base + count), *range(base + offset, base + offset + count)]
        if all(port_is_free(p) for p in ports):
            return base
    raise RuntimeError("no free block of ports found")


def test_cluster_rejects_an_even_node_count(tmp_path: Path) -> None:
    res = run_respreg(["cluster", "--nodes", "2", "--port", "1", "--data-dir", str(tmp_path / "c")], tmp_path)
    assert_one_line_failure(res, "respreg cluster", "--nodes must be odd", "not 2")
    assert res.stdout == ""
    assert not (tmp_path / "c").exists()
    res = run_respreg(["cluster", "--nodes", "0", "--data-dir", str(tmp_path / "c")], tmp_path)
    assert_one_line_failure(res, "respreg cluster", "--nodes must be odd", "not 0")


def test_cluster_runs_survives_a_killed_node_and_stops_on_sigint(tmp_path: Path) -> None:
    base = free_port_block(3, 10_000)
    data = tmp_path / "cluster"
    proc = subprocess.Popen(
        [*RESPREG, "cluster", "--nodes", "3", "--port", str(base), "--data-dir", str(data)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    stdout = LineReader(proc.stdout)
    pids: dict[int, int] = {}
    try:
        for i in (1, 2, 3):
            line = stdout.wait_for(f"node {i}: pid ")
            pids[i] = int(line.split("pid ", 1)[1].split(",", 1)[0])
            assert f"clients on {HOST}:{base + i - 1}" in line
            assert f"peers on {HOST}:{base + 10_000 + i - 1}" in line
        assert stdout.wait_for("ready").startswith("ready: 3 nodes")
        for pid in pids.values():
            assert pid_alive(pid) and is_respreg_node(pid)

        clients = {i: redis.Redis(host=HOST, port=base + i - 1, protocol=2, socket_timeout=LIMIT_S) for i in pids}
        assert clients[1].execute_command("SETONCE", "greeting", "hello") in (b"OK", True)
        assert clients[3].get("greeting") == b"hello"
        assert clients[2].execute_command("SETONCE", "greeting", "bye") is None

        os.kill(pids[2], signal.SIGKILL)
        assert stdout.wait_for("exited") == f"node 2 (pid {pids[2]}) exited with code -9"
        assert clients[1].execute_command("SETONCE", "after-kill", "still") in (b"OK", True)
        assert clients[3].get("after-kill") == b"still"
        assert clients[3].get("greeting") == b"hello"
        for c in clients.values():
            c.close()

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=LIMIT_S) == 0
        assert stdout.rest()[-1] == "stopped"
        deadline = time.monotonic() + LIMIT_S
        while any(pid_alive(p) for p in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in pids.values() if pid_alive(p)]
        for i in (1, 2, 3):
            assert port_is_free(base + i - 1)
    finally:
        kill_by_pid(proc)
        for pid in pids.values():
            if pid_alive(pid) and is_respreg_node(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.stdout is not None:
            proc.stdout.close()

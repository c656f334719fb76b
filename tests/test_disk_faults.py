"""Disk faults under real nodes: fsync failing with EIO, and full file systems.

fsync faults come from a small LD_PRELOAD library (``tests/fault_shim/eio.c``, compiled here with
gcc) given to one node only: once a trigger file exists, fsync/fdatasync of descriptors whose
path contains a chosen substring fail with EIO. Full disks are small tmpfs mounts used as data
directories (root only), filled with a filler file and freed by deleting it.

The promises checked: a majority keeps the cluster writable, the faulty node reports the fault
(fsync_errors, alarms) without crashing or answering a wrong value, nothing acknowledged is ever
lost, and without a writable majority a write answers an error, never +OK, and never hangs.
Processes are ended by PID (``Cluster.close``); every mount is unmounted afterwards.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import hiredis
import pytest
import redis

from respreg.peer import handshake_mac
from respreg.storage import META_NAME, NodeMeta, batched_io, resolve_sync_mode

from .cluster import HOST, Cluster, Node, multibulk

SHIM_SOURCE = Path(__file__).parent / "fault_shim" / "eio.c"
IO_LIMIT_S = 15.0
#: Client socket timeout: far above every deadline used here, so a timeout means a hang.
CLIENT_TIMEOUT_S = 15.0
TMPFS_SIZE = "2m"


# ---- helpers -----------------------------------------------------------------------------------


@dataclass
class EnvCluster(Cluster):
    """A Cluster where chosen nodes run with extra environment variables (the same PID: ``env``
    execs the node)."""

    node_env: dict[int, dict[str, str]] = field(default_factory=dict)

    def command(self, n: Node) -> list[str]:
        cmd = super().command(n)
        env = self.node_env.get(n.node_id)
        if not env:
            return cmd
        env_exe = shutil.which("env")
        assert env_exe is not None
        return [env_exe, *(f"{k}={v}" for k, v in env.items()), *cmd]

    def restart(self, node_id: int) -> None:
        self.kill(node_id, signal.SIGTERM)
        self.start(node_id)
        self.wait_peers()


def setonce(c: Cluster, node_id: int, key: str, value: str) -> str:
    """SETONCE through one node: "OK", "nil", or the error text."""
    with c.client(node_id, protocol=2, socket_timeout=CLIENT_TIMEOUT_S) as r:
        try:
            reply = r.execute_command("SETONCE", key, value)
        except redis.ResponseError as exc:
            return str(exc)
    if reply is None:
        return "nil"
    assert reply in (b"OK", True), reply
    return "OK"


def get(c: Cluster, node_id: int, key: str) -> bytes | None:
    with c.client(node_id, protocol=2, socket_timeout=CLIENT_TIMEOUT_S) as r:
        value = r.get(key)
    assert value is None or isinstance(value, bytes)
    return value


def info_int(c: Cluster, node_id: int, section: str, name: str) -> int:
    with c.client(node_id, protocol=2, socket_timeout=CLIENT_TIMEOUT_S) as r:
        data = r.info(section)
    assert isinstance(data, dict)
    return int(data[name])


def info_str(c: Cluster, node_id: int, section: str, name: str) -> str:
    with c.client(node_id, protocol=2, socket_timeout=CLIENT_TIMEOUT_S) as r:
        data = r.info(section)
    assert isinstance(data, dict)
    return str(data[name])


def assert_no_acceptance(state: object) -> None:
    """A read reply of an acceptor (``PX R``) that reports no acceptance, or refuses."""
    assert isinstance(state, list), state
    assert state[1] == b"X" or state[2:7] == [-1, -1, -1, None, None], state


def require_syncfs() -> None:
    try:
        resolve_sync_mode("syncfs")
    except ValueError as exc:
        pytest.skip(f"this machine cannot use syncfs mode: {exc}")


def raw_ping(port: int) -> bool:
    with socket.create_connection((HOST, port), timeout=IO_LIMIT_S) as s:
        s.sendall(b"PING\r\n")
        return s.recv(7) == b"+PONG\r\n"


def assert_all_read_back(c: Cluster, acked: dict[str, str]) -> None:
    for node in c.nodes:
        for key, value in acked.items():
            assert get(c, node.node_id, key) == value.encode(), (node.node_id, key)


def write_round_robin(c: Cluster, prefix: str, count: int) -> dict[str, str]:
    """``count`` SETONCEs on fresh keys through nodes 1, 2, 3, 1, ...; every one must answer OK."""
    acked: dict[str, str] = {}
    for i in range(count):
        key, value = f"{prefix}:{i}", f"{prefix}-value-{i}"
        node_id = i % c.size + 1
        reply = setonce(c, node_id, key, value)
        assert reply == "OK", (node_id, key, reply)
        acked[key] = value
    return acked


class PeerConn:
    """A raw connection to a node's peer port, reading RESP replies with a time bound."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=IO_LIMIT_S)
        self.reader = hiredis.Reader()

    def ask(self, data: bytes) -> object:
        self.sock.sendall(data)
        deadline = time.monotonic() + IO_LIMIT_S
        while True:
            reply = self.reader.gets()
            if reply is not False:
                return reply
            left = deadline - time.monotonic()
            assert left > 0, "no reply from the peer port"
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            assert chunk, "the peer port closed the connection"
            self.reader.feed(chunk)

    def ask_all(self, messages: list[bytes]) -> list[object]:
        """Send every message in one write, then read one reply per message."""
        self.sock.sendall(b"".join(messages))
        return [self.ask(b"") for _ in messages]

    def login(self, c: Cluster, sender: int, target: int) -> object:
        """The full peer handshake as node ``sender`` (with its identity from node.meta) opening
        a link to node ``target``: PEER.HELLO, the node's +CHALLENGE (its proof is checked), then
        PEER.AUTH. Returns the node's answer to PEER.AUTH."""
        secret = c.secret.encode()
        identity = NodeMeta.decode((c.node(sender).data_dir / META_NAME).read_bytes()).identity
        assert len(identity) == 16
        me, peer, nonce = b"%d" % sender, b"%d" % target, os.urandom(16)
        reply = self.ask(multibulk(b"PEER.HELLO", me, peer, identity.hex().encode(), nonce.hex().encode()))
        assert isinstance(reply, bytes) and reply.startswith(b"CHALLENGE "), reply
        _, theirs, proof = reply.split(b" ")
        server_nonce = bytes.fromhex(theirs.decode("ascii"))
        assert len(server_nonce) == 16, reply
        assert proof == handshake_mac(secret, b"S", me, peer, nonce, server_nonce).hex().encode(), reply
        mac = handshake_mac(secret, b"C", me, peer, identity, nonce, server_nonce)
        return self.ask(multibulk(b"PEER.AUTH", mac.hex().encode()))

    def close(self) -> None:
        self.sock.close()


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fault library, compiled for this run."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: cannot build the LD_PRELOAD fsync fault library")
    out = tmp_path_factory.mktemp("shim") / "eio.so"
    build = subprocess.run(
        [gcc, "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(SHIM_SOURCE), "-ldl"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 0, build.stderr
    return out


def shim_env(shim: Path, node: Node, trigger: Path, dirs_only: bool = False) -> dict[str, str]:
    return {
        "LD_PRELOAD": str(shim),
        "RESPREG_FAIL_FSYNC_PATH": str((node.data_dir / "keys").resolve()),
        "RESPREG_FAIL_FSYNC_TRIGGER": str(trigger),
        "RESPREG_FAIL_FSYNC_DIRS_ONLY": "1" if dirs_only else "0",
    }


@pytest.fixture
def tmpfs() -> Iterator[Callable[[Path], Path]]:
    """Mounts small tmpfs file systems on request; unmounts them all afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted: list[Path] = []

    def mount(path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0755", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {result.stderr.strip()}")
        mounted.append(path)
        return path

    try:
        yield mount
    finally:
        for path in reversed(mounted):
            if subprocess.run(["umount", str(path)], capture_output=True, timeout=30).returncode != 0:
                subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def fill(directory: Path) -> Path:
    """Fill the file system holding ``directory`` to the last byte; returns the filler file."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (1 << 16, 1 << 12, 1):
            for _ in range(4096):
                try:
                    f.write(b"\0" * chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    probe = directory / "probe"
    with pytest.raises(OSError) as exc_info:
        with open(probe, "wb", buffering=0) as f:
            f.write(b"x")
    assert exc_info.value.errno == errno.ENOSPC
    probe.unlink(missing_ok=True)
    return filler


# ---- fsync returns EIO -------------------------------------------------------------------------


def test_fsync_eio_on_one_node(shim: Path, tmp_path: Path) -> None:
    trigger = tmp_path / "disk-is-broken"
    c = EnvCluster(tmp_path / "cluster")
    c.root.mkdir()
    c.node_env[3] = shim_env(shim, c.node(3), trigger)
    try:
        c.start()
        c.wait_peers()
        acked = write_round_robin(c, "eio:before", 6)
        trigger.touch()  # node 3's disk breaks

        # Writes through every node still succeed: nodes 1 and 2 form the majority.
        acked |= write_round_robin(c, "eio:broken", 30)
        assert info_int(c, 3, "persistence", "fsync_errors") > 0
        assert info_int(c, 3, "paxos", "alarms") > 0
        assert info_int(c, 1, "persistence", "fsync_errors") == 0
        assert c.node(3).running() and raw_ping(c.node(3).port)
        # The faulty node answers every key with its value (it learned them), never another.
        for key, value in acked.items():
            assert get(c, 3, key) == value.encode(), key

        # Restarted while the disk is still broken it forgets what it learned and must read
        # through the cluster; reads need no fsync, writes still have a majority.
        c.restart(3)
        for key, value in acked.items():
            assert get(c, 3, key) == value.encode(), key
        acked |= write_round_robin(c, "eio:restarted-broken", 6)
        assert info_int(c, 3, "persistence", "fsync_errors") > 0

        # Repaired and restarted: everything acknowledged is read back from every node, and the
        # node's own acceptor writes again.
        trigger.unlink()
        c.restart(3)
        assert_all_read_back(c, acked)
        writes_before = info_int(c, 3, "persistence", "group_commit_writes")
        acked |= write_round_robin(c, "eio:repaired", 6)
        assert info_int(c, 3, "persistence", "fsync_errors") == 0
        assert info_int(c, 3, "persistence", "group_commit_writes") > writes_before
        assert_all_read_back(c, acked)
    finally:
        c.close()


def test_state_whose_directory_fsync_failed_is_not_reported(shim: Path, tmp_path: Path) -> None:
    trigger = tmp_path / "dir-fsync-is-broken"
    c = EnvCluster(tmp_path / "cluster")
    c.root.mkdir()
    c.node_env[3] = shim_env(shim, c.node(3), trigger, dirs_only=True)
    conn: PeerConn | None = None
    try:
        c.start()
        c.wait_peers()
        key = b"dirsync:" + uuid.uuid4().hex.encode()
        conn = PeerConn(c.node(3).peer_port)
        assert conn.login(c, 1, 3) == b"OK"  # as node 1, a proposer
        # While the disk works: a promise, so the key's directories exist and are durable.
        promise = conn.ask(multibulk(b"PX", b"1", b"P", key, b"1", b"1", b"1"))
        assert isinstance(promise, list) and promise[:2] == [1, b"P"], promise
        trigger.touch()  # from now on, fsync of a directory under keys/ fails with EIO
        # Accept: the file is written, fsynced and renamed, then its directory's fsync fails.
        refused = conn.ask(multibulk(b"PX", b"2", b"A", key, b"5", b"1", b"1", b"pid-5", b"value-5"))
        assert isinstance(refused, list) and refused[:2] == [2, b"X"], refused
        assert info_int(c, 3, "persistence", "fsync_errors") > 0
        # The acceptance never became durable; the acceptor must not report it (or must refuse).
        assert_no_acceptance(conn.ask(multibulk(b"PX", b"3", b"R", key)))
    finally:
        if conn is not None:
            conn.close()
        c.close()


@pytest.mark.parametrize(("sync", "io"), [("fsync", "per-call"), ("syncfs", "per-call"), ("syncfs", "batched")])
@pytest.mark.parametrize("broken", ["files", "directories"])
def test_a_batch_whose_sync_failed_is_not_reported(shim: Path, tmp_path: Path, sync: str, io: str, broken: str) -> None:
    """Eight accepts arrive in one read, so they are written as one batch (in syncfs mode: two
    syncs of the file system for all of them, made from Python one by one, or all of the
    batch's calls in one call to respreg._fileio). When the batch's data sync fails nothing
    became visible; when the sync after the renames fails the states are visible but not
    durable. Either way no accept is acknowledged, and no later read reports one."""
    if sync == "syncfs":
        require_syncfs()
    if io == "batched" and not batched_io():
        pytest.skip("respreg._fileio is not built here (no C compiler when the package was installed)")
    trigger = tmp_path / "sync-is-broken"
    c = EnvCluster(tmp_path / "cluster", extra_args=["--sync", sync])
    c.root.mkdir()
    c.node_env[3] = shim_env(shim, c.node(3), trigger, dirs_only=broken == "directories")
    if io == "per-call":
        c.node_env[3]["RESPREG_PURE_PYTHON"] = "1"  # no respreg._fileio (nor compiled modules)
    conn: PeerConn | None = None
    keys = [b"batch:%d:" % i + uuid.uuid4().hex.encode() for i in range(8)]
    try:
        c.start()
        c.wait_peers()
        conn = PeerConn(c.node(3).peer_port)
        assert conn.login(c, 1, 3) == b"OK"  # as node 1, a proposer
        prepares = [multibulk(b"PX", b"%d" % (i + 1), b"P", k, b"1", b"1", b"1") for i, k in enumerate(keys)]
        promises = conn.ask_all(prepares)
        assert all(isinstance(p, list) and p[1] == b"P" for p in promises), promises
        assert info_str(c, 3, "persistence", "sync_mode") == sync
        assert info_str(c, 3, "persistence", "batch_io") == io
        syncfs_before = info_int(c, 3, "persistence", "syncfs_batches")
        trigger.touch()
        accepts = [
            multibulk(b"PX", b"%d" % (100 + i), b"A", key, b"5", b"1", b"1", b"pid-%d" % i, b"value-%d" % i)
            for i, key in enumerate(keys)
        ]
        refused = conn.ask_all(accepts)
        assert all(isinstance(r, list) and r[1] == b"X" for r in refused), refused
        assert info_int(c, 3, "persistence", "fsync_errors") > 0
        used_syncfs = info_int(c, 3, "persistence", "syncfs_batches") > syncfs_before
        assert used_syncfs == (sync == "syncfs")
        states = conn.ask_all([multibulk(b"PX", b"%d" % (200 + i), b"R", key) for i, key in enumerate(keys)])
        for state in states:
            assert_no_acceptance(state)
    finally:
        if conn is not None:
            conn.close()
        c.close()


def test_phases_wait_as_long_as_slow_disks_take_instead_of_retrying(shim: Path, tmp_path: Path) -> None:
    """Nodes 2 and 3 make every sync 150 ms late (a slow disk: a write's two syncs make its
    answers 300 ms late), and phases are asked to wait only 50 ms for missing answers
    (``--attempt-timeout-ms``). The first answers show how long
    the peers take; from then on a phase waits that long, so writes through node 1 complete at
    their first ballot: none is handed on from a round-0 attempt, no ballot is started, every one
    is acknowledged. A phase that timed out each time would add a ballot's disk writes to every
    write of a load the disks already cannot keep up with (docs/design.md)."""
    c = EnvCluster(tmp_path / "cluster", extra_args=["--attempt-timeout-ms", "50"])
    c.root.mkdir()
    for n in (2, 3):
        c.node_env[n] = {
            "LD_PRELOAD": str(shim),
            "RESPREG_SLOW_SYNC_MS": "150",
            "RESPREG_SLOW_SYNC_PATH": str((c.node(n).data_dir / "keys").resolve()),
        }

    def retries() -> int:
        """Round-0 writes handed on, ballots started (on any node), writes node 1 forwarded."""
        counts = [info_int(c, n, "paxos", k) for n in (1, 2, 3) for k in ("fast_writes_declined", "ballots_started")]
        return sum(counts) + info_int(c, 1, "paxos", "writes_forwarded")

    try:
        c.start()
        c.wait_peers()
        tag = uuid.uuid4().hex
        # The answers the peers' times are learned from (a write may fail while phases still
        # give up after 50 ms: each retry costs more slow syncs).
        for i in range(3):
            setonce(c, 1, f"slow:{tag}:warm:{i}", "v")
        assert info_int(c, 1, "paxos", "attempt_timeout_ms") > 300
        before = retries()
        for i in range(8):
            assert setonce(c, 1, f"slow:{tag}:{i}", "v") == "OK"
        assert retries() == before
    finally:
        c.close()


# ---- full disks --------------------------------------------------------------------------------


def test_one_full_disk(tmpfs: Callable[[Path], Path], tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    full = tmpfs(c.node(3).data_dir)
    try:
        c.start()
        c.wait_peers()
        acked = write_round_robin(c, "full1:before", 6)
        filler = fill(full)

        acked |= write_round_robin(c, "full1:full", 24)
        assert info_int(c, 3, "persistence", "fsync_errors") > 0
        assert info_int(c, 3, "paxos", "alarms") > 0
        assert c.node(3).running() and raw_ping(c.node(3).port)
        for key, value in acked.items():
            assert get(c, 3, key) == value.encode(), key
        assert "No space left on device" in c.node(3).log_path.read_text(errors="replace")

        filler.unlink()  # space again
        errors_before = info_int(c, 3, "persistence", "fsync_errors")
        writes_before = info_int(c, 3, "persistence", "group_commit_writes")
        after: dict[str, str] = {}
        for i in range(6):
            key, value = f"full1:freed:{i}", f"freed-{i}"
            assert setonce(c, 3, key, value) == "OK", key
            after[key] = value
        acked |= after
        assert info_int(c, 3, "persistence", "fsync_errors") == errors_before
        assert info_int(c, 3, "persistence", "group_commit_writes") > writes_before
        assert_all_read_back(c, acked)
        # Failed writes left no temporary files behind.
        leftovers = [p.name for p in (full / "keys").rglob("*.tmp")]
        assert not leftovers, leftovers[:5]
    finally:
        c.close()


def test_all_disks_full_never_ok_and_no_hang(tmpfs: Callable[[Path], Path], tmp_path: Path) -> None:
    c = Cluster(tmp_path, deadline_ms=2000)
    mounts = [tmpfs(n.data_dir) for n in c.nodes]
    try:
        c.start()
        c.wait_peers()
        acked = write_round_robin(c, "fullall:before", 3)
        fillers = [fill(m) for m in mounts]

        outcomes: dict[str, str] = {}
        for i in range(9):
            key = f"fullall:full:{i}"
            started = time.monotonic()
            reply = setonce(c, i % 3 + 1, key, f"v{i}")  # a hang would raise a socket timeout
            assert time.monotonic() - started < CLIENT_TIMEOUT_S
            assert reply.startswith(("NOQUORUM", "UNCERTAIN")), (key, reply)
            outcomes[key] = reply
        for n in c.nodes:
            assert n.running() and raw_ping(n.port)
            assert info_int(c, n.node_id, "persistence", "fsync_errors") > 0
        # Reads need no disk: what was written before is still served.
        for key, value in acked.items():
            assert get(c, 2, key) == value.encode()

        for filler in fillers:
            filler.unlink()
        acked |= write_round_robin(c, "fullall:freed", 6)
        for i, (key, reply) in enumerate(outcomes.items()):
            read = get(c, i % 3 + 1, key)
            if reply.startswith("NOQUORUM"):
                # Definitely not written: nothing to read, and the key is still free.
                assert read is None, (key, read)
                assert setonce(c, 1, key, "later") == "OK"
            else:
                assert read in (None, f"v{i}".encode()), (key, read)
        assert_all_read_back(c, acked)
    finally:
        c.close()

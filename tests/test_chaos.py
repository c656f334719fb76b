"""Short chaos runs against a real 3-node cluster (the long ones: ``python -m tests.chaos.run``).

Each run drives 16 concurrent clients through one kind of fault for a few seconds, heals, and
asserts that the history has no violation of the write-once register model and that a write
succeeds through every node afterwards. Availability and recovery figures are printed (run
pytest with ``-s`` to see them), never asserted: they depend on the machine.

Set ``CHAOS_SEED`` to replay other fault schedules than the fixed ones.

The disk faults (fsync EIO through an LD_PRELOAD library, full tmpfs data directories) need gcc
and root; without them their tests skip and say which is missing.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from respreg.core.types import NodeId, owner_of
from tests.chaos.cluster import ChaosCluster
from tests.chaos.disk import DiskControl, build_shim, shim_unavailable, tmpfs_unavailable
from tests.chaos.nemesis import DISK_FAULTS, FsyncEio, Kill, Nemesis, Nft, nft_unavailable
from tests.chaos.proxy import ProxyThread, Route
from tests.chaos.run import RunConfig, run
from tests.cluster import free_ports

NFT_REASON = nft_unavailable()
needs_nft = pytest.mark.skipif(NFT_REASON is not None, reason=NFT_REASON or "")


# ---- the chaos runs ---------------------------------------------------------------------------------

SHORT_RUNS = {
    "kill": ("kill",),
    "pause": ("pause",),
    "proxy-partition": ("proxy-partition",),
    "partition": ("partition",),
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", list(SHORT_RUNS))
def test_chaos_short(name: str, tmp_path: Path) -> None:
    if name == "partition" and NFT_REASON is not None:
        pytest.skip(NFT_REASON)
    seed = int(os.environ.get("CHAOS_SEED", "0")) or 1000 + list(SHORT_RUNS).index(name)
    cfg = RunConfig(
        nodes=3,
        duration_s=4.5,
        seed=seed,
        nemeses=SHORT_RUNS[name],
        clients=16,
        deadline_ms=2000,
        hold_s=(1.5, 2.5),
        quiet_s=(0.3, 0.8),
        warmup_s=1.0,
        recover_timeout_s=30.0,
        root=tmp_path,
        proxy_modes=("blackhole", "cut", "flap", "reject"),
    )
    result = run(cfg, log=lambda s: print(s, flush=True))
    print(result.summary)
    assert any(e.what == "heal" for e in result.events), "no fault was applied"
    assert result.violations == [], result.summary
    assert result.recovered, "no write succeeded through some node after healing:\n" + result.summary


# ---- disk faults in the chaos runs ---------------------------------------------------------------------

#: With the default seed (2008) this schedule breaks disks together with kills of the same and of
#: other nodes (a majority once), with proxy partitions, and on their own.
DISK_RUN = ("kill", "proxy-partition", "fsync-eio", "fsync-eio-dirs", "disk-full")


@pytest.mark.timeout(300)
def test_chaos_disk_faults_mixed(tmp_path: Path) -> None:
    missing = [r for r in (shim_unavailable(), tmpfs_unavailable()) if r is not None]
    if missing:
        pytest.skip("; ".join(missing))
    seed = int(os.environ.get("CHAOS_SEED", "0")) or 2008
    cfg = RunConfig(
        nodes=3,
        duration_s=22.0,
        seed=seed,
        nemeses=DISK_RUN,
        clients=16,
        deadline_ms=2000,
        hold_s=(1.5, 3.0),
        quiet_s=(0.3, 0.8),
        mix_chance=0.5,
        warmup_s=1.0,
        recover_timeout_s=30.0,
        root=tmp_path,
    )
    try:
        result = run(cfg, log=lambda s: print(s, flush=True))
    finally:
        # Every tmpfs the run mounted is gone, whatever happened.
        mounts = Path("/proc/mounts").read_text()
        assert str(tmp_path) not in mounts, [m for m in mounts.splitlines() if str(tmp_path) in m]
    print(result.summary)
    assert result.skipped == [], result.skipped
    applied = {e.fault for e in result.events if e.what == "heal"}
    assert applied & set(DISK_FAULTS), f"seed {seed} broke no disk in {cfg.duration_s:.0f} s: {sorted(applied)}"
    assert result.violations == [], result.summary
    assert result.recovered, "no write succeeded through some node after healing:\n" + result.summary


def info(cluster: ChaosCluster, node: int, section: str) -> dict[str, object]:
    with cluster.client(node) as r:
        data = r.info(section)
    assert isinstance(data, dict)
    return data


def wait_for(condition: Callable[[], bool], what: str, tries: int = 200) -> None:
    """Poll ``condition`` every 50 ms; fail after ``tries`` polls (a bound against hangs only)."""
    for _ in range(tries):
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


def _key_in_same_directory(key: bytes, prefix: str, stored_on: int) -> bytes:
    """A new key whose state file lives in the same directory as ``key``'s (the layout of
    ``respreg.storage.KeyFiles.path_for``: blake2b-128 hex, under its first two characters), and
    that node ``stored_on`` stores when it is written: in a cluster of three, a key's owner does
    not (docs/design.md, round 0)."""
    want = hashlib.blake2b(key, digest_size=16).hexdigest()[:2]
    members = [NodeId(1), NodeId(2), NodeId(3)]
    for i in range(1 << 24):
        candidate = f"{prefix}{i}".encode()
        same_dir = hashlib.blake2b(candidate, digest_size=16).hexdigest()[:2] == want
        if same_dir and owner_of(candidate, members) != stored_on:
            return candidate
    raise AssertionError("no key found")


@pytest.mark.timeout(180)
def test_disk_nemesis_restarts_nodes_that_need_it(tmp_path: Path) -> None:
    """The two restarts the disk faults may need, made to happen: a node that stopped voting after
    a directory fsync failed is restarted when its disk is repaired, and a node killed while its
    disk is broken stays down until then (it could not write its node.meta) and is started after."""
    reason = shim_unavailable()
    if reason is not None:
        pytest.skip(reason)
    (tmp_path / "shim").mkdir()
    (tmp_path / "cluster").mkdir()
    cluster = ChaosCluster(tmp_path / "cluster", size=3)
    disks = DiskControl(cluster, tmp_path / "faults", build_shim(tmp_path / "shim"), tmpfs=False)
    disks.prepare()
    try:
        cluster.start()
        cluster.wait_peers()
        nemesis = Nemesis(cluster, disks=disks, log=lambda s: print(s, flush=True))
        with cluster.client(1) as r:
            assert owner_of(b"d:first", [NodeId(1), NodeId(2), NodeId(3)]) != 3  # so node 3 stores it
            assert r.execute_command("SETONCE", "d:first", "1") in (b"OK", True)
        # Node 3 stored a state of that key (so it knows the key's leaf directory).
        wait_for(lambda: str(info(cluster, 3, "persistence")["group_commit_writes"]) != "0", "node 3 to store a state")

        # Only directory fsyncs fail on node 3. A key whose leaf directory node 3 already knows:
        # its state is renamed into place there, then the directory fsync fails.
        eio = FsyncEio(nemesis, [3], dirs_only=True)
        nemesis.start(eio)
        assert frozenset({1, 2}) == nemesis.topology.healthy()
        key = _key_in_same_directory(b"d:first", "d:next:", stored_on=3)
        with cluster.client(1) as r:
            assert r.execute_command("SETONCE", key, "2") in (b"OK", True)  # nodes 1 and 2 suffice
        wait_for(lambda: info(cluster, 3, "paxos")["acceptor"] == "disk-failed", "node 3 to stop voting")
        pid = cluster.node(3).pid
        nemesis.stop(eio)
        assert cluster.node(3).running() and cluster.node(3).pid != pid
        assert any("disk-failed" in n for n in nemesis.notes), nemesis.notes
        with cluster.client(3) as r:
            assert r.info("paxos")["acceptor"] == "voting"
            assert r.get(key) == b"2"

        # Killed, then its disk breaks: the kill's restart waits for the disk.
        kill = Kill(nemesis, [3])
        nemesis.start(kill)
        broken = FsyncEio(nemesis, [3], dirs_only=False)
        nemesis.start(broken)
        nemesis.stop(kill)
        assert not cluster.node(3).running()
        assert 3 not in nemesis.topology.healthy()
        nemesis.stop(broken)
        assert cluster.node(3).running()
        assert nemesis.topology.healthy() == frozenset({1, 2, 3})
        cluster.wait_peers()
        with cluster.client(3) as r:
            assert r.execute_command("SETONCE", "d:after", "3") in (b"OK", True)
            assert r.info("paxos")["acceptor"] == "voting"
        nemesis.heal_all()
    finally:
        cluster.close()
        disks.close()


# ---- the proxy on its own ----------------------------------------------------------------------------


@pytest.fixture
def echo_server() -> Iterator[tuple[str, int]]:
    """A TCP echo server on 127.0.0.3 (stands in for a peer port)."""
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.3", 0))
    ls.listen(16)
    ls.settimeout(0.1)
    stop = threading.Event()

    def echo(c: socket.socket) -> None:
        with c:
            while True:
                try:
                    data = c.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                c.sendall(data)

    def serve() -> None:
        while not stop.is_set():
            try:
                c, _ = ls.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=echo, args=(c,), daemon=True).start()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield ls.getsockname()
    finally:
        stop.set()
        t.join(timeout=5)
        ls.close()


def roundtrip(port: int, payload: bytes = b"ping", timeout: float = 2.0) -> tuple[bytes, float]:
    """Send ``payload`` through the proxy and read it back; (reply, seconds)."""
    t = time.monotonic()
    with socket.create_connection(("127.0.0.3", port), timeout=timeout, source_address=("127.0.0.2", 0)) as s:
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    return got, time.monotonic() - t


def test_proxy_forwards_delays_drops_cuts_and_resets(echo_server: tuple[str, int]) -> None:
    host, port = echo_server
    proxy = ProxyThread([Route(2, 3, "127.0.0.3", host, port, "127.0.0.2")])
    try:
        p = proxy.port(2, 3)
        assert roundtrip(p)[0] == b"ping"

        proxy.set_link(2, 3, delay_ms=150)
        got, took = roundtrip(p)
        assert got == b"ping" and took >= 0.3  # 150 ms each way
        proxy.set_link(2, 3, delay_ms=0)

        # Blackhole: connected, nothing comes back; after reopening, the broken stream is reset.
        proxy.set_link(2, 3, "blackhole")
        s = socket.create_connection(("127.0.0.3", p), timeout=0.5, source_address=("127.0.0.2", 0))
        s.sendall(b"lost")
        with pytest.raises(TimeoutError):
            s.recv(16)
        proxy.set_link(2, 3, "open")
        with pytest.raises((ConnectionResetError, TimeoutError)):
            s.settimeout(2)
            if s.recv(16) == b"":
                raise ConnectionResetError("closed")
        s.close()
        assert roundtrip(p)[0] == b"ping"

        # Cut: connections are refused; open again: the same port works.
        proxy.set_link(2, 3, "cut")
        with pytest.raises(ConnectionRefusedError):
            roundtrip(p)
        proxy.set_link(2, 3, "open")
        assert roundtrip(p)[0] == b"ping"

        # The node behind the link is down: refused like its own port, until it is up again.
        proxy.set_down(3, True)
        with pytest.raises(ConnectionRefusedError):
            roundtrip(p)
        proxy.heal()  # a heal does not bring a node back
        with pytest.raises(ConnectionRefusedError):
            roundtrip(p)
        proxy.set_down(3, False)
        assert roundtrip(p)[0] == b"ping"

        # Reject: accepted, then reset at once.
        proxy.set_link(2, 3, "reject")
        with pytest.raises((ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
            got, _ = roundtrip(p)
            if got == b"":
                raise ConnectionResetError("closed")
        proxy.set_link(2, 3, "open")

        # Reset: the current connection dies, a new one works.
        s = socket.create_connection(("127.0.0.3", p), timeout=2, source_address=("127.0.0.2", 0))
        s.sendall(b"a")
        assert s.recv(1) == b"a"
        proxy.reset(2, 3)
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            time.sleep(0.1)
            s.sendall(b"b")
            if s.recv(1) == b"":
                raise ConnectionResetError("closed")
        s.close()
        assert roundtrip(p)[0] == b"ping"
        stats = proxy.stats()["2->3"]
        assert stats["dropped_bytes"] == 4
    finally:
        proxy.close()


# ---- nftables on its own ------------------------------------------------------------------------------


@needs_nft
def test_nft_partition_drops_peer_ports_only(echo_server: tuple[str, int]) -> None:
    host, port = echo_server
    other = socket.socket()  # a "client port" on the same address, which must stay reachable
    other.bind(("127.0.0.3", 0))
    other.listen(4)
    nft = Nft(["127.0.0.2", "127.0.0.3"], [port])
    try:
        chain = nft.add_chain(Nft.drop_pair_rules("127.0.0.2", "127.0.0.3"))
        with pytest.raises((TimeoutError, OSError)):
            socket.create_connection((host, port), timeout=0.5, source_address=("127.0.0.2", 0)).close()
        # Client traffic to the same address, and peer traffic from another address, pass.
        socket.create_connection(other.getsockname(), timeout=2, source_address=("127.0.0.2", 0)).close()
        socket.create_connection((host, port), timeout=2, source_address=("127.0.0.4", 0)).close()
        nft.delete_chain(chain)
        socket.create_connection((host, port), timeout=2, source_address=("127.0.0.2", 0)).close()
        assert nft.table in nft.listing()
    finally:
        nft.close()
        other.close()
    r = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, timeout=10)
    assert nft.table not in r.stdout


# ---- a respreg bug the proxy found ----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_peer_link_redials_after_a_connection_reset_at_once(tmp_path: Path) -> None:
    client_ports = free_ports(3)
    peer_ports = free_ports(3)
    peers = ",".join(f"{i}=127.0.0.{i}:{peer_ports[i - 1]}" for i in (1, 2, 3))

    def serve(i: int) -> subprocess.Popen[bytes]:
        with open(tmp_path / f"n{i}.log", "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "respreg", "serve", "--id", str(i), "--port", str(client_ports[i - 1]),
                 "--peer-port", str(peer_ports[i - 1]), "--bind", f"127.0.0.{i}", "--data-dir", str(tmp_path / f"n{i}"),
                 "--peers", peers, "--cluster-secret", "s"],
                stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip

    # Node 2's peer port first belongs to something that accepts and resets every connection.
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.2", peer_ports[1]))
    ls.listen(64)
    ls.settimeout(0.05)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs += [serve(1), serve(3)]
        resets = 0
        deadline = time.monotonic() + 8  # about 10 dials from each of nodes 1 and 3 (backoff up to 1 s)
        while time.monotonic() < deadline:
            try:
                c, _ = ls.accept()
            except TimeoutError:
                continue
            c.close()
            resets += 1
        ls.close()
        assert resets >= 4
        procs.append(serve(2))  # the real node 2 now
        deadline = time.monotonic() + 10
        views: dict[int, object] = {}
        while time.monotonic() < deadline:
            time.sleep(0.2)
            for i in (1, 3):
                try:
                    info = redis.Redis(host=f"127.0.0.{i}", port=client_ports[i - 1], socket_timeout=2).info("paxos")
                except redis.ConnectionError:
                    continue
                views[i] = info.get("peer2")
            if all(isinstance(v, dict) and str(v.get("up")) == "1" for v in views.values()) and len(views) == 2:
                break
        assert len(views) == 2 and all(isinstance(v, dict) and str(v.get("up")) == "1" for v in views.values()), (
            f"a node never redialled node 2 after {resets} reset connections: {views}"
        )
    finally:
        ls.close()
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

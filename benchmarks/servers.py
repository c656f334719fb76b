"""The systems under test, each started as real processes on free loopback ports in a temp dir."""

from __future__ import annotations

import json
import sys
import urllib.request
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from harness import HOST, CommandLog, ServerGroup, free_ports, resp_command, resp_ping, wait_until


def start_redis(root: Path, durable: bool, commands: CommandLog) -> tuple[ServerGroup, int]:
    """One redis-server: in memory (no RDB, no AOF) or durable (AOF fsynced on every write)."""
    label = "redis-durable" if durable else "redis-mem"
    data = root / label
    data.mkdir(parents=True)
    (port,) = free_ports(1)
    persistence = ["--appendonly", "yes", "--appendfsync", "always"] if durable else ["--appendonly", "no"]
    argv = [
        "redis-server",
        "--bind", HOST,
        "--port", str(port),
        "--dir", str(data),
        "--save", "",
        *persistence,
        "--daemonize", "no",
        "--protected-mode", "yes",
    ]  # fmt: skip
    group = ServerGroup(label, commands)
    try:
        group.start(label, argv, root / f"{label}.log")
        wait_until(f"{label} on port {port}", lambda: resp_ping(port), 20, group)
    except BaseException:
        group.stop()
        raise
    return group, port


def start_respreg(
    root: Path, size: int, commands: CommandLog, extra: Sequence[str] = ()
) -> tuple[ServerGroup, list[int]]:
    """A respreg cluster of `size` separate `respreg serve` processes (``extra``: more flags for
    each); returns their client ports."""
    ports = free_ports(2 * size)
    client_ports, peer_ports = ports[:size], ports[size:]
    secret = root / "respreg.secret"
    secret.write_text("benchmark-cluster-secret\n")
    secret.chmod(0o600)
    peers = ",".join(f"{i + 1}={HOST}:{peer_ports[i]}" for i in range(size))
    group = ServerGroup("respreg", commands)
    try:
        for i in range(size):
            argv = [
                sys.executable, "-m", "respreg", "serve",
                "--id", str(i + 1),
                "--port", str(client_ports[i]),
                "--peer-port", str(peer_ports[i]),
                "--bind", HOST,
                "--data-dir", str(root / "respreg" / f"node{i + 1}"),
                "--peers", peers,
                "--cluster-secret-file", str(secret),
                "--log-level", "WARNING",
                *extra,
            ]  # fmt: skip
            group.start(f"respreg node {i + 1}", argv, root / f"respreg-node{i + 1}.log")
        for p in client_ports:
            wait_until(f"respreg node on port {p}", partial(resp_ping, p), 30, group)
        wait_until("respreg peer links", lambda: all(_respreg_peers_up(p) >= size - 1 for p in client_ports), 30, group)
    except BaseException:
        group.stop()
        raise
    return group, client_ports


def _respreg_peers_up(port: int) -> int:
    raw = resp_command(port, "INFO", "paxos")
    for line in raw.decode(errors="replace").splitlines():
        if line.startswith("peers_up:"):
            return int(line.split(":", 1)[1])
    return -1


def start_etcd(root: Path, size: int, commands: CommandLog) -> tuple[ServerGroup, list[str]]:
    """An etcd cluster of `size` members on loopback (fsync on, as shipped); returns client URLs."""
    ports = free_ports(2 * size)
    client_ports, peer_ports = ports[:size], ports[size:]
    names = [f"bench{i + 1}" for i in range(size)]
    initial = ",".join(f"{names[i]}=http://{HOST}:{peer_ports[i]}" for i in range(size))
    urls = [f"http://{HOST}:{p}" for p in client_ports]
    group = ServerGroup("etcd", commands)
    try:
        for i in range(size):
            data = root / "etcd" / names[i]
            data.parent.mkdir(parents=True, exist_ok=True)
            argv = [
                "etcd",
                "--name", names[i],
                "--data-dir", str(data),
                "--listen-client-urls", urls[i],
                "--advertise-client-urls", urls[i],
                "--listen-peer-urls", f"http://{HOST}:{peer_ports[i]}",
                "--initial-advertise-peer-urls", f"http://{HOST}:{peer_ports[i]}",
                "--initial-cluster", initial,
                "--initial-cluster-token", "respreg-benchmark",
                "--initial-cluster-state", "new",
                "--logger", "zap",
                "--log-level", "warn",
            ]  # fmt: skip
            group.start(f"etcd member {names[i]}", argv, root / f"etcd-{names[i]}.log")
        for u in urls:
            wait_until(f"etcd at {u}", partial(_etcd_healthy, u), 60, group)
    except BaseException:
        group.stop()
        raise
    return group, urls


def _etcd_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            body = json.loads(resp.read())
    except (OSError, ValueError):
        return False
    return bool(body.get("health") in ("true", True))


def etcd_leader(urls: list[str]) -> str:
    """The client URL of the current leader ('' if none answers)."""
    for u in urls:
        try:
            req = urllib.request.Request(f"{u}/v3/maintenance/status", data=b"{}", method="POST")
            with urllib.request.urlopen(req, timeout=2) as resp:
                body = json.loads(resp.read())
            if body.get("leader") == body.get("header", {}).get("member_id"):
                return u
        except (OSError, ValueError):
            continue
    return ""

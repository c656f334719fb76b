"""A real respreg cluster on loopback aliases: node i serves on 127.0.0.i (``--bind``).

Linux routes all of 127.0.0.0/8 through ``lo``, so no set-up is needed; each node's listening
sockets and its outgoing peer connections carry its own address, which is what lets nftables
rules tell the links between nodes apart. Optionally each node dials its peers through the
fault-injecting proxy (:mod:`tests.chaos.proxy`): then node i's ``--peers`` names the proxy port
of link i->j for every other member j, and its own real peer port for itself. A node may get
extra environment variables (``node_env``; the disk faults preload their fsync library so).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.chaos.proxy import Route
from tests.cluster import Cluster, Node, free_ports, wait_ping


def node_host(node_id: int) -> str:
    return f"127.0.0.{node_id}"


@dataclass
class ChaosNode(Node):
    host: str = "127.0.0.1"


@dataclass
class ChaosCluster(Cluster):
    """:class:`tests.cluster.Cluster` with one loopback address per node and per-node peer lists."""

    #: (src, dst) -> port on dst's address where src reaches dst (a proxy port); missing: direct.
    via: dict[tuple[int, int], int] = field(default_factory=dict)
    log_level: str = "WARNING"
    #: node id -> environment variables added to that node's process (same PID, no wrapper).
    node_env: dict[int, dict[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 1 <= self.size <= 250:
            raise ValueError("1..250 nodes")
        ports = free_ports(2 * self.size)
        for i in range(self.size):
            nid = i + 1
            self.nodes.append(
                ChaosNode(
                    nid,
                    ports[i],
                    ports[self.size + i],
                    self.root / f"node{nid}",
                    self.root / f"node{nid}.log",
                    host=node_host(nid),
                )
            )

    def host(self, node_id: int) -> str:
        n = self.node(node_id)
        assert isinstance(n, ChaosNode)
        return n.host

    @property
    def ids(self) -> list[int]:
        return [n.node_id for n in self.nodes]

    def routes(self) -> list[Route]:
        """The proxy routes of every directed link between two members."""
        return [
            Route(src, dst, self.host(dst), self.host(dst), self.node(dst).peer_port, self.host(src))
            for src in self.ids
            for dst in self.ids
            if src != dst
        ]

    def peers_for(self, node_id: int) -> str:
        parts = []
        for n in self.nodes:
            port = n.peer_port if n.node_id == node_id else self.via.get((node_id, n.node_id), n.peer_port)
            parts.append(f"{n.node_id}={self.host(n.node_id)}:{port}")
        return ",".join(parts)

    def command(self, n: Node) -> list[str]:
        return [
            sys.executable, "-m", "respreg", "serve",
            "--id", str(n.node_id),
            "--port", str(n.port),
            "--peer-port", str(n.peer_port),
            "--bind", self.host(n.node_id),
            "--data-dir", str(n.data_dir),
            "--peers", self.peers_for(n.node_id),
            "--cluster-secret", self.secret,
            "--deadline-ms", str(self.deadline_ms),
            "--log-level", self.log_level,
            *self.extra_args,
        ]  # fmt: skip

    def start(self, *which: int, wait: bool = True) -> None:
        targets = [n for n in self.nodes if not which or n.node_id in which]
        for n in targets:
            assert not n.running(), f"node {n.node_id} already running"
            extra = self.node_env.get(n.node_id)
            env = {**os.environ, **extra} if extra else None
            with open(n.log_path, "ab") as log:
                n.proc = subprocess.Popen(self.command(n), stdout=log, stderr=log, start_new_session=True, env=env)
        if wait:
            for n in targets:
                wait_ping(n.port, proc=n.proc, host=self.host(n.node_id))

    def client(self, node_id: int, **kw: object) -> redis.Redis:
        n = self.node(node_id)
        kw.setdefault("socket_timeout", 10)
        kw.setdefault("retry", Retry(NoBackoff(), 0))
        return redis.Redis(host=self.host(node_id), port=n.port, **kw)  # type: ignore[arg-type]

    def signal(self, node_id: int, sig: int) -> None:
        """Send ``sig`` to a node's process (by PID); waits for it to end after SIGKILL/SIGTERM."""
        n = self.node(node_id)
        if n.proc is None or n.proc.poll() is not None:
            return
        n.proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            n.proc.wait(timeout=15)

    def peer_ports(self) -> list[int]:
        return [n.peer_port for n in self.nodes]

    def own_ports(self) -> list[int]:
        """Every port a node binds itself (client and peer)."""
        return [n.port for n in self.nodes] + self.peer_ports()


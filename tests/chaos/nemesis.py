"""Faults for the chaos suite, each bounded in time and undone in finalizers.

Process faults: ``kill`` (kill -9 a minority, sometimes a majority, restart later), ``pause``
(SIGSTOP/SIGCONT), ``restart-all`` (kill -9 every node, start them all).

Network faults between peers only (test clients always reach every node):

- ``partition``: nftables rules dropping peer traffic between pairs of node addresses
  (majority/minority split, isolated node, bridge, ring); needs root and ``nft``;
- ``loss``: nftables ``numgen random mod 100 < N drop`` on all peer traffic;
- ``proxy-partition``: the same split plans through the proxy, silent (blackhole), refused (cut),
  accepted-and-reset (reject), or a flapping link that is reset again and again; no root needed;
- ``delay``: per-link latency through the proxy, up to well past respreg's peer timeout.

Disk faults (:mod:`tests.chaos.disk`), on a minority of nodes or, sometimes, a majority:

- ``fsync-eio``: every fsync under the node's data directory fails with EIO (an LD_PRELOAD
  library; needs gcc); ``fsync-eio-dirs``: only directory fsyncs fail, so a state renamed into
  place is not made durable and respreg stops voting (``acceptor:disk-failed``);
- ``disk-full``: the node's data directory, on its own small tmpfs (needs root), is filled until
  not one page is left.

When a disk fault ends the disk is repaired and the node checked: a node that stopped voting
(``disk-failed``, it must be restarted on a healthy disk) or exited is restarted, as ``kill``
restarts. A node killed while its disk is broken is started only once the disk works again (it
could not write its ``node.meta`` before). A node with a broken disk counts as faulty in the
availability figures, as a down node does.

Clock faults are deliberately absent: respreg's protocol uses no wall-clock time. Its timers are
the event loop's monotonic clock (``loop.time()``) and ``time.monotonic()``; ``time.time()``
appears only in ``INFO``'s ``uptime_in_seconds``. Skewing or jumping the wall clock (for example
with libfaketime) therefore cannot change any decision a node makes.

nftables rules live in this process's own table, ``inet respreg_chaos_<pid>``, one base chain
per active fault on the input hook (on loopback, dropping on input looks like a lossy wire to the
sender, while dropping on output would fail its send at once). Only peer ports (and the proxy's
ports) are matched, in either direction, so client traffic passes: the kernel does not hand out a
port some socket is bound to as an ephemeral port, so a client connection cannot carry a peer
port (only while a node is down is its peer port free; a client that drew it would merely time
out). The table is deleted in :meth:`Nft.close`; nothing else is ever touched.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from tests.chaos.cluster import ChaosCluster
from tests.chaos.disk import DiskControl
from tests.chaos.proxy import LinkControl

PROCESS_FAULTS = ("kill", "pause", "restart-all")
NETWORK_FAULTS = ("partition", "loss", "proxy-partition", "delay")
DISK_FAULTS = ("fsync-eio", "fsync-eio-dirs", "disk-full")
ALL_FAULTS = PROCESS_FAULTS + NETWORK_FAULTS + DISK_FAULTS
NFT_FAULTS = frozenset({"partition", "loss"})
PROXY_FAULTS = frozenset({"proxy-partition", "delay"})
SHIM_FAULTS = frozenset({"fsync-eio", "fsync-eio-dirs"})
TMPFS_FAULTS = frozenset({"disk-full"})

#: A link slower than this (one way) is counted as cut in the availability figures: a reply then
#: takes longer than respreg's peer timeout allows for comfortably.
SLOW_LINK_MS = 400.0

Pair = frozenset[int]
#: How a proxy partition cuts its links: silently (blackhole), loudly (cut: refused), by accepting
#: and resetting every connection (reject), or by resetting connections again and again (flap).
ProxyMode = Literal["blackhole", "cut", "reject", "flap"]
PROXY_MODES: tuple[ProxyMode, ...] = ("blackhole", "cut", "reject", "flap")


def pair(a: int, b: int) -> Pair:
    return frozenset((a, b))


# ---- fault state and the "connected majority" timeline ------------------------------------------


@dataclass
class Segment:
    start: float
    healthy: frozenset[int]
    label: str


class Topology:
    """What the faults currently do, to tell which nodes can reach a majority (themselves included)
    of running, unpaused nodes with working disks over working links. Every change is appended to
    ``timeline``."""

    def __init__(self, ids: Sequence[int], now: Callable[[], float] = time.monotonic) -> None:
        self.ids = tuple(ids)
        self.majority = len(self.ids) // 2 + 1
        self.down: Counter[int] = Counter()
        self.paused: Counter[int] = Counter()
        #: nodes whose disk is broken (fsync EIO, full): faulty, like a down node
        self.disk: Counter[int] = Counter()
        self.cut: Counter[Pair] = Counter()
        self.active: Counter[str] = Counter()
        self._now = now
        self._lock = threading.Lock()
        self.timeline: list[Segment] = [Segment(now(), frozenset(self.ids), "none")]

    def healthy(self) -> frozenset[int]:
        up = [i for i in self.ids if not self.down[i] and not self.paused[i] and not self.disk[i]]
        out = set()
        for i in up:
            reach = 1 + sum(1 for j in up if j != i and not self.cut[pair(i, j)])
            if reach >= self.majority:
                out.add(i)
        return frozenset(out)

    def label(self) -> str:
        names = sorted(n for n, c in self.active.items() if c > 0)
        return "+".join(names) if names else "none"

    def change(self, fn: Callable[[Topology], None]) -> None:
        with self._lock:
            fn(self)
            self.timeline.append(Segment(self._now(), self.healthy(), self.label()))


# ---- nftables ------------------------------------------------------------------------------------


def nft_unavailable() -> str | None:
    """Why nftables faults cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "nftables faults need root (run as root, or use the proxy faults)"
    if shutil.which("nft") is None:
        return "nftables faults need the nft command (apt-get install nftables)"
    probe = f"respreg_chaos_probe_{os.getpid()}"
    try:
        r = subprocess.run(
            ["nft", "-f", "-"],
            input=f"add table inet {probe}\ndelete table inet {probe}\n",
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nft does not work here: {exc}"
    if r.returncode != 0:
        return f"nft does not work here: {r.stderr.strip()}"
    return None


class Nft:
    """This process's own nftables table; ``close()`` deletes it (and only it)."""

    def __init__(self, addresses: Iterable[str], ports: Iterable[int]) -> None:
        self.table = f"respreg_chaos_{os.getpid()}"
        self._chains = itertools.count(1)
        self._lock = threading.Lock()
        self.created = False
        addrs = ", ".join(sorted(set(addresses)))
        plist = ", ".join(str(p) for p in sorted(set(ports)))
        self._run(
            f"add table inet {self.table}\n"
            f"add set inet {self.table} nodes {{ type ipv4_addr; elements = {{ {addrs} }}; }}\n"
            f"add set inet {self.table} peerports {{ type inet_service; elements = {{ {plist} }}; }}\n"
        )
        self.created = True

    def _run(self, script: str) -> None:
        with self._lock:
            r = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=15)
        if r.returncode != 0:
            raise RuntimeError(f"nft failed ({r.returncode}): {r.stderr.strip()}\nscript:\n{script}")

    def add_chain(self, rules: Sequence[str]) -> str:
        """A new base chain on the input hook holding ``rules``; returns its name."""
        name = f"fault{next(self._chains)}"
        lines = [f"add chain inet {self.table} {name} {{ type filter hook input priority 0; policy accept; }}"]
        lines += [f"add rule inet {self.table} {name} {r}" for r in rules]
        self._run("\n".join(lines) + "\n")
        return name

    def delete_chain(self, name: str) -> None:
        self._run(f"flush chain inet {self.table} {name}\ndelete chain inet {self.table} {name}\n")

    def listing(self) -> str:
        r = subprocess.run(["nft", "list", "table", "inet", self.table], capture_output=True, text=True, timeout=15)
        return r.stdout

    def close(self) -> None:
        if self.created:
            self.created = False
            self._run(f"delete table inet {self.table}\n")

    @staticmethod
    def drop_pair_rules(a: str, b: str) -> list[str]:
        rules = []
        for s, d in ((a, b), (b, a)):
            rules.append(f"ip saddr {s} ip daddr {d} tcp dport @peerports drop")
            rules.append(f"ip saddr {s} ip daddr {d} tcp sport @peerports drop")
        return rules

    @staticmethod
    def loss_rules(percent: int) -> list[str]:
        return [
            f"ip saddr @nodes ip daddr @nodes tcp dport @peerports numgen random mod 100 < {percent} drop",
            f"ip saddr @nodes ip daddr @nodes tcp sport @peerports numgen random mod 100 < {percent} drop",
        ]


# ---- split plans ----------------------------------------------------------------------------------


PLANS = ("majority-minority", "isolate", "bridge", "ring")


def split_plan(ids: Sequence[int], rng: random.Random, plan: str | None = None) -> tuple[str, set[Pair]]:
    """A partition as the set of cut node pairs. ``ring`` needs 5 nodes or more."""
    ids = list(ids)
    choices = [p for p in PLANS if p != "ring" or len(ids) >= 5]
    plan = plan or rng.choice(choices)
    order = ids[:]
    rng.shuffle(order)
    cut: set[Pair] = set()
    if plan == "majority-minority":
        minority = order[: len(ids) // 2]
        rest = order[len(ids) // 2 :]
        cut = {pair(a, b) for a in minority for b in rest}
        desc = f"{sorted(minority)} | {sorted(rest)}"
    elif plan == "isolate":
        alone = order[0]
        cut = {pair(alone, b) for b in ids if b != alone}
        desc = f"[{alone}] alone"
    elif plan == "bridge":
        bridge, rest = order[0], order[1:]
        left, right = rest[: len(rest) // 2], rest[len(rest) // 2 :]
        cut = {pair(a, b) for a in left for b in right}
        desc = f"{sorted(left)} | {sorted(right)}, bridged by {bridge}"
    elif plan == "ring":
        if len(ids) < 5:
            raise ValueError("a ring partition needs 5 nodes or more")
        neighbours = {pair(order[i], order[(i + 1) % len(order)]) for i in range(len(order))}
        cut = {pair(a, b) for a, b in itertools.combinations(ids, 2)} - neighbours
        desc = "ring " + "-".join(str(i) for i in order)
    else:
        raise ValueError(f"unknown plan {plan!r}")
    return f"{plan} {desc}", cut


# ---- faults -----------------------------------------------------------------------------------------


@dataclass
class Event:
    time: float
    what: str  # "start" or "heal"
    fault: str
    description: str
    #: Nodes outside a connected majority just before a heal (their service comes back with it).
    affected: frozenset[int] = frozenset()


class Fault:
    """One fault: ``start()`` applies it, ``stop()`` undoes it (idempotent, safe in finalizers)."""

    name = "fault"

    def __init__(self, nemesis: Nemesis) -> None:
        self.n = nemesis
        self.description = self.name
        self.started = False

    def start(self) -> None:
        self.started = True
        self._apply()

    def stop(self) -> None:
        if self.started:
            self.started = False
            self._undo()

    def _apply(self) -> None:
        raise NotImplementedError

    def _undo(self) -> None:
        raise NotImplementedError


def _pick_nodes(ids: Sequence[int], rng: random.Random, majority_chance: float) -> list[int]:
    minority = len(ids) // 2
    if len(ids) > 1 and rng.random() < majority_chance:
        count = minority + 1
    else:
        count = rng.randint(1, max(1, minority))
    return sorted(rng.sample(list(ids), count))


class Kill(Fault):
    name = "kill"

    def __init__(self, nemesis: Nemesis, nodes: Sequence[int]) -> None:
        super().__init__(nemesis)
        self.nodes = list(nodes)
        self.description = f"kill -9 {self.nodes}"

    def _apply(self) -> None:
        self.n.topology.change(lambda t: t.down.update(self.nodes))
        self.n.kill(self.nodes)

    def _undo(self) -> None:
        self.n.restart(self.nodes)
        self.n.topology.change(lambda t: t.down.subtract(self.nodes))


class Pause(Fault):
    name = "pause"

    def __init__(self, nemesis: Nemesis, nodes: Sequence[int]) -> None:
        super().__init__(nemesis)
        self.nodes = list(nodes)
        self.description = f"SIGSTOP {self.nodes}"

    def _apply(self) -> None:
        self.n.topology.change(lambda t: t.paused.update(self.nodes))
        for i in self.nodes:
            self.n.cluster.signal(i, signal.SIGSTOP)

    def _undo(self) -> None:
        for i in self.nodes:
            self.n.cluster.signal(i, signal.SIGCONT)
        self.n.topology.change(lambda t: t.paused.subtract(self.nodes))


class RestartAll(Fault):
    name = "restart-all"

    def __init__(self, nemesis: Nemesis) -> None:
        super().__init__(nemesis)
        self.description = "kill -9 every node, then start them all"

    def _apply(self) -> None:
        ids = self.n.cluster.ids
        self.n.topology.change(lambda t: t.down.update(ids))
        self.n.kill(ids)

    def _undo(self) -> None:
        ids = self.n.cluster.ids
        self.n.restart(ids)
        self.n.topology.change(lambda t: t.down.subtract(ids))


class NftPartition(Fault):
    name = "partition"

    def __init__(self, nemesis: Nemesis, plan: str, cut: set[Pair]) -> None:
        super().__init__(nemesis)
        self.cut = set(cut)
        self.description = f"nft {plan}"
        self.chain: str | None = None

    def _apply(self) -> None:
        nft = self.n.require_nft()
        rules: list[str] = []
        for p in self.cut:
            a, b = sorted(p)
            rules += Nft.drop_pair_rules(self.n.cluster.host(a), self.n.cluster.host(b))
        self.n.topology.change(lambda t: t.cut.update(self.cut))
        self.chain = nft.add_chain(rules)

    def _undo(self) -> None:
        if self.chain is not None and self.n.nft is not None:
            self.n.nft.delete_chain(self.chain)
            self.chain = None
        self.n.topology.change(lambda t: t.cut.subtract(self.cut))


class NftLoss(Fault):
    name = "loss"

    def __init__(self, nemesis: Nemesis, percent: int) -> None:
        super().__init__(nemesis)
        self.percent = percent
        self.description = f"nft drop {percent}% of peer packets"
        self.chain: str | None = None

    def _apply(self) -> None:
        self.chain = self.n.require_nft().add_chain(Nft.loss_rules(self.percent))
        self.n.topology.change(lambda t: None)

    def _undo(self) -> None:
        if self.chain is not None and self.n.nft is not None:
            self.n.nft.delete_chain(self.chain)
            self.chain = None
        self.n.topology.change(lambda t: None)


class ProxyPartition(Fault):
    name = "proxy-partition"

    def __init__(self, nemesis: Nemesis, plan: str, cut: set[Pair], mode: ProxyMode) -> None:
        super().__init__(nemesis)
        self.cut = set(cut)
        self.mode = mode
        self.description = f"proxy {mode} {plan}"
        self._stop = threading.Event()
        self._flapper: threading.Thread | None = None

    def _links(self) -> list[tuple[int, int]]:
        out = []
        for p in self.cut:
            a, b = sorted(p)
            out += [(a, b), (b, a)]
        return out

    def _apply(self) -> None:
        proxy = self.n.require_proxy()
        if self.mode == "flap":
            # Connections of these links are reset over and over; each reconnect works at first.
            self._stop.clear()
            self._flapper = threading.Thread(target=self._flap, args=(proxy,), name="chaos-flap", daemon=True)
            self._flapper.start()
            self.n.topology.change(lambda t: None)
            return
        assert self.mode in ("blackhole", "cut", "reject")
        self.n.topology.change(lambda t: t.cut.update(self.cut))
        for src, dst in self._links():
            proxy.set_link(src, dst, self.mode)

    def _flap(self, proxy: LinkControl) -> None:
        rng = random.Random(hash(tuple(sorted(self._links()))))
        while not self._stop.wait(rng.uniform(0.05, 0.5)):
            src, dst = rng.choice(self._links())
            with contextlib.suppress(Exception):
                proxy.reset(src, dst)

    def _undo(self) -> None:
        proxy = self.n.require_proxy()
        if self.mode == "flap":
            self._stop.set()
            if self._flapper is not None:
                self._flapper.join(timeout=10)
            self.n.topology.change(lambda t: None)
            return
        for src, dst in self._links():
            proxy.set_link(src, dst, "open")
        self.n.topology.change(lambda t: t.cut.subtract(self.cut))


class Delay(Fault):
    name = "delay"

    def __init__(self, nemesis: Nemesis, links: Sequence[tuple[int, int]], delay_ms: float, what: str) -> None:
        super().__init__(nemesis)
        self.links = list(links)
        self.delay_ms = delay_ms
        self.description = f"delay {delay_ms:.0f} ms one way on {what}"
        # A pair counts as cut for availability when either direction is too slow.
        self.slow = {pair(a, b) for a, b in self.links} if delay_ms >= SLOW_LINK_MS else set()

    def _apply(self) -> None:
        proxy = self.n.require_proxy()
        self.n.topology.change(lambda t: t.cut.update(self.slow))
        for src, dst in self.links:
            proxy.set_link(src, dst, delay_ms=self.delay_ms)

    def _undo(self) -> None:
        proxy = self.n.require_proxy()
        for src, dst in self.links:
            proxy.set_link(src, dst, delay_ms=0)
        self.n.topology.change(lambda t: t.cut.subtract(self.slow))


class FsyncEio(Fault):
    """fsync fails with EIO under the data directories of ``nodes`` (only for directories with
    ``dirs_only``)."""

    def __init__(self, nemesis: Nemesis, nodes: Sequence[int], dirs_only: bool) -> None:
        super().__init__(nemesis)
        self.nodes = list(nodes)
        self.dirs_only = dirs_only
        self.name = "fsync-eio-dirs" if dirs_only else "fsync-eio"
        what = "directory fsyncs" if dirs_only else "fsyncs"
        self.description = f"{what} fail with EIO on {self.nodes}"

    def _apply(self) -> None:
        disks = self.n.require_disks()
        self.n.topology.change(lambda t: t.disk.update(self.nodes))
        disks.break_fsync(self.nodes, self.dirs_only)

    def _undo(self) -> None:
        self.n.require_disks().repair_fsync(self.nodes, self.dirs_only)
        try:
            self.n.recover_disks(self.nodes)
        finally:
            self.n.topology.change(lambda t: t.disk.subtract(self.nodes))


class DiskFull(Fault):
    name = "disk-full"

    def __init__(self, nemesis: Nemesis, nodes: Sequence[int]) -> None:
        super().__init__(nemesis)
        self.nodes = list(nodes)
        self.description = f"fill the data disks of {self.nodes}"

    def _apply(self) -> None:
        disks = self.n.require_disks()
        self.n.topology.change(lambda t: t.disk.update(self.nodes))
        started = time.monotonic()
        written = disks.fill(self.nodes)
        took = time.monotonic() - started
        filled = ", ".join(f"n{i} +{b / (1 << 20):.0f} MiB" for i, b in sorted(written.items()))
        self.description += f" ({filled} in {took:.1f} s)"

    def _undo(self) -> None:
        self.n.require_disks().free(self.nodes)
        try:
            self.n.recover_disks(self.nodes)
        finally:
            self.n.topology.change(lambda t: t.disk.subtract(self.nodes))


# ---- the nemesis ------------------------------------------------------------------------------------


@dataclass
class Nemesis:
    """Makes and runs faults against ``cluster``; ``close()`` undoes whatever is still active."""

    cluster: ChaosCluster
    proxy: LinkControl | None = None
    nft: Nft | None = None
    topology: Topology = field(init=False)
    events: list[Event] = field(default_factory=list)
    active: list[Fault] = field(default_factory=list)
    log: Callable[[str], None] = print
    t0: float = field(default_factory=time.monotonic)
    #: The ways proxy partitions cut links, drawn uniformly.
    proxy_modes: tuple[ProxyMode, ...] = PROXY_MODES
    disks: DiskControl | None = None
    #: What the nemesis did beyond the faults themselves (restarts after disk faults, nodes that
    #: exited by themselves), with times; also logged.
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.topology = Topology(self.cluster.ids)
        self._killed: set[int] = set()
        #: killed nodes whose restart waits until their disk works again
        self._deferred: set[int] = set()
        #: nodes whose disk was repaired and that were not checked since
        self._suspect: set[int] = set()

    def note(self, text: str) -> None:
        line = f"[{time.monotonic() - self.t0:7.2f}s] {text}"
        self.notes.append(line)
        self.log(line)

    def kill(self, nodes: Sequence[int]) -> None:
        """kill -9 ``nodes``; behind the proxy, their links refuse connections first, as a dead
        node's port does (a proxy that accepts and resets is the separate ``reject`` fault)."""
        if self.proxy is not None:
            for i in nodes:
                self.proxy.set_down(i, True)
        for i in nodes:
            self._killed.add(i)
            self.cluster.signal(i, signal.SIGKILL)

    def restart(self, nodes: Sequence[int]) -> None:
        """Start those of ``nodes`` that do not run. A node whose disk is broken could not start
        (it cannot write its node.meta): it stays down, and starts once its disk is repaired."""
        dead = [i for i in nodes if not self.cluster.node(i).running()]
        for i in dead:
            proc = self.cluster.node(i).proc
            if i not in self._killed and i not in self._deferred and proc is not None:
                self.note(f"node {i} had exited by itself (exit code {proc.returncode}); starting it")
        blocked = [i for i in dead if self.disks is not None and self.disks.is_broken(i)]
        waiting = [i for i in blocked if i not in self._deferred]
        if waiting:
            self._deferred.update(waiting)
            self.topology.change(lambda t: t.down.update(waiting))
            self.note(f"nodes {waiting} stay down until their disks are repaired")
        start = [i for i in dead if i not in blocked]
        try:
            if start:
                self.cluster.start(*start)
        finally:
            if self.proxy is not None:
                for i in nodes:
                    if i not in blocked:
                        self.proxy.set_down(i, False)
        self._killed.difference_update(start)
        waited = [i for i in start if i in self._deferred]
        if waited:
            self._deferred.difference_update(waited)
            self.topology.change(lambda t: t.down.subtract(waited))

    def recover_disks(self, nodes: Sequence[int]) -> None:
        """After the disks of ``nodes`` were repaired: restart those that stopped voting or exited
        (now, or once no other fault holds them down or paused)."""
        self._suspect.update(nodes)
        self._check_disks()

    def _check_disks(self) -> None:
        t = self.topology
        for i in sorted(self._suspect | self._deferred):
            if self.disks is not None and self.disks.is_broken(i):
                continue
            if i in self._deferred:
                self.note(f"node {i}: its disk works again; starting it")
                self.restart([i])
            elif t.down[i] or t.paused[i]:
                continue  # checked again when the fault holding it ends
            elif not self.cluster.node(i).running():
                self._bounce(i, kill=False)  # restart() notes that it exited by itself
            else:
                acceptor = self._acceptor(i)
                if acceptor == "disk-failed":
                    self.note(f"node {i} stopped voting after a failed fsync (acceptor:disk-failed); restarting it")
                    self._bounce(i, kill=True)
                elif acceptor is None:
                    self.note(f"node {i} did not answer INFO after its disk was repaired; restarting it")
                    self._bounce(i, kill=True)
            self._suspect.discard(i)

    def _bounce(self, node: int, kill: bool) -> None:
        """(kill -9 and) start ``node``, counted down meanwhile."""
        self.topology.change(lambda t: t.down.update([node]))
        try:
            if kill:
                self.kill([node])
            self.restart([node])
        finally:
            self.topology.change(lambda t: t.down.subtract([node]))

    def _acceptor(self, node: int) -> str | None:
        """The node's ``acceptor`` status from INFO paxos, or None if it does not answer."""
        for attempt in range(3):
            try:
                with self.cluster.client(node, socket_timeout=5) as r:
                    info = r.info("paxos")
                return str(info.get("acceptor"))
            except Exception:  # noqa: BLE001 - retried, then reported as no answer
                if attempt < 2:
                    time.sleep(0.5)
        return None

    def require_nft(self) -> Nft:
        if self.nft is None:
            raise RuntimeError("this fault needs nftables (root and nft), which this run does not have")
        return self.nft

    def require_proxy(self) -> LinkControl:
        if self.proxy is None:
            raise RuntimeError("this fault needs the peers to run through the proxy")
        return self.proxy

    def require_disks(self) -> DiskControl:
        if self.disks is None:
            raise RuntimeError("this fault needs the disk faults set up before the nodes start")
        return self.disks

    def make(self, name: str, rng: random.Random) -> Fault:
        ids = self.cluster.ids
        if name == "kill":
            return Kill(self, _pick_nodes(ids, rng, majority_chance=0.15))
        if name == "pause":
            return Pause(self, _pick_nodes(ids, rng, majority_chance=0.15))
        if name == "restart-all":
            return RestartAll(self)
        if name == "partition":
            return NftPartition(self, *split_plan(ids, rng))
        if name == "loss":
            return NftLoss(self, rng.choice([5, 10, 20, 35, 50]))
        if name == "proxy-partition":
            plan, cut = split_plan(ids, rng)
            mode: ProxyMode = rng.choice(self.proxy_modes)
            return ProxyPartition(self, plan, cut, mode)
        if name == "delay":
            delay_ms = rng.choice([20, 100, 250, 600, 1500])
            if rng.random() < 0.5:
                slow = rng.choice(ids)
                links = [(a, b) for a in ids for b in ids if a != b and slow in (a, b)]
                return Delay(self, links, delay_ms, f"every link of node {slow}")
            every = [(a, b) for a in ids for b in ids if a != b]
            links = rng.sample(every, max(1, len(every) // 3))
            return Delay(self, links, delay_ms, "links " + ",".join(f"{a}->{b}" for a, b in sorted(links)))
        if name in ("fsync-eio", "fsync-eio-dirs"):
            return FsyncEio(self, _pick_nodes(ids, rng, majority_chance=0.15), dirs_only=name == "fsync-eio-dirs")
        if name == "disk-full":
            return DiskFull(self, _pick_nodes(ids, rng, majority_chance=0.15))
        raise ValueError(f"unknown fault {name!r}; known: {', '.join(ALL_FAULTS)}")

    def start(self, fault: Fault) -> None:
        self.log(f"[{time.monotonic() - self.t0:7.2f}s] start {fault.name}: {fault.description}")
        self.active.append(fault)
        self.topology.change(lambda t: t.active.update([fault.name]))
        fault.start()
        self.events.append(Event(time.monotonic(), "start", fault.name, fault.description))

    def stop(self, fault: Fault) -> None:
        affected = frozenset(self.cluster.ids) - self.topology.healthy()
        fault.stop()
        self.topology.change(lambda t: t.active.subtract([fault.name]))
        if fault in self.active:
            self.active.remove(fault)
        self._check_disks()  # a node this fault held down or paused may wait for its disk check
        now = time.monotonic()
        self.events.append(Event(now, "heal", fault.name, fault.description, affected))
        self.log(f"[{now - self.t0:7.2f}s] heal  {fault.name}: {fault.description}")

    def heal_all(self) -> None:
        """Undo every active fault (newest first), then make sure every node runs, is not paused,
        has a working disk and votes."""
        errors: list[BaseException] = []
        for fault in reversed(list(self.active)):
            try:
                self.stop(fault)
            except Exception as exc:  # noqa: BLE001 - keep healing the rest, re-raised below
                errors.append(exc)
        if self.disks is not None:
            self.disks.repair_all()
        for n in self.cluster.nodes:
            if n.proc is not None and n.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(n.proc.pid, signal.SIGCONT)
        self.restart([n.node_id for n in self.cluster.nodes])
        self._check_disks()
        if self.proxy is not None:
            self.proxy.heal()
        if errors:
            raise errors[0]


def run_schedule(
    nemesis: Nemesis,
    names: Sequence[str],
    rng: random.Random,
    until: float,
    hold_s: tuple[float, float] = (2.0, 8.0),
    quiet_s: tuple[float, float] = (1.0, 4.0),
    mix_chance: float = 0.3,
    stop: threading.Event | None = None,
) -> None:
    """Apply faults chosen by ``rng`` from ``names`` until ``until`` (monotonic), one at a time or,
    with ``mix_chance``, two of different kinds together (process, disk, network: started in that
    order and healed in the reverse one, so a killed node is restarted after its disk works
    again). Every fault is healed before returning, also on errors."""
    stop = stop or threading.Event()
    process = [n for n in names if n in PROCESS_FAULTS]
    network = [n for n in names if n in NETWORK_FAULTS]
    disk = [n for n in names if n in DISK_FAULTS]
    try:
        while not stop.is_set():
            quiet = rng.uniform(*quiet_s)
            hold = rng.uniform(*hold_s)
            if time.monotonic() + quiet + hold > until:
                break
            if stop.wait(quiet):
                break
            picked = [rng.choice(list(names))]
            if disk:
                kinds = [k for k in (process, disk, network) if k]
                if len(kinds) > 1 and rng.random() < mix_chance:
                    first, second = sorted(rng.sample(range(len(kinds)), 2))
                    picked = [rng.choice(kinds[first]), rng.choice(kinds[second])]
            elif process and network and rng.random() < mix_chance:  # the schedules of runs before disk faults
                picked = [rng.choice(process), rng.choice(network)]
            faults = [nemesis.make(name, rng) for name in picked]
            for i, f in enumerate(faults):
                nemesis.start(f)
                if i + 1 < len(faults):
                    stop.wait(rng.uniform(0, hold / 2))
            stop.wait(max(0.0, hold))
            for f in reversed(faults):
                nemesis.stop(f)
    finally:
        nemesis.heal_all()

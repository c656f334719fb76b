"""Drive a few real ``NodeCore`` objects by hand, for tests that need one exact interleaving.

Nothing moves on its own: requests, replies and disk writes wait in queues until the test
delivers, drops or flushes them. Timers fire only when the test calls :meth:`Scripted.fire`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from respreg.core.node import (
    Alarm,
    NodeConfig,
    NodeCore,
    NodeEffect,
    OpDone,
    OpTimer,
    PeerRespond,
    PeerSend,
    Persist,
)
from respreg.core.proposer import Outcome
from respreg.core.types import EMPTY_STATE, AcceptorState, Learn, NodeId, Proposal, Reply, Request


@dataclass(frozen=True)
class Req:
    src: NodeId
    dst: NodeId
    req_id: int
    msg: Request


@dataclass(frozen=True)
class Rep:
    src: NodeId
    dst: NodeId
    req_id: int
    reply: Reply


class Scripted:
    def __init__(self, n: int = 3, config: NodeConfig | None = None, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.ids = [NodeId(i) for i in range(1, n + 1)]
        self.disk: dict[NodeId, dict[bytes, AcceptorState]] = {nid: {} for nid in self.ids}
        self.cores = {
            nid: NodeCore(nid, self.ids, 0, self._loader(nid), self.rng.random, config or NodeConfig())
            for nid in self.ids
        }
        self.requests: list[Req] = []
        self.replies: list[Rep] = []
        self.persists: list[tuple[NodeId, Persist]] = []
        self.outcomes: dict[int, Outcome] = {}
        self.alarms: list[Alarm] = []
        self.timers: list[tuple[NodeId, OpTimer]] = []

    def _loader(self, nid: NodeId) -> Callable[[bytes], AcceptorState]:
        return lambda key: self.disk[nid].get(key, EMPTY_STATE)

    def apply(self, nid: NodeId, effects: Iterable[NodeEffect]) -> None:
        for e in effects:
            if isinstance(e, Persist):
                self.persists.append((nid, e))
            elif isinstance(e, PeerSend):
                self.requests.append(Req(nid, e.to, e.req_id, e.msg))
            elif isinstance(e, PeerRespond):
                self.replies.append(Rep(nid, e.to, e.req_id, e.reply))
            elif isinstance(e, OpDone):
                self.outcomes[e.op_id] = e.outcome
            elif isinstance(e, Alarm):
                self.alarms.append(e)
            else:
                assert isinstance(e, OpTimer)
                self.timers.append((nid, e))

    # ---- client operations -------------------------------------------------------------------

    def write(self, nid: int, op_id: int, key: bytes, pid: bytes, value: bytes) -> None:
        n = NodeId(nid)
        self.apply(n, self.cores[n].begin_write(op_id, key, Proposal(pid, value)))

    def read(self, nid: int, op_id: int, key: bytes) -> None:
        n = NodeId(nid)
        self.apply(n, self.cores[n].begin_read(op_id, key))

    # ---- moving things -----------------------------------------------------------------------

    def fire(self, nid: int, op_id: int, token: int | None = None) -> None:
        """Fire the pending timers of operation ``op_id`` on node ``nid`` (those with ``token``
        only, if given), as if their delays had passed."""
        due = [(n, t) for n, t in self.timers if n == nid and t.op_id == op_id and token in (None, t.token)]
        for n, t in due:
            self.timers.remove((n, t))
            self.apply(n, self.cores[n].on_timer(t.op_id, t.token))

    def flush(self, nid: int) -> int:
        """Complete every pending disk write of node ``nid``, in order."""
        moved = 0
        while True:
            mine = [(n, p) for n, p in self.persists if n == nid]
            if not mine:
                return moved
            n, p = mine[0]
            self.persists.remove((n, p))
            self.disk[n][p.key] = p.state
            self.apply(n, self.cores[n].on_persisted(p.key, p.version, None))
            moved += 1

    def deliver(self, src: int | None = None, dst: int | None = None, learn: bool | None = None) -> int:
        """Deliver queued requests (then replies) matching the filter, in order."""
        moved = 0
        for r in [r for r in self.requests if _match(r.src, r.dst, src, dst) and _kind(r.msg, learn)]:
            self.requests.remove(r)
            self.apply(r.dst, self.cores[r.dst].on_request(r.src, r.req_id, r.msg))
            moved += 1
        for rep in [r for r in self.replies if _match(r.src, r.dst, src, dst)]:
            self.replies.remove(rep)
            self.apply(rep.dst, self.cores[rep.dst].on_peer_reply(rep.req_id, rep.reply))
            moved += 1
        return moved

    def drop(self, src: int | None = None, dst: int | None = None) -> None:
        self.requests = [r for r in self.requests if not _match(r.src, r.dst, src, dst)]
        self.replies = [r for r in self.replies if not _match(r.src, r.dst, src, dst)]

    def settle(self, nodes: Iterable[int], learn: bool = True) -> None:
        """Flush disks and deliver messages among ``nodes`` only, until nothing moves."""
        group = list(nodes)
        while True:
            moved = sum(self.flush(n) for n in group)
            for a in group:
                for b in group:
                    if a != b:
                        moved += self.deliver(src=a, dst=b, learn=None if learn else False)
            if not moved:
                return


def _match(s: NodeId, d: NodeId, src: int | None, dst: int | None) -> bool:
    return (src is None or s == src) and (dst is None or d == dst)


def _kind(msg: Request, learn: bool | None) -> bool:
    return learn is None or isinstance(msg, Learn) == learn

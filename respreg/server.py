"""The asyncio driver of one node: runs :class:`~respreg.core.node.NodeCore` against real I/O.

It owns the sockets (client port, peer port, links to peers), the per-key files and their group
commit, and the timers, and carries out the core's effects. All Paxos decisions are the core's.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import random
import resource
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, cast

from .chosenlog import ChosenLog, Record
from .config import ServerConfig
from .core.node import (
    Alarm,
    Failed,
    NodeConfig,
    NodeCore,
    NodeEffect,
    OpDone,
    OpTimer,
    Outcome,
    PeerRespond,
    PeerSend,
    Persist,
)
from .core.proposer import Failure, ProposerConfig
from .core.types import EMPTY_STATE, AcceptorState, Ballot, NodeId, Proposal, Reply, Request, Unreachable
from .peer import PeerLink, PeerServerProtocol
from .storage import (
    AMNESIAC,
    JOINING,
    REBUILT,
    SPARES_KEPT,
    VOTING,
    VOTING_STATUSES,
    DurabilityError,
    GroupCommitter,
    KeyFiles,
    NodeInfo,
    NodeMeta,
    batched_io,
    load_peer_identities,
    open_node,
    save_peer_identities,
    write_meta,
)

if TYPE_CHECKING:
    from .client import ClientProtocol

log = logging.getLogger("respreg.server")

_UNREACHABLE = Unreachable()
_ALARMS_LOGGED_MAX = 10_000
#: Timers are kept per slot of this many per second: a timer fires up to one slot late.
_TIMER_SLOTS_PER_S = 1000


DumpEntry = tuple[str, bytes, AcceptorState]


class DumpStream:
    """One member's durable states, read page by page in file-name order (``dump(cursor)``
    returns the next cursor, None after the last page, and the page), and handed out one file-name
    prefix at a time: everything up to that prefix, read ahead by at most one page."""

    def __init__(self, dump: Callable[[str], Awaitable[tuple[str | None, list[DumpEntry]]]]) -> None:
        self._dump = dump
        self._cursor: str | None = ""
        self._buffer: deque[DumpEntry] = deque()

    async def take(self, prefix: str) -> list[DumpEntry]:
        """Every entry whose file name sorts up to ``prefix`` (names start with two hex digits;
        call with increasing prefixes)."""
        out: list[DumpEntry] = []
        while True:
            while self._buffer and self._buffer[0][0][: len(prefix)] <= prefix:
                out.append(self._buffer.popleft())
            if self._buffer or self._cursor is None:
                return out
            self._cursor, entries = await self._dump(self._cursor)
            self._buffer.extend(entries)


class NodeServer:
    def __init__(self, config: ServerConfig) -> None:
        config.validate()
        self.config = config
        self.me = NodeId(config.node_id)
        self.started = time.time()
        self.run_id = os.urandom(20).hex()
        self.clients: dict[int, ClientProtocol] = {}
        #: GET replies of values known to be chosen, formatted, shared by every connection
        #: (bounded: client.REPLY_CACHE_KEYS).
        self.get_replies: dict[bytes, bytes] = {}
        self._to_flush: list[ClientProtocol] = []
        self._next_client = 1
        self.stats = {
            "total_connections_received": 0,
            "total_commands_processed": 0,
            "rejected_connections": 0,
            "protocol_errors": 0,
        }
        self._ops: dict[int, asyncio.Future[Outcome]] = {}
        #: Timers by the millisecond they are due in (see _apply and _timers_due). An entry stays
        #: until it is due even if its operation ended: at most the longest delay (an operation's
        #: deadline) times the rate of operations, a few tuples per operation. Each slot has one
        #: event-loop timer and its (op_id, token) entries.
        self._timers: dict[int, tuple[asyncio.TimerHandle, list[tuple[int, int]]]] = {}
        self._next_op = 1
        #: Whether the last read() took the operation of a read waiting for the next read round.
        self.read_joined = False
        self._routes: dict[int, tuple[PeerServerProtocol, int]] = {}
        self._next_route = 1
        self._alarmed: set[bytes] = set()
        self.alarms = 0
        self.links: dict[NodeId, PeerLink] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._handle: NodeInfo | None = None
        self._files: KeyFiles | None = None
        self.committer: GroupCommitter | None = None
        self.core: NodeCore | None = None
        self.incarnation = 0
        self.status = VOTING
        self._peer_identities: dict[int, bytes] = {}
        self._confirmed: set[int] = set()
        self._disk_failed: str | None = None
        self._peer_conns: set[PeerServerProtocol] = set()
        self.maxclients = config.maxclients
        self._hold_spares_open = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._rebuild: asyncio.Task[None] | None = None
        #: Client writes of this node that are running: started, not yet answered.
        self._write_ops: set[int] = set()
        #: Client writes waiting to start while max_writes_in_flight run (docs/design.md,
        #: "Overload"), in arrival order: op id -> (key, proposal, deadline, timer of the wait).
        self._waiting_writes: dict[int, tuple[bytes, Proposal, float, asyncio.TimerHandle]] = {}
        self._admit_scheduled = False
        #: Writes that had to wait to start, and those that could not start in time (NOQUORUM).
        self.writes_delayed = 0
        self.writes_shed = 0
        self.chosen_log: ChosenLog | None = None
        #: Learned proposals not yet appended to the chosen log (held while it loads or is rewritten).
        self._learned: list[Record] = []
        self._learned_busy = True
        # Set by start(); nothing that needs it runs before.
        self._loop: asyncio.AbstractEventLoop = cast(asyncio.AbstractEventLoop, None)

    # ---- lifecycle ---------------------------------------------------------------------------

    def _fit_maxclients(self) -> None:
        """Like redis-server: raise the open-file limit for maxclients if allowed, otherwise lower
        maxclients so that client sockets can never starve the files and links a node needs."""
        cfg = self.config
        n = len(cfg.peers)
        reserve = 32 + (8 * n + 16) + n + 2 * cfg.fsync_threads
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        # Spare files are held open when the limit leaves room for them too (see KeyFiles).
        want = cfg.maxclients + reserve + SPARES_KEPT
        if soft < want:
            target = want if hard == resource.RLIM_INFINITY else min(want, hard)
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            except (ValueError, OSError):
                pass
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.maxclients = max(1, min(cfg.maxclients, soft - reserve))
        self._hold_spares_open = soft - reserve - self.maxclients >= SPARES_KEPT
        if self.maxclients < cfg.maxclients:
            log.warning(
                "maxclients lowered from %d to %d: the open-file limit is %d and %d descriptors are kept for "
                "the node's own files and links",
                cfg.maxclients,
                self.maxclients,
                soft,
                reserve,
            )

    async def start(self) -> None:
        """Open the data directory, bind both ports and dial the peers. Raises on failure."""
        cfg = self.config
        self._loop = loop = asyncio.get_running_loop()
        self._fit_maxclients()
        self._handle = open_node(cfg.data_dir, cfg.node_id)
        self.incarnation = self._handle.incarnation
        self.status = self._handle.status
        self._peer_identities = load_peer_identities(cfg.data_dir)
        # This process holds the data directory's lock: it alone may use the spare files, and
        # it sees every key file created, so it may keep their names in memory.
        self._files = KeyFiles(
            self._handle.keys_dir,
            workers=cfg.fsync_threads,
            spares=SPARES_KEPT,
            hold_spares_open=self._hold_spares_open,
            sync=cfg.sync_mode,
            index=True,
            list_later=True,  # once the chosen log is read back (see _load_chosen)
        )
        self.committer = GroupCommitter(self._files, loop)
        node_config = NodeConfig(
            proposer=ProposerConfig(attempt_timeout_ms=cfg.attempt_timeout_ms, deadline_ms=cfg.deadline_ms),
            state_cache_keys=cfg.state_cache_keys,
            chosen_cache_keys=cfg.chosen_cache_keys,
            chosen_cache_bytes=cfg.chosen_cache_bytes,
            fast_writes=cfg.fast_writes,
        )
        rng = random.Random(os.urandom(16))
        self.core = NodeCore(
            self.me,
            [NodeId(p.node_id) for p in cfg.peers],
            self.incarnation,
            self._load,
            rng.random,
            node_config,
            self._on_learn,
        )
        self.chosen_log = ChosenLog(cfg.data_dir, cfg.max_value_bytes + cfg.proto_max_bulk_len)
        self._apply_status()
        if self.status == JOINING and len(cfg.peers) == 1:
            self._set_status(VOTING)
        members = frozenset(p.node_id for p in cfg.peers)
        try:
            from .client import ClientProtocol

            self._servers.append(
                await loop.create_server(
                    partial(
                        PeerServerProtocol,
                        cfg.node_id,
                        members,
                        cfg.cluster_secret,
                        self._on_peer_request,
                        cfg.proto_max_bulk_len,
                        self._check_identity,
                        self._peer_conns,
                        # Peers need one link each (two while one reconnects); the rest is slack.
                        8 * len(cfg.peers) + 16,
                        self._on_dump,
                        self._on_identity,
                    ),
                    cfg.bind,
                    cfg.peer_port,
                    reuse_address=True,
                    backlog=512,
                )
            )
            self._servers.append(
                await loop.create_server(
                    lambda: ClientProtocol(self), cfg.bind, cfg.port, reuse_address=True, backlog=1024
                )
            )
        except OSError:
            await self.stop()
            raise
        bind = cfg.bind if cfg.bind not in ("", "0.0.0.0", "::") else None
        for p in cfg.peers:
            if p.node_id == cfg.node_id:
                continue
            link = PeerLink(
                cfg.node_id,
                NodeId(p.node_id),
                p.host,
                p.port,
                bind,
                cfg.cluster_secret,
                self._on_peer_reply,
                cfg.peer_timeout_ms / 1000,
                self._handle.identity,
                self._on_hello,
            )
            link.on_timed = self._answer_times_changed
            self.links[NodeId(p.node_id)] = link
            link.start()
        self._start_rebuild()
        self._tasks.add(loop.create_task(self._watchdog()))
        self._tasks.add(loop.create_task(self._load_chosen(self.chosen_log)))

    # ---- the chosen log: what this node learned, kept across restarts ---------------------------

    async def _load_chosen(self, clog: ChosenLog) -> None:
        """Read the chosen log into the core's cache while the node serves (a key not loaded
        yet is answered the slow way, by a read phase), then start appending to it."""
        t0 = time.monotonic()
        loaded = 0
        try:
            for batch in clog.load():
                assert self.core is not None
                loaded += self.core.preload_chosen(batch)
                await asyncio.sleep(0)
        except OSError as exc:  # unreadable: serve without it (every key can be read the slow way)
            clog.fail(exc)
        log.info(
            "chosen log: %d records read, %d values now cached, in %.2f s",
            clog.records,
            loaded,
            time.monotonic() - t0,
        )
        self._learned_busy = False
        self._flush_learned()
        # Only now: listing the key files competes with reading the log back for the CPU, and
        # until the log is read many GETs need a read round, which loads files (opens them).
        if self._files is not None and self._files.known is not None:
            self._files.known.start()

    def _on_learn(self, key: bytes, entry: bytes) -> None:
        if not self._learned and not self._learned_busy:
            self._loop.call_soon(self._flush_learned)
        self._learned.append((key, entry))

    def _flush_learned(self) -> None:
        clog = self.chosen_log
        if self._learned_busy or clog is None:
            return
        records, self._learned = self._learned, []
        clog.append(records)
        if self.core is not None and clog.wants_rewrite(self.core.cached_chosen()):
            self._learned_busy = True
            self._tasks.add(self._loop.create_task(self._rewrite_chosen(clog)))

    async def _rewrite_chosen(self, clog: ChosenLog) -> None:
        """Replace a log grown far past the cache with the cache's contents (file written in a
        thread; appends wait in memory meanwhile, then go to the new file)."""
        assert self.core is not None
        records = self.core.chosen_records()
        try:
            tmp = await self._loop.run_in_executor(None, clog.write_file, records)
        except Exception as exc:  # noqa: BLE001 - the log is a shortcut: keep appending to the old one
            log.warning("chosen log: rewrite failed (%s); appending to the old one", exc)
        else:
            clog.reopen(tmp, len(records))
            log.info("chosen log rewritten: %d records, %d bytes", len(records), clog.size)
        finally:
            self._learned_busy = False
        self._flush_learned()

    async def _watchdog(self) -> None:
        """A safety net, not a mechanism: every operation ends by its deadline through the core's
        timers. Should one ever outlive its deadline by a second (a bug), its client gets an
        error instead of waiting forever, and the log says so."""
        limit = self.config.deadline_ms / 1000 + 1.0
        loop = asyncio.get_running_loop()
        marks: deque[tuple[float, int]] = deque()
        while True:
            await asyncio.sleep(0.5)
            now = loop.time()
            marks.append((now, self._next_op))
            cutoff = 0  # operations with a lower id started more than ``limit`` seconds ago
            while marks and marks[0][0] <= now - limit:
                cutoff = marks.popleft()[1]
            stale = []
            for op_id in self._ops:  # in creation order: ids only grow
                if op_id >= cutoff:
                    break
                stale.append(op_id)
            for op_id in stale:
                fut = self._ops.pop(op_id)
                was_write = op_id in self._write_ops
                self._write_ended(op_id)
                if not fut.done():
                    log.error("BUG: operation %d outlived its deadline; answering it with an error", op_id)
                    # A write may have been sent for acceptance; a read has no effect either way.
                    kind = Failure.UNCERTAIN if was_write else Failure.NOQUORUM
                    fut.set_result(Failed(kind, "internal error: the operation did not finish in time"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._rebuild is not None:
            self._rebuild.cancel()
        for s in self._servers:
            s.close()
        for c in list(self.clients.values()):
            c.abort()
        for link in self.links.values():
            await link.stop()
        for handle, _ in self._timers.values():
            handle.cancel()
        if self.committer is not None:
            await self.committer.close()
        if self.chosen_log is not None:
            self._flush_learned()
            self.chosen_log.close()
        if self._files is not None:
            self._files.close()
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    # ---- identity: a member whose state was lost must not vote --------------------------------

    def _check_identity(self, peer: NodeId, identity: bytes) -> bytes | None:
        """A peer's handshake: remember its identity the first time; return the identity we
        remember when it presents another one (its data directory was replaced)."""
        known = self._peer_identities.get(peer)
        if known is None:
            self._peer_identities[peer] = identity
            save_peer_identities(self.config.data_dir, self._peer_identities)
            return None
        if known != identity:
            log.error(
                "node %d presents identity %s but this node knew it as %s: its data directory was "
                "wiped or replaced, so it must not vote (see docs/operations.md)",
                peer,
                identity.hex(),
                known.hex(),
            )
            return known
        return None

    def _on_hello(self, peer: NodeId, remembered: bytes | None) -> None:
        """The answer of a peer to our handshake: whether it knew this node under another identity."""
        if remembered is not None:
            if self.status in VOTING_STATUSES and self._rebuilt_identity_ok():
                # This directory voted (or was rebuilt) under its identity: the peer's memory is
                # older than our rebuild. Tell it to remember the identity it just saw.
                self.links[peer].announce_identity()
                return
            if self.status != AMNESIAC:
                log.error(
                    "node %d knew node %d as identity %s, not %s: this data directory is not the one the "
                    "cluster voted with, so this node will not vote (see docs/operations.md)",
                    peer,
                    self.me,
                    remembered.hex(),
                    self._identity_hex(),
                )
                self._set_status(AMNESIAC)
            return
        self._confirmed.add(peer)
        others = {p.node_id for p in self.config.peers} - {self.me}
        if self.status == JOINING and others <= self._confirmed:
            log.info("every member confirmed this new data directory; voting")
            self._set_status(VOTING)

    def _rebuilt_identity_ok(self) -> bool:
        """A voting node whose node.meta survived: a wiped directory would have come back joining."""
        return self._handle is not None and self._handle.status != JOINING

    def _on_identity(self, peer: NodeId, identity: bytes) -> None:
        """A peer was rebuilt from a majority: remember the identity it now presents."""
        if self._peer_identities.get(peer) != identity:
            log.warning("node %d was rebuilt; remembering its new identity %s", peer, identity.hex())
            self._peer_identities[peer] = identity
            try:
                save_peer_identities(self.config.data_dir, self._peer_identities)
            except OSError as exc:
                log.error("cannot record the identity of node %d: %s", peer, exc)

    def _on_dump(self, link: PeerServerProtocol, req_id: int, cursor: str) -> None:
        """Serve a page of this node's durable states to a member rebuilding itself."""
        if self.core is None or self.core.not_voting is not None or self._files is None:
            link.respond_dump(req_id, "this node is not a voting member now", False)
            return
        files = self._files
        page = 256

        def scan() -> list[tuple[str, bytes, AcceptorState]]:
            return files.scan(cursor, page)

        async def serve() -> None:
            try:
                entries = await asyncio.get_running_loop().run_in_executor(None, scan)
            except Exception as exc:  # noqa: BLE001 - corrupt or unreadable files: refuse the dump
                link.respond_dump(req_id, f"cannot dump states: {exc}", False)
                return
            link.respond_dump(req_id, entries, len(entries) == page)

        self._tasks.add(asyncio.get_running_loop().create_task(serve()))
        self._tasks = {t for t in self._tasks if not t.done()}

    async def _rebuild_when_amnesiac(self) -> None:
        """Make this node's lost votes irrelevant, then vote again (docs/design.md explains why).

        Waits until no operation that might hold one of its forgotten promises can still be
        running (they end at their deadline). Then it reads the durable states of (N+1)/2 other
        members and, for every key where they show an accepted proposal that is not visibly
        chosen (accepted by a majority at one ballot), completes it through Paxos with this
        node's acceptor refusing, so that whatever is chosen is chosen by other nodes alone.
        """
        cfg = self.config
        await asyncio.sleep((2 * cfg.deadline_ms + cfg.peer_timeout_ms) / 1000)
        need = len(cfg.peers) // 2 + 1
        while self.status == AMNESIAC and self._disk_failed is None:
            up = [link for link in self.links.values() if link.up]
            if len(up) < need:
                await asyncio.sleep(0.5)
                continue
            sources = up[:need]
            try:
                repaired = await self._rebuild_from(sources)
            except (ConnectionError, RuntimeError, TimeoutError, OSError) as exc:
                log.warning("rebuild from nodes %s failed, retrying: %s", [s.peer for s in sources], exc)
                await asyncio.sleep(1.0)
                continue
            log.warning(
                "rebuilt from nodes %s (%d keys completed through Paxos); voting again",
                [s.peer for s in sources],
                repaired,
            )
            # REBUILT, not VOTING: messages of this node id's earlier life may still be in
            # flight, so it must never again write at the reserved round 0 (docs/design.md).
            self._set_status(REBUILT)
            for link in self.links.values():
                link.announce_identity()

    async def _rebuild_from(self, sources: list[PeerLink]) -> int:
        """Complete through Paxos every key for which ``sources`` show an accepted proposal but
        no majority at one ballot. The dumps are read one key directory (file-name prefix) at a
        time, so memory holds one 256th of the keys, not all of them. Returns the keys completed."""
        need = len(self.config.peers) // 2 + 1
        streams = [DumpStream(link.dump) for link in sources]
        repaired = 0
        for i in range(256):
            prefix = f"{i:02x}"
            accepted: dict[bytes, dict[Ballot, int]] = {}
            for stream in streams:
                for _, key, state in await stream.take(prefix):
                    if state.proposal is not None:
                        counts = accepted.setdefault(key, {})
                        counts[state.accepted] = counts.get(state.accepted, 0) + 1
            unsettled = [key for key, counts in accepted.items() if max(counts.values()) < need]
            repaired += await self._repair(unsettled)
        return repaired

    async def _repair(self, keys: list[bytes]) -> int:
        """Complete every key through Paxos among the other nodes; raise if one cannot be."""
        assert self.core is not None
        for start in range(0, len(keys), 64):
            futs = []
            for key in keys[start : start + 64]:
                op_id = self._new_op()
                futs.append(self._ops[op_id])
                self._apply(self.core.begin_repair(op_id, key))
            for outcome in await asyncio.gather(*futs):
                if isinstance(outcome, Failed):
                    raise RuntimeError(f"could not complete a key: {outcome.kind.value} {outcome.reason}")
        return len(keys)

    def _identity_hex(self) -> str:
        assert self._handle is not None
        return self._handle.identity.hex()

    def _set_status(self, status: int) -> None:
        assert self._handle is not None
        try:
            write_meta(
                self.config.data_dir, NodeMeta(self.config.node_id, self.incarnation, self._handle.identity, status)
            )
        except OSError as exc:
            log.error("cannot record the acceptor status in node.meta: %s", exc)
            if status != AMNESIAC:
                return  # never start voting on a status that is not durable; refusing is always safe
        self.status = status
        self._apply_status()
        self._start_rebuild()

    def _start_rebuild(self) -> None:
        if self.status == AMNESIAC and (self._rebuild is None or self._rebuild.done()) and self.links:
            self._rebuild = asyncio.get_running_loop().create_task(self._rebuild_when_amnesiac())

    def _apply_status(self) -> None:
        assert self.core is not None
        # Only a directory that never lost its state may write at round 0: VOTING, never REBUILT.
        self.core.fast_writes = self.config.fast_writes and self.status == VOTING and self._disk_failed is None
        if self._disk_failed is not None:
            self.core.set_voting(self._disk_failed)
        elif self.status in VOTING_STATUSES:
            self.core.set_voting(None)
        elif self.status == JOINING:
            self.core.set_voting("new data directory: not voting until every member has confirmed it")
        else:
            self.core.set_voting(
                "this node's data directory was replaced after it voted: it does not vote (see docs/operations.md)"
            )

    def status_name(self) -> str:
        if self._disk_failed is not None:
            return "disk-failed"
        return {VOTING: "voting", JOINING: "joining", AMNESIAC: "amnesiac", REBUILT: "voting"}[self.status]

    def _load(self, key: bytes) -> AcceptorState:
        assert self._files is not None
        state = self._files.load(key)
        return EMPTY_STATE if state is None else state

    # ---- client side -------------------------------------------------------------------------

    def register_client(self, client: ClientProtocol) -> int:
        cid = self._next_client
        self._next_client += 1
        self.clients[cid] = client
        self.stats["total_connections_received"] += 1
        return cid

    def unregister_client(self, cid: int) -> None:
        self.clients.pop(cid, None)

    def flush_soon(self, client: ClientProtocol) -> None:
        """Have ``client`` write its collected replies once this event-loop iteration has read
        every ready connection. All connections' replies then leave in one burst: the client
        reading them is woken by the first and finds the rest already there, where one write per
        read can wake it once per reply (benchmarks/PROFILE.md has the figures)."""
        if not self._to_flush:
            self._loop.call_soon(self._flush_clients)
        self._to_flush.append(client)

    def _flush_clients(self) -> None:
        clients, self._to_flush = self._to_flush, []
        for c in clients:
            c.flush()

    def chosen_value(self, key: bytes) -> bytes | None:
        """The value this node already knows is chosen for ``key`` (answerable from memory)."""
        assert self.core is not None
        return self.core.chosen_cache.value(key)

    def write(
        self, key: bytes, value: bytes, deadline_ms: float | None = None
    ) -> tuple[asyncio.Future[Outcome], bytes]:
        """Start a SETONCE; returns the outcome future and the proposal id of this call."""
        assert self.core is not None
        op_id = self._new_op()
        pid = struct.pack(">HQQ", self.me, self.incarnation, op_id)
        fut = self._ops[op_id]
        proposal = Proposal(pid, value)
        if len(self._write_ops) < self.config.max_writes_in_flight and not self._waiting_writes:
            self._start_write(op_id, key, proposal, deadline_ms)
            return fut, pid
        # Overload: wait, in arrival order, until a running write ends, for at most half the
        # deadline, so that a write that starts has at least that half left to finish. Nothing
        # was sent for one that could not start: it is definitely not written (NOQUORUM).
        self.writes_delayed += 1
        loop = self._loop
        budget = (self.config.deadline_ms if deadline_ms is None else deadline_ms) / 1000
        timer = loop.call_later(budget / 2, self._write_not_started, op_id)
        self._waiting_writes[op_id] = (key, proposal, loop.time() + budget, timer)
        return fut, pid

    def _start_write(self, op_id: int, key: bytes, proposal: Proposal, deadline_ms: float | None) -> None:
        assert self.core is not None
        self._write_ops.add(op_id)
        for nid, link in self.links.items():
            self.core.set_peer_up(nid, link.up)
        self._apply(self.core.begin_write(op_id, key, proposal, deadline_ms))

    def _write_ended(self, op_id: int) -> None:
        """Operation ``op_id`` ended; if it was a running write, a waiting one may start."""
        if op_id in self._write_ops:
            self._write_ops.discard(op_id)
            if self._waiting_writes and not self._admit_scheduled:
                self._admit_scheduled = True
                self._loop.call_soon(self._admit_writes)

    def _admit_writes(self) -> None:
        """Start waiting writes, oldest first, while fewer than max_writes_in_flight run."""
        self._admit_scheduled = False
        waiting = self._waiting_writes
        limit = self.config.max_writes_in_flight
        while waiting and len(self._write_ops) < limit:
            op_id = next(iter(waiting))
            key, proposal, deadline, timer = waiting.pop(op_id)
            timer.cancel()
            self._start_write(op_id, key, proposal, (deadline - self._loop.time()) * 1000)

    def _write_not_started(self, op_id: int) -> None:
        waiting = self._waiting_writes.pop(op_id, None)
        if waiting is None:
            return
        self.writes_shed += 1
        fut = self._ops.pop(op_id, None)
        if fut is not None and not fut.done():
            reason = (
                f"node overloaded: {len(self._write_ops)} writes running, this one could not start within "
                "half its deadline; not attempted"
            )
            fut.set_result(Failed(Failure.NOQUORUM, reason))

    def read(self, key: bytes, deadline_ms: float | None = None) -> asyncio.Future[Outcome]:
        """Start a linearizable GET (``read_joined`` then says whether it joined another's
        operation, which the next GET of ``key`` before any other event would join too)."""
        assert self.core is not None
        if deadline_ms is None:
            shared = self.core.join_read_round(key)
            if shared is not None:
                fut = self._ops.get(shared)
                if fut is not None:
                    self.read_joined = True
                    return fut
        self.read_joined = False
        op_id = self._new_op()
        fut = self._ops[op_id]
        self._apply(self.core.begin_read(op_id, key, deadline_ms))
        return fut

    def count_joined_reads(self, n: int) -> None:
        """``n`` GETs took the operation of the read before them without calling :meth:`read`
        (see ClientProtocol._process): counted as if they had."""
        assert self.core is not None
        self.core.reads_joined += n

    def _new_op(self) -> int:
        op_id = self._next_op
        self._next_op += 1
        # The loop is cached: asyncio.get_running_loop() makes a getpid() system call each time.
        self._ops[op_id] = self._loop.create_future()
        return op_id

    # ---- peer side ---------------------------------------------------------------------------

    def _on_peer_request(self, sender: NodeId, req_id: int, msg: Request, link: PeerServerProtocol) -> None:
        assert self.core is not None
        route = 0
        if req_id:
            # Requests are renumbered locally: two links of one peer (before and after its
            # restart) may reuse request ids, and a reply must go back to exactly its request.
            route = self._next_route
            self._next_route += 1
            self._routes[route] = (link, req_id)
        self._apply(self.core.on_request(sender, route, msg))

    def _answer_times_changed(self) -> None:
        """Phases wait for missing answers as long as the slowest peer that is up now takes to
        answer (its answer timeout), at least ``attempt_timeout_ms`` and at most half the
        deadline (docs/design.md, *Timeouts follow the answers*)."""
        assert self.core is not None
        cfg = self.config
        slowest = max((link.answer_timeout() for link in self.links.values() if link.up), default=0.0)
        ms = min(max(cfg.attempt_timeout_ms, round(slowest * 1000)), max(cfg.attempt_timeout_ms, cfg.deadline_ms / 2))
        if ms != self.core.attempt_timeout_ms:
            self.core.set_attempt_timeout(ms)

    def _on_peer_reply(self, req_id: int, reply: Reply) -> None:
        assert self.core is not None
        self._apply(self.core.on_peer_reply(req_id, reply))

    def _persisted(self, key: bytes, version: int, error: BaseException | None) -> None:
        assert self.core is not None
        if isinstance(error, DurabilityError) and self._disk_failed is None:
            # A state is visible in the file system but may not be on disk: after a failed fsync
            # the page cache cannot be trusted, so this node stops answering from its storage.
            self._disk_failed = (
                f"a write reached the file system but its fsync failed ({error}); this node no longer "
                "votes: restart it once the disk is healthy"
            )
            log.error("%s", self._disk_failed)
            self._apply_status()
        self._apply(self.core.on_persisted(key, version, error))

    def _timers_due(self, slot: int) -> None:
        """Deliver the timers of one millisecond to the core. Those of operations that ended (or
        that the watchdog ended) are dropped; negative ids are the core's own operations
        (forwarded writes it runs for another node), which end without an OpDone, so their
        timers are always delivered."""
        assert self.core is not None
        _, due = self._timers.pop(slot)
        ops = self._ops
        for op_id, token in due:
            if op_id < 0 or op_id in ops:
                self._apply(self.core.on_timer(op_id, token))

    # ---- effects -----------------------------------------------------------------------------

    def _apply(self, effects: list[NodeEffect]) -> None:
        loop = self._loop
        for e in effects:
            if isinstance(e, PeerRespond):
                target = self._routes.pop(e.req_id, None)
                if target is not None:
                    target[0].respond(target[1], e.reply)
            elif isinstance(e, PeerSend):
                link = self.links.get(e.to)
                if (link is None or not link.send(e.req_id, e.msg)) and e.req_id:
                    loop.call_soon(self._on_peer_reply, e.req_id, _UNREACHABLE)
            elif isinstance(e, Persist):
                assert self.committer is not None
                self.committer.submit(e.key, e.state, partial(self._persisted, e.key, e.version))
            elif isinstance(e, OpTimer):
                # Timers due in the same millisecond share one event-loop timer; a timer of an
                # operation that has ended is dropped when it comes due (see _timers_due).
                slot = math.ceil((loop.time() + e.delay_ms / 1000) * _TIMER_SLOTS_PER_S)
                timer = self._timers.get(slot)
                if timer is None:
                    handle = loop.call_at(slot / _TIMER_SLOTS_PER_S, self._timers_due, slot)
                    self._timers[slot] = timer = (handle, [])
                timer[1].append((e.op_id, e.token))
            elif isinstance(e, OpDone):
                fut = self._ops.pop(e.op_id, None)
                self._write_ended(e.op_id)
                if fut is not None and not fut.done():
                    fut.set_result(e.outcome)
            elif isinstance(e, Alarm):
                self.alarms += 1
                if e.key not in self._alarmed and len(self._alarmed) < _ALARMS_LOGGED_MAX:
                    self._alarmed.add(e.key)
                    log.error("key %r: %s", e.key[:200], e.reason)

    # ---- introspection -----------------------------------------------------------------------

    def _key_index_status(self) -> str:
        known = self._files.known if self._files is not None else None
        if known is None:
            return "off"
        if known.complete:
            return "ready"
        if known.failed is not None:
            return "failed"
        return "listing" if known.started else "waiting"

    def peers_up(self) -> int:
        return sum(1 for link in self.links.values() if link.up)

    def info_fields(self) -> dict[str, dict[str, str | int]]:
        """INFO sections this node adds beyond the generic ones (see respreg.commands)."""
        assert self.core is not None and self.committer is not None
        clog = self.chosen_log
        paxos: dict[str, str | int] = {
            "node_id": self.config.node_id,
            "incarnation": self.incarnation,
            "acceptor": self.status_name(),
            "fast_path": "yes" if self.core.fast_writes else "no",
            "cluster_size": len(self.config.peers),
            "quorum": len(self.config.peers) // 2 + 1,
            "peers_up": self.peers_up(),
            "ops_in_flight": self.core.ops_in_flight(),
            "writes_running": len(self._write_ops),
            "writes_waiting": len(self._waiting_writes),
            "writes_delayed": self.writes_delayed,
            "writes_shed": self.writes_shed,
            "attempt_timeout_ms": round(self.core.attempt_timeout_ms),
            "cached_states": self.core.cached_states(),
            "cached_chosen": self.core.cached_chosen(),
            "cached_replies": len(self.get_replies),
            "alarms": self.alarms,
        }
        paxos.update(self.core.counters())
        for nid, link in sorted(self.links.items()):
            paxos[f"peer{nid}"] = (
                f"addr={link.host}:{link.port},up={int(link.up)},connects={link.ups},"
                f"answer_ms={link.srtt * 1000:.1f},answer_timeout_ms={link.answer_timeout() * 1000:.0f}"
            )
        persistence: dict[str, str | int] = {
            "group_commit_batches": self.committer.batches,
            "group_commit_writes": self.committer.writes,
            "group_commit_pending": self.committer.pending(),
            "fsync_errors": self.committer.fsync_errors,
            "sync_mode": self._files.sync if self._files is not None else "",
            "syncfs_batches": self._files.syncfs_batches if self._files is not None else 0,
            "spare_files_ready": self._files.spares_ready() if self._files is not None else 0,
            "spare_files": self._files.spare_kind() if self._files is not None else "none",
            "batch_io": "batched" if batched_io() else "per-call",
            "key_index": self._key_index_status(),
            "chosen_log_loaded": int(clog is not None and clog.loaded),
            "chosen_log_records": clog.records if clog is not None else 0,
            "chosen_log_bytes": clog.size if clog is not None else 0,
            "chosen_log_ok": int(clog is not None and clog.failed is None),
            "data_dir": str(self.config.data_dir),
        }
        return {"persistence": persistence, "paxos": paxos}


def run_forever(config: ServerConfig, on_ready: Callable[[NodeServer], None] | None = None) -> None:
    """Run one node until SIGINT/SIGTERM (used by ``respreg serve``)."""
    import signal

    async def main() -> None:
        server = NodeServer(config)
        await server.start()
        # Every request allocates a few short-lived objects (futures, callbacks), and the cyclic
        # collector's default thresholds made it run every few hundred requests, scanning the
        # node's long-lived caches each time. Objects alive at start are frozen out of its scans
        # and it runs less often; reference counting still frees almost everything at once.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if on_ready is not None:
            on_ready(server)
        await stop.wait()
        await server.stop()

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional
        asyncio.run(main())
    else:
        uvloop.run(main())

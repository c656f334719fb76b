"""The rebuild of an amnesiac node, driven through the simulated world.

This follows ``NodeServer._rebuild_when_amnesiac`` and docs/design.md ("Rebuilding an amnesiac
member"), one event at a time:

1. Every time an amnesiac node boots, wait ``2 x deadline_ms + margin``. The margin plays the
   part of ``peer_timeout_ms`` in the server: no message is in flight for longer (the world's
   longest network delay), just as a real request dies with its link after ``peer_timeout_ms``.
2. Pick (N+1)/2 other nodes that are up and vote, and read their durable states page by page,
   each page at its own sim time (a dump races with ongoing operations). A source that crashed
   or stopped voting by the time a page is read refuses: the whole rebuild starts again.
3. Every key where the sources show an accepted proposal but no ballot accepted by a majority of
   the cluster is completed with ``NodeCore.begin_repair``, through the simulated network, in
   batches. Failed repairs are retried; if too few voting nodes are up the rebuild starts again
   from step 2. When every repair succeeded, the node votes again (``World.set_voting``).

Two deliberately wrong variants exist as controls: ``adopt`` replaces step 3 by writing the
merged states of the sources (highest promise, highest accepted proposal) to the node's own disk,
which docs/design.md calls unsafe; and a wipe with ``amnesiac=False`` skips the rebuild entirely.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from functools import partial

from respreg.core.proposer import Chosen, Empty, Failed, Outcome
from respreg.core.types import NO_BALLOT, AcceptorState, Ballot, NodeId

from .world import Host, World, fmt_state


@dataclass
class RebuildLog:
    """What one rebuild did: for the scenario's notes and for tests."""

    node: int
    booted: float
    attempts: int = 0
    sources: list[int] = field(default_factory=list)
    unsettled: int = 0
    repairs: int = 0
    repair_failures: int = 0
    voting_at: float | None = None


def file_name(key: bytes) -> str:
    """The order in which a real dump pages through keys (``storage`` names files this way)."""
    return hashlib.blake2b(key, digest_size=16).hexdigest()


class Rebuilder:
    """Rebuilds every amnesiac node of ``world`` once it boots (install it before any wipe).

    ``mode`` is ``"repair"`` (the algorithm) or ``"adopt"`` (the unsafe control).
    """

    def __init__(self, world: World, rng: random.Random, mode: str = "repair") -> None:
        assert mode in ("repair", "adopt")
        self.world = world
        self.rng = rng
        self.mode = mode
        self.need = world.majority
        f = world.initial_faults
        longest_message = max(f.delay_max_ms, f.slow_max_ms if f.slow else 0.0, 2.0)
        self.margin_ms = longest_message + rng.uniform(1.0, 100.0)
        self.wait_ms = 2 * world.deadline_ms + self.margin_ms
        self.page = rng.choice([1, 3, 256])
        self.batch = rng.choice([1, 4, 64])
        self.pause_ms = rng.choice([20.0, 200.0])
        self.logs: list[RebuildLog] = []
        #: Problems seen by the rebuild itself (a repair that contradicts the oracle).
        self.violations: list[str] = []
        world.on_boot = self._on_boot

    # ---- step 1: wait --------------------------------------------------------------------------

    def _on_boot(self, h: Host) -> None:
        if not h.amnesiac:
            return
        log = RebuildLog(int(h.id), self.world.now)
        self.logs.append(log)
        self.world.log(f"n{h.id} amnesiac: rebuild starts in {self.wait_ms:.1f} ms")
        self.world.after(self.wait_ms, partial(self._attempt, h, h.incarnation, log))

    def _live(self, h: Host, inc: int) -> bool:
        return h.incarnation == inc and h.core is not None and h.amnesiac

    def _voters(self, h: Host) -> list[NodeId]:
        w = self.world
        return [n for n in w.node_ids if n != h.id and w.hosts[n].up and not w.hosts[n].amnesiac]

    # ---- step 2: dump the sources ----------------------------------------------------------------

    def _attempt(self, h: Host, inc: int, log: RebuildLog) -> None:
        if not self._live(h, inc):
            return
        voters = self._voters(h)
        if len(voters) < self.need:
            self.world.log(f"n{h.id} rebuild: only {len(voters)} voting nodes up, {self.need} needed; waiting")
            self.world.after(self.pause_ms, partial(self._attempt, h, inc, log))
            return
        log.attempts += 1
        sources = sorted(self.rng.sample(voters, self.need))
        log.sources = [int(s) for s in sources]
        self.world.log(f"n{h.id} rebuild attempt {log.attempts}: dumping n{', n'.join(map(str, sources))}")
        dumps: dict[NodeId, dict[bytes, AcceptorState]] = {}
        self._next_page(h, inc, log, sources, 0, "", dumps)

    def _next_page(
        self,
        h: Host,
        inc: int,
        log: RebuildLog,
        sources: list[NodeId],
        i: int,
        cursor: str,
        dumps: dict[NodeId, dict[bytes, AcceptorState]],
    ) -> None:
        """Ask for the next page: the source reads its disk a little later, at its own time."""
        if i == len(sources):
            self._dumped(h, inc, log, dumps)
            return
        delay = self.rng.uniform(0.2, 30.0)
        self.world.after(delay, partial(self._read_page, h, inc, log, sources, i, cursor, dumps))

    def _read_page(
        self,
        h: Host,
        inc: int,
        log: RebuildLog,
        sources: list[NodeId],
        i: int,
        cursor: str,
        dumps: dict[NodeId, dict[bytes, AcceptorState]],
    ) -> None:
        if not self._live(h, inc):
            return
        src = self.world.hosts[sources[i]]
        if not src.up or src.amnesiac:
            # The source crashed (or refuses: it does not vote): start again with other sources.
            self.world.log(f"n{h.id} rebuild: source n{src.id} failed during its dump; starting again")
            self.world.after(self.pause_ms, partial(self._attempt, h, inc, log))
            return
        names = sorted((file_name(k), k) for k in src.disk if file_name(k) > cursor)[: self.page]
        page = dumps.setdefault(src.id, {})
        for _, key in names:
            page[key] = src.disk[key]
        if len(names) == self.page:
            self._next_page(h, inc, log, sources, i, names[-1][0], dumps)
        else:
            self._next_page(h, inc, log, sources, i + 1, "", dumps)

    def _dumped(self, h: Host, inc: int, log: RebuildLog, dumps: dict[NodeId, dict[bytes, AcceptorState]]) -> None:
        if self.mode == "adopt":
            self._adopt(h, log, dumps)
            return
        accepted: dict[bytes, dict[Ballot, int]] = {}
        for states in dumps.values():
            for key, state in states.items():
                if state.proposal is not None:
                    counts = accepted.setdefault(key, {})
                    counts[state.accepted] = counts.get(state.accepted, 0) + 1
        unsettled = sorted(k for k, counts in accepted.items() if max(counts.values()) < self.need)
        log.unsettled = len(unsettled)
        self.world.log(f"n{h.id} rebuild: {len(accepted)} keys with proposals, unsettled: {unsettled}")
        self._repair_batch(h, inc, log, unsettled)

    # ---- step 3: repair --------------------------------------------------------------------------

    def _repair_batch(self, h: Host, inc: int, log: RebuildLog, todo: list[bytes]) -> None:
        if not self._live(h, inc):
            return
        if not todo:
            log.voting_at = self.world.now
            self.world.set_voting(h.id)
            return
        batch, rest = todo[: self.batch], todo[self.batch :]
        outcomes: dict[bytes, Outcome] = {}

        def done(key: bytes, started: float, outcome: Outcome) -> None:
            outcomes[key] = outcome
            self._check_repair(h, key, started, outcome)
            if len(outcomes) == len(batch):
                self._batch_done(h, inc, log, rest, outcomes)

        for key in batch:
            log.repairs += 1
            self.world.start_repair(h.id, key, partial(done, key, self.world.now))

    def _batch_done(
        self, h: Host, inc: int, log: RebuildLog, rest: list[bytes], outcomes: dict[bytes, Outcome]
    ) -> None:
        failed = [k for k, o in outcomes.items() if isinstance(o, Failed)]
        if not failed:
            self._repair_batch(h, inc, log, rest)
            return
        log.repair_failures += len(failed)
        if len(self._voters(h)) < self.need:
            self.world.log(f"n{h.id} rebuild: repairs of {failed} failed and too few nodes vote; starting again")
            self.world.after(self.pause_ms, partial(self._attempt, h, inc, log))
            return
        self.world.log(f"n{h.id} rebuild: repairs of {failed} failed; retrying them")
        self.world.after(self.pause_ms, partial(self._repair_batch, h, inc, log, rest + failed))

    def _check_repair(self, h: Host, key: bytes, started: float, outcome: Outcome) -> None:
        """A repair answers like a read: the chosen proposal, or empty if nothing was chosen."""
        chosen = self.world.oracle.first_chosen(key)
        now = self.world.now
        if isinstance(outcome, Chosen):
            if chosen is None or chosen.proposal != outcome.proposal or chosen.time > now:
                self.violations.append(
                    f"t={now:.3f} n{h.id}: repair of {key!r} ended with {outcome.proposal}, but the oracle chose "
                    f"{'nothing' if chosen is None else f'{chosen.proposal} at t={chosen.time:.3f}'}"
                )
        elif isinstance(outcome, Empty) and chosen is not None and chosen.time < started:
            self.violations.append(
                f"t={now:.3f} n{h.id}: repair of {key!r} found nothing, but {chosen.proposal} was chosen at "
                f"t={chosen.time:.3f}, before the repair began"
            )

    # ---- the unsafe control: adopt the merged states ---------------------------------------------

    def _adopt(self, h: Host, log: RebuildLog, dumps: dict[NodeId, dict[bytes, AcceptorState]]) -> None:
        merged: dict[bytes, AcceptorState] = {}
        for states in dumps.values():
            for key, state in states.items():
                old = merged.get(key, AcceptorState())
                promised = max(old.promised, state.promised)
                if state.proposal is not None and state.accepted > old.accepted:
                    merged[key] = AcceptorState(promised, state.accepted, state.proposal)
                else:
                    merged[key] = AcceptorState(promised, old.accepted, old.proposal)
        for key in sorted(merged):
            state = merged[key]
            if state.accepted == NO_BALLOT and state.promised == NO_BALLOT:
                continue
            self.world.log(f"n{h.id} ADOPT {key!r} := {fmt_state(state)}")
            self.world.write_disk(h.id, key, state)
        log.unsettled = len(merged)
        log.voting_at = self.world.now
        self.world.set_voting(h.id)

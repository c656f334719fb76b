"""Scenarios: one seed -> one world, a client workload, faults, then checks.

Every scenario has a *safety* phase (faults on, clients racing on a few hot keys) and a
*liveness* phase (faults healed, every node up): then every key touched must be readable with
one value on every node, and new operations must all get definite answers.

Scenarios:

- ``standard``: random loss, delay, duplication, crashes of a minority at a time.
- ``crowd``: like ``standard``, with six to ten clients per node racing on one or two hot keys, so
  reads pile up behind read rounds and join other reads' operations (``join_read_round``).
- ``majority-down``: a majority of nodes is down for longer than a deadline; operations on the
  nodes still up must end (NOQUORUM/UNCERTAIN) within their deadline instead of hanging.
- ``crash-after-reply``: nodes crash right after they sent a Promise or Accepted reply; the
  world checks that the reply's state had reached the disk.
- ``crash-mid-accept``: a proposer's node crashes halfway through broadcasting an Accept (its
  own acceptor never writes it) and restarts at once, so its next ballots meet its old ones.
- ``amnesia``: a node loses its whole disk and comes back amnesiac; it serves clients as a
  proposer but does not vote until it has rebuilt itself (``tests.sim.rebuild``), then votes
  again. Sometimes a second wipe follows, of the same node or another one. Its incarnations
  keep growing across the wipe (ballots never repeat, as the design assumes; a real node on a
  new data directory draws a random 62-bit incarnation). ``amnesia-reset-incarnation`` models
  the old behaviour, a restart at incarnation 1 (see
  ``test_a_wiped_node_never_reuses_a_ballot_of_its_first_life`` for where that broke).
  Controls that must or may fail: ``amnesia-vote-at-once`` (the wiped node votes at once with an
  empty state), ``amnesia-adopt`` (the rebuild adopts the sources' merged states instead of
  repairing), ``amnesia-reset-incarnation`` (the wiped node counts incarnations from the start
  again, as a real node on a new data directory once did, so its ballots can repeat old ones).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial

from respreg.core.node import NodeConfig
from respreg.core.proposer import Chosen, Empty, Failed, ProposerConfig
from respreg.core.types import NodeId, Proposal

from .checker import check_completion, check_history
from .rebuild import Rebuilder, RebuildLog
from .world import Faults, OpRecord, World, WorldOptions

VALUES = (b"red", b"green", b"blue")


@dataclass
class Result:
    scenario: str
    seed: int
    nodes: int
    world: World
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: What the rebuilds of amnesiac nodes did (amnesia scenarios), one entry per amnesiac boot.
    rebuilds: list[RebuildLog] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def reproduce(self) -> str:
        return (
            f"reproduce with seed={self.seed}: python -m tests.sim.run --seed {self.seed} --nodes {self.nodes} "
            f"--scenario {self.scenario} -v"
        )

    def summary(self) -> str:
        w = self.world
        ops = len(w.history)
        outcomes: dict[str, int] = {}
        for rec in w.history:
            if rec.crashed:
                name = "crashed"
            elif isinstance(rec.outcome, Failed):
                name = rec.outcome.kind.value
            else:
                name = type(rec.outcome).__name__
            outcomes[name] = outcomes.get(name, 0) + 1
        return (
            f"{self.scenario} seed={self.seed} nodes={self.nodes}: {ops} ops {outcomes}, "
            f"t_end={w.now:.0f}ms, stats={w.stats}, faults={w.initial_faults}"
        )


class Workload:
    """Clients bound to nodes, each issuing SETONCE and GET one at a time until ``stop``."""

    def __init__(
        self,
        world: World,
        rng: random.Random,
        clients_per_node: int,
        ops_per_client: int,
        hot_keys: int,
        stop: float,
        think_max: float | None = None,
    ) -> None:
        self.world = world
        self.rng = rng
        self.stop = stop
        self.hot = [b"hot%d" % i for i in range(hot_keys)]
        self.fresh: list[bytes] = []
        self.keys: list[bytes] = []
        self._touched: set[bytes] = set()
        self.p_hot = rng.choice([0.3, 0.6, 0.9])
        self.p_write = rng.choice([0.3, 0.5, 0.7])
        self.think_max = think_max if think_max is not None else rng.choice([1.0, 20.0, 200.0])
        self.ops_left: dict[int, int] = {}
        self.node_of: dict[int, NodeId] = {}
        cid = 0
        for nid in world.node_ids:
            for _ in range(clients_per_node):
                cid += 1
                self.node_of[cid] = nid
                self.ops_left[cid] = ops_per_client

    def start(self) -> None:
        for cid in self.node_of:
            self.world.after(self.rng.uniform(0.0, 5.0), partial(self._issue, cid))

    def touch(self, key: bytes) -> None:
        if key not in self._touched:
            self._touched.add(key)
            self.keys.append(key)

    def _pick_key(self) -> bytes:
        r = self.rng.random()
        if r < self.p_hot or not self.hot:
            return self.rng.choice(self.hot)
        if self.fresh and r < self.p_hot + (1 - self.p_hot) / 2:
            return self.rng.choice(self.fresh)
        key = b"fresh%d" % len(self.fresh)
        self.fresh.append(key)
        return key

    def _issue(self, cid: int) -> None:
        w = self.world
        if w.now >= self.stop or self.ops_left[cid] <= 0:
            return
        nid = self.node_of[cid]
        if not w.hosts[nid].up:
            w.after(20.0, lambda: self._issue(cid))
            return
        key = self._pick_key()
        self.touch(key)
        proposal = None
        if self.rng.random() < self.p_write:
            proposal = Proposal(w.fresh_pid(), self.rng.choice(VALUES))
        self.ops_left[cid] -= 1
        w.submit(nid, cid, key, proposal, "safety", lambda _rec: self._after_op(cid))

    def _after_op(self, cid: int) -> None:
        self.world.after(self.rng.uniform(0.0, self.think_max), lambda: self._issue(cid))


def _node_config(rng: random.Random) -> NodeConfig:
    if rng.random() < 0.2:
        # Tiny caches: acceptor states are evicted and reloaded from disk, chosen values forgotten.
        return NodeConfig(state_cache_keys=rng.choice([1, 2, 4]), chosen_cache_keys=rng.choice([1, 2, 8]))
    return NodeConfig()


def _with_fast_writes(config: NodeConfig, seed: str) -> NodeConfig:
    """Most runs let owners write in one round trip, some run full Paxos only; of the former,
    half let every node of a cluster of three write round 0 itself (a non-owner forwards only
    what is declined), half forward every write of a key another node owns at once. Drawn from
    their own generators, so every other draw of a seed stays what it was before."""
    fast = random.Random(f"fast/{seed}").random() < 0.75
    here = random.Random(f"fast-here/{seed}").random() < 0.5
    return replace(config, fast_writes=fast, fast_writes_here=here)


def _make_world(
    scenario: str,
    seed: int,
    nodes: int,
    trace: bool,
    tweak: Callable[[Faults], Faults],
    lying_disk: bool = False,
    config: NodeConfig | None = None,
) -> World:
    rng = random.Random(f"{scenario}/{nodes}/{seed}")
    faults = tweak(Faults.draw(rng))
    drawn = _with_fast_writes(_node_config(rng), f"{scenario}/{nodes}/{seed}")
    options = WorldOptions(
        node_config=config or drawn,
        trace=trace,
        lying_disk=lying_disk,
        retime_seed=_retime_seed(f"{scenario}/{nodes}/{seed}"),
    )
    return World(rng, nodes, faults, options)


def _retime_seed(seed: str) -> str | None:
    """Half the runs vary each node's phase timeout as they go (WorldOptions.retime_seed); drawn
    from its own generator, so every other draw of a seed stays what it was before."""
    return f"retime/{seed}" if random.Random(f"retime/{seed}").random() < 0.5 else None


def _run_ops(world: World, recs: list[OpRecord | None]) -> list[OpRecord]:
    started = [r for r in recs if r is not None]
    world.run_while(lambda: world.pending_ops() > 0, world.now + world.deadline_ms + 50.0)
    return started


def liveness_phase(world: World, workload: Workload, res: Result) -> None:
    """Heal everything, then every key must be readable and every new operation must succeed."""
    world.faults = world.faults.healed()
    world.crashes_enabled = False
    world.log("==== HEAL: no more faults, every node up")
    world.restart_all()
    # Operations still running end by their deadline.
    world.run_while(lambda: world.pending_ops() > 0, world.now + world.deadline_ms + 50.0)
    rng = world.rng
    n = world.node_ids
    keys = list(workload.keys)
    for i in range(2):
        key = b"after%d" % i
        workload.touch(key)
        keys.append(key)

    def definite(rec: OpRecord, what: str) -> None:
        if rec.crashed or not isinstance(rec.outcome, (Chosen, Empty)):
            res.violations.append(f"LIVENESS: {what} did not get a definite answer: {rec.describe()}")

    # 1. Every key is readable (from some node).
    world.log("==== LIVENESS 1: GET every key")
    for rec in _run_ops(world, [world.submit(rng.choice(n), 0, k, None, "liveness") for k in keys]):
        definite(rec, "GET after healing")
    # 2. One more SETONCE per key: afterwards each key certainly holds a value.
    world.log("==== LIVENESS 2: SETONCE every key")
    writes = _run_ops(
        world,
        [world.submit(rng.choice(n), 0, k, Proposal(world.fresh_pid(), rng.choice(VALUES)), "liveness") for k in keys],
    )
    for rec in writes:
        definite(rec, "SETONCE after healing")
    # 3. Every node returns that value.
    world.log("==== LIVENESS 3: GET every key on every node")
    final = _run_ops(world, [world.submit(nid, 0, k, None, "liveness") for k in keys for nid in n])
    expect = {w.key: w.outcome.proposal for w in writes if isinstance(w.outcome, Chosen)}
    for rec in final:
        definite(rec, "final GET")
        want = expect.get(rec.key)
        if want is not None and (not isinstance(rec.outcome, Chosen) or rec.outcome.proposal != want):
            res.violations.append(
                f"LIVENESS: final GET on n{rec.node} disagrees with the value {want} of {rec.key!r}: {rec.describe()}"
            )


def _finish(world: World, res: Result) -> Result:
    # Let stray messages and timers play out, so that late effects reach the oracle.
    world.run_until(world.now + world.deadline_ms)
    res.violations += world.violations
    res.violations += world.oracle.violations
    res.violations += check_completion(world.history)
    res.violations += check_history(world.history, world.oracle.chosen)
    return res


def run_standard(seed: int, nodes: int = 3, trace: bool = False) -> Result:
    return _run_faulty("standard", seed, nodes, trace, lambda f: f)


def run_crowd(seed: int, nodes: int = 3, trace: bool = False) -> Result:
    return _run_faulty("crowd", seed, nodes, trace, lambda f: f, crowd=True)


def run_crash_after_reply(
    seed: int, nodes: int = 3, trace: bool = False, lying_disk: bool = False, config: NodeConfig | None = None
) -> Result:
    """Nodes crash right after sending a Promise/Accepted; ``lying_disk`` breaks fsync on purpose.

    ``config`` replaces the node configuration the seed would draw.
    """

    def tweak(f: Faults) -> Faults:
        return replace(f, crash_after_reply=0.15, crash_every_ms=None, down_max_ms=300.0)

    return _run_faulty("crash-after-reply", seed, nodes, trace, tweak, lying_disk, config)


def run_crash_mid_accept(seed: int, nodes: int = 3, trace: bool = False) -> Result:
    """Proposers crash halfway through broadcasting an Accept and come back within 100 ms."""

    def tweak(f: Faults) -> Faults:
        return replace(f, crash_mid_accept=0.5, crash_every_ms=None, down_min_ms=0.5, down_max_ms=100.0)

    return _run_faulty("crash-mid-accept", seed, nodes, trace, tweak)


def _run_faulty(
    scenario: str,
    seed: int,
    nodes: int,
    trace: bool,
    tweak: Callable[[Faults], Faults],
    lying_disk: bool = False,
    config: NodeConfig | None = None,
    crowd: bool = False,
) -> Result:
    world = _make_world(scenario, seed, nodes, trace, tweak, lying_disk, config)
    res = Result(scenario, seed, nodes, world)
    rng = world.rng
    stop = rng.choice([1000.0, 3000.0, 6000.0])
    if crowd:
        wl = Workload(
            world, rng, rng.randint(6, 10), ops_per_client=rng.randint(3, 6), hot_keys=rng.randint(1, 2), stop=stop
        )
    else:
        wl = Workload(
            world, rng, clients_per_node=2, ops_per_client=rng.randint(3, 6), hot_keys=rng.randint(1, 4), stop=stop
        )
    wl.start()
    world.run_until(stop)
    liveness_phase(world, wl, res)
    return _finish(world, res)


def run_majority_down(seed: int, nodes: int = 3, trace: bool = False) -> Result:
    """A majority is down for longer than a deadline: operations must end, not hang."""

    def tweak(f: Faults) -> Faults:
        return replace(f, crash_every_ms=None)

    world = _make_world("majority-down", seed, nodes, trace, tweak)
    res = Result("majority-down", seed, nodes, world)
    rng = world.rng
    deadline = world.deadline_ms
    t_down = rng.uniform(100.0, 800.0)
    t_up = t_down + rng.uniform(deadline + 500.0, 2.5 * deadline)
    victims = rng.sample(world.node_ids, world.majority)
    wl = Workload(
        world,
        rng,
        clients_per_node=2,
        ops_per_client=rng.randint(5, 10),
        hot_keys=rng.randint(1, 3),
        stop=t_up,
        think_max=t_up / 8,
    )
    wl.start()
    world.run_until(t_down)
    world.log(f"==== MAJORITY DOWN: {victims}")
    for nid in victims:
        world.crash(nid, None)
    world.run_until(t_up)
    world.log("==== MAJORITY BACK")
    in_window = 0
    for rec in world.history:
        if rec.crashed or rec.invoke < t_down or rec.invoke + deadline > t_up:
            continue
        in_window += 1
        o = rec.outcome
        if isinstance(o, Empty) or (isinstance(o, Chosen) and rec.proposal is not None and o.proposal == rec.proposal):
            res.violations.append(f"answered without a majority up: {rec.describe()}")
    res.notes.append(f"{in_window} operations ran entirely while a majority was down")
    liveness_phase(world, wl, res)
    return _finish(world, res)


def run_amnesia(seed: int, nodes: int = 3, trace: bool = False) -> Result:
    """A node loses its disk, comes back amnesiac, rebuilds itself and votes again."""
    return _run_amnesia("amnesia", seed, nodes, trace, "repair")


def run_amnesia_vote_at_once(seed: int, nodes: int = 3, trace: bool = False) -> Result:
    """Control: the wiped node votes at once with its empty state (must fail for some seeds)."""
    return _run_amnesia("amnesia-vote-at-once", seed, nodes, trace, "none")


def run_amnesia_adopt(seed: int, nodes: int = 5, trace: bool = False) -> Result:
    """Control: the rebuild adopts the sources' merged states instead of repairing keys."""
    return _run_amnesia("amnesia-adopt", seed, nodes, trace, "adopt")


def run_amnesia_reset_incarnation(seed: int, nodes: int = 5, trace: bool = False) -> Result:
    """The wiped node restarts its incarnation count, as ``storage.open_node`` does on a new
    directory: its ballots and those of its first life can coincide."""
    return _run_amnesia("amnesia-reset-incarnation", seed, nodes, trace, "repair", reset_incarnation=True)


def _run_amnesia(
    scenario: str, seed: int, nodes: int, trace: bool, mode: str, reset_incarnation: bool = False
) -> Result:
    """``mode``: ``repair`` (the rebuild), ``adopt`` (unsafe rebuild), ``none`` (votes at once).

    Every variant of one seed draws the same world and workload (the seed string does not name
    the variant), so a control's failing seed can be replayed under the real rebuild.
    """
    rng = random.Random(f"amnesia/{nodes}/{seed}")
    faults = Faults.draw(rng)
    drawn = _with_fast_writes(_node_config(rng), f"amnesia/{nodes}/{seed}")
    # Shorter deadlines than the default, so that the 2 x deadline wait ends inside the faults.
    deadline = rng.choice([400.0, 1000.0, 3000.0])
    proposer = ProposerConfig(attempt_timeout_ms=deadline / 6, deadline_ms=deadline)
    config = replace(drawn, proposer=proposer)
    options = WorldOptions(node_config=config, trace=trace, wipe_resets_incarnation=reset_incarnation)
    world = World(rng, nodes, faults, options)
    res = Result(scenario, seed, nodes, world)
    rebuilder = Rebuilder(world, rng, "adopt" if mode == "adopt" else "repair")
    amnesiac = mode != "none"
    f = world.faults
    first_wipe = rng.uniform(50.0, 1500.0)
    # Faults go on while the rebuild repairs keys, and for a while after the node votes again.
    after_wipe = rng.uniform(f.down_min_ms, f.down_max_ms) + rebuilder.wait_ms + deadline + rng.uniform(300.0, 3000.0)
    stop = first_wipe + after_wipe
    wipes = rng.choice([1, 1, 2])
    ops = rng.randint(6, 12)
    think_max = rng.choice([30.0, 2 * stop / ops])
    wl = Workload(
        world, rng, clients_per_node=2, ops_per_client=ops, hot_keys=rng.randint(1, 4), stop=stop, think_max=think_max
    )
    wiped: list[int] = []

    def wipe() -> None:
        # One amnesiac node at a time, and never more nodes down than a minority (an amnesiac
        # node counts as down); otherwise try again a little later.
        if world.now >= stop:
            return
        up = [n for n in world.node_ids if world.hosts[n].up]
        if world.amnesiac_nodes() or world.down_count() >= world.max_down or not up:
            world.after(rng.uniform(5.0, 50.0), wipe)
            return
        victim = rng.choice(up)
        world.log(f"==== WIPE n{victim}")
        world.wipe(victim, rng.uniform(f.down_min_ms, f.down_max_ms), amnesiac=amnesiac)
        wiped.append(int(victim))
        if len(wiped) < wipes:
            world.after(rng.uniform(100.0, after_wipe), wipe)

    world.after(first_wipe, wipe)
    wl.start()
    world.run_until(stop)
    # Heal, then let the rebuild finish before the liveness checks, which ask every node.
    world.faults = world.faults.healed()
    world.crashes_enabled = False
    world.log("==== HEAL: no more faults, every node up; waiting for the rebuild")
    world.restart_all()
    healed = world.now
    # Enough for the wait, a dump of every key page by page from each source, and the repairs.
    dump_ms = 30.0 * world.majority * (len(wl.keys) + 2)
    limit = healed + rebuilder.wait_ms + dump_ms + 10 * world.deadline_ms
    world.run_while(lambda: bool(world.amnesiac_nodes()), limit)
    for nid in world.amnesiac_nodes():
        res.violations.append(f"LIVENESS: n{nid} is still amnesiac {limit - healed:.0f} ms after healing")
    res.notes.append(
        f"wiped: {wiped}; faults until t={stop:.0f}; deadline {deadline:.0f} ms, "
        f"rebuild wait {rebuilder.wait_ms:.0f} ms"
    )
    res.rebuilds = rebuilder.logs
    for log in rebuilder.logs:
        res.notes.append(f"rebuild: {log}")
    liveness_phase(world, wl, res)
    res.violations += rebuilder.violations
    return _finish(world, res)


SCENARIOS: dict[str, Callable[[int, int, bool], Result]] = {
    "standard": run_standard,
    "crowd": run_crowd,
    "majority-down": run_majority_down,
    "crash-after-reply": run_crash_after_reply,
    "crash-mid-accept": run_crash_mid_accept,
    "amnesia": run_amnesia,
    "amnesia-vote-at-once": run_amnesia_vote_at_once,
    "amnesia-adopt": run_amnesia_adopt,
    "amnesia-reset-incarnation": run_amnesia_reset_incarnation,
}


def run_seeds(scenario: str, nodes: int, seeds: Sequence[int]) -> list[tuple[int, list[str]]]:
    """Run ``seeds``; return the failing ones with their first violations (cheap to pickle)."""
    run = SCENARIOS[scenario]
    failed: list[tuple[int, list[str]]] = []
    for seed in seeds:
        res = run(seed, nodes, False)
        if not res.ok:
            failed.append((seed, [res.reproduce(), *res.violations[:6]]))
    return failed

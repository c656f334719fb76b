"""A seeded chaos run against a real respreg cluster, checked against the write-once register model.

    python -m tests.chaos.run --nodes 3 --duration 300 --seed 7 --nemesis all --clients 16

Starts the cluster (nodes on 127.0.0.1..N; peers through the fault proxy when a proxy fault is
chosen; with the fsync faults every node preloads the fault library, with disk-full every data
directory is on its own tmpfs), drives ``--clients`` concurrent redis-py clients, applies the faults the seed chooses,
heals, waits until a write succeeds through every node, stops the clients, GETs every key on
every node, and checks the whole history. Prints the seed first and a summary at the end; the
exit code is 1 when there is any violation or the cluster did not recover.

Every phase is bounded: the fault schedule by ``--duration``, each operation by the socket
timeout (deadline + 3 s), recovery and final reads by ``--recover-timeout``. Processes, the
proxy, nftables rules and tmpfs mounts started here are ended in ``finally`` blocks, by PID / by
table name / by mount point.
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.chaos.checker import Violation, check, check_final, summarize
from tests.chaos.cluster import ChaosCluster
from tests.chaos.disk import DiskControl, build_shim, shim_unavailable, tmpfs_size_mb, tmpfs_unavailable
from tests.chaos.history import OP_KINDS, History, Op, Outcome
from tests.chaos.nemesis import (
    ALL_FAULTS,
    NFT_FAULTS,
    PROXY_FAULTS,
    PROXY_MODES,
    SHIM_FAULTS,
    TMPFS_FAULTS,
    Event,
    Nemesis,
    Nft,
    ProxyMode,
    Segment,
    nft_unavailable,
    run_schedule,
)
from tests.chaos.proxy import LinkControl, ProxyProcess
from tests.chaos.workload import Keyspace, Workload, final_reads, probe_writes

#: A node counts as available only this long after it (re)joined a connected majority: the time
#: respreg's links need to notice a change (peer timeout 1 s) and redial (backoff up to 1 s).
SETTLE_S = 2.0


@dataclass
class RunConfig:
    nodes: int = 3
    duration_s: float = 30.0
    seed: int = 0
    nemeses: tuple[str, ...] = ("kill",)
    clients: int = 16
    deadline_ms: int = 2000
    hold_s: tuple[float, float] = (2.0, 8.0)
    quiet_s: tuple[float, float] = (1.0, 4.0)
    mix_chance: float = 0.3
    warmup_s: float = 2.0
    recover_timeout_s: float = 60.0
    root: Path | None = None
    keep: bool = False
    history_out: Path | None = None
    #: Run the peers through the proxy even when no proxy fault is chosen.
    force_proxy: bool = False
    proxy_modes: tuple[ProxyMode, ...] = PROXY_MODES
    #: Size of each node's tmpfs data directory when disk-full runs (None: by the duration).
    tmpfs_mb: int | None = None


@dataclass
class Recovery:
    event: Event
    first_any: float | None
    all_affected: float | None
    note: str = ""


@dataclass
class RunResult:
    config: RunConfig
    history: History
    violations: list[Violation]
    events: list[Event]
    recoveries: list[Recovery]
    final_recovery: dict[int, float | None]
    keys_checked: int
    skipped: list[str] = field(default_factory=list)
    #: node -> its outbound peer links that were up at the end, e.g. {2: True, 3: False}
    links_at_end: dict[int, dict[int, bool] | str] = field(default_factory=dict)
    #: What the nemesis did beyond the faults (restarts after disk faults, nodes that exited).
    notes: list[str] = field(default_factory=list)
    #: node -> (used, size) bytes of its tmpfs data directory at the end (disk-full runs)
    disk_usage: dict[int, tuple[int, int]] = field(default_factory=dict)
    summary: str = ""

    @property
    def recovered(self) -> bool:
        return bool(self.final_recovery) and all(v is not None for v in self.final_recovery.values())

    @property
    def ok(self) -> bool:
        return not self.violations and self.recovered


# ---- statistics ------------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(p * len(s)) - 1))]


def healthy_intervals(timeline: Sequence[Segment], node: int, end: float, settle_s: float) -> list[tuple[float, float]]:
    """When ``node`` was in a connected majority, from ``settle_s`` after it joined one."""
    out: list[tuple[float, float]] = []
    since: float | None = None
    for seg in timeline:
        if node in seg.healthy:
            if since is None:
                since = seg.start
        elif since is not None:
            if seg.start > since + settle_s:
                out.append((since + settle_s, seg.start))
            since = None
    if since is not None and end > since + settle_s:
        out.append((since + settle_s, end))
    return out


def label_at(timeline: Sequence[Segment], t: float) -> str:
    label = "none"
    for seg in timeline:
        if seg.start > t:
            break
        label = seg.label
    return label


def succeeded(op: Op) -> bool:
    return op.outcome in (Outcome.OK, Outcome.NIL, Outcome.VALUE)


def availability(
    ops: Sequence[Op], timeline: Sequence[Segment], nodes: Sequence[int], end: float
) -> dict[str, list[Op]]:
    """The workload's operations on nodes inside a connected majority for their whole duration,
    grouped by the faults in effect when they were invoked."""
    intervals = {n: healthy_intervals(timeline, n, end, SETTLE_S) for n in nodes}
    groups: dict[str, list[Op]] = {}
    for op in ops:
        if op.complete is None:
            continue
        if any(a <= op.invoke and op.complete <= b for a, b in intervals[op.node]):
            groups.setdefault(label_at(timeline, op.invoke), []).append(op)
    return groups


def recoveries(ops: Sequence[Op], events: Sequence[Event]) -> list[Recovery]:
    """For each heal: time to the first write answered +OK (any node), and until one was answered
    +OK through every node the fault had cut off; only writes invoked after the heal and before
    the next fault count."""
    writes = sorted((op for op in ops if op.wrote() and op.complete is not None), key=lambda o: o.invoke)
    out: list[Recovery] = []
    for i, ev in enumerate(events):
        if ev.what != "heal":
            continue
        nxt = next((e.time for e in events[i + 1 :] if e.what == "start"), math.inf)
        window = [w for w in writes if ev.time <= w.invoke < nxt]
        first_any = min((w.end - ev.time for w in window), default=None)
        per_node: dict[int, float] = {}
        for w in window:
            if w.node in ev.affected and w.node not in per_node:
                per_node[w.node] = w.end - ev.time
        note = ""
        all_affected: float | None = None
        if ev.affected:
            missing = sorted(ev.affected - set(per_node))
            if missing:
                note = f"no +OK through {missing} before the next fault"
            else:
                all_affected = max(per_node.values())
        out.append(Recovery(ev, first_any, all_affected, note))
    return out


def _ms(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x * 1000:,.0f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> list[str]:
    """A plain-text table; the first ``left`` columns are left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [fmt(headers), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]


def render_summary(result: RunResult, t0: float, avail: dict[str, list[Op]]) -> str:
    cfg = result.config
    ops = result.history.snapshot()
    work = [o for o in ops if o.client.startswith("c")]
    lines = [
        "",
        "=" * 100,
        f"chaos run: seed {cfg.seed}, {cfg.nodes} nodes, {cfg.duration_s:.0f} s of faults "
        f"({', '.join(cfg.nemeses) or 'none'}), {cfg.clients} clients, deadline {cfg.deadline_ms} ms",
    ]
    if result.skipped:
        lines.append("skipped: " + "; ".join(result.skipped))
    lines.append(
        f"operations: {len(ops)} recorded ({len(work)} by the clients, "
        f"{sum(1 for o in ops if o.client == 'probe')} recovery probes, "
        f"{sum(1 for o in ops if o.client == 'final')} final reads); keys checked on every node: {result.keys_checked}"
    )
    kinds = OP_KINDS
    outcomes = [o for o in Outcome if any(op.outcome is o for op in work)]
    counts = Counter((op.kind, op.outcome) for op in work)
    rows = [[k] + [str(counts[(k, o)]) for o in outcomes] + [str(sum(counts[(k, o)] for o in outcomes))]
            for k in kinds]  # fmt: skip
    lines += ["", "client operations by outcome:"]
    lines += _table(["op"] + [o.value for o in outcomes] + ["total"], rows)
    errs = Counter(op.error.split(":")[0][:60] for op in work if op.outcome is Outcome.OTHER_ERROR)
    if errs:
        lines.append("other errors: " + "; ".join(f"{t!r} x{n}" for t, n in errs.most_common(5)))

    lines += ["", f"violations: {len(result.violations)}"]
    if result.violations:
        lines.append(summarize(result.violations, limit=30))

    lines += ["", f"availability while a majority was up and connected (ops on such nodes, from {SETTLE_S:.0f} s "
              "after they joined it; by faults in effect at invocation):"]  # fmt: skip
    rows = []
    every: list[Op] = []
    for label in sorted(avail, key=lambda k: (k != "none", k)):
        group = avail[label]
        every += group
        rows.append(_avail_row(label, group))
    if every:
        rows.append(_avail_row("all of the above", every))
    lines += _table(["faults in effect", "ops", "errors", "error %", "p50 ms", "p99 ms", "max ms"], rows)

    rec = result.recoveries
    lines += ["", "recovery after each heal (first write answered +OK after it; 'all' = through every node cut off):"]
    rrows = []
    for r in rec:
        rrows.append([
            f"{r.event.time - t0:.1f}s", r.event.fault, r.event.description[:60],
            ",".join(str(n) for n in sorted(r.event.affected)) or "-",
            _ms(r.first_any), _ms(r.all_affected) if r.event.affected else "-", r.note,
        ])  # fmt: skip
    lines += _table(["heal at", "fault", "what", "cut off", "any ms", "all ms", "note"], rrows, left=4)
    alls = [r.all_affected for r in rec if r.all_affected is not None]
    anys = [r.first_any for r in rec if r.first_any is not None]
    if rec:
        lines.append(
            f"heals: {len(rec)}; first +OK after a heal p50 {_ms(percentile(anys, 0.5))} ms, "
            f"max {_ms(max(anys, default=None))} ms; every cut-off node serving p50 {_ms(percentile(alls, 0.5))} ms, "
            f"max {_ms(max(alls, default=None))} ms"
        )
    fr = result.final_recovery
    lines.append(
        "after the final heal, a write answered through each node after: "
        + ", ".join(f"n{n} {_ms(v)} ms" if v is not None else f"n{n} NOT RECOVERED" for n, v in sorted(fr.items()))
    )
    links = []
    for node, state in sorted(result.links_at_end.items()):
        if isinstance(state, str):
            links.append(f"n{node} ({state})")
        else:
            down = [p for p, up in sorted(state.items()) if not up]
            links.append(f"n{node} {len(state) - len(down)}/{len(state)}" + (f" (down: {down})" if down else ""))
    if links:
        lines.append("outbound peer links up at the end: " + ", ".join(links))
    if result.notes:
        lines += ["", "beyond the faults, the nemesis:"] + [f"  {n}" for n in result.notes]
    if result.disk_usage:
        mib = 1 << 20
        usage = sorted(result.disk_usage.items())
        parts = [f"n{n} {used / mib:.1f} of {size / mib:.0f} MiB used" for n, (used, size) in usage]
        lines.append("tmpfs data directories at the end: " + ", ".join(parts))
        if any(used > 0.75 * size for _, (used, size) in usage):
            lines.append("WARNING: a tmpfs is more than 75 % used by the nodes' own files; it may have filled up "
                         "outside the schedule: give a larger --tmpfs-mb")  # fmt: skip
    verdict = "PASS" if result.ok else "FAIL"
    lines += ["", f"{verdict}: {len(result.violations)} violation(s), recovered: {'yes' if result.recovered else 'NO'}"
              f"; replay the fault schedule with --seed {cfg.seed}", "=" * 100]  # fmt: skip
    return "\n".join(lines)


def _avail_row(label: str, group: Sequence[Op]) -> list[str]:
    errors = sum(1 for o in group if not succeeded(o))
    lat = [o.end - o.invoke for o in group]
    return [
        label,
        str(len(group)),
        str(errors),
        f"{100 * errors / len(group):.2f}" if group else "-",
        _ms(percentile(lat, 0.5)),
        _ms(percentile(lat, 0.99)),
        _ms(max(lat, default=None)),
    ]


# ---- the run ---------------------------------------------------------------------------------------


def resolve_nemeses(names: Sequence[str], log: Callable[[str], None]) -> tuple[tuple[str, ...], list[str]]:
    """The faults that can run here, and why others were skipped."""
    wanted: list[str] = []
    for n in names:
        wanted += list(ALL_FAULTS) if n == "all" else [n]
    unknown = [n for n in wanted if n not in ALL_FAULTS]
    if unknown:
        raise ValueError(f"unknown nemesis {', '.join(unknown)}; known: {', '.join(ALL_FAULTS)}, all")
    skipped: list[str] = []
    for group, unavailable in ((NFT_FAULTS, nft_unavailable), (SHIM_FAULTS, shim_unavailable),
                               (TMPFS_FAULTS, tmpfs_unavailable)):  # fmt: skip
        if any(n in group for n in wanted):
            reason = unavailable()
            if reason is not None:
                wanted = _skip(wanted, group, reason, skipped, log)
    return tuple(dict.fromkeys(wanted)), skipped


def _skip(wanted: list[str], group: frozenset[str], reason: str, skipped: list[str],
          log: Callable[[str], None]) -> list[str]:  # fmt: skip
    dropped = list(dict.fromkeys(n for n in wanted if n in group))
    skipped.append(f"{', '.join(dropped)}: {reason}")
    log(f"SKIPPING {', '.join(dropped)}: {reason}")
    return [n for n in wanted if n not in group]


def peer_links(cluster: ChaosCluster) -> dict[int, dict[int, bool] | str]:
    """Each node's view of its outbound peer links (INFO paxos), or why it could not be asked."""
    out: dict[int, dict[int, bool] | str] = {}
    for n in cluster.nodes:
        try:
            info = cluster.client(n.node_id, socket_timeout=5).info("paxos")
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            out[n.node_id] = f"INFO failed: {exc}"
            continue
        links: dict[int, bool] = {}
        for k, v in info.items():
            if k.startswith("peer") and k[4:].isdigit():
                up = v.get("up") if isinstance(v, dict) else None
                links[int(k[4:])] = str(up) == "1"
        out[n.node_id] = links
    return out


def run(cfg: RunConfig, log: Callable[[str], None] = print) -> RunResult:
    log(f"chaos seed {cfg.seed} (replay the fault schedule: --seed {cfg.seed})")
    nemeses, skipped = resolve_nemeses(cfg.nemeses, log)
    shim_dir: Path | None = None
    shim: Path | None = None
    if any(n in SHIM_FAULTS for n in nemeses):
        shim_dir = Path(tempfile.mkdtemp(prefix="respreg-chaos-shim-"))
        try:
            shim = build_shim(shim_dir)
        except RuntimeError as exc:
            shutil.rmtree(shim_dir, ignore_errors=True)
            shim_dir = None
            nemeses = tuple(_skip(list(nemeses), SHIM_FAULTS, f"cannot build the fsync fault library: {exc}",
                                  skipped, log))  # fmt: skip
    cfg.nemeses = nemeses
    rng = random.Random(cfg.seed)
    own_root = cfg.root is None
    root = Path(tempfile.mkdtemp(prefix="respreg-chaos-")) if cfg.root is None else cfg.root
    root.mkdir(parents=True, exist_ok=True)
    cluster = ChaosCluster(root, size=cfg.nodes, deadline_ms=cfg.deadline_ms)
    proxy: LinkControl | None = None
    nft: Nft | None = None
    disks: DiskControl | None = None
    workload: Workload | None = None
    history = History()
    failed = True
    try:
        if shim is not None or any(n in TMPFS_FAULTS for n in nemeses):
            tmpfs = any(n in TMPFS_FAULTS for n in nemeses)
            tmpfs_mb = cfg.tmpfs_mb or tmpfs_size_mb(cfg.duration_s)
            disks = DiskControl(cluster, root / "disk-faults", shim, tmpfs, tmpfs_mb)
            if tmpfs:
                log(f"data directories on tmpfs, {tmpfs_mb} MiB each")
            disks.prepare()
        if cfg.force_proxy or any(n in PROXY_FAULTS for n in nemeses):
            with open(root / "proxy.log", "ab") as plog:
                proxy = ProxyProcess(cluster.routes(), log=plog, avoid=cluster.own_ports())
            cluster.via = {(r.src, r.dst): proxy.port(r.src, r.dst) for r in cluster.routes()}
        if any(n in NFT_FAULTS for n in nemeses):
            ports = cluster.peer_ports() + list(cluster.via.values())
            nft = Nft([cluster.host(i) for i in cluster.ids], ports)
        if proxy is not None:
            # Until a node listens, its links refuse (as its port would) rather than accept and reset.
            for i in cluster.ids:
                proxy.set_down(i, True)
        cluster.start()
        if proxy is not None:
            for i in cluster.ids:
                proxy.set_down(i, False)
        cluster.wait_peers(timeout_s=30)
        endpoints = {n.node_id: (cluster.host(n.node_id), n.port) for n in cluster.nodes}
        timeout_s = cfg.deadline_ms / 1000 + 3
        prefix = f"s{cfg.seed}-{int(time.time())}:"
        workload = Workload(endpoints, history, cfg.seed, cfg.clients, timeout_s, Keyspace(prefix=prefix))
        nemesis = Nemesis(cluster, proxy, nft, log=log, proxy_modes=cfg.proxy_modes, disks=disks)
        t0 = nemesis.t0
        workload.start()
        stop = threading.Event()
        try:
            time.sleep(cfg.warmup_s)
            if nemeses:
                run_schedule(nemesis, nemeses, rng, time.monotonic() + cfg.duration_s, cfg.hold_s, cfg.quiet_s,
                             cfg.mix_chance, stop)  # fmt: skip
            else:
                time.sleep(cfg.duration_s)
        finally:
            stop.set()
            nemesis.heal_all()
        healed = time.monotonic()
        log(f"[{healed - t0:7.2f}s] healed; waiting for a write to succeed through every node")
        final_recovery = probe_writes(endpoints, history, prefix, cfg.recover_timeout_s)
        log(f"[{time.monotonic() - t0:7.2f}s] recovery: " + ", ".join(
            f"n{n} {'-' if v is None else f'{v:.2f}s'}" for n, v in sorted(final_recovery.items())))  # fmt: skip
        time.sleep(1.0)  # a little healthy load after recovery
        workload.stop()
        end = time.monotonic()
        keys = sorted({op.key for op in history.snapshot()})
        log(f"[{end - t0:7.2f}s] clients stopped; reading {len(keys)} keys on {cfg.nodes} nodes")
        final = final_reads(endpoints, keys, history, timeout_s=cfg.recover_timeout_s)
        links_at_end = peer_links(cluster)
        ops = history.snapshot()
        violations = check(ops) + check_final(final, ops)
        events = list(nemesis.events)
        result = RunResult(
            cfg, history, violations, events, recoveries(ops, events), final_recovery, len(keys), skipped, links_at_end,
            list(nemesis.notes), disks.usage() if disks is not None else {},
        )  # fmt: skip
        work = [o for o in ops if o.client.startswith("c")]
        avail = availability(work, nemesis.topology.timeline, cluster.ids, end)
        result.summary = render_summary(result, t0, avail)
        if cfg.history_out is not None:
            history.dump(cfg.history_out)
            log(f"history written to {cfg.history_out} (check it again: python -m tests.chaos.checker FILE)")
        failed = not result.ok
        return result
    finally:
        if workload is not None:
            workload.stop()
        try:
            if nft is not None:
                nft.close()
        finally:
            try:
                cluster.close()
                if proxy is not None:
                    proxy.close()
            finally:
                # Only once the nodes stopped: a mount still in use is unmounted lazily.
                try:
                    if disks is not None:
                        disks.close(keep_data_in=root if failed else None)
                finally:
                    if shim_dir is not None:
                        shutil.rmtree(shim_dir, ignore_errors=True)
                    if failed:
                        logs = cluster.logs()
                        if logs.strip():
                            log("node logs (tails):\n" + logs[-6000:])
                    if own_root and not cfg.keep and not failed:
                        shutil.rmtree(root, ignore_errors=True)
                    elif own_root:
                        log(f"data directories and logs kept in {root}")


def parse_modes(text: str) -> tuple[ProxyMode, ...]:
    modes: list[ProxyMode] = []
    for m in (x.strip() for x in text.split(",")):
        for known in PROXY_MODES:
            if m == known:
                modes.append(known)
                break
        else:
            raise SystemExit(f"unknown proxy mode {m!r}; known: {', '.join(PROXY_MODES)}")
    return tuple(modes)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.chaos.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=3, choices=[3, 5])
    p.add_argument("--duration", type=float, default=60.0, help="seconds of faults (default 60)")
    p.add_argument("--seed", type=int, default=None, help="seed of the fault schedule and workload (default: random)")
    p.add_argument("--nemesis", default="all", help=f"comma-separated: {','.join(ALL_FAULTS)} or all (default all)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--deadline-ms", type=int, default=2000, help="the nodes' --deadline-ms (default 2000)")
    p.add_argument("--hold", type=float, nargs=2, default=(2.0, 8.0), metavar=("MIN", "MAX"),
                   help="seconds each fault lasts (default 2 8)")  # fmt: skip
    p.add_argument("--quiet", type=float, nargs=2, default=(1.0, 4.0), metavar=("MIN", "MAX"),
                   help="seconds between faults (default 1 4)")  # fmt: skip
    p.add_argument("--mix", type=float, default=0.3, help="chance of a process and a network fault together")
    p.add_argument("--recover-timeout", type=float, default=60.0)
    p.add_argument("--root", type=Path, default=None, help="directory for data dirs and logs (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir even when the run passes")
    p.add_argument("--history-out", type=Path, default=None, help="write the history here (JSON lines)")
    p.add_argument("--proxy", action="store_true", help="route peers through the proxy even without proxy faults")
    p.add_argument("--proxy-modes", default=",".join(PROXY_MODES),
                   help="how proxy partitions cut links, drawn uniformly (default: all of them)")  # fmt: skip
    p.add_argument("--tmpfs-mb", type=int, default=None,
                   help="size of each node's tmpfs data directory with disk-full (default: by --duration, "
                        "128 + 3 * (duration + 60), rounded up to 64)")  # fmt: skip
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 2**31)
    cfg = RunConfig(
        nodes=args.nodes,
        duration_s=args.duration,
        seed=seed,
        nemeses=tuple(x.strip() for x in args.nemesis.split(",") if x.strip()),
        clients=args.clients,
        deadline_ms=args.deadline_ms,
        hold_s=(args.hold[0], args.hold[1]),
        quiet_s=(args.quiet[0], args.quiet[1]),
        mix_chance=args.mix,
        recover_timeout_s=args.recover_timeout,
        root=args.root,
        keep=args.keep,
        history_out=args.history_out,
        force_proxy=args.proxy,
        proxy_modes=parse_modes(args.proxy_modes),
        tmpfs_mb=args.tmpfs_mb,
    )
    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through the finally blocks that undo every fault

    signal.signal(signal.SIGTERM, terminate)
    try:
        result = run(cfg, log=lambda s: print(s, flush=True))
    except ValueError as exc:
        p.error(str(exc))
    print(result.summary, flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())

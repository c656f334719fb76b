"""Benchmark respreg against redis-server and etcd, all started here on loopback, in one run.

    .venv/bin/python benchmarks/run.py [--quick] [--out benchmarks/RESULTS.md] [--json PATH] [--skip-install]

Installs what is missing (Debian: redis-server, redis-tools, etcd-server, etcd-client via apt-get;
PyPI: aiohttp into this interpreter) unless --skip-install, then starts redis-server in memory,
redis-server with an fsynced AOF, a 3-node respreg cluster and a 3-node etcd cluster, each in a
fresh temp dir on free loopback ports, and runs each workload on each of its targets in turn,
three rounds (--rounds), the order reversed every other round; each row reports the median
round. Writes a markdown report and a JSON file. --quick makes every run tiny and runs one
round (a smoke test of the harness, not a measurement).

Exit status: 0 when every workload ran and every check passed, 3 when the results were written
but some workload failed or a check failed (see the status column), 2 for bad usage or missing
tools with --skip-install.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import importlib.metadata
import io
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import install
import report
from harness import (
    HOST,
    CommandLog,
    Measured,
    ServerGroup,
    machine_facts,
    resp_command,
    run_measured,
    split_scale_section,
    tool_version,
)
from servers import etcd_leader, start_etcd, start_redis, start_respreg

HERE = Path(__file__).resolve().parent
RAND_RANGE = 100_000_000


@dataclass
class Row:
    """One measured (or skipped, or failed) workload against one target."""

    workload: str  # stable id, e.g. "get-hit-P1"
    title: str
    target: str  # respreg, redis-mem, redis-durable, etcd
    clients: int
    pipeline: int = 1
    requests: int = 0
    throughput: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    status: str = "ok"
    ratio: str = ""
    note: str = ""
    wall_s: float = 0.0
    client_cpu_pct: float | None = None
    server_cpu_pct: float | None = None
    server_cpu_us_per_op: float | None = None
    load_avg_1m: float | None = None  # at the end of the measured run: other work on the machine shows here
    command: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Workload:
    """One workload and the targets it runs on, each ``rounds`` times (see Runner.measure)."""

    name: str  # the rows' workload id
    title: str
    clients: int
    pipeline: int
    targets: list[str]
    rounds: int


@dataclass
class Plan:
    """How big each run is."""

    quick: bool
    rounds: int = 3
    get_target_s: float = 4.0
    write_target_s: float = 6.0
    etcd_seconds: float = 6.0
    contended_rounds: int = 100
    contended_seconds: float = 45.0
    check_perf_xl: bool = True

    def get_requests(self, pilot_rps: float | None, clients: int, pipeline: int) -> int:
        if self.quick:
            return max(1000, clients * pipeline * 2)
        assert pilot_rps is not None
        return _clamp(int(pilot_rps * self.get_target_s), clients * pipeline * 20, 5_000_000)

    def write_requests(self, pilot_rps: float | None, clients: int) -> int:
        if self.quick:
            return max(40, clients * 2)
        assert pilot_rps is not None
        return _clamp(int(pilot_rps * self.write_target_s), clients * 20, 2_000_000)


def _clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, v))


class Runner:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.root = root
        self.plan = Plan(quick=args.quick)
        if args.quick:
            self.plan.rounds = 1
            self.plan.contended_rounds = 3
            self.plan.contended_seconds = 20
            self.plan.etcd_seconds = 10
            self.plan.check_perf_xl = False
        if args.no_xl:
            self.plan.check_perf_xl = False
        if args.rounds is not None:
            self.plan.rounds = args.rounds
        self.commands = CommandLog()
        self.rows: list[Row] = []
        self.details: dict[str, Any] = {}
        #: Each started system: its servers, and where its clients connect (port, ports or URLs).
        self.systems: dict[str, tuple[ServerGroup, Any]] = {}
        self.start_errors: dict[str, str] = {}

    # ---- redis-benchmark ---------------------------------------------------------------------

    def redis_benchmark(
        self, purpose: str, port: int, clients: int, pipeline: int, n: int, command: list[str], rand: bool
    ) -> tuple[Measured, dict[str, float]]:
        argv = [
            "redis-benchmark", "-h", HOST, "-p", str(port),
            "-c", str(clients), "-n", str(n), "-P", str(pipeline), "--csv",
            *(["-r", str(RAND_RANGE)] if rand else []),
            *command,
        ]  # fmt: skip
        m = run_measured(purpose, argv, self.commands, timeout_s=300)
        if m.timed_out:
            raise RuntimeError(f"redis-benchmark did not finish within 300 s: {m.stderr[-500:]}")
        printed = m.stdout + m.stderr
        if m.returncode != 0 or "Error from server" in printed:
            # The server's error first: the status keeps only the first line of this message.
            said = [line for line in printed.splitlines() if line.startswith("Error from server")]
            raise RuntimeError(f"redis-benchmark failed (exit {m.returncode}): {(said or [''])[0]} {printed[-800:]}")
        return m, parse_benchmark_csv(m.stdout)

    def bench_row(
        self,
        row: Row,
        group: ServerGroup,
        port: int,
        command: list[str],
        rand: bool,
        kind: str,
        stats_ports: list[int] | None = None,
    ) -> None:
        """Pilot (also a warm-up; skipped in --quick), then the measured run sized from it."""
        pilot_rps: float | None = None
        if not self.plan.quick:
            # Long enough to measure a rate (a GET pilot of 10,000 took 6 ms at -P 16, and sized
            # the run from its connection set-up), short enough to stay a warm-up.
            pilot_n = max(50_000, row.clients * row.pipeline * 250) if kind == "get" else max(200, row.clients * 4)
            _, pilot = self.redis_benchmark(
                f"warm-up/pilot for {row.workload} on {row.target}",
                port, row.clients, row.pipeline, pilot_n, command, rand,
            )  # fmt: skip
            pilot_rps = pilot["rps"]
        if kind == "get":
            n = self.plan.get_requests(pilot_rps, row.clients, row.pipeline)
        else:
            n = self.plan.write_requests(pilot_rps, row.clients)
        before_stats = respreg_stats(stats_ports) if stats_ports else {}
        cpu0 = group.cpu_seconds()
        m, parsed = self.redis_benchmark(
            f"{row.workload} on {row.target}", port, row.clients, row.pipeline, n, command, rand
        )
        cpu1 = group.cpu_seconds()
        row.requests = n
        row.throughput = parsed["rps"]
        row.p50_ms = parsed.get("p50_latency_ms")
        row.p99_ms = parsed.get("p99_latency_ms")
        row.wall_s = m.wall_s
        row.client_cpu_pct = m.client_cpu_pct
        row.command = self.commands.entries[-1][1]
        fill_server_cpu(row, cpu1 - cpu0, m.wall_s, n)
        if stats_ports:
            after = respreg_stats(stats_ports)
            row.extra["paxos_counters_delta"] = {k: after[k] - before_stats.get(k, 0) for k in after}
        group.check_alive()

    def attempt(self, row: Row, fn: Callable[[], None]) -> Row:
        """Run one workload; a failure becomes the row's status and the run goes on."""
        print(f"  {row.workload} on {row.target} ...", end="", flush=True)
        t = time.monotonic()
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - one failed workload must not lose the others
            row.status = f"error: {exc}".splitlines()[0][:300]
            row.extra["traceback"] = traceback.format_exc()[-3000:]
        row.load_avg_1m = float(_loadavg().split()[0])
        shown = f"{row.throughput:,.0f} ops/s" if row.throughput is not None else row.status
        print(f" {shown} ({time.monotonic() - t:.1f}s)", flush=True)
        return row

    # ---- the systems under test --------------------------------------------------------------

    def start_systems(self) -> None:
        """Start every system, each on its own free ports; each idles while another is measured
        (an idle one costs a fraction of a percent of a core). One that does not start fails
        each of its rows, saying why."""
        # A quick run checks the harness only: a generous deadline keeps a machine busy with
        # other work from turning its unwarmed burst of 1000 writes into -UNCERTAIN replies.
        extra = ["--deadline-ms", "30000"] if self.plan.quick else []
        starts: list[tuple[str, Callable[[], tuple[ServerGroup, Any]]]] = [
            ("redis-mem", lambda: start_redis(self.root, False, self.commands)),
            ("redis-durable", lambda: start_redis(self.root, True, self.commands)),
            ("respreg", lambda: start_respreg(self.root, 3, self.commands, extra)),
            ("etcd", lambda: start_etcd(self.root, 3, self.commands)),
        ]
        for label, start in starts:
            print(f"starting {label} ...", flush=True)
            try:
                self.systems[label] = start()
            except Exception as exc:  # noqa: BLE001 - report the failure in every row of this system
                self.start_errors[label] = f"error: {label} did not start: {exc}".splitlines()[0][:300]
                print(f"  could not start: {exc}", flush=True)
        if "etcd" in self.systems:
            self.details["etcd_leader_at_start"] = etcd_leader(self.systems["etcd"][1])

    def stop_systems(self) -> None:
        for group, _ in self.systems.values():
            group.stop()

    def workloads(self) -> list[Workload]:
        """Every workload, in the order run, with the targets it runs on."""
        rounds = self.plan.rounds
        get_targets = ["respreg", "redis-mem"]
        write_targets = ["respreg", "redis-durable", "etcd"]
        out = [
            Workload("get-hit-P1", "GET of a written key, 50 clients, -P 1", 50, 1, get_targets, rounds),
            Workload("get-hit-P16", "GET of a written key, 50 clients, -P 16", 50, 16, get_targets, rounds),
            Workload("get-miss-P16", "GET of a missing key, 50 clients, -P 16", 50, 16, get_targets, rounds),
            *[
                Workload(
                    f"setonce-c{c}",
                    f"put-if-absent, fresh keys, {c} client{'s' * (c > 1)}",
                    c,
                    1,
                    write_targets,
                    rounds,
                )
                for c in (1, 16, 64)
            ],
            Workload(
                f"setonce-c{XL_CLIENTS}",
                f"put-if-absent, fresh keys, {XL_CLIENTS} clients",
                XL_CLIENTS,
                1,
                ["respreg"],
                rounds,
            ),
            Workload("contended", "SETONCE, 100 clients racing on 10 fresh keys per round", 100, 1, ["respreg"], 1),
            Workload("etcd-check-perf-s", "etcdctl check perf --load=s", 50, 1, ["etcd"], 1),
            Workload("etcd-check-perf-xl", "etcdctl check perf --load=xl", 1000, 1, ["etcd"], 1),
        ]
        return out

    def measure(self, w: Workload) -> None:
        """Run ``w`` on each of its targets, ``w.rounds`` times, the targets in turn and in the
        opposite order every other round (A B, B A, A B: a machine whose speed drifts during
        the run moves both sides of a ratio alike); then one row per target (merge_rounds)."""
        done: dict[str, list[Row]] = {t: [] for t in w.targets}
        for rnd in range(w.rounds):
            for target in w.targets if rnd % 2 == 0 else w.targets[::-1]:
                row = Row(w.name, w.title, target, w.clients, w.pipeline)
                if target in self.start_errors:
                    if rnd == 0:
                        row.status = self.start_errors[target]
                        done[target].append(row)
                    continue
                if w.rounds > 1:
                    print(f"  round {rnd + 1} of {w.rounds}:", end="", flush=True)
                done[target].append(self.attempt(row, partial(self.run_one, row, rnd)))
        for target in w.targets:
            self.rows.append(merge_rounds(done[target]))

    def run_one(self, row: Row, rnd: int) -> None:
        """One round of one workload on one target."""
        group, where = self.systems[row.target]
        if row.target == "respreg":
            ports: list[int] = where
            node1 = ports[0]
            if row.workload.startswith("get-hit"):
                reply = resp_command(node1, "SETONCE", "bench:hit", "v")
                if reply not in (b"+OK\r\n", b"$-1\r\n"):
                    raise RuntimeError(f"SETONCE bench:hit answered {reply!r}")
                if resp_command(node1, "GET", "bench:hit") != b"$1\r\nv\r\n":
                    raise RuntimeError("GET bench:hit did not return the written value")
                row.note = "node 1; key written through node 1 first"
                self.bench_row(row, group, node1, ["GET", "bench:hit"], False, "get", ports)
            elif row.workload.startswith("get-miss"):
                row.note = "node 1; same key on every request"
                self.bench_row(row, group, node1, ["GET", "bench:missing"], False, "get", ports)
            elif row.workload.startswith("setonce"):
                row.note = "SETONCE k v to node 1"
                if row.clients == XL_CLIENTS:
                    row.note += "; as many clients as `etcdctl check perf --load=xl`"
                cmd = ["SETONCE", f"{row.workload}:r{rnd}:key:__rand_int__", "v"]
                self.bench_row(row, group, node1, cmd, True, "write", ports)
            else:
                self.contended(row, group, ports)
        elif row.target in ("redis-mem", "redis-durable"):
            port: int = where
            if row.target == "redis-durable":
                row.note = "SET k v NX (AOF, appendfsync always)"
                cmd = ["SET", f"{row.workload}:r{rnd}:key:__rand_int__", "v", "NX"]
                self.bench_row(row, group, port, cmd, True, "write")
            elif row.workload.startswith("get-hit"):
                if resp_command(port, "SET", "bench:hit", "v") != b"+OK\r\n":
                    raise RuntimeError("could not write bench:hit")
                self.bench_row(row, group, port, ["GET", "bench:hit"], False, "get")
            else:
                self.bench_row(row, group, port, ["GET", "bench:missing"], False, "get")
        elif row.workload.startswith("setonce"):
            self.etcd_txn(row, group, where)
        elif self.plan.quick and row.workload == "etcd-check-perf-s":
            row.status = "skipped (--quick: it always runs 60 s)"
        elif row.workload == "etcd-check-perf-s" or self.plan.check_perf_xl:
            self.check_perf(row, group, where)
        else:
            row.status = "skipped" + (" (--quick)" if self.plan.quick else " (--no-xl)")

    def contended(self, row: Row, group: ServerGroup, ports: list[int]) -> None:
        argv = [
            sys.executable, str(HERE / "contended.py"),
            "--ports", ",".join(map(str, ports)),
            "--clients", "100", "--keys", "10",
            "--rounds", str(self.plan.contended_rounds),
            "--max-seconds", str(self.plan.contended_seconds),
        ]  # fmt: skip
        cpu0 = group.cpu_seconds()
        m = run_measured("contended SETONCE on respreg", argv, self.commands, self.plan.contended_seconds + 120)
        cpu1 = group.cpu_seconds()
        row.command = self.commands.entries[-1][1]
        try:
            result: dict[str, Any] = json.loads(m.stdout)
        except ValueError as exc:
            raise RuntimeError(f"contended.py gave no result (exit {m.returncode}): {m.stderr[-800:]}") from exc
        self.details["contended"] = result
        row.requests = result["setonce_ok"] + result["setonce_nil"] + sum(result["errors"].values())
        row.throughput = result["throughput"]
        row.p50_ms = result["p50_ms"]
        row.p99_ms = result["p99_ms"]
        row.wall_s = m.wall_s
        row.client_cpu_pct = m.client_cpu_pct
        fill_server_cpu(row, cpu1 - cpu0, m.wall_s, row.requests)
        row.note = (
            f"{result['rounds_settled']}/{result['rounds_run']} rounds settled, "
            f"{result['keys_settled']}/{result['keys_checked']} keys with one value on every node"
        )
        if result["errors"]:
            row.note += f"; error replies {result['errors']}"
        if result["violations"]:
            row.status = f"CHECK FAILED: {len(result['violations'])} violation(s), first: {result['violations'][0]}"
        elif not result["all_settled"]:
            row.status = "CHECK FAILED: not every key settled to one value"
        group.check_alive()

    def etcd_txn(self, row: Row, group: ServerGroup, urls: list[str]) -> None:
        count = max(50, row.clients * 3) if self.plan.quick else 1_000_000
        argv = [
            sys.executable, str(HERE / "etcd_txn.py"),
            "--endpoints", ",".join(urls),
            "--clients", str(row.clients),
            "--count", str(count),
            "--max-seconds", str(self.plan.etcd_seconds),
        ]  # fmt: skip
        cpu0 = group.cpu_seconds()
        purpose = f"{row.workload} on etcd (txn put-if-absent)"
        m = run_measured(purpose, argv, self.commands, self.plan.etcd_seconds + 90)
        cpu1 = group.cpu_seconds()
        row.command = self.commands.entries[-1][1]
        try:
            result: dict[str, Any] = json.loads(m.stdout)
        except ValueError as exc:
            raise RuntimeError(f"etcd_txn.py gave no result (exit {m.returncode}): {m.stderr[-800:]}") from exc
        self.details[f"etcd_txn_c{row.clients}"] = result
        row.requests = result["completed"]
        row.throughput = result["throughput"]
        row.p50_ms = result["p50_ms"]
        row.p99_ms = result["p99_ms"]
        row.wall_s = m.wall_s
        row.client_cpu_pct = result["generator_cpu_pct"]
        fill_server_cpu(row, cpu1 - cpu0, m.wall_s, row.requests)
        row.note = "txn create_revision==0 -> put, JSON gateway, clients round-robin over 3 members"
        if result["errors"]:
            raise RuntimeError(f"{result['errors']} failed requests, first: {result['first_error']}")
        if result["compare_failed"]:
            row.note += f"; {result['compare_failed']} compares failed (key existed)"
        group.check_alive()

    def check_perf(self, row: Row, group: ServerGroup, urls: list[str]) -> None:
        load = row.workload.rsplit("-", 1)[1]
        argv = ["etcdctl", "--endpoints", ",".join(urls), "check", "perf", f"--load={load}"]
        limit = 150.0
        cpu0 = group.cpu_seconds()
        m = run_measured(f"etcdctl check perf --load={load}", argv, self.commands, limit, env={"ETCDCTL_API": "3"})
        cpu1 = group.cpu_seconds()
        row.command = self.commands.entries[-1][1]
        row.wall_s = m.wall_s
        row.client_cpu_pct = m.client_cpu_pct
        text = m.stdout + m.stderr
        parsed = parse_check_perf(text)
        self.details[f"etcd_check_perf_{load}"] = {**parsed, "exit": m.returncode, "tail": text[-1500:]}
        if m.timed_out:
            row.status = f"stopped after {limit:.0f} s (did not finish)"
            return
        if "throughput" not in parsed:
            raise RuntimeError(f"etcdctl check perf printed no figures (exit {m.returncode}): {text[-500:]}")
        row.throughput = parsed["throughput"]
        row.requests = int(row.throughput * 60)
        fill_server_cpu(row, cpu1 - cpu0, m.wall_s, max(row.requests, 1))
        verdict = parsed.get("verdict", "?")
        row.note = (
            f"etcdctl verdict {verdict}; target rate {CHECK_PERF_TARGET.get(load, '?')} writes/s for 60 s; "
            f"slowest {parsed.get('slowest_s', float('nan')):.3f} s, "
            f"stddev {parsed.get('stddev_s', float('nan')):.3f} s"
        )
        group.check_alive()

    # ---- the whole run -----------------------------------------------------------------------

    def run(self) -> None:
        try:
            self.start_systems()
            for w in self.workloads():
                print(f"{w.name} on {', '.join(w.targets)}:", flush=True)
                self.measure(w)
        finally:
            self.stop_systems()
        compute_ratios(self.rows)


def merge_rounds(rows: list[Row]) -> Row:
    """One row for the rounds of one workload on one target: the round with the median
    throughput (the lower middle one of an even number) stands for them all, and every round's
    figures go to ``extra["rounds"]`` and the note. A failed round fails the row (its status)."""
    if len(rows) == 1:
        return rows[0]
    failed = [r for r in rows if r.status != "ok"]
    measured = sorted((r for r in rows if r.throughput is not None), key=lambda r: r.throughput or 0.0)
    row = replace(failed[0] if failed or not measured else measured[(len(measured) - 1) // 2])
    row.extra = {
        **row.extra,
        "rounds": [
            {
                "throughput": r.throughput,
                "p50_ms": r.p50_ms,
                "p99_ms": r.p99_ms,
                "requests": r.requests,
                "server_cpu_us_per_op": r.server_cpu_us_per_op,
                "client_cpu_pct": r.client_cpu_pct,
                "load_avg_1m": r.load_avg_1m,
                "status": r.status,
                "command": r.command,
            }
            for r in rows
        ],
    }
    if not failed:
        each = " / ".join(f"{r.throughput:,.0f}" for r in rows if r.throughput is not None)
        row.note = (row.note + "; " if row.note else "") + f"median of {len(rows)} rounds ({each} ops/s)"
    return row


CHECK_PERF_TARGET = {"s": 150, "m": 1000, "l": 8000, "xl": 15000}


def parse_benchmark_csv(text: str) -> dict[str, float]:
    """The one data row of `redis-benchmark --csv` as floats (rps, p50_latency_ms, p99_latency_ms, ...)."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    rows = list(csv.reader(io.StringIO("\n".join(lines))))
    if len(rows) < 2 or rows[0][:2] != ["test", "rps"]:
        raise RuntimeError(f"unexpected redis-benchmark output: {text[-500:]!r}")
    header, data = rows[0], rows[-1]
    out: dict[str, float] = {}
    for name, value in zip(header[1:], data[1:], strict=False):
        try:
            out[name] = float(value)
        except ValueError:
            continue
    if "rps" not in out:
        raise RuntimeError(f"no rps in redis-benchmark output: {text[-500:]!r}")
    return out


def parse_check_perf(text: str) -> dict[str, Any]:
    """Figures and verdict lines of `etcdctl check perf` (worded differently on PASS and FAIL)."""
    out: dict[str, Any] = {}
    if m := re.search(r"Throughput (?:is|too low:) ([\d.]+) writes/s", text):
        out["throughput"] = float(m.group(1))
    if m := re.search(r"Slowest request took(?: too long:)? ([\d.]+)s", text):
        out["slowest_s"] = float(m.group(1))
    if m := re.search(r"Stddev (?:is|too high:) ([\d.]+)s", text):
        out["stddev_s"] = float(m.group(1))
    verdicts = re.findall(r"^(PASS|FAIL)\s*$", text, flags=re.M)
    if verdicts:
        out["verdict"] = verdicts[-1]
    out["checks"] = [
        ln.strip() for ln in re.findall(r"^(?:PASS|FAIL|WARN|Throughput|Slowest|Stddev)[^\n]*", text, flags=re.M)
    ]
    return out


def respreg_stats(ports: list[int]) -> dict[str, int]:
    """INFO paxos counters summed over the nodes."""
    total: dict[str, int] = {}
    for p in ports:
        raw = resp_command(p, "INFO", "paxos").decode(errors="replace")
        for line in raw.splitlines():
            name, _, value = line.partition(":")
            if value.strip().lstrip("-").isdigit():
                total[name] = total.get(name, 0) + int(value)
    return total


def fill_server_cpu(row: Row, cpu_s: float, wall_s: float, ops: int) -> None:
    if wall_s > 0:
        row.server_cpu_pct = 100.0 * cpu_s / wall_s
    if ops > 0:
        row.server_cpu_us_per_op = 1e6 * cpu_s / ops


#: Clients of `etcdctl check perf --load=xl`, and of the respreg row compared with it.
XL_CLIENTS = 1000
#: respreg workloads also compared with an anchor's workload of another name: SETONCE at the
#: concurrency of check perf xl against etcd's plain puts there (etcd has no put-if-absent row
#: at 1000 clients: its load generator, in Python, could not drive that many).
CROSS_ANCHORS = {f"setonce-c{XL_CLIENTS}": ["etcd-check-perf-xl"]}


def compute_ratios(rows: list[Row]) -> None:
    """respreg throughput divided by each anchor's on the same workload (and see CROSS_ANCHORS)."""
    by_workload: dict[str, list[Row]] = {}
    for r in rows:
        by_workload.setdefault(r.workload, []).append(r)
    for r in rows:
        if r.target != "respreg" or r.throughput is None:
            continue
        parts = []
        for a in by_workload.get(r.workload, []):
            if a.target != "respreg" and a.throughput:
                parts.append(f"{r.throughput / a.throughput:.3g} vs {a.target}")
        for other in CROSS_ANCHORS.get(r.workload, []):
            for a in by_workload.get(other, []):
                if a.throughput and a.status == "ok":
                    parts.append(f"{r.throughput / a.throughput:.3g} vs {a.target} {other.removeprefix('etcd-')}")
        r.ratio = "; ".join(parts)


def versions() -> dict[str, str]:
    return {
        "respreg": f"{tool_version([sys.executable, '-m', 'respreg', '--version'])} ({git_describe()})",
        "redis-server": tool_version(["redis-server", "--version"]),
        "redis-benchmark": tool_version(["redis-benchmark", "--version"]),
        "etcd": tool_version(["etcd", "--version"]),
        "etcdctl": tool_version(["etcdctl", "version"]),
        "python": sys.version.split()[0] + f" ({sys.executable})",
        "aiohttp": _dist_version("aiohttp"),
    }


def git_describe() -> str:
    """The commit the measured respreg came from, and whether respreg/ differed from it (read-only git)."""
    repo = HERE.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(repo), "diff-index", "--name-only", "HEAD", "--", "respreg"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return "git commit unknown"
    if not head:
        return "git commit unknown"
    return f"git {head}" + (f", with uncommitted changes to {len(changed)} file(s) in respreg/" if changed else "")


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def finite(o: object) -> object:
    """The same structure with NaN and infinities replaced by None (JSON has neither)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: finite(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [finite(v) for v in o]
    return o


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny runs: checks the harness, measures nothing")
    p.add_argument(
        "--out", type=Path, default=HERE / "RESULTS.md", help="markdown report (default: benchmarks/RESULTS.md)"
    )
    p.add_argument("--json", type=Path, default=None, help="JSON results (default: results.json beside --out)")
    p.add_argument("--skip-install", action="store_true", help="never install; fail if something is missing")
    p.add_argument("--no-xl", action="store_true", help="skip etcdctl check perf --load=xl")
    p.add_argument("--keep-temp", action="store_true", help="keep the temp dir (data dirs and server logs)")
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="times each workload runs on each target, alternating with its anchors (default 3; 1 with --quick)",
    )
    args = p.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        p.error("--rounds must be at least 1")
    json_path: Path = args.json or args.out.parent / "results.json"
    # redis-benchmark with XL_CLIENTS connections needs that many descriptors (it inherits this).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * XL_CLIENTS if hard == resource.RLIM_INFINITY else min(4 * XL_CLIENTS, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    installs: list[str] = []
    if args.skip_install:
        missing = install.missing_binaries() + install.missing_modules()
        if missing:
            print(f"missing and --skip-install given: {', '.join(missing)}", file=sys.stderr)
            return 2
    else:
        install.ensure(installs)

    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="respreg-bench-"))
    load_before = _loadavg()
    if float(load_before.split()[0]) > 1.0:
        print(f"note: the machine is already busy (load average {load_before}); figures will be lower", flush=True)
    create_cost = _wait_for_fast_creates(root, args.quick)
    runner = Runner(args, root)
    print(f"benchmarking in {root} ({'quick' if args.quick else 'full'} run)", flush=True)
    try:
        runner.run()
        meta = {
            "started_utc": started.isoformat(timespec="seconds"),
            "duration_s": round(time.monotonic() - t0, 1),
            "quick": args.quick,
            "argv": [sys.executable, *sys.argv],
            "installed_by_this_run": installs,
            "versions": versions(),
            "machine": {
                **machine_facts(root),
                "load_average_before": load_before,
                "file_creation_before": create_cost,
                "load_average_after": _loadavg(),
            },
        }
    finally:
        if args.keep_temp:
            print(f"kept {root}")
        else:
            t = time.monotonic()
            shutil.rmtree(root, ignore_errors=True)
            print(f"removed {root} in {time.monotonic() - t:.1f} s", flush=True)
    meta["duration_s"] = round(time.monotonic() - t0, 1)

    results: dict[str, Any] = {
        "meta": meta,
        "rows": [asdict(r) for r in runner.rows],
        "details": runner.details,
        "commands": [{"purpose": p_, "command": c} for p_, c in runner.commands.entries],
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    results = {k: finite(v) for k, v in results.items()}
    json_path.write_text(json.dumps(results, indent=2, default=_json_default, allow_nan=False) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report.render(results) + _scale_section(args.out))
    print(f"wrote {args.out} and {json_path} in {meta['duration_s']:.0f} s")
    bad = [r for r in runner.rows if r.status != "ok" and not r.status.startswith("skipped")]
    for r in bad:
        print(f"WARNING: {r.workload} on {r.target}: {r.status}", file=sys.stderr)
    return 3 if bad else 0


#: A new empty file on this machine's file system costs 13-30 µs, but hundreds of µs for
#: minutes after many files near it were deleted (benchmarks/PROFILE.md, *Inode allocation
#: after deletions*), such as the data directories the run before this one removed. respreg
#: creates a file per acceptor state and would pay it in every write; etcd, which does not,
#: would not. A run waits (up to CREATE_WAIT_S) until creating files in its temp dir costs
#: less than SLOW_CREATE_US, and reports what it found.
SLOW_CREATE_US = 100.0
CREATE_WAIT_S = 300.0


def _create_cost_us(directory: Path, count: int = 100) -> float:
    """µs per new unnamed file (O_TMPFILE; a named one where that is missing) in ``directory``."""
    tmpfile = getattr(os, "O_TMPFILE", 0)
    fds: list[int] = []
    t = time.perf_counter()
    try:
        for i in range(count):
            if tmpfile:
                fds.append(os.open(directory, os.O_WRONLY | tmpfile | os.O_CLOEXEC, 0o644))
            else:
                path = directory / f".create-probe-{i}"
                fds.append(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
                path.unlink()
        return (time.perf_counter() - t) / count * 1e6
    finally:
        for fd in fds:
            os.close(fd)


def _wait_for_fast_creates(directory: Path, quick: bool) -> str:
    """Wait until files are cheap to create in ``directory`` again; the machine fact to report."""
    t0 = time.monotonic()
    cost = _create_cost_us(directory)
    while not quick and cost > SLOW_CREATE_US and time.monotonic() - t0 < CREATE_WAIT_S:
        print(f"note: creating a file costs {cost:.0f} µs here now (recent deletions?); waiting", flush=True)
        time.sleep(20)
        cost = _create_cost_us(directory)
    waited = time.monotonic() - t0
    return f"{cost:.0f} µs per new file in the temp dir at the start" + (
        f" (after waiting {waited:.0f} s for it to fall below {SLOW_CREATE_US:.0f})" if waited >= 1 else ""
    )


def _scale_section(path: Path) -> str:
    """The section benchmarks/scale.py put at the end of ``path`` (its own run, kept), or ""."""
    section = split_scale_section(path.read_text() if path.exists() else "")[1]
    return "\n" + section if section else ""


def _loadavg() -> str:
    """1, 5 and 15 minute load averages (other work on the machine skews every figure)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "0 0 0"


def _json_default(o: object) -> object:
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


if __name__ == "__main__":
    sys.exit(main())

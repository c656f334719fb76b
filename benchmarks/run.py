"""Benchmark respreg against redis-server and etcd, all started here on loopback, in one run.

    .venv/bin/python benchmarks/run.py [--quick] [--out benchmarks/RESULTS.md] [--json PATH] [--skip-install]

Installs what is missing (Debian: redis-server, redis-tools, etcd-server, etcd-client via apt-get;
PyPI: aiohttp into this interpreter) unless --skip-install, then runs, one system at a time:
redis-server in memory, redis-server with an fsynced AOF, a 3-node respreg cluster and a 3-node
etcd cluster, each in a fresh temp dir on free loopback ports, and writes a markdown report and a
JSON file. --quick makes every run tiny (a smoke test of the harness, not a measurement).

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
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import install
import report
from harness import HOST, CommandLog, Measured, ServerGroup, machine_facts, resp_command, run_measured, tool_version
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
class Plan:
    """How big each run is."""

    quick: bool
    get_target_s: float = 4.0
    write_target_s: float = 8.0
    etcd_seconds: float = 8.0
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
            self.plan.contended_rounds = 3
            self.plan.contended_seconds = 20
            self.plan.etcd_seconds = 10
            self.plan.check_perf_xl = False
        if args.no_xl:
            self.plan.check_perf_xl = False
        self.commands = CommandLog()
        self.rows: list[Row] = []
        self.details: dict[str, Any] = {}

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
            pilot_n = max(10_000, row.clients * row.pipeline * 10) if kind == "get" else max(200, row.clients * 4)
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

    def attempt(self, row: Row, fn: Callable[[], None]) -> None:
        """Run one workload; a failure becomes the row's status and the run goes on."""
        print(f"  {row.workload} on {row.target} ...", end="", flush=True)
        t = time.monotonic()
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - one failed workload must not lose the others
            row.status = f"error: {exc}".splitlines()[0][:300]
            row.extra["traceback"] = traceback.format_exc()[-3000:]
        row.load_avg_1m = float(_loadavg().split()[0])
        self.rows.append(row)
        shown = f"{row.throughput:,.0f} ops/s" if row.throughput is not None else row.status
        print(f" {shown} ({time.monotonic() - t:.1f}s)", flush=True)

    def phase(self, label: str, rows: list[Row], start: Callable[[], None], stop: Callable[[], None]) -> bool:
        """Start a system; if it does not start, every row of the phase records why."""
        print(f"{label}:", flush=True)
        try:
            start()
        except Exception as exc:  # noqa: BLE001 - report the failure in every row of this system
            stop()
            for row in rows:
                row.status = f"error: {label} did not start: {exc}".splitlines()[0][:300]
                self.rows.append(row)
            print(f"  could not start: {exc}", flush=True)
            return False
        return True

    # ---- phases ------------------------------------------------------------------------------

    def run_redis(self, durable: bool) -> None:
        label = "redis-durable" if durable else "redis-mem"
        holder: dict[str, tuple[ServerGroup, int]] = {}

        def start() -> None:
            holder["s"] = start_redis(self.root, durable, self.commands)

        def stop() -> None:
            if "s" in holder:
                holder["s"][0].stop()

        rows = self._redis_rows(label, durable)
        if not self.phase(label, rows, start, stop):
            return
        group, port = holder["s"]
        try:
            for row, fn in zip(rows, self._redis_fns(rows, group, port, durable), strict=True):
                self.attempt(row, fn)
        finally:
            stop()

    def _redis_rows(self, label: str, durable: bool) -> list[Row]:
        if durable:
            return [
                Row(f"setonce-c{c}", f"put-if-absent, fresh keys, {c} client{'s' * (c > 1)}", label, c)
                for c in (1, 16, 64)
            ]
        return [
            Row("get-hit-P1", "GET of a written key, 50 clients, -P 1", label, 50, 1),
            Row("get-hit-P16", "GET of a written key, 50 clients, -P 16", label, 50, 16),
            Row("get-miss-P16", "GET of a missing key, 50 clients, -P 16", label, 50, 16),
        ]

    def _redis_fns(self, rows: list[Row], group: ServerGroup, port: int, durable: bool) -> list[Callable[[], None]]:
        fns: list[Callable[[], None]] = []
        for row in rows:
            if durable:

                def fn(row: Row = row) -> None:
                    row.note = "SET k v NX (AOF, appendfsync always)"
                    cmd = ["SET", f"{row.workload}:key:__rand_int__", "v", "NX"]
                    self.bench_row(row, group, port, cmd, True, "write")

            elif row.workload.startswith("get-hit"):

                def fn(row: Row = row) -> None:
                    if resp_command(port, "SET", "bench:hit", "v") != b"+OK\r\n":
                        raise RuntimeError("could not write bench:hit")
                    self.bench_row(row, group, port, ["GET", "bench:hit"], False, "get")

            else:

                def fn(row: Row = row) -> None:
                    self.bench_row(row, group, port, ["GET", "bench:missing"], False, "get")

            fns.append(fn)
        return fns

    def run_respreg(self) -> None:
        holder: dict[str, tuple[ServerGroup, list[int]]] = {}

        def start() -> None:
            # A quick run checks the harness only: a generous deadline keeps a machine busy with
            # other work from turning its unwarmed burst of 1000 writes into -UNCERTAIN replies.
            extra = ["--deadline-ms", "30000"] if self.plan.quick else []
            holder["s"] = start_respreg(self.root, 3, self.commands, extra)

        def stop() -> None:
            if "s" in holder:
                holder["s"][0].stop()

        rows = [
            Row("get-hit-P1", "GET of a written key, 50 clients, -P 1", "respreg", 50, 1),
            Row("get-hit-P16", "GET of a written key, 50 clients, -P 16", "respreg", 50, 16),
            Row("get-miss-P16", "GET of a missing key, 50 clients, -P 16", "respreg", 50, 16),
            *[
                Row(f"setonce-c{c}", f"put-if-absent, fresh keys, {c} client{'s' * (c > 1)}", "respreg", c)
                for c in (1, 16, 64, XL_CLIENTS)
            ],
            Row("contended", "SETONCE, 100 clients racing on 10 fresh keys per round", "respreg", 100),
        ]
        if not self.phase("respreg (3 nodes)", rows, start, stop):
            return
        group, ports = holder["s"]
        node1 = ports[0]
        try:
            for row in rows:
                if row.workload.startswith("get-hit"):

                    def fn(row: Row = row) -> None:
                        reply = resp_command(node1, "SETONCE", "bench:hit", "v")
                        if reply not in (b"+OK\r\n", b"$-1\r\n"):
                            raise RuntimeError(f"SETONCE bench:hit answered {reply!r}")
                        if resp_command(node1, "GET", "bench:hit") != b"$1\r\nv\r\n":
                            raise RuntimeError("GET bench:hit did not return the written value")
                        row.note = "node 1; key written through node 1 first"
                        self.bench_row(row, group, node1, ["GET", "bench:hit"], False, "get", ports)

                elif row.workload.startswith("get-miss"):

                    def fn(row: Row = row) -> None:
                        row.note = "node 1; same key on every request"
                        self.bench_row(row, group, node1, ["GET", "bench:missing"], False, "get", ports)

                elif row.workload.startswith("setonce"):

                    def fn(row: Row = row) -> None:
                        row.note = "SETONCE k v to node 1"
                        if row.clients == XL_CLIENTS:
                            row.note += "; as many clients as `etcdctl check perf --load=xl`"
                        cmd = ["SETONCE", f"{row.workload}:key:__rand_int__", "v"]
                        self.bench_row(row, group, node1, cmd, True, "write", ports)

                else:

                    def fn(row: Row = row) -> None:
                        self.contended(row, group, ports)

                self.attempt(row, fn)
        finally:
            stop()

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

    def run_etcd(self) -> None:
        holder: dict[str, tuple[ServerGroup, list[str]]] = {}

        def start() -> None:
            holder["s"] = start_etcd(self.root, 3, self.commands)

        def stop() -> None:
            if "s" in holder:
                holder["s"][0].stop()

        rows = [
            *[
                Row(f"setonce-c{c}", f"put-if-absent, fresh keys, {c} client{'s' * (c > 1)}", "etcd", c)
                for c in (1, 16, 64)
            ],
            Row("etcd-check-perf-s", "etcdctl check perf --load=s", "etcd", 50),
            Row("etcd-check-perf-xl", "etcdctl check perf --load=xl", "etcd", 1000),
        ]
        if not self.phase("etcd (3 members)", rows, start, stop):
            return
        group, urls = holder["s"]
        self.details["etcd_leader_at_start"] = etcd_leader(urls)
        try:
            for row in rows:
                if row.workload.startswith("setonce"):

                    def fn(row: Row = row) -> None:
                        self.etcd_txn(row, group, urls)

                elif row.workload == "etcd-check-perf-s" or self.plan.check_perf_xl:

                    def fn(row: Row = row) -> None:
                        self.check_perf(row, group, urls)

                else:

                    def fn(row: Row = row) -> None:
                        row.status = "skipped" + (" (--quick)" if self.plan.quick else " (--no-xl)")

                if self.plan.quick and row.workload == "etcd-check-perf-s":

                    def fn(row: Row = row) -> None:
                        row.status = "skipped (--quick: it always runs 60 s)"

                self.attempt(row, fn)
        finally:
            stop()

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
        self.run_redis(durable=False)
        self.run_redis(durable=True)
        self.run_respreg()
        self.run_etcd()
        compute_ratios(self.rows)


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
    args = p.parse_args(argv)
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
    args.out.write_text(report.render(results))
    print(f"wrote {args.out} and {json_path} in {meta['duration_s']:.0f} s")
    bad = [r for r in runner.rows if r.status != "ok" and not r.status.startswith("skipped")]
    for r in bad:
        print(f"WARNING: {r.workload} on {r.target}: {r.status}", file=sys.stderr)
    return 3 if bad else 0


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

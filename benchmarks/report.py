"""Markdown rendering of a benchmark run (the dict that run.py also writes as JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

WORKLOAD_ORDER = [
    "get-hit-P1",
    "get-hit-P16",
    "get-miss-P16",
    "setonce-c1",
    "setonce-c16",
    "setonce-c64",
    "setonce-c1000",
    "contended",
    "etcd-check-perf-s",
    "etcd-check-perf-xl",
]
TARGET_ORDER = ["respreg", "redis-mem", "redis-durable", "etcd"]


def _num(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    f = float(v)
    if f >= 1000:
        return f"{f:,.0f}"
    return f"{f:.{digits}g}"


def _sorted_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def key(r: dict[str, Any]) -> tuple[int, int]:
        w = WORKLOAD_ORDER.index(r["workload"]) if r["workload"] in WORKLOAD_ORDER else len(WORKLOAD_ORDER)
        t = TARGET_ORDER.index(r["target"]) if r["target"] in TARGET_ORDER else len(TARGET_ORDER)
        return w, t

    return sorted(rows, key=key)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(results: dict[str, Any]) -> str:
    meta = results["meta"]
    rows = _sorted_rows(results["rows"])
    details = results.get("details", {})
    out: list[str] = []
    add = out.append
    add("# respreg benchmarks\n")
    add(
        "Reproduce from the repository root with `.venv/bin/python benchmarks/run.py` (a full run takes about"
        " 7 minutes on 2 cores). It installs what is missing first (Debian's `redis-server`, `redis-tools`, "
        "`etcd-server` and `etcd-client` with apt-get, `aiohttp` with pip into the venv) and says so; then it"
        " starts every system itself on free loopback ports in a fresh temp dir (first waiting, up to five"
        " minutes, until creating a file there costs under 100 µs: on ext4 without a journal it costs"
        " several times more for minutes after many files were deleted, such as an earlier run's, which only"
        " respreg, with a file per key, would pay), all of them at once, and "
        "runs each workload on each of its targets in turn, in three rounds, the order reversed every other "
        "round (respreg, anchor; anchor, respreg; respreg, anchor), so that a machine whose speed drifts "
        "during the run moves both sides of a ratio alike. Each row is the round with the median throughput "
        "(its notes list every round's); ratios divide medians. It writes this file and `results.json` "
        "(every figure, counter and command, every round). `--quick` makes every run tiny, one round, to "
        "check the harness (its figures mean nothing); `--out`, `--json`, `--skip-install`, `--no-xl`, "
        "`--keep-temp`, `--rounds` are described by `--help`.\n"
    )
    mode = "quick (tiny runs: not a measurement)" if meta["quick"] else "full"
    add(
        f"This run: {mode}, started {meta['started_utc']}, took {meta['duration_s']:.0f} s, on "
        f"{meta['machine']['nproc']} cores ({meta['machine']['cpu_model']}). Servers and load generators share "
        "those cores, so every figure includes the cost of the client running beside the server. Load average "
        f"(1/5/15 min) before the run: {meta['machine'].get('load_average_before', '?')}, after: "
        f"{meta['machine'].get('load_average_after', '?')} (anything else running skews the figures).\n"
    )
    add("## Results\n")
    add("| workload | target | throughput ops/s | p50 ms | p99 ms | respreg/anchor (throughput) | notes |")
    add("|---|---|---:|---:|---:|---|---|")
    for r in rows:
        note = r["note"] if r["status"] == "ok" else f"**{r['status']}**" + (f"; {r['note']}" if r["note"] else "")
        add(
            f"| {_cell(r['title'])} | {r['target']} | {_num(r['throughput'])} | {_num(r['p50_ms'])} | "
            f"{_num(r['p99_ms'])} | {_cell(r['ratio'])} | {_cell(note)} |"
        )
    add("")
    add("Targets and workloads:\n")
    add(
        "- **respreg**: a 3-node cluster, one `respreg serve` process per node, data dirs in the temp dir. "
        "redis-benchmark talks to node 1 only (any node serves any key)."
    )
    add("- **redis-mem**: `redis-server --save '' --appendonly no` (no persistence).")
    add(
        "- **redis-durable**: `redis-server --appendonly yes --appendfsync always` (every write fsynced before the "
        "reply); one node, no replication: a reference for the cost of one fsync, not a like-for-like system."
    )
    add(
        "- **etcd**: 3 members on loopback with default durability (fsync on; `--unsafe-no-fsync` not used). "
        "Put-if-absent is a v3 txn `create_revision(key) == 0 -> put` through the JSON gRPC gateway, sent by "
        f"`benchmarks/etcd_txn.py` ({_generator(details)}); clients round-robin over the 3 members, for a fixed "
        "duration; its CPU use is in the table below, to show it was not the bottleneck."
    )
    add(
        "- GET and SETONCE / `SET ... NX` rows use `redis-benchmark --csv` (a C client), `-r 100000000` with "
        "`__rand_int__` for fresh keys, each run bounded by `-n` and sized from a short pilot run that also "
        "warms up. With `-P 16` redis-benchmark times each pipelined batch, so p50/p99 are per batch of 16."
    )
    add(
        "- Contended: `benchmarks/contended.py`, 100 clients spread over the 3 nodes race on 10 fresh keys per "
        "round (10 clients per key), all released at once; after each round every key is read on every node."
    )
    add(
        "- The ratio column is respreg's throughput divided by the anchor's on the same workload; SETONCE "
        "at 1000 clients, the concurrency of `etcdctl check perf --load=xl`, is also divided by etcd's "
        "throughput in that check (plain puts, no put-if-absent).\n"
    )

    add("## Contended SETONCE\n")
    c = details.get("contended")
    if c:
        add(
            f"- rounds run {c['rounds_run']} (asked {c['rounds_requested']}), rounds settled {c['rounds_settled']}; "
            f"keys settled to one value on every node: {c['keys_settled']} of {c['keys_checked']}"
        )
        add(
            f"- replies: +OK {c['setonce_ok']}, nil {c['setonce_nil']}, errors {c['errors'] or 'none'}; keys whose "
            f"winner got no +OK: {c['keys_without_ok']}"
        )
        add(
            f"- SETONCE latency p50 {_num(c['p50_ms'])} ms, p99 {_num(c['p99_ms'])} ms, max {_num(c['max_ms'])} ms; "
            f"{_num(c['rounds_per_s'])} rounds/s"
        )
        if c["violations"]:
            add(f"- **{len(c['violations'])} violation(s)** (at most 20 listed):")
            for v in c["violations"]:
                add(f"  - {v}")
        else:
            add("- no violation: every key had one value, on every node, that exactly one client was told it wrote")
    else:
        add("Not run (see the table).")
    add("")

    add("## etcdctl check perf\n")
    found = False
    for load in ("s", "xl"):
        d = details.get(f"etcd_check_perf_{load}")
        if not d:
            continue
        found = True
        checks = "; ".join(d.get("checks", [])) or "no verdict lines"
        add(f"- `--load={load}` (exit {d.get('exit')}): {checks}")
    if not found:
        add("Not run (see the table).")
    add(
        "\n`check perf` offers a fixed write rate (s: 150/s from 50 clients, xl: 15000/s from 1000 clients) for "
        "60 s and passes if the cluster keeps up; its throughput is what it achieved, capped by that rate.\n"
    )

    add("## CPU use during each measured run\n")
    add(
        "Client CPU is the load generator's own CPU time over the run's wall time (100% = one core); server CPU "
        f"is all of the target's processes together (the machine has {meta['machine']['nproc']} cores). The load "
        "average is read when the run ends; the benchmark's own processes account for at most a few units of it, "
        "so much higher values mean other work shared the machine during that run.\n"
    )
    add("| workload | target | requests | wall s | client CPU % | server CPU % | server CPU µs/op | load avg 1 min |")
    add("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["throughput"] is None:
            continue
        add(
            f"| {r['workload']} | {r['target']} | {r['requests']:,} | {r['wall_s']:.1f} | "
            f"{_num(r['client_cpu_pct'])} | {_num(r['server_cpu_pct'])} | {_num(r['server_cpu_us_per_op'])} | "
            f"{_num(r.get('load_avg_1m'))} |"
        )
    add("")

    add("## Where time goes\n")
    profile = Path(__file__).with_name("PROFILE.md")
    add(profile.read_text().strip() + "\n" if profile.is_file() else "(no profile notes: benchmarks/PROFILE.md)\n")

    add("## Versions\n")
    for k, v in meta["versions"].items():
        add(f"- {k}: {v}")
    add("")
    add("## Machine\n")
    for k, v in meta["machine"].items():
        add(f"- {k}: {v}")
    add("")
    add("## Commands run\n")
    if meta.get("installed_by_this_run"):
        add("Installs done by this run:\n")
        add("```")
        out.extend(meta["installed_by_this_run"])
        add("```\n")
    add("In order (temp paths and ports differ on every run):\n")
    add("```")
    add(f"# {' '.join(meta['argv'])}")
    for entry in results["commands"]:
        add(f"# {entry['purpose']}")
        add(entry["command"])
    add("```")
    return "\n".join(out) + "\n"


def _generator(details: dict[str, Any]) -> str:
    for key in ("etcd_txn_c1", "etcd_txn_c16", "etcd_txn_c64"):
        if key in details:
            return str(details[key]["generator"])
    return "aiohttp, one keep-alive connection per client"

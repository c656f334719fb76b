"""Contended SETONCE: many clients racing on a few keys, round after round, then a check.

Each round uses fresh keys (a new prefix per round). All clients are released together; client c
sends `SETONCE <prefix><c % keys> c<c>-r<round>` on its own connection to node c % len(ports), so
the proposers of one key sit on different nodes and duel. When every reply is in, the round is
checked: GET of each key on every node must return one and the same value, that value must be one
of the values proposed for the key, at most one client may have been answered +OK for it, and that
client's value must be the one read back. The run stops after --rounds rounds or --max-seconds.

The client is raw asyncio sockets with hiredis parsing replies (uvloop if available). It prints
one JSON object: rounds settled, SETONCE latency percentiles, outcome counts and any violation.

    python benchmarks/contended.py --ports 7000,7001,7002 --clients 100 --keys 10 --rounds 100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import hiredis

HOST = "127.0.0.1"


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def encode(*args: bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class Conn:
    """One RESP connection; requests are sent one at a time (no pipelining)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = hiredis.Reader()

    @classmethod
    async def open(cls, port: int) -> Conn:
        reader, writer = await asyncio.open_connection(HOST, port)
        return cls(reader, writer)

    async def call(self, *args: bytes) -> object:
        self.writer.write(encode(*args))
        while True:
            reply: object = self.parser.gets()
            if reply is not False:
                return reply
            data = await self.reader.read(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            self.parser.feed(data)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


@dataclass
class Stats:
    latencies_ms: list[float] = field(default_factory=list)
    ok: int = 0
    nil: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    rounds_run: int = 0
    rounds_settled: int = 0
    keys_checked: int = 0
    keys_settled: int = 0
    keys_without_ok: int = 0
    violations: list[str] = field(default_factory=list)
    race_s: float = 0.0


def classify(reply: object) -> str:
    if reply == b"OK":
        return "ok"
    if reply is None:
        return "nil"
    if isinstance(reply, hiredis.ReplyError):
        return str(reply).split(" ", 1)[0] or "ERR"
    return f"unexpected:{reply!r}"[:80]


async def race_one(conn: Conn, key: bytes, value: bytes, go: asyncio.Event) -> tuple[str, float]:
    await go.wait()
    start = time.perf_counter()
    try:
        reply = await conn.call(b"SETONCE", key, value)
    except (OSError, ConnectionError) as exc:
        return f"conn:{type(exc).__name__}", (time.perf_counter() - start) * 1000.0
    return classify(reply), (time.perf_counter() - start) * 1000.0


async def run(args: argparse.Namespace) -> dict[str, Any]:
    ports = [int(p) for p in args.ports.split(",") if p]
    conns = [await Conn.open(ports[c % len(ports)]) for c in range(args.clients)]
    checkers = [await Conn.open(p) for p in ports]
    stats = Stats()
    run_id = f"{os.getpid()}-{time.time_ns()}"
    deadline = time.monotonic() + args.max_seconds
    try:
        for rnd in range(args.rounds):
            if time.monotonic() >= deadline:
                break
            prefix = f"race:{run_id}:{rnd}:".encode()
            go = asyncio.Event()
            keys = [prefix + str(c % args.keys).encode() for c in range(args.clients)]
            values = [f"c{c}-r{rnd}".encode() for c in range(args.clients)]
            tasks = [asyncio.ensure_future(race_one(conns[c], keys[c], values[c], go)) for c in range(args.clients)]
            await asyncio.sleep(0)  # let every client reach the start line
            start = time.perf_counter()
            go.set()
            results = await asyncio.gather(*tasks)
            stats.race_s += time.perf_counter() - start
            stats.rounds_run += 1
            winners: dict[bytes, list[bytes]] = {}
            for c, (outcome, ms) in enumerate(results):
                stats.latencies_ms.append(ms)
                if outcome == "ok":
                    stats.ok += 1
                    winners.setdefault(keys[c], []).append(values[c])
                elif outcome == "nil":
                    stats.nil += 1
                else:
                    stats.errors[outcome] = stats.errors.get(outcome, 0) + 1
            round_ok = True
            for k in range(args.keys):
                key = prefix + str(k).encode()
                proposed = {values[c] for c in range(args.clients) if keys[c] == key}
                reads = [await ch.call(b"GET", key) for ch in checkers]
                stats.keys_checked += 1
                problem = ""
                if any(not isinstance(r, bytes) for r in reads):
                    problem = f"GET gave {reads!r}"
                elif len(set(reads)) != 1:
                    problem = f"nodes disagree: {reads!r}"
                elif reads[0] not in proposed:
                    problem = f"value {reads[0]!r} was never proposed"
                elif len(winners.get(key, [])) > 1:
                    told = b", ".join(winners[key]).decode()
                    problem = f"{len(winners[key])} clients were answered +OK ({told}; value read {reads[0]!r})"
                elif winners.get(key) and winners[key][0] != reads[0]:
                    problem = f"+OK went to {winners[key][0]!r} but the value is {reads[0]!r}"
                elif not winners.get(key):
                    stats.keys_without_ok += 1
                    # Fine only when some client of this key got an error (e.g. -UNCERTAIN): its
                    # value may be the one chosen. Otherwise a write succeeded and nobody heard.
                    if not any(results[c][0] not in ("ok", "nil") for c in range(args.clients) if keys[c] == key):
                        problem = "a value was written but every client was answered nil"
                if problem:
                    round_ok = False
                    if len(stats.violations) < 20:
                        stats.violations.append(f"round {rnd} key {key.decode()}: {problem}")
                else:
                    stats.keys_settled += 1
            if round_ok:
                stats.rounds_settled += 1
    finally:
        for conn in conns + checkers:
            await conn.close()
    lat = sorted(stats.latencies_ms)
    ops = len(lat)
    return {
        "generator": "asyncio sockets + hiredis, one connection per client, clients spread over the nodes",
        "ports": ports,
        "clients": args.clients,
        "keys": args.keys,
        "rounds_requested": args.rounds,
        "rounds_run": stats.rounds_run,
        "rounds_settled": stats.rounds_settled,
        "keys_checked": stats.keys_checked,
        "keys_settled": stats.keys_settled,
        "all_settled": stats.keys_checked > 0 and stats.keys_settled == stats.keys_checked,
        "keys_without_ok": stats.keys_without_ok,
        "setonce_ok": stats.ok,
        "setonce_nil": stats.nil,
        "errors": stats.errors,
        "violations": stats.violations,
        "race_s": stats.race_s,
        "throughput": ops / stats.race_s if stats.race_s > 0 else 0.0,
        "rounds_per_s": stats.rounds_run / stats.race_s if stats.race_s > 0 else 0.0,
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "max_ms": lat[-1] if lat else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ports", required=True, help="comma-separated client ports of the nodes (loopback)")
    p.add_argument("--clients", type=int, default=100, help="racing clients (default 100)")
    p.add_argument("--keys", type=int, default=10, help="keys raced on per round (default 10)")
    p.add_argument("--rounds", type=int, default=100, help="rounds (default 100)")
    p.add_argument("--max-seconds", type=float, default=60.0, help="stop starting rounds after this long (default 60)")
    args = p.parse_args(argv)
    if args.clients < 1 or args.keys < 1 or args.rounds < 1:
        p.error("--clients, --keys and --rounds must be positive")
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    try:
        import uvloop

        result: dict[str, Any] = uvloop.run(run(args))
    except ImportError:
        result = asyncio.run(run(args))
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    result["generator_cpu_s"] = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0 if result["all_settled"] and not result["violations"] else 1


if __name__ == "__main__":
    sys.exit(main())

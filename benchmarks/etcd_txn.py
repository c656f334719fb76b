"""Put-if-absent load on etcd: a v3 txn `create_revision(key) == 0 -> put(key)` on fresh keys.

It talks to etcd's JSON gRPC gateway (`POST /v3/kv/txn`, base64 keys and values) with aiohttp on
uvloop (asyncio's own loop if uvloop is missing). Each client is one coroutine with its own
keep-alive HTTP/1.1 connection, sending its next request when the previous reply arrived; clients
are spread round-robin over the given endpoints. The run stops after --count requests in total
or --max-seconds, whichever comes first, and prints one JSON object: throughput, latency
percentiles, outcome counts and the CPU the generator itself used (to show whether it, rather
than etcd, was the bottleneck).

    python benchmarks/etcd_txn.py --endpoints http://127.0.0.1:2379 --clients 16 --count 5000
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


@dataclass
class Totals:
    remaining: int
    deadline: float
    latencies_ms: list[float] = field(default_factory=list)
    succeeded: int = 0
    compare_failed: int = 0
    errors: int = 0
    first_error: str = ""


def txn_body(key: bytes, value: bytes) -> bytes:
    k = base64.b64encode(key).decode()
    v = base64.b64encode(value).decode()
    compare = {"key": k, "result": "EQUAL", "target": "CREATE", "create_revision": "0"}
    success = {"request_put": {"key": k, "value": v}}
    return json.dumps({"compare": [compare], "success": [success]}, separators=(",", ":")).encode()


async def client(idx: int, endpoint: str, prefix: str, value: bytes, totals: Totals) -> None:
    url = endpoint.rstrip("/") + "/v3/kv/txn"
    connector = aiohttp.TCPConnector(limit=1, force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)
    seq = 0
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        while totals.remaining > 0 and time.monotonic() < totals.deadline:
            totals.remaining -= 1
            seq += 1
            body = txn_body(f"{prefix}{idx}-{seq}".encode(), value)
            start = time.perf_counter()
            try:
                async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
                    raw = await resp.read()
                    status = resp.status
            except (TimeoutError, aiohttp.ClientError) as exc:
                totals.errors += 1
                totals.first_error = totals.first_error or repr(exc)
                continue
            totals.latencies_ms.append((time.perf_counter() - start) * 1000.0)
            if status != 200:
                totals.errors += 1
                totals.first_error = totals.first_error or f"HTTP {status}: {raw[:200]!r}"
                continue
            reply: dict[str, Any] = json.loads(raw)
            if reply.get("succeeded") is True:
                totals.succeeded += 1
            else:
                totals.compare_failed += 1


async def run(args: argparse.Namespace) -> dict[str, Any]:
    endpoints = [e for e in args.endpoints.split(",") if e]
    totals = Totals(remaining=args.count, deadline=time.monotonic() + args.max_seconds)
    value = b"v" * args.value_size
    prefix = f"{args.prefix}{os.getpid()}-{time.time_ns()}/"
    start = time.perf_counter()
    await asyncio.gather(
        *(client(i, endpoints[i % len(endpoints)], prefix, value, totals) for i in range(args.clients))
    )
    elapsed = time.perf_counter() - start
    lat = sorted(totals.latencies_ms)
    done = totals.succeeded + totals.compare_failed
    return {
        "generator": f"aiohttp {aiohttp.__version__} on {_loop_name()}, one keep-alive connection per client",
        "endpoints": endpoints,
        "clients": args.clients,
        "requested": args.count,
        "completed": done,
        "succeeded": totals.succeeded,
        "compare_failed": totals.compare_failed,
        "errors": totals.errors,
        "first_error": totals.first_error,
        "elapsed_s": elapsed,
        "throughput": done / elapsed if elapsed > 0 else 0.0,
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "mean_ms": sum(lat) / len(lat) if lat else float("nan"),
        "max_ms": lat[-1] if lat else float("nan"),
    }


def _loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--endpoints", required=True, help="comma-separated client URLs, e.g. http://127.0.0.1:2379")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--count", type=int, default=10000, help="total requests (default 10000)")
    p.add_argument("--max-seconds", type=float, default=60.0, help="stop after this long (default 60)")
    p.add_argument("--prefix", default="/respreg-bench/txn/", help="key prefix; a unique suffix is added per run")
    p.add_argument("--value-size", type=int, default=1, help="value bytes (default 1)")
    args = p.parse_args(argv)
    if args.clients < 1 or args.count < 1:
        p.error("--clients and --count must be positive")
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    try:
        import uvloop

        result = uvloop.run(run(args))
    except ImportError:
        result = asyncio.run(run(args))
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    result["generator_cpu_s"] = cpu
    result["generator_cpu_pct"] = 100.0 * cpu / result["elapsed_s"] if result["elapsed_s"] > 0 else 0.0
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

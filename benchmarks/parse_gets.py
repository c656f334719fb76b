"""What parsing a pipelined GET costs a node: the request parser alone, no sockets.

    .venv/bin/python benchmarks/parse_gets.py [--rounds 200000] [--pipeline 16] [--key bench:hit]

Feeds ``--pipeline`` GETs of one key per round to a ``RequestParser`` (as one read of a
redis-benchmark ``-P 16`` client would bring them) and prints the time per GET two ways: read
by ``next`` (a list of arguments per command) and by ``next_get`` (the key alone), which is how
a node's client loop reads them. Run with ``RESPREG_PURE_PYTHON=1`` to time the source instead
of the compiled module.
"""

from __future__ import annotations

import argparse
import time

import respreg
from respreg.resp import RequestParser


def per_get_ns(data: bytes, gets: int, rounds: int, use_next_get: bool) -> float:
    p = RequestParser()
    t = time.perf_counter()
    for _ in range(rounds):
        p.feed(data)
        if use_next_get:
            while p.next_get() is not None:
                pass
        else:
            while p.next() is not None:
                pass
    return (time.perf_counter() - t) / rounds / gets * 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200_000)
    ap.add_argument("--pipeline", type=int, default=16)
    ap.add_argument("--key", default="bench:hit")
    args = ap.parse_args()
    key = args.key.encode()
    data = b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key), key) * args.pipeline
    print(f"compiled: {respreg.compiled()}")
    for name, fast in (("next", False), ("next_get", True)):
        print(f"{name}: {per_get_ns(data, args.pipeline, args.rounds, fast):.1f} ns per GET")


if __name__ == "__main__":
    main()

"""Run one simulation seed and print what happened.

    python -m tests.sim.run --seed 17 --nodes 3 -v
    python -m tests.sim.run --seed 17 --nodes 5 --scenario majority-down -v
    python -m tests.sim.run --seeds 0:200 --nodes 3          # sweep, print failing seeds
    python -m tests.sim.run --seeds 0:200 --nodes 3 --scenario amnesia-vote-at-once

``-v`` prints the full event trace (messages, disk writes, crashes, client operations).
"""

from __future__ import annotations

import argparse
import sys
import time

from .scenarios import SCENARIOS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.sim.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", help="a range START:END of seeds to sweep instead of one seed")
    ap.add_argument("--nodes", type=int, default=3, choices=(3, 5))
    ap.add_argument("--scenario", default="standard", choices=sorted(SCENARIOS))
    ap.add_argument("-v", "--verbose", action="store_true", help="print the event trace")
    ap.add_argument("--history", action="store_true", help="print every client operation")
    args = ap.parse_args(argv)
    run = SCENARIOS[args.scenario]
    if args.seeds:
        start, _, end = args.seeds.partition(":")
        failed = 0
        t0 = time.perf_counter()
        for seed in range(int(start), int(end)):
            res = run(seed, args.nodes, False)
            if not res.ok:
                failed += 1
                print(f"seed={seed}: {res.violations[0]}")
        print(f"{failed} failing seeds; {time.perf_counter() - t0:.1f}s")
        return 1 if failed else 0
    res = run(args.seed, args.nodes, args.verbose)
    if args.verbose and res.world.trace is not None:
        print("\n".join(res.world.trace))
    if args.history or args.verbose:
        print("---- history")
        for rec in res.world.history:
            print(rec.describe())
    print("----")
    print(res.summary())
    for note in res.notes:
        print(note)
    if res.ok:
        print("OK")
        return 0
    print(f"{len(res.violations)} violations:")
    for v in res.violations:
        print("  " + v)
    print(res.reproduce())
    return 1


if __name__ == "__main__":
    sys.exit(main())

"""Latency of one durable state write through respreg's group commit, one write at a time.

    .venv/bin/python benchmarks/commit_latency.py [--writes 1000] [--spares 512] [--dir /tmp]

Opens a ``KeyFiles`` store in a fresh temp dir (with ``--spares`` ready-made files, 0 for none),
submits one acceptor state at a time to a ``GroupCommitter`` on a uvloop event loop, and prints
the median time from submission to the completion callback, and the median time spent inside
``KeyFiles.write_many`` (the file system calls: write, fsync, rename, directory fsync).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import uvloop

from respreg.core.types import AcceptorState, Ballot, Proposal
from respreg.storage import GroupCommitter, KeyFiles


class _TimedKeyFiles(KeyFiles):
    """KeyFiles that records how long each batch spends in the file system."""

    def __init__(self, root: Path, spares: int) -> None:
        super().__init__(root, spares=spares)
        self.batch_s: list[float] = []

    def write_many(self, items: Sequence[tuple[bytes, AcceptorState]]) -> None:
        t = time.perf_counter()
        super().write_many(items)
        self.batch_s.append(time.perf_counter() - t)


async def _measure(files: _TimedKeyFiles, writes: int) -> list[float]:
    loop = asyncio.get_running_loop()
    committer = GroupCommitter(files, loop)
    state = AcceptorState(Ballot(0, 1, 1), Ballot(0, 1, 1), Proposal(b"pid", b"value"))
    latencies = []
    for i in range(writes):
        done: asyncio.Future[BaseException | None] = loop.create_future()
        t = time.perf_counter()
        committer.submit(b"commit-latency:%d" % i, state, done.set_result)
        error = await done
        if error is not None:
            raise error
        latencies.append(time.perf_counter() - t)
    await committer.close()
    return latencies


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--writes", type=int, default=1000)
    p.add_argument("--spares", type=int, default=512, help="ready-made files kept (0: none)")
    p.add_argument("--dir", default=None, help="parent of the temp dir (default: the system's)")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="respreg-commit-", dir=args.dir))
    files = _TimedKeyFiles(root / "keys", args.spares)
    try:
        for _ in range(500):  # let the spare files be made first (a bound, not a timing)
            if files.spares_ready() >= args.spares:
                break
            time.sleep(0.01)
        latencies = uvloop.run(_measure(files, args.writes))
    finally:
        files.close()
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"spares={args.spares} writes={args.writes}: submission to completion p50 "
        f"{1e3 * statistics.median(latencies):.3f} ms, inside write_many p50 "
        f"{1e3 * statistics.median(files.batch_s):.3f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

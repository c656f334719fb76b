"""How a batch of new key files is put in place: named spares renamed out of a spare directory,
or unnamed (O_TMPFILE) files linked onto their names.

The same steps as a node's syncfs batch (docs/design.md): make ``batch`` empty files (a
background thread's work in a node, counted here), write a small state into each, one syncfs,
give each its key's name in one of 256 directories, a second syncfs. Prints the CPU and wall
time per file. Run several at once (``--processes 3``) to see three nodes on one file system.

    .venv/bin/python benchmarks/spare_files.py --dir /var/tmp/spares --files 6400 --processes 3

Each run uses a new directory under ``--dir`` and deletes nothing (on ext4 without a journal,
creating files right after deleting many is slower for a while).
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import time
from pathlib import Path

from respreg import storage

MODES = ("named", "unnamed")


def run(mode: str, root: str, files: int, batch: int) -> tuple[float, float]:
    """Write ``files`` files in ``mode``; return (CPU µs, wall µs) per file."""
    sync = storage._syncfs
    assert sync is not None, "needs syncfs (Linux 5.8 or later)"
    keys = Path(root) / "keys"
    spare_dir = keys / ".spare"
    spare_dir.mkdir(parents=True)
    for i in range(256):
        (keys / f"{i:02x}").mkdir()
    link = storage._unnamed_file_linker(str(spare_dir)) if mode == "unnamed" else None
    if mode == "unnamed" and link is None:
        raise SystemExit("this file system or kernel has no O_TMPFILE file that linkat can name")
    names_fd = os.open(keys, os.O_RDONLY | os.O_DIRECTORY)
    data = b"s" * 120
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for b in range(files // batch):
        made: list[tuple[int, str]] = []
        for j in range(batch):
            if link is None:
                name = f"{spare_dir}/{os.getpid()}-{b}-{j}.spare"
                made.append((storage._create(name), name))
            else:
                made.append((storage._create_unnamed(str(spare_dir)), ""))
        for fd, _ in made:
            storage._write_all(fd, data)
        sync(made[0][0])
        for j, (fd, name) in enumerate(made):
            digest = hashlib.blake2b(b"%d-%d-%d" % (os.getpid(), b, j), digest_size=16).hexdigest()
            final = f"{keys}/{digest[:2]}/{digest}"
            if link is None:
                os.close(fd)
                os.replace(name, final)
            else:
                link(fd, final)
                os.close(fd)
        sync(names_fd)
    done = files // batch * batch
    os.close(names_fd)
    return (time.process_time() - cpu0) / done * 1e6, (time.perf_counter() - wall0) / done * 1e6


def _worker(args: tuple[str, str, int, int]) -> tuple[float, float]:
    return run(*args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, help="where to make the files (the file system measured)")
    parser.add_argument("--files", type=int, default=6400, help="files per process and mode")
    parser.add_argument("--batch", type=int, default=64, help="files per batch (one pair of syncs)")
    parser.add_argument("--processes", type=int, default=1, help="processes writing at once")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both modes, alternating")
    args = parser.parse_args()
    base = Path(args.dir) / f"run-{os.getpid()}"
    for r in range(args.rounds):
        for mode in MODES:
            jobs = [(mode, str(base / f"{r}-{mode}-{p}"), args.files, args.batch) for p in range(args.processes)]
            with multiprocessing.Pool(args.processes) as pool:
                results = pool.map(_worker, jobs)
            cpu = sum(c for c, _ in results) / len(results)
            wall = sum(w for _, w in results) / len(results)
            print(f"round {r + 1} {mode:8s} cpu {cpu:6.1f} µs/file  wall {wall:6.1f} µs/file", flush=True)


if __name__ == "__main__":
    main()

"""Disk faults for the chaos suite: fsync failing with EIO, and full data directories.

fsync faults use the LD_PRELOAD library of the disk-fault tests (``tests/fault_shim/eio.c``),
compiled once per run with gcc into a temporary directory. Every node runs with it from its
first start, each with its own two trigger files (outside its data directory) and
``RESPREG_FAIL_FSYNC_PATH`` set to its data directory: while ``node<i>.fsync-eio`` exists, every
fsync of a file or directory under node i's data directory fails with EIO (node.meta included,
so the node cannot start then); while ``node<i>.fsync-eio-dirs`` exists, only directory fsyncs
fail (a state file is then renamed into place but its directory is not made durable, the case
where respreg stops voting until it is restarted). Creating a trigger breaks the disk, removing
it repairs it.

Full disks: each node's data directory is a subdirectory of its own small tmpfs (root only),
``<root>/disk<i>/data``; the fault fills the tmpfs with ``<root>/disk<i>/filler`` until not one
page is left, and deleting the filler frees it. Every mount is unmounted by :meth:`Tmpfs.close` (lazily
if a process still holds it), and nothing else is ever unmounted.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from tests.chaos.cluster import ChaosCluster

SHIM_SOURCE = Path(__file__).resolve().parents[1] / "fault_shim" / "eio.c"


def tmpfs_size_mb(duration_s: float) -> int:
    """A tmpfs size (MiB) that holds every key a run writes, with room to spare.

    A key's state is one small file, one 4 KiB page on tmpfs (directories take none). 16 clients
    on a 2-core machine created about 260 new keys a second under every fault (1 MiB/s: 46,000
    keys, 175 MiB per node in 180 s) and up to 700 a second (2.7 MiB/s) under disk faults alone;
    so: 3 MiB per second of faults plus a minute of warm-up, recovery and final reads, plus 128
    MiB, rounded up to 64 MiB (896 MiB for 180 s of faults). The memory is only used as keys are
    written, and by the filler while a disk is full (filling 1 GiB takes about 0.6 s)."""
    return int(math.ceil((128 + 3 * (max(0.0, duration_s) + 60)) / 64) * 64)


def shim_unavailable() -> str | None:
    """Why the fsync faults cannot run here, or None when they can."""
    if shutil.which("gcc") is None:
        return "fsync faults need gcc to build the LD_PRELOAD library (apt-get install gcc)"
    if not SHIM_SOURCE.exists():
        return f"fsync faults need {SHIM_SOURCE}"
    return None


def build_shim(out_dir: Path) -> Path:
    """Compile the fault library into ``out_dir``; raises RuntimeError with gcc's message."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError("gcc is not installed")
    out = out_dir / "eio.so"
    try:
        r = subprocess.run(
            [gcc, "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(SHIM_SOURCE), "-ldl"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"gcc failed: {exc}") from exc
    if r.returncode != 0:
        raise RuntimeError(f"gcc failed ({r.returncode}): {r.stderr.strip()[:2000]}")
    return out


def _mount(path: Path, size_mb: int) -> str | None:
    """Mount a tmpfs of ``size_mb`` MiB on ``path``; the error text, or None on success."""
    try:
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return None if r.returncode == 0 else (r.stderr.strip() or f"mount exited with {r.returncode}")


def _umount(path: Path) -> None:
    """Unmount ``path``; lazily if it is still busy. Raises RuntimeError if both fail."""
    r = subprocess.run(["umount", str(path)], capture_output=True, text=True, timeout=30)
    if r.returncode == 0:
        return
    lazy = subprocess.run(["umount", "-l", str(path)], capture_output=True, text=True, timeout=30)
    if lazy.returncode != 0:
        raise RuntimeError(f"cannot unmount {path}: {r.stderr.strip()}; {lazy.stderr.strip()}")


def tmpfs_unavailable() -> str | None:
    """Why the disk-full fault cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "disk-full needs root (it mounts a small tmpfs per data directory)"
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "disk-full needs the mount and umount commands"
    probe = Path(tempfile.mkdtemp(prefix="respreg-chaos-tmpfs-probe-"))
    try:
        error = _mount(probe, 1)
        if error is not None:
            return f"cannot mount a tmpfs here: {error}"
        try:
            _umount(probe)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            return f"cannot unmount a tmpfs here: {exc}"
        return None
    finally:
        probe.rmdir()


class Tmpfs:
    """The tmpfs mounts of one run; ``close()`` unmounts every one of them (and only them)."""

    def __init__(self) -> None:
        self.mounted: list[Path] = []

    def mount(self, path: Path, size_mb: int) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        error = _mount(path, size_mb)
        if error is not None:
            raise RuntimeError(f"cannot mount a tmpfs on {path}: {error}")
        self.mounted.append(path)
        return path

    def close(self) -> None:
        """Unmount everything mounted here, newest first; raises the first failure at the end."""
        errors: list[BaseException] = []
        while self.mounted:
            path = self.mounted.pop()
            try:
                _umount(path)
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


def fill(directory: Path, name: str = "filler") -> int:
    """Fill the file system holding ``directory`` with ``directory/name`` until a write of one page
    fails with ENOSPC; returns the bytes written.

    tmpfs allocates whole pages, so once a 4 KiB write fails no page is left for anyone. A node
    replacing one of its files may free a page later and take it again: a full disk stays about
    full, as a real one does. (Smaller writes would only chase single freed pages against the
    node's own writes, byte by byte, for seconds.)"""
    written = 0
    fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        for chunk in (1 << 20, 1 << 16, 1 << 12):
            block = b"\0" * chunk
            while True:
                try:
                    n = os.write(fd, block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
                written += n
                if n < chunk:
                    break  # a short write: the file system just filled up
    finally:
        os.close(fd)
    return written


class DiskControl:
    """Breaks and repairs the disks of ``cluster``'s nodes (see the module docstring).

    With ``shim``, :meth:`env` gives each node the environment that loads it; with ``tmpfs``,
    every node's data directory is moved onto its own tmpfs of ``tmpfs_mb`` MiB (call
    :meth:`prepare` before the cluster starts, :meth:`close` after it stopped)."""

    def __init__(self, cluster: ChaosCluster, work_dir: Path, shim: Path | None, tmpfs: bool,
                 tmpfs_mb: int = 256) -> None:  # fmt: skip
        self.cluster = cluster
        self.work_dir = work_dir
        self.shim = shim
        self.use_tmpfs = tmpfs
        self.tmpfs_mb = tmpfs_mb
        self.mounts = Tmpfs()
        self.disk_dirs: dict[int, Path] = {}
        self._lock = threading.Lock()

    # ---- set-up ----------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Mount the tmpfs data directories and set each node's environment."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        for n in self.cluster.nodes:
            if self.use_tmpfs:
                disk = self.mounts.mount(self.cluster.root / f"disk{n.node_id}", self.tmpfs_mb)
                self.disk_dirs[n.node_id] = disk
                n.data_dir = disk / "data"
            if self.shim is not None:
                self.cluster.node_env[n.node_id] = {
                    "LD_PRELOAD": str(self.shim),
                    "RESPREG_FAIL_FSYNC_PATH": str(n.data_dir.resolve()),
                    "RESPREG_FAIL_FSYNC_TRIGGER": str(self.trigger(n.node_id, dirs_only=False)),
                    "RESPREG_FAIL_FSYNC_DIRS_TRIGGER": str(self.trigger(n.node_id, dirs_only=True)),
                    "RESPREG_FAIL_FSYNC_DIRS_ONLY": "0",
                }

    def close(self, keep_data_in: Path | None = None) -> None:
        """Repair every disk and unmount every tmpfs (only after the nodes stopped). With
        ``keep_data_in``, each tmpfs data directory is first copied there (node<i>-data)."""
        try:
            self.repair_all()
            if keep_data_in is not None:
                for node, disk in self.disk_dirs.items():
                    if (disk / "data").exists():
                        shutil.copytree(disk / "data", keep_data_in / f"node{node}-data", dirs_exist_ok=True)
        finally:
            self.mounts.close()

    # ---- faults ----------------------------------------------------------------------------------

    def trigger(self, node: int, dirs_only: bool) -> Path:
        return self.work_dir / f"node{node}.fsync-eio{'-dirs' if dirs_only else ''}"

    def filler(self, node: int) -> Path:
        return self.disk_dirs[node] / "filler"

    def break_fsync(self, nodes: Sequence[int], dirs_only: bool) -> None:
        if self.shim is None:
            raise RuntimeError("fsync faults need the nodes to run with the fault library")
        for i in nodes:
            self.trigger(i, dirs_only).touch()

    def repair_fsync(self, nodes: Sequence[int], dirs_only: bool) -> None:
        for i in nodes:
            self.trigger(i, dirs_only).unlink(missing_ok=True)

    def fill(self, nodes: Sequence[int]) -> dict[int, int]:
        """Fill the tmpfs of ``nodes``; returns the bytes written on each."""
        if not self.use_tmpfs:
            raise RuntimeError("disk-full needs the data directories on tmpfs (root)")
        with self._lock:
            return {i: fill(self.disk_dirs[i]) for i in nodes}

    def free(self, nodes: Sequence[int]) -> None:
        with self._lock:
            for i in nodes:
                if i in self.disk_dirs:
                    self.filler(i).unlink(missing_ok=True)

    def is_broken(self, node: int) -> bool:
        """Whether any fault is in effect on ``node``'s disk now."""
        if self.trigger(node, False).exists() or self.trigger(node, True).exists():
            return True
        return node in self.disk_dirs and self.filler(node).exists()

    def repair_all(self) -> None:
        ids = self.cluster.ids
        self.repair_fsync(ids, dirs_only=False)
        self.repair_fsync(ids, dirs_only=True)
        if self.use_tmpfs:
            self.free(ids)

    def usage(self) -> dict[int, tuple[int, int]]:
        """(used, size) bytes of each node's tmpfs."""
        out: dict[int, tuple[int, int]] = {}
        for node, disk in sorted(self.disk_dirs.items()):
            st = os.statvfs(disk)
            out[node] = ((st.f_blocks - st.f_bfree) * st.f_frsize, st.f_blocks * st.f_frsize)
        return out

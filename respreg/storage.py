"""Durable storage for the node: one acceptor-state file per key, plus the node's own metadata.

This module is the only place that reads or writes per-key files. Everything else asks
:class:`KeyFiles` (blocking) or :class:`GroupCommitter` (asyncio front end that batches writes
so many keys share one round of fsyncs, and keeps the long waits for the disk off the loop).

Layout of a data directory::

    data_dir/
        LOCK            held with an exclusive flock while a node process uses the directory
        node.meta       node id, incarnation, identity, status (see "node.meta format" below)
        peers.meta      identities of the other members (see "peers.meta format" below)
        keys/
            ab/abcd...      one file per key, named by a hash of the key (256 directories)

Per-key file names
------------------
Keys are arbitrary bytes (any length, any byte values, the empty key included). A key's file
name is ``blake2b(key, digest_size=16).hexdigest()`` (32 hex characters), placed at
``keys/<hex[0:2]>/<hex>``: 256 directories, all created (durably) when the store opens, so a
write never creates a directory, and the writes of one batch share directory fsyncs. A million
keys make about 4,000 entries per directory, which ext4's hashed directories look up in
constant time. (Directories written by respreg 0.1 used a second level, ``<hex[2:4]>/``; the
store moves such files up one level when it opens, before it serves anything.) The file
repeats the full key; a file whose stored key differs from the key asked for is reported as
corrupt, never answered for the wrong key.

Per-key file format (version 1)
-------------------------------
All integers are big-endian. The file is exactly header + body; anything else is corrupt.

Header, 13 bytes:

    ======  =====  ================================================
    offset  size   field
    ======  =====  ================================================
    0       4      magic ``b"RREG"``
    4       1      format version, ``1``
    5       4      body length in bytes (unsigned)
    9       4      CRC-32 (``zlib.crc32``) of the body (unsigned)
    ======  =====  ================================================

Body:

    ==========================  ==================================================
    field                       encoding
    ==========================  ==================================================
    key                         u32 length, then the key bytes
    promised ballot             round, node, incarnation: 3 x signed 64-bit
    accepted ballot             round, node, incarnation: 3 x signed 64-bit
    proposal present            1 byte: ``0`` (absent) or ``1`` (present)
    proposal id (if present)    u32 length, then the bytes
    value (if present)          u32 length, then the bytes
    ==========================  ==================================================

Writes are crash-safe: a new state is written to a temporary file in the same directory
(``.<name>.<random hex>.tmp``), fsynced, renamed over the final name, and the directory is
fsynced before the write counts as done. Readers ignore temporary files; a crash leaves either
the old or the new file, never a mix.

Spare files: creating a file is the costliest step of such a write (a new inode and a directory
entry, committed by the temp file's fsync), so a background thread keeps a few hundred empty
files ready in ``keys/.spare/``. A write takes one instead of creating its temp file: it writes
the state into it, fsyncs it, renames it into the key's directory and fsyncs that directory,
exactly the discipline above. A spare is used only while it is a plain file with a single link,
so a spare name that a crash left behind after its file became a key file (a file system that
lost the spare directory's half of the rename) is never written through. Spares left by an earlier
process are reused. Only the serving process, which holds the data directory's lock, uses
spare files (``KeyFiles(spares=...)``); other users of a store (tools, tests) create temp files.
Where the file system has unnamed files (O_TMPFILE), the serving process keeps most of its spares
unnamed and open, and a batch synced with syncfs links each straight onto its key's name once its
data is durable (:class:`_Spares`; the argument is in docs/design.md, *Unnamed spare files*).
Where respreg._fileio is built (a small C module), such a batch's writes, syncs and links are
all made in one call from the group committer's thread (:class:`DirectBatch`).

node.meta format (version 2; version 1 is still read)
------------------------------------------------------
42 bytes: magic ``b"RNOD"``, version byte ``2``, node id (signed 64-bit), incarnation
(signed 64-bit), identity (16 random bytes chosen when the directory is created), acceptor
status (1 byte: 0 voting, 1 joining, 2 amnesiac, 3 rebuilt), CRC-32 of the preceding 38 bytes (unsigned 32-bit).
Version 1 (25 bytes) lacks identity and status. Written with the same temp-file / fsync /
rename / fsync-directory discipline. The incarnation is incremented on every start so that
ballots of a restarted node never repeat ballots of an earlier life; a new directory starts at
a random 62-bit incarnation, so a node whose directory was wiped does not repeat the ballots of
its earlier directory either.

peers.meta format
-----------------
Magic ``b"RPEE"``, version byte ``1``, entry count (u32), then per entry the member id
(signed 64-bit) and its identity (16 bytes), then a CRC-32 of everything before it.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import hashlib
import itertools
import logging
import os
import queue
import secrets
import stat
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

from respreg.core.types import AcceptorState, Ballot, Proposal
from respreg.keyindex import KnownNames

try:
    from respreg import _fileio
except ImportError:  # built without a C compiler: the calls are made one by one from Python
    _fileio = None  # type: ignore[assignment]
if os.environ.get("RESPREG_PURE_PYTHON"):
    _fileio = None  # type: ignore[assignment]


def batched_io() -> bool:
    """Whether a staged batch's file system calls are made by respreg._fileio, in one call
    from the committer's thread (else storage.py makes them one by one, on the event loop)."""
    return _fileio is not None


__all__ = [
    "CorruptStateError",
    "DataDirError",
    "DataDirLock",
    "GroupCommitter",
    "KeyFiles",
    "NodeInfo",
    "NodeMeta",
    "batched_io",
    "decode_state",
    "encode_state",
    "open_node",
]

_T = TypeVar("_T")
logger = logging.getLogger(__name__)


class CorruptStateError(Exception):
    """A per-key file exists but does not hold a valid state for the key asked for."""


class DataDirError(Exception):
    """The data directory cannot be used. The message is one line, suitable for the CLI."""


# ---- encoding of per-key files ---------------------------------------------------------------

MAGIC = b"RREG"
FORMAT_VERSION = 1

_HEADER = struct.Struct(">4sBII")  # magic, version, body length, crc32 of body
_U32 = struct.Struct(">I")
_BALLOT = struct.Struct(">qqq")
_FLAG = struct.Struct(">B")
_U32_MAX = 0xFFFFFFFF


def _put_blob(parts: list[bytes], blob: bytes, what: str) -> None:
    if len(blob) > _U32_MAX:
        raise ValueError(f"{what} is too long to store ({len(blob)} bytes)")
    parts.append(_U32.pack(len(blob)))
    parts.append(blob)


def _pack_ballot(ballot: Ballot, what: str) -> bytes:
    try:
        return _BALLOT.pack(ballot.round, ballot.node, ballot.incarnation)
    except struct.error as exc:
        raise ValueError(f"{what} ballot {ballot!r} does not fit in signed 64-bit fields") from exc


def encode_state(key: bytes, state: AcceptorState) -> bytes:
    """Return the complete file contents (header + body) storing ``state`` for ``key``."""
    parts: list[bytes] = []
    _put_blob(parts, key, "key")
    parts.append(_pack_ballot(state.promised, "promised"))
    parts.append(_pack_ballot(state.accepted, "accepted"))
    if state.proposal is None:
        parts.append(_FLAG.pack(0))
    else:
        parts.append(_FLAG.pack(1))
        _put_blob(parts, state.proposal.pid, "proposal id")
        _put_blob(parts, state.proposal.value, "value")
    body = b"".join(parts)
    if len(body) > _U32_MAX:
        raise ValueError(f"state for key is too large to store ({len(body)} bytes)")
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, len(body), zlib.crc32(body))
    return header + body


class _BodyReader:
    """Bounds-checked sequential reads from a file body; raises CorruptStateError on overrun."""

    def __init__(self, data: memoryview, path: str) -> None:
        self._data = data
        self._pos = 0
        self._path = path

    def _need(self, n: int, what: str) -> None:
        if self._pos + n > len(self._data):
            raise CorruptStateError(f"corrupt state file {self._path}: body ends inside the {what}")

    def blob(self, what: str) -> bytes:
        self._need(_U32.size, f"{what} length")
        (length,) = _U32.unpack_from(self._data, self._pos)
        self._pos += _U32.size
        self._need(length, what)
        out = bytes(self._data[self._pos : self._pos + length])
        self._pos += length
        return out

    def ballot(self, what: str) -> Ballot:
        self._need(_BALLOT.size, f"{what} ballot")
        rnd, node, inc = _BALLOT.unpack_from(self._data, self._pos)
        self._pos += _BALLOT.size
        return Ballot(rnd, node, inc)

    def flag(self, what: str) -> int:
        self._need(_FLAG.size, what)
        (value,) = _FLAG.unpack_from(self._data, self._pos)
        self._pos += _FLAG.size
        return int(value)

    def remaining(self) -> int:
        return len(self._data) - self._pos


def decode_state(data: bytes, expected_key: bytes, path_for_message: Path | str) -> AcceptorState:
    """Parse a per-key file's contents; raise CorruptStateError unless they are valid for
    ``expected_key``. ``path_for_message`` only appears in error messages."""
    key, state = decode_file(data, path_for_message)
    if key != expected_key:
        raise CorruptStateError(
            f"corrupt state file {path_for_message}: file holds key {key!r}, not the requested key {expected_key!r}"
        )
    return state


def decode_file(data: bytes, path_for_message: Path | str) -> tuple[bytes, AcceptorState]:
    """Parse a per-key file's contents into (key, state); raise CorruptStateError if invalid."""
    where = str(path_for_message)

    def corrupt(reason: str) -> CorruptStateError:
        return CorruptStateError(f"corrupt state file {where}: {reason}")

    if len(data) < _HEADER.size:
        raise corrupt(f"truncated header ({len(data)} of {_HEADER.size} bytes)")
    magic, version, body_len, crc = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise corrupt(f"bad magic {magic!r} (expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise corrupt(f"unsupported format version {version} (expected {FORMAT_VERSION})")
    actual_body = len(data) - _HEADER.size
    if actual_body < body_len:
        raise corrupt(f"truncated: header says {body_len} body bytes, file has {actual_body}")
    if actual_body > body_len:
        raise corrupt(f"{actual_body - body_len} bytes of trailing garbage after the body")
    body = memoryview(data)[_HEADER.size :]
    if zlib.crc32(body) != crc:
        raise corrupt("checksum mismatch")

    reader = _BodyReader(body, where)
    key = reader.blob("key")
    promised = reader.ballot("promised")
    accepted = reader.ballot("accepted")
    present = reader.flag("proposal flag")
    proposal: Proposal | None
    if present == 0:
        proposal = None
    elif present == 1:
        pid = reader.blob("proposal id")
        value = reader.blob("value")
        proposal = Proposal(pid=pid, value=value)
    else:
        raise corrupt(f"bad proposal flag {present} (expected 0 or 1)")
    if reader.remaining():
        raise corrupt(f"{reader.remaining()} unexpected bytes at the end of the body")
    return key, AcceptorState(promised=promised, accepted=accepted, proposal=proposal)


# ---- low-level durable file helpers ----------------------------------------------------------


def _fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: Temp file names: a random tag drawn once per process, then a counter (itertools.count is
#: thread-safe under the GIL). Unique among this process's writers and, with 64 random bits,
#: distinct from any temp file an earlier process may have left behind.
_TEMP_TAG = secrets.token_hex(8)
_temp_numbers = itertools.count()


def _temp_name(final: str) -> str:
    directory, name = os.path.split(final)
    return f"{directory}/.{name}.{_TEMP_TAG}{next(_temp_numbers):x}.tmp"


class DurabilityError(OSError):
    """A write became visible (renamed into place) but fsyncing it or its directory failed.

    What a later read returns may then exist only in the page cache, which after a failed fsync
    can no longer be trusted: the node must stop answering from its storage (see docs/design.md).
    A plain OSError from :meth:`KeyFiles.write_many` means nothing visible changed.
    """


def _not_durable(exc: OSError) -> DurabilityError:
    return DurabilityError(exc.errno, f"state renamed into place but not made durable: {exc}")


def _rename_all(pending: list[tuple[str, str]]) -> None:
    """Rename each (final, temp) temp file onto its final name, in order (see _publish_all)."""
    _publish_all([(final, tmp, -1) for final, tmp in pending], None)


def _publish_all(pending: list[tuple[str, str, int]], link: Linker | None) -> None:
    """Put each (final, temp, descriptor) file in place, in order: a temp file is renamed onto
    its final name; an unnamed file (temp "") is linked there with ``link`` (see
    _name_unnamed). If a step fails, the temp files not yet renamed are removed and the error is
    raised: as it is when nothing was put in place yet (nothing visible changed), as a
    DurabilityError otherwise."""
    for i, (final, tmp, fd) in enumerate(pending):
        try:
            if tmp:
                os.replace(tmp, final)
            else:
                assert link is not None
                _name_unnamed(link, fd, final)
        except OSError as exc:
            for _, left, _ in pending[i:]:
                if left:
                    _unlink_quietly(left)
            if i == 0:
                raise
            raise _not_durable(exc) from exc


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _write_close(fd: int, data: bytes, *, fsync: bool) -> None:
    """Write all of ``data`` to ``fd``, fsync it if asked, and close it (also when a step fails)."""
    try:
        _write_all(fd, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _libc_function(name: str) -> ctypes._NamedFuncPointer | None:
    """The C library's function ``name`` (errno kept for ctypes.get_errno), or None."""
    try:
        fn: ctypes._NamedFuncPointer = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    return fn


def _load_syncfs() -> Callable[[int], None] | None:
    """syncfs(2) from the C library, raising OSError on failure; None where there is none."""
    fn = _libc_function("syncfs")
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int

    def syncfs(fd: int) -> None:
        if fn(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs: {os.strerror(err)}")

    return syncfs


_syncfs = _load_syncfs()
#: How a batch of writes is made durable: "fsync" (each file, then each directory), "syncfs" (two
#: syncs of the whole file system per batch; see docs/design.md), or "auto" (the best one here).
SYNC_MODES = ("auto", "fsync", "syncfs")
#: In syncfs mode, smaller batches still use fsync: two syncs of the whole file system cost more
#: than a file's and a directory's fsync when there is nothing to share them with.
SYNCFS_MIN_BATCH = 4


#: linkat(2) flags and its "current directory" descriptor (the values are Linux's).
_AT_FDCWD = -100
_AT_SYMLINK_FOLLOW = 0x400
_AT_EMPTY_PATH = 0x1000
_O_TMPFILE = getattr(os, "O_TMPFILE", 0)
#: Gives the unnamed file open as a descriptor a name: (descriptor, path).
Linker = Callable[[int, str], None]


def _load_linkers() -> list[Linker]:
    """The ways to give an O_TMPFILE file a name, best first: linkat(2) on the descriptor itself
    (AT_EMPTY_PATH; the kernel may ask for CAP_DAC_READ_SEARCH), then on its /proc/self/fd link
    (AT_SYMLINK_FOLLOW; any user, where /proc is mounted). Empty where linkat is missing."""
    fn = _libc_function("linkat")
    if fn is None or not _O_TMPFILE:
        return []
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    fn.restype = ctypes.c_int

    def call(fd: int, source: bytes, path: str, flags: int) -> None:
        if fn(fd, source, _AT_FDCWD, os.fsencode(path), flags) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)

    def by_descriptor(fd: int, path: str) -> None:
        call(fd, b"", path, _AT_EMPTY_PATH)

    def by_proc_path(fd: int, path: str) -> None:
        call(_AT_FDCWD, b"/proc/self/fd/%d" % fd, path, _AT_SYMLINK_FOLLOW)

    if _fileio is not None:
        _LINK_MODES[by_descriptor] = _fileio.LINK_BY_DESCRIPTOR
        _LINK_MODES[by_proc_path] = _fileio.LINK_BY_PROC_PATH
    return [by_descriptor, by_proc_path]


#: How respreg._fileio names an unnamed file the way each linker does.
_LINK_MODES: dict[Linker, int] = {}
_LINKERS = _load_linkers()


def _create_unnamed(directory: str) -> int:
    """A new file with no name yet (O_TMPFILE) on ``directory``'s file system, open for writing."""
    return os.open(directory, os.O_WRONLY | _O_TMPFILE | os.O_CLOEXEC, 0o644)


def _unnamed_file_linker(directory: str) -> Linker | None:
    """The first of :data:`_LINKERS` that names an unnamed file in ``directory`` here, or None
    when this kernel or file system offers neither O_TMPFILE nor a way to link such a file."""
    try:
        fd = _create_unnamed(directory)
    except OSError:
        return None
    try:
        probe = os.path.join(directory, f".link-probe.{_TEMP_TAG}")
        for linker in _LINKERS:
            try:
                linker(fd, probe)
            except OSError:
                continue
            _unlink_quietly(probe)
            return linker
        return None
    finally:
        os.close(fd)


def _name_unnamed(link: Linker, fd: int, final: str) -> None:
    """Give the unnamed file ``fd`` the name ``final``, replacing any file already there: a key
    with no file gets its name in one step; otherwise the file gets a temp name next to
    ``final`` first and is renamed over it (the temp name is removed if that fails)."""
    try:
        link(fd, final)
        return
    except FileExistsError:
        pass
    tmp = _temp_name(final)
    link(fd, tmp)
    try:
        os.replace(tmp, final)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        parts = os.uname().release.split(".")
        return (int(parts[0]), int(parts[1].split("-")[0])) >= (major, minor)
    except (ValueError, IndexError):
        return False


def resolve_sync_mode(mode: str) -> str:
    """Return "fsync" or "syncfs" for ``mode``. "auto" means syncfs where it reports write-back errors
    (Linux 5.8 and later, through the C library's syncfs), and fsync everywhere else; asking for
    "syncfs" where that does not hold is a ValueError."""
    if mode not in SYNC_MODES:
        raise ValueError(f"sync mode must be one of {', '.join(SYNC_MODES)}, not {mode!r}")
    usable = _syncfs is not None and sys.platform == "linux" and _kernel_at_least(5, 8)
    if mode == "auto":
        return "syncfs" if usable else "fsync"
    if mode == "syncfs" and not usable:
        raise ValueError("syncfs mode needs Linux 5.8 or later (earlier kernels do not report its errors)")
    return mode


def _create(path: Path | str) -> int:
    """Create ``path``, which must not exist yet, and open it for writing."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)


def _write_temp(final: Path, data: bytes) -> Path:
    """Write ``data`` to a fresh temp file next to ``final`` and fsync it; return its path.

    On failure the temp file is removed when possible and the error is re-raised.
    """
    tmp = Path(_temp_name(str(final)))
    fd = _create(tmp)
    try:
        _write_close(fd, data, fsync=True)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


#: File in ``keys/`` whose presence means every file already has the one-level layout.
LAYOUT_MARKER = "LAYOUT"


def _subdirs(path: Path) -> list[str]:
    try:
        return [e.name for e in os.scandir(path) if e.is_dir() and len(e.name) == 2]
    except FileNotFoundError:
        return []


def _unlink_quietly(path: Path | str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _replace_durably(final: Path, data: bytes) -> None:
    """Write ``data`` to a fsynced temp file and rename it onto ``final`` (the caller fsyncs the
    directory)."""
    tmp = _write_temp(final, data)
    try:
        os.replace(tmp, final)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _makedirs_durably(path: Path) -> None:
    """Create ``path`` and any missing ancestors, fsyncing each new directory's parent."""
    missing: list[Path] = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o755)
        except FileExistsError:
            if not directory.is_dir():
                raise
            continue
        _fsync_dir(directory.parent)
    if not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(path))


# ---- per-key files ---------------------------------------------------------------------------

#: Directory (under ``keys/``) of empty files made ready for writes, and how many it keeps.
SPARE_DIR_NAME = ".spare"
SPARES_KEPT = 512
#: Unnamed spares the thread makes per call into respreg._fileio.
UNNAMED_PER_CALL = 64
#: Unnamed files a batch makes per call, when too few spares were ready (any batch size works).
UNNAMED_PER_BATCH_CALL = 4096


class _Spares:
    """Empty files in one directory, created ahead of need by a background thread. Only one
    instance, in one process, may use a directory (see KeyFiles).

    :meth:`take` hands one out (or None when none is ready); the thread tops the stock up to
    ``kept`` whenever it falls below half of that. Creation errors (a full disk) only leave the
    stock empty for a while: writes then create their own temp files as before.

    With ``hold_open`` the thread keeps each file it creates open for writing, so that a write
    needs no ``open`` (nor the checks of :func:`_open_spare`: the descriptor is the file this
    process created, and only this process renames spares); that holds up to ``kept``
    descriptors. Spares left by an earlier process are handed out by name only.

    With ``hold_open`` and ``unnamed``, where the file system allows it, most of the stock
    (``kept`` less a sixteenth) is files with no name at all (O_TMPFILE, in ``directory``),
    which a staged batch links straight onto its keys' names (:attr:`link`): one directory
    change instead of a create in the spare directory and a rename out of it, and a crash
    leaves nothing behind (the kernel frees a file that never got a name). The rest are named
    spares, for the small batches that fsync each file (a named spare's directory entry is
    made here, ahead of need, not on the write's path). The descriptors of unnamed spares taken
    for a batch stay open until the batch is done; :meth:`release` gives them back, and the
    thread tops up only while those ready and those out stay under their share.
    """

    def __init__(self, directory: Path, kept: int, *, hold_open: bool = False, unnamed: bool = False) -> None:
        self.directory = directory
        self.directory_text = str(directory)
        self.hold_open = hold_open
        self._lock = threading.Lock()
        #: Named spares: (name, descriptor open for writing, or -1 if only the name is held).
        self._ready: list[tuple[str, int]] = []
        #: Unnamed spares: their descriptors, open for writing.
        self._unnamed: list[int] = []
        #: Unnamed spares taken and not released yet.
        self._out = 0
        self._wanted = threading.Event()
        self._stop = False
        _makedirs_durably(directory)
        #: How unnamed spares get their names; None: every spare is a named file.
        self.link = _unnamed_file_linker(self.directory_text) if hold_open and unnamed else None
        self._named_kept = kept if self.link is None else max(1, kept // 16)
        self._unnamed_kept = kept - self._named_kept
        # Reuse what an earlier process left (names of our own tag cannot be among them).
        self._ready = [
            (os.path.join(self.directory_text, n), -1) for n in os.listdir(directory) if n.endswith(".spare")
        ]
        self._thread = threading.Thread(target=self._fill, name="respreg-spares", daemon=True)
        self._wanted.set()
        self._thread.start()

    def take(self, *, unnamed_ok: bool = False) -> tuple[str, int] | None:
        """A spare: its name and an open descriptor, or -1 for the caller to open the name. With
        ``unnamed_ok`` an unnamed spare first: name "", which the caller must :meth:`release`
        once it closed it. Without, a named spare first; when none is left an unnamed one."""
        with self._lock:
            spare: tuple[str, int] | None = None
            if self._unnamed and (unnamed_ok or not self._ready):
                spare = ("", self._unnamed.pop())
                self._out += 1
            elif self._ready:
                spare = self._ready.pop()
            low = self._low()
        if low:
            self._wanted.set()
        return spare

    def take_unnamed(self, count: int) -> list[int]:
        """Up to ``count`` unnamed spares' descriptors (fewer when fewer are ready), which the
        caller closes and then gives back with :meth:`release`."""
        with self._lock:
            unnamed = self._unnamed
            taken = unnamed[-count:] if count < len(unnamed) else unnamed
            self._unnamed = unnamed[: len(unnamed) - len(taken)]
            self._out += len(taken)
            low = self._low()
        if low:
            self._wanted.set()
        return taken

    def release(self, count: int) -> None:
        """``count`` unnamed spares taken earlier are closed: the thread may make as many again."""
        with self._lock:
            self._out -= count
            low = self._low()
        if low:
            self._wanted.set()

    def _low(self) -> bool:
        # Called with the lock held.
        return len(self._ready) < self._named_kept // 2 or len(self._unnamed) < self._unnamed_kept // 2

    def ready(self) -> int:
        with self._lock:
            return len(self._ready) + len(self._unnamed)

    def _next_kind(self) -> tuple[str, int] | None:
        """What the thread should make next: ("unnamed", how many are missing), ("named", 1), or
        None (the stock is full)."""
        with self._lock:
            missing = self._unnamed_kept - len(self._unnamed) - self._out
            if missing > 0:
                return "unnamed", missing
            if len(self._ready) < self._named_kept:
                return "named", 1
            return None

    def close(self) -> None:
        self._stop = True
        self._wanted.set()
        self._thread.join(timeout=5)
        with self._lock:
            held = [fd for _, fd in self._ready] + self._unnamed
            self._ready, self._unnamed = [], []
        for fd in held:
            if fd >= 0:
                os.close(fd)

    def _fill(self) -> None:
        numbers = itertools.count()
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._stop:
                return
            while not self._stop and (wanted := self._next_kind()) is not None:
                kind, missing = wanted
                try:
                    if kind == "unnamed":
                        if _fileio is not None:
                            # Many at a time, with the interpreter lock given up once.
                            fds = _fileio.create_unnamed(self.directory_text, min(missing, UNNAMED_PER_CALL))
                        else:
                            fds = [_create_unnamed(self.directory_text)]
                        with self._lock:
                            self._unnamed.extend(fds)
                        continue
                    name = os.path.join(self.directory_text, f"{_TEMP_TAG}{next(numbers):x}.spare")
                    fd = _create(name)
                    if not self.hold_open:
                        os.close(fd)
                        fd = -1
                except OSError:
                    # A full or failing disk: try again a second later, when a write asks.
                    time.sleep(1.0)
                    break
                with self._lock:
                    self._ready.append((name, fd))


def _open_spare(spare: str) -> int | None:
    """Open ``spare`` for writing, truncated, if it is still a plain file with one link;
    otherwise drop the name and return None."""
    try:
        fd = os.open(spare, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            if st.st_size:  # a spare is empty unless a crash interrupted a write into it
                os.ftruncate(fd, 0)
            return fd
    except OSError:
        pass
    os.close(fd)
    _unlink_quietly(spare)
    return None


_O_NOATIME = getattr(os, "O_NOATIME", 0)
#: A key file is read with one read(2) of this size; only larger files need more.
_READ_AT_ONCE = 64 * 1024


def _announced_size(data: bytes) -> int:
    """The file size the header at the start of ``data`` announces (0 without a whole header)."""
    if len(data) < _HEADER.size:
        return 0
    return _HEADER.size + int(_HEADER.unpack_from(data, 0)[2])


class StagedBatch:
    """New states written to temp (or spare) files by :meth:`KeyFiles.stage`, made durable and
    visible in three steps (the order of syncfs mode, docs/design.md):

    1. :meth:`sync_data` (blocking: run it in a thread) makes the files' data durable with one
       syncfs through a descriptor of one of them. An OSError here means nothing visible
       changed.
    2. :meth:`publish` puts every file in place under its key's name, in order: a temp or named
       spare file is renamed, an unnamed spare linked (cheap: no disk wait).
    3. :meth:`sync_names` (blocking) makes the new names durable with a second syncfs, through
       the keys directory. An error here, or in step 2 after a name changed, is a
       DurabilityError.

    :meth:`close` releases the descriptors (and the unnamed spares, with ``release``) and
    removes any file not put in place (a step failed or was never run); call it in every case.
    """

    def __init__(self, names_fd: int, link: Linker | None = None, release: Callable[[int], None] | None = None) -> None:
        #: (final name, temp or spare file, or "" for an unnamed spare, the unnamed spare's
        #: descriptor or -1) of every state, in the order they are put in place.
        self.files: list[tuple[str, str, int]] = []
        self.data_fd = -1
        self.names_fd = names_fd
        self._link = link
        self._release = release
        #: The temp files are no longer ours to remove: renamed, or removed by a failed publish.
        self._published = False

    def sync_data(self) -> None:
        assert _syncfs is not None and self.data_fd >= 0
        _syncfs(self.data_fd)

    def publish(self) -> None:
        try:
            _publish_all(self.files, self._link)
        finally:
            self._published = True

    def sync_names(self) -> None:
        assert _syncfs is not None and self._published
        try:
            _syncfs(self.names_fd)
        except OSError as exc:
            raise _not_durable(exc) from exc

    def close(self) -> None:
        if not self._published:
            for _, left, _ in self.files:
                if left:
                    _unlink_quietly(left)
            self._published = True
        unnamed = [fd for _, _, fd in self.files if fd >= 0]
        self.files = []
        for fd in (self.data_fd, self.names_fd, *unnamed):
            if fd >= 0:
                os.close(fd)
        self.data_fd = self.names_fd = -1
        if unnamed and self._release is not None:
            self._release(len(unnamed))


class DirectBatch:
    """A batch synced with syncfs whose files are all unnamed, made durable and visible by
    respreg._fileio in one call, with the interpreter lock given up once: the steps and their
    order are :class:`StagedBatch`'s (write every file, syncfs, link each onto its key's name,
    syncfs), and so are the errors :meth:`commit` raises. Built by :meth:`KeyFiles.stage_direct`
    on the event loop (taking spares, no file system call but one open); :meth:`commit` runs in
    the committer's thread (it also makes the files no spare was ready for); :meth:`close`
    always follows, on either."""

    def __init__(self, spares: _Spares, how: int, names_fd: int, jobs: list[tuple[str, bytes]], fds: list[int]) -> None:
        self._spares = spares
        self._how = how
        self._names_fd = names_fd
        self._finals = [final for final, _ in jobs]
        self._paths = [os.fsencode(final) for final in self._finals]
        self._datas = [data for _, data in jobs]
        #: The unnamed spare taken for each state, -1 where none was ready (commit makes one).
        self.fds = fds + [-1] * (len(jobs) - len(fds))
        #: Spares taken from the stock, given back by close.
        self.borrowed = len(fds)
        self._open = True

    def commit(self) -> None:
        """Blocking: write, sync, name and sync (see the class docstring); then the descriptors
        are closed. OSError when nothing visible changed, DurabilityError once a name did."""
        assert _fileio is not None and self._open
        fds = self.fds
        missing = [i for i, fd in enumerate(fds) if fd < 0]
        while missing:
            made = _fileio.create_unnamed(self._spares.directory_text, min(len(missing), UNNAMED_PER_BATCH_CALL))
            for i, fd in zip(missing, made, strict=False):
                fds[i] = fd
            missing = missing[len(made) :]
        phase, index = _fileio.PHASE_WRITE, 0
        while True:
            phase, index, err = _fileio.run_batch(
                fds, self._datas, self._paths, fds[0], self._names_fd, self._how, phase, index
            )
            if phase == _fileio.PHASE_DONE:
                self._open = False  # run_batch closed them
                return
            if phase == _fileio.PHASE_LINK:
                final = self._finals[index]
                try:
                    if err != errno.EEXIST:
                        raise OSError(err, os.strerror(err), final)
                    # The key has a file already: a temp name beside it, renamed over it.
                    assert self._spares.link is not None
                    _name_unnamed(self._spares.link, fds[index], final)
                except OSError as exc:
                    if index == 0:
                        raise
                    raise _not_durable(exc) from exc
                index += 1
                continue
            failed = OSError(err, f"{'syncfs' if phase != _fileio.PHASE_WRITE else 'write'}: {os.strerror(err)}")
            if phase == _fileio.PHASE_SYNC_NAMES:
                raise _not_durable(failed)
            raise failed  # a write or the data's sync: no name changed

    def close(self) -> None:
        """Close what commit left open (every descriptor, if it never ran or failed) and give
        the spares taken back to the stock."""
        if self._open:
            self._open = False
            assert _fileio is not None
            _fileio.close_all([*self.fds, self._names_fd])
        if self.borrowed:
            self._spares.release(self.borrowed)
            self.borrowed = 0


#: How many file names of keys loaded without state are kept for their first write.
FRESH_NAMES_KEPT = 4096


def _file_name(key: bytes) -> str:
    """The name of ``key``'s file (see "Per-key file names" above)."""
    return hashlib.blake2b(key, digest_size=16).hexdigest()


class KeyFiles:
    """One durable file per key under ``root``. Blocking; safe to call from several threads."""

    def __init__(
        self,
        root: Path,
        *,
        workers: int = 8,
        spares: int = 0,
        hold_spares_open: bool = False,
        unnamed_spares: bool = True,
        sync: str = "fsync",
        index: bool = False,
        list_later: bool = False,
    ) -> None:
        """``workers`` threads fsync files in parallel; ``spares`` empty files are kept ready for
        writes (held open with ``hold_spares_open``: that many more descriptors, see
        :class:`_Spares`; in syncfs mode unnamed where the file system allows it, unless
        ``unnamed_spares`` is False), and ``index`` keeps the names of the files that may exist in memory
        (see :class:`KnownNames`; its listing of the files starts at once, or with
        ``list_later`` when the caller starts it): these three only for the process holding
        the data directory's lock. ``sync`` is how a batch is made durable: "fsync", "syncfs"
        or "auto" (see :func:`resolve_sync_mode`)."""
        if workers < 1:
            raise ValueError("workers must be at least 1")
        #: "fsync" or "syncfs" (see :func:`resolve_sync_mode`).
        self.sync = resolve_sync_mode(sync)
        #: Batches made durable (or attempted) with two syncfs calls instead of fsyncs.
        self.syncfs_batches = 0
        # Reads do not update access times: that would dirty the inode of every key file read
        # (for the first time since it was written), work a later sync would have to write back.
        self._read_flags = os.O_RDONLY | os.O_CLOEXEC | _O_NOATIME
        self.root = Path(root)
        _makedirs_durably(self.root)
        self._workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="respreg-io")
        self._root_text = str(self.root)
        # Spare files only for the one process that owns the directory (it holds the LOCK): two
        # processes taking the same spare would write into one file.
        self._spares = (
            # Unnamed spares serve the batches synced with syncfs, which fsync mode never makes.
            _Spares(
                self.root / SPARE_DIR_NAME,
                spares,
                hold_open=hold_spares_open,
                unnamed=unnamed_spares and self.sync == "syncfs",
            )
            if spares > 0
            else None
        )
        # The marker says the store has its one-level layout: start-up then costs the same
        # with a million keys as with none. Without it (a new store, or one written by 0.1), the
        # directories are created and old files moved up before the marker is written.
        marker = self.root / LAYOUT_MARKER
        if not marker.exists():
            self._create_fan_out()
            self._migrate_two_level_layout()
            _replace_durably(marker, b"respreg key layout 2: keys/<hex[0:2]>/<hex>\n")
            _fsync_dir(self.root)
        # Listed after the layout is final; None: every load opens its file.
        self.known: KnownNames | None = KnownNames(self._root_text) if index else None
        #: File names of keys that :meth:`load` found without state, for their first write (a
        #: fresh key is loaded and then written: its name is hashed once). Bounded: cleared
        #: when full (keys loaded and never written, such as reads of missing keys).
        self._fresh_names: dict[bytes, str] = {}
        if self.known is not None and not list_later:
            self.known.start()

    def _create_fan_out(self) -> None:
        """Create the 256 directories (fsyncing the root once if any was missing)."""
        created = False
        for i in range(256):
            try:
                os.mkdir(os.path.join(self._root_text, f"{i:02x}"), 0o755)
                created = True
            except FileExistsError:
                pass
        if created:
            _fsync_dir(self.root)

    def _migrate_two_level_layout(self) -> None:
        """Move files of the old ``<hex[0:2]>/<hex[2:4]>/<hex>`` layout up one level.

        Each rename stays inside one top directory, which is fsynced before the emptied second
        level is removed; a crash part way leaves files in either place, and the next start
        finishes the move before anything is read.
        """
        for top in sorted(_subdirs(self.root)):
            top_dir = self.root / top
            for leaf in sorted(_subdirs(top_dir)):
                leaf_dir = top_dir / leaf
                for name in os.listdir(leaf_dir):
                    if name.startswith("."):
                        _unlink_quietly(leaf_dir / name)  # a temp file of an unfinished write
                    else:
                        os.replace(leaf_dir / name, top_dir / name)
                _fsync_dir(top_dir)
                os.rmdir(leaf_dir)
                _fsync_dir(top_dir)

    def path_for(self, key: bytes) -> Path:
        """The file that holds ``key``'s state (whether or not it exists yet)."""
        return Path(self._path_text(key))

    def _path_text(self, key: bytes) -> str:
        return self._path_of(_file_name(key))

    def _path_of(self, name: str) -> str:
        return f"{self._root_text}/{name[0:2]}/{name}"

    def _path_to_write(self, key: bytes) -> str:
        """The file of ``key``, whose name is known to exist from now on (see KnownNames)."""
        name = self._fresh_names.pop(key, None) or _file_name(key)
        if self.known is not None:
            self.known.add(int(name, 16))
        return self._path_of(name)

    def load(self, key: bytes) -> AcceptorState | None:
        """Return the stored state of ``key``, or None if the key was never written.

        Raises CorruptStateError if the file is invalid; other I/O errors propagate as OSError.
        """
        name = _file_name(key)
        if self.known is not None and not self.known.may_exist(int(name, 16)):
            fresh = self._fresh_names
            if len(fresh) >= FRESH_NAMES_KEPT:
                fresh.clear()
            fresh[key] = name
            return None  # never written: no file to open
        path = self._path_of(name)
        try:
            fd = os.open(path, self._read_flags)
        except FileNotFoundError:
            return None
        except PermissionError:
            if not self._read_flags & _O_NOATIME:
                raise
            # O_NOATIME needs the file's owner (or CAP_FOWNER): a tool run as another user.
            self._read_flags &= ~_O_NOATIME
            return self.load(key)
        try:
            data = os.read(fd, _READ_AT_ONCE)
            if len(data) == _READ_AT_ONCE or len(data) < _announced_size(data):
                # A large value (or a short read): read on to the end of the file.
                with os.fdopen(os.dup(fd), "rb") as rest:
                    data += rest.read()
        finally:
            os.close(fd)
        return decode_state(data, key, path)

    def scan(self, after: str, limit: int) -> list[tuple[str, bytes, AcceptorState]]:
        """Up to ``limit`` stored (file name, key, state), in file-name order, after ``after``
        ("" to start). Raises CorruptStateError on an invalid file: a dump must not skip one."""
        out: list[tuple[str, bytes, AcceptorState]] = []
        for top in sorted(_subdirs(self.root)):
            if top < after[:2]:
                continue
            directory = self.root / top
            names = sorted(n for n in os.listdir(directory) if not n.startswith(".") and n > after)
            for name in names:
                path = directory / name
                try:
                    data = path.read_bytes()
                except (FileNotFoundError, IsADirectoryError):
                    continue
                key, state = decode_file(data, path)
                out.append((name, key, state))
                if len(out) >= limit:
                    return out
        return out

    def write_many(self, items: Sequence[tuple[bytes, AcceptorState]]) -> None:
        """Durably store every (key, state); all of them are on disk when this returns.

        If one key appears several times, the last state wins. Three steps: every new state goes
        to a fsynced temp file; then all are renamed into place; then each directory is fsynced.
        A failure in the first step leaves every visible file as it was and raises OSError; a
        failure after a rename raises :class:`DurabilityError`.
        """
        jobs = self._jobs(items)
        if not jobs:
            return
        if self.stages(len(jobs)):
            direct = self._direct(jobs)
            if direct is not None:
                try:
                    direct.commit()
                finally:
                    direct.close()
                return
            staged = self._stage(jobs)
            try:
                staged.sync_data()
                staged.publish()
                staged.sync_names()
            finally:
                staged.close()
            return
        leaves = list(dict.fromkeys(os.path.dirname(path) for path, _ in jobs))
        temps: dict[str, str] = {}

        def write(job: tuple[str, bytes]) -> None:
            fd, temps[job[0]] = self._open_new(job[0])
            _write_close(fd, job[1], fsync=True)

        try:
            self._run_all(write, jobs)
        except BaseException:
            for tmp in temps.values():
                _unlink_quietly(tmp)
            raise
        _rename_all(list(temps.items()))
        try:
            self._run_all(_fsync_dir, leaves)
        except OSError as exc:
            raise _not_durable(exc) from exc

    def _open_new(self, final: str, *, unnamed_ok: bool = False) -> tuple[int, str]:
        """A descriptor (for writing) and the path of the file that will become ``final``: a
        spare file if one is ready, else a new temp file next to ``final``. An unnamed spare
        comes with the path "" if ``unnamed_ok`` (the caller links it and releases it, see
        StagedBatch); otherwise it first gets a temp name next to ``final``."""
        spares = self._spares
        taken = spares.take(unnamed_ok=unnamed_ok) if spares is not None else None
        if taken is not None:
            assert spares is not None
            spare, held = taken
            if not spare:
                if unnamed_ok:
                    return held, ""
                tmp = _temp_name(final)
                try:
                    assert spares.link is not None
                    spares.link(held, tmp)
                except OSError:
                    os.close(held)
                    return _create(tmp), tmp
                finally:
                    spares.release(1)  # closed by the caller, soon
                return held, tmp
            fd = held if held >= 0 else _open_spare(spare)
            if fd is not None:
                return fd, spare
        tmp = _temp_name(final)
        return _create(tmp), tmp

    def stages(self, distinct_keys: int) -> bool:
        """Whether a batch of this many distinct keys is written in stages (syncfs mode, see
        :meth:`stage`); smaller batches, and every batch in fsync mode, go to :meth:`write_many`."""
        return self.sync == "syncfs" and distinct_keys >= SYNCFS_MIN_BATCH

    def stage(self, items: Sequence[tuple[bytes, AcceptorState]]) -> StagedBatch:
        """Write every (key, state) (the last state of a key wins) to its temp or spare file,
        neither durable nor visible yet, and return the batch, which the caller finishes with
        :meth:`StagedBatch.sync_data`, :meth:`~StagedBatch.publish` and
        :meth:`~StagedBatch.sync_names`, in that order, and always closes. Only for batches
        that :meth:`stages`.

        Made for the group committer, which runs the cheap steps (writes into the page cache,
        renames) on its event loop, and only the two syncs in a thread: each system call a
        thread makes gives up the interpreter lock, and a thread that gives it up hundreds of
        times per batch waits for it as often behind a busy event loop.
        """
        return self._stage(self._jobs(items))

    def stage_direct(self, items: Sequence[tuple[bytes, AcceptorState]]) -> DirectBatch | None:
        """Like :meth:`stage`, for a batch that :meth:`stages`, but nothing is written yet: the
        returned batch's :meth:`DirectBatch.commit` does it all. None where respreg._fileio or
        unnamed spares are missing (then use :meth:`stage`)."""
        return self._direct(self._jobs(items)) if self._direct_link() is not None else None

    def _direct_link(self) -> int | None:
        """How respreg._fileio names this store's unnamed spares, or None if it cannot."""
        spares = self._spares
        if _fileio is None or spares is None or spares.link is None:
            return None
        return _LINK_MODES.get(spares.link)

    def _direct(self, jobs: list[tuple[str, bytes]]) -> DirectBatch | None:
        how = self._direct_link()
        if how is None:
            return None
        assert self._spares is not None and self.stages(len(jobs))
        self.syncfs_batches += 1
        # Opened before any of the batch's data is written (see _stage); the data's sync goes
        # through a spare's descriptor, opened earlier still.
        names_fd = os.open(self._root_text, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return DirectBatch(self._spares, how, names_fd, jobs, self._spares.take_unnamed(len(jobs)))

    def _jobs(self, items: Sequence[tuple[bytes, AcceptorState]]) -> list[tuple[str, bytes]]:
        """(file, encoded state) of each key's last state in ``items``, in first-seen key order."""
        latest: dict[bytes, AcceptorState] = {}
        for key, state in items:
            latest[key] = state
        return [(self._path_to_write(key), encode_state(key, state)) for key, state in latest.items()]

    def _stage(self, jobs: list[tuple[str, bytes]]) -> StagedBatch:
        assert _syncfs is not None and self.stages(len(jobs))
        self.syncfs_batches += 1
        # Both descriptors the syncs go through are opened before any of the batch's data is
        # written: syncfs reports the write-back errors that happened after that.
        spares = self._spares
        names_fd = os.open(self._root_text, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if spares is None or spares.link is None:
            batch = StagedBatch(names_fd)
        else:
            batch = StagedBatch(names_fd, spares.link, spares.release)
        try:
            for final, data in jobs:
                fd, tmp = self._open_new(final, unnamed_ok=True)
                if not tmp:
                    # Held open until it is linked onto its name (publish); closed by close.
                    batch.files.append((final, "", fd))
                    if batch.data_fd < 0:
                        batch.data_fd = os.dup(fd)
                    _write_all(fd, data)
                    continue
                batch.files.append((final, tmp, -1))
                try:
                    if batch.data_fd < 0:
                        batch.data_fd = os.dup(fd)
                except BaseException:
                    os.close(fd)
                    raise
                _write_close(fd, data, fsync=False)
        except BaseException:
            batch.close()
            raise
        return batch

    def spares_ready(self) -> int:
        """Spare files ready for writes right now (see the module docstring)."""
        return self._spares.ready() if self._spares is not None else 0

    def spare_kind(self) -> str:
        """How spare files are kept: unnamed, held (named, held open), named or none (_Spares)."""
        spares = self._spares
        if spares is None:
            return "none"
        if spares.link is not None:
            return "unnamed"
        return "held" if spares.hold_open else "named"

    def close(self) -> None:
        """Stop the worker threads (waits for running writes)."""
        if self._spares is not None:
            self._spares.close()
        self._pool.shutdown(wait=True)

    def _run_all(self, fn: Callable[[_T], None], args: Sequence[_T]) -> None:
        """Run ``fn`` on every argument, in parallel for more than one; wait for all of them,
        then raise the first error if any failed."""
        if len(args) == 1 or self._workers == 1:
            for arg in args:
                fn(arg)
            return
        futures: list[Future[None]] = [self._pool.submit(fn, arg) for arg in args]
        first_error: BaseException | None = None
        for future in futures:
            error = future.exception()
            if error is not None and first_error is None:
                first_error = error
        if first_error is not None:
            raise first_error


# ---- group commit ----------------------------------------------------------------------------


@dataclass
class _Queued:
    state: AcceptorState
    callbacks: list[Callable[[BaseException | None], None]]


_Batch = list[tuple[bytes, _Queued]]


class GroupCommitter:
    """Batches concurrent writes so that they share fsyncs (group commit).

    All methods except the constructor must be called on ``loop``'s thread. While one batch is
    being written, new submissions queue up and form the next batch; a write to a key that is
    still queued (not yet started) replaces the queued state and keeps every callback.

    A batch that :meth:`KeyFiles.stages` (syncfs mode) is written and renamed on the loop, and
    only its two syncs run in the committer's thread (see :meth:`KeyFiles.stage` for why); any
    other batch runs whole in that thread (:meth:`KeyFiles.write_many`).

    Counters for monitoring: ``batches`` (batches run), ``writes`` (key states written
    successfully), ``fsync_errors`` (batches that failed), ``coalesced`` (submissions merged
    into an already queued write of the same key).

    The committer does not own ``files``; close it separately after :meth:`close`.
    """

    def __init__(self, files: KeyFiles, loop: asyncio.AbstractEventLoop, *, max_batch: int = 4096) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._files = files
        self._loop = loop
        self._max_batch = max_batch
        # The committer's own thread takes (work, then) pairs from a queue: no Future, lock or
        # condition of a thread pool per hand-off, which cost a tenth of a node's interpreter
        # time at 16 clients (benchmarks/PROFILE.md). None stops it.
        self._work: queue.SimpleQueue[tuple[Callable[[], None], Callable[[BaseException | None], None]] | None] = (
            queue.SimpleQueue()
        )
        self._driver = threading.Thread(target=self._drive, name="respreg-commit", daemon=True)
        self._driver.start()
        self._queue: dict[bytes, _Queued] = {}
        self._inflight = 0
        self._busy = False  # a batch is scheduled or being written
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self.batches = 0
        self.writes = 0
        self.fsync_errors = 0
        self.coalesced = 0

    def submit(
        self,
        key: bytes,
        state: AcceptorState,
        done: Callable[[BaseException | None], None],
    ) -> None:
        """Queue a durable write of ``state`` for ``key``; ``done`` is later called on the loop
        with None once it is on disk, or with the exception if the write failed."""
        if self._closed:
            raise RuntimeError("GroupCommitter is closed")
        queued = self._queue.get(key)
        if queued is None:
            self._queue[key] = _Queued(state, [done])
        else:
            queued.state = state
            queued.callbacks.append(done)
            self.coalesced += 1
        if not self._busy:
            # Start at the end of this event-loop iteration: everything submitted in it joins.
            self._busy = True
            self._idle.clear()
            self._loop.call_soon(self._start_batch)

    def pending(self) -> int:
        """Writes not yet completed: queued keys plus keys of the batch being written."""
        return len(self._queue) + self._inflight

    async def close(self) -> None:
        """Wait until every submitted write has completed, then stop accepting new ones."""
        while self._busy:
            await self._idle.wait()
        self._closed = True
        self._work.put(None)

    def _start_batch(self) -> None:
        keys = list(itertools.islice(self._queue, self._max_batch))
        batch = [(key, self._queue.pop(key)) for key in keys]
        self._inflight = len(batch)
        items = [(key, queued.state) for key, queued in batch]
        if not self._files.stages(len(items)):
            self._in_thread(partial(self._files.write_many, items), partial(self._batch_done, batch))
            return
        # A large batch in syncfs mode: with respreg._fileio all of it in the thread, in one
        # call; else the writes and renames on this loop, the syncs in the thread.
        try:
            direct = self._files.stage_direct(items)
            if direct is not None:
                self._in_thread(direct.commit, partial(self._direct_done, batch, direct))
                return
            staged = self._files.stage(items)
        except Exception as exc:  # noqa: BLE001 - every write of the batch must hear how it ended
            self._loop.call_soon(self._batch_done, batch, exc)
            return
        self._in_thread(staged.sync_data, partial(self._data_synced, batch, staged))

    def _direct_done(self, batch: _Batch, direct: DirectBatch, error: BaseException | None) -> None:
        direct.close()
        self._batch_done(batch, error)

    def _data_synced(self, batch: _Batch, staged: StagedBatch, error: BaseException | None) -> None:
        if error is None:
            try:
                staged.publish()
            except Exception as exc:  # noqa: BLE001 - as in _start_batch
                error = exc
            else:
                self._in_thread(staged.sync_names, partial(self._names_synced, batch, staged))
                return
        staged.close()
        self._batch_done(batch, error)

    def _names_synced(self, batch: _Batch, staged: StagedBatch, error: BaseException | None) -> None:
        staged.close()
        self._batch_done(batch, error)

    def _in_thread(self, fn: Callable[[], None], then: Callable[[BaseException | None], None]) -> None:
        """Run ``fn`` in the committer's thread, then ``then(its exception or None)`` on the loop."""
        if self._closed:
            self._loop.call_soon(then, RuntimeError("GroupCommitter is closed"))
            return
        self._work.put((fn, then))

    def _drive(self) -> None:
        """The committer's thread: runs each piece of work in turn and hands its outcome to the
        loop as one callback (no task, no extra wake-up)."""
        while True:
            item = self._work.get()
            if item is None:
                return
            fn, then = item
            error: BaseException | None = None
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - every outcome goes back to the loop
                error = exc
            try:
                self._loop.call_soon_threadsafe(then, error)
            except RuntimeError:
                return  # the loop is closed: nobody is left to tell

    def _batch_done(self, batch: _Batch, error: BaseException | None) -> None:
        self.batches += 1
        if error is None:
            self.writes += len(batch)
        else:
            self.fsync_errors += 1
        self._inflight = 0
        for _, queued in batch:
            self._notify(queued, error)
        if self._queue:
            self._start_batch()  # what queued while this batch was written is the next batch
        else:
            self._busy = False
            self._idle.set()

    @staticmethod
    def _notify(queued: _Queued, error: BaseException | None) -> None:
        for callback in queued.callbacks:
            try:
                callback(error)
            except Exception:  # one faulty callback must not starve the others
                logger.exception("GroupCommitter callback failed")


# ---- node metadata and data directory --------------------------------------------------------

META_NAME = "node.meta"
LOCK_NAME = "LOCK"
KEYS_DIR_NAME = "keys"

_META_V1 = struct.Struct(">4sBqq")
_META = struct.Struct(">4sBqq16sB")
_META_MAGIC = b"RNOD"
_META_VERSION = 2

#: Status of a node's acceptor, kept in node.meta (see docs/operations.md).
VOTING = 0  # a full acceptor
JOINING = 1  # a new data directory: votes once every other member confirmed it never knew another
AMNESIAC = 2  # a member remembers another identity for this node id: its state was lost; never votes
REBUILT = 3  # voting again after a rebuild from a majority; never writes at the reserved round 0
#: The statuses whose acceptor votes.
VOTING_STATUSES = (VOTING, REBUILT)


@dataclass(frozen=True)
class NodeMeta:
    """Contents of ``node.meta``: which node owns the directory, how often it started, the random
    identity the directory was created with, and whether its acceptor may vote."""

    node_id: int
    incarnation: int
    identity: bytes = b""
    status: int = VOTING

    def encode(self) -> bytes:
        head = _META.pack(_META_MAGIC, _META_VERSION, self.node_id, self.incarnation, self.identity, self.status)
        return head + _U32.pack(zlib.crc32(head))

    @classmethod
    def decode(cls, data: bytes) -> NodeMeta:
        """Parse ``node.meta`` (version 2, or version 1 without identity); raises ValueError with the
        reason when it is invalid."""
        if len(data) == _META.size + _U32.size:
            layout, version = _META, 2
        elif len(data) == _META_V1.size + _U32.size:
            layout, version = _META_V1, 1
        else:
            raise ValueError(f"wrong size ({len(data)} bytes)")
        head = data[: layout.size]
        (crc,) = _U32.unpack_from(data, layout.size)
        fields = layout.unpack(head)
        if fields[0] != _META_MAGIC:
            raise ValueError(f"bad magic {fields[0]!r}")
        if fields[1] != version:
            raise ValueError(f"unsupported version {fields[1]}")
        if zlib.crc32(head) != crc:
            raise ValueError("checksum mismatch")
        if version == 1:
            return cls(node_id=fields[2], incarnation=fields[3])
        if fields[5] not in (VOTING, JOINING, AMNESIAC, REBUILT):
            raise ValueError(f"unknown status {fields[5]}")
        return cls(node_id=fields[2], incarnation=fields[3], identity=fields[4], status=fields[5])


def write_meta(data_dir: Path, meta: NodeMeta) -> None:
    """Durably replace ``node.meta`` (temp file, fsync, rename, fsync directory)."""
    _replace_durably(data_dir / META_NAME, meta.encode())
    _fsync_dir(data_dir)


_PEERS_HEAD = struct.Struct(">4sBI")
_PEER_ENTRY = struct.Struct(">q16s")
PEERS_NAME = "peers.meta"


def load_peer_identities(data_dir: Path) -> dict[int, bytes]:
    """The identity this node last accepted for each other member (empty if none yet).

    Raises DataDirError if the file exists but is invalid: forgetting these would let a member
    whose data directory was wiped vote again.
    """
    path = data_dir / PEERS_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise DataDirError(f"cannot read {path}: {_reason(exc)}") from exc
    try:
        magic, version, count = _PEERS_HEAD.unpack_from(data, 0)
        size = _PEERS_HEAD.size + count * _PEER_ENTRY.size
        if magic != b"RPEE" or version != 1 or len(data) != size + _U32.size:
            raise ValueError("bad header or size")
        if zlib.crc32(data[:size]) != _U32.unpack_from(data, size)[0]:
            raise ValueError("checksum mismatch")
        out: dict[int, bytes] = {}
        for i in range(count):
            node, ident = _PEER_ENTRY.unpack_from(data, _PEERS_HEAD.size + i * _PEER_ENTRY.size)
            out[node] = ident
        return out
    except (ValueError, struct.error) as exc:
        raise DataDirError(f"{path} is corrupt ({exc}); refusing to start with it") from exc


def save_peer_identities(data_dir: Path, identities: dict[int, bytes]) -> None:
    """Durably record the identities of the other members."""
    body = _PEERS_HEAD.pack(b"RPEE", 1, len(identities)) + b"".join(
        _PEER_ENTRY.pack(node, ident) for node, ident in sorted(identities.items())
    )
    _replace_durably(data_dir / PEERS_NAME, body + _U32.pack(zlib.crc32(body)))
    _fsync_dir(data_dir)


class DataDirLock:
    """An exclusive ``flock`` on ``data_dir/LOCK``, held until :meth:`release`."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_NAME
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise DataDirError(f"data directory {data_dir} is not writable: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise DataDirError(f"data directory {data_dir} is in use by another process") from exc
            raise DataDirError(f"cannot lock data directory {data_dir}: {exc.strerror or exc}") from exc
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Release the lock (closing the descriptor drops the flock). Idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


@dataclass(frozen=True)
class NodeInfo:
    """A node's identity for this run, and the lock that keeps its data directory exclusive."""

    node_id: int
    incarnation: int
    data_dir: Path
    keys_dir: Path
    lock: DataDirLock = field(repr=False, compare=False)
    identity: bytes = b""
    status: int = VOTING

    def close(self) -> None:
        """Release the data directory lock."""
        self.lock.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def open_node(data_dir: Path, node_id: int) -> NodeInfo:
    """Claim ``data_dir`` for node ``node_id`` and start a new incarnation.

    Creates the directory if needed, locks it against other processes, checks that it belongs
    to ``node_id``, and durably records the incremented incarnation before returning. Raises
    DataDirError (one-line message) if the directory cannot be used. The caller must keep the
    returned NodeInfo (and so the lock) for the life of the process.
    """
    if not -(2**63) <= node_id < 2**63:
        raise ValueError(f"node id {node_id} does not fit in a signed 64-bit integer")
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise DataDirError(f"data directory {data_dir} exists but is not a directory")
    try:
        _makedirs_durably(data_dir)
    except OSError as exc:
        raise DataDirError(f"cannot create data directory {data_dir}: {_reason(exc)}") from exc
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise DataDirError(f"data directory {data_dir} is not writable")

    lock = DataDirLock(data_dir)
    try:
        meta_path = data_dir / META_NAME
        try:
            data: bytes | None = meta_path.read_bytes()
        except FileNotFoundError:
            data = None
        except OSError as exc:
            raise DataDirError(f"cannot read {meta_path}: {_reason(exc)}") from exc

        if data is None:
            # A new directory: a fresh random identity, and no vote until the other members
            # confirm they never knew this node id under another identity. The incarnation
            # starts at a random 62-bit number, not at 1: if this node id had an earlier
            # directory (wiped since), its ballots and proposal ids must not repeat that life's.
            first = int.from_bytes(os.urandom(8), "big") >> 2 or 1
            meta = NodeMeta(node_id=node_id, incarnation=first, identity=os.urandom(16), status=JOINING)
        else:
            try:
                old = NodeMeta.decode(data)
            except ValueError as exc:
                raise DataDirError(f"{meta_path} is corrupt ({exc}); refusing to start with it") from exc
            if old.node_id != node_id:
                raise DataDirError(f"data directory {data_dir} belongs to node {old.node_id}, not node {node_id}")
            # A version-1 directory predates identities: it gets one now and keeps voting.
            identity = old.identity or os.urandom(16)
            meta = NodeMeta(node_id=node_id, incarnation=old.incarnation + 1, identity=identity, status=old.status)

        try:
            _replace_durably(meta_path, meta.encode())
            _fsync_dir(data_dir)
        except (OSError, struct.error) as exc:
            reason = _reason(exc) if isinstance(exc, OSError) else str(exc)
            raise DataDirError(f"cannot write {meta_path}: {reason}") from exc
    except BaseException:
        lock.release()
        raise

    return NodeInfo(
        node_id=node_id,
        incarnation=meta.incarnation,
        data_dir=data_dir,
        keys_dir=data_dir / KEYS_DIR_NAME,
        lock=lock,
        identity=meta.identity,
        status=meta.status,
    )

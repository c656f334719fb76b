"""The chosen log: what a node learned is chosen, kept across restarts (``data_dir/chosen.log``).

A node that knows a key's chosen proposal answers GET from memory (docs/design.md, fast path 1).
That knowledge used to die with the process, so after a restart every key needed a read phase
again, and a node could not know more keys than its memory held. The log keeps it: every
proposal the node learns is chosen is appended (key, then the packed entry of
:mod:`respreg.core.chosen`), and a starting node reads the log back into its cache while it
already serves.

Only knowledge goes in: the acceptor's state stays in the per-key files, and the log is never
needed for safety, so it is appended without fsync. What a crash loses of it is knowledge the
node re-learns the slow way. What it keeps is true forever: a chosen proposal stays chosen.

Format (big-endian): the 5-byte header ``RCHO`` + version ``1``, then blocks, each a 12-byte
header (magic ``CH``, 2 bytes of zero, body length u32, CRC-32 of the body u32) and a body of
entries, each ``key length u32, entry length u32, key, entry``. A reader stops at the first
block that is short or fails its check (a torn append after a crash), and the writer cuts the
file there before it appends. A log grown well past what the cache holds (keys learned again
after the cache forgot them) is rewritten from the cache, in a thread, and renamed into place.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("respreg.chosenlog")

LOG_NAME = "chosen.log"
_FILE_HEAD = b"RCHO\x01"
_BLOCK = struct.Struct(">2sHII")  # magic, zero, body length, crc32 of body
_BLOCK_MAGIC = b"CH"
_ENTRY = struct.Struct(">II")
#: Blocks a writer makes hold at most this much (a reader refuses larger ones: garbage).
BLOCK_MAX = 1 << 20
#: Entries handed out at once while loading (the caller yields to its event loop in between).
LOAD_BATCH = 8192

Record = tuple[bytes, bytes]  # key, packed entry


def encode_blocks(records: list[Record]) -> bytes:
    """``records`` as blocks of at most BLOCK_MAX bytes (a record larger than that gets a block
    of its own; a reader accepts it since it checks each block's length against its own bound)."""
    out: list[bytes] = []
    body: list[bytes] = []
    size = 0
    for key, entry in records:
        part = _ENTRY.pack(len(key), len(entry)) + key + entry
        if body and size + len(part) > BLOCK_MAX:
            out.append(_block(body))
            body, size = [], 0
        body.append(part)
        size += len(part)
    if body:
        out.append(_block(body))
    return b"".join(out)


def _block(parts: list[bytes]) -> bytes:
    body = b"".join(parts)
    return _BLOCK.pack(_BLOCK_MAGIC, 0, len(body), zlib.crc32(body)) + body


def _entries(body: bytes) -> list[Record] | None:
    """The entries of one block body, or None if it does not parse exactly."""
    out: list[Record] = []
    unpack = _ENTRY.unpack_from
    pos, end = 0, len(body)
    try:
        while pos < end:
            kl, el = unpack(body, pos)
            pos += 8
            k_end = pos + kl
            e_end = k_end + el
            if el == 0 or e_end > end:
                return None
            out.append((body[pos:k_end], body[k_end:e_end]))
            pos = e_end
    except struct.error:
        return None
    return out


class ChosenLog:
    """One node's chosen log. Appends happen on the caller's thread; a rewrite prepares the new
    file off it (:meth:`write_file` in a thread) and swaps it in with :meth:`reopen`."""

    def __init__(self, data_dir: Path | str, max_record_bytes: int) -> None:
        self.path = Path(data_dir) / LOG_NAME
        self._max_block = max(BLOCK_MAX, max_record_bytes + 4096)
        #: Bytes of the log that are valid (known after :meth:`load`; appends add to it).
        self.size = 0
        self.records = 0
        self.loaded = False
        self.failed: str | None = None
        #: Records beyond twice the cache's that make the log worth rewriting.
        self.rewrite_slack = 100_000
        self._fd: int | None = None

    # ---- reading -----------------------------------------------------------------------------

    def load(self) -> Iterator[list[Record]]:
        """Every record of the log, in batches, in the order they were appended. Afterwards the
        file ends after its last valid block (a torn tail is cut) and is open for appends."""
        valid = 0
        torn = False
        try:
            with open(self.path, "rb") as f:
                head = f.read(len(_FILE_HEAD))
                if head == _FILE_HEAD:
                    valid = len(head)
                    batch: list[Record] = []
                    while True:
                        raw = f.read(_BLOCK.size)
                        if not raw:
                            break
                        if len(raw) < _BLOCK.size:
                            torn = True
                            break
                        magic, zero, n, crc = _BLOCK.unpack(raw)
                        if magic != _BLOCK_MAGIC or zero != 0 or n > self._max_block:
                            torn = True
                            break
                        body = f.read(n)
                        entries = _entries(body) if len(body) == n and zlib.crc32(body) == crc else None
                        if entries is None:
                            torn = True
                            break
                        valid += _BLOCK.size + n
                        self.records += len(entries)
                        batch.extend(entries)
                        if len(batch) >= LOAD_BATCH:
                            yield batch
                            batch = []
                    if batch:
                        yield batch
                elif head:
                    torn = True
        except FileNotFoundError:
            pass
        if torn:
            log.warning(
                "%s: ignoring its tail after byte %d (an append torn by a crash, or damage); the node "
                "learns those keys again when it reads them",
                self.path,
                valid,
            )
        self.size = valid
        self.loaded = True
        self._open(valid)

    def _open(self, valid: int) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                if valid < len(_FILE_HEAD):
                    os.ftruncate(fd, 0)
                    os.write(fd, _FILE_HEAD)
                    valid = len(_FILE_HEAD)
                else:
                    os.ftruncate(fd, valid)
                os.lseek(fd, valid, os.SEEK_SET)
            except BaseException:
                os.close(fd)
                raise
        except OSError as exc:
            self.fail(exc)
            return
        self._fd = fd
        self.size = valid

    # ---- writing -----------------------------------------------------------------------------

    def append(self, records: list[Record]) -> None:
        """Append ``records`` (no fsync: see the module docstring). After a failed write the log
        takes no more appends until the node restarts; a torn block it left is cut then."""
        if self._fd is None or not records:
            return
        data = encode_blocks(records)
        try:
            written = os.write(self._fd, data)
            while written < len(data):
                written += os.write(self._fd, data[written:])
        except OSError as exc:
            self.fail(exc)
            return
        self.size += len(data)
        self.records += len(records)

    def fail(self, exc: OSError) -> None:
        """Stop using the log (reported in INFO as chosen_log_ok:0) until the node restarts."""
        self.loaded = True
        self.failed = str(exc)
        log.warning("%s: %s; learned values are no longer logged until a restart", self.path, exc)
        self.close()

    def wants_rewrite(self, live_records: int) -> bool:
        """Whether the log holds far more records than the cache it backs (keys appended again
        after the cache forgot them): then :meth:`write_file` of the cache and :meth:`reopen`."""
        return self._fd is not None and self.records > 2 * live_records + self.rewrite_slack

    def write_file(self, records: list[Record]) -> Path:
        """Write ``records`` as a complete log to a temporary file beside the log and fsync it
        (safe in a thread: touches nothing the appends use). :meth:`reopen` renames it in."""
        tmp = self.path.with_name(LOG_NAME + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            data = _FILE_HEAD + encode_blocks(records)
            # Not `view = view[os.write(fd, view):]`: mypyc evaluates a call inside the bounds of a
            # memoryview slice twice, which wrote the data twice.
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:] if written else data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return tmp

    def reopen(self, tmp: Path, records: int) -> None:
        """Put the file :meth:`write_file` made in place of the log; appends go to it from now on."""
        self.close()
        try:
            os.replace(tmp, self.path)
        except OSError as exc:
            self.fail(exc)
            return
        self.records = records
        self.failed = None
        self._open(self.path.stat().st_size)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def write_log(data_dir: Path | str, records: list[Record]) -> None:
    """A complete chosen log holding ``records`` (tools that prepare data directories)."""
    clog = ChosenLog(data_dir, 0)
    clog.reopen(clog.write_file(records), len(records))
    clog.close()

"""Which key files may exist, kept in memory by the serving process (docs/design.md, *The name
index*), so that loading the state of a key that was never written costs no failing ``open``.

A key file is named by the 128-bit hash of its key (``respreg.storage``); this module sees only
those names, as integers. It is compiled (setup.py): at start it reads every file name of the
store once, a loop a million names long.
"""

from __future__ import annotations

import logging
import os
import threading

# (No attribute may be called _thread: mypyc names it __thread in C, a keyword there, and the
# build then falls back to pure Python for every module.)

__all__ = ["KnownNames"]

logger = logging.getLogger(__name__)

#: Bits of the filter (2 MiB); each name sets three of them, taken from its hash.
BITS = 1 << 24
_MASK = BITS - 1
_HEX = frozenset("0123456789abcdef")


def _set(bits: bytearray, name: int) -> None:
    p = name & _MASK
    bits[p >> 3] |= 1 << (p & 7)
    p = (name >> 24) & _MASK
    bits[p >> 3] |= 1 << (p & 7)
    p = (name >> 48) & _MASK
    bits[p >> 3] |= 1 << (p & 7)


def _has(bits: bytearray, name: int) -> bool:
    p = name & _MASK
    if not bits[p >> 3] & (1 << (p & 7)):
        return False
    p = (name >> 24) & _MASK
    if not bits[p >> 3] & (1 << (p & 7)):
        return False
    p = (name >> 48) & _MASK
    return bool(bits[p >> 3] & (1 << (p & 7)))


class KnownNames:
    """A Bloom filter over the names of the key files under ``root`` that may exist.

    Only the process that holds the data directory's lock may keep one: it must see every file
    created there. It learns the names two ways: a thread lists the directories once, from
    :meth:`start` on, and every write adds its key's name (:meth:`add`) before any of its files
    is created (also before the listing starts).
    Until the listing is merged, :meth:`may_exist` says yes to every name; after it, no only for
    a name that was in no directory when listed and was not added since: such a key has no
    file, as a failing ``open`` would have found.

    Bits are only ever set, under a lock (setting one is a read-modify-write of a byte, and more
    than one thread writes); reading needs no lock. With a million names about one absent name
    in 250 gets a false yes, which costs only the ``open`` it would have cost anyway.
    """

    def __init__(self, root: str) -> None:
        self._bits = bytearray(BITS // 8)
        self._lock = threading.Lock()
        #: Set once the listing is merged in; until then every name may exist.
        self.complete = False
        #: Why the listing failed (the filter then stays unused), or None.
        self.failed: str | None = None
        self._lister = threading.Thread(target=self._list, args=(root,), name="respreg-names", daemon=True)
        self.started = False

    def start(self) -> None:
        """Start listing the files (once; later calls do nothing)."""
        if not self.started:
            self.started = True
            self._lister.start()

    def add(self, name: int) -> None:
        """Record a file name (its hash as an integer) before its file is created."""
        with self._lock:
            _set(self._bits, name)

    def may_exist(self, name: int) -> bool:
        return not self.complete or _has(self._bits, name)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the listing (tests, tools); whether it completed."""
        if self.started:
            self._lister.join(timeout)
        return self.complete

    def _list(self, root: str) -> None:
        listed = bytearray(BITS // 8)
        try:
            for top in sorted(os.listdir(root)):
                if len(top) != 2 or not _HEX.issuperset(top):
                    continue  # LAYOUT, .spare, anything that is not one of the 256 directories
                for name in os.listdir(os.path.join(root, top)):
                    if len(name) != 32 or not name.startswith(top):
                        continue  # temp files (".<name>...tmp"), anything that is not a key file
                    try:
                        _set(listed, int(name, 16))
                    except ValueError:
                        continue
        except OSError as exc:
            self.failed = f"listing {root} failed: {exc}"
            logger.warning("key files: %s; every load opens its file", self.failed)
            return
        with self._lock:
            merged = int.from_bytes(self._bits, "little") | int.from_bytes(listed, "little")
            self._bits = bytearray(merged.to_bytes(len(listed), "little"))
            self.complete = True

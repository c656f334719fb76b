"""What a node knows is chosen, per key: a bounded cache, compact enough for millions of keys.

Pure code, like the rest of the core. Each entry is one ``bytes`` object, ``value + pid +
len(pid)`` (one byte; ids longer than 254 bytes end in 255 and a 4-byte length), under its key
in a plain ``dict``: two objects per key, no tuple, no ordered-dict node, nothing the cyclic
garbage collector tracks. About 130 bytes per key beyond the key, value and id themselves
(CPython 3.11), a third of an ``OrderedDict`` of tuples. Entries longer than 1 KiB are held as a
(pid, value) tuple instead, so that a GET does not copy a large value out of its entry.

Eviction is by two generations, an approximation of least-recently-used in O(1): entries go into
the young dict; a hit in the old one moves the entry to the young one; to make room, entries of
the old generation (not used since the last turn) go, and when it is empty the young one turns
old. Forgetting is always safe: a node that does not know a key is chosen
asks a majority (docs/design.md, *Read path*).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

#: Bytes one entry costs beyond its key, id and value (dict slot and two object headers, with
#: allocator rounding), as the process's resident memory shows it on CPython 3.11: a million
#: keys of 22 bytes with 18-byte ids and 24-byte values grew a process by 187 MB.
CHOSEN_ENTRY_OVERHEAD = 128
#: Packed entries longer than this are kept as a (pid, value) tuple instead: a GET then answers
#: the value object itself rather than a copy sliced out of the entry (a copy of up to 1 MiB,
#: where the tuple's 64 bytes do not matter).
LARGE_ENTRY = 1024
_TUPLE_OVERHEAD = 64

_LONG = 255

#: How the cache holds an entry: packed, or (pid, value) when large.
Entry = bytes | tuple[bytes, bytes]


def pack(pid: bytes, value: bytes) -> bytes:
    n = len(pid)
    if n < _LONG:
        return value + pid + bytes((n,))
    return value + pid + n.to_bytes(4, "big") + bytes((_LONG,))


def unpack(entry: bytes) -> tuple[bytes, bytes]:
    """(pid, value) of a packed entry."""
    n = entry[-1]
    end = len(entry) - 1
    if n == _LONG:
        end -= 4
        n = int.from_bytes(entry[end : end + 4], "big")
    return entry[end - n : end], entry[: end - n]


def cost(key: bytes, entry: Entry) -> int:
    if isinstance(entry, bytes):
        return len(key) + len(entry) + CHOSEN_ENTRY_OVERHEAD
    return len(key) + len(entry[0]) + len(entry[1]) + CHOSEN_ENTRY_OVERHEAD + _TUPLE_OVERHEAD


def _packed(e: Entry) -> bytes:
    return e if isinstance(e, bytes) else pack(e[0], e[1])


class ChosenCache:
    """key -> (pid, value) of the chosen proposal, at most ``max_keys`` entries and
    ``max_bytes`` bytes as counted by :func:`cost`."""

    __slots__ = ("max_keys", "max_bytes", "_young", "_old", "_young_bytes", "_old_bytes")

    def __init__(self, max_keys: int, max_bytes: int) -> None:
        self.max_keys = max_keys
        self.max_bytes = max_bytes
        self._young: dict[bytes, Entry] = {}
        self._old: dict[bytes, Entry] = {}
        self._young_bytes = 0
        self._old_bytes = 0

    def __len__(self) -> int:
        return len(self._young) + len(self._old)

    def __contains__(self, key: bytes) -> bool:
        return key in self._young or key in self._old

    @property
    def size_bytes(self) -> int:
        return self._young_bytes + self._old_bytes

    def _entry(self, key: bytes) -> Entry | None:
        """The entry of ``key`` as held (a use: it keeps the entry young)."""
        e = self._young.get(key)
        if e is None:
            e = self._old.pop(key, None)
            if e is not None:
                c = cost(key, e)
                self._old_bytes -= c
                self._put(key, e, c)
        return e

    def get(self, key: bytes) -> tuple[bytes, bytes] | None:
        e = self._entry(key)
        if e is None or isinstance(e, tuple):
            return e
        return unpack(e)

    def value(self, key: bytes) -> bytes | None:
        # The GET hot path. Typed, since compiled (setup.py) isinstance is a C type check.
        e = self._young.get(key)
        if e is None:
            e = self._entry(key)
            if e is None:
                return None
        if isinstance(e, bytes):
            n = e[-1]
            return e[: -1 - n] if n != _LONG else unpack(e)[1]
        return e[1]

    def add(self, key: bytes, pid: bytes, value: bytes) -> bytes | None:
        """Remember that (pid, value) is chosen for ``key``: its packed entry, or None when it was
        known already."""
        if self._entry(key) is not None:
            return None
        packed = pack(pid, value)
        e: Entry = packed if len(packed) <= LARGE_ENTRY else (pid, value)
        self._put(key, e, cost(key, e))
        return packed

    def _put(self, key: bytes, e: Entry, c: int) -> None:
        if c > self.max_bytes or self.max_keys <= 0:
            return
        # Make room first: entries of the old generation go (unused since the last turn); when
        # it is empty, the young one turns old.
        while len(self._young) + len(self._old) >= self.max_keys or self.size_bytes + c > self.max_bytes:
            if not self._old:
                self._old, self._young = self._young, {}
                self._old_bytes, self._young_bytes = self._young_bytes, 0
            k, v = self._old.popitem()
            self._old_bytes -= cost(k, v)
        self._young[key] = e
        self._young_bytes += c

    def items(self) -> list[tuple[bytes, bytes]]:
        """(key, packed entry) of every entry, old ones first (a snapshot: safe to change after)."""
        return [(k, _packed(e)) for gen in (self._old, self._young) for k, e in gen.items()]

    def extend(self, entries: Iterable[tuple[bytes, bytes]]) -> int:
        """Add packed entries (from :meth:`items` or a log); how many were new."""
        young, old = self._young, self._old
        # One entry per key (a key's entries are all alike: it has one chosen proposal), and
        # only keys not held yet (set operations on the keys: no Python loop over the batch).
        fresh = dict(entries)
        for held in (young, old):
            if held:
                for k in fresh.keys() & held.keys():
                    del fresh[k]
        if not fresh:
            return 0
        size = sum(map(len, fresh)) + sum(map(len, fresh.values())) + CHOSEN_ENTRY_OVERHEAD * len(fresh)
        held_as = cast(dict[bytes, Entry], fresh)
        if max(map(len, fresh.values())) > LARGE_ENTRY:
            for k, e in list(fresh.items()):
                if len(e) > LARGE_ENTRY:
                    t = unpack(e)
                    size += cost(k, t) - cost(k, e)
                    held_as[k] = t
        if len(young) + len(old) + len(fresh) <= self.max_keys and self.size_bytes + size <= self.max_bytes:
            # All fit: in at once (a node reading its log back at start: a million entries).
            young.update(held_as)
            self._young_bytes += size
        else:
            for key, e2 in held_as.items():
                self._put(key, e2, cost(key, e2))
        return len(fresh)

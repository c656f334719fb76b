"""The rebuild of an amnesiac member reads the other members' dumps one key directory at a time
(respreg.server.DumpStream), so its memory holds a 256th of the keys, not all of them."""

from __future__ import annotations

import asyncio
import hashlib

from respreg.core.types import AcceptorState
from respreg.server import DumpEntry, DumpStream


def _entries(n: int) -> list[DumpEntry]:
    names = sorted((hashlib.blake2b(b"k%d" % i, digest_size=16).hexdigest(), b"k%d" % i) for i in range(n))
    return [(name, key, AcceptorState()) for name, key in names]


class _Pages:
    """A member's dump as PeerLink.dump serves it: pages after a cursor, None after the last."""

    def __init__(self, entries: list[DumpEntry], page: int) -> None:
        self.entries = entries
        self.page = page
        self.calls = 0

    async def dump(self, cursor: str) -> tuple[str | None, list[DumpEntry]]:
        self.calls += 1
        after = [e for e in self.entries if e[0] > cursor][: self.page]
        return (after[-1][0] if len(after) == self.page else None), after


def test_every_entry_once_in_order_one_prefix_at_a_time() -> None:
    for n, page in ((0, 4), (1, 4), (1000, 7), (1000, 256), (3000, 1)):
        entries = _entries(n)
        pages = _Pages(entries, page)
        stream = DumpStream(pages.dump)

        async def read_all(stream: DumpStream = stream) -> list[list[DumpEntry]]:
            return [await stream.take(f"{i:02x}") for i in range(256)]

        slices = asyncio.run(read_all())
        assert [e for s in slices for e in s] == entries
        for i, chunk in enumerate(slices):
            assert all(name.startswith(f"{i:02x}") for name, _, _ in chunk)
        # Each page is read once: the stream never goes back.
        assert pages.calls == max(1, -(-n // page) + (1 if n % page == 0 else 0))

"""RESP (REdis Serialization Protocol) for the server side: request parsing and reply encoding.

Requests are parsed the way redis-server parses them (``processMultibulkBuffer`` and
``processInlineBuffer``): multibulk arrays of bulk strings, or inline commands split like
``sdssplitargs`` (quotes and escapes), chosen per command by its first byte, so both kinds can
be mixed in one pipelined stream. Malformed input raises :class:`ProtocolError` carrying the
exact text redis-server replies with; the caller answers ``-ERR <text>`` and closes the
connection. Memory is bounded: a bulk longer than ``max_bulk`` or an argument count above
``max_args`` is rejected from its header, before its payload is buffered.

Replies are encoded for RESP2 or RESP3 (``HELLO 3``) from plain Python values; see
:func:`encode`.

This module is sans-IO: bytes in, commands out; values in, bytes out.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

#: Longest inline command or multibulk/bulk header line redis-server accepts (PROTO_INLINE_MAX_SIZE).
MAX_INLINE = 64 * 1024


class ProtocolError(Exception):
    """The client broke the protocol. ``str(exc)`` is the reply text without ``ERR``."""


#: Multibulk count lines and bulk length lines in their canonical form, as a client sends them:
#: most are found here with one lookup (the tables take about 0.5 MB and a millisecond to
#: build). Both parsers use them; anything not found (longer, or not canonical) takes the full
#: check of _strict_int, or in the fast path stops it (see RequestParser._split).
_COUNT_LINES: dict[bytes, int] = {b"*%d" % i: i for i in range(1, 1025)}
_BULK_LINES: dict[bytes, int] = {b"$%d" % i: i for i in range(10_000)}
#: The same lines by length, for the fast path: comparing two short byte strings costs less
#: than hashing one for a lookup.
_LENGTH_LINES: list[bytes] = list(_BULK_LINES)
_COUNT_2: Final = b"*2"
#: The fast path splits at most this many bytes at once.
_SPLIT_WINDOW = 16 * 1024


def _strict_int(text: bytes) -> int | None:
    """Parse a length the way redis-server's ``string2ll`` does: optional '-', digits, no
    leading zeros, no '+', no spaces; None when it would refuse."""
    if not text or len(text) > 20:
        return None
    if text.isdigit():
        if text[0] == 48 and len(text) > 1:
            return None
        return int(text)
    if text[0] == 45 and len(text) > 1 and text[1] != 48 and text[1:].isdigit():
        return -int(text[1:])
    return None


class RequestParser:
    """Incremental request parser: ``feed`` bytes, then call ``next`` until it returns None."""

    __slots__ = (
        "_buf",
        "_pos",
        "_args",
        "_want",
        "_need",
        "_chunks",
        "_chunked",
        "_ready",
        "split",
        "max_bulk",
        "max_args",
    )

    def __init__(self, max_bulk: int = 512 * 1024 * 1024, max_args: int = 1024 * 1024, split: bool = True) -> None:
        self._buf = b""
        self._pos = 0
        self._args: list[bytes] = []  # arguments of a multibulk command read so far
        self._want = 0  # arguments still missing in the current multibulk command (0: none open)
        self._need = 0  # bytes the buffer must hold (from _pos) before parsing can progress
        self._chunks: list[bytes] = []
        self._chunked = 0
        self._ready: deque[list[bytes]] = deque()  # commands the fast path parsed ahead
        #: Whether the fast path may parse ahead (see _split). The limits below apply to what is
        #: parsed after a change; keep the fast path off until they are final.
        self.split = split
        self.max_bulk = max_bulk
        self.max_args = max_args

    def buffered(self) -> int:
        """Bytes received but not yet consumed."""
        return len(self._buf) - self._pos + self._chunked

    def idle(self) -> bool:
        """Whether nothing is buffered: no command parsed ahead and no byte left to parse."""
        return not self._ready and self._pos >= len(self._buf) and not self._chunked

    def feed(self, data: bytes) -> None:
        if self._need and self.buffered() + len(data) < self._need:
            # A large bulk is still arriving: keep the pieces and join them once, when complete.
            self._chunks.append(data)
            self._chunked += len(data)
            return
        if self._chunks:
            data = b"".join(self._chunks) + data
            self._chunks.clear()
            self._chunked = 0
        if self._pos >= len(self._buf):
            self._buf = data
        else:
            self._buf = self._buf[self._pos :] + data
        self._pos = 0
        self._need = 0

    def next_get(self) -> bytes | None:
        """If the next command is a complete ``GET key`` in its canonical form, take it and
        return its key; otherwise take nothing and return None (``next`` then reads whatever
        is there, a GET in another form included).

        The form taken: ``*2 CRLF $3 CRLF GET CRLF $n CRLF key CRLF``, GET in upper or lower
        case, ``n`` the length of the key in plain digits (no sign, no leading zero), at most
        ``max_bulk``. ``next`` reads exactly these bytes as the same command: every line it
        looks at ends at the CR checked here, each length line is the canonical line of its
        number, and each payload is that many bytes (the CRLF after it, which ``next`` skips
        unread, is checked here). Only one command is read, after any ``next`` parsed ahead,
        so requests keep their order and the limits in force apply. This is the hot path of
        pipelined reads: no list, and one bytes object (the key) per command.
        """
        if self._ready or self._want or self._need:
            return None
        buf = self._buf
        pos = self._pos
        size = len(buf)
        if size - pos < 19:  # the shortest: an empty key
            return None
        if (
            buf[pos] != 42  # '*'
            or buf[pos + 1] != 50  # '2'
            or buf[pos + 2] != 13
            or buf[pos + 3] != 10
            or buf[pos + 4] != 36  # '$'
            or buf[pos + 5] != 51  # '3'
            or buf[pos + 6] != 13
            or buf[pos + 7] != 10
            or buf[pos + 11] != 13
            or buf[pos + 12] != 10
            or buf[pos + 13] != 36  # '$'
        ):
            return None
        g = buf[pos + 8]
        if g == 71:  # 'G'
            if buf[pos + 9] != 69 or buf[pos + 10] != 84:  # 'E', 'T'
                return None
        elif g != 103 or buf[pos + 9] != 101 or buf[pos + 10] != 116:  # 'g', 'e', 't'
            return None
        i = pos + 14
        c = buf[i]
        if c == 48:  # '0': only the length 0 itself
            n = 0
            i += 1
        elif 49 <= c <= 57:
            n = c - 48
            i += 1
            # At most 12 digits, each checked to be in the buffer (a longer length is left to next).
            last = min(size, i + 11)
            while i < last:
                c = buf[i]
                if c < 48 or c > 57:
                    break
                n = n * 10 + c - 48
                i += 1
        else:
            return None
        if n > self.max_bulk:
            return None
        start = i + 2
        end = start + n
        if end + 2 > size or buf[i] != 13 or buf[i + 1] != 10 or buf[end] != 13 or buf[end + 1] != 10:
            return None
        self._pos = end + 2
        return buf[start:end]

    def next(self) -> list[bytes] | None:
        """The next complete command, or None if more bytes are needed."""
        ready = self._ready
        if ready:
            return ready.popleft()
        pos = self._pos
        if self.split and not self._want and not self._need and pos < len(self._buf) and self._buf[pos] == 42:
            self._split()  # a multibulk command ('*') starts here
            if ready:
                return ready.popleft()
        while True:
            buf = self._buf
            pos = self._pos
            if self._need or pos >= len(buf):
                return None
            if self._want == 0:
                if buf[pos] != 42:  # not '*': an inline command
                    cmd = self._inline()
                    if cmd is None:
                        return None
                    if cmd:
                        return cmd
                    continue  # an empty line: ignored, like redis-server
                # Like redis-server: the line ends at the first CR, and one more byte (the LF,
                # not checked) must have arrived.
                nl = buf.find(b"\r", pos)
                if nl < 0 or nl + 1 >= len(buf):
                    if len(buf) - pos > MAX_INLINE:
                        raise ProtocolError("Protocol error: too big mbulk count string")
                    return None
                count = _COUNT_LINES.get(buf[pos:nl])
                if count is None:
                    count = _strict_int(buf[pos + 1 : nl])
                if count is None or count > self.max_args or count > 2147483647:
                    raise ProtocolError("Protocol error: invalid multibulk length")
                self._pos = pos = nl + 2
                if count <= 0:
                    continue  # an empty multibulk is skipped, like redis-server
                self._want = count
                self._args = []
            # Bulk strings of the open multibulk command.
            args = self._args
            while self._want:
                if pos >= len(buf):
                    self._pos = pos
                    return None
                nl = buf.find(b"\r", pos)
                if nl < 0 or nl + 1 >= len(buf):
                    if len(buf) - pos > MAX_INLINE:
                        raise ProtocolError("Protocol error: too big bulk count string")
                    self._pos = pos
                    return None
                if buf[pos] != 36:  # '$'
                    raise ProtocolError(f"Protocol error: expected '$', got '{chr(buf[pos])}'")
                size = _BULK_LINES.get(buf[pos:nl])
                if size is None:
                    size = _strict_int(buf[pos + 1 : nl])
                if size is None or size < 0 or size > self.max_bulk:
                    raise ProtocolError("Protocol error: invalid bulk length")
                start = nl + 2
                end = start + size
                if end + 2 > len(buf):
                    self._pos = pos
                    self._need = end + 2 - pos
                    return None
                args.append(buf[start:end])
                pos = end + 2  # redis-server does not check the CRLF after the payload either
                self._want -= 1
            self._pos = pos
            self._args = []
            return args

    def _split(self) -> None:
        """The fast path: parse the well-formed multibulk commands at the start of the buffer
        (up to _SPLIT_WINDOW bytes) with one ``split`` into ``_ready``, and stop at the first
        thing it does not take, which the full parser then reads from where this one stopped.

        It takes a command only when its count line and every bulk length line are one of the
        canonical forms above, within ``max_args`` and ``max_bulk``, and every payload is
        followed by CRLF. The full parser reads such a command the same way: a line that equals
        ``$n`` was followed by CRLF, so it ended at the first CR, where the full parser ends it;
        a part after it of exactly ``n`` bytes is followed by CRLF and contains none, so it is
        the payload the full parser reads (n bytes on). A payload that contains CRLF, or is not
        followed by it, splits into parts of other lengths, and the fast path stops there. A
        failed attempt costs one copy and split of at most _SPLIT_WINDOW bytes.
        """
        pos = self._pos
        window = self._buf[pos : pos + _SPLIT_WINDOW]
        parts = window.split(b"\r\n")
        last = len(parts) - 1  # parts[last] is not followed by CRLF: never a complete line
        count_of = _COUNT_LINES.get
        ready = self._ready
        max_args = self.max_args
        max_bulk = self.max_bulk
        check_bulk = max_bulk < len(_BULK_LINES) - 1  # else every length it takes is allowed
        heads = _LENGTH_LINES
        known = len(heads)
        pairs = max_args >= 2
        i = 0
        while i < last:
            line = parts[i]
            if line == _COUNT_2 and pairs:
                # The most common shape (GET key) checked without a lookup: each length line
                # must be the canonical line of its payload's length (as a lookup in _BULK_LINES would say).
                end = i + 5
                if end > last:
                    break
                a1 = parts[i + 2]
                a2 = parts[i + 4]
                n1 = len(a1)
                n2 = len(a2)
                if (
                    n1 >= known
                    or n2 >= known
                    or parts[i + 1] != heads[n1]
                    or parts[i + 3] != heads[n2]
                    or (check_bulk and max(n1, n2) > max_bulk)
                ):
                    break
                ready.append([a1, a2])
                i = end
                continue
            count = count_of(line)
            if count is None or count > max_args:
                break
            end = i + 1 + 2 * count
            if end > last:
                break
            # (A count of 2 is taken above: only "*2" counts 2, and past max_args it stops.)
            # Each length line must be the canonical line of its payload's length, as above.
            j = i + 1
            while j < end:
                n = len(parts[j + 1])
                if n >= known or parts[j] != heads[n] or (check_bulk and n > max_bulk):
                    break
                j += 2
            if j < end:
                break
            ready.append(parts[i + 2 : end : 2])
            i = end
        if i == last and not parts[last]:
            self._pos = pos + len(window)  # the whole window, which ends with a CRLF, was taken
        elif i:
            self._pos = pos + sum(map(len, parts[:i])) + 2 * i

    def _inline(self) -> list[bytes] | None:
        buf = self._buf
        pos = self._pos
        nl = buf.find(b"\n", pos)
        if nl < 0:
            if len(buf) - pos > MAX_INLINE:
                raise ProtocolError("Protocol error: too big inline request")
            return None
        if nl - pos > MAX_INLINE:
            raise ProtocolError("Protocol error: too big inline request")
        line = buf[pos:nl]
        if line.endswith(b"\r"):
            line = line[:-1]
        self._pos = nl + 1
        args = split_args(line)
        if args is None:
            raise ProtocolError("Protocol error: unbalanced quotes in request")
        return args


_ESCAPES = {ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("b"): 8, ord("a"): 7}
_SPACE = b" \n\r\t\v\f"  # isspace(): skipped between arguments, and allowed after a closing quote
_ENDS_ARG = b" \n\r\t"  # what ends an unquoted argument in sdssplitargs (NUL bytes are kept)
_HEX = b"0123456789abcdefABCDEF"


def split_args(line: bytes) -> list[bytes] | None:
    """Split an inline command like redis-server's ``sdssplitargs``; None on unbalanced quotes."""
    if b'"' not in line and b"'" not in line and b"\v" not in line and b"\f" not in line:
        return line.split()
    out: list[bytes] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in _SPACE:
            i += 1
        if i >= n:
            return out
        cur = bytearray()
        in_dq = in_sq = False
        while True:
            if in_dq:
                if i >= n:
                    return None
                c = line[i]
                if c == 92 and i + 3 < n and line[i + 1] == ord("x") and line[i + 2] in _HEX and line[i + 3] in _HEX:
                    cur.append(int(line[i + 2 : i + 4], 16))
                    i += 3
                elif c == 92 and i + 1 < n:
                    i += 1
                    cur.append(_ESCAPES.get(line[i], line[i]))
                elif c == 34:
                    if i + 1 < n and line[i + 1] not in _SPACE:
                        return None  # closing quote must be followed by a space or nothing
                    in_dq = False
                    i += 1
                    break
                else:
                    cur.append(c)
            elif in_sq:
                if i >= n:
                    return None
                c = line[i]
                if c == 92 and i + 1 < n and line[i + 1] == 39:
                    i += 1
                    cur.append(39)
                elif c == 39:
                    if i + 1 < n and line[i + 1] not in _SPACE:
                        return None
                    in_sq = False
                    i += 1
                    break
                else:
                    cur.append(c)
            else:
                if i >= n:
                    break
                c = line[i]
                if c in _ENDS_ARG:
                    break
                if c == 34:
                    in_dq = True
                elif c == 39:
                    in_sq = True
                else:
                    cur.append(c)
            i += 1
        out.append(bytes(cur))


# ---- replies ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Simple:
    """A simple string reply (``+OK``)."""

    text: str


@dataclass(frozen=True, slots=True)
class Error:
    """An error reply; ``text`` starts with the error code (``ERR``, ``NOQUORUM``, ...)."""

    text: str


@dataclass(frozen=True, slots=True)
class Verbatim:
    """RESP3 verbatim string (``=``); a bulk string in RESP2. INFO replies with one."""

    text: str
    fmt: str = "txt"


OK = b"+OK\r\n"
NIL2 = b"$-1\r\n"
NIL3 = b"_\r\n"
PONG = b"+PONG\r\n"


_BULK_HEADS = [b"$%d\r\n" % n for n in range(1024)]


def bulk(value: bytes) -> bytes:
    n = len(value)
    if n < 1024:
        return _BULK_HEADS[n] + value + b"\r\n"
    return b"$%d\r\n%s\r\n" % (n, value)


def error(text: str | bytes) -> bytes:
    """An error reply; newlines are not allowed inside, so they become spaces (as in Redis)."""
    data = text.encode("utf-8", "replace") if isinstance(text, str) else text
    return b"-" + data.replace(b"\r", b" ").replace(b"\n", b" ") + b"\r\n"


Value = (
    bytes
    | str
    | int
    | float
    | bool
    | None
    | Simple
    | Error
    | Verbatim
    | list["Value"]
    | tuple["Value", ...]
    | Mapping[str, "Value"]
    | Mapping[bytes, "Value"]
)


def encode(value: Value, resp3: bool) -> bytes:
    """Encode a Python value as a reply.

    bytes/str: bulk string; int: integer; float: double (RESP3) or bulk; bool: boolean (RESP3)
    or integer 1/0; None: null; list/tuple: array; mapping: map (RESP3) or flat array (RESP2);
    :class:`Simple`, :class:`Error`, :class:`Verbatim` as named.
    """
    out: list[bytes] = []
    _encode(value, resp3, out)
    return b"".join(out)


def _encode(value: Value, resp3: bool, out: list[bytes]) -> None:
    if isinstance(value, bytes):
        out.append(b"$%d\r\n%s\r\n" % (len(value), value))
    elif isinstance(value, str):
        data = value.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    elif isinstance(value, bool):
        if resp3:
            out.append(b"#t\r\n" if value else b"#f\r\n")
        else:
            out.append(b":1\r\n" if value else b":0\r\n")
    elif isinstance(value, int):
        out.append(b":%d\r\n" % value)
    elif isinstance(value, float):
        text = repr(value).encode()
        out.append(b",%s\r\n" % text if resp3 else b"$%d\r\n%s\r\n" % (len(text), text))
    elif value is None:
        out.append(NIL3 if resp3 else NIL2)
    elif isinstance(value, Simple):
        out.append(b"+%s\r\n" % value.text.encode())
    elif isinstance(value, Error):
        out.append(error(value.text))
    elif isinstance(value, Verbatim):
        data = value.text.encode()
        if resp3:
            out.append(b"=%d\r\n%s:%s\r\n" % (len(data) + 4, value.fmt.encode(), data))
        else:
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    elif isinstance(value, (list, tuple)):
        out.append(b"*%d\r\n" % len(value))
        for item in value:
            _encode(item, resp3, out)
    elif isinstance(value, Mapping):
        out.append(b"%%%d\r\n" % len(value) if resp3 else b"*%d\r\n" % (2 * len(value)))
        for k, v in value.items():
            _encode(k, resp3, out)
            _encode(v, resp3, out)
    else:  # pragma: no cover - a programming error, not client input
        raise TypeError(f"cannot encode {type(value).__name__}")

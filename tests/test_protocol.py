"""The Redis wire protocol as respreg speaks it: the request parser on its own, then raw sockets
against a real 3-node cluster, compared byte for byte with what redis-server 7 answers.

The expected replies in ``WIRE_CASES`` are redis-server 7.0's; when ``redis-server`` is
installed, ``test_reference_redis_gives_the_expected_reply`` checks that table against a real
one (started here on a free loopback port and stopped by PID).
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from respreg.resp import ProtocolError, RequestParser, split_args

from .cluster import HOST, Cluster, multibulk, read_to_eof, recv_exactly, reference_redis, running

# ---- helpers -----------------------------------------------------------------------------------

IO_LIMIT_S = 15.0


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def parse_all(data: bytes, parser: RequestParser | None = None) -> list[list[bytes]]:
    p = parser or RequestParser()
    p.feed(data)
    out: list[list[bytes]] = []
    for _ in range(len(data) + 1):
        cmd = p.next()
        if cmd is None:
            return out
        out.append(cmd)
    raise AssertionError("the parser kept returning commands")


def exchange(port: int, data: bytes, expected: bytes, closes: bool) -> tuple[bytes, bool]:
    """Send ``data`` on a new connection and read until the server closes it, the reply equals
    ``expected`` (when the connection should stay open), or the reply stops matching.

    Returns what was received and whether the server closed the connection."""
    with socket.create_connection((HOST, port), timeout=IO_LIMIT_S) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may close before reading everything (it answered the error first)
        got = bytearray()
        deadline = time.monotonic() + IO_LIMIT_S
        while time.monotonic() < deadline:
            if not closes and got == expected:
                return bytes(got), False
            if not expected.startswith(bytes(got)):
                return bytes(got), False  # diverged: no need to wait for the rest
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return bytes(got), True
            except TimeoutError:
                break
            if not chunk:
                return bytes(got), True
            got += chunk
        return bytes(got), False


def ping_ok(port: int) -> bool:
    with socket.create_connection((HOST, port), timeout=IO_LIMIT_S) as s:
        s.sendall(b"PING\r\n")
        return recv_exactly(s, 7) == b"+PONG\r\n"


def proc_status(pid: int) -> dict[str, int]:
    """The kB figures of /proc/<pid>/status (VmRSS, VmHWM, ...)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0])
    return out


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One 3-node cluster shared by the tests of this module that leave no state behind (each
    uses its own keys). Requests get 10 s before a NOQUORUM answer, so a busy machine does not
    turn a slow quorum into a wrong reply."""
    with running(tmp_path_factory.mktemp("protocol-cluster"), deadline_ms=10_000) as c:
        yield c


@pytest.fixture(scope="module")
def max_bulk(shared: Cluster) -> int:
    value = shared.client(1, protocol=2).config_get("proto-max-bulk-len")
    assert isinstance(value, dict) and len(value) == 1
    (text,) = value.values()
    assert isinstance(text, (str, bytes))
    return int(text)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, max_bulk: int) -> Iterator[int]:
    """The client port of a real redis-server with respreg's proto-max-bulk-len."""
    with reference_redis(tmp_path_factory.mktemp("redis-reference"), "--proto-max-bulk-len", str(max_bulk)) as port:
        yield port


# ---- the parser on its own ---------------------------------------------------------------------


def test_inline_commands() -> None:
    assert parse_all(b"PING\r\n") == [[b"PING"]]
    assert parse_all(b"SETONCE a b\n") == [[b"SETONCE", b"a", b"b"]]
    assert parse_all(b"  GET   k  \t\r\n") == [[b"GET", b"k"]]
    assert parse_all(b"SET \"a b\" 'x' NX\r\n") == [[b"SET", b"a b", b"x", b"NX"]]
    assert parse_all(b'ECHO "\\x41\\n"\r\n') == [[b"ECHO", b"A\n"]]
    assert parse_all(b"ECHO \"\" ''\r\n") == [[b"ECHO", b"", b""]]
    assert parse_all(b"PING\rPING\r\n") == [[b"PING", b"PING"]]  # a lone CR separates, like a space


def test_empty_lines_and_empty_multibulks_are_ignored() -> None:
    assert parse_all(b"\r\n\n   \r\n\t\nPING\r\n*0\r\n*-1\r\n\r\nECHO x\n") == [[b"PING"], [b"ECHO", b"x"]]
    assert parse_all(b"\r\n\r\n") == []


def test_multibulk_and_inline_mixed_in_one_buffer() -> None:
    data = b"PING\r\n" + multibulk(b"SETONCE", b"k", b"a\r\nb") + b"GET k\n" + multibulk(b"ECHO", b"")
    assert parse_all(data) == [[b"PING"], [b"SETONCE", b"k", b"a\r\nb"], [b"GET", b"k"], [b"ECHO", b""]]


def test_crlf_after_a_bulk_is_not_checked_like_redis() -> None:
    # redis-server skips two bytes after a bulk's payload without looking at them.
    assert parse_all(b"*1\r\n$4\r\nPINGxxPING\r\n") == [[b"PING"], [b"PING"]]


def test_incomplete_commands_wait_for_more_bytes() -> None:
    p = RequestParser()
    data = multibulk(b"SETONCE", b"key", b"value") + b"GET key\r\n"
    got: list[list[bytes]] = []
    for i in range(len(data)):
        p.feed(data[i : i + 1])
        while (cmd := p.next()) is not None:
            got.append(cmd)
        if i < len(data) - 1:
            assert p.buffered() <= i + 1
    assert got == [[b"SETONCE", b"key", b"value"], [b"GET", b"key"]]
    assert p.buffered() == 0
    assert p.next() is None


def test_large_bulk_in_small_pieces() -> None:
    value = bytes(range(256)) * 4096  # 1 MiB
    data = multibulk(b"SETONCE", b"big", value) + b"PING\r\n"
    p = RequestParser()
    got: list[list[bytes]] = []
    step = 4093
    for start in range(0, len(data), step):
        p.feed(data[start : start + step])
        while (cmd := p.next()) is not None:
            got.append(cmd)
        if not got:
            assert p.buffered() == min(len(data), start + step) - len(b"*3\r\n$7\r\nSETONCE\r\n$3\r\nbig\r\n")
    assert got == [[b"SETONCE", b"big", value], [b"PING"]]
    assert p.buffered() == 0


def test_oversized_bulk_rejected_from_its_header() -> None:
    p = RequestParser(max_bulk=16)
    p.feed(b"*2\r\n$4\r\nECHO\r\n$16\r\n")
    assert p.next() is None  # 16 bytes are allowed: it waits for them
    p.feed(b"0123456789abcdef\r\n")
    assert p.next() == [b"ECHO", b"0123456789abcdef"]
    p.feed(b"*2\r\n$4\r\nECHO\r\n$17\r\n")  # no payload sent: rejected from the header
    with pytest.raises(ProtocolError) as exc:
        p.next()
    assert str(exc.value) == "Protocol error: invalid bulk length"


def test_argument_count_above_max_args_rejected_from_the_header() -> None:
    p = RequestParser(max_args=4)
    p.feed(b"*4\r\n")
    assert p.next() is None
    p = RequestParser(max_args=4)
    p.feed(b"*5\r\n")
    with pytest.raises(ProtocolError) as exc:
        p.next()
    assert str(exc.value) == "Protocol error: invalid multibulk length"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"*abc\r\n", "Protocol error: invalid multibulk length"),
        (b"*\r\n", "Protocol error: invalid multibulk length"),
        (b"*2147483648\r\n", "Protocol error: invalid multibulk length"),
        (b"*1\r\n+x\r\n", "Protocol error: expected '$', got '+'"),
        (b"*2\r\n$4\r\nECHO\r\n:1\r\n", "Protocol error: expected '$', got ':'"),
        (b"*1\r\n$-5\r\n", "Protocol error: invalid bulk length"),
        (b"*1\r\n$-1\r\n", "Protocol error: invalid bulk length"),
        (b"*1\r\n$\r\n", "Protocol error: invalid bulk length"),
        (b"*1\r\n$x\r\n", "Protocol error: invalid bulk length"),
        (b"*1\r\n$536870913\r\n", "Protocol error: invalid bulk length"),
        (b'SET "a\r\n', "Protocol error: unbalanced quotes in request"),
        (b"GET 'a\r\n", "Protocol error: unbalanced quotes in request"),
        (b'GET "a"b\r\n', "Protocol error: unbalanced quotes in request"),
        (b'ECHO "a\\"\r\n', "Protocol error: unbalanced quotes in request"),
        (b"x" * 70_000, "Protocol error: too big inline request"),
        (b"*" + b"1" * 70_000, "Protocol error: too big mbulk count string"),
        (b"*1\r\n$" + b"1" * 70_000, "Protocol error: too big bulk count string"),
    ],
    ids=lambda v: repr(v[:24]) if isinstance(v, bytes) else "",
)
def test_protocol_errors(data: bytes, message: str) -> None:
    p = RequestParser()
    p.feed(data)
    with pytest.raises(ProtocolError) as exc:
        for _ in range(10):
            p.next()
    assert str(exc.value) == message


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"*01\r\n", "Protocol error: invalid multibulk length"),
        (b"*+1\r\n", "Protocol error: invalid multibulk length"),
        (b"* 1\r\n", "Protocol error: invalid multibulk length"),
        (b"*1 \r\n", "Protocol error: invalid multibulk length"),
        (b"*0_1\r\n", "Protocol error: invalid multibulk length"),
        (b"*-0\r\n", "Protocol error: invalid multibulk length"),
        (b"*1\r\n$04\r\n", "Protocol error: invalid bulk length"),
        (b"*1\r\n$+4\r\n", "Protocol error: invalid bulk length"),
        (b"*1\r\n$ 4\r\n", "Protocol error: invalid bulk length"),
        (b"*1\r\n$4\t\r\n", "Protocol error: invalid bulk length"),
        (b"*1\r\n$0_4\r\n", "Protocol error: invalid bulk length"),
        (b"*1\r\n$-0\r\n", "Protocol error: invalid bulk length"),
    ],
    ids=lambda v: repr(v) if isinstance(v, bytes) else "",
)
def test_lengths_must_be_plain_decimal_like_redis(data: bytes, message: str) -> None:
    p = RequestParser()
    p.feed(data + b"$4\r\nPING\r\nPING\r\n")
    with pytest.raises(ProtocolError) as exc:
        for _ in range(10):
            p.next()
    assert str(exc.value) == message


# sdssplitargs (redis-server's inline splitter) transcribed from its C source, as the reference.
_C_SPACE = frozenset(b" \t\n\v\f\r")  # isspace() in the C locale
_C_ESCAPES = {ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("b"): 8, ord("a"): 7}
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")


def sdssplitargs(line: bytes) -> list[bytes] | None:
    """Reference splitter; ``line`` must not contain NUL (the C code stops there)."""
    assert 0 not in line

    def at(i: int) -> int:
        return line[i] if i < len(line) else 0

    out: list[bytes] = []
    p = 0
    while True:
        while at(p) and at(p) in _C_SPACE:
            p += 1
        if not at(p):
            return out
        cur = bytearray()
        in_dq = in_sq = done = False
        while not done:
            c = at(p)
            if in_dq:
                if c == ord("\\") and at(p + 1) == ord("x") and at(p + 2) in _HEX_DIGITS and at(p + 3) in _HEX_DIGITS:
                    cur.append(int(bytes([at(p + 2), at(p + 3)]), 16))
                    p += 3
                elif c == ord("\\") and at(p + 1):
                    p += 1
                    cur.append(_C_ESCAPES.get(at(p), at(p)))
                elif c == ord('"'):
                    if at(p + 1) and at(p + 1) not in _C_SPACE:
                        return None
                    done = True
                elif not c:
                    return None
                else:
                    cur.append(c)
            elif in_sq:
                if c == ord("\\") and at(p + 1) == ord("'"):
                    p += 1
                    cur.append(ord("'"))
                elif c == ord("'"):
                    if at(p + 1) and at(p + 1) not in _C_SPACE:
                        return None
                    done = True
                elif not c:
                    return None
                else:
                    cur.append(c)
            elif c in (ord(" "), ord("\n"), ord("\r"), ord("\t"), 0):
                done = True
            elif c == ord('"'):
                in_dq = True
            elif c == ord("'"):
                in_sq = True
            else:
                cur.append(c)
            if at(p):
                p += 1
        out.append(bytes(cur))


@pytest.mark.parametrize(
    ("line", "args"),
    [
        (b"", []),
        (b"   ", []),
        (b"a b  c", [b"a", b"b", b"c"]),
        (b'"a b" c', [b"a b", b"c"]),
        (b"'a b' c", [b"a b", b"c"]),
        (b'a"b c"d', None),  # the closing quote must be followed by a space or the end
        (b'a"b c" d', [b"ab c", b"d"]),
        (b'"\\x41\\x4a\\x4A"', [b"AJJ"]),
        (b'"\\xZZ\\x4"', [b"xZZx4"]),
        (b'"\\n\\r\\t\\b\\a\\q\\\\\\""', [b'\n\r\t\b\aq\\"']),
        (b"'a\\nb'", [b"a\\nb"]),  # no escapes in single quotes...
        (b"'it\\'s'", [b"it's"]),  # ...but \' is one
        (b"'it''s'", None),
        (b'"abc', None),
        (b"'abc", None),
        (b'"a\\"', None),
        (b'""', [b""]),
        (b"'' \"\"", [b"", b""]),
        (b"\"a\"\t'b'", [b"a", b"b"]),
        (b"\xff\xfe \xc3\xa9", [b"\xff\xfe", b"\xc3\xa9"]),
    ],
)
def test_split_args_examples(line: bytes, args: list[bytes] | None) -> None:
    assert sdssplitargs(line) == args
    assert split_args(line) == args


@pytest.mark.parametrize(
    ("line", "args"),
    [
        (b"ECHO a\x0bb", [b"ECHO", b"a\x0bb"]),
        (b"ECHO a\x0cb", [b"ECHO", b"a\x0cb"]),
        (b'ECHO a\x0b"b"', [b"ECHO", b"a\x0bb"]),
        (b"a\x0b", [b"a\x0b"]),
    ],
)
def test_split_args_vertical_tab_and_form_feed_inside_an_argument(line: bytes, args: list[bytes]) -> None:
    assert sdssplitargs(line) == args
    assert split_args(line) == args


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(list(b"ab\\x4F1 \t\r\n\"'")), max_size=30).map(bytes))
def test_split_args_matches_sdssplitargs(line: bytes) -> None:
    # \v and \f are left out here: test_split_args_vertical_tab_and_form_feed_inside_an_argument.
    assert split_args(line) == sdssplitargs(line)


BARE = frozenset(b"abcXYZ0189:_-.{}")


def _inline_arg(arg: bytes, style: int) -> bytes:
    if style == 0 and arg and all(c in BARE for c in arg):
        return arg
    if style == 1 and not any(c in arg for c in b"'\\\r\n"):
        return b"'" + arg + b"'"
    if style == 2:
        return b'"' + b"".join(b"\\x%02x" % c for c in arg) + b'"'
    out = bytearray(b'"')
    for c in arg:
        if c in (ord('"'), ord("\\")):
            out += b"\\" + bytes([c])
        elif 32 <= c < 127:
            out.append(c)
        else:
            out += b"\\x%02X" % c
    return bytes(out + b'"')


@st.composite
def request_streams(draw: st.DrawFn) -> tuple[bytes, list[list[bytes]]]:
    """A stream of pipelined requests (both encodings, with ignorable noise) and its commands."""
    arg = st.one_of(
        st.binary(max_size=24), st.text(alphabet="abcXYZ0189:_-.{}", min_size=1, max_size=8).map(str.encode)
    )
    commands = draw(st.lists(st.lists(arg, min_size=1, max_size=5), min_size=1, max_size=12))
    out = bytearray()
    for args in commands:
        out += draw(st.sampled_from([b"", b"", b"\r\n", b"\n", b"  \t \r\n", b"*0\r\n", b"*-1\r\n"]))
        if draw(st.booleans()):
            out += multibulk(*args)
        else:
            out += draw(st.sampled_from([b"", b" ", b"\t "]))
            out += b" ".join(_inline_arg(a, draw(st.integers(0, 3))) for a in args)
            out += draw(st.sampled_from([b"\r\n", b"\n", b"  \r\n"]))
    return bytes(out), commands


@settings(max_examples=150, deadline=None)
@given(request_streams(), st.data())
def test_any_split_of_a_pipeline_parses_the_same(stream: tuple[bytes, list[list[bytes]]], data: st.DataObject) -> None:
    raw, commands = stream
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(raw)), max_size=40), label="cuts")))
    p = RequestParser()
    got: list[list[bytes]] = []
    prev = 0
    for cut in [*cuts, len(raw)]:
        p.feed(raw[prev:cut])
        prev = cut
        for _ in range(len(raw) + 1):
            cmd = p.next()
            if cmd is None:
                break
            got.append(cmd)
    assert got == commands
    assert p.buffered() == 0


def _parse_all(
    raw: bytes, cuts: list[int], split: bool, limits: tuple[int, int], gets_first: bool = False
) -> tuple[list[list[bytes]], str | None, int, int]:
    """Feed ``raw`` in pieces; every command, the protocol error (if any), the bytes left and
    how many GETs ``next_get`` took. With ``gets_first`` each command is read as the client
    loop reads it: ``next_get`` first, ``next`` when that takes nothing (GETs then come as
    ``[b"GET", key]``, see _normal)."""
    p = RequestParser(max_bulk=limits[0], max_args=limits[1], split=split)
    got: list[list[bytes]] = []
    taken = 0
    prev = 0
    for cut in [*cuts, len(raw)]:
        p.feed(raw[prev:cut])
        prev = cut
        try:
            for _ in range(len(raw) + 1):
                key = p.next_get() if gets_first else None
                if key is not None:
                    taken += 1
                    got.append([b"GET", key])
                    continue
                cmd = p.next()
                if cmd is None:
                    break
                got.append(_normal(cmd) if gets_first else cmd)
        except ProtocolError as exc:
            return got, str(exc), p.buffered(), taken
    return got, None, p.buffered(), taken


def _normal(cmd: list[bytes]) -> list[bytes]:
    return [b"GET", cmd[1]] if len(cmd) == 2 and cmd[0] in (b"GET", b"get") else cmd


#: Pieces of well-formed and broken multibulk requests: the fast path must stop at anything it
#: does not take exactly as the full parser would read it.
_PIECES = st.sampled_from(
    [
        b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n",
        b"*3\r\n$7\r\nSETONCE\r\n$1\r\nk\r\n$2\r\nv1\r\n",
        b"*1\r\n$4\r\nPING\r\n",
        b"*2\r\n$3\r\nGET\r\n$4\r\na\r\nb\r\n",  # CRLF inside a payload
        b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$4\r\nv\r\nw\r\n",
        b"*2\r\n$3\r\nGET\r\n$1\r\nkXY",  # no CRLF after the payload
        b"*2\r\n$3\r\nGET\r\n$01\r\nk\r\n",  # a length with a leading zero
        b"*2\r\n$3\r\nGET\r\n$2\r\nk\r\n",  # a length one more than the payload
        b"*2\r\n$3\r\nGET\r\n$0\r\n\r\n",  # an empty argument
        b"*2\r\n$3\r\nGET\r\n$1 \r\nk\r\n",  # a space after the length
        b"*2\r\n$3\r\nGET\r\n$-1\r\n",
        b"*2\r\n$3\r\nGET\r\n:1\r\n",
        b"*2\r\n$3\rXGET\r\n$1\r\nk\r\n",  # CR not followed by LF
        b"*02\r\n$3\r\nGET\r\n$1\r\nk\r\n",
        b"*0\r\n",
        b"*-1\r\n",
        b"*1025\r\n",
        b"$3\r\nGET\r\n",
        b"GET k\r\n",
        b"\r\n",
        b"*2\r\n$3\r\nSET\r\n$20000\r\n" + b"x" * 20000 + b"\r\n",
        b"*2\r\n$3\r\nSET\r\n$9000\r\n" + b"y" * 9000 + b"\r\n",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_PIECES, min_size=1, max_size=12), st.data())
def test_the_split_fast_path_parses_exactly_like_the_full_parser(pieces: list[bytes], data: st.DataObject) -> None:
    """Split anywhere, under the default limits and tight ones (max_bulk, max_args)."""
    raw = b"".join(pieces)
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(raw)), max_size=8), label="cuts")))
    for limits in [(512 * 1024 * 1024, 1024 * 1024), (100, 1024 * 1024), (512 * 1024 * 1024, 2), (3, 16)]:
        assert _parse_all(raw, cuts, True, limits) == _parse_all(raw, cuts, False, limits), limits


_GET_PIECES = st.one_of(
    _PIECES,
    st.sampled_from(
        [
            b"*2\r\n$3\r\nget\r\n$3\r\nabc\r\n",
            b"*2\r\n$3\r\nGeT\r\n$1\r\nk\r\n",  # mixed case: next reads it
            b"*2\r\n$3\r\nGET\r\n$1\r\nk\rX",  # no CRLF after the payload, which next skips unread
            b"*2\r\n$4\r\nGETX\r\n$1\r\nk\r\n",
            b"*2\r\n$3\r\nGET\r\n$12\r\n" + b"k" * 12 + b"\r\n",
            b"*2\r\n$3\r\nGET\r\n$101\r\n" + b"q" * 101 + b"\r\n",  # above the tight max_bulk below
            b"*2\r\n$3\r\nGET\r\n$0000000000001\r\nk\r\n",
            b"*2\r\n$3\r\nGET\r\n$1234567890123\r\n",
            b"*2\r\n$3\r\nGET\r\n$4\r\n\r\n\r\n\r\n",  # a key of CRLF CRLF
        ]
    ),
    st.binary(min_size=1, max_size=6).map(lambda k: b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(k), k)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_GET_PIECES, min_size=1, max_size=12), st.data())
def test_next_get_takes_gets_exactly_as_the_full_parser_reads_them(pieces: list[bytes], data: st.DataObject) -> None:
    raw = b"".join(pieces)
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(raw)), max_size=8), label="cuts")))
    for limits in [(512 * 1024 * 1024, 1024 * 1024), (100, 1024 * 1024), (3, 16)]:
        got, err, left, _ = _parse_all(raw, cuts, True, limits, gets_first=True)
        full, full_err, full_left, _ = _parse_all(raw, cuts, False, limits)
        assert (got, err, left) == ([_normal(c) for c in full], full_err, full_left), limits


def test_next_get_takes_a_pipeline_of_gets_and_nothing_else() -> None:
    gets = b"".join(multibulk(b"GET", b"key:%d" % i) for i in range(16)) + multibulk(b"get", b"")
    raw = gets + multibulk(b"SET", b"a", b"b") + gets[:10]  # ends inside a GET
    limits = (512 * 1024 * 1024, 1024 * 1024)
    got, err, left, taken = _parse_all(raw, [], True, limits, gets_first=True)
    assert taken == 17 and err is None
    assert got == [[b"GET", b"key:%d" % i] for i in range(16)] + [[b"GET", b""], [b"SET", b"a", b"b"]]
    assert left == _parse_all(raw, [], False, limits)[2] > 0
    p = RequestParser()
    p.feed(multibulk(b"SET", b"a", b"b") + gets)
    assert p.next_get() is None and p.next() == [b"SET", b"a", b"b"]  # a GET behind a SET waits its turn


# ---- on the wire, compared with redis-server 7 -------------------------------------------------


@dataclass(frozen=True)
class WireCase:
    id: str
    data: bytes
    reply: bytes  # redis-server 7.0's reply to data
    closes: bool  # whether redis-server then closes the connection


PROTO_MBULK = b"-ERR Protocol error: invalid multibulk length\r\n"
PROTO_BULK = b"-ERR Protocol error: invalid bulk length\r\n"
PROTO_QUOTES = b"-ERR Protocol error: unbalanced quotes in request\r\n"
E_ACUTE_100 = "\u00e9".encode() * 100

WIRE_CASES: list[WireCase] = [
    # Protocol errors: the error, then the connection is closed.
    WireCase("mbulk-count-not-a-number", b"*abc\r\n", PROTO_MBULK, True),
    WireCase("mbulk-count-empty", b"*\r\n", PROTO_MBULK, True),
    WireCase("mbulk-count-above-int-max", b"*2147483648\r\n", PROTO_MBULK, True),
    WireCase("expected-dollar", b"*1\r\n+x\r\n", b"-ERR Protocol error: expected '$', got '+'\r\n", True),
    WireCase("negative-bulk-length", b"*1\r\n$-5\r\n", PROTO_BULK, True),
    WireCase("bulk-length-empty", b"*1\r\n$\r\n", PROTO_BULK, True),
    WireCase("bulk-length-above-max-int64", b"*1\r\n$99999999999999999999\r\n", PROTO_BULK, True),
    WireCase("unbalanced-double-quote", b'SET "a\r\n', PROTO_QUOTES, True),
    WireCase("unbalanced-single-quote", b"GET 'a\r\n", PROTO_QUOTES, True),
    WireCase("closing-quote-then-letter", b'GET "a"b\r\n', PROTO_QUOTES, True),
    WireCase("closing-quote-then-quote", b"ECHO \"a\"'b'\r\n", PROTO_QUOTES, True),
    WireCase("escaped-closing-quote", b'ECHO "a\\"\r\n', PROTO_QUOTES, True),
    WireCase("inline-70KB-without-newline", b"x" * 70_000, b"-ERR Protocol error: too big inline request\r\n", True),
    WireCase(
        "mbulk-count-70KB-without-crlf",
        b"*" + b"1" * 70_000,
        b"-ERR Protocol error: too big mbulk count string\r\n",
        True,
    ),
    WireCase(
        "bulk-count-70KB-without-crlf",
        b"*1\r\n$" + b"1" * 70_000,
        b"-ERR Protocol error: too big bulk count string\r\n",
        True,
    ),
    WireCase(
        "replies-before-the-error-come-first",
        b"PING\r\nECHO a\r\n" + multibulk(b"ECHO", b"b") + b"*abc\r\nPING\r\n",
        b"+PONG\r\n$1\r\na\r\n$1\r\nb\r\n" + PROTO_MBULK,
        True,
    ),
    WireCase("quit", b"QUIT\r\n", b"+OK\r\n", True),
    WireCase("quit-then-ping", b"QUIT\r\nPING\r\n", b"+OK\r\n", True),
    WireCase("quit-then-garbage", b"QUIT\r\n*abc\r\n", b"+OK\r\n", True),
    WireCase("quit-multibulk-then-ping", multibulk(b"quit") + b"PING\r\n", b"+OK\r\n", True),
    # Lengths redis-server's string2ll refuses.
    WireCase("mbulk-count-leading-zero", b"*01\r\n$4\r\nPING\r\n", PROTO_MBULK, True),
    WireCase("mbulk-count-plus-sign", b"*+1\r\n$4\r\nPING\r\n", PROTO_MBULK, True),
    WireCase("mbulk-count-leading-space", b"* 1\r\n$4\r\nPING\r\n", PROTO_MBULK, True),
    WireCase("mbulk-count-trailing-space", b"*1 \r\n$4\r\nPING\r\n", PROTO_MBULK, True),
    WireCase("mbulk-count-underscore", b"*0_1\r\n$4\r\nPING\r\n", PROTO_MBULK, True),
    WireCase("mbulk-count-minus-zero", b"*-0\r\nPING\r\n", PROTO_MBULK, True),
    WireCase(
        "mbulk-count-then-cr-cr-lf",
        b"*1\r\r\n$4\r\nPING\r\n",
        b"-ERR Protocol error: expected '$', got ' '\r\n",
        True,
    ),
    WireCase("bulk-length-leading-zero", b"*1\r\n$04\r\nPING\r\n", PROTO_BULK, True),
    WireCase("bulk-length-plus-sign", b"*1\r\n$+4\r\nPING\r\n", PROTO_BULK, True),
    WireCase("bulk-length-leading-space", b"*1\r\n$ 4\r\nPING\r\n", PROTO_BULK, True),
    WireCase("bulk-length-trailing-space", b"*1\r\n$4 \r\nPING\r\n", PROTO_BULK, True),
    WireCase("bulk-length-trailing-tab", b"*1\r\n$4\t\r\nPING\r\n", PROTO_BULK, True),
    WireCase("bulk-length-underscore", b"*1\r\n$0_4\r\nPING\r\n", PROTO_BULK, True),
    WireCase("bulk-length-minus-zero", b"*2\r\n$4\r\nECHO\r\n$-0\r\n\r\n", PROTO_BULK, True),
    # Well-formed requests: the connection stays open (a sentinel ECHO is answered afterwards).
    WireCase("inline-crlf", b"PING\r\n", b"+PONG\r\n", False),
    WireCase("inline-lf", b"PING\n", b"+PONG\r\n", False),
    WireCase("inline-lowercase-and-spaces", b"  ping  \r\n", b"+PONG\r\n", False),
    WireCase("empty-lines-ignored", b"\r\n\n  \r\nPING\r\n\r\n", b"+PONG\r\n", False),
    WireCase("empty-multibulks-ignored", b"*0\r\n*-1\r\nPING\r\n", b"+PONG\r\n", False),
    WireCase("crlf-after-bulk-not-checked", b"*1\r\n$4\r\nPINGxxPING\r\n", b"+PONG\r\n+PONG\r\n", False),
    WireCase("lone-cr-separates-inline-args", b"PING\rPING\r\n", b"$4\r\nPING\r\n", False),
    WireCase("inline-double-quotes", b'ECHO "a b"\r\n', b"$3\r\na b\r\n", False),
    WireCase("inline-hex-escapes", b'ECHO "\\x41\\n"\r\n', b"$2\r\nA\n\r\n", False),
    WireCase("inline-hex-upper-lower", b'ECHO "\\x4A\\x4a"\r\n', b"$2\r\nJJ\r\n", False),
    WireCase("inline-bad-hex-kept", b'ECHO "\\xZZ"\r\n', b"$3\r\nxZZ\r\n", False),
    WireCase("inline-escapes", b'ECHO "\\t\\r\\b\\a\\q"\r\n', b"$5\r\n\t\r\x08\x07q\r\n", False),
    WireCase("inline-single-quotes", b"ECHO 'x\\'y'\r\n", b"$3\r\nx'y\r\n", False),
    WireCase("inline-single-quotes-no-escapes", b"ECHO 'a\\nb'\r\n", b"$4\r\na\\nb\r\n", False),
    WireCase("inline-quote-inside-token", b'ECHO a"b c"\r\n', b"$4\r\nab c\r\n", False),
    WireCase("inline-empty-quoted-arg", b'ECHO ""\r\n', b"$0\r\n\r\n", False),
    WireCase(
        "inline-and-multibulk-mixed",
        b"PING\r\n" + multibulk(b"ECHO", b"a\r\nb") + b"ECHO c\n" + multibulk(b"PING"),
        b"+PONG\r\n$4\r\na\r\nb\r\n$1\r\nc\r\n+PONG\r\n",
        False,
    ),
    WireCase("vertical-tab-inside-arg", b"ECHO a\x0bb\r\n", b"$3\r\na\x0bb\r\n", False),
    WireCase("form-feed-inside-arg", b"ECHO a\x0cb\r\n", b"$3\r\na\x0cb\r\n", False),
    WireCase("vertical-tab-before-quote", b'ECHO a\x0b"b"\r\n', b"$3\r\na\x0bb\r\n", False),
    # Unknown commands and wrong arity: the exact Redis wording.
    WireCase(
        "unknown-command-inline",
        b"foo a b\r\n",
        b"-ERR unknown command 'foo', with args beginning with: 'a' 'b' \r\n",
        False,
    ),
    WireCase(
        "unknown-command-multibulk",
        multibulk(b"foo", b"a", b"b"),
        b"-ERR unknown command 'foo', with args beginning with: 'a' 'b' \r\n",
        False,
    ),
    WireCase(
        "unknown-command-no-args",
        b"NOSUCH\r\n",
        b"-ERR unknown command 'NOSUCH', with args beginning with: \r\n",
        False,
    ),
    WireCase(
        "unknown-command-empty-name",
        multibulk(b""),
        b"-ERR unknown command '', with args beginning with: \r\n",
        False,
    ),
    WireCase(
        "unknown-command-newlines-become-spaces",
        multibulk(b"fo\r\no", b"a\nb"),
        b"-ERR unknown command 'fo  o', with args beginning with: 'a b' \r\n",
        False,
    ),
    WireCase(
        "unknown-command-long-arg-truncated",
        b"foo " + b"a" * 200 + b"\r\n",
        b"-ERR unknown command 'foo', with args beginning with: '" + b"a" * 128 + b"' \r\n",
        False,
    ),
    WireCase(
        "unknown-command-many-args-truncated",
        b"foo" + b" abcdefghij" * 20 + b"\r\n",
        b"-ERR unknown command 'foo', with args beginning with: " + b"'abcdefghij' " * 10 + b"\r\n",
        False,
    ),
    WireCase(
        "unknown-command-long-name-truncated",
        b"f" * 200 + b" x\r\n",
        b"-ERR unknown command '" + b"f" * 128 + b"', with args beginning with: 'x' \r\n",
        False,
    ),
    WireCase(
        "unknown-command-non-utf8-arg",
        b"foo \xff\xfe\r\n",
        b"-ERR unknown command 'foo', with args beginning with: '\xff\xfe' \r\n",
        False,
    ),
    WireCase(
        "unknown-command-non-utf8-name",
        b"\xff\xfe a\r\n",
        b"-ERR unknown command '\xff\xfe', with args beginning with: 'a' \r\n",
        False,
    ),
    WireCase(
        "unknown-command-multibyte-arg-truncated-at-128-bytes",
        b"foo " + E_ACUTE_100 + b"\r\n",
        b"-ERR unknown command 'foo', with args beginning with: '" + E_ACUTE_100[:128] + b"' \r\n",
        False,
    ),
    WireCase("wrong-arity-get", b"GET\r\n", b"-ERR wrong number of arguments for 'get' command\r\n", False),
    WireCase("wrong-arity-lowercase", b"get\r\n", b"-ERR wrong number of arguments for 'get' command\r\n", False),
    WireCase("wrong-arity-echo", b"ECHO a b\r\n", b"-ERR wrong number of arguments for 'echo' command\r\n", False),
    WireCase("wrong-arity-ping", b"PING a b\r\n", b"-ERR wrong number of arguments for 'ping' command\r\n", False),
    WireCase("wrong-arity-client", b"CLIENT\r\n", b"-ERR wrong number of arguments for 'client' command\r\n", False),
    WireCase(
        "wrong-arity-client-setname",
        b"CLIENT SETNAME\r\n",
        b"-ERR wrong number of arguments for 'client|setname' command\r\n",
        False,
    ),
    WireCase(
        "wrong-arity-config-get",
        b"CONFIG GET\r\n",
        b"-ERR wrong number of arguments for 'config|get' command\r\n",
        False,
    ),
    WireCase(
        "client-unknown-subcommand", b"CLIENT FOO\r\n", b"-ERR unknown subcommand 'FOO'. Try CLIENT HELP.\r\n", False
    ),
    WireCase(
        "command-unknown-subcommand", b"COMMAND FOO\r\n", b"-ERR unknown subcommand 'FOO'. Try COMMAND HELP.\r\n", False
    ),
    WireCase("hello-4", b"HELLO 4\r\n", b"-NOPROTO unsupported protocol version\r\n", False),
    WireCase(
        "hello-not-a-number", b"HELLO x\r\n", b"-ERR Protocol version is not an integer or out of range\r\n", False
    ),
    WireCase("select-not-a-number", b"SELECT x\r\n", b"-ERR value is not an integer or out of range\r\n", False),
    WireCase("select-out-of-range", b"SELECT 99\r\n", b"-ERR DB index is out of range\r\n", False),
    WireCase("echo-binary", multibulk(b"ECHO", b"\x00\xff\r\n"), b"$4\r\n\x00\xff\r\n\r\n", False),
]

SENTINEL_REQUEST = b"ECHO sentinel\r\n"
SENTINEL_REPLY = b"$8\r\nsentinel\r\n"


def _wire_params() -> list[object]:
    params: list[object] = []
    for case in WIRE_CASES:
        params.append(pytest.param(case, id=case.id))
    return params


def _check_wire_case(port: int, case: WireCase) -> None:
    if case.closes:
        data, reply = case.data, case.reply
    else:
        data, reply = case.data + SENTINEL_REQUEST, case.reply + SENTINEL_REPLY
    assert exchange(port, data, reply, case.closes) == (reply, case.closes)
    assert ping_ok(port)  # other connections are unaffected


@pytest.mark.parametrize("case", _wire_params())
def test_respreg_replies_like_redis(shared: Cluster, case: WireCase) -> None:
    _check_wire_case(shared.node(1).port, case)


@pytest.mark.parametrize("case", _wire_params())
def test_reference_redis_gives_the_expected_reply(reference: int, case: WireCase) -> None:
    _check_wire_case(reference, case)


def test_bulk_longer_than_proto_max_bulk_len(shared: Cluster, max_bulk: int, request: pytest.FixtureRequest) -> None:
    # Rejected from the header alone: the payload is never sent.
    data = b"*2\r\n$4\r\nECHO\r\n$%d\r\n" % (max_bulk + 1)
    ports = [shared.node(2).port]
    if shutil.which("redis-server") is not None:
        ports.append(request.getfixturevalue("reference"))
    for port in ports:
        assert exchange(port, data, PROTO_BULK, True) == (PROTO_BULK, True), port
        assert ping_ok(port)


def test_bulk_of_exactly_proto_max_bulk_len_is_accepted(shared: Cluster, max_bulk: int) -> None:
    value = b"\x00\xffab" * (max_bulk // 4) + b"z" * (max_bulk % 4)
    with socket.create_connection((HOST, shared.node(3).port), timeout=IO_LIMIT_S) as s:
        sender = _send_in_background(s, multibulk(b"ECHO", value))
        assert recv_exactly(s, len(bulk(value))) == bulk(value)
        sender.join(IO_LIMIT_S)
        assert not sender.is_alive()


# ---- pipelining and splitting on real connections ----------------------------------------------


def _send_in_background(sock: socket.socket, data: bytes) -> threading.Thread:
    t = threading.Thread(target=sock.sendall, args=(data,), daemon=True)
    t.start()
    return t


def test_pipeline_of_10000_commands_in_one_send(shared: Cluster) -> None:
    r = shared.client(1, protocol=2)
    assert r.execute_command("SETONCE", "pipe:set", "value") in (b"OK", True)
    requests: list[bytes] = []
    replies: list[bytes] = []
    for i in range(10_000):
        kind = i % 20
        if kind <= 5 or (kind == 15 and i % 40 != 15) or (kind == 16 and i % 1000 != 16):
            requests.append(b"PING\r\n")
            replies.append(b"+PONG\r\n")
        elif kind <= 8:
            requests.append(b"ECHO e%d\r\n" % i)
            replies.append(bulk(b"e%d" % i))
        elif kind <= 14:
            requests.append(multibulk(b"GET", b"pipe:set"))  # known chosen: answered from memory
            replies.append(b"$5\r\nvalue\r\n")
        elif kind == 15:
            requests.append(multibulk(b"GET", b"pipe:missing:%d" % i))  # a quorum read (250 in all)
            replies.append(b"$-1\r\n")
        elif kind == 16:
            requests.append(b"SETONCE pipe:w:%d v%d\r\n" % (i, i))  # a Paxos write (10 in all)
            replies.append(b"+OK\r\n")
        else:
            requests.append(multibulk(b"SETONCE", b"pipe:set", b"other"))
            replies.append(b"$-1\r\n")
    payload = b"".join(requests)
    expected = b"".join(replies)
    with socket.create_connection((HOST, shared.node(1).port), timeout=IO_LIMIT_S) as s:
        sender = _send_in_background(s, payload)
        got = recv_exactly(s, len(expected), limit_s=60)
        sender.join(IO_LIMIT_S)
        assert not sender.is_alive()
    if got != expected:
        at = next(i for i in range(len(expected)) if got[i] != expected[i])
        errors = Counter(line[:60] for line in got.split(b"\r\n") if line.startswith(b"-"))
        raise AssertionError(
            f"replies differ at byte {at}: {got[at - 40 : at + 80]!r} vs {expected[at - 40 : at + 80]!r}; "
            f"error replies: {errors.most_common(3)}"
        )
    other = shared.client(2, protocol=2)
    assert other.get("pipe:w:16") == b"v16"
    assert other.get("pipe:w:9016") == b"v9016"


def test_pipeline_beyond_the_in_flight_limit_is_answered_in_order(shared: Cluster) -> None:
    """More quorum reads in one send than a connection may have running (1024): reading pauses
    at the limit and resumes, and parsing goes on, as replies complete; every reply comes back
    in request order."""
    requests: list[bytes] = []
    replies: list[bytes] = []
    for i in range(2_100):  # about 55 KiB: all of it is read before the first read completes
        if i % 3 == 0:
            requests.append(multibulk(b"ECHO", b"e%d" % i))
            replies.append(bulk(b"e%d" % i))
        else:
            requests.append(multibulk(b"GET", b"im:%d" % i))  # each a quorum read
            replies.append(b"$-1\r\n")
    expected = b"".join(replies)
    with socket.create_connection((HOST, shared.node(1).port), timeout=IO_LIMIT_S) as s:
        sender = _send_in_background(s, b"".join(requests))
        got = recv_exactly(s, len(expected), limit_s=60)
        sender.join(IO_LIMIT_S)
        assert not sender.is_alive()
    assert got == expected


def test_many_reads_of_one_missing_key_share_rounds_and_see_its_write(shared: Cluster) -> None:
    """Thousands of GETs of one missing key, pipelined on three connections at once, share read
    rounds (and the operation of the read waiting for the next round); each is answered nil,
    in order, with MGETs naming the key twice among them. Once the key is written, the same
    load answers its value."""
    key = b"shared:rounds"
    info = shared.client(1, protocol=2)
    shared_before = int(info.info("paxos")["reads_shared"])

    def load(expected_get: bytes, expected_mget: bytes) -> None:
        requests = b"".join(
            multibulk(b"MGET", key, key) if i % 100 == 0 else multibulk(b"GET", key) for i in range(2_000)
        )
        expected = b"".join(expected_mget if i % 100 == 0 else expected_get for i in range(2_000))
        socks = [socket.create_connection((HOST, shared.node(1).port), timeout=IO_LIMIT_S) for _ in range(3)]
        try:
            senders = [_send_in_background(s, requests) for s in socks]
            for s in socks:
                assert recv_exactly(s, len(expected), limit_s=60) == expected
            for t in senders:
                t.join(IO_LIMIT_S)
        finally:
            for s in socks:
                s.close()

    load(b"$-1\r\n", b"*2\r\n$-1\r\n$-1\r\n")
    assert int(info.info("paxos")["reads_shared"]) > shared_before
    assert info.execute_command("SETONCE", key, "v") in (b"OK", True)
    load(b"$1\r\nv\r\n", b"*2\r\n$1\r\nv\r\n$1\r\nv\r\n")


def test_one_command_sent_byte_by_byte(shared: Cluster) -> None:
    data = multibulk(b"SETONCE", b"bytewise", b"a\r\nb") + b'GET "bytewise"\r\n' + b"PING\r\n"
    expected = b"+OK\r\n$4\r\na\r\nb\r\n+PONG\r\n"
    with socket.create_connection((HOST, shared.node(2).port), timeout=IO_LIMIT_S) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(data)):
            s.sendall(data[i : i + 1])
        assert recv_exactly(s, len(expected)) == expected
    assert shared.client(3, protocol=2).get("bytewise") == b"a\r\nb"


def test_inline_writes_are_replicated(shared: Cluster) -> None:
    data = b'SETONCE inl:a b\nSETONCE "inl:key with space" \'\\x41\'\r\nSETONCE inl:hex "\\x00\\xff"\r\n'
    with socket.create_connection((HOST, shared.node(1).port), timeout=IO_LIMIT_S) as s:
        s.sendall(data)
        assert recv_exactly(s, 15) == b"+OK\r\n" * 3
    r = shared.client(3, protocol=2)
    assert r.mget("inl:a", "inl:key with space", "inl:hex") == [b"b", b"\\x41", b"\x00\xff"]


def test_replies_before_a_protocol_error_include_pending_paxos_replies(shared: Cluster) -> None:
    data = (
        b"SETONCE perr:k v\r\n"
        + multibulk(b"GET", b"perr:missing")
        + b"GET perr:k\r\nSETONCE perr:k w\r\nPING\r\n*1\r\n$x\r\nSETONCE perr:after v\r\n"
    )
    expected = b"+OK\r\n$-1\r\n$1\r\nv\r\n$-1\r\n+PONG\r\n" + PROTO_BULK
    assert exchange(shared.node(1).port, data, expected, True) == (expected, True)
    r = shared.client(2, protocol=2)
    assert r.get("perr:k") == b"v"
    assert r.get("perr:after") is None  # nothing after the bad request was executed


def test_quit_replies_ok_closes_and_skips_the_rest(shared: Cluster) -> None:
    data = b"SETONCE quit:before v\r\nPING\r\nQUIT\r\nSETONCE quit:after v\r\nPING\r\n"
    expected = b"+OK\r\n+PONG\r\n+OK\r\n"
    assert exchange(shared.node(3).port, data, expected, True) == (expected, True)
    r = shared.client(1, protocol=2)
    assert r.get("quit:before") == b"v"
    assert r.get("quit:after") is None


def test_500_concurrent_connections(shared: Cluster) -> None:
    node = shared.node(2)
    socks: list[socket.socket] = []
    try:
        for _ in range(500):
            socks.append(socket.create_connection((HOST, node.port), timeout=IO_LIMIT_S))
        for i, s in enumerate(socks):
            s.sendall(b"ECHO c%d\r\nPING\r\n" % i)
        for i, s in enumerate(socks):
            want = bulk(b"c%d" % i) + b"+PONG\r\n"
            assert recv_exactly(s, len(want)) == want
        assert int(shared.client(2, protocol=2).info("clients")["connected_clients"]) >= 501
    finally:
        for s in socks:
            s.close()
    r = shared.client(2, protocol=2)
    assert r.execute_command("SETONCE", "many-conns", "ok") in (b"OK", True)
    assert shared.client(1, protocol=2).get("many-conns") == b"ok"
    deadline = time.monotonic() + IO_LIMIT_S
    while int(r.info("clients")["connected_clients"]) > 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert int(r.info("clients")["connected_clients"]) <= 5  # closed connections are forgotten
    assert node.running()


FRAGMENTS = [
    b"*", b"$", b"\r\n", b"\n", b"\r", b"-1", b"0", b"1", b"3", b"99999999999", b'"', b"'", b"\\", b"\\x",
    b"ff", b" ", b"\t", b"\x0b", b"\x00", b"\xff", b"PING", b"GET", b"ECHO", b"SETONCE", b"MGET", b"HELLO",
    b"CLIENT", b"COMMAND", b"INFO", b"QUIT", b"SET", b"NX",
]  # fmt: skip

garbage = st.one_of(
    st.binary(max_size=300),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=6)), max_size=60).map(b"".join),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=garbage, node_id=st.integers(1, 3))
def test_binary_garbage_never_crashes_a_node(shared: Cluster, data: bytes, node_id: int) -> None:
    node = shared.node(node_id)
    with socket.create_connection((HOST, node.port), timeout=IO_LIMIT_S) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        read_to_eof(s)  # the server answers what it can and closes at our end of stream
    assert node.running(), shared.logs()
    assert ping_ok(node.port)


# ---- a client that never reads -----------------------------------------------------------------

RSS_BOUND_KB = 400 * 1024
UNREAD_GETS = 600


def test_client_that_never_reads_does_not_grow_the_server(cluster: Cluster) -> None:
    node = cluster.node(1)
    r = cluster.client(1, protocol=2)
    big = b"x" * (1024 * 1024)
    assert r.execute_command("SETONCE", "big", big) in (b"OK", True)
    hog = socket.socket()
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hog.settimeout(IO_LIMIT_S)
    hog.connect((HOST, node.port))
    try:
        hog.sendall(b"CLIENT SETNAME hog\r\n")
        assert recv_exactly(hog, 5) == b"+OK\r\n"
        hog.sendall(b"GET big\r\n" * UNREAD_GETS)
        # Wait until the node has taken up the GETs (it names the last command it dispatched)
        # and the hog's connection state stays the same over several looks.
        seen: list[tuple[str, str, str]] = []
        for _ in range(300):
            hogs = [c for c in r.client_list() if c.get("name") == "hog"]
            assert len(hogs) == 1
            seen.append((hogs[0]["cmd"], hogs[0]["qbuf"], hogs[0]["oll"]))
            if seen[-1][0] == "get" and len(seen) >= 5 and len(set(seen[-5:])) == 1:
                break
            time.sleep(0.05)
        assert seen[-1][0] == "get", seen[-5:]
        # Everyone else is still served, on this node and the others.
        assert ping_ok(node.port)
        assert cluster.client(1, protocol=2).get("big") == big
        assert cluster.client(2, protocol=2).get("big") == big
        status = proc_status(node.pid)
        assert node.running()
        assert status["VmRSS"] < RSS_BOUND_KB and status["VmHWM"] < RSS_BOUND_KB, (
            f"VmRSS {status['VmRSS']} kB, VmHWM {status['VmHWM']} kB after {UNREAD_GETS} unread GETs of 1 MiB"
        )
    finally:
        hog.close()


# ---- a burst of pipelined writes ---------------------------------------------------------------


@pytest.fixture
def patient_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A 3-node cluster whose nodes give every request 10 s before answering with an error."""
    c = Cluster(tmp_path, deadline_ms=10_000)
    try:
        c.start()
        c.wait_peers()
        yield c
    finally:
        c.close()


BURST = 1000


def test_burst_of_pipelined_writes_is_answered_ok(patient_cluster: Cluster) -> None:
    payload = b"".join(b"SETONCE burst:%d v%d\r\n" % (i, i) for i in range(BURST))
    with socket.create_connection((HOST, patient_cluster.node(1).port), timeout=IO_LIMIT_S) as s:
        sender = _send_in_background(s, payload)
        got = bytearray()
        deadline = time.monotonic() + 60
        while got.count(b"\r\n") < BURST and time.monotonic() < deadline:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        sender.join(IO_LIMIT_S)
    replies = bytes(got).split(b"\r\n")[:-1]
    assert len(replies) == BURST  # every reply here is one line: +OK, -ERR..., or $-1
    failures = Counter(r[:40] for r in replies if r != b"+OK")
    assert not failures, f"{sum(failures.values())} of {BURST} failed: {failures.most_common(3)}"
    assert patient_cluster.client(2, protocol=2).get(f"burst:{BURST - 1}") == f"v{BURST - 1}".encode()

"""The real redis-cli and redis-benchmark (Redis 7) against a real 3-node respreg cluster.

redis-cli prints replies differently on a terminal and elsewhere: with its output captured
(not a tty) it uses the "raw" format (nil is an empty line, errors are printed without
"(error)"), ``--no-raw`` forces the terminal format. The interactive session runs redis-cli on a
pseudo-terminal.
"""

from __future__ import annotations

import os
import pty
import re
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from respreg.storage import batched_io, resolve_sync_mode

from .cluster import HOST, Cluster, reference_redis, running

REDIS_CLI = shutil.which("redis-cli")
REDIS_BENCHMARK = shutil.which("redis-benchmark")
REDIS_SERVER = shutil.which("redis-server")

pytestmark = pytest.mark.skipif(REDIS_CLI is None, reason="redis-cli is not installed (Debian package redis-tools)")

RUN_LIMIT_S = 60.0


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One 3-node cluster for this module; every test uses keys of its own."""
    with running(tmp_path_factory.mktemp("redis-cli-cluster"), deadline_ms=10_000) as c:
        yield c


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The client port of a real redis-server, to compare redis-cli's output with."""
    with reference_redis(tmp_path_factory.mktemp("redis-reference")) as port:
        yield port


def cli(port: int, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    assert REDIS_CLI is not None
    return subprocess.run(
        [REDIS_CLI, "-h", HOST, "-p", str(port), *args],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        timeout=RUN_LIMIT_S,
        check=False,
    )


def out(port: int, *args: str, stdin: bytes | None = None) -> bytes:
    """redis-cli's standard output; it must succeed and print nothing on standard error."""
    res = cli(port, *args, stdin=stdin)
    assert (res.returncode, res.stderr) == (0, b""), res
    return res.stdout


# ---- one command per run -----------------------------------------------------------------------


def test_setonce_get_and_nil(shared: Cluster) -> None:
    p1, p2, p3 = (shared.node(i).port for i in (1, 2, 3))
    assert out(p1, "SETONCE", "cli:k", "v") == b"OK\n"
    assert out(p2, "SETONCE", "cli:k", "w") == b"\n"  # nil: an empty line when not on a terminal
    assert out(p3, "GET", "cli:k") == b"v\n"
    assert out(p3, "GET", "cli:missing") == b"\n"
    assert out(p1, "--no-raw", "GET", "cli:missing") == b"(nil)\n"
    assert out(p1, "--no-raw", "GET", "cli:k") == b'"v"\n'
    assert out(p2, "--no-raw", "SETONCE", "cli:k", "x") == b"(nil)\n"
    assert out(p2, "--raw", "GET", "cli:k") == b"v\n"


def test_set_nx_get_setnx_mget_exists(shared: Cluster) -> None:
    p1, p2, p3 = (shared.node(i).port for i in (1, 2, 3))
    assert out(p1, "SET", "cli:nx", "a", "NX", "GET") == b"\n"  # it wrote: nil, like Redis 7
    assert out(p2, "SET", "cli:nx", "b", "NX", "GET") == b"a\n"  # already held: the value
    assert out(p3, "SET", "cli:nx2", "c", "NX") == b"OK\n"
    assert out(p3, "SET", "cli:nx2", "d", "NX") == b"\n"
    assert out(p1, "SETNX", "cli:nx", "z") == b"0\n"
    assert out(p1, "--no-raw", "SETNX", "cli:nx3", "z") == b"(integer) 1\n"
    assert out(p2, "MGET", "cli:nx", "cli:none", "cli:nx2") == b"a\n\nc\n"
    assert out(p2, "--no-raw", "MGET", "cli:nx", "cli:none") == b'1) "a"\n2) (nil)\n'
    assert out(p3, "EXISTS", "cli:nx", "cli:none", "cli:nx2") == b"2\n"


def test_binary_value_from_stdin(shared: Cluster) -> None:
    value = b"a\x00b\r\nc\xff"
    assert out(shared.node(1).port, "-x", "SETONCE", "cli:bin", stdin=value) == b"OK\n"
    assert out(shared.node(3).port, "--raw", "GET", "cli:bin") == value + b"\n"
    assert out(shared.node(2).port, "--no-raw", "GET", "cli:bin") == b'"a\\x00b\\r\\nc\\xff"\n'


def test_errors_as_redis_cli_prints_them(shared: Cluster) -> None:
    p = shared.node(1).port
    unknown = b"ERR unknown command 'NOSUCH', with args beginning with: 'a' "
    assert out(p, "NOSUCH", "a") == unknown + b"\n\n"
    assert out(p, "--no-raw", "NOSUCH", "a") == b"(error) " + unknown + b"\n"
    assert out(p, "GET") == b"ERR wrong number of arguments for 'get' command\n\n"
    text = out(p, "--no-raw", "SET", "cli:e", "v")
    assert text.startswith(b"(error) ERR registers are write-once: use SET key value NX") and text.endswith(b"\n")
    assert out(p, "--no-raw", "DEL", "cli:e").startswith(b"(error) ERR registers are write-once: 'del' would")
    assert out(p, "GET", "cli:e") == b"\n"


@pytest.mark.parametrize(
    "args",
    [
        ("PING",),
        ("--no-raw", "PING"),
        ("ECHO", "hello world"),
        ("--no-raw", "ECHO", "hello"),
        ("GET", "nothing-here"),
        ("--no-raw", "GET", "nothing-here"),
        ("MGET", "nothing-1", "nothing-2"),
        ("--no-raw", "MGET", "nothing-1", "nothing-2"),
        ("EXISTS", "nothing-1", "nothing-2"),
        ("NOSUCH", "a", "b"),
        ("--no-raw", "NOSUCH", "a"),
        ("GET",),
        ("--no-raw", "ECHO"),
        ("SELECT", "0"),
        ("--no-raw", "SELECT", "x"),
        ("CLIENT", "SETNAME", "bad name"),
        ("--no-raw", "CLIENT", "GETNAME"),
        ("-3", "--no-raw", "GET", "nothing-here"),
        ("-3", "GET", "nothing-here"),
        ("--no-raw", "HELLO", "4"),
        ("--no-raw", "CONFIG", "GET", "appendonly"),
    ],
    ids=lambda args: " ".join(args),
)
def test_same_output_as_with_redis_server(shared: Cluster, reference: int, args: tuple[str, ...]) -> None:
    theirs = cli(reference, *args)
    ours = cli(shared.node(2).port, *args)
    assert (ours.returncode, ours.stdout, ours.stderr) == (theirs.returncode, theirs.stdout, theirs.stderr)


def test_info_paxos(shared: Cluster) -> None:
    lines = out(shared.node(1).port, "INFO", "paxos").decode().splitlines()
    assert lines[0] == "# Paxos"
    fields = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
    assert fields["quorum"] == "2"
    assert fields["cluster_size"] == "3"
    assert fields["node_id"] == "1"
    assert "quorum:2" in out(shared.node(2).port, "INFO").decode().splitlines()


def test_info_persistence_counts_writes_spare_files_and_the_name_index(shared: Cluster) -> None:
    p = shared.node(1).port
    assert out(p, "SETONCE", "cli:persisted", "v") in (b"OK\n", b"\n")

    def fields() -> dict[str, str]:
        lines = out(p, "INFO", "persistence").decode().splitlines()
        assert lines[0] == "# Persistence"
        return dict(line.split(":", 1) for line in lines[1:] if ":" in line)

    for _ in range(200):  # spares and the name index are made in the background: a bound only
        now = fields()
        if int(now["spare_files_ready"]) > 0 and now["key_index"] == "ready":
            break
        time.sleep(0.05)
    assert int(now["spare_files_ready"]) > 0
    assert now["spare_files"] in ("unnamed", "held", "named")
    assert now["batch_io"] == ("batched" if batched_io() else "per-call")
    assert now["key_index"] == "ready"
    assert int(now["fsync_errors"]) == 0 and "group_commit_writes" in now
    assert now["sync_mode"] == resolve_sync_mode("auto")  # the cluster runs with the default


def test_hello_3(shared: Cluster) -> None:
    p = shared.node(3).port
    lines = out(p, "-3", "HELLO", "3").decode().splitlines()
    assert lines[:3] == ["server redis", "version 7.0.0", "proto 3"]
    assert "mode standalone" in lines and "role master" in lines
    pretty = out(p, "-3", "--no-raw", "HELLO", "3").decode().splitlines()
    assert pretty[0] == '1# "server" => "redis"'
    assert '3# "proto" => (integer) 3' in pretty
    assert out(p, "-3", "--no-raw", "GET", "cli:resp3-missing") == b"(nil)\n"
    assert out(p, "-3", "SETONCE", "cli:resp3", "v") == b"OK\n"
    assert out(p, "-3", "--no-raw", "SETONCE", "cli:resp3", "w") == b"(nil)\n"
    assert out(p, "-2", "HELLO", "2").decode().splitlines()[:6] == [
        "server",
        "redis",
        "version",
        "7.0.0",
        "proto",
        "2",
    ]


def test_command_docs_count_and_info(shared: Cluster) -> None:
    p = shared.node(1).port
    docs = out(p, "COMMAND", "DOCS", "setonce").decode().splitlines()
    assert docs[0] == "setonce"
    fields = dict(zip(docs[1:9:2], docs[2:10:2], strict=True))
    assert set(fields) == {"summary", "since", "group", "complexity"}
    assert fields["group"] == "string"
    assert docs[9] == "arguments"
    assert docs[10:14] == ["name", "key", "type", "key"]
    assert "value" in docs[14:]
    pretty = out(p, "--no-raw", "COMMAND", "DOCS", "setonce").decode().splitlines()
    assert pretty[0] == '1) "setonce"'
    assert pretty[1] == '2)  1) "summary"'
    count = int(out(p, "COMMAND", "COUNT"))
    assert count == len(out(p, "COMMAND", "LIST").decode().splitlines())
    assert "setonce" in out(p, "COMMAND", "LIST").decode().splitlines()
    info = out(p, "COMMAND", "INFO", "get").decode().splitlines()
    assert info[:2] == ["get", "2"]


# ---- interactive, on a pseudo-terminal ---------------------------------------------------------

ANSI = re.compile(rb"\x1b\[[0-9;]*[A-Za-z]")


def _read_until(fd: int, token: bytes | None, limit_s: float) -> tuple[bytes, bool]:
    """Read from ``fd`` until ``token`` appears (or end of file if token is None).

    Returns what was read and whether the end of file was reached."""
    buf = b""
    deadline = time.monotonic() + limit_s
    while token is None or token not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"waited {limit_s}s for {token!r}; got {buf[-500:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the other side of the terminal is closed
            return buf, True
        if not chunk:
            return buf, True
        buf += chunk
    return buf, False


def test_interactive_session(shared: Cluster, tmp_path: Path) -> None:
    assert REDIS_CLI is not None
    port = shared.node(2).port
    prompt = f"{HOST}:{port}> ".encode()
    master, slave = pty.openpty()
    env = {"TERM": "dumb", "HOME": str(tmp_path), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    proc = subprocess.Popen(
        [REDIS_CLI, "-h", HOST, "-p", str(port)],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        start_new_session=True,
    )
    os.close(slave)
    try:
        # At start redis-cli asks for COMMAND DOCS to build its help; that must just work.
        banner, eof = _read_until(master, prompt, 30)
        assert not eof and banner.strip() == prompt.strip(), banner

        def run(line: str) -> str:
            os.write(master, line.encode() + b"\n")
            text, eof = _read_until(master, prompt, 30)
            assert not eof, text
            text = ANSI.sub(b"", text[: -len(prompt)]).replace(b"\r", b"")
            echoed, _, answer = text.partition(b"\n")
            assert echoed == line.encode()
            return answer.decode()

        assert run("SETONCE cli:tty 1") == "OK\n"
        assert run("SETONCE cli:tty 2") == "(nil)\n"
        assert run("GET cli:tty") == '"1"\n'
        assert run("GET cli:tty-missing") == "(nil)\n"
        assert run("SET cli:tty 3 NX GET") == '"1"\n'
        assert run("NOSUCH x") == "(error) ERR unknown command 'NOSUCH', with args beginning with: 'x' \n"
        assert run("PING") == "PONG\n"
        helptext = run("help SETONCE")
        assert "SETONCE key value" in helptext
        assert "summary: Write the register at key once" in helptext
        assert "group: string" in helptext
        helpget = run("help GET")
        assert "GET key" in helpget and "group: string" in helpget
        os.write(master, b"quit\n")
        rest, eof = _read_until(master, None, 30)
        assert eof and b"(error)" not in rest
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert out(shared.node(3).port, "GET", "cli:tty") == b"1\n"


# ---- redis-benchmark ---------------------------------------------------------------------------

needs_benchmark = pytest.mark.skipif(REDIS_BENCHMARK is None, reason="redis-benchmark is not installed")


def benchmark(port: int, *args: str) -> subprocess.CompletedProcess[bytes]:
    assert REDIS_BENCHMARK is not None
    return subprocess.run(
        [REDIS_BENCHMARK, "-h", HOST, "-p", str(port), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=RUN_LIMIT_S * 2,
        check=False,
    )


@needs_benchmark
def test_benchmark_ping(shared: Cluster) -> None:
    res = benchmark(shared.node(1).port, "-n", "2000", "-c", "10", "-t", "ping", "-q")
    assert res.returncode == 0, res
    assert b"Error" not in res.stderr, res.stderr
    text = res.stdout.replace(b"\r", b"\n")
    assert b"PING_INLINE:" in text and b"PING_MBULK:" in text


@needs_benchmark
def test_benchmark_custom_setonce(shared: Cluster) -> None:
    # Without -r the placeholder is sent as is: 2000 SETONCEs of one key, one of them writes it.
    res = benchmark(shared.node(1).port, "-n", "2000", "-c", "10", "-q", "SETONCE", "key:__rand_int__", "v")
    assert res.returncode == 0, res  # redis-benchmark exits 1 on an error reply
    assert out(shared.node(2).port, "GET", "key:__rand_int__") == b"v\n"
    # With -r every request picks one of 1000 keys key:000000000000 ... key:000000000999.
    res = benchmark(
        shared.node(3).port, "-n", "2000", "-c", "10", "-r", "1000", "-q", "SETONCE", "rk:__rand_int__", "w"
    )
    assert res.returncode == 0, res
    keys = [f"rk:{i:012d}" for i in range(1000)]
    values = shared.client(1, protocol=2).mget(keys)
    assert isinstance(values, list)
    assert set(values) <= {b"w", None}
    written = sum(v == b"w" for v in values)
    assert written > 0
    assert int(out(shared.node(2).port, "EXISTS", *keys)) == written

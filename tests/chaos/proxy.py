"""A fault-injecting TCP proxy for the links between respreg peers (no root needed).

One listening socket per directed link ``src -> dst``: node ``src`` is given the proxy's address
for ``dst`` in its ``--peers`` list, and the proxy forwards to ``dst``'s real peer port. Each node
gets its own ``--peers`` list (its own entry is its real peer port, where it listens), which
respreg accepts: the list only has to name every member id once, with an odd count. The proxy
listens on ``dst``'s loopback alias and dials ``dst`` from ``src``'s alias, so packets keep the
addresses of the two nodes and nftables rules on node addresses see proxied traffic too.

A link ``src -> dst`` carries ``src``'s requests to ``dst`` and ``dst``'s replies to ``src``.
Per link:

- ``open``       forward everything (after ``delay_ms`` per chunk, order kept, in both directions);
- ``blackhole``  accept connections but forward nothing (bytes are read and dropped): a silent
                 partition. The dropped bytes break the stream, so when the link opens again the
                 connections that lost data are reset (a real network would have retransmitted);
- ``cut``        reset every connection and stop listening, so new connections are refused (as
                 by a host that is down or unreachable): a loud partition;
- ``reject``     reset every connection, and accept new ones only to reset them at once (what a
                 TCP proxy or load balancer in front of a dead peer does);
- ``reset()``    reset the current connections once (they reconnect normally).

- ``set_down(dst)`` the node behind every link ``* -> dst`` is down: refuse like ``cut``. The
                 nemesis says so before it kills a node, so that a killed node looks to its peers
                 as it would without the proxy (refused), not like ``reject``.

:class:`Proxy` is the asyncio implementation. :class:`ProxyThread` runs it on a background
thread; :class:`ProxyProcess` runs it in a child process (``python -m tests.chaos.proxy``),
controlled by JSON lines on its stdin, so that forwarding does not compete with the test's own
threads for the interpreter lock. Both are ended in ``close()``; the child by its PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Collection, Coroutine, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import IO, Any, Literal, Protocol

Mode = Literal["open", "blackhole", "cut", "reject"]
MODES: tuple[Mode, ...] = ("open", "blackhole", "cut", "reject")
_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class Route:
    """Link ``src -> dst``: listen on ``listen_host`` (port 0: the kernel picks), forward to
    ``target``, dialling from ``source_host``."""

    src: int
    dst: int
    listen_host: str
    target_host: str
    target_port: int
    source_host: str


class LinkControl(Protocol):
    """What the nemesis needs from a proxy, wherever it runs."""

    def port(self, src: int, dst: int) -> int: ...

    def set_link(self, src: int, dst: int, mode: Mode | None = None, delay_ms: float | None = None) -> None: ...

    def reset(self, src: int, dst: int) -> None: ...

    def set_down(self, dst: int, down: bool) -> None: ...

    def heal(self) -> None: ...

    def close(self) -> None: ...


# ---- the asyncio proxy -------------------------------------------------------------------------


class _Conn:
    """One proxied connection: the accepted side and (unless blackholed from the start) upstream."""

    def __init__(self, link: _Link, down: asyncio.StreamWriter) -> None:
        self.link = link
        self.down = down
        self.up: asyncio.StreamWriter | None = None
        self.tainted = False  # bytes were dropped: the stream is broken, reset when the link opens
        self.tasks: list[asyncio.Task[None]] = []
        self.closed = False

    def abort(self) -> None:
        if self.closed:
            return
        self.closed = True
        for w in (self.down, self.up):
            if w is not None:
                w.transport.abort()
        for t in self.tasks:
            if t is not asyncio.current_task():
                t.cancel()
        self.link.conns.discard(self)


@dataclass
class _Link:
    route: Route
    mode: Mode = "open"
    delay_s: float = 0.0
    conns: set[_Conn] = field(default_factory=set)
    server: asyncio.AbstractServer | None = None
    port: int = 0
    accepted: int = 0
    dropped_bytes: int = 0
    forwarded_bytes: int = 0
    #: The destination node is down (told by the nemesis): refuse, as the node's own port would.
    target_down: bool = False

    def listening(self) -> bool:
        return self.mode != "cut" and not self.target_down


class Proxy:
    """The proxy itself; every method but the ``async`` ones must run on its event loop."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self.links: dict[tuple[int, int], _Link] = {(r.src, r.dst): _Link(r) for r in routes}

    async def start(self, avoid: Collection[int] = ()) -> None:
        """Listen on every link, on ports the kernel picks, none of them in ``avoid``.

        ``avoid`` holds the nodes' own ports: they were free when picked, but a node binds them
        only when it starts, after the proxy, and a link on one of them would take it."""
        held: list[asyncio.AbstractServer] = []
        try:
            for link in self.links.values():
                await self._listen(link)  # port 0: the kernel picks
                while link.port in avoid and link.server is not None:
                    held.append(link.server)  # kept open, so the kernel picks another
                    link.server, link.port = None, 0
                    await self._listen(link)
        finally:
            for server in held:
                server.close()

    async def stop(self) -> None:
        for link in self.links.values():
            for c in list(link.conns):
                c.abort()
            if link.server is not None:
                link.server.close()
        for link in self.links.values():
            if link.server is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(link.server.wait_closed(), 2)

    def ports(self) -> dict[tuple[int, int], int]:
        return {k: link.port for k, link in self.links.items()}

    async def set_link(self, src: int, dst: int, mode: Mode | None = None, delay_ms: float | None = None) -> None:
        link = self.links[(src, dst)]
        if delay_ms is not None:
            link.delay_s = max(0.0, delay_ms / 1000)
        if mode is None or mode == link.mode:
            return
        link.mode = mode
        if mode in ("cut", "reject"):
            for c in list(link.conns):
                c.abort()
        else:
            for c in list(link.conns):
                if c.tainted or c.up is None:
                    c.abort()
        await self._refresh(link)

    async def set_down(self, dst: int, down: bool) -> None:
        """Node ``dst`` is down (or up again): its links refuse connections, like its own port.

        Without this, a proxy accepts a connection for a dead node and can only reset it: the
        ``reject`` fault, which is not what a network does when a host dies."""
        for (_, d), link in self.links.items():
            if d == dst:
                link.target_down = down
                if down:
                    for c in list(link.conns):
                        c.abort()
                await self._refresh(link)

    async def _refresh(self, link: _Link) -> None:
        if not link.listening() and link.server is not None:
            link.server.close()
            link.server = None
        elif link.listening() and link.server is None:
            await self._listen(link)

    async def _listen(self, link: _Link) -> None:
        # The same port again (nodes were told it); retried briefly should the close still linger.
        for attempt in range(50):
            try:
                link.server = await asyncio.start_server(
                    lambda r, w: self._accept(link, r, w), link.route.listen_host, link.port, reuse_address=True
                )
            except OSError:
                if attempt == 49:
                    raise
                await asyncio.sleep(0.05)
            else:
                link.port = link.server.sockets[0].getsockname()[1]
                return

    async def reset(self, src: int, dst: int) -> None:
        for c in list(self.links[(src, dst)].conns):
            c.abort()

    async def heal(self) -> None:
        """Every link open, without delay (a node marked down stays refused)."""
        for (src, dst) in self.links:
            await self.set_link(src, dst, "open", 0)

    def stats(self) -> dict[str, dict[str, int | float | str]]:
        return {
            f"{s}->{d}": {
                "mode": link.mode,
                "target_down": int(link.target_down),
                "delay_ms": link.delay_s * 1000,
                "conns": len(link.conns),
                "accepted": link.accepted,
                "forwarded_bytes": link.forwarded_bytes,
                "dropped_bytes": link.dropped_bytes,
            }
            for (s, d), link in sorted(self.links.items())
        }

    async def _accept(self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link.accepted += 1
        if link.mode != "open" and link.mode != "blackhole":
            writer.transport.abort()
            return
        conn = _Conn(link, writer)
        link.conns.add(conn)
        me = asyncio.current_task()
        assert me is not None
        conn.tasks.append(me)
        try:
            if link.mode == "blackhole":
                conn.tainted = True
                while not conn.closed:  # accept, read, forward nothing
                    data = await reader.read(_CHUNK)
                    if not data:
                        return
                    link.dropped_bytes += len(data)
                return
            r = link.route
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(r.target_host, r.target_port, local_addr=(r.source_host, 0)), 5
                )
            except (OSError, TimeoutError):
                return
            if conn.closed:
                up_writer.transport.abort()
                return
            conn.up = up_writer
            loop = asyncio.get_running_loop()
            conn.tasks.append(loop.create_task(self._pump(conn, up_reader, writer)))
            await self._pump(conn, reader, up_writer)
        except asyncio.CancelledError:
            pass
        finally:
            conn.abort()

    async def _pump(self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy one direction, each chunk after the link's delay, in order; drop when blackholed."""
        link = conn.link
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = loop.create_task(self._send(conn, queue, writer))
        conn.tasks.append(sender)
        last_due = 0.0
        try:
            while not conn.closed:
                data = await reader.read(_CHUNK)
                if not data:
                    await queue.put((0.0, b""))  # end of stream, after what is queued
                    await sender
                    return
                if link.mode != "open":
                    conn.tainted = True
                    link.dropped_bytes += len(data)
                    continue
                due = max(loop.time() + link.delay_s, last_due)
                last_due = due
                await queue.put((due, data))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            conn.abort()

    async def _send(self, conn: _Conn, queue: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter) -> None:
        link = conn.link
        loop = asyncio.get_running_loop()
        try:
            while not conn.closed:
                due, data = await queue.get()
                if not data:
                    conn.abort()
                    return
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if link.mode != "open":
                    conn.tainted = True
                    link.dropped_bytes += len(data)
                    continue
                writer.write(data)
                link.forwarded_bytes += len(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            conn.abort()


# ---- running it: a background thread ------------------------------------------------------------


class ProxyThread:
    """The proxy on its own event loop in a daemon thread of this process."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self._proxy = Proxy(routes)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="chaos-proxy", daemon=True)
        self._thread.start()
        self._call_async(self._proxy.start())
        self._ports = self._proxy.ports()

    def _call_async(self, coro: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=15)

    def _call(self, fn: object, *args: object) -> object:
        fut: Future[object] = Future()

        def run() -> None:
            try:
                fut.set_result(fn(*args))  # type: ignore[operator]
            except Exception as exc:  # noqa: BLE001 - handed back to the caller
                fut.set_exception(exc)

        self._loop.call_soon_threadsafe(run)
        return fut.result(timeout=15)

    def port(self, src: int, dst: int) -> int:
        return self._ports[(src, dst)]

    def set_link(self, src: int, dst: int, mode: Mode | None = None, delay_ms: float | None = None) -> None:
        self._call_async(self._proxy.set_link(src, dst, mode, delay_ms))

    def reset(self, src: int, dst: int) -> None:
        self._call_async(self._proxy.reset(src, dst))

    def set_down(self, dst: int, down: bool) -> None:
        self._call_async(self._proxy.set_down(dst, down))

    def heal(self) -> None:
        self._call_async(self._proxy.heal())

    def stats(self) -> dict[str, dict[str, int | float | str]]:
        out = self._call(self._proxy.stats)
        assert isinstance(out, dict)
        return out

    def close(self) -> None:
        if not self._loop.is_running():
            return
        with contextlib.suppress(Exception):
            self._call_async(self._proxy.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()


# ---- running it: a child process ---------------------------------------------------------------


class ProxyProcess:
    """The proxy in a child process; commands and answers are JSON lines on its stdin/stdout."""

    def __init__(self, routes: Sequence[Route], log: IO[bytes] | None = None, avoid: Collection[int] = ()) -> None:
        spec = json.dumps([_route_dict(r) for r in routes])
        self._lock = threading.Lock()
        self.proc: subprocess.Popen[str] | None = subprocess.Popen(
            [sys.executable, "-m", "tests.chaos.proxy", spec, json.dumps(sorted(avoid))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log if log is not None else subprocess.DEVNULL,
            text=True,
            start_new_session=True,
            cwd=_repo_root(),
        )
        try:
            ready = self._answer(timeout_s=15)
            self._ports = {(int(k.split("->")[0]), int(k.split("->")[1])): int(v) for k, v in ready["ports"].items()}
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _answer(self, timeout_s: float = 15) -> dict[str, dict[str, int]]:
        assert self.proc is not None and self.proc.stdout is not None
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(timeout_s)
        if not result or not result[0]:
            raise RuntimeError(f"proxy process {self.pid} did not answer (exit code {self.proc.poll()})")
        answer = json.loads(result[0])
        if "error" in answer:
            raise RuntimeError(f"proxy: {answer['error']}")
        assert isinstance(answer, dict)
        return answer

    def _command(self, **cmd: object) -> dict[str, dict[str, int]]:
        with self._lock:
            assert self.proc is not None and self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
            return self._answer()

    def port(self, src: int, dst: int) -> int:
        return self._ports[(src, dst)]

    def set_link(self, src: int, dst: int, mode: Mode | None = None, delay_ms: float | None = None) -> None:
        self._command(cmd="set", src=src, dst=dst, mode=mode, delay_ms=delay_ms)

    def reset(self, src: int, dst: int) -> None:
        self._command(cmd="reset", src=src, dst=dst)

    def set_down(self, dst: int, down: bool) -> None:
        self._command(cmd="down", dst=dst, down=down)

    def heal(self) -> None:
        self._command(cmd="heal")

    def stats(self) -> dict[str, dict[str, int]]:
        return self._command(cmd="stats")["stats"]  # type: ignore[return-value]

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()


def _route_dict(r: Route) -> dict[str, object]:
    return {s: getattr(r, s) for s in Route.__slots__}


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


async def _serve(routes: list[Route], avoid: set[int]) -> None:
    proxy = Proxy(routes)
    await proxy.start(avoid)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def say(obj: object) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    say({"ports": {f"{s}->{d}": p for (s, d), p in proxy.ports().items()}})
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def commands() -> None:
        while True:
            line = await reader.readline()
            if not line:
                stop.set()  # the parent went away: end too
                return
            try:
                cmd = json.loads(line)
                what = cmd["cmd"]
                if what == "set":
                    mode = cmd.get("mode")
                    if mode is not None and mode not in MODES:
                        raise ValueError(f"unknown mode {mode!r}")
                    await proxy.set_link(int(cmd["src"]), int(cmd["dst"]), mode, cmd.get("delay_ms"))
                    say({"ok": 1})
                elif what == "reset":
                    await proxy.reset(int(cmd["src"]), int(cmd["dst"]))
                    say({"ok": 1})
                elif what == "down":
                    await proxy.set_down(int(cmd["dst"]), bool(cmd["down"]))
                    say({"ok": 1})
                elif what == "heal":
                    await proxy.heal()
                    say({"ok": 1})
                elif what == "stats":
                    say({"stats": proxy.stats()})
                else:
                    raise ValueError(f"unknown command {what!r}")
            except (ValueError, KeyError, TypeError, OSError) as exc:
                say({"error": str(exc)})

    task = loop.create_task(commands())
    await stop.wait()
    task.cancel()
    await proxy.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (1, 2):
        sys.stderr.write("usage: python -m tests.chaos.proxy '<routes as JSON>' ['<ports to avoid as JSON>']\n")
        return 2
    routes = [Route(**r) for r in json.loads(args[0])]
    avoid = {int(p) for p in json.loads(args[1])} if len(args) == 2 else set()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional
        asyncio.run(_serve(routes, avoid))
    else:
        uvloop.run(_serve(routes, avoid))
    return 0


if __name__ == "__main__":
    sys.exit(main())

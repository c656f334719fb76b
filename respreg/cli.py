"""Command line: ``respreg serve`` (one node) and ``respreg cluster`` (a local cluster of processes)."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from . import __version__, compiled
from .config import ConfigError, ServerConfig, parse_peers


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line and exits 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _fail(prog: str, message: str) -> NoReturn:
    sys.stderr.write(f"{prog}: error: {message}\n")
    sys.exit(1)


def _add_tuning(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--deadline-ms", type=float, default=3000.0, help="answer every request within this time (default 3000)"
    )
    p.add_argument(
        "--attempt-timeout-ms",
        type=float,
        default=500.0,
        help="least time a Paxos phase waits for missing answers before it retries; more while the peers "
        "answer slower (default 500; see docs/operations.md)",
    )
    p.add_argument(
        "--peer-timeout-ms",
        type=float,
        default=1000.0,
        help="declare a peer down when its answers are this late; writes then fail fast (default 1000)",
    )
    p.add_argument("--max-key-bytes", type=int, default=64 * 1024, help="longest key accepted (default 65536)")
    p.add_argument("--max-value-bytes", type=int, default=1024 * 1024, help="longest value accepted (default 1048576)")
    p.add_argument("--maxclients", type=int, default=10000, help="client connections accepted at once (default 10000)")
    p.add_argument(
        "--max-writes-in-flight",
        type=int,
        default=1024,
        help="client writes a node runs at once; more wait up to half their deadline to start (default 1024; "
        "see docs/operations.md)",
    )
    p.add_argument(
        "--fast-writes",
        default="yes",
        choices=["yes", "no"],
        help="write the keys a node owns in one round trip (default yes; see docs/design.md)",
    )
    p.add_argument(
        "--sync",
        default="auto",
        choices=["auto", "fsync", "syncfs"],
        help="how writes are made durable: fsync each file and directory, or sync the file system once "
        "per batch (default auto: syncfs on Linux 5.8 and later; see docs/operations.md)",
    )
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _read_secret(args: argparse.Namespace, prog: str) -> str:
    secret: str = args.cluster_secret or ""
    if args.cluster_secret_file:
        try:
            secret = Path(args.cluster_secret_file).read_text().strip()
        except OSError as exc:
            _fail(prog, f"cannot read --cluster-secret-file: {exc.strerror}")
        if not secret:
            _fail(prog, "--cluster-secret-file is empty")
    return secret


def serve(argv: Sequence[str]) -> int:
    prog = "respreg serve"
    p = _Parser(prog=prog, description="Run one respreg node.")
    p.add_argument("--id", type=int, required=True, help="this node's id, as listed in --peers")
    p.add_argument("--port", type=int, default=7000, help="client (Redis protocol) port (default 7000)")
    p.add_argument("--peer-port", type=int, required=True, help="port for Paxos traffic between nodes")
    p.add_argument("--bind", default="127.0.0.1", help="address for both ports and for outgoing peer links")
    p.add_argument("--data-dir", type=Path, required=True, help="directory of this node's durable state")
    p.add_argument("--peers", required=True, help="every member, this node included: 1=host:peerport,2=...")
    p.add_argument("--cluster-secret", default="", help="shared secret peers must present (prefer the file)")
    p.add_argument("--cluster-secret-file", default="", help="file holding the shared cluster secret")
    _add_tuning(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format=f"%(asctime)s node{args.id} %(levelname)s %(name)s: %(message)s")
    try:
        config = ServerConfig(
            node_id=args.id,
            port=args.port,
            peer_port=args.peer_port,
            bind=args.bind,
            data_dir=args.data_dir,
            peers=parse_peers(args.peers),
            cluster_secret=_read_secret(args, prog),
            deadline_ms=args.deadline_ms,
            attempt_timeout_ms=args.attempt_timeout_ms,
            peer_timeout_ms=args.peer_timeout_ms,
            max_key_bytes=args.max_key_bytes,
            max_value_bytes=args.max_value_bytes,
            maxclients=args.maxclients,
            max_writes_in_flight=args.max_writes_in_flight,
            fast_writes=args.fast_writes == "yes",
            sync_mode=args.sync,
        )
        config.validate()
    except ConfigError as exc:
        _fail(prog, str(exc))

    from .server import NodeServer, run_forever
    from .storage import DataDirError

    def ready(server: NodeServer) -> None:
        sys.stderr.write(
            f"respreg {__version__} node {config.node_id} (incarnation {server.incarnation}, pid {os.getpid()}) "
            f"serving clients on {config.bind}:{config.port}, peers on {config.bind}:{config.peer_port}\n"
        )
        sys.stderr.flush()

    try:
        run_forever(config, ready)
    except DataDirError as exc:
        _fail(prog, str(exc))
    except OSError as exc:
        _fail(prog, f"cannot listen on {config.bind} port {config.port} or {config.peer_port}: {exc.strerror or exc}")
    return 0


def _serving(host: str, port: int, peers: int) -> bool:
    """True when the node answers and its links to all ``peers`` other nodes are up."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"INFO paxos\r\n")
            data = b""
            while len(data) < 1 << 20:
                chunk = s.recv(65536)
                if not chunk:
                    return False
                data += chunk
                head, sep, _ = data.partition(b"\r\n")
                if sep and head.startswith(b"$") and len(data) >= len(head) + int(head[1:]) + 4:
                    return f"peers_up:{peers}\r\n".encode() in data
            return False
    except (OSError, ValueError):
        return False


def cluster(argv: Sequence[str]) -> int:
    prog = "respreg cluster"
    p = _Parser(prog=prog, description="Run a local cluster, one process per node, in the foreground.")
    p.add_argument("--nodes", type=int, default=3, help="number of nodes, odd (default 3)")
    p.add_argument("--port", type=int, default=7000, help="client port of node 1; node i uses port+i-1 (default 7000)")
    p.add_argument("--peer-port", type=int, default=0, help="peer port of node 1 (default: --port + 10000)")
    p.add_argument("--bind", default="127.0.0.1", help="address of every node (default 127.0.0.1)")
    p.add_argument(
        "--data-dir", type=Path, default=Path("respreg-data"), help="parent of node data dirs (default ./respreg-data)"
    )
    p.add_argument("--restart", action="store_true", help="restart a node that exits")
    _add_tuning(p)
    args = p.parse_args(argv)
    if args.nodes < 1 or args.nodes % 2 == 0:
        _fail(prog, f"--nodes must be odd and at least 1, not {args.nodes}")
    peer_base = args.peer_port or args.port + 10000
    if max(args.port, peer_base) + args.nodes - 1 > 65535:
        _fail(prog, "ports out of range")
    try:
        args.data_dir.mkdir(parents=True, exist_ok=True)
        secret_file = args.data_dir / "cluster.secret"
        if not secret_file.exists():
            fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
    except OSError as exc:
        _fail(prog, f"cannot use --data-dir {args.data_dir}: {exc.strerror or exc}")
    ids = list(range(1, args.nodes + 1))
    peers = ",".join(f"{i}={args.bind}:{peer_base + i - 1}" for i in ids)

    def command(i: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "respreg",
            "serve",
            "--id",
            str(i),
            "--port",
            str(args.port + i - 1),
            "--peer-port",
            str(peer_base + i - 1),
            "--bind",
            args.bind,
            "--data-dir",
            str(args.data_dir / f"node{i}"),
            "--peers",
            peers,
            "--cluster-secret-file",
            str(secret_file),
            "--deadline-ms",
            str(args.deadline_ms),
            "--attempt-timeout-ms",
            str(args.attempt_timeout_ms),
            "--peer-timeout-ms",
            str(args.peer_timeout_ms),
            "--max-key-bytes",
            str(args.max_key_bytes),
            "--max-value-bytes",
            str(args.max_value_bytes),
            "--maxclients",
            str(args.maxclients),
            "--max-writes-in-flight",
            str(args.max_writes_in_flight),
            "--fast-writes",
            args.fast_writes,
            "--sync",
            args.sync,
            "--log-level",
            args.log_level,
        ]

    procs: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)

    def launch(i: int) -> None:
        procs[i] = subprocess.Popen(command(i))
        print(
            f"node {i}: pid {procs[i].pid}, clients on {args.bind}:{args.port + i - 1}, "
            f"peers on {args.bind}:{peer_base + i - 1}, data in {args.data_dir / f'node{i}'}",
            flush=True,
        )

    for i in ids:
        launch(i)
    ready = False
    deadline = time.monotonic() + 30
    try:
        while not stopping:
            if not ready:
                if all(_serving(args.bind, args.port + i - 1, len(ids) - 1) for i in ids):
                    ready = True
                    print(
                        f"ready: {args.nodes} nodes, try: redis-cli -p {args.port} SETONCE greeting hello", flush=True
                    )
                elif time.monotonic() > deadline:
                    print("not ready after 30 s; still waiting (check the nodes' messages above)", flush=True)
                    deadline = time.monotonic() + 30
            for i, proc in list(procs.items()):
                code = proc.poll()
                if code is not None:
                    print(f"node {i} (pid {proc.pid}) exited with code {code}", flush=True)
                    del procs[i]
                    if args.restart:
                        time.sleep(0.5)
                        launch(i)
            if not procs and not args.restart:
                print("all nodes exited", flush=True)
                return 1
            time.sleep(0.1)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        print("stopped", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: respreg {serve,cluster,--version} [options]\n\n"
            "  respreg cluster   run a local cluster (3 nodes on ports 7000-7002 by default)\n"
            "  respreg serve     run one node (see respreg serve --help)"
        )
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"respreg {__version__} ({'compiled with mypyc' if compiled() else 'pure Python'})")
        return 0
    if argv[0] == "serve":
        return serve(argv[1:])
    if argv[0] == "cluster":
        return cluster(argv[1:])
    sys.stderr.write(f"respreg: error: unknown command {argv[0]!r} (expected serve or cluster)\n")
    return 2

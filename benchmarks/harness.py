"""Process plumbing for the benchmarks: free ports, started servers, measured client runs.

Every process started here is recorded with its exact command line and ended by its PID.
"""

from __future__ import annotations

import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
#: How the section benchmarks/scale.py writes at the end of RESULTS.md starts; run.py keeps it.
SCALE_SECTION_PREFIX = "## Scale ("


def split_scale_section(text: str) -> tuple[str, str]:
    """``text`` (a RESULTS.md) cut before the scale section that ends it: (the rest, up to and
    including the newline before the section; the section, or "" when there is none)."""
    at = text.find("\n" + SCALE_SECTION_PREFIX)
    return (text[: at + 1], text[at + 1 :]) if at >= 0 else (text, "")


def free_ports(n: int) -> list[int]:
    """n distinct loopback ports that were free a moment ago (the kernel picked them)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class CommandLog:
    """The exact commands a run executed, in order, with what each was for."""

    entries: list[tuple[str, str]] = field(default_factory=list)

    def add(self, purpose: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
        self.entries.append((purpose, (prefix + " " if prefix else "") + shlex.join(argv)))


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time a live process has used so far (0.0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    # Fields 14 and 15 of /proc/PID/stat (utime, stime), counted after the "(comm)" field.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    """One started server process."""

    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@dataclass
class ServerGroup:
    """Servers of one system under test; stop() ends each one by its PID."""

    label: str
    commands: CommandLog
    servers: list[Server] = field(default_factory=list)

    def start(
        self, name: str, argv: list[str], log_path: Path, cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> Server:
        self.commands.add(f"start {self.label}: {name}", argv)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        server = Server(name, argv, log_path, proc)
        self.servers.append(server)
        return server

    def cpu_seconds(self) -> float:
        return sum(proc_cpu_seconds(s.pid) for s in self.servers if s.alive())

    def check_alive(self) -> None:
        for s in self.servers:
            if not s.alive():
                raise RuntimeError(f"{s.name} (pid {s.pid}) exited with code {s.proc.returncode}:\n{s.log_tail()}")

    def stop(self) -> None:
        for s in self.servers:
            if s.proc.poll() is None:
                try:
                    os.kill(s.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for s in self.servers:
            try:
                s.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                try:
                    os.kill(s.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                s.proc.wait(timeout=15)


def wait_until(what: str, check: Callable[[], bool], timeout_s: float, group: ServerGroup | None = None) -> None:
    """Poll check() until it is true; fail early if a server of the group died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if group is not None:
            group.check_alive()
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready within {timeout_s:.0f}s")


def resp_command(port: int, *args: str, timeout_s: float = 5.0) -> bytes:
    """Send one RESP command and return the raw first reply chunk (enough for short replies)."""
    payload = f"*{len(args)}\r\n".encode() + b"".join(
        f"${len(a.encode())}\r\n".encode() + a.encode() + b"\r\n" for a in args
    )
    with socket.create_connection((HOST, port), timeout=timeout_s) as s:
        s.sendall(payload)
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def resp_ping(port: int) -> bool:
    return resp_command(port, "PING", timeout_s=0.5).startswith(b"+PONG")


@dataclass
class Measured:
    """A finished client run: its output, wall time and the CPU the client itself used."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    client_cpu_s: float
    timed_out: bool = False

    @property
    def client_cpu_pct(self) -> float:
        return 100.0 * self.client_cpu_s / self.wall_s if self.wall_s > 0 else 0.0


def run_measured(
    purpose: str, argv: list[str], commands: CommandLog, timeout_s: float, env: dict[str, str] | None = None
) -> Measured:
    """Run a load generator to completion (bounded by timeout_s), measuring its own CPU time."""
    commands.add(purpose, argv, env)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Measured(
        argv, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"), wall, cpu, timed_out
    )


def tool_version(argv: list[str]) -> str:
    """First line of a tool's version output, or why it is unavailable."""
    if shutil.which(argv[0]) is None:
        return "not installed"
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def machine_facts(temp_dir: Path) -> dict[str, str]:
    """What the numbers were measured on."""
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    fs = "unknown"
    try:
        out = subprocess.run(
            ["df", "--output=fstype,source,target", str(temp_dir)], capture_output=True, text=True, timeout=10
        )
        rows = out.stdout.strip().splitlines()
        if len(rows) >= 2:
            fstype, source, target = rows[1].split()[:3]
            fs = f"{fstype} ({source} mounted on {target})"
    except (OSError, subprocess.TimeoutExpired, ValueError):
        pass
    return {
        "nproc": str(os.cpu_count()),
        "cpu_model": cpu_model,
        "memory": mem,
        "temp_dir": str(temp_dir),
        "temp_dir_filesystem": fs,
        "kernel": platform.release(),
        "os": _os_release(),
        "python": sys.version.split()[0],
    }


def _os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()

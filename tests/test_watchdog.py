"""The server's safety net: an operation the core never finishes still gets an error reply.

Every operation normally ends by its deadline through the core's own timers; the watchdog is
there for bugs. The bug is simulated here by a core that swallows a request: its methods are
replaced on the instance, which a class compiled by mypyc does not allow, so the scenario runs
the package from source (RESPREG_PURE_PYTHON) in a child process when this one runs compiled.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import respreg
from respreg.core.node import NodeEffect
from respreg.core.proposer import Chosen, Failed, Failure
from respreg.server import NodeServer

from .cluster import one_node_config


def lost_operation_scenario(tmp_path: Path) -> None:
    async def scenario() -> None:
        server = NodeServer(one_node_config(tmp_path / "node1", deadline_ms=200))
        await server.start()
        try:
            assert server.core is not None
            fut, _ = server.write(b"k", b"v")  # a one-node cluster: written at once
            assert isinstance(await asyncio.wait_for(fut, 5), Chosen)

            def lost(*args: object) -> list[NodeEffect]:
                return []  # no request, no timer: the operation would wait forever

            server.core.begin_read = lost  # type: ignore[method-assign,assignment]
            server.core.begin_write = lost  # type: ignore[method-assign,assignment]
            read = server.read(b"other")
            write, _ = server.write(b"other", b"v")
            read_outcome = await asyncio.wait_for(read, 5)
            write_outcome = await asyncio.wait_for(write, 5)
            assert isinstance(read_outcome, Failed) and read_outcome.kind is Failure.NOQUORUM
            assert isinstance(write_outcome, Failed) and write_outcome.kind is Failure.UNCERTAIN
        finally:
            await server.stop()

    asyncio.run(scenario())


def test_an_operation_the_core_loses_is_answered_with_an_error(tmp_path: Path) -> None:
    if not respreg.compiled():
        lost_operation_scenario(tmp_path)
        return
    root = Path(__file__).resolve().parent.parent
    code = f"import pathlib, tests.test_watchdog as t; t.lost_operation_scenario(pathlib.Path({str(tmp_path)!r}))"
    res = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        env={**os.environ, "RESPREG_PURE_PYTHON": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr

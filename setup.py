"""Builds respreg, compiling most of its modules to C extensions with mypyc.

mypyc (part of mypy, which type-checks this code anyway) turns the fully typed modules into C;
a node then spends 10-50 % less CPU per request (benchmarks/PROFILE.md). Where no C compiler
is present, or ``RESPREG_PURE_PYTHON`` is set, the package is installed as pure Python, which
behaves the same, only slower. ``respreg/__init__.py`` falls back to the sources on its own when
a compiled module is older than its source (an edited checkout).
"""

from __future__ import annotations

import os
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

#: Left out: the command line (cli.py, __main__.py, run once), the package __init__ (it chooses
#: between compiled and source modules), and storage.py (its exception classes derive from
#: OSError, which mypyc compiles only as plain classes; its time goes to system calls, and
#: compiling it made no measured difference: benchmarks/PROFILE.md).
COMPILED = [
    "respreg/chosenlog.py",
    "respreg/client.py",
    "respreg/commands.py",
    "respreg/config.py",
    "respreg/keyindex.py",
    "respreg/peer.py",
    "respreg/resp.py",
    "respreg/server.py",
    "respreg/core/acceptor.py",
    "respreg/core/chosen.py",
    "respreg/core/node.py",
    "respreg/core/proposer.py",
    "respreg/core/types.py",
]


class BuildExtOrPure(build_ext):
    """Builds the extensions, or none of them: the compiled modules share one runtime library
    (respreg._native__mypyc), so a partial build would leave modules that cannot be imported."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any failure means: install the sources only
            for ext in self.extensions:
                for inplace in (0, 1):
                    self.inplace = inplace
                    path = self.get_ext_fullpath(ext.name)
                    if os.path.exists(path):
                        os.remove(path)
            self.warn(f"respreg: compiling with mypyc failed ({exc}); installing pure Python")


#: Written in C, not compiled from Python: the group committer's batched file system calls
#: (respreg/_fileio.c). Optional: where it does not build, storage.py makes the calls itself.
FILEIO = Extension("respreg._fileio", ["respreg/_fileio.c"], optional=True)


def ext_modules() -> list[Any]:
    if os.environ.get("RESPREG_PURE_PYTHON"):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        return [FILEIO]
    return [*mypycify(COMPILED, opt_level="3", group_name="respreg._native"), FILEIO]


setup(ext_modules=ext_modules(), cmdclass={"build_ext": BuildExtOrPure})

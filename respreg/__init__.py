"""respreg: write-once registers replicated with single-decree Paxos, spoken to over RESP.

Most modules are also compiled to C extensions with mypyc when the package is built (setup.py).
Python imports an extension in preference to the source beside it, so in a source checkout an
edited module would silently go on running its old compiled form. This module checks for that
before anything else of the package is imported: if a compiled module is older than its source,
or if ``RESPREG_PURE_PYTHON`` is set, every module of the package is imported from its source,
all of them (compiled modules call each other directly, so they cannot be mixed with sources).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType

__version__ = "0.1.0"

_HERE = os.path.dirname(os.path.abspath(__file__))
_PURE_ENV = "RESPREG_PURE_PYTHON"


def _compiled_modules() -> list[tuple[str, str]]:
    """(extension, source) of each compiled module of the package found beside its source."""
    found = []
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    for directory in (_HERE, os.path.join(_HERE, "core")):
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            for suffix in suffixes:
                if name.endswith(suffix):
                    source = os.path.join(directory, name[: -len(suffix)] + ".py")
                    if os.path.exists(source):
                        found.append((os.path.join(directory, name), source))
                    break
    return found


def _why_pure() -> str | None:
    """Why the modules must be imported from their sources, or None to import what Python finds."""
    if os.environ.get(_PURE_ENV):
        return None if not _compiled_modules() else f"{_PURE_ENV} is set"
    # Only a source checkout (setup.py beside the package) can hold an edited source; an
    # installed wheel's files all get the time of the install, in no particular order.
    if not os.path.exists(os.path.join(os.path.dirname(_HERE), "setup.py")):
        return None
    for extension, source in _compiled_modules():
        if os.stat(source).st_mtime_ns > os.stat(extension).st_mtime_ns:
            return (
                f"{source} changed after it was compiled; running every module from source (slower). "
                "Rebuild with: pip install -e ."
            )
    return None


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Finds ``respreg.*`` modules as source files, never as extensions."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        parts = fullname.split(".")
        if parts[0] != __name__ or len(parts) < 2:
            return None
        base = os.path.join(_HERE, *parts[1:])
        if os.path.isdir(base):
            return importlib.util.spec_from_file_location(
                fullname, os.path.join(base, "__init__.py"), submodule_search_locations=[base]
            )
        if os.path.exists(base + ".py"):
            return importlib.util.spec_from_file_location(fullname, base + ".py")
        return None


def _install_source_finder() -> str | None:
    why = _why_pure()
    if why is not None:
        sys.meta_path.insert(0, _SourceFinder())
        if not os.environ.get(_PURE_ENV):
            warnings.warn(f"respreg: {why}", RuntimeWarning, stacklevel=2)
    return why


#: Why this process runs the package from source although compiled modules exist, or None.
PURE_REASON = _install_source_finder()


def compiled() -> bool:
    """Whether the package's modules run compiled (mypyc) in this process."""
    from . import resp

    return not (resp.__file__ or "").endswith(".py")

"""The compiled build (setup.py compiles most modules with mypyc) and its fall-back to sources.

Each check runs a fresh interpreter on a copy of the package, so nothing here touches the
checkout the other tests import.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import respreg
from respreg import storage

PACKAGE = Path(respreg.__file__).parent
PROBE = "import respreg, respreg.client, respreg.core.node; print(respreg.compiled(), respreg.client.__file__)"


def require_compiled_build() -> None:
    if respreg._compiled_modules():
        return
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("no C compiler on this machine, so the package was installed as pure Python")
    if not Path(sysconfig.get_paths()["include"], "Python.h").exists():
        pytest.skip("no Python headers (Python.h) on this machine, so the package was installed as pure Python")
    pytest.fail("a C compiler and Python.h are present but no module was compiled: see the output of pip install -e .")


def copy_checkout(root: Path) -> Path:
    """A source checkout of the package in ``root`` (setup.py marks it as one), times kept."""
    shutil.copytree(PACKAGE, root / "respreg", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(PACKAGE.parent / "setup.py", root / "setup.py")
    return root / "respreg"


def probe(root: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "RESPREG_PURE_PYTHON"}
    environ.update(env, PYTHONPATH=str(root))
    return subprocess.run(
        [sys.executable, "-c", PROBE], cwd=root, env=environ, capture_output=True, text=True, timeout=60, check=True
    )


def test_this_process_runs_the_compiled_modules() -> None:
    require_compiled_build()
    assert respreg.PURE_REASON is None
    assert respreg.compiled()
    for name in ("resp", "client", "server", "peer", "core.node", "core.proposer", "core.acceptor"):
        module = sys.modules.get(f"respreg.{name}") or __import__(f"respreg.{name}", fromlist=["_"])
        assert not str(module.__file__).endswith(".py"), module.__file__
    # The C module of the group committer's batched calls is built with them (setup.py).
    assert storage.batched_io()


def test_a_fresh_copy_runs_compiled(tmp_path: Path) -> None:
    require_compiled_build()
    copy_checkout(tmp_path)
    res = probe(tmp_path)
    compiled, client_file = res.stdout.split()
    assert compiled == "True"
    assert client_file.startswith(str(tmp_path)) and not client_file.endswith(".py")
    assert "changed after it was compiled" not in res.stderr


def test_an_edited_source_makes_every_module_run_from_source(tmp_path: Path) -> None:
    require_compiled_build()
    package = copy_checkout(tmp_path)
    edited = package / "core" / "chosen.py"
    later = max(p.stat().st_mtime for p in package.rglob("*.so")) + 10
    os.utime(edited, (later, later))
    res = probe(tmp_path)
    compiled, client_file = res.stdout.split()
    # Not only the edited module: compiled modules call each other directly, so none may run.
    assert compiled == "False"
    assert client_file == str(package / "client.py")
    assert f"{edited} changed after it was compiled" in res.stderr
    assert "pip install -e ." in res.stderr


def test_pure_python_on_request(tmp_path: Path) -> None:
    require_compiled_build()
    package = copy_checkout(tmp_path)
    res = probe(tmp_path, RESPREG_PURE_PYTHON="1")
    compiled, client_file = res.stdout.split()
    assert compiled == "False"
    assert client_file == str(package / "client.py")
    assert res.stderr == ""  # asked for, so no warning


def test_version_names_the_build() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "respreg", "--version"], capture_output=True, text=True, timeout=60, check=True
    )
    build = "compiled with mypyc" if respreg.compiled() else "pure Python"
    assert res.stdout == f"respreg {respreg.__version__} ({build})\n"

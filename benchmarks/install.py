"""Install what the benchmarks need when it is missing, saying so: Debian packages and aiohttp."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

# binary -> Debian package that ships it
APT_BINARIES = {
    "redis-server": "redis-server",
    "redis-cli": "redis-tools",
    "redis-benchmark": "redis-tools",
    "etcd": "etcd-server",
    "etcdctl": "etcd-client",
}
# importable module -> PyPI distribution
PY_MODULES = {"aiohttp": "aiohttp"}


def missing_binaries() -> list[str]:
    return [b for b in APT_BINARIES if shutil.which(b) is None]


def missing_modules() -> list[str]:
    return [m for m in PY_MODULES if importlib.util.find_spec(m) is None]


def ensure(log: list[str]) -> None:
    """Install missing Debian packages (apt-get) and Python modules (pip, into this interpreter)."""
    packages = sorted({APT_BINARIES[b] for b in missing_binaries()})
    if packages:
        print(f"installing Debian packages with apt-get: {' '.join(packages)}", flush=True)
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        update = [*sudo, "apt-get", "update", "-qq"]
        install = [*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]
        for cmd in (update, install):
            log.append(" ".join(cmd))
            subprocess.run(cmd, check=True, env=env)
        still = missing_binaries()
        if still:
            raise RuntimeError(f"still missing after apt-get install: {', '.join(still)}")
    modules = missing_modules()
    if modules:
        dists = [PY_MODULES[m] for m in modules]
        print(f"installing Python packages with pip into {sys.prefix}: {' '.join(dists)}", flush=True)
        cmd = [sys.executable, "-m", "pip", "install", "-q", *dists]
        log.append(" ".join(cmd))
        subprocess.run(cmd, check=True)
        importlib.invalidate_caches()

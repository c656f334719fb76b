"""Smoke test of the benchmark harness: `benchmarks/run.py --quick` end to end, no timing thresholds.

It needs redis-server, redis-benchmark, etcd, etcdctl and aiohttp already installed (it never
installs anything) and skips, saying what is missing, otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "benchmarks" / "run.py"

# Every workload and the targets it runs on: one row each in the results.
EXPECTED = {
    "get-hit-P1": {"respreg", "redis-mem"},
    "get-hit-P16": {"respreg", "redis-mem"},
    "get-miss-P16": {"respreg", "redis-mem"},
    "setonce-c1": {"respreg", "redis-durable", "etcd"},
    "setonce-c16": {"respreg", "redis-durable", "etcd"},
    "setonce-c64": {"respreg", "redis-durable", "etcd"},
    "setonce-c1000": {"respreg"},
    "contended": {"respreg"},
    "etcd-check-perf-s": {"etcd"},
    "etcd-check-perf-xl": {"etcd"},
}


#: Workloads run in rounds (alternating with their anchors); the others run once.
REPEATED = {w for w in EXPECTED if w.startswith(("get-", "setonce-"))}


def _missing() -> list[str]:
    missing = [b for b in ("redis-server", "redis-benchmark", "etcd", "etcdctl") if shutil.which(b) is None]
    if importlib.util.find_spec("aiohttp") is None:
        missing.append("aiohttp (Python package)")
    return missing


@pytest.mark.timeout(600)
def test_quick_run_writes_a_row_per_workload(tmp_path: Path) -> None:
    missing = _missing()
    if missing:
        pytest.skip(
            f"benchmark smoke test needs {', '.join(missing)}; run `.venv/bin/python benchmarks/run.py --quick` "
            "once (it installs them), or apt-get install redis-server redis-tools etcd-server etcd-client"
        )
    md, js = tmp_path / "R.md", tmp_path / "r.json"
    # An earlier report whose scale section (benchmarks/scale.py's, a run of its own) must survive.
    scale_section = "## Scale (10 keys)\n\nfigures of benchmarks/scale.py\n"
    md.write_text("# an earlier report\n\nold figures\n\n" + scale_section)
    # Two rounds: each row then stands for both (the median round; every round in its extra).
    cmd = [sys.executable, str(RUN), "--quick", "--rounds", "2", "--out", str(md), "--json", str(js), "--skip-install"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=540)
    output = f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    # 0: all ran and passed; 3: results written but a workload failed or a check failed.
    assert proc.returncode in (0, 3), output
    assert md.is_file() and js.is_file(), output

    results = json.loads(js.read_text())
    rows = results["rows"]
    seen = {(r["workload"], r["target"]) for r in rows}
    wanted = {(w, t) for w, targets in EXPECTED.items() for t in targets}
    assert wanted <= seen, f"missing rows: {sorted(wanted - seen)}\n{output}"
    assert len(rows) == len(seen), "a workload/target pair has more than one row"

    errors = [f"{r['workload']} on {r['target']}: {r['status']}" for r in rows if r["status"].startswith("error")]
    assert not errors, "\n".join(errors) + "\n" + output
    for r in rows:
        if r["status"] == "ok":
            assert r["throughput"] is not None and r["throughput"] > 0, r
            assert r["command"], r
        elif not r["status"].startswith("skipped"):
            warnings.warn(f"benchmark check: {r['workload']} on {r['target']}: {r['status']}", stacklevel=1)
        if r["workload"] in REPEATED and r["status"] == "ok":
            rounds = r["extra"]["rounds"]
            assert len(rounds) == 2 and all(x["status"] == "ok" for x in rounds), r
            assert r["throughput"] == min(x["throughput"] for x in rounds), "the lower middle round stands for two"
            if r["workload"].startswith("setonce") and r["target"] != "etcd":  # (etcd_txn.py: its own prefix each run)
                assert len({x["command"] for x in rounds}) == 2, "fresh keys each round"

    meta = results["meta"]
    assert meta["quick"] is True
    for key in ("nproc", "cpu_model", "memory", "temp_dir_filesystem"):
        assert meta["machine"][key], key
    for key in ("redis-server", "etcd", "python"):
        assert meta["versions"][key], key
    assert results["commands"], "no commands recorded"

    text = md.read_text()
    assert "## Where time goes" in text
    assert text.endswith("\n\n" + scale_section) and "old figures" not in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    titles = {r["title"] for r in rows}
    for title in titles:
        assert any(line.startswith(f"| {title} |") for line in table), f"no table row for {title!r}"
    result_lines = [line for line in table if any(line.startswith(f"| {t} |") for t in titles)]
    assert len(result_lines) == len(rows), "the results table should have exactly one line per row"

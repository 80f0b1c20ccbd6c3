"""The side-by-side Feast benchmark runs end to end (`--quick`), so it never rots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CASES = {"1x50", "100x50", "100x50+emb"}


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_quick_run_writes_results_with_every_section(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_feast.py"), "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [path] = tmp_path.glob("feast-2*.json")
    results = json.loads(path.read_text())
    assert {"context", "machine", "config", "materialize", "lookup", "variants", "ratios", "targets"} <= results.keys()
    assert {"nproc", "memory_gb", "python", "feast", "grpcio", "redis_py", "git_commit"} <= (results["machine"].keys())
    for job in ("ours", "feast"):
        assert results["materialize"][job]["rows"] > 0
        assert results["materialize"][job]["peak_rss_mb"] > 0
    assert results["materialize"]["ours"]["rows"] == results["materialize"]["feast"]["rows"]
    assert set(results["lookup"]) == CASES
    for case in results["lookup"].values():
        for system in ("ours", "feast_sdk", "feast_server", "floor"):
            assert case[system]["latency"]["p50_ms"] > 0
            assert set(case[system]["throughput"]) == {"1", "8"}
    assert all(isinstance(t["met"], bool) for t in results["targets"])
    assert (tmp_path / "feast-latest.md").read_text().startswith("# Ours vs Feast")

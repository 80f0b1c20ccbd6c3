"""The quick start runs end to end: embedded servers, feast apply, data, materialize, serve."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_demo_runs_end_to_end_and_shows_a_lookup(tmp_path: Path) -> None:
    featurestore = Path(sys.executable).parent / "featurestore"
    done = subprocess.run(
        [
            str(featurestore),
            "demo",
            "--once",
            "--users",
            "300",
            "--items",
            "100",
            "--data-dir",
            str(tmp_path / "data"),
            "--port",
            "0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "materialized" in done.stdout
    assert "user_profile:age" in done.stdout
    assert "status [1, 1, 1]" in done.stdout
    assert "P(click)" in done.stdout

"""The server's metrics stay in process even when started by a process that imported Feast."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile


def _value_class(env: dict[str, str]) -> str:
    code = "import featurestore.metrics as m; print(type(m.IN_FLIGHT._value).__name__)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_a_multiprocess_folder_set_by_feast_is_ignored() -> None:
    folder = tempfile.mkdtemp(prefix="feast_metrics_")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": folder, "PROMETHEUS_MULTIPROCESS_DIR": folder}
    assert _value_class(env) == "MutexValue"
    assert os.listdir(folder) == []  # no mmap files left behind


def test_an_operators_multiprocess_folder_is_kept() -> None:
    folder = tempfile.mkdtemp(prefix="metrics-")
    env = {k: v for k, v in os.environ.items() if "MULTIPROC" not in k.upper()}
    assert _value_class({**env, "PROMETHEUS_MULTIPROC_DIR": folder}) == "MmapedValue"

"""ModelRegistry without Redis: threads from the settings or models.yaml, what each model
costs (describe and Prometheus), loads that never touch the inference thread, and the
watcher that notices a replaced file or a changed models.yaml.

Models are tiny linear ONNX graphs written by onnx.helper; the registry is built by hand.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper
from prometheus_client import REGISTRY as PROMETHEUS
from registries import float_features, int_key, make_registry, make_view

from featurestore.errors import ConfigError
from featurestore.inference.runtime import ModelRegistry

WIDTH = 3
VIEW = make_view("item_stats", int_key("item_id"), 0, *float_features(WIDTH))
REGISTRY = make_registry(VIEW, project="runtime")
POLL_S = 0.05
WAIT_S = 10.0


def linear_model(weight: float, width: int = WIDTH) -> bytes:
    """score = matrix @ [weight] * width."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [width, 1], [weight] * width)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["features", "w"], ["score"])],
        "linear",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, width])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [None, 1])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def version_of(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()[:12]


def models_yaml(path: str = "a.onnx", threads: int | None = None, fill: float = 0.0) -> str:
    extra = f"\n    intra_op_threads: {threads}" if threads is not None else ""
    return f"""
models:
  a:
    path: {path}
    features: [item_stats:f0, item_stats:f1, item_stats:f2]
    fill: {{default: {fill}}}
    output: score
    output_column: 0{extra}
"""


def replace(path: Path, blob: bytes) -> None:
    """Replace a file the way deployments should: write beside it, then rename."""
    staged = path.with_suffix(".staged")
    staged.write_bytes(blob)
    os.replace(staged, path)


@pytest.fixture
async def folder(tmp_path: Path) -> Path:
    (tmp_path / "a.onnx").write_bytes(linear_model(1.0))
    (tmp_path / "models.yaml").write_text(models_yaml())
    return tmp_path


@pytest.fixture
async def models(folder: Path) -> AsyncIterator[ModelRegistry]:
    registry = ModelRegistry(folder / "models.yaml", REGISTRY, intra_op_threads=1, poll_s=POLL_S)
    outcome = await registry.load_all()
    assert outcome == {"a": f"loaded {version_of(linear_model(1.0))}"}
    yield registry
    await registry.aclose()


async def until(condition: Callable[[], bool]) -> None:
    """Wait for `condition` (the watcher's work), at most WAIT_S."""
    for _ in range(int(2 * WAIT_S / POLL_S)):
        if condition():
            return
        await asyncio.sleep(POLL_S / 2)
    raise AssertionError(f"still not true after {WAIT_S} s")


async def serving(models: ModelRegistry, version: str) -> None:
    """Wait until model a's serving version is `version`."""
    await until(lambda: models.get("a").version == version)


def sample(name: str, **labels: str) -> float | None:
    return PROMETHEUS.get_sample_value(name, labels)


def loads_failed(count: float) -> bool:
    return sample("featurestore_model_loads_total", model="a", outcome="failed") == count


async def test_threads_come_from_the_settings_unless_models_yaml_sets_them(folder: Path) -> None:
    models = ModelRegistry(folder / "models.yaml", REGISTRY, intra_op_threads=3, poll_s=0)
    await models.load_all()
    assert models.get("a").session.get_session_options().intra_op_num_threads == 3
    (folder / "models.yaml").write_text(models_yaml(threads=2))
    assert (await models.reload())["a"].startswith("loaded")
    assert models.get("a").session.get_session_options().intra_op_num_threads == 2
    assert models.describe()[0].threads == 2
    models.close()
    (folder / "models.yaml").write_text(models_yaml(threads=0))
    with pytest.raises(ConfigError, match="intra_op_threads is 0; an integer from 1 to 256"):
        await ModelRegistry(folder / "models.yaml", REGISTRY, poll_s=0).load_all()


async def test_each_model_shows_its_version_width_threads_and_memory(models: ModelRegistry, folder: Path) -> None:
    (info,) = models.describe()
    blob = (folder / "a.onnx").read_bytes()
    assert (info.name, info.version, info.width, info.threads) == ("a", version_of(blob), WIDTH, 1)
    assert info.memory_bytes >= info.file_bytes == len(blob)
    assert sample("featurestore_model_info", model="a", version=info.version) == 1
    assert sample("featurestore_model_input_width", model="a") == WIDTH
    assert sample("featurestore_model_threads", model="a") == 1
    assert sample("featurestore_model_memory_bytes", model="a") == info.memory_bytes
    runs = sample("featurestore_model_run_seconds_count", model="a") or 0.0
    await models.get("a").run(np.ones((4, WIDTH), dtype=np.float32))
    assert sample("featurestore_model_run_seconds_count", model="a") == runs + 1
    assert (sample("featurestore_model_cpu_seconds_total", model="a") or 0.0) > 0


async def test_a_replaced_file_is_noticed_and_swapped_in(models: ModelRegistry, folder: Path) -> None:
    old = models.get("a")
    replace(folder / "a.onnx", linear_model(2.0))
    await serving(models, version_of(linear_model(2.0)))
    assert models.swaps == 1
    scores = await models.get("a").run(np.ones((2, WIDTH), dtype=np.float32))
    assert scores.tolist() == [2.0 * WIDTH] * 2
    assert (await old.run(np.ones((1, WIDTH), dtype=np.float32))).tolist() == [WIDTH]  # in-flight calls keep theirs
    assert sample("featurestore_model_info", model="a", version=old.version) == 0


async def test_a_changed_models_yaml_entry_is_noticed(models: ModelRegistry, folder: Path) -> None:
    (folder / "b.onnx").write_bytes(linear_model(3.0))
    (folder / "models.yaml").write_text(models_yaml(path="b.onnx"))
    await serving(models, version_of(linear_model(3.0)))
    (folder / "models.yaml").write_text(models_yaml(path="b.onnx", fill=7.0))  # same file, new fill
    await until(lambda: models.get("a").spec.columns[0].default == 7.0)


async def test_a_broken_file_never_replaces_the_working_one_and_is_not_retried(
    models: ModelRegistry, folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    working = models.get("a").version
    failed = sample("featurestore_model_loads_total", model="a", outcome="failed") or 0.0
    for broken in (b"not an onnx file", linear_model(1.0, width=WIDTH + 1)):
        replace(folder / "a.onnx", broken)
        failed += 1
        await until(partial(loads_failed, failed))
        await asyncio.sleep(10 * POLL_S)  # polls that find nothing new try nothing
        assert sample("featurestore_model_loads_total", model="a", outcome="failed") == failed
        assert models.get("a").version == working
        assert (await models.get("a").run(np.ones((1, WIDTH), dtype=np.float32))).tolist() == [WIDTH]
    assert "still serving version " + working in caplog.text
    replace(folder / "a.onnx", linear_model(5.0))  # a good file again: swapped in
    await serving(models, version_of(linear_model(5.0)))


async def test_a_new_version_loads_while_the_inference_thread_is_busy(models: ModelRegistry, folder: Path) -> None:
    """Loading, checking and warming a session never waits for the model runs in flight."""
    release = threading.Event()
    busy = asyncio.get_running_loop().run_in_executor(models.executor, release.wait, WAIT_S)
    try:
        replace(folder / "a.onnx", linear_model(4.0))
        async with asyncio.timeout(WAIT_S / 2):
            outcome = await models.reload()
        assert outcome["a"] == f"loaded {version_of(linear_model(4.0))}"
    finally:
        release.set()
        await busy

"""The compiled registry: Feast's registry read once per content, then from its cache."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from featurestore.errors import ConfigError
from featurestore.registry import load_registry


@pytest.fixture
def repo(feature_repo: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "repo"
    shutil.copytree(feature_repo, copy)
    for cached in copy.glob("data/*.compiled.json"):
        cached.unlink()
    return copy


def test_cache_gives_the_same_registry_as_feast(repo: Path) -> None:
    from_feast = load_registry(repo)
    cache = repo / "data" / "registry.db.compiled.json"
    assert cache.exists()
    from_cache = load_registry(repo)
    assert from_cache == from_feast
    assert dict(from_cache.views) == dict(from_feast.views)
    assert from_cache.resolve(["ranking_v1"]) == from_feast.resolve(["ranking_v1"])


def test_a_cached_load_does_not_import_feast(repo: Path) -> None:
    load_registry(repo)
    code = (
        "import sys; from pathlib import Path; from featurestore.registry import load_registry;"
        f" r = load_registry(Path({str(repo)!r})); print(len(r.views), 'feast' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["4", "False"]


def test_a_new_registry_content_is_compiled_again(repo: Path) -> None:
    first = load_registry(repo)
    registry_file = repo / "data" / "registry.db"
    (repo / "data" / "registry.db.compiled.json").write_text('{"format": 1, "sha256": "stale", "project": "recsys"}')
    assert load_registry(repo) == first  # a stale or broken cache is ignored
    registry_file.write_bytes(b"not a registry")
    with pytest.raises(ConfigError, match="cannot read the Feast registry"):
        load_registry(repo)


def test_missing_registry_is_a_config_error(repo: Path) -> None:
    shutil.rmtree(repo / "data")
    with pytest.raises(ConfigError, match="run `feast apply`"):
        load_registry(repo)

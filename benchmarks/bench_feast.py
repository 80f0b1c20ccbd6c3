"""Side by side with Feast 0.67 on the same data, the same Redis and the same machine.

    .venv/bin/python benchmarks/bench_feast.py [--users 100000 --items 20000] [--workers 1]
    .venv/bin/python benchmarks/bench_feast.py --quick      # tiny data, a minute or two

One run, one embedded PostgreSQL and one embedded Redis (ours in db 0, Feast's in db 1):

1. `feast apply` on a copy of feature_repo/; feature_repo/generate.py writes the demo
   data (3 versions per entity).
2. Materialization, each job as a child process, twice (the first run loads every view
   from its TTL horizon; the second finds nothing new, so its wall time is the job's
   fixed cost): Feast's `feast materialize-incremental NOW` into Feast's Redis layout and
   our `featurestore-materialize incremental` into ours. Rows/s and the peak RSS of the
   job's process tree (psutil, sampled every 20 ms).
3. Lookups of 1 x 50, 100 x 50 and 100 x (50 + the 64-d item embedding) features
   (24 user_profile + 23 user_activity + 3 item_stats; the same references and entities
   for every system), each system measured from its own client process
   (benchmarks/feast_client.py): our gRPC service through AsyncClient, Feast's SDK in
   process, Feast's feature server (`feast serve`) over keep-alive HTTP. Both servers
   run `--workers` processes. Sequential p50/p99/p99.9, then closed-loop calls/s at each
   `--in-flight` count.
4. Floors from the grpc client process: bench_lookup's echo server answering as many
   bytes as our response, and a Redis MGET of the same keys; floor = echo + MGET.
5. Feast variants that might make it faster: its feature server with 2 workers per
   core, a feature service instead of a feature list, and its SDK with gc.freeze().

Writes <out>/feast-<time>.json, <out>/feast-latest.md and PNG plots (benchmarks/results
by default; `--out` elsewhere).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import feast_report
import psutil
import redis
from bench_lookup import serve_command

from featurestore.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from featurestore.registry import load_registry

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
VIEWS = ("user_profile", "user_activity", "item_stats", "item_embedding")
ITEM_STATS_3 = ("price", "category", "rating_avg")
EMBEDDING = "item_embedding:embedding"
FEATURE_SERVICE = "ranking_v1"


# -- set-up ---------------------------------------------------------------------------


def feast_env(pg: EmbeddedPostgres, rds: EmbeddedRedis) -> dict[str, str]:
    """The environment feature_repo/feature_store.yaml reads; Feast's Redis is db 1."""
    return {
        **os.environ,
        "FEATURESTORE_PG_HOST": pg.host,
        "FEATURESTORE_PG_PORT": str(pg.port),
        "FEATURESTORE_PG_DB": pg.database,
        "FEATURESTORE_PG_USER": pg.user,
        "FEATURESTORE_PG_PASSWORD": "",
        "FEATURESTORE_FEAST_REDIS": f"{rds.host}:{rds.port},db=1",
    }


def prepare(workdir: Path, env: dict[str, str], dsn: str, args: argparse.Namespace) -> Path:
    """A copy of feature_repo/ with `feast apply` run and the demo data generated."""
    repo = workdir / "feature_repo"
    shutil.copytree(ROOT / "feature_repo", repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
    subprocess.run([str(BIN / "feast"), "apply"], cwd=repo, env=env, check=True, capture_output=True)
    subprocess.run(
        [
            sys.executable,
            str(repo / "generate.py"),
            "--dsn",
            dsn,
            "--repo",
            str(repo),
            "--users",
            str(args.users),
            "--items",
            str(args.items),
        ],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return repo


def feature_names(repo: Path) -> dict[str, list[str]]:
    """The registry's feature names per view, in column order."""
    registry = load_registry(repo)
    return {name: [f.name for f in v.layout.features] for name, v in registry.views.items()}


def references(names: dict[str, list[str]], item_stats: list[str]) -> list[str]:
    """user_profile (24) + user_activity (23) + the given item_stats features."""
    refs = [f"{v}:{f}" for v in ("user_profile", "user_activity") for f in names[v]]
    return refs + [f"item_stats:{f}" for f in item_stats]


# -- materialization ----------------------------------------------------------------------


def run_tree(cmd: list[str], env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """Run `cmd`; its wall time and the peak RSS of its process tree (sampled, 20 ms)."""
    started = time.perf_counter()
    proc = psutil.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        total = 0
        with contextlib.suppress(psutil.Error):
            for p in [proc, *proc.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
        peak = max(peak, total)
        time.sleep(0.02)
    out, err = proc.communicate()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return {"wall_s": wall, "peak_rss_mb": peak / 2**20, "stdout": out.decode().strip()}


def feast_rows(rds: EmbeddedRedis) -> int:
    """(entity, view) rows in Feast's layout: one `_ts:<view>` hash field each."""
    client = redis.Redis(host=rds.host, port=rds.port, db=1)
    rows = 0
    batch: list[bytes] = []
    for key in client.scan_iter(count=5000):
        batch.append(key)
        if len(batch) == 2000:
            rows += _count_ts(client, batch)
            batch = []
    rows += _count_ts(client, batch)
    client.close()
    return rows


def _count_ts(client: redis.Redis, batch: list[bytes]) -> int:
    pipe = client.pipeline(transaction=False)
    for key in batch:
        for view in VIEWS:
            pipe.hexists(key, f"_ts:{view}")
    return sum(bool(x) for x in pipe.execute())


def materialize(repo: Path, env: dict[str, str], dsn: str, rds: EmbeddedRedis, reruns: bool = True) -> dict[str, Any]:
    """Both jobs, each twice: the load, then a run with nothing new (the fixed cost)."""
    runs = 2 if reruns else 1
    ours_cmd = [
        str(BIN / "featurestore-materialize"),
        "--repo",
        str(repo),
        "--redis",
        rds.url,
        "--dsn",
        dsn,
        "incremental",
    ]
    ours = [run_tree(ours_cmd, env, repo) for _ in range(runs)]
    read = re.search(r"read (\d+) rows, wrote (\d+)", ours[0]["stdout"])
    assert read, ours[0]["stdout"]
    feast = []
    for _ in range(runs):
        end = datetime.now(UTC).replace(tzinfo=None).isoformat(timespec="seconds")
        feast.append(run_tree([str(BIN / "feast"), "materialize-incremental", end], env, repo))
    result = {
        "ours": _job(ours, int(read[2])),
        "feast": _job(feast, feast_rows(rds)),
        # Both first runs load each view from now - its TTL.
        "feast_command": "feast materialize-incremental <now>",
        "ours_command": "featurestore-materialize incremental",
        "ours_summary": ours[0]["stdout"],
    }
    print(f"materialized: ours {result['ours']}\n              feast {result['feast']}", file=sys.stderr)
    return result


def _job(runs: list[dict[str, Any]], rows: int) -> dict[str, Any]:
    load = runs[0]
    noop_s = runs[1]["wall_s"] if len(runs) > 1 else None
    # The load minus a run that finds nothing new: the rate of the work that scales with
    # rows, without interpreter start-up, imports and registry loading (None when the
    # difference drowns in noise, as it does on tiny data).
    net_s = load["wall_s"] - noop_s if noop_s is not None else 0.0
    return {
        "rows": rows,
        "wall_s": load["wall_s"],
        "rows_per_s": rows / load["wall_s"],
        "noop_rerun_wall_s": noop_s,
        "rows_per_s_net_of_fixed_cost": rows / net_s if net_s > 0.1 * load["wall_s"] else None,
        "peak_rss_mb": load["peak_rss_mb"],
        # The rerun's peak is the job's baseline: the interpreter and its imports.
        "noop_rerun_peak_rss_mb": runs[1]["peak_rss_mb"] if len(runs) > 1 else None,
    }


# -- servers and clients --------------------------------------------------------------------


@contextlib.contextmanager
def serving(cmd: list[str], env: dict[str, str], port: int, cwd: Path) -> Iterator[None]:
    """A server child process, from its port answering until it is stopped (by its pid)."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{cmd[:3]} exited with {proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_http(url: str, timeout_s: float = 60) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            if requests.get(url + "/health", timeout=2).ok:
                return
        time.sleep(0.2)
    raise SystemExit(f"{url} did not become healthy")


def client(spec: dict[str, Any], env: dict[str, str], workdir: Path) -> dict[str, Any]:
    """Run one feast_client.py role in its own process; its JSON results."""
    path = workdir / f"spec-{spec['role']}-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(spec))
    print(f"-- {spec['role']}: {', '.join(c['name'] for c in spec['cases'])}", file=sys.stderr)
    done = subprocess.run(
        [sys.executable, str(HERE / "feast_client.py"), str(path)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        check=True,
        cwd=ROOT,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def cases(args: argparse.Namespace, refs: list[str]) -> list[dict[str, Any]]:
    """The three lookups; Feast gets fewer sequential calls for its 100-row cases."""
    base = {"users": args.users, "items": args.items}
    views = ["user_profile", "user_activity", "item_stats"]
    return [
        {**base, "name": "1x50", "rows": 1, "features": refs, "views": views},
        {**base, "name": "100x50", "rows": 100, "features": refs, "views": views},
        {
            **base,
            "name": "100x50+emb",
            "rows": 100,
            "features": [*refs, EMBEDDING],
            "views": [*views, "item_embedding"],
        },
    ]


def lookups(
    args: argparse.Namespace, repo: Path, env: dict[str, str], rds: EmbeddedRedis, workdir: Path
) -> dict[str, Any]:
    """Ours with its floors, Feast's SDK and server (and their variants), one at a time."""
    names = feature_names(repo)
    refs = references(names, list(ITEM_STATS_3))
    assert len(refs) == 50, len(refs)
    all_cases = cases(args, refs)
    feast_cases = [{**c, "iterations": args.iterations if c["rows"] == 1 else args.feast_iterations} for c in all_cases]
    common = {
        "in_flight": args.in_flight,
        "duration_s": args.duration_s,
        "warmup": args.warmup,
        "iterations": args.iterations,
    }
    port, echo_port = free_port(), free_port()
    # The same server command as bench_lookup (no registry or index refresh, no hot-key
    # cache), so the two harnesses measure one configuration.
    serve = serve_command(repo, rds.url, port, "--workers", str(args.workers))
    echo = [sys.executable, str(HERE / "echo_server.py"), str(echo_port)]
    out: dict[str, Any] = {"variants": {}}
    with serving(serve, env, port, ROOT), serving(echo, env, echo_port, ROOT):
        out["grpc"] = client(
            {
                **common,
                "role": "grpc",
                "cases": all_cases,
                "project": "recsys",
                "target": f"127.0.0.1:{port}",
                "redis_url": rds.url,
                "echo_target": f"127.0.0.1:{echo_port}",
            },
            env,
            workdir,
        )
    # One SDK process for the main cases and the SDK variants: Feast imports in seconds.
    variant_cases = sdk_variants(args, refs, references(names, names["item_stats"]))
    sdk = client({**common, "role": "sdk", "repo": str(repo), "cases": feast_cases + variant_cases}, env, workdir)
    out["sdk"] = {c["name"]: sdk[c["name"]] for c in feast_cases}
    out["variants"]["sdk"] = {c["name"]: sdk[c["name"]] for c in variant_cases}
    out["http"] = feast_http(args, repo, env, workdir, common, feast_cases, args.workers)
    # Feast's server with more workers than ours: its own way to use the cores.
    workers = max(2, 2 * args.workers)
    http_cases = [{**c, "iterations": args.feast_iterations} for c in feast_cases[:2]]
    out["variants"]["http_workers"] = {
        "workers": workers,
        **feast_http(args, repo, env, workdir, common, http_cases, workers),
    }
    return out


def sdk_variants(args: argparse.Namespace, refs: list[str], service_refs: list[str]) -> list[dict[str, Any]]:
    """Feast SDK variants: feature service vs the same features listed; gc.freeze()."""
    base = {
        "users": args.users,
        "items": args.items,
        "rows": 100,
        "iterations": args.feast_iterations,
        "throughput": False,
    }
    return [
        {**base, "name": "100x69 feature list", "features": service_refs, "full_feature_names": True},
        {
            **base,
            "name": "100x69 feature service",
            "features": [],
            "feature_service": FEATURE_SERVICE,
            "full_feature_names": True,
        },
        {**base, "name": "100x50 gc.freeze()", "features": refs, "gc_freeze": True},
    ]


def feast_http(
    args: argparse.Namespace,
    repo: Path,
    env: dict[str, str],
    workdir: Path,
    common: dict[str, Any],
    feast_cases: list[dict[str, Any]],
    workers: int,
) -> dict[str, Any]:
    """`feast serve` with `workers` processes, measured over HTTP from a client process."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # Feast's best case: no access log, no worker recycling (its default restarts a
    # worker every ~1,000 requests, which would land in the measured calls).
    cmd = [
        str(BIN / "feast"),
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--no-access-log",
        "--max-requests",
        "0",
    ]
    with serving(cmd, env, port, repo):
        wait_http(url)
        return client({**common, "role": "http", "url": url, "cases": feast_cases}, env, workdir)


# -- the run ------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    from importlib.metadata import version

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": sys.version.split()[0],
        "feast": version("feast"),
        "grpcio": version("grpcio"),
        "redis_py": version("redis"),
        "platform": os.uname().release,
        "git_commit": commit + ("-dirty" if dirty else ""),
        "load_average_at_start": os.getloadavg(),
    }


def run(args: argparse.Namespace) -> Path:
    started = time.perf_counter()
    info = machine()
    with tempfile.TemporaryDirectory(prefix="bench-feast-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # PostgreSQL runs as an unprivileged user when we are root
        with EmbeddedPostgres(workdir / "pg") as pg, EmbeddedRedis(workdir / "redis") as rds:
            env = feast_env(pg, rds)
            repo = prepare(workdir, env, pg.dsn, args)
            print(
                f"set up {args.users:,} users, {args.items:,} items in {time.perf_counter() - started:.0f} s",
                file=sys.stderr,
            )
            mat = materialize(repo, env, pg.dsn, rds, reruns=not args.quick)
            measured = lookups(args, repo, env, rds, workdir)
    info["load_average_at_end"] = os.getloadavg()
    results = feast_report.assemble(args, info, mat, measured)
    results["wall_s"] = time.perf_counter() - started
    return feast_report.write(results, args.out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=1, help="processes of each server")
    parser.add_argument("--iterations", type=int, default=2000, help="sequential calls")
    parser.add_argument("--feast-iterations", type=int, default=300, help="sequential calls of Feast's 100-row cases")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--duration-s", type=float, default=2.0, help="per throughput point")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument(
        "--report",
        type=Path,
        metavar="JSON",
        help="only re-render a results JSON: ratios, targets, Markdown, plots",
    )
    parser.add_argument("--quick", action="store_true", help="tiny data and few calls: checks that the harness runs")
    args = parser.parse_args(argv)
    if args.report:
        results = feast_report.derive(json.loads(args.report.read_text()))
        print("wrote", feast_report.write(results, args.report.parent, args.report))
        return
    if args.quick:
        args.users, args.items, args.iterations, args.feast_iterations = 300, 100, 30, 10
        args.warmup, args.in_flight, args.duration_s = 5, [1, 8], 0.3
    args.command = " ".join(["python", *sys.argv])
    print("wrote", run(args))


if __name__ == "__main__":
    main()

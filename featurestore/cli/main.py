"""`featurestore serve|demo|cache-status`: parse arguments, build Settings, run.

    featurestore serve --repo feature_repo --redis redis://127.0.0.1:6379/0 --port 50051
    featurestore cache-status --target 127.0.0.1:50051 --top 20

With --workers N > 1, N processes each bind the port with SO_REUSEPORT and run their own
event loop (Python's GIL: one loop per core); the kernel spreads connections over them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from featurestore.config import Settings
from featurestore.errors import FeatureStoreError

__all__ = ["main"]

log = logging.getLogger("featurestore")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featurestore", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC feature server")
    serve.add_argument("--repo", type=Path, default=Path("feature_repo"), help="the Feast repo (default: feature_repo)")
    serve.add_argument(
        "--redis",
        default=os.environ.get("FEATURESTORE_REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="Redis URL (default: $FEATURESTORE_REDIS_URL or local)",
    )
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=50051)
    serve.add_argument("--workers", type=int, default=1, help="server processes on the port")
    serve.add_argument("--registry-refresh-s", type=float, default=30.0)
    serve.add_argument("--redis-timeout-s", type=float, default=1.0)
    serve.add_argument("--max-rows", type=int, default=10_000)
    serve.add_argument("--metrics-port", type=int, default=0, help="Prometheus port (0: off)")
    serve.add_argument("--grace-s", type=float, default=5.0)
    serve.add_argument(
        "--index-refresh-s",
        type=float,
        default=300.0,
        help="re-check retrieval indexes against Redis this often (0: never)",
    )
    serve.add_argument(
        "--index-exact-max",
        type=int,
        default=50_000,
        help="embedding views smaller than this get an exact index",
    )
    serve.add_argument("--index-approximate", choices=("hnsw", "ivf"), default="hnsw")
    serve.add_argument(
        "--cache-bytes", type=int, default=256 << 20, help="hot-key row cache budget, bytes (256 MiB; 0: off)"
    )
    serve.add_argument(
        "--cache-max-staleness-s",
        type=float,
        default=5.0,
        help="bound on serving a rewritten row when its event is lost",
    )
    serve.add_argument(
        "--cache-max-age-s", type=float, default=600.0, help="serve a cached row at most this long after reading it"
    )
    serve.add_argument(
        "--hot-publish-s", type=float, default=30.0, help="publish this server's hot keys this often (0: never)"
    )
    serve.add_argument(
        "--warm-budget-s", type=float, default=10.0, help="time allowed to warm the cache before SERVING"
    )
    serve.set_defaults(func=_serve)
    demo = commands.add_parser("demo", help="the quick start: embedded Redis and PostgreSQL, demo data, server, lookup")
    from featurestore.cli import demo as demo_command

    demo_command.add_arguments(demo)
    demo.set_defaults(func=demo_command.run)
    status = commands.add_parser("cache-status", help="a replica's hot-key cache and hot keys")
    from featurestore.cli import cache_status as admin

    admin.add_arguments(status)
    status.set_defaults(func=admin.run)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    return Settings(
        repo=args.repo,
        redis_url=args.redis,
        host=args.host,
        port=args.port,
        workers=args.workers,
        registry_refresh_s=args.registry_refresh_s,
        redis_timeout_s=args.redis_timeout_s,
        max_rows=args.max_rows,
        metrics_port=args.metrics_port,
        grace_s=args.grace_s,
        index_refresh_s=args.index_refresh_s,
        index_exact_max=args.index_exact_max,
        index_approximate=args.index_approximate,
        cache_bytes=args.cache_bytes,
        cache_max_staleness_s=args.cache_max_staleness_s,
        cache_max_age_s=args.cache_max_age_s,
        hot_publish_s=args.hot_publish_s,
        warm_budget_s=args.warm_budget_s,
    )


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")


def run_worker(settings: Settings) -> None:
    """Run one server process to completion on uvloop when available."""
    from featurestore.serving.server import run

    _configure_logging()  # a spawned worker starts with a fresh interpreter

    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(run(settings))


def _serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    log.info("serving with %r", settings)
    if settings.workers == 1:
        run_worker(settings)
        return 0
    context = multiprocessing.get_context("spawn")
    workers = []
    for i in range(settings.workers):
        # Only the first worker exposes metrics: the others would collide on its port.
        own = settings if i == 0 else _without_metrics(settings)
        workers.append(context.Process(target=run_worker, args=(own,), name=f"worker-{i}"))
    for worker in workers:
        worker.start()

    def forward(signum: int, frame: FrameType | None) -> None:
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for worker in workers:
        worker.join()
    return max((w.exitcode or 0 for w in workers), default=0)


def _without_metrics(settings: Settings) -> Settings:
    from dataclasses import replace

    return replace(settings, metrics_port=0)


def main(argv: Sequence[str] | None = None) -> int:
    """The `featurestore` command line; returns the exit code."""
    _configure_logging()
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except FeatureStoreError as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())

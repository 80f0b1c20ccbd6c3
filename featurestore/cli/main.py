"""`featurestore serve|demo|cache-status|hash-token`: parse arguments, build Settings, run.

    featurestore serve --repo feature_repo --redis redis://127.0.0.1:6379/0 --port 50051
    FEATURESTORE_CACHE_BYTES=0 featurestore serve          # any option from the environment
    featurestore cache-status --target 127.0.0.1:50051 --top 20
    featurestore hash-token --scopes read --name app < app.token >> tokens.txt

The `serve` options are built from the settings' fields (featurestore/config.py, which
documents each one); every one can also be set by FEATURESTORE_<NAME> (cli/options.py).
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
from dataclasses import replace
from types import FrameType

from featurestore.cli.options import add_options, option_values
from featurestore.config import OPTIONS, Settings
from featurestore.errors import FeatureStoreError

__all__ = ["main"]

log = logging.getLogger("featurestore")

PRODUCT = """\
A low-latency online feature store: one gRPC service that gives model servers the features
of many entities (a user and a hundred candidate items) in one call, read from Redis in one
round trip and returned as typed columns. Features are defined with Feast and copied from
PostgreSQL into Redis by the cron job `featurestore-materialize`. The same service finds
nearest neighbours in embedding views (FAISS) and scores candidates with ONNX models.
"""

EXAMPLES = """\
examples:
  featurestore demo                      # everything on embedded Redis and PostgreSQL
  featurestore serve --repo feature_repo --redis redis://127.0.0.1:6379/0
  featurestore cache-status --target 127.0.0.1:50051
  featurestore hash-token --scopes read --name app < app.token >> tokens.txt

`featurestore COMMAND --help` describes a command and its options.
"""

SERVE = """\
Run the gRPC feature server: GetOnlineFeatures, SearchSimilar, Predict and Rank over the
Redis that featurestore-materialize fills, with gRPC health, reflection and the admin
CacheStatus. SIGTERM turns health NOT_SERVING and drains in-flight calls before exiting.
With --tls-cert/--tls-key the port speaks TLS (--tls-client-ca: mutual TLS); with
--auth-tokens every call but health needs a bearer token with its scope (README, Security).

Every option can also be set by the environment variable FEATURESTORE_<NAME> given with it
(containers and Kubernetes configure by environment). A flag wins over the variable, the
variable over the default; an empty variable counts as unset. featurestore/config.py
documents every option.
"""


def _parser() -> argparse.ArgumentParser:
    from featurestore.cli import cache_status, demo, hash_token

    parser = argparse.ArgumentParser(
        prog="featurestore",
        description=PRODUCT,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the gRPC feature server (options from flags or FEATURESTORE_* variables)",
        description=SERVE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(serve, OPTIONS)
    serve.set_defaults(func=_serve)
    for name, module, help_text in (
        ("demo", demo, "the quick start: embedded Redis and PostgreSQL, demo data, a server and a lookup"),
        ("cache-status", cache_status, "print a running server's hot-key cache: hit ratio, budget, hottest keys"),
        ("hash-token", hash_token, "print the token file line (SHA-256 and scopes) of a token read from stdin"),
    ):
        command = commands.add_parser(
            name,
            help=help_text,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(command)
        command.set_defaults(func=module.run)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    """The settings of `serve`: its flags, else FEATURESTORE_* variables, else the defaults."""
    return Settings.from_options(option_values(args, OPTIONS, os.environ))


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which CPU build it picked: 8 lines of noise


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
    if settings.server.workers == 1:
        run_worker(settings)
        return 0
    context = multiprocessing.get_context("spawn")
    workers = []
    for i in range(settings.server.workers):
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
    return replace(settings, server=replace(settings.server, metrics_port=0))


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

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
import errno
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from multiprocessing.queues import SimpleQueue
from types import FrameType

from featurestore.cli.edge import INTERRUPTED, OneLineParser, configure_logging, describe
from featurestore.cli.options import add_options, option_values
from featurestore.config import OPTIONS, Settings, passwords_in
from featurestore.errors import ConfigError, FeatureStoreError

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

    parser = OneLineParser(
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


def _configure_logging(secrets: Iterable[str] = ()) -> None:
    """Log to stderr with passwords hidden: the patterns of URLs and DSNs, and `secrets` wherever they appear."""
    configure_logging("%(asctime)s %(process)d %(name)s %(levelname)s %(message)s", secrets=secrets)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which CPU build it picked: 8 lines of noise


def run_worker(settings: Settings) -> None:
    """Run one server process to completion on uvloop when available."""
    from featurestore.serving.server import run

    _configure_logging(passwords_in(settings.redis_url))  # a spawned worker starts with a fresh interpreter

    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        try:
            runner.run(run(settings))
        except OSError as exc:  # gRPC's bind failure is a ConfigError already: this is the metrics server's
            if exc.errno != errno.EADDRINUSE or not settings.server.metrics_port:
                raise
            raise ConfigError(f"cannot serve /metrics on port {settings.server.metrics_port}: {exc.strerror}") from exc


def _serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _configure_logging(passwords_in(settings.redis_url))
    log.info("serving with %r", settings)
    if settings.server.workers == 1:
        run_worker(settings)
        return 0
    return _run_workers(settings)


def _run_workers(settings: Settings) -> int:
    """Run `settings.server.workers` processes on one port until they stop; the exit code.

    The workers ignore Ctrl-C while they start (they inherit SIGINT ignored): a
    terminal's Ctrl-C reaches the whole process group, and this process forwards it to
    them as SIGTERM, so that one process decides what is reported. Every worker fails
    the same way (the same settings): each hands its one line to this process, which
    logs the first, rather than N workers printing it N times.
    """
    context = multiprocessing.get_context("spawn")
    failures: SimpleQueue[str] = context.SimpleQueue()
    workers = []
    for i in range(settings.server.workers):
        # Only the first worker exposes metrics: the others would collide on its port.
        own = settings if i == 0 else _without_metrics(settings)
        workers.append(context.Process(target=_worker, args=(own, failures), name=f"worker-{i}"))
    received: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for worker in workers:
            worker.start()
        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        for worker in workers:
            worker.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    codes = [w.exitcode or 0 for w in workers]
    if not any(codes):
        return 0
    if received:  # asked to stop: a worker still starting was ended by our SIGTERM, as asked
        if signal.SIGINT not in received:
            return 0
        log.error("interrupted")
        return INTERRUPTED
    log.error("%s", failures.get() if not failures.empty() else f"a worker exited with code {codes}")
    return max(code if code > 0 else 1 for code in codes)


def _worker(settings: Settings, failures: SimpleQueue[str]) -> None:
    """A spawned worker: `run_worker`, its failure handed to the parent as one line and an exit code."""
    sys.exit(_guarded(lambda: _run_to_end(settings), failures.put))


def _run_to_end(settings: Settings) -> int:
    run_worker(settings)
    return 0


def _without_metrics(settings: Settings) -> Settings:
    return replace(settings, server=replace(settings.server, metrics_port=0))


def _log_failure(line: str) -> None:
    log.error("%s", line)


def _guarded(call: Callable[[], int], report: Callable[[str], None] = _log_failure) -> int:
    """`call()`'s exit code; a failure is one line handed to `report` (the log) and an exit code.

    2 for our errors (bad settings, a missing repo, a taken port: FeatureStoreError),
    130 for Ctrl-C, 1 for anything else (an OS error, or a bug: its line says where).
    The log's formatter hides passwords, so no line carries one.
    """
    try:
        return call()
    except KeyboardInterrupt:
        report("interrupted")
        return INTERRUPTED
    except FeatureStoreError as exc:
        report(describe(exc))
        return 2
    except Exception as exc:
        report(describe(exc))
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """The `featurestore` command line; returns the exit code.

    Every failure is one line on stderr and a non-zero exit (2: bad arguments or
    settings, or a start that could not happen; 130: Ctrl-C; 1: anything else), never a
    traceback, and no line shows a password (cli/edge.py).
    """
    _configure_logging()
    return _guarded(lambda: _run(argv))


def _run(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)  # a bad flag: one line and SystemExit(2), which passes through
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

"""`featurestore-materialize`: the cron job's command line.

    featurestore-materialize incremental [--views a,b] [--repo PATH] [--redis URL] [--dsn DSN]
    featurestore-materialize backfill --start 2026-11-01T00:00 --end 2026-11-20T00:00
    featurestore-materialize incremental --shard 1/4     # one of 4 runs side by side
    featurestore-materialize warm [--limit 100000] [--repo PATH] [--redis URL]

--redis takes a Redis Cluster too: redis+cluster://host:port,host:port,... (the rows go
one guarded-write script per slot to every master at once; store/redis.py).

`--shard i/N` materializes only the entities whose join-key hash is in the i-th of N
ranges (the hash computed by PostgreSQL, so each run receives only its rows, and reads
only them where the table has an index on the hash: materialize/source.py), with a
watermark per view and a lock of its own: N runs side by side write exactly what one
run writes. In a Kubernetes indexed Job, set FEATURESTORE_SHARD_COUNT=N instead: the
shard is then JOB_COMPLETION_INDEX/N (--shard or FEATURESTORE_SHARD win over both).

`warm` writes nothing: it publishes a "warm" event on the project's events channel, and
every running server re-reads the fleet's hot set (`<project>:{__meta__}:hot`) into its
hot-key cache (featurestore/cache/hotcache.py); servers without a cache ignore it.

Every option but -v can also be set by its environment variable, the flag without dashes
in upper case after FEATURESTORE_ (FEATURESTORE_REPO, FEATURESTORE_REDIS_URL for --redis,
FEATURESTORE_DSN, FEATURESTORE_VIEWS, FEATURESTORE_BATCH_ROWS, FEATURESTORE_EXPIRY_GRACE_S,
FEATURESTORE_LOCK_TTL_S, FEATURESTORE_SHARD), as for `featurestore serve`: a flag wins over
the variable, the variable over the default, and an empty variable counts as unset.

Prints one summary line on stdout on success. On failure it prints one line on stderr
(no traceback unless -vv) and exits with a code the scheduler can branch on; no line it
prints or logs shows the password of the Redis URL or the PostgreSQL DSN:

    0  success                      3  bad configuration (registry, DSN, table, Redis URL)
    1  unexpected error             4  PostgreSQL or Redis unavailable
    2  bad arguments, unknown view  5  another run holds the lock (of this shard)
  130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from featurestore.cli.edge import INTERRUPTED, OneLineParser, configure_logging, describe, print_line
from featurestore.cli.options import environment_value, variable
from featurestore.config import OPTIONS_BY_NAME, passwords_in
from featurestore.errors import (
    ConfigError,
    FeatureStoreError,
    InvalidArgument,
    LockHeld,
    NotFound,
    Unavailable,
)
from featurestore.store.events import DEFAULT_WARM_KEYS
from materialize.job import Settings, run
from materialize.plan import Shard

SHARD_COUNT = "FEATURESTORE_SHARD_COUNT"  # with JOB_INDEX: the shard of an indexed Job
JOB_INDEX = "JOB_COMPLETION_INDEX"  # Kubernetes sets it in each pod of an indexed Job

EXIT_CODES: dict[type[FeatureStoreError], int] = {
    InvalidArgument: 2,
    NotFound: 2,
    ConfigError: 3,
    Unavailable: 4,
    LockHeld: 5,
}


def _moment(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The command line; the options' defaults come from `environ` (os.environ) where set."""
    environ = os.environ if environ is None else environ
    parser = OneLineParser(
        prog="featurestore-materialize",
        description="Copy the latest feature values from PostgreSQL into Redis.",
        epilog="Every option but -v can also be set by its variable; a flag wins over it.",
    )
    _options(parser, environ)
    modes = parser.add_subparsers(dest="mode", required=True)
    # The options are accepted after the mode too (`incremental --views a`); there they
    # default to SUPPRESS so that an option given before the mode is not overwritten.
    after = OneLineParser(add_help=False)
    _options(after, environ, defaults=False)
    modes.add_parser("incremental", parents=[after], help="each view from its watermark up to now")
    backfill = modes.add_parser("backfill", parents=[after], help="a given window; watermarks stay")
    backfill.add_argument("--start", type=_moment, required=True, help="ISO time, inclusive")
    backfill.add_argument("--end", type=_moment, required=True, help="ISO time, exclusive")
    warm = modes.add_parser("warm", parents=[after], help="ask every server to re-warm its hot-key cache")
    warm.add_argument("--limit", type=int, default=DEFAULT_WARM_KEYS, help="hot keys to read (>= 1)")
    return parser


async def _warm(args: argparse.Namespace) -> str:
    """Publish the "warm" event; the summary line."""
    from featurestore.registry import load_registry
    from featurestore.store.events import publish_warm
    from featurestore.store.redis import connect

    if args.limit < 1:
        raise InvalidArgument(f"--limit must be >= 1, not {args.limit}")
    project = load_registry(args.repo).project
    client = connect(args.redis)
    try:
        reached = await publish_warm(client, project, args.limit)
    except (RedisError, OSError) as exc:
        raise Unavailable(f"Redis is unreachable: {exc}") from exc
    finally:
        await client.aclose()
    return f"warm: asked {reached} subscriber(s) of {project!r} to re-warm {args.limit} hot keys"


def _options(parser: argparse.ArgumentParser, environ: Mapping[str, str], *, defaults: bool = True) -> None:
    """The options every mode takes; each defaults to its FEATURESTORE_<NAME> variable, else to its default."""

    def option(flag: str, kind: type[Any], default: Any, help: str, *, name: str = "", shown: str = "") -> None:
        value = environment_value(name or flag, kind, environ) if defaults else None
        parser.add_argument(
            flag,
            type=kind,
            default=(default if value is None else value) if defaults else argparse.SUPPRESS,
            help=f"{help} (default: {shown or default}; environment: {variable(name or flag)})",
        )

    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0 if defaults else argparse.SUPPRESS,
        help="-v logs progress, -vv debug details and the traceback of a failure",
    )
    # The repo and Redis default as for `featurestore serve` (featurestore/config.py).
    option("--repo", Path, OPTIONS_BY_NAME["repo"].default, "the Feast repo")
    option(
        "--redis",
        str,
        OPTIONS_BY_NAME["redis_url"].default,
        "Redis URL (redis+cluster://host:port,... for a Redis Cluster)",
        name="redis_url",
    )
    option("--dsn", str, None, "PostgreSQL DSN", shown="the repo's offline_store")
    option("--views", str, "", "comma-separated views", shown="all")
    option("--batch-rows", int, 1000, "rows per script call")
    option("--expiry-grace-s", float, 86_400.0, "seconds Redis keeps rows past their view's TTL")
    option("--lock-ttl-s", float, 30.0, "seconds the run lock outlives a run that died")
    option(
        "--shard",
        str,
        _job_shard(environ) if defaults else None,
        "only the entities of shard i of N, as i/N (0 <= i < N); without it, FEATURESTORE_SHARD_COUNT=N"
        " takes i from JOB_COMPLETION_INDEX (a Kubernetes indexed Job)",
        shown="every entity, or JOB_COMPLETION_INDEX/FEATURESTORE_SHARD_COUNT",
    )


def _job_shard(environ: Mapping[str, str]) -> str | None:
    """The shard of a Kubernetes indexed Job, "JOB_COMPLETION_INDEX/FEATURESTORE_SHARD_COUNT",
    or None without the count; the default of --shard when FEATURESTORE_SHARD is unset."""
    count = environ.get(SHARD_COUNT, "").strip()
    if not count:
        return None
    index = environ.get(JOB_INDEX, "").strip()
    if not index:
        raise InvalidArgument(
            f"{SHARD_COUNT}={count} needs {JOB_INDEX} (set by a Kubernetes indexed Job) or --shard i/N"
        )
    try:
        Shard.parse(f"{index}/{count}")
    except InvalidArgument as exc:
        raise InvalidArgument(f"{JOB_INDEX}={index!r} and {SHARD_COUNT}={count!r}: {exc}") from None
    return f"{index}/{count}"


def _shard(text: str | None) -> Shard | None:
    """The shard of --shard; None for every entity (a shard of 1 is every entity)."""
    if not text:
        return None
    shard = Shard.parse(text)
    return None if shard.count == 1 else shard


def _settings(args: argparse.Namespace) -> Settings:
    if args.batch_rows < 1:
        raise InvalidArgument(f"--batch-rows (FEATURESTORE_BATCH_ROWS) must be >= 1, not {args.batch_rows}")
    return Settings(
        repo=args.repo,
        redis_url=args.redis,
        mode=args.mode,
        dsn=args.dsn,
        views=tuple(v.strip() for v in args.views.split(",") if v.strip()),
        start=getattr(args, "start", None),
        end=getattr(args, "end", None),
        batch_rows=args.batch_rows,
        expiry_grace_s=args.expiry_grace_s,
        lock_ttl_s=args.lock_ttl_s,
        progress=sys.stderr.isatty(),
        shard=_shard(args.shard),
    )


PROG = "featurestore-materialize"


def _secrets(args: argparse.Namespace | None) -> tuple[str, ...]:
    """The passwords this run knows: of --redis and --dsn (or their variables) and of the repo's PostgreSQL."""
    redis = args.redis if args else os.environ.get(variable("redis_url"))
    dsn = args.dsn if args else os.environ.get(variable("--dsn"))
    # feature_store.yaml reads its PostgreSQL password from this variable (dsn_from_repo).
    return (*passwords_in(redis, dsn), *filter(None, [os.environ.get("FEATURESTORE_PG_PASSWORD")]))


def keep_big_buffers() -> None:
    """Ask glibc to serve the job's large buffers from its heap and keep freed memory there.

    By default glibc maps each allocation of 128 kB to 32 MB on its own and unmaps it when
    freed; the job allocates and frees several such buffers per batch (COPY chunks joined,
    packed rows, Redis commands), so each batch faulted its pages in afresh: on this
    machine's VM, 40,000-80,000 page faults and ~0.3 s of the job's ~2.3 s of CPU per
    million rows (perf stat). Process-wide, so only for the job's own process; a no-op
    where the C library has no mallopt (not glibc).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    mallopt(m_mmap_threshold, 64 << 20)
    mallopt(m_trim_threshold, 256 << 20)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the module docstring lists them)."""
    try:
        parser = _parser()
    except FeatureStoreError as exc:  # a bad FEATURESTORE_* variable: one line, like a bad flag
        print_line(PROG, describe(exc), _secrets(None))
        return EXIT_CODES.get(type(exc), 1)
    args = parser.parse_args(argv)
    secrets = _secrets(args)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    configure_logging("%(asctime)s %(levelname)s %(name)s: %(message)s", level, secrets)
    try:
        OPTIONS_BY_NAME["redis_url"].check(args.redis)  # a URL redis-py cannot take: one line, not its ValueError
        if args.mode == "warm":
            print(asyncio.run(_warm(args)))
            return 0
        keep_big_buffers()
        summary = asyncio.run(run(_settings(args)))
    except FeatureStoreError as exc:
        print_line(PROG, describe(exc), secrets)
        logging.getLogger(__name__).debug("details", exc_info=exc)
        return EXIT_CODES.get(type(exc), 1)
    except KeyboardInterrupt:
        print_line(PROG, "interrupted; watermarks did not move")
        return INTERRUPTED
    except Exception as exc:  # the one line promised above; -vv shows the traceback
        print_line(PROG, describe(exc), secrets)
        logging.getLogger(__name__).debug("details", exc_info=exc)
        return 1
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())

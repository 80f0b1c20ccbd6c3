"""`featurestore-materialize`: the cron job's command line.

    featurestore-materialize incremental [--views a,b] [--repo PATH] [--redis URL] [--dsn DSN]
    featurestore-materialize backfill --start 2026-11-01T00:00 --end 2026-11-20T00:00
    featurestore-materialize warm [--limit 100000] [--repo PATH] [--redis URL]

`warm` writes nothing: it publishes a "warm" event on the project's events channel, and
every running server re-reads the fleet's hot set (`<project>:__meta__:hot`) into its
hot-key cache (featurestore/cache/hotcache.py); servers without a cache ignore it.

Prints one summary line on stdout on success. On failure it prints one line on stderr
(no traceback unless -v) and exits with a code the scheduler can branch on:

    0  success                      3  bad configuration (registry, DSN, table)
    1  unexpected error             4  PostgreSQL or Redis unavailable
    2  bad arguments, unknown view  5  another run holds the lock
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from redis.exceptions import RedisError

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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="featurestore-materialize",
        description="Copy the latest feature values from PostgreSQL into Redis.",
    )
    _options(parser)
    modes = parser.add_subparsers(dest="mode", required=True)
    # The options are accepted after the mode too (`incremental --views a`); there they
    # default to SUPPRESS so that an option given before the mode is not overwritten.
    after = argparse.ArgumentParser(add_help=False)
    _options(after, defaults=False)
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


def _options(parser: argparse.ArgumentParser, *, defaults: bool = True) -> None:
    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    redis_url = os.environ.get("FEATURESTORE_REDIS_URL", "redis://127.0.0.1:6379/0")
    parser.add_argument("-v", "--verbose", action="count", default=default(0))
    parser.add_argument(
        "--repo", type=Path, default=default(Path("feature_repo")), help="Feast repo (default: feature_repo)"
    )
    parser.add_argument(
        "--redis", default=default(redis_url), help="Redis URL (default: $FEATURESTORE_REDIS_URL or local)"
    )
    parser.add_argument("--dsn", default=default(None), help="PostgreSQL DSN (default: the repo's offline_store)")
    parser.add_argument("--views", default=default(""), help="comma-separated views (default: all)")
    parser.add_argument("--batch-rows", type=int, default=default(1000), help="rows per script call")
    parser.add_argument(
        "--expiry-grace-s",
        type=float,
        default=default(86_400.0),
        help="Redis keeps rows this long past their view's TTL",
    )
    parser.add_argument(
        "--lock-ttl-s", type=float, default=default(30.0), help="how long the run lock outlives a run that died"
    )


def _settings(args: argparse.Namespace) -> Settings:
    if args.batch_rows < 1:
        raise InvalidArgument(f"--batch-rows must be >= 1, not {args.batch_rows}")
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
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.mode == "warm":
            print(asyncio.run(_warm(args)))
            return 0
        summary = asyncio.run(run(_settings(args)))
    except FeatureStoreError as exc:
        print(f"featurestore-materialize: {exc}", file=sys.stderr)
        logging.getLogger(__name__).debug("details", exc_info=exc)
        return EXIT_CODES.get(type(exc), 1)
    except KeyboardInterrupt:
        print("featurestore-materialize: interrupted; watermarks did not move", file=sys.stderr)
        return 130
    except Exception as exc:  # the one line promised above; -vv shows the traceback
        print(f"featurestore-materialize: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        logging.getLogger(__name__).debug("details", exc_info=exc)
        return 1
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())

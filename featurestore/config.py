"""The server's settings: read once at the edge, frozen, validated on construction.

    >>> Settings(repo=Path("feature_repo"), redis_url="redis://:secret@10.0.0.5:6379/0")
    Settings(repo=PosixPath('feature_repo'), redis_url='redis://:***@10.0.0.5:6379/0', ...)

Nothing deeper in the package reads the environment or the command line: `__main__`
builds a `Settings` and passes it down, so a bad setting fails at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from featurestore.errors import ConfigError
from featurestore.limits import MAX_ROWS

__all__ = ["Settings", "redact_url"]


def redact_url(url: str) -> str:
    """`url` with its password replaced by stars, for logs and reprs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything `featurestore serve` needs.

    Parameters:
        repo: the Feast repo folder (with feature_store.yaml and an applied registry).
        redis_url: redis://[:password@]host:port/db (or rediss://, unix://); printed
            with its password hidden.
        host, port: where gRPC listens; port 0 picks a free one.
        workers: server processes sharing the port (SO_REUSEPORT), one event loop each.
        registry_refresh_s: how often the registry is re-read (0: never).
        max_rows: entity rows allowed per request (1 to 10,000).
        redis_timeout_s: socket timeout of every Redis call, float seconds.
        metrics_port: Prometheus /metrics HTTP port (0: none).
        grace_s: how long in-flight calls may finish after SIGTERM, float seconds.
        index_refresh_s: how often every retrieval index is re-checked against the
            store, float seconds, in case a materialization event was lost (0: never).
        index_exact_max: an embedding view with fewer vectors gets an exact (flat)
            index; at and above, `index_approximate`.
        index_approximate: "hnsw" or "ivf".
        cache_bytes: the hot-key row cache's budget in bytes (0: no cache); see
            featurestore/cache/hotcache.py. On by default (256 MiB, plus a 16 MiB sketch):
            under Zipf traffic it serves ~90% of rows from memory (bench_hotcache).
        cache_max_staleness_s: the longest a row rewritten by materialization is served
            from the cache after the run announced it, should the announcement be lost
            (the version poll's lease), float seconds.
        cache_max_age_s: the longest any cached row is served after it was read from
            Redis, float seconds (covers writes materialization does not announce).
        hot_publish_s: how often this server publishes its hot keys to the fleet's
            set, float seconds (0: never).
        warm_budget_s: how long start-up may spend warming the cache before SERVING.
    """

    repo: Path
    redis_url: str = field(repr=False)
    host: str = "0.0.0.0"
    port: int = 50051
    workers: int = 1
    registry_refresh_s: float = 30.0
    max_rows: int = MAX_ROWS
    redis_timeout_s: float = 1.0
    metrics_port: int = 0
    grace_s: float = 5.0
    index_refresh_s: float = 300.0
    index_exact_max: int = 50_000
    index_approximate: Literal["hnsw", "ivf"] = "hnsw"
    cache_bytes: int = 256 << 20
    cache_max_staleness_s: float = 5.0
    cache_max_age_s: float = 600.0
    hot_publish_s: float = 30.0
    warm_budget_s: float = 10.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "repo", Path(self.repo))
        scheme = urlsplit(self.redis_url).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(
                f"redis url {redact_url(self.redis_url)!r} must start with redis://, rediss:// or unix://"
            )
        _check_range("port", self.port, 0, 65535)
        _check_range("metrics_port", self.metrics_port, 0, 65535)
        _check_range("workers", self.workers, 1, 256)
        _check_range("max_rows", self.max_rows, 1, MAX_ROWS)
        if self.workers > 1 and self.port == 0:
            raise ConfigError("workers > 1 share one port: give an explicit --port, not 0")
        _check_range("index_exact_max", self.index_exact_max, 1, 2**62)
        if self.index_approximate not in ("hnsw", "ivf"):
            raise ConfigError(f"index_approximate must be hnsw or ivf, not {self.index_approximate!r}")
        _check_range("cache_bytes", self.cache_bytes, 0, 2**62)
        for name in (
            "registry_refresh_s",
            "redis_timeout_s",
            "grace_s",
            "index_refresh_s",
            "cache_max_staleness_s",
            "cache_max_age_s",
            "hot_publish_s",
            "warm_budget_s",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 seconds, not {getattr(self, name)}")
        if self.cache_bytes and not (self.cache_max_staleness_s and self.cache_max_age_s):
            raise ConfigError("with a cache, cache_max_staleness_s and cache_max_age_s must be > 0")
        if self.redis_timeout_s == 0:
            raise ConfigError("redis_timeout_s must be > 0 seconds")

    def __repr__(self) -> str:
        return (
            f"Settings(repo={self.repo!r}, redis_url={redact_url(self.redis_url)!r},"
            f" host={self.host!r}, port={self.port}, workers={self.workers},"
            f" registry_refresh_s={self.registry_refresh_s}, max_rows={self.max_rows},"
            f" redis_timeout_s={self.redis_timeout_s}, metrics_port={self.metrics_port},"
            f" grace_s={self.grace_s}, index_refresh_s={self.index_refresh_s},"
            f" index_exact_max={self.index_exact_max},"
            f" index_approximate={self.index_approximate!r},"
            f" cache_bytes={self.cache_bytes},"
            f" cache_max_staleness_s={self.cache_max_staleness_s},"
            f" cache_max_age_s={self.cache_max_age_s},"
            f" hot_publish_s={self.hot_publish_s}, warm_budget_s={self.warm_budget_s})"
        )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be an integer from {low} to {high}, not {value!r}")

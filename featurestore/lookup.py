"""The lookup: entity rows and feature references in, typed columns out, one Redis round trip.

    lookup = Lookup(redis_pipe, registry)
    result = await lookup.get_online_features({"user_id": [1, 2]}, ["user_profile:age"])

Serving a request is

    plan (cached) -> validate entities -> keys for every view -> ONE MGET -> decode

where the plan and the decode live in featurestore/decode.py. With a hot cache
(featurestore/cache/hotcache.py) the cached rows of fresh hot keys are taken first and the MGET
asks only for the misses (none: no round trip); the decode is the same. Predict and Rank
read their rows through `read_rows` too, so they share the cache.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import numpy as np

from featurestore.decode import LookupResult, RequestPlan, decode
from featurestore.errors import DeadlineExceeded, InvalidArgument
from featurestore.limits import MAX_ROWS
from featurestore.registry import Registry
from featurestore.store import keys
from featurestore.store.layout import DType
from featurestore.store.pipe import RedisPipe
from featurestore.store.redis import read_rows
from featurestore.types import Entities

__all__ = ["Fetch", "Lookup", "RowSource"]

_PLAN_CACHE_SIZE = 512

Fetch = Callable[[list[bytes]], Awaitable[list[bytes | None]]]


class RowSource(Protocol):
    """Where rows may come from before Redis: the hot-key cache (featurestore.cache)
    implements it; the lookup never imports the cache."""

    async def read(self, row_keys: list[bytes], fetch: Fetch) -> list[bytes | None]:
        """The packed row of each key (None: absent), calling `fetch` at most once for
        the keys it does not hold."""
        ...


class Lookup:
    """Serves feature lookups from Redis for the current registry.

    Parameters:
        redis: the pipelined connection reads go through (store.pipe.RedisPipe).
        registry: the compiled registry; `swap` replaces it while serving.
        max_rows: entity rows allowed per request.
        cache: the hot-key row cache (None: every row from Redis).
    """

    __slots__ = ("_cache", "_max_rows", "_plans", "_redis", "_registry")

    def __init__(
        self, redis: RedisPipe, registry: Registry, *, max_rows: int = MAX_ROWS, cache: RowSource | None = None
    ) -> None:
        self._redis = redis
        self._cache = cache
        self._registry = registry
        self._max_rows = max_rows
        # Plans of the current registry by (references, full names); cleared on swap
        # and when full, so a client sending ever-new combinations cannot grow it.
        self._plans: dict[tuple[tuple[str, ...], bool], RequestPlan] = {}

    @property
    def registry(self) -> Registry:
        return self._registry

    async def close(self) -> None:
        """Close the Redis connection."""
        await self._redis.close()

    def swap(self, registry: Registry) -> bool:
        """Serve `registry` from now on if its fingerprint differs; True if swapped."""
        if registry.fingerprint == self._registry.fingerprint:
            return False
        self._registry, self._plans = registry, {}
        return True

    def plan(self, features: Sequence[str], full_feature_names: bool = False) -> RequestPlan:
        """The (cached) plan for these feature references; raises NotFound/InvalidArgument."""
        key = (tuple(features), full_feature_names)
        plan = self._plans.get(key)
        if plan is None:
            registry = self._registry
            plan = RequestPlan(registry.resolve(key[0]), full_feature_names)
            if len(self._plans) >= _PLAN_CACHE_SIZE:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def row_keys(self, plan: RequestPlan, entities: Entities) -> tuple[list[bytes], int]:
        """The Redis keys of every view's rows (view after view) and the row count."""
        columns, n = _check_entities(plan, entities, self._max_rows)
        project = self._registry.project
        tokens: dict[tuple[str, ...], list[bytes]] = {}
        out: list[bytes] = []
        for view, names in zip(plan.view_names, plan.join_keys, strict=True):
            if names not in tokens:
                tokens[names] = _tokens(plan, names, [columns[k] for k in names])
            out += keys.row_keys(project, view, tokens[names])
        return out, n

    async def get_online_features(
        self,
        entities: Entities,
        features: Sequence[str],
        *,
        full_feature_names: bool = False,
        timeout_s: float | None = None,
    ) -> LookupResult:
        """Look up `features` for the entity rows in `entities`, in one Redis round trip.

        Parameters:
            entities: one column per join key, e.g. {"user_id": [1, 2, 3]} (ints or strs).
            features: "view:feature", "view" or feature service names.
            full_feature_names: name columns "view__feature".
            timeout_s: the caller's remaining time; DeadlineExceeded when it runs out.

        >>> result = await lookup.get_online_features({"user_id": [7]}, ["user_profile"])
        ... # doctest: +SKIP
        """
        t0 = time.perf_counter()
        plan = self.plan(features, full_feature_names)
        row_keys, n = self.row_keys(plan, entities)
        t1 = time.perf_counter()
        rows = await self.read_rows(row_keys, timeout_s)
        t2 = time.perf_counter()
        result = decode(plan, rows, n, time.time_ns() // 1000)
        result.timings_s = (t1 - t0, t2 - t1, time.perf_counter() - t2)
        return result

    async def read_rows(
        self, row_keys: list[bytes], timeout_s: float | None = None, pipe: RedisPipe | None = None
    ) -> list[bytes | None]:
        """The packed row of each key (None where absent): from the hot cache where it
        holds them, the rest in one MGET on `pipe` (default: this lookup's)."""
        redis = self._redis if pipe is None else pipe
        if self._cache is None:
            return await _read(redis, row_keys, timeout_s)
        return await self._cache.read(row_keys, lambda wanted: _read(redis, wanted, timeout_s))


async def _read(pipe: RedisPipe, row_keys: list[bytes], timeout_s: float | None) -> list[bytes | None]:
    if timeout_s is None:
        return await read_rows(pipe, row_keys)
    if timeout_s <= 0:
        raise DeadlineExceeded("the caller's deadline passed before the Redis read")
    try:
        async with asyncio.timeout(timeout_s):
            return await read_rows(pipe, row_keys)
    except TimeoutError as exc:
        raise DeadlineExceeded(
            f"the caller's deadline passed during the Redis read ({timeout_s * 1e3:.1f} ms)"
        ) from exc


def _check_entities(plan: RequestPlan, entities: Entities, max_rows: int) -> tuple[dict[str, Sequence[Any]], int]:
    """Validate the entity columns against the plan; return them as sequences and n."""
    if not entities:
        raise InvalidArgument("no entity columns: send one column per join key, e.g. user_id")
    columns = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in entities.items()}
    sizes = {k: len(v) for k, v in columns.items()}
    n = next(iter(sizes.values()))
    if any(size != n for size in sizes.values()):
        raise InvalidArgument(f"entity columns have unequal lengths: {sizes}")
    if n == 0:
        raise InvalidArgument(f"empty batch: the entity columns hold no rows (send 1 to {max_rows})")
    if n > max_rows:
        raise InvalidArgument(f"batch of {n} entity rows exceeds the limit of {max_rows}: split it")
    needed = {k for names in plan.join_keys for k in names}
    for view, names in zip(plan.view_names, plan.join_keys, strict=True):
        for name in names:
            if name not in columns:
                raise InvalidArgument(
                    f"feature view {view!r} is keyed by {name!r}, but the request has no"
                    f" {name!r} entity column (it has {sorted(columns)})"
                )
    extra = sorted(set(columns) - needed)
    if extra:
        raise InvalidArgument(
            f"entity columns {extra} are not join keys of any requested view (expected {sorted(needed)})"
        )
    return columns, n


def _tokens(plan: RequestPlan, names: Sequence[str], columns: list[Sequence[Any]]) -> list[bytes]:
    for name, column in zip(names, columns, strict=True):
        first = column[0]
        if isinstance(first, bool) or not isinstance(first, int | str):
            raise InvalidArgument(f"join key {name!r} must hold int64 or string values, not {type(first).__name__}")
        got = DType.STRING if isinstance(first, str) else DType.INT64
        if got is not plan.key_types[name]:
            raise InvalidArgument(
                f"join key {name!r} is {plan.key_types[name].value}, but its entity column holds {got.value} values"
            )
    try:
        return keys.entity_tokens(columns)
    except (TypeError, AttributeError) as exc:
        raise InvalidArgument(f"join keys {list(names)} mix value types: {exc}") from exc

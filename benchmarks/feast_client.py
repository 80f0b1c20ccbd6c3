"""The measuring side of bench_feast.py: one client process per system under test.

    python benchmarks/feast_client.py SPEC.json   # prints one JSON line with the results

SPEC names a role and the cases to measure; every role runs the same cases (same
entities, same feature references) with harness.latency (warm-up, then sequential
calls) and harness.throughput (closed loop, k calls in flight):

    grpc    our gRPC service through featurestore.AsyncClient, plus the floors of the
            same call: the bare grpc.aio echo (benchmarks/echo_server.py) returning as many
            bytes as our response, and a redis.asyncio MGET of the same Redis keys
    sdk     Feast's SDK in this process: FeatureStore.get_online_features(...).to_dict()
            sequentially; get_online_features_async for the in-flight runs
    http    Feast's feature server: POST /get-online-features through one keep-alive
            requests.Session (a connection pool as large as the largest in-flight count);
            in-flight runs use threads, as a synchronous HTTP client does
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from harness import Stats, latency, run_on_uvloop, throughput

Spec = dict[str, Any]


def entities(case: Spec) -> dict[str, list[int]]:
    """The entity rows of a case: the same ids for every system (seeded by the case)."""
    rng = np.random.default_rng(case["rows"])
    n = case["rows"]
    return {
        "user_id": rng.integers(1, case["users"] + 1, n).tolist(),
        "item_id": rng.integers(1, case["items"] + 1, n).tolist(),
    }


def _stats(stats: Stats) -> dict[str, Any]:
    return asdict(stats)


async def _rates(call: Callable[[], Any], spec: Spec, case: Spec) -> dict[str, float]:
    if not case.get("throughput", True):
        return {}
    rates = {}
    for k in spec["in_flight"]:
        await throughput(call, in_flight=min(k, 4), duration_s=min(spec["duration_s"], 0.3))
        rates[str(k)] = await throughput(call, in_flight=k, duration_s=spec["duration_s"])
    return rates


async def measure(name: str, call: Callable[[], Any], spec: Spec, case: Spec) -> dict[str, Any]:
    """Sequential percentiles, then closed-loop calls/s at each in-flight count."""
    iterations = case.get("iterations", spec["iterations"])
    warmup = max(3, min(spec["warmup"], iterations // 5))
    stats = await latency(name, call, iterations=iterations, warmup=warmup)
    print(f"  {name}: p50 {stats.p50_ms:.2f} ms p99 {stats.p99_ms:.2f} ms", file=sys.stderr)
    return {"latency": _stats(stats), "throughput": await _rates(call, spec, case)}


# -- ours and the floors ---------------------------------------------------------------


def _redis_keys(project: str, case: Spec, ents: dict[str, list[int]]) -> list[bytes]:
    from featurestore.store import keys

    out: list[bytes] = []
    for view in case["views"]:
        column = ents["item_id" if view.startswith("item") else "user_id"]
        out += keys.row_keys(project, view, keys.entity_tokens([column]))
    return out


async def run_grpc(spec: Spec) -> dict[str, Any]:
    import redis.asyncio as aioredis
    from grpc import aio

    from featurestore import AsyncClient
    from featurestore.client.core import online_features_request

    results: dict[str, Any] = {}
    redis = aioredis.Redis.from_url(spec["redis_url"])
    options = [("grpc.max_receive_message_length", -1)]
    async with (
        AsyncClient(spec["target"]) as client,
        aio.insecure_channel(spec["echo_target"], options=options) as echo_channel,
    ):
        await client.wait_until_serving(60)
        echo = echo_channel.unary_unary("/bench.Echo/Echo")
        for case in spec["cases"]:
            ents, refs = entities(case), case["features"]
            request = online_features_request(ents, refs, False)
            response = await client._stub.GetOnlineFeatures(request)
            sizes = (request.ByteSize(), response.ByteSize())
            payload = sizes[1].to_bytes(8, "little") + bytes(max(sizes[0] - 8, 0))
            row_keys = _redis_keys(spec["project"], case, ents)
            no_rates = {**case, "throughput": False}  # the floor of calls/s is the echo

            async def lookup(ents: Any = ents, refs: Any = refs) -> Any:
                return await client.get_online_features(ents, refs)

            async def echo_call(payload: bytes = payload) -> Any:
                return await echo(payload)

            async def mget(row_keys: list[bytes] = row_keys) -> Any:
                return await redis.mget(row_keys)

            results[case["name"]] = {
                "ours": await measure(f"ours {case['name']}", lookup, spec, case),
                "echo": await measure(f"echo {sizes[1]} B", echo_call, spec, case),
                "mget": await measure(f"MGET {len(row_keys)} keys", mget, spec, no_rates),
                "request_bytes": sizes[0],
                "response_bytes": sizes[1],
                "redis_keys": len(row_keys),
            }
    await redis.aclose()
    return results


# -- Feast's SDK, in process ------------------------------------------------------------


async def run_sdk(spec: Spec) -> dict[str, Any]:
    from feast import FeatureStore

    store = FeatureStore(repo_path=spec["repo"])
    results: dict[str, Any] = {}
    for case in spec["cases"]:
        features: Any = case["features"]
        if case.get("feature_service"):
            features = store.get_feature_service(case["feature_service"])
        kwargs = {
            "features": features,
            "entity_rows": entities(case),
            "full_feature_names": case.get("full_feature_names", False),
        }

        async def call(kwargs: Any = kwargs) -> Any:
            return store.get_online_features(**kwargs).to_dict()

        async def call_async(kwargs: Any = kwargs) -> Any:
            return (await store.get_online_features_async(**kwargs)).to_dict()

        if case.get("gc_freeze"):
            await latency("warm", call, iterations=1, warmup=spec["warmup"] // 5)
            gc.freeze()
        result = await measure(f"feast sdk {case['name']}", call, spec, {**case, "throughput": False})
        if case.get("gc_freeze"):
            gc.unfreeze()
        result["throughput"] = await _rates(call_async, spec, case)
        results[case["name"]] = {"feast": result}
    return results


# -- Feast's feature server over HTTP ---------------------------------------------------


async def run_http(spec: Spec) -> dict[str, Any]:
    import requests
    from requests.adapters import HTTPAdapter

    session = requests.Session()
    pool = max(spec["in_flight"], default=1)
    session.mount("http://", HTTPAdapter(pool_connections=1, pool_maxsize=pool))
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=pool))
    url = spec["url"] + "/get-online-features"
    headers = {"Content-Type": "application/json"}
    results: dict[str, Any] = {}
    for case in spec["cases"]:
        body: dict[str, Any] = {
            "entities": entities(case),
            "full_feature_names": case.get("full_feature_names", False),
        }
        if case.get("feature_service"):
            body["feature_service"] = case["feature_service"]
        else:
            body["features"] = case["features"]

        def post(body: dict[str, Any] = body) -> Any:
            reply = session.post(url, data=json.dumps(body), headers=headers)
            reply.raise_for_status()
            return reply.json()

        async def call(post: Callable[[], Any] = post) -> Any:
            return post()

        async def call_threaded(post: Callable[[], Any] = post) -> Any:
            return await asyncio.to_thread(post)

        result = await measure(f"feast http {case['name']}", call, spec, {**case, "throughput": False})
        result["throughput"] = await _rates(call_threaded, spec, case)
        results[case["name"]] = {"feast": result}
    session.close()
    return results


ROLES = {"grpc": run_grpc, "sdk": run_sdk, "http": run_http}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    results = run_on_uvloop(ROLES[spec["role"]](spec))
    print(json.dumps(results))


if __name__ == "__main__":
    main()

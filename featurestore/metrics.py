"""Every Prometheus metric of the service, defined in one place.

    featurestore_request_seconds{method}        histogram of whole-call latency
    featurestore_stage_seconds{stage}           histogram per stage: plan, redis, decode,
                                                response (proto building)
    featurestore_requests_total{method, code}   calls by gRPC status code
    featurestore_in_flight_requests             calls of FeatureStore and FeatureStoreAdmin
                                                running now (health and reflection not
                                                counted): the autoscaling signal; the
                                                server refuses calls beyond --max-in-flight
    featurestore_inference_stage_seconds{stage} Predict/Rank stages: queue, fetch (= redis +
                                                decode), redis, decode, retrieval, matrix,
                                                model, serialization, total
    featurestore_inference_batch_rows           rows per model batch
    featurestore_inference_batch_requests       calls per model batch
    featurestore_inference_calls_total{path}    calls by batching path: direct (found the
                                                batcher idle), batched, unbatched (off)
    featurestore_model_info{model, version}     1 per serving model version
    featurestore_model_input_width{model}       input columns of each served model
    featurestore_model_threads{model}           its ONNX Runtime intra-op threads
    featurestore_model_memory_bytes{model}      its memory estimate (process growth while
                                                it loaded and warmed up; >= its file size)
    featurestore_model_run_seconds{model}       histogram of its ONNX Runtime runs
    featurestore_model_cpu_seconds_total{model} CPU time of its runs (inference thread)
    featurestore_model_loads_total{model, outcome}  loaded, failed, removed
    featurestore_cache_hits_total               row keys served from the hot cache
    featurestore_cache_misses_total             row keys read from Redis (cache on)
    featurestore_cache_bytes                    the hot cache's accounted size
    featurestore_cache_entries                  rows in the hot cache
    featurestore_cache_serving                  1 while the cache's lease is valid
    featurestore_cache_lost_events_total        writes found by the version poll, not by
                                                their event (each dropped a view)
    featurestore_cache_evictions_total          entries evicted for the byte budget
    featurestore_cache_invalidations_total      invalidations (per view of an event)
    featurestore_cache_warm_seconds             how long the last warm-up took

Label children are bound once at import: `labels()` on the hot path costs a dict lookup
and a lock each call.

Values live in the process (each worker its own; worker 0 serves /metrics). Importing
Feast sets PROMETHEUS_MULTIPROC_DIR (and PROMETHEUS_MULTIPROCESS_DIR) to a fresh
`feast_metrics_*` temporary folder, and every process started by one that imported Feast
inherits it: prometheus_client would then keep each value in an mmap file there, three
times slower per observation (1.7 against 0.6 us, timeit) and files left behind. So a
folder of that name is dropped from the environment before prometheus_client is
imported; a PROMETHEUS_MULTIPROC_DIR of the operator's own is left alone.
"""

from __future__ import annotations

import os
import sys


def _drop_feasts_multiprocess_dir() -> None:
    if "prometheus_client" in sys.modules:
        return  # too late to matter: its value class is chosen at its import
    for name in ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir", "PROMETHEUS_MULTIPROCESS_DIR"):
        if os.path.basename(os.environ.get(name, "").rstrip("/")).startswith("feast_metrics_"):
            del os.environ[name]


_drop_feasts_multiprocess_dir()

from prometheus_client import Counter, Gauge, Histogram, start_http_server  # noqa: E402

__all__ = [
    "CACHE_BYTES",
    "CACHE_ENTRIES",
    "CACHE_EVICTIONS",
    "CACHE_HITS",
    "CACHE_INVALIDATIONS",
    "CACHE_LOST_EVENTS",
    "CACHE_MISSES",
    "CACHE_SERVING",
    "CACHE_WARM_SECONDS",
    "INFERENCE_BATCHED",
    "INFERENCE_BATCH_REQUESTS",
    "INFERENCE_BATCH_ROWS",
    "INFERENCE_CALLS",
    "INFERENCE_DECODE",
    "INFERENCE_DIRECT",
    "INFERENCE_FETCH",
    "INFERENCE_MATRIX",
    "INFERENCE_MODEL",
    "INFERENCE_QUEUE",
    "INFERENCE_REDIS",
    "INFERENCE_RETRIEVAL",
    "INFERENCE_SERIALIZATION",
    "INFERENCE_TOTAL",
    "INFERENCE_UNBATCHED",
    "IN_FLIGHT",
    "MODEL_CPU_SECONDS",
    "MODEL_INFO",
    "MODEL_INPUT_WIDTH",
    "MODEL_LOADS",
    "MODEL_MEMORY_BYTES",
    "MODEL_RUN_SECONDS",
    "MODEL_THREADS",
    "REQUESTS",
    "REQUEST_SECONDS",
    "STAGE_DECODE",
    "STAGE_PLAN",
    "STAGE_REDIS",
    "STAGE_RESPONSE",
    "serve_metrics",
]

# Sub-millisecond resolution: the whole call budget is a few milliseconds.
_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)

REQUEST_SECONDS = Histogram(
    "featurestore_request_seconds",
    "Latency of gRPC calls, in seconds.",
    ["method"],
    buckets=_BUCKETS,
)
STAGE_SECONDS = Histogram(
    "featurestore_stage_seconds",
    "Time spent per lookup stage, in seconds.",
    ["stage"],
    buckets=_BUCKETS,
)
REQUESTS = Counter("featurestore_requests", "gRPC calls by method and status code.", ["method", "code"])
# The name is a contract: the Kubernetes autoscaler (deploy/) scales on it.
IN_FLIGHT = Gauge(
    "featurestore_in_flight_requests", "FeatureStore and FeatureStoreAdmin calls running now in this process."
)

STAGE_PLAN = STAGE_SECONDS.labels("plan")
STAGE_REDIS = STAGE_SECONDS.labels("redis")
STAGE_DECODE = STAGE_SECONDS.labels("decode")
STAGE_RESPONSE = STAGE_SECONDS.labels("response")

INFERENCE_STAGE_SECONDS = Histogram(
    "featurestore_inference_stage_seconds",
    "Time per Predict/Rank stage, in seconds.",
    ["stage"],
    buckets=_BUCKETS,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
INFERENCE_BATCH_ROWS = Histogram("featurestore_inference_batch_rows", "Rows per model batch.", buckets=_BATCH_BUCKETS)
INFERENCE_BATCH_REQUESTS = Histogram(
    "featurestore_inference_batch_requests", "Calls per model batch.", buckets=_BATCH_BUCKETS
)
INFERENCE_QUEUE = INFERENCE_STAGE_SECONDS.labels("queue")
INFERENCE_FETCH = INFERENCE_STAGE_SECONDS.labels("fetch")  # redis + decode: the feature fetch
INFERENCE_REDIS = INFERENCE_STAGE_SECONDS.labels("redis")
INFERENCE_DECODE = INFERENCE_STAGE_SECONDS.labels("decode")
INFERENCE_RETRIEVAL = INFERENCE_STAGE_SECONDS.labels("retrieval")
INFERENCE_MATRIX = INFERENCE_STAGE_SECONDS.labels("matrix")
INFERENCE_MODEL = INFERENCE_STAGE_SECONDS.labels("model")
INFERENCE_SERIALIZATION = INFERENCE_STAGE_SECONDS.labels("serialization")
INFERENCE_TOTAL = INFERENCE_STAGE_SECONDS.labels("total")
INFERENCE_CALLS = Counter("featurestore_inference_calls", "Predict/Rank calls by batching path.", ["path"])
INFERENCE_DIRECT = INFERENCE_CALLS.labels("direct")
INFERENCE_BATCHED = INFERENCE_CALLS.labels("batched")
INFERENCE_UNBATCHED = INFERENCE_CALLS.labels("unbatched")

# Per model: children are bound when a model loads (featurestore/inference/runtime.py).
MODEL_INFO = Gauge("featurestore_model_info", "1 per serving model version.", ["model", "version"])
MODEL_INPUT_WIDTH = Gauge("featurestore_model_input_width", "Input columns of each served model.", ["model"])
MODEL_THREADS = Gauge("featurestore_model_threads", "ONNX Runtime intra-op threads of each served model.", ["model"])
MODEL_MEMORY_BYTES = Gauge(
    "featurestore_model_memory_bytes",
    "Estimated memory of each served model (process growth while it loaded and warmed up), bytes.",
    ["model"],
)
MODEL_RUN_SECONDS = Histogram(
    "featurestore_model_run_seconds", "ONNX Runtime run time per batch and model, seconds.", ["model"], buckets=_BUCKETS
)
MODEL_CPU_SECONDS = Counter("featurestore_model_cpu_seconds", "CPU seconds of each model's runs.", ["model"])
MODEL_LOADS = Counter("featurestore_model_loads", "Model loads by outcome.", ["model", "outcome"])

CACHE_HITS = Counter("featurestore_cache_hits", "Row keys served from the hot cache.")
CACHE_MISSES = Counter("featurestore_cache_misses", "Row keys read from Redis, cache on.")
CACHE_BYTES = Gauge("featurestore_cache_bytes", "Accounted size of the hot cache, bytes.")
CACHE_ENTRIES = Gauge("featurestore_cache_entries", "Rows in the hot cache.")
CACHE_SERVING = Gauge("featurestore_cache_serving", "1 while the hot cache's lease is valid.")
CACHE_LOST_EVENTS = Counter("featurestore_cache_lost_events", "Unannounced writes found by the version poll.")
CACHE_EVICTIONS = Counter("featurestore_cache_evictions", "Hot cache entries evicted.")
CACHE_INVALIDATIONS = Counter("featurestore_cache_invalidations", "Hot cache invalidations (per view of an event).")
CACHE_WARM_SECONDS = Gauge("featurestore_cache_warm_seconds", "Duration of the last hot cache warm-up, seconds.")


def serve_metrics(port: int, host: str = "0.0.0.0") -> None:
    """Serve /metrics over HTTP on `port` from a daemon thread (no-op for port 0)."""
    if port:
        start_http_server(port, addr=host)

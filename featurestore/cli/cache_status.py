"""`featurestore cache-status`: print one replica's hot-key cache (the admin RPC).

featurestore cache-status --target 127.0.0.1:50051 [--top 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

import grpc

from featurestore._proto.featurestore.v1 import featurestore_pb2 as pb
from featurestore._proto.featurestore.v1 import featurestore_pb2_grpc as pb_grpc
from featurestore.limits import DEFAULT_TOP

__all__ = ["add_arguments", "cache_status", "run"]


def cache_status(target: str, top: int = DEFAULT_TOP, timeout_s: float = 5.0) -> pb.CacheStatusResponse:
    """Ask the replica at `target` (host:port) for its cache status."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.FeatureStoreAdminStub(channel)
        response: pb.CacheStatusResponse = stub.CacheStatus(pb.CacheStatusRequest(top=top), timeout=timeout_s)
        return response


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="127.0.0.1:50051", help="a replica's host:port (default: 127.0.0.1:50051)")
    parser.add_argument("--top", type=int, default=DEFAULT_TOP, help=f"hottest keys to list (default: {DEFAULT_TOP})")
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    """Print the cache status of `args.target`; 1 with one line on stderr on failure."""
    try:
        status = cache_status(args.target, args.top)
    except grpc.RpcError as exc:
        print(f"cache-status: {args.target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    report = {
        "enabled": status.enabled,
        "serving": status.serving,
        "entries": status.entries,
        "bytes": status.bytes,
        "budget_bytes": status.budget_bytes,
        "hits": status.hits,
        "misses": status.misses,
        "hit_ratio": status.hit_ratio,
        "evictions": status.evictions,
        "invalidations": status.invalidations,
        "lost_events": status.lost_events,
        "bypassed": status.bypassed,
        "warm_seconds": status.warm_seconds,
        "warmed_rows": status.warmed_rows,
        "top_keys": [[k.key.decode(errors="replace"), k.count] for k in status.top_keys],
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if not status.enabled:
        print(f"{args.target}: no hot-key cache (it runs with --cache-bytes 0)")
        return 0
    print(f"{args.target}: {'serving' if status.serving else 'NOT serving (lease expired)'}")
    print(
        f"  hit ratio    {status.hit_ratio:.3f} ({status.hits:,} hits, {status.misses:,} misses)"
        + (": low, 15 reads in 16 skip the cache" if status.bypassed else "")
    )
    print(
        f"  entries      {status.entries:,} in {status.bytes / 2**20:,.1f} MiB"
        f" of {status.budget_bytes / 2**20:,.1f} MiB"
    )
    print(
        f"  evictions    {status.evictions:,}; invalidations {status.invalidations:,};"
        f" lost events {status.lost_events:,}"
    )
    print(f"  warm-up      {status.warmed_rows:,} rows in {status.warm_seconds:.2f} s")
    print(f"  top {len(status.top_keys)} keys:")
    for key, count in report["top_keys"]:  # type: ignore[attr-defined]
        print(f"    {count:12,.1f}  {key}")
    return 0

"""`featurestore cache-status`: print one replica's hot-key cache (the admin RPC).

featurestore cache-status --target 127.0.0.1:50051 [--top 20] [--json]
    [--tls-ca ca.pem [--tls-cert client.pem --tls-key client.key]] [--token-file PATH]

With tokens on the server, the call needs a token with the admin scope: from --token-file
(- reads stdin) or else from the variable FEATURESTORE_TOKEN; never from a flag, which any
user of the machine would see in the process list.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import grpc

from featurestore._proto.featurestore.v1 import featurestore_pb2 as pb
from featurestore._proto.featurestore.v1 import featurestore_pb2_grpc as pb_grpc
from featurestore.client.core import CHANNEL_OPTIONS, call_metadata, channel_credentials
from featurestore.errors import InvalidArgument
from featurestore.limits import DEFAULT_TOP

__all__ = ["TOKEN_VARIABLE", "add_arguments", "cache_status", "run"]

TOKEN_VARIABLE = "FEATURESTORE_TOKEN"


def cache_status(
    target: str,
    top: int = DEFAULT_TOP,
    timeout_s: float = 5.0,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    token: str | None = None,
) -> pb.CacheStatusResponse:
    """Ask the replica at `target` (host:port) for its cache status.

    Parameters:
        target: host:port of one replica.
        top: how many of the hottest keys to list.
        timeout_s: the call's deadline in seconds.
        credentials: TLS channel credentials (None: plaintext).
        token: a bearer token with the admin scope (None: none sent).

    Returns the CacheStatusResponse; raises grpc.RpcError when the call fails.

    >>> cache_status("127.0.0.1:50051", top=5).hit_ratio  # doctest: +SKIP
    """
    if credentials is None:
        channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    else:
        channel = grpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
    with channel:
        stub = pb_grpc.FeatureStoreAdminStub(channel)
        request = pb.CacheStatusRequest(top=top)
        response: pb.CacheStatusResponse = stub.CacheStatus(request, timeout=timeout_s, metadata=call_metadata(token))
        return response


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="127.0.0.1:50051", help="a replica's host:port (default: 127.0.0.1:50051)")
    parser.add_argument("--top", type=int, default=DEFAULT_TOP, help=f"hottest keys to list (default: {DEFAULT_TOP})")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--tls-ca", type=Path, help="TLS: the PEM CA certificates that signed the server's certificate")
    parser.add_argument("--tls-cert", type=Path, help="mutual TLS: this client's PEM certificate (with --tls-key)")
    parser.add_argument("--tls-key", type=Path, help="mutual TLS: this client's PEM key")
    parser.add_argument(
        "--token-file",
        type=Path,
        help=f"a file holding the bearer token (- : stdin); default: the variable {TOKEN_VARIABLE}",
    )


def _token(path: Path | None, environ: Mapping[str, str]) -> str | None:
    """The token from `path` ("-": stdin), else from FEATURESTORE_TOKEN; None when neither."""
    if path is None:
        return environ.get(TOKEN_VARIABLE) or None
    try:
        text = sys.stdin.readline() if str(path) == "-" else path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or "not UTF-8"
        raise InvalidArgument(f"--token-file {str(path)!r} cannot be read: {why}") from None
    return text.strip() or None


def run(args: argparse.Namespace) -> int:
    """Print the cache status of `args.target`; one line on stderr and 1 when the call fails, 2 for bad options."""
    try:
        token = _token(args.token_file, os.environ)
        credentials = channel_credentials(None, args.tls_ca, args.tls_cert, args.tls_key)
        status = cache_status(args.target, args.top, credentials=credentials, token=token)
    except InvalidArgument as exc:
        print(f"cache-status: {exc}", file=sys.stderr)
        return 2
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

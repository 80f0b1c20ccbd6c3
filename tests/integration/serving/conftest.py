"""The fixtures of the serving tests that run real `featurestore serve` processes (serve_helpers.py)."""

from serve_helpers import own_redis, serve

__all__ = ["own_redis", "serve"]

"""A low-latency online feature store: Feast definitions, Redis rows, gRPC lookups."""

from featurestore.errors import (
    ConfigError,
    DeadlineExceeded,
    FeatureStoreError,
    InvalidArgument,
    LockHeld,
    NotFound,
    Unavailable,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DeadlineExceeded",
    "FeatureStoreError",
    "InvalidArgument",
    "LockHeld",
    "NotFound",
    "Unavailable",
    "__version__",
]

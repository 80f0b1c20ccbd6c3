"""A low-latency online feature store: Feast definitions, Redis rows, gRPC lookups."""

from featurestore.client import AsyncClient, Client, OnlineFeatures
from featurestore.errors import (
    ConfigError,
    DeadlineExceeded,
    FeatureStoreError,
    InvalidArgument,
    LockHeld,
    MissingFeature,
    ModelError,
    NotFound,
    Overloaded,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Client",
    "ConfigError",
    "DeadlineExceeded",
    "FeatureStoreError",
    "InvalidArgument",
    "LockHeld",
    "MissingFeature",
    "ModelError",
    "NotFound",
    "OnlineFeatures",
    "Overloaded",
    "PermissionDenied",
    "Unauthenticated",
    "Unavailable",
    "__version__",
]

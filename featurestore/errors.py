"""The errors of the feature store. Each one knows the gRPC status it maps to.

    FeatureStoreError                 INTERNAL
    ├── InvalidArgument               INVALID_ARGUMENT  (bad key type, empty batch, bad ref)
    ├── NotFound                      NOT_FOUND         (unknown view, feature, service)
    ├── Unavailable                   UNAVAILABLE       (Redis or PostgreSQL unreachable)
    ├── DeadlineExceeded              DEADLINE_EXCEEDED (the caller's deadline passed)
    ├── ConfigError                   FAILED_PRECONDITION (bad settings, missing registry)
    ├── MissingFeature                FAILED_PRECONDITION (a required model input is absent)
    ├── ModelError                    INTERNAL          (the model raised while scoring)
    └── LockHeld                      ABORTED           (another materialization runs)

Library errors are translated at the boundary (`raise NotFound(...) from exc`), so upper
layers see this tree only. The server maps them to statuses in one interceptor.
"""

from __future__ import annotations

import grpc

__all__ = [
    "ConfigError",
    "DeadlineExceeded",
    "FeatureStoreError",
    "InvalidArgument",
    "LockHeld",
    "MissingFeature",
    "ModelError",
    "NotFound",
    "Unavailable",
]


class FeatureStoreError(Exception):
    """Base of every error this package raises on purpose."""

    status: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(FeatureStoreError):
    status = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(FeatureStoreError):
    status = grpc.StatusCode.NOT_FOUND


class Unavailable(FeatureStoreError):
    status = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(FeatureStoreError):
    status = grpc.StatusCode.DEADLINE_EXCEEDED


class ConfigError(FeatureStoreError):
    status = grpc.StatusCode.FAILED_PRECONDITION


class LockHeld(FeatureStoreError):
    status = grpc.StatusCode.ABORTED


class MissingFeature(FeatureStoreError):
    """A `required` model input is missing, null or stale for an entity."""

    status = grpc.StatusCode.FAILED_PRECONDITION  # the data, not the request, is wrong


class ModelError(FeatureStoreError):
    """The model raised while scoring (INTERNAL, with ONNX Runtime's message)."""

"""A low-latency online feature store: Feast definitions, Redis rows, gRPC lookups.

    from featurestore import Client, AsyncClient, NotFound

The names below are imported on first use (PEP 562): `import featurestore.cli` or
`featurestore.errors` does not pay for the client's gRPC and numpy, so the commands can
answer a Ctrl-C during their own imports with one line (featurestore/cli/__init__.py).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from featurestore.client import AsyncClient as AsyncClient
    from featurestore.client import Client as Client
    from featurestore.client import OnlineFeatures as OnlineFeatures
    from featurestore.errors import ConfigError as ConfigError
    from featurestore.errors import DeadlineExceeded as DeadlineExceeded
    from featurestore.errors import FeatureStoreError as FeatureStoreError
    from featurestore.errors import InvalidArgument as InvalidArgument
    from featurestore.errors import LockHeld as LockHeld
    from featurestore.errors import MissingFeature as MissingFeature
    from featurestore.errors import ModelError as ModelError
    from featurestore.errors import NotFound as NotFound
    from featurestore.errors import Overloaded as Overloaded
    from featurestore.errors import PermissionDenied as PermissionDenied
    from featurestore.errors import Unauthenticated as Unauthenticated
    from featurestore.errors import Unavailable as Unavailable

__version__ = "0.1.0"

_CLIENT = ("AsyncClient", "Client", "OnlineFeatures")
_ERRORS = (
    "ConfigError",
    "DeadlineExceeded",
    "FeatureStoreError",
    "InvalidArgument",
    "LockHeld",
    "MissingFeature",
    "ModelError",
    "NotFound",
    "Overloaded",
    "PermissionDenied",
    "Unauthenticated",
    "Unavailable",
)
_HOME = {**dict.fromkeys(_CLIENT, "featurestore.client"), **dict.fromkeys(_ERRORS, "featurestore.errors")}

__all__ = [*_CLIENT, *_ERRORS, "__version__"]


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'featurestore' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME])

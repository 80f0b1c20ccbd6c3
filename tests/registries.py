"""Hand-built registries for tests that need views without a Feast repo (`feast apply`).

    from registries import int_key, make_registry, make_view
    VIEW = make_view("item_stats", int_key("item_id"), 0, FeatureSpec("price", DType.FLOAT32))
    REGISTRY = make_registry(VIEW, project="scoring")

(tests/ is on sys.path: pytest puts the folder of the top conftest.py there.)
"""

from __future__ import annotations

from collections.abc import Iterable
from types import MappingProxyType
from typing import Any

from featurestore.registry import JoinKey, Registry, ViewDef
from featurestore.store.layout import DType, FeatureSpec, Layout


def int_key(name: str) -> JoinKey:
    """An int64 join key."""
    return JoinKey(name, DType.INT64)


def make_view(name: str, key: JoinKey, ttl_s: float, *specs: FeatureSpec) -> ViewDef:
    """A view keyed by `key`, read from a table of its own name, with these features in order."""
    return ViewDef(name, (key,), ttl_s, Layout(name, specs), name, "event_timestamp", "", None)


def float_features(width: int) -> tuple[FeatureSpec, ...]:
    """`width` float32 features named f0, f1, ..."""
    return tuple(FeatureSpec(f"f{k}", DType.FLOAT32) for k in range(width))


def make_registry(
    *views: ViewDef,
    project: str = "proj",
    services: dict[str, Any] | None = None,
    fingerprint: str | None = None,
) -> Registry:
    """A registry of `views` (and feature services); the fingerprint names the schemas unless given."""
    return Registry(
        project,
        MappingProxyType({v.name: v for v in views}),
        MappingProxyType(services or {}),
        fingerprint or _fingerprint(views),
    )


def _fingerprint(views: Iterable[ViewDef]) -> str:
    return "fp-" + "-".join(str(v.layout.schema_id) for v in views)

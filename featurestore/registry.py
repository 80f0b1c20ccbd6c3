"""The compiled view of a Feast repo: entities, feature views, services -> fixed layouts.

Feast stops here. `load_registry(repo)` reads the registry that `feast apply` wrote (any
registry type Feast supports: a local file, object storage, SQL) and compiles it into
immutable `Registry`/`ViewDef` objects; nothing else in the package imports Feast.

Feature references take the forms Feast uses:
    "user_profile:age"   one feature of a view
    "user_profile"       every feature of a view (our extension; Feast needs a service)
    "ranking_v1"         a feature service's features, when no view has that name
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from featurestore.errors import ConfigError, InvalidArgument, NotFound
from featurestore.store.layout import DType, FeatureSpec, Layout

__all__ = ["JoinKey", "Registry", "Selection", "VectorSpec", "ViewDef", "load_registry"]

log = logging.getLogger(__name__)

_DTYPES = {
    "INT32": DType.INT32,
    "INT64": DType.INT64,
    "FLOAT": DType.FLOAT32,
    "DOUBLE": DType.FLOAT64,
    "BOOL": DType.BOOL,
    "STRING": DType.STRING,
    "BYTES": DType.BYTES,
    "UNIX_TIMESTAMP": DType.UNIX_TIMESTAMP,
    "INT32_LIST": DType.INT32_LIST,
    "INT64_LIST": DType.INT64_LIST,
    "FLOAT_LIST": DType.FLOAT32_LIST,
    "DOUBLE_LIST": DType.FLOAT64_LIST,
}


@dataclass(frozen=True, slots=True)
class JoinKey:
    name: str
    dtype: DType  # INT64 or STRING


@dataclass(frozen=True, slots=True)
class VectorSpec:
    """The indexed vector feature of an embedding view."""

    feature: str
    dim: int
    metric: str  # "cosine", "inner_product" or "l2"


@dataclass(frozen=True, slots=True)
class ViewDef:
    """One feature view, compiled: what it is keyed by, how its rows are laid out."""

    name: str
    join_keys: tuple[JoinKey, ...]
    ttl_s: float  # 0: values never go stale
    layout: Layout
    table: str  # the PostgreSQL table or subquery the view reads
    timestamp_field: str
    created_field: str  # "" when the source has none
    vector: VectorSpec | None


@dataclass(frozen=True, slots=True)
class Selection:
    """The features a request asked for, grouped by view, in request order."""

    view: ViewDef
    features: tuple[str, ...]


@dataclass(frozen=True)
class Registry:
    project: str
    views: Mapping[str, ViewDef]
    services: Mapping[str, tuple[tuple[str, tuple[str, ...]], ...]]
    fingerprint: str

    def view(self, name: str) -> ViewDef:
        try:
            return self.views[name]
        except KeyError:
            known = ", ".join(sorted(self.views))
            raise NotFound(f"unknown feature view {name!r}; known views: {known}") from None

    def resolve(self, refs: Sequence[str]) -> list[Selection]:
        """Resolve feature references into selections, one per view, in first-seen order.

        >>> registry.resolve(["user_profile:age", "item_stats"])  # doctest: +SKIP
        """
        if not refs:
            raise InvalidArgument("no features requested: name at least one feature reference")
        wanted: dict[str, list[str]] = {}
        for ref in refs:
            for view_name, features in self._expand(ref):
                bucket = wanted.setdefault(view_name, [])
                bucket.extend(f for f in features if f not in bucket)
        return [Selection(self.views[v], tuple(fs)) for v, fs in wanted.items()]

    def _expand(self, ref: str) -> list[tuple[str, tuple[str, ...]]]:
        if not ref or ref.count(":") > 1 or ref.startswith(":") or ref.endswith(":"):
            raise InvalidArgument(
                f"malformed feature reference {ref!r}: use 'view:feature', 'view' or a feature service name"
            )
        if ":" in ref:
            view_name, feature = ref.split(":")
            view = self.view(view_name)
            if feature not in view.layout.names:
                raise NotFound(f"feature view {view_name!r} has no feature {feature!r}")
            return [(view_name, (feature,))]
        if ref in self.views:
            return [(ref, self.views[ref].layout.names)]
        if ref in self.services:
            return list(self.services[ref])
        raise NotFound(f"{ref!r} is neither a feature view nor a feature service")


def _read_repo_config(repo: Path) -> dict[str, Any]:
    path = repo / "feature_store.yaml"
    if not path.exists():
        raise ConfigError(f"no feature_store.yaml in {repo}: point --repo at a Feast repo")
    with path.open() as f:
        config = yaml.safe_load(os.path.expandvars(f.read()))
    if not isinstance(config, dict) or "project" not in config:
        raise ConfigError(f"{path} has no 'project'")
    return config


def load_registry(repo: Path) -> Registry:
    """Read the Feast registry of the repo at `repo` and compile it.

    A local registry file is compiled once per content: the result is kept beside it
    (`<registry>.compiled.json`, keyed by the file's SHA-256), so the server and the
    cron job start without importing Feast (seconds and ~200 MB) while the registry is
    unchanged. Other registry types (object storage, SQL) are read through Feast.

    Raises ConfigError when the repo or its registry is missing (run `feast apply`).
    """
    repo = repo.resolve()
    config = _read_repo_config(repo)
    project = str(config["project"])
    section = config.get("registry", "data/registry.db")
    fields = dict(section) if isinstance(section, dict) else {"path": section}
    local = _local_registry(repo, fields)
    if local is None:
        return _compile_with_feast(repo, project, fields)
    if not local.exists():
        raise ConfigError(f"no Feast registry at {local}: run `feast apply` in {repo}")
    digest = hashlib.sha256(local.read_bytes()).hexdigest()
    cache = local.with_name(local.name + ".compiled.json")
    cached = _read_compiled(cache, project, digest)
    if cached is not None:
        return cached
    registry = _compile_with_feast(repo, project, {**fields, "path": str(local)})
    _write_compiled(cache, registry, digest)
    return registry


def _local_registry(repo: Path, fields: Mapping[str, Any]) -> Path | None:
    """The registry's local file, or None when it lives elsewhere (S3, GCS, SQL, ...)."""
    path = str(fields.get("path", ""))
    if fields.get("registry_type", "file") != "file" or "://" in path or not path:
        return None
    local = Path(path)
    return local if local.is_absolute() else repo / local


def _compile_with_feast(repo: Path, project: str, fields: Mapping[str, Any]) -> Registry:
    from feast.infra.registry.registry import Registry as FeastRegistry
    from feast.repo_config import RegistryConfig

    try:
        feast_registry = FeastRegistry(project, RegistryConfig(**fields), repo)
        views = feast_registry.list_feature_views(project, allow_cache=False)
        entities = {e.name: e for e in feast_registry.list_entities(project, allow_cache=True)}
        services = feast_registry.list_feature_services(project, allow_cache=True)
    except Exception as exc:  # Feast raises many types; all mean "cannot read it"
        raise ConfigError(f"cannot read the Feast registry of {repo}: {exc}") from exc
    return compile_registry(project, views, entities, services)


_COMPILED_FORMAT = 1


def _read_compiled(path: Path, project: str, digest: str) -> Registry | None:
    """The cached compilation if it is of this registry content; None otherwise."""
    try:
        data = json.loads(path.read_text())
        if (data.get("format"), data.get("sha256"), data.get("project")) != (
            _COMPILED_FORMAT,
            digest,
            project,
        ):
            return None
        return _registry_from_dict(data)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent, partial or from another version: compile again


def _write_compiled(path: Path, registry: Registry, digest: str) -> None:
    """Best effort (the folder may be read-only); atomic, so readers never see half."""
    data = {"format": _COMPILED_FORMAT, "sha256": digest, **_registry_to_dict(registry)}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data))
        tmp.replace(path)
    except OSError as exc:
        log.info("not caching the compiled registry at %s: %s", path, exc)


def _registry_to_dict(registry: Registry) -> dict[str, Any]:
    views = [
        {
            "name": v.name,
            "ttl_s": v.ttl_s,
            "table": v.table,
            "timestamp_field": v.timestamp_field,
            "created_field": v.created_field,
            "join_keys": [[k.name, k.dtype.value] for k in v.join_keys],
            "features": [[f.name, f.dtype.value, f.length] for f in v.layout.features],
            "vector": None if v.vector is None else [v.vector.feature, v.vector.dim, v.vector.metric],
        }
        for v in registry.views.values()
    ]
    services = {name: [[view, list(fs)] for view, fs in parts] for name, parts in registry.services.items()}
    return {"project": registry.project, "fingerprint": registry.fingerprint, "views": views, "services": services}


def _registry_from_dict(data: Mapping[str, Any]) -> Registry:
    views = {}
    for v in data["views"]:
        specs = tuple(FeatureSpec(n, DType(t), int(length)) for n, t, length in v["features"])
        vector = v["vector"]
        views[v["name"]] = ViewDef(
            name=v["name"],
            join_keys=tuple(JoinKey(n, DType(t)) for n, t in v["join_keys"]),
            ttl_s=float(v["ttl_s"]),
            layout=Layout(v["name"], specs),
            table=v["table"],
            timestamp_field=v["timestamp_field"],
            created_field=v["created_field"],
            vector=None if vector is None else VectorSpec(vector[0], int(vector[1]), vector[2]),
        )
    services = {name: tuple((view, tuple(fs)) for view, fs in parts) for name, parts in data["services"].items()}
    return Registry(str(data["project"]), MappingProxyType(views), MappingProxyType(services), str(data["fingerprint"]))


def compile_registry(
    project: str, views: Sequence[Any], entities: Mapping[str, Any], services: Sequence[Any]
) -> Registry:
    """Compile Feast objects (FeatureView, Entity, FeatureService) into a Registry."""
    compiled = {fv.name: _compile_view(fv, entities) for fv in views}
    svc: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {}
    for service in services:
        parts = []
        for proj in service.feature_view_projections:
            if proj.name not in compiled:
                raise ConfigError(f"service {service.name!r} uses unknown view {proj.name!r}")
            parts.append((proj.name, tuple(f.name for f in proj.features)))
        svc[service.name] = tuple(parts)
    digest = hashlib.sha256(
        repr(
            (
                project,
                sorted((v.name, v.join_keys, v.ttl_s, v.layout.schema_id, v.table) for v in compiled.values()),
                sorted(svc.items()),
            )
        ).encode()
    ).hexdigest()[:16]
    return Registry(project, MappingProxyType(compiled), MappingProxyType(svc), digest)


def _dtype(name: str, value_type: Any) -> DType:
    try:
        return _DTYPES[value_type.name]
    except KeyError:
        raise ConfigError(f"feature {name!r} has type {value_type.name}, not supported") from None


def _compile_view(fv: Any, entities: Mapping[str, Any]) -> ViewDef:
    join_keys = []
    for column in fv.entity_columns:
        dtype = _dtype(column.name, column.dtype.to_value_type())
        if dtype not in (DType.INT64, DType.INT32, DType.STRING):
            raise ConfigError(f"view {fv.name!r}: join key {column.name!r} must be int or string")
        join_keys.append(JoinKey(column.name, DType.STRING if dtype is DType.STRING else DType.INT64))
    specs, vector = [], None
    for f in fv.features:
        dtype = _dtype(f.name, f.dtype.to_value_type())
        length = int(getattr(f, "vector_length", 0) or 0) if dtype.is_list else 0
        specs.append(FeatureSpec(f.name, dtype, length))
        if getattr(f, "vector_index", False) and length and vector is None:
            metric = (getattr(f, "vector_search_metric", None) or "cosine").lower()
            metric = {"ip": "inner_product", "dot": "inner_product", "euclidean": "l2"}.get(metric, metric)
            vector = VectorSpec(f.name, length, metric)
    source = fv.batch_source
    table = source.get_table_query_string() if hasattr(source, "get_table_query_string") else ""
    ttl = fv.ttl.total_seconds() if fv.ttl else 0.0
    return ViewDef(
        name=fv.name,
        join_keys=tuple(join_keys),
        ttl_s=ttl,
        layout=Layout(fv.name, tuple(specs)),
        table=table,
        timestamp_field=source.timestamp_field,
        created_field=source.created_timestamp_column or "",
        vector=vector,
    )

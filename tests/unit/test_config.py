"""Settings: validated on construction, frozen, the Redis password never printed."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from featurestore.config import Settings, redact_url
from featurestore.errors import ConfigError


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"repo": Path("repo"), "redis_url": "redis://127.0.0.1:6379/0"}
    return Settings(**{**values, **overrides})


def test_defaults_are_valid_and_frozen() -> None:
    s = settings()
    assert (s.port, s.workers, s.max_rows, s.redis_timeout_s) == (50051, 1, 10_000, 1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.port = 1  # type: ignore[misc]


def test_password_is_hidden_in_repr() -> None:
    s = settings(redis_url="redis://user:s3cret@10.0.0.5:6380/2")
    assert "s3cret" not in repr(s)
    assert "redis://user:***@10.0.0.5:6380/2" in repr(s)
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"redis_url": "http://x"}, "must start with redis://"),
        ({"port": 70000}, "port must be an integer from 0 to 65535"),
        ({"workers": 0}, "workers must be"),
        ({"workers": 2, "port": 0}, "explicit --port"),
        ({"max_rows": 10_001}, "max_rows must be an integer from 1 to 10000"),
        ({"max_rows": True}, "max_rows"),
        ({"registry_refresh_s": -1}, "registry_refresh_s must be >= 0"),
        ({"redis_timeout_s": 0}, "redis_timeout_s must be > 0"),
        ({"metrics_port": -1}, "metrics_port"),
    ],
    ids=["scheme", "port", "workers", "workers-port-0", "max-rows", "bool", "refresh", "timeout", "metrics-port"],
)
def test_bad_settings_fail_at_construction(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        settings(**overrides)

"""Settings: grouped, validated on construction, frozen, the Redis password never printed;
the `featurestore serve` options built from them, also read from FEATURESTORE_<NAME>."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from featurestore import config
from featurestore.cli import main as cli
from featurestore.cli.options import environment_value, option_values, shown_default, variable
from featurestore.config import (
    OPTIONS,
    CacheSettings,
    IndexSettings,
    InferenceSettings,
    ServerSettings,
    Settings,
    redact_url,
)
from featurestore.errors import ConfigError, InvalidArgument

# The flags benchmarks, tests and deployments call; renaming one breaks them.
FLAGS = {
    "--repo",
    "--redis",
    "--host",
    "--port",
    "--workers",
    "--registry-refresh-s",
    "--redis-timeout-s",
    "--max-rows",
    "--metrics-port",
    "--grace-s",
    "--drain-delay-s",
    "--max-connection-age-s",
    "--max-in-flight",
    "--index-refresh-s",
    "--index-exact-max",
    "--index-approximate",
    "--cache-bytes",
    "--cache-max-staleness-s",
    "--cache-max-age-s",
    "--hot-publish-s",
    "--warm-budget-s",
    "--models",
    "--tls-cert",
    "--tls-key",
    "--tls-client-ca",
    "--auth-tokens",
    "--auth-token-hashes",
    "--reflection-open",
    "--health-port",
    "--model-threads",
    "--model-poll-s",
}


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"repo": Path("repo"), "redis_url": "redis://127.0.0.1:6379/0"}
    return Settings.from_options({**values, **overrides})


def serve_parser() -> argparse.ArgumentParser:
    commands = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser: argparse.ArgumentParser = commands.choices["serve"]
    return parser


def serve_settings(argv: list[str], environ: dict[str, str]) -> Settings:
    args = serve_parser().parse_args(argv)
    return Settings.from_options(option_values(args, OPTIONS, environ))


def test_defaults_are_valid_and_frozen() -> None:
    s = settings()
    assert (s.server.port, s.server.workers, s.server.max_rows, s.server.redis_timeout_s) == (50051, 1, 10_000, 1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.server.port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.server = ServerSettings()  # type: ignore[misc]


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
        ({"grace_s": float("nan")}, "grace_s must be >= 0 seconds"),
        ({"hot_publish_s": "5"}, "hot_publish_s must be a number of seconds"),
        ({"index_exact_max": 0}, "index_exact_max must be an integer from 1"),
        ({"index_approximate": "flat"}, "index_approximate must be hnsw or ivf, not 'flat'"),
        ({"cache_bytes": -1}, "cache_bytes must be an integer from 0"),
        ({"cache_max_age_s": 0}, "with a cache, cache_max_staleness_s and cache_max_age_s must be > 0"),
        ({"models": 5}, "models must be a path"),
        ({"nope_s": 1}, "unknown settings nope_s"),
    ],
    ids=[
        "scheme",
        "port",
        "workers",
        "workers-port-0",
        "max-rows",
        "bool",
        "refresh",
        "timeout",
        "metrics-port",
        "nan",
        "str-seconds",
        "exact-max",
        "approximate",
        "cache-bytes",
        "cache-needs-max-age",
        "models",
        "unknown",
    ],
)
def test_bad_settings_fail_at_construction(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        settings(**overrides)


def test_groups_validate_on_their_own_and_settings_checks_their_types() -> None:
    with pytest.raises(ConfigError, match="index_approximate must be hnsw or ivf"):
        IndexSettings(approximate="flat")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="cache_max_staleness_s"):
        CacheSettings(max_staleness_s=0)
    assert CacheSettings(budget_bytes=0, max_staleness_s=0, max_age_s=0).budget_bytes == 0  # no cache: no bounds
    with pytest.raises(ConfigError, match=r"Settings\.server must be a ServerSettings"):
        Settings(server=CacheSettings())  # type: ignore[arg-type]


def test_address_and_models_path() -> None:
    s = Settings(repo="r", server=ServerSettings(host="127.0.0.1", port=8000))  # type: ignore[arg-type]
    assert s.repo == Path("r")  # a str is taken as a path
    assert s.address == "127.0.0.1:8000"
    assert s.models_path == Path("r/models.yaml")
    elsewhere = dataclasses.replace(s, inference=InferenceSettings(models="/etc/models.yaml"))  # type: ignore[arg-type]
    assert elsewhere.models_path == Path("/etc/models.yaml")


def test_from_options_puts_each_option_in_its_group() -> None:
    s = settings(port=8000, cache_bytes=0, index_approximate="ivf", models=Path("m.yaml"), grace_s=2)
    assert (s.server.port, s.server.grace_s, s.cache.budget_bytes) == (8000, 2, 0)
    assert (s.index.approximate, s.inference.models) == ("ivf", Path("m.yaml"))
    assert s.server.workers == ServerSettings().workers and s.index.exact_max == IndexSettings().exact_max


# The command line and the environment.


def test_serve_flags_are_exactly_the_documented_ones() -> None:
    flags = {flag for action in serve_parser()._actions for flag in action.option_strings}
    assert flags - {"-h", "--help"} == FLAGS
    assert {option.flag for option in OPTIONS} == FLAGS


@pytest.mark.parametrize("option", OPTIONS, ids=[o.name for o in OPTIONS])
def test_every_flag_has_help_with_its_default_and_variable(option: config.Option) -> None:
    action = next(a for a in serve_parser()._actions if option.flag in a.option_strings)
    group = getattr(Settings(), option.group) if option.group else Settings()
    assert option.default == getattr(group, option.attr)  # the dataclass's default, not a copy
    assert action.help is not None and action.help.startswith(option.help.replace("%", "%%"))
    assert f"Default: {shown_default(option)}." in action.help
    assert f"Environment: {variable(option.name)}." in action.help


def test_serve_without_flags_or_environment_gives_the_dataclass_defaults() -> None:
    assert serve_settings(["--repo", "repo"], {}) == Settings(repo=Path("repo"))
    assert serve_settings([], {}) == Settings()


def test_flag_wins_over_environment_which_wins_over_default() -> None:
    environ = {
        "FEATURESTORE_PORT": "9000",
        "FEATURESTORE_GRACE_S": "2.5",
        "FEATURESTORE_REDIS_URL": "redis://env:6379/1",
        "FEATURESTORE_INDEX_APPROXIMATE": "ivf",
        "FEATURESTORE_MODELS": "/etc/featurestore/models.yaml",
        "FEATURESTORE_WORKERS": "",  # empty: unset
    }
    s = serve_settings(["--port", "8000", "--cache-bytes", "0"], environ)
    assert s.server.port == 8000  # flag over environment
    assert (s.server.grace_s, s.redis_url, s.index.approximate) == (2.5, "redis://env:6379/1", "ivf")  # environment
    assert s.models_path == Path("/etc/featurestore/models.yaml")
    assert (s.cache.budget_bytes, s.server.workers) == (0, 1)  # flag; default


@pytest.mark.parametrize(
    ("environ", "error", "match"),
    [
        (
            {"FEATURESTORE_PORT": "http"},
            InvalidArgument,
            "environment variable FEATURESTORE_PORT: invalid int value: 'http'",
        ),
        ({"FEATURESTORE_GRACE_S": "5s"}, InvalidArgument, "FEATURESTORE_GRACE_S: invalid float value: '5s'"),
        ({"FEATURESTORE_PORT": "70000"}, ConfigError, "FEATURESTORE_PORT: port must be an integer from 0 to 65535"),
        ({"FEATURESTORE_INDEX_APPROXIMATE": "flat"}, ConfigError, "FEATURESTORE_INDEX_APPROXIMATE: index_approximate"),
        (
            {"FEATURESTORE_REDIS_URL": "http://u:pw@x"},
            ConfigError,
            "FEATURESTORE_REDIS_URL: redis url 'http://u:\\*\\*\\*@x'",
        ),
    ],
    ids=["int", "float", "range", "choice", "scheme-redacted"],
)
def test_a_bad_environment_value_names_its_variable(
    environ: dict[str, str], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        serve_settings([], environ)


def test_a_bad_environment_value_stops_serve_with_exit_code_2(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("FEATURESTORE_CACHE_BYTES", "lots")
    with caplog.at_level(logging.ERROR, logger="featurestore"):
        assert cli.main(["serve"]) == 2
    assert [r.getMessage() for r in caplog.records] == [
        "environment variable FEATURESTORE_CACHE_BYTES: invalid int value: 'lots'"
    ]


def test_environment_value_converts_or_is_none() -> None:
    assert environment_value("--batch-rows", int, {"FEATURESTORE_BATCH_ROWS": "500"}) == 500
    assert environment_value("repo", Path, {"FEATURESTORE_REPO": "/srv/repo"}) == Path("/srv/repo")
    assert environment_value("repo", Path, {"FEATURESTORE_REPO": ""}) is None
    assert environment_value("repo", Path, {}) is None


def test_variables_do_not_collide_with_the_repo_and_test_variables() -> None:
    names = {variable(option.name) for option in OPTIONS}
    assert len(names) == len(OPTIONS)
    assert variable("redis_url") == "FEATURESTORE_REDIS_URL"  # the name it always had
    for name in names:
        assert not name.startswith(("FEATURESTORE_PG_", "FEATURESTORE_TEST_")), name
        assert name != "FEATURESTORE_FEAST_REDIS"


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"], ["demo", "--help"], ["cache-status", "--help"]])
def test_help_exits_0_and_describes_the_product(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 0
    out = capsys.readouterr().out
    if argv == ["--help"]:
        assert "online feature store" in out and "gRPC" in out
        assert all(command in out for command in ("serve", "demo", "cache-status"))
    assert "featurestore.cli" not in out  # about the product, not the module


def test_module_docstring_documents_every_option() -> None:
    doc = config.__doc__ or ""
    flat = " ".join(doc.split())
    for option in OPTIONS:
        line = next((line for line in doc.splitlines() if line.startswith(option.flag + " ")), None)
        assert line is not None, f"{option.flag} is missing from config.py's docstring"
        assert variable(option.name) in line
        assert line.endswith(f"default {shown_default(option)}"), line
        assert " ".join(option.help.split()) in flat, f"config.py's docstring must give {option.flag}'s help text"
    assert len(re.findall(r"^--[a-z]", doc, re.MULTILINE)) == len(OPTIONS)

"""Every container's command line, as Kubernetes would run it, against the real CLI parsers.

Each container's command (or the image's ENTRYPOINT) and args are rendered with the
environment its pod gets (ConfigMaps, the Secret, Kubernetes' own JOB_COMPLETION_INDEX),
then parsed by `featurestore`'s and `featurestore-materialize`'s own parsers and turned
into their settings, so a renamed flag, an option that went away or a value out of range
fails here instead of in a crash-looping pod. Each FEATURESTORE_* variable a container
gets must be one its command reads: the commands ignore unknown variables, so a misspelt
one would otherwise be silently without effect.

Options that other branches are adding are named in PENDING: their checks skip, naming
the missing flag, until the option exists, then run like the others.
"""

from __future__ import annotations

import argparse
import contextlib
import io
from collections.abc import Iterator
from typing import Any

import pytest
from deploy_render import Object, command_line, container_environment, containers, pod_spec, shown, workloads

from featurestore.cli import main as featurestore_cli
from featurestore.cli.options import PREFIX, option_values, variable
from featurestore.config import OPTIONS, OPTIONS_BY_NAME, Settings
from featurestore.errors import ConfigError, FeatureStoreError
from materialize import __main__ as materialize_cli

# Variables the manifests set for options that are being added in parallel; each is
# checked once its flag exists.
PENDING = {
    "FEATURESTORE_DRAIN_DELAY_S": "--drain-delay-s (featurestore serve; SIGTERM keeps serving NOT_SERVING first)",
    "FEATURESTORE_MAX_IN_FLIGHT": "--max-in-flight (featurestore serve)",
    "FEATURESTORE_SHARD_COUNT": "--shard i/N (featurestore-materialize, with JOB_COMPLETION_INDEX)",
}


def _cases() -> Iterator[Any]:
    """One case per container and, in an indexed Job, per completion index."""
    for source, workload, context in workloads():
        spec = workload["spec"]
        indexes = range(spec["completions"]) if spec.get("completionMode") == "Indexed" else [None]
        for container in containers(workload):
            for index in indexes:
                extra = {} if index is None else {"JOB_COMPLETION_INDEX": str(index)}
                name = f"{source}:{workload['kind']}/{workload['metadata'].get('name', 'job')}:{container['name']}"
                yield pytest.param(
                    workload, container, context, extra, id=name + ("" if index is None else f"[{index}]")
                )


CASES = list(_cases())


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """`parser.parse_args(argv)`, its usage error as a test failure instead of SystemExit."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{parser.prog} refuses {shown(argv)}: {errors.getvalue().strip().splitlines()[-1]}")


def _serve_variables() -> set[str]:
    return {variable(option.name) for option in OPTIONS}


def _materialize_variables(parser: argparse.ArgumentParser) -> set[str]:
    flags = {flag for action in parser._actions for flag in action.option_strings if flag.startswith("--")}
    flags.discard("--help")
    flags.discard("--verbose")
    known = {variable("redis_url" if flag == "--redis" else flag) for flag in flags}
    if "--shard" in flags:  # the total that goes with Kubernetes' JOB_COMPLETION_INDEX
        known.add("FEATURESTORE_SHARD_COUNT")
    return known


def _cluster_urls_supported() -> bool:
    try:
        Settings(redis_url="redis+cluster://127.0.0.1:7000,127.0.0.1:7001/")
    except ConfigError:
        return False
    return True


def _check_variables(environ: dict[str, str], known: set[str], where: str) -> None:
    """Every FEATURESTORE_* variable of the container is read by its command (or skip, if pending)."""
    ours = {name for name in environ if name.startswith(PREFIX)}
    unknown = ours - known
    waiting = sorted(PENDING[name] for name in unknown if name in PENDING)
    assert not unknown - set(PENDING), f"{where}: no option reads {sorted(unknown - set(PENDING))}"
    if waiting:
        pytest.skip(f"waits for {'; '.join(waiting)}")


def _skip_unless_redis_url_supported(environ: dict[str, str]) -> None:
    url = environ.get("FEATURESTORE_REDIS_URL", "")
    if url.startswith("redis+cluster://") and not _cluster_urls_supported():
        pytest.skip("waits for redis+cluster:// URLs (Redis Cluster as the online store)")


@pytest.mark.parametrize(("workload", "container", "context", "extra"), CASES)
def test_every_container_command_line_parses_with_the_real_cli(
    workload: Object, container: Object, context: list[Object], extra: dict[str, str]
) -> None:
    environ = container_environment(container, context, extra)
    line = command_line(container, environ)
    where = f"{workload['kind']}/{container['name']}: {shown(line)}"
    program, argv = line[0], line[1:]
    if program == "featurestore":
        _check_serve(workload, container, argv, environ, where)
    elif program == "featurestore-materialize":
        _check_materialize(workload, argv, environ, where)
    else:
        pytest.fail(f"{where}: runs {program!r}, neither featurestore nor featurestore-materialize")


def _check_serve(workload: Object, container: Object, argv: list[str], environ: dict[str, str], where: str) -> None:
    args = _parse(featurestore_cli._parser(), argv)
    assert args.command == "serve", where
    _skip_unless_redis_url_supported(environ)
    try:
        settings = Settings.from_options(option_values(args, OPTIONS, environ))
    except FeatureStoreError as exc:
        pytest.fail(f"{where}: {exc}")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert settings.server.port == ports["grpc"], where
    assert settings.server.metrics_port == ports["metrics"], where
    assert settings.server.workers == 1, f"{where}: one process per pod (the pod is what the autoscaler counts)"
    assert settings.server.host == "0.0.0.0", f"{where}: the kubelet's probes and other pods come from outside"
    # The pod's grace period covers the drain delay and the grace period, with time to close.
    spec = pod_spec(workload)
    assert spec is not None
    drain_delay_s = float(environ.get("FEATURESTORE_DRAIN_DELAY_S", "0"))
    assert spec["terminationGracePeriodSeconds"] >= settings.server.grace_s + drain_delay_s + 1, where
    _check_variables(environ, _serve_variables(), where)
    if "drain_delay_s" in OPTIONS_BY_NAME:
        assert getattr(settings.server, "drain_delay_s", drain_delay_s) == drain_delay_s, where


def _check_materialize(workload: Object, argv: list[str], environ: dict[str, str], where: str) -> None:
    parser = _parser_or_fail(environ, where)
    args = _parse(parser, argv)
    try:
        settings = materialize_cli._settings(args)
    except FeatureStoreError as exc:
        pytest.fail(f"{where}: {exc}")
    assert settings.mode in ("incremental", "backfill"), where
    assert args.redis == environ["FEATURESTORE_REDIS_URL"] and args.dsn == environ["FEATURESTORE_DSN"], where
    _check_variables(environ, _materialize_variables(parser), where)
    if workload["spec"].get("completionMode") == "Indexed":
        _check_shards(argv, environ, where)


def _parser_or_fail(environ: dict[str, str], where: str) -> argparse.ArgumentParser:
    try:
        return materialize_cli._parser(environ)
    except FeatureStoreError as exc:  # a variable that does not parse
        pytest.fail(f"{where}: {exc}")


def _check_shards(argv: list[str], environ: dict[str, str], where: str) -> None:
    """Each completion index is a different shard: the parsed settings differ by index alone."""
    count = int(environ["FEATURESTORE_SHARD_COUNT"])
    parsed = []
    for index in range(count):
        shard_environ = {**environ, "JOB_COMPLETION_INDEX": str(index)}
        args = _parse(_parser_or_fail(shard_environ, where), argv)
        parsed.append(repr(materialize_cli._settings(args)))
    assert len(set(parsed)) == count, f"{where}: JOB_COMPLETION_INDEX does not change the shard"


def test_the_check_refuses_a_flag_the_cli_does_not_have() -> None:
    with pytest.raises(pytest.fail.Exception, match="refuses"):
        _parse(featurestore_cli._parser(), ["serve", "--no-such-flag", "1"])


def test_the_check_refuses_a_variable_no_option_reads() -> None:
    with pytest.raises(AssertionError, match="FEATURESTORE_CACHE_BYTE"):
        _check_variables({"FEATURESTORE_CACHE_BYTE": "0"}, _serve_variables(), "server")


def test_the_check_refuses_a_value_out_of_range() -> None:
    args = _parse(featurestore_cli._parser(), ["serve"])
    with pytest.raises(ConfigError, match="FEATURESTORE_PORT"):
        option_values(args, OPTIONS, {"FEATURESTORE_PORT": "70000"})


def test_every_workload_has_a_container_to_check() -> None:
    programs = set()
    for _, workload, context in workloads():
        for container in containers(workload):
            programs.add(command_line(container, container_environment(container, context))[0])
    assert programs == {"featurestore", "featurestore-materialize"}

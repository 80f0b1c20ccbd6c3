"""No command prints a password: every failing path of the CLI, with a secret in the Redis URL or DSN.

Each case runs the installed command in a subprocess with a password in its Redis URL,
its PostgreSQL DSN (URL and key=value forms) or the repo's FEATURESTORE_PG_PASSWORD, makes
it fail (Redis or PostgreSQL down, a wrong password, a bad URL), often with -vv so that
tracebacks are logged too, and greps everything it wrote (stdout, stderr, and for `serve`
its log, which is its stderr) for the secret, as written and percent-decoded.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from featurestore.embedded import EmbeddedRedis, free_port

BIN = Path(sys.executable).parent
FEATURESTORE = str(BIN / "featurestore")
MATERIALIZE = str(BIN / "featurestore-materialize")
SECRET = "s3cret-Pa55w0rd"
ENCODED = "p%40ss-W0rd-42"  # "p@ss-W0rd-42" in a URL
SECRETS = (SECRET, ENCODED, "p@ss-W0rd-42")


def _run(cmd: list[str], env: Mapping[str, str] | None = None) -> str:
    """Everything `cmd` wrote, once it has failed."""
    done = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def _serve_until(cmd: list[str], *needles: str) -> str:
    """Everything `featurestore serve` wrote until one of `needles` (a failure it keeps retrying), then SIGTERM."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    out = ""
    deadline = time.monotonic() + 90
    while not any(needle in out for needle in needles) and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        out += line
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    return out + rest


def assert_no_secret(output: str) -> None:
    for secret in SECRETS:
        assert secret not in output, output[-3000:]


@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    """A Redis that requires a password: its port and the right password."""
    right = "right-Pa55word-7"
    with EmbeddedRedis(tmp_path_factory.mktemp("locked")) as server:

        async def lock() -> None:
            client = aioredis.Redis.from_url(server.url)
            await client.config_set("requirepass", right)
            await client.aclose()

        asyncio.run(lock())
        yield server.port, right


def test_serve_never_logs_the_password_of_a_redis_that_is_down(feature_repo: Path) -> None:
    url = f"redis://:{SECRET}@127.0.0.1:{free_port()}/0"
    for workers in ("1", "2"):
        port = str(free_port()) if workers == "2" else "0"  # workers share an explicit port
        serve = [FEATURESTORE, "serve", "--repo", str(feature_repo), "--redis", url, "--host", "127.0.0.1"]
        out = _serve_until([*serve, "--port", port, "--workers", workers], "Redis does not answer PING")
        assert "Redis does not answer PING" in out  # the failing path ran and was logged
        assert "redis://:***@127.0.0.1" in out  # the settings line names the URL, redacted
        assert_no_secret(out)


def test_serve_and_materialize_never_print_a_wrong_or_a_right_password(
    feature_repo: Path, pg_dsn: str, locked_redis: tuple[int, str]
) -> None:
    port, right = locked_redis
    wrong = f"redis://:{SECRET}@127.0.0.1:{port}/0"
    serve = [FEATURESTORE, "serve", "--repo", str(feature_repo), "--redis", wrong, "--port", "0"]
    out = _serve_until(serve, "invalid username-password pair", "WRONGPASS")
    assert "invalid username-password pair" in out or "WRONGPASS" in out, out[-2000:]
    assert_no_secret(out)
    out = _run([MATERIALIZE, "-vv", "--repo", str(feature_repo), "--redis", wrong, "--dsn", pg_dsn, "incremental"])
    assert "redis://:***@127.0.0.1" in out
    assert_no_secret(out)
    good = subprocess.run(  # the right password works, and is not printed either
        [MATERIALIZE, "-vv", "--repo", str(feature_repo), "--redis", f"redis://:{right}@127.0.0.1:{port}/0", "warm"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert good.returncode == 0, good.stderr
    assert right not in good.stdout + good.stderr


@pytest.mark.parametrize(
    "url",
    [f"http://user:{SECRET}@127.0.0.1:6379/0", f"redis://:{SECRET}@127.0.0.1:port/0", f"redis://:{ENCODED}@h:x/0"],
    ids=["scheme", "port", "encoded"],
)
def test_a_bad_redis_url_is_reported_without_its_password(feature_repo: Path, url: str) -> None:
    assert_no_secret(_run([FEATURESTORE, "serve", "--redis", url]))
    assert_no_secret(_run([FEATURESTORE, "serve"], env={"FEATURESTORE_REDIS_URL": url}))
    assert_no_secret(_run([MATERIALIZE, "--repo", str(feature_repo), "--redis", url, "incremental"]))


def test_materialize_never_prints_the_password_of_a_redis_that_is_down(feature_repo: Path, pg_dsn: str) -> None:
    down = free_port()
    for password in (SECRET, ENCODED):
        url = f"redis://user:{password}@127.0.0.1:{down}/0"
        for mode in ("incremental", "warm"):
            out = _run([MATERIALIZE, "-vv", "--repo", str(feature_repo), "--redis", url, "--dsn", pg_dsn, mode])
            assert "unreachable" in out and "Traceback" in out  # the one line, and -vv's traceback
            assert_no_secret(out)
    out = _run([MATERIALIZE, "--repo", str(feature_repo), "incremental"], env={"FEATURESTORE_REDIS_URL": url})
    assert_no_secret(out)


def test_materialize_never_prints_the_password_of_a_postgres_that_is_down(feature_repo: Path, redis_url: str) -> None:
    down = free_port()
    repo = ["-vv", "--repo", str(feature_repo), "--redis", redis_url]
    for dsn in (
        f"postgresql://postgres:{SECRET}@127.0.0.1:{down}/postgres",
        f"postgresql://postgres:{ENCODED}@127.0.0.1:{down}/postgres",
        f"postgresql://postgres@127.0.0.1:{down}/postgres?password={SECRET}",
        f"host=127.0.0.1 port={down} user=postgres password={SECRET}",
    ):
        out = _run([MATERIALIZE, *repo, "--dsn", dsn, "incremental"])
        assert "PostgreSQL at" in out
        assert_no_secret(out)
        assert_no_secret(_run([MATERIALIZE, *repo, "incremental"], env={"FEATURESTORE_DSN": dsn}))
    # No --dsn: the repo's feature_store.yaml builds it, its password from the environment.
    out = _run(
        [MATERIALIZE, *repo, "incremental"],
        env={"FEATURESTORE_PG_PORT": str(down), "FEATURESTORE_PG_PASSWORD": SECRET},
    )
    assert "PostgreSQL at postgresql://postgres@127.0.0.1" in out
    assert_no_secret(out)


def test_the_other_commands_never_print_a_password(tmp_path: Path) -> None:
    env = {
        "FEATURESTORE_REDIS_URL": f"redis://:{SECRET}@127.0.0.1:1/0",
        "FEATURESTORE_DSN": f"postgresql://u:{SECRET}@127.0.0.1:1/x",
    }
    assert_no_secret(_run([FEATURESTORE, "cache-status", "--target", f"127.0.0.1:{free_port()}"], env=env))
    assert_no_secret(_run([FEATURESTORE, "demo", "--once", "--repo", str(tmp_path)], env=env))
    assert_no_secret(_run([MATERIALIZE, "--batch-rows", "0", "incremental"], env=env))
    assert_no_secret(_run([MATERIALIZE, "incremental"], env={**env, "FEATURESTORE_LOCK_TTL_S": "x"}))

"""Passwords in Redis URLs and PostgreSQL DSNs never reach a line; the commands' edge: one line per failure."""

from __future__ import annotations

import argparse
import logging

import pytest

from featurestore.cli.edge import OneLineParser, RedactingFormatter, describe
from featurestore.config import passwords_in, redact_dsn, redact_text, redact_url
from featurestore.errors import ConfigError, Unavailable


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        (
            "Redis at redis://:s3cret@127.0.0.1:6379/0 is unreachable",
            "Redis at redis://:***@127.0.0.1:6379/0 is unreachable",
        ),
        ("redis://user:s3cret@10.0.0.5:6380/2", "redis://user:***@10.0.0.5:6380/2"),
        ("rediss://default:s3cret@cache.internal:6380", "rediss://default:***@cache.internal:6380"),
        ("unix://:s3cret@/run/redis.sock?db=1", "unix://:***@/run/redis.sock?db=1"),
        ("redis://:p@ss@w0rd@host:6379/0", "redis://:***@host:6379/0"),  # an unencoded @ in the password
        ("redis://:s3cret@host:abc/0", "redis://:***@host:abc/0"),  # a URL that does not parse
        ("redis://host:6379/0?password=s3cret&db=2", "redis://host:6379/0?password=***&db=2"),
        ("postgresql://app:s3cret@db:5432/features", "postgresql://app:***@db:5432/features"),
        (
            "postgresql://app@db/features?sslmode=require&password=s3cret",
            "postgresql://app@db/features?sslmode=require&password=***",
        ),
        ("host=db user=app password=s3cret dbname=f", "host=db user=app password=*** dbname=f"),
        ("host=db password = 's3 cr\\'et' port=5432", "host=db password = *** port=5432"),
        ("DSN 'postgres://app:s3cret@db/f' refused", "DSN 'postgres://app:***@db/f' refused"),
    ],
)
def test_redact_text_hides_the_password_of_every_url_and_dsn_shape(text: str, redacted: str) -> None:
    assert redact_text(text) == redacted
    assert "s3cret" not in redact_text(text) and "w0rd" not in redact_text(text)


@pytest.mark.parametrize(
    "text",
    [
        "redis://127.0.0.1:6379/0",
        "redis://user@127.0.0.1:6379/0",
        "postgresql://postgres@127.0.0.1:5432/postgres",
        "host=db user=app dbname=f",
        "cannot bind gRPC to 0.0.0.0:50051: the port is taken",
        "db_password_file=/run/secrets/pg",  # not a password=value pair
    ],
)
def test_text_without_a_password_is_unchanged(text: str) -> None:
    assert redact_text(text) == text


def test_known_secrets_are_hidden_wherever_they_appear_and_short_ones_are_left_to_the_patterns() -> None:
    secrets = passwords_in("redis://:p%40ss-word@h:6379/0", None, "host=db password='x y z w'")
    assert secrets == ("p%40ss-word", "p@ss-word", "x y z w")
    line = "AUTH p@ss-word failed; then 'x y z w' and p%40ss-word"
    assert redact_text(line, secrets) == "AUTH *** failed; then '***' and ***"
    assert redact_text("a b c", ["b"]) == "a b c"  # a 1-letter password would garble every line


def test_redact_url_and_redact_dsn_keep_their_promises() -> None:
    assert redact_url("redis://user:s3cret@10.0.0.5:6380/2") == "redis://user:***@10.0.0.5:6380/2"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact_dsn("host=db user=app password='s e'") == "host=db user=app password=***"
    assert redact_dsn("postgresql://app:s3cret@db/f") == "postgresql://app:***@db/f"


def test_the_formatter_redacts_the_message_its_arguments_and_the_traceback() -> None:
    formatter = RedactingFormatter("%(levelname)s %(message)s", secrets=["hunter22"])
    try:
        raise Unavailable("Redis at redis://:s3cret@h:1/0 is unreachable (AUTH hunter22)")
    except Unavailable as exc:
        record = logging.LogRecord(
            "x", logging.ERROR, __file__, 1, "failed: %s", (exc,), exc_info=(type(exc), exc, None)
        )
    text = formatter.format(record)
    assert "s3cret" not in text and "hunter22" not in text
    assert text.startswith("ERROR failed: Redis at redis://:***@h:1/0 is unreachable (AUTH ***)")
    assert "Unavailable: Redis at redis://:***@h:1/0" in text  # the exception's own line, redacted too


def test_a_usage_error_is_one_line_pointing_at_help(capsys: pytest.CaptureFixture[str]) -> None:
    parser = OneLineParser(prog="tool")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run").add_argument("--port", type=int)
    for argv, expected in (
        (
            ["run", "--port", "abc"],
            "tool run: error: argument --port: invalid int value: 'abc' (see tool run --help)\n",
        ),
        ([], "tool: error: the following arguments are required: command (see tool --help)\n"),
    ):
        with pytest.raises(SystemExit) as exited:
            parser.parse_args(argv)
        assert exited.value.code == 2
        assert capsys.readouterr().err == expected
    assert isinstance(parser, argparse.ArgumentParser)


def test_describe_gives_one_line_for_every_kind_of_failure() -> None:
    assert describe(ConfigError("no registry\n  at /x")) == "no registry at /x"
    assert describe(PermissionError(13, "Permission denied", "/data/pg")) == "Permission denied: /data/pg"
    empty: dict[str, int] = {}
    try:
        empty["missing"]
    except KeyError as exc:
        line = describe(exc)
    assert line.startswith("unexpected KeyError at ") and line.endswith(": 'missing'")
    assert "test_redaction.py:" in line  # where a bug was raised, for the report

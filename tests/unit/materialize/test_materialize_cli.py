"""The cron CLI's arguments: options before or after the mode mean the same; FEATURESTORE_* set them too."""

from __future__ import annotations

from pathlib import Path

import pytest

from materialize.__main__ import _parser, main


@pytest.mark.parametrize(
    "argv",
    [
        ["--repo", "r", "--views", "a,b", "--dsn", "d", "incremental"],
        ["incremental", "--repo", "r", "--views", "a,b", "--dsn", "d"],
        ["--repo", "r", "incremental", "--views", "a,b", "--dsn", "d"],
    ],
    ids=["before", "after", "mixed"],
)
def test_options_before_or_after_the_mode(argv: list[str]) -> None:
    args = _parser({}).parse_args(argv)
    assert (args.mode, args.repo, args.views, args.dsn) == ("incremental", Path("r"), "a,b", "d")
    assert args.batch_rows == 1000


def test_backfill_needs_a_window() -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["backfill", "--start", "2026-01-01"])
    args = _parser().parse_args(["backfill", "--start", "2026-01-01", "--end", "2026-01-02"])
    assert args.start < args.end


@pytest.mark.parametrize(
    "argv",
    [["--views", "a,b", "incremental"], ["incremental", "--views", "a,b"]],
    ids=["before", "after"],
)
def test_flags_win_over_the_environment_which_wins_over_defaults(argv: list[str]) -> None:
    environ = {
        "FEATURESTORE_VIEWS": "x",
        "FEATURESTORE_BATCH_ROWS": "500",
        "FEATURESTORE_REDIS_URL": "redis://env:6379/1",
        "FEATURESTORE_REPO": "",  # empty: unset
    }
    args = _parser(environ).parse_args(argv)
    assert (args.views, args.batch_rows, args.redis) == ("a,b", 500, "redis://env:6379/1")
    assert (args.repo, args.lock_ttl_s) == (Path("feature_repo"), 30.0)


def test_a_bad_environment_value_exits_2_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FEATURESTORE_LOCK_TTL_S", "half a minute")
    assert main(["incremental"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "featurestore-materialize: environment variable FEATURESTORE_LOCK_TTL_S: invalid float value: 'half a minute'\n"
    )

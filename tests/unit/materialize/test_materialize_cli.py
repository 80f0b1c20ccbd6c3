"""The cron CLI's arguments: options before or after the mode mean the same."""

from __future__ import annotations

from pathlib import Path

import pytest

from materialize.__main__ import _parser


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
    args = _parser().parse_args(argv)
    assert (args.mode, args.repo, args.views, args.dsn) == ("incremental", Path("r"), "a,b", "d")
    assert args.batch_rows == 1000


def test_backfill_needs_a_window() -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["backfill", "--start", "2026-01-01"])
    args = _parser().parse_args(["backfill", "--start", "2026-01-01", "--end", "2026-01-02"])
    assert args.start < args.end

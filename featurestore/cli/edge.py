"""What every command does at its edge: one line per failure, and no secret in any line.

    parser = OneLineParser(prog="featurestore")      # a bad flag: one line, exit 2
    configure_logging(fmt, secrets=passwords_in(url))  # every log record redacted
    return fail(log, exc)                             # any failure: one redacted line, its exit code

A user who mistypes a flag, points at a Redis that is down or presses Ctrl-C gets one line
saying what went wrong, never a traceback; a traceback is for our bugs, and even then the
line names the exception and where it was raised. Passwords in Redis URLs and PostgreSQL
DSNs (URL or key=value form) are replaced by stars in every line the commands write:
their messages, their log records and the tracebacks those carry (featurestore.config's
`redact_text`).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import NoReturn

from featurestore.cli import INTERRUPTED
from featurestore.config import redact_text
from featurestore.errors import FeatureStoreError

__all__ = ["INTERRUPTED", "OneLineParser", "RedactingFormatter", "configure_logging", "describe", "print_line"]


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit 2), pointing at --help.

    argparse prints the whole usage before the error, which for `serve` is twenty lines
    above the one that matters. Sub-commands inherit the class (add_subparsers uses it).

    Example: `featurestore serve --port abc` prints
    "featurestore serve: error: argument --port: invalid int value: 'abc' (see featurestore serve --help)".
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class RedactingFormatter(logging.Formatter):
    """A log formatter that hides passwords (`redact_text`) in the whole formatted record, traceback included.

    Parameters:
        fmt: the record format, as for logging.Formatter.
        secrets: passwords known at the edge (`featurestore.config.passwords_in`), hidden
            also where they appear outside a URL.
    """

    def __init__(self, fmt: str, secrets: Iterable[str] = ()) -> None:
        super().__init__(fmt)
        self.secrets = tuple(secrets)

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record), self.secrets)


def configure_logging(fmt: str, level: int = logging.INFO, secrets: Iterable[str] = ()) -> None:
    """Log records of every logger to stderr, at `level` and above, through a `RedactingFormatter`.

    As logging.basicConfig, it adds its handler only when the root logger has none (a
    test's capture handler stays alone); called again (once the secrets are known, or
    in a worker process), it replaces its own handler's formatter instead of adding a
    second handler.
    """
    root = logging.getLogger()
    ours: list[logging.Handler] = [h for h in root.handlers if getattr(h, "featurestore_edge", False)]
    if not root.handlers:
        stream = logging.StreamHandler()
        stream.featurestore_edge = True  # type: ignore[attr-defined]
        root.addHandler(stream)
        ours = [stream]
    for handler in ours:
        handler.setFormatter(RedactingFormatter(fmt, secrets))
    root.setLevel(level)


def describe(exc: BaseException) -> str:
    """One line for a failure: our errors and OS errors by their message, anything else by type and place.

    An unexpected exception is a bug of ours; its line says where it was raised
    (`unexpected KeyError at featurestore/cli/demo.py:120: 'x'`) so that the report
    points somewhere, without the traceback a user should not have to read. The line
    is not redacted here: it goes through the redacting log formatter or `redact_text`.
    """
    if isinstance(exc, FeatureStoreError):
        text = str(exc)
    elif isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename is not None else ""
        text = f"{exc.strerror or exc}{where}"
    else:
        frames = traceback.extract_tb(exc.__traceback__)
        place = f" at {_short(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
        text = f"unexpected {type(exc).__name__}{place}: {exc}"
    return " ".join(text.split()) or type(exc).__name__  # one line, whatever the message held


def _short(filename: str) -> str:
    """A source file's path from its package down (featurestore/cli/demo.py), not the install's."""
    parts = Path(filename).parts
    for package in ("featurestore", "materialize"):
        if package in parts:
            return "/".join(parts[len(parts) - 1 - parts[::-1].index(package) :])
    return filename


def print_line(prog: str, text: str, secrets: Iterable[str] = ()) -> None:
    """`prog: text` on stderr as one redacted line."""
    print(redact_text(f"{prog}: {text}", secrets), file=sys.stderr, flush=True)

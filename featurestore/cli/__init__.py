"""The command-line entry points: `featurestore` (cli/main.py) and
`featurestore-materialize` (materialize/__main__.py).

Both start through `run_command`, which imports the command's module itself: a Ctrl-C
while Python imports it (gRPC, numpy, asyncpg: a few hundred milliseconds) then ends in
one line and exit code 130, as it does a moment later, instead of a traceback.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["featurestore", "run_command"]

INTERRUPTED = 130  # the shell's code for a process ended by SIGINT (128 + 2)


def run_command(module: str, prog: str) -> int:
    """Import `module` and return its `main()`; one line and 130 if Ctrl-C comes first."""
    try:
        command = importlib.import_module(module)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
    exit_code: int = command.main()
    return exit_code


def featurestore() -> int:
    """The `featurestore` command."""
    return run_command("featurestore.cli.main", "featurestore")

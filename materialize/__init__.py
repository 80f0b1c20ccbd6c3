"""The materialization job: PostgreSQL -> Redis, latest row per entity, guarded writes.

Run it as `featurestore-materialize incremental` (see `materialize/__main__.py`), or
from Python with `materialize.job.run(Settings(...))`.
"""

import importlib
import sys


def main() -> int:
    """The `featurestore-materialize` command (materialize/__main__.py), imported here so
    that a Ctrl-C during its imports is one line and exit code 130 too (as for
    `featurestore`, featurestore/cli/__init__.py), not a traceback."""
    try:
        command = importlib.import_module("materialize.__main__")
    except KeyboardInterrupt:
        print("featurestore-materialize: interrupted", file=sys.stderr)
        return 130
    exit_code: int = command.main()
    return exit_code

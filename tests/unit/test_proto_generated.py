"""The committed featurestore/_proto/ is exactly what protos/codegen.py makes of protos/.

The code is regenerated into a temporary folder by the same script `make proto` runs and
compared byte for byte, so a .proto edited without regenerating (or a generated file edited
by hand, or one left behind after its .proto went) fails the suite.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "featurestore" / "_proto"
FIX = "run `make proto` (python protos/codegen.py) and commit featurestore/_proto/"


def generated_files(folder: Path) -> dict[str, bytes]:
    """The generator's kind of files under `folder` (Python and stubs) by relative path."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.suffix in (".py", ".pyi") and "__pycache__" not in path.parts
    }


def test_generated_protobuf_code_is_up_to_date(tmp_path: Path) -> None:
    fresh = tmp_path / "_proto"
    done = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "codegen.py"), "--out", str(fresh)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, f"protos/codegen.py failed:\n{done.stderr}"
    want, have = generated_files(fresh), generated_files(COMMITTED)
    assert want, "protos/codegen.py generated nothing"
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    differ = sorted(name for name in set(want) & set(have) if want[name] != have[name])
    assert not (missing or extra or differ), (
        f"featurestore/_proto/ is out of date with protos/: missing {missing}, not generated any more {extra},"
        f" different {differ}: {FIX}"
    )

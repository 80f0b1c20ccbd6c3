"""The import rule of the house (README, "Architecture"), checked by parsing every import.

    core        featurestore/*.py: errors, limits, types, config, registry, lookup,
                decode, tasks, metrics, embedded
    store/      everything that speaks to Redis
    cache/, retrieval/, inference/    the domains
    client/     the Python client
    serving/    the gRPC server: the composition root
    cli/        the command line
    materialize the cron job (a package of its own; its __main__ is a command line, like cli/)

Each may import only what its row of ALLOWED names (and itself). The domains never import
each other: they meet through a protocol the consumer declares (lookup.RowSource,
inference.scoring.CandidateSource) and serving/ passes the implementation in.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = {"errors", "limits", "types", "config", "registry", "lookup", "decode", "tasks", "metrics", "embedded"}
DOMAINS = ("cache", "retrieval", "inference")
ALLOWED: dict[str, set[str]] = {
    "core": {"core", "store"},
    "store": {"errors", "limits", "types"},
    "cache": {"core", "store"},
    "retrieval": {"core", "store"},
    "inference": {"core", "store"},
    "client": {"errors", "limits", "types", "_proto"},
    "serving": {"core", "store", *DOMAINS, "_proto"},
    "cli": {"core", "store", *DOMAINS, "serving", "client", "_proto", "materialize"},
    "materialize": {"core", "store"},
}


def _room(module: str) -> str:
    """The room of a dotted module name: a subpackage, the core, a core module's own name
    (for the narrower rows), or materialize."""
    parts = module.split(".")
    if module == "materialize.__main__":  # a command line like cli/: it shares cli/'s option helper
        return "cli"
    if parts[0] == "materialize":
        return "materialize"
    if len(parts) == 1:  # featurestore itself: its __init__ re-exports the public names
        return "package"
    return parts[1] if parts[1] not in CORE else "core"


def _allowed(importer: str, imported: str) -> bool:
    room, target = _room(importer), _room(imported)
    if room == target or room == "package":
        return True
    allowed = ALLOWED[room]
    if target == "core" and "core" not in allowed:
        return imported.split(".")[1] in allowed  # e.g. store may import errors and limits
    return target in allowed


def _modules() -> list[Path]:
    files = [*(ROOT / "featurestore").rglob("*.py"), *(ROOT / "materialize").rglob("*.py")]
    return sorted(p for p in files if "_proto" not in p.parts)


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            # `from featurestore import metrics` names a module too
            found += [
                (node.lineno, f"{node.module}.{alias.name}") for alias in node.names if node.module == "featurestore"
            ]
    return [(line, name) for line, name in found if name.split(".")[0] in ("featurestore", "materialize")]


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_imports_only_what_its_room_allows(path: Path) -> None:
    importer = _name(path)
    broken = [
        f"line {line}: {importer} ({_room(importer)}) imports {name} ({_room(name)})"
        for line, name in _imports(path)
        if name != "featurestore" and not _allowed(importer, name)
    ]
    assert not broken, "\n".join(broken)


def test_every_room_is_known() -> None:
    rooms = {_room(_name(p)) for p in _modules()}
    assert rooms <= {*ALLOWED, "package"}, rooms - {*ALLOWED, "package"}


@pytest.mark.parametrize(
    ("importer", "imported", "allowed"),
    [
        ("featurestore.lookup", "featurestore.cache.hotcache", False),
        ("featurestore.store.pipe", "featurestore.errors", True),
        ("featurestore.store.pipe", "featurestore.config", False),
        ("featurestore.inference.scoring", "featurestore.retrieval.indexes", False),
        ("featurestore.serving.server", "featurestore.retrieval.indexes", True),
        ("featurestore.client.core", "featurestore.serving.wire", False),
        ("materialize.job", "featurestore.store.redis", True),
        ("materialize.job", "featurestore.serving.server", False),
    ],
)
def test_the_rule_itself(importer: str, imported: str, allowed: bool) -> None:
    assert _allowed(importer, imported) is allowed


def test_the_formatter_owns_the_layout() -> None:
    """ruff format decides every line break (line length 120): no file fights it."""
    marker = "# fmt: " + "skip"  # split, so this file does not match itself
    sources = [
        p
        for top in ("featurestore", "materialize", "tests", "benchmarks", "feature_repo", "protos")
        for p in (ROOT / top).rglob("*.py")
    ]
    fighting = [str(p.relative_to(ROOT)) for p in sources if "_proto" not in p.parts and marker in p.read_text()]
    assert not fighting, fighting

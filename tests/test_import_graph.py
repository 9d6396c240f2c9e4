"""The import graph is one-way: the built-in plugins in ``callbacks/`` use only jaxfit's
public protocol (as a third-party plugin must), and the engine in ``jaxfit/`` imports no
plugin. Checked on the source, so a new private import fails here, not in a user's upgrade."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of every module and name ``path`` imports from jaxfit."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return [(line, name) for line, name in out if name.split(".")[0] in ("jaxfit", "callbacks")]


def _private(dotted: str) -> bool:
    return any(part.startswith("_") for part in dotted.split(".")[1:])


@pytest.mark.parametrize("path", sorted((ROOT / "callbacks").glob("*.py")), ids=lambda p: p.name)
def test_a_builtin_plugin_imports_only_public_jaxfit_names(path):
    private = [f"{path.name}:{line} imports {name}" for line, name in _imports(path)
               if _private(name)]
    assert not private, private


# verify_resume is a tool that runs the user's fit with ModelCheckpoint around it, not a
# part of the engine; it finds the plugin at call time.
TOOLS = {"jaxfit/checkpoint/_verify.py"}


def test_the_engine_imports_no_plugin():
    found = []
    for path in sorted((ROOT / "jaxfit").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for line, name in _imports(path):
            if (name.startswith("jaxfit.callbacks") or name.startswith("callbacks")) \
                    and rel not in TOOLS:
                found.append(f"{rel}:{line} imports {name}")
    assert not found, found


def test_the_check_sees_a_private_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from jaxfit import _state\nfrom jaxfit.checkpoint._writer import RunWriter\n"
                   "from jaxfit.checkpoint import RunWriter as W\n")
    assert [name for _, name in _imports(bad) if _private(name)] == [
        "jaxfit._state", "jaxfit.checkpoint._writer.RunWriter"]

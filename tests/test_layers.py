"""The layers hold by construction: diffpano imports no Ray, and no layer imports one beside or above it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What each layer may import from the project (the library is below all of them; the CLI finds them by entry point).
ALLOWED = {"diffpano": {"diffpano"}, "batch": {"diffpano", "batch"}, "trainer": {"diffpano", "trainer"},
           "serve": {"diffpano", "serve"}, "cluster": {"diffpano", "cluster"}}


def imported_modules(path: Path) -> set[str]:
    """Every module a source file imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_itself_and_the_layers_below(layer):
    bad = [f"{path.relative_to(ROOT)}: {name}" for path in sorted((ROOT / layer).rglob("*.py"))
           for name in imported_modules(path)
           if name.split(".")[0] in set(ALLOWED) - ALLOWED[layer]]
    assert not bad, bad


def test_the_library_never_imports_ray_not_even_lazily():
    bad = [f"{path.relative_to(ROOT)}: {name}" for path in sorted((ROOT / "diffpano").rglob("*.py"))
           for name in imported_modules(path) if name.split(".")[0] == "ray"]
    assert not bad, bad


def test_every_library_module_imports_with_ray_unimportable():
    code = """
import importlib, pkgutil, sys
sys.modules["ray"] = None  # `import ray` now raises ImportError
import diffpano
names = [m.name for m in pkgutil.walk_packages(diffpano.__path__, "diffpano.")]
for name in names:
    importlib.import_module(name)
print(len(names))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) >= 30  # the walk found the library, not an empty package


def test_the_command_finds_every_layer_through_entry_points():
    import typer

    from diffpano.cli import build_app

    names = set(typer.main.get_command(build_app()).commands)
    assert {"generate", "video", "pack-model", "bulk", "eval", "ablate", "train", "serve", "submit", "dataset",
            "manifest"} <= names

"""The layers hold by construction: diffpano imports no Ray, no layer imports one beside or above it, only fanout
joins Ray, and inside the library models never reach up into pipelines or data."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What each layer may import from the project (the library is below all of them; the CLI finds them by entry point).
ALLOWED = {"diffpano": {"diffpano"}, "fanout": {"diffpano", "fanout"}, "batch": {"diffpano", "fanout", "batch"},
           "trainer": {"diffpano", "fanout", "trainer"}, "serve": {"diffpano", "fanout", "serve"},
           "cluster": {"diffpano", "cluster"}}
# Inside the library: what each subpackage must not import (diffusers' order: geometry and kernels under models,
# models under pipelines; storage below all but geometry, datasets beside the models).
LIBRARY_BELOW = {
    "geometry": {"ops", "models", "pipelines", "io", "data", "metrics"},
    "ops": {"models", "pipelines", "io", "data", "metrics"},
    "models": {"pipelines", "data", "metrics"},
    "io": {"ops", "models", "pipelines", "data", "metrics"},
    "pipelines": {"data", "metrics"},
    "data": {"ops", "models", "pipelines", "metrics"},
}


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


@pytest.mark.parametrize("home", sorted(LIBRARY_BELOW))
def test_each_library_subpackage_stays_below_the_ones_that_use_it(home):
    bad = [f"{path.relative_to(ROOT)}: {name}" for path in sorted((ROOT / "diffpano" / home).rglob("*.py"))
           for name in imported_modules(path)
           if name.startswith("diffpano.") and name.split(".")[1] in LIBRARY_BELOW[home]]
    assert not bad, bad


def test_only_fanout_joins_ray():
    bad = [str(path.relative_to(ROOT)) for layer in ALLOWED for path in sorted((ROOT / layer).rglob("*.py"))
           if "ray.init(" in path.read_text() and path != ROOT / "fanout" / "cluster.py"]
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

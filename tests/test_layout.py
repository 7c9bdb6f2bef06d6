"""Imports run one way (docs/design.md, "Layout"): a lower folder never imports a higher one.

Every import statement of every module is read with ``ast`` (lazy imports inside functions included),
so a wrong-way import fails here even when no test happens to execute it.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("core", "proto", "edge", "cloud", "models", "eval", "simulate", "bench", "demo")
# What each folder may import from the project (its own folder is always allowed).
ALLOWED = {
    "core": set(),
    "proto": {"core"},
    "edge": {"core", "proto"},
    "cloud": {"core", "proto"},
    "models": {"core", "proto", "edge", "cloud"},
    "eval": {"core", "proto", "edge", "cloud", "models"},
    "simulate": {"core", "proto", "edge", "cloud", "models", "eval"},
    "bench": {"core", "proto", "edge", "cloud", "models", "eval", "simulate"},
    "demo": {"core", "proto", "edge", "cloud", "models", "eval"},
}
# Third-party packages a folder must never import: core is numpy + the standard library; the edge runs
# on devices without torch.
THIRD_PARTY_ALLOWED = {"core": {"numpy"}}
FORBIDDEN = {"edge": {"torch", "transformers", "optimum"}, "proto": {"torch", "transformers"}}


def imports_of(path: Path) -> set[str]:
    """Top-level names of every absolute import in ``path``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def modules() -> list[tuple[str, Path]]:
    return [(folder, path) for folder in PROJECT for path in sorted((ROOT / folder).rglob("*.py"))]


@pytest.mark.parametrize("folder,path", modules(), ids=lambda x: str(x.relative_to(ROOT)) if isinstance(x, Path) else x)
def test_imports_run_one_way(folder, path):
    found = imports_of(path)
    wrong = sorted((found & set(PROJECT)) - ALLOWED[folder] - {folder})
    assert not wrong, f"{path.relative_to(ROOT)} imports {wrong}; {folder}/ may import only {sorted(ALLOWED[folder])}"
    assert not found & FORBIDDEN.get(folder, set()), f"{path.relative_to(ROOT)} imports {found & FORBIDDEN[folder]}"
    if folder in THIRD_PARTY_ALLOWED:
        outside = found - set(sys.stdlib_module_names) - {"__future__", folder} - THIRD_PARTY_ALLOWED[folder]
        assert not outside, f"{path.relative_to(ROOT)} imports {sorted(outside)}: {folder}/ is numpy + stdlib only"


def test_the_rule_catches_a_wrong_way_import(tmp_path):
    """The checker itself: a proto module importing edge is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from edge.sampling import probabilities\n")
    assert "edge" in imports_of(bad) - ALLOWED["proto"]


def test_no_module_is_left_out():
    """Every Python file of the project lives in a folder the layout names (no stray top-level package)."""
    stray = [p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()
             and p.name not in PROJECT and p.name != "tests"]
    assert not stray, f"packages outside the layout: {stray}"

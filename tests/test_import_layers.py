"""The package layers: `models/` and `pallas_kernels/` import nothing from `jpaged/`, and `pallas_kernels/`
imports nothing from `models/` (read from the source with ast, so a lazy import inside a function counts)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"models": ("jpaged",), "pallas_kernels": ("jpaged", "models")}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every import statement in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_layers_do_not_import_higher_ones(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no python files under {package}/"
    bad = [f"{path.relative_to(ROOT)}:{line} imports {name}" for path in files
           for line, name in imported_packages(path) if name in FORBIDDEN[package]]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_lazy_imports(tmp_path):
    source = tmp_path / "lazy.py"
    source.write_text("def f():\n    from jpaged.sharding import make_mesh\n    import models.llama\n")
    assert imported_packages(source) == [(2, "jpaged"), (3, "models")]

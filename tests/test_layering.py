"""Dependencies point one way: training/export/refine/benchmarks -> runtime/calibration -> core (gradad/).

Parsed with ast (every import statement, including lazy ones inside functions), so a hidden import cycle fails
here rather than in a deployed line that installs the runtime alone.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Folder -> gradad sub-packages it must never import.
FORBIDDEN = {
    "runtime": ("training", "export", "evaluation", "refine", "benchmarks"),
    "calibration": ("training", "export", "evaluation", "refine", "benchmarks"),
    "gradad": ("training", "export", "evaluation", "refine", "benchmarks", "runtime", "calibration"),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, at any depth; relative imports resolved to ``gradad.*``."""
    package = f"gradad.{path.parent.name}" if path.parent.name != "gradad" else "gradad"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x / from ..y import z
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            out.append((node.lineno, module))
            out += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return out


def violations(folder: str) -> list[str]:
    """``file:line imports module`` for each forbidden import under ``folder``."""
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for line, module in imported_modules(path):
            for banned in FORBIDDEN[folder]:
                if module == f"gradad.{banned}" or module.startswith(f"gradad.{banned}."):
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_no_import_against_the_layering(folder: str) -> None:
    assert violations(folder) == []


def test_the_check_sees_lazy_imports(tmp_path: Path) -> None:
    lazy = tmp_path / "runtime" / "mod.py"
    lazy.parent.mkdir()
    lazy.write_text("def f():\n    from gradad.export.engine import x\n    import gradad.training.model\n")
    found = [m for _, m in imported_modules(lazy)]
    assert "gradad.export.engine" in found and "gradad.training.model" in found

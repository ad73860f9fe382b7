"""The tests' own layout: no test module imports another; what several share is a module
of tests/support, named for what it provides."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def imported(tree: ast.Module) -> set[str]:
    names = {alias.name for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names}
    return names | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}


def test_no_test_module_imports_another() -> None:
    wrong = [
        f"{path.relative_to(TESTS)} imports {name}"
        for path in sorted(TESTS.rglob("*.py"))
        for name in sorted(imported(ast.parse(path.read_text(), str(path))))
        if name.split(".")[0].startswith("test_")
    ]
    assert wrong == []

"""The layer rule's second half: qlab imports sit at the top of each file.

`lint-imports` (make lint) checks that every import points down the layer order of
docs/design.md; this test checks the imports are where a reader looks for them. A
function-level qlab import is allowed only with a comment on its line saying why.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "qlab"


def _unexplained_function_imports(counts) -> list[str]:
    """``file:line`` of every import inside a function body that ``counts`` and whose line
    carries no comment."""
    hidden = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for sub in ast.walk(node):
                if counts(sub) and "#" not in lines[sub.lineno - 1]:
                    hidden.append(f"{path.relative_to(PACKAGE.parent)}:{sub.lineno}")
    return hidden


def test_no_function_level_qlab_import_without_a_reason():
    hidden = _unexplained_function_imports(
        lambda sub: isinstance(sub, ast.ImportFrom) and (sub.module or "").startswith("qlab")
    )
    assert not hidden, hidden


def test_no_function_level_import_at_all_without_a_reason():
    """Third-party and standard-library imports too: only optional extras (and the like)
    are imported late, each with its reason on the line."""
    hidden = _unexplained_function_imports(lambda sub: isinstance(sub, (ast.Import, ast.ImportFrom)))
    assert not hidden, hidden

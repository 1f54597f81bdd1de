"""The packages' import structure: no two modules import each other at run time (a name that both sides use sits in
the lower one). Type-only imports (under `TYPE_CHECKING`) may point back."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipelines", "stxd_cache", "stxd_train")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _runtime_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of the packages that `path` imports outside `if TYPE_CHECKING:` blocks, at any depth."""
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                self.generic_visit(node)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else str(node.module))

        def visit_Import(self, node: ast.Import) -> None:
            found.update(alias.name for alias in node.names)

    Visitor().visit(ast.parse(path.read_text()))
    return {m for m in found if m in modules}


def test_no_two_modules_import_each_other() -> None:
    modules = _modules()
    assert len(modules) > 60
    deps = {name: _runtime_imports(path, modules) - {name} for name, path in modules.items()}
    mutual = sorted({tuple(sorted((a, b))) for a, targets in deps.items() for b in targets if a in deps[b]})
    assert mutual == [], mutual

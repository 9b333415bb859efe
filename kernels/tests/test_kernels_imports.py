"""dplora_kernels' modules import each other without a circle (issue 28): every import of one package
module by another, at module level or inside a function, read from the sources. An import inside a
function still makes a circle (it only hides it from import time)."""
from __future__ import annotations

import ast
from pathlib import Path

import dplora_kernels

PKG = Path(dplora_kernels.__file__).parent


def _edges(src: Path) -> dict[str, set[str]]:
    """module -> package modules it imports (relative `from . import x` / `from .x import ...`, and
    absolute `dplora_kernels.x`)."""
    mods = {p.stem for p in src.glob("*.py") if p.stem != "__init__"}
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m in mods:
        for node in ast.walk(ast.parse((src / f"{m}.py").read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level == 1 or base.startswith("dplora_kernels"):
                    base = base.removeprefix("dplora_kernels").lstrip(".")
                    targets = [base.split(".")[0]] if base else [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name.split(".")[1] for a in node.names
                           if a.name.startswith("dplora_kernels.")]
            edges[m] |= {t for t in targets if t in mods and t != m}
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state and (c := visit(t)):
                return c
        state[m] = 2
        path.pop()
        return None

    for m in sorted(edges):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_no_import_circle_in_the_package():
    edges = _edges(PKG)
    assert "engine" in edges and "grouped" in edges and edges["engine"], "import graph not read"
    assert _cycle(edges) is None, f"import circle: {' -> '.join(_cycle(edges))}"
    assert "grouped" not in edges["engine"] and "engine" not in edges["grouped"]


def test_cycle_finder_sees_a_circle(tmp_path):
    (tmp_path / "a.py").write_text("from .b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from . import a\n")
    (tmp_path / "c.py").write_text("import dplora_kernels.a\n")
    assert _cycle(_edges(tmp_path)) in (["a", "b", "a"], ["b", "a", "b"])

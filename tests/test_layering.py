"""The import graph of lalora and dplora_kernels follows the layer order of docs/CONTRACTS.md.

Every ``import`` / ``from ... import`` of a project module is read from the source (AST), including
imports inside function bodies (a lazy import still ties the two modules together; hiding it in a
function only hides a circle). Checked:

- every module belongs to a layer of the ``layers`` block in docs/CONTRACTS.md (a new module must be
  placed there);
- no module imports a module of a higher layer (same layer or lower only);
- the module graph has no circle (a package's ``__init__`` is a node of its own: ``import lalora.tasks``
  runs it and everything it imports).

Imports by computed name (``importlib.import_module(f".{name}")`` of the lazy ``__init__`` exports,
the subcommand table of ``lalora.cli``) are not seen; they only point down into their own package
or from the top-level CLI.

The source is read from wherever ``lalora`` / ``dplora_kernels`` are imported from, so the test can be
run against another checkout (``PYTHONPATH=<checkout>:<checkout>/kernels/src``) with this
checkout's layer order.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import dplora_kernels
import lalora

CONTRACTS = Path(__file__).resolve().parents[1] / "docs" / "CONTRACTS.md"
PACKAGES = ("lalora", "dplora_kernels")

# Import edges allowed against the order, each with the reason and who removes it. An entry that no
# longer matches an import fails the test (keep the list minimal). Empty: no exception is needed.
ALLOWED: dict[tuple[str, str], str] = {}


def read_layers(text: str) -> list[list[str]]:
    """The ```layers block of CONTRACTS.md: one line per layer, highest first, ``name: prefixes``."""
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "docs/CONTRACTS.md has no ```layers block"
    layers = []
    for line in block.group(1).splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            layers.append(line.split(":", 1)[1].split())
    return layers


def package_modules() -> dict[str, Path]:
    """Module name -> source file, for every module of both packages (``__init__`` = the package)."""
    modules = {}
    for pkg in (lalora, dplora_kernels):
        root = Path(pkg.__file__).parent
        for path in sorted(root.rglob("*.py")):
            parts = (pkg.__name__, *path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that ``name`` imports anywhere in its source (function bodies included)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] not in PACKAGES:
                continue
            while target not in modules:   # `import lalora.tasks.paper.X`: the longest module prefix
                target = target.rpartition(".")[0]
            if target != name:
                found.add(target)
    return found


def layer_of(name: str, layers: list[list[str]]) -> int | None:
    """Index of ``name``'s layer (0 = highest): the layer with the longest matching prefix."""
    best, best_len = None, -1
    for i, prefixes in enumerate(layers):
        for prefix in prefixes:
            exact = prefix.startswith("=")   # "=lalora": the package's __init__ only, not every module
            prefix = prefix.lstrip("=")
            hit = name == prefix or (not exact and name.startswith(prefix + "."))
            if hit and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    return best


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    layers = read_layers(CONTRACTS.read_text())
    missing = sorted(m for m in package_modules() if layer_of(m, layers) is None)
    assert not missing, f"modules not placed in the ```layers block of docs/CONTRACTS.md: {missing}"


def test_no_import_from_a_lower_layer_to_a_higher_one():
    layers = read_layers(CONTRACTS.read_text())
    upward = []
    for name, targets in sorted(import_graph().items()):
        for target in sorted(targets):
            mine, theirs = layer_of(name, layers), layer_of(target, layers)
            if mine is not None and theirs is not None and theirs < mine and (name, target) not in ALLOWED:
                upward.append(f"{name} -> {target}")
    assert not upward, "upward imports (against docs/CONTRACTS.md):\n  " + "\n  ".join(upward)


def test_no_import_circle():
    graph = {name: {t for t in targets if (name, t) not in ALLOWED}
             for name, targets in import_graph().items()}
    cycles = find_cycles(graph)
    assert not cycles, "import circles:\n  " + "\n  ".join(" <-> ".join(c) for c in cycles)


def test_allowed_exceptions_are_still_needed():
    graph = import_graph()
    stale = [edge for edge in ALLOWED if edge[1] not in graph.get(edge[0], set())]
    assert not stale, f"no longer imported, remove from ALLOWED in tests/test_layering.py: {stale}"


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    """The parser itself: an import in a function body and a relative `from . import sub` count."""
    src = tmp_path / "m.py"
    src.write_text("from . import b\n\ndef f():\n    from lalora.federated import simulation\n")
    modules = {"lalora.x.m": src, "lalora.x.b": src, "lalora.federated.simulation": src,
               "lalora.federated": src}
    assert imports_of("lalora.x.m", src, modules) == {"lalora.x.b", "lalora.federated.simulation"}
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]

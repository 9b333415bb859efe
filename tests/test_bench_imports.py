"""Script folders must not shadow installed packages (issue 30, deliverable 0).

`python benchmarks/x.py` puts benchmarks/ FIRST on sys.path, so a module there named like an installed
distribution replaces it for every import in the process, the ones other packages make included:
`benchmarks/kernels.py` shadowed Hugging Face's `kernels`, which transformers imports, and every
MiniLM/Opacus variant of `make bench` failed in a fresh clone. Two checks per script folder:
  * no module or package in the folder has the import name of an installed distribution (or of the
    standard library);
  * every module the folder's scripts import (at any level, function bodies included) imports in a
    fresh interpreter whose sys.path starts with that folder, as when a script runs -- this catches a
    shadowed name reached only through another package (transformers -> kernels).
"""
from __future__ import annotations

import ast
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folders whose files run as `python <folder>/<script>.py` (the folder lands on sys.path[0])
SCRIPT_DIRS = ["benchmarks", "gpu_check"]
# folders that pytest or notebooks put on sys.path: their module names must not shadow either
PATH_DIRS = SCRIPT_DIRS + ["tests", "kernels/tests"]
# packages a script writes itself before importing them (engine_ab.py: main's engine under another name)
GENERATED = {"dplora_kernels_before"}


def _local_modules(folder: Path) -> set[str]:
    mods = {p.stem for p in folder.glob("*.py")}
    mods |= {p.parent.name for p in folder.glob("*/__init__.py")}
    return mods


def _installed_names() -> dict[str, str]:
    """Import name -> what provides it: every installed distribution's top-level names and the stdlib."""
    names = {m: "the standard library" for m in sys.stdlib_module_names}
    for mod, dists in importlib.metadata.packages_distributions().items():
        names[mod] = "distribution " + ", ".join(sorted(set(dists)))
    return names


def _imported_modules(folder: Path) -> set[str]:
    """Absolute module names imported anywhere in the folder's scripts (from-imports as the module)."""
    mods: set[str] = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                mods |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods.add(node.module)
    return mods


@pytest.mark.parametrize("folder", PATH_DIRS)
def test_no_module_shadows_an_installed_package(folder):
    installed = _installed_names()
    clashes = {m: installed[m] for m in sorted(_local_modules(ROOT / folder)) if m in installed}
    assert not clashes, (f"{folder}/ has modules named like installed packages, which they shadow when "
                         f"{folder}/ is on sys.path: {clashes}; rename them")


def test_shadow_check_sees_a_clash(tmp_path):
    """The check above can fail: a file named like an installed package is reported."""
    (tmp_path / "torch.py").write_text("")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    installed = _installed_names()
    assert {"torch", "kernels"} <= {m for m in _local_modules(tmp_path) if m in installed}


_IMPORT_ALL = """
import importlib, json, sys
sys.path.insert(0, sys.argv[1])           # where `python <folder>/<script>.py` puts the folder
failed = {}
for name in json.loads(sys.argv[2]):
    try:
        importlib.import_module(name)
    except Exception as e:                # the script would die on the same import
        failed[name] = f"{type(e).__name__}: {e}"
print(json.dumps(failed))
"""


@pytest.mark.parametrize("folder", SCRIPT_DIRS)
def test_script_dependencies_import_with_the_folder_first_on_the_path(folder):
    path = ROOT / folder
    local = _local_modules(path)
    # the folder's own scripts are not imported (some run their benchmark at import); their
    # imports are part of the scan, so everything a sibling pulls in is imported here too
    deps = sorted(m for m in _imported_modules(path) if m.split(".")[0] not in local | GENERATED)
    assert deps, f"no imports found in {folder}/*.py"
    res = subprocess.run([sys.executable, "-c", _IMPORT_ALL, str(path), json.dumps(deps)],
                         capture_output=True, text=True, cwd=path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    failed = json.loads(res.stdout.strip().splitlines()[-1])
    assert not failed, f"imports of {folder}/ scripts fail with {folder}/ first on sys.path: {failed}"

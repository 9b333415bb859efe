"""The two install paths stay in step: environment.yml (conda) mirrors pyproject's pip extras,
the Makefile's README commands exist, and CI calls the README's test command."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_parses_and_mirrors_the_pip_extras():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["name"] == "lalora"
    pip_block = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert "-e ./kernels" in pip_block
    (lalora_line,) = [line for line in pip_block if re.match(r"-e \.\[", line)]
    conda_extras = set(lalora_line[len("-e .["):-1].split(","))
    all_extras = _pyproject()["project"]["optional-dependencies"]["all"]
    (spec,) = all_extras
    pip_extras = set(spec[spec.index("[") + 1:spec.index("]")].split(","))
    assert conda_extras == pip_extras, (conda_extras, pip_extras)
    assert pip_extras <= set(_pyproject()["project"]["optional-dependencies"])


def test_kernels_is_its_own_package_and_a_dependency_of_lalora():
    kernels = tomllib.loads((ROOT / "kernels" / "pyproject.toml").read_text())["project"]
    assert kernels["name"] == "dplora-kernels"
    assert [d for d in kernels["dependencies"] if not d.startswith("torch")] == []
    assert any(d.startswith("dplora-kernels") for d in _pyproject()["project"]["dependencies"])
    assert not list((ROOT / "kernels" / "src").rglob("*.py")) or not any(
        re.search(r"^\s*(import|from)\s+lalora", p.read_text(), re.M)
        for p in (ROOT / "kernels" / "src").rglob("*.py"))


def test_torch_is_a_range_not_a_pin():
    torch_reqs = [d for d in _pyproject()["project"]["dependencies"] if d.startswith("torch")]
    assert torch_reqs and all(">=" in d and "==" not in d for d in torch_reqs)


def test_readme_opens_with_the_two_commands_and_ci_calls_make_test():
    readme = (ROOT / "README.md").read_text().splitlines()
    head = "\n".join(readme[:8])
    assert "make reproduce" in head and "make test" in head
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^reproduce:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


# distribution -> the module it provides (where the names differ)
_MODULE_OF = {"dplora-kernels": "dplora_kernels", "scikit-learn": "sklearn", "scikit-image": "skimage",
              "pyyaml": "yaml"}


def test_every_runtime_dependency_is_imported_by_the_package():
    """Dependencies are what lalora imports at run time; test- or benchmark-only packages live in
    the extras (issue 20: prv-accountant was a run-time dependency only tests imported)."""
    sources = "\n".join(p.read_text() for p in (ROOT / "lalora").rglob("*.py"))
    for req in _pyproject()["project"]["dependencies"]:
        dist = re.split(r"[<>=!~\[ ]", req, maxsplit=1)[0].lower()
        module = _MODULE_OF.get(dist, dist.replace("-", "_"))
        assert re.search(rf"^\s*(import|from)\s+{module}\b", sources, re.M), f"{dist} is not imported by lalora"
    dev = " ".join(_pyproject()["project"]["optional-dependencies"]["dev"])
    assert "prv-accountant" in dev and "peft" in dev

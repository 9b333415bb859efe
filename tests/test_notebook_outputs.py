"""Executed notebooks carry no warnings and no machine paths in their outputs (issue 20)."""
import json
import re
from pathlib import Path

import nbformat
import pytest

from lalora.notebooks import clean_executed_notebook, scrub_text

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = sorted(p for profile in ("offline", "offline-full", "evidence")
                   for p in (ROOT / "results" / profile / "notebooks").glob("*.ipynb"))
# An absolute path of a build machine: temporary folders, home folders, virtual environments.
MACHINE_PATH = re.compile(r"(/tmp/|/var/folders/|/private/var/|/home/[^/\s]+/|/root/|/Users/[^/\s]+/|(?<!<)site-packages)")
WARNING = re.compile(r"\w*Warning: ")

TQDM_WARNING = ("/tmp/fresh_r/.venv/lib/python3.11/site-packages/tqdm/auto.py:21: TqdmWarning: IProgress not "
                "found. Please update jupyter and ipywidgets. See https://ipywidgets.readthedocs.io/en/stable/"
                "user_install.html\n  from .autonotebook import tqdm as notebook_tqdm\n")


def _texts(nb) -> list[str]:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.get("output_type") == "stream":
                out.append(o.get("text", ""))
            out.extend(v for k, v in (o.get("data") or {}).items() if k.startswith("text/") and isinstance(v, str))
            out.extend(o.get("traceback", []))
    return out


@pytest.mark.parametrize("path", COMMITTED, ids=[p.stem for p in COMMITTED])
def test_committed_notebook_outputs_have_no_machine_paths_or_warnings(path):
    nb = nbformat.read(path, as_version=4)
    papermill = nb.metadata.get("papermill") or {}
    assert not any(str(papermill.get(k, "")).startswith("/") for k in ("input_path", "output_path")), papermill
    for text in _texts(nb):
        assert not MACHINE_PATH.search(text), f"{path.name}: machine path in output: {text[:200]!r}"
        assert not WARNING.search(text), f"{path.name}: warning in output: {text[:200]!r}"


def test_scrub_removes_the_tqdm_warning_and_replaces_paths():
    assert scrub_text(TQDM_WARNING) == ""
    text = scrub_text("wrote /work/repo/results/a.json and /tmp/pytest-1/x/fig.png\nkeep me\n", "/work/repo")
    assert text == "wrote ./results/a.json and <tmp>\nkeep me\n"
    scrubbed = scrub_text("File /opt/venv/lib/python3.11/site-packages/torch/x.py, line 3")
    assert scrubbed == "File <site-packages>/torch/x.py, line 3" and not MACHINE_PATH.search(scrubbed)


def test_scrub_replaces_the_cache_folder_wherever_it_lies(monkeypatch):
    # a make-reproduce pass with LALORA_CACHE=/work/cache2 (empty, to time it) stored the backbone's
    # "cached in /work/cache2/..." line in nine committed notebooks
    monkeypatch.setenv("LALORA_CACHE", "/work/cache2/")
    text = scrub_text("lalora: pretraining ...; cached in /work/cache2/digits-swin-backbone-65a8.pt\n", "/work/repo")
    assert text == "lalora: pretraining ...; cached in $LALORA_CACHE/digits-swin-backbone-65a8.pt\n"
    assert not ABSOLUTE.search(text)


def test_clean_executed_notebook_rewrites_outputs_in_place(tmp_path):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("x")
    cell.outputs = [nbformat.v4.new_output("stream", name="stderr", text=TQDM_WARNING),
                    nbformat.v4.new_output("stream", name="stdout", text=f"saved {tmp_path}/fig.png\n"),
                    nbformat.v4.new_output("execute_result", data={"text/plain": "42"}, execution_count=1)]
    nb.cells.append(cell)
    nb.metadata["papermill"] = {"input_path": str(tmp_path / "src.ipynb"), "output_path": str(tmp_path / "nb.ipynb")}
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    assert clean_executed_notebook(path, root=tmp_path)
    cleaned = nbformat.read(path, as_version=4)
    outs = cleaned.cells[0].outputs
    assert [o["output_type"] for o in outs] == ["stream", "execute_result"]
    assert outs[0]["text"] == "saved ./fig.png\n" and outs[1]["data"]["text/plain"] == "42"
    assert cleaned.metadata["papermill"] == {"input_path": "./src.ipynb", "output_path": "./nb.ipynb"}
    assert not clean_executed_notebook(path, root=tmp_path)   # idempotent
    json.loads(path.read_text())


COMMITTED_FILES = sorted(p for profile in ("offline", "offline-full", "evidence") for p in (ROOT / "results" / profile).rglob("*")
                         if p.suffix in (".json", ".ipynb"))
# an absolute path as a JSON string or inside one (a run folder, an injected runs_dir parameter)
ABSOLUTE = re.compile(r'"(/[A-Za-z0-9_.-]+){2,}|[\s(\'"]/(work|tmp|root|home|Users|var|opt|mnt)/')


@pytest.mark.parametrize("path", COMMITTED_FILES, ids=[f"{p.parent.name}/{p.name}" for p in COMMITTED_FILES])
def test_committed_results_hold_no_absolute_path(path):
    # a pass with --runs-dir /elsewhere/runs once wrote "/work/full/runs/..." into run_dir and the
    # notebooks' parameters; results must not reveal where the cache lived: produce committed results
    # with the default, repository-relative runs dir (a `runs` link to a cache elsewhere will do)
    hit = ABSOLUTE.search(path.read_text())
    assert not hit, f"{path.relative_to(ROOT)}: absolute path {hit.group(0)!r}"


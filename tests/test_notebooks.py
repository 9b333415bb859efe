"""The notebook pipeline: the runner (lalora.notebooks) on tiny fake notebooks, every notebook of
issue 6 executed once in the ``ci`` profile through the runner (asserting on the JSON each one
writes), and every ``paper`` profile resolving with ``--prepare-only``.
"""
from __future__ import annotations

import json
import math
import os
import textwrap
from pathlib import Path

import pytest

from lalora import notebooks as nbr

REPO = Path(__file__).resolve().parents[1]
MINE = ["00_quickstart", "01_main_vision", "02_main_language", "03_ablation", "04_privacy_utility",
        "05_heterogeneity", "10_report"]


# ------------------------------------------------------------------------------------------------
# Runner on fake notebooks (fast: four kernel starts)
# ------------------------------------------------------------------------------------------------
NB_HEADER = '# %% tags=["parameters"]\nprofile = "ci"\noutput_dir = "results/ci"\nruns_dir = "runs"\n'


def _fake_repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "lalora").mkdir(parents=True)
    nbdir = root / "notebooks"
    (nbdir / "params" / "ci").mkdir(parents=True)
    (nbdir / "params" / "paper").mkdir(parents=True)
    body = NB_HEADER + 'x = 1\n\n# %%\nimport json, os, pathlib\npathlib.Path(output_dir).mkdir(parents=True, exist_ok=True)\n'
    (nbdir / "01_first.py").write_text(
        body + 'json.dump({"x": x, "profile": profile, "cwd": os.getcwd(), "runs_dir": runs_dir}, '
               'open(f"{output_dir}/01_first.json", "w"))\n')
    (nbdir / "02_broken.py").write_text(body + 'raise RuntimeError("boom in cell two")\n')
    (nbdir / "03_third.py").write_text(body + 'open(f"{output_dir}/03_third.json", "w").write("{}")\n')
    (nbdir / "00_zreport.py").write_text(body.replace("x = 1", "") +
        'import glob\njson.dump(sorted(glob.glob(f"{output_dir}/0*.json")), open(f"{output_dir}/seen.json", "w"))\n')
    (nbdir / "00_zreport.py").rename(nbdir / "00_z_report.py")
    (nbdir / "notes.py").write_text("raise SystemExit('not a notebook')\n")
    (nbdir / "params" / "ci" / "01_first.yaml").write_text("x: 41\n")
    for name in ("02_broken", "03_third", "00_z_report"):   # a profile runs the notebooks it names
        (nbdir / "params" / "ci" / f"{name}.yaml").write_text("{}\n")
    (nbdir / "params" / "paper" / "01_first.yaml").write_text("x: 7\ntypo_param: 3\n")
    return root


def test_discover_orders_reports_last(tmp_path):
    root = _fake_repo(tmp_path)
    names = [p.stem for p in nbr.discover(root / "notebooks")]
    assert names == ["01_first", "02_broken", "03_third", "00_z_report"]
    assert [p.stem for p in nbr.select(nbr.discover(root / "notebooks"), ["03", "first"])] == ["01_first", "03_third"]
    with pytest.raises(ValueError, match="only: no notebook named 'nope'"):
        nbr.select(nbr.discover(root / "notebooks"), ["nope"])


def test_unknown_parameter_names_file_and_key(tmp_path):
    root = _fake_repo(tmp_path)
    summary = nbr.run_notebooks("paper", root=root, only=["01_first"], prepare_only=True, echo=lambda *_: None)
    [outcome] = summary.outcomes
    assert outcome.status == "failed"
    assert "typo_param" in outcome.error and "01_first.yaml" in outcome.error


def test_runner_keeps_going_and_names_the_failure(tmp_path):
    root = _fake_repo(tmp_path)
    lines: list[str] = []
    # two notebooks at once (the one-at-a-time path runs in test_jobs_2_gives_the_results_of_jobs_1):
    # the report notebook still starts only after all the others finished
    summary = nbr.run_notebooks("ci", root=root, output_dir="out/ci", runs_dir="cache/runs", quiet=True,
                                jobs=2, echo=lines.append)
    status = {o.name: o.status for o in summary.outcomes}
    assert status == {"01_first": "ok", "02_broken": "failed", "03_third": "ok", "00_z_report": "ok"}
    [failed] = summary.failed
    assert "RuntimeError" in failed.error and "boom in cell two" in failed.error
    text = "\n".join(lines)
    assert "[02_broken] FAILED" in text and "failed: 02_broken" in text
    # Parameters injected from the YAML plus the runner's; cwd = repository root.
    out = json.loads((root / "out/ci/01_first.json").read_text())
    # The runner's last cell stamps the kernel's provenance into the notebook's JSON (issue 19).
    provenance = out.pop("provenance")
    assert len(provenance["git"]["commit"]) == 40 and provenance["cpu"]["float_flags"] is not None
    assert provenance["threads"]["torch_intra_op"] >= 1
    assert out == {"x": 41, "profile": "ci", "cwd": str(root), "runs_dir": "cache/runs"}
    # The report notebook ran last and saw the others' results.
    assert json.loads((root / "out/ci/seen.json").read_text()) == ["out/ci/01_first.json", "out/ci/03_third.json"]
    assert (root / "out/ci/notebooks/02_broken.ipynb").exists()
    produced = json.loads((root / "out/ci/notebooks/runner_summary.json").read_text())
    assert produced["profile"] == "ci"
    # what made the results: the command and the code version (committed results name them)
    assert produced["command"].startswith("lalora notebooks --profile ci")
    assert set(produced["code"]) == {"commit", "dirty"}


# Two notebooks training tiny federated runs through run_grid, both starting with the same runs: with
# both at once, a shared run is trained by whichever gets its lock first and read by the other.
GRID_NB = NB_HEADER + textwrap.dedent('''
    grid = []

    # %%
    import json, pathlib, sys
    # the fake repo's empty lalora/ folder (find_repo_root needs one) sits in the kernel's cwd and
    # would be imported as a namespace package ahead of an editable install: the real one first
    sys.path[:0] = ["@REPO@", "@TESTS@"]
    from test_federated import tiny_task
    from lalora.nbtools import run_grid
    from lalora.tasks import TASKS
    TASKS.setdefault("tiny", lambda **kw: tiny_task())
    base = {"task": "tiny", "rounds": 2, "epsilon": 3.0, "task_overrides": {}}
    records = run_grid(base, [{"method": m} for m in grid], [0, 1], runs_dir, echo=None)
    pathlib.Path(output_dir).mkdir(parents=True, exist_ok=True)
    json.dump(records, open(f"{output_dir}/@NAME@.json", "w"))
    ''')


def _grid_repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "lalora").mkdir(parents=True)
    nbdir = root / "notebooks"
    (nbdir / "params" / "ci").mkdir(parents=True)
    grids = {"01_a": ["la-lora", "dp-lora"], "02_b": ["la-lora", "ffa-lora"]}
    for name, grid in grids.items():
        (nbdir / f"{name}.py").write_text(GRID_NB.replace("@TESTS@", str(REPO / "tests")).replace("@REPO@", str(REPO)).replace("@NAME@", name))
        (nbdir / "params" / "ci" / f"{name}.yaml").write_text(f"grid: {json.dumps(grid)}\n")
    return root


def _without_timing(obj):
    """Drop what measures time or names a folder: everything else must be bitwise equal."""
    volatile = {"cached", "wall_time_s", "round_s", "elapsed_s", "run_dir", "provenance", "seconds"}
    if isinstance(obj, dict):
        return {k: _without_timing(v) for k, v in obj.items() if k not in volatile}
    if isinstance(obj, list):
        return [_without_timing(v) for v in obj]
    return obj


def _run_folders(runs: Path) -> dict[str, object]:
    from lalora.results import read_jsonl

    out = {}
    for final in sorted(runs.rglob("final.json")):
        folder = final.parent
        out[str(folder.relative_to(runs))] = _without_timing({
            "final": json.loads(final.read_text()), "config": json.loads((folder / "config.json").read_text()),
            "metrics": read_jsonl(folder / "metrics.jsonl")})
    return out


def test_jobs_2_gives_the_results_of_jobs_1(tmp_path):
    """Issue 30: notebooks executed side by side (--jobs 2) produce, bit for bit, the runs and the
    records one-at-a-time execution produces; runs two notebooks share are trained once."""
    root = _grid_repo(tmp_path)
    results = {}
    for jobs in (1, 2):
        summary = nbr.run_notebooks("ci", root=root, output_dir=f"out{jobs}", runs_dir=f"runs{jobs}", quiet=True,
                                    jobs=jobs, echo=lambda *_: None)
        assert not summary.failed, nbr.format_summary(summary)
        assert [o.name for o in summary.outcomes] == ["01_a", "02_b"] and summary.jobs == jobs
        written = json.loads((root / f"out{jobs}/notebooks/runner_summary.json").read_text())
        assert written["jobs"] == jobs and written["wall_seconds"] > 0
        records = {name: json.loads((root / f"out{jobs}/{name}.json").read_text()) for name in ("01_a", "02_b")}
        folders = _run_folders(root / f"runs{jobs}")
        results[jobs] = (_without_timing(records), folders)
        assert len(folders) == 3 * 2   # 3 methods x 2 seeds, each trained once however many notebooks asked
        # every record of the shared runs names one folder, the one the finished run is in
        trained = {r["run_dir"] for recs in records.values() for r in recs}
        assert len(trained) == 6 and all((root / d / "final.json").is_file() for d in trained)
    assert results[2] == results[1]


def test_cli_exit_code(tmp_path, monkeypatch):
    from lalora.cli import main

    root = _fake_repo(tmp_path)
    monkeypatch.chdir(root)
    assert main(["notebooks", "--profile", "ci", "--only", "03_third", "--quiet"]) == 0
    assert main(["notebooks", "--profile", "ci", "--only", "02", "--quiet"]) == 1
    assert main(["notebooks", "--list"]) == 0


def test_ensure_kernel_points_at_this_interpreter():
    import sys

    from jupyter_client.kernelspec import KernelSpecManager

    name = nbr.ensure_kernel()
    spec = KernelSpecManager().get_kernel_spec(name)
    exe = spec.argv[0]
    assert exe in ("python", "python3") or Path(exe).resolve() == Path(sys.executable).resolve()


# ------------------------------------------------------------------------------------------------
# The real notebooks, ci profile, executed once per test session
# ------------------------------------------------------------------------------------------------
# The analysis notebooks' assertions live in test_notebooks_analysis.py; they share this one execution:
# one run cache (the runs 11 shares with 01-05 train once) and the notebooks side by side on every core
# (this was the default suite's longest part: 12 notebooks, each analysis notebook in its own runner call).
ANALYSIS = ["06_sharpness", "07_client_alignment", "08_noise_amplification", "09_theorem_checks",
            "11_reviewer_questions", "12_privacy_audit"]
CI_NOTEBOOKS = MINE + ANALYSIS
_CI_RUN: dict = {}


def ci_run(tmp_path_factory) -> tuple:
    """(summary, results folder) of the ci profile's CI_NOTEBOOKS, executed at the first call."""
    if "run" in _CI_RUN:
        return _CI_RUN["run"]
    reuse = os.environ.get("LALORA_TEST_REUSE_CI_RESULTS")
    if reuse:  # debugging the assertions: read an earlier `lalora notebooks --profile ci` output
        out = Path(reuse)
        data = json.loads((out / "notebooks" / "runner_summary.json").read_text())
        summary = nbr.RunSummary("ci", [nbr.NotebookOutcome(**o) for o in data["notebooks"]
                                        if o["name"] in CI_NOTEBOOKS])
    else:
        tmp = tmp_path_factory.mktemp("nb_ci")
        out = tmp / "results" / "ci"
        summary = nbr.run_notebooks("ci", root=REPO, only=CI_NOTEBOOKS, output_dir=out, runs_dir=tmp / "runs",
                                    quiet=True, jobs=nbr.default_jobs())
    _CI_RUN["run"] = (summary, out)
    return _CI_RUN["run"]


@pytest.fixture(scope="module")
def ci_results(tmp_path_factory):
    return ci_run(tmp_path_factory)


def _load(out: Path, name: str) -> dict:
    path = out / f"{name}.json"
    assert path.exists(), f"{name} wrote no {path.name}"
    return json.loads(path.read_text())


def _check_table(table, expected_rows, keys=("task", "method", "epsilon")):
    assert len(table) == expected_rows
    assert len({tuple(r[k] for k in keys) for r in table}) == expected_rows
    for r in table:
        assert math.isfinite(r["accuracy_mean"]) and 0.0 <= r["accuracy_mean"] <= 100.0
        assert math.isfinite(r["accuracy_std"]) and r["accuracy_std"] >= 0.0
        assert r["n_seeds"] >= 1
        if r["epsilon"] != "inf":
            # The ε the most-used client spent never exceeds the target (tolerance: accountant rounding).
            assert r["epsilon_spent"] <= float(r["epsilon"]) + 1e-6, r
            assert r["noise_multiplier"] > 0


def _params(name: str) -> dict:
    import yaml

    return yaml.safe_load((REPO / "notebooks/params/ci" / f"{name}.yaml").read_text()) or {}


def test_ci_all_notebooks_succeed(ci_results):
    summary, out = ci_results
    assert sorted(o.name for o in summary.outcomes) == sorted(CI_NOTEBOOKS)
    assert summary.outcomes[-1].name == "10_report"   # the report notebook ran after the others
    assert not summary.failed, nbr.format_summary(summary)
    for name in CI_NOTEBOOKS:
        assert (out / "notebooks" / f"{name}.ipynb").exists()


def test_ci_quickstart(ci_results):
    data = _load(ci_results[1], "00_quickstart")
    s = data["summary"]
    assert s["epsilon_spent"] <= s["target_epsilon"] + 1e-6
    assert s["noise_multiplier"] > 0 and math.isfinite(s["final_accuracy"])
    assert len(data["curve"]["round"]) == s["rounds"]
    assert all(e <= s["target_epsilon"] + 1e-6 for e in data["per_client_epsilon"])
    assert (ci_results[1] / "figures" / "00_quickstart_curve.png").exists()


@pytest.mark.parametrize("name", ["01_main_vision", "02_main_language"])
def test_ci_main_tables(ci_results, name):
    p = _params(name)
    data = _load(ci_results[1], name)
    ref = 1 if p.get("reference_method", "fedavg-lora") else 0
    _check_table(data["table"], len(p["tasks"]) * (len(p["methods"]) * len(p["epsilons"]) + ref))
    assert data["summary"]["max_epsilon_spent_minus_target"] <= 1e-6
    assert all(r["n_seeds"] == len(p["seeds"]) for r in data["table"])
    assert (ci_results[1] / "figures" / f"{name}_bars.pdf").exists()


def test_ci_ablation(ci_results):
    p = _params("03_ablation")
    data = _load(ci_results[1], "03_ablation")
    _check_table(data["table"], len(p["tasks"]) * len(p["arms"]) * len(p["epsilons"]))
    assert {r["method"] for r in data["table"]} == set(p["arms"])
    # The four arms are four different runs (the filter flag reached the config).
    runs = {r["run_dir"] for r in data["runs"]}
    assert len(runs) == len(data["runs"])
    for effects in data["effects"].values():
        assert all(math.isfinite(v) for v in effects.values())


def test_ci_privacy_utility(ci_results):
    p = _params("04_privacy_utility")
    data = _load(ci_results[1], "04_privacy_utility")
    _check_table(data["table"], len(p["methods"]) * len(p["epsilons"]))
    # Smaller ε -> more noise.
    for m in p["methods"]:
        sig = sorted((float(r["epsilon"]), r["noise_multiplier"]) for r in data["table"]
                     if r["method"] == m and r["epsilon"] != "inf")
        assert all(a[1] > b[1] for a, b in zip(sig, sig[1:])), sig


def test_ci_heterogeneity(ci_results):
    p = _params("05_heterogeneity")
    data = _load(ci_results[1], "05_heterogeneity")
    _check_table(data["table"], len(p["methods"]) * len(p["betas"]), keys=("method", "beta"))
    hists = data["histograms"]
    assert len(hists) == len(p["heatmap_betas"])
    for h in hists.values():
        assert min(sum(row) for row in h) >= 1  # every client holds data
    # Smaller β -> more skewed clients.
    shares = sorted((float(b), v) for b, v in
                    ((k.split("=")[1].rstrip("]"), v) for k, v in data["summary"].items()
                     if k.startswith("largest_class_share")))
    assert shares[0][1] >= shares[-1][1]


def test_ci_report(ci_results):
    out = ci_results[1]
    data = _load(out, "10_report")
    text = (out / "REPORT.md").read_text()
    for name in MINE[:-1]:
        assert f"### {name}" in text
    assert "60.07" in text  # a reported number is beside the reproduced ones
    assert data["summary"]["profiles"] == ["ci"]


# ------------------------------------------------------------------------------------------------
# Paper profile: every notebook's parameters resolve (no data, no GPU needed)
# ------------------------------------------------------------------------------------------------
def test_paper_profiles_prepare(tmp_path):
    summary = nbr.run_notebooks("paper", root=REPO, output_dir=tmp_path / "paper", prepare_only=True,
                                echo=lambda *_: None)
    assert not summary.failed, nbr.format_summary(summary)
    names = {o.name for o in summary.outcomes}
    assert set(MINE) <= names
    for name in MINE:
        yaml_path = REPO / "notebooks/params/paper" / f"{name}.yaml"
        assert yaml_path.exists(), f"{name} has no paper profile"
        nb = json.loads((tmp_path / "paper/notebooks" / f"{name}.ipynb").read_text())
        assert any("injected-parameters" in c["metadata"].get("tags", []) for c in nb["cells"])


def test_a_profile_runs_only_the_notebooks_it_names(tmp_path):
    """A notebook without a parameter file in a profile that has them (14 in offline-full) is skipped
    by name, not run at its own defaults; a profile with no parameter file at all runs everything."""
    root = _fake_repo(tmp_path)
    (root / "notebooks" / "params" / "ci" / "03_third.yaml").unlink()
    lines: list[str] = []
    summary = nbr.run_notebooks("ci", root=root, output_dir="out/ci", runs_dir="runs", quiet=True,
                                prepare_only=True, echo=lines.append)
    assert [o.name for o in summary.outcomes] == ["01_first", "02_broken", "00_z_report"]
    assert any("[03_third] not in the ci profile" in line for line in lines)
    for yaml in (root / "notebooks" / "params" / "paper").glob("*.yaml"):
        yaml.unlink()
    summary = nbr.run_notebooks("paper", root=root, output_dir="out/p", runs_dir="runs", quiet=True,
                                prepare_only=True, echo=lines.append)
    assert len(summary.outcomes) == 4

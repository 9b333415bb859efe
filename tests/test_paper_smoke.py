"""The paper-smoke profile: the paper's models and shapes on generated inputs.

Fast: the profile resolves, the smoke tasks carry the paper's shapes and settings by default, and
the projection arithmetic of benchmarks/paper_projection.py. Slow: every notebook of the profile
executes on the CPU at LALORA_SMOKE_SIZE=cpu, and the projection script measures and projects."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lalora.notebooks as nbr
from lalora.tasks import get_task, list_tasks

REPO = Path(__file__).resolve().parents[1]


def _projection_module():
    spec = importlib.util.spec_from_file_location("paper_projection", REPO / "benchmarks" / "paper_projection.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_tasks_are_registered_and_the_profile_resolves(tmp_path):
    assert {"smoke-swin-t", "smoke-swin-b", "smoke-roberta-base"} <= set(list_tasks())
    summary = nbr.run_notebooks("paper-smoke", root=REPO, output_dir=tmp_path / "ps", prepare_only=True,
                                echo=lambda *_: None)
    assert not summary.failed, nbr.format_summary(summary)
    # every notebook the profile names (14, the tuned protocol of the evidence profile, is not one)
    assert len(summary.outcomes) == len(list((REPO / "notebooks" / "params" / "paper-smoke").glob("[0-9][0-9]_*.yaml")))
    assert {o.name for o in summary.outcomes} >= {p.stem for p in (REPO / "notebooks").glob("[0-9][0-9]_*.py")} - {"14_tuned_main"}
    assert nbr.check_paths("paper-smoke", root=REPO) == []   # nothing to download or place


def test_smoke_tasks_default_to_the_paper_shapes(monkeypatch):
    monkeypatch.delenv("LALORA_SMOKE_SIZE", raising=False)
    from lalora.tasks.paper import paper_task_defaults

    t = get_task("smoke-swin-b", test_size=4)
    assert len(t.train) == 8 * 500 and t.info["image_size"] == 224 and t.info["model_kwargs"] == {}
    assert t.info["model"] == "swin_base_patch4_window7_224" and t.num_classes == 100
    assert t.train.batch([0])["pixel_values"].shape == (1, 3, 224, 224)
    assert t.defaults == paper_task_defaults("cifar100-swin-b")     # K = 20, 500 per client, SGD, ...
    r = get_task("smoke-roberta-base", samples_per_client=2, test_size=2)
    assert r.info["num_layers"] == 12 and r.info["max_len"] == 128
    assert r.train[0]["input_ids"].shape == (128,) and int(r.train[0]["input_ids"][0]) == 0  # <s>
    lang = paper_task_defaults("sst2-roberta")
    assert {k: v for k, v in r.defaults.items() if k != "samples_per_client"} == \
        {k: v for k, v in lang.items() if k != "samples_per_client"}
    monkeypatch.setenv("LALORA_SMOKE_SIZE", "huge")
    with pytest.raises(ValueError, match="LALORA_SMOKE_SIZE='huge'"):
        get_task("smoke-swin-t")


def test_projection_arithmetic():
    import yaml

    mod = _projection_module()
    params = yaml.safe_load((REPO / "notebooks/params/paper/01_main_vision.yaml").read_text())
    runs = mod.grid_runs(params)
    # 4 model x data pairs x (4 methods x 3 eps + 1 non-private reference) x 3 seeds
    assert len(runs) == 4 * (4 * 3 + 1) * 3
    timing = {(mod.SMOKE_OF[r["task"]], r["method"], "fp32"): {"step_s": 0.5, "eval_item_s": 0.001} for r in runs}
    timing[("smoke-swin-b", "la-lora", "fp32")] = {"step_s": 2.0, "eval_item_s": 0.004}
    p = mod.project(runs, timing, rounds=100, local_steps=20, clients_per_round=4, eval_every=1, precision="fp32")
    swin_b_la = sum(r["task"].endswith("swin-b") and r["method"] == "la-lora" for r in runs)   # 2 data x 3 eps x 3 seeds
    assert swin_b_la == 18
    want_train = (len(runs) - swin_b_la) * 100 * 20 * 4 * 0.5 + swin_b_la * 100 * 20 * 4 * 2.0
    want_eval = (len(runs) - swin_b_la) * 100 * 10_000 * 0.001 + swin_b_la * 100 * 10_000 * 0.004
    assert p["train_s"] == pytest.approx(want_train) and p["eval_s"] == pytest.approx(want_eval)
    assert p["evaluations_per_run"] == 100
    assert mod.project(runs, timing, rounds=100, local_steps=20, clients_per_round=4, eval_every=30,
                       precision="fp32")["evaluations_per_run"] == 4       # rounds 30, 60, 90 and the last


def _env(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "kernels" / "src"), str(REPO)]),
               LALORA_SMOKE_SIZE="cpu", LALORA_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", CI="true")
    env.pop("LALORA_KILL_AFTER_ROUND", None)
    return env


@pytest.mark.slow
@pytest.mark.timeout(5400)  # 13 notebooks (before notebook 13 was added): 620 s (load 4) to 1,744 s (load 14) measured on a 2-core CPU
def test_paper_smoke_profile_runs_every_notebook_on_cpu(tmp_path):
    out = tmp_path / "results" / "paper-smoke"
    proc = subprocess.run([sys.executable, "-m", "lalora.cli", "notebooks", "--profile", "paper-smoke",
                           "--output-dir", str(out), "--runs-dir", str(tmp_path / "runs"), "--quiet"],
                          cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=5400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "notebooks" / "runner_summary.json").read_text())
    every = sorted(p.stem for p in (REPO / "notebooks").glob("[0-9][0-9]_*.py"))   # 14 since notebook 13
    assert [o["status"] for o in summary["notebooks"]] == ["ok"] * len(every)
    main = json.loads((out / "01_main_vision.json").read_text())
    text = json.dumps(main)
    for task in ("smoke-swin-t", "smoke-swin-b"):
        for method in ("dp-lora", "ffa-lora", "rolora", "la-lora", "fedavg-lora"):
            assert task in text and method in text
    assert (out / "REPORT.md").exists() and not (REPO / "results" / "paper-smoke").exists()


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_projection_script_measures_and_projects_on_cpu(tmp_path):
    out, js = tmp_path / "proj.md", tmp_path / "proj.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "paper_projection.py"), "--grids", "language",
                           "--rounds", "2", "--out", str(out), "--json", str(js)],
                          cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(js.read_text())
    assert {t["method"] for t in data["timing"]} == {"dp-lora", "ffa-lora", "rolora", "la-lora", "fedavg-lora"}
    assert all(t["step_s"] > 0 and t["eval_item_s"] > 0 and t["rounds_timed"] == 1 for t in data["timing"])
    (proj,) = data["projections"]
    assert proj["runs"] == 3 * (4 * 3 + 1) * 3 and math.isfinite(proj["total_s"]) and proj["total_s"] > 0
    text = out.read_text()
    assert "| language | fp32 | 117 |" in text and "machinery check" in text

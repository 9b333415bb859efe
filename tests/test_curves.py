"""Per-round curves read from run folders (lalora.curves): the numbers of metrics.jsonl, compact and
strict-JSON, one per run folder; a real finished run's curve matches its final accuracy."""
import json
import math

import pytest

from lalora import curves
from lalora.results import RunDir, atomic_write_json


def _fake_run(root, method, digest, metrics, finished=True):
    rd = RunDir.for_config(root, "digits-swin", method, digest)
    rd.path.mkdir(parents=True)
    for m in metrics:
        rd.append_metrics(m)
    if finished:
        atomic_write_json(rd.final_path, {"accuracy": metrics[-1].get("test_accuracy")})
    return str(rd.path)


def test_curve_from_metrics_is_compact_and_keeps_unevaluated_rounds():
    metrics = [{"round": 1, "train_loss": 2.302585093, "test_accuracy": 0.123456, "test_loss": 2.2},
               {"round": 2, "train_loss": 1.5, "lr": 0.1},                        # not evaluated
               {"round": 3, "train_loss": float("nan"), "test_accuracy": 0.5, "test_loss": float("inf")}]
    c = curves.curve_from_metrics(metrics)
    assert c == {"round": [1, 2, 3], "train_loss": [2.303, 1.5, None], "test_accuracy": [12.35, None, 50.0]}
    json.dumps(c, allow_nan=False)   # strict JSON
    assert curves.final_train_loss(c) == 1.5
    assert math.isnan(curves.final_train_loss({"train_loss": [None]}))


def test_run_curves_reads_each_folder_once_and_refuses_unfinished(tmp_path):
    a = _fake_run(tmp_path, "dp-lora", "aaa", [{"round": 1, "train_loss": 2.0, "test_accuracy": 0.1}])
    b = _fake_run(tmp_path, "la-lora", "bbb", [{"round": 1, "train_loss": 1.0, "test_accuracy": 0.7},
                                               {"round": 2, "train_loss": 0.5, "test_accuracy": 0.8}])
    records = [{"run_dir": a, "seed": 0}, {"run_dir": b, "seed": 0}, {"run_dir": b, "seed": 0}, {"seed": 1}]
    out = curves.run_curves(records)
    assert set(out) == {"dp-lora/aaa", "la-lora/bbb"}
    assert out["la-lora/bbb"]["test_accuracy"] == [70.0, 80.0]
    c = _fake_run(tmp_path, "rolora", "ccc", [{"round": 1, "train_loss": 1.0}], finished=False)
    with pytest.raises(FileNotFoundError, match="no finished run"):
        curves.run_curves([{"run_dir": c}])


def test_curves_figure_draws_one_column_per_epsilon(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    recs, cs = [], {}
    for eps in (1.0, 3.0):
        for method in ("dp-lora", "la-lora"):
            for seed in (0, 1):
                rd = _fake_run(tmp_path, method, f"{method}-{eps}-{seed}",
                               [{"round": t, "train_loss": 2.0 / t, "test_accuracy": 0.1 * t} for t in (1, 2, 3)])
                recs.append({"run_dir": rd, "method": method, "epsilon": eps, "seed": seed})
    cs = curves.run_curves(recs)
    fig = curves.curves_figure(recs, cs, chance_loss=math.log(10))
    axes = fig.get_axes()
    assert len(axes) == 4
    assert axes[0].get_title() == "ε = 1.0" and axes[1].get_title() == "ε = 3.0"
    # per panel: 2 methods x (2 seeds + 1 mean)
    assert len(axes[0].get_lines()) == 6


@pytest.mark.slow
def test_a_real_runs_curve_matches_its_final_accuracy(tmp_path, monkeypatch):
    from lalora.config import RunConfig
    from lalora.federated.runs import run_experiment

    monkeypatch.setenv("LALORA_CACHE", str(tmp_path / "cache"))
    cfg = RunConfig(task="digits-swin", method="dp-lora", epsilon=3.0, rounds=2, local_steps=2,
                    task_overrides={"max_train_samples": 200, "pretrain_epochs": 1})
    res = run_experiment(cfg, runs_dir=tmp_path / "runs", progress=False)
    c = curves.run_curve(res.run_dir)
    assert c["round"] == [1, 2]
    assert c["test_accuracy"][-1] == round(100 * res.final["accuracy"], 2)
    assert c["train_loss"] == [float(f"{m['train_loss']:.4g}") for m in res.metrics]

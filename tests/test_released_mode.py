"""`dp_mode = "as-released"`: the federated loop runs the authors' released step (batch-mean gradient,
data-dependent per-tensor clip, fixed-size batches) instead of DP-SGD, claims no ε, and says
"NOT differentially private" in the run folder name, config.json, every metrics record, final.json,
the CLI's last line, the notebook records and the figures that use it."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_federated import tiny_config, tiny_task  # noqa: E402

from lalora.config import NOT_DP, RunConfig  # noqa: E402
from lalora.federated.runs import run_experiment
from lalora.federated.simulation import Simulator  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def test_config_field_validated():
    assert RunConfig(task="t", method="la-lora").dp_mode == "dp"
    with pytest.raises(ValueError, match="dp_mode must be one of dp, as-released"):
        RunConfig(task="t", method="la-lora", dp_mode="released")
    with pytest.raises(ValueError, match="dp_mode 'as-released' needs a private method"):
        RunConfig(task="t", method="la-lora", epsilon="inf", dp_mode="as-released")
    with pytest.raises(ValueError, match="dp_mode 'as-released' needs a private method"):
        RunConfig(task="t", method="fedavg-lora", dp_mode="as-released")
    assert RunConfig.from_dict(RunConfig(task="t", method="dp-lora", dp_mode="as-released").to_dict()
                               ).dp_mode == "as-released"


def test_client_uses_released_step_with_fixed_batches(monkeypatch):
    """Every local step calls as_released_gradient (never dp_gradient) on a batch of exactly b."""
    import lalora.privacy.dp_step as dp_step

    calls = {"released": [], "dp": 0}
    real = dp_step.as_released_gradient

    def spy(model, loss_fn, batch, **kw):
        out = real(model, loss_fn, batch, **kw)
        calls["released"].append((int(batch["labels"].shape[0]), out.clip_norm, kw["noise_multiplier"]))
        return out

    def no_dp(*a, **k):
        calls["dp"] += 1
        raise AssertionError("dp_gradient must not run in as-released mode")

    monkeypatch.setattr(dp_step, "as_released_gradient", spy)
    monkeypatch.setattr(dp_step, "dp_gradient", no_dp)
    cfg = tiny_config("dp-lora", dp_mode="as-released", batch_size=5, rounds=1)
    sim = Simulator(cfg, task=tiny_task())
    real_sim = Simulator(tiny_config("dp-lora", batch_size=5, rounds=1), task=tiny_task())
    assert sim.noise_multiplier == real_sim.noise_multiplier > 0   # σ: what real DP at ε would use
    state = sim.initial_global_state()
    # the round path (client batching is on by default) must run the released step, not batched DP
    assert sim.cfg.client_batching and not sim.client_batching
    ups = sim.clients_update(sim.sampled_clients(1), 1, state)
    assert calls["dp"] == 0 and len(calls["released"]) == len(ups) * sim.cfg.local_steps
    assert all(b == 5 for b, _, _ in calls["released"])                # fixed size, not Poisson
    assert all(0 < c <= 0.4 for _, c, _ in calls["released"])          # data-dependent clip, capped
    assert all(s == sim.noise_multiplier for _, _, s in calls["released"])
    assert all(u.metrics["batch_sizes"] == [5] * sim.cfg.local_steps for u in ups)
    # the ledger counts steps but claims no ε
    assert sim.ledger.steps(ups[0].client_id) == sim.cfg.local_steps
    assert math.isnan(sim.client_epsilon(ups[0].client_id))
    summary = sim.privacy_summary()
    assert summary["privacy"] == NOT_DP and math.isnan(summary["epsilon_spent"])
    assert all(math.isnan(e) for e in summary["per_client_epsilon"])


def test_run_labels_everywhere_and_differs_from_dp(tmp_path):
    cfg = tiny_config("la-lora", dp_mode="as-released", rounds=2)
    res = run_experiment(cfg, runs_dir=tmp_path, task=tiny_task(), progress=False)
    run_dir = Path(res.run_dir)
    assert run_dir.name.endswith("-NOT-DP")
    config = json.loads((run_dir / "config.json").read_text())
    assert config["dp_mode"] == "as-released" and config["privacy"] == NOT_DP
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(m["privacy"] == NOT_DP and m["epsilon_spent"] == "nan" for m in metrics)
    final = json.loads((run_dir / "final.json").read_text())
    assert final["privacy"] == NOT_DP and final["private"] is False and final["dp_mode"] == "as-released"
    assert final["epsilon_spent"] == "nan" and final["target_epsilon"] == "nan"
    assert all(e == "nan" for e in final["per_client_epsilon"])
    assert final["sigma_from_epsilon"] == 3.0 and final["noise_multiplier"] > 0
    # the real-DP run of the same config lives elsewhere and claims its ε
    dp = run_experiment(tiny_config("la-lora", rounds=2), runs_dir=tmp_path, task=tiny_task(), progress=False)
    assert dp.run_dir != res.run_dir and not Path(dp.run_dir).name.endswith("NOT-DP")
    assert "privacy" not in dp.final and dp.final["epsilon_spent"] <= 3.0 + 1e-9
    assert dp.final["accuracy"] != res.final["accuracy"] or dp.metrics[0]["train_loss"] != res.metrics[0]["train_loss"]


def test_cli_flag_and_last_line(tmp_path, capsys, monkeypatch):
    from lalora.cli import main
    from lalora.tasks import TASKS

    monkeypatch.setitem(TASKS, "tiny", lambda: tiny_task())
    argv = ["run", "--task", "tiny", "--method", "rolora", "--epsilon", "2", "--rounds", "1",
            "--runs-dir", str(tmp_path), "--quiet", "--dp-mode", "as-released"]
    assert main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "NOT differentially private" in last and "NOT-DP" in last and "epsilon spent" not in last
    assert main(argv[:-2] + ["--dp-mode", "as-released", "--epsilon", "inf"]) == 2
    assert "dp_mode 'as-released' needs a private method" in capsys.readouterr().err
    assert main(argv + ["--engine", "flower"]) == 2
    assert "--engine inprocess" in capsys.readouterr().err


def test_grid_records_and_figure_carry_the_label(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lalora import nbtools as nbr
    from lalora.plotting import grouped_bars
    from lalora.tasks import TASKS

    monkeypatch.setitem(TASKS, "tiny", lambda **kw: tiny_task())
    base = {"task": "tiny", "rounds": 1, "task_overrides": {}}
    recs = nbr.run_grid(base, [{"method": "dp-lora", "epsilon": 3.0, "dp_mode": "as-released"},
                               {"method": "dp-lora", "epsilon": 3.0}], [0], tmp_path, echo=None)
    assert recs[0]["privacy"] == NOT_DP and recs[0]["dp_mode"] == "as-released"
    assert "privacy" not in recs[1] and recs[1]["dp_mode"] == "dp"
    table = nbr.accuracy_table(recs, by=("task", "method", "epsilon", "dp_mode"))
    fig, ax = plt.subplots()
    grouped_bars(ax, [r for r in table if r["dp_mode"] == "as-released"])
    assert any(NOT_DP in t.get_text() for t in ax.texts)
    fig2, ax2 = plt.subplots()
    grouped_bars(ax2, [r for r in table if r["dp_mode"] == "dp"])
    assert not any(NOT_DP in t.get_text() for t in ax2.texts)
    plt.close("all")


@pytest.mark.slow   # a kernel start plus a tiny pretraining: ~30 s CPU, 85 s wall on the shared box
def test_notebook_13_ci_profile(tmp_path, monkeypatch):
    """Notebook 13 through the runner, ci profile: both mechanisms on one paired seed, every
    as-released record and figure labelled, the claims present (one seed: no verdict), and the
    report shows them as NOT differentially private."""
    import yaml

    from lalora import notebooks as nbr
    from lalora import report

    repo = Path(__file__).resolve().parents[1]
    name = "13_released_vs_real"
    monkeypatch.setenv("LALORA_CACHE", str(tmp_path / "cache"))   # the kernel inherits it
    out = tmp_path / "results" / "ci"
    summary = nbr.run_notebooks("ci", root=repo, only=[name], output_dir=out, runs_dir=tmp_path / "runs",
                                quiet=True, echo=lambda *_: None)
    assert not summary.failed, nbr.format_summary(summary)
    params = yaml.safe_load((repo / "notebooks/params/ci" / f"{name}.yaml").read_text())
    data = json.loads((out / f"{name}.json").read_text())
    n_runs = len(params["methods"]) * len(params["mechanisms"]) * len(params["seeds"]) * len(params["epsilons"])
    assert len(data["runs"]) == n_runs and len(data["table"]) == n_runs // len(params["seeds"])
    for r in data["runs"]:
        if r["dp_mode"] == "as-released":
            assert r["privacy"] == NOT_DP and r["run_dir"].endswith("-NOT-DP") and r["epsilon_spent"] == "nan"
        else:
            assert "privacy" not in r and float(r["epsilon_spent"]) <= float(r["epsilon"]) + 1e-6
    assert {(c["dp_mode"], c["claim"]) for c in data["claims"]} == {
        (d, c) for d in params["mechanisms"] for c in ("LA-LoRA > DP-LoRA", "LA-LoRA > RoLoRA")}
    assert all(c["verdict"] == "insufficient seeds" and c["n"] == 1 for c in data["claims"])
    assert len(data["answers"]) == 2 and all("NOT differentially private" in a["text"] for a in data["answers"])
    assert data["summary"]["not_dp_runs"] == n_runs // 2
    for fig in ("13_released_vs_real_claims", "13_released_vs_real_digits-swin_bars"):
        assert (out / "figures" / f"{fig}.png").exists()
    text = report.build_report(tmp_path / "results", repo / "paper" / "reported.yaml", None)
    verdicts = text.split("## Verdicts")[1].split("\n## ")[0]
    assert "dp_mode = as-released (NOT differentially private)" in verdicts


def test_flower_refuses_the_released_mechanism():
    from lalora.flower.run import run_flower
    from lalora.flower.server_app import config_from_run_config

    with pytest.raises(ValueError, match="dp_mode 'as-released' runs only in-process"):
        run_flower(tiny_config("la-lora", dp_mode="as-released"), runs_dir=None, backend="inprocess",
                   task=tiny_task(), progress=False)
    with pytest.raises(ValueError, match="not allowed in a Flower deployment"):
        config_from_run_config({"task": "tiny", "method": "la-lora", "dp-mode": "as-released"})


def test_released_run_resumes_bit_identical(tmp_path, monkeypatch):
    """A released-mode run interrupted right after its round-2 checkpoint and resumed ends exactly as
    an uninterrupted one (the fixed-size batches and released noise come from checkpointed generators)."""
    from lalora.results import RunDir

    cfg = tiny_config("la-lora", dp_mode="as-released", rounds=3, batch_size=8, eval_every=1)
    ref = run_experiment(cfg, runs_dir=tmp_path / "ref", task=tiny_task(num_train=160), progress=False)

    real_save, calls = RunDir.save_checkpoint, []

    def crash_after_round_2(self, payload):
        real_save(self, payload)
        calls.append(payload["round"])
        if payload["round"] == 2:
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(RunDir, "save_checkpoint", crash_after_round_2)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, runs_dir=tmp_path / "b", task=tiny_task(num_train=160), progress=False)
    monkeypatch.setattr(RunDir, "save_checkpoint", real_save)
    res = run_experiment(cfg, runs_dir=tmp_path / "b", task=tiny_task(num_train=160), progress=False)
    strip = lambda rs: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rs]  # noqa: E731
    assert calls == [1, 2] and strip(res.metrics) == strip(ref.metrics)
    assert {k: v for k, v in res.final.items() if not k.endswith("_s")} == \
        {k: v for k, v in ref.final.items() if not k.endswith("_s")}
    assert res.final["privacy"] == NOT_DP

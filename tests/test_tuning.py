"""The tuned protocol (lalora.tuning): the grid is checked, the pick is the validation argmax, the
validation phase scores on the validation split and the test phase on the test split, derived arms
follow their source's pick, and both protocols come out paired by seed."""
import math

import pytest

import lalora.nbtools
from lalora import tuning

LRS = [0.0125, 0.025, 0.05, 0.1, 0.2]


def test_pick_is_the_best_mean_ties_to_the_smaller_step_and_nan_never_wins():
    curve = [{"lr": 0.05, "clip_norm": 1.0, "mean": 60.0}, {"lr": 0.1, "clip_norm": 1.0, "mean": 70.0},
             {"lr": 0.2, "clip_norm": 1.0, "mean": math.nan}, {"lr": 0.025, "clip_norm": 1.0, "mean": 69.9}]
    assert tuning.pick(curve)["lr"] == 0.1
    tie = [{"lr": 0.1, "clip_norm": 1.0, "mean": 50.0}, {"lr": 0.05, "clip_norm": 2.0, "mean": 50.0},
           {"lr": 0.025, "clip_norm": 2.0, "mean": 50.0}]
    assert tuning.pick(tie) == {"lr": 0.025, "clip_norm": 2.0, "mean": 50.0}   # smallest lr*C
    with pytest.raises(ValueError, match="nothing to pick"):
        tuning.pick([{"lr": 0.1, "clip_norm": 1.0, "mean": math.nan}])


@pytest.mark.parametrize("lrs,clips,tun,test,match", [
    ([0.1, 0.2, 0.3, 0.4], [1.0], [10, 11], [0, 1], "at least|>= 5"),
    ([0.1, 0.2, 0.3, 0.4, 0.5], [1.0], [10, 11], [0, 1], "span >= 16"),
    (LRS, [1.0], [10], [0, 1], "tuning_seeds must hold >= 2"),
    (LRS, [1.0], [0, 11], [0, 1], "disjoint"),
    (LRS, [0.0], [10, 11], [0, 1], "clip_norms"),
    (LRS, [1.0], [10, 11], [0, 0], "test_seeds must be distinct"),
])
def test_check_grid_refuses_what_is_not_the_protocol(lrs, clips, tun, test, match):
    with pytest.raises(ValueError, match=match):
        tuning.check_grid(lrs, clips, tun, test)


class FakeRunGrid:
    """Stands in for run_grid: one record per (point, seed), in run_grid's point-major order, with an
    accuracy that depends on the split (validation peaks at a per-method lr, test is offset)."""

    best = {"dp-lora": 0.025, "la-lora": 0.1}

    def __init__(self):
        self.calls = []

    def __call__(self, base, grid, seeds, runs_dir, **kw):
        self.calls.append((base, list(grid), list(seeds)))
        split = base["task_overrides"].get("eval_split", "test")
        records = []
        for point in grid:
            for seed in seeds:
                method = point["method"]
                lr = point.get("lr", 0.1)
                peak = self.best.get(method, 0.05)
                acc = 80 - 10 * abs(math.log2(lr / peak)) + seed * 0.1 + (5 if split == "test" else 0)
                records.append({**point, "task": base["task"], "method": method, "seed": int(seed),
                                "epsilon": point["epsilon"], "accuracy": acc, "majority_baseline": 10.0,
                                "config": {"lr": lr, "clip_norm": point.get("clip_norm", 1.0)},
                                "run_dir": f"runs/x/{method}/{split}-{lr}-{seed}"})
        return records


def _fake_curves(records):
    return {tuning.run_id(r["run_dir"]): {"round": [1], "train_loss": [2.5 if r["config"]["lr"] == 0.2 else 0.5],
                                           "test_accuracy": [r["accuracy"]]} for r in records}


def test_run_tuned_protocol_tunes_on_validation_and_tests_both_protocols(monkeypatch):
    fake = FakeRunGrid()
    monkeypatch.setattr(lalora.nbtools, "run_grid", fake)
    monkeypatch.setattr(tuning, "run_curves", _fake_curves)
    base = {"task": "digits-swin", "rounds": 2, "task_overrides": {"validation_fraction": 0.1}}
    arms = ["dp-lora", "la-lora", "dp-lora-half-lr"]
    out = tuning.run_tuned_protocol(base, arms, [1.0, 3.0], lrs=LRS, tuning_seeds=[100, 101],
                                    test_seeds=[0, 1, 2, 3, 4], runs_dir="runs", echo=None)
    (vbase, vgrid, vseeds), (tbase, tgrid, tseeds) = fake.calls
    # validation phase: scored on validation, tuning seeds, tuned arms only (the derived arm is not tuned)
    assert vbase["task_overrides"] == {"validation_fraction": 0.1, "eval_split": "validation"}
    assert vseeds == [100, 101] and len(vgrid) == 2 * 2 * len(LRS)
    assert {p["method"] for p in vgrid} == {"dp-lora", "la-lora"}
    # test phase: the test split (same validation_fraction: the same training data and backbone)
    assert tbase["task_overrides"] == {"validation_fraction": 0.1} and tseeds == [0, 1, 2, 3, 4]
    assert all(r["split"] == "validation" for r in out["validation"])
    picks = {(p.arm, p.epsilon): p for p in out["picks"]}
    assert picks[("dp-lora", 1.0)].lr == 0.025 and picks[("la-lora", 3.0)].lr == 0.1
    assert picks[("dp-lora-half-lr", 1.0)].lr == 0.0125   # half of DP-LoRA's pick
    assert [c["lr"] for c in picks[("dp-lora", 1.0)].curve] == LRS
    assert [c["train_loss_final"] for c in picks[("dp-lora", 1.0)].curve] == [[0.5, 0.5]] * 4 + [[2.5, 2.5]]
    lr_of = {}
    for r in out["test"]:
        assert r["split"] == "test" and "lr" not in r and r["protocol"] in ("tuned", "paper")
        lr_of.setdefault((r["method"], r["epsilon"], r["protocol"]), set()).add(r["config"]["lr"])
    assert lr_of[("dp-lora", 1.0, "tuned")] == {0.025} and lr_of[("dp-lora", 1.0, "paper")] == {0.1}
    assert lr_of[("dp-lora-half-lr", 3.0, "tuned")] == {0.0125}
    assert lr_of[("dp-lora-half-lr", 3.0, "paper")] == {0.05}
    assert lr_of[("fedavg-lora", "inf", "paper")] == {0.1}
    # every (arm, ε, protocol) cell has the five paired test seeds
    cells = {}
    for r in out["test"]:
        cells.setdefault((r["method"], r["epsilon"], r["protocol"]), []).append(r["seed"])
    assert all(sorted(s) == [0, 1, 2, 3, 4] for s in cells.values()) and len(cells) == 3 * 2 * 2 + 1
    vt = {(r["method"], r["epsilon"]): r for r in tuning.validation_table(out["picks"])}
    assert set(vt) == {(a, e) for a in arms for e in ("1", "3")}
    assert vt[("dp-lora", "1")]["lr"] == 0.025 and len(vt[("dp-lora", "1")]["points"]) == len(LRS)
    assert vt[("dp-lora-half-lr", "1")]["points"] == [{"derived_from": "dp-lora", "lr_factor": 0.5}]
    rows = tuning.picks_table(out["picks"])
    assert {(r["method"], r["epsilon"]): r["at_grid_edge"] for r in rows}[("dp-lora", "1")] is False
    assert {(r["method"], r["epsilon"]): r["derived_from"] for r in rows}[("dp-lora-half-lr", "3")] == "dp-lora"


def test_verdicts_pair_arms_across_their_own_tuned_lrs(monkeypatch):
    """The tuned arms have different lrs; the verdict must still pair them (lr is not a setting)."""
    from lalora.report import claim_verdicts

    monkeypatch.setattr(lalora.nbtools, "run_grid", FakeRunGrid())
    monkeypatch.setattr(tuning, "run_curves", _fake_curves)
    out = tuning.run_tuned_protocol({"task": "digits-swin", "task_overrides": {"validation_fraction": 0.1}},
                                    ["dp-lora", "la-lora"], [1.0], lrs=LRS, tuning_seeds=[100, 101],
                                    test_seeds=[0, 1, 2, 3, 4], runs_dir="runs", echo=None)
    rows = claim_verdicts(out["test"], pairs=[("la-lora", "dp-lora")], trained={"digits-swin": True})
    by_protocol = {r["protocol"]: r for r in rows}
    assert set(by_protocol) == {"tuned", "paper"} and all(r["n"] == 5 for r in rows)


def test_run_tuned_protocol_refuses_a_base_without_validation():
    with pytest.raises(ValueError, match="validation_fraction > 0"):
        tuning.run_tuned_protocol({"task": "digits-swin"}, ["dp-lora"], [1.0], lrs=LRS, tuning_seeds=[10, 11],
                                  test_seeds=[0, 1], runs_dir="runs")
    with pytest.raises(ValueError, match="must be in arms too"):
        tuning.run_tuned_protocol({"task": "digits-swin", "task_overrides": {"validation_fraction": 0.1}},
                                  ["dp-lora-half-lr"], [1.0], lrs=LRS, tuning_seeds=[10, 11],
                                  test_seeds=[0, 1], runs_dir="runs")


def test_count_runs_matches_what_the_protocol_asks_for(monkeypatch):
    fake = FakeRunGrid()
    monkeypatch.setattr(lalora.nbtools, "run_grid", fake)
    monkeypatch.setattr(tuning, "run_curves", _fake_curves)
    arms, eps = ["dp-lora", "la-lora", "dp-lora-half-lr"], [1.0, 2.0]
    kw = dict(lrs=LRS, clip_norms=[1.0, 2.0], tuning_seeds=[100, 101], test_seeds=[0, 1, 2])
    out = tuning.run_tuned_protocol({"task": "digits-swin", "task_overrides": {"validation_fraction": 0.1}},
                                    arms, eps, runs_dir="runs", echo=None, **kw)
    n = tuning.count_runs(arms, eps, **kw)
    assert n == {"validation": len(out["validation"]), "test": len(out["test"]),
                 "total": len(out["validation"]) + len(out["test"])}
    assert n["validation"] == 2 * 2 * 5 * 2 * 2 and n["test"] == 3 * 2 * 2 * 3 + 3

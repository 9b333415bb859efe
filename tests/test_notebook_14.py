"""Notebook 14 (the tuned protocol) executed through the runner in the ci profile: the JSON holds the grid,
a pick per tuned arm and ε with its validation curve, both protocols on the test seeds, the verdict rows,
and a curve for every run; the figures exist. Slow: about 30 tiny runs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lalora import notebooks as nbr

REPO = Path(__file__).resolve().parents[1]
NAME = "14_tuned_main"


@pytest.mark.slow
def test_notebook_14_ci(tmp_path, monkeypatch):
    monkeypatch.setenv("LALORA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "results" / "ci"
    summary = nbr.run_notebooks("ci", root=REPO, only=[NAME], output_dir=out, runs_dir=tmp_path / "runs", quiet=True)
    assert not summary.failed, nbr.format_summary(summary)
    p = yaml.safe_load((REPO / "notebooks/params/ci" / f"{NAME}.yaml").read_text())
    data = json.loads((out / f"{NAME}.json").read_text())
    lrs = data["grid"]["lrs"]
    assert len(lrs) >= 5 and max(lrs) / min(lrs) >= 16
    tuned = [a for a in p["arms"] if a != "dp-lora-half-lr"]
    picks = {(r["method"], r["epsilon"]): r for r in data["picks"]}
    assert set(picks) == {(a, f"{e:g}") for a in p["arms"] for e in p["epsilons"]}
    assert {(c["method"], c["epsilon"]) for c in data["validation_curves"]} == set(picks)
    for curve in data["validation_curves"]:
        assert curve["lr"] == picks[(curve["method"], curve["epsilon"])]["lr"]
        if curve["method"] in tuned:
            assert [pt["lr"] for pt in curve["points"]] == lrs
            assert all(sorted(pt["seeds"]) == p["tuning_seeds"] for pt in curve["points"])
            assert picks[(curve["method"], curve["epsilon"])]["lr"] in lrs
    half = picks[("dp-lora-half-lr", "3")]["lr"]
    assert half == picks[("dp-lora", "3")]["lr"] / 2
    # validation runs never scored on the test split, test runs never on validation; seeds disjoint
    assert {r["split"] for r in data["validation_runs"]} == {"validation"}
    assert {r["split"] for r in data["runs"]} == {"test"}
    assert {r["seed"] for r in data["validation_runs"]} == set(p["tuning_seeds"])
    assert {r["seed"] for r in data["runs"]} == set(p["test_seeds"])
    assert {r["protocol"] for r in data["runs"]} == {"tuned", "paper"}
    # every run (validation and test) has its per-round curve
    ids = {"/".join(Path(r["run_dir"]).parts[-2:]) for r in data["runs"] + data["validation_runs"]}
    assert ids == set(data["curves"])
    assert all(len(c["round"]) == p["rounds"] and len(c["train_loss"]) == p["rounds"] for c in data["curves"].values())
    assert {v["protocol"] for v in data["claims"]} == {"tuned", "paper"}
    for fig in ("validation", "bars", "curves_tuned", "curves_paper"):
        assert (out / "figures" / f"{NAME}_digits-swin_{fig}.png").exists(), fig

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


def test_evidence_profile_resolves_and_its_notebooks_share_runs(tmp_path):
    """Every notebook of the evidence profile takes its YAML (no undeclared key), 14's grid is the stated
    protocol, and every digits notebook names the same task options (the same backbone and validation split),
    so a run asked for by several notebooks is trained once."""
    from lalora import tuning

    summary = nbr.run_notebooks("evidence", root=REPO, output_dir=tmp_path / "evidence", prepare_only=True,
                                echo=lambda *_: None)
    assert not summary.failed, nbr.format_summary(summary)
    params = REPO / "notebooks/params/evidence"
    assert {o.name for o in summary.outcomes} == {p.stem for p in params.glob("*.yaml")}
    p = yaml.safe_load((params / f"{NAME}.yaml").read_text())
    tuning.check_grid(p["lrs"], p["clip_norms"], p["tuning_seeds"], p["test_seeds"])
    assert len(p["test_seeds"]) >= 5 and p["local_steps"] == 20
    assert [float(e) for e in p["epsilons"]["digits-swin"]] == [1.0, 2.0, 3.0]
    assert len(p["arms"]["digits-swin"]) == 7 and "mnist-swin" in p["tasks"]
    digits = p["task_overrides"]["digits-swin"]
    rounds = p["rounds"]["digits-swin"]
    for path in params.glob("*.yaml"):
        q = yaml.safe_load(path.read_text()) or {}
        ov = q.get("task_overrides")
        if ov is None or q.get("tasks", [q.get("task", "digits-swin")]) == ["topics-minilm"]:
            continue
        ov = ov.get("digits-swin", ov)   # keyed by task, or flat (a digits-only notebook)
        assert ov == digits, path.name
        assert (q.get("rounds"), q.get("local_steps")) == (rounds, p["local_steps"]) or path.name == f"{NAME}.yaml"

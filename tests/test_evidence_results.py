"""The committed `evidence` profile (issue 26) holds what the issue asks of it: every arm tuned per ε on
the validation split (the grid and the curve recorded), ≥ 5 paired test seeds under both protocols, a
curve for every run, a second task, the pass's command and wall time; recomputed here from the JSON."""
import json
import math
from pathlib import Path

import pytest

from lalora.curves import run_id
from lalora.verdicts import MIN_SEEDS, claim_verdicts, is_verdict

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "evidence"
TUNED = RESULTS / "14_tuned_main.json"


@pytest.fixture(scope="module")
def tuned():
    return json.loads(TUNED.read_text())


def test_every_tuned_arm_has_a_pick_from_its_whole_validation_curve(tuned):
    grid = tuned["grid"]
    lrs, seeds = grid["lrs"], grid["tuning_seeds"]
    assert len(lrs) >= 5 and max(lrs) / min(lrs) >= 16 and len(seeds) >= 2
    assert not set(seeds) & set(grid["test_seeds"])
    curves = {(c["task"], c["method"], c["epsilon"]): c for c in tuned["validation_curves"]}
    tuned_picks = [p for p in tuned["picks"] if not p["derived_from"]]
    assert {(p["task"], p["epsilon"]) for p in tuned_picks if p["task"] == "digits-swin"} == {
        ("digits-swin", e) for e in ("1", "2", "3")}
    for p in tuned_picks:
        points = curves[(p["task"], p["method"], p["epsilon"])]["points"]
        assert sorted(pt["lr"] for pt in points) == sorted(lrs)
        assert all(sorted(pt["seeds"]) == sorted(seeds) and len(pt["accuracies"]) == len(seeds) for pt in points)
        best = max(points, key=lambda pt: pt["mean"])
        assert p["validation_mean"] == pytest.approx(best["mean"])   # the pick is the curve's best mean
        assert p["at_grid_edge"] == (p["lr"] in (min(lrs), max(lrs)))


def test_both_protocols_have_five_paired_seeds_per_arm_and_eps(tuned):
    cells = {}
    for r in tuned["runs"]:
        cells.setdefault((r["task"], r["method"], str(r["epsilon"]), r["protocol"]), set()).add(r["seed"])
    arms = tuned["summary"]["arms"]["digits-swin"]
    for arm in arms:
        for eps in ("1.0", "2.0", "3.0"):
            for protocol in ("tuned", "paper"):
                assert len(cells[("digits-swin", arm, eps, protocol)]) >= MIN_SEEDS, (arm, eps, protocol)


def test_every_run_has_its_curve_and_the_curves_end_where_the_accuracy_is(tuned):
    curves = tuned["curves"]
    for r in tuned["runs"] + tuned["validation_runs"]:
        curve = curves[run_id(r["run_dir"])]
        assert len(curve["round"]) == len(curve["train_loss"]) == len(curve["test_accuracy"]) >= 10
    for r in tuned["runs"]:
        final = curves[run_id(r["run_dir"])]["test_accuracy"][-1]   # %, rounded to 2 decimals in the JSON
        assert final == pytest.approx(r["accuracy"], abs=0.006)


def test_the_verdicts_recomputed_from_the_runs_are_the_committed_ones(tuned):
    pairs = list(dict.fromkeys((c["better"], c["worse"]) for c in tuned["claims"]))
    again = claim_verdicts(tuned["runs"], pairs=pairs)
    key = lambda v: (v["task"], str(v["epsilon"]), v["protocol"], v["claim"])   # noqa: E731
    assert {key(v): v["verdict"] for v in again} == {key(v): v["verdict"] for v in tuned["claims"]}
    for v in again:
        if is_verdict(v["verdict"]):
            assert v["n"] >= MIN_SEEDS and all(m > v["majority_baseline"] for m in v["arm_means"].values())


def test_the_second_task_has_a_private_arm_above_its_baseline_with_its_interval(tuned):
    from lalora.verdicts import mean_interval

    runs = [r for r in tuned["runs"] if r["task"] == "mnist-swin" and r["private"]]
    assert runs
    base = max(r["majority_baseline"] for r in runs)
    by_arm = {}
    for r in runs:
        by_arm.setdefault((r["method"], r["protocol"]), []).append(r["accuracy"])
    assert any(len(a) >= MIN_SEEDS and mean_interval(a).ci_low > base for a in by_arm.values()), by_arm


def test_the_pass_recorded_its_command_commit_and_wall_time():
    summary = json.loads((RESULTS / "notebooks" / "runner_summary.json").read_text())
    assert summary["command"] == "lalora notebooks --profile evidence"
    assert len(summary["code"]["commit"]) == 40 and summary["wall_seconds"] > 600
    assert {o["name"] for o in summary["notebooks"]} >= {"14_tuned_main", "10_report"}
    assert all(o["status"] == "ok" for o in summary["notebooks"])
    assert math.isfinite(summary["total_seconds"])


def test_every_profile_that_rewrites_the_report_keeps_every_committed_profile():
    # `make reproduce` (offline) rewrote paper/REPORT.md over [paper, offline-full, offline] and so
    # dropped the evidence profile's summary, tables and verdicts from the committed report.
    import yaml

    from lalora.report import EVIDENCE_PROFILES

    committed = {p.name for p in (ROOT / "results").iterdir() if (p / "notebooks" / "runner_summary.json").is_file()}
    writers = {}
    for params in sorted((ROOT / "notebooks" / "params").glob("*/10_report.yaml")):
        cfg = yaml.safe_load(params.read_text())
        if cfg.get("report_path") == "paper/REPORT.md":
            writers[params.parent.name] = set(cfg["profiles"])
    assert {"offline", "offline-full", "evidence", "paper"} <= set(writers)
    for profile, listed in writers.items():
        assert set(EVIDENCE_PROFILES) <= listed, (profile, listed)
        assert committed - {"ci"} <= listed, (profile, committed - listed)

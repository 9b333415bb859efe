"""Verdicts from paired seeds (lalora.report): mean and 95% Student-t CI of per-seed differences,
holds / reversed / unresolved from the CI alone, "insufficient seeds" below 5, "did not train" when the
non-private model did not beat its majority baseline, and a run set counted once across notebooks."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from lalora import report

REPO = Path(__file__).resolve().parents[1]
REPORTED = REPO / "paper" / "reported.yaml"


def _runs(task, method, accs, eps=3.0, base=None, **extra):
    return [{"task": task, "method": method, "epsilon": eps, "seed": s, "accuracy": a,
             "run_dir": f"runs/{task}/{method}/{task}-{method}-{eps}-{s}-{extra}",
             **({"majority_baseline": base} if base is not None else {}), **extra}
            for s, a in enumerate(accs)]


def test_paired_difference_matches_a_float64_t_interval():
    a = {0: 71.0, 1: 74.5, 2: 69.0, 3: 80.0, 4: 75.0, 9: 50.0}    # seed 9 has no partner: dropped
    b = {0: 70.0, 1: 71.0, 2: 70.5, 3: 74.0, 4: 72.0, 7: 10.0}
    d = report.paired_difference(a, b)
    diffs = np.array([1.0, 3.5, -1.5, 6.0, 3.0], dtype=np.float64)
    half = stats.t.ppf(0.975, 4) * diffs.std(ddof=1) / math.sqrt(5)
    assert d.n == 5 and d.seeds == [0, 1, 2, 3, 4]
    assert d.mean == pytest.approx(diffs.mean(), abs=1e-12)
    assert (d.ci_low, d.ci_high) == pytest.approx((diffs.mean() - half, diffs.mean() + half), abs=1e-12)
    one = report.paired_difference({0: 2.0}, {0: 1.0})
    assert one.n == 1 and one.mean == 1.0 and math.isnan(one.ci_low)


@pytest.mark.parametrize("better,worse,trained,expected", [
    ([80, 82, 81, 83, 79], [70, 71, 69, 72, 70], None, "holds"),
    ([60, 61, 59, 62, 60], [70, 71, 69, 72, 70], True, "reversed"),
    ([71, 69, 75, 66, 70], [70, 71, 69, 72, 70], True, "unresolved"),
    ([99, 98, 99, 97], [1, 2, 1, 3], True, "insufficient seeds"),    # huge gap, but n = 4 < 5
    ([80, 82, 81, 83, 79], [70, 71, 69, 72, 70], False, "did not train"),
])
def test_verdicts_on_synthetic_numbers(better, worse, trained, expected):
    d = report.paired_difference(dict(enumerate(better)), dict(enumerate(worse)))
    assert report.verdict(d, trained=trained) == expected


def test_claim_verdicts_from_run_records_and_did_not_train():
    runs = (_runs("t", "la-lora", [80, 82, 81, 80, 82]) + _runs("t", "dp-lora", [70, 71, 69, 70, 70])
            + _runs("t", "fedavg-lora", [90, 91, 92, 90, 91], eps="inf", base=20.0)
            + _runs("u", "la-lora", [30, 31, 32, 30, 31]) + _runs("u", "dp-lora", [10, 11, 12, 10, 11])
            + _runs("u", "fedavg-lora", [14, 15, 16, 14, 15], eps="inf", base=15.4))
    assert report.trained_tasks(runs) == {"t": True, "u": False}
    rows = {r["task"]: r for r in report.claim_verdicts(runs)}
    assert set(rows) == {"t", "u"}                                  # ε = ∞ is the reference, not ranked
    assert rows["t"]["claim"] == "LA-LoRA > DP-LoRA" and rows["t"]["verdict"] == "holds"
    assert rows["t"]["n"] == 5 and rows["t"]["mean"] == pytest.approx(11.0)
    assert rows["u"]["verdict"] == "did not train"                  # 15 % vs a 15.4 % majority baseline
    # all four methods: adjacent pairs of the claimed order plus the headline first-vs-last
    assert report.claim_pairs(["dp-lora", "rolora", "la-lora", "ffa-lora"]) == [
        ("la-lora", "rolora"), ("rolora", "ffa-lora"), ("ffa-lora", "dp-lora"), ("la-lora", "dp-lora")]


def test_settings_split_by_mechanism():
    runs = (_runs("t", "la-lora", [80, 82, 81, 80, 81], dp_mode="as-released")
            + _runs("t", "dp-lora", [70, 71, 69, 70, 71], dp_mode="as-released")
            + _runs("t", "la-lora", [70, 70, 70, 70, 70], dp_mode="dp")
            + _runs("t", "dp-lora", [71, 72, 70, 69, 70], dp_mode="dp"))
    rows = {r["dp_mode"]: r for r in report.claim_verdicts(runs)}
    assert rows["as-released"]["verdict"] == "holds" and rows["dp"]["verdict"] == "unresolved"


def test_report_counts_a_run_set_once(tmp_path):
    main = _runs("digits-swin", "la-lora", [80, 82, 81, 83, 79]) + _runs("digits-swin", "dp-lora", [70, 71, 69, 72, 70])
    sweep = [r for r in main if r["seed"] == 0] + _runs("digits-swin", "la-lora", [60], eps=1.0) \
        + _runs("digits-swin", "dp-lora", [50], eps=1.0)
    root = tmp_path / "results" / "offline"
    root.mkdir(parents=True)
    (root / "01_main_vision.json").write_text(json.dumps({"runs": main, "table": []}))
    (root / "04_privacy_utility.json").write_text(json.dumps({"runs": sweep, "table": []}))
    (root / "05_heterogeneity.json").write_text(json.dumps({"runs": main, "table": []}))
    text = report.build_report(tmp_path / "results", REPORTED, None)
    section = text.split("## Verdicts")[1].split("\n## ")[0]
    assert "95% Student-t interval" in section
    judged, unjudged = section.split("### Not judged: fewer than 5 paired seeds")
    lines = [ln for ln in section.splitlines() if ln.startswith("| `offline`")]
    assert len(lines) == 4
    # the verdict table holds verdicts only; the sweep's 1-seed cells (ε = 1, and ε = 3 re-reading
    # the main table's seed 0) are listed apart, without one
    assert not any("04_privacy_utility" in ln for ln in judged.splitlines())
    assert [ln for ln in unjudged.splitlines() if ln.startswith("| `offline`")] == \
        [ln for ln in lines if "04_privacy_utility" in ln]
    main_line, = [ln for ln in lines if ln.startswith("| `offline` / 01_main_vision")]
    assert "| 5 |" in main_line and "| holds |" in main_line
    het, = [ln for ln in lines if ln.startswith("| `offline` / 05_heterogeneity")]
    assert "same runs as `offline` / 01_main_vision" in het          # not counted twice
    eps3, = [ln for ln in lines if ln.startswith("| `offline` / 04") and "epsilon = 3" in ln]
    assert "same runs as" in eps3 and "| 1 |" in eps3                 # the main table's seed 0
    eps1, = [ln for ln in lines if ln.startswith("| `offline` / 04") and "epsilon = 1," in ln]
    assert "insufficient seeds" in eps1
    assert "Distinct run sets: 1 holds, 1 insufficient seeds." in section


def test_ci_bars_figure(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lalora.main_results import verdict_figure

    runs = _runs("t", "la-lora", [80, 82, 81]) + _runs("t", "dp-lora", [70, 71, 69]) \
        + _runs("t", "rolora", [75, 75, 76])
    rows = report.claim_verdicts(runs)
    fig = verdict_figure(rows, "test")
    ax = fig.axes[0]
    assert len(ax.get_yticklabels()) == len(rows) == 3
    # one error bar per claim, spanning exactly its CI
    segs = [c for c in ax.collections if hasattr(c, "get_segments")]
    spans = sorted(tuple(np.round(sorted([s[0][0], s[1][0]]), 6)) for c in segs for s in c.get_segments())
    want = sorted(tuple(np.round([r["ci_low"], r["ci_high"]], 6)) for r in rows)
    assert spans == want
    plt.close(fig)


def test_dp_cost_is_nonprivate_minus_dp_lora_paired_by_seed(tmp_path):
    runs = (_runs("digits-swin", "dp-lora", [30, 35, 40, 32, 38], eps=1.0, base=10.0)
            + _runs("digits-swin", "la-lora", [60, 61, 62, 63, 64], eps=1.0, base=10.0)
            + _runs("digits-swin", "dp-lora", [70, 71, 72, 73, 74], eps=1.0, base=10.0, dp_mode="as-released")
            + _runs("digits-swin", "fedavg-lora", [80, 81, 79, 80, 82], eps="inf", base=10.0))
    (row,) = report.dp_cost_rows({"offline-full": {"01_main_vision": {"runs": runs}}})
    diffs = np.array([50, 46, 39, 48, 44], dtype=np.float64)        # real-DP runs only, seed by seed
    half = stats.t.ppf(0.975, 4) * diffs.std(ddof=1) / math.sqrt(5)
    assert row["n"] == 5 and row["epsilon"] == 1.0 and row["majority"] == 10.0
    assert row["mean"] == pytest.approx(diffs.mean()) and row["ci_low"] == pytest.approx(diffs.mean() - half)
    assert row["nonprivate"] == pytest.approx(80.4) and row["dp"] == pytest.approx(35.0)
    root = tmp_path / "results" / "offline-full"
    root.mkdir(parents=True)
    (root / "01_main_vision.json").write_text(json.dumps({"runs": runs, "table": []}))
    text = report.build_report(tmp_path / "results", REPORTED, None)
    section = text.split("## What DP costs in each regime")[1].split("\n## ")[0]
    assert "| `offline-full` / 01_main_vision | digits-swin | 1 | 5 | 80.40 | 35.00 | +45.40 [" in section
    assert "8.04×" in section                                         # non-private / majority baseline
    assert "What the offline profiles can and cannot say" in text.split("## Verdicts")[0]


def test_paired_gaps_per_sweep_value_match_the_paired_interval():
    from lalora.main_results import paired_gaps, with_ci95

    recs = (_runs("t", "dp-lora", [30, 35, 40, 32, 38], eps=1.0) + _runs("t", "la-lora", [60, 61, 62, 63, 64], eps=1.0)
            + _runs("t", "dp-lora", [70, 71], eps="inf") + _runs("t", "la-lora", [72, 70], eps="inf"))
    gaps = {g["epsilon"]: g for g in paired_gaps(recs, "epsilon")}
    diffs = np.array([30, 26, 22, 31, 26], dtype=np.float64)
    half = stats.t.ppf(0.975, 4) * diffs.std(ddof=1) / math.sqrt(5)
    assert gaps[1.0]["method"] == "la-lora" and gaps[1.0]["n"] == 5
    assert gaps[1.0]["accuracy_mean"] == pytest.approx(diffs.mean()) and gaps[1.0]["accuracy_ci95"] == pytest.approx(half)
    assert gaps["inf"]["accuracy_mean"] == pytest.approx(0.5) and gaps["inf"]["n"] == 2
    (row,) = with_ci95([{"accuracies": [1.0, 2.0, 3.0]}])
    assert row["accuracy_ci95"] == pytest.approx(stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3))


def test_two_private_arms_at_chance_get_no_verdict_even_with_a_zero_width_interval():
    # the language runs of offline-full: non-private 43% trains, both DP arms sit below the 15.4% majority
    # baseline and differ by the same one test example on every seed (a zero-width "reversed" interval)
    la = [10.0, 10.0, 8.0, 14.0, 6.0]
    runs = (_runs("topics", "la-lora", la, base=15.4) + _runs("topics", "dp-lora", [a + 0.75 for a in la], base=15.4)
            + _runs("topics", "fedavg-lora", [43, 40, 50, 38, 45], eps="inf", base=15.4))
    (row,) = report.claim_verdicts(runs)
    assert row["ci_low"] == pytest.approx(row["ci_high"]) and row["ci_high"] < 0
    assert row["verdict"] == report.NEITHER_TRAINED
    # one arm above the baseline: judged on the interval as usual
    runs = (_runs("topics", "la-lora", [30, 31, 29, 32, 30], base=15.4)
            + _runs("topics", "dp-lora", [11.5, 11.5, 9.2, 15.8, 7.3], base=15.4))
    assert report.claim_verdicts(runs)[0]["verdict"] == "holds"

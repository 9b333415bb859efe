"""The one verdict rule (lalora.verdicts): mean and 95% Student-t CI of paired per-seed differences,
holds / reversed / unresolved from the CI alone, and no verdict below 5 paired seeds, when the task's
non-private model did not beat its majority baseline, or when either arm is at or below that baseline;
a run set counted once across notebooks; the mechanism's own test computed from the committed JSON."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from lalora import report, verdicts

REPO = Path(__file__).resolve().parents[1]
REPORTED = REPO / "paper" / "reported.yaml"


def _runs(task, method, accs, eps=3.0, base=10.0, **extra):
    return [{"task": task, "method": method, "epsilon": eps, "seed": s, "accuracy": a,
             "run_dir": f"runs/{task}/{method}/{task}-{method}-{eps}-{s}-{extra}",
             **({"majority_baseline": base} if base is not None else {}), **extra}
            for s, a in enumerate(accs)]


def test_paired_difference_matches_a_float64_t_interval():
    a = {0: 71.0, 1: 74.5, 2: 69.0, 3: 80.0, 4: 75.0, 9: 50.0}    # seed 9 has no partner: dropped
    b = {0: 70.0, 1: 71.0, 2: 70.5, 3: 74.0, 4: 72.0, 7: 10.0}
    d = verdicts.paired_difference(a, b)
    diffs = np.array([1.0, 3.5, -1.5, 6.0, 3.0], dtype=np.float64)
    half = stats.t.ppf(0.975, 4) * diffs.std(ddof=1) / math.sqrt(5)
    assert d.n == 5 and d.seeds == [0, 1, 2, 3, 4]
    assert d.mean == pytest.approx(diffs.mean(), abs=1e-12)
    assert (d.ci_low, d.ci_high) == pytest.approx((diffs.mean() - half, diffs.mean() + half), abs=1e-12)
    one = verdicts.paired_difference({0: 2.0}, {0: 1.0})
    assert one.n == 1 and one.mean == 1.0 and math.isnan(one.ci_low)


@pytest.mark.parametrize("better,worse,trained,expected", [
    ([80, 82, 81, 83, 79], [70, 71, 69, 72, 70], None, "holds"),
    ([60, 61, 59, 62, 60], [70, 71, 69, 72, 70], True, "reversed"),
    ([71, 69, 75, 66, 70], [70, 71, 69, 72, 70], True, "unresolved"),
    ([99, 98, 99, 97], [1, 2, 1, 3], True, "insufficient seeds"),    # huge gap, but n = 4 < 5
    ([80, 82, 81, 83, 79], [70, 71, 69, 72, 70], False, "did not train"),
])
def test_verdicts_on_synthetic_numbers(better, worse, trained, expected):
    d = verdicts.paired_difference(dict(enumerate(better)), dict(enumerate(worse)))
    assert verdicts.verdict(d, trained=trained) == expected


def test_no_verdict_with_an_arm_below_the_baseline_or_without_one():
    d = verdicts.paired_difference(dict(enumerate([80, 82, 81, 83, 79])), dict(enumerate([70, 71, 69, 72, 70])))
    assert verdicts.verdict(d, below_baseline=["dp-lora"]) == "below majority baseline (DP-LoRA)"
    assert verdicts.verdict(d, baseline_known=False) == verdicts.NO_BASELINE
    runs = _runs("t", "la-lora", [80, 82, 81, 83, 79], base=None) + _runs("t", "dp-lora", [70, 71, 69, 72, 70], base=None)
    assert verdicts.claim_verdicts(runs)[0]["verdict"] == verdicts.NO_BASELINE   # not assumed to be met


def test_claim_verdicts_from_run_records_and_did_not_train():
    runs = (_runs("t", "la-lora", [80, 82, 81, 80, 82], base=20.0) + _runs("t", "dp-lora", [70, 71, 69, 70, 70], base=20.0)
            + _runs("t", "fedavg-lora", [90, 91, 92, 90, 91], eps="inf", base=20.0)
            + _runs("u", "la-lora", [30, 31, 32, 30, 31]) + _runs("u", "dp-lora", [10, 11, 12, 10, 11])
            + _runs("u", "fedavg-lora", [14, 15, 16, 14, 15], eps="inf", base=15.4))
    assert verdicts.trained_tasks(runs) == {"t": True, "u": False}
    rows = {r["task"]: r for r in verdicts.claim_verdicts(runs)}
    assert set(rows) == {"t", "u"}                                  # ε = ∞ is the reference, not ranked
    assert rows["t"]["claim"] == "LA-LoRA > DP-LoRA" and rows["t"]["verdict"] == "holds"
    assert rows["t"]["n"] == 5 and rows["t"]["mean"] == pytest.approx(11.0)
    assert rows["u"]["verdict"] == "did not train"                  # 15 % vs a 15.4 % majority baseline
    # all four methods: adjacent pairs of the claimed order plus the headline first-vs-last
    assert verdicts.claim_pairs(["dp-lora", "rolora", "la-lora", "ffa-lora"]) == [
        ("la-lora", "rolora"), ("rolora", "ffa-lora"), ("ffa-lora", "dp-lora"), ("la-lora", "dp-lora")]


def test_settings_split_by_mechanism():
    runs = (_runs("t", "la-lora", [80, 82, 81, 80, 81], dp_mode="as-released")
            + _runs("t", "dp-lora", [70, 71, 69, 70, 71], dp_mode="as-released")
            + _runs("t", "la-lora", [70, 70, 70, 70, 70], dp_mode="dp")
            + _runs("t", "dp-lora", [71, 72, 70, 69, 70], dp_mode="dp"))
    rows = {r["dp_mode"]: r for r in verdicts.claim_verdicts(runs)}
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
    rows = verdicts.claim_verdicts(runs)
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
    (row,) = verdicts.dp_cost_rows({"offline-full": {"01_main_vision": {"runs": runs}}})
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
    (row,) = verdicts.claim_verdicts(runs)
    assert row["ci_low"] == pytest.approx(row["ci_high"]) and row["ci_high"] < 0
    assert row["verdict"] == "below majority baseline (LA-LoRA and DP-LoRA)"
    # ONE arm at or below the baseline is enough: a method that learned nothing ranks nothing
    runs = (_runs("topics", "la-lora", [30, 31, 29, 32, 30], base=15.4)
            + _runs("topics", "dp-lora", [11.5, 11.5, 9.2, 15.8, 7.3], base=15.4))
    (row,) = verdicts.claim_verdicts(runs)
    assert row["verdict"] == "below majority baseline (DP-LoRA)" and row["ci_low"] > 0
    assert row["arm_means"]["dp-lora"] == pytest.approx(11.06) and row["majority_baseline"] == 15.4


def test_no_holds_from_one_seed_or_from_arms_below_the_baseline_anywhere(tmp_path):
    """The offline topics-minilm case (one seed; LA-LoRA 12.3 vs DP-LoRA 11.5, majority baseline 15.4) and a
    1-seed vision setting whose means are in the claimed order: no "holds" in the verdict table, the ranking
    section, the site index or the notebooks' claim rows."""
    from lalora import site

    runs = (_runs("topics-minilm", "la-lora", [12.3], base=15.4) + _runs("topics-minilm", "dp-lora", [11.5], base=15.4)
            + _runs("digits-swin", "la-lora", [80.0]) + _runs("digits-swin", "rolora", [70.0])
            + _runs("digits-swin", "dp-lora", [60.0]))
    rows = verdicts.claim_verdicts(runs)
    assert rows and not any(r["verdict"] == "holds" for r in rows)
    assert {r["verdict"] for r in verdicts.ranking_verdicts(runs)} == {verdicts.INSUFFICIENT}
    five = (_runs("topics-minilm", "la-lora", [12.3, 12.0, 12.6, 12.2, 12.4], base=15.4)
            + _runs("topics-minilm", "dp-lora", [11.5, 11.2, 11.9, 11.3, 11.6], base=15.4))
    assert {r["verdict"] for r in verdicts.claim_verdicts(five)} == {"below majority baseline (LA-LoRA and DP-LoRA)"}
    assert {f.verdict for f in site.verdicts({"runs": runs + five, "summary": {"ranking_holds": {"x": True}}})} \
        == {verdicts.INSUFFICIENT, "below majority baseline (LA-LoRA and DP-LoRA)"}
    root = tmp_path / "results" / "offline"
    root.mkdir(parents=True)
    (root / "01_main_vision.json").write_text(json.dumps({"runs": runs, "table": []}))
    (root / "02_main_language.json").write_text(json.dumps({"runs": five, "table": []}))
    text = report.build_report(tmp_path / "results", REPORTED, None)
    ranking = [ln for ln in text.split("## Does the ranking")[1].splitlines() if ln.startswith("- `")]
    assert len(ranking) == 3 and not any("**holds**" in ln for ln in ranking) and "holds in **0**" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| `offline`")]
    assert len(rows) == 5 and not any("| holds" in ln for ln in rows)
    assert "No claim meets the rule yet." in text


def test_the_mechanism_test_is_computed_from_the_committed_json():
    """LA-LoRA vs DP-LoRA + filter (issue 26): recomputed here in float64 from offline-full's per-seed runs."""
    from lalora.result_files import collect_results

    results = collect_results(REPO / "results", ["offline-full"])
    (row,) = verdicts.mechanism_rows(results)
    runs = results["offline-full"]["03_ablation"]["runs"]
    acc = {m: {r["seed"]: r["accuracy"] for r in runs if r["method"] == m} for m in ("la-lora", "dp-lora+filter")}
    seeds = sorted(acc["la-lora"])
    diffs = np.array([acc["la-lora"][s] - acc["dp-lora+filter"][s] for s in seeds], dtype=np.float64)
    half = stats.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / math.sqrt(len(diffs))
    assert row["n"] == len(diffs) >= 5 and row["mean"] == pytest.approx(diffs.mean(), abs=1e-12)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((diffs.mean() - half, diffs.mean() + half), abs=1e-12)
    assert row["verdict"] == ("holds" if diffs.mean() - half > 0 else "reversed" if diffs.mean() + half < 0 else "unresolved")
    committed = (REPO / "paper" / "REPORT.md").read_text()
    section = committed.split("## The mechanism's own test")[1].split("\n## ")[0]
    assert f"`offline-full` / 03_ablation" in section and f"| {row['n']} | {verdicts.fmt_diff(row)} |" in section


def test_the_headline_mechanism_test_is_the_tuned_protocols_from_the_committed_json():
    """The summary's mechanism line speaks for the evidence profile's notebook 14, per ε and protocol,
    each recomputed here in float64 from the per-seed runs."""
    from lalora.result_files import collect_results

    results = collect_results(REPO / "results", ["evidence"])
    runs = results["evidence"]["14_tuned_main"]["runs"]
    headline = (REPO / "paper" / "REPORT.md").read_text().split("## ")[0]
    checked = 0
    for protocol, label in (("tuned", "tuned lr"), ("paper", "paper's lr")):
        for eps in (1.0, 2.0, 3.0):
            acc = {m: {r["seed"]: r["accuracy"] for r in runs if r["method"] == m and r["protocol"] == protocol
                       and r["task"] == "digits-swin" and float(r["epsilon"]) == eps}
                   for m in ("la-lora", "dp-lora+filter")}
            seeds = sorted(acc["la-lora"])
            diffs = np.array([acc["la-lora"][s] - acc["dp-lora+filter"][s] for s in seeds], dtype=np.float64)
            half = stats.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / math.sqrt(len(diffs))
            row = {"mean": diffs.mean(), "ci_low": diffs.mean() - half, "ci_high": diffs.mean() + half}
            assert len(diffs) >= 5
            assert f"digits-swin, ε = {eps:g}, {label}: {verdicts.fmt_diff(row)}, n = {len(diffs)}" in headline
            checked += 1
    assert checked == 6


def test_near_zero_alignment_gets_an_interval_not_a_yes():
    # notebook 07 wrote la_lora_more_aligned_BA = True from mean cosines 0.0020 vs 0.0017
    la = [0.0025, -0.0044, 0.0068, 0.0011, 0.0042, -0.0010]
    dp = [0.0019, 0.0031, -0.0022, 0.0035, 0.0001, 0.0036]
    data = {"traces": {"la-lora": {"BA": la}, "dp-lora": {"BA": dp}}, "la_lora_more_aligned_BA": True}
    a = verdicts.alignment_comparison(data)
    d = np.array(la) - np.array(dp)
    half = stats.t.ppf(0.975, 5) * d.std(ddof=1) / math.sqrt(6)
    assert a["n"] == 6 and (a["ci_low"], a["ci_high"]) == pytest.approx((d.mean() - half, d.mean() + half))
    assert a["verdict"] == "unresolved"
    from lalora import site

    assert [(f.key, f.verdict) for f in site.verdicts(data)] == [("alignment", "unresolved")]


def test_sharpness_only_between_models_at_a_minimum():
    ln10 = math.log(10)
    runs = ([{"method": "dp-lora", "seed": s, "loss": x, "top_eigenvalue": e}
             for s, (x, e) in enumerate([(2.56, 427.0), (1.78, 180.0), (2.63, 89.0), (1.95, 103.0), (2.26, 141.0)])]
            + [{"method": "la-lora", "seed": s, "loss": 0.75, "top_eigenvalue": 8.0 + s} for s in range(5)])
    s = verdicts.sharpness_comparison({"runs": runs, "num_classes": 10, "top_eigenvalue": {}})
    assert s["chance_loss"] == pytest.approx(ln10)
    assert s["methods"]["dp-lora"]["at_minimum"] is False and s["methods"]["dp-lora"]["above_chance"] == 2
    assert s["methods"]["la-lora"]["at_minimum"] is True and s["comparison"] is None
    assert "not at a minimum: DP-LoRA (2 of 5 seeds" in verdicts.sharpness_reason(s)
    trained = [dict(r, loss=1.0) for r in runs]
    c = verdicts.sharpness_comparison({"runs": trained, "chance_loss": ln10})["comparison"]
    assert c["n"] == 5 and c["verdict"] == "holds"          # DP-LoRA − LA-LoRA eigenvalue, CI above 0
    # no chance loss recorded: no comparison, whatever the eigenvalues
    assert verdicts.sharpness_comparison({"runs": trained})["comparison"] is None


def test_committed_report_links_only_to_committed_files():
    import re
    import subprocess

    text = (REPO / "paper" / "REPORT.md").read_text()
    links = re.findall(r"\]\(<?([^)>]+)>?\)", text)
    assert links and not any("/site/" in link for link in links)
    tracked = set(subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split("\n"))
    for link in links:
        target = (REPO / "paper" / link.split("#")[0]).resolve().relative_to(REPO.resolve()).as_posix()
        assert target in tracked, link

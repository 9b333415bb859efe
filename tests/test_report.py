"""lalora.report: the report builder on fake result JSONs (no training)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from lalora import report

REPO = Path(__file__).resolve().parents[1]
REPORTED = REPO / "paper" / "reported.yaml"


def _row(task, method, eps, mean, std=0.5, n=3):
    return {"task": task, "method": method, "epsilon": eps, "accuracy_mean": mean,
            "accuracy_std": std, "n_seeds": n}


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.fixture()
def fake_results(tmp_path):
    root = tmp_path / "results"
    # offline: ranking holds at eps=3, fails at eps=1 (RoLoRA below FFA-LoRA by far more than std).
    _write(root / "offline" / "01_main_vision.json", {
        "notebook": "01_main_vision", "profile": "offline", "metric": "test accuracy (%)",
        "table": [_row("digits-swin", "dp-lora", 3, 50.0), _row("digits-swin", "ffa-lora", 3, 55.0),
                  _row("digits-swin", "rolora", 3, 60.0), _row("digits-swin", "la-lora", 3, 70.0),
                  _row("digits-swin", "fedavg-lora", "inf", 90.0),
                  _row("digits-swin", "dp-lora", 1, 40.0), _row("digits-swin", "ffa-lora", 1, 48.0),
                  _row("digits-swin", "rolora", 1, 42.0), _row("digits-swin", "la-lora", 1, 52.0)],
        "summary": {"best_method": "la-lora", "seconds": 12.5}})
    _write(root / "offline" / "03_ablation.json", {
        "notebook": "03_ablation", "table": [
            _row("digits-swin", "dp-lora", 3, 50.0), _row("digits-swin", "dp-lora+filter", 3, 58.0),
            _row("digits-swin", "la-lora-filter", 3, 61.0), _row("digits-swin", "la-lora", 3, 70.0)],
        "summary": {"n": 4}})
    _write(root / "offline" / "04_privacy_utility.json", {
        "notebook": "04_privacy_utility", "table": [
            _row("digits-swin", m, e, 40 + 5 * i + (e if e != "inf" else 10))
            for i, m in enumerate(["dp-lora", "la-lora"]) for e in [1, 3, "inf"]],
        "summary": {}})
    _write(root / "offline" / "06_sharpness.json", {"top_eigenvalue": {"dp-lora": 12.0, "la-lora": 7.5},
                                                   "summary": {"ratio": 1.6}})
    _write(root / "offline" / "11_extra.json", {"summary": {"nested": {"a": 1, "b": [1, 2]}, "flag": True}})
    (root / "offline" / "12_broken.json").write_text("{not json")
    _write(root / "paper" / "01_main_vision.json", {
        "table": [_row("cifar100-swin-t", m, 3, v) for m, v in
                  [("dp-lora", 44.0), ("ffa-lora", 50.0), ("rolora", 49.0), ("la-lora", 58.0)]]})
    return root


def test_check_ranking_holds_and_fails():
    C = report.Cell
    ok = report.check_ranking({"dp-lora": C(1), "ffa-lora": C(2), "rolora": C(3), "la-lora": C(4)})
    assert ok.holds and ok.violations == []
    bad = report.check_ranking({"dp-lora": C(1, 0.1), "ffa-lora": C(3, 0.1), "rolora": C(2, 0.1), "la-lora": C(4, 0.1)})
    assert not bad.holds
    assert [(v[0], v[1]) for v in bad.violations] == [("rolora", "ffa-lora")]
    assert bad.violations[0][4] is False  # gap 1.0 > std 0.1
    noisy = report.check_ranking({"rolora": C(2.0, 0.5), "ffa-lora": C(2.2, 0.5)})
    assert not noisy.holds and noisy.violations[0][4] is True
    # Missing methods are skipped: only present adjacent pairs are compared.
    partial = report.check_ranking({"la-lora": C(5), "dp-lora": C(1)})
    assert partial.holds and partial.methods == ["la-lora", "dp-lora"]
    assert report.check_ranking({"la-lora": C(5)}) is None
    # A tie is not "better", and is called a tie.
    tie = report.check_ranking({"la-lora": C(5), "dp-lora": C(5)})
    assert not tie.holds and "a tie" in tie.sentence() and "LA-LoRA = DP-LoRA" in tie.sentence()


def test_report_on_fake_results(fake_results, tmp_path):
    out = tmp_path / "paper" / "REPORT.md"
    text = report.build_report(fake_results, REPORTED, out)
    assert out.read_text() == text
    # Profiles in the fixed order, paper first.
    assert text.index("`paper` (1 notebooks)") < text.index("`offline`")
    # Reported numbers beside reproduced ones.
    assert "60.07" in text and "70.00 ± 0.50 (n=3)" in text
    # The ranking verdict is computed: holds at eps=3 offline, fails at eps=1 and in paper profile.
    assert "`offline` / 01_main_vision / `digits-swin` / ε = 3: holds" in text
    assert "`offline` / 01_main_vision / `digits-swin` / ε = 1: does not hold: RoLoRA 42.00 ≤ FFA-LoRA 48.00" in text
    assert "`paper` / 01_main_vision / `cifar100-swin-t` / ε = 3: does not hold" in text
    assert "holds in **3 of 5** settings" in text
    assert "| LA-LoRA > DP-LoRA | 5 of 5 |" in text
    assert "| RoLoRA > FFA-LoRA | 1 of 3 |" in text
    # The paper profile's task matches the reported row by id (no "different task" caveat there).
    paper_block = text.split("profile `paper`, task `cifar100-swin-t`")[1].split("**Reproduced**")[0]
    assert "different task" not in paper_block.split("\n")[0]
    assert "different task" in text.split("profile `offline`, task `digits-swin`, ε = 1")[1].split("\n")[0]
    # Non-DP reference shown as an extra row.
    assert "FedAvg-LoRA (no DP) (ε = ∞) | 90.00" in text
    # Ablation uses the paper's own ablation order.
    assert "LA-LoRA > LA-LoRA − filter > DP-LoRA + filter > DP-LoRA" in text
    # Sharpness beside the paper's eigenvalues.
    assert "101.62" in text and "64.77" in text and "| 7.5 |" in text
    # Generic sections: every JSON, nested summary flattened, broken file reported not fatal.
    assert "### 11_extra" in text and "nested.a" in text
    assert "### 12_broken" in text and "could not read" in text
    # Accuracy vs eps table has inf column.
    assert "ε = ∞" in text


def test_report_with_no_results(tmp_path):
    text = report.build_report(tmp_path / "nothing", REPORTED, None)
    assert "No reproduced results yet" in text
    assert "No reproduced setting" in text


def test_reported_yaml_is_complete():
    data = yaml.safe_load(REPORTED.read_text())
    assert data["paper"]["arxiv"] == "2602.19926"
    assert "verify in the PDF" in data["paper"]["status"]
    for key in ("main_vision", "main_language", "ablation", "sharpness"):
        assert "2602.19926" in data[key]["source"] and "verify in the PDF" in data[key]["source"]
    vision = {(r["model"], r["dataset"], r["epsilon"]): r["accuracy"] for r in data["main_vision"]["rows"]}
    assert vision[("Swin-B", "Tiny-ImageNet", 1)]["la-lora"] == 60.68
    assert vision[("Swin-T", "CIFAR-100", 3)]["dp-lora"] == 45.40
    # In every reported row the claimed ranking holds (a typo in transcription would break it).
    for rows in (data["main_vision"]["rows"],):
        for r in rows:
            acc = r["accuracy"]
            assert acc["la-lora"] > acc["rolora"] > acc["ffa-lora"] > acc["dp-lora"]
    assert data["sharpness"]["rows"][0]["top_eigenvalue"] == {"dp-lora": 101.62, "la-lora": 64.77}


def test_as_epsilon():
    assert report.as_epsilon("inf") == math.inf and report.as_epsilon(None) == math.inf
    assert report.as_epsilon(3) == 3.0


def _run(seed, sigma, **cfg):
    config = dict(clients=8, clients_per_round=4, beta=0.1, batch_size=16, r=16, alpha=16.0, epsilon=1.0)
    config.update(cfg)
    return {"method": "dp-lora", "dp_mode": "dp", "seed": seed, "noise_multiplier": sigma, "config": config}


def test_scope_paragraph_states_the_regime_of_the_committed_runs():
    # read from the runs, not written by hand: the hand-written "σ = 5.3" hid per-seed σ of 5.1-5.5
    results = {"offline-full": {
        "01_main_vision": {"runs": [_run(0, 5.12), _run(1, 5.49)]},
        "02_main_language": {"runs": [_run(0, 1.8, epsilon=3.0)]}}}
    text = report.scope_text(results)
    assert "8 clients, 4 per round, Dirichlet β = 0.1, batch 16, LoRA r = α = 16" in text
    assert "vision at ε = 1, σ = 5.1–5.5 in the paper's 4–6 range; language at ε = 3" in text
    one = report.scope_text({"offline-full": {"01_main_vision": {"runs": [_run(0, 2.13, r=8, epsilon=3.0)]}}})
    assert "LoRA r = 8, α = 16" in one and "σ = 2.1 (the paper's σ: 4–6)" in one
    # runs that do not share a setting, or no offline-full runs: no number is claimed
    mixed = report.scope_text({"offline-full": {"01_main_vision": {"runs": [_run(0, 5.0), _run(1, 5.0, beta=1.0)]}}})
    assert "β =" not in mixed and "σ =" not in mixed
    assert "σ =" not in report.scope_text({})

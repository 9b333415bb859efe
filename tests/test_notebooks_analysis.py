"""The analysis notebooks (06, 07, 08, 09, 11) execute in the ci profile and their JSON holds the claims."""
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(name, tmp_path):
    pytest.importorskip("papermill")
    from lalora.notebooks import run_notebooks

    out = tmp_path / "results"
    summary = run_notebooks("ci", only=[name], root=ROOT, output_dir=out, runs_dir=tmp_path / "runs",
                            quiet=True, echo=lambda *a: None)
    assert not summary.failed, summary.failed[0].error
    data = json.loads((out / f"{name}.json").read_text())
    assert (out / "figures").is_dir() and any((out / "figures").glob(f"{name}_*.png"))
    return data


def test_08_noise_amplification(tmp_path):
    d = _run("08_noise_amplification", tmp_path)
    assert abs(d["slopes"]["NB_NA"] - 2) <= 0.1
    assert abs(d["slopes"]["NB_A"] - 1) <= 0.1 and abs(d["slopes"]["B_NA"] - 1) <= 0.1
    assert all(d["claims"].values())


def test_09_theorem_checks(tmp_path):
    d = _run("09_theorem_checks", tmp_path)
    assert d["claims"] and all(d["claims"].values()), d["claims"]
    assert all(s["measured_rate"] <= s["bound"] for s in d["theorem4"])


def test_06_sharpness(tmp_path):
    d = _run("06_sharpness", tmp_path)
    top = d["top_eigenvalue"]
    assert set(top) == {"dp-lora", "la-lora"}
    assert all(math.isfinite(v) for v in top.values())
    assert d["paper_top_eigenvalue"] == {"dp-lora": 101.62, "la-lora": 64.77}
    # sharpness is compared only between models at a minimum (final training loss below ln C)
    assert d["chance_loss"] == pytest.approx(math.log(d["num_classes"]))
    for r in d["runs"]:
        assert r["at_minimum"] == (r["loss"] < d["chance_loss"])
    assert d["at_minimum"] == {m: all(r["at_minimum"] for r in d["runs"] if r["method"] == m) for m in top}
    if not all(d["at_minimum"].values()):
        assert d["comparison"] is None
    else:   # one seed in ci: never a verdict
        assert d["comparison"]["verdict"] == "insufficient seeds"
    assert not any(isinstance(v, bool) for v in d["summary"].values())   # no bare flatter/sharper flag


def test_07_client_alignment(tmp_path):
    d = _run("07_client_alignment", tmp_path)
    for m, tr in d["traces"].items():
        assert len(tr["BA"]) == len(tr["rounds"]) >= 1
        assert all(-1 <= v <= 1 for v in tr["BA"] if v == v)


def test_11_reviewer_questions(tmp_path):
    d = _run("11_reviewer_questions", tmp_path)
    assert {r["method"] for r in d["local_steps"]} == {"dp-lora", "la-lora"}
    labels = [r["label"] for r in d["references"]]
    assert any("centralized" in l for l in labels) and any("∞" in l for l in labels)
    for section in ("local_steps", "alternation", "references"):
        assert all(0 <= r["accuracy"] <= 100 for r in d[section])

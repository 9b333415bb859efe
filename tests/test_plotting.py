"""lalora.plotting: house style, fixed method colours, PNG+PDF output."""
from __future__ import annotations

import matplotlib

matplotlib.use("agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from lalora import plotting  # noqa: E402

MAIN = ["fedavg-lora", "dp-lora", "ffa-lora", "rolora", "la-lora", "dp-lora+filter", "la-lora-filter"]


def test_method_colours_fixed_and_distinct():
    colours = [plotting.method_color(m) for m in MAIN]
    assert len(set(colours)) == len(MAIN), "methods that appear together need distinct colours"
    # Same method -> same colour every call (figures agree with each other).
    assert plotting.method_color("la-lora") == plotting.method_color("la-lora")
    assert plotting.method_palette(["la-lora"])["la-lora"] == plotting.method_color("la-lora")
    # Unknown methods still get a deterministic colour.
    assert plotting.method_color("my-method") == plotting.method_color("my-method")


def test_labels_and_order():
    assert plotting.method_label("la-lora") == "LA-LoRA"
    assert plotting.method_label("unknown-x") == "unknown-x"
    assert plotting.sort_methods(["la-lora", "zzz", "dp-lora", "rolora", "ffa-lora"]) == \
        ["dp-lora", "ffa-lora", "rolora", "la-lora", "zzz"]
    assert plotting.epsilon_label(float("inf")).startswith("ε = ∞")
    assert plotting.epsilon_label(3.0) == "ε = 3"


def test_savefig_writes_png_and_pdf(tmp_path):
    plotting.use_style()
    assert matplotlib.rcParams["pdf.fonttype"] == 42
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1], label="x", color=plotting.method_color("la-lora"))
    ax.set_xlabel("round")
    ax.legend()
    paths = plotting.savefig(fig, tmp_path, "00_test_curve", close=True)
    assert paths["png"] == tmp_path / "figures" / "00_test_curve.png"
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths["pdf"].read_bytes()[:5] == b"%PDF-"
    assert not plt.fignum_exists(fig.number)
    # Byte-stable PDF: re-saving the same figure gives the same bytes.
    fig2, ax2 = plt.subplots()
    ax2.plot([0, 1], [0, 1])
    a = plotting.savefig(fig2, tmp_path, "00_a")["pdf"].read_bytes()
    b = plotting.savefig(fig2, tmp_path, "00_b", close=True)["pdf"].read_bytes()
    assert a == b


@pytest.mark.parametrize("bad", ["", "a/b", "x.png"])
def test_savefig_rejects_bad_names(tmp_path, bad):
    fig = plt.figure()
    with pytest.raises(ValueError, match="name"):
        plotting.savefig(fig, tmp_path, bad)
    plt.close(fig)


def test_grouped_bars_and_lines_place_every_row():
    plotting.use_style()
    rows = [{"method": m, "epsilon": e, "accuracy_mean": 10.0 * i + (e if e != "inf" else 50), "accuracy_std": 1.0}
            for i, m in enumerate(["dp-lora", "la-lora"]) for e in [1.0, 3.0]]
    rows.append({"method": "fedavg-lora", "epsilon": "inf", "accuracy_mean": 90.0, "accuracy_std": 0.5})
    fig, ax = plt.subplots()
    plotting.grouped_bars(ax, rows, group_key="epsilon")
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    assert heights == sorted(r["accuracy_mean"] for r in rows)
    # The lone non-private bar is centred on its tick (ε = ∞ is the third group).
    lone = [p for p in ax.patches if p.get_height() == 90.0][0]
    assert abs(lone.get_x() + lone.get_width() / 2 - 2.0) < 1e-9
    assert [t.get_text() for t in ax.get_xticklabels()] == ["ε = 1", "ε = 3", "ε = ∞ (no DP)"]
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["FedAvg-LoRA (no DP)", "DP-LoRA", "LA-LoRA"]
    plt.close(fig)

    fig, ax = plt.subplots()
    xs = plotting.lines_vs(ax, rows, x_key="epsilon", inf_at=10.0)
    assert xs == [1.0, 3.0, 10.0]
    plt.close(fig)


def _rows(n):
    return [{"task": "t", "method": m, "epsilon": 3.0, "accuracy_mean": a, "accuracy_ci95": 4.0, "n_seeds": n}
            for m, a in (("dp-lora", 40.0), ("la-lora", 60.0))]


@pytest.mark.parametrize("n,has_bars", [(1, False), (3, True)])
def test_error_bars_only_with_two_seeds_and_n_on_every_bar(n, has_bars):
    fig, ax = plt.subplots()
    plotting.grouped_bars(ax, _rows(n), err="accuracy_ci95")
    assert bool(ax.containers and any(getattr(c, "errorbar", None) for c in ax.containers)) == has_bars
    labels = [t.get_text() for t in ax.texts]
    assert labels and all(f"n={n}" in t for t in labels)
    plt.close(fig)


def test_accuracy_figure_draws_the_majority_line_and_says_n():
    records = [{"task": "t", "majority_baseline": 15.0}, {"task": "t", "majority_baseline": 15.0}]
    fig = plotting.accuracy_bars_figure(_rows(1), records, ["t"], "x")
    ax = fig.axes[0]
    assert any(list(line.get_ydata()) == [15.0, 15.0] for line in ax.get_lines())
    assert "n = 1 seed" in fig._suptitle.get_text() and "no interval" in fig._suptitle.get_text()
    assert "CI" not in ax.get_ylabel()
    plt.close(fig)


def test_not_dp_rows_alone_are_marked_in_ci_bars():
    diffs = [{"claim": "real", "mean": 1.0, "ci_low": 0.5, "ci_high": 1.5, "verdict": "holds", "dp_mode": "dp"},
             {"claim": "released", "mean": 2.0, "ci_low": 1.0, "ci_high": 3.0, "verdict": "holds",
              "dp_mode": "as-released"}]
    fig, ax = plt.subplots()
    plotting.ci_bars(ax, diffs)
    colours = {t.get_text(): t.get_color() for t in ax.get_yticklabels()}
    assert colours["released"] == "crimson" and colours["real"] != "crimson"
    # one shaded band, around the not-DP row only (y = 0: rows are drawn top to bottom)
    bands = [p for p in ax.patches if p.get_facecolor()[0] > 0.8]
    assert len(bands) == 1 and bands[0].get_y() < 0 < bands[0].get_y() + bands[0].get_height()
    assert not [t for t in ax.texts if "NOT differentially private" in t.get_text()]
    plt.close(fig)

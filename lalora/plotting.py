"""The notebooks' house style: one seaborn theme, one colour and display name per method, PNG+PDF.

Every figure the notebooks save goes through :func:`savefig` after :func:`use_style`, so all
figures share fonts, sizes and a method's colour (LA-LoRA is the same orange in the main table,
the ablation and the privacy-utility curve). Colours come from seaborn's colour-blind palette.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

# Display names, in the order methods are shown (baselines first, LA-LoRA last among DP methods).
METHOD_LABELS: dict[str, str] = {
    "fedavg-lora": "FedAvg-LoRA (no DP)",
    "dp-lora": "DP-LoRA",
    "dp-lora+filter": "DP-LoRA + filter",
    "dp-lora-half-lr": "DP-LoRA ½ lr",   # the control of notebook 14 (lalora.tuning.DERIVED_ARMS)
    "ffa-lora": "FFA-LoRA",
    "rolora": "RoLoRA",
    "la-lora-filter": "LA-LoRA − filter",
    "la-lora": "LA-LoRA",
    "fedsa-lora": "FedSA-LoRA",
    "sam-lora": "SAM-LoRA",
    "flora": "FLoRA",
    "centralized-dp-lora": "Centralized DP-LoRA",
}
METHOD_ORDER: list[str] = list(METHOD_LABELS)

# Indices into seaborn's "colorblind" palette (10 colours), fixed per method.
_PALETTE_INDEX = {
    "fedavg-lora": 7,        # grey: the non-private reference
    "dp-lora": 0,            # blue
    "dp-lora+filter": 9,     # light blue: DP-LoRA's variant
    "dp-lora-half-lr": 6,    # pink: none of the main arms' colours (bars carry no marker)
    "ffa-lora": 2,           # green
    "rolora": 4,             # purple
    "la-lora-filter": 5,     # brown: LA-LoRA's variant
    "la-lora": 1,            # orange
    "fedsa-lora": 8,         # yellow
    "sam-lora": 6,           # pink
    "flora": 3,              # red
    "centralized-dp-lora": 7,
}
_MARKERS = {"fedavg-lora": "X", "dp-lora": "o", "dp-lora+filter": "v", "dp-lora-half-lr": "<", "ffa-lora": "s",
            "rolora": "D", "la-lora-filter": "P", "la-lora": "^", "fedsa-lora": "*", "sam-lora": "h", "flora": "p"}

# Single-column-ish figure sizes (inches) that stay readable at the saved size.
FIGSIZE = (6.4, 4.0)
FIGSIZE_WIDE = (9.6, 4.0)
DPI = 150


def use_style() -> None:
    """Apply the house style (call once at the top of every notebook)."""
    import matplotlib
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind", font_scale=0.95)
    matplotlib.rcParams.update({
        "figure.figsize": FIGSIZE,
        "figure.dpi": 100,
        "savefig.dpi": DPI,
        "savefig.bbox": "tight",
        "axes.titleweight": "bold",
        "legend.frameon": True,
        "legend.framealpha": 0.9,
        "pdf.fonttype": 42,   # embed TrueType: editable text in the PDF
        "ps.fonttype": 42,
        "svg.hashsalt": "lalora",
    })


def method_label(method: str) -> str:
    """Display name of a method (the method id itself if unknown)."""
    return METHOD_LABELS.get(method, method)


def method_color(method: str):
    """The fixed RGB colour of a method; unknown methods get a stable colour from their name."""
    import seaborn as sns

    palette = sns.color_palette("colorblind", 10)
    if method in _PALETTE_INDEX:
        return palette[_PALETTE_INDEX[method]]
    return palette[sum(map(ord, method)) % 10]


def method_marker(method: str) -> str:
    return _MARKERS.get(method, "o")


def method_palette(methods: Iterable[str]) -> dict[str, tuple]:
    """{method: colour} for seaborn's ``palette=`` argument."""
    return {m: method_color(m) for m in methods}


def sort_methods(methods: Iterable[str]) -> list[str]:
    """Methods in display order (known ones by METHOD_ORDER, then the rest alphabetically)."""
    methods = list(dict.fromkeys(methods))
    known = [m for m in METHOD_ORDER if m in methods]
    return known + sorted(m for m in methods if m not in METHOD_LABELS)


def epsilon_label(eps: float) -> str:
    """'ε = 3' / 'ε = ∞ (no DP)'."""
    if eps is None or eps == float("inf"):
        return "ε = ∞ (no DP)"
    return f"ε = {eps:g}"


def savefig(fig, output_dir: str | os.PathLike, name: str, *, close: bool = False) -> dict[str, Path]:
    """Write ``{output_dir}/figures/{name}.png`` and ``.pdf``; return both paths.

    The figure stays open by default so a notebook still shows it inline (the inline backend
    closes it after display); pass ``close=True`` in loops and scripts. The PDF carries no
    creation date, so re-rendering an unchanged figure gives the same bytes.
    """
    if not name or "/" in name or name.endswith((".png", ".pdf")):
        raise ValueError(f"name: expected a bare figure name like '01_main_vision_bars', got {name!r}")
    folder = Path(output_dir) / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"png": folder / f"{name}.png", "pdf": folder / f"{name}.pdf"}
    fig.savefig(paths["png"], dpi=DPI, bbox_inches="tight")
    fig.savefig(paths["pdf"], bbox_inches="tight", metadata={"CreationDate": None, "ModDate": None})
    if close:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return paths


# ----------------------------------------------------------------------------------------------
# Plots the result notebooks share (rows as written by lalora.nbtools.accuracy_table)
# ----------------------------------------------------------------------------------------------
def _as_float(v) -> float:
    return float("inf") if v in ("inf", None) else float(v)


def grouped_bars(ax, rows: list[dict], *, group_key: str = "epsilon", methods: list[str] | None = None,
                 value: str = "accuracy_mean", err: str = "accuracy_std", group_label=None,
                 annotate: bool = True, n_key: str = "n_seeds") -> None:
    """Bars of ``value`` ± ``err``: one group per ``group_key`` value, one bar per method.

    An error bar is drawn only for a row with ``n_key`` >= 2 (an interval over one seed is not an
    interval: issue 29 found "95% CI bars" with n = 1), and each bar's label says its n."""
    import numpy as np

    methods = sort_methods(methods or [r["method"] for r in rows])
    groups = sorted({r[group_key] for r in rows}, key=_as_float)
    lookup = {(r[group_key], r["method"]): r for r in rows}
    # Bars are centred within each group on the methods that group has (the ε = ∞ group usually
    # holds only the non-private reference).
    per_group = [[m for m in methods if (g, m) in lookup] for g in groups]
    width = 0.8 / max(max((len(p) for p in per_group), default=1), 1)
    for m in methods:
        xs, ys, es, ns = [], [], [], []
        for i, (g, present) in enumerate(zip(groups, per_group)):
            if m not in present:
                continue
            j = present.index(m)
            xs.append(i + width * (j - (len(present) - 1) / 2))
            row = lookup[(g, m)]
            ys.append(row[value])
            ns.append(row.get(n_key))
            es.append((row.get(err, 0.0) or 0.0) if (row.get(n_key) or 0) >= 2 else 0.0)
        if not xs:
            continue
        bars = ax.bar(xs, ys, width=width * 0.95, yerr=es if any(es) else None, capsize=3,
                      color=method_color(m), label=method_label(m), edgecolor="white", linewidth=0.5)
        if annotate:
            ax.bar_label(bars, labels=[f"{y:.0f}" + ("" if n is None else f"\nn={n}") for y, n in zip(ys, ns)],
                         padding=2, fontsize=6)
    label = group_label or (lambda g: epsilon_label(_as_float(g)) if group_key == "epsilon" else f"{group_key} = {g}")
    ax.set_xticks(np.arange(len(groups)), [label(g) for g in groups])
    mark_not_dp(ax, rows)


def lines_vs(ax, rows: list[dict], *, x_key: str, methods: list[str] | None = None,
             value: str = "accuracy_mean", err: str = "accuracy_std", inf_at: float | None = None) -> list:
    """One line per method of ``value`` against ``x_key`` with a ± ``err`` band.

    ``inf_at``: where to draw x = ∞ (e.g. ε = ∞ placed one step right of the largest finite ε).
    Returns the sorted x positions used (for tick labels).
    """
    import numpy as np

    methods = sort_methods(methods or [r["method"] for r in rows])
    xs_all = set()
    for m in methods:
        pts = sorted(((_as_float(r[x_key]), r[value], r.get(err, 0.0) or 0.0) for r in rows if r["method"] == m))
        if not pts:
            continue
        x = np.array([inf_at if (p[0] == float("inf") and inf_at is not None) else p[0] for p in pts])
        y = np.array([p[1] for p in pts])
        e = np.array([p[2] for p in pts])
        # Finite x joined by a line with a ± band; the x = ∞ point (drawn at inf_at) stands alone.
        finite = np.array([p[0] != float("inf") for p in pts])
        ok = np.isfinite(x)
        ax.plot(x[finite], y[finite], marker=method_marker(m), color=method_color(m), label=method_label(m),
                lw=1.8, ms=6)
        ax.fill_between(x[finite], (y - e)[finite], (y + e)[finite], color=method_color(m), alpha=0.15, lw=0)
        alone = ok & ~finite
        if alone.any():
            ax.errorbar(x[alone], y[alone], yerr=e[alone], fmt=method_marker(m), color=method_color(m),
                        ms=6, capsize=3)
        xs_all.update(x[ok].tolist())
    mark_not_dp(ax, rows)
    return sorted(xs_all)


def is_not_dp(row: dict) -> bool:
    """A row (run record or table row) produced by the released, non-DP mechanism."""
    from lalora.config import NOT_DP

    return row.get("dp_mode") == "as-released" or row.get("privacy") == NOT_DP


def mark_not_dp(ax, rows: Iterable[dict]) -> bool:
    """Stamp "NOT differentially private" on ``ax`` when any row comes from the released mechanism
    (``dp_mode = "as-released"``), so no figure can show those numbers without saying so."""
    from lalora.config import NOT_DP

    if not any(is_not_dp(r) for r in rows):
        return False
    # below the axes (under the x label), where it can never hide a data point
    ax.annotate(f"{NOT_DP} (as-released mechanism)", xy=(0.5, 0.0), xycoords="axes fraction",
                xytext=(0, -46), textcoords="offset points", ha="center", va="top", color="crimson",
                fontweight="bold", fontsize=9, bbox={"facecolor": "white", "edgecolor": "crimson"})
    return True


def ci_bars(ax, diffs: list[dict], *, label_key: str = "claim") -> None:
    """Paired differences with their 95% CI as error bars, one row per claim, a zero line, and the
    verdict written beside each (rows as produced by ``lalora.report.claim_verdicts``: ``mean``,
    ``ci_low``, ``ci_high``, ``verdict``). Rows without a CI (too few seeds) show the mean only."""
    import numpy as np

    ys = np.arange(len(diffs))[::-1]
    for y, d in zip(ys, diffs):
        mean = d.get("mean")
        if mean is None or not np.isfinite(mean):
            continue
        lo, hi = d.get("ci_low"), d.get("ci_high")
        has_ci = lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi)
        colour = {"holds": "tab:green", "reversed": "tab:red"}.get(d.get("verdict"), "0.4")
        xerr = [[mean - lo], [hi - mean]] if has_ci else None
        ax.errorbar([mean], [y], xerr=xerr, fmt="o", color=colour, capsize=4, ms=5)
        ax.annotate(d.get("verdict", ""), (hi if has_ci else mean, y), xytext=(6, 0),
                    textcoords="offset points", va="center", fontsize=7, color=colour)
    ax.axvline(0.0, color="0.3", lw=0.8, ls="--")
    ax.set_yticks(ys, [str(d.get(label_key, "")) for d in diffs])
    ax.set_xlabel("paired difference (points), mean and 95% CI over seeds")
    # Only the rows from the released mechanism are not DP: shade and colour those rows (a stamp
    # over the whole axes claimed it of the real-DP rows too; issue 29).
    for y, d, tick in zip(ys, diffs, ax.get_yticklabels()):
        if is_not_dp(d):
            ax.axhspan(y - 0.45, y + 0.45, color="crimson", alpha=0.08, lw=0, zorder=0)
            tick.set_color("crimson")


def majority_line(ax, baseline_pct: float | None, *, label: str = "majority class") -> None:
    """A dashed line at the accuracy of always predicting the most frequent training label: the bar
    below which a model has not trained (the report's "did not train" rule)."""
    import math

    if baseline_pct is None or not math.isfinite(baseline_pct):
        return
    ax.axhline(baseline_pct, color="0.35", lw=1.0, ls="--", zorder=0.5, label=f"{label} ({baseline_pct:.0f}%)")


def majority_by_task(records: Iterable[dict]) -> dict[str, float]:
    """Mean ``majority_baseline`` (%) per task over run records (one value per task in practice)."""
    import numpy as np

    out: dict[str, list[float]] = {}
    for r in records:
        if r.get("majority_baseline") is not None:
            out.setdefault(r["task"], []).append(float(r["majority_baseline"]))
    return {t: float(np.mean(v)) for t, v in out.items()}


def accuracy_bars_figure(table: list[dict], records: list[dict], tasks: list[str], title: str, *,
                         err: str = "accuracy_ci95"):
    """One panel of grouped bars (methods within each ε) per task, with the majority-class line;
    error bars (``err``, the 95% t half-width) only where n >= 2 seeds, n written on each bar."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(FIGSIZE[0] * len(tasks) * 0.8 + 1.6, FIGSIZE[1]),
                             squeeze=False, sharey=False)
    majority = majority_by_task(records)
    ns = sorted({r.get("n_seeds") for r in table if r.get("n_seeds") is not None})
    for ax, task in zip(axes[0], tasks):
        grouped_bars(ax, [r for r in table if r["task"] == task], group_key="epsilon", err=err)
        majority_line(ax, majority.get(task))
        ax.set_title(task)
        ax.set_xlabel("privacy budget (δ = 1e-5)")
        ax.set_ylabel("test accuracy (%)" + (", 95% t-CI bars where n ≥ 2" if ns and ns[-1] >= 2 else ""))
        ax.set_ylim(0, 110)
    legend_outside(axes[0][-1])
    seeds = f"n = {ns[0]} seed{'s' if ns[0] != 1 else ''}" if len(ns) == 1 else f"n = {'/'.join(map(str, ns))} seeds"
    fig.suptitle(f"{title}; {seeds}" + ("; one seed: no interval" if ns == [1] else ""), y=1.02)
    return fig


def legend_outside(ax, **kwargs) -> None:
    """Legend to the right of the axes, so it never hides data."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, **kwargs)

"""Per-round learning curves of finished runs, compact enough to commit in a notebook's JSON.

Why: run folders (``runs/<task>/<method>/<hash>/metrics.jsonl``) are not committed, so without this
a reader of the results cannot tell a method that learned slowly from one that diverged (issue 26:
DP-LoRA's final training loss above ln 10 was visible only in a notebook that reran it). Each curve
holds, per round, the training loss (mean over the round's sampled clients of their local losses,
as the simulation records it) and the test accuracy (%) where the round was evaluated.

Curves are keyed by run id, ``<method>/<hash>`` of the run folder (the id lalora.report uses to count
a run once), so a run shared by several records or notebooks is stored once.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

ACCURACY_DECIMALS = 2   # accuracy in %: 0.01 points, below one test image of any offline task
LOSS_DIGITS = 4         # significant digits of the losses


def run_id(run_dir: str | Path) -> str:
    """``<method>/<hash>``: the last two parts of a run folder."""
    return "/".join(Path(str(run_dir)).parts[-2:])


def _sig(x, digits: int = LOSS_DIGITS):
    if x is None:
        return None
    x = float(x)
    return float(f"{x:.{digits}g}") if math.isfinite(x) else None


def curve_from_metrics(metrics: Iterable[Mapping]) -> dict[str, list]:
    """Per-round lists from the records of a metrics.jsonl: ``round``, ``train_loss`` and
    ``test_accuracy`` (%; None where the round was not evaluated). Non-finite values become None
    (strict JSON). The test loss is left out: accuracy and training loss are what tell divergence
    from slow learning, and every number kept is multiplied by hundreds of committed runs."""
    out: dict[str, list] = {"round": [], "train_loss": [], "test_accuracy": []}
    for m in metrics:
        out["round"].append(int(m["round"]))
        out["train_loss"].append(_sig(m.get("train_loss")))
        acc = m.get("test_accuracy")
        out["test_accuracy"].append(None if acc is None or not math.isfinite(float(acc))
                                    else round(100.0 * float(acc), ACCURACY_DECIMALS))
    return out


def run_curve(run_dir: str | Path) -> dict[str, list]:
    """The curve of one finished run, read from its ``metrics.jsonl``."""
    from lalora.results import RunDir

    folder = RunDir(run_dir)
    if not folder.is_finished():
        raise FileNotFoundError(f"run_dir {run_dir} holds no finished run (no final.json)")
    return curve_from_metrics(folder.read_metrics())


def run_curves(records: Sequence[Mapping]) -> dict[str, dict[str, list]]:
    """{run id: curve} for every record with a ``run_dir`` (each run folder read once)."""
    curves: dict[str, dict[str, list]] = {}
    for rec in records:
        if rec.get("run_dir"):
            rid = run_id(rec["run_dir"])
            if rid not in curves:
                curves[rid] = run_curve(rec["run_dir"])
    return curves


def final_train_loss(curve: Mapping[str, list]) -> float:
    """The last round's training loss (NaN if none was recorded)."""
    values = [v for v in curve.get("train_loss", []) if v is not None]
    return float(values[-1]) if values else math.nan


def curves_figure(records: Sequence[Mapping], curves: Mapping[str, Mapping[str, list]],
                  methods: Sequence[str] = ("dp-lora", "la-lora"), *, by: str = "epsilon",
                  chance_loss: float | None = None, title: str = ""):
    """Test accuracy (top) and training loss (bottom) per round, one column per value of ``by``
    (ε by default), one colour per method: the mean over the records' seeds, each seed a thin line.
    ``chance_loss`` (e.g. ln of the class count) is drawn on the loss panels: a curve that ends
    above it did not train."""
    import matplotlib.pyplot as plt
    import numpy as np

    from lalora.plotting import FIGSIZE, legend_outside, method_color, method_label

    chosen = [r for r in records if r.get("method") in methods and r.get("run_dir")
              and run_id(r["run_dir"]) in curves]
    values = list(dict.fromkeys(str(r[by]) for r in chosen))
    ncol = max(1, len(values))
    fig, axes = plt.subplots(2, ncol, figsize=(FIGSIZE[0] * 0.6 * ncol + 1.6, FIGSIZE[1] * 1.5), squeeze=False,
                             sharex=True, sharey="row")
    for col, value in enumerate(values):
        for method in methods:
            group = [curves[run_id(r["run_dir"])] for r in chosen if r["method"] == method and str(r[by]) == value]
            if not group:
                continue
            color = method_color(method)
            for row, key in enumerate(("test_accuracy", "train_loss")):
                ax = axes[row][col]
                series = [(c["round"], c[key]) for c in group]
                for rounds, ys in series:
                    pts = [(x, y) for x, y in zip(rounds, ys) if y is not None]
                    if pts:
                        ax.plot(*zip(*pts), color=color, lw=0.6, alpha=0.35)
                rounds = series[0][0]
                if all(s[0] == rounds for s in series):
                    arr = np.array([[np.nan if y is None else y for y in ys] for _, ys in series], dtype=float)
                    if np.isfinite(arr).any(axis=0).any():
                        with np.errstate(all="ignore"):
                            mean = np.nanmean(arr, axis=0)
                        ax.plot(rounds, mean, color=color, lw=2,
                                label=f"{method_label(method)} (n={len(group)})" if row == 0 else None)
        axes[0][col].set_title(f"{'ε' if by == 'epsilon' else by} = {'∞' if value == 'inf' else value}")
        axes[1][col].set_xlabel("round")
        if chance_loss is not None:
            axes[1][col].axhline(chance_loss, color="0.4", ls=":", lw=1)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[1][0].set_ylabel("training loss" + (" (dotted: chance)" if chance_loss is not None else ""))
    legend_outside(axes[0][-1])
    fig.suptitle(title or "Per-round curves (thick: mean over seeds; thin: each seed)", y=1.01)
    return fig

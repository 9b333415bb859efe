"""The tuned protocol (SPEC §2): every arm's learning rate picked per ε on a PUBLIC validation split,
then the pick run on the test split with paired seeds; the paper protocol (one lr for every arm)
beside it.

Why: one fixed lr (the released code's 0.1, chosen at σ ≈ 0.2) makes a comparison at σ ≈ 2–7 a
comparison of which method tolerates that lr, not of the methods (issue 26: DP-LoRA diverged at
lr 0.1 while the others trained). Tuning on the test split would fit the pick to the data it is
judged on; tuning on the private data would have to be paid for in privacy budget. So the tasks carve a
validation split out of public data (``validation_fraction``; ``eval_split="validation"`` scores a
run on it; lalora.tasks.vision / text), and the procedure is, for each arm and each ε:

1. **validation phase**: every grid point (lr, and optionally the clipping norm C) trained with
   ``tuning_seeds`` (≥ 2) and scored on the validation split; no test image is touched;
2. **pick** (:func:`pick`): the point with the highest mean validation accuracy over those seeds
   (ties: the smaller lr·C, the more conservative step);
3. **test phase**: the pick trained with ``test_seeds`` (≥ 5, paired across arms: the same seed
   gives every arm the same partition, client schedule and LoRA init) and scored on the test split.

Tuning seeds are disjoint from test seeds (checked): the pick is then not selected on the very DP
noise draws its test score comes from. Arms may be derived from another arm's pick instead of
tuned (``DERIVED_ARMS``): DP-LoRA at half DP-LoRA's lr is the control for LA-LoRA, whose
alternation halves how often each factor moves. The paper protocol runs every arm at ``paper_lr``
(derived arms at their factor of it) with the same test seeds.

Both phases are one :func:`lalora.nbtools.run_grid` call each, so every run of a phase can be
trained in parallel by the runner, and identical configs share one cached run folder (a tuned pick
equal to the paper's lr is trained once for both protocols).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

from lalora.curves import final_train_loss, run_curves, run_id

# Arms that are not tuned: (arm, source arm, lr factor). Their lr is the factor times the source
# arm's lr under either protocol; they train as the source arm's method otherwise.
DERIVED_ARMS: dict[str, tuple[str, float]] = {"dp-lora-half-lr": ("dp-lora", 0.5)}
PROTOCOLS = ("tuned", "paper")
MIN_TUNING_SEEDS = 2
MIN_LRS = 5
MIN_LR_SPAN = 16.0


@dataclass(frozen=True)
class Pick:
    """The chosen grid point of one (task, arm, ε) and the validation curve it was chosen from."""

    task: str
    arm: str
    epsilon: Any
    lr: float
    clip_norm: float
    curve: list   # one dict per grid point: lr, clip_norm, seeds, accuracies, mean, std


def check_grid(lrs: Sequence[float], clip_norms: Sequence[float], tuning_seeds: Sequence[int],
               test_seeds: Sequence[int]) -> None:
    """One-line errors for a grid that would not be the stated protocol."""
    lrs = [float(v) for v in lrs]
    if len(set(lrs)) < MIN_LRS or any(not (v > 0 and math.isfinite(v)) for v in lrs):
        raise ValueError(f"lrs must hold >= {MIN_LRS} distinct positive learning rates, got {lrs}")
    if max(lrs) / min(lrs) < MIN_LR_SPAN - 1e-9:
        raise ValueError(f"lrs must span >= {MIN_LR_SPAN:g}x (max/min), got {max(lrs) / min(lrs):g}x: {lrs}")
    if not clip_norms or any(not (float(c) > 0 and math.isfinite(float(c))) for c in clip_norms):
        raise ValueError(f"clip_norms must be positive numbers, got {list(clip_norms)}")
    if len(set(tuning_seeds)) < MIN_TUNING_SEEDS:
        raise ValueError(f"tuning_seeds must hold >= {MIN_TUNING_SEEDS} distinct seeds, got {list(tuning_seeds)}")
    shared = sorted(set(tuning_seeds) & set(test_seeds))
    if shared:
        raise ValueError(f"tuning_seeds and test_seeds must be disjoint (the pick must not be chosen on the "
                         f"noise draws it is tested with); both hold {shared}")
    if len(set(test_seeds)) != len(test_seeds) or not test_seeds:
        raise ValueError(f"test_seeds must be distinct and non-empty, got {list(test_seeds)}")


def pick(curve: Sequence[dict]) -> dict:
    """The grid point with the highest mean validation accuracy; ties go to the smaller lr·C (then
    the smaller lr). Points whose mean is not finite (a run without a score) never win. Each point
    is a dict with ``lr``, ``clip_norm`` and ``mean``."""
    finite = [p for p in curve if p.get("mean") is not None and math.isfinite(p["mean"])]
    if not finite:
        raise ValueError("no grid point has a finite mean validation accuracy: nothing to pick")
    best = max(p["mean"] for p in finite)
    tied = [p for p in finite if p["mean"] == best]
    return min(tied, key=lambda p: (p["lr"] * p["clip_norm"], p["lr"]))


def _arm_method(arm: str) -> str:
    """The label ``make_config`` trains for ``arm`` (a method or a VARIANTS label)."""
    return DERIVED_ARMS[arm][0] if arm in DERIVED_ARMS else arm


def tuned_arms(arms: Sequence[str]) -> list[str]:
    """The arms that get a validation grid: every arm not derived, plus the sources of derived ones."""
    out = [a for a in arms if a not in DERIVED_ARMS]
    for a in arms:
        if a in DERIVED_ARMS and DERIVED_ARMS[a][0] not in out:
            out.append(DERIVED_ARMS[a][0])
    return out


def _run_points(base: dict, points: list[tuple[str, dict]], seeds: Sequence[int], runs_dir, **kw) -> list[dict]:
    """run_grid over (label, config point) pairs; each record's ``method`` becomes its label.

    run_grid returns its records point-major, seed-minor (one per seed per point); the labels are
    attached by that order and checked against each record's seed and ε."""
    from lalora.nbtools import run_grid

    records = run_grid(base, [p for _, p in points], seeds, runs_dir, **kw)
    if len(records) != len(points) * len(seeds):
        raise RuntimeError(f"run_grid returned {len(records)} records for {len(points)} points x {len(seeds)} seeds")
    for i, rec in enumerate(records):
        label, point = points[i // len(seeds)]
        if rec["seed"] != int(seeds[i % len(seeds)]) or str(rec["epsilon"]) != str(point["epsilon"]):
            raise RuntimeError(f"run_grid record {i} is not (seed {seeds[i % len(seeds)]}, ε {point['epsilon']})")
        rec["method"] = label
    return records


def _eps_key(eps) -> str:
    return "inf" if str(eps) in ("inf", "Infinity") or eps == math.inf else f"{float(eps):g}"


def validation_curves(records: Sequence[dict]) -> dict[tuple, list[dict]]:
    """{(task, arm, ε): [grid point rows]} from validation-phase records (``accuracy`` is the
    validation accuracy there), points in (lr, C) order."""
    import numpy as np

    groups: dict[tuple, dict[tuple, list[dict]]] = {}
    for r in records:
        key = (r["task"], r["method"], _eps_key(r["epsilon"]))
        point = (float(r["config"]["lr"]), float(r["config"]["clip_norm"]))
        groups.setdefault(key, {}).setdefault(point, []).append(r)
    out = {}
    for key, points in groups.items():
        rows = []
        for (lr, clip), recs in sorted(points.items()):
            acc = np.array([x["accuracy"] for x in recs], dtype=float)
            rows.append({"lr": lr, "clip_norm": clip, "seeds": [x["seed"] for x in recs],
                         "accuracies": [float(a) for a in acc], "mean": float(acc.mean()),
                         "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                         "train_loss_final": [x.get("train_loss_final") for x in recs]})
        out[key] = rows
    return out


def run_tuned_protocol(base: dict, arms: Sequence[str], epsilons: Sequence, *, lrs: Sequence[float],
                       tuning_seeds: Sequence[int], test_seeds: Sequence[int], runs_dir: str | os.PathLike,
                       clip_norms: Sequence[float] = (1.0,), paper_lr: float = 0.1,
                       reference_method: str | None = "fedavg-lora", echo=print) -> dict:
    """Both protocols for ``arms`` × ``epsilons`` on ``base`` (lalora.notebooks.experiment_base),
    whose ``task_overrides`` must carry ``validation_fraction`` > 0 (the same for every run, so the
    validation and test runs train on the same private data with the same backbone).

    Returns ``{"validation": [records], "picks": [Pick], "test": [records]}``: validation records
    are scored on the validation split (``accuracy`` is validation accuracy, ``split`` says so);
    test records carry ``protocol`` ("tuned" / "paper") and the arm in ``method``. The non-private
    ``reference_method`` runs once per test seed at ε = ∞ and ``paper_lr`` (protocol "paper").
    """
    check_grid(lrs, clip_norms, tuning_seeds, test_seeds)
    overrides = dict(base.get("task_overrides") or {})
    if not overrides.get("validation_fraction"):
        raise ValueError("task_overrides must set validation_fraction > 0: the tuned protocol picks on a "
                         "validation split carved from public data")
    if overrides.get("eval_split", "test") != "test":
        raise ValueError("task_overrides must not set eval_split: the tuned protocol sets it per phase")
    unknown = [a for a in arms if a in DERIVED_ARMS and DERIVED_ARMS[a][0] not in arms]
    if unknown:
        raise ValueError(f"arms {unknown} are derived from {[DERIVED_ARMS[a][0] for a in unknown]}, "
                         "which must be in arms too")
    val_base = {**base, "task_overrides": {**overrides, "eval_split": "validation"}}
    test_base = {**base, "task_overrides": overrides}

    # 1. validation phase: every tuned arm × ε × (lr, C), tuning seeds
    points = [(arm, {"method": _arm_method(arm), "epsilon": eps, "lr": float(lr), "clip_norm": float(c)})
              for eps in epsilons for arm in tuned_arms(arms) for c in clip_norms for lr in lrs]
    validation = _run_points(val_base, points, tuning_seeds, runs_dir, echo=echo)
    losses = run_curves(validation)   # the final training loss shows which grid points diverged
    for rec in validation:
        rec["split"] = "validation"
        rec["train_loss_final"] = final_train_loss(losses[run_id(rec["run_dir"])])
    curves = validation_curves(validation)

    # 2. picks
    picks: dict[tuple, Pick] = {}
    for eps in epsilons:
        for arm in tuned_arms(arms):
            curve = curves[(base["task"], arm, _eps_key(eps))]
            best = pick(curve)
            picks[(arm, _eps_key(eps))] = Pick(base["task"], arm, eps, best["lr"], best["clip_norm"], curve)
    for eps in epsilons:
        for arm, (source, factor) in DERIVED_ARMS.items():
            if arm in arms:
                src = picks[(source, _eps_key(eps))]
                picks[(arm, _eps_key(eps))] = Pick(base["task"], arm, eps, src.lr * factor, src.clip_norm,
                                                   [{"derived_from": source, "lr_factor": factor}])

    # 3. test phase: the picks and the paper protocol, test seeds, one grid
    def lr_paper(arm):
        return paper_lr * (DERIVED_ARMS[arm][1] if arm in DERIVED_ARMS else 1.0)

    test_points, protocols = [], []
    for eps in epsilons:
        for arm in arms:
            p = picks[(arm, _eps_key(eps))]
            test_points.append((arm, {"method": _arm_method(arm), "epsilon": eps, "lr": p.lr,
                                      "clip_norm": p.clip_norm}))
            protocols.append("tuned")
            test_points.append((arm, {"method": _arm_method(arm), "epsilon": eps, "lr": lr_paper(arm),
                                      "clip_norm": float(base.get("clip_norm", 1.0))}))
            protocols.append("paper")
    if reference_method:
        test_points.append((reference_method, {"method": reference_method, "epsilon": "inf", "lr": paper_lr,
                                               "clip_norm": float(base.get("clip_norm", 1.0))}))
        protocols.append("paper")
    test = _run_points(test_base, test_points, test_seeds, runs_dir, echo=echo)
    for i, rec in enumerate(test):
        rec["protocol"] = protocols[i // len(test_seeds)]
        rec["split"] = "test"
        # the lr and C live in rec["config"]: as top-level keys they would make every tuned arm its own
        # setting and no verdict would pair two arms (lalora.report.claim_verdicts)
        rec.pop("lr", None)
        rec.pop("clip_norm", None)
    return {"validation": validation, "picks": list(picks.values()), "test": test}


def count_runs(arms: Sequence[str], epsilons: Sequence, *, lrs: Sequence[float], clip_norms: Sequence[float],
               tuning_seeds: Sequence[int], test_seeds: Sequence[int], reference_method: str | None = "fedavg-lora"
               ) -> dict[str, int]:
    """How many runs :func:`run_tuned_protocol` asks for (before the run cache folds identical configs,
    e.g. a pick equal to the paper's lr): the sizing of docs/EVIDENCE_PLAN.md."""
    validation = len(tuned_arms(arms)) * len(epsilons) * len(lrs) * len(clip_norms) * len(tuning_seeds)
    test = len(arms) * len(epsilons) * len(PROTOCOLS) * len(test_seeds) + (len(test_seeds) if reference_method else 0)
    return {"validation": validation, "test": test, "total": validation + test}


def picks_table(picks: Sequence[Pick], paper_lr: float = 0.1) -> list[dict]:
    """One row per (arm, ε): the picked lr and C, its validation mean, and where it sits in the grid
    (an edge pick says the grid may be too narrow)."""
    rows = []
    for p in picks:
        tuned = [c for c in p.curve if "lr" in c]
        best = next((c for c in tuned if c["lr"] == p.lr and c["clip_norm"] == p.clip_norm), None)
        lrs = sorted({c["lr"] for c in tuned})
        rows.append({
            "task": p.task, "method": p.arm, "epsilon": _eps_key(p.epsilon), "lr": p.lr, "clip_norm": p.clip_norm,
            "validation_mean": best["mean"] if best else None,
            "derived_from": None if tuned else p.curve[0].get("derived_from"),
            "at_grid_edge": bool(lrs) and p.lr in (lrs[0], lrs[-1]),
            "paper_lr": paper_lr,
        })
    return rows


def validation_table(picks: Sequence[Pick]) -> list[dict]:
    """The validation curve of every (task, arm, ε) as JSON rows: the grid points of a tuned arm, or
    where a derived arm's lr comes from."""
    return [{"task": p.task, "method": p.arm, "epsilon": _eps_key(p.epsilon), "lr": p.lr, "clip_norm": p.clip_norm,
             "points": p.curve} for p in picks]


def validation_figure(picks: Sequence[Pick], title: str = ""):
    """Validation accuracy vs lr (log axis), one panel per ε, one line per tuned arm (mean over the
    tuning seeds, each seed a dot), the pick circled."""
    import matplotlib.pyplot as plt

    from lalora.plotting import FIGSIZE, legend_outside, method_color, method_label, method_marker

    tuned = [p for p in picks if p.curve and "lr" in p.curve[0]]
    eps_list = list(dict.fromkeys(_eps_key(p.epsilon) for p in tuned))
    fig, axes = plt.subplots(1, max(1, len(eps_list)), figsize=(FIGSIZE[0] * 0.75 * max(1, len(eps_list)) + 1.6,
                                                                FIGSIZE[1]), squeeze=False, sharey=True)
    for ax, eps in zip(axes[0], eps_list):
        for p in (q for q in tuned if _eps_key(q.epsilon) == eps):
            pts = [c for c in p.curve if c["clip_norm"] == p.clip_norm]
            color = method_color(p.arm)
            ax.plot([c["lr"] for c in pts], [c["mean"] for c in pts], marker=method_marker(p.arm), color=color,
                    label=method_label(p.arm))
            for c in pts:
                ax.scatter([c["lr"]] * len(c["accuracies"]), c["accuracies"], s=8, color=color, alpha=0.35)
            chosen = next(c for c in pts if c["lr"] == p.lr)
            ax.scatter([p.lr], [chosen["mean"]], s=160, facecolors="none", edgecolors=color, linewidths=1.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("learning rate (log scale)")
        ax.set_title("ε = ∞" if eps == "inf" else f"ε = {eps}")
    axes[0][0].set_ylabel("validation accuracy (%)")
    legend_outside(axes[0][-1], title="arm (circle: pick)")
    fig.suptitle(title or "Validation accuracy vs lr (mean over tuning seeds; dots: seeds)", y=1.02)
    return fig

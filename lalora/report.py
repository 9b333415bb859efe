"""Build ``paper/REPORT.md``: every reproduced number beside the number the paper reports.

Inputs are the JSON files the notebooks write (``results/<profile>/NN_name.json``) and the
reported numbers in ``paper/reported.yaml``. Nothing in the report is typed by hand: the
verdict on the paper's ranking (LA-LoRA > RoLoRA > FFA-LoRA > DP-LoRA) is computed from the
reproduced means for every (profile, notebook, task, ε) that has the methods.

Result-table schema (the notebooks 01-05 write it; anything else is shown generically)::

    {"notebook": "01_main_vision", "profile": "offline", "metric": "test accuracy (%)",
     "table": [{"task": "digits-swin", "method": "la-lora", "epsilon": 3.0 | "inf",
                "accuracy_mean": 91.2, "accuracy_std": 0.8, "n_seeds": 3, ...}, ...],
     "summary": {flat dict of key numbers}}

Every notebook JSON's ``summary`` dict becomes a table in a generic section, so notebooks written
later (06-12) appear without changes here. ``06_sharpness.json``'s ``top_eigenvalue`` =
``{"dp-lora": x, "la-lora": y}`` is shown beside the paper's 101.62 / 64.77.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from lalora.plotting import method_label, sort_methods

CLAIMED_RANKING = ["la-lora", "rolora", "ffa-lora", "dp-lora"]
PROFILE_ORDER = ["paper", "offline-full", "offline", "ci"]
RESULT_FILE = re.compile(r"^(\d\d)_[A-Za-z0-9_]+\.json$")
# Notebooks with a specific side-by-side section: notebook -> (reported.yaml key, title).
SIDE_BY_SIDE = {
    "01_main_vision": ("main_vision", "Main results: vision"),
    "02_main_language": ("main_language", "Main results: language"),
    "03_ablation": ("ablation", "Ablation: filter × alternation"),
}
VISION_HINTS = ("swin", "vit", "digits", "lfw", "cifar", "imagenet")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def load_reported(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    with open(path) as fh:
        data = yaml.safe_load(fh)
    if not isinstance(data, dict) or "paper" not in data:
        raise ValueError(f"reported: {path} has no 'paper' section")
    return data


def collect_results(results_root: str | os.PathLike,
                    profiles: Iterable[str] | None = None) -> dict[str, dict[str, dict]]:
    """{profile: {notebook: json}} for every ``results/<profile>/NN_*.json``.

    Unreadable files are kept as ``{"_error": "..."}`` so the report says so instead of failing.
    """
    root = Path(results_root)
    found: dict[str, dict[str, dict]] = {}
    if not root.is_dir():
        return found
    names = [p.name for p in root.iterdir() if p.is_dir()]
    wanted = list(profiles) if profiles else sorted(names, key=_profile_key)
    for profile in wanted:
        folder = root / profile
        if not folder.is_dir():
            continue
        per_nb = {}
        for path in sorted(folder.iterdir()):
            if not RESULT_FILE.match(path.name):
                continue
            try:
                with open(path) as fh:
                    per_nb[path.stem] = json.load(fh)
            except (OSError, ValueError) as err:
                per_nb[path.stem] = {"_error": f"{type(err).__name__}: {err}"}
        if per_nb:
            found[profile] = per_nb
    return found


def _profile_key(profile: str):
    return (PROFILE_ORDER.index(profile) if profile in PROFILE_ORDER else len(PROFILE_ORDER), profile)


# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------
def as_epsilon(value) -> float:
    """3, 3.0, "3", "inf", None (= no DP) -> float."""
    if value is None:
        return math.inf
    return float(value)


def fmt_eps(eps: float) -> str:
    return "∞" if math.isinf(eps) else f"{eps:g}"


def fmt_acc(mean, std=None, n=None) -> str:
    if mean is None or (isinstance(mean, float) and not math.isfinite(mean)):
        return "–"
    text = f"{mean:.2f}"
    if std is not None and n and n > 1:
        text += f" ± {std:.2f}"
    if n:
        text += f" (n={n})"
    return text


@dataclass
class Cell:
    mean: float
    std: float = 0.0
    n: int = 1


def table_groups(data: Mapping[str, Any], group_by: tuple[str, ...] = ("task", "epsilon")
                 ) -> dict[tuple, dict[str, Cell]]:
    """Rows of a result table grouped by (task, ε): {(task, ε): {method: Cell}}."""
    groups: dict[tuple, dict[str, Cell]] = {}
    for row in data.get("table", []) or []:
        if "method" not in row or "accuracy_mean" not in row:
            continue
        if row.get("dp_mode") == "as-released":   # not DP: never ranked beside DP results
            continue
        key = tuple(as_epsilon(row.get(k)) if k == "epsilon" else row.get(k) for k in group_by)
        groups.setdefault(key, {})[row["method"]] = Cell(
            float(row["accuracy_mean"]), float(row.get("accuracy_std") or 0.0), int(row.get("n_seeds") or 1))
    return groups


@dataclass
class RankingVerdict:
    """Whether the claimed order holds among the methods present."""

    methods: list[str]                 # claimed order restricted to those present
    observed: list[str]                # present methods sorted by mean, best first
    holds: bool
    violations: list[tuple[str, str, float, float, bool]] = field(default_factory=list)
    # (should-be-better, should-be-worse, mean of first, mean of second, within noise?)
    _means: dict = field(default_factory=dict, repr=False)

    def sentence(self) -> str:
        claimed = " > ".join(method_label(m) for m in self.methods)
        if self.holds:
            return f"holds ({claimed})"
        parts = []
        for better, worse, mb, mw, noise in self.violations:
            note = ", a tie" if mb == mw else (", within one std" if noise else "")
            parts.append(f"{method_label(better)} {mb:.2f} ≤ {method_label(worse)} {mw:.2f}{note}")
        observed = method_label(self.observed[0])
        for prev, m in zip(self.observed, self.observed[1:]):
            observed += (" = " if self._means[prev] == self._means[m] else " > ") + method_label(m)
        return f"does not hold: {'; '.join(parts)} (observed {observed})"


def check_ranking(cells: Mapping[str, Cell], claimed: list[str] = CLAIMED_RANKING) -> RankingVerdict | None:
    """Compare every adjacent pair of the claimed order (restricted to methods present).

    A pair is violated when the method claimed better has a mean that is not strictly higher.
    "Within noise" flags a violation whose gap is smaller than the larger of the two stds.
    Returns None with fewer than two of the claimed methods.
    """
    present = [m for m in claimed if m in cells and math.isfinite(cells[m].mean)]
    if len(present) < 2:
        return None
    violations = []
    for better, worse in zip(present, present[1:]):
        a, b = cells[better], cells[worse]
        if not a.mean > b.mean:
            noise = abs(a.mean - b.mean) <= max(a.std, b.std)
            violations.append((better, worse, a.mean, b.mean, noise))
    observed = sorted(present, key=lambda m: -cells[m].mean)
    return RankingVerdict(present, observed, not violations, violations, {m: cells[m].mean for m in present})


# --------------------------------------------------------------------------------------------
# Verdicts from paired seeds (issue 15)
# --------------------------------------------------------------------------------------------
# A claim "X > Y" is judged on the paired per-seed differences acc_X(seed) − acc_Y(seed) (the same
# seed gives both methods the same partition, schedule, LoRA init and data order): their mean and a
# two-sided 95% Student-t interval, mean ± t_{0.975, n−1} · sd / √n. The verdict reads the interval
# alone: "holds" when it lies above 0, "reversed" when below, "unresolved" when it contains 0. With
# fewer than MIN_SEEDS paired seeds there is no verdict ("insufficient seeds"); a task whose model
# did not beat its majority-class baseline non-privately gets "did not train" (ranking methods on a
# model that learned nothing says nothing about the methods). Why 5 and not 3: with 3 seeds the t
# quantile is 4.30 (vs 2.78 at 5), so a 3-seed interval is ~1.5x wider for the same spread, and the
# offline evidence (issue 15) asks for >= 5 paired seeds behind every verdict.
MIN_SEEDS = 5
CONFIDENCE = 0.95
# Both arms of a claim at or below the majority-class baseline: neither private model learned anything,
# so a difference between them (e.g. the same one test example on every seed, a zero-width interval)
# says nothing about the methods.
NEITHER_TRAINED = "neither trained (both ≤ majority baseline)"
# Per-run fields of a run record; every other field (task, epsilon, beta, dp_mode, ...) names the setting.
RUN_FIELDS = {"method", "seed", "accuracy", "epsilon_spent", "target_epsilon", "noise_multiplier", "private",
              "cached", "wall_time_s", "run_dir", "curve", "majority_baseline", "privacy", "fedsa_scoring",
              "label", "filter"}


@dataclass
class PairedDifference:
    """Mean and CONFIDENCE t-interval of paired per-seed differences (NaN bounds with n < 2)."""

    n: int
    mean: float
    ci_low: float
    ci_high: float
    seeds: list = field(default_factory=list)


def t_halfwidth(values, confidence: float = CONFIDENCE) -> float:
    """Half-width of the two-sided Student-t interval of the mean of ``values`` (NaN for n < 2)."""
    import numpy as np
    from scipy import stats

    v = np.asarray(list(values), dtype=float)
    if v.size < 2:
        return math.nan
    return float(stats.t.ppf(0.5 + confidence / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))


def paired_difference(better: Mapping[Any, float], worse: Mapping[Any, float],
                      confidence: float = CONFIDENCE) -> PairedDifference:
    """Differences better[seed] − worse[seed] over the seeds both have (unpaired seeds are dropped)."""
    seeds = sorted(set(better) & set(worse), key=str)
    diffs = [float(better[s]) - float(worse[s]) for s in seeds]
    if not diffs:
        return PairedDifference(0, math.nan, math.nan, math.nan, [])
    mean = sum(diffs) / len(diffs)
    half = t_halfwidth(diffs, confidence)
    return PairedDifference(len(diffs), mean, mean - half, mean + half, seeds)


def verdict(diff: PairedDifference, *, trained: bool | None = None, min_seeds: int = MIN_SEEDS,
            at_chance: bool = False) -> str:
    """holds / reversed / unresolved from the CI alone; "insufficient seeds" below ``min_seeds``;
    "did not train" when the task's model did not beat its majority baseline (``trained`` False;
    None = not known, judged on the CI)."""
    if trained is False:
        return "did not train"
    if diff.n < min_seeds:
        return "insufficient seeds"
    if at_chance:   # both private arms at or below the majority baseline
        return NEITHER_TRAINED
    if diff.ci_low > 0:
        return "holds"
    if diff.ci_high < 0:
        return "reversed"
    return "unresolved"


def claim_pairs(methods: Iterable[str], claimed: list[str] = CLAIMED_RANKING) -> list[tuple[str, str]]:
    """The claims to judge among the methods present: each adjacent pair of the claimed order, plus
    first vs last (the headline, e.g. LA-LoRA > DP-LoRA) when they are not adjacent."""
    present = [m for m in claimed if m in set(methods)]
    pairs = list(zip(present, present[1:]))
    if len(present) > 2:
        pairs.append((present[0], present[-1]))
    return pairs


def _setting_of(run: Mapping[str, Any]) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in run.items()
                        if k not in RUN_FIELDS and not isinstance(v, (Mapping, list, tuple))))


def _run_id(run: Mapping[str, Any]) -> str:
    """What identifies a trained run across notebooks: its run folder (method/hash), else its fields."""
    if run.get("run_dir"):
        return "/".join(Path(str(run["run_dir"])).parts[-2:])
    return json.dumps({k: str(v) for k, v in sorted(run.items()) if k not in ("cached", "wall_time_s", "curve")})


def trained_tasks(runs: Iterable[Mapping[str, Any]]) -> dict[str, bool]:
    """{task: did its non-private runs beat the majority-class baseline on average?} for tasks that
    have non-private runs recording ``majority_baseline`` (in %); other tasks are absent (unknown)."""
    acc: dict[str, list[float]] = {}
    base: dict[str, float] = {}
    for r in runs:
        if as_epsilon(r.get("epsilon")) != math.inf or r.get("majority_baseline") is None:
            continue
        b = float(r["majority_baseline"])
        if not math.isfinite(b):
            continue
        acc.setdefault(r["task"], []).append(float(r["accuracy"]))
        base[r["task"]] = b
    return {t: _beats_baseline(a, base[t]) for t, a in acc.items()}


def _beats_baseline(accuracies: list[float], baseline: float) -> bool:
    """The one "did it learn anything" rule: mean accuracy above the majority-class baseline."""
    return sum(accuracies) / len(accuracies) > baseline


def _both_at_chance(runs: list[Mapping[str, Any]]) -> bool:
    by_method: dict[str, list[float]] = {}
    base = None
    for r in runs:
        if r.get("majority_baseline") is None:
            return False
        base = float(r["majority_baseline"])
        by_method.setdefault(r["method"], []).append(float(r["accuracy"]))
    return base is not None and not any(_beats_baseline(v, base) for v in by_method.values())


def claim_verdicts(runs: Iterable[Mapping[str, Any]], claimed: list[str] = CLAIMED_RANKING, *,
                   trained: Mapping[str, bool] | None = None, min_seeds: int = MIN_SEEDS,
                   confidence: float = CONFIDENCE, pairs: list[tuple[str, str]] | None = None) -> list[dict]:
    """One row per (setting, claim) over per-seed run records (``runs`` of a notebook JSON).

    A setting is everything a record holds besides the per-run fields (task, ε, β, dp_mode, ...);
    ε = ∞ settings (the non-private reference) are not ranked. ``trained`` maps task -> bool (see
    :func:`trained_tasks`; default: computed from ``runs``). Each row carries the run ids of both
    arms (``runs``) so that callers can count a run set once. ``pairs`` (better, worse) replaces the
    claims derived from ``claimed``.
    """
    runs = [r for r in runs if isinstance(r, Mapping) and all(k in r for k in ("task", "method", "seed", "epsilon"))
            and r.get("accuracy") is not None]
    trained = dict(trained_tasks(runs) if trained is None else trained)
    by_setting: dict[tuple, dict[str, dict]] = {}
    values: dict[tuple, dict] = {}     # the setting's fields with their original types
    for r in runs:
        key = _setting_of(r)
        by_setting.setdefault(key, {}).setdefault(r["method"], {})[r["seed"]] = r
        values.setdefault(key, {k: r[k] for k, _ in key})
    rows = []
    for setting, per_method in sorted(by_setting.items(), key=lambda kv: str(kv[0])):
        where = values[setting]
        if math.isinf(as_epsilon(where.get("epsilon"))):
            continue
        todo = claim_pairs(per_method, claimed) if pairs is None else \
            [(a, b) for a, b in pairs if a in per_method and b in per_method]
        for better, worse in todo:
            a = {s: float(r["accuracy"]) for s, r in per_method[better].items()}
            b = {s: float(r["accuracy"]) for s, r in per_method[worse].items()}
            diff = paired_difference(a, b, confidence)
            judged = verdict(diff, trained=trained.get(where.get("task")), min_seeds=min_seeds,
                             at_chance=_both_at_chance([per_method[m][s] for m in (better, worse) for s in diff.seeds]))
            rows.append({
                **where, "claim": f"{method_label(better)} > {method_label(worse)}", "better": better,
                "worse": worse, "n": diff.n, "mean": diff.mean, "ci_low": diff.ci_low, "ci_high": diff.ci_high,
                "seeds": diff.seeds, "confidence": confidence,
                "verdict": judged,
                "runs": sorted(_run_id(per_method[m][s]) for m in (better, worse) for s in diff.seeds),
            })
    return rows


def fmt_diff(row: Mapping[str, Any]) -> str:
    if not math.isfinite(row.get("mean", math.nan)):
        return "–"
    if not (math.isfinite(row.get("ci_low", math.nan)) and math.isfinite(row.get("ci_high", math.nan))):
        return f"{row['mean']:+.2f} (no CI)"
    return f"{row['mean']:+.2f} [{row['ci_low']:+.2f}, {row['ci_high']:+.2f}]"


def verdict_overview(results: dict, reported: dict) -> tuple[str, dict]:
    """The verdict table of every notebook with per-seed runs, each distinct run set counted once
    (an ε sweep cell that re-reads the main table's runs is shown as "same runs as ..." and not
    counted again). Returns (markdown, counts per verdict over distinct run sets)."""
    claimed = list(reported.get("claimed_ranking") or CLAIMED_RANKING)
    out = ["## Verdicts: paired seeds, 95% confidence intervals", "",
           f"Per claim, the mean over paired seeds of the accuracy difference (points) and its two-sided "
           f"95% Student-t interval (mean ± t·sd/√n). Verdict from the interval alone: **holds** (above 0), "
           f"**reversed** (below 0), **unresolved** (contains 0); no verdict from fewer than {MIN_SEEDS} "
           f"seeds (**insufficient seeds**); **did not train** when the task's non-private model did not "
           f"beat its majority-class baseline, **{NEITHER_TRAINED}** when both private arms' mean accuracies do "
           f"not beat it either. A run set already counted elsewhere is marked "
           f"\"same runs as ...\" and counted once.", ""]
    counts: dict[str, int] = {}
    first_use: dict[tuple, str] = {}   # (profile, claim, run id) -> where that claim first used the run
    rows_md, unjudged = [], []
    for profile, per_nb in results.items():
        profile_runs = [r for data in per_nb.values() if isinstance(data.get("runs"), list)
                        for r in data["runs"] if isinstance(r, Mapping)]
        trained = trained_tasks(profile_runs)
        for notebook in sorted(per_nb):
            data = per_nb[notebook]
            if "_error" in data or not isinstance(data.get("runs"), list):
                continue
            for row in claim_verdicts(data["runs"], _claimed_for(notebook, reported), trained=trained):
                setting = ", ".join(f"{k} = {fmt_eps(as_epsilon(v)) if k == 'epsilon' else v}"
                                    + (" (NOT differentially private)" if v == "as-released" else "")
                                    for k, v in row.items()
                                    if k not in ("claim", "better", "worse", "n", "mean", "ci_low", "ci_high",
                                                 "seeds", "confidence", "verdict", "runs"))
                where = f"`{profile}` / {notebook}"
                shown = row["verdict"]
                claim = (profile, row["better"], row["worse"])
                earlier = [first_use[(*claim, r)] for r in row["runs"] if (*claim, r) in first_use]
                if row["runs"] and len(earlier) == len(row["runs"]):
                    shown = f"same runs as {earlier[0]}"           # not independent evidence
                else:
                    if earlier:
                        shown += f" (shares {len(earlier)} of {len(row['runs'])} runs with {earlier[0]})"
                    counts[row["verdict"]] = counts.get(row["verdict"], 0) + 1
                    for r in row["runs"]:
                        first_use.setdefault((*claim, r), f"{where} ({setting})")
                line = [where, setting, row["claim"], row["n"], fmt_diff(row), shown]
                (unjudged if row["verdict"] == "insufficient seeds" else rows_md).append(line)
    if not rows_md and not unjudged:
        out.append("No notebook result with per-seed runs yet.")
        return "\n".join(out), counts
    out.append("Distinct run sets: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + ".")
    out.append("")
    header = ["where", "setting", "claim", "seeds", "difference [95% CI]", "verdict"]
    out.append(md_table(header, rows_md) if rows_md else f"No claim has {MIN_SEEDS} paired seeds yet.")
    if unjudged:
        # Listed apart so that the table above holds verdicts only; these are descriptive.
        out += ["", f"### Not judged: fewer than {MIN_SEEDS} paired seeds", "",
                f"{len(unjudged)} claim rows whose runs have fewer than {MIN_SEEDS} paired seeds: the mean "
                "difference is shown for reference, no verdict is drawn from it.", "",
                md_table(header, unjudged)]
    return "\n".join(out), counts


REFERENCE_METHOD = "fedavg-lora"   # the non-private upper bound the notebooks run at ε = ∞


def dp_cost_rows(results: dict, notebooks: Iterable[str] = ("01_main_vision", "02_main_language")) -> list[dict]:
    """What DP costs in each profile's main regime: non-private FedAvg-LoRA − DP-LoRA (real DP), paired
    by seed, per (profile, notebook, task, ε), with the majority-class baseline beside the non-private
    accuracy (a task whose non-private model barely beats it cannot show a DP cost)."""
    rows = []
    for profile, per_nb in results.items():
        for notebook in notebooks:
            runs = [r for r in (per_nb.get(notebook) or {}).get("runs") or [] if isinstance(r, Mapping)
                    and r.get("accuracy") is not None and r.get("dp_mode", "dp") == "dp"]
            for task in sorted({r.get("task") for r in runs}, key=str):
                ref = {r["seed"]: float(r["accuracy"]) for r in runs
                       if r["task"] == task and r["method"] == REFERENCE_METHOD}
                if not ref:
                    continue
                base = [float(r["majority_baseline"]) for r in runs
                        if r["task"] == task and r.get("majority_baseline") is not None]
                for eps in sorted({as_epsilon(r["epsilon"]) for r in runs if r["task"] == task} - {math.inf}):
                    dp = {r["seed"]: float(r["accuracy"]) for r in runs if r["task"] == task
                          and r["method"] == "dp-lora" and as_epsilon(r["epsilon"]) == eps}
                    diff = paired_difference(ref, dp)
                    if diff.n == 0:
                        continue
                    ref_mean = sum(ref[s] for s in diff.seeds) / diff.n
                    rows.append({"profile": profile, "notebook": notebook, "task": task, "epsilon": eps,
                                 "n": diff.n, "nonprivate": ref_mean, "dp": ref_mean - diff.mean,
                                 "mean": diff.mean, "ci_low": diff.ci_low, "ci_high": diff.ci_high,
                                 "majority": base[0] if base else math.nan})
    return rows


def dp_cost_section(results: dict) -> str:
    rows = dp_cost_rows(results)
    out = ["## What DP costs in each regime", "",
           "Non-private FedAvg-LoRA (ε = ∞) minus DP-LoRA (real DP) on the same seeds (points; mean and 95% "
           "Student-t interval of the paired differences). The paper's regime costs 20–30 points; a regime "
           "where DP costs nothing cannot show what LA-LoRA is for (reducing the noise's damage). The "
           "majority-class baseline is beside the non-private accuracy.", ""]
    if not rows:
        return "\n".join(out + ["No profile has both non-private and DP-LoRA runs yet."])
    out.append(md_table(
        ["profile / notebook", "task", "ε", "seeds", "non-private", "DP-LoRA", "DP cost [95% CI]",
         "majority baseline", "non-private / baseline"],
        [[f"`{r['profile']}` / {r['notebook']}", r["task"], fmt_eps(r["epsilon"]), r["n"], f"{r['nonprivate']:.2f}",
          f"{r['dp']:.2f}", fmt_diff(r), f"{r['majority']:.1f}" if math.isfinite(r["majority"]) else "–",
          f"{r['nonprivate'] / r['majority']:.2f}×" if math.isfinite(r["majority"]) and r["majority"] > 0 else "–"]
         for r in rows]))
    return "\n".join(out)


def _regime(results: dict, notebook: str) -> dict | None:
    """The DP-LoRA runs' shared settings in `offline-full`'s notebook (read from the committed run
    configs, so the scope paragraph cannot drift from what ran); None when absent or not shared."""
    runs = [r for r in ((results.get("offline-full") or {}).get(notebook) or {}).get("runs") or []
            if isinstance(r, Mapping) and r.get("method") == "dp-lora" and r.get("dp_mode", "dp") == "dp"
            and isinstance(r.get("config"), Mapping)]
    if not runs:
        return None
    keys = ("clients", "clients_per_round", "beta", "batch_size", "r", "alpha", "epsilon")
    shared = {k: {json.dumps(r["config"].get(k)) for r in runs} for k in keys}
    if any(len(v) != 1 for v in shared.values()):
        return None
    out = {k: json.loads(next(iter(v))) for k, v in shared.items()}
    sigmas = sorted(float(r["noise_multiplier"]) for r in runs if r.get("noise_multiplier") is not None)
    out["sigma"] = (sigmas[0], sigmas[-1]) if sigmas else None
    return out


def _fmt_num(v) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) else str(v)


def scope_text(results: dict) -> str:
    """The report's scope paragraph; offline-full's regime (clients, β, batch, r, α, ε, σ) comes from
    its committed run configs."""
    vision, language = _regime(results, "01_main_vision"), _regime(results, "02_main_language")
    if vision:
        sig = vision["sigma"]
        sigma = "" if sig is None else (f", σ = {sig[0]:.1f}" if f"{sig[0]:.1f}" == f"{sig[1]:.1f}"
                                        else f", σ = {sig[0]:.1f}–{sig[1]:.1f}")
        protocol = (f"the paper's protocol ({vision['clients']} clients, {vision['clients_per_round']} per round, "
                    f"Dirichlet β = {_fmt_num(vision['beta'])}, batch {vision['batch_size']}, LoRA r = "
                    + (f"α = {vision['r']}" if float(vision["alpha"]) == float(vision["r"])
                       else f"{vision['r']}, α = {_fmt_num(vision['alpha'])}")
                    + " on qkv + proj for vision)")
        in_range = sig is not None and 4.0 <= sig[0] and sig[1] <= 6.0
        regime = (f"vision at ε = {fmt_eps(as_epsilon(vision['epsilon']))}{sigma}"
                  + (" in the paper's 4–6 range" if in_range else " (the paper's σ: 4–6)"))
    else:
        protocol, regime = "the paper's protocol", "vision"
    lang = (f"language at ε = {fmt_eps(as_epsilon(language['epsilon']))}" if language else "language")
    return (
        "**What the offline profiles can and cannot say.** `offline-full` is the evidence: real offline data "
        "(scikit-learn digits with a small Swin pretrained on a public split; MiniLM-L6 on chatterbot topics), "
        f"{protocol} in a regime where DP costs at least as much as in the paper ({regime}; {lang}, where "
        "neither private arm beat the majority baseline; both measured below), and ≥ 5 paired seeds behind "
        "every verdict (the same seed gives every method the same "
        "partition, client schedule, LoRA init and data order). It can say whether the paper's ordering and "
        "gaps between methods appear under real DP at small scale, to within the intervals shown; it cannot "
        "say anything about the paper's absolute accuracies, its models (Swin-T/B, RoBERTa-base) or data sets "
        "(CIFAR-100, Tiny-ImageNet, GLUE), about effects smaller than an interval's half-width, or about "
        "settings it did not run. Its results are committed with the code version and command that produced "
        "them (`results/offline-full/notebooks/runner_summary.json`), and a test re-runs a random cell bit for "
        "bit. `offline` (`make reproduce`, ≤ 45 min) is a quicker check of the whole pipeline at ε = 3, where "
        "DP costs little, with ≤ 3 seeds per cell outside notebook 13: it draws no verdict there. FedSA-LoRA, "
        "where a profile runs it, is scored over the clients that trained (not over never-sampled clients); no "
        "offline cell runs it. `ci` numbers mean nothing; only "
        "`paper` runs (a GPU, the paper's data and weights) can test the paper's own numbers."
    )


# --------------------------------------------------------------------------------------------
# Markdown helpers
# --------------------------------------------------------------------------------------------
def md_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v):
        if isinstance(v, float):
            return "∞" if math.isinf(v) else f"{v:.4g}"
        return str(v).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out += _flatten(v, key + ".")
        elif isinstance(v, (list, tuple)) and len(v) > 8:
            out.append((key, f"[{len(v)} values]"))
        else:
            out.append((key, v))
    return out


def _is_vision(task: str) -> bool:
    return any(h in str(task).lower() for h in VISION_HINTS)


def _reported_for(rows: list[dict], task: str, eps: float, vision_section: bool) -> dict | None:
    """The reported row to show beside a reproduced (task, ε): same task id, else same ε."""
    for row in rows:
        if row.get("task") == task and as_epsilon(row.get("epsilon")) == eps:
            return row
    for row in rows:
        if row.get("task") == task:
            return row
    for row in rows:
        if as_epsilon(row.get("epsilon")) == eps:
            return row
    return rows[0] if rows else None


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
def _no_links(profile: str, notebook: str, key: str) -> str:
    return ""


def verdict_linker(results_root: Path, report_dir: Path):
    """``links(profile, notebook, key)`` -> " ([notebook § section](…), [figure](…))" (lalora.site).

    The notebook link opens the rendered site (``lalora site --profile <profile>``); without
    nbconvert/jupytext (the notebooks extra) the report is written without links.
    """
    try:
        from lalora.site import verdict_links_md
        import nbconvert  # noqa: F401  (the anchors are nbconvert's heading ids)
    except ImportError:
        return _no_links

    def links(profile: str, notebook: str, key: str) -> str:
        return verdict_links_md(results_root, profile, notebook, key, report_dir)
    return links


def _side_by_side(results: dict, reported: dict, notebook: str, links=_no_links) -> str:
    key, title = SIDE_BY_SIDE[notebook]
    section = reported.get(key, {}) or {}
    rep_rows = section.get("rows", [])
    out = [f"## {title}", ""]
    if rep_rows:
        out.append(f"Reported ({section.get('source', 'source unknown')}):")
        out.append("")
        methods = sort_methods(m for r in rep_rows for m in r.get("accuracy", {}))
        out.append(md_table(["setting", "ε"] + [method_label(m) for m in methods],
                            [[f"{r['model']} / {r['dataset']}", fmt_eps(as_epsilon(r["epsilon"]))]
                             + [f"{r['accuracy'][m]:.2f}" if m in r["accuracy"] else "–" for m in methods]
                             for r in rep_rows]))
        out.append("")
    any_repro = False
    for profile, per_nb in results.items():
        data = per_nb.get(notebook)
        if not data or "_error" in data:
            if data:
                out += [f"*{profile}*: could not read {notebook}.json ({data['_error']}).", ""]
            continue
        groups = table_groups(data)
        # The non-private reference (ε = ∞) is shown as an extra row in each finite-ε table.
        reference = {task: cells for (task, eps), cells in groups.items() if math.isinf(eps)}
        finite_tasks = {task for (task, eps) in groups if not math.isinf(eps)}
        for (task, eps), cells in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
            if math.isinf(eps) and task in finite_tasks:
                continue
            any_repro = True
            ref = _reported_for(rep_rows, task, eps, _is_vision(task))
            same = ref is not None and ref.get("task") == task
            ref_name = (f"{ref['model']} / {ref['dataset']}, ε = {fmt_eps(as_epsilon(ref['epsilon']))}"
                        if ref else "none")
            out.append(f"**Reproduced** — profile `{profile}`, task `{task}`, ε = {fmt_eps(eps)}; "
                       f"reported column: {ref_name}"
                       + ("" if same or ref is None else " (a different task and model: compare the order "
                          "and the gaps, not the absolute values)"))
            out.append("")
            rows = []
            for m in sort_methods(cells):
                c = cells[m]
                rep = ref.get("accuracy", {}).get(m) if ref else None
                rows.append([method_label(m), fmt_acc(c.mean, c.std, c.n),
                             f"{rep:.2f}" if rep is not None else "–"])
            if not math.isinf(eps):
                for m, c in sorted(reference.get(task, {}).items()):
                    rows.append([f"{method_label(m)} (ε = ∞)", fmt_acc(c.mean, c.std, c.n), "–"])
            out.append(md_table(["method", f"reproduced ({data.get('metric', 'accuracy %')})", "reported"], rows))
            verdict = check_ranking(cells, _claimed_for(notebook, reported))
            if verdict:
                out += ["", f"Ranking {verdict.sentence()}.{links(profile, notebook, 'ranking holds')}"]
            out.append("")
    if not any_repro:
        out += [f"No reproduced results yet (`results/<profile>/{notebook}.json` not found).", ""]
    return "\n".join(out)


def _claimed_for(notebook: str, reported: dict) -> list[str]:
    if notebook == "03_ablation":
        # The paper's ablation order: full LA-LoRA > LA-LoRA − filter > DP-LoRA + filter > DP-LoRA.
        rows = (reported.get("ablation") or {}).get("rows") or []
        if rows:
            acc = rows[0]["accuracy"]
            return sorted(acc, key=lambda m: -acc[m])
    return list(reported.get("claimed_ranking") or CLAIMED_RANKING)


def ranking_overview(results: dict, reported: dict, links=_no_links) -> tuple[str, dict]:
    """One line per (profile, notebook, task, ε) with ≥2 of the claimed methods; plus counts."""
    claimed = list(reported.get("claimed_ranking") or CLAIMED_RANKING)
    lines, counts = [], {"holds": 0, "fails": 0, "fails_within_noise": 0}
    # Every ordered pair of the claimed ranking (better, worse) -> [settings where it holds, settings with both].
    pairs = {(a, b): [0, 0] for i, a in enumerate(claimed) for b in claimed[i + 1:]}
    for profile, per_nb in results.items():
        for notebook in sorted(per_nb):
            data = per_nb[notebook]
            if notebook == "03_ablation" or "_error" in data:
                continue
            group_by = ("task", "epsilon", "beta") if notebook == "05_heterogeneity" else ("task", "epsilon")
            for key, cells in sorted(table_groups(data, group_by).items(), key=lambda kv: str(kv[0])):
                verdict = check_ranking(cells, claimed)
                if verdict is None or math.isinf(key[1]):
                    continue
                for (a, b), tally in pairs.items():
                    if a in cells and b in cells:
                        tally[1] += 1
                        tally[0] += cells[a].mean > cells[b].mean
                where = f"`{profile}` / {notebook} / `{key[0]}` / ε = {fmt_eps(key[1])}"
                if len(key) > 2 and key[2] is not None:
                    where += f" / β = {key[2]}"
                lines.append(f"- {where}: {verdict.sentence()}{links(profile, notebook, 'ranking holds')}")
                if verdict.holds:
                    counts["holds"] += 1
                else:
                    counts["fails"] += 1
                    if all(v[4] for v in verdict.violations):
                        counts["fails_within_noise"] += 1
    total = counts["holds"] + counts["fails"]
    head = ["## Does the ranking LA-LoRA > RoLoRA > FFA-LoRA > DP-LoRA hold?", "",
            "Order of the means only (descriptive; the verdicts with intervals are in the section above).", ""]
    if total == 0:
        head.append("No reproduced setting has two or more of these methods yet.")
        return "\n".join(head), counts
    head.append(f"Computed from the reproduced means (adjacent pairs of the claimed order, among the "
                f"methods each setting ran): the full order holds in **{counts['holds']} of {total}** "
                f"settings and fails in {counts['fails']}"
                + (f" ({counts['fails_within_noise']} of them only by gaps within one standard "
                   f"deviation over seeds)" if counts["fails"] else "") + ".")
    head.append("")
    pair_rows = [[f"{method_label(a)} > {method_label(b)}", f"{t[0]} of {t[1]}"] for (a, b), t in pairs.items() if t[1]]
    if pair_rows:
        head += ["Pair by pair (settings where the first method's mean is higher / settings that ran both):", "",
                 md_table(["claim", "holds in"], pair_rows), "", "Per setting:", ""]
    return "\n".join(head + lines), counts


def privacy_utility_section(results: dict) -> str:
    out = ["## Accuracy vs ε", ""]
    have = False
    for profile, per_nb in results.items():
        data = per_nb.get("04_privacy_utility")
        if not data or "_error" in data:
            continue
        by_task: dict[str, dict[str, dict[float, Cell]]] = {}
        for (task, eps), cells in table_groups(data).items():
            for m, c in cells.items():
                by_task.setdefault(task, {}).setdefault(m, {})[eps] = c
        for task, per_method in sorted(by_task.items()):
            have = True
            eps_all = sorted({e for d in per_method.values() for e in d})
            out.append(f"Profile `{profile}`, task `{task}` ({data.get('metric', 'accuracy %')}):")
            out.append("")
            out.append(md_table(["method"] + [f"ε = {fmt_eps(e)}" for e in eps_all],
                                [[method_label(m)] + [fmt_acc(d[e].mean, d[e].std) if e in d else "–"
                                                      for e in eps_all]
                                 for m, d in ((m, per_method[m]) for m in sort_methods(per_method))]))
            out.append("")
    if not have:
        out.append("No reproduced results yet (`04_privacy_utility.json` not found).")
    out.append("The paper reports no numbers for this sweep beyond ε ∈ {1, 3} in the main tables.")
    return "\n".join(out)


def sharpness_section(results: dict, reported: dict, links=_no_links) -> str:
    section = reported.get("sharpness") or {}
    rows = section.get("rows") or []
    rep = rows[0]["top_eigenvalue"] if rows else {}
    setting = f"{rows[0]['model']} / {rows[0]['dataset']}, ε = {rows[0]['epsilon']}" if rows else "?"
    out = ["## Sharpness: top Hessian eigenvalue", ""]
    table = []
    for profile, per_nb in results.items():
        data = per_nb.get("06_sharpness") or {}
        eig = data.get("top_eigenvalue")
        if not isinstance(eig, Mapping):
            continue
        where = f"`{profile}`"
        task = data.get("task") or (data.get("config") or {}).get("task")
        if task:
            where += f", `{task}`"
        for m in sort_methods(set(eig) | set(rep)):
            v = eig.get(m)
            table.append([where, method_label(m), f"{v:.4g}" if isinstance(v, (int, float)) else "–",
                          f"{rep[m]:.2f}" if m in rep else "–"])
        if "dp-lora" in eig and "la-lora" in eig and isinstance(eig["dp-lora"], (int, float)):
            flatter = eig["la-lora"] < eig["dp-lora"]
            table.append([where, "LA-LoRA flatter than DP-LoRA?"
                          + links(profile, "06_sharpness", "LA-LoRA flatter than DP-LoRA"), "yes" if flatter else "no",
                          "yes" if rep.get("la-lora", 0) < rep.get("dp-lora", 0) else "no"])
    if not table:
        out.append(f"No reproduced value yet (`06_sharpness.json` with key `top_eigenvalue`). "
                   f"Reported ({setting}): " + ", ".join(f"{method_label(m)} {v}" for m, v in rep.items()) + ".")
        return "\n".join(out)
    out.append(f"Reported: {setting} ({section.get('source', '')}).")
    out.append("")
    out.append(md_table(["profile / task", "method", "reproduced", "reported"], table))
    return "\n".join(out)


def generic_sections(results: dict, links=_no_links) -> str:
    out = ["## Every notebook's summary", ""]
    names = sorted({nb for per_nb in results.values() for nb in per_nb})
    if not names:
        return "\n".join(out + ["No notebook results found."])
    for notebook in names:
        out.append(f"### {notebook}")
        out.append("")
        for profile, per_nb in results.items():
            data = per_nb.get(notebook)
            if data is None:
                continue
            if "_error" in data:
                out += [f"`{profile}`: could not read the JSON ({data['_error']}).", ""]
                continue
            summary = data.get("summary")
            if not isinstance(summary, Mapping) or not summary:
                out += [f"`{profile}`: no `summary` in {notebook}.json.", ""]
                continue
            out.append(f"Profile `{profile}`:")
            out.append("")
            # A true/false entry is a verdict: it links to the notebook section and figure behind it.
            out.append(md_table(["key", "value"], [[k, f"{v}{links(profile, notebook, k)}" if isinstance(v, bool) else v]
                                                   for k, v in _flatten(summary)]))
            out.append("")
    return "\n".join(out)


def figures_section(results_root: Path, report_dir: Path, results: dict) -> str:
    out = ["## Figures", ""]
    any_fig = False
    for profile in results:
        folder = results_root / profile / "figures"
        if not folder.is_dir():
            continue
        pngs = sorted(folder.glob("*.png"))
        if not pngs:
            continue
        any_fig = True
        links = [f"[{p.stem}]({os.path.relpath(p, report_dir)})" for p in pngs]
        out.append(f"- `{profile}`: " + ", ".join(links))
    if not any_fig:
        out.append("No figures yet.")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
def build_report(results_root: str | os.PathLike = "results", reported_path: str | os.PathLike = "paper/reported.yaml",
                 out_path: str | os.PathLike | None = "paper/REPORT.md",
                 profiles: Iterable[str] | None = None) -> str:
    """Render the report (and write it atomically to ``out_path`` unless None); returns the text."""
    results_root = Path(results_root)
    reported = load_reported(reported_path)
    results = collect_results(results_root, profiles)
    paper = reported["paper"]
    report_dir = Path(out_path).resolve().parent if out_path else Path.cwd()
    profiles_line = ", ".join(f"`{p}` ({len(nbs)} notebooks)" for p, nbs in results.items()) or "none"
    links = verdict_linker(results_root, report_dir) if out_path else _no_links
    ranking_text, _ = ranking_overview(results, reported, links)
    verdict_text, _ = verdict_overview(results, reported)
    parts = [
        "# LA-LoRA: reproduced vs reported",
        "",
        f"Paper: *{paper['title']}*, arXiv {paper['arxiv']}. Reported numbers: `paper/reported.yaml` "
        f"(**{paper.get('status', 'transcribed; verify in the PDF')}**). "
        f"This file is generated by `lalora/report.py` (notebook `10_report`) from "
        f"`{results_root}/<profile>/*.json`; do not edit it by hand.",
        "",
        f"Profiles found: {profiles_line}."
        + (" Each verdict links to the notebook section and figure behind it; the notebook links open "
           "the rendered site (`lalora site --profile <profile>`, `make site`)." if links is not _no_links else ""),
        "",
        scope_text(results),
        "",
        verdict_text,
        "",
        dp_cost_section(results),
        "",
        ranking_text,
        "",
    ]
    for notebook in SIDE_BY_SIDE:
        parts += [_side_by_side(results, reported, notebook, links), ""]
    parts += [privacy_utility_section(results), "", sharpness_section(results, reported, links), "",
              generic_sections(results, links), "", figures_section(results_root, report_dir, results), ""]
    text = "\n".join(parts).rstrip() + "\n"
    if out_path:
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_suffix(out_path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out_path)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lalora.report", description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results")
    parser.add_argument("--reported", default="paper/reported.yaml")
    parser.add_argument("--out", default="paper/REPORT.md")
    parser.add_argument("--profile", action="append", help="only these profiles (repeatable)")
    args = parser.parse_args(argv)
    build_report(args.results, args.reported, args.out, args.profile)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

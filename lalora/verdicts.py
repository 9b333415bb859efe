"""Verdict statistics: the one rule for a verdict, and every comparison computed with it.

Everything that says whether a claim holds reads it here: the report (``lalora.report``), the site
index (``lalora.site``), the main-results helpers (``lalora.main_results``) and the notebooks' claim
lists (01, 11, 13). Result files are read by ``lalora.result_files``; rendering lives elsewhere.

**The rule.** A claim "X > Y" is judged on the paired per-seed differences acc_X(seed) − acc_Y(seed)
(the same seed gives both methods the same partition, schedule, LoRA init and data order): their mean
and two-sided 95% Student-t interval, mean ± t_{0.975, n−1} · sd / √n. It gets a verdict only when

1. the task trained at all (its non-private runs beat the majority-class baseline; else "did not train"),
2. it has ≥ ``MIN_SEEDS`` paired seeds (else "insufficient seeds"), and
3. both arms' mean accuracies are above the task's majority-class baseline (else "below majority
   baseline": ranking a model that learned nothing says nothing about the method; a baseline that
   was not recorded is not assumed to be met);

and the verdict reads the interval alone: **holds** (above 0), **reversed** (below 0), **unresolved**
(contains 0). Why 5 seeds: with 3 the t quantile is 4.30 (vs 2.78 at 5), a ~1.5x wider interval for
the same spread. Means compared without an interval (an order of means, a flag computed from two
numbers) are described, never called a verdict.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from scipy import stats

from lalora.plotting import method_label
from lalora.result_files import flatten, profile_runs

CLAIMED_RANKING = ["la-lora", "rolora", "ffa-lora", "dp-lora"]
# The order of the paper's ablation table (paper/reported.yaml, `ablation`), for notebooks that run its arms.
ABLATION_ORDER = ["la-lora", "la-lora-filter", "dp-lora+filter", "dp-lora"]
MIN_SEEDS = 5
CONFIDENCE = 0.95
JUDGED = ("holds", "reversed", "unresolved")
DID_NOT_TRAIN = "did not train"
INSUFFICIENT = "insufficient seeds"
BELOW_BASELINE = "below majority baseline"
NO_BASELINE = "majority baseline not recorded"
# The mechanism's own test (issue 26): alternation with the low-pass filter held on in both arms.
MECHANISM_PAIR = ("la-lora", "dp-lora+filter")
REFERENCE_METHOD = "fedavg-lora"   # the non-private upper bound the notebooks run at ε = ∞
# Per-run fields of a run record; every other scalar field (task, epsilon, beta, dp_mode, ...) names the setting.
RUN_FIELDS = {"method", "seed", "accuracy", "epsilon_spent", "target_epsilon", "noise_multiplier", "private",
              "cached", "wall_time_s", "run_dir", "curve", "majority_baseline", "privacy", "fedsa_scoring",
              "label", "filter"}


# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------
def as_epsilon(value) -> float:
    """3, 3.0, "3", "inf", None (= no DP) -> float."""
    return math.inf if value is None else float(value)


def fmt_eps(eps: float) -> str:
    return "∞" if math.isinf(eps) else f"{eps:g}"


def fmt_diff(row: Mapping[str, Any], digits: int = 2) -> str:
    """"+3.78 [+0.55, +7.01]": a mean difference and its interval (``digits`` decimals)."""
    if not math.isfinite(row.get("mean", math.nan)):
        return "–"
    if not (math.isfinite(row.get("ci_low", math.nan)) and math.isfinite(row.get("ci_high", math.nan))):
        return f"{row['mean']:+.{digits}f} (no CI)"
    return f"{row['mean']:+.{digits}f} [{row['ci_low']:+.{digits}f}, {row['ci_high']:+.{digits}f}]"


@dataclass
class Cell:
    mean: float
    std: float = 0.0
    n: int = 1


def table_groups(data: Mapping[str, Any], group_by: tuple[str, ...] = ("task", "epsilon")
                 ) -> dict[tuple, dict[str, Cell]]:
    """Rows of a result table grouped by (task, ε): {(task, ε): {method: Cell}} (real DP rows only)."""
    groups: dict[tuple, dict[str, Cell]] = {}
    for row in data.get("table", []) or []:
        if "method" not in row or "accuracy_mean" not in row or row.get("dp_mode") == "as-released":
            continue
        key = tuple(as_epsilon(row.get(k)) if k == "epsilon" else row.get(k) for k in group_by)
        groups.setdefault(key, {})[row["method"]] = Cell(
            float(row["accuracy_mean"]), float(row.get("accuracy_std") or 0.0), int(row.get("n_seeds") or 1))
    return groups


def order_of_means(means: Mapping[str, float]) -> str:
    """"LA-LoRA > RoLoRA = DP-LoRA": the methods by mean, best first (a description, not a verdict)."""
    ordered = sorted(means, key=lambda m: -means[m])
    text = method_label(ordered[0]) if ordered else ""
    for prev, m in zip(ordered, ordered[1:]):
        text += (" = " if means[prev] == means[m] else " > ") + method_label(m)
    return text


# --------------------------------------------------------------------------------------------
# Paired differences and the rule
# --------------------------------------------------------------------------------------------
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
    v = np.asarray(list(values), dtype=float)
    if v.size < 2:
        return math.nan
    return float(stats.t.ppf(0.5 + confidence / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))


def mean_interval(values, confidence: float = CONFIDENCE) -> PairedDifference:
    """Mean and t-interval of already-paired differences ``values``."""
    values = [float(v) for v in values]
    if not values:
        return PairedDifference(0, math.nan, math.nan, math.nan, [])
    mean = sum(values) / len(values)
    half = t_halfwidth(values, confidence)
    return PairedDifference(len(values), mean, mean - half, mean + half, list(range(len(values))))


def paired_difference(better: Mapping[Any, float], worse: Mapping[Any, float],
                      confidence: float = CONFIDENCE) -> PairedDifference:
    """Differences better[seed] − worse[seed] over the seeds both have (unpaired seeds are dropped)."""
    seeds = sorted(set(better) & set(worse), key=str)
    d = mean_interval([float(better[s]) - float(worse[s]) for s in seeds], confidence)
    d.seeds = seeds
    return d


def interval_verdict(diff: PairedDifference) -> str:
    """holds / reversed / unresolved from the interval alone."""
    if diff.ci_low > 0:
        return "holds"
    if diff.ci_high < 0:
        return "reversed"
    return "unresolved"


def verdict(diff: PairedDifference, *, trained: bool | None = None, below_baseline: Iterable[str] = (),
            baseline_known: bool = True, min_seeds: int = MIN_SEEDS) -> str:
    """THE rule (module docstring). ``trained``: did the task's non-private model beat its majority
    baseline (None = not known); ``below_baseline``: the arms whose mean is not above it."""
    below = list(below_baseline)
    if trained is False:
        return DID_NOT_TRAIN
    if diff.n < min_seeds:
        return INSUFFICIENT
    if not baseline_known:
        return NO_BASELINE
    if below:
        return f"{BELOW_BASELINE} ({' and '.join(method_label(m) for m in below)})"
    return interval_verdict(diff)


def is_verdict(text: str) -> bool:
    return text in JUDGED


def _beats_baseline(accuracies: list[float], baseline: float) -> bool:
    """The one "did it learn anything" rule: mean accuracy above the majority-class baseline."""
    return sum(accuracies) / len(accuracies) > baseline


def trained_tasks(runs: Iterable[Mapping[str, Any]]) -> dict[str, bool]:
    """{task: did its non-private runs beat the majority-class baseline on average?} for tasks that
    have non-private runs recording ``majority_baseline`` (in %); other tasks are absent (unknown)."""
    acc: dict[str, list[float]] = {}
    base: dict[str, float] = {}
    for r in runs:
        if as_epsilon(r.get("epsilon")) != math.inf or r.get("majority_baseline") is None:
            continue
        b = float(r["majority_baseline"])
        if math.isfinite(b):
            acc.setdefault(r["task"], []).append(float(r["accuracy"]))
            base[r["task"]] = b
    return {t: _beats_baseline(a, base[t]) for t, a in acc.items()}


def claim_pairs(methods: Iterable[str], claimed: list[str] = CLAIMED_RANKING) -> list[tuple[str, str]]:
    """Each adjacent pair of the claimed order among the methods present, plus first vs last (the
    headline, e.g. LA-LoRA > DP-LoRA) when they are not adjacent."""
    present = [m for m in claimed if m in set(methods)]
    pairs = list(zip(present, present[1:]))
    if len(present) > 2:
        pairs.append((present[0], present[-1]))
    return pairs


def setting_of(run: Mapping[str, Any]) -> tuple:
    """What a run record says about its setting: its scalar fields other than the per-run ones."""
    return tuple(sorted((k, str(v)) for k, v in run.items()
                        if k not in RUN_FIELDS and not isinstance(v, (Mapping, list, tuple))))


def run_id(run: Mapping[str, Any]) -> str:
    """What identifies a trained run across notebooks: its run folder (method/hash), else its fields."""
    if run.get("run_dir"):
        return "/".join(Path(str(run["run_dir"])).parts[-2:])
    return json.dumps({k: str(v) for k, v in sorted(run.items()) if k not in ("cached", "wall_time_s", "curve")})


def _usable(runs: Iterable[Any]) -> list[Mapping[str, Any]]:
    return [r for r in runs if isinstance(r, Mapping) and all(k in r for k in ("task", "method", "seed", "epsilon"))
            and r.get("accuracy") is not None]


def _by_setting(runs: list[Mapping[str, Any]]) -> list[tuple[dict, dict[str, dict]]]:
    """[(setting fields, {method: {seed: run}})] for the private (finite ε) settings, in a stable order."""
    by: dict[tuple, dict[str, dict]] = {}
    where: dict[tuple, dict] = {}
    for r in runs:
        key = setting_of(r)
        by.setdefault(key, {}).setdefault(r["method"], {})[r["seed"]] = r
        where.setdefault(key, {k: r[k] for k, _ in key})
    return [(where[k], by[k]) for k in sorted(by, key=str) if not math.isinf(as_epsilon(where[k].get("epsilon")))]


def judge_pair(per_method: Mapping[str, Mapping[Any, Mapping]], better: str, worse: str, *,
               trained: bool | None, min_seeds: int = MIN_SEEDS, confidence: float = CONFIDENCE) -> dict:
    """One claim "better > worse" of one setting, judged by the rule; the row every caller shows."""
    a = {s: float(r["accuracy"]) for s, r in per_method[better].items()}
    b = {s: float(r["accuracy"]) for s, r in per_method[worse].items()}
    diff = paired_difference(a, b, confidence)
    arms = {m: [per_method[m][s] for s in diff.seeds] for m in (better, worse)}
    bases = {float(r["majority_baseline"]) for rs in arms.values() for r in rs if r.get("majority_baseline") is not None}
    known = bool(diff.seeds) and all(r.get("majority_baseline") is not None for rs in arms.values() for r in rs)
    base = max(bases) if bases else math.nan
    means = {m: (sum(float(r["accuracy"]) for r in rs) / len(rs) if rs else math.nan) for m, rs in arms.items()}
    below = [m for m in (better, worse) if known and not means[m] > base]
    return {"claim": f"{method_label(better)} > {method_label(worse)}", "better": better, "worse": worse,
            "n": diff.n, "mean": diff.mean, "ci_low": diff.ci_low, "ci_high": diff.ci_high, "seeds": diff.seeds,
            "confidence": confidence, "arm_means": means, "majority_baseline": base,
            "verdict": verdict(diff, trained=trained, below_baseline=below, baseline_known=known, min_seeds=min_seeds),
            "runs": sorted(run_id(r) for rs in arms.values() for r in rs)}


def claim_verdicts(runs: Iterable[Mapping[str, Any]], claimed: list[str] = CLAIMED_RANKING, *,
                   trained: Mapping[str, bool] | None = None, min_seeds: int = MIN_SEEDS,
                   confidence: float = CONFIDENCE, pairs: list[tuple[str, str]] | None = None) -> list[dict]:
    """One row per (setting, claim) over per-seed run records (``runs`` of a notebook JSON).

    ε = ∞ settings (the non-private reference) are not ranked. ``trained`` maps task -> bool (default:
    :func:`trained_tasks` of ``runs``). Each row carries the run ids of both arms (``runs``) so callers
    can count a run set once. ``pairs`` (better, worse) replaces the claims derived from ``claimed``.
    """
    runs = _usable(runs)
    trained = dict(trained_tasks(runs) if trained is None else trained)
    rows = []
    for where, per_method in _by_setting(runs):
        todo = claim_pairs(per_method, claimed) if pairs is None else \
            [(a, b) for a, b in pairs if a in per_method and b in per_method]
        for better, worse in todo:
            rows.append({**where, **judge_pair(per_method, better, worse, trained=trained.get(where.get("task")),
                                               min_seeds=min_seeds, confidence=confidence)})
    return rows


def ranking_verdicts(runs: Iterable[Mapping[str, Any]], claimed: list[str] = CLAIMED_RANKING, *,
                     trained: Mapping[str, bool] | None = None) -> list[dict]:
    """The claimed order per setting, judged by the rule on each adjacent pair of the methods present.

    ``verdict``: "holds" when every adjacent pair holds, "fails" when one is reversed, "unresolved"
    when all are judged and none reversed, else the first pair's reason for no verdict ("insufficient
    seeds", "below majority baseline (…)", ...). ``order``: the methods by mean (described, not judged).
    """
    runs = _usable(runs)
    trained = dict(trained_tasks(runs) if trained is None else trained)
    out = []
    for where, per_method in _by_setting(runs):
        present = [m for m in claimed if m in per_method]
        if len(present) < 2:
            continue
        rows = [judge_pair(per_method, a, b, trained=trained.get(where.get("task"))) for a, b in zip(present, present[1:])]
        unjudged = [r["verdict"] for r in rows if not is_verdict(r["verdict"])]
        if unjudged:
            judged = unjudged[0]
        elif any(r["verdict"] == "reversed" for r in rows):
            judged = "fails"
        else:
            judged = "holds" if all(r["verdict"] == "holds" for r in rows) else "unresolved"
        means = {m: float(np.mean([float(r["accuracy"]) for r in per_method[m].values()])) for m in present}
        out.append({**where, "methods": present, "pairs": rows, "verdict": judged, "order": order_of_means(means),
                    "n": min(r["n"] for r in rows), "runs": sorted({x for r in rows for x in r["runs"]})})
    return out


MECHANISM_NOTEBOOKS = ("03_ablation", "14_tuned_main")   # the ablation (one lr) and the tuned protocol


def mechanism_rows(results: Mapping[str, Mapping[str, Any]],
                   notebooks: Iterable[str] = MECHANISM_NOTEBOOKS) -> list[dict]:
    """The mechanism's own test per profile: LA-LoRA vs DP-LoRA + filter (the filter on in both arms,
    so the difference is what alternation adds), judged by the rule over the profile's runs; in
    14_tuned_main once per protocol (``protocol`` is part of the setting)."""
    rows = []
    for profile, per_nb in results.items():
        trained = trained_tasks(profile_runs(per_nb))
        for notebook in notebooks:
            data = per_nb.get(notebook) or {}
            if not isinstance(data.get("runs"), list):
                continue
            for row in claim_verdicts(data["runs"], trained=trained, pairs=[MECHANISM_PAIR]):
                rows.append({"profile": profile, "notebook": notebook, **row})
    return rows


# --------------------------------------------------------------------------------------------
# What DP costs, and the regime the runs ran in
# --------------------------------------------------------------------------------------------
def dp_cost_rows(results: dict, notebooks: Iterable[str] = ("01_main_vision", "02_main_language", "14_tuned_main")
                 ) -> list[dict]:
    """Non-private FedAvg-LoRA − DP-LoRA (real DP), paired by seed, per (profile, notebook, task, ε,
    protocol), with the majority-class baseline beside the non-private accuracy. ``protocol`` is
    None for notebooks with one lr for every method (01, 02), "tuned"/"paper" in 14_tuned_main,
    whose one non-private reference is paired with DP-LoRA under each protocol."""
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
                protocols = sorted({r.get("protocol") for r in runs if r["task"] == task and r["method"] == "dp-lora"},
                                   key=lambda p: (p != "tuned", str(p)))
                for protocol in protocols:
                    for eps in sorted({as_epsilon(r["epsilon"]) for r in runs if r["task"] == task} - {math.inf}):
                        dp = {r["seed"]: float(r["accuracy"]) for r in runs if r["task"] == task
                              and r["method"] == "dp-lora" and as_epsilon(r["epsilon"]) == eps
                              and r.get("protocol") == protocol}
                        diff = paired_difference(ref, dp)
                        if diff.n == 0:
                            continue
                        ref_mean = sum(ref[s] for s in diff.seeds) / diff.n
                        rows.append({"profile": profile, "notebook": notebook, "task": task, "epsilon": eps,
                                     "protocol": protocol, "n": diff.n, "nonprivate": ref_mean,
                                     "dp": ref_mean - diff.mean, "mean": diff.mean, "ci_low": diff.ci_low,
                                     "ci_high": diff.ci_high, "majority": base[0] if base else math.nan})
    return rows


def regime(results: dict, notebook: str, profile: str = "offline-full") -> dict | None:
    """The shared settings of the DP-LoRA runs of ``profile``'s ``notebook`` (read from the committed run
    configs, so text about them cannot drift from what ran) with the σ range and the lrs of every
    method; None when absent or when the runs do not share a setting."""
    all_runs = [r for r in ((results.get(profile) or {}).get(notebook) or {}).get("runs") or []
                if isinstance(r, Mapping) and r.get("dp_mode", "dp") == "dp" and isinstance(r.get("config"), Mapping)]
    runs = [r for r in all_runs if r.get("method") == "dp-lora"]
    if not runs:
        return None
    keys = ("clients", "clients_per_round", "beta", "batch_size", "r", "alpha", "epsilon", "local_steps", "rounds")
    shared = {k: {json.dumps(r["config"].get(k)) for r in runs} for k in keys}
    if any(len(v) != 1 for v in shared.values()):
        return None
    out = {k: json.loads(next(iter(v))) for k, v in shared.items()}
    sigmas = sorted(float(r["noise_multiplier"]) for r in runs if r.get("noise_multiplier") is not None)
    out["sigma"] = (sigmas[0], sigmas[-1]) if sigmas else None
    out["lrs"] = sorted({float(r["config"]["lr"]) for r in all_runs if r["config"].get("lr") is not None})
    accs = [float(r["accuracy"]) for r in runs if r.get("accuracy") is not None]
    out["dp_lora_accuracy"] = sum(accs) / len(accs) if accs else math.nan
    base = [float(r["majority_baseline"]) for r in runs if r.get("majority_baseline") is not None]
    out["majority_baseline"] = base[0] if base else math.nan
    return out


# --------------------------------------------------------------------------------------------
# Diagnostics: an interval, or no yes/no
# --------------------------------------------------------------------------------------------
# True/false entries that notebooks write from two numbers without an interval. They are never shown
# as a yes/no: the ranking is judged by the rule from the runs, the sharpness and alignment comparisons
# below carry their interval, and the rest is left to the per-seed verdicts (e.g. the ε sweep's).
NOT_A_VERDICT = re.compile(r"^(ranking_holds(\..*)?|accuracy_monotone_in_eps\[.*\]|la_lora_flatter|"
                           r"LA-LoRA flatter than DP-LoRA|la_lora_more_aligned_\w+|cached)$")


def alignment_comparison(data: Mapping[str, Any], factor: str = "BA") -> dict | None:
    """LA-LoRA vs DP-LoRA mean cosine between clients' updates of ``factor`` (notebook 07): the per-round
    differences of one seed, their mean and 95% t-interval (rounds as samples: consecutive rounds are
    correlated, so the interval is if anything too narrow). None without both traces."""
    traces = data.get("traces") if isinstance(data.get("traces"), Mapping) else {}
    la, dp = traces.get("la-lora") or {}, traces.get("dp-lora") or {}
    if factor not in la or factor not in dp:
        return None
    pairs = [(a, b) for a, b in zip(la[factor], dp[factor]) if a is not None and b is not None
             and math.isfinite(a) and math.isfinite(b)]
    d = mean_interval([a - b for a, b in pairs])
    return {"claim": f"LA-LoRA's client updates of {factor} more aligned than DP-LoRA's (mean cosine)",
            "n": d.n, "mean": d.mean, "ci_low": d.ci_low, "ci_high": d.ci_high,
            "la_lora": float(np.mean([a for a, _ in pairs])) if pairs else math.nan,
            "dp_lora": float(np.mean([b for _, b in pairs])) if pairs else math.nan,
            "verdict": INSUFFICIENT if d.n < MIN_SEEDS else interval_verdict(d)}


def chance_loss(data: Mapping[str, Any]) -> float | None:
    """ln C, the cross-entropy of a uniform guess over the task's C classes (None when not recorded)."""
    if isinstance(data.get("chance_loss"), (int, float)):
        return float(data["chance_loss"])
    if isinstance(data.get("num_classes"), int) and data["num_classes"] > 1:
        return math.log(data["num_classes"])
    return None


def sharpness_comparison(data: Mapping[str, Any]) -> dict:
    """Notebook 06: which methods ended at a minimum (every seed's final training loss below the chance
    loss ln C; a model at chance loss has collapsed, its curvature says nothing about flatness), and
    the paired LA-LoRA − DP-LoRA top eigenvalue only when both did."""
    runs = [r for r in data.get("runs") or [] if isinstance(r, Mapping) and "method" in r]
    chance = chance_loss(data)
    methods: dict[str, dict] = {}
    for m in dict.fromkeys(r["method"] for r in runs):
        own = [r for r in runs if r["method"] == m]
        losses = [float(r["loss"]) for r in own if r.get("loss") is not None]
        at_min = None if chance is None or len(losses) != len(own) else all(x < chance for x in losses)
        methods[m] = {"n": len(own), "losses": losses, "at_minimum": at_min,
                      "above_chance": None if chance is None else sum(x >= chance for x in losses),
                      "top_eigenvalue": float(np.mean([r["top_eigenvalue"] for r in own])) if own else math.nan}
    out = {"chance_loss": chance, "methods": methods, "comparison": None}
    trained = [m for m, v in methods.items() if v["at_minimum"]]
    if {"la-lora", "dp-lora"} <= set(trained):
        eig = {m: {r["seed"]: float(r["top_eigenvalue"]) for r in runs if r["method"] == m} for m in ("dp-lora", "la-lora")}
        d = paired_difference(eig["dp-lora"], eig["la-lora"])   # > 0: LA-LoRA flatter
        out["comparison"] = {"claim": "LA-LoRA flatter than DP-LoRA (DP-LoRA − LA-LoRA top eigenvalue)",
                             "n": d.n, "mean": d.mean, "ci_low": d.ci_low, "ci_high": d.ci_high,
                             "verdict": INSUFFICIENT if d.n < MIN_SEEDS else interval_verdict(d)}
    return out


@dataclass
class Finding:
    key: str
    verdict: str      # "yes"/"no" for a check, or a verdict of the rule ("holds", "insufficient seeds", ...)
    text: str


def notebook_findings(data: Mapping[str, Any], trained: Mapping[str, bool] | None = None) -> list[Finding]:
    """What a notebook's JSON lets one conclude, by the rule: its checks (true/false entries that are not
    comparisons of noisy numbers), its claims recomputed from its runs (never the verdict written into
    the JSON), the claimed ranking per setting, and the sharpness/alignment comparisons with an interval."""
    summary = data.get("summary") if isinstance(data.get("summary"), Mapping) else {}
    flags = [(k, v) for k, v in flatten(summary) if isinstance(v, bool)]
    if not flags:
        flags = [(k, v) for k, v in data.items() if isinstance(v, bool)]
        claims = data.get("claims")
        if isinstance(claims, Mapping):   # notebooks 08/09: {name: bool} of deterministic checks
            flags += [(f"claim: {k}", v) for k, v in claims.items() if isinstance(v, bool)]
    out = [Finding(k, "yes" if v else "no", k) for k, v in flags if not NOT_A_VERDICT.match(k)]
    runs = data.get("runs") if isinstance(data.get("runs"), list) else []
    methods = {r.get("method") for r in runs if isinstance(r, Mapping)}
    claimed = ABLATION_ORDER if methods & {"la-lora-filter", "dp-lora+filter"} else CLAIMED_RANKING
    for row in ranking_verdicts(runs, claimed, trained=trained):
        out.append(Finding("ranking holds", row["verdict"],
                           f"{_where(row)}: ranking {' > '.join(method_label(m) for m in row['methods'])} "
                           f"(n = {row['n']}; order of the means: {row['order']})"))
    extra = [MECHANISM_PAIR] if set(MECHANISM_PAIR) <= methods else []
    for row in claim_verdicts(runs, claimed, trained=trained, pairs=claim_pairs(methods, claimed) + extra):
        out.append(Finding(f"claim: {row['claim']}", row["verdict"], f"{_where(row)}: {row['claim']} {fmt_diff(row)}"))
    if "top_eigenvalue" in data and isinstance(data.get("runs"), list):
        s = sharpness_comparison(data)
        c = s["comparison"]
        text = "LA-LoRA flatter than DP-LoRA: " + (f"{fmt_diff(c)} (n = {c['n']})" if c else
                                                  "no comparison, " + sharpness_reason(s))
        out.append(Finding("LA-LoRA flatter than DP-LoRA", c["verdict"] if c else "no verdict", text))
    a = alignment_comparison(data)
    if a:
        out.append(Finding("alignment", a["verdict"], f"{a['claim']}: {fmt_diff(a, digits=4)} over {a['n']} rounds of one seed"))
    return out


def sharpness_reason(s: Mapping[str, Any]) -> str:
    if s["chance_loss"] is None:
        return "the chance loss ln C was not recorded (notebook 06 before issue 26), so trained and collapsed models cannot be told apart"
    off = [f"{method_label(m)} ({v['above_chance']} of {v['n']} seeds at or above ln C = {s['chance_loss']:.2f})"
           for m, v in s["methods"].items() if not v["at_minimum"]]
    return "not at a minimum: " + ", ".join(off) if off else "fewer than two methods"


def _where(row: Mapping[str, Any]) -> str:
    parts = [str(row.get("task", ""))] + [f"{k} {fmt_eps(as_epsilon(row[k])) if k == 'epsilon' else row[k]}"
                                          for k in ("epsilon", "beta", "local_steps", "dp_mode") if k in row]
    return ", ".join(p for p in parts if p)

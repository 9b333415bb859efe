"""The main-results tables shared by notebooks 01 (vision) and 02 (language).

Both notebooks run the same grid (tasks × methods × ε × seeds, plus a non-private reference),
show the same table, check the paper's ranking LA-LoRA > RoLoRA > FFA-LoRA > DP-LoRA the same way
and draw the same bars; only the tasks and the narrative differ. The logic lives here so the two
cannot drift apart.
"""
from __future__ import annotations

import os
import time
from typing import Any, Sequence

from lalora.curves import run_curves
from lalora.nbtools import accuracy_table, experiment_base, run_grid
from lalora.plotting import method_label
from lalora.verdicts import (as_epsilon, claim_verdicts, fmt_diff, fmt_eps, paired_difference, t_halfwidth,
                             ranking_verdicts as judged_rankings)
from lalora.results import atomic_write_json


def run_main_grid(tasks: Sequence[str], methods: Sequence[str], epsilons: Sequence[float],
                  seeds: Sequence[int] | dict[str, Sequence[int]], runs_dir: str | os.PathLike, *,
                  reference_method: str | None = None, task_overrides: dict | None = None,
                  data_root: str | None = None, weights_path: str | None = None,
                  **fields: Any) -> tuple[list[dict], list[dict]]:
    """One federated run per (task, method, ε, seed), cached in `runs_dir`; `fields` are RunConfig
    fields shared by the grid (None = the task's default). Returns (records, accuracy table)."""
    records: list[dict] = []
    for task in tasks:
        base = experiment_base(task, task_overrides=task_overrides, data_root=data_root,
                               weights_path=weights_path, **fields)
        grid = [{"method": m, "epsilon": e} for e in epsilons for m in methods]
        if reference_method:
            grid.append({"method": reference_method, "epsilon": "inf"})
        task_seeds = seeds[task] if isinstance(seeds, dict) else seeds
        records += run_grid(base, grid, task_seeds, runs_dir)
    return records, accuracy_table(records)


def pivot_table(rows: Sequence[dict]):
    """Methods × (task, ε) table of "mean ± std" cells, methods in the house order."""
    import pandas as pd

    from lalora.plotting import sort_methods

    df = pd.DataFrame(rows)
    df["cell"] = [f"{m:.2f} ± {s:.2f}" for m, s in zip(df.accuracy_mean, df.accuracy_std)]
    df["ε"] = [("∞" if e == "inf" else f"{e:g}") for e in df.epsilon]
    df["method"] = pd.Categorical([method_label(m) for m in df.method],
                                  [method_label(m) for m in sort_methods(df.method)])
    return df.pivot_table(index="method", columns=["task", "ε"], values="cell", aggfunc="first",
                          observed=True).fillna("")


def ranking_verdicts(records: Sequence[dict], echo=print) -> dict[str, dict]:
    """The paper's ranking per (task, ε), judged by the one rule (``lalora.verdicts.ranking_verdicts``:
    every adjacent pair of the claimed order with >= 5 paired seeds, both arms above the majority
    baseline, paired 95% CI); the order of the means is kept as a description only."""
    out = {}
    for row in judged_rankings(records):
        key = f"{row['task']} ε={fmt_eps(as_epsilon(row['epsilon']))}"
        text = (f"{' > '.join(method_label(m) for m in row['methods'])}: {row['verdict']} (n = {row['n']}; "
                f"order of the means: {row['order']})")
        out[key] = {"verdict": row["verdict"], "order": row["order"], "n": row["n"], "text": text,
                    "pairs": [{k: p[k] for k in ("claim", "n", "mean", "ci_low", "ci_high", "verdict")} for p in row["pairs"]]}
        echo(f"{key}: ranking {text}")
    return out


def bars_figure(table: Sequence[dict], tasks: Sequence[str], title: str):
    """One panel of grouped bars (methods within each ε) per task; error bars are the 95% Student-t
    interval of the mean over seeds (none with one seed)."""
    import matplotlib.pyplot as plt

    from lalora.plotting import FIGSIZE, grouped_bars, legend_outside

    fig, axes = plt.subplots(1, len(tasks), figsize=(FIGSIZE[0] * len(tasks) * 0.8 + 1.6, FIGSIZE[1]),
                             squeeze=False, sharey=False)
    rows = with_ci95(table)
    for ax, task in zip(axes[0], tasks):
        grouped_bars(ax, [r for r in rows if r["task"] == task], group_key="epsilon", err="accuracy_ci95")
        ax.set_title(task)
        ax.set_xlabel("privacy budget (δ = 1e-5)")
        ax.set_ylabel("test accuracy (%), 95% CI bars")
        ax.set_ylim(0, 105)
    legend_outside(axes[0][-1])
    fig.suptitle(title, y=1.02)
    return fig


def _finite_or_zero(x: float) -> float:
    import math

    return x if math.isfinite(x) else 0.0


def with_ci95(table: Sequence[dict]) -> list[dict]:
    """Accuracy-table rows with ``accuracy_ci95``: the half-width of the 95% Student-t interval of the
    mean over seeds (0 with one seed), for error bars and bands that mean what their label says."""
    return [{**r, "accuracy_ci95": _finite_or_zero(t_halfwidth(r.get("accuracies") or []))} for r in table]


def paired_gaps(records: Sequence[dict], key: str, reference: str = "dp-lora") -> list[dict]:
    """Per value of ``key`` (e.g. epsilon, beta) and method: the paired-by-seed difference to
    ``reference`` (mean in ``accuracy_mean``, 95% t half-width in ``accuracy_ci95``, with ``n``,
    ``ci_low``, ``ci_high``), in the row shape ``lalora.plotting.lines_vs`` draws."""
    def per_seed(method, value):
        return {r["seed"]: r["accuracy"] for r in records if r["method"] == method and str(r[key]) == str(value)}

    rows = []
    for value in dict.fromkeys(r[key] for r in records):
        ref = per_seed(reference, value)
        for method in dict.fromkeys(r["method"] for r in records if r["method"] != reference):
            d = paired_difference(per_seed(method, value), ref)
            if d.n == 0:
                continue
            half = d.ci_high - d.mean
            rows.append({"method": method, key: value, "accuracy_mean": d.mean,
                         "accuracy_ci95": _finite_or_zero(half), "n": d.n, "ci_low": d.ci_low, "ci_high": d.ci_high})
    return rows


def verdict_figure(verdicts: Sequence[dict], title: str):
    """The paired differences of ``claim_verdicts`` rows with their 95% CIs, one row per claim."""
    import matplotlib.pyplot as plt

    from lalora.plotting import FIGSIZE, ci_bars

    mode = {"as-released": " as-released (NOT DP)", "dp": " real DP"}
    def where(v):   # the sweep's own key, when the claims come from a sweep (β, K, period)
        return "".join(f" {k}={v[k]}" for k in ("beta", "local_steps", "alternation_period") if k in v)

    rows = [{**v, "label": f"{v['task']} ε={fmt_eps(as_epsilon(v['epsilon']))}{where(v)}"
                           f"{mode.get(v.get('dp_mode'), '')}: {v['claim']}"} for v in verdicts]
    fig, ax = plt.subplots(figsize=(FIGSIZE[0] + 2, 0.45 * len(rows) + 1.4))
    ci_bars(ax, rows, label_key="label")
    ax.set_title(title)
    return fig


def summarize(records: Sequence[dict], table: Sequence[dict], verdicts: dict, *, tasks, methods,
              epsilons, seeds, rounds, local_steps) -> dict[str, Any]:
    """The flat summary the report builder and the tests read."""
    private = [r for r in records if r["private"]]
    summary = {
        "tasks": list(tasks), "methods": list(methods), "epsilons": list(epsilons),
        "n_seeds": {t: len(seeds[t]) for t in tasks} if isinstance(seeds, dict) else len(seeds),
        "rounds": rounds, "local_steps": local_steps,
        "max_epsilon_spent_minus_target": max((r["epsilon_spent"] - r["target_epsilon"] for r in private),
                                              default=0.0),
        "ranking": {k: v["verdict"] for k, v in verdicts.items()},
        # the verdicts that count: the one rule of lalora.verdicts (paired seeds, 95% t-interval)
        "verdicts": {f"{v['task']} ε={v['epsilon']}: {v['claim']}": v["verdict"] for v in claim_verdicts(records)},
        "runs": len(records), "runs_trained_now": sum(not r["cached"] for r in records),
    }
    for r in table:
        if r["method"] == "la-lora":
            dp = next((x for x in table if x["task"] == r["task"] and x["epsilon"] == r["epsilon"]
                       and x["method"] == "dp-lora"), None)
            if dp:
                summary[f"la_minus_dp[{r['task']}, eps={r['epsilon']:g}]"] = \
                    r["accuracy_mean"] - dp["accuracy_mean"]
    return summary


def write_results(output_dir: str | os.PathLike, name: str, profile: str, *, records, table, verdicts,
                  summary, started: float) -> None:
    """`{output_dir}/{name}.json`, written atomically (curves left out of the per-run records)."""
    atomic_write_json(f"{output_dir}/{name}.json", {
        "notebook": name, "profile": profile, "metric": "test accuracy (%)",
        "table": list(table), "ranking": verdicts, "summary": summary,
        "claims": claim_verdicts(records),
        "runs": [{k: v for k, v in r.items() if k != "curve"} for r in records],
        "curves": run_curves(records),   # per-round test accuracy and training loss (lalora.curves)
        "seconds": time.perf_counter() - started,
    })


# ----------------------------------------------------------------------------------------------
# Notebook 13: the released (non-DP) mechanism beside real DP on paired seeds
# ----------------------------------------------------------------------------------------------
MECHANISM_CLAIMS = [("la-lora", "dp-lora"), ("la-lora", "rolora")]


def run_mechanism_grid(tasks: Sequence[str], methods: Sequence[str], epsilons: Sequence[float],
                       seeds: Sequence[int], mechanisms: Sequence[str], runs_dir: str | os.PathLike, *,
                       task_overrides: dict | None = None, data_root: str | None = None,
                       weights_path: str | None = None, **fields: Any) -> tuple[list[dict], list[dict]]:
    """One run per (task, mechanism, method, ε, seed); the same seed gives every method and both
    mechanisms the same partition, client schedule and LoRA init. ``mechanisms`` are RunConfig
    ``dp_mode`` values ("as-released" runs are NOT differentially private and labelled so).
    Returns (records, table by task × method × ε × dp_mode)."""
    records: list[dict] = []
    for task in tasks:
        base = experiment_base(task, task_overrides=task_overrides, data_root=data_root,
                               weights_path=weights_path, **fields)
        grid = [{"method": m, "epsilon": e, "dp_mode": d} for d in mechanisms for e in epsilons for m in methods]
        records += run_grid(base, grid, seeds, runs_dir)
    return records, accuracy_table(records, by=("task", "method", "epsilon", "dp_mode"))


def mechanism_answer(claims: Sequence[dict]) -> list[dict]:
    """Per (task, ε, claim): does the advantage appear under the released mechanism (its CI above 0)
    and does it survive under real DP? Read from ``claim_verdicts`` rows split by ``dp_mode``."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for c in claims:
        by_key.setdefault((c["task"], c["epsilon"], c["claim"]), {})[c.get("dp_mode", "dp")] = c
    answers = []
    for (task, eps, claim), per in by_key.items():
        rel, dp = per.get("as-released"), per.get("dp")
        answers.append({
            "task": task, "epsilon": eps, "claim": claim,
            "as_released": rel and {"verdict": rel["verdict"], "difference": fmt_diff(rel), "n": rel["n"]},
            "real_dp": dp and {"verdict": dp["verdict"], "difference": fmt_diff(dp), "n": dp["n"]},
            "appears_as_released": None if rel is None else rel["verdict"] == "holds",
            "survives_real_dp": None if dp is None else dp["verdict"] == "holds",
            "text": (f"{task}, ε = {eps}: {claim} — as-released (NOT differentially private): "
                     f"{rel['verdict'] if rel else 'not run'} {fmt_diff(rel) if rel else ''}; real DP: "
                     f"{dp['verdict'] if dp else 'not run'} {fmt_diff(dp) if dp else ''} "
                     f"(paired seeds, 95% t-CI, points)"),
        })
    return answers


def mechanism_bars_figure(table: Sequence[dict], task: str, mechanisms: Sequence[str], title: str):
    """One panel per mechanism (the as-released panel stamped NOT differentially private)."""
    import matplotlib.pyplot as plt

    from lalora.plotting import FIGSIZE, grouped_bars, legend_outside

    fig, axes = plt.subplots(1, len(mechanisms), figsize=(FIGSIZE[0] * len(mechanisms) * 0.8 + 1.6, FIGSIZE[1]),
                             squeeze=False, sharey=True)
    for ax, mech in zip(axes[0], mechanisms):
        rows = [{**r, "accuracy_ci95": _finite_or_zero(t_halfwidth(r.get("accuracies") or []))}
                for r in table if r["task"] == task and r["dp_mode"] == mech]
        grouped_bars(ax, rows, group_key="epsilon", err="accuracy_ci95")
        ax.set_title("real DP (accounted)" if mech == "dp" else f"{mech} mechanism")
        ax.set_ylabel("test accuracy (%), 95% CI bars")
        ax.set_ylim(0, 105)
    legend_outside(axes[0][-1])
    fig.suptitle(title, y=1.02)
    return fig

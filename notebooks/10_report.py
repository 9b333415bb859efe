# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 10 · Report: reproduced vs reported
#
# Gathers every `results/<profile>/NN_*.json` the notebooks wrote and builds the report
# (`paper/REPORT.md` for the offline and paper profiles): each reproduced number beside the number
# the paper reports (`paper/reported.yaml`, transcribed — verify in the PDF), the profile that
# produced it, and a statement, computed by the one verdict rule of `lalora.verdicts`, of where the paper's ranking
# LA-LoRA > RoLoRA > FFA-LoRA > DP-LoRA holds and where it does not. The runner executes this
# notebook last. The logic is `lalora.report.build_report`; this notebook only calls it and shows
# the result.

# %% tags=["parameters"]
profile = "ci"
output_dir = "results/ci"
runs_dir = "runs"
results_root = None          # None: the folder above output_dir (results/)
profiles = None              # None: every profile found under results_root
reported_path = "paper/reported.yaml"
report_path = None           # None: {output_dir}/REPORT.md

# %%
from pathlib import Path

from IPython.display import Markdown, display

from lalora.report import build_report, load_reported, ranking_overview
from lalora.result_files import collect_results
from lalora.results import atomic_write_json

results_root = results_root or str(Path(output_dir).parent)
report_path = report_path or f"{output_dir}/REPORT.md"
text = build_report(results_root, reported_path, report_path, profiles)
print(f"wrote {report_path} ({len(text.splitlines())} lines) from {results_root}/{{{', '.join(profiles or ['*'])}}}")

# %%
display(Markdown(text))

# %%
found = collect_results(results_root, profiles)
_, counts = ranking_overview(found, load_reported(reported_path))
summary = {"report_path": report_path, "profiles": list(found),
           "notebooks": {p: sorted(nbs) for p, nbs in found.items()},
           # distinct run sets per ranking verdict of the one rule (holds / fails / unresolved / no verdict)
           "ranking_settings": counts, "lines": len(text.splitlines())}
atomic_write_json(f"{output_dir}/10_report.json", {"notebook": "10_report", "profile": profile,
                                                  "summary": summary})
summary

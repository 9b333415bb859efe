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
# # 13 · The released mechanism beside real DP: does LA-LoRA's advantage survive?
#
# The authors' released code does not implement the DP the paper reports (see docs/OVERVIEW.md):
# one batch-mean gradient, each tensor clipped to a **data-dependent** threshold
# C = min(median tensor norm, 0.4), noise N(0, (σC/b)²), fixed-size batches, no accountant. Here the
# same federation runs LA-LoRA, DP-LoRA and RoLoRA twice on **paired seeds** (a seed fixes the
# partition, client schedule, LoRA init and data order for every method and both mechanisms):
#
# | mechanism | step | privacy |
# |---|---|---|
# | `as-released` | the released step above, σ = the σ real DP uses at the same ε | **NOT differentially private** |
# | `dp` | per-sample gradients, flat clipping to C, N(0, σ²C²), accountant-calibrated σ | (ε, δ)-DP per client |
#
# Each claim (LA-LoRA > DP-LoRA, LA-LoRA > RoLoRA) gets the mean of the paired per-seed accuracy
# differences and a two-sided 95% Student-t interval (the one rule of `lalora.verdicts`); the verdict
# reads the interval alone (holds / reversed / unresolved), and there is none from fewer than 5 paired
# seeds or with an arm at or below the majority baseline.
# Everything produced by the as-released runs is labelled "NOT differentially private": their run
# folders (`-NOT-DP`), JSON records, figures and the report.
#
# **Profiles.** `paper`: Swin-T on CIFAR-100 (GPU, data and weights on disk). `offline`: the small
# Swin on scikit-learn digits, the main table's federation, 5 paired seeds. `ci`: seconds (one seed:
# every verdict is "insufficient seeds" there, by design).

# %% tags=["parameters"]
profile = "ci"
output_dir = "results/ci"
runs_dir = "runs"
tasks = ["digits-swin"]
methods = ["dp-lora", "rolora", "la-lora"]
mechanisms = ["as-released", "dp"]   # RunConfig.dp_mode values
epsilons = [3.0]
seeds = [0]
rounds = 1
local_steps = 2
batch_size = None                    # None: the task's default (16)
clients = None
clients_per_round = None
lr = None
task_overrides = {}                  # {task: {factory kwarg: value}}
data_root = None                     # paper profile: folder holding the datasets
weights_path = None                  # paper profile: pretrained weights (file or folder)

# %%
import os
import time

from lalora.main_results import (MECHANISM_CLAIMS, mechanism_answer, mechanism_bars_figure, run_mechanism_grid,
                                 verdict_figure)
from lalora.plotting import savefig, use_style
from lalora.verdicts import claim_verdicts
from lalora.results import atomic_write_json

use_style()
started = time.perf_counter()

# %% [markdown]
# ## Runs
# Every (task, mechanism, method, ε, seed) is one federated run; finished runs are read from
# `runs_dir` (the real-DP runs are the same folders as notebook 01's when the settings match, and the
# report then counts them once).

# %%
records, table = run_mechanism_grid(tasks, methods, epsilons, seeds, mechanisms, runs_dir,
                                    task_overrides=task_overrides, data_root=data_root,
                                    weights_path=weights_path, rounds=rounds, local_steps=local_steps,
                                    batch_size=batch_size, clients=clients, clients_per_round=clients_per_round,
                                    lr=lr)

# %% [markdown]
# ## Paired differences and verdicts

# %%
claims = claim_verdicts(records, pairs=MECHANISM_CLAIMS)
answers = mechanism_answer(claims)
for a in answers:
    print(a["text"])

# %% [markdown]
# ## Figures: accuracy per mechanism, and the paired differences with their 95% CIs

# %%
for task in tasks:
    fig = mechanism_bars_figure(table, task, mechanisms, f"{task}: released mechanism vs real DP ({profile})")
    savefig(fig, output_dir, f"13_released_vs_real_{task}_bars")
fig = verdict_figure(claims, f"Paired differences, released mechanism vs real DP ({profile})")
savefig(fig, output_dir, "13_released_vs_real_claims")

# %%
summary = {
    "tasks": list(tasks), "methods": list(methods), "mechanisms": list(mechanisms), "epsilons": list(epsilons),
    "n_seeds": len(seeds), "rounds": rounds, "local_steps": local_steps,
    "not_dp_runs": sum(r["dp_mode"] == "as-released" for r in records),
    "verdicts": {f"{c['task']} ε={c['epsilon']} {c['dp_mode']}: {c['claim']}": c["verdict"] for c in claims},
}
atomic_write_json(os.path.join(output_dir, "13_released_vs_real.json"), {
    "notebook": "13_released_vs_real", "profile": profile, "metric": "test accuracy (%)",
    "privacy_note": "dp_mode as-released runs are NOT differentially private (no per-sample clipping, "
                    "data-dependent clip, no accountant); dp runs are (epsilon, delta)-DP per client",
    "table": table, "claims": claims, "answers": answers, "summary": summary,
    "runs": [{k: v for k, v in r.items() if k != "curve"} for r in records],
    "seconds": time.perf_counter() - started,
})
summary

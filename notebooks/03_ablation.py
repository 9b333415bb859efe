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
# # 03 · Ablation: the low-pass filter × step-level alternation
#
# LA-LoRA changes DP-LoRA in two ways: (a) clients alternate B and A at every local step, and (b)
# the noised LoRA gradient is smoothed by the fixed low-pass filter [1, 4, 6, 4, 1]/16 (post-
# processing, so ε is unchanged). The paper's ablation (Swin-B / Tiny-ImageNet, ε = 3) separates
# the two with four arms:
#
# | arm | alternation | filter | paper |
# |---|---|---|---|
# | DP-LoRA | – | – | 30.64 |
# | DP-LoRA + filter | – | ✓ | 49.85 |
# | LA-LoRA − filter | ✓ | – | 53.07 |
# | LA-LoRA | ✓ | ✓ | 61.97 |
#
# (transcribed; verify in the PDF). Here every arm runs with the same data, optimizer, clipping and
# accountant; only the method's schedule and the `filter` flag differ.
#
# **Profiles.** `paper`: Swin-B / Tiny-ImageNet, ε = 3, 100 rounds × 20 steps. `offline`: the small
# pretrained Swin on scikit-learn digits at the paper's ε, fewer rounds and few seeds (CPU): it
# shows whether each component helps *on this task*; with few seeds, effects smaller than the
# standard deviation are not resolved. `ci`: seconds.

# %% tags=["parameters"]
profile = "ci"
output_dir = "results/ci"
runs_dir = "runs"
tasks = ["digits-swin"]
arms = ["dp-lora", "dp-lora+filter", "la-lora-filter", "la-lora"]
epsilons = [3.0]
seeds = [0]
rounds = 2
local_steps = 4
batch_size = None
clients = None
clients_per_round = None
lr = None
task_overrides = {}
data_root = None
weights_path = None

# %%
import time

import matplotlib.pyplot as plt
import pandas as pd

from lalora.nbtools import accuracy_table, experiment_base, run_grid
from lalora.plotting import FIGSIZE, grouped_bars, legend_outside, method_label, savefig, use_style
from lalora.curves import run_curves
from lalora.results import atomic_write_json

use_style()
started = time.perf_counter()

# %%
records = []
for task in tasks:
    base = experiment_base(task, task_overrides=task_overrides, data_root=data_root, weights_path=weights_path,
                           rounds=rounds, local_steps=local_steps, batch_size=batch_size, clients=clients,
                           clients_per_round=clients_per_round, lr=lr)
    records += run_grid(base, [{"method": a, "epsilon": e} for e in epsilons for a in arms], seeds, runs_dir)
table = accuracy_table(records)

df = pd.DataFrame(table)
df["arm"] = [method_label(m) for m in df.method]
df["alternation"] = [m.startswith("la-lora") for m in df.method]
df["filter"] = [m in ("dp-lora+filter", "la-lora") for m in df.method]
df[["task", "epsilon", "arm", "alternation", "filter", "accuracy_mean", "accuracy_std", "n_seeds", "epsilon_spent"]]

# %% [markdown]
# ## Effects (percentage points, from the means)
# The filter's effect with and without alternation, and alternation's effect with and without the
# filter. A 2×2 design: if the two components were additive, the two filter effects would match.

# %%
effects = {}
for task in tasks:
    for eps in epsilons:
        acc = {r["method"]: r["accuracy_mean"] for r in table if r["task"] == task and r["epsilon"] == eps}
        if len(acc) < 4:
            continue
        key = f"{task}, eps={eps:g}"
        effects[key] = {
            "filter_on_dp_lora": acc["dp-lora+filter"] - acc["dp-lora"],
            "filter_on_la_lora": acc["la-lora"] - acc["la-lora-filter"],
            "alternation_without_filter": acc["la-lora-filter"] - acc["dp-lora"],
            "alternation_with_filter": acc["la-lora"] - acc["dp-lora+filter"],
            "full_vs_dp_lora": acc["la-lora"] - acc["dp-lora"],
        }
pd.DataFrame(effects).round(2)

# %%
fig, axes = plt.subplots(1, len(tasks), figsize=(FIGSIZE[0] * len(tasks) * 0.8 + 1.6, FIGSIZE[1]), squeeze=False)
for ax, task in zip(axes[0], tasks):
    grouped_bars(ax, [r for r in table if r["task"] == task], group_key="epsilon", methods=arms)
    ax.set_title(task)
    ax.set_xlabel("privacy budget (δ = 1e-5)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
legend_outside(axes[0][-1], title="ablation arm")
fig.suptitle(f"Filter × alternation ablation ({profile} profile; mean ± std over {len(seeds)} seed(s))", y=1.02)
savefig(fig, output_dir, "03_ablation_bars")

# %%
summary = {"tasks": tasks, "epsilons": epsilons, "n_seeds": len(seeds), "rounds": rounds,
           "local_steps": local_steps, **{f"{k}: {e}": v for k, d in effects.items() for e, v in d.items()},
           "max_epsilon_spent_minus_target": max((r["epsilon_spent"] - r["target_epsilon"] for r in records
                                                  if r["private"]), default=0.0)}
atomic_write_json(f"{output_dir}/03_ablation.json", {
    "notebook": "03_ablation", "profile": profile, "metric": "test accuracy (%)",
    "table": table, "effects": effects, "summary": summary,
    "runs": [{k: v for k, v in r.items() if k != "curve"} for r in records],
    "curves": run_curves(records),   # per-round test accuracy and training loss of every run (lalora.curves)
    "seconds": time.perf_counter() - started,
})
summary

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
# # 05 · Heterogeneity: client label skew and accuracy vs Dirichlet β
#
# Federated clients rarely hold the same label mix. The paper partitions the training set with a
# Dirichlet distribution: β = 0.1 (vision) is strongly skewed — most clients see a few classes —
# and β = 0.8 (language) is milder; large β approaches an IID split. LA-LoRA's argument is that
# alternating the factors keeps client updates better aligned, which should matter most under
# strong skew.
#
# 1. **Heatmaps** of each client's label histogram (the exact partitions the runs use: same
#    scheme, β and seed) — what "non-IID" means here.
# 2. **Accuracy vs β** for DP-LoRA and LA-LoRA at a fixed ε.
#
# **Profiles.** `offline`: scikit-learn digits, 8 clients, the released code's Dirichlet scheme,
# fewer rounds and few seeds (CPU); it shows how skew hurts each method, not the paper's absolute
# numbers. `paper`: the same sweep on Swin-T / CIFAR-100. `ci`: seconds.

# %% tags=["parameters"]
profile = "ci"
output_dir = "results/ci"
runs_dir = "runs"
task = "digits-swin"
methods = ["dp-lora", "la-lora"]
epsilon = 3.0
betas = [0.1, 1.0]
heatmap_betas = [0.1, 1.0]
partition_scheme = "dirichlet-released"
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
import numpy as np
import pandas as pd
import seaborn as sns

from lalora.config import RunConfig
from lalora.main_results import paired_gaps, with_ci95
from lalora.nbtools import accuracy_table, experiment_base, run_grid
from lalora.plotting import FIGSIZE_WIDE, lines_vs, method_label, savefig, use_style
from lalora.results import atomic_write_json
from lalora.tasks import get_task, label_histograms, partition

use_style()
started = time.perf_counter()

# %% [markdown]
# ## Client label histograms
# Rows are clients, columns classes, cells the number of training examples. The partition is the
# one a run with this seed uses (seed = the first of `seeds`).

# %%
base = experiment_base(task, task_overrides=task_overrides, data_root=data_root, weights_path=weights_path,
                       rounds=rounds, local_steps=local_steps, batch_size=batch_size, clients=clients,
                       clients_per_round=clients_per_round, lr=lr, partition=partition_scheme)
task_obj = get_task(task, **base["task_overrides"])
n_clients = RunConfig(**{**base, "method": methods[0]}).resolve(task_obj.defaults).clients
labels = np.asarray(task_obj.train_labels)
hists = {}
for beta in heatmap_betas:
    parts = partition(labels, n_clients, partition_scheme, beta, seeds[0])
    hists[beta] = label_histograms(labels, parts, task_obj.num_classes)

fig, axes = plt.subplots(1, len(hists), figsize=(3.6 * len(hists) + 0.8, 0.32 * n_clients + 2.2),
                         squeeze=False)
vmax = max(h.max() for h in hists.values())
for ax, (beta, h) in zip(axes[0], hists.items()):
    sns.heatmap(h, ax=ax, cmap="viridis", vmin=0, vmax=vmax, cbar=ax is axes[0][-1],
                cbar_kws={"label": "training examples"}, annot=h.shape[1] <= 10 and n_clients <= 12,
                fmt="d", annot_kws={"fontsize": 6})
    ax.set_title(f"Dirichlet β = {beta:g}")
    ax.set_xlabel("class")
    ax.set_ylabel("client")
fig.suptitle(f"{task}: label histogram per client ({partition_scheme}, seed {seeds[0]})", y=1.02)
savefig(fig, output_dir, "05_heterogeneity_partitions")

def skew(h):
    """Mean over clients of the share of the client's data in its largest class (1 = single class)."""
    n = h.sum(1, keepdims=True).clip(min=1)
    return float((h.max(1, keepdims=True) / n).mean())

pd.DataFrame({f"β = {b:g}": {"examples per client (min)": int(h.sum(1).min()),
                             "examples per client (max)": int(h.sum(1).max()),
                             "classes present per client (mean)": float((h > 0).sum(1).mean()),
                             "largest-class share (mean)": skew(h)} for b, h in hists.items()})

# %% [markdown]
# ## Accuracy vs β at a fixed ε

# %%
records = run_grid(base, [{"method": m, "epsilon": epsilon, "beta": b} for b in betas for m in methods],
                   seeds, runs_dir)
table = accuracy_table(records, by=("task", "method", "epsilon", "beta"))
df = pd.DataFrame(table)
df["method"] = [method_label(m) for m in df.method]
df["cell"] = [f"{m:.2f} ± {s:.2f}" for m, s in zip(df.accuracy_mean, df.accuracy_std)]
df.pivot_table(index="method", columns="beta", values="cell", aggfunc="first", sort=False)

# %%
fig, (ax, ax_gap) = plt.subplots(1, 2, figsize=FIGSIZE_WIDE)
lines_vs(ax, with_ci95(table), x_key="beta", err="accuracy_ci95")
ax.set_ylabel("test accuracy (%), 95% CI band")
ax.set_title(f"{task}: accuracy vs heterogeneity, ε = {epsilon:g}")
ax.legend(loc="best")
# Right: LA-LoRA − DP-LoRA per β, paired by seed, with its 95% t-interval
gaps = paired_gaps(records, "beta")
lines_vs(ax_gap, gaps, x_key="beta", err="accuracy_ci95")
ax_gap.axhline(0, color="0.3", lw=1)
ax_gap.set_ylabel("accuracy − DP-LoRA's (points, paired, 95% CI)")
ax_gap.set_title("gain over DP-LoRA")
for a in (ax, ax_gap):
    a.set_xscale("log")
    a.set_xticks(sorted(betas), [f"{b:g}" for b in sorted(betas)])
    a.minorticks_off()
    a.set_xlabel("Dirichlet β (log scale; small = more skewed)")
fig.tight_layout()
savefig(fig, output_dir, "05_heterogeneity_beta")

# %%
summary = {
    "task": task, "methods": methods, "epsilon": epsilon, "betas": betas, "n_seeds": len(seeds),
    "rounds": rounds, "local_steps": local_steps,
    **{f"largest_class_share[beta={b:g}]": skew(h) for b, h in hists.items()},
    "max_epsilon_spent_minus_target": max((r["epsilon_spent"] - r["target_epsilon"] for r in records
                                           if r["private"]), default=0.0),
}
for b in betas:
    acc = {r["method"]: r["accuracy_mean"] for r in table if r["beta"] == b}
    if "la-lora" in acc and "dp-lora" in acc:
        summary[f"la_minus_dp[beta={b:g}]"] = acc["la-lora"] - acc["dp-lora"]
atomic_write_json(f"{output_dir}/05_heterogeneity.json", {
    "notebook": "05_heterogeneity", "profile": profile, "metric": "test accuracy (%)",
    "table": table, "histograms": {f"{b:g}": h.tolist() for b, h in hists.items()},
    "summary": summary, "runs": [{k: v for k, v in r.items() if k != "curve"} for r in records],
    "seconds": time.perf_counter() - started,
})
summary

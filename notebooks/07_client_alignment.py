# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07 — Alignment of client updates across clients
#
# The paper claims LA-LoRA "aligns update directions across clients" (its Figure 2, DP-LoRA vs
# LA-LoRA). We measure, in every round, the mean pairwise cosine similarity between the sampled
# clients' updates of A (ΔA), of B (ΔB) and of the effective weight Δ(s·BA), concatenated over all
# LoRA layers, for DP-LoRA, RoLoRA and LA-LoRA under the same DP budget.
#
# Δ(BA) is what the model sees; factor updates can disagree while products agree. For RoLoRA only
# one factor moves per round, so the other factor's cosine is undefined (NaN) in that round.
#
# The runs are driven through the public `Simulator` API (`client_update`, `server_aggregate`),
# replaying exactly the calls of `run_experiment` for the same config; they are not cached because
# `run_experiment` does not keep per-client updates.

# %% tags=["parameters"]
profile = "ci"
output_dir = "results/ci"
runs_dir = "runs"
task = "digits-swin"
methods = ["dp-lora", "rolora", "la-lora"]
epsilon = 3.0
seed = 0
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
import os
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from lalora import plotting
from lalora.analysis.alignment import summarize_alignment
from lalora.analysis.probe import alignment_trace
from lalora.nbtools import experiment_base, make_config
from lalora.results import atomic_write_json

torch.set_num_threads(1)  # small models on a shared 2-core machine: contention costs more than it gives
plotting.use_style()
os.makedirs(output_dir, exist_ok=True)
started = time.perf_counter()

# %%
base = experiment_base(task, task_overrides=task_overrides, data_root=data_root, weights_path=weights_path,
                       rounds=rounds, local_steps=local_steps, batch_size=batch_size, clients=clients,
                       clients_per_round=clients_per_round, lr=lr)
from lalora.tasks import get_task

task_obj = get_task(task, **base["task_overrides"])
traces = {}
for m in methods:
    t0 = time.perf_counter()
    traces[m] = alignment_trace(make_config(base, method=m, epsilon=epsilon, seed=seed), task=task_obj)
    print(f"{m}: mean cos ΔA {np.nanmean(traces[m]['A']):.3f}, ΔB {np.nanmean(traces[m]['B']):.3f}, "
          f"Δ(BA) {np.nanmean(traces[m]['BA']):.3f}; acc {traces[m]['accuracy']:.3f} ({time.perf_counter() - t0:.0f} s)")

# %%
fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), sharey=True)
for ax, key, title in zip(axes, ("A", "B", "BA"), (r"$\Delta A$", r"$\Delta B$", r"$\Delta(sBA)$")):
    for m in methods:
        tr = traces[m]
        ax.plot(tr["rounds"], tr[key], marker=plotting.method_marker(m), color=plotting.method_color(m),
                label=plotting.method_label(m))
    ax.axhline(0, color="k", lw=0.6)
    ax.set_title(f"cosine of client updates: {title}")
    ax.set_xlabel("round")
    ax.xaxis.get_major_locator().set_params(integer=True)
axes[0].set_ylabel("mean pairwise cosine similarity")
axes[-1].legend()
fig.suptitle(f"{task}, ε = {epsilon:g}, rounds = {len(traces[methods[0]]['rounds'])}", y=1.04)
plotting.savefig(fig, output_dir, "07_client_alignment_rounds")

# %%
summary = {m: summarize_alignment([{k: traces[m][k][i] for k in ("A", "B", "BA")}
                                   for i in range(len(traces[m]["rounds"]))]) for m in methods}
result = {
    "profile": profile,
    "task": task,
    "epsilon": epsilon,
    "seed": seed,
    "traces": traces,
    "mean_cosine": summary,
    "la_lora_more_aligned_BA": (summary["la-lora"]["BA"] > summary["dp-lora"]["BA"])
    if {"la-lora", "dp-lora"} <= set(summary) else None,
    "wall_s": time.perf_counter() - started,
}
result["summary"] = {f"mean cos Δ{k} {m}": v[k] for m, v in summary.items() for k in ("A", "B", "BA")}
atomic_write_json(os.path.join(output_dir, "07_client_alignment.json"), result)
summary

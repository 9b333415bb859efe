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
#
# The cosines here are small (offline: about ±0.01), so each mean over rounds carries its 95%
# Student-t interval (rounds as the replicates; the figure's bands and the JSON's `ci95`), and
# "LA-LoRA more aligned than DP-LoRA" is answered only when the paired per-round difference's
# interval excludes 0; otherwise `la_lora_more_aligned_BA` is None ("within noise").

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


def t_halfwidth(values, confidence: float = 0.95) -> float:
    """Half-width of the two-sided Student-t interval of the mean (n >= 2)."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    return float(stats.t.ppf(0.5 + confidence / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))

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
        values = np.asarray(tr[key], dtype=float)
        ok = np.isfinite(values)
        if ok.sum() >= 2:   # the mean over rounds and its 95% t-interval, as a band
            mean, half = float(values[ok].mean()), t_halfwidth(values[ok])
            ax.axhspan(mean - half, mean + half, color=plotting.method_color(m), alpha=0.12, lw=0)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_title(f"cosine of client updates: {title}")
    ax.set_xlabel("round")
    ax.xaxis.get_major_locator().set_params(integer=True)
axes[0].set_ylabel("mean pairwise cosine similarity\n(bands: mean over rounds, 95% t-CI)")
axes[-1].legend()
fig.suptitle(f"{task}, ε = {epsilon:g}, rounds = {len(traces[methods[0]]['rounds'])}", y=1.04)
plotting.savefig(fig, output_dir, "07_client_alignment_rounds")

# %%
summary = {m: summarize_alignment([{k: traces[m][k][i] for k in ("A", "B", "BA")}
                                   for i in range(len(traces[m]["rounds"]))]) for m in methods}
def _interval(values) -> dict:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return {"mean": float(v.mean()) if v.size else None, "ci95": t_halfwidth(v) if v.size >= 2 else None,
            "n_rounds": int(v.size)}


intervals = {m: {k: _interval(traces[m][k]) for k in ("A", "B", "BA")} for m in methods}
verdict_BA = None   # None: not answerable (missing method, or the interval of the difference holds 0)
if {"la-lora", "dp-lora"} <= set(traces):
    diff = np.asarray(traces["la-lora"]["BA"], dtype=float) - np.asarray(traces["dp-lora"]["BA"], dtype=float)
    d = _interval(diff)
    intervals["la-lora minus dp-lora"] = {"BA": d}
    if d["ci95"] is not None and abs(d["mean"]) > d["ci95"]:
        verdict_BA = bool(d["mean"] > 0)
    print(f"cos Δ(BA), LA-LoRA minus DP-LoRA, paired over {d['n_rounds']} rounds: {d['mean']:+.4f}"
          + (f" ± {d['ci95']:.4f} (95% t-CI)" if d["ci95"] is not None else " (one round: no interval)")
          + ("" if verdict_BA is not None else " -> within noise, no verdict"))
result = {
    "profile": profile,
    "task": task,
    "epsilon": epsilon,
    "seed": seed,
    "traces": traces,
    "mean_cosine": summary,
    "mean_cosine_ci95": intervals,
    "la_lora_more_aligned_BA": verdict_BA,
    "wall_s": time.perf_counter() - started,
}
result["summary"] = {f"mean cos Δ{k} {m}": v[k] for m, v in summary.items() for k in ("A", "B", "BA")}
atomic_write_json(os.path.join(output_dir, "07_client_alignment.json"), result)
summary

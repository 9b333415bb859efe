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
# # 06 — Sharpness of the aggregated model: top Hessian eigenvalue and loss landscapes
#
# The paper's third diagnosis: FedAvg of DP-LoRA lands in a **sharp** minimum; LA-LoRA in a flatter
# one. Its evidence: the top Hessian eigenvalue, **101.62 (DP-LoRA) vs 64.77 (LA-LoRA)** on
# Swin-B / CIFAR-100 / ε = 1, and loss-landscape pictures. The paper does not say how these were
# computed, so we use the standard recipe:
#
# - loss: mean cross-entropy on a fixed random subset of the private training set (eval mode, no
#   dropout, float64), w.r.t. the trainable parameters only (LoRA A, B and the head);
# - top eigenvalue: Lanczos on exact Hessian-vector products (double back-propagation), with power
#   iteration (PyHessian's method) as a cross-check;
# - landscapes: 1-D and 2-D filter-normalised random directions (Li et al., 2018) around the final
#   global model.
#
# The global models are the final models of the federated runs of `01_main_vision` (same configs,
# so the runs are read from the cache, not re-trained). The eigenvalue of a different model and
# dataset is not comparable in absolute value to the paper's; what is comparable is the ordering.
#
# **Only trained models are compared.** A model whose final training loss is at or above the chance
# loss ln C (a uniform guess over the task's C classes) has collapsed: it sits nowhere near a minimum
# and its curvature says nothing about flatness (its top eigenvalue can even be negative). A method
# is "at a minimum" when every seed's loss is below ln C; the others are listed as "not at a minimum"
# and drawn hatched, with no flatter/sharper verdict (`lalora.verdicts.sharpness_comparison`).

# %% tags=["parameters"]
profile = "ci"
output_dir = "results/ci"
runs_dir = "runs"
task = "digits-swin"
methods = ["dp-lora", "la-lora"]
epsilon = 3.0
seeds = [0]
rounds = 2
local_steps = 4
batch_size = None
clients = None
clients_per_round = None
lr = None
task_overrides = {}
data_root = None  # paper profile: dataset folder
weights_path = None  # paper profile: pretrained weights
eval_examples = 64  # size of the fixed evaluation subset
lanczos_iters = 10
power_iters = 10
landscape_points = 9
landscape_radius = 1.0
grid_points = 0  # 0: skip the 2-D surface

# %%
import os
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from lalora import plotting
from lalora.analysis.probe import evaluation_batches, load_global_model, sharpness
from lalora.nbtools import experiment_base, make_config, run_grid
from lalora.results import atomic_write_json
from lalora.verdicts import fmt_diff, sharpness_comparison, sharpness_reason

# One thread: on a shared 2-core machine the small matmuls of double back-propagation are several
# times faster without thread contention.
torch.set_num_threads(1)
plotting.use_style()
os.makedirs(output_dir, exist_ok=True)
started = time.perf_counter()
PAPER = {"dp-lora": 101.62, "la-lora": 64.77}  # Swin-B / CIFAR-100 / ε = 1 (paper/reported.yaml: sharpness)

# %% [markdown]
# ## Final global models (cached federated runs)

# %%
base = experiment_base(task, task_overrides=task_overrides, data_root=data_root, weights_path=weights_path,
                       rounds=rounds, local_steps=local_steps, batch_size=batch_size, clients=clients,
                       clients_per_round=clients_per_round, lr=lr)
records = run_grid(base, [{"method": m, "epsilon": epsilon} for m in methods], seeds, runs_dir)
[(r["method"], r["seed"], round(r["accuracy"], 2), r["cached"]) for r in records]

# %% [markdown]
# ## Top Hessian eigenvalue and landscapes

# %%
from lalora.federated.simulation import resolve_config
from lalora.tasks import get_task

task_obj = get_task(task, **base["task_overrides"])
chance = float(np.log(task_obj.num_classes))   # cross-entropy of a uniform guess: above it, no minimum
per_run = []
for rec in records:
    cfg = resolve_config(make_config(base, method=rec["method"], epsilon=epsilon, seed=rec["seed"]), task_obj)
    model, task_obj, _ = load_global_model(rec["run_dir"], cfg, task=task_obj)
    batches = evaluation_batches(task_obj.train, task_obj.collate, eval_examples, seed=0)
    s = sharpness(model, task_obj.forward, batches, lanczos_iters=lanczos_iters, power_iters=power_iters,
                  landscape_points=landscape_points, landscape_radius=landscape_radius, grid_points=grid_points,
                  seed=rec["seed"])
    per_run.append({"method": rec["method"], "seed": rec["seed"], "accuracy": rec["accuracy"], **s,
                    "at_minimum": s["loss"] < chance})
    print(f"{rec['method']} seed {rec['seed']}: λ_max = {s['top_eigenvalue']:.4g} (Lanczos, {s['lanczos']['iterations']} HVPs), "
          f"{s['power']['eigenvalue']:.4g} (power), loss {s['loss']:.4f} (ln C = {chance:.4f})")

top = {m: float(np.mean([r["top_eigenvalue"] for r in per_run if r["method"] == m])) for m in methods}
top_std = {m: float(np.std([r["top_eigenvalue"] for r in per_run if r["method"] == m], ddof=1))
           if len(seeds) > 1 else float("nan") for m in methods}
judged = sharpness_comparison({"runs": per_run, "chance_loss": chance})
at_minimum = {m: bool(v["at_minimum"]) for m, v in judged["methods"].items()}
comparison = judged["comparison"]
print("at a minimum:", [m for m, ok in at_minimum.items() if ok], "| not at a minimum:",
      [m for m, ok in at_minimum.items() if not ok])
print("LA-LoRA flatter than DP-LoRA:", f"{fmt_diff(comparison)} → {comparison['verdict']}" if comparison
      else f"no comparison ({sharpness_reason(judged)})")
top

# %% [markdown]
# ## Figures

# %%
fig, axes = plt.subplots(1, 2, figsize=plotting.FIGSIZE_WIDE)
for r in per_run:
    m = r["method"]
    axes[0].plot(r["landscape_1d"]["alphas"], r["landscape_1d"]["loss"], marker=plotting.method_marker(m),
                 color=plotting.method_color(m), label=f"{plotting.method_label(m)} (seed {r['seed']})")
axes[0].axhline(chance, color="grey", linestyle=":", linewidth=1, label=f"chance loss ln C = {chance:.2f}")
axes[0].set_xlabel("step α along a filter-normalised random direction")
axes[0].set_ylabel("training loss (cross-entropy)")
axes[0].set_title("1-D loss landscape around the global model", fontsize=10)
axes[0].legend()
xs = np.arange(len(methods))
# Trained methods get solid bars; a method not at a minimum is drawn hatched and labelled so: its
# eigenvalue is shown, not compared.
bars = axes[1].bar(xs, [top[m] for m in methods], color=[plotting.method_color(m) for m in methods],
                   yerr=[0 if np.isnan(top_std[m]) else top_std[m] for m in methods])
for bar, m in zip(bars, methods):
    if not at_minimum[m]:
        bar.set_alpha(0.35)
        bar.set_hatch("//")
axes[1].set_xticks(xs, [plotting.method_label(m) + ("" if at_minimum[m] else "\nnot at a minimum\n(loss ≥ ln C in some seed)")
                        for m in methods])
axes[1].set_ylabel(r"top Hessian eigenvalue $\lambda_{max}$")
verdict_line = (f"DP-LoRA − LA-LoRA: {fmt_diff(comparison)} ({comparison['verdict']})" if comparison
                else "no flatter/sharper verdict: compared only between models at a minimum")
axes[1].set_title(f"{task}, ε = {epsilon:g}: {verdict_line}\n(paper, Swin-B / CIFAR-100, ε = 1: "
                  f"{PAPER['dp-lora']} vs {PAPER['la-lora']})", fontsize=8)
fig.tight_layout()
plotting.savefig(fig, output_dir, "06_sharpness_landscape_1d")

# %%
if grid_points:
    runs0 = [r for r in per_run if r["seed"] == seeds[0]]
    fig, axes = plt.subplots(1, len(runs0), figsize=plotting.FIGSIZE_WIDE, squeeze=False, sharey=True)
    zmin = min(np.min(r["landscape_2d"]["loss"]) for r in runs0)
    zmax = max(np.max(r["landscape_2d"]["loss"]) for r in runs0)
    levels = np.linspace(zmin, zmax, 15)
    for ax, r in zip(axes[0], runs0):
        a, b = np.meshgrid(r["landscape_2d"]["alphas"], r["landscape_2d"]["betas"], indexing="ij")
        cs = ax.contourf(a, b, np.asarray(r["landscape_2d"]["loss"]), levels=levels, cmap="viridis")
        ax.contour(a, b, np.asarray(r["landscape_2d"]["loss"]), levels=levels, colors="white", linewidths=0.4)
        ax.plot(0, 0, "r*", markersize=10, label="global model")
        ax.set_title(f"{plotting.method_label(r['method'])}: λ_max = {r['top_eigenvalue']:.3g}")
        ax.set_xlabel("direction 1 (α)")
        ax.legend(loc="upper right", fontsize=7)
    axes[0][0].set_ylabel("direction 2 (β)")
    fig.colorbar(cs, ax=axes[0].tolist(), label="training loss")
    plotting.savefig(fig, output_dir, "06_sharpness_landscape_2d")

# %%
result = {
    "profile": profile,
    "task": task,
    "epsilon": epsilon,
    "seeds": seeds,
    "top_eigenvalue": top,
    "top_eigenvalue_std": top_std,
    "paper_top_eigenvalue": PAPER,
    "num_classes": int(task_obj.num_classes),
    "chance_loss": chance,
    "at_minimum": at_minimum,
    # the flatness comparison of the one rule (paired seeds, 95% CI), only between models at a minimum
    "comparison": comparison,
    "runs": per_run,
    "eval_examples": eval_examples,
    "wall_s": time.perf_counter() - started,
}
result["summary"] = {**{f"top_eigenvalue {m}": v for m, v in top.items()},
                     **{f"top_eigenvalue {m} (paper)": v for m, v in PAPER.items()},
                     "chance loss ln C": chance,
                     "not at a minimum": ", ".join(m for m, ok in at_minimum.items() if not ok) or "none",
                     "LA-LoRA flatter than DP-LoRA (verdict)": comparison["verdict"] if comparison else "no comparison"}
atomic_write_json(os.path.join(output_dir, "06_sharpness.json"), result)
{k: result[k] for k in ("top_eigenvalue", "at_minimum", "comparison", "wall_s")}

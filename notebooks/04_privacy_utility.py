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
# # 04 · Privacy–utility: accuracy vs ε
#
# How much accuracy each method keeps as the privacy budget tightens, ε ∈ {0.5, 1, 2, 3, 8, ∞}
# at δ = 1e-5 (ε = ∞: no clipping and no noise). For each ε the accountant calibrates one noise
# multiplier σ so that the most-used client meets the target; smaller ε → larger σ. The paper's
# claim to check: LA-LoRA degrades most gracefully, and its advantage over DP-LoRA is largest at
# small ε and shrinks as ε grows (at ε = ∞ every method is ordinary federated LoRA with its own
# training schedule).
#
# **Profiles.** `paper`: Swin-T / CIFAR-100, 100 rounds × 20 steps. `offline`: the small pretrained
# Swin on scikit-learn digits, fewer rounds and few seeds (CPU); it shows the shape of each curve
# and the ordering of methods per ε, with a standard-deviation band over seeds. `ci`: seconds.

# %% tags=["parameters"]
profile = "ci"
output_dir = "results/ci"
runs_dir = "runs"
task = "digits-swin"
methods = ["dp-lora", "la-lora"]
epsilons = [1.0, 3.0, "inf"]
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
import math
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from lalora.main_results import paired_gaps, with_ci95
from lalora.nbtools import accuracy_table, experiment_base, run_grid
from lalora.plotting import FIGSIZE_WIDE, legend_outside, lines_vs, method_label, savefig, use_style
from lalora.curves import run_curves
from lalora.results import atomic_write_json

use_style()
started = time.perf_counter()

# %%
base = experiment_base(task, task_overrides=task_overrides, data_root=data_root, weights_path=weights_path,
                       rounds=rounds, local_steps=local_steps, batch_size=batch_size, clients=clients,
                       clients_per_round=clients_per_round, lr=lr)
records = run_grid(base, [{"method": m, "epsilon": e} for e in epsilons for m in methods], seeds, runs_dir)
table = accuracy_table(records)

df = pd.DataFrame(table)
df["ε"] = [("∞" if e == "inf" else f"{e:g}") for e in df.epsilon]
df["method"] = [method_label(m) for m in df.method]
df["cell"] = [f"{m:.2f} ± {s:.2f}" for m, s in zip(df.accuracy_mean, df.accuracy_std)]
df.pivot_table(index="method", columns="ε", values="cell", aggfunc="first", sort=False)

# %% [markdown]
# ## Noise and spent budget per ε
# σ is the calibrated noise multiplier; "ε spent" is the largest over clients and seeds and must
# not exceed the target.

# %%
df.pivot_table(index="method", columns="ε", values=["noise_multiplier", "epsilon_spent"], aggfunc="first",
               sort=False).round(3)

# %% [markdown]
# ## Figure: accuracy vs ε
# ε on a log axis; the non-private point (ε = ∞) is drawn at the right edge, past a break.

# %%
finite = sorted(float(e) for e in epsilons if e != "inf")
inf_at = finite[-1] * 2.5 if finite else 1.0
fig, (ax, ax_gap) = plt.subplots(1, 2, figsize=FIGSIZE_WIDE, gridspec_kw={"width_ratios": [3, 2]})
lines_vs(ax, with_ci95(table), x_key="epsilon", inf_at=inf_at, err="accuracy_ci95")
ax.set_xscale("log")
ticks = finite + ([inf_at] if "inf" in epsilons else [])
ax.set_xticks(ticks, [f"{t:g}" for t in finite] + (["∞"] if "inf" in epsilons else []))
ax.minorticks_off()
if "inf" in epsilons and finite:
    ax.axvline(math.sqrt(finite[-1] * inf_at), color="0.6", ls=":", lw=1)
ax.set_xlabel("privacy budget ε (δ = 1e-5; log scale)")
ax.set_ylabel("test accuracy (%), 95% CI band")
ax.set_title(f"{task}: accuracy vs ε")
ax.margins(y=0.15)
ax.legend(loc="best")

# Right panel: each method's gain over DP-LoRA at each ε, paired by seed, with its 95% t-interval.
gaps = []
if "dp-lora" in methods:
    gaps = paired_gaps(records, "epsilon")
    lines_vs(ax_gap, gaps, x_key="epsilon", inf_at=inf_at, err="accuracy_ci95")
    ax_gap.axhline(0, color="0.3", lw=1)
    ax_gap.set_xscale("log")
    ax_gap.set_xticks(ticks, [f"{t:g}" for t in finite] + (["∞"] if "inf" in epsilons else []))
    ax_gap.minorticks_off()
    ax_gap.set_xlabel("privacy budget ε (log scale)")
    ax_gap.set_ylabel("accuracy − DP-LoRA's (points, paired, 95% CI)")
    ax_gap.set_title("gain over DP-LoRA")
    if gaps:
        ax_gap.legend(loc="best")
else:
    ax_gap.set_axis_off()
fig.tight_layout()
savefig(fig, output_dir, "04_privacy_utility_curve")

# %%
def monotone(method):
    pts = sorted(((float(r["epsilon"]), r["accuracy_mean"]) for r in table if r["method"] == method))
    return all(b[1] >= a[1] - 1e-9 for a, b in zip(pts, pts[1:]))

summary = {
    "task": task, "methods": methods, "epsilons": [str(e) for e in epsilons], "n_seeds": len(seeds),
    "rounds": rounds, "local_steps": local_steps,
    "max_epsilon_spent_minus_target": max((r["epsilon_spent"] - r["target_epsilon"] for r in records
                                           if r["private"]), default=0.0),
    **{f"accuracy_monotone_in_eps[{m}]": monotone(m) for m in methods},
    **{f"gain_over_dp_lora[{g['method']}, eps={g['epsilon']}]": g["accuracy_mean"] for g in gaps},
}
atomic_write_json(f"{output_dir}/04_privacy_utility.json", {
    "notebook": "04_privacy_utility", "profile": profile, "metric": "test accuracy (%)",
    "table": table, "summary": summary,
    "runs": [{k: v for k, v in r.items() if k != "curve"} for r in records],
    "curves": run_curves(records),   # per-round test accuracy and training loss of every run (lalora.curves)
    "seconds": time.perf_counter() - started,
})
summary

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
# # 08 — Noise amplification in the LoRA product
#
# The paper's second diagnosis: when DP-LoRA noises **both** factors in one step,
# (B + N_B)(A + N_A) = BA + N_B·A + B·N_A + **N_B·N_A**. The cross term is second order in the
# noise, so its Frobenius norm grows like σ² while the linear terms grow like σ. LA-LoRA noises
# one factor per step, so only one linear term appears per step.
#
# We check by Monte Carlo against the exact second moments (entries i.i.d. N(0, σ²)):
# E‖N_B N_A‖²_F = m·n·r·σ⁴, E‖N_B A‖²_F = m·σ²‖A‖²_F, E‖B N_A‖²_F = n·σ²‖B‖²_F,
# and fit log-log slopes (expected 2 and 1). Then we measure the noise one SGD step puts on the
# effective weight W = W0 + s·B·A under DP-LoRA and LA-LoRA, for a LoRA layer of the paper's shape.

# %% tags=["parameters"]
profile = "ci"
output_dir = "results/ci"
runs_dir = "runs"
m = 32  # output features of the LoRA layer
n = 24  # input features
r = 4  # LoRA rank
sigmas = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0]  # entry std of the factor noise
trials = 100  # Monte Carlo draws per σ
# per-step noise on W: the paper's vision setting (Swin-T attn.qkv is 2304×768, r = α = 16)
step_m = 96
step_n = 32
step_r = 16
step_lr = 0.1
step_clip = 1.0
step_batch = 16
step_noise_multipliers = [0.5, 1.0, 2.0, 4.0]
seed = 0

# %%
import math
import os

import matplotlib.pyplot as plt
import numpy as np
import torch

from lalora import plotting
from lalora.analysis.noise import noise_scan, weight_noise_per_step
from lalora.results import atomic_write_json

torch.set_num_threads(1)
plotting.use_style()
os.makedirs(output_dir, exist_ok=True)

# %% [markdown]
# ## ‖N_B N_A‖_F against σ (Monte Carlo vs closed forms)

# %%
scan = noise_scan(m, n, r, sigmas, trials=trials, seed=seed)
labels = {"NB_NA": r"$N_B N_A$ (cross term)", "NB_A": r"$N_B A$", "B_NA": r"$B N_A$"}
fig, ax = plt.subplots()
for key, lab in labels.items():
    line, = ax.loglog(scan.sigmas, scan.monte_carlo[key], "o", label=f"{lab}: slope {scan.slopes[key]:.2f}")
    ax.loglog(scan.sigmas, scan.closed_form[key], "-", color=line.get_color(), alpha=0.6)
ax.set_xlabel(r"noise std $\sigma$ of each factor's entries")
ax.set_ylabel(r"RMS Frobenius norm $\sqrt{E\|\cdot\|_F^2}$")
ax.set_title(f"Noise terms of (B+N_B)(A+N_A), m={m}, n={n}, r={r}\n(markers: Monte Carlo, lines: closed form)")
ax.legend()
plotting.savefig(fig, output_dir, "08_noise_amplification_scaling")
print("slopes:", scan.slopes, "max relative error vs closed form:", scan.max_rel_error)

# %% [markdown]
# Crossover: the cross term exceeds the larger linear term where m·n·r·σ⁴ = max(m‖A‖², n‖B‖²)·σ².

# %%
sq_lin = max(scan.closed_form["NB_A"][0] ** 2, scan.closed_form["B_NA"][0] ** 2) / scan.sigmas[0] ** 2
sigma_cross = math.sqrt(sq_lin / (m * n * r))
print(f"crossover sigma ≈ {sigma_cross:.3f}")

# %% [markdown]
# ## Noise on W per local step: DP-LoRA (both factors) vs LA-LoRA (one factor)
#
# DP-SGD adds N(0, σ²C²) to the summed clipped gradient and divides by the batch size b, so each
# factor's gradient noise has std σC/b and the step moves it by lr times that. A and B are drawn at a
# trained-LoRA-like scale (‖BA‖ entries O(1)); only the noise part of ΔW is measured.

# %%
g = torch.Generator().manual_seed(seed)
A = torch.randn(step_r, step_n, generator=g, dtype=torch.float64) / math.sqrt(step_n)
B = torch.randn(step_m, step_r, generator=g, dtype=torch.float64) / math.sqrt(step_r)
rows = []
for z in step_noise_multipliers:
    std = z * step_clip / step_batch
    res = weight_noise_per_step(A, B, std, step_lr, scaling=1.0, trials=trials, generator=g)
    rows.append({"noise_multiplier": z, **res})
fig, ax = plt.subplots()
zs = [row["noise_multiplier"] for row in rows]
ax.plot(zs, [row["dp-lora"] for row in rows], "o-", color=plotting.method_color("dp-lora"), label="DP-LoRA step (A and B)")
ax.plot(zs, [row["dp-lora-cross-term"] for row in rows], "o--", color=plotting.method_color("dp-lora"), alpha=0.6,
        label="DP-LoRA: cross term only")
ax.plot(zs, [row["la-lora-B-step"] for row in rows], "^-", color=plotting.method_color("la-lora"), label="LA-LoRA B step")
ax.plot(zs, [row["la-lora-A-step"] for row in rows], "^--", color=plotting.method_color("la-lora"), label="LA-LoRA A step")
ax.set_xscale("log"); ax.set_yscale("log")
ax.set_xlabel(r"noise multiplier $\sigma$ (C = %g, b = %d, lr = %g)" % (step_clip, step_batch, step_lr))
ax.set_ylabel(r"RMS $\|\Delta W_{noise}\|_F$ per step")
ax.set_title(f"Noise on W per local step (m={step_m}, n={step_n}, r={step_r})")
ax.legend()
plotting.savefig(fig, output_dir, "08_noise_amplification_per_step")
rows

# %%
result = {
    "profile": profile,
    "shape": {"m": m, "n": n, "r": r},
    "sigmas": scan.sigmas,
    "monte_carlo_rms": scan.monte_carlo,
    "closed_form_rms": scan.closed_form,
    "slopes": scan.slopes,
    "max_rel_error": scan.max_rel_error,
    "crossover_sigma": sigma_cross,
    "per_step": {"shape": {"m": step_m, "n": step_n, "r": step_r}, "lr": step_lr, "clip_norm": step_clip,
                 "batch_size": step_batch, "rows": rows},
    "claims": {
        "cross_term_slope_2": abs(scan.slopes["NB_NA"] - 2) <= 0.1,
        "linear_terms_slope_1": all(abs(scan.slopes[k] - 1) <= 0.1 for k in ("NB_A", "B_NA")),
        "dp_lora_noisier_than_la_lora": all(row["dp-lora"] > max(row["la-lora-A-step"], row["la-lora-B-step"]) for row in rows),
    },
}
result["summary"] = {**{f"log-log slope {k}": v for k, v in scan.slopes.items()}, "crossover sigma": sigma_cross,
                     **{f"claim: {k}": v for k, v in result["claims"].items()}}
atomic_write_json(os.path.join(output_dir, "08_noise_amplification.json"), result)
result["claims"]

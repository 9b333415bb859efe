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
# # 09 — Theorem checks on clean synthetic problems
#
# The paper's statements were only available through secondary notes
# (arXiv 2602.19926 §3–4; paper/reported.yaml names the sources), so each check below states the exact claim it tests. All in float64.
#
# 1. **Gradient coupling** (Eq. 3): ∇_A L = s·Bᵀ∇_W L, ∇_B L = s·∇_W L·Aᵀ, against autograd.
# 2. **Theorem 2**: the alternating updates' closed forms (1/s²)·∇_B L·(AAᵀ)⁻¹ and
#    (1/s²)·(BᵀB)⁻¹·∇_A L are the least-squares projections of ∇_W L; the residual is orthogonal
#    to the subspace.
# 3. **Theorem 3**: a simultaneous step carries an η² cross term whose share does not vanish with
#    width; an alternating step has none.
# 4. **Theorem 4**: alternating updates on RIP matrix sensing converge linearly, at a rate at or
#    below (1 − η_c)².
# 5. **Theorem 1**: ε from the accountant grows like √steps and falls like 1/σ; the filter is
#    post-processing, so ε does not depend on it.
# 6. **Filter**: [1,4,6,4,1]/16 has gain cos⁴(ω/2) and white-noise variance factor 70/256.

# %% tags=["parameters"]
profile = "ci"
output_dir = "results/ci"
runs_dir = "runs"
coupling_shape = [12, 10, 3]  # m, n, r
projection_shapes = [[30, 20, 4], [8, 50, 3], [64, 64, 8]]
widths = [16, 32, 64, 128, 256]
width_rank = 4
etas = [0.25, 0.5]
width_trials = 2
sensing_shape = [20, 16, 2]
sensing_etas = [0.3, 0.5, 0.8]
sensing_measurements = [None, 2000]
sensing_iterations = 30
eps_steps = [50, 100, 200, 400, 800, 1600]
eps_sigmas = [0.8, 1.0, 1.5, 2.0, 3.0, 4.0]
eps_sample_rate = 0.07  # batch 16 of ≈225 digits per client
check_simulator_sigma = True  # calibrate σ in the Simulator with the filter on and off
seed = 0

# %%
import math
import os

import matplotlib.pyplot as plt
import numpy as np
import torch

from lalora import plotting
from lalora.analysis import theory
from lalora.results import atomic_write_json

torch.set_num_threads(1)
plotting.use_style()
os.makedirs(output_dir, exist_ok=True)
claims = {}

# %% [markdown]
# ## 1. Gradient coupling

# %%
coupling = theory.gradient_coupling(*coupling_shape, scale=2.0, seed=seed)
claims["gradient_coupling"] = max(coupling.values()) < 1e-12
coupling

# %% [markdown]
# ## 2. Theorem 2: closed-form projections = least squares

# %%
projections = [{"shape": s, **theory.projection_check(*s, scale=0.5, seed=seed)} for s in projection_shapes]
claims["theorem2_closed_form_equals_lstsq"] = all(
    max(p["closed_vs_lstsq_A"], p["closed_vs_lstsq_B"]) < 1e-8 for p in projections)
claims["theorem2_residual_orthogonal"] = all(max(p["resid_orth_A"], p["resid_orth_B"]) < 1e-8 for p in projections)
projections

# %% [markdown]
# ## 3. Theorem 3: the η² cross term against width

# %%
cross = {str(eta): theory.cross_term_vs_width(widths, r=width_rank, eta=eta, trials=width_trials, seed=seed)
         for eta in etas}
fig, ax = plt.subplots()
for eta, res in cross.items():
    ax.plot(res["widths"], res["simultaneous"], "o-", color=plotting.method_color("dp-lora"),
            alpha=0.5 + 0.5 * float(eta) / max(etas), label=f"simultaneous, η = {eta}")
    ax.plot(res["widths"], np.maximum(res["alternating"], 1e-17), "^--", color=plotting.method_color("la-lora"),
            alpha=0.5 + 0.5 * float(eta) / max(etas), label=f"alternating, η = {eta}")
ax.set_xscale("log", base=2); ax.set_yscale("log")
ax.set_xlabel("width m = n")
ax.set_ylabel(r"$\|\Delta W - \Delta W_1\|_F / \|\Delta W_1\|_F$ (second-order share)")
ax.set_title("Theorem 3: η² cross term of one update vs width")
ax.legend()
plotting.savefig(fig, output_dir, "09_theorem_checks_cross_term")
claims["theorem3_alternating_no_cross_term"] = all(max(r["alternating"]) < 1e-12 for r in cross.values())
claims["theorem3_simultaneous_cross_term_persists"] = all(
    min(r["simultaneous"]) > 0.05 and r["simultaneous"][-1] > 0.7 * r["simultaneous"][-2] for r in cross.values())
{k: v["simultaneous"] for k, v in cross.items()}

# %% [markdown]
# ## 4. Theorem 4: linear convergence on RIP matrix sensing
#
# η_c is not given in the sources; we use η_c = 1 − max|1 − ηλ| over the eigenvalues λ of 𝒜*𝒜
# restricted to the tangent space at the solution (the local RIP constant), so that η_c = η for
# exact measurements (see `lalora.analysis.theory.alternating_matrix_sensing`).

# %%
sensing = []
fig, ax = plt.subplots()
for p in sensing_measurements:
    for eta in sensing_etas:
        res = theory.alternating_matrix_sensing(*sensing_shape, measurements=p, eta=eta,
                                                iterations=sensing_iterations, seed=seed)
        sensing.append({"measurements": res.extra["measurements"], "eta": eta, "measured_rate": res.measured_rate,
                        "bound": res.bound, "eta_c": res.eta_c, "restricted_eigs": list(res.restricted_eigs),
                        "linear_phase": list(res.linear_phase), "losses": res.losses})
        ax.semilogy(res.losses, "-" if p is None else "--",
                    label=f"η={eta}, p={res.extra['measurements']}: rate {res.measured_rate:.3f} ≤ {res.bound:.3f}")
ax.set_xlabel("iteration k (one B step + one A step)")
ax.set_ylabel(r"$L_c(B_k, A_k)$")
ax.set_title("Theorem 4: alternating updates on Gaussian matrix sensing")
ax.legend(fontsize=7)
plotting.savefig(fig, output_dir, "09_theorem_checks_sensing")
claims["theorem4_rate_below_bound"] = all(s["measured_rate"] <= s["bound"] for s in sensing)
[{k: v for k, v in s.items() if k != "losses"} for s in sensing]

# %% [markdown]
# ## 5. Theorem 1: ε from the accountant (PRV, the default, and RDP; δ = 1e-5)
#
# Both accountants bound the same mechanism (Poisson-subsampled Gaussian). PRV (the default) is
# tighter: the same σ gives a smaller ε, so calibrating for a target ε gives a smaller σ. RDP is
# the option (`accountant="rdp"`): a valid but looser bound.
#
# The filter never enters the accountant: it post-processes the noised gradient. As a check on the
# actual pipeline we also calibrate σ for a federated config with and without the filter.

# %%
import functools

from lalora.privacy import calibrate_sigma, epsilon_for

scans = {name: theory.epsilon_scan(functools.partial(epsilon_for, accountant=name), sigmas=eps_sigmas,
                                   steps=eps_steps, sample_rate=eps_sample_rate)
         for name in ("prv", "rdp")}
eps = scans["prv"]
fig, axes = plt.subplots(1, 2, figsize=plotting.FIGSIZE_WIDE)
for name, scan in scans.items():
    style = "o-" if name == "prv" else "s--"
    axes[0].loglog(scan["steps"], scan["epsilon_vs_steps"], style, label=f"{name.upper()} (σ = {scan['sigma_for_steps']})")
    axes[1].loglog(scan["sigmas"], scan["epsilon_vs_sigma"], style, label=f"{name.upper()} ({scan['steps_for_sigma']} steps)")
ref = eps["epsilon_vs_steps"][0] * np.sqrt(np.asarray(eps["steps"]) / eps["steps"][0])
axes[0].loglog(eps["steps"], ref, "k:", label=r"$\propto\sqrt{TK}$")
axes[0].set_xlabel("DP steps T·K"); axes[0].set_ylabel("ε (δ = 1e-5)"); axes[0].legend()
axes[0].set_title(f"PRV slope {eps['slope_steps']:.2f}, RDP {scans['rdp']['slope_steps']:.2f}")
ref = eps["epsilon_vs_sigma"][0] * eps["sigmas"][0] / np.asarray(eps["sigmas"])
axes[1].loglog(eps["sigmas"], ref, "k:", label=r"$\propto 1/\sigma$")
axes[1].set_xlabel("noise multiplier σ"); axes[1].set_ylabel("ε (δ = 1e-5)"); axes[1].legend()
axes[1].set_title(f"PRV slope {eps['slope_sigma']:.2f}, RDP {scans['rdp']['slope_sigma']:.2f}")
fig.suptitle(f"Theorem 1: ε from the PRV and RDP accountants (q = {eps_sample_rate})")
plotting.savefig(fig, output_dir, "09_theorem_checks_epsilon")
sigma_by_accountant = {name: calibrate_sigma(3.0, 1e-5, [(eps_sample_rate, 400)], accountant=name)
                       for name in ("prv", "rdp")}
sigma_plain = sigma_by_accountant["prv"]
for scan in scans.values():
    claims["theorem1_eps_grows_with_steps"] = claims.get("theorem1_eps_grows_with_steps", True) and bool(
        np.all(np.diff(scan["epsilon_vs_steps"]) > 0))
    claims["theorem1_eps_falls_with_sigma"] = claims.get("theorem1_eps_falls_with_sigma", True) and bool(
        np.all(np.diff(scan["epsilon_vs_sigma"]) < 0))
claims["prv_tighter_than_rdp"] = bool(np.all(np.asarray(scans["prv"]["epsilon_vs_steps"])
                                              <= np.asarray(scans["rdp"]["epsilon_vs_steps"])))
print("σ for ε = 3 at 400 steps:", {k: round(v, 4) for k, v in sigma_by_accountant.items()})
{k: eps[k] for k in ("slope_steps", "slope_sigma")}

# %% [markdown]
# The federated simulator calibrates σ from (ε, δ, q, steps) only; the `filter` flag is not an input.
# With `check_simulator_sigma`, we confirm it on the real pipeline: a `Simulator` on a tiny synthetic
# task (`lalora.analysis.toy`) calibrates the same σ for LA-LoRA with and without the filter.

# %%
filter_invariance = None
if check_simulator_sigma:
    from lalora.analysis.toy import toy_task
    from lalora.config import RunConfig
    from lalora.federated.simulation import Simulator

    toy = toy_task()
    sig = {flt: Simulator(RunConfig(task="toy", method="la-lora", epsilon=3.0, filter=flt), task=toy).noise_multiplier
           for flt in (False, True)}
    filter_invariance = {"sigma_without_filter": sig[False], "sigma_with_filter": sig[True]}
    claims["theorem1_filter_leaves_sigma_unchanged"] = sig[False] == sig[True]
filter_invariance

# %% [markdown]
# ## 6. The low-pass filter: gain cos⁴(ω/2), variance factor 70/256
#
# Measured through `lalora.federated.filters.lowpass` (the filter the training loop applies), on the
# interior of long signals (the borders use mirror padding).

# %%
from lalora.federated.filters import lowpass

filt = theory.filter_checks(lambda x: lowpass(x, dim=1), seed=seed)
fig, ax = plt.subplots()
w = np.linspace(0, math.pi, 200)
ax.plot(w, np.cos(w / 2) ** 4, "-", label=r"theory $\cos^4(\omega/2)$")
ax.plot(filt["omega"], filt["gain_measured"], "o", label="measured (interior)")
ax.set_xlabel(r"angular frequency $\omega$ (rad/sample)")
ax.set_ylabel("gain")
ax.set_title(f"Filter [1,4,6,4,1]/16: white-noise variance ×{filt['variance_factor_measured']:.4f} "
             f"(theory 70/256 = {70/256:.4f})")
ax.legend()
plotting.savefig(fig, output_dir, "09_theorem_checks_filter")
claims["filter_gain_cos4"] = filt["max_gain_error"] < 1e-10
claims["filter_variance_70_256"] = abs(filt["variance_factor_measured"] / (70 / 256) - 1) < 0.05
{k: filt[k] for k in ("max_gain_error", "variance_factor_measured", "variance_factor_theory")}

# %%
result = {
    "profile": profile,
    "gradient_coupling": coupling,
    "theorem2": projections,
    "theorem3": cross,
    "theorem4": sensing,
    "theorem1": {**eps, "accountant": "prv", "rdp": scans["rdp"], "filter_invariance": filter_invariance,
                 "sigma_eps3_400_steps": sigma_plain, "sigma_eps3_400_steps_by_accountant": sigma_by_accountant},
    "filter": filt,
    "claims": claims,
}
result["summary"] = {**{f"claim: {k}": v for k, v in claims.items()},
                     "epsilon slope vs steps": eps["slope_steps"], "epsilon slope vs sigma": eps["slope_sigma"],
                     "filter variance factor (measured)": filt["variance_factor_measured"],
                     "worst Theorem 4 rate / bound": max(s["measured_rate"] / s["bound"] for s in sensing)}
atomic_write_json(os.path.join(output_dir, "09_theorem_checks.json"), result)
claims

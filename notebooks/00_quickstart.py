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
# # 00 · Quickstart: one differentially private federated run
#
# A five-minute tour of `lalora`. We fine-tune a small pretrained Swin transformer on real
# handwritten digits (scikit-learn's 1,797 8×8 images), split across clients with a non-IID
# Dirichlet partition, with **LA-LoRA**: each client trains only LoRA factors (plus the
# classification head), alternating B and A at every local step, under **sample-level
# differential privacy** (per-sample clipping, Gaussian noise, Poisson sampling, RDP accounting).
#
# What you will see:
# 1. the run's configuration after the task's defaults are filled in;
# 2. the noise multiplier σ that the accountant calibrated for the target ε, and the ε each client
#    actually spent (it must not exceed the target);
# 3. the test-accuracy curve of the global model, round by round.
#
# The run is cached under `runs_dir` by a hash of its configuration: executing this notebook again
# reads the finished run instead of training again.

# %% tags=["parameters"]
profile = "ci"
output_dir = "results/ci"
runs_dir = "runs"
task = "digits-swin"
method = "la-lora"
epsilon = 3.0
rounds = 2
local_steps = 4
clients = None            # None: the task's default (8 clients for digits-swin)
clients_per_round = None  # None: the task's default (4)
seed = 0
task_overrides = {}       # keyword arguments of the task factory, e.g. {"max_train_samples": 300}

# %%
import math
import time

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.ticker import MaxNLocator

from lalora.config import RunConfig
from lalora.federated.runs import run_experiment
from lalora.plotting import method_color, method_label, savefig, use_style
from lalora.results import atomic_write_json

use_style()
started = time.perf_counter()

# %% [markdown]
# ## 0. The paper profile's noise regime (paper profile only; needs no data)
#
# The σ every paper run calibrates for ε = 1, 2, 3 at δ = 1e-5 follows from the settings alone
# (500 samples per client, batch 16, K = 20, 100 rounds, 4 of 8 clients per round; GLUE split
# over 20 clients), so it is printed before anything trains: the run plan (`lalora.privacy.plan.RunPlan`,
# the runs' own schedule, sizes and PRV accountant) gives it without a model or data.

# %%
if profile == "paper":
    from lalora.tasks.paper import paper_noise_table

    print(paper_noise_table())

# %% [markdown]
# ## 1. Configure and run
#
# `RunConfig` holds everything that can change a number. Fields left at `None` take the task's
# experiment defaults (SPEC §4: SGD, lr 0.1, batch 16, Dirichlet β = 0.1, ...).
# `run_experiment` trains (or reads the cached run) and returns the per-round metrics and a final
# summary.

# %%
cfg = RunConfig(task=task, method=method, epsilon=epsilon, rounds=rounds, local_steps=local_steps,
                clients=clients, clients_per_round=clients_per_round, seed=seed,
                task_overrides=task_overrides)
result = run_experiment(cfg, runs_dir=runs_dir, progress=False)
final = result.final
resolved = result.config
print(f"run folder: {result.run_dir} ({'read from cache' if result.cached else 'trained now'})")
pd.Series({k: v for k, v in resolved.to_dict().items() if k != "task_overrides"}, name="value").to_frame()

# %% [markdown]
# ## 2. Privacy: the calibrated noise and the ε each client spent
#
# The client-sampling schedule is drawn from the seed before training, so every client's number
# of DP steps is known up front; σ is calibrated so that the client with the most steps meets the
# target ε at δ = 1e-5. Clients sampled less often spend less.

# %%
per_client = pd.DataFrame({
    "client": range(len(final["per_client_epsilon"])),
    "DP steps": final.get("per_client_steps", [None] * len(final["per_client_epsilon"])),
    "ε spent": final["per_client_epsilon"],
})
target = float(final["target_epsilon"])
print(f"target ε = {target:g} at δ = {final['delta']:g};  noise multiplier σ = {final['noise_multiplier']:.3f};  "
      f"clip norm C = {final['clip_norm']}")
print(f"largest ε spent by a client = {float(final['epsilon_spent']):.4f}  (≤ target: "
      f"{float(final['epsilon_spent']) <= target + 1e-9})")
per_client

# %% [markdown]
# ## 3. Accuracy of the global model, round by round

# %%
curve = pd.DataFrame([{"round": m["round"], "test accuracy (%)": 100 * m["test_accuracy"],
                       "ε spent": m["epsilon_spent"], "train loss": m["train_loss"]}
                      for m in result.metrics if m.get("test_accuracy") is not None])
fig, ax = plt.subplots(figsize=(6.4, 4.0))
ax.plot(curve["round"], curve["test accuracy (%)"], marker="o", color=method_color(method),
        label=f"{method_label(method)}, target ε = {epsilon:g}")
ax.set_xlabel("communication round")
ax.set_ylabel("test accuracy of the global model (%)")
ax.set_title(f"{task}: {method_label(method)} under DP")
ax.set_xlim(0.5, max(curve["round"]) + 0.5)
ax.set_ylim(0, 100)
ax.xaxis.set_major_locator(MaxNLocator(integer=True))
ax2 = ax.twinx()
ax2.plot(curve["round"], curve["ε spent"], ls="--", color="0.4", label="ε spent (most-used client)")
ax2.set_ylabel("ε spent so far", color="0.3")
ax2.grid(False)
ax2.axhline(target, color="0.4", lw=0.8, ls=":", label=f"target ε = {target:g}")
ax2.set_ylim(0, max(target, curve["ε spent"].max()) * 1.15)
# One legend for both axes, below the plot, so it never hides a point.
handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
ax.legend(handles, [h.get_label() for h in handles], loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3,
          fontsize=8)
savefig(fig, output_dir, "00_quickstart_curve")
curve

# %% [markdown]
# ## 4. What the notebook records
#
# The key values go to `{output_dir}/00_quickstart.json` (the tests assert on them). Next steps:
# `01_main_vision` compares the methods, `04_privacy_utility` sweeps ε, `lalora run --help`
# runs a single configuration from the shell.

# %%
summary = {
    "task": task, "method": method, "target_epsilon": target,
    "epsilon_spent": float(final["epsilon_spent"]), "noise_multiplier": float(final["noise_multiplier"]),
    "final_accuracy": 100 * float(final["accuracy"]), "rounds": resolved.rounds,
    "local_steps": resolved.local_steps, "clients": resolved.clients,
    "clients_per_round": resolved.clients_per_round, "cached": bool(result.cached),
}
atomic_write_json(f"{output_dir}/00_quickstart.json", {
    "notebook": "00_quickstart", "profile": profile, "metric": "test accuracy (%)",
    "summary": summary,
    "curve": curve.to_dict(orient="list"),
    "per_client_epsilon": [float(e) for e in final["per_client_epsilon"]],
    "run_dir": result.run_dir, "seconds": time.perf_counter() - started,
})
summary

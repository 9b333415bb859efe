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
# # 01 · Main results, vision: DP-LoRA vs FFA-LoRA vs RoLoRA vs LA-LoRA
#
# The paper's main vision table: fine-tune a pretrained Swin with LoRA in a non-IID federation
# (8 clients, 4 per round, Dirichlet β = 0.1) under sample-level DP, and compare
#
# | method | trains at local step k, round t |
# |---|---|
# | DP-LoRA | A and B together |
# | FFA-LoRA | B only (A frozen at its seeded init) |
# | RoLoRA | B in odd rounds, A in even rounds |
# | **LA-LoRA** | B at odd steps, A at even steps, low-pass filter on the noised gradient |
# | FedAvg-LoRA (reference) | A and B, **no DP** (ε = ∞) |
#
# Same optimizer, lr, clipping norm and accountant for all. Each cell of the table is the mean ±
# sample standard deviation of the final test accuracy over `seeds`.
#
# **Profiles.** `paper`: Swin-T / Swin-B on CIFAR-100 and Tiny-ImageNet, 100 rounds × 20 local
# steps, batch 16, ε ∈ {1, 2, 3} (needs a GPU and the data and weights on disk). `offline`: the same
# protocol on real offline data — scikit-learn digits (10 classes) and scikit-image LFW faces
# (face / non-face) — with a small Swin pretrained on a public split, fewer rounds and few seeds,
# on a CPU. The offline profile tests the paper's *ordering and gaps* in a comparable noise regime;
# it cannot reproduce the paper's absolute accuracies (different data, model and scale), and with
# few seeds a gap smaller than the standard deviation is not evidence either way. `ci`: seconds.

# %% tags=["parameters"]
profile = "ci"
output_dir = "results/ci"
runs_dir = "runs"
tasks = ["digits-swin"]
methods = ["dp-lora", "ffa-lora", "rolora", "la-lora"]
# the non-private upper bound at epsilon = inf (None to skip it):
reference_method = "fedavg-lora"
epsilons = [3.0]
seeds = [0]                        # a list, or {task: list} to give tasks different seeds
rounds = 2
local_steps = 4
batch_size = None                  # None: the task's default (16)
clients = None
clients_per_round = None
lr = None
task_overrides = {}                # {task: {factory kwarg: value}}
data_root = None                   # paper profile: folder holding the datasets
weights_path = None                # paper profile: pretrained weights (file or folder)
device = "auto"                    # auto: cuda when available, else cpu; or cpu, cuda, cuda:N
precision = "fp32"                 # or bf16: autocast forward, fp32 LoRA weights and DP accumulation

# %% [markdown]
# ## Runs, table, ranking, figure
# Every (task, method, ε, seed) is one federated run; finished runs are read from `runs_dir`. The
# table is test accuracy (%), mean ± std over seeds. The ranking LA-LoRA > RoLoRA > FFA-LoRA >
# DP-LoRA is judged by the one rule (`lalora.verdicts`) on every adjacent pair: >= 5 paired seeds,
# both arms above the majority baseline, paired 95% CI; the order of the means is a description.
# The bars show n (seeds) on each bar, a 95% t-interval only where n ≥ 2, and a dashed line at the
# majority-class accuracy (below it a model has not trained). The body is shared with notebook
# 02 (`lalora.main_notebook`).

# %%
from lalora.main_notebook import main_results_notebook
from lalora.plotting import use_style

use_style()
summary = main_results_notebook(
    "01_main_vision", "Main vision results", profile=profile, output_dir=output_dir, runs_dir=runs_dir, tasks=tasks,
    methods=methods, reference_method=reference_method, epsilons=epsilons, seeds=seeds, rounds=rounds,
    local_steps=local_steps, batch_size=batch_size, clients=clients, clients_per_round=clients_per_round,
    lr=lr, task_overrides=task_overrides, data_root=data_root, weights_path=weights_path, device=device,
    precision=precision)
summary

"""Drivers that apply the analysis functions to federated runs (used by notebooks 06 and 07).

- :func:`load_global_model`: the final global model of a finished run, rebuilt from the task and
  the run folder's last checkpoint (``RunResult.run_dir``), so the sharpness notebook reuses the
  cached runs of the main-table notebook instead of re-training.
- :func:`sharpness`: top Hessian eigenvalue (Lanczos and power iteration) of the mean
  cross-entropy w.r.t. the trainable parameters (LoRA factors + head) on a fixed evaluation subset,
  plus 1-D and 2-D filter-normalised landscapes around the model.
- :func:`alignment_trace`: drives ``Simulator.client_update`` round by round (the public API) and
  records, per round, the mean pairwise cosine similarity of the sampled clients' ΔA, ΔB and Δ(BA).
  The run is the same as ``run_experiment``'s for the same config (same calls in the same order),
  but it is not cached: ``run_experiment`` does not keep per-client updates.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .alignment import client_update_alignment
from .hessian import model_loss_closure, no_fused_attention, top_eigenvalue
from .landscape import filter_normalized_direction, loss_along_1d, loss_surface_2d

__all__ = ["load_global_model", "evaluation_batches", "sharpness", "alignment_trace", "lora_scalings"]


def lora_scalings(model: nn.Module) -> dict[str, float]:
    """module name -> s = α/r for every LoRA module (state keys are '<module>.lora_A')."""
    from lalora.lora import lora_modules

    return {name: float(m.scaling if not isinstance(m.scaling, dict) else next(iter(m.scaling.values())))
            for name, m in lora_modules(model).items()}


def load_global_model(run_dir: str, cfg, task=None) -> tuple[nn.Module, Any, dict]:
    """(model in eval mode with the run's final global LoRA + head, task, global_state)."""
    from lalora.federated.state import ParamGroups
    from lalora.results import RunDir

    if task is None:
        from lalora.tasks import get_task

        task = get_task(cfg.task, **cfg.task_overrides)
    rd = RunDir(run_dir)
    if not rd.has_checkpoint():
        raise ValueError(f"run_dir: {run_dir} has no checkpoint to load the global model from")
    payload = rd.load_checkpoint()
    if int(payload["round"]) != int(cfg.rounds):
        raise ValueError(f"run_dir: checkpoint is from round {payload['round']}, config has {cfg.rounds} rounds")
    state = dict(payload["global_state"])
    torch.manual_seed(cfg.seed)
    model = task.build_model()
    ParamGroups.from_model(model).set_state(state)
    model.eval()
    return model, task, state


def evaluation_batches(dataset, collate, size: int, batch_size: int = 64, seed: int = 0) -> list[dict]:
    """A fixed random subset of ``size`` examples, as a list of collated batches."""
    n = len(dataset)
    if size < 1:
        raise ValueError(f"size: must be >= 1, got {size}")
    idx = np.random.default_rng(seed).permutation(n)[: min(size, n)]
    return [collate([dataset[int(i)] for i in idx[s : s + batch_size]]) for s in range(0, len(idx), batch_size)]


def sharpness(
    model: nn.Module,
    forward,
    batches: Sequence[dict],
    *,
    lanczos_iters: int = 20,
    power_iters: int = 20,
    landscape_points: int = 11,
    landscape_radius: float = 1.0,
    grid_points: int = 7,
    seed: int = 0,
    double: bool = True,
) -> dict:
    """Top Hessian eigenvalue and filter-normalised landscapes of the mean CE on ``batches``.

    Parameters: every trainable parameter (LoRA A, B and head). The model is evaluated in eval mode
    (dropout off), in float64 when ``double`` (HVP round-off then stays far below the eigenvalue).
    ``grid_points = 0`` skips the 2-D surface.
    """
    model.eval()
    if double:
        model.double()
        batches = [{k: (v.double() if torch.is_floating_point(v) else v) for k, v in b.items()} for b in batches]
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: no trainable parameters (expected LoRA factors and head)")
    loss_fn = model_loss_closure(model, forward, batches)
    out: dict[str, Any] = {"num_params": int(sum(p.numel() for p in params)),
                           "num_examples": int(sum(len(b["labels"]) for b in batches))}
    with no_fused_attention(model):
        with torch.no_grad():
            out["loss"] = float(loss_fn())
        lz = top_eigenvalue(loss_fn, params, method="lanczos", max_iter=lanczos_iters, tol=1e-4,
                            generator=torch.Generator().manual_seed(seed))
        pw = top_eigenvalue(loss_fn, params, method="power", max_iter=power_iters, tol=1e-4,
                            generator=torch.Generator().manual_seed(seed + 1))
        out["top_eigenvalue"] = lz.eigenvalue
        out["lanczos"] = {"eigenvalue": lz.eigenvalue, "iterations": lz.iterations, "converged": lz.converged,
                          "history": lz.history}
        out["power"] = {"eigenvalue": pw.eigenvalue, "iterations": pw.iterations, "converged": pw.converged,
                        "history": pw.history}
        g = torch.Generator().manual_seed(seed + 2)
        d1 = filter_normalized_direction(params, g)
        d2 = filter_normalized_direction(params, g)
        alphas = np.linspace(-landscape_radius, landscape_radius, landscape_points)
        out["landscape_1d"] = {"alphas": alphas.tolist(), "loss": loss_along_1d(loss_fn, params, d1, alphas).tolist()}
        if grid_points:
            grid = np.linspace(-landscape_radius, landscape_radius, grid_points)
            z = loss_surface_2d(loss_fn, params, d1, d2, grid, grid)
            out["landscape_2d"] = {"alphas": grid.tolist(), "betas": grid.tolist(), "loss": z.tolist()}
    return out


def alignment_trace(cfg, *, task=None, partitions=None, rounds: int | None = None) -> dict:
    """Per-round mean pairwise cosine of client updates (ΔA, ΔB, Δ(BA)) for one federated config.

    Returns {"rounds": [...], "A": [...], "B": [...], "BA": [...], "accuracy": final test accuracy,
    "noise_multiplier": σ}. Keys a client did not send back (RoLoRA's idle factor) are the global
    values (the factor did not move), so that factor's cosine is NaN for that round.
    """
    from lalora.federated.simulation import Simulator

    sim = Simulator(cfg, task=task, partitions=partitions)
    scal = lora_scalings(sim.model)
    state = sim.initial_global_state()
    total = sim.cfg.rounds if rounds is None else min(int(rounds), sim.cfg.rounds)
    trace: dict[str, list] = {"rounds": [], "A": [], "B": [], "BA": []}
    for t in range(1, total + 1):
        base = {k: v for k, v in state.items() if ".lora_" in k}
        updates = [sim.client_update(cid, t, state) for cid in sim.sampled_clients(t)]
        clients = [{k: u.state.get(k, v) for k, v in base.items()} for u in updates]
        al = client_update_alignment(base, clients, scal)
        trace["rounds"].append(t)
        for k in ("A", "B", "BA"):
            trace[k].append(al[k])
        state = sim.server_aggregate(updates, t, state)
    trace["accuracy"] = float(sim.evaluate(state)["accuracy"])
    trace["noise_multiplier"] = float(sim.noise_multiplier)
    return trace

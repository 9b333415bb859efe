"""Client batching: the M sampled clients of a round train in lock-step through ONE frozen backbone.

At local step k every client draws its Poisson batch from its own sampling generator (as in
``client.local_train``); the batches are concatenated (client order = the round's schedule) and run
as one forward and one backward, each sample's LoRA delta and head taken from its own client's
copy (``dplora_kernels.grouped``). Each client's trainable tensors live in a client stack
(A: (M, r, n), B: (M, m, r), head weight (M, c, d), bias (M, c)). Then, per client and on its rows
only: flat clipping per sample, clipped sum, Gaussian noise from the client's own noise generator
(same draws, order and shapes as sequential mode), / the client's expected batch size
(``dplora_kernels.dp.grouped_dp_gradient``); non-private: per-client sum / expected batch.
LoRA dropout draws each client's masks from its own dropout generator, as sequential mode does.

One optimizer over the stacks replaces the M per-client optimizers: SGD (momentum, weight decay) and
AdamW are elementwise and every client steps at the same k with the same frozen factor (a None
grad is skipped for all clients alike), so the stack's update is exactly each client's own; the
optimizer is re-created each round, as in sequential mode. The LA-LoRA filter acts on each client's
gradient separately. Nothing a client computes reads another client's rows, so its update does not
depend on the other clients' data (beyond float rounding of the shared backbone matmuls).

Equivalence with sequential mode (tests/test_batched.py): final states within float32 rounding,
same ledger, same schedule of random draws.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lalora.federated.client import ClientData, LocalTraining, make_optimizer, poisson_positions, to_device
from lalora.federated.filters import filter_lora_grad
from lalora.federated.methods import MethodSchedule
from lalora.federated.server import ClientUpdate
from lalora.federated.state import GROUPS, ParamGroups

__all__ = ["batching_blocker", "stack_client_states", "local_train_batched", "batched_client_updates"]


def batching_blocker(model: nn.Module, groups: ParamGroups) -> str | None:
    """Why client batching would NOT reproduce sequential mode for this model (None: it does):
    a trainable non-LoRA parameter outside an nn.Linear (only LoRA layers and Linear heads have a
    grouped form), or randomness other than LoRA dropout in training mode (e.g. a BERT backbone's
    dropout draws from the global RNG over the concatenated batch: same distribution, other masks)."""
    from dplora_kernels.lora import LoRALinear

    linear_params = {id(p) for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    odd = [k for k, p in groups.params["head"].items() if id(p) not in linear_params]
    if odd:
        return f"head parameters {odd[:3]} are not nn.Linear parameters"
    lora_dropouts = {id(m.dropout) for m in model.modules() if isinstance(m, LoRALinear)}
    stochastic = [name for name, m in model.named_modules()
                  if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 and id(m) not in lora_dropouts]
    if stochastic:
        return f"dropout outside the LoRA layers ({stochastic[:3]}) draws from the global RNG"
    return None


def stack_client_states(states: Sequence[dict[str, torch.Tensor]], groups: ParamGroups) -> ParamGroups:
    """Client stacks (leaf Parameters, (M, *shape)) of the clients' states, grouped like ``groups``.
    Clients whose states differ in keys or shapes (architecture, rank, targets) -> ValueError."""
    names = groups.names()
    ref = states[0]
    for j, s in enumerate(states):
        if set(s) != set(names):
            diff = sorted(set(s) ^ set(names))[:3]
            raise ValueError(f"client {j} of the round has different LoRA/head parameters ({diff}); clients "
                             "of a batched round must share architecture, rank and LoRA targets "
                             "(use --no-client-batching)")
        for k in names:
            if s[k].shape != ref[k].shape:
                raise ValueError(f"client {j}'s {k!r} has shape {tuple(s[k].shape)} but client 0's has "
                                 f"{tuple(ref[k].shape)}; clients of a batched round must share architecture, "
                                 "rank and LoRA targets (use --no-client-batching)")
    return ParamGroups({g: {k: nn.Parameter(torch.stack([s[k] for s in states]), requires_grad=False)
                            for k in groups.params[g]} for g in GROUPS})


def _concat(batches: list[dict]) -> dict:
    out = {}
    for key, v in batches[0].items():
        if not isinstance(v, torch.Tensor):
            out[key] = v
            continue
        shapes = {tuple(b[key].shape[1:]) for b in batches}
        if len(shapes) > 1:
            raise ValueError(f"client batches have different trailing shapes for {key!r} ({sorted(shapes)}); "
                             "client batching needs fixed-shape examples (use --no-client-batching)")
        out[key] = torch.cat([b[key] for b in batches])
    return out


def local_train_batched(model: nn.Module, model_groups: ParamGroups, stacks: ParamGroups,
                        schedule: MethodSchedule, datas: Sequence[ClientData], t: int, cfg: LocalTraining, *,
                        forward: Callable[[nn.Module, dict], torch.Tensor],
                        sampling_generators: Sequence[torch.Generator],
                        noise_generators: Sequence[torch.Generator],
                        dropout_generators: Sequence[torch.Generator] | None = None) -> list[dict]:
    """The K local steps of round ``t`` for all clients at once, in place on ``stacks``; returns each
    client's training diagnostics (as ``local_train``)."""
    from dplora_kernels.dp import autocast_for, grouped_dp_gradient
    from dplora_kernels.grouped import segment_rows

    m = len(datas)
    ns = [len(d) for d in datas]
    if min(ns) == 0:
        raise ValueError("a client with no training examples cannot train (check the partition)")
    qs = [min(1.0, cfg.batch_size / n) for n in ns]
    expected = [q * n for q, n in zip(qs, ns)]
    stack_of = {k: p for g in GROUPS for k, p in stacks.params[g].items()}
    optimizer = make_optimizer(stacks, cfg, t)
    model.train()
    device = next(model.parameters()).device
    sizes_log: list[list[int]] = [[] for _ in range(m)]
    loss_sums = [[0.0, 0] for _ in range(m)]
    sizes: list[int] = []

    def per_sample_loss(mod: nn.Module, batch: dict) -> torch.Tensor:
        losses = F.cross_entropy(forward(mod, batch), batch["labels"], reduction="none")
        for j, lj in enumerate(segment_rows(losses.detach(), sizes)):
            loss_sums[j][0] += float(lj.sum())
            loss_sums[j][1] += int(lj.numel())
        return losses

    for k in range(1, cfg.local_steps + 1):
        trains = schedule.trains(k, t, cfg.alternation_period)
        model_groups.set_trainable(trains, head=cfg.train_head)   # names the engine's arena slots
        stacks.set_trainable(trains, head=cfg.train_head)
        positions = [poisson_positions(n, q, g) for n, q, g in zip(ns, qs, sampling_generators)]
        sizes = [int(p.numel()) for p in positions]
        for j, s in enumerate(sizes):
            sizes_log[j].append(s)
        batch = to_device(_concat([d.batch(p) for d, p in zip(datas, positions)]), device)
        if cfg.private:
            grouped_dp_gradient(model, per_sample_loss, batch, sizes=sizes, stacks=stack_of,
                                clip_norm=cfg.clip_norm, noise_multiplier=cfg.noise_multiplier,
                                expected_batch_sizes=expected, generators=noise_generators,
                                dropout_generators=dropout_generators, clipping=cfg.clipping,
                                precision=cfg.precision)
        else:
            _grouped_plain_gradient(model, per_sample_loss, batch, sizes, stack_of, expected,
                                    dropout_generators, autocast_for(cfg.precision, device))
        if cfg.use_filter:
            with torch.no_grad():
                for name, (p, factor) in stacks.factor_params(trains).items():
                    if p.grad is not None:
                        for j in range(m):
                            p.grad[j].copy_(filter_lora_grad(p.grad[j], factor))
        optimizer.step()
        stacks.zero_grad()
    model_groups.set_trainable(frozenset(), head=False)
    stacks.set_trainable(frozenset(), head=False)
    return [{"train_loss": s / c if c else math.nan, "batch_sizes": sizes_log[j], "sample_rate": qs[j]}
            for j, (s, c) in enumerate(loss_sums)]


def _grouped_plain_gradient(model, loss_fn, batch, sizes, stacks: dict, expected, dropout_generators,
                            autocast) -> None:
    """Non-private: client j's gradient = sum of its per-sample gradients / its expected batch size
    (autograd on the trainable stacks: client j's loss only reaches stack[j])."""
    from dplora_kernels.grouped import client_groups, segment_rows

    names = [k for k, s in stacks.items() if s.requires_grad]
    if sum(sizes) == 0:
        for k in names:
            stacks[k].grad = torch.zeros_like(stacks[k])
        return
    with client_groups(model, sizes, stacks, dropout_generators), autocast:
        losses = loss_fn(model, batch)
    # per client: the sum of its losses / its expected batch, as sequential mode normalises it
    loss = sum(lj.float().sum() / e for lj, e in zip(segment_rows(losses, sizes), expected))
    grads = torch.autograd.grad(loss, [stacks[k] for k in names], allow_unused=True)
    for k, g in zip(names, grads):   # same rule as the DP step: never step on NaN/Inf
        if g is not None and not torch.isfinite(g).all():
            raise FloatingPointError(f"NaN/Inf in the gradient of parameter {k!r} (non-private step); "
                                     "check the input data")
    for k, g in zip(names, grads):
        stacks[k].grad = torch.zeros_like(stacks[k]) if g is None else g


def batched_client_updates(sim, clients: list[int], t: int, global_state: dict[str, torch.Tensor]) -> list[ClientUpdate]:
    """``[sim.client_update(c, t, global_state) for c in clients]``, all clients in one lock-step run
    (see the module doc). Updates, fedsa's client-local state and the ledger are as in sequential mode."""
    states = []
    for cid in clients:
        sim._load_client(cid, global_state)
        states.append(sim.groups.get_state())
    stacks = stack_client_states(states, sim.groups)
    all_stacks = {k: p for g in GROUPS for k, p in stacks.params[g].items()}
    stats = local_train_batched(sim.model, sim.groups, stacks, sim.method, [sim.client_data[c] for c in clients],
                                t, sim.local, forward=sim.task.forward,
                                sampling_generators=[sim.sampling_generators[c] for c in clients],
                                noise_generators=[sim.noise_generators[c] for c in clients],
                                dropout_generators=[sim.dropout_generators[c] for c in clients])
    aggregated = set(sim.groups.names(sim.aggregated_groups(t)))
    local = set(sim.groups.names(sim._local_groups)) if sim._local_groups else set()
    updates = []
    for j, cid in enumerate(clients):
        state = {k: p.detach()[j].clone() for k, p in all_stacks.items()}
        if local:
            sim.client_local[cid] = {k: v for k, v in state.items() if k in local}
        sim.ledger.record_steps(cid, sim.cfg.local_steps, round=t)
        updates.append(ClientUpdate(state={k: v for k, v in state.items() if k in aggregated},
                                    num_samples=len(sim.client_data[cid]), num_steps=sim.cfg.local_steps,
                                    client_id=cid, metrics=stats[j]))
    return updates

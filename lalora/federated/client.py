"""The one client loop: K local DP-SGD steps under a method's schedule (SPEC §2–§3).

Per local step k of round t:
  1. ``trains = schedule.trains(k, t)``; only those LoRA factors (plus the head) get requires_grad,
     so the frozen factor gets neither gradient, nor noise, nor optimizer update (not even weight
     decay: torch optimizers skip parameters whose ``.grad`` is None);
  2. Poisson sampling: each of the client's |D_i| examples joins the batch with probability
     q = b/|D_i|, independently, afresh each step (an empty batch is a noise-only step);
  3. ``dp_gradient``: per-sample gradients of every trainable parameter, flat clipping to C, sum,
     N(0, σ²C²) noise, divide by the expected batch size q·|D_i|. Non-private runs (ε = inf or
     fedavg-lora) use the plain summed gradient / q·|D_i| (the same quantity with C = inf, σ = 0);
  4. optionally the low-pass filter on the noised gradient of the trained factors (post-processing);
  5. one optimizer step.

``dp_mode = "as-released"`` replaces 2–3 with the authors' released step (see docs/OVERVIEW.md),
for comparison only: a fixed-size batch of b examples drawn uniformly without replacement each step
(the released code's shuffled DataLoader batches), the batch-mean gradient clipped per tensor to the
data-dependent C = min(median tensor norm, 0.4), noise N(0, (σC/b)²). It is NOT differentially
private: no per-sample clipping, so no accountant applies (the simulation claims no ε for it).

Everything runs on the model's device: each batch is moved there, the Poisson draw uses the
sampling generator on that device (the indices come back to the CPU to gather the examples) and
the noise is drawn by the noise generator there.

The optimizer is created at the start of every round (the released code does the same), so
no optimizer state crosses rounds and checkpoints need none. The learning rate of round t is
``lr · lr_decay^(t-1)``; B's is multiplied by ``lr_B_ratio``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from dplora_kernels.dp import autocast_for

from lalora.federated.filters import filter_gradients_
from lalora.federated.state import ParamGroups
from lalora.methods import MethodSchedule
from lalora.privacy import dp_step   # dp_step.<name> at call time: tests and audits patch the DP step
from lalora.privacy.sampling import poisson_sample


@dataclass
class LocalTraining:
    """The local-training settings shared by every client (taken from a resolved RunConfig)."""
    local_steps: int
    batch_size: int
    lr: float
    lr_decay: float
    lr_B_ratio: float
    optimizer: str
    momentum: float
    weight_decay: float
    clip_norm: float          # math.inf when not private
    noise_multiplier: float   # 0 when not private
    private: bool
    use_filter: bool
    alternation_period: int
    train_head: bool
    clipping: str = "flat"
    dp_mode: str = "dp"       # "as-released": the released (non-DP) step, see the module doc
    precision: str = "fp32"   # "bf16": autocast forward (fp32 weights, fp32 per-sample gradients)

    def lr_at(self, t: int) -> float:
        return self.lr * self.lr_decay ** (t - 1)


@dataclass
class ClientData:
    """One client's shard: ``dataset[indices[j]]`` are its examples, ``collate`` builds a batch."""
    dataset: object
    indices: torch.Tensor   # long, positions into dataset
    collate: Callable

    def __len__(self) -> int:
        return int(self.indices.numel())

    def batch(self, positions: torch.Tensor) -> dict:
        if hasattr(self.dataset, "batch"):  # TensorDictDataset: one gather, empty allowed
            return self.dataset.batch(self.indices[positions])
        if positions.numel() == 0:
            return self.empty_batch()
        return self.collate([self.dataset[int(self.indices[p])] for p in positions.tolist()])

    def empty_batch(self) -> dict:
        # Collate one real example and keep zero rows, so keys, dtypes and trailing shapes are right.
        one = self.collate([self.dataset[int(self.indices[0])]])
        return {k: (v[:0] if isinstance(v, torch.Tensor) else v) for k, v in one.items()}


def make_optimizer(groups: ParamGroups, cfg: LocalTraining, t: int) -> torch.optim.Optimizer:
    lr = cfg.lr_at(t)
    param_groups = [
        {"params": list(groups.params["A"].values()), "lr": lr},
        {"params": list(groups.params["B"].values()), "lr": lr * cfg.lr_B_ratio},
    ]
    if groups.params["head"]:
        param_groups.append({"params": list(groups.params["head"].values()), "lr": lr})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {cfg.optimizer!r}")


def poisson_positions(n: int, q: float, generator: torch.Generator) -> torch.Tensor:
    return poisson_sample(n, q, generator).cpu()   # indices gather examples held on the CPU


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on ``device`` (no copy when already there)."""
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def local_train(model: torch.nn.Module, groups: ParamGroups, schedule: MethodSchedule,
                data: ClientData, t: int, cfg: LocalTraining, *,
                forward: Callable[[torch.nn.Module, dict], torch.Tensor],
                sampling_generator: torch.Generator, noise_generator: torch.Generator,
                step_hook: Callable | None = None) -> dict:
    """Run the K local steps of round ``t`` in place on ``model``; return training diagnostics.

    ``step_hook(k=, t=, trains=, model=, batch_size=)`` is called after every optimizer step
    (tests use it to check what moved)."""
    n = len(data)
    if n == 0:
        raise ValueError("a client with no training examples cannot train (check the partition)")
    q = min(1.0, cfg.batch_size / n)
    expected_batch = q * n

    def per_sample_loss(m: torch.nn.Module, batch: dict) -> torch.Tensor:
        logits = forward(m, batch)
        losses = F.cross_entropy(logits, batch["labels"], reduction="none")
        loss_log.append((float(losses.detach().sum()), int(losses.numel())))
        return losses

    loss_log: list[tuple[float, int]] = []
    optimizer = make_optimizer(groups, cfg, t)
    model.train()
    device = next(model.parameters()).device
    batch_sizes = []
    for k in range(1, cfg.local_steps + 1):
        trains = schedule.trains(k, t, cfg.alternation_period)
        groups.set_trainable(trains, head=cfg.train_head)
        released = cfg.private and cfg.dp_mode == "as-released"
        if released:   # fixed-size batch, as the released code's DataLoader
            positions = torch.randperm(n, generator=sampling_generator)[:min(cfg.batch_size, n)]
        else:
            positions = poisson_positions(n, q, sampling_generator)
        batch = to_device(data.batch(positions), device)
        batch_sizes.append(int(positions.numel()))
        if released:
            dp_step.as_released_gradient(model, per_sample_loss, batch, noise_multiplier=cfg.noise_multiplier,
                                         generator=noise_generator)
        elif cfg.private:
            # verify_unit=False: the same model check (clipping unit and mixed module/functional
            # use) ran once before training, with every factor and the head trainable
            # (Simulator.verify_clipping_unit; a deployed node runs its own). The in-step schedule
            # would call per_sample_loss on extra samples (they would enter train_loss) and, being
            # per process, again after a resume: train_loss would then depend on where a run resumed.
            dp_step.dp_gradient(model, per_sample_loss, batch, clip_norm=cfg.clip_norm,
                                noise_multiplier=cfg.noise_multiplier, expected_batch_size=expected_batch,
                                generator=noise_generator, clipping=cfg.clipping, precision=cfg.precision,
                                verify_unit=False)
        else:
            _plain_gradient(model, per_sample_loss, batch, expected_batch, cfg.precision)
        if cfg.use_filter:
            filter_gradients_(groups.factor_params(trains))
        optimizer.step()
        groups.zero_grad()
        if step_hook is not None:
            step_hook(k=k, t=t, trains=trains, model=model, batch_size=batch_sizes[-1])
    groups.set_trainable(frozenset(), head=False)
    total, count = sum(s for s, _ in loss_log), sum(c for _, c in loss_log)
    return {"train_loss": total / count if count else math.nan, "batch_sizes": batch_sizes,
            "sample_rate": q}


def _plain_gradient(model, loss_fn, batch, expected_batch: float, precision: str = "fp32") -> None:
    """Non-private gradient with the DP step's normalisation: sum of per-sample grads / q·|D_i|."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if batch["labels"].shape[0] == 0:
        for p in trainable:
            p.grad = torch.zeros_like(p)
        return
    with autocast_for(precision, trainable[0].device):
        losses = loss_fn(model, batch)
    loss = losses.float().sum() / expected_batch
    grads = torch.autograd.grad(loss, trainable, allow_unused=True)
    named = {id(p): n for n, p in model.named_parameters()}
    for p, g in zip(trainable, grads):   # same rule as the DP step: never step on NaN/Inf
        if g is not None and not torch.isfinite(g).all():
            raise FloatingPointError(f"NaN/Inf in the gradient of parameter {named.get(id(p), '?')!r} "
                                     "(non-private step); check the input data")
    for p, g in zip(trainable, grads):
        p.grad = torch.zeros_like(p) if g is None else g

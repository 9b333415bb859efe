"""The DP-SGD gradient (SPEC §3): per-sample gradients, clipping, sum, Gaussian noise, scaling.

    p.grad = (sum_i c_i g_i + N(0, sigma^2 C^2 I)) / expected_batch_size     for every trainable p

g_i are the per-sample gradients of exactly the parameters trainable now (requires_grad), from one
backward pass (PerSampleGradEngine). Clipping:
  * "flat" (default): c_i = min(1, C / (||g_i|| + 1e-6)), ||g_i|| over all trainable tensors jointly.
  * "per_layer": each of the K trainable tensors is clipped on its own to C_k = C / sqrt(K), so the
    per-sample contribution still has total norm <= C and the same noise N(0, sigma^2 C^2) gives the
    same guarantee as flat clipping.
The divisor is the *expected* batch size q|D| (Poisson sampling), not the realised one, as the
accountant assumes. An empty batch (N = 0) gives noise only and never calls the model. NaN/Inf in a
per-sample gradient raises FloatingPointError naming the parameter, leaving every p.grad untouched.

`as_released_gradient` reproduces the authors' released step (batch-mean gradient, data-dependent
per-tensor clip, no per-sample clipping). It is NOT differentially private and says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from dplora_kernels import clip_factors as _clip_factors
from dplora_kernels import clipped_noised_sum

from .engine import PerSampleGradEngine

__all__ = ["dp_gradient", "DPStepResult", "batch_size_of", "as_released_gradient", "AsReleasedResult"]

NOT_DP_LABEL = "as-released: NOT differentially private (no per-sample clipping, data-dependent clip)"


@dataclass
class DPStepResult:
    """What a DP step wrote, for tests and audits.

    grads: the privatized gradient written to p.grad, by parameter name.
    per_sample_norms: (N,) flat per-sample norms before clipping.
    clip_factors: (N,) under flat clipping; (N, K) under per-layer (columns in `grads` order).
    batch_size: N, the realised batch size.
    """
    grads: dict[str, torch.Tensor]
    per_sample_norms: torch.Tensor
    clip_factors: torch.Tensor
    batch_size: int


def batch_size_of(batch: Any) -> int:
    """N of a batch: dict (its "labels", else its first tensor), tensor, or tuple/list of tensors."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, dict):
        if isinstance(batch.get("labels"), torch.Tensor):
            return int(batch["labels"].shape[0])
        vals = [v for v in batch.values() if isinstance(v, torch.Tensor)]
    elif isinstance(batch, (tuple, list)):
        vals = [v for v in batch if isinstance(v, torch.Tensor)]
    else:
        vals = []
    if not vals:
        raise ValueError(f"batch must be a tensor, or a dict/tuple holding tensors; got {type(batch).__name__}")
    return int(vals[0].shape[0])


def _check_args(clip_norm, noise_multiplier, expected_batch_size, clipping) -> None:
    if not (float(clip_norm) > 0):
        raise ValueError(f"clip_norm must be > 0 (inf disables clipping); got {clip_norm!r}")
    if not (float(noise_multiplier) >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be finite and >= 0; got {noise_multiplier!r}")
    if math.isinf(clip_norm) and noise_multiplier > 0:
        raise ValueError("noise_multiplier > 0 needs a finite clip_norm (noise std is sigma * C)")
    if not (float(expected_batch_size) > 0 and math.isfinite(expected_batch_size)):
        raise ValueError(f"expected_batch_size must be finite and > 0; got {expected_batch_size!r}")
    if clipping not in ("flat", "per_layer"):
        raise ValueError(f"clipping must be 'flat' or 'per_layer'; got {clipping!r}")


def dp_gradient(model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], batch: Any, *,
                clip_norm: float, noise_multiplier: float, expected_batch_size: float,
                generator: torch.Generator | None, clipping: str = "flat", backend: str = "auto",
                num_samples: int | None = None, verify_unit: bool = False) -> DPStepResult:
    """Privatized gradient of the trainable parameters on `batch`, written to p.grad (see module doc).

    loss_fn(model, batch) -> (N,) per-sample losses (reduction "none"); the engine sums them.
    num_samples overrides batch_size_of(batch). verify_unit=True first runs the clipping-unit probe
    (lalora.privacy.unit_probe) on two samples of `batch` and raises, naming the layer, if the
    model's rows are not one sample each (sequence-first layers, a batch reordered mid-forward).
    """
    _check_args(clip_norm, noise_multiplier, expected_batch_size, clipping)
    if verify_unit:   # before anything is computed or released
        from .unit_probe import verify_clipping_unit

        verify_clipping_unit(model, loss_fn, batch,
                             lambda m, f, b: _engine_per_sample_grads(m, f, b, backend=backend),
                             num_samples=num_samples)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    n = batch_size_of(batch) if num_samples is None else int(num_samples)
    std = float(noise_multiplier) * float(clip_norm) if noise_multiplier > 0 else 0.0
    if not params:
        return DPStepResult({}, torch.zeros(n), torch.ones(n), n)
    names = list(params)
    shapes = [params[k].shape for k in names]
    device = params[names[0]].device

    if n == 0:   # Poisson drew nobody: noise only, the model is not called
        empty = [torch.zeros((0, *s), device=device) for s in shapes]
        summed = clipped_noised_sum(empty, torch.zeros(0, device=device), std, generator, backend=backend)
        return _write(params, names, summed, expected_batch_size, torch.zeros(0), torch.ones(0), 0)

    with PerSampleGradEngine(model, backend=backend) as engine:
        losses = loss_fn(model, batch)
        if losses.dim() != 1 or losses.shape[0] != n:
            raise ValueError(f"loss_fn must return per-sample losses of shape ({n},); got {tuple(losses.shape)}")
        psg = engine.backward(losses.sum(), n)

    for k in names:   # raise before touching any p.grad
        if not torch.isfinite(psg.grads[k]).all():
            raise FloatingPointError(f"NaN/Inf in the per-sample gradient of parameter {k!r}")
    per_sample = [psg.grads[k] for k in names]
    norms = psg.total_sqnorm().sqrt()
    if clipping == "flat":
        factors = _clip_factors(psg.total_sqnorm(), float(clip_norm))
        summed = clipped_noised_sum(per_sample, factors, std, generator, backend=backend)
    else:
        c_k = float(clip_norm) / math.sqrt(len(names))
        cols = [_clip_factors(psg.sqnorms[k], c_k) for k in names]
        factors = torch.stack(cols, dim=1)
        # noise for all tensors in one draw, in `names` order, as in the flat case
        noise = clipped_noised_sum([torch.zeros((0, *s), device=device) for s in shapes],
                                   torch.zeros(0, device=device), std, generator, backend=backend)
        summed = [clipped_noised_sum([g], f, 0.0, None, backend=backend)[0] + z
                  for g, f, z in zip(per_sample, cols, noise)]
    return _write(params, names, summed, expected_batch_size, norms, factors, n)


def _engine_per_sample_grads(model: nn.Module, loss_fn, batch: Any, *, backend: str = "auto"):
    """Per-sample gradients of the trainable parameters on `batch` (the probe's per_sample_fn)."""
    n = batch_size_of(batch)
    with PerSampleGradEngine(model, backend=backend) as engine:
        return engine.backward(loss_fn(model, batch).sum(), n)


def _write(params, names, summed, expected_batch_size, norms, factors, n) -> DPStepResult:
    grads = {}
    for k, g in zip(names, summed):
        p = params[k]
        grads[k] = (g / float(expected_batch_size)).to(dtype=p.dtype, device=p.device)
    for k in names:
        params[k].grad = grads[k].clone()
    return DPStepResult(grads, norms, factors, n)


@dataclass
class AsReleasedResult:
    grads: dict[str, torch.Tensor]
    clip_norm: float           # the data-dependent threshold min(median tensor norm, max_clip)
    label: str = NOT_DP_LABEL


def as_released_gradient(model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], batch: Any, *,
                         noise_multiplier: float, generator: torch.Generator | None,
                         max_clip: float = 0.4) -> AsReleasedResult:
    """The authors' released step (research/paper.md §1.5) -- NOT differentially private.

    One ordinary backward of the batch-mean loss; C = min(median over tensors of ||grad tensor||,
    max_clip); each tensor clipped to C on its own; noise N(0, (sigma C / b)^2) with b the batch size.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    b = batch_size_of(batch)
    if b == 0:
        raise ValueError("batch must not be empty for the as-released step")
    loss = loss_fn(model, batch).mean()
    gs = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    gs = [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params.values())]
    tnorms = torch.stack([g.detach().norm().to(torch.float64) for g in gs])
    c = min(float(tnorms.median()), float(max_clip))
    out = {}
    for (name, p), g, t in zip(params.items(), gs, tnorms):
        g = g * min(1.0, c / max(float(t), 1e-12))
        noise = torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device)
        out[name] = g + noise * (noise_multiplier * c / b)
        p.grad = out[name].detach().clone()
    return AsReleasedResult(out, c)

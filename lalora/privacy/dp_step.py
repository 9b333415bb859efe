"""The DP-SGD gradient (SPEC §3) and the authors' released (non-private) step.

`dp_gradient` is the one DP step of the project, implemented in the standalone kernels package
(dplora_kernels.dp, on dplora_kernels.engine.PerSampleGradEngine) and re-exported here, so the
federated client, the audit and Flower all run on the one engine:

    p.grad = (sum_i c_i g_i + N(0, sigma^2 C^2 I)) / expected_batch_size     for every trainable p

with flat or per-layer clipping, the expected (not realised) batch size as divisor, noise only for an
empty batch, and FloatingPointError (p.grad untouched) on NaN/Inf; see dplora_kernels/dp.py.

`as_released_gradient` reproduces the authors' released step (batch-mean gradient, data-dependent
per-tensor clip, no per-sample clipping). It is NOT differentially private and says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from dplora_kernels.dp import DPStepResult, batch_size_of, dp_gradient, per_sample_gradients
from torch import nn

__all__ = ["dp_gradient", "DPStepResult", "per_sample_gradients", "batch_size_of", "as_released_gradient",
           "AsReleasedResult"]

NOT_DP_LABEL = "as-released: NOT differentially private (no per-sample clipping, data-dependent clip)"


@dataclass
class AsReleasedResult:
    grads: dict[str, torch.Tensor]
    clip_norm: float           # the data-dependent threshold min(median tensor norm, max_clip)
    label: str = NOT_DP_LABEL


def as_released_gradient(model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], batch: Any, *,
                         noise_multiplier: float, generator: torch.Generator | None,
                         max_clip: float = 0.4) -> AsReleasedResult:
    """The authors' released step (see docs/OVERVIEW.md) -- NOT differentially private.

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

"""Clipping-unit probe: does the per-sample-gradient engine clip *samples* on this model?

DP-SGD bounds each sample's contribution by clipping its gradient. The engine gets per-sample
gradients from layer activations whose rows it assumes sample-major (batch-first). A model that
breaks this -- a sequence-first ``nn.TransformerEncoderLayer`` (rows are time steps), a forward
that reorders or mixes the batch between two trainable layers -- is accepted by the engine and
clipped on the wrong unit: one sample can then contribute more than C, and no error is raised.

:func:`verify_clipping_unit` checks the engine on the model itself, with two samples of a probe batch:

0. *completeness*: the engine's per-sample gradients of the pair, summed, equal autograd's gradient
   of the pair's summed loss. They differ when a trainable parameter is used by its module AND
   outside it (``F.linear(x, layer.weight)``, a weight read by another module's forward): the hooks
   see only the module's part, so the functional part would escape clipping. A wrong clipping unit
   does not show here (every row is still counted once), so this check names that cause alone:
   :class:`UnattributedGradientError`.
1. *per-sample loop*: the engine's per-sample gradients of the pair equal the gradients of each
   sample run alone (a microbatch of one), parameter by parameter;
2. *isolation*: replacing sample 1 (by sample 2 of the batch, or by sample 0 when there are only
   two) leaves sample 0's per-sample gradient unchanged.

On failure of 1 or 2 it raises :class:`ClippingUnitError` naming the parameter (hence the layer):
its rows are not one sample each (sequence-first input to the layer, a forward that reorders or
mixes the batch). Cost: on two samples, three engine passes, one batch backward and two
one-sample backwards (dp_gradient runs it on the schedule of checks.py, not every step). The probe
runs in eval mode (no dropout) with the RNG state forked, writes no ``.grad`` and releases nothing.
This module imports only torch: the per-sample function is passed in, e.g. the engine's
``per_sample_fn(model, loss_fn, batch) -> object with .grads {name: (N, *shape)}`` (or that dict).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

__all__ = ["ClippingUnitError", "UnattributedGradientError", "verify_clipping_unit", "take_samples"]


class ClippingUnitError(ValueError):
    """The engine's per-sample gradients are not per *sample* on this model."""


class UnattributedGradientError(ClippingUnitError):
    """Part of a trainable parameter's gradient does not pass through the module the engine hooks
    (mixed module + functional use): the per-sample gradients miss it."""


def _leading(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    values = batch.values() if isinstance(batch, dict) else batch
    for v in values:
        if isinstance(v, torch.Tensor):
            return int(v.shape[0])
    raise ValueError(f"batch must hold tensors; got {type(batch).__name__}")


def take_samples(batch: Any, index: list[int], n: int | None = None) -> Any:
    """Rows ``index`` of every tensor of ``batch`` whose leading dimension is the batch size ``n``
    (other entries are kept as they are)."""
    n = _leading(batch) if n is None else n
    idx = torch.as_tensor(index, dtype=torch.long)

    def pick(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n:
            return v.index_select(0, idx.to(v.device))
        return v

    if isinstance(batch, torch.Tensor):
        return pick(batch)
    if isinstance(batch, dict):
        return {k: pick(v) for k, v in batch.items()}
    return type(batch)(pick(v) for v in batch)


def _grads(result) -> dict[str, torch.Tensor]:
    return result.grads if hasattr(result, "grads") else dict(result)


def _loop_grads(model: nn.Module, loss_fn, sample, params: dict[str, nn.Parameter]) -> dict:
    """Float gradients of one sample run alone (the reference: a microbatch of one)."""
    loss = loss_fn(model, sample).sum()
    gs = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {k: (torch.zeros_like(p) if g is None else g).detach().to(torch.float64)
            for (k, p), g in zip(params.items(), gs)}


def _close(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> bool:
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    return float((a - b).norm()) <= atol + rtol * float(b.norm())


def verify_clipping_unit(model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], batch: Any,
                         per_sample_fn: Callable[[nn.Module, Callable, Any], Any], *,
                         num_samples: int | None = None, atol: float = 1e-6, rtol: float = 1e-3) -> None:
    """Raise ClippingUnitError unless per-sample gradients of ``model`` are per sample (module doc).

    ``loss_fn(model, batch) -> (N,)`` per-sample losses; ``batch`` needs at least 2 samples
    (``num_samples`` overrides its leading dimension). Checks every currently trainable parameter;
    a norm error of ``atol + rtol·‖reference‖`` is tolerated (float32 kernels vs autograd)."""
    n = _leading(batch) if num_samples is None else int(num_samples)
    if n < 2:
        raise ValueError(f"the clipping-unit probe needs a batch of at least 2 samples; got {n}")
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    if not params:
        return
    pair = take_samples(batch, [0, 1], n)
    swapped = take_samples(batch, [0, 2 if n > 2 else 0], n)
    was_training = {m: m.training for m in model.modules()}
    model.eval()   # dropout would make the two forwards differ for reasons unrelated to the unit
    try:
        with torch.random.fork_rng(devices=[]):
            engine = _grads(per_sample_fn(model, loss_fn, pair))
            batch_grad = _loop_grads(model, loss_fn, pair, params)   # autograd, the pair jointly
            engine_swapped = _grads(per_sample_fn(model, loss_fn, swapped))
            loop = [_loop_grads(model, loss_fn, take_samples(pair, [i], 2), params) for i in (0, 1)]
    finally:
        for m, mode in was_training.items():
            m.train(mode)
    for name in params:
        g = engine[name]
        if not (torch.isfinite(g).all() and all(torch.isfinite(lp[name]).all() for lp in loop)):
            # bad data, not a wrong unit: the same error the DP step gives
            raise FloatingPointError(f"NaN/Inf in the per-sample gradient of parameter {name!r} "
                                     "(clipping-unit probe, first samples of the data)")
        if g.shape[0] != 2:
            raise ClippingUnitError(f"parameter {name!r}: the engine returned {g.shape[0]} per-sample "
                                    "gradients for 2 samples")
        if not _close(g.sum(0), batch_grad[name], atol, rtol):
            raise UnattributedGradientError(
                f"parameter {name!r} is used both by its module and outside it (functional use such as "
                "F.linear(x, layer.weight), or a weight read by another module's forward): the engine's "
                f"per-sample gradients sum to a tensor {float((g.sum(0).double() - batch_grad[name]).norm()):.3g} "
                f"away from autograd's batch gradient (norm {float(batch_grad[name].norm()):.3g}), so the "
                "functional part would escape clipping. Call the module instead of reading its weight, "
                "tie the weights through modules (both hooked), or freeze the parameter")
        for i in (0, 1):
            if not _close(g[i], loop[i][name], atol, rtol):
                raise ClippingUnitError(
                    f"parameter {name!r}: the engine's per-sample gradient of sample {i} differs from "
                    f"that sample's gradient computed alone (error {float((g[i].double() - loop[i][name]).norm()):.3g},"
                    f" norm {float(loop[i][name].norm()):.3g}): its layer's rows are not one sample each "
                    "(sequence-first layout, or a forward that reorders/mixes the batch); DP clipping "
                    "would bound the wrong unit. Use a batch-first model")
        if not _close(engine_swapped[name][0], g[0], atol, rtol):
            raise ClippingUnitError(
                f"parameter {name!r}: changing sample 1 changed sample 0's per-sample gradient: the "
                "layer mixes samples, so one sample can contribute more than the clip norm")

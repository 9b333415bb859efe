"""The clipping-unit probe lives with the engine in the kernels package (dplora_kernels.unit_probe);
re-exported here for lalora code and tests.

:func:`verify_batch_equivariance` is a stronger, lalora-side check (a deployed node runs it on its
own data, at random positions, once the request's terms are accepted): the kernels probe looks at
the first two samples, so a forward that sorts the batch by a feature passes it whenever those
samples happen to be in order. Here the whole probe batch is checked:

1. *permutation equivariance*: for random permutations P, the engine's per-sample gradients of
   the permuted batch are the permuted per-sample gradients, f(Px) = P·f(x);
2. *per-sample loop at random positions*: the engine's gradient of sample i equals that sample's
   gradient computed alone;
3. *independence at random positions*: replacing one sample (by a copy of another) leaves every
   other sample's per-sample gradient unchanged.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from dplora_kernels.unit_probe import (ClippingUnitError, _close, _grads, _leading, _loop_grads,
                                       take_samples, verify_clipping_unit)

__all__ = ["ClippingUnitError", "verify_clipping_unit", "take_samples", "verify_batch_equivariance"]


def verify_batch_equivariance(model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], batch: Any,
                              per_sample_fn: Callable[[nn.Module, Callable, Any], Any], *,
                              generator: torch.Generator, permutations: int = 3, positions: int = 2,
                              atol: float = 1e-6, rtol: float = 1e-3) -> None:
    """Raise ClippingUnitError unless the per-sample gradients of ``model`` on ``batch`` (≥ 3
    samples) are permutation equivariant, match a per-sample loop and are independent (module doc).
    Random choices come from ``generator`` (a deployed node seeds it from OS entropy, so a model
    cannot be tuned to the positions checked). Eval mode, forked RNG; no ``.grad`` written."""
    n = _leading(batch)
    if n < 3:
        raise ValueError(f"the permutation probe needs a batch of at least 3 samples; got {n}")
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    if not params:
        return

    def rand(k: int) -> list[int]:
        return torch.randperm(n, generator=generator)[:k].tolist()

    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            ref = _grads(per_sample_fn(model, loss_fn, batch))
            for name in params:
                if not torch.isfinite(ref[name]).all():
                    raise FloatingPointError("NaN/Inf in a per-sample gradient (clipping-unit probe)")
            for _ in range(permutations):
                perm = torch.randperm(n, generator=generator)
                if torch.equal(perm, torch.arange(n)):
                    continue
                got = _grads(per_sample_fn(model, loss_fn, take_samples(batch, perm.tolist(), n)))
                for name in params:
                    if got[name].shape[0] != n or not _close(got[name], ref[name][perm], atol, rtol):
                        raise ClippingUnitError(
                            f"parameter {name!r}: permuting the batch does not permute the per-sample "
                            "gradients (f(Px) != P·f(x)): the forward reorders or mixes samples, so "
                            "DP clipping would bound the wrong unit")
            for i in rand(positions):
                alone = _loop_grads(model, loss_fn, take_samples(batch, [i], n), params)
                for name in params:
                    if not _close(ref[name][i], alone[name], atol, rtol):
                        raise ClippingUnitError(
                            f"parameter {name!r}: the per-sample gradient of sample {i} differs from "
                            "that sample's gradient computed alone: its layer's rows are not one "
                            "sample each; DP clipping would bound the wrong unit")
            for _ in range(positions):
                j, k = rand(2)
                index = list(range(n))
                index[j] = k
                got = _grads(per_sample_fn(model, loss_fn, take_samples(batch, index, n)))
                others = [i for i in range(n) if i != j]
                for name in params:
                    if not _close(got[name][others], ref[name][others], atol, rtol):
                        raise ClippingUnitError(
                            f"parameter {name!r}: changing sample {j} changed other samples' per-sample "
                            "gradients: the layer mixes samples, so one sample can contribute more "
                            "than the clip norm")
    finally:
        for m, mode in was_training.items():
            m.train(mode)

"""Filter-normalised random-direction loss landscapes (Li et al., NeurIPS 2018).

To compare the flatness of two minima (DP-LoRA vs LA-LoRA global models) the loss is plotted along
random directions d around the trained parameters θ: L(θ + α·d) in 1-D, L(θ + α·d1 + β·d2) in 2-D.
Raw Gaussian directions are not comparable across models whose weights have different scales, so
each *filter* of d is rescaled to the norm of the matching filter of θ: for a parameter tensor
of shape (out, ...), filter i is the slice [i, ...] (Li et al.'s convention: a conv filter, a row of a
linear weight; for LoRA that is a row of A (one rank component) and a row of B (one output unit)).
One-dimensional tensors (biases, norms) get a zero direction by default, as in Li et al.
("ignore biasbn"), since their scale is not comparable to a filter's.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

Vector = list[torch.Tensor]

__all__ = ["filter_normalized_direction", "loss_along_1d", "loss_surface_2d", "perturbed"]


def filter_normalized_direction(
    params: Sequence[torch.Tensor],
    generator: torch.Generator | None = None,
    *,
    one_dim: str = "zero",
) -> Vector:
    """A random direction with each filter's norm equal to that filter's norm in ``params``.

    ``one_dim``: ``"zero"`` (Li et al.) or ``"normalize"`` (the whole 1-D tensor is one filter).
    A filter whose weights are all zero (e.g. LoRA B at init) gets a zero direction.
    """
    if one_dim not in ("zero", "normalize"):
        raise ValueError(f"one_dim: expected 'zero' or 'normalize', got {one_dim!r}")
    directions: Vector = []
    for p in params:
        w = p.detach()
        d = torch.randn(w.shape, generator=generator, dtype=w.dtype).to(w.device)
        if w.dim() <= 1:
            if one_dim == "zero":
                d = torch.zeros_like(w)
            else:
                d = d * (w.norm() / (d.norm() + 1e-10))
        else:
            w_f = w.reshape(w.shape[0], -1)
            d_f = d.reshape(d.shape[0], -1)
            d_f = d_f * (w_f.norm(dim=1, keepdim=True) / (d_f.norm(dim=1, keepdim=True) + 1e-10))
            d = d_f.reshape(w.shape)
        directions.append(d)
    return directions


class perturbed:
    """Context manager: parameters set to θ + Σ_j c_j·d_j inside, restored exactly on exit."""

    def __init__(self, params: Sequence[torch.Tensor]):
        self.params = list(params)
        self.origin = [p.detach().clone() for p in self.params]

    def set(self, coeffs: Sequence[float], directions: Sequence[Vector]) -> None:
        with torch.no_grad():
            for i, p in enumerate(self.params):
                value = self.origin[i].clone()
                for c, d in zip(coeffs, directions):
                    value.add_(d[i], alpha=float(c))
                p.copy_(value)

    def __enter__(self) -> "perturbed":
        return self

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for p, p0 in zip(self.params, self.origin):
                p.copy_(p0)


def _check_dir(params: Sequence[torch.Tensor], d: Vector, name: str) -> None:
    if len(d) != len(params) or any(a.shape != b.shape for a, b in zip(params, d)):
        raise ValueError(f"{name}: shapes do not match params")


def loss_along_1d(
    loss_fn: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    direction: Vector,
    alphas: Sequence[float],
) -> np.ndarray:
    """L(θ + α·d) for each α; ``params`` are restored afterwards."""
    params = list(params)
    _check_dir(params, direction, "direction")
    out = []
    with perturbed(params) as pt, torch.no_grad():
        for a in alphas:
            pt.set([a], [direction])
            out.append(float(loss_fn()))
    return np.asarray(out)


def loss_surface_2d(
    loss_fn: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    d1: Vector,
    d2: Vector,
    alphas: Sequence[float],
    betas: Sequence[float],
) -> np.ndarray:
    """Grid Z[i, j] = L(θ + alphas[i]·d1 + betas[j]·d2); ``params`` are restored afterwards."""
    params = list(params)
    _check_dir(params, d1, "d1")
    _check_dir(params, d2, "d2")
    z = np.empty((len(alphas), len(betas)))
    with perturbed(params) as pt, torch.no_grad():
        for i, a in enumerate(alphas):
            for j, b in enumerate(betas):
                pt.set([a, b], [d1, d2])
                z[i, j] = float(loss_fn())
    return z

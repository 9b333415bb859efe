"""Curvature of a loss: Hessian-vector products and the top Hessian eigenvalue.

The paper's third diagnosis is that FedAvg of DP-LoRA lands in sharp minima (top Hessian
eigenvalue 101.62 for DP-LoRA vs 64.77 for LA-LoRA, Swin-B / CIFAR-100 / eps = 1). The paper does
not say how it was computed; we use the standard recipe (PyHessian): Hessian-vector products by
double back-propagation (Pearlmutter's trick), over the trainable parameters only (LoRA factors and
head), on a fixed evaluation subset, with the model in eval mode (no dropout, so the loss is a
deterministic function of the parameters).

Two eigen-solvers are offered:
- ``"lanczos"`` (default): Lanczos with full re-orthogonalisation; returns the algebraically
  largest eigenvalue of the Krylov tridiagonal matrix. Converges much faster than power iteration
  when the top of the spectrum is clustered.
- ``"power"``: power iteration with a Rayleigh quotient (what PyHessian reports); converges to the
  eigenvalue of largest *magnitude*.

Everything works on a list of tensors ("a vector" = one tensor per parameter), so no flattening of
the model is needed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

Vector = list[torch.Tensor]
LossFn = Callable[[], torch.Tensor]

__all__ = [
    "EigenResult",
    "hessian_vector_product",
    "finite_difference_hvp",
    "top_eigenvalue",
    "model_loss_closure",
    "no_fused_attention",
]


@dataclass
class EigenResult:
    """Top Hessian eigenvalue and how it was obtained."""

    eigenvalue: float
    method: str
    iterations: int  # number of Hessian-vector products spent
    converged: bool
    history: list[float] = field(default_factory=list)  # estimate after each iteration
    eigenvector: Vector | None = None


def _dot(u: Vector, v: Vector) -> torch.Tensor:
    return sum((a * b).sum() for a, b in zip(u, v))


def _norm(u: Vector) -> torch.Tensor:
    return torch.sqrt(_dot(u, u))


def _check_params(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    params = list(params)
    if not params:
        raise ValueError("params: empty; pass the trainable parameters (e.g. LoRA factors and head)")
    bad = [i for i, p in enumerate(params) if not p.requires_grad]
    if bad:
        raise ValueError(f"params: entries {bad} do not require grad")
    return params


def hessian_vector_product(loss_fn: LossFn, params: Sequence[torch.Tensor], vector: Vector) -> Vector:
    """H·v of ``loss_fn()`` w.r.t. ``params`` by double back-propagation (exact, one HVP).

    ``loss_fn`` is called once and must return a scalar built from ``params``. Parameters the loss
    does not depend on get a zero block.
    """
    params = _check_params(params)
    if len(vector) != len(params):
        raise ValueError(f"vector: {len(vector)} tensors for {len(params)} params")
    loss = loss_fn()
    if loss.dim() != 0:
        raise ValueError(f"loss_fn: must return a scalar, got shape {tuple(loss.shape)}")
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    pairs = [(g, v) for g, v in zip(grads, vector) if g is not None]
    if not pairs:
        return [torch.zeros_like(p) for p in params]
    gv = sum((g * v.to(g.dtype)).sum() for g, v in pairs)
    used = [p for p, g in zip(params, grads) if g is not None]
    hv_used = torch.autograd.grad(gv, used, allow_unused=True)
    out, it = [], iter(hv_used)
    for p, g in zip(params, grads):
        h = next(it) if g is not None else None
        out.append(torch.zeros_like(p) if h is None else h.detach())
    return out


def finite_difference_hvp(
    loss_fn: LossFn, params: Sequence[torch.Tensor], vector: Vector, eps: float = 1e-4
) -> Vector:
    """Central-difference H·v ≈ (∇L(θ+εv) − ∇L(θ−εv)) / 2ε; a reference for tests and a fallback
    for models whose ops lack double backward. Restores ``params`` exactly afterwards."""
    params = _check_params(params)
    originals = [p.detach().clone() for p in params]

    def grad_at(sign: float) -> Vector:
        with torch.no_grad():
            for p, p0, v in zip(params, originals, vector):
                p.copy_(p0 + sign * eps * v)
        grads = torch.autograd.grad(loss_fn(), params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]

    try:
        plus, minus = grad_at(+1.0), grad_at(-1.0)
    finally:
        with torch.no_grad():
            for p, p0 in zip(params, originals):
                p.copy_(p0)
    return [(a - b) / (2 * eps) for a, b in zip(plus, minus)]


def _random_unit(params: Sequence[torch.Tensor], generator: torch.Generator | None) -> Vector:
    v = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
    n = _norm(v)
    return [x / n for x in v]


def top_eigenvalue(
    loss_fn: LossFn,
    params: Sequence[torch.Tensor],
    *,
    method: str = "lanczos",
    max_iter: int = 50,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
    hvp: Callable[[LossFn, Sequence[torch.Tensor], Vector], Vector] = hessian_vector_product,
    return_eigenvector: bool = False,
) -> EigenResult:
    """Top eigenvalue of the Hessian of ``loss_fn`` w.r.t. ``params``.

    Stops when the estimate changes by less than ``tol`` (relative) between iterations, or after
    ``max_iter`` Hessian-vector products. The start vector is drawn from ``generator``.
    """
    params = _check_params(params)
    if method not in ("lanczos", "power"):
        raise ValueError(f"method: expected 'lanczos' or 'power', got {method!r}")
    if max_iter < 1:
        raise ValueError(f"max_iter: must be >= 1, got {max_iter}")
    if method == "power":
        return _power(loss_fn, params, max_iter, tol, generator, hvp, return_eigenvector)
    return _lanczos(loss_fn, params, max_iter, tol, generator, hvp, return_eigenvector)


def _power(loss_fn, params, max_iter, tol, generator, hvp, return_vec) -> EigenResult:
    v = _random_unit(params, generator)
    history: list[float] = []
    converged = False
    for _ in range(max_iter):
        hv = hvp(loss_fn, params, v)
        lam = float(_dot(v, hv))  # Rayleigh quotient of the unit vector v
        history.append(lam)
        n = _norm(hv)
        if float(n) == 0.0:
            converged = True
            break
        v = [x / n for x in hv]
        if len(history) > 1 and abs(history[-1] - history[-2]) <= tol * (abs(history[-1]) + 1e-12):
            converged = True
            break
    return EigenResult(history[-1], "power", len(history), converged, history, v if return_vec else None)


def _lanczos(loss_fn, params, max_iter, tol, generator, hvp, return_vec) -> EigenResult:
    # Lanczos with full re-orthogonalisation (numerically safe for the few dozen steps we take).
    basis: list[Vector] = [_random_unit(params, generator)]
    alphas: list[float] = []
    betas: list[float] = []
    history: list[float] = []
    converged = False
    ritz_vec = None
    for j in range(max_iter):
        w = hvp(loss_fn, params, basis[j])
        alpha = float(_dot(w, basis[j]))
        alphas.append(alpha)
        # Full re-orthogonalisation against every previous Lanczos vector (twice is enough).
        for _ in range(2):
            for q in basis:
                c = _dot(w, q)
                w = [a - c * b for a, b in zip(w, q)]
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(t)
        history.append(float(evals[-1]))
        ritz_vec = evecs[:, -1]
        beta = float(_norm(w))
        if len(history) > 1 and abs(history[-1] - history[-2]) <= tol * (abs(history[-1]) + 1e-12):
            converged = True
            break
        if beta <= 1e-10 * max(1.0, abs(history[-1])):  # invariant subspace found: exact
            converged = True
            break
        betas.append(beta)
        basis.append([x / beta for x in w])
    vec = None
    if return_vec and ritz_vec is not None:
        k = len(ritz_vec)
        vec = [sum(float(ritz_vec[i]) * basis[i][t] for i in range(k)) for t in range(len(params))]
    return EigenResult(history[-1], "lanczos", len(history), converged, history, vec)


@contextlib.contextmanager
def no_fused_attention(model: nn.Module) -> Iterator[None]:
    """Temporarily switch timm attention blocks to the explicit softmax path.

    timm's fused path calls ``scaled_dot_product_attention``, whose CPU kernels may lack double
    backward; the explicit path computes the same function with differentiable ops.
    """
    saved = []
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            saved.append((m, m.fused_attn))
            m.fused_attn = False
    try:
        yield
    finally:
        for m, flag in saved:
            m.fused_attn = flag


def model_loss_closure(
    model: nn.Module,
    forward: Callable[[nn.Module, dict], torch.Tensor],
    batches: Sequence[dict],
) -> LossFn:
    """A closure returning the mean cross-entropy of ``model`` over a fixed list of batches.

    ``forward(model, batch)`` returns logits (as ``Task.forward``); every batch holds ``labels``.
    The caller puts the model in eval mode (dropout off) so the closure is deterministic.
    """
    if not batches:
        raise ValueError("batches: empty evaluation subset")
    total = sum(int(b["labels"].shape[0]) for b in batches)

    def loss_fn() -> torch.Tensor:
        loss = 0.0
        for b in batches:
            logits = forward(model, b)
            loss = loss + nn.functional.cross_entropy(logits, b["labels"], reduction="sum")
        return loss / total

    return loss_fn

"""Numerical checks of the paper's math on clean synthetic problems (float64 throughout).

The paper's statements were only seen through secondary notes (arXiv 2602.19926 §3–4; paper/reported.yaml names the sources), so each
check states the exact claim it tests:

- ``gradient_coupling``: for W = W0 + s·B·A, ∇_A L = s·Bᵀ∇_W L and ∇_B L = s·∇_W L·Aᵀ (the
  coupling: each factor's gradient is the full gradient seen through the other factor), compared
  with autograd on a non-linear loss.
- ``projection_check`` (Theorem 2): the closed forms ∇̃_B = (1/s²)·∇_B L·(AAᵀ)⁻¹ and
  ∇̃_A = (1/s²)·(BᵀB)⁻¹·∇_A L solve min_X ‖s·X·A − ∇_W L‖_F and min_X ‖s·B·X − ∇_W L‖_F, and
  the residuals are orthogonal to the row space of A / the column space of B.
- ``cross_term_vs_width`` (Theorem 3): a simultaneous step (B − η∇̃_B)(A − η∇̃_A) carries the
  second-order term s·η²·∇̃_B·∇̃_A; its size relative to the first-order update does not vanish as
  the width m = n grows (with width-independent spectra), while an alternating step changes W by
  exactly its first-order term.
- ``alternating_matrix_sensing`` (Theorem 4): on matrix sensing with Gaussian measurements (RIP
  w.h.p.), momentum-free alternating projected updates decrease the loss linearly; we measure the
  per-iteration contraction and compare with (1 − η_c)². The paper's η_c is not available; we use
  η_c = 1 − max|1 − ηλ| over the eigenvalues λ of 𝒜*𝒜 restricted to the tangent space at the
  solution (the local RIP constant; see the function's docstring).
- ``epsilon_scan`` (Theorem 1): ε from the accountant against steps and σ (ε grows ~√steps and
  ~1/σ); the filter is post-processing, so the accountant never sees it.
- ``filter_checks``: the [1,4,6,4,1]/16 filter's gain cos⁴(ω/2) and white-noise variance 70/256.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from .noise import loglog_slope

__all__ = [
    "gradient_coupling",
    "projection_check",
    "projected_gradients",
    "cross_term_vs_width",
    "alternating_matrix_sensing",
    "SensingResult",
    "epsilon_scan",
    "filter_checks",
    "FILTER_VARIANCE_FACTOR",
]

FILTER_VARIANCE_FACTOR = 70 / 256  # Σ h² for h = [1, 4, 6, 4, 1] / 16


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def gradient_coupling(m: int = 12, n: int = 10, r: int = 3, scale: float = 2.0, seed: int = 0) -> dict:
    """Relative errors of s·Bᵀ∇_W L and s·∇_W L·Aᵀ against autograd's ∇_A L, ∇_B L.

    Loss: softmax cross-entropy of tanh(X Wᵀ) features (non-linear in W), float64.
    """
    g = torch.Generator().manual_seed(seed)
    kw = dict(generator=g, dtype=torch.float64)
    W0 = torch.randn((m, n), **kw) / math.sqrt(n)
    A = (torch.randn((r, n), **kw) / math.sqrt(n)).requires_grad_()
    B = (torch.randn((m, r), **kw) / math.sqrt(r)).requires_grad_()
    X = torch.randn((32, n), **kw)
    y = torch.randint(0, m, (32,), generator=g)

    def loss_of(W: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(torch.tanh(X @ W.T) * 3.0, y)

    grad_A, grad_B = torch.autograd.grad(loss_of(W0 + scale * B @ A), (A, B))
    W = (W0 + scale * B @ A).detach().requires_grad_()
    (grad_W,) = torch.autograd.grad(loss_of(W), (W,))
    return {
        "rel_err_A": _rel(scale * B.detach().T @ grad_W, grad_A),
        "rel_err_B": _rel(scale * grad_W @ A.detach().T, grad_B),
    }


def projected_gradients(grad_W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float):
    """Theorem 2's closed forms (∇̃_B, ∇̃_A) from the factor gradients s·∇_W Aᵀ and s·Bᵀ∇_W."""
    grad_B = scale * grad_W @ A.T
    grad_A = scale * B.T @ grad_W
    tilde_B = torch.linalg.solve(A @ A.T, grad_B.T).T / scale**2  # ∇_B (AAᵀ)⁻¹ / s²
    tilde_A = torch.linalg.solve(B.T @ B, grad_A) / scale**2  # (BᵀB)⁻¹ ∇_A / s²
    return tilde_B, tilde_A


def projection_check(m: int = 30, n: int = 20, r: int = 4, scale: float = 0.5, seed: int = 0) -> dict:
    """Closed form vs least squares (relative difference) and residual orthogonality, float64.

    ``resid_orth_*`` = ‖R·Aᵀ‖ / (‖R‖·‖A‖) for the B problem (R = ∇_W − s·∇̃_B·A) and
    ‖Bᵀ·R‖ / (‖B‖·‖R‖) for the A problem: 0 means the residual is orthogonal to the subspace.
    """
    g = torch.Generator().manual_seed(seed)
    kw = dict(generator=g, dtype=torch.float64)
    G = torch.randn((m, n), **kw)
    A = torch.randn((r, n), **kw)
    B = torch.randn((m, r), **kw)
    tilde_B, tilde_A = projected_gradients(G, A, B, scale)
    # Least squares: min_X ‖s X A − G‖  <=>  (sA)ᵀ Xᵀ = Gᵀ ;  min_X ‖s B X − G‖  <=>  (sB) X = G.
    ls_B = torch.linalg.lstsq(scale * A.T, G.T).solution.T
    ls_A = torch.linalg.lstsq(scale * B, G).solution
    R_B = G - scale * tilde_B @ A
    R_A = G - scale * B @ tilde_A
    return {
        "closed_vs_lstsq_B": _rel(tilde_B, ls_B),
        "closed_vs_lstsq_A": _rel(tilde_A, ls_A),
        "resid_orth_B": float((R_B @ A.T).norm() / (R_B.norm() * A.norm())),
        "resid_orth_A": float((B.T @ R_A).norm() / (B.norm() * R_A.norm())),
    }


def _rank_r_target(m: int, n: int, r: int, singular_values: Sequence[float], g: torch.Generator):
    U, _ = torch.linalg.qr(torch.randn((m, r), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn((n, r), generator=g, dtype=torch.float64))
    return U @ torch.diag(torch.tensor(list(singular_values), dtype=torch.float64)) @ V.T


def cross_term_vs_width(
    widths: Sequence[int], r: int = 4, eta: float = 0.5, scale: float = 1.0, trials: int = 3, seed: int = 0
) -> dict:
    """Second-order share of one update of W = s·B·A against the width m = n.

    Problem: L(W) = ½‖W − W*‖²_F with rank-r W* of singular values 1..r/r·… (width-independent),
    A, B with N(0, 1/n), N(0, 1/m) entries (so AAᵀ ≈ I, BᵀB ≈ I at any width). Updates use
    Theorem 2's projected gradients with step η. For each width we measure
      simultaneous: ‖ΔW − ΔW₁‖ / ‖ΔW₁‖, ΔW₁ = −sη(∇̃_B A + B ∇̃_A) the first-order part;
      alternating:  the same ratio for a B step (A fixed) then an A step (at the new B).
    Returns per-width means (the simultaneous ratio stays Θ(1); the alternating one is round-off).
    """
    g = torch.Generator().manual_seed(seed)
    sim, alt = [], []
    for w in widths:
        m = n = int(w)
        if r > min(m, n):
            raise ValueError(f"widths: {w} is smaller than r={r}")
        s_ratios, a_ratios = [], []
        for _ in range(trials):
            target = _rank_r_target(m, n, r, [1.0 + k for k in range(r)], g)
            A = torch.randn((r, n), generator=g, dtype=torch.float64) / math.sqrt(n)
            B = torch.randn((m, r), generator=g, dtype=torch.float64) / math.sqrt(m)
            W = scale * B @ A
            tB, tA = projected_gradients(W - target, A, B, scale)
            first = -scale * eta * (tB @ A + B @ tA)
            dW = scale * (B - eta * tB) @ (A - eta * tA) - W
            s_ratios.append(float((dW - first).norm() / first.norm()))
            # Alternating: B step, then an A step with the gradient taken at the new B.
            B1 = B - eta * tB
            dW_b = scale * B1 @ A - W
            first_b = -scale * eta * tB @ A
            W1 = scale * B1 @ A
            _, tA1 = projected_gradients(W1 - target, A, B1, scale)
            dW_a = scale * B1 @ (A - eta * tA1) - W1
            first_a = -scale * eta * B1 @ tA1
            a_ratios.append(
                max(
                    float((dW_b - first_b).norm() / first_b.norm()),
                    float((dW_a - first_a).norm() / first_a.norm()),
                )
            )
        sim.append(float(np.mean(s_ratios)))
        alt.append(float(np.mean(a_ratios)))
    return {"widths": [int(w) for w in widths], "simultaneous": sim, "alternating": alt, "eta": eta}


@dataclass
class SensingResult:
    losses: list[float]  # L_c after each full iteration (a B step then an A step); losses[0] = init
    measured_rate: float  # geometric-mean L_{k+1}/L_k over the linear phase
    bound: float  # (1 − η_c)²
    eta_c: float
    restricted_eigs: tuple[float, float]  # extreme eigenvalues of 𝒜*𝒜 on the tangent space at W*
    linear_phase: tuple[int, int]  # iterations used for the rate
    extra: dict = field(default_factory=dict)


def _tangent_restricted_eigs(ops: torch.Tensor, target: torch.Tensor, r: int) -> tuple[float, float]:
    """Extreme eigenvalues of 𝒜*𝒜 restricted to the tangent space of the rank-r manifold at W*.

    T = {U X + Y Vᵀ}; δ_T = max |λ − 1| is the restricted isometry constant that governs the local
    rate of (alternating) gradient methods."""
    m, n = target.shape
    U, _, Vh = torch.linalg.svd(target)
    U, V = U[:, :r], Vh[:r].T
    # Orthonormal basis of T: vec(U X) for X (r×n), vec(Y Vᵀ) for Y with Uᵀ Y = 0 ((m−r)×r free).
    U_perp = torch.linalg.svd(torch.eye(m, dtype=target.dtype) - U @ U.T)[0][:, : m - r]
    basis = [torch.kron(U[:, i : i + 1], torch.eye(n, dtype=target.dtype)[j : j + 1]) for i in range(r) for j in range(n)]
    basis += [torch.kron(U_perp[:, i : i + 1], V[:, j : j + 1].T) for i in range(m - r) for j in range(r)]
    Q = torch.stack([b.flatten() for b in basis], 1)  # (m·n, r(m+n−r)), orthonormal columns
    eigs = torch.linalg.eigvalsh((ops @ Q).T @ (ops @ Q))
    return float(eigs[0]), float(eigs[-1])


def alternating_matrix_sensing(
    m: int = 20,
    n: int = 16,
    r: int = 2,
    measurements: int | None = None,
    eta: float = 0.5,
    iterations: int = 30,
    seed: int = 0,
    init_scale: float = 0.3,
) -> SensingResult:
    """Theorem 4 on Gaussian matrix sensing, with momentum-free alternating projected updates.

    Measurements y_i = ⟨M_i, W*⟩ with M_i entries N(0, 1/p) (E‖𝒜(X)‖² = ‖X‖²); p defaults to
    6·r·(m + n). L_c(B, A) = ½‖𝒜(BA) − y‖². One iteration: B ← B − η∇̃_B (A fixed), then
    A ← A − η∇̃_A (new B fixed), with Theorem 2's projected gradients. Init: the spectral
    initialisation (top-r SVD of 𝒜*(y)) plus ``init_scale``-sized perturbations, i.e. the local
    regime such theorems assume.

    The bound: with λ_min, λ_max the eigenvalues of 𝒜*𝒜 restricted to the tangent space at W*
    (so δ_T = max|λ − 1| is the RIP constant that matters locally), each factor step contracts the
    residual block it owns by at most ρ = max|1 − ηλ|; the off-diagonal blocks are each touched
    once per iteration, so L_c(k+1) ≤ (1 − η_c)²·L_c(k) asymptotically with η_c := 1 − ρ
    (= η for exact measurements). The paper's own constant is not available (arXiv 2602.19926 §4).

    The rate is fitted after the loss falls below 1e-2 of its initial value (the first iterations
    include the transient rotation of the subspaces) and before it reaches 1e-24 (round-off).
    """
    if not 0 < eta < 1:
        raise ValueError(f"eta: expected 0 < eta < 1, got {eta}")
    g = torch.Generator().manual_seed(seed)
    p = measurements or 6 * r * (m + n)
    target = _rank_r_target(m, n, r, [1.0 + k for k in range(r)], g)
    ops = torch.randn((p, m * n), generator=g, dtype=torch.float64) / math.sqrt(p)
    y = ops @ target.flatten()

    def loss_and_grad(W: torch.Tensor):
        res = ops @ W.flatten() - y
        return 0.5 * float(res @ res), (ops.T @ res).reshape(m, n)

    U, S, Vh = torch.linalg.svd((ops.T @ y).reshape(m, n))
    B = U[:, :r] * S[:r].sqrt() + init_scale * torch.randn((m, r), generator=g, dtype=torch.float64)
    A = S[:r].sqrt()[:, None] * Vh[:r] + init_scale * torch.randn((r, n), generator=g, dtype=torch.float64)
    losses = [loss_and_grad(B @ A)[0]]
    for _ in range(iterations):
        _, gW = loss_and_grad(B @ A)
        tB, _ = projected_gradients(gW, A, B, 1.0)
        B = B - eta * tB
        _, gW = loss_and_grad(B @ A)
        _, tA = projected_gradients(gW, A, B, 1.0)
        A = A - eta * tA
        losses.append(loss_and_grad(B @ A)[0])
    lam_min, lam_max = _tangent_restricted_eigs(ops, target, r)
    rho = max(abs(1 - eta * lam_min), abs(1 - eta * lam_max))
    L = np.asarray(losses)
    start = int(np.argmax(L < 1e-2 * L[0])) if (L < 1e-2 * L[0]).any() else 1
    valid = np.nonzero(L > 1e-24)[0]
    stop = int(valid[-1]) if len(valid) else start
    if stop - start < 2:
        start, stop = 0, max(1, min(stop, len(L) - 1))
    rate = float(np.exp((np.log(L[stop]) - np.log(L[start])) / (stop - start)))
    eta_c = 1.0 - rho
    return SensingResult(
        losses, rate, (1 - eta_c) ** 2, eta_c, (lam_min, lam_max), (start, stop), {"measurements": p}
    )


def epsilon_scan(
    epsilon_fn: Callable[[float, float, float, int], float],
    *,
    sigmas: Sequence[float] = (0.8, 1.0, 1.5, 2.0, 3.0),
    steps: Sequence[int] = (100, 200, 400, 800, 1600),
    sample_rate: float = 0.07,
    delta: float = 1e-5,
    sigma_for_steps: float = 1.5,
    steps_for_sigma: int = 400,
) -> dict:
    """ε against steps (at fixed σ) and against σ (at fixed steps), with log-log slopes.

    ``epsilon_fn(noise_multiplier, delta, sample_rate, steps)`` is the accountant, e.g.
    ``lalora.privacy.epsilon_for``. Theorem 1's O(·) predicts slopes ≈ +0.5 and ≈ −1 (the
    accountant is tighter at small σ, so the σ slope is steeper than −1 there).
    """
    eps_steps = [float(epsilon_fn(sigma_for_steps, delta, sample_rate, int(k))) for k in steps]
    eps_sigma = [float(epsilon_fn(float(s), delta, sample_rate, steps_for_sigma)) for s in sigmas]
    return {
        "steps": [int(k) for k in steps],
        "epsilon_vs_steps": eps_steps,
        "slope_steps": loglog_slope(steps, eps_steps),
        "sigmas": [float(s) for s in sigmas],
        "epsilon_vs_sigma": eps_sigma,
        "slope_sigma": loglog_slope(sigmas, eps_sigma),
        "sample_rate": sample_rate,
        "delta": delta,
        "sigma_for_steps": sigma_for_steps,
        "steps_for_sigma": steps_for_sigma,
    }


def filter_checks(
    filter_1d: Callable[[torch.Tensor], torch.Tensor],
    *,
    length: int = 512,
    freqs: Sequence[float] | None = None,
    noise_rows: int = 400,
    seed: int = 0,
) -> dict:
    """Measure the filter's gain and white-noise variance factor through ``filter_1d``.

    ``filter_1d(x)`` filters each row of a (rows, length) float64 tensor along its last axis
    (e.g. the federated engineer's filter applied to an A-shaped tensor). Boundary samples (the
    padding zone) are excluded, so interior values match the infinite-signal theory:
    gain(ω) = cos⁴(ω/2) for a cosine of angular frequency ω = 2πk/length, variance factor 70/256.
    """
    if freqs is None:
        freqs = [2 * math.pi * k / length for k in (0, 16, 32, 64, 96, 128, 160, 192, 224, 255)]
    t = torch.arange(length, dtype=torch.float64)
    sig = torch.stack([torch.cos(w * t) for w in freqs])
    out = filter_1d(sig.clone())
    inner = slice(8, length - 8)
    # Measured gain: least-squares amplitude of the output against the input cosine (the filter is
    # symmetric, so there is no phase shift) on the interior.
    gains = ((out[:, inner] * sig[:, inner]).sum(1) / sig[:, inner].pow(2).sum(1).clamp_min(1e-300)).tolist()
    theory = [math.cos(w / 2) ** 4 for w in freqs]
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((noise_rows, length), generator=g, dtype=torch.float64)
    filtered = filter_1d(noise.clone())
    var_factor = float(filtered[:, inner].var() / noise[:, inner].var())
    return {
        "omega": [float(w) for w in freqs],
        "gain_measured": [float(x) for x in gains],
        "gain_theory": theory,
        "max_gain_error": float(max(abs(a - b) for a, b in zip(gains, theory))),
        "variance_factor_measured": var_factor,
        "variance_factor_theory": FILTER_VARIANCE_FACTOR,
    }

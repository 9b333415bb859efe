"""Noise amplification in the LoRA product (the paper's second diagnosis).

With both factors noised in one step, (B + N_B)(A + N_A) = BA + N_B·A + B·N_A + N_B·N_A: the
cross term N_B·N_A grows like σ² while the linear terms grow like σ. For entries i.i.d. N(0, σ²)
(N_B ∈ R^{m×r}, N_A ∈ R^{r×n}) the exact second moments are

    E‖N_B N_A‖²_F = m·n·r·σ⁴,   E‖N_B A‖²_F = m·σ²·‖A‖²_F,   E‖B N_A‖²_F = n·σ²·‖B‖²_F.

LA-LoRA noises one factor per step, so only one linear term appears per step. This module gives
the Monte Carlo estimates, the closed forms, a log-log slope fit, and the noise an SGD step puts
on the effective weight W = W0 + s·B·A under each scheme.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

__all__ = [
    "closed_form_sq_norms",
    "monte_carlo_sq_norms",
    "loglog_slope",
    "NoiseScan",
    "noise_scan",
    "weight_noise_per_step",
]


def closed_form_sq_norms(m: int, n: int, r: int, sigma: float, A: torch.Tensor, B: torch.Tensor) -> dict:
    """Exact E‖·‖²_F of the three noise terms for entry variance σ²."""
    return {
        "NB_NA": m * n * r * sigma**4,
        "NB_A": m * sigma**2 * float(A.double().pow(2).sum()),
        "B_NA": n * sigma**2 * float(B.double().pow(2).sum()),
    }


def monte_carlo_sq_norms(
    A: torch.Tensor, B: torch.Tensor, sigma: float, trials: int, generator: torch.Generator
) -> dict:
    """Monte Carlo mean of ‖N_B N_A‖²_F, ‖N_B A‖²_F, ‖B N_A‖²_F over ``trials`` draws (float64)."""
    if trials < 1:
        raise ValueError(f"trials: must be >= 1, got {trials}")
    if sigma < 0:
        raise ValueError(f"sigma: must be >= 0, got {sigma}")
    A, B = A.double(), B.double()
    (r, n), (m, r2) = A.shape, B.shape
    if r != r2:
        raise ValueError(f"A, B: inner dimensions differ (A is {tuple(A.shape)}, B is {tuple(B.shape)})")
    nb = sigma * torch.randn((trials, m, r), generator=generator, dtype=torch.float64)
    na = sigma * torch.randn((trials, r, n), generator=generator, dtype=torch.float64)
    sq = lambda x: x.pow(2).sum(dim=(1, 2)).mean().item()  # noqa: E731
    return {"NB_NA": sq(nb @ na), "NB_A": sq(nb @ A), "B_NA": sq(B @ na)}


def loglog_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of log y against log x."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or len(x) != len(y):
        raise ValueError("x, y: need two or more points of equal length")
    if (x <= 0).any() or (y <= 0).any():
        raise ValueError("x, y: log-log fit needs positive values")
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


@dataclass
class NoiseScan:
    sigmas: list[float]
    monte_carlo: dict[str, list[float]]  # key -> RMS Frobenius norm sqrt(E‖·‖²) per σ
    closed_form: dict[str, list[float]]  # same, from the closed forms
    slopes: dict[str, float]  # log-log slope of the Monte Carlo RMS norm against σ
    max_rel_error: dict[str, float]  # max over σ of |E_mc‖·‖² / E‖·‖² − 1|

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def noise_scan(
    m: int, n: int, r: int, sigmas: Sequence[float], *, trials: int = 200, seed: int = 0
) -> NoiseScan:
    """‖N_B N_A‖_F, ‖N_B A‖_F, ‖B N_A‖_F against σ (fresh draws for every σ).

    A and B are fixed draws with unit-variance entries scaled by 1/√n and 1/√r (a trained-LoRA-like
    scale where ‖BA‖ is O(1) per entry), so the linear terms are not trivially zero as at B₀ = 0.
    """
    for name, v in (("m", m), ("n", n), ("r", r)):
        if v < 1:
            raise ValueError(f"{name}: must be >= 1, got {v}")
    g = torch.Generator().manual_seed(seed)
    A = torch.randn((r, n), generator=g, dtype=torch.float64) / np.sqrt(n)
    B = torch.randn((m, r), generator=g, dtype=torch.float64) / np.sqrt(r)
    keys = ("NB_NA", "NB_A", "B_NA")
    mc = {k: [] for k in keys}
    cf = {k: [] for k in keys}
    rel = {k: 0.0 for k in keys}
    for s in sigmas:
        est = monte_carlo_sq_norms(A, B, float(s), trials, g)
        exact = closed_form_sq_norms(m, n, r, float(s), A, B)
        for k in keys:
            mc[k].append(float(np.sqrt(est[k])))
            cf[k].append(float(np.sqrt(exact[k])))
            rel[k] = max(rel[k], abs(est[k] / exact[k] - 1.0))
    slopes = {k: loglog_slope(sigmas, mc[k]) for k in keys}
    return NoiseScan([float(s) for s in sigmas], mc, cf, slopes, rel)


def weight_noise_per_step(
    A: torch.Tensor,
    B: torch.Tensor,
    noise_std: float,
    lr: float,
    scaling: float,
    *,
    trials: int = 200,
    generator: torch.Generator | None = None,
) -> dict:
    """RMS Frobenius norm of the noise one DP-SGD step puts on W = W0 + s·B·A.

    The gradient noise on each factor has entries N(0, noise_std²) (noise_std = σC/b); the step
    moves a factor by −lr·noise. Only the noise part of ΔW is measured (the signal is the same in
    expectation under both schemes):
      dp-lora (both factors):  s·[−lr·(N_B A + B N_A) + lr²·N_B N_A]
      la-lora B step:          −s·lr·N_B A         la-lora A step: −s·lr·B N_A
    Returns the RMS norms plus the cross-term share for DP-LoRA.
    """
    A, B = A.double(), B.double()
    (r, n), (m, _) = A.shape, B.shape
    nb = noise_std * torch.randn((trials, m, r), generator=generator, dtype=torch.float64)
    na = noise_std * torch.randn((trials, r, n), generator=generator, dtype=torch.float64)
    rms = lambda x: float(x.pow(2).sum(dim=(1, 2)).mean().sqrt())  # noqa: E731
    lin = -lr * (nb @ A + B @ na)
    cross = lr**2 * (nb @ na)
    return {
        "dp-lora": scaling * rms(lin + cross),
        "dp-lora-cross-term": scaling * rms(cross),
        "la-lora-B-step": scaling * rms(-lr * (nb @ A)),
        "la-lora-A-step": scaling * rms(-lr * (B @ na)),
    }

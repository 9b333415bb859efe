"""LA-LoRA's low-pass filter G = [1, 4, 6, 4, 1] / 16 on the noised LoRA gradient (SPEC §2).

Each row of ∇A (r × n) is convolved along the input axis (dim 1); each column of ∇B (m × r) along
the output axis (dim 0). Borders use symmetric (mirror) padding, numpy's ``mode="symmetric"``:
``… x1 x0 | x0 x1 … x_{n-1} | x_{n-1} x_{n-2} …``, so a constant gradient passes unchanged.

The kernel is the binomial B(4) filter: its frequency response is
H(ω) = (6 + 8 cos ω + 2 cos 2ω) / 16 = cos⁴(ω/2) (1 at ω = 0, 0 at Nyquist), and white noise of
variance v leaves with variance v · Σ g² = v · 70/256 away from the borders.

It acts only on already clipped and noised gradients, so it is post-processing: ε is unchanged.
"""
from __future__ import annotations

import torch

KERNEL = (1.0, 4.0, 6.0, 4.0, 1.0)
KERNEL_SUM = 16.0
WHITE_NOISE_VARIANCE_FACTOR = sum(k * k for k in KERNEL) / KERNEL_SUM ** 2  # 70/256


def symmetric_indices(n: int, pad: int, device=None) -> torch.Tensor:
    """Indices into a length-``n`` axis for positions -pad .. n-1+pad under symmetric padding."""
    if n < 1:
        raise ValueError(f"cannot filter an axis of length {n}")
    pos = torch.arange(-pad, n + pad, device=device)
    period = 2 * n
    j = torch.remainder(pos, period)
    return torch.where(j >= n, period - 1 - j, j)


def lowpass(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Convolve ``x`` with [1,4,6,4,1]/16 along ``dim`` (symmetric padding); same shape, same dtype."""
    dim = dim % x.ndim
    n = x.shape[dim]
    pad = len(KERNEL) // 2
    idx = symmetric_indices(n, pad, device=x.device)
    padded = x.index_select(dim, idx)
    out = torch.zeros_like(x)
    for offset, w in enumerate(KERNEL):
        out = out + (w / KERNEL_SUM) * padded.narrow(dim, offset, n)
    return out


def filter_lora_grad(grad: torch.Tensor, factor: str) -> torch.Tensor:
    """Filter a LoRA factor's gradient: A (r × n) along its input axis, B (m × r) along its output
    axis. Works for both our ``lora_A`` (r, n) and PEFT's ``lora_A.weight`` (r, n) layouts."""
    if grad.ndim != 2:
        raise ValueError(f"LoRA gradient must be 2-D, got shape {tuple(grad.shape)}")
    if factor == "A":
        return lowpass(grad, dim=1)
    if factor == "B":
        return lowpass(grad, dim=0)
    raise ValueError(f"factor must be 'A' or 'B', got {factor!r}")


@torch.no_grad()
def filter_gradients_(params: dict[str, tuple[torch.nn.Parameter, str]]) -> None:
    """In place: replace ``p.grad`` by its filtered version for every (param, factor) that has one.
    Parameters without a gradient (the frozen factor) are left alone."""
    for p, factor in params.values():
        if p.grad is not None:
            p.grad.copy_(filter_lora_grad(p.grad, factor))

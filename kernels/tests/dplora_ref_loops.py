"""float64 per-sample loops: the independent yardstick (autograd on one sample at a time)."""

import torch


def lora_loop(x, g, A, B, scale, N):
    """Per-sample dL/dA, dL/dB for L = <g, s (x Aᵀ) Bᵀ>, one sample (its k rows) at a time, float64."""
    x, g = x.double(), g.double()
    n, m = x.shape[-1], g.shape[-1]
    L = x.numel() // n // N if N else 0
    xs, gs = x.reshape(N, L, n), g.reshape(N, L, m)
    gA, gB = [], []
    for i in range(N):
        A_ = A.double().clone().requires_grad_(True)
        B_ = B.double().clone().requires_grad_(True)
        y = scale * (xs[i] @ A_.T) @ B_.T
        a, b = torch.autograd.grad((y * gs[i]).sum(), [A_, B_])
        gA.append(a)
        gB.append(b)
    r = A.shape[0]
    if N == 0:
        return torch.zeros(0, r, n, dtype=torch.float64), torch.zeros(0, m, r, dtype=torch.float64)
    return torch.stack(gA), torch.stack(gB)


def linear_loop(x, g, N, bias=True):
    x, g = x.double(), g.double()
    n, m = x.shape[-1], g.shape[-1]
    xs, gs = x.reshape(N, -1, n), g.reshape(N, -1, m)
    gW, gb = [], []
    for i in range(N):
        W = torch.zeros(m, n, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(m, dtype=torch.float64, requires_grad=True)
        y = xs[i] @ W.T + b
        w_, b_ = torch.autograd.grad((y * gs[i]).sum(), [W, b])
        gW.append(w_)
        gb.append(b_)
    return torch.stack(gW), torch.stack(gb)


def sq(t):
    return t.flatten(1).pow(2).sum(1) if t.dim() > 1 else t.pow(2)

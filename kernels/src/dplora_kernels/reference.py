"""PyTorch reference implementations of the per-sample gradient and clipping math.

This is the backend used on the CPU and the yardstick the Triton kernels are tested against. Everything
is computed in float32 (float64 if the inputs are float64), whatever the input dtype, because squared
norms of bf16/fp16 sums lose too many digits for DP clipping.

Layout: rows are sample-major. x has R = N * k rows; sample i owns rows i*k .. i*k+k-1 (e.g. the k
windows of one Swin image), so per-sample sums run over k*T positions.
"""

from __future__ import annotations

import math

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def per_sample_view(t: torch.Tensor, num_samples: int) -> torch.Tensor:
    """(R, T, c) or (R, c) -> (N, R//N * T, c): all positions of one sample on one axis (zero-copy
    when t is contiguous)."""
    rows_per_sample = (t.numel() // t.shape[-1]) // num_samples if num_samples else 0
    return t.reshape(num_samples, rows_per_sample, t.shape[-1])


def lora_per_sample_grads(x, grad_out, A, B, scale, num_samples, u=None, which="both", out_A=None, out_B=None,
                          v=None):
    """Per-sample G_A,i = v_i^T x_i (v = s * g B) and G_B,i = s * g_i^T u_i (u = x A^T). Inputs already
    validated; returns fp32 (fp64 for fp64 inputs) tensors. out_A (N, r, n) / out_B (N, m, r): optional
    buffers of that dtype (e.g. strided views into the engine's arena) that receive the gradients.

    Every product is taken with the rank r as its ROW dimension (v^T = s B^T g^T as one (r x m)(m x NL)
    matmul, G_B^T = u_i^T g_i per sample): CPU BLAS is 4x slower on the transposed shapes, whose output
    has only r = 8 columns (small Swin, stage-1 qkv, 32 samples x 64 rows: g B 220 us vs B^T g^T 57 us,
    g^T u 224 us vs u^T g 55 us, one thread). G_B^T is transposed while it is stored (the copy into the
    arena is needed anyway). v: optional s g B (R, [T,] r) already computed (the engine takes it from
    autograd, which computes dL/du for the layers below anyway)."""
    dt = acc_dtype(x.dtype)
    xs = per_sample_view(x, num_samples).to(dt)
    gs = per_sample_view(grad_out, num_samples).to(dt)
    grad_A = grad_B = None
    if which in ("both", "A"):
        if v is not None:
            vT = per_sample_view(v, num_samples).to(dt).transpose(1, 2)
        else:
            vT = _rank_rows(_scaled(B.to(dt), scale).T, gs)             # (N, r, L): s B^T g_i^T
        grad_A = _bmm_into(vT, xs, out_A)                                 # (N, r, n)
    if which in ("both", "B"):
        uT = per_sample_view(u, num_samples).to(dt).transpose(1, 2) if u is not None else _rank_rows(A.to(dt), xs)
        grad_B = _transposed_into(torch.bmm(uT, gs), out_B, scale)        # (N, m, r)
    return grad_A, grad_B


def _rank_rows(M: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """(r, c) @ ys_i^T for every sample as ONE (r x c)(c x N L) matmul: (N, L, c) -> (N, r, L) (a view)."""
    n, L, c = ys.shape
    return torch.mm(M, ys.reshape(n * L, c).T).view(M.shape[0], n, L).transpose(0, 1)


def _transposed_into(t: torch.Tensor, out: torch.Tensor | None, scale: float = 1.0) -> torch.Tensor:
    """scale * t^T per sample, (N, a, b) -> (N, b, a), into `out` (a new contiguous tensor when None):
    one strided copy does the transpose and the store (then the scale, in place, unless it is 1)."""
    if out is None:
        out = t.new_empty(t.shape[0], t.shape[2], t.shape[1])
    src = t.transpose(1, 2)
    out.copy_(src)
    return out if scale == 1.0 else out.mul_(scale)


def _bmm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """bmm(a, b), into `out` when given. A contiguous `out` is computed into directly; a strided one
    (a view into the engine's (N, P) arena) receives a copy of a fresh product, because torch's CPU
    bmm with a non-contiguous out= takes a slower path: measured on the small Swin's LoRA shapes,
    bmm(out=arena view) 50 us vs bmm + copy_ 24 us (G_A, 32 x (8x64)(64x32)).
    Same values bit for bit either way (the same per-matrix products)."""
    if out is not None and out.is_contiguous():
        return torch.bmm(a, b, out=out)
    t = torch.bmm(a, b)
    return t if out is None else out.copy_(t)


def _scaled(t: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * t; skipped for scale == 1, where the product is t bit for bit (x * 1.0 is exact)."""
    return t if scale == 1.0 else scale * t


def grouped_lora_per_sample_grads(x, grad_out, A, B, scale, num_samples, u, which, client_index,
                                  out_A=None, out_B=None):
    """lora_per_sample_grads with client stacks A (M, r, n), B (M, m, r): sample i uses its client's
    factors (gathered per sample: (N, r, m), small next to the activations), one bmm for all, with r
    as the row dimension as in lora_per_sample_grads."""
    dt = acc_dtype(x.dtype)
    xs = per_sample_view(x, num_samples).to(dt)
    gs = per_sample_view(grad_out, num_samples).to(dt)
    grad_A = grad_B = None
    if which in ("both", "A"):
        Bt = _scaled(B.to(dt), scale).transpose(1, 2).index_select(0, client_index)   # (N, r, m)
        vT = torch.bmm(Bt, gs.transpose(1, 2))                                       # (N, r, L)
        grad_A = _bmm_into(vT, xs, out_A)                                            # (N, r, n)
    if which in ("both", "B"):
        if u is not None:
            uT = per_sample_view(u, num_samples).to(dt).transpose(1, 2)
        else:
            uT = torch.bmm(A.to(dt).index_select(0, client_index), xs.transpose(1, 2))
        grad_B = _transposed_into(torch.bmm(uT, gs), out_B, scale)                  # (N, m, r)
    return grad_A, grad_B


def linear_per_sample_grads(x, grad_out, num_samples, bias=True, out_weight=None, out_bias=None):
    """Per-sample G_W,i = g_i^T x_i (m, n) and G_b,i = sum_t g_i,t (m,); out_weight / out_bias:
    optional buffers computed into (as out_A in lora_per_sample_grads). With fewer inputs than outputs
    (n < m, e.g. PEFT's lora_B with n = r) G_W^T = x_i^T g_i is the product taken, with the short side
    as rows (see lora_per_sample_grads), and transposed as it is stored."""
    dt = acc_dtype(x.dtype)
    xs = per_sample_view(x, num_samples).to(dt)
    gs = per_sample_view(grad_out, num_samples).to(dt)
    if xs.shape[-1] < gs.shape[-1]:
        grad_weight = _transposed_into(torch.bmm(xs.transpose(1, 2), gs), out_weight)   # (N, m, n)
    else:
        grad_weight = _bmm_into(gs.transpose(1, 2), xs, out_weight)                   # (N, m, n)
    grad_bias = None
    if bias:
        grad_bias = gs.sum(dim=1) if out_bias is None else torch.sum(gs, dim=1, out=out_bias)
    return grad_weight, grad_bias


def sqnorm(per_sample: torch.Tensor | None, num_samples: int, device, dtype=torch.float32) -> torch.Tensor:
    """Squared Frobenius norm of each sample's gradient; zeros for a missing (not computed) gradient."""
    if per_sample is None:
        return torch.zeros(num_samples, device=device, dtype=dtype)
    flat = per_sample.reshape(num_samples, math.prod(per_sample.shape[1:]))
    return flat.pow(2).sum(dim=1).to(dtype)


def clip_factors(sqnorm_total: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Abadi et al. clipping: c_i = min(1, C / (||g_i|| + 1e-6)). NaN norms stay NaN (callers check)."""
    dt = acc_dtype(sqnorm_total.dtype)
    # Correctly rounded sqrt and division, as in the Triton clip kernel (sqrt_rn, div_rn), so the two
    # agree bit for bit: computed in float64 and rounded once to float32 (exact for sqrt and division,
    # 53 >= 2*24 + 2 bits). torch's own fp32 ops are not: the vectorised CPU sqrt is an ulp off for some
    # inputs, and `c / t` is reciprocal(t) * c.
    norms = sqnorm_total.to(torch.float64).sqrt().to(dt)
    den = norms + 1e-6                                   # one rounding in dt, like the kernel's add
    c = torch.full_like(den, clip_norm)                  # C rounded to dt, like the kernel's fp32 argument
    return torch.clamp((c.double() / den.double()).to(dt), max=1.0)


def clipped_sum(per_sample: list[torch.Tensor], factors: torch.Tensor) -> list[torch.Tensor]:
    """sum_i c_i G_i for each tensor in the list (fp32 accumulation)."""
    out = []
    for g in per_sample:
        dt = acc_dtype(g.dtype)
        flat = g.reshape(g.shape[0], math.prod(g.shape[1:])).to(dt)
        out.append((factors.to(dt) @ flat).reshape(g.shape[1:]))
    return out

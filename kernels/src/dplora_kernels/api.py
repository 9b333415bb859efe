"""Public functions of dplora_kernels: validate inputs, pick a backend, dispatch.

Signatures follow docs/CONTRACTS.md. Every function accepts a `backend` ("auto" | "torch" | "triton");
the two backends compute the same math (tests hold them to stated tolerances) and draw the same noise.
Bad input raises ValueError naming the offending argument.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from . import reference as ref
from ._backend import resolve_backend


class LoRAPerSampleGrads(NamedTuple):
    grad_A: torch.Tensor | None   # (N, r, n), fp32 (None when which="B")
    grad_B: torch.Tensor | None   # (N, m, r), fp32 (None when which="A")
    sqnorm_A: torch.Tensor        # (N,) fp32, zeros when grad_A was not computed
    sqnorm_B: torch.Tensor        # (N,) fp32


class LinearPerSampleGrads(NamedTuple):
    grad_weight: torch.Tensor          # (N, m, n) fp32
    grad_bias: torch.Tensor | None     # (N, m) fp32, or None when bias=False
    sqnorm: torch.Tensor               # (N,) fp32: ||G_W,i||^2 + ||G_b,i||^2


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _pick(backend: str, device, dtypes) -> str:
    """resolve_backend, except that "auto" keeps float64 work on the torch path (the kernels are
    fp32-accumulating; float64 is for reference checks)."""
    if backend == "auto" and torch.float64 in dtypes:
        return "torch"
    return resolve_backend(backend, device)


def _same_device(x: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor argument on x's device: a clear error naming the argument, not a kernel fault."""
    for name, t in others.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; put all inputs on one device")


def _check_rows(x: torch.Tensor, grad_out: torch.Tensor, num_samples: int | None) -> int:
    """Validate the (R, T, c)/(R, c) layout shared by x and grad_out; return N."""
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be (R, T, n) or (R, n); got shape {tuple(x.shape)}")
    if grad_out.dim() != x.dim() or grad_out.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"grad_out must match x in all but the last dim; got x {tuple(x.shape)}, "
                         f"grad_out {tuple(grad_out.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be a floating tensor; got dtype {x.dtype}")
    _same_device(x, grad_out=grad_out)
    rows = x.shape[0]
    if num_samples is None:
        return rows
    if not isinstance(num_samples, int) or num_samples < 0:
        raise ValueError(f"num_samples must be a non-negative int; got {num_samples!r}")
    if num_samples == 0:
        if rows != 0:
            raise ValueError(f"num_samples=0 but x has {rows} rows")
        return 0
    if rows % num_samples:
        raise ValueError(f"num_samples={num_samples} must divide the row count R={rows} "
                         "(rows are sample-major: each sample owns R/N contiguous rows)")
    return num_samples


def lora_per_sample_grads(x: torch.Tensor, grad_out: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                          scale: float, num_samples: int | None = None, *, u: torch.Tensor | None = None,
                          backend: str = "auto", which: str = "both", out_A: torch.Tensor | None = None,
                          out_B: torch.Tensor | None = None,
                          client_index: torch.Tensor | None = None) -> LoRAPerSampleGrads:
    """Per-sample gradients of a LoRA layer h = W0 x + scale * B A x, and their squared norms.

    x: LoRA input after dropout, (R, T, n) or (R, n); grad_out: dL/dh, (R, T, m) or (R, m).
    A: (r, n); B: (m, r). R = N * k rows, sample-major. u: optional precomputed x A^T (R, [T,] r).
    which: "both" (default), "A" or "B" — compute only one factor's gradients (alternating LoRA).
    client_index: (N,) long -- client-grouped mode (grouped.py): A (M, r, n) and B (M, m, r) are
    client stacks and sample i uses A[client_index[i]], B[client_index[i]].
    Returns fp32 (fp64 for fp64 inputs) G_A (N, r, n), G_B (N, m, r) and their squared norms (N,).
    out_A / out_B: optional (N, r, n) / (N, m, r) tensors of that dtype on x's device (e.g. views into the
    engine's per-sample-gradient arena; any strides): the gradients are written there and returned as
    grad_A / grad_B (triton: the kernel stores into them, no copy; torch: see reference._bmm_into).
    """
    n_samples = _check_rows(x, grad_out, num_samples)
    if client_index is not None:
        return _grouped_lora_per_sample_grads(x, grad_out, A, B, scale, n_samples, u, backend, which,
                                              client_index, out_A, out_B)
    if A.dim() != 2 or A.shape[1] != x.shape[-1]:
        raise ValueError(f"A must be (r, n) with n = x.shape[-1] = {x.shape[-1]}; got {tuple(A.shape)}")
    if B.dim() != 2 or B.shape[1] != A.shape[0] or B.shape[0] != grad_out.shape[-1]:
        raise ValueError(f"B must be (m, r) = ({grad_out.shape[-1]}, {A.shape[0]}); got {tuple(B.shape)}")
    if u is not None and (u.shape[:-1] != x.shape[:-1] or u.shape[-1] != A.shape[0]):
        raise ValueError(f"u must be x A^T with shape {tuple(x.shape[:-1]) + (A.shape[0],)}; "
                         f"got {tuple(u.shape)}")
    _same_device(x, A=A, B=B, u=u, out_A=out_A, out_B=out_B)
    if which not in ("both", "A", "B"):
        raise ValueError(f"which must be 'both', 'A' or 'B'; got {which!r}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite; got {scale!r}")
    r, n, m = A.shape[0], A.shape[1], B.shape[0]
    dt = ref.acc_dtype(x.dtype)
    _check_out("out_A", out_A, (n_samples, r, n), dt)
    _check_out("out_B", out_B, (n_samples, m, r), dt)
    be = _pick(backend, x.device, (x.dtype, grad_out.dtype))
    if be == "triton":
        from . import triton_kernels as tk
        gA, gB, sqA, sqB = tk.lora_per_sample_grads(x, grad_out, A, B, float(scale), n_samples, u, which,
                                                    out_A=out_A, out_B=out_B)
        return LoRAPerSampleGrads(gA, gB, sqA, sqB)
    gA, gB = ref.lora_per_sample_grads(x, grad_out, A, B, float(scale), n_samples, u, which, out_A, out_B)
    sqA, sqB = ref.sqnorm(gA, n_samples, x.device, dt), ref.sqnorm(gB, n_samples, x.device, dt)
    return LoRAPerSampleGrads(gA, gB, sqA, sqB)


def _check_out(name: str, out: torch.Tensor | None, shape: tuple, dtype: torch.dtype) -> None:
    if out is not None and (tuple(out.shape) != tuple(shape) or out.dtype != dtype):
        raise ValueError(f"{name} must be a {dtype} tensor of shape {tuple(shape)}; "
                         f"got {out.dtype} {tuple(out.shape)}")


def _grouped_lora_per_sample_grads(x, grad_out, A, B, scale, n, u, backend, which, client_index, out_A, out_B):
    if A.dim() != 3 or B.dim() != 3 or A.shape[0] != B.shape[0]:
        raise ValueError(f"with client_index, A must be (M, r, n) and B (M, m, r); got {tuple(A.shape)}, "
                         f"{tuple(B.shape)}")
    if A.shape[2] != x.shape[-1] or B.shape[1] != grad_out.shape[-1] or B.shape[2] != A.shape[1]:
        raise ValueError(f"with client_index, A must be (M, r, {x.shape[-1]}) and B (M, {grad_out.shape[-1]}, r); "
                         f"got {tuple(A.shape)}, {tuple(B.shape)}")
    if client_index.dtype != torch.long or client_index.shape != (n,):
        raise ValueError(f"client_index must be a ({n},) long tensor; got {client_index.dtype} "
                         f"{tuple(client_index.shape)}")
    if which not in ("both", "A", "B"):
        raise ValueError(f"which must be 'both', 'A' or 'B'; got {which!r}")
    _same_device(x, A=A, B=B, u=u, client_index=client_index, out_A=out_A, out_B=out_B)
    r, nn_, m = A.shape[1], A.shape[2], B.shape[1]
    dt = ref.acc_dtype(x.dtype)
    _check_out("out_A", out_A, (n, r, nn_), dt)
    _check_out("out_B", out_B, (n, m, r), dt)
    be = _pick(backend, x.device, (x.dtype, grad_out.dtype))
    if be == "triton":   # one launch per factor over ALL samples, factors gathered by client_index
        from . import triton_kernels as tk
        gA, gB, sqA, sqB = tk.lora_per_sample_grads(x, grad_out, A, B, float(scale), n, u, which,
                                                    out_A=out_A, out_B=out_B, client_index=client_index)
        return LoRAPerSampleGrads(gA, gB, sqA, sqB)
    gA, gB = ref.grouped_lora_per_sample_grads(x, grad_out, A, B, float(scale), n, u, which, client_index,
                                               out_A, out_B)
    return LoRAPerSampleGrads(gA, gB, ref.sqnorm(gA, n, x.device, dt), ref.sqnorm(gB, n, x.device, dt))


def linear_per_sample_grads(x: torch.Tensor, grad_out: torch.Tensor, num_samples: int | None = None, *,
                            bias: bool = True, backend: str = "auto", out_weight: torch.Tensor | None = None,
                            out_bias: torch.Tensor | None = None) -> LinearPerSampleGrads:
    """Per-sample gradients of a linear layer y = x W^T + b (e.g. a classifier head).

    x: (R, T, n) or (R, n); grad_out: (R, T, m) or (R, m); R = N * k, sample-major.
    Returns fp32 G_W (N, m, n), G_b (N, m) (None if bias=False) and ||G_W,i||^2 + ||G_b,i||^2 (N,).
    out_weight (N, m, n) / out_bias (N, m): optional output buffers, as out_A in lora_per_sample_grads.
    """
    n_samples = _check_rows(x, grad_out, num_samples)
    _same_device(x, out_weight=out_weight, out_bias=out_bias)
    dt = ref.acc_dtype(x.dtype)
    n, m = x.shape[-1], grad_out.shape[-1]
    _check_out("out_weight", out_weight, (n_samples, m, n), dt)
    _check_out("out_bias", out_bias, (n_samples, m), dt)
    be = _pick(backend, x.device, (x.dtype, grad_out.dtype))
    if be == "triton":
        from . import triton_kernels as tk
        gW, gb, sq = tk.linear_per_sample_grads(x, grad_out, n_samples, bias, out_weight=out_weight,
                                                out_bias=out_bias)
        return LinearPerSampleGrads(gW, gb, sq)
    gW, gb = ref.linear_per_sample_grads(x, grad_out, n_samples, bias, out_weight, out_bias)
    sq = ref.sqnorm(gW, n_samples, x.device, dt)
    if gb is not None:
        sq = sq + ref.sqnorm(gb, n_samples, x.device, dt)
    return LinearPerSampleGrads(gW, gb, sq)


def _check_clip_norm(clip_norm: float) -> float:
    c = float(clip_norm)
    if not (c > 0):   # also rejects NaN
        raise ValueError(f"clip_norm must be > 0 (inf disables clipping); got {clip_norm!r}")
    return c


def clip_factors(sqnorm_total: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Per-sample clip factors c_i = min(1, C / (||g_i|| + 1e-6)) from total squared norms (N,)."""
    if sqnorm_total.dim() != 1:
        raise ValueError(f"sqnorm_total must be 1-D (N,); got shape {tuple(sqnorm_total.shape)}")
    return ref.clip_factors(sqnorm_total, _check_clip_norm(clip_norm))


def gaussian_noise(shapes: Sequence[torch.Size], noise_std: float, generator: torch.Generator | None,
                   device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """One flat N(0, 1) draw for all tensors (concatenated in list order), or None when noise_std == 0.

    Both backends use this, so for the same generator state they add exactly the same noise. The draw
    happens on the generator's device and is moved if needed.
    """
    if noise_std == 0:
        return None
    total = sum(math.prod(s) for s in shapes)
    gen_device = generator.device if generator is not None else device
    z = torch.randn(total, generator=generator, device=gen_device, dtype=dtype)
    return z.to(device)


def _check_per_sample(per_sample: Sequence[torch.Tensor], n: int | None) -> int:
    if len(per_sample) == 0:
        raise ValueError("per_sample must be a non-empty list of (N, ...) tensors")
    n0 = per_sample[0].shape[0] if n is None else n
    for j, g in enumerate(per_sample):
        if g.dim() < 1 or g.shape[0] != n0:
            raise ValueError(f"per_sample[{j}] must have leading dim N={n0}; got shape {tuple(g.shape)}")
        if g.device != per_sample[0].device:
            raise ValueError(f"per_sample[{j}] is on {g.device}, per_sample[0] on {per_sample[0].device}")
        if not g.is_floating_point():
            raise ValueError(f"per_sample[{j}] must be a floating tensor; got dtype {g.dtype}")
    return n0


def _check_noise_std(noise_std: float) -> float:
    s = float(noise_std)
    if not (s >= 0 and math.isfinite(s)):
        raise ValueError(f"noise_std must be finite and >= 0; got {noise_std!r}")
    return s


def clipped_noised_sum(per_sample: Sequence[torch.Tensor], factors: torch.Tensor, noise_std: float,
                       generator: torch.Generator | None = None, *, backend: str = "auto") -> list[torch.Tensor]:
    """For each (N, ...) tensor G in per_sample: sum_i factors[i] * G_i + N(0, noise_std^2), in fp32.

    Noise is one flat draw from `generator` for all tensors (see gaussian_noise). With the triton backend
    all tensors are handled by one kernel launch (zero-copy when they are views of one PerSampleArena).
    """
    n = _check_per_sample(per_sample, None)
    if factors.dim() != 1 or factors.shape[0] != n:
        raise ValueError(f"factors must be (N,) with N={n}; got shape {tuple(factors.shape)}")
    if factors.device != per_sample[0].device:
        raise ValueError(f"factors is on {factors.device} but per_sample on {per_sample[0].device}")
    std = _check_noise_std(noise_std)
    device = per_sample[0].device
    noise = gaussian_noise([g.shape[1:] for g in per_sample], std, generator, device)
    be = _pick(backend, device, [g.dtype for g in per_sample])
    if be == "triton":
        from . import triton_kernels as tk
        out, _ = tk.grouped_clip_sum_noise(per_sample, None, factors, 1.0, noise, std)
        return out
    out = ref.clipped_sum(list(per_sample), factors.to(device))
    return _add_noise(out, noise, std)


def clip_and_noise(per_sample: Sequence[torch.Tensor], sqnorm_total: torch.Tensor, clip_norm: float,
                   noise_std: float, generator: torch.Generator | None = None, *,
                   backend: str = "auto") -> tuple[list[torch.Tensor], torch.Tensor]:
    """clip_factors + clipped_noised_sum in one step (one grouped kernel launch with triton).

    Returns (list of sum_i c_i G_i + noise, factors (N,)).
    """
    n = _check_per_sample(per_sample, None)
    if sqnorm_total.dim() != 1 or sqnorm_total.shape[0] != n:
        raise ValueError(f"sqnorm_total must be (N,) with N={n}; got shape {tuple(sqnorm_total.shape)}")
    if sqnorm_total.device != per_sample[0].device:
        raise ValueError(f"sqnorm_total is on {sqnorm_total.device} but per_sample on {per_sample[0].device}")
    c = _check_clip_norm(clip_norm)
    std = _check_noise_std(noise_std)
    device = per_sample[0].device
    noise = gaussian_noise([g.shape[1:] for g in per_sample], std, generator, device)
    be = _pick(backend, device, [g.dtype for g in per_sample])
    if be == "triton":
        from . import triton_kernels as tk
        return tk.grouped_clip_sum_noise(per_sample, sqnorm_total, None, c, noise, std)
    factors = ref.clip_factors(sqnorm_total, c)
    return _add_noise(ref.clipped_sum(list(per_sample), factors), noise, std), factors


def _add_noise(out: list[torch.Tensor], noise: torch.Tensor | None, std: float) -> list[torch.Tensor]:
    if noise is None:
        return out
    res, off = [], 0
    for t in out:
        k = t.numel()
        res.append(t + std * noise[off:off + k].reshape(t.shape).to(t.dtype))
        off += k
    return res

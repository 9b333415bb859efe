"""Triton kernels for per-sample LoRA / linear gradients and the grouped clip + sum + noise step.

Two kernels do all the work:

* `_per_sample_outer_kernel` computes, for every sample i, P_i = scale * Lᵢᵀ Rᵢ where Lᵢ (L rows × p)
  and Rᵢ (L rows × q) are the sample's rows of two activations, plus the squared Frobenius norm of P_i
  — in one pass over the activations, fp32 accumulation. The grid is (samples × output tiles, T-splits):
  tiles share axis 0 with the samples because axes 1/2 stop at 65,535. LoRA uses it twice: G_A,i =
  v_iᵀ x_i (p = r, q = n) and G_B,iᵀ = s · u_iᵀ g_i (p = r, q = m, written transposed through the output
  strides, so no copy). p <= 8 (ranks 1..8) takes an outer-product path with no padding; larger p uses
  tl.dot with p padded to >= 16 by masked loads (`outer_config` states the rule). With a T-split (long
  sequences, e.g. Swin stage 1 with 3136 tokens per image) each split writes an fp32 partial to a
  workspace and `_reduce_splits_kernel` sums them in a fixed order — no atomics, so results are bitwise
  reproducible. Norm partials per output tile are summed in a fixed order too. Everything that changes
  with the batch size N (split count, workspace stride) is a runtime argument Triton does not specialise
  on, so Poisson batches of any size reuse one compiled kernel.
* `_clip_sum_noise_kernel` is one launch over a flat (N, P_total) per-sample-gradient arena holding every
  module's gradients: each program owns a column block, loops over samples in order, turns the
  per-sample squared norm into c_i = min(1, C / (||g_i|| + 1e-6)) with correctly rounded sqrt and
  division (equal to the torch reference bit for bit; or reads given factors), accumulates
  sum_i c_i G_i and adds noise_std * z (z drawn by torch beforehand, so both backends add the same noise).

Per-sample rows are sample-major: sample i owns rows i*k .. i*k+k-1 of x, so with x contiguous the
sample is one contiguous (k*T, n) slab, addressed with a single per-sample stride.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import triton
import triton.language as tl

from . import reference as ref


# Arguments whose value changes with the batch size N (Poisson sampling draws a new N every step). Triton
# specialises integer arguments on their value (== 1, divisible by 16) and would compile a new variant for
# such changes; these are passed as plain runtime integers instead, so any N reuses the same binary.
OUTER_RUNTIME_ARGS = ("rows_per_split", "n_splits", "sw_s")
REDUCE_RUNTIME_ARGS = ("n_splits", "sw_s")
CLIP_RUNTIME_ARGS = ("N",)


@triton.jit(do_not_specialize=OUTER_RUNTIME_ARGS)
def _per_sample_outer_kernel(
    L_ptr, R_ptr, O_ptr, W_ptr, SQ_ptr,
    rows, P, Q, scale, rows_per_split, n_splits,
    sl_n, sl_t, sl_p, sr_n, sr_t, sr_q,
    so_n, so_p, so_q,
    sw_s, sw_n, sw_p,
    ssq_n,
    BP: tl.constexpr, BQ: tl.constexpr, BT: tl.constexpr,
    USE_DOT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    # grid = (N * n_tiles, n_splits): samples and output tiles share axis 0 (limit 2^31 - 1) because
    # axis 1/2 stop at 65,535, which the tile count of a large linear layer passes.
    n_q_tiles = tl.cdiv(Q, BQ)
    n_tiles = tl.cdiv(P, BP) * n_q_tiles
    pid = tl.program_id(0)
    pid_n = (pid // n_tiles).to(tl.int64)
    pid_tile = pid % n_tiles
    pid_s = tl.program_id(1)
    pid_p = pid_tile // n_q_tiles
    pid_q = pid_tile % n_q_tiles
    offs_p = pid_p * BP + tl.arange(0, BP)
    offs_q = pid_q * BQ + tl.arange(0, BQ)
    offs_t = tl.arange(0, BT)
    mask_p = offs_p < P
    mask_q = offs_q < Q

    l_base = L_ptr + pid_n * sl_n
    r_base = R_ptr + pid_n * sr_n
    t_start = pid_s * rows_per_split
    t_end = tl.minimum(t_start + rows_per_split, rows)
    acc = tl.zeros((BP, BQ), dtype=tl.float32)
    for t0 in range(t_start, t_end, BT):
        t = t0 + offs_t
        mask_t = t < t_end
        t64 = t.to(tl.int64)   # row * row-stride passes 2^31 inside one large sample
        lt = tl.load(l_base + t64[:, None] * sl_t + offs_p[None, :] * sl_p,
                     mask=mask_t[:, None] & mask_p[None, :], other=0.0)
        rt = tl.load(r_base + t64[:, None] * sr_t + offs_q[None, :] * sr_q,
                     mask=mask_t[:, None] & mask_q[None, :], other=0.0)
        if USE_DOT:
            if UPCAST:   # mixed dtypes, or bf16 under the CPU interpreter (numpy has no bf16 dot)
                lt = lt.to(tl.float32)
                rt = rt.to(tl.float32)
            else:
                lt = lt.to(rt.dtype)
            if IEEE:
                acc = tl.dot(tl.trans(lt), rt, acc, input_precision="ieee")
            else:
                acc = tl.dot(tl.trans(lt), rt, acc)
        else:
            # tiny P (LoRA rank 1..8): fp32 outer products on the CUDA cores; tl.dot would need P
            # padded to 16, i.e. up to 16x the useful work. BT * BP * BQ stays <= 8192 (registers).
            prod = lt.to(tl.float32)[:, :, None] * rt.to(tl.float32)[:, None, :]
            acc += tl.sum(prod, axis=0)

    mask_pq = mask_p[:, None] & mask_q[None, :]
    if n_splits == 1:
        acc = acc * scale
        tl.store(O_ptr + pid_n * so_n + offs_p[:, None] * so_p + offs_q[None, :] * so_q, acc, mask=mask_pq)
        # padded rows/cols are exact zeros (masked loads), so they add nothing to the norm
        tl.store(SQ_ptr + pid_n * ssq_n + pid_tile, tl.sum(tl.sum(acc * acc, axis=1), axis=0))
    else:
        # workspace is (n_splits, N, P, Q) contiguous fp32: unscaled partials, reduced in fixed order later
        w = W_ptr + pid_s.to(tl.int64) * sw_s + pid_n * sw_n + offs_p[:, None] * sw_p + offs_q[None, :]
        tl.store(w, acc, mask=mask_pq)


@triton.jit(do_not_specialize=REDUCE_RUNTIME_ARGS)
def _reduce_splits_kernel(
    W_ptr, O_ptr, SQ_ptr, P, Q, scale, n_splits,
    sw_s, sw_n, sw_p, so_n, so_p, so_q, ssq_n,
    BP: tl.constexpr, BQ: tl.constexpr,
):
    n_q_tiles = tl.cdiv(Q, BQ)
    n_tiles = tl.cdiv(P, BP) * n_q_tiles
    pid = tl.program_id(0)
    pid_n = (pid // n_tiles).to(tl.int64)
    pid_tile = pid % n_tiles
    offs_p = (pid_tile // n_q_tiles) * BP + tl.arange(0, BP)
    offs_q = (pid_tile % n_q_tiles) * BQ + tl.arange(0, BQ)
    mask = (offs_p < P)[:, None] & (offs_q < Q)[None, :]
    acc = tl.zeros((BP, BQ), dtype=tl.float32)
    w = W_ptr + pid_n * sw_n + offs_p[:, None] * sw_p + offs_q[None, :]
    for _ in range(0, n_splits):   # fixed order -> deterministic
        acc += tl.load(w, mask=mask, other=0.0)
        w += sw_s                  # 64-bit pointer step: no int32 product split * stride
    acc = acc * scale
    tl.store(O_ptr + pid_n * so_n + offs_p[:, None] * so_p + offs_q[None, :] * so_q, acc, mask=mask)
    tl.store(SQ_ptr + pid_n * ssq_n + pid_tile, tl.sum(tl.sum(acc * acc, axis=1), axis=0))


@triton.jit(do_not_specialize=CLIP_RUNTIME_ARGS)
def _clip_sum_noise_kernel(
    G_ptr, SQ_ptr, F_ptr, Z_ptr, OUT_ptr, FOUT_ptr,
    N, P, sg_n, clip_norm, noise_std,
    HAS_FACTORS: tl.constexpr, HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    g_ptrs = G_ptr + offs
    for i in range(0, N):          # fixed sample order -> deterministic
        if HAS_FACTORS:
            c = tl.load(F_ptr + i).to(tl.float32)
        else:
            sq = tl.load(SQ_ptr + i).to(tl.float32)
            # correctly rounded sqrt and division (tl.sqrt and / compile to approximate PTX): the
            # factors then equal torch's reference bit for bit
            c = tl.minimum(tl.div_rn(clip_norm, tl.sqrt_rn(sq) + 1e-6), 1.0,
                           propagate_nan=tl.PropagateNan.ALL)   # a NaN norm stays NaN, as in torch
            if pid == 0:
                tl.store(FOUT_ptr + i, c)
        g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
        acc += c * g
        g_ptrs += sg_n             # pointer arithmetic is 64-bit: no int32 overflow for large N * P
    if HAS_NOISE:
        acc += noise_std * tl.load(Z_ptr + offs, mask=mask, other=0.0)
    tl.store(OUT_ptr + offs, acc, mask=mask)


# names used by launch_configs (and the compile test) for the kernels above
KERNELS = {"outer": _per_sample_outer_kernel, "reduce": _reduce_splits_kernel, "clip": _clip_sum_noise_kernel}
# pointer arguments of each kernel; those not listed in a config's dtypes are fp32
POINTER_ARGS = {"outer": ("L_ptr", "R_ptr", "O_ptr", "W_ptr", "SQ_ptr"),
                "reduce": ("W_ptr", "O_ptr", "SQ_ptr"),
                "clip": ("G_ptr", "SQ_ptr", "F_ptr", "Z_ptr", "OUT_ptr", "FOUT_ptr")}
FLOAT_ARGS = ("scale", "clip_norm", "noise_std")


# ----------------------------------------------------------------------------------------------------
# Launchers

# Tests set this to True: every buffer a kernel must fill is then allocated full of NaN, so an element
# the kernel forgets to write shows up as NaN instead of as plausible leftover memory.
POISON_OUTPUTS = False


def _empty(shape, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), device=device, dtype=torch.float32)
    return torch.empty(shape, device=device, dtype=torch.float32)


def _pow2_at_least(x: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(max(1, x)))


def _is_interpreter(device: torch.device) -> bool:
    from ._backend import interpreter_enabled
    return device.type != "cuda" or interpreter_enabled()


@functools.lru_cache(maxsize=None)
def _num_sms_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _num_sms_of(device.index if device.index is not None else torch.cuda.current_device())
    return 1


def _on_device(device: torch.device):
    """Launch on the tensors' GPU, not on whatever device is current (Triton launches on the current
    device and its stream)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# Smallest tile side tl.dot accepts (M, N, K >= 16 on NVIDIA).
DOT_MIN = 16
# Largest P that takes the outer-product (no tl.dot) path. For P <= 8 a 16-row dot tile would be at
# least half padding (r = 1: 15/16); the outer product does exactly the useful FMAs.
FMA_MAX_P = 8
# Register budget of the outer-product path: BT * BP * BQ fp32 products live at once (64 per thread
# at 4 warps).
FMA_TILE_ELEMS = 8192
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def outer_config(P: int, Q: int, left_dtype: torch.dtype, right_dtype: torch.dtype,
                 interpreter: bool, use_dot: bool | None = None) -> dict:
    """Compile-time constants of `_per_sample_outer_kernel` for a (·, P)ᵀ(·, Q) per-sample product.
    The launcher and the ahead-of-time compile test both use this (one source for every configuration).

    Rule: P <= FMA_MAX_P (LoRA ranks 1..8, small heads) -> outer products, BP = next pow2 of P, no
    padding to 16; otherwise tl.dot with BP = next pow2 >= 16 (<= 64, more tiles beyond). BQ = 64
    when Q > 32, else the next pow2 >= 16. fp32 operands use IEEE fp32 dot (no TF32 rounding of
    gradients); operands of different dtypes are both upcast to fp32 (never round the wider one down).
    `use_dot` forces the path (tests and the GPU benchmark compare both).
    """
    use_dot = P > FMA_MAX_P if use_dot is None else use_dot
    BQ = 64 if Q > 32 else _pow2_at_least(Q, DOT_MIN)
    if use_dot:
        BP = _pow2_at_least(P, DOT_MIN) if P <= 64 else 64
        BT = 32 if interpreter else 64
    else:
        BP = min(_pow2_at_least(P, 1), FMA_MAX_P)
        BT = max(DOT_MIN, min(128, FMA_TILE_ELEMS // (BP * BQ)))
    upcast = use_dot and (left_dtype != right_dtype or
                          (interpreter and torch.bfloat16 in (left_dtype, right_dtype)))
    ieee = use_dot and (torch.float32 in (left_dtype, right_dtype) or upcast)
    return dict(BP=BP, BQ=BQ, BT=BT, USE_DOT=use_dot, IEEE=ieee, UPCAST=upcast)


# P and Q values that reach every branch of outer_config (FMA BP = 1, 2, 4, 8; dot BP = 16, 32, 64;
# BQ = 16, 32, 64).
CONFIG_P = (1, 2, 4, 8, 16, 32, 64, 128)
CONFIG_Q = (16, 32, 64)
CLIP_BLOCK_GPU = 1024
CLIP_BLOCK_INTERPRETER = 2048   # fewer, wider programs under the interpreter


def clip_config(has_factors: bool, has_noise: bool, interpreter: bool) -> dict:
    return dict(HAS_FACTORS=has_factors, HAS_NOISE=has_noise,
                BLOCK=CLIP_BLOCK_INTERPRETER if interpreter else CLIP_BLOCK_GPU)


def launch_configs() -> list[tuple[str, dict, dict]]:
    """Every (kernel name, pointer dtypes, constexprs) the launchers can produce on a GPU, derived from
    outer_config / clip_config (used by the ahead-of-time compile test)."""
    out, seen = [], set()
    for ld in DTYPES:
        for rd in DTYPES:
            for P in CONFIG_P:
                for Q in CONFIG_Q:
                    c = outer_config(P, Q, ld, rd, interpreter=False)
                    key = (ld, rd, tuple(sorted(c.items())))
                    if key not in seen:
                        seen.add(key)
                        out.append(("outer", {"L_ptr": ld, "R_ptr": rd}, c))
    for BP, BQ in sorted({(c["BP"], c["BQ"]) for name, _, c in out}):
        out.append(("reduce", {}, dict(BP=BP, BQ=BQ)))
    for hf in (False, True):
        for hn in (False, True):
            out.append(("clip", {}, clip_config(hf, hn, interpreter=False)))
    return out


def choose_split(N: int, rows: int, n_tiles: int, BT: int, num_sms: int) -> int:
    """Number of T-chunks: enough programs to fill the GPU (~4 per SM) while each chunk keeps >= 4
    BT-blocks of rows. Rounded down to a power of two so the workspace shapes seen over many Poisson
    batch sizes stay few (the kernels themselves take it as a runtime argument: no recompilation)."""
    want = triton.cdiv(4 * num_sms, max(1, N * n_tiles))
    split = max(1, min(want, triton.cdiv(rows, 4 * BT), 65535))
    return 1 << (split.bit_length() - 1)


def per_sample_outer(left: torch.Tensor, right: torch.Tensor, out: torch.Tensor, scale: float,
                     split: int | None = None, use_dot: bool | None = None) -> torch.Tensor:
    """out[i] = scale * left[i]ᵀ right[i] for left (N, L, p), right (N, L, q); out is a (N, p, q)
    strided view (a transposed view is fine). Returns squared norms (N,) fp32.

    `split` = number of T-chunks (None: choose_split; tests force values). `use_dot` overrides the
    outer-product / tl.dot choice of outer_config (tests and the GPU benchmark compare both)."""
    N, rows, P = left.shape
    Q = right.shape[2]
    dev = left.device
    if N == 0:
        return torch.zeros(0, device=dev, dtype=torch.float32)
    interp = _is_interpreter(dev)
    cfg = outer_config(P, Q, left.dtype, right.dtype, interp, use_dot)
    BP, BQ, BT = cfg["BP"], cfg["BQ"], cfg["BT"]
    n_tiles = triton.cdiv(P, BP) * triton.cdiv(Q, BQ)
    if split is None:
        split = choose_split(N, rows, n_tiles, BT, _num_sms(dev))
    split = max(1, min(split, max(1, rows), 65535))
    rows_per_split = triton.cdiv(max(rows, 1), split)
    split = triton.cdiv(max(rows, 1), rows_per_split)
    sq = _empty((N, n_tiles), dev)
    if split > 1:
        work = _empty((split, N, P, Q), dev)
        ws = work.stride()
    else:
        work, ws = out, (0, 0, 0)   # unused
    with _on_device(dev):
        _per_sample_outer_kernel[(N * n_tiles, split)](
            left, right, out, work, sq,
            rows, P, Q, float(scale), rows_per_split, split,
            left.stride(0), left.stride(1), left.stride(2),
            right.stride(0), right.stride(1), right.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            ws[0], ws[1], ws[2], sq.stride(0),
            **cfg,
        )
        if split > 1:
            _reduce_splits_kernel[(N * n_tiles,)](
                work, out, sq, P, Q, float(scale), split,
                ws[0], ws[1], ws[2], out.stride(0), out.stride(1), out.stride(2), sq.stride(0),
                BP=BP, BQ=BQ,
            )
    return sq.sum(dim=1)   # fixed-shape torch reduction: deterministic


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if x.dtype == torch.float64:
        raise ValueError("the triton backend does not take float64 inputs (x); use backend='torch'")
    return x.dtype


def lora_per_sample_grads(x, grad_out, A, B, scale, num_samples, u=None, which="both", split=None,
                          out_A=None, out_B=None, gB_prod=None, client_index=None):
    """Triton path of api.lora_per_sample_grads (inputs already validated). out_A (N, r, n) / out_B
    (N, m, r) may be given as fp32 views into a per-sample-gradient arena; gB_prod = grad_out @ B
    (unscaled) when the caller already has it (the autograd backward computes it for the input grad).

    client_index (N,) long: client-grouped mode, A (M, r, n) and B (M, m, r) are client stacks. Each
    sample's factors are gathered once on the device (index_select: no host synchronisation, no loop
    over clients), v_i = g_i B_c(i) and u_i = x_i A_c(i)^T are two batched matmuls, and the kernel then
    runs ONCE over all samples per factor, exactly as in the ungrouped case: its operands are already
    per sample, so nothing in it depends on the client."""
    _compute_dtype(x)
    _compute_dtype(grad_out)
    N = num_samples
    r, n = A.shape[-2:]
    m = B.shape[-2]
    xs = ref.per_sample_view(x.contiguous(), N) if N else x.reshape(0, 1, n)
    gs = ref.per_sample_view(grad_out.contiguous(), N) if N else grad_out.reshape(0, 1, m)
    dev = x.device
    gA = gB = sqA = sqB = None
    if which in ("both", "A"):
        if gB_prod is not None:
            v = ref.per_sample_view(gB_prod.contiguous(), N) if N else gB_prod.reshape(0, 1, r)
        elif client_index is not None:
            v = torch.bmm(gs, B.to(gs.dtype).index_select(0, client_index))   # (N, L, r)
        else:
            v = gs @ B.to(gs.dtype)                                  # (N, L, r); scale applied in-kernel
        gA = out_A if out_A is not None else _empty((N, r, n), dev)
        sqA = per_sample_outer(v, xs, gA, scale, split)
    if which in ("both", "B"):
        if u is not None:
            us = ref.per_sample_view(u.contiguous(), N) if N else u.reshape(0, 1, r)
        elif client_index is not None:
            us = torch.bmm(xs, A.to(xs.dtype).index_select(0, client_index).transpose(1, 2))
        else:
            us = xs @ A.to(xs.dtype).T
        gB = out_B if out_B is not None else _empty((N, m, r), dev)
        sqB = per_sample_outer(us, gs, gB.transpose(1, 2), scale, split)   # G_Bᵀ = s uᵀ g
    zeros = None if sqA is not None and sqB is not None else torch.zeros(N, device=dev, dtype=torch.float32)
    return gA, gB, zeros if sqA is None else sqA, zeros if sqB is None else sqB


def linear_per_sample_grads(x, grad_out, num_samples, bias=True, split=None, out_weight=None, out_bias=None):
    """Triton path of api.linear_per_sample_grads: G_W,i = g_iᵀ x_i via the same kernel (p = m);
    out_weight / out_bias: optional buffers written in place (arena views)."""
    _compute_dtype(x)
    N = num_samples
    n, m = x.shape[-1], grad_out.shape[-1]
    xs = ref.per_sample_view(x.contiguous(), N) if N else x.reshape(0, 1, n)
    gs = ref.per_sample_view(grad_out.contiguous(), N) if N else grad_out.reshape(0, 1, m)
    gW = out_weight if out_weight is not None else _empty((N, m, n), x.device)
    sq = per_sample_outer(gs, xs, gW, 1.0, split)
    gb = None
    if bias:
        gb = torch.sum(gs, dim=1, dtype=torch.float32, out=out_bias)
        sq = sq + gb.pow(2).sum(dim=1)
    return gW, gb, sq


def _as_arena(per_sample) -> torch.Tensor | None:
    """If the tensors are consecutive column blocks of one (N, P) fp32 arena (see PerSampleArena),
    return the arena; else None."""
    base = per_sample[0]._base
    if base is None or base.dim() != 2 or not base.is_contiguous() or base.dtype != torch.float32:
        return None
    N, P = base.shape
    off = 0
    for g in per_sample:
        if g._base is not base or g.shape[0] != N:
            return None
        k = math.prod(g.shape[1:])
        if g.storage_offset() != base.storage_offset() + off or (N > 1 and g.stride(0) != P):
            return None
        # the non-batch part must be dense row-major inside the block
        expected, step = [], 1
        for d in reversed(g.shape[1:]):
            expected.append(step)
            step *= d
        if any(d > 1 and s != e for d, s, e in zip(g.shape[1:], g.stride()[1:], reversed(expected))):
            return None
        off += k
    return base if off == P else None


def grouped_clip_sum_noise(per_sample, sqnorm_total, factors, clip_norm, noise, noise_std):
    """One launch: sum_i c_i G_i + noise_std * z over all tensors. Either factors (N,) or sqnorm_total
    (N,) (then c_i = min(1, C/(||g_i||+1e-6)) computed in-kernel) is given. Returns (list, factors)."""
    arena = _as_arena(per_sample)
    N = per_sample[0].shape[0]
    dev = per_sample[0].device
    if arena is None:
        arena = torch.cat([g.reshape(N, -1).float() for g in per_sample], dim=1) if N else \
            torch.zeros((0, sum(math.prod(g.shape[1:]) for g in per_sample)), device=dev)
    P = arena.shape[1]
    out = _empty((P,), dev)
    has_factors = factors is not None
    f_in = factors.to(device=dev, dtype=torch.float32).contiguous() if has_factors else out
    sq_in = sqnorm_total.to(device=dev, dtype=torch.float32).contiguous() if not has_factors else out
    f_out = _empty((N,), dev) if not has_factors else f_in
    z = noise if noise is not None else out
    cfg = clip_config(has_factors, noise is not None, _is_interpreter(dev))
    if P > 0:
        with _on_device(dev):
            _clip_sum_noise_kernel[(triton.cdiv(P, cfg["BLOCK"]),)](
                arena, sq_in, f_in, z, out, f_out, N, P, max(arena.stride(0), 1), float(clip_norm),
                float(noise_std), **cfg,
            )
    elif not has_factors:
        f_out = ref.clip_factors(sq_in, clip_norm).float()
    res, off = [], 0
    for g in per_sample:
        k = math.prod(g.shape[1:])
        res.append(out[off:off + k].view(g.shape[1:]))
        off += k
    return res, f_out

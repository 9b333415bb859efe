"""Per-sample gradient kernels: Triton (interpreter on CPU) vs torch reference vs a float64 loop.

Tolerances, as max |error| / max |float64 reference| per tensor (norms: relative error):
  fp32: 1e-5   (both backends accumulate in fp32)
  fp16: 5e-3   (Triton forms v = g B and u = x Aᵀ in fp16: 2^-11 rounding, then fp32 accumulation)
  bf16: 3e-2   (same with bf16's 2^-8 rounding)
The torch backend always works in fp32 from the (rounded) inputs, so it is held to 1e-5 for all dtypes.
"""

import pytest
import torch

import dplora_kernels as dk
from dplora_ref_loops import linear_loop, lora_loop, sq

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _close(got, want, tol, name):
    got = got.double().cpu()
    scale = want.abs().max().item() if want.numel() else 1.0
    assert not torch.isnan(got).any(), f"{name}: NaN (an element the kernel never wrote?)"
    err = (got - want).abs().max().item() / max(scale, 1e-30) if want.numel() else 0.0
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol}"


def _data(N, k, T, n, m, r, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape_x = (N * k, T, n) if T is not None else (N * k, n)
    shape_g = shape_x[:-1] + (m,)
    x = torch.randn(shape_x, generator=gen).to(device, dtype)
    g = torch.randn(shape_g, generator=gen).to(device, dtype)
    A = (torch.randn(r, n, generator=gen) / n ** 0.5).to(device, dtype)
    B = torch.randn(m, r, generator=gen).to(device, dtype)
    return x, g, A, B


# (N, k rows per sample, T (None = 2-D input), n, m, r, split)
SHAPES = [
    (3, 1, 1, 16, 16, 1, None),     # T = 1, r = 1
    (2, 1, 3, 1, 5, 1, None),       # n = 1 (one input feature), r = 1
    (2, 1, 37, 20, 12, 4, None),    # T not a multiple of the block, d not a multiple of 16
    (1, 1, 70, 24, 40, 8, 3),       # N = 1, forced T-split (3 partials reduced in order)
    (2, 3, 5, 33, 17, 16, 2),       # k = 3 rows per sample (Swin windows), split over k*T
    (2, 1, 9, 72, 65, 64, None),    # r = 64, n/m > one 64-wide tile and not multiples of 16
    (4, 2, None, 30, 10, 8, None),  # 2-D input (R, n), two rows per sample
    (0, 1, 7, 16, 16, 4, None),     # empty batch
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}k{}T{}n{}m{}r{}s{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_lora_triton_vs_reference_vs_loop(shape, dtype, device, poisoned):
    from dplora_kernels import triton_kernels as tk
    N, k, T, n, m, r, split = shape
    x, g, A, B = _data(N, k, T, n, m, r, dtype, device)
    s = 0.75
    wA, wB = lora_loop(x.cpu(), g.cpu(), A.cpu(), B.cpu(), s, N)
    # outputs given as NaN-filled buffers: every element must be overwritten
    out_A = torch.full((N, r, n), float("nan"), device=device)
    out_B = torch.full((N, m, r), float("nan"), device=device)
    gA, gB, sqA, sqB = tk.lora_per_sample_grads(x, g, A, B, s, N, None, "both", split, out_A, out_B)
    assert gA.data_ptr() == out_A.data_ptr() and gB.data_ptr() == out_B.data_ptr()
    tol = TOL[dtype]
    _close(gA, wA, tol, "grad_A")
    _close(gB, wB, tol, "grad_B")
    _close(sqA, sq(wA), tol, "sqnorm_A")
    _close(sqB, sq(wB), tol, "sqnorm_B")
    ref = dk.lora_per_sample_grads(x, g, A, B, s, N, backend="torch")
    for got, want, name in zip(ref, (wA, wB, sq(wA), sq(wB)), ("ref_A", "ref_B", "ref_sqA", "ref_sqB")):
        assert got.dtype == torch.float32
        _close(got, want, 1e-5, name)
    pub = dk.lora_per_sample_grads(x, g, A, B, s, N, backend="triton")   # public entry, own buffers
    _close(pub.grad_A, wA, tol, "public grad_A")
    _close(pub.sqnorm_B, sq(wB), tol, "public sqnorm_B")


@pytest.mark.parametrize("which", ["A", "B"])
def test_lora_single_factor(which, device, poisoned):
    x, g, A, B = _data(2, 1, 9, 20, 12, 4, torch.float32, device)
    wA, wB = lora_loop(x.cpu(), g.cpu(), A.cpu(), B.cpu(), 2.0, 2)
    for backend in ("torch", "triton"):
        res = dk.lora_per_sample_grads(x, g, A, B, 2.0, 2, backend=backend, which=which)
        if which == "A":
            assert res.grad_B is None and torch.all(res.sqnorm_B == 0)
            _close(res.grad_A, wA, 1e-5, f"{backend} A")
        else:
            assert res.grad_A is None and torch.all(res.sqnorm_A == 0)
            _close(res.grad_B, wB, 1e-5, f"{backend} B")


def test_lora_given_u_is_used(device):
    """u is trusted as x Aᵀ (saved by the forward): a wrong u must change G_B, proving it is read."""
    x, g, A, B = _data(2, 1, 5, 16, 16, 4, torch.float32, device)
    u = x @ A.T
    for backend in ("torch", "triton"):
        a = dk.lora_per_sample_grads(x, g, A, B, 1.0, 2, u=u, backend=backend)
        b = dk.lora_per_sample_grads(x, g, A, B, 1.0, 2, u=2 * u, backend=backend)
        torch.testing.assert_close(b.grad_B, 2 * a.grad_B, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 1, 1, 20, 5), (2, 2, 37, 24, 70), (1, 1, None, 16, 3), (0, 1, 4, 8, 3)],
                         ids=lambda s: "N{}k{}T{}n{}m{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_triton_vs_reference_vs_loop(shape, dtype, bias, device, poisoned):
    N, k, T, n, m = shape
    x, g, _, _ = _data(N, k, T, n, m, 1, dtype, device)
    wW, wb = linear_loop(x.cpu(), g.cpu(), N) if N else (torch.zeros(0, m, n).double(), torch.zeros(0, m).double())
    want_sq = sq(wW) + (sq(wb) if bias else 0)
    for backend in ("torch", "triton"):
        res = dk.linear_per_sample_grads(x, g, N, bias=bias, backend=backend)
        tol = 1e-5 if (backend == "torch" or dtype == torch.float32) else TOL[dtype]
        _close(res.grad_weight, wW, tol, f"{backend} grad_weight")
        _close(res.sqnorm, want_sq, tol, f"{backend} sqnorm")
        if bias:
            _close(res.grad_bias, wb, 1e-5, f"{backend} grad_bias")
        else:
            assert res.grad_bias is None


def test_per_sample_kernel_deterministic(device):
    """Two runs (with a T-split, whose partials are reduced in a fixed order) are bitwise equal."""
    from dplora_kernels import triton_kernels as tk
    x, g, A, B = _data(2, 2, 40, 24, 20, 8, torch.float32, device)
    a = tk.lora_per_sample_grads(x, g, A, B, 0.5, 2, split=3)
    b = tk.lora_per_sample_grads(x, g, A, B, 0.5, 2, split=3)
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_split_does_not_change_result(device):
    from dplora_kernels import triton_kernels as tk
    x, g, A, B = _data(1, 1, 100, 16, 16, 4, torch.float32, device)
    one = tk.lora_per_sample_grads(x, g, A, B, 1.0, 1, split=1)
    four = tk.lora_per_sample_grads(x, g, A, B, 1.0, 1, split=4)
    for p, q in zip(one, four):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, field", [
    (dict(num_samples=4), "num_samples"),        # 4 does not divide R = 6
    (dict(num_samples=-1), "num_samples"),
    (dict(A=torch.zeros(2, 5)), "A must"),
    (dict(B=torch.zeros(3, 3)), "B must"),
    (dict(grad_out=torch.zeros(6, 4, 3)), "grad_out"),
    (dict(u=torch.zeros(6, 5, 3)), "u must"),
    (dict(backend="cuda"), "backend"),
    (dict(which="C"), "which"),
    (dict(A=torch.zeros(2, 7, device="meta")), "A is on meta"),           # two devices: named argument
    (dict(u=torch.zeros(6, 5, 2, device="meta")), "u is on meta"),
    (dict(grad_out=torch.zeros(6, 5, 3, device="meta")), "grad_out is on meta"),
])
def test_lora_bad_input_names_field(bad, field):
    args = dict(x=torch.zeros(6, 5, 7), grad_out=torch.zeros(6, 5, 3), A=torch.zeros(2, 7),
                B=torch.zeros(3, 2), scale=1.0, num_samples=3)
    args.update(bad)
    with pytest.raises(ValueError, match=field):
        dk.lora_per_sample_grads(**args)


def test_float64_triton_refused(device):
    x = torch.zeros(2, 3, 16, dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match="float64"):
        dk.lora_per_sample_grads(x, x, torch.zeros(2, 16, dtype=torch.float64, device=device),
                                 torch.zeros(16, 2, dtype=torch.float64, device=device), 1.0, backend="triton")


def test_triton_without_interpreter_or_gpu_fails_early(monkeypatch):
    """backend="triton" that cannot run is refused when resolved (engine construction), with one line
    naming the backend: CPU tensors without the interpreter, or no device at all, or an unknown device."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' on CPU tensors needs TRITON_INTERPRET=1"):
        dk.resolve_backend("triton", "cpu")
    with pytest.raises(ValueError, match="backend='triton'"):
        dk.lora_per_sample_grads(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), torch.zeros(1, 4),
                                 torch.zeros(5, 1), 1.0, backend="triton")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA GPU or TRITON_INTERPRET=1"):
            dk.resolve_backend("triton")
    with pytest.raises(ValueError, match="got device"):
        dk.resolve_backend("triton", "meta")
    assert dk.resolve_backend("torch", "cpu") == "torch"


def test_backend_resolution():
    assert "torch" in dk.available_backends()
    assert dk.resolve_backend("torch") == "torch"
    assert dk.resolve_backend("auto", "cpu") == "torch"   # the interpreter is never chosen automatically
    with pytest.raises(ValueError, match="backend"):
        dk.resolve_backend("cudnn")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gpu_large_shapes(dtype, poisoned):
    """Swin stage-1-like segment (k*T = 3136 rows per image) and RoBERTa-like shapes on a real GPU."""
    from dplora_kernels import triton_kernels as tk
    for N, k, T, n, m, r in [(4, 64, 49, 128, 384, 16), (8, 1, 128, 768, 768, 8)]:
        x, g, A, B = _data(N, k, T, n, m, r, dtype, "cuda")
        wA, wB = lora_loop(x.cpu(), g.cpu(), A.cpu(), B.cpu(), 0.5, N)
        gA, gB, sqA, sqB = tk.lora_per_sample_grads(x, g, A, B, 0.5, N)
        assert dk.resolve_backend("auto", x.device) == "triton"
        _close(gA, wA, TOL[dtype], "gpu grad_A")
        _close(gB, wB, TOL[dtype], "gpu grad_B")
        _close(sqA + sqB, sq(wA) + sq(wB), TOL[dtype], "gpu sqnorm")


def test_mixed_dtypes_and_float64_auto(device):
    """x in fp32 with grad_out in bf16 (autocast backward) works on both paths; float64 under "auto"
    stays on the torch path (exact), while an explicit triton request is refused above."""
    x, g, A, B = _data(2, 1, 9, 20, 12, 4, torch.float32, device)
    wA, wB = lora_loop(x.cpu(), g.bfloat16().cpu(), A.cpu(), B.cpu(), 1.0, 2)
    for backend in ("torch", "triton"):
        res = dk.lora_per_sample_grads(x, g.bfloat16(), A, B, 1.0, 2, backend=backend)
        _close(res.grad_A, wA, TOL[torch.bfloat16], f"{backend} mixed A")
        _close(res.grad_B, wB, 1e-5, f"{backend} mixed B")    # u = x Aᵀ in fp32, g read exactly
    res = dk.lora_per_sample_grads(x.double(), g.double(), A.double(), B.double(), 1.0, 2, backend="auto")
    assert res.grad_A.dtype == torch.float64


class _LaunchRecorder:
    """Stands in for a Triton kernel: records each launch's arguments, then launches the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((args, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


def _triton_cache_keys(kernel, calls):
    """The part of Triton's kernel-cache key that depends on the launch arguments (argument types,
    value/alignment specialisations, constexprs), computed with Triton's own binder for an sm_90 target
    (no driver needed). One distinct key = one compilation."""
    import triton
    from aot_compile import as_jit
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime import jit as tjit
    if not hasattr(tjit, "create_function_from_signature"):
        pytest.skip("this triton has no create_function_from_signature (binder API changed)")
    fn = as_jit(kernel)
    try:
        binder = tjit.create_function_from_signature(fn.signature, fn.params,
                                                     make_backend(GPUTarget("cuda", 90, 32)))
        return {str(binder(*args, **kwargs)[1]) for args, kwargs in calls}
    except (TypeError, AttributeError) as e:   # the binder is internal API (written against triton 3.8)
        pytest.skip(f"triton {triton.__version__}: binder API differs ({e}); gpu_check counts real compiles")


def test_varying_batch_size_does_not_recompile(monkeypatch, device):
    """Poisson sampling changes N every step: over N = 1..5 (which also changes the T-split: 2 chunks
    for N <= 2, 1 beyond, with one interpreter "SM") the per-sample kernel, the split reduction and the clip kernel each keep ONE cache key,
    i.e. compile once. Positive control: a different dtype does give a new key."""
    from dplora_kernels import triton_kernels as tk
    rec = {name: _LaunchRecorder(getattr(tk, name)) for name in
           ("_per_sample_outer_kernel", "_reduce_splits_kernel", "_clip_sum_noise_kernel")}
    for name, r in rec.items():
        monkeypatch.setattr(tk, name, r)
    splits, first = set(), {}
    for N in range(1, 6):
        x, g, A, B = _data(N, 1, 300, 16, 16, 16, torch.float32, device, seed=N)
        res = dk.lora_per_sample_grads(x, g, A, B, 1.0, N, backend="triton")
        dk.clip_and_noise([res.grad_A, res.grad_B], res.sqnorm_A + res.sqnorm_B, 1.0, 0.5,
                          torch.Generator(device=device).manual_seed(N), backend="triton")
        splits.add(rec["_per_sample_outer_kernel"].calls[-1][0][10])      # n_splits argument
        if N == 1:
            first = {name: _triton_cache_keys(r.kernel, r.calls) for name, r in rec.items()}
    assert len(splits) >= 2, splits           # the split really varied with N
    for name, r in rec.items():
        # (G_A and the transposed G_Bᵀ output legitimately differ in stride specialisation: 2 keys
        # for the per-sample kernel at any N; what matters is that no N adds one)
        keys = _triton_cache_keys(r.kernel, r.calls)
        assert len(r.calls) >= 4 and keys == first[name], \
            f"{name}: {len(keys)} compilations over N = 1..5, {len(first[name])} at N = 1"
    x, g, A, B = _data(3, 1, 300, 16, 16, 16, torch.float16, device)
    dk.lora_per_sample_grads(x, g, A, B, 1.0, 3, backend="triton")
    outer = rec["_per_sample_outer_kernel"]
    assert len(_triton_cache_keys(outer.kernel, outer.calls)) == len(first["_per_sample_outer_kernel"]) + 2


@pytest.mark.parametrize("r", [1, 3, 8])
def test_small_rank_outer_product_path_matches_dot_path(r, device, poisoned):
    """Ranks 1..8 take the outer-product path (no padding to 16, see outer_config); forcing tl.dot on the
    same data gives the same gradients (fp32: 1e-5), and the two paths really are different code."""
    from dplora_kernels import triton_kernels as tk
    assert not tk.outer_config(r, 40, torch.float32, torch.float32, True)["USE_DOT"]
    assert tk.outer_config(16, 40, torch.float32, torch.float32, True)["USE_DOT"]
    x, g, A, B = _data(3, 1, 21, 40, 24, r, torch.float32, device)
    v = ref_v = g @ B
    out_fma = torch.full((3, r, 40), float("nan"), device=device)
    out_dot = torch.full((3, r, 40), float("nan"), device=device)
    sq_fma = tk.per_sample_outer(v.reshape(3, 21, r), x.reshape(3, 21, 40), out_fma, 0.5, use_dot=False)
    sq_dot = tk.per_sample_outer(ref_v.reshape(3, 21, r), x.reshape(3, 21, 40), out_dot, 0.5, use_dot=True)
    wA, _ = lora_loop(x.cpu(), g.cpu(), A.cpu(), B.cpu(), 0.5, 3)
    _close(out_fma, wA, 1e-5, "outer-product path")
    _close(out_dot, wA, 1e-5, "dot path")
    _close(sq_fma, sq(wA), 1e-5, "outer-product sqnorm")
    _close(sq_dot, sq(wA), 1e-5, "dot sqnorm")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_public_out_buffers_are_written(backend, device, poisoned):
    """out_A / out_B / out_weight / out_bias: the gradients land in the caller's buffers (here strided
    column blocks of one (N, P) arena, NaN-filled so an unwritten element shows) and are returned."""
    N, T, n, m, r = 3, 5, 12, 10, 4
    x, g, A, B = _data(N, 1, T, n, m, r, torch.float32, device)
    arena = torch.full((N, r * n + m * r + m * n + m), float("nan"), device=device)
    oA = arena[:, :r * n].view(N, r, n)
    oB = arena[:, r * n:r * n + m * r].view(N, m, r)
    oW = arena[:, r * n + m * r:r * n + m * r + m * n].view(N, m, n)
    ob = arena[:, r * n + m * r + m * n:]
    res = dk.lora_per_sample_grads(x, g, A, B, 0.5, N, backend=backend, out_A=oA, out_B=oB)
    assert res.grad_A.data_ptr() == oA.data_ptr() and res.grad_B.data_ptr() == oB.data_ptr()
    lin = dk.linear_per_sample_grads(x, g, N, backend=backend, out_weight=oW, out_bias=ob)
    assert lin.grad_weight.data_ptr() == oW.data_ptr() and lin.grad_bias.data_ptr() == ob.data_ptr()
    wA, wB = lora_loop(x.cpu(), g.cpu(), A.cpu(), B.cpu(), 0.5, N)
    wW, wb = linear_loop(x.cpu(), g.cpu(), N)
    for got, want, name in ((oA, wA, "A"), (oB, wB, "B"), (oW, wW, "W"), (ob, wb, "b")):
        _close(got, want, 1e-5, f"{backend} out_{name}")
    with pytest.raises(ValueError, match="out_A must be a torch.float32 tensor of shape"):
        dk.lora_per_sample_grads(x, g, A, B, 0.5, N, backend=backend, out_A=oA[:, :2])
    with pytest.raises(ValueError, match="out_weight is on meta"):
        dk.linear_per_sample_grads(x, g, N, backend=backend, out_weight=torch.empty(N, m, n, device="meta"))


@pytest.mark.gpu
def test_gpu_grid_past_65535_tiles_and_int64_offsets():
    """One sample of a 16448 x 16448 linear layer has 257 * 257 = 66,049 output tiles of 64 x 64: more than
    CUDA's 65,535 limit of grid axes 1/2 (the tiles live on axis 0 now)."""
    N, T, n, m = 1, 2, 16448, 16448
    x, g, _, _ = _data(N, 1, T, n, m, 1, torch.bfloat16, "cuda")
    res = dk.linear_per_sample_grads(x, g, N, bias=False, backend="triton")
    want = torch.einsum("nlm,nld->nmd", g.float().reshape(N, T, m), x.float().reshape(N, T, n))
    err = ((res.grad_weight - want).abs().max() / want.abs().max()).item()
    assert err <= 1e-5, err


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_launches_on_the_tensors_device():
    x, g, A, B = _data(2, 1, 9, 32, 32, 16, torch.float32, "cuda:1")
    with torch.cuda.device(0):
        res = dk.lora_per_sample_grads(x, g, A, B, 1.0, 2, backend="triton")
    wA, _ = lora_loop(x.cpu(), g.cpu(), A.cpu(), B.cpu(), 1.0, 2)
    assert res.grad_A.device == x.device
    _close(res.grad_A, wA, 1e-5, "grad_A on cuda:1")


def test_choose_split_is_a_power_of_two_within_limits():
    """T-split counts are powers of two (few workspace shapes over Poisson N), never above what the rows
    allow (each chunk keeps >= 4 BT-blocks) nor CUDA's 65,535 grid-axis limit, and 1 once the GPU is full."""
    from dplora_kernels import triton_kernels as tk
    for N in range(1, 70):
        for rows in (1, 64, 3136, 1 << 22):
            s = tk.choose_split(N, rows, n_tiles=12, BT=64, num_sms=132)
            assert s >= 1 and s & (s - 1) == 0 and s <= 65535
            assert s <= max(1, -(-rows // 256))
    assert tk.choose_split(64, 1 << 22, n_tiles=12, BT=64, num_sms=132) == 1
    assert tk.choose_split(1, 1 << 22, n_tiles=1, BT=64, num_sms=132) == 512

# (N, k, T, n, m, r, M, client of each sample): clients interleaved and one absent (0 samples), one
# client, r = 1 with 2-D inputs, an empty batch
GROUPED = [
    (5, 2, 3, 8, 6, 2, 3, [2, 0, 2, 0, 0]),
    (3, 1, 4, 5, 7, 3, 1, [0, 0, 0]),
    (4, 1, None, 9, 4, 1, 2, [1, 1, 0, 1]),
    (0, 1, 3, 8, 6, 2, 2, []),
]


@pytest.mark.parametrize("case", GROUPED, ids=lambda c: "N{}k{}T{}n{}m{}r{}M{}".format(*c[:7]))
@pytest.mark.parametrize("which", ["both", "A", "B"])
def test_lora_client_index_matches_float64_loop(case, which, device, poisoned, monkeypatch):
    """Client-grouped mode: stacks A (M, r, n), B (M, m, r), sample i uses client_index[i]'s factors;
    both backends vs the float64 loop run per sample with its factors, results written into NaN-filled
    strided views of one arena (as the engine passes them). The Triton path is ONE kernel launch per
    factor over all samples (the factors are gathered by client_index on the device), with no host
    synchronisation: no loop over the clients present (unique().tolist())."""
    from dplora_kernels import triton_kernels as tk
    N, k, T, n, m, r, M, clients = case
    x, g, _, _ = _data(N, k, T, n, m, r, torch.float32, device)
    gen = torch.Generator().manual_seed(5)
    A = torch.randn(M, r, n, generator=gen).to(device)
    B = torch.randn(M, m, r, generator=gen).to(device)
    idx = torch.tensor(clients, dtype=torch.long, device=device)
    rows = lambda t, i: t[i * k:(i + 1) * k]
    launches = []
    real_outer = tk.per_sample_outer
    monkeypatch.setattr(tk, "per_sample_outer", lambda *a, **kw: launches.append(1) or real_outer(*a, **kw))

    def no_sync(*a, **kw):
        raise AssertionError("host synchronisation in the grouped path")
    for backend in ("torch", "triton"):
        arena = torch.full((N, r * n + m * r + 3), float("nan"), device=device)
        out_A = arena[:, :r * n].view(N, r, n) if which != "B" else None
        out_B = arena[:, r * n:r * n + m * r].view(N, m, r) if which != "A" else None
        launches.clear()
        with monkeypatch.context() as mp:
            mp.setattr(torch.Tensor, "tolist", no_sync)
            mp.setattr(torch, "unique", no_sync)
            res = dk.lora_per_sample_grads(x, g, A, B, 1.5, N, backend=backend, which=which, client_index=idx,
                                           out_A=out_A, out_B=out_B)
        if backend == "triton":
            assert len(launches) == (2 if which == "both" else 1)
        assert res.grad_A is out_A and res.grad_B is out_B
        for i in range(N):
            c = clients[i]
            wA, wB = lora_loop(rows(x, i).cpu(), rows(g, i).cpu(), A[c].cpu(), B[c].cpu(), 1.5, 1)
            if which != "B":
                _close(res.grad_A[i:i + 1], wA, 1e-5, f"{backend} A sample {i}")
                assert res.sqnorm_A[i].item() == pytest.approx(float(sq(wA)[0]), rel=1e-5)
            if which != "A":
                _close(res.grad_B[i:i + 1], wB, 1e-5, f"{backend} B sample {i}")
                assert res.sqnorm_B[i].item() == pytest.approx(float(sq(wB)[0]), rel=1e-5)
        assert res.sqnorm_A.shape == res.sqnorm_B.shape == (N,)
    with pytest.raises(ValueError, match="client_index"):
        dk.lora_per_sample_grads(x, g, A, B, 1.5, N,
                                 client_index=torch.zeros(N + 1, dtype=torch.long, device=device))

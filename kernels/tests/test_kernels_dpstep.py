"""The one engine (PerSampleGradEngine, per_sample_gradients, dp_gradient) against a float64 per-sample
loop (microbatches of one sample), standalone (no lalora).

Tolerance: p.grad relative to the loop's max |grad|: 1e-6 for a float64 model on the torch backend,
2e-5 for a float32 model under the Triton interpreter (fp32 accumulation over a few dozen terms).
bf16 (autocast, fp32 LoRA weights, fp32 accumulation) vs the fp32 result: 3e-2 relative to the max
|grad| -- bf16 keeps 8 significant bits (unit roundoff 2^-9 = 2e-3) and the forward rounds each of
~6 activations/outputs on the path to a gradient once, so a few 1e-3 is expected and 3e-2 is a
margin that still fails for any wrong clipping unit, scale or missing term (those are O(1) errors).
"""

import math

import pytest
import torch
from torch import nn

import dplora_kernels as dk


class Tiny(nn.Module):
    """Two LoRA layers on a token sequence, then a trainable head on the mean token (one row per
    sample: the DP step takes it by ghost norm)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = self.fc2(torch.tanh(self.fc1(x)))
        return self.head(torch.tanh(h).mean(1))


def build(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    m = Tiny()
    for p in m.parameters():
        p.requires_grad_(False)
    m.fc1 = dk.LoRALinear(m.fc1, r=2, alpha=4.0, dropout=0.0)
    m.fc2 = dk.LoRALinear(m.fc2, r=2, alpha=4.0, dropout=0.0)
    m.head.requires_grad_(True)
    for mod in (m.fc1, m.fc2):
        nn.init.normal_(mod.lora_B)        # non-zero B so that G_A is non-zero
    return m.to(dtype)


def loss_fn(m, batch):
    x, y = batch
    return nn.functional.cross_entropy(m(x), y, reduction="none")


def loop_reference(x, y, clip_norm, active=None):
    """float64: per-sample grads one sample at a time, Abadi clipping of the all-layer norm, sum."""
    m = build(torch.float64)
    if active is not None:
        for n, p in m.named_parameters():
            p.requires_grad_(n in active)
    params = {n: p for n, p in m.named_parameters() if p.requires_grad}
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    norms = []
    for i in range(x.shape[0]):
        gs = torch.autograd.grad(loss_fn(m, (x[i:i + 1].double(), y[i:i + 1])).sum(), list(params.values()))
        norm = math.sqrt(sum((g ** 2).sum().item() for g in gs))
        norms.append(norm)
        for n, g in zip(params, gs):
            acc[n] += min(1.0, clip_norm / (norm + 1e-6)) * g
    return acc, torch.tensor(norms, dtype=torch.float64)


def data(N=5, T=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, T, 6, generator=gen), torch.randint(0, 3, (N,), generator=gen)


def rel_err(a, w):
    return (a.double().cpu() - w).abs().max().item() / w.abs().max().item()


@pytest.mark.parametrize("backend, dtype, tol", [("torch", torch.float64, 1e-6), ("triton", torch.float32, 2e-5)])
@pytest.mark.parametrize("clip_norm", [0.3, math.inf])
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_dp_gradient_matches_per_sample_loop(backend, dtype, tol, clip_norm, clipping, device, poisoned):
    N = 5
    x, y = data(N)
    if clipping == "flat":
        want, want_norms = loop_reference(x, y, clip_norm)
    else:   # per-layer reference: each tensor clipped to C / sqrt(K) on its own
        m = build(torch.float64)
        params = {n: p for n, p in m.named_parameters() if p.requires_grad}
        ck = clip_norm / math.sqrt(len(params))
        want = {n: torch.zeros_like(p) for n, p in params.items()}
        for i in range(N):
            gs = torch.autograd.grad(loss_fn(m, (x[i:i + 1].double(), y[i:i + 1])).sum(), list(params.values()))
            for n, g in zip(params, gs):
                want[n] += min(1.0, ck / (g.norm().item() + 1e-6)) * g
        _, want_norms = loop_reference(x, y, clip_norm)
    dev = device if backend == "triton" else "cpu"    # triton: CUDA if present, else the interpreter
    m = build(dtype).to(dev)
    res = dk.dp_gradient(m, loss_fn, (x.to(dev, dtype), y.to(dev)), clip_norm=clip_norm, noise_multiplier=0.0,
                         expected_batch_size=N, generator=None, clipping=clipping, backend=backend)
    torch.testing.assert_close(res.per_sample_norms.double().cpu(), want_norms, rtol=1e-5, atol=0)
    params = {n: p for n, p in m.named_parameters() if p.requires_grad}
    assert set(params) == set(want) and len(want) == 6
    for n, p in params.items():
        assert rel_err(p.grad * N, want[n]) <= tol, n


def test_arena_is_one_buffer_and_norms_match_views(poisoned):
    """Every per-sample gradient is a view of ONE (N, P) arena; the unit norms the kernels returned
    equal the norms of what landed in the arena (nothing left as the poisoned NaN)."""
    m = build(torch.float64)
    x, y = data(4)
    psg = dk.per_sample_gradients(m, loss_fn, (x.double(), y), backend="torch")
    arena = psg.arena
    assert arena.shape == (4, sum(p.numel() for p in m.parameters() if p.requires_grad))
    base, end = arena.data_ptr(), arena.data_ptr() + arena.numel() * arena.element_size()
    for k, g in psg.grads.items():
        assert base <= g.data_ptr() < end, k
        assert torch.isfinite(g).all(), k
        torch.testing.assert_close(psg.sqnorms[k], g.reshape(4, -1).pow(2).sum(1), rtol=1e-12, atol=0)
    assert not psg.ghost      # per_sample_gradients materialises everything


@pytest.mark.parametrize("backend, dtype, tol", [("torch", torch.float64, 1e-10), ("triton", torch.float32, 2e-5)])
def test_kernels_write_into_the_arena_views(backend, dtype, tol, device, poisoned, monkeypatch):
    """The engine hands the arena's views to the kernel functions (out_A/out_B/out_weight/out_bias);
    the Triton kernels store into them (no copy_ at all), the torch path copies its bmm results in
    (faster on the CPU than bmm(out=) into a strided view: reference._bmm_into). What lands there
    equals a float64 per-sample loop (the arena starts as NaN, so a view nobody wrote would show). A
    layer called twice still sums (add_)."""
    copies = []
    real_copy = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda t, *a, **kw: copies.append(t.shape) or real_copy(t, *a, **kw))
    m = build(dtype).to(device)
    x, y = data(4)
    psg = dk.per_sample_gradients(m, loss_fn, (x.to(device, dtype), y.to(device)), backend=backend)
    if backend == "triton":
        assert copies == []
    ref = build(torch.float64)
    for i in range(4):
        params = {k: p for k, p in ref.named_parameters() if p.requires_grad}
        gs = torch.autograd.grad(loss_fn(ref, (x[i:i + 1].double(), y[i:i + 1])).sum(), list(params.values()))
        for k, g in zip(params, gs):
            assert rel_err(psg.grads[k][i], g) <= tol, (k, i)
            assert psg.grads[k].data_ptr() >= psg.arena.data_ptr()
    # a module run twice: the first call writes its views in place, the second adds to them
    torch.manual_seed(0)
    lin = dk.LoRALinear(nn.Linear(4, 4), r=2, alpha=2.0, dropout=0.0).to(device, dtype)
    nn.init.normal_(lin.lora_B)
    z = torch.randn(3, 4, dtype=dtype, device=device)
    psg = dk.per_sample_gradients(lin, lambda mod, b: mod(mod(b)).sum(1), z, backend=backend)
    for i in range(3):
        A = lin.lora_A.detach().double().cpu().requires_grad_(True)
        B = lin.lora_B.detach().double().cpu().requires_grad_(True)
        f = lambda t: lin.base.double().cpu()(t) + lin.scaling * (t @ A.T) @ B.T
        gA, gB = torch.autograd.grad(f(f(z[i:i + 1].double().cpu())).sum(), [A, B])
        assert rel_err(psg.grads["lora_A"][i], gA) <= tol and rel_err(psg.grads["lora_B"][i], gB) <= tol


def test_ghost_norm_head_equals_materialised(poisoned):
    """The head on a pooled feature: ||g_i||^2 ||x_i||^2 (+ ||g_i||^2) and (c ⊙ g)^T x equal the
    materialised per-sample gradients' norms and clipped sum."""
    m = build(torch.float64)
    x, y = data(6)
    with dk.PerSampleGradEngine(m, backend="torch") as e:
        full = e.backward(loss_fn(m, (x.double(), y)).sum(), 6)
    with dk.PerSampleGradEngine(m, backend="torch") as e:
        ghosted = e.backward(loss_fn(m, (x.double(), y)).sum(), 6, ghost=True)
    assert [gl.names for gl in ghosted.ghost] == [("head.weight", "head.bias")]
    assert "head.weight" not in ghosted.grads and "fc1.lora_A" in ghosted.grads
    torch.testing.assert_close(ghosted.total_sqnorm(), full.total_sqnorm(), rtol=1e-12, atol=0)
    c = torch.rand(6, dtype=torch.float64)
    w, b = ghosted.ghost[0].clipped_sums(c)
    torch.testing.assert_close(w, torch.einsum("i,imn->mn", c, full.grads["head.weight"]))
    torch.testing.assert_close(b, c @ full.grads["head.bias"])


def test_alternating_factor_only_B(device, poisoned):
    """Only lora_B (and the head) trainable: G_A is not computed and the norm covers only active params."""
    N = 4
    x, y = data(N)
    active = {"fc1.lora_B", "fc2.lora_B", "head.weight", "head.bias"}
    want, _ = loop_reference(x, y, 0.2, active)
    for backend in ("torch", "triton"):
        dev = device if backend == "triton" else "cpu"
        m = build(torch.float32).to(dev)
        for n, p in m.named_parameters():
            p.requires_grad_(n in active)
        dk.dp_gradient(m, loss_fn, (x.to(dev), y.to(dev)), clip_norm=0.2, noise_multiplier=0.0,
                       expected_batch_size=N, generator=None, backend=backend)
        assert m.fc1.lora_A.grad is None
        for n, p in m.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad.double().cpu() * N, want[n], rtol=2e-5, atol=2e-6)


def test_rows_per_sample_swin_style():
    """An input of N*k rows (windows) with num_samples=N clips per sample, not per row."""
    N, k = 3, 2
    torch.manual_seed(0)
    lin = dk.LoRALinear(nn.Linear(6, 4), r=2, alpha=2.0, dropout=0.0)
    nn.init.normal_(lin.lora_B)
    x, g = torch.randn(N * k, 5, 6), torch.randn(N * k, 5, 4)

    def windows_loss(model, batch):   # N per-sample losses from N*k window rows
        return (model(batch) * g).sum((1, 2)).reshape(N, k).sum(1)

    res = dk.dp_gradient(lin, windows_loss, x, clip_norm=1e-3, noise_multiplier=0.0, expected_batch_size=1,
                         generator=None, backend="torch", num_samples=N)
    assert res.batch_size == N
    ref = dk.lora_per_sample_grads(x, g, lin.lora_A.detach(), lin.lora_B.detach(), lin.scaling, N, backend="torch")
    torch.testing.assert_close(res.per_sample_norms ** 2, ref.sqnorm_A + ref.sqnorm_B, rtol=1e-5, atol=0)
    # every sample is clipped to norm 1e-3, so the summed update has norm <= N * 1e-3
    total = math.sqrt(lin.lora_A.grad.pow(2).sum().item() + lin.lora_B.grad.pow(2).sum().item())
    assert total <= N * 1e-3 * (1 + 1e-5)
    with pytest.raises(ValueError, match="num_samples"):   # 4 does not divide the 6 rows
        dk.per_sample_gradients(lin, lambda mod, b: (mod(b) * g).sum((1, 2))[:4], x, num_samples=4)


def test_noise_std_and_scaling():
    """Zero data gradient (B = 0, x = 0) -> p.grad is pure noise with std sigma*C/expected_batch_size."""
    lin = dk.LoRALinear(nn.Linear(64, 64), r=16, alpha=16.0, dropout=0.0)
    dk.dp_gradient(lin, lambda mod, b: mod(b).sum(1), torch.zeros(4, 64), clip_norm=2.0, noise_multiplier=1.5,
                   expected_batch_size=4, generator=torch.Generator().manual_seed(0), backend="torch")
    draws = torch.cat([lin.lora_A.grad.flatten(), lin.lora_B.grad.flatten()])   # 2048 draws
    assert abs(draws.std().item() / (1.5 * 2.0 / 4) - 1) < 0.05


def test_backends_add_the_same_noise(device):
    """Same generator seed -> torch and Triton paths add exactly the same noise (one flat draw)."""
    out = {}
    for backend in ("torch", "triton"):
        dev = device if backend == "triton" else "cpu"
        lin = dk.LoRALinear(nn.Linear(8, 8), r=2, alpha=2.0, dropout=0.0).to(dev)
        gen = torch.Generator(device=dev).manual_seed(5)
        dk.dp_gradient(lin, lambda mod, b: mod(b).sum(1), torch.zeros(3, 8, device=dev), clip_norm=1.0,
                       noise_multiplier=1.0, expected_batch_size=3, generator=gen, backend=backend)
        out[backend] = (lin.lora_A.grad.cpu(), lin.lora_B.grad.cpu())
    for a, b in zip(out["torch"], out["triton"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_empty_batch_gives_noise_only():
    lin = dk.LoRALinear(nn.Linear(8, 8), r=2, alpha=2.0)

    def never(mod, b):
        raise AssertionError("the model must not be called for an empty batch")

    res = dk.dp_gradient(lin, never, torch.zeros(0, 8), clip_norm=1.0, noise_multiplier=1.0,
                         expected_batch_size=10, generator=torch.Generator().manual_seed(0), backend="torch")
    assert res.batch_size == 0 and res.clip_factors.shape == (0,)
    assert lin.lora_A.grad.abs().sum() > 0 and lin.lora_B.grad.shape == (8, 2)


def test_unsupported_trainable_parameter_refused():
    m = build(torch.float32)
    m.scale = nn.Parameter(torch.ones(1))   # owned by no supported layer: it would escape clipping
    with pytest.raises(ValueError, match="scale"):
        dk.dp_gradient(m, loss_fn, data(2), clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=2,
                       generator=None)


def test_non_finite_gradient_raises_names_parameter_and_leaves_grad(poisoned):
    m = build(torch.float32)
    x, y = data(2)
    x[1, 0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="fc1.lora_"):
        dk.dp_gradient(m, loss_fn, (x, y), clip_norm=1.0, noise_multiplier=0.0, expected_batch_size=2,
                       generator=None, backend="torch")
    assert all(p.grad is None for p in m.parameters())


def test_module_used_twice_sums_before_norm():
    """Weight sharing: a layer called twice contributes the sum of both calls to one per-sample grad."""
    torch.manual_seed(0)
    lin = dk.LoRALinear(nn.Linear(4, 4), r=2, alpha=2.0, dropout=0.0)
    nn.init.normal_(lin.lora_B)
    x = torch.randn(3, 4)
    res = dk.dp_gradient(lin, lambda mod, b: mod(mod(b)).sum(1), x, clip_norm=1e9, noise_multiplier=0.0,
                         expected_batch_size=1, generator=None, backend="torch")
    for i in range(3):
        A = lin.lora_A.detach().clone().requires_grad_(True)
        B = lin.lora_B.detach().clone().requires_grad_(True)
        f = lambda z: lin.base(z) + lin.scaling * (z @ A.T) @ B.T
        gA, gB = torch.autograd.grad(f(f(x[i:i + 1])).sum(), [A, B])
        want = math.sqrt(gA.pow(2).sum().item() + gB.pow(2).sum().item())
        assert abs(res.per_sample_norms[i].item() - want) <= 1e-5 * want


@pytest.mark.parametrize("bad, field", [(dict(clip_norm=0), "clip_norm"), (dict(noise_multiplier=-1), "noise_multiplier"),
                                        (dict(expected_batch_size=0), "expected_batch_size"),
                                        (dict(backend="x"), "backend"), (dict(clipping="x"), "clipping"),
                                        (dict(precision="fp8"), "precision")])
def test_dp_gradient_bad_input(bad, field):
    args = dict(clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=4, generator=None)
    args.update(bad)
    with pytest.raises(ValueError, match=field):
        dk.dp_gradient(build(torch.float32), loss_fn, data(2), **args)


def test_triton_on_cpu_without_interpreter_fails_before_the_forward(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    m = build(torch.float32)

    def never(mod, b):
        raise AssertionError("must fail before the forward")

    with pytest.raises(ValueError, match="backend='triton'"):
        dk.dp_gradient(m, never, data(2), clip_norm=1.0, noise_multiplier=0.0, expected_batch_size=2,
                       generator=None, backend="triton")
    with pytest.raises(ValueError, match="backend='triton'"):
        dk.PerSampleGradEngine(m, backend="triton")


def test_two_devices_are_refused_naming_the_argument():
    """Parameters on two devices -> error naming the model; a batch elsewhere -> error naming the batch.
    ('meta' stands in for a second device on a CPU-only machine.)"""
    m = build(torch.float32)
    m.head.to("meta")
    with pytest.raises(ValueError, match="model parameters are on several devices"):
        dk.dp_gradient(m, loss_fn, data(2), clip_norm=1.0, noise_multiplier=0.0, expected_batch_size=2,
                       generator=None)
    m = build(torch.float32)
    x, y = data(2)
    with pytest.raises(ValueError, match="batch holds a tensor on meta"):
        dk.dp_gradient(m, loss_fn, (x.to("meta"), y), clip_norm=1.0, noise_multiplier=0.0,
                       expected_batch_size=2, generator=None)


def test_bf16_autocast_within_tolerance_of_fp32():
    """precision='bf16': autocast forward, fp32 LoRA weights, fp32 per-sample gradients; within 3e-2
    (see module doc) of the fp32 step, and the per-sample norms within 3e-2 too."""
    N = 6
    x, y = data(N, T=4, seed=3)
    out = {}
    for prec in ("fp32", "bf16"):
        m = build(torch.float32)
        psg = dk.per_sample_gradients(m, loss_fn, (x, y), backend="torch", precision=prec)
        assert all(g.dtype == torch.float32 for g in psg.grads.values())
        res = dk.dp_gradient(m, loss_fn, (x, y), clip_norm=0.3, noise_multiplier=0.0, expected_batch_size=N,
                             generator=None, backend="torch", precision=prec)
        assert all(p.dtype == torch.float32 for p in m.parameters())
        out[prec] = ({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad},
                     res.per_sample_norms, psg)
    for n, g in out["fp32"][0].items():
        err = (out["bf16"][0][n] - g).abs().max() / g.abs().max()
        assert err <= 3e-2, (n, err)
    torch.testing.assert_close(out["bf16"][1], out["fp32"][1], rtol=3e-2, atol=0)
    # the bf16 path really ran in bf16: it is not bit-identical to fp32
    assert any(not torch.equal(out["bf16"][0][n], g) for n, g in out["fp32"][0].items())


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gpu_auto_backend_matches_loop(precision):
    """On CUDA, backend="auto" is Triton; fp32 matches the float64 loop to 1e-4, bf16 autocast to 3e-2."""
    N = 6
    x, y = data(N, T=4, seed=3)
    want, _ = loop_reference(x, y, 0.3)
    m = build(torch.float32).cuda()
    assert dk.resolve_backend("auto", "cuda") == "triton"
    dk.dp_gradient(m, loss_fn, (x.cuda(), y.cuda()), clip_norm=0.3, noise_multiplier=0.0, expected_batch_size=N,
                   generator=None, precision=precision)
    tol = 3e-2 if precision == "bf16" else 1e-4
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert rel_err(p.grad * N, want[n]) <= tol, n


def test_flat_step_is_one_grouped_call_over_arena_views(monkeypatch):
    """Flat clipping: clip, sum and noise of every materialised parameter in ONE clip_and_noise call on
    the one arena, with the kernels' norms (no per-parameter clip calls)."""
    from dplora_kernels import dp
    calls = []
    real = dp.clip_and_noise

    def spy(per_sample, sqnorm, *a, **kw):
        calls.append([g.untyped_storage().data_ptr() for g in per_sample])
        return real(per_sample, sqnorm, *a, **kw)

    monkeypatch.setattr(dp, "clip_and_noise", spy)
    monkeypatch.setattr(dp, "clipped_noised_sum", lambda *a, **k: pytest.fail("per-tensor sum in the flat step"))
    m = build(torch.float32)
    dk.dp_gradient(m, loss_fn, data(4), clip_norm=0.3, noise_multiplier=0.0, expected_batch_size=4,
                   generator=None, backend="torch")
    assert len(calls) == 1 and len(calls[0]) == 1        # the arena holding the 4 LoRA factors
    psg = dk.per_sample_gradients(m, loss_fn, data(4), backend="torch")
    assert psg.arena.shape[1] == sum(p.numel() for n, p in m.named_parameters() if "lora_" in n) + 18


def test_ghost_head_gets_full_noise():
    """A ghosted head (one row per sample) still gets N(0, (sigma C)^2) noise / expected_batch_size."""
    head = nn.Linear(64, 32)
    dk.dp_gradient(head, lambda mod, b: (mod(b) * 0).sum(1), torch.zeros(4, 64), clip_norm=2.0,
                   noise_multiplier=1.5, expected_batch_size=4, generator=torch.Generator().manual_seed(0))
    draws = torch.cat([head.weight.grad.flatten(), head.bias.grad.flatten()])   # 2080 draws
    assert abs(draws.std().item() / (1.5 * 2.0 / 4) - 1) < 0.05


def test_engine_walk_lists_parameters_in_named_parameters_order():
    """The engine's one module walk (engine._trainable) lists the trainable parameters exactly as
    named_parameters() does -- same names, same order (it fixes the arena layout and the noise
    order) -- with a weight shared by two modules, a module registered twice, a None parameter and
    frozen ones."""
    from dplora_kernels.engine import _trainable

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3, bias=False)
            self.b.weight = self.a.weight
            self.again = self.a
            self.frozen = nn.Linear(3, 2).requires_grad_(False)
            self.lora = dk.LoRALinear(nn.Linear(3, 4), r=2, alpha=2.0, dropout=0.0)
            self.register_parameter("nothing", None)
            self.last = nn.Parameter(torch.zeros(2))

    m = Shared()
    want = [(n, id(p)) for n, p in m.named_parameters() if p.requires_grad]
    assert [(n, id(p)) for n, p in _trainable(m)[0].items()] == want
    assert len(want) == 5   # a.weight, a.bias, lora.lora_A, lora.lora_B, last
    m.last.requires_grad_(False)   # (no supported owner: the engine would refuse it)
    with dk.PerSampleGradEngine(m) as eng:
        assert [(n, id(p)) for n, p in eng.params.items()] == [w for w in want if w[0] != "last"]

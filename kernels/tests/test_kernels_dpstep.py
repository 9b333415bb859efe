"""DPLoRALinear / DPLinear / DPStep against a float64 per-sample loop (microbatches of one sample).

Tolerance: p.grad relative to the loop's max |grad|: 1e-5 (float64 model on the torch backend; its
norms and clip factors are fp32) and 2e-5 (float32 model, Triton interpreter).
"""

import math

import pytest
import torch
from torch import nn

import dplora_kernels as dk


class Tiny(nn.Module):
    """Two LoRA layers on a token sequence, then a trainable head on the mean token."""

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
    names = dk.add_dp_lora(m, ["fc1", "fc2"], r=2, alpha=4.0)
    assert names == ["fc1", "fc2"]
    m.head = dk.DPLinear.from_linear(m.head)
    for mod in m.modules():
        if isinstance(mod, dk.DPLoRALinear):
            nn.init.normal_(mod.lora_B)        # non-zero B so that G_A is non-zero
    return m.to(dtype)


def loss_fn(m, x, y):
    return nn.functional.cross_entropy(m(x), y, reduction="sum")


def loop_reference(x, y, clip_norm, active=None):
    """float64: per-sample grads one sample at a time, Abadi clipping of the all-layer norm, sum."""
    m = build(torch.float64)
    if active is not None:
        for n, p in m.named_parameters():
            p.requires_grad_(n in active)
    params = [p for p in m.parameters() if p.requires_grad]
    acc = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(x.shape[0]):
        gs = torch.autograd.grad(loss_fn(m, x[i:i + 1].double(), y[i:i + 1]), params)
        norm = math.sqrt(sum((g ** 2).sum().item() for g in gs))
        norms.append(norm)
        for a, g in zip(acc, gs):
            a += min(1.0, clip_norm / (norm + 1e-6)) * g
    return acc, torch.tensor(norms, dtype=torch.float64)


@pytest.mark.parametrize("backend, dtype, tol", [("torch", torch.float64, 1e-5), ("triton", torch.float32, 2e-5)])
@pytest.mark.parametrize("clip_norm", [0.3, math.inf])
def test_dpstep_matches_per_sample_loop(backend, dtype, tol, clip_norm, device, poisoned):
    N, T = 5, 3
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, T, 6, generator=gen)
    y = torch.randint(0, 3, (N,), generator=gen)
    want, want_norms = loop_reference(x, y, clip_norm)
    dev = device if backend == "triton" else "cpu"    # triton: CUDA if present, else the interpreter
    m = build(dtype).to(dev)
    dp = dk.DPStep(m, clip_norm, 0.0, expected_batch_size=N, backend=backend)
    loss_fn(m, x.to(dev, dtype), y.to(dev)).backward()
    res = dp.clip_and_noise()
    torch.testing.assert_close(res.per_sample_norms.double().cpu(), want_norms, rtol=1e-5, atol=0)
    params = [p for p in m.parameters() if p.requires_grad]
    assert len(params) == len(want) == 6
    for p, w in zip(params, want):
        assert p.grad is not None
        err = (p.grad.double().cpu() * N - w).abs().max().item() / w.abs().max().item()
        assert err <= tol


def test_alternating_factor_only_B(device, poisoned):
    """Only lora_B (and the head) trainable: G_A is not computed and the norm covers only active params."""
    N = 4
    x, y = torch.randn(N, 3, 6), torch.randint(0, 3, (N,))
    active = {"fc1.lora_B", "fc2.lora_B", "head.weight", "head.bias"}
    want, _ = loop_reference(x, y, 0.2, active)
    for backend in ("torch", "triton"):
        dev = device if backend == "triton" else "cpu"
        m = build(torch.float32).to(dev)
        for n, p in m.named_parameters():
            p.requires_grad_(n in active)
        dp = dk.DPStep(m, 0.2, 0.0, expected_batch_size=N, backend=backend)
        loss_fn(m, x.to(dev), y.to(dev)).backward()
        dp.clip_and_noise()
        assert m.fc1.lora_A.grad is None
        for p, w in zip([p for p in m.parameters() if p.requires_grad], want):
            torch.testing.assert_close(p.grad.double().cpu() * N, w, rtol=2e-5, atol=2e-6)


def test_rows_per_sample_swin_style():
    """An input of N*k rows (windows) with set_num_samples(N) clips per sample, not per row."""
    N, k = 3, 2
    torch.manual_seed(0)
    lin = dk.DPLoRALinear(nn.Linear(6, 4), r=2, alpha=2.0)
    nn.init.normal_(lin.lora_B)
    x = torch.randn(N * k, 5, 6)
    g = torch.randn(N * k, 5, 4)
    dp = dk.DPStep(lin, clip_norm=1e-3, noise_multiplier=0.0, expected_batch_size=1, backend="torch")
    dp.set_num_samples(N)
    (lin(x) * g).sum().backward()
    res = dp.clip_and_noise()
    assert res.batch_size == N
    ref = dk.lora_per_sample_grads(x, g, lin.lora_A.detach(), lin.lora_B.detach(), lin.scaling, N, backend="torch")
    torch.testing.assert_close(res.per_sample_norms ** 2, ref.sqnorm_A + ref.sqnorm_B, rtol=1e-5, atol=0)
    # every sample is clipped to norm 1e-3, so the summed update has norm <= N * 1e-3
    total = math.sqrt(lin.lora_A.grad.pow(2).sum().item() + lin.lora_B.grad.pow(2).sum().item())
    assert total <= N * 1e-3 * (1 + 1e-5)
    # without set_num_samples the rows would be the unit; with a wrong N there is a clear error
    dp.set_num_samples(4)
    with pytest.raises(ValueError, match="num_samples"):
        (lin(x) * g).sum().backward()


def test_noise_std_and_scaling():
    """Zero data gradient (B = 0, x = 0) -> p.grad is pure noise with std sigma*C/expected_batch_size."""
    lin = dk.DPLoRALinear(nn.Linear(64, 64), r=16, alpha=16.0)
    dp = dk.DPStep(lin, clip_norm=2.0, noise_multiplier=1.5, expected_batch_size=4,
                   generator=torch.Generator().manual_seed(0), backend="torch")
    lin(torch.zeros(4, 64)).sum().backward()
    dp.clip_and_noise()
    draws = torch.cat([lin.lora_A.grad.flatten(), lin.lora_B.grad.flatten()])   # 2048 draws
    assert abs(draws.std().item() / (1.5 * 2.0 / 4) - 1) < 0.05


def test_empty_batch_gives_noise_only():
    lin = dk.DPLoRALinear(nn.Linear(8, 8), r=2, alpha=2.0)
    dp = dk.DPStep(lin, 1.0, 1.0, expected_batch_size=10, generator=torch.Generator().manual_seed(0), backend="torch")
    res = dp.clip_and_noise()            # no forward/backward at all: N = 0
    assert res.batch_size == 0 and res.clip_factors.shape == (0,)
    assert lin.lora_A.grad.abs().sum() > 0 and lin.lora_B.grad.shape == (8, 2)


def test_unclipped_trainable_parameter_refused():
    m = build(torch.float32)
    m.fc1.base.bias.requires_grad_(True)
    with pytest.raises(ValueError, match="fc1.base.bias"):
        dk.DPStep(m, 1.0, 1.0, expected_batch_size=2)


def test_non_finite_gradient_raises_and_leaves_grad(poisoned):
    m = build(torch.float32)
    dp = dk.DPStep(m, 1.0, 0.0, expected_batch_size=2, backend="torch")
    x = torch.randn(2, 3, 6)
    x[1, 0, 0] = float("inf")
    loss_fn(m, x, torch.tensor([0, 1])).backward()
    with pytest.raises(FloatingPointError):
        dp.clip_and_noise()
    assert m.fc1.lora_A.grad is None


def test_detached_module_gives_ordinary_gradients():
    """Not attached to a DPStep, DPLoRALinear is an ordinary LoRA layer: same grads as plain autograd."""
    torch.manual_seed(0)
    lin = dk.DPLoRALinear(nn.Linear(6, 4), r=3, alpha=6.0).double()
    nn.init.normal_(lin.lora_B)
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    (lin(x) ** 2).sum().backward()
    A = lin.lora_A.detach().clone().requires_grad_(True)
    B = lin.lora_B.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    y = lin.base(x2) + lin.scaling * (x2 @ A.T) @ B.T
    (y ** 2).sum().backward()
    torch.testing.assert_close(lin.lora_A.grad, A.grad)
    torch.testing.assert_close(lin.lora_B.grad, B.grad)
    torch.testing.assert_close(x.grad, x2.grad)


def test_module_used_twice_sums_before_norm():
    """Weight sharing: a layer called twice contributes the sum of both calls to one per-sample grad."""
    torch.manual_seed(0)
    lin = dk.DPLoRALinear(nn.Linear(4, 4), r=2, alpha=2.0)
    nn.init.normal_(lin.lora_B)
    x = torch.randn(3, 4)
    dp = dk.DPStep(lin, 1e9, 0.0, expected_batch_size=1, backend="torch")
    lin(lin(x)).sum().backward()
    res = dp.clip_and_noise()
    for i in range(3):
        A = lin.lora_A.detach().clone().requires_grad_(True)
        B = lin.lora_B.detach().clone().requires_grad_(True)
        f = lambda z: lin.base(z) + lin.scaling * (z @ A.T) @ B.T
        gA, gB = torch.autograd.grad(f(f(x[i:i + 1])).sum(), [A, B])
        want = math.sqrt(gA.pow(2).sum().item() + gB.pow(2).sum().item())
        assert abs(res.per_sample_norms[i].item() - want) <= 1e-5 * want


@pytest.mark.parametrize("bad, field", [(dict(clip_norm=0), "clip_norm"), (dict(noise_multiplier=-1), "noise_multiplier"),
                                        (dict(expected_batch_size=0), "expected_batch_size"), (dict(backend="x"), "backend")])
def test_dpstep_bad_input(bad, field):
    args = dict(clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=4)
    args.update(bad)
    with pytest.raises(ValueError, match=field):
        dk.DPStep(dk.DPLoRALinear(nn.Linear(4, 4), 2, 2.0), **args)


@pytest.mark.gpu
@pytest.mark.parametrize("amp", [False, True])
def test_gpu_dpstep_auto_backend_matches_loop(amp):
    """On CUDA, backend="auto" is Triton; fp32 matches the float64 loop to 1e-4, bf16 autocast to 3e-2."""
    N = 6
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(N, 4, 6, generator=gen), torch.randint(0, 3, (N,), generator=gen)
    want, _ = loop_reference(x, y, 0.3)
    m = build(torch.float32).cuda()
    dp = dk.DPStep(m, 0.3, 0.0, expected_batch_size=N)
    assert dk.resolve_backend(dp.backend, "cuda") == "triton"
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        loss = loss_fn(m, x.cuda(), y.cuda())
    loss.float().backward()
    dp.clip_and_noise()
    tol = 3e-2 if amp else 1e-4
    for p, w in zip([p for p in m.parameters() if p.requires_grad], want):
        err = (p.grad.double().cpu() * N - w).abs().max().item() / w.abs().max().item()
        assert err <= tol


def test_second_batch_before_clip_is_refused():
    """Two backward passes into one arena would add batch 2's sample i onto batch 1's sample i."""
    lin = dk.DPLoRALinear(nn.Linear(4, 4), r=2, alpha=2.0)
    dp = dk.DPStep(lin, 1.0, 0.0, expected_batch_size=2, backend="torch")
    lin(torch.randn(2, 4)).sum().backward()
    with pytest.raises(RuntimeError, match="clip_and_noise"):
        lin(torch.randn(2, 4))
    with torch.no_grad():
        lin(torch.randn(2, 4))            # evaluation in between is fine
    dp.clip_and_noise()
    lin(torch.randn(2, 4)).sum().backward()   # next step is fine

"""Logical batch > physical batch, and the CSPRNG noise (issue 31, deliverable 3).

* dp_gradient(physical_batch_size=k) on a logical batch of N > k samples: chunks of k, clipped sums
  added, noise once with the unsplit step's draws -> equal to the unsplit step (float64: 1e-12
  relative; float32: 1e-5), for flat (with a ghost head) and per-layer clipping, and both equal the
  float64 per-sample loop's clipped sum when the noise is 0.
* secure=True: noise from os.urandom; N(0, 1) moments, two draws differ, a seeded generator is
  refused, and the noise added to the clipped sum has std sigma*C/B.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dplora_kernels as dk
from dplora_kernels.noise import secure_standard_normal

D, T, C = 6, 3, 4


class Net(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.fc = dk.LoRALinear(nn.Linear(D, 8), r=2, alpha=4, dropout=0.0)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, C)            # one row per sample: a ghost head under flat clipping
        self.to(dtype)
        self.fc.base.requires_grad_(False)
        with torch.no_grad():
            self.fc.lora_B.normal_(0, 0.5)

    def forward(self, x):
        return self.head(self.norm(torch.tanh(self.fc(x))).mean(1))


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def data(n, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, T, D, generator=g, dtype=torch.float64).to(dtype) * 2, torch.arange(n) % C


def run(model, batch, sigma, **kw):
    return dk.dp_gradient(model, loss_fn, batch, clip_norm=0.5, noise_multiplier=sigma, expected_batch_size=6.0,
                          generator=torch.Generator().manual_seed(4), **kw)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("sigma", [0.0, 1.3])
def test_physical_chunks_equal_the_unsplit_logical_step(dtype, tol, clipping, sigma):
    base, batch = Net(dtype), data(8, dtype)
    whole = run(copy.deepcopy(base), batch, sigma, clipping=clipping)
    for chunk in (1, 3, 5):
        part = run(copy.deepcopy(base), batch, sigma, clipping=clipping, physical_batch_size=chunk)
        assert part.batch_size == 8 and part.per_sample_norms.shape == (8,)
        assert rel(part.per_sample_norms, whole.per_sample_norms) < tol
        for k, g in whole.grads.items():
            assert rel(part.grads[k], g) < tol, (k, chunk)


def test_physical_chunks_equal_the_float64_loop():
    model, batch = Net(torch.float64), data(7, torch.float64)
    res = run(model, batch, 0.0, physical_batch_size=2)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    per = []
    for i in range(7):
        gs = torch.autograd.grad(loss_fn(model, (batch[0][i:i + 1], batch[1][i:i + 1])).sum(), list(params.values()))
        per.append(gs)
    norms = torch.stack([torch.cat([g.reshape(-1) for g in gs]).norm() for gs in per])
    c = (0.5 / (norms + 1e-6)).clamp(max=1.0)
    for j, k in enumerate(params):
        want = sum(c[i] * per[i][j] for i in range(7)) / 6.0
        assert rel(res.grads[k], want) < 1e-12, k


def test_physical_batch_size_is_validated():
    with pytest.raises(ValueError, match="physical_batch_size"):
        run(Net(torch.float32), data(4, torch.float32), 1.0, physical_batch_size=0)


def test_secure_normal_moments_and_fresh_draws():
    z = secure_standard_normal(200_000)
    assert z.dtype == torch.float64 and torch.isfinite(z).all()
    se = 1 / math.sqrt(200_000)
    assert abs(float(z.mean())) < 5 * se
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2) * se
    assert abs(float((z ** 4).mean()) - 3) < 0.1                 # Gaussian kurtosis
    assert not torch.equal(secure_standard_normal(16), secure_standard_normal(16))


def test_secure_noise_in_the_step():
    base, batch = Net(torch.float32), data(6, torch.float32)
    clean = run(copy.deepcopy(base), batch, 0.0)
    with pytest.raises(ValueError, match="generator=None"):
        run(copy.deepcopy(base), batch, 1.0, secure=True)
    sigma, noise = 2.0, []
    outs = [dk.dp_gradient(copy.deepcopy(base), loss_fn, batch, clip_norm=0.5, noise_multiplier=sigma,
                           expected_batch_size=6.0, generator=None, secure=True) for _ in range(2)]
    for k, g in clean.grads.items():
        assert not torch.equal(outs[0].grads[k], outs[1].grads[k])
        noise.append((outs[0].grads[k] - g).reshape(-1))
    noise = torch.cat(noise).double()
    want = sigma * 0.5 / 6.0
    assert abs(float(noise.std()) / want - 1) < 5 / math.sqrt(noise.numel())

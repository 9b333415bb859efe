"""dp_gradient (the DP-SGD gradient): exact in the limits, clipped where it must be, noise only on
trainable parameters, errors that leave the model untouched.

Tolerances: float64, comparisons to 1e-10 relative (exact arithmetic up to summation order)
unless stated.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from _dp_reference import assert_close_rel, flat_norms, loop_per_sample_grads
from lalora.lora import set_active_factors
from lalora.privacy import DPStepResult, dp_gradient
from lalora.privacy.dp_step import NOT_DP_LABEL, as_released_gradient
from test_per_sample_grads import ce_loss, img_loss, mlp_model, small_swin, swin_batch

D = torch.float64


def mlp_batch(n=6, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 4, 6, generator=g, dtype=D) * scale, "labels": torch.arange(n) % 3}


def trainable(model):
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def test_no_clip_no_noise_is_summed_gradient_over_expected_batch():
    model, batch = mlp_model(D), mlp_batch()
    params = trainable(model)
    summed = torch.autograd.grad(ce_loss(model, batch).sum(), list(params.values()))
    res = dp_gradient(model, ce_loss, batch, clip_norm=math.inf, noise_multiplier=0.0,
                      expected_batch_size=4.0, generator=None)
    assert isinstance(res, DPStepResult) and res.batch_size == 6
    assert torch.all(res.clip_factors == 1)
    for (k, p), s in zip(params.items(), summed):
        assert_close_rel(p.grad, s / 4.0, 1e-10, k)
        assert torch.equal(p.grad, res.grads[k])


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_small_clip_bounds_every_contribution_even_for_huge_gradients(clipping):
    model, batch = mlp_model(D), mlp_batch(scale=1e6)     # huge inputs -> huge per-sample grads
    batch["x"][0] *= 1e3
    C = 1e-3
    ref = loop_per_sample_grads(model, ce_loss, batch, 6)
    res = dp_gradient(model, ce_loss, batch, clip_norm=C, noise_multiplier=0.0, expected_batch_size=6,
                      generator=None, clipping=clipping)
    assert (flat_norms(ref) > 100 * C).all(), "the test needs gradients far above C"
    torch.testing.assert_close(res.per_sample_norms.double(), flat_norms(ref), rtol=1e-6, atol=0)
    names = list(res.grads)
    if clipping == "flat":
        contrib = {k: ref[k] * res.clip_factors.view(-1, *[1] * (ref[k].dim() - 1)) for k in names}
    else:
        assert res.clip_factors.shape == (6, len(names))
        contrib = {k: ref[k] * res.clip_factors[:, j].view(-1, *[1] * (ref[k].dim() - 1))
                   for j, k in enumerate(names)}
        for k in names:   # each tensor within C / sqrt(K)
            per_t = contrib[k].reshape(6, -1).norm(dim=1)
            assert (per_t <= C / math.sqrt(len(names)) * (1 + 1e-6)).all(), k
    assert (flat_norms(contrib) <= C * (1 + 1e-6)).all()
    for k in names:   # and the step is exactly the sum of those contributions / 6
        assert_close_rel(res.grads[k], contrib[k].sum(0) / 6, 1e-8, k)


def test_noise_only_on_trainable_params():
    """B-step of an alternating method: only B gets signal and noise; frozen A, head and base
    weights keep .grad None."""
    model, batch = mlp_model(D), mlp_batch()
    set_active_factors(model, "B")
    for p in model.head.parameters():
        p.requires_grad_(False)
    kw = dict(clip_norm=0.5, expected_batch_size=3.0)
    clean = dp_gradient(model, ce_loss, batch, noise_multiplier=0.0, generator=None, **kw)
    noisy = dp_gradient(model, ce_loss, batch, noise_multiplier=2.0,
                        generator=torch.Generator().manual_seed(0), **kw)
    assert set(noisy.grads) == {"fc1.lora_B", "fc2.lora_B"}
    for k in noisy.grads:
        assert (noisy.grads[k] != clean.grads[k]).all(), k
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name


def test_noise_std_statistics():
    """Noise-only step on a wide parameter: empirical std = sigma C / b within 3%."""
    model = mlp_model(D)
    set_active_factors(model, "none")
    model.head.weight.requires_grad_(True)
    model.head.bias.requires_grad_(False)
    sigma, C, b = 1.5, 2.0, 4.0
    empty = {"x": torch.zeros(0, 6, dtype=D), "labels": torch.zeros(0, dtype=torch.long)}
    draws = torch.stack([dp_gradient(model, ce_loss, empty, clip_norm=C, noise_multiplier=sigma,
                                     expected_batch_size=b, generator=torch.Generator().manual_seed(s)
                                     ).grads["head.weight"].reshape(-1) for s in range(300)])
    assert abs(draws.std().item() / (sigma * C / b) - 1) < 0.03
    assert abs(draws.mean().item()) < 0.03 * sigma * C / b


def test_empty_batch_never_calls_model_and_is_noise_only():
    model = mlp_model(D)

    def loss_fn(m, b):
        raise AssertionError("the model must not be called on an empty batch")

    empty = {"x": torch.zeros(0, 6, dtype=D), "labels": torch.zeros(0, dtype=torch.long)}
    gen = torch.Generator().manual_seed(7)
    res = dp_gradient(model, loss_fn, empty, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=5,
                      generator=gen)
    assert res.batch_size == 0 and res.per_sample_norms.numel() == 0
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in res.grads.values())
    zero = dp_gradient(model, loss_fn, empty, clip_norm=1.0, noise_multiplier=0.0, expected_batch_size=5,
                       generator=None)
    assert all(torch.count_nonzero(p.grad) == 0 for p in trainable(model).values())
    assert set(zero.grads) == set(trainable(model))


def test_same_generator_same_noise():
    model, batch = mlp_model(D), mlp_batch()
    kw = dict(clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=6)
    a = dp_gradient(model, ce_loss, batch, generator=torch.Generator().manual_seed(3), **kw)
    b = dp_gradient(model, ce_loss, batch, generator=torch.Generator().manual_seed(3), **kw)
    c = dp_gradient(model, ce_loss, batch, generator=torch.Generator().manual_seed(4), **kw)
    assert all(torch.equal(a.grads[k], b.grads[k]) for k in a.grads)
    assert not all(torch.equal(a.grads[k], c.grads[k]) for k in a.grads)


def test_nan_raises_and_leaves_params_and_grads_unchanged():
    model, batch = mlp_model(D), mlp_batch()
    for p in trainable(model).values():
        p.grad = torch.full_like(p, 7.0)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    batch["x"][2, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="parameter '"):
        dp_gradient(model, ce_loss, batch, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=6,
                    generator=torch.Generator().manual_seed(0))
    for k, p in model.named_parameters():
        assert torch.equal(p.detach(), before[k])
        if p.requires_grad:
            assert torch.all(p.grad == 7.0), k


@pytest.mark.parametrize("field, kw", [
    ("clip_norm", dict(clip_norm=0.0)), ("clip_norm", dict(clip_norm=-1.0)),
    ("noise_multiplier", dict(noise_multiplier=-0.1)),
    ("expected_batch_size", dict(expected_batch_size=0)), ("clipping", dict(clipping="per_sample")),
])
def test_bad_arguments_name_the_field(field, kw):
    args = dict(clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=4.0, generator=None)
    args.update(kw)
    with pytest.raises(ValueError, match=field):
        dp_gradient(mlp_model(D), ce_loss, mlp_batch(), **args)


def test_loss_fn_must_return_per_sample_losses():
    with pytest.raises(ValueError, match="per-sample"):
        dp_gradient(mlp_model(D), lambda m, b: ce_loss(m, b).mean(), mlp_batch(), clip_norm=1.0,
                    noise_multiplier=0.0, expected_batch_size=4, generator=None)


def test_swin_dp_step_clips_per_image():
    """On Swin the clip unit is the image: with small C each image's (not window's) contribution
    is bounded, and the step equals sum_i c_i g_i / b with g_i from the per-image loop."""
    model, batch = small_swin(D), swin_batch(D)
    ref = loop_per_sample_grads(model, img_loss, batch, 3)
    norms = flat_norms(ref)
    C = float(norms.min()) / 2
    res = dp_gradient(model, img_loss, batch, clip_norm=C, noise_multiplier=0.0, expected_batch_size=2.5,
                      generator=None)
    torch.testing.assert_close(res.per_sample_norms.double(), norms, rtol=1e-6, atol=0)
    factors = (C / (norms + 1e-6)).clamp(max=1)
    torch.testing.assert_close(res.clip_factors.double(), factors, rtol=1e-6, atol=0)
    for k in ref:
        expect = (ref[k] * factors.view(-1, *[1] * (ref[k].dim() - 1))).sum(0) / 2.5
        assert_close_rel(res.grads[k], expect, 1e-6, k)


def test_as_released_is_labelled_not_dp_and_follows_the_released_code():
    """Batch-mean grad, C = min(median tensor norm, 0.4), per-tensor clip, noise sigma C / b."""
    model, batch = mlp_model(D), mlp_batch()
    params = trainable(model)
    mean = torch.autograd.grad(ce_loss(model, batch).mean(), list(params.values()))
    norms = torch.stack([g.norm() for g in mean])
    C = min(float(norms.median()), 0.4)
    out = as_released_gradient(model, ce_loss, batch, noise_multiplier=0.0, generator=None)
    assert out.label == NOT_DP_LABEL and "NOT differentially private" in out.label
    assert out.clip_norm == pytest.approx(C, rel=1e-12)
    for (k, p), g, nrm in zip(params.items(), mean, norms):
        assert_close_rel(out.grads[k], g * min(1.0, C / float(nrm)), 1e-10, k)
        assert torch.equal(p.grad, out.grads[k])
    noisy = as_released_gradient(model, ce_loss, batch, noise_multiplier=3.0,
                                 generator=torch.Generator().manual_seed(0))
    first = next(iter(params))                               # noise is drawn tensor by tensor
    diff = noisy.grads[first] - out.grads[first]
    expect = torch.randn(params[first].shape, generator=torch.Generator().manual_seed(0), dtype=D)
    expect = expect * 3.0 * C / 6
    assert_close_rel(diff, expect, 1e-8, "noise of the first tensor")


_TRITON_SCRIPT = r"""
import sys, torch
sys.path.insert(0, {tests!r})
from test_per_sample_grads import small_swin, swin_batch, img_loss, mlp_model, ce_loss
from lalora.privacy import dp_gradient
cases = [(lambda: mlp_model(torch.float32), ce_loss, {{"x": torch.randn(5, 4, 6), "labels": torch.arange(5) % 3}}),
         (lambda: small_swin(torch.float32), img_loss, swin_batch(torch.float32))]
for build, loss, batch in cases:
    out = {{}}
    for be in ("torch", "triton"):
        out[be] = dp_gradient(build(), loss, batch, clip_norm=0.01, noise_multiplier=1.0,
                              expected_batch_size=4, generator=torch.Generator().manual_seed(0), backend=be)
    for k, a in out["torch"].grads.items():
        err = ((a - out["triton"].grads[k]).abs().max() / a.abs().max()).item()
        assert err < 1e-4, (k, err)
    torch.testing.assert_close(out["triton"].per_sample_norms, out["torch"].per_sample_norms, rtol=1e-4, atol=0)
print("OK")
"""


@pytest.mark.slow
def test_triton_backend_slots_in_under_the_interpreter():
    """The engine's Triton path (dplora_kernels, run by Triton's CPU interpreter) gives the torch
    path's DP step (same noise draw, 1e-4 relative in float32), on the MLP and on Swin."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    tests = str(Path(__file__).parent)
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT.format(tests=tests)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_auto_backend_matches_cpu():
    """On CUDA backend='auto' picks Triton; the DP step must equal the CPU torch path (float32)."""
    batch = swin_batch(torch.float32)
    kw = dict(clip_norm=0.01, noise_multiplier=0.0, expected_batch_size=4, generator=None)
    cpu = dp_gradient(small_swin(torch.float32), img_loss, batch, backend="torch", **kw)
    gpu_batch = {k: v.cuda() for k, v in batch.items()}
    gpu = dp_gradient(small_swin(torch.float32).cuda(), img_loss, gpu_batch, backend="auto", **kw)
    for k, a in cpu.grads.items():
        assert_close_rel(gpu.grads[k].cpu(), a, 1e-4, k)
    torch.testing.assert_close(gpu.per_sample_norms.cpu(), cpu.per_sample_norms, rtol=1e-4, atol=0)

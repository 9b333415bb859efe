"""PEFT interop: a DP step on a PEFT LoRA model equals the DP step on our LoRALinear layers with the
same weights and batch (Opacus #820 was a silent corruption of exactly this), and factors convert
both ways. LoRA dropout 0 for the comparison (the two draw different dropout masks otherwise).
Tolerance: 1e-10 relative in float64 (same math, different op order).
"""

from __future__ import annotations

import copy

import pytest
import torch

from _dp_reference import assert_close_rel, randomize_lora_B
from lalora.lora import (canonical_name, copy_lora_weights, get_lora_state, inject_lora, is_peft_lora,
                         lora_modules, set_active_factors)
from lalora.privacy import dp_gradient
from test_per_sample_grads import EncoderClassifier, small_bert, text_batch, text_loss

D = torch.float64


def twin_models():
    """(ours, peft) from one random BERT: LoRA r=4, alpha=8 on query/value, trainable head."""
    from peft import LoraConfig, get_peft_model
    base = small_bert(D)
    for p in base.parameters():
        p.requires_grad_(False)
    ours = copy.deepcopy(base)
    inject_lora(ours, ["query", "value"], r=4, alpha=8, dropout=0.0)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"])
    peft_enc = get_peft_model(copy.deepcopy(base.encoder), cfg)
    theirs = EncoderClassifier.__new__(EncoderClassifier)
    torch.nn.Module.__init__(theirs)
    theirs.encoder, theirs.head = peft_enc, copy.deepcopy(base.head)
    for m in (ours, theirs):
        m.head.requires_grad_(True)
    randomize_lora_B(theirs, seed=4)
    copy_lora_weights(theirs, ours)
    return ours.eval(), theirs.eval()


def ours_name(peft_param_name: str) -> str:
    """encoder.base_model.model.encoder.layer.0.attention.self.query.lora_A.default.weight
    -> encoder.encoder.layer.0.attention.self.query.lora_A"""
    n = canonical_name(peft_param_name)
    for f in ("lora_A", "lora_B"):
        n = n.replace(f".{f}.default.weight", f".{f}")
    return n


def test_lora_modules_sees_peft_layers_and_state_converts():
    ours, theirs = twin_models()
    assert len(lora_modules(theirs)) == 4 and all(is_peft_lora(m) for m in lora_modules(theirs).values())
    s_ours, s_theirs = get_lora_state(ours), get_lora_state(theirs)
    assert set(s_ours) == set(s_theirs)
    for k in s_ours:
        assert torch.equal(s_ours[k], s_theirs[k])
    batch = text_batch(60)
    torch.testing.assert_close(ours(batch["input_ids"], batch["attention_mask"]),
                               theirs(batch["input_ids"], batch["attention_mask"]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("which", ["both", "A", "B"])
def test_dp_step_peft_equals_ours(which):
    ours, theirs = twin_models()
    set_active_factors(ours, which)
    set_active_factors(theirs, which)
    batch = text_batch(60, n=4)
    kw = dict(clip_norm=0.05, noise_multiplier=0.8, expected_batch_size=3.0)
    r_ours = dp_gradient(ours, text_loss, batch, generator=torch.Generator().manual_seed(9), **kw)
    r_theirs = dp_gradient(theirs, text_loss, batch, generator=torch.Generator().manual_seed(9), **kw)
    assert (r_ours.clip_factors < 1).any(), "the test should exercise clipping"
    torch.testing.assert_close(r_theirs.per_sample_norms, r_ours.per_sample_norms, rtol=1e-10, atol=0)
    torch.testing.assert_close(r_theirs.clip_factors, r_ours.clip_factors, rtol=1e-10, atol=0)
    mapped = {ours_name(k): v for k, v in r_theirs.grads.items()}
    assert set(mapped) == set(r_ours.grads) and len(mapped) == (10 if which == "both" else 6)
    for k, g in r_ours.grads.items():   # same noise too: trainable params come in the same order
        assert_close_rel(mapped[k], g, 1e-10, k)
    for n, p in theirs.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n


def test_copy_ours_to_peft_and_scaling_mismatch():
    from peft import LoraConfig, get_peft_model
    ours, theirs = twin_models()
    randomize_lora_B(ours, seed=11)
    copy_lora_weights(ours, theirs)
    for k, v in get_lora_state(ours).items():
        assert torch.equal(get_lora_state(theirs)[k], v)
    other = get_peft_model(copy.deepcopy(small_bert(D).encoder),
                           LoraConfig(r=4, lora_alpha=4, target_modules=["query", "value"]))
    holder = torch.nn.Module()
    holder.encoder = other
    with pytest.raises(ValueError, match="scaling"):
        copy_lora_weights(holder, ours)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_peft_bert_with_saved_head_matches_loop(dtype):
    """A PEFT LoRA model as PEFT builds it -- lora_A/lora_B ModuleDicts and the head kept trainable
    through modules_to_save (a ModulesToSaveWrapper around a trainable copy) -- gets per-sample
    gradients from the one engine equal to a float64-style per-sample loop: 1e-6 relative in
    float64, 1e-4 in float32. The saved head (one row per sample) is also the DP step's ghost-norm
    case: its DP gradient equals the clipped loop sum."""
    from peft import LoraConfig, get_peft_model

    from dplora_kernels import per_sample_gradients
    from test_per_sample_grads import RTOL, check_against_loop

    base = small_bert(dtype)
    for p in base.parameters():
        p.requires_grad_(False)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"],
                     modules_to_save=["head"])
    model = get_peft_model(base, cfg).eval()
    randomize_lora_B(model, seed=2)
    names = {k for k, p in model.named_parameters() if p.requires_grad}
    saved = {k for k in names if "modules_to_save" in k}
    assert saved and all("lora_" in k for k in names - saved), names
    batch = text_batch(60, n=4)
    psg, ref = check_against_loop(model, text_loss, batch, 4, dtype)
    assert set(psg.grads) == names
    # DP step (flat clipping, no noise): the saved head goes through the ghost-norm path
    clip = 0.5 * float(psg.total_sqnorm().sqrt().min())
    res = dp_gradient(model, text_loss, batch, clip_norm=clip, noise_multiplier=0.0,
                      expected_batch_size=1.0, generator=None)
    norms = torch.sqrt(sum(g.reshape(4, -1).double().pow(2).sum(1) for g in ref.values()))
    factors = torch.clamp(clip / (norms + 1e-6), max=1.0)
    for k in saved:
        want = torch.einsum("i,i...->...", factors, ref[k].double())
        assert_close_rel(res.grads[k], want, RTOL[dtype], k)
    assert per_sample_gradients(model, text_loss, batch).ghost == []
    from dplora_kernels import PerSampleGradEngine
    with PerSampleGradEngine(model) as eng:
        ghosted = eng.backward(text_loss(model, batch).sum(), 4, ghost=True)
    assert {k for gl in ghosted.ghost for k in gl.names} == saved   # the DP step took the ghost path

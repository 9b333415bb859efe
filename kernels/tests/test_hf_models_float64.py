"""The users' models of issue 31, offline (random-init configs, no downloads), float64 against a
per-sample loop, with the model check on (dp_gradient's default):

* BERT with PEFT LoRA (query/value, lora_dropout, bias="lora_only", a modules_to_save classifier),
  padded batch: in train mode (dropout on) the default check passes and the step runs; in eval mode
  the clipped sum equals the float64 loop (each padded example alone) to 1e-10;
* a timm ViT (PEFT LoRA on qkv, modules_to_save head), per-layer clipping, equals the float64 loop;
* the same BERT whose classifier weight is ALSO read functionally (a second logit path through
  F.linear) is refused by default, naming the parameter and the cause.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import dplora_kernels as dk  # noqa: E402
from dplora_kernels import checks  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fresh_schedule(monkeypatch):
    monkeypatch.setattr(checks, "_state", checks.weakref.WeakKeyDictionary())


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=16, num_labels=3,
                     hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = peft.get_peft_model(BertForSequenceClassification(cfg), peft.LoraConfig(
        task_type="SEQ_CLS", r=2, lora_alpha=4, lora_dropout=0.1, target_modules=["query", "value"],
        bias="lora_only"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return model.double()


def batch(n=5, t=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (n, t), generator=g)
    lengths = torch.randint(2, t + 1, (n,), generator=g)
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.arange(n) % 3}


def loss_fn(model, b):
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return F.cross_entropy(out, b["labels"], reduction="none")


def test_bert_lora_dropout_lora_only_bias_matches_float64_loop():
    model, b = tiny_bert(), batch()
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    assert any("query.base_layer.bias" in k for k in trainable) and any("classifier" in k for k in trainable)
    model.train()   # dropout on: the default model check runs in eval mode itself and passes
    res = dk.dp_gradient(model, loss_fn, b, clip_norm=1.0, noise_multiplier=0.0, expected_batch_size=5.0,
                         generator=None)
    assert res.batch_size == 5 and model.training
    model.eval()
    res = dk.dp_gradient(model, loss_fn, b, clip_norm=0.1, noise_multiplier=0.0, expected_batch_size=5.0,
                         generator=None)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    per = [torch.autograd.grad(loss_fn(model, {k: v[i:i + 1] for k, v in b.items()}).sum(), list(params.values()))
           for i in range(5)]
    norms = torch.stack([torch.cat([g.reshape(-1) for g in gs]).norm() for gs in per])
    c = (0.1 / (norms + 1e-6)).clamp(max=1.0)
    assert (c < 1).any()   # clipping is active
    for j, k in enumerate(params):
        want = sum(c[i] * per[i][j] for i in range(5)) / 5.0
        assert float((res.grads[k] - want).norm()) <= 1e-10 * float(want.norm()) + 1e-15, k


class FunctionalHead(torch.nn.Module):
    """The BERT above plus a second logit path that reads the classifier's weight through F.linear."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        cls = self.bert.base_model.model.classifier.modules_to_save["default"]
        pooled = out.hidden_states[-1][:, 0]
        return out.logits + F.linear(pooled, cls.weight)


def test_bert_with_a_functionally_read_head_is_refused_by_default():
    model, b = FunctionalHead(tiny_bert()).eval(), batch()

    def fn_loss(m, bb):
        return F.cross_entropy(m(bb["input_ids"], bb["attention_mask"]), bb["labels"], reduction="none")

    with pytest.raises(dk.UnattributedGradientError, match=r"classifier\.modules_to_save\.default\.weight' is used "
                                                           r"both by its module and outside it"):
        dk.dp_gradient(model, fn_loss, b, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=5.0,
                       generator=torch.Generator().manual_seed(0))
    assert all(p.grad is None for p in model.parameters())


def test_timm_vit_lora_qkv_with_saved_head_matches_float64_loop():
    """A small random-init timm ViT, PEFT LoRA on qkv and a modules_to_save head, model check on."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=16,
                            depth=2, num_heads=2, num_classes=3)
    model = peft.get_peft_model(vit, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["qkv"],
                                                     modules_to_save=["head"])).double().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64), torch.arange(4) % 3

    def img_loss(m, b):
        return F.cross_entropy(m(b[0]), b[1], reduction="none")

    res = dk.dp_gradient(model, img_loss, (x, y), clip_norm=0.2, noise_multiplier=0.0, expected_batch_size=4.0,
                         generator=None, clipping="per_layer")
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    assert any("head" in k for k in params)
    ck = 0.2 / len(params) ** 0.5
    for j, (k, p) in enumerate(params.items()):
        want = 0
        for i in range(4):
            gi = torch.autograd.grad(img_loss(model, (x[i:i + 1], y[i:i + 1])).sum(), p)[0]
            want = want + min(1.0, ck / (float(gi.norm()) + 1e-6)) * gi
        want = want / 4.0
        assert float((res.grads[k] - want).norm()) <= 1e-10 * float(want.norm()) + 1e-15, k

"""Model builders and the float64 per-sample-loop check shared by lalora's DP tests (test_dp_step,
test_peft_*, test_unit_probe, test_hf_trainer*): small models with lalora's inject_lora.

The engine's own per-sample-gradient tests moved to kernels/tests/test_engine_per_sample.py (issue 28:
they need only dplora_kernels); this module keeps its name so the tests that import these builders
stay as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from _dp_reference import (assert_close_rel, flat_norms, freeze_all, loop_per_sample_grads,  # noqa: F401
                           randomize_lora_B)
from lalora.lora import inject_lora
from engine_loops import RTOL, SeqMLP, ce_loss, check_against_loop, engine_grads  # noqa: F401


def mlp_model(dtype, seed=0):
    torch.manual_seed(seed)
    model = SeqMLP().to(dtype)
    freeze_all(model)
    inject_lora(model, ["fc1", "fc2"], r=2, alpha=4, dropout=0.05, seed=1)
    model.head.requires_grad_(True)
    randomize_lora_B(model)
    return model.eval()   # dropout off: the loop must see the same function


def small_swin(dtype, seed=0):
    from timm.models.swin_transformer import SwinTransformer
    torch.manual_seed(seed)
    model = SwinTransformer(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2),
                            num_heads=(2, 2), num_classes=5).to(dtype)
    freeze_all(model)
    inject_lora(model, ["qkv", "proj"], r=2, alpha=4, dropout=0.05, seed=1)
    model.head.fc.requires_grad_(True)
    randomize_lora_B(model)
    return model.eval()


def img_loss(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["labels"], reduction="none")


def swin_batch(dtype, n=3, seed=5):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 3, 32, 32, generator=g, dtype=dtype), "labels": torch.arange(n) % 5}


class EncoderClassifier(nn.Module):
    """A HF encoder + mean pooling over unmasked tokens + a linear head (the offline text task)."""

    def __init__(self, encoder, n_cls=3):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, n_cls)

    def forward(self, input_ids, attention_mask):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def text_loss(model, batch):
    logits = model(batch["input_ids"], batch["attention_mask"])
    return F.cross_entropy(logits, batch["labels"], reduction="none")


def text_batch(vocab, n=3, t=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[0, 4:] = 0       # padded sequences: padding must not change the unit or the gradient
    mask[1, 2:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(n) % 3}


BERT_TARGETS = ["query", "key", "value", "attention.output.dense"]


def small_bert(dtype, seed=0):
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                     vocab_size=60, max_position_embeddings=16, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return EncoderClassifier(BertModel(cfg, add_pooling_layer=False)).to(dtype)

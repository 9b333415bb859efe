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
from engine_loops import (BERT_TARGETS, RTOL, EncoderClassifier, SeqMLP, ce_loss, check_against_loop,  # noqa: F401
                          engine_grads, small_bert, text_batch, text_loss)


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



"""LoRALinear, inject_lora, the active-factor switch and LoRA state get/set."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lalora.lora import (LoRALinear, get_lora_state, inject_lora, lora_modules, set_active_factors,
                         set_lora_state, trainable_parameters)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))


def test_lora_linear_init_and_forward():
    base = nn.Linear(10, 7).double()
    layer = LoRALinear(base, r=3, alpha=6, dropout=0.0)
    assert layer.scaling == 2.0 and layer.lora_A.shape == (3, 10) and layer.lora_B.shape == (7, 3)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert torch.count_nonzero(layer.lora_B) == 0
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(10)          # Kaiming-uniform(a=sqrt5) bound
    assert layer.lora_A.std() > 0.3 / math.sqrt(10)
    x = torch.randn(4, 5, 10, dtype=torch.float64)
    torch.testing.assert_close(layer(x), base(x))                   # B = 0: starts at the base
    with torch.no_grad():
        layer.lora_B.normal_()
    expect = base(x) + 2.0 * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expect, rtol=1e-12, atol=1e-12)


def test_dropout_is_default_005_and_applies_to_lora_branch_only():
    layer = LoRALinear(nn.Linear(4, 4), r=2, alpha=2)
    assert layer.dropout.p == 0.05
    layer.dropout.p = 0.9
    layer.train()
    x = torch.ones(64, 4)
    torch.testing.assert_close(layer(x), layer.base(x))             # B = 0: dropout can't show yet


def test_inject_by_suffix_and_regex_seeded():
    m1, m2 = mlp(), mlp()
    names = inject_lora(m1, ["2"], r=2, alpha=4, seed=5)
    assert names == ["2"] and isinstance(m1[2], LoRALinear)
    inject_lora(m2, [r"\d"], r=2, alpha=4, seed=5)
    assert set(lora_modules(m2)) == {"0", "2"}
    m3 = mlp()
    inject_lora(m3, [r"\d"], r=2, alpha=4, seed=5)
    for k, v in get_lora_state(m2).items():                          # same seed -> same A
        torch.testing.assert_close(v, get_lora_state(m3)[k], rtol=0, atol=0)
    m4 = mlp()
    inject_lora(m4, [r"\d"], r=2, alpha=4, seed=6)
    assert not torch.equal(get_lora_state(m4)["0.lora_A"], get_lora_state(m3)["0.lora_A"])


def test_inject_swin_and_bert_names():
    from timm.models.swin_transformer import SwinTransformer
    from transformers import BertConfig, BertModel
    swin = SwinTransformer(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2),
                           num_heads=(2, 2), num_classes=5)
    names = inject_lora(swin, ["qkv", "proj"], r=2, alpha=2)
    assert len(names) == 8 and all(n.endswith(("attn.qkv", "attn.proj")) for n in names)
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=37, vocab_size=50))
    names = inject_lora(bert, ["query", "key", "value", "attention.output.dense"], r=2, alpha=2)
    assert len(names) == 8
    assert "encoder.layer.0.attention.output.dense" in names
    assert "encoder.layer.0.output.dense" not in names                # the FFN output is not matched


def test_reinjection_does_not_wrap_lora_bases():
    m = mlp()
    inject_lora(m, [r"\d"], r=2, alpha=2)
    with pytest.raises(ValueError, match="targets"):       # "0.base" etc. are not candidates
        inject_lora(m, [r".*"], r=2, alpha=2)


def test_errors_name_the_field():
    with pytest.raises(ValueError, match="targets"):
        inject_lora(mlp(), ["nope"], r=2, alpha=2)
    with pytest.raises(ValueError, match="r must"):
        inject_lora(mlp(), ["2"], r=5, alpha=2)          # min(8, 4) = 4
    with pytest.raises(ValueError, match="r must"):
        inject_lora(mlp(), ["2"], r=0, alpha=2)
    m = mlp()
    with pytest.raises(ValueError, match="r must"):
        inject_lora(m, [r"\d"], r=5, alpha=2)            # layer 0 fits, layer 2 does not ...
    assert not lora_modules(m)                           # ... and nothing was changed
    with pytest.raises(ValueError, match="which"):
        set_active_factors(m, "AB")


def test_set_active_factors():
    m = mlp()
    inject_lora(m, [r"\d"], r=2, alpha=2)
    head = m[2].base.weight
    for which, a, b in [("A", True, False), ("B", False, True), ("both", True, True), ("none", False, False)]:
        set_active_factors(m, which)
        for lm in lora_modules(m).values():
            assert lm.lora_A.requires_grad is a and lm.lora_B.requires_grad is b
        assert not head.requires_grad
    set_active_factors(m, "B")
    assert set(trainable_parameters(m)) == {"0.lora_B", "2.lora_B"}


def test_get_set_lora_state_in_place():
    m = mlp()
    inject_lora(m, [r"\d"], r=2, alpha=2)
    state = get_lora_state(m)
    assert set(state) == {"0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"}
    A = m[0].lora_A
    new = {k: torch.randn_like(v) for k, v in state.items()}
    set_lora_state(m, new)
    assert m[0].lora_A is A and torch.equal(A, new["0.lora_A"])
    state["0.lora_A"].add_(1)                                          # clones, not views
    assert not torch.equal(m[0].lora_A, state["0.lora_A"])
    set_lora_state(m, {"2.lora_B": torch.zeros(4, 2)})                  # partial update
    assert torch.count_nonzero(m[2].lora_B) == 0 and torch.equal(m[0].lora_A, new["0.lora_A"])
    with pytest.raises(ValueError, match="state"):
        set_lora_state(m, {"9.lora_A": torch.zeros(2, 6)})
    with pytest.raises(ValueError, match="shape"):
        set_lora_state(m, {"0.lora_A": torch.zeros(3, 6)})

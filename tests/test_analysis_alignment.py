"""Cosine similarity of client updates (lalora.analysis.alignment)."""
import math

import pytest
import torch

from lalora.analysis.alignment import (client_update_alignment, lora_update_vectors, mean_pairwise_cosine,
                                       pairwise_cosine, summarize_alignment)


def _state(seed, mods=("l0.qkv", "l1.proj")):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in mods:
        out[f"{m}.lora_A"] = torch.randn(2, 6, generator=g)
        out[f"{m}.lora_B"] = torch.randn(5, 2, generator=g)
    return out


def test_pairwise_cosine_basic():
    v = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [0.0, 0.0]])
    c = pairwise_cosine(v)
    assert c[0, 1] == 0 and c[0, 2] == -1 and c[1, 1] == 1 and c[3, 0] == 0
    assert mean_pairwise_cosine(v[:3]) == pytest.approx((0 - 1 + 0) / 3)
    assert math.isnan(mean_pairwise_cosine(v[:1]))
    with pytest.raises(ValueError, match="vectors"):
        pairwise_cosine(torch.zeros(3))


def test_update_vectors_and_alignment():
    base, delta = _state(0), _state(1)
    c1 = {k: base[k] + delta[k] for k in base}
    c2 = {k: base[k] + 3.0 * delta[k] for k in base}   # same direction, longer
    c3 = {k: base[k] - delta[k] for k in base}         # opposite factor updates
    vec = lora_update_vectors(base, c1, scaling=0.5)
    m = "l0.qkv"
    expected_ba = 0.5 * (c1[f"{m}.lora_B"] @ c1[f"{m}.lora_A"] - base[f"{m}.lora_B"] @ base[f"{m}.lora_A"])
    torch.testing.assert_close(vec["BA"][: 30], expected_ba.double().flatten())  # "l0.qkv" sorts first
    same = client_update_alignment(base, [c1, c2])
    assert same["A"] == pytest.approx(1.0) and same["B"] == pytest.approx(1.0)
    assert same["BA"] < 1.0  # the product update is not linear in the factor update
    opp = client_update_alignment(base, [c1, c3])
    assert opp["A"] == pytest.approx(-1.0) and opp["B"] == pytest.approx(-1.0)
    # FFA-LoRA-like: A untouched by every client -> NaN, not a fake 0.
    ffa = [{**base, **{k: v for k, v in c.items() if k.endswith("lora_B")}} for c in (c1, c2)]
    res = client_update_alignment(base, ffa)
    assert math.isnan(res["A"]) and res["B"] == pytest.approx(1.0)
    summ = summarize_alignment([res, same])
    assert summ["A"] == pytest.approx(1.0) and summ["B"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="clients"):
        client_update_alignment(base, [c1])
    with pytest.raises(ValueError, match="lora_B"):
        lora_update_vectors({"x.lora_A": torch.zeros(1, 1)}, c1)

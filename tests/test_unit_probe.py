"""The clipping-unit probe (lalora.privacy.unit_probe): models whose rows are not one sample each are
refused, naming the layer; batch-first models (Swin's windows, BERT with padding) pass.

Attack 4 of issue 16: a sequence-first nn.TransformerEncoderLayer and a forward that reorders the
batch between two trainable layers were accepted and clipped on the wrong unit. Here the engine's
per-sample gradients are compared with a per-sample loop by the probe; we also show the wrong unit
is real (without the probe, one sample's clipped contribution exceeds C).
"""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lalora.lora import inject_lora
from lalora.privacy.dp_step import dp_gradient
from lalora.privacy.dp_step import per_sample_gradients as _engine_per_sample_grads
from lalora.privacy.unit_probe import ClippingUnitError, take_samples, verify_clipping_unit

from test_per_sample_grads import (freeze_all, img_loss, randomize_lora_B, small_bert, small_swin,
                                   swin_batch, text_batch, text_loss)

T, D = 4, 8


class SequenceFirst(nn.Module):
    """Batch-first data, a sequence-first encoder layer inside (rows of its Linear layers are time
    steps): the engine sees R = T·N rows and, with T a multiple of N, cannot tell."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.TransformerEncoderLayer(D, nhead=2, dim_feedforward=16, dropout=0.0,
                                                batch_first=False)
        self.head = nn.Linear(D, 3)

    def forward(self, x):                         # x: (N, T, D)
        h = self.layer(x.transpose(0, 1))         # (T, N, D)
        return self.head(h.mean(0))


def seq_first_model():
    model = SequenceFirst()
    freeze_all(model)
    inject_lora(model, ["linear1", "linear2"], r=2, alpha=2, dropout=0.0, seed=0)
    randomize_lora_B(model)
    model.head.requires_grad_(True)
    return model


class Reorders(nn.Module):
    """fc1 sees the batch in order, fc2 sees it reversed (then it is put back)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(OrderedDict(fc1=nn.Linear(D, 16), fc2=nn.Linear(16, 3)))

    def forward(self, x):
        h = torch.tanh(self.net.fc1(x))
        return self.net.fc2(h.flip(0)).flip(0)


def reorder_model():
    model = Reorders()
    freeze_all(model)
    inject_lora(model, ["net.fc1", "net.fc2"], r=2, alpha=2, dropout=0.0, seed=0)
    randomize_lora_B(model)
    return model


def vec_loss(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["labels"], reduction="none")


def vec_batch(shape, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, *shape, generator=g) * 3, "labels": torch.arange(n) % 3}


def test_sequence_first_transformer_is_refused_naming_the_layer():
    model, batch = seq_first_model(), vec_batch((T, D))
    with pytest.raises(ClippingUnitError, match=r"layer\.linear[12]\.lora_[AB]"):
        verify_clipping_unit(model, vec_loss, batch, _engine_per_sample_grads)
    with pytest.raises(ClippingUnitError, match="linear"):
        dp_gradient(model, vec_loss, batch, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=4,
                    generator=torch.Generator().manual_seed(0), verify_unit=True)
    assert all(p.grad is None for p in model.parameters())      # refused before anything was written


def test_batch_reordering_forward_is_refused_naming_the_layer():
    model, batch = reorder_model(), vec_batch((D,))
    with pytest.raises(ClippingUnitError, match=r"net\.fc2\.lora_[AB]"):
        verify_clipping_unit(model, vec_loss, batch, _engine_per_sample_grads)


def test_wrong_unit_really_breaks_clipping():
    """Why the probe exists: on the reordering model, without it, the flat clipping lets one sample
    move the released sum by more than C (noise 0): the probe's failure is a real privacy bug."""
    model, batch = reorder_model(), vec_batch((D,), n=4)
    sums = []
    for b in (batch, take_samples(batch, [0, 1, 2])):   # neighbouring batches: sample 3 removed
        res = dp_gradient(model, vec_loss, b, clip_norm=0.01, noise_multiplier=0.0, expected_batch_size=1.0,
                          generator=None, verify_unit=False)   # opted out: the default probe refuses it
        sums.append(torch.cat([g.reshape(-1) for g in res.grads.values()]))
    assert float((sums[0] - sums[1]).norm()) > 0.01 * 1.2
    with pytest.raises(ClippingUnitError, match=r"net\.fc2\.lora_[AB]"):   # refused by default (issue 31)
        dp_gradient(model, vec_loss, batch, clip_norm=0.01, noise_multiplier=0.0, expected_batch_size=1.0,
                    generator=None)


def test_swin_and_bert_pass():
    swin = small_swin(torch.float32)
    verify_clipping_unit(swin, img_loss, swin_batch(torch.float32), _engine_per_sample_grads)
    bert = small_bert(torch.float32)
    freeze_all(bert)
    inject_lora(bert, ["query", "value"], r=2, alpha=4, seed=1)
    bert.head.requires_grad_(True)
    randomize_lora_B(bert)
    bert.train()   # the probe switches to eval itself (dropout) and restores the mode
    verify_clipping_unit(bert, text_loss, text_batch(60), _engine_per_sample_grads)
    assert bert.training
    res = dp_gradient(bert, text_loss, text_batch(60), clip_norm=1.0, noise_multiplier=0.0,
                      expected_batch_size=3, generator=None, verify_unit=True)
    assert res.batch_size == 3


def test_probe_needs_two_samples_and_keeps_rng():
    model = reorder_model()
    with pytest.raises(ValueError, match="at least 2"):
        verify_clipping_unit(model, vec_loss, vec_batch((D,), n=1), _engine_per_sample_grads)
    state = torch.get_rng_state()
    try:
        verify_clipping_unit(model, vec_loss, vec_batch((D,), n=2), _engine_per_sample_grads)
    except ClippingUnitError:
        pass
    assert torch.equal(state, torch.get_rng_state())


def test_simulator_runs_the_probe_at_start():
    """A federated run on a model that reorders its batch is refused before round 1."""
    from lalora.federated.simulation import Simulator

    from test_federated import tiny_config, tiny_task

    task = tiny_task()
    build = task.build_model

    def reordering_build():
        model = build()
        fc2 = model.fc2
        model.fc2 = _Flipped(fc2)
        return model

    task.build_model = reordering_build
    with pytest.raises(ClippingUnitError, match="fc2"):
        Simulator(tiny_config("la-lora"), task=task)
    Simulator(tiny_config("la-lora"), task=tiny_task())     # the unmodified model passes


class _Flipped(nn.Module):
    """Wraps a layer so that it sees the batch reversed."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.flip(0)).flip(0)

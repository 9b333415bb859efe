"""Safe by default (issue 31): the two silently wrong cases are refused by dp_gradient without opting in.

  * a trainable parameter used by its module AND functionally (F.linear(h, head.weight)): the
    engine drops the functional part -> UnattributedGradientError naming the parameter;
  * sequence-first input (T, N, D) to a LoRA layer with T a multiple of N: each clipping unit mixes
    samples -> ClippingUnitError naming the layer and the layout.
Both are first shown to be really wrong with the check opted out (float64 per-sample loop), then
refused by default, in float32 and float64, before any p.grad is written. The schedule of
checks.py (first call per trainable set, every UNIT_CHECK_EVERY calls, never on N < 2, opt-out) is
counted, and a probed step is bitwise the step without the probe (dropout and noise draws kept).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dplora_kernels as dk
from dplora_kernels import checks, unit_probe
from dplora_kernels.unit_probe import ClippingUnitError, UnattributedGradientError

D, T, C = 6, 4, 3


class MixedUse(nn.Module):
    """head is called as a module AND its weight is read functionally (a second output path)."""

    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.fc = dk.LoRALinear(nn.Linear(D, D), r=2, alpha=2, dropout=0.0)
        self.head = nn.Linear(D, C)
        self.to(dtype)
        for p in self.parameters():
            p.requires_grad_(False)
        for p in (self.fc.lora_A, self.fc.lora_B, self.head.weight, self.head.bias):
            p.requires_grad_(True)
        with torch.no_grad():
            self.fc.lora_B.normal_(0, 0.5)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.head(h) + 0.5 * F.linear(h.flip(-1), self.head.weight)


class SequenceFirstLoRA(nn.Module):
    """Batch-first data; the LoRA layer is fed (T, N, D), as a sequence-first encoder would."""

    def __init__(self, dtype, dropout=0.0):
        super().__init__()
        torch.manual_seed(0)
        self.fc = dk.LoRALinear(nn.Linear(D, D), r=2, alpha=2, dropout=dropout)
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, C)
        self.to(dtype)
        for p in self.parameters():
            p.requires_grad_(False)
        self.fc.lora_A.requires_grad_(True)
        self.fc.lora_B.requires_grad_(True)
        with torch.no_grad():
            self.fc.lora_B.normal_(0, 0.5)

    def forward(self, x):                         # x (N, T, D)
        h = self.fc(x.transpose(0, 1))            # (T, N, D): rows are time steps
        h = torch.tanh(h) * torch.tanh(self.mix(h)).mean(0, keepdim=True)
        return self.head(h.mean(0))


class BatchFirstLoRA(SequenceFirstLoRA):
    def forward(self, x):
        h = self.fc(x)
        return self.head(torch.tanh(h).mean(1))


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def batch_of(n, dtype, seed=1, seq=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, T, D, generator=g, dtype=torch.float64) if seq else torch.randn(n, D, generator=g, dtype=torch.float64)
    return x.to(dtype), torch.arange(n) % C


def loop_grads(model, batch):
    """float64 per-sample loop: each sample alone, autograd."""
    model64 = copy.deepcopy(model).double()
    params = {k: p for k, p in model64.named_parameters() if p.requires_grad}
    x, y = batch
    out = {k: [] for k in params}
    for i in range(x.shape[0]):
        gs = torch.autograd.grad(loss_fn(model64, (x[i:i + 1].double(), y[i:i + 1])).sum(), list(params.values()))
        for k, g in zip(params, gs):
            out[k].append(g)
    return {k: torch.stack(v) for k, v in out.items()}


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def step(model, batch, **kw):
    return dk.dp_gradient(model, loss_fn, batch, clip_norm=1.0, noise_multiplier=0.0, expected_batch_size=4.0,
                          generator=None, **kw)


@pytest.fixture(autouse=True)
def fresh_schedule(monkeypatch):
    monkeypatch.setattr(checks, "_state", checks.weakref.WeakKeyDictionary())


def test_mixed_functional_use_is_really_wrong_without_the_check():
    model, batch = MixedUse(torch.float64), batch_of(4, torch.float64, seq=False)
    psg = dk.per_sample_gradients(model, loss_fn, batch)
    ref = loop_grads(model, batch)
    assert rel(psg.grads["head.weight"], ref["head.weight"]) > 0.05      # the functional part is missing
    assert rel(psg.grads["fc.lora_B"], ref["fc.lora_B"]) < 1e-10         # untouched parameters are exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mixed_functional_use_is_refused_by_default(dtype):
    model, batch = MixedUse(dtype), batch_of(4, dtype, seq=False)
    with pytest.raises(UnattributedGradientError, match=r"'head\.weight' is used both by its module and outside"
                                                        r".*F\.linear"):
        step(model, batch)
    assert all(p.grad is None for p in model.parameters())
    step(model, batch, verify_unit=False)                                # the explicit opt-out runs
    assert model.head.weight.grad is not None


def test_sequence_first_is_really_wrong_without_the_check():
    model, batch = SequenceFirstLoRA(torch.float64), batch_of(4, torch.float64)
    psg = dk.per_sample_gradients(model, loss_fn, batch)
    ref = loop_grads(model, batch)
    assert rel(psg.grads["fc.lora_A"], ref["fc.lora_A"]) > 0.05
    # every row is still counted once: the summed gradient is right, only the unit is wrong
    assert rel(psg.grads["fc.lora_A"].sum(0), ref["fc.lora_A"].sum(0)) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sequence_first_is_refused_by_default_naming_the_cause(dtype):
    model, batch = SequenceFirstLoRA(dtype), batch_of(4, dtype)
    with pytest.raises(ClippingUnitError, match=r"fc\.lora_[AB].*not one sample each \(sequence-first") as err:
        step(model, batch)
    assert not isinstance(err.value, UnattributedGradientError)
    assert all(p.grad is None for p in model.parameters())


def test_batch_first_passes_and_matches_the_float64_loop():
    model, batch = BatchFirstLoRA(torch.float64), batch_of(4, torch.float64)
    res = step(model, batch, clipping="flat")
    ref = loop_grads(model, batch)
    norms = torch.cat([g.reshape(4, -1) for g in ref.values()], 1).norm(dim=1)
    c = (1.0 / (norms + 1e-6)).clamp(max=1.0)
    for k, g in ref.items():
        want = (c.view(-1, *[1] * (g.dim() - 1)) * g).sum(0) / 4.0
        assert rel(res.grads[k], want) < 1e-10


def test_schedule_first_call_per_trainable_set_then_every_k(monkeypatch):
    calls = []
    real = unit_probe.verify_clipping_unit
    monkeypatch.setattr(unit_probe, "verify_clipping_unit", lambda *a, **k: (calls.append(1), real(*a, **k)))
    monkeypatch.setattr(checks, "UNIT_CHECK_EVERY", 4)
    model = BatchFirstLoRA(torch.float32)
    step(model, batch_of(1, torch.float32))           # one sample cannot mix samples: not probed
    assert len(calls) == 0
    step(model, batch_of(0, torch.float32))           # nor an empty batch
    step(model, batch_of(3, torch.float32))           # first call with >= 2 samples
    assert len(calls) == 1
    step(model, batch_of(3, torch.float32))
    step(model, batch_of(3, torch.float32))
    assert len(calls) == 1
    model.fc.lora_A.requires_grad_(False)             # a new trainable set (alternating A/B)
    step(model, batch_of(3, torch.float32))
    assert len(calls) == 2
    model.fc.lora_A.requires_grad_(True)              # back to a checked set: not probed again...
    for _ in range(3):
        step(model, batch_of(3, torch.float32))
    assert len(calls) == 2
    step(model, batch_of(3, torch.float32))           # ...until 4 calls after the last probe
    assert len(calls) == 3
    step(model, batch_of(3, torch.float32), verify_unit=True)
    assert len(calls) == 4
    step(model, batch_of(3, torch.float32), verify_unit=False)
    assert len(calls) == 4
    with pytest.raises(ValueError, match="verify_unit"):
        step(model, batch_of(3, torch.float32), verify_unit="yes")


def test_probed_step_is_bitwise_the_unprobed_step():
    """The probe forks the RNG and runs in eval mode: dropout masks and noise draws are unchanged."""
    base = BatchFirstLoRA(torch.float32, dropout=0.3)
    batch = batch_of(5, torch.float32)
    out = []
    for verify in (None, False):
        model = copy.deepcopy(base).train()
        torch.manual_seed(7)
        res = dk.dp_gradient(model, loss_fn, batch, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=5.0,
                             generator=torch.Generator().manual_seed(3), verify_unit=verify)
        out.append(res.grads)
        assert model.training
    for k in out[0]:
        assert torch.equal(out[0][k], out[1][k])


def _autocast_loss(model, batch):
    """A loss_fn that autocasts its own forward to bf16 (Hugging Face style); fp32 parameters."""
    x, y = batch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    return F.cross_entropy(out.float(), y, reduction="none")


def test_a_loss_fn_that_autocasts_itself_is_not_refused():
    """fp32 weights, bf16 autocast inside loss_fn: engine and autograd differ by bf16 rounding only,
    which must not read as a misuse (it did at the fp32 tolerance: the GPU check's bf16 bench)."""
    model, batch = BatchFirstLoRA(torch.float32), batch_of(4, torch.float32)
    res = dk.dp_gradient(model, _autocast_loss, batch, clip_norm=1.0, noise_multiplier=0.0,
                         expected_batch_size=4.0, generator=None)
    assert res.batch_size == 4 and model.fc.lora_A.grad is not None


def test_misuse_under_a_self_autocasting_loss_fn_is_still_refused():
    model, batch = MixedUse(torch.float32), batch_of(4, torch.float32, seq=False)
    with pytest.raises(UnattributedGradientError, match=r"'head\.weight'"):
        dk.dp_gradient(model, _autocast_loss, batch, clip_norm=1.0, noise_multiplier=0.0,
                       expected_batch_size=4.0, generator=None)
    model, batch = SequenceFirstLoRA(torch.float32), batch_of(4, torch.float32)
    with pytest.raises(ClippingUnitError):
        dk.dp_gradient(model, _autocast_loss, batch, clip_norm=1.0, noise_multiplier=0.0,
                       expected_batch_size=4.0, generator=None)

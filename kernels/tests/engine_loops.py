"""Reference for the engine tests: per-sample gradients by a loop over samples (microbatch of one,
ordinary autograd), and small helpers to put dplora_kernels' LoRALinear into test models (the
kernels' tests import nothing of lalora)."""

from __future__ import annotations

import torch
from torch import nn

from dplora_kernels import LoRALinear
from dplora_kernels.engine import PerSampleGradEngine

RTOL = {torch.float64: 1e-6, torch.float32: 1e-4}


def slice_batch(batch, i: int):
    """Sample i of a batch (dict, tensor or tuple), keeping the batch dimension (size 1)."""
    if isinstance(batch, torch.Tensor):
        return batch[i:i + 1]
    if isinstance(batch, dict):
        return {k: v[i:i + 1] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return type(batch)(v[i:i + 1] if isinstance(v, torch.Tensor) else v for v in batch)


def loop_per_sample_grads(model: nn.Module, loss_fn, batch, n: int) -> dict[str, torch.Tensor]:
    """{name: (N, *shape)} per-sample gradients of the trainable parameters, one backward per sample."""
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    out = {k: [] for k in params}
    for i in range(n):
        loss = loss_fn(model, slice_batch(batch, i)).sum()
        gs = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (k, p), g in zip(params.items(), gs):
            out[k].append(torch.zeros_like(p) if g is None else g)
    return {k: torch.stack(v) for k, v in out.items()}


def flat_norms(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    n = next(iter(grads.values())).shape[0]
    return torch.sqrt(sum(g.reshape(n, -1).double().pow(2).sum(1) for g in grads.values()))


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "") -> None:
    """max |a - e| <= rtol * max |e| (relative to the tensor's scale, robust to exact zeros)."""
    scale = expected.abs().max().clamp_min(1e-30)
    err = (actual.to(expected.dtype) - expected).abs().max()
    assert err <= rtol * scale, f"{what}: max abs err {err:.3e} > {rtol:.0e} * {scale:.3e}"


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def add_lora(model: nn.Module, suffixes, r: int, alpha: float, dropout: float = 0.05, *,
             seed: int | None = None) -> list[str]:
    """Wrap every nn.Linear whose name ends with one of `suffixes` in a LoRALinear, in place (A drawn
    from one generator seeded with `seed`, modules in name order). Returns the wrapped names."""
    names = sorted(n for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and any(n == s or n.endswith("." + s) for s in suffixes))
    assert names, f"no nn.Linear named like {list(suffixes)}"
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, LoRALinear(getattr(owner, leaf), r, alpha, dropout, generator=gen))
    return names


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def set_active_factors(model: nn.Module, which: str) -> None:
    """requires_grad of every LoRA factor: only "A", only "B", "both" or "none"."""
    for m in lora_layers(model):
        m.lora_A.requires_grad_(which in ("A", "both"))
        m.lora_B.requires_grad_(which in ("B", "both"))


def randomize_lora_B(model: nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """B starts at 0 (so grad A = 0); tests need a non-zero B to exercise the A-gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g, dtype=m.lora_B.dtype) * scale)


def engine_grads(model, loss_fn, batch, n):
    with PerSampleGradEngine(model, backend="torch") as eng:
        psg = eng.backward(loss_fn(model, batch).sum(), n)
    return psg


def check_against_loop(model, loss_fn, batch, n, dtype):
    """The engine's per-sample gradients and flat norms against the float64-capable loop, at RTOL."""
    psg = engine_grads(model, loss_fn, batch, n)
    ref = loop_per_sample_grads(model, loss_fn, batch, n)
    assert set(psg.grads) == set(ref) and ref, "engine and loop must cover the same trainable params"
    for k in ref:
        assert psg.grads[k].shape == ref[k].shape, k
        assert_close_rel(psg.grads[k], ref[k], RTOL[dtype], k)
        assert ref[k].abs().max() > 0, f"{k}: zero reference gradient makes the test vacuous"
    ref_norms = flat_norms(ref)
    eng_norms = psg.total_sqnorm().double().sqrt()
    torch.testing.assert_close(eng_norms, ref_norms, rtol=RTOL[dtype], atol=0)
    return psg, ref


class SeqMLP(nn.Module):
    """MLP applied per position, mean-pooled: exercises the (N, T, d) layout."""

    def __init__(self, d_in=6, d_h=8, n_cls=3):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(d_in, d_h), nn.Linear(d_h, d_h), nn.Linear(d_h, n_cls)

    def forward(self, x):
        h = torch.tanh(self.fc2(torch.tanh(self.fc1(x))))
        return self.head(h.mean(1) if h.dim() == 3 else h)


def ce_loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch["x"]), batch["labels"], reduction="none")

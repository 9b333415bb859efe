"""Reference for the engine tests: per-sample gradients by a loop over samples (microbatch of one,
ordinary autograd), and small helpers to put dplora_kernels' LoRALinear into test models (the
kernels' tests import nothing of lalora)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


# ---- text models and Trainer arguments shared by the kernels' and lalora's tests
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


def trainer_args(tmp_path, **kw):
    from transformers import TrainingArguments
    base = dict(per_device_train_batch_size=6, max_steps=4, learning_rate=0.5, optim="sgd",
                lr_scheduler_type="constant", weight_decay=0.0, warmup_steps=0, logging_steps=1,
                save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=3)
    base.update(kw)
    return TrainingArguments(str(tmp_path / "out"), **base)

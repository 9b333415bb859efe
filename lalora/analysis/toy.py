"""A tiny synthetic classification task, for checks that need the federated pipeline but no data.

Gaussian class clusters in R^d, a frozen two-layer MLP (LoRA on both linear layers) and a
trainable head: it builds in milliseconds, so the unit tests of the analysis drivers (alignment
traces, sharpness of a global model) and the notebooks' pipeline checks (e.g. that the filter flag
does not change the calibrated σ) can run the real ``Simulator`` in a second. It is registered
nowhere; pass it as ``task=`` to ``Simulator`` / ``run_experiment``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lalora.tasks.registry import Task

__all__ = ["toy_task"]


class _TensorDataset(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _collate(items: list[dict]) -> dict:
    return {"x": torch.stack([it["x"] for it in items]), "labels": torch.stack([it["labels"] for it in items])}


def toy_task(
    *, num_classes: int = 4, dim: int = 12, hidden: int = 16, train_size: int = 320, test_size: int = 160,
    r: int = 4, alpha: float = 4.0, seed: int = 0, defaults: dict | None = None,
) -> Task:
    """Gaussian clusters (unit spread around random means), frozen MLP with LoRA, trainable head."""
    from lalora.lora import inject_lora

    g = torch.Generator().manual_seed(seed)
    means = 2.0 * torch.randn(num_classes, dim, generator=g)

    def draw(n: int):
        y = torch.randint(0, num_classes, (n,), generator=g)
        return means[y] + torch.randn(n, dim, generator=g), y

    xtr, ytr = draw(train_size)
    xte, yte = draw(test_size)

    def build_model() -> nn.Module:
        torch.manual_seed(seed)
        model = nn.Sequential()
        model.add_module("fc1", nn.Linear(dim, hidden))
        model.add_module("act", nn.Tanh())
        model.add_module("fc2", nn.Linear(hidden, hidden))
        model.add_module("act2", nn.Tanh())
        model.add_module("head", nn.Linear(hidden, num_classes))
        for p in model.parameters():
            p.requires_grad_(False)
        inject_lora(model, ["fc1", "fc2"], r=r, alpha=alpha, dropout=0.0, seed=seed)
        for p in model.head.parameters():
            p.requires_grad_(True)
        return model

    base_defaults = dict(clients=4, clients_per_round=2, partition="iid", beta=0.5, rounds=3, local_steps=4,
                         batch_size=16, optimizer="sgd", lr=0.2, momentum=0.0, weight_decay=0.0, lr_decay=1.0,
                         r=r, alpha=alpha, eval_batch_size=256)
    return Task(
        name="toy", num_classes=num_classes, train=_TensorDataset(xtr, ytr), test=_TensorDataset(xte, yte),
        train_labels=ytr.numpy().astype(np.int64), build_model=build_model, lora_targets=["fc1", "fc2"],
        head_name="head", forward=lambda model, batch: model(batch["x"]), collate=_collate,
        defaults={**base_defaults, **(defaults or {})}, test_labels=yte.numpy().astype(np.int64),
    )

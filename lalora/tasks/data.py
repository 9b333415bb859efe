"""Small dataset helpers shared by the tasks: an in-memory dict-of-tensors dataset, its
collate function, and a seeded stratified split.

Offline tasks are small enough to keep fully in memory as tensors, which lets the federated
loop gather a Poisson batch with one index operation (``TensorDictDataset.batch``) instead of
a Python loop over items.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset


class TensorDictDataset(Dataset):
    """Rows of several aligned tensors; item i is ``{key: tensor[i]}``."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        lengths = {k: len(v) for k, v in tensors.items()}
        if "labels" not in tensors:
            raise ValueError("tensors must contain 'labels'")
        if len(set(lengths.values())) != 1:
            raise ValueError(f"tensors have different lengths: {lengths}")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors["labels"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}

    def batch(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """The collated batch of ``indices`` (may be empty: zero-length tensors)."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return {k: v[idx] for k, v in self.tensors.items()}

    def subset(self, indices: Sequence[int] | np.ndarray) -> "TensorDictDataset":
        return TensorDictDataset(self.batch(indices))


def stack_collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """Stack each key; an empty list is an error (use ``TensorDictDataset.batch([])`` for that)."""
    if not items:
        raise ValueError("stack_collate got an empty list of items")
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def stratified_split(
    labels: np.ndarray, fractions: Sequence[float], seed: int
) -> list[np.ndarray]:
    """Split indices into len(fractions) disjoint parts, class by class, seeded.

    Within each class the indices are permuted with ``np.random.default_rng(seed)`` and cut at
    the rounded cumulative fractions; the last part takes the remainder, so every index lands in
    exactly one part. Returned index arrays are sorted.
    """
    labels = np.asarray(labels)
    fr = np.asarray(fractions, dtype=float)
    if fr.ndim != 1 or np.any(fr < 0) or abs(fr.sum() - 1) > 1e-6:
        raise ValueError(f"fractions must be >= 0 and sum to 1, got {list(fractions)}")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fr]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cuts = np.round(np.cumsum(fr) * len(idx)).astype(int)
        cuts[-1] = len(idx)
        start = 0
        for j, end in enumerate(cuts):
            parts[j].append(idx[start:end])
            start = end
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]

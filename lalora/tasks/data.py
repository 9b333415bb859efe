"""Dataset helpers shared by the tasks: an in-memory dict-of-tensors dataset, its collate
function, a seeded stratified split, and the per-item image datasets of the paper's 224² tasks
(``ImageDataset``, ``use_device``, ``make_loader``).

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


# --------------------------------------------------------------------------- public validation split
EVAL_SPLITS = ("test", "validation")


def check_eval_split(eval_split: str, validation_fraction: float) -> None:
    """One-line errors for the two task options that select what a run is evaluated on."""
    if eval_split not in EVAL_SPLITS:
        raise ValueError(f"eval_split must be one of {', '.join(EVAL_SPLITS)}; got {eval_split!r}")
    if isinstance(validation_fraction, bool) or not isinstance(validation_fraction, (int, float)) \
            or not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be a number in [0, 1), got {validation_fraction!r}")
    if eval_split == "validation" and validation_fraction == 0:
        raise ValueError("eval_split='validation' needs validation_fraction > 0 (there is no validation split)")


def carve_validation(indices: np.ndarray, labels: np.ndarray, count_fraction: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(validation, rest): ``count_fraction`` of ``indices`` (indices into ``labels``), stratified by
    class and seeded, and the remainder; both sorted, disjoint, covering ``indices``.

    Why a second split and not one more part of the first: the first split's public / test / private
    indices stay exactly what they were, so a run with a validation split trains on the same private
    data and is scored on the same test images as one without (only the carved-from part shrinks).
    """
    indices = np.asarray(indices, dtype=np.int64)
    if not 0 < count_fraction < 1:
        raise ValueError(f"the validation split must take a fraction in (0, 1) of its source split, "
                         f"got {count_fraction!r}")
    val_pos, rest_pos = stratified_split(np.asarray(labels)[indices], [count_fraction, 1 - count_fraction], seed)
    if len(val_pos) == 0 or len(rest_pos) == 0:
        raise ValueError(f"validation_fraction leaves an empty split ({len(val_pos)} validation, "
                         f"{len(rest_pos)} left of {len(indices)})")
    return indices[val_pos], indices[rest_pos]


# --------------------------------------------------------------------------- images read per item
# The paper's 224² tasks cannot be held as tensors (Tiny-ImageNet's 100k images at 224² in
# float32 are 60 GB), so their datasets keep only what the files hold (CIFAR's uint8 pickles, a
# list of image paths) and decode, resize and normalise each item when it is asked for. The
# federated client asks for arbitrary Poisson index sets (``ClientData.batch``), so ``batch``
# decodes one index set directly -- on a thread pool when a device needs it fast -- instead of
# going through a DataLoader that would have to be rebuilt for every step; the sequential
# evaluation pass uses a real DataLoader (``make_loader``) with worker processes on CUDA.
def to_rgb(image):
    """PIL image -> RGB (a top-level function, so transforms pickle into DataLoader workers)."""
    return image.convert("RGB")


class CifarPickleImages:
    """CIFAR-100's ``cifar-100-python/<split>`` pickle: item i is a 32×32 RGB PIL image.

    Read directly (not through torchvision's CIFAR100) because torchvision re-hashes the
    160 MB pickles with md5 at every load and refuses any file that is not the published one.
    """

    def __init__(self, path):
        import pickle

        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        data = np.asarray(entry["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(f"{path}: 'data' must be (N, 3072) uint8 rows, got shape {data.shape}")
        self.images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # a view: no copy
        self.labels = [int(v) for v in entry["fine_labels"]]
        if len(self.labels) != len(self.images):
            raise ValueError(f"{path}: {len(self.images)} images but {len(self.labels)} fine_labels")

    def __len__(self) -> int:
        return len(self.images)

    def __call__(self, i: int):
        from PIL import Image

        return Image.fromarray(self.images[i])


class ImageFiles:
    """A list of image files: item i is ``files[i]`` decoded to RGB."""

    def __init__(self, files):
        self.files = [str(f) for f in files]

    def __len__(self) -> int:
        return len(self.files)

    def __call__(self, i: int):
        from PIL import Image

        with Image.open(self.files[i]) as im:
            return im.convert("RGB")


class ImageDataset(Dataset):
    """``read(i)`` -> PIL image, ``transform`` -> tensor; item i is {"pixel_values", "labels"}.

    ``index`` maps item positions to ``read`` positions (a subset shares ``read``: no copy).
    ``workers > 1`` decodes a ``batch`` on that many threads (PIL and torch release the GIL while
    resizing); ``pin_memory`` returns page-locked batches for asynchronous host-to-GPU copies.
    Both are set by :func:`use_device` and stay off on a CPU.
    """

    def __init__(self, read, targets, transform, index=None, workers: int = 0, pin_memory: bool = False):
        self.read, self.transform = read, transform
        self.targets = [int(t) for t in targets]
        self.index = None if index is None else np.asarray(index, np.int64)
        if self.index is not None and len(self.index) != len(self.targets):
            raise ValueError(f"index has {len(self.index)} entries but targets {len(self.targets)}")
        self.workers, self.pin_memory = int(workers), bool(pin_memory)
        self._pool = None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = int(i) if self.index is None else int(self.index[int(i)])
        return {"pixel_values": self.transform(self.read(j)), "labels": torch.tensor(self.targets[int(i)])}

    def __getstate__(self):  # the thread pool stays in the process that made it
        state = dict(self.__dict__)
        state["_pool"] = None
        return state

    def subset(self, positions) -> "ImageDataset":
        positions = np.asarray(positions, np.int64)
        base = np.arange(len(self)) if self.index is None else self.index
        return ImageDataset(self.read, [self.targets[p] for p in positions], self.transform, base[positions],
                            self.workers, self.pin_memory)

    def batch(self, indices) -> dict[str, torch.Tensor]:
        """The collated batch of ``indices`` (empty: zero-length tensors of the item shapes)."""
        idx = [int(i) for i in np.asarray(indices, dtype=np.int64).reshape(-1)]
        if not idx:
            one = self[0]
            return {k: v.new_empty((0, *v.shape)) for k, v in one.items()}
        if self.workers > 1 and len(idx) > 1:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="lalora-images")
            items = list(self._pool.map(self.__getitem__, idx))
        else:
            items = [self[i] for i in idx]
        out = stack_collate(items)
        if self.pin_memory:
            out = {k: v.pin_memory() for k, v in out.items()}
        return out


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def default_workers() -> int:
    import os

    return max(1, min(8, (os.cpu_count() or 1) - 1))


def use_device(dataset, device="cpu", workers: int | None = None):
    """Configure an :class:`ImageDataset` for ``device``: decoding threads (default: CPU count - 1,
    at most 8) and pinned memory on CUDA; on a CPU no pinning and no threads unless ``workers`` asks.

    Other datasets (the offline tasks' in-memory tensors) are returned unchanged."""
    if isinstance(dataset, ImageDataset):
        cuda = _is_cuda(device)
        dataset.workers = int(workers) if workers is not None else (default_workers() if cuda else 0)
        dataset.pin_memory = cuda
    return dataset


def make_loader(dataset, batch_size: int, device="cpu", indices=None, workers: int | None = None,
                shuffle: bool = False, generator: torch.Generator | None = None):
    """A DataLoader over ``dataset`` (or its ``indices``), for a sequential pass such as evaluation.

    On CUDA: ``workers`` processes (default: CPU count - 1, at most 8) and pinned memory so the
    copy to the device overlaps compute; on a CPU: the main process unless ``workers`` asks, no
    pinning (workers would compete with the model for the same cores)."""
    from torch.utils.data import DataLoader, Subset

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    data = dataset if indices is None else Subset(dataset, [int(i) for i in np.asarray(indices).reshape(-1)])
    cuda = _is_cuda(device)
    n_workers = int(workers) if workers is not None else (default_workers() if cuda else 0)
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=n_workers, pin_memory=cuda, collate_fn=stack_collate,
                      persistent_workers=False)

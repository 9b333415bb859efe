"""Deterministic, cached, non-private pretraining of the offline tasks' small backbones.

Why: the paper fine-tunes *pretrained* Swins. No pretrained small Swin ships offline, so the
offline vision tasks pretrain one themselves on a PUBLIC split of the data (disjoint from the
private split the clients fine-tune on, and from the test set). Pretraining is not private and
uses no private sample, so it costs no privacy budget.

The result is cached on disk under ``cache_dir()`` (env ``LALORA_CACHE``, default
``~/.cache/lalora``) in a file named by a SHA-256 content hash of everything that can change the
weights: the protocol and training config, the public data's bytes, the architecture config and
:func:`pretrain_environment` (a SHA-256 of the source files that produce the weights, the
torch/numpy/timm versions, the CPU's float ISA flags and the pretraining thread count). No version
number is bumped by hand: a stale cache entry (issue 19) cannot be hit after a code change. Writes are
atomic (temporary file in the same folder, then ``os.replace``), so concurrent runs never read a
half-written file; two runs racing simply both write the same bytes.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# The modules whose code decides the backbone's weights (hashed into the cache key).
PRETRAIN_SOURCES = ("lalora.tasks.pretrain", "lalora.tasks.vision", "lalora.tasks.data")
# Pretraining always runs on this many intra-op threads, whatever the caller set: float reductions
# are ordered differently with another thread count (issue 19 measured four different backbones
# from 1/2 threads and ISA variants), so a fixed count makes the weights a function of the config,
# the data, the code and the ISA only -- a notebook kernel, a test process and a Flower node on the
# same machine then build the same backbone.
PRETRAIN_THREADS = 1


def pretrain_environment() -> dict:
    """What besides the config and the data changes the pretrained weights (part of the key).

    ISA flags (and the fixed PRETRAIN_THREADS) are in because float reductions are ordered
    differently with another vector width or thread count (measured in issue 19: see the README's
    reproducibility notes)."""
    from lalora.provenance import cpu_info, library_versions, source_hash

    versions = library_versions()
    return {"code": source_hash(*PRETRAIN_SOURCES),
            "torch": versions["torch"], "numpy": versions["numpy"], "timm": versions["timm"],
            "float_flags": cpu_info()["float_flags"], "threads": PRETRAIN_THREADS}


def cache_dir() -> Path:
    return Path(os.environ.get("LALORA_CACHE") or Path.home() / ".cache" / "lalora")


def content_hash(spec: dict, arrays: dict[str, np.ndarray | torch.Tensor]) -> str:
    """SHA-256 over a JSON spec (sorted keys) and the raw bytes, dtype and shape of each array."""
    h = hashlib.sha256()
    h.update(json.dumps(spec, sort_keys=True, default=str).encode())
    for key in sorted(arrays):
        a = arrays[key]
        a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        a = np.ascontiguousarray(a)
        h.update(f"{key}|{a.dtype.str}|{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save through lalora.results' atomic writer, readable by other users of the cache."""
    import io

    from lalora.results import atomic_write_bytes

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue(), mode=0o644)

def cached(name: str, key: str, build: Callable[[], dict], *, announce: Callable[[Path], None] | None = None
           ) -> tuple[dict, bool]:
    """Load ``<cache>/<name>-<key[:16]>.pt`` or build, save atomically and return it.

    Returns (payload, was_cached). The payload is a dict (e.g. {"state_dict": ..., "meta": ...}).
    A corrupt/unreadable cache file is rebuilt and overwritten. ``announce(path)`` is called
    before a build (the one-line notice of long first-time work).
    """
    path = cache_dir() / f"{name}-{key[:16]}.pt"
    if path.exists():
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if payload.get("key") == key:
                return payload, True
        except Exception:  # noqa: BLE001 -- fall through and rebuild
            pass
    if announce is not None:
        announce(path)
    payload = build()
    payload["key"] = key
    atomic_torch_save(payload, path)
    return payload, False


@dataclass(frozen=True)
class PretrainConfig:
    """Supervised pretraining of the whole network on the public split (AdamW, cosine lr)."""

    epochs: int = 60
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.05
    # Optional augmentation (off by default: on digits, 60 epochs without it reached 83% test
    # accuracy vs 71% for 40 epochs with +-10 deg / 10% shifts).
    max_shift: float = 0.0  # random translation, as a fraction of the image side
    max_rotate_deg: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise ValueError(f"pretrain epochs must be an int >= 0, got {self.epochs!r}")
        if self.batch_size < 1:
            raise ValueError(f"pretrain batch_size must be >= 1, got {self.batch_size}")


def _augment(x: torch.Tensor, cfg: PretrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Random small rotation + translation (one affine per image), border filled by replication."""
    n = x.shape[0]
    ang = (torch.rand(n, generator=gen) * 2 - 1) * cfg.max_rotate_deg * np.pi / 180
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * cfg.max_shift * 2  # grid units span 2
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


# Measured: 27 s of process CPU for 60 epochs over the 359 digits public images (2-core Xeon,
# one thread), i.e. about 1.3 ms per image-epoch; used only for the first-run notice.
SECONDS_PER_IMAGE_EPOCH = 1.3e-3


def pretrain_eta(cfg: PretrainConfig, n_images: int) -> str:
    seconds = SECONDS_PER_IMAGE_EPOCH * cfg.epochs * n_images
    return f"about {max(1, round(seconds))} s of CPU, minutes on a busy machine"


def pretrain_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: PretrainConfig) -> dict:
    """Train every parameter of ``model`` (an image classifier) on (x, y); returns stats.

    Deterministic: one torch.Generator seeded with ``cfg.seed`` drives the order and the
    augmentation; model init is the caller's (seed it before building the model).
    """
    cfg.validate()
    threads = torch.get_num_threads()
    torch.set_num_threads(PRETRAIN_THREADS)   # see PRETRAIN_THREADS
    try:
        return _pretrain(model, x, y, cfg)
    finally:
        torch.set_num_threads(threads)


def _pretrain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: PretrainConfig) -> dict:
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, -(-len(x) // cfg.batch_size))
    total = max(1, cfg.epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * min(s, total) / total)))
    model.train()
    t0 = time.perf_counter()
    last = float("nan")
    from tqdm.auto import tqdm

    from lalora.announce import progress_enabled

    for _ in tqdm(range(cfg.epochs), desc="pretraining", unit="epoch", leave=False,
                  disable=not progress_enabled(), file=sys.stderr):
        order = torch.randperm(len(x), generator=gen)
        for s in range(steps_per_epoch):
            idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            xb = _augment(x[idx], cfg, gen) if (cfg.max_shift or cfg.max_rotate_deg) else x[idx]
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            last = float(loss.detach())
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean()) if len(x) else float("nan")
    return {"seconds": time.perf_counter() - t0, "final_loss": last, "public_train_accuracy": acc,
            "config": asdict(cfg)}

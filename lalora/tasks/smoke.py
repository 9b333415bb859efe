"""Smoke tasks: the paper's models and shapes on generated inputs, nothing downloaded or read.

``smoke-swin-t`` / ``smoke-swin-b``: torchvision ``FakeData`` images at 224² through the paper
tasks' own per-item transform (:func:`lalora.tasks.paper.image_transform`) and ImageDataset, on a
randomly initialised timm Swin-T / Swin-B with the paper's LoRA (r = α = 16 on attn.qkv,
attn.proj) and head. ``smoke-roberta-base``: RoBERTa-base's configuration (12 layers, hidden 768,
vocabulary 50,265) with random weights, random token ids at max_len 128, the paper's LoRA
(r = α = 8) and RoBERTa classification head. Experiment defaults are the paper's (SPEC §4), with
500 samples per client, so a round does the paper's work: what ``benchmarks/paper_projection.py``
times to price the full grids on a GPU.

Labels are seeded and independent of the images: accuracy is meaningless (chance); the tasks
exist to run every code path at the paper's shapes and to measure seconds per round.

Size: ``LALORA_SMOKE_SIZE=paper`` (default) is the paper's shapes; ``cpu`` shrinks what a CPU
cannot afford -- 32² images (window 4), 16 samples per client, 32 test items, K = 2, max_len 32
and 2 encoder layers -- keeping the architectures' widths and (vision) depths. Any factory keyword
overrides either preset.
"""
from __future__ import annotations

import os
import threading

import numpy as np
import torch
from torch import nn

from .data import ImageDataset, TensorDictDataset, stack_collate
from .paper import (PAPER_LANGUAGE_DEFAULTS, PAPER_LANGUAGE_LORA, PAPER_VISION_DEFAULTS, PAPER_VISION_LORA,
                    SWIN_NAMES, image_transform)
from .registry import Task, register
from .text import TEXT_TARGETS, EncoderClassifier, text_forward
from .vision import VISION_TARGETS, freeze_backbone_inject_lora, vision_forward

SIZE_ENV = "LALORA_SMOKE_SIZE"
SIZES = {
    "paper": dict(image_size=224, model_kwargs={}, samples_per_client=500, test_size=1000, local_steps=20,
                  max_len=128, num_layers=12),
    "cpu": dict(image_size=32, model_kwargs={"img_size": 32, "window_size": 4}, samples_per_client=16,
                test_size=32, local_steps=2, max_len=32, num_layers=2),
}


def smoke_size() -> dict:
    name = os.environ.get(SIZE_ENV, "paper")
    if name not in SIZES:
        raise ValueError(f"{SIZE_ENV}={name!r} is not one of {', '.join(SIZES)}")
    return dict(SIZES[name], name=name)


class FakeImages:
    """Item i of torchvision FakeData (a PIL image, the same at every call); picklable for workers.

    FakeData seeds torch's global generator per item and restores it afterwards; the lock keeps
    decoding threads (``ImageDataset.workers``) from interleaving those save/seed/restore steps,
    which would make images, and the global RNG state (LoRA dropout), depend on thread timing."""

    def __init__(self, n: int, image_size: int, seed: int):
        from torchvision.datasets import FakeData

        self.fake = FakeData(size=n, image_size=(3, image_size, image_size), num_classes=1, random_offset=seed)
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"fake": self.fake}

    def __setstate__(self, state):
        self.fake, self._lock = state["fake"], threading.Lock()

    def __call__(self, i: int):
        with self._lock:
            return self.fake[i][0]


def _fake_images(n: int, image_size: int, num_classes: int, seed: int) -> ImageDataset:
    labels = np.random.default_rng(seed).integers(0, num_classes, n)
    return ImageDataset(FakeImages(n, image_size, seed), labels.tolist(), image_transform(image_size))


def _smoke_vision(name: str, swin: str):
    model_name = SWIN_NAMES[swin].split(".")[0]   # the architecture; random weights, no pretrained tag

    def factory(*, image_size: int | None = None, num_classes: int = 100, samples_per_client: int | None = None,
                test_size: int | None = None, local_steps: int | None = None, model_kwargs: dict | None = None,
                r: int = PAPER_VISION_LORA["r"], alpha: float = PAPER_VISION_LORA["alpha"], dropout: float = 0.05,
                seed: int = 0) -> Task:
        size = smoke_size()
        image_size = image_size or size["image_size"]
        spc = samples_per_client or size["samples_per_client"]
        n_train = PAPER_VISION_DEFAULTS["clients"] * spc
        kwargs = dict(size["model_kwargs"] if model_kwargs is None else model_kwargs)
        train = _fake_images(n_train, image_size, num_classes, seed)
        test = _fake_images(test_size or size["test_size"], image_size, num_classes, seed + 10_000_019)

        def build_model(r: int = r, alpha: float = alpha, dropout: float = dropout) -> nn.Module:
            import timm

            with torch.random.fork_rng():
                torch.manual_seed(seed)
                model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs)
            return freeze_backbone_inject_lora(model, VISION_TARGETS, r, alpha, dropout, seed, "head.fc")

        defaults = dict(PAPER_VISION_DEFAULTS, samples_per_client=spc, r=r, alpha=float(alpha),
                        local_steps=local_steps or size["local_steps"])
        return Task(
            name=name, num_classes=num_classes, train=train, test=test,
            train_labels=np.asarray(train.targets, np.int64), build_model=build_model,
            lora_targets=list(VISION_TARGETS), head_name="head.fc", forward=vision_forward,
            collate=stack_collate, defaults=defaults, test_labels=np.asarray(test.targets, np.int64),
            info={"model": model_name, "weights": "random (smoke)", "data": "torchvision FakeData",
                  "image_size": image_size, "size": size["name"], "model_kwargs": kwargs,
                  "sizes": {"private": n_train, "test": len(test)}},
        )

    factory.__name__ = name.replace("-", "_")
    factory.__doc__ = f"{name}: random {model_name} on FakeData at the paper's shapes (lalora.tasks.smoke)."
    register(name)(factory)
    return factory


_smoke_vision("smoke-swin-t", "swin-t")
_smoke_vision("smoke-swin-b", "swin-b")


@register("smoke-roberta-base")
def smoke_roberta_base(*, num_classes: int = 2, samples_per_client: int | None = None, test_size: int | None = None,
                       max_len: int | None = None, num_layers: int | None = None, local_steps: int | None = None,
                       r: int = PAPER_LANGUAGE_LORA["r"], alpha: float = PAPER_LANGUAGE_LORA["alpha"],
                       dropout: float = 0.05, seed: int = 0) -> Task:
    """RoBERTa-base configuration, random weights, random token ids (lalora.tasks.smoke)."""
    from transformers import RobertaConfig, RobertaModel

    size = smoke_size()
    max_len = max_len or size["max_len"]
    spc = samples_per_client or size["samples_per_client"]
    n_train = PAPER_LANGUAGE_DEFAULTS["clients"] * spc
    config = RobertaConfig(num_hidden_layers=num_layers or size["num_layers"])  # roberta-base otherwise
    rng = np.random.default_rng(seed)

    def fake_text(n: int) -> TensorDictDataset:
        # <s> first, then random ids from the ordinary vocabulary (above the 4 special tokens), padded
        # after a random length so the attention mask is exercised.
        ids = rng.integers(4, config.vocab_size, (n, max_len))
        lengths = rng.integers(max(2, max_len // 4), max_len + 1, n)
        mask = np.arange(max_len)[None, :] < lengths[:, None]
        ids[:, 0] = config.bos_token_id
        ids[~mask] = config.pad_token_id
        return TensorDictDataset({"input_ids": torch.as_tensor(ids), "attention_mask": torch.as_tensor(mask, dtype=torch.long),
                                  "labels": torch.as_tensor(rng.integers(0, num_classes, n))})

    train, test = fake_text(n_train), fake_text(test_size or size["test_size"])

    def build_model(r: int = r, alpha: float = alpha, dropout: float = dropout) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            encoder = RobertaModel(config, add_pooling_layer=False)
            model = EncoderClassifier(encoder, num_classes, pooling="cls", head="roberta")
        return freeze_backbone_inject_lora(model, TEXT_TARGETS, r, alpha, dropout, seed, "head")

    defaults = dict(PAPER_LANGUAGE_DEFAULTS, samples_per_client=spc, r=r, alpha=float(alpha),
                    local_steps=local_steps or size["local_steps"])
    return Task(
        name="smoke-roberta-base", num_classes=num_classes, train=train, test=test,
        train_labels=train.tensors["labels"].numpy(), build_model=build_model, lora_targets=list(TEXT_TARGETS),
        head_name="head", forward=text_forward, collate=stack_collate, defaults=defaults,
        test_labels=test.tensors["labels"].numpy(),
        info={"model": "roberta-base config", "weights": "random (smoke)", "data": "random token ids",
              "max_len": max_len, "num_layers": config.num_hidden_layers, "size": size["name"],
              "sizes": {"private": n_train, "test": len(test)}},
    )

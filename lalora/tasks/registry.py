"""The task registry: a name maps to a factory that builds a :class:`Task`.

A task bundles everything an experiment needs besides the method: the private training set,
the test set, the labels used to split the training set across clients, a model builder
(pretrained backbone frozen, LoRA injected on ``lora_targets``, a trainable head), how to run
the model on a batch, and the experiment defaults of SPEC §4. The contract is in
docs/CONTRACTS.md; fields after ``defaults`` are additive extras (they all have defaults).

Factories are registered with :func:`register` by the modules that define them (``vision``,
``text``, ``paper``); ``lalora.tasks`` imports them all so ``get_task`` sees every name.

What a run config asks of the registry (the config is read by attribute: ``lalora.config`` sits
above the tasks)::

    task = task_for_config(cfg)              # cfg.task built with the run's seed, r, alpha
    parts = client_partitions(cfg, task)     # a resolved cfg: each client's training indices
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from torch import nn
from torch.utils.data import Dataset

from .partition import partition


@dataclass
class Task:
    name: str
    num_classes: int
    train: Dataset  # items: dict[str, Tensor], always with "labels"; the PRIVATE training split
    test: Dataset
    train_labels: np.ndarray  # int64, len(train); what partition() splits
    build_model: Callable[[], nn.Module]  # same weights at every call (seeded head and LoRA init)
    lora_targets: list[str]
    head_name: str  # module name of the trainable classifier head
    forward: Callable[[nn.Module, dict], Any]  # (model, batch) -> logits (N, C)
    collate: Callable[[list[dict]], dict]
    defaults: dict
    # --- extras (not in the contract; safe to ignore) ---
    test_labels: np.ndarray | None = None
    public: Dataset | None = None  # the public split the backbone was pretrained on (offline tasks)
    info: dict = field(default_factory=dict)  # sizes, protocol, sources: for notes and reports
    # The architecture without pretrained weights (milliseconds): lets RunConfig be checked against
    # the model's shapes before any pretraining (lalora.config.check_against_task).
    build_architecture: Callable[[], nn.Module] | None = None


TASKS: dict[str, Callable[..., Task]] = {}


def register(name: str) -> Callable[[Callable[..., Task]], Callable[..., Task]]:
    def deco(factory: Callable[..., Task]) -> Callable[..., Task]:
        if name in TASKS:
            raise ValueError(f"task name {name!r} registered twice")
        TASKS[name] = factory
        return factory

    return deco


def list_tasks() -> list[str]:
    return sorted(TASKS)


def get_task(name: str, **overrides: Any) -> Task:
    """Build task ``name``; ``overrides`` are the factory's keyword parameters (paths, sizes, ...)."""
    if name not in TASKS:
        raise ValueError(f"name={name!r} is not a known task; known: {', '.join(list_tasks())}")
    factory = TASKS[name]
    params = inspect.signature(factory).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(overrides) - set(params))
        if unknown:
            raise ValueError(
                f"unknown override(s) {unknown} for task {name!r}; accepted: {sorted(params)}"
            )
    return factory(**overrides)


def task_for_config(cfg) -> Task:
    """Build ``cfg.task``; the run's seed and an explicit r/alpha go to the task factory when it
    takes them (the LoRA init and head init then follow the run seed), unless task_overrides
    sets them."""
    overrides = dict(cfg.task_overrides)
    factory = TASKS.get(cfg.task)
    if factory is not None:
        params = inspect.signature(factory).parameters
        for name, value in (("seed", cfg.seed), ("r", cfg.r), ("alpha", cfg.alpha)):
            if value is not None and name in params and name not in overrides:
                overrides[name] = value
    return get_task(cfg.task, **overrides)


def client_partitions(cfg, task: Task) -> list[np.ndarray]:
    """Each client's training indices for a resolved ``cfg`` (labels only: no model, no images)."""
    return partition(np.asarray(task.train_labels), cfg.clients, cfg.partition, cfg.beta, cfg.seed,
                     cfg.samples_per_client)

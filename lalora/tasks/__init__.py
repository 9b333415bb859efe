"""lalora.tasks: datasets, models with LoRA, and client partitions (docs/CONTRACTS.md).

Importing this package registers every task: offline (``digits-swin``, ``lfw-swin``,
``topics-minilm``) and paper-scale (CIFAR-100 / Tiny-ImageNet with timm Swin-T/B, GLUE with
RoBERTa-base; local paths as parameters) and the smoke tasks (``smoke-swin-t``, ``smoke-swin-b``,
``smoke-roberta-base``: the paper's models with random weights on generated inputs). Nothing is
downloaded.
"""
from .partition import SCHEMES, label_histograms, partition
from .registry import TASKS, Task, client_partitions, get_task, list_tasks, register, task_for_config
from . import paper, smoke, text, vision  # noqa: F401  (registers tasks)

__all__ = ["Task", "TASKS", "get_task", "list_tasks", "register", "partition", "label_histograms", "SCHEMES",
           "task_for_config", "client_partitions"]

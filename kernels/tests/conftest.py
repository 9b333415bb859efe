"""Kernel tests run the Triton kernels on the CPU through Triton's interpreter when there is no CUDA.

TRITON_INTERPRET must be set before triton is first imported, hence at conftest import time.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):   # the Trainer tests never download
    os.environ.setdefault(_var, "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def poisoned(monkeypatch):
    """Kernel-written buffers start as NaN (see triton_kernels.POISON_OUTPUTS), and so does the engine's
    per-sample-gradient arena (engine.POISON_ARENA): a slot nobody writes surfaces as NaN."""
    from dplora_kernels import engine
    from dplora_kernels import triton_kernels as tk
    monkeypatch.setattr(tk, "POISON_OUTPUTS", True)
    monkeypatch.setattr(engine, "POISON_ARENA", True)


@pytest.fixture
def one_thread():
    """One intra-op thread for this test (bitwise comparisons between runs), restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

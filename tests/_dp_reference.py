"""Reference for the DP tests: per-sample gradients by a loop over samples (microbatch of one,
ordinary autograd), and small model builders shared by the test files."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

# The float64 loop and its comparison helpers are the kernels' (kernels/tests/engine_loops.py, which
# imports nothing of lalora): one reference for both packages' tests. pytest puts that folder on the
# path only when it collects a file there, so a run of lalora's tests alone adds it here.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels" / "tests"))
from engine_loops import (assert_close_rel, flat_norms, freeze_all, loop_per_sample_grads,  # noqa: E402,F401
                          slice_batch)


def randomize_lora_B(model: nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """B starts at 0 (so grad A = 0); tests need a non-zero B to exercise the A-gradient."""
    from lalora.lora import lora_factors, lora_modules
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            _, B, _ = lora_factors(m)
            B.copy_(torch.randn(B.shape, generator=g, dtype=B.dtype) * scale)

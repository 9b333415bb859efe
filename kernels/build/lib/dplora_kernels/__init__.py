"""dplora_kernels: per-sample LoRA gradients and DP clipping, fused in Triton, with a PyTorch reference.

Standalone: needs only torch (and triton for the fused kernels); never imports lalora.

Functions (docs/CONTRACTS.md): lora_per_sample_grads, linear_per_sample_grads, clip_factors,
clipped_noised_sum, clip_and_noise, available_backends, resolve_backend.
Training-loop integration: DPLoRALinear / DPLinear modules and the DPStep helper (see README.md).
"""

from ._backend import available_backends, resolve_backend
from .api import (LinearPerSampleGrads, LoRAPerSampleGrads, clip_and_noise, clip_factors,
                  clipped_noised_sum, gaussian_noise, linear_per_sample_grads, lora_per_sample_grads)
from .nn import DPLinear, DPLoRALinear, DPStep, DPStepResult, add_dp_lora

__all__ = [
    "available_backends", "resolve_backend", "lora_per_sample_grads", "linear_per_sample_grads",
    "clip_factors", "clipped_noised_sum", "clip_and_noise", "gaussian_noise",
    "LoRAPerSampleGrads", "LinearPerSampleGrads",
    "DPLoRALinear", "DPLinear", "DPStep", "DPStepResult", "add_dp_lora",
]
__version__ = "0.1.0"

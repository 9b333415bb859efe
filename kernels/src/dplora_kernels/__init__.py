"""dplora_kernels: per-sample gradients and DP-SGD clipping for LoRA training, fused in Triton on CUDA,
with a PyTorch reference path everywhere else.

Standalone: needs only torch (and triton for the fused kernels); never imports lalora.

One engine, one LoRA layer (README.md, docs/CONTRACTS.md):
  LoRALinear                   the LoRA layer (frozen nn.Linear + s * B A dropout(x))
  PerSampleGradEngine          hooks -> per-sample gradients of every trainable parameter, one backward
  per_sample_gradients(...)    that engine as one call -> PerSampleGrads
  dp_gradient(...)             clip (flat / per-layer) + sum + Gaussian noise -> p.grad; checks the model
                               first (checks.py: mixed functional use, clipping unit), secure noise,
                               physical chunks, distributed (all-reduce, noise once)
  grouped_dp_gradient(...)     the same for M clients in one forward/backward (client stacks, grouped.py)
  client_groups(...)           context: each sample uses its own client's LoRA factors and head
  register_per_sample_rule(...) how per-sample gradients of another layer type are computed (rules.py)
Kernel functions: lora_per_sample_grads, linear_per_sample_grads, clip_factors, clipped_noised_sum,
clip_and_noise, available_backends, resolve_backend.
"""

from ._backend import available_backends, resolve_backend
from .api import (LinearPerSampleGrads, LoRAPerSampleGrads, clip_and_noise, clip_factors,
                  clipped_noised_sum, gaussian_noise, linear_per_sample_grads, lora_per_sample_grads)
from .dp import DPStepResult, batch_size_of, dp_gradient, grouped_dp_gradient, per_sample_gradients
from .engine import PerSampleGradEngine, PerSampleGrads
from .grouped import client_groups
from .lora import LoRALinear
from .rules import register_per_sample_rule, registered_rules
from .unit_probe import ClippingUnitError, UnattributedGradientError

__all__ = [
    "available_backends", "resolve_backend", "lora_per_sample_grads", "linear_per_sample_grads",
    "clip_factors", "clipped_noised_sum", "clip_and_noise", "gaussian_noise",
    "LoRAPerSampleGrads", "LinearPerSampleGrads",
    "LoRALinear", "PerSampleGradEngine", "PerSampleGrads", "per_sample_gradients", "dp_gradient",
    "DPStepResult", "batch_size_of", "grouped_dp_gradient", "client_groups",
    "ClippingUnitError", "UnattributedGradientError", "register_per_sample_rule", "registered_rules",
]
__version__ = "0.2.0"

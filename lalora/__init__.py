"""lalora: LA-LoRA (Local Alternating LoRA) for differentially private federated learning.

Layers (each imports only those below it): notebooks -> cli/flower -> federated ->
privacy | tasks -> lora -> dplora_kernels. See docs/CONTRACTS.md.
"""

__version__ = "0.1.0"

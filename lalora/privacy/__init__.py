"""lalora.privacy: sample-level DP for (federated) LoRA training (SPEC §3).

  dp_step.py     dp_gradient (re-exported from dplora_kernels.dp: the one per-sample-gradient engine,
                 flat/per-layer clipping, sum, Gaussian noise, / expected batch size) and the
                 authors' non-private as-released step
  accountant.py  calibrate_sigma (the one σ of a run), noise_multiplier_for / epsilon_for via
                 Opacus' accountants (RDP, PRV), PrivacyLedger
  plan.py        RunPlan: schedule, derived seeds, steps and q per client, σ, ε -- from a resolved
                 config and the client sizes alone (no model, no data)
  sampling.py    poisson_sample (variable batch, possibly empty)

Names are imported lazily (PEP 562) so importing the package stays cheap and each submodule loads
only when used.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "dp_gradient": "dp_step", "per_sample_gradients": "dp_step", "DPStepResult": "dp_step", "as_released_gradient": "dp_step",
    "AsReleasedResult": "dp_step", "batch_size_of": "dp_step",
    "calibrate_sigma": "accountant", "noise_multiplier_for": "accountant", "epsilon_for": "accountant",
    "epsilon_for_history": "accountant", "PrivacyLedger": "accountant",
    "RunPlan": "plan", "client_schedule": "plan",
    "poisson_sample": "sampling", "shuffled_fixed_batches": "sampling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))

"""Planted privacy bugs, to show that the audit can fail.

Each is a context manager that monkeypatches a name *inside* `dplora_kernels.dp` (the module that
implements the `dp_gradient` lalora.privacy re-exports) for the
duration of the `with` block (the real code is never edited), so the audit runs the genuine
`dp_gradient` with one piece broken -- exactly the kind of silent bug auditing exists to catch:

- `noise_halved`:        the Gaussian noise is drawn with std σC/2 instead of σC.
- `clipping_off`:        every clip factor is 1 (per-sample gradients summed unclipped).
- `per_window_clipping`: the per-sample-gradient engine is asked for N·nW "samples" instead of N,
                         so under Swin's windowed attention each *window* is clipped to C and an
                         image contributes up to nW·C (the Opacus failure mode, SPEC §3).
- `ledger_undercount`:   the privacy ledger records 1 of every 20 DP steps (run_audit.py catches it).

    with planted.plant("noise_halved"):
        result = audit_dp_step(epsilon=1.0, planted="noise_halved")
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator
from unittest import mock

import torch

__all__ = ["PLANTED_BUGS", "plant", "noise_halved", "clipping_off", "per_window_clipping",
           "ledger_undercount"]


def _dp_step():
    from dplora_kernels import dp

    return dp


@contextmanager
def noise_halved() -> Iterator[None]:
    mod = _dp_step()
    real, real_grouped = mod.clipped_noised_sum, mod.clip_and_noise

    def halved(per_sample, factors, noise_std, generator, *args, **kwargs):
        return real(per_sample, factors, noise_std / 2.0, generator, *args, **kwargs)

    def halved_grouped(per_sample, sqnorm, clip_norm, noise_std, generator, *args, **kwargs):
        return real_grouped(per_sample, sqnorm, clip_norm, noise_std / 2.0, generator, *args, **kwargs)

    with mock.patch.object(mod, "clipped_noised_sum", halved), \
            mock.patch.object(mod, "clip_and_noise", halved_grouped):
        yield


@contextmanager
def clipping_off() -> Iterator[None]:
    mod = _dp_step()

    real_grouped = mod.clip_and_noise

    def no_clip(sqnorm, clip_norm, *args, **kwargs):
        return torch.ones_like(sqnorm)

    def no_clip_grouped(per_sample, sqnorm, clip_norm, *args, **kwargs):
        return real_grouped(per_sample, sqnorm, float("inf"), *args, **kwargs)

    with mock.patch.object(mod, "_clip_factors", no_clip), \
            mock.patch.object(mod, "clip_and_noise", no_clip_grouped):
        yield


@contextmanager
def per_window_clipping(windows_per_sample: int = 4) -> Iterator[None]:
    mod = _dp_step()
    real_engine = mod.PerSampleGradEngine

    class PerWindowEngine(real_engine):  # type: ignore[misc, valid-type]
        def backward(self, loss, num_samples=None, **kwargs):
            return super().backward(loss, num_samples * windows_per_sample, **kwargs)

    with mock.patch.object(mod, "PerSampleGradEngine", PerWindowEngine):
        yield


def ledger_undercount(every: int = 20):
    """The run's privacy ledger records 1 of every 20 DP steps (caught by the run audit only)."""
    from .run_audit import ledger_undercount as undercount

    return undercount(every)


PLANTED_BUGS = {
    "noise_halved": noise_halved,
    "clipping_off": clipping_off,
    "per_window_clipping": per_window_clipping,
    "ledger_undercount": ledger_undercount,
}


def plant(name: str | None, **kwargs):
    """The context manager of planted bug `name` (None: no bug, a no-op context)."""
    if name is None:
        return _nothing()
    if name not in PLANTED_BUGS:
        raise ValueError(f"planted bug {name!r} is unknown; choices: {', '.join(PLANTED_BUGS)}")
    return PLANTED_BUGS[name](**kwargs)


@contextmanager
def _nothing() -> Iterator[None]:
    yield

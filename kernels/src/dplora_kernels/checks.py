"""Safe by default: when dp_gradient runs the model check (unit_probe.verify_clipping_unit).

Two wrong uses give per-sample gradients that look fine and are not, and the engine's hooks cannot
see either during a normal step:
  * a trainable parameter used by its module AND functionally (``F.linear(x, layer.weight)``): the
    functional part of its gradient is dropped (it escapes clipping);
  * rows of a layer's input that are not one sample each (sequence-first (T, N, ...) input with T a
    multiple of N, a forward that reorders or mixes the batch): each clipping unit mixes samples.
The probe finds both exactly, on two samples of the batch (unit_probe's module doc: the engine's
summed per-sample gradient against autograd's batch gradient, then against a per-sample loop, then
isolation), and raises an error naming the parameter and the cause, before anything is written.

Schedule (``verify_unit=None``, the default of dp_gradient and DPTrainer), per model object:
  * the first call with at least 2 samples for each set of trainable parameters (alternating
    schemes that train A, then B, are probed once per set); a batch of 0 or 1 sample cannot mix
    samples, so it is never probed and does not count as checked;
  * then again every ``UNIT_CHECK_EVERY`` (1000) calls on that model (models whose forward changes
    with the data or over training).
``verify_unit=True`` probes every call; ``verify_unit=False`` never (the opt-out, e.g. a model already
probed elsewhere). Cost of one probe: on two samples, three engine passes, one batch backward and two
one-sample backwards, all in fp32 and eval mode (no dropout), with the CPU RNG forked -- so neither
the step's dropout draws nor its noise draws change.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["UNIT_CHECK_EVERY", "unit_check_due", "mark_unit_checked", "run_unit_check"]

UNIT_CHECK_EVERY = 1000
_LOW = (torch.bfloat16, torch.float16)

_state: "weakref.WeakKeyDictionary[nn.Module, _ModelState]" = weakref.WeakKeyDictionary()


class _ModelState:
    __slots__ = ("calls", "checked", "last")

    def __init__(self):
        self.calls = 0           # dp_gradient calls on this model
        self.checked = set()     # trainable-parameter sets probed so far
        self.last = 0            # the call number of the last probe


def _signature(params: dict) -> frozenset:
    return frozenset(params)


def unit_check_due(model: nn.Module, params: dict, n: int, verify_unit: bool | None) -> bool:
    """Count this call and say whether it probes (module doc). params: the trainable parameters."""
    if verify_unit is not None and not isinstance(verify_unit, bool):
        raise ValueError(f"verify_unit must be None (the default schedule), True or False; got {verify_unit!r}")
    st = _state.get(model)
    if st is None:
        st = _state[model] = _ModelState()
    st.calls += 1
    if verify_unit is False or n < 2 or not params:
        return False
    if verify_unit:
        return True
    return _signature(params) not in st.checked or st.calls - st.last >= UNIT_CHECK_EVERY


def mark_unit_checked(model: nn.Module, params: dict) -> None:
    st = _state.setdefault(model, _ModelState())
    st.checked.add(_signature(params))
    st.last = st.calls


def _sample_rows(batch: Any, n: int) -> bool:
    """Does the batch hold a tensor whose leading dimension is the n samples (so two can be taken)?"""
    vals = [batch] if isinstance(batch, torch.Tensor) else (
        list(batch.values()) if isinstance(batch, dict) else list(batch) if isinstance(batch, (tuple, list)) else [])
    return any(isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n for v in vals)


def run_unit_check(model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], batch: Any,
                   params: dict, *, n: int, num_samples: int | None, per_sample_fn: Callable,
                   explicit: bool) -> None:
    """The probe in fp32 (the question is the unit, not the precision; the reference loop is fp32),
    with a tolerance that fits the parameters' dtype; records the success. A batch with no tensor of
    n leading rows (rows are not samples in the batch itself, num_samples=N over N*k rows) cannot be
    split into samples: the scheduled check is skipped with a warning, verify_unit=True raises.
    per_sample_fn(model, loss_fn, batch): the caller's per-sample gradients (dp.py passes its own, so
    this module needs no import of dp: no circle)."""
    from .unit_probe import verify_clipping_unit

    if not _sample_rows(batch, n):
        msg = (f"the clipping-unit check needs a batch tensor whose leading dimension is the {n} samples "
               "(it runs the model on two of them); this batch has none")
        if explicit:
            raise ValueError(f"verify_unit=True: {msg}")
        warnings.warn(f"{msg}: check skipped (verify_unit=False silences this)", stacklevel=3)
        mark_unit_checked(model, params)
        return

    from .unit_probe import ClippingUnitError

    low = any(p.dtype in _LOW for p in params.values())
    # A loss_fn may autocast its own forward (``with torch.autocast(..., bfloat16)`` inside it, as
    # Hugging Face code often does): the parameters are fp32, but the engine's fp32 products and
    # autograd's bf16 ones then differ by ~1e-2, which the fp32 tolerance would call a misuse. A
    # module-forward hook sees whether any module produced a bf16/fp16 output during the check; only
    # then is a failure at the fp32 tolerance re-checked at the bf16 one (the misuses this check
    # exists for are 30-140% errors: still caught).
    seen_low: list[bool] = []

    def _note_low(_module, _inputs, out):
        if isinstance(out, torch.Tensor) and out.dtype in _LOW:
            seen_low.append(True)

    hook = torch.nn.modules.module.register_module_forward_hook(_note_low)
    try:
        verify_clipping_unit(model, loss_fn, batch, per_sample_fn, num_samples=num_samples,
                             rtol=5e-2 if low else 1e-3)
    except ClippingUnitError:
        if low or not seen_low:
            raise
        hook.remove()
        verify_clipping_unit(model, loss_fn, batch, per_sample_fn, num_samples=num_samples, rtol=5e-2)
    finally:
        hook.remove()
    mark_unit_checked(model, params)

"""Backend selection: "torch" (reference, any device) or "triton" (fused kernels).

"auto" picks Triton only where it pays: a CUDA tensor and an importable triton. On the CPU Triton runs
only under its interpreter (TRITON_INTERPRET=1) — correct but slow — so "auto" never picks it there;
ask for backend="triton" explicitly (the tests do).
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("torch", "triton")


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install raising at import time
        return False
    return True


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available_backends() -> list[str]:
    """Backends usable in this process: "torch" always; "triton" when triton imports and either CUDA is
    present or the interpreter (TRITON_INTERPRET=1) is on."""
    out = ["torch"]
    if triton_importable() and (torch.cuda.is_available() or interpreter_enabled()):
        out.append("triton")
    return out


def resolve_backend(backend: str = "auto", device: torch.device | str | None = None) -> str:
    """Map "auto"/"torch"/"triton" to a concrete backend for tensors on `device`.

    "auto" -> "triton" on a CUDA device (or, with device=None, when CUDA is available) with triton
    importable, else "torch". An explicit backend that cannot run raises ValueError naming `backend`.
    """
    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"backend must be one of 'auto', 'torch', 'triton'; got {backend!r}")
    if backend == "auto":
        on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        return "triton" if on_cuda and triton_importable() else "torch"
    if backend == "triton":
        if not triton_importable():
            raise ValueError("backend='triton' requested but triton does not import; use backend='torch'")
        dev_type = torch.device(device).type if device is not None else None
        if dev_type not in (None, "cpu", "cuda"):
            raise ValueError(f"backend='triton' runs on CUDA tensors (or CPU ones under TRITON_INTERPRET=1); "
                             f"got device {device!r}; use backend='torch'")
        if dev_type == "cpu" and not interpreter_enabled():
            raise ValueError(
                "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported; "
                "use backend='torch' on the CPU")
        if dev_type is None and not (torch.cuda.is_available() or interpreter_enabled()):
            # checked where the engine is built (no tensor yet), not inside the first backward
            raise ValueError("backend='triton' needs a CUDA GPU or TRITON_INTERPRET=1 (CPU interpreter); "
                             "none is available here; use backend='torch' or 'auto'")
    return backend

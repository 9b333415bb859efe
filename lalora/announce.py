"""One line on stderr before long first-time work (pretraining, σ calibration, task building).

Why: a first run pretrains a backbone or bisects an accountant for seconds to minutes; in a
notebook, a log file or CI (stderr not a terminal) it used to print nothing until it ended, which
looks like a hang. The line says what, why, roughly how long and where the result is cached, and
is printed whether or not stderr is a terminal (progress bars only on a terminal:
:func:`progress_enabled`).
"""
from __future__ import annotations

import sys


def announce(what: str, *, why: str, eta: str, cached_in: str | None = None) -> None:
    where = f"; cached in {cached_in}" if cached_in else ""
    print(f"lalora: {what} ({why}; {eta}){where}", file=sys.stderr, flush=True)


def progress_enabled() -> bool:
    """Progress bars only on an interactive stderr (a bar in a log is thousands of lines)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def note(text: str) -> None:
    """One plain line on stderr (e.g. that a run resumes from its checkpoint)."""
    print(f"lalora: {text}", file=sys.stderr, flush=True)


# Seconds per step of Opacus' σ bisection, measured on a loaded 2-core CPU (Opacus 1.5, ε=3,
# δ=1e-5): PRV 4.0 s for 30,000 steps and 29.7 s for 300,000 at q=0.05, 7.7 s for 30,000 at q=0.2,
# i.e. about 1 s plus 4.5e-4·√q s per step; RDP stayed under 1 s from 100 to 100,000 steps.
_PRV_SECONDS_PER_STEP_PER_SQRT_Q = 4.5e-4


def calibration_eta(steps: int, sample_rate: float, accountant: str) -> str:
    """How long one σ calibration takes, from the measurements above (a fast CPU is quicker)."""
    if accountant != "prv":
        return "about a second"
    seconds = 1.0 + _PRV_SECONDS_PER_STEP_PER_SQRT_Q * max(sample_rate, 0.0) ** 0.5 * steps
    if seconds < 3:
        return "a few seconds"
    if seconds < 120:
        return f"about {seconds:.0f} s"
    return f"about {seconds / 60:.0f} min"

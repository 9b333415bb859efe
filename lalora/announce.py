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

"""The node's one refusal type, below every module that raises it (node, ledger, terms, client_app),
so none of them imports another for it: no circle (tests/test_layering.py)."""
from __future__ import annotations

__all__ = ["RequestRefused"]


class RequestRefused(RuntimeError):
    """The node refuses a request (replay, unscheduled round, unagreed config, budget)."""

"""Moved to ``lalora.methods`` (pure data, next to ``lalora.config`` which validates against it).

Kept only for callers not yet switched (federated/batched.py, federated/cli.py); new code imports
``lalora.methods``. Remove once nothing imports this path.
"""
from lalora.methods import METHODS, MethodSchedule, get_method  # noqa: F401

__all__ = ["METHODS", "MethodSchedule", "get_method"]

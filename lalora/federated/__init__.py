"""lalora.federated: the federated simulation engine (SPEC §2–§3).

  methods.py     the six methods as data (MethodSchedule): what trains at step k of round t
  filters.py     the [1,4,6,4,1]/16 low-pass filter on the noised LoRA gradient
  state.py       LoRA A / B / head parameter groups; swap a client's state in and out
  client.py      the one client loop (Poisson sampling, DP step, filter, optimizer)
  server.py      the one aggregator (mean of the sampled clients) and ClientUpdate
  simulation.py  Simulator (the API Flower and the notebooks use) and run_experiment (run folders)
  cli.py         `lalora run`

Names are imported lazily so `import lalora.federated` stays cheap.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "METHODS": "methods", "MethodSchedule": "methods", "get_method": "methods",
    "Simulator": "simulation", "RunResult": "simulation", "run_experiment": "simulation",
    "ClientUpdate": "server", "aggregate": "server",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

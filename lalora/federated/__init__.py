"""lalora.federated: the federated simulation engine (SPEC §2–§3).

  (the methods table, MethodSchedule, is lalora.methods: pure data next to lalora.config)
  filters.py     the [1,4,6,4,1]/16 low-pass filter on the noised LoRA gradient
  state.py       LoRA A / B / head parameter groups; swap a client's state in and out
  client.py      the one client loop (Poisson sampling, DP step, filter, optimizer)
  server.py      the one aggregator (mean of the sampled clients) and ClientUpdate
  simulation.py  Simulator: one run's rounds in memory (the API Flower and the notebooks use), plan_run
  runs.py        run_experiment: run folders, resume, results, fingerprints
  cli.py         `lalora run`

Names are imported lazily so `import lalora.federated` stays cheap.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Simulator": "simulation", "plan_run": "simulation", "RunResult": "runs", "run_experiment": "runs",
    "ClientUpdate": "server", "aggregate": "server",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

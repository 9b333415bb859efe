"""lalora.audit: empirical privacy auditing of lalora's DP mechanism (SPEC §3, issue 9).

  canary.py   one DP step, many trials with/without a worst-case canary -> an ε lower bound
              (assumption-free Clopper–Pearson) and a Gaussian-score *estimate* vs the accountant's ε
  one_run.py  Steinke, Nasr & Jagielski (2023): m canaries in ONE private client training
  run_audit.py the same bound over a whole federated run (Simulator) vs its ledger: catches
              under-counted steps
  stats.py    Clopper–Pearson, ε from error rates, Gaussian-DP conversion, the one-run bound
  planted.py  planted bugs (noise halved, clipping off, per-window clipping, ledger under-count)
  cli.py      `lalora audit`

An audit's lower bound above the accountant's ε means the implementation leaks more than it claims.
"""
import importlib

# Names resolve lazily (PEP 562): `lalora audit`'s parser is built by every `lalora` command, and
# importing canary/stats eagerly (scipy.stats) cost every command about a second.
_EXPORTS = {
    "CanaryAuditResult": "canary", "audit_dp_step": "canary", "audit_swin_step": "canary",
    "mechanism_epsilons": "canary", "sensitivity_probe": "canary", "sensitivity_probe_swin": "canary",
    "OneRunResult": "one_run", "audit_one_run": "one_run", "PLANTED_BUGS": "planted", "plant": "planted",
    "RunAuditResult": "run_audit", "audit_federated_run": "run_audit",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

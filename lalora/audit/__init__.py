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
from .canary import (CanaryAuditResult, audit_dp_step, audit_swin_step, mechanism_epsilons,
                     sensitivity_probe, sensitivity_probe_swin)
from .one_run import OneRunResult, audit_one_run
from .planted import PLANTED_BUGS, plant
from .run_audit import RunAuditResult, audit_federated_run

__all__ = ["CanaryAuditResult", "audit_dp_step", "audit_swin_step", "mechanism_epsilons",
           "sensitivity_probe", "sensitivity_probe_swin", "OneRunResult", "audit_one_run",
           "PLANTED_BUGS", "plant", "RunAuditResult", "audit_federated_run"]

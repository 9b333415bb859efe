"""End-to-end audit of a federated run (lalora.audit.run_audit): canaries in one client's data, the
run's releases scored, the one-run bound against the run ledger's ε. Attack 5 of issue 16: a
ledger that counted 1 of 20 DP steps passed every step-level audit; this one catches it.

Why the outcomes are not luck (measured, seeds 0 and 1, 1000 canaries, 200 guesses): the bound is
2.39 / 2.06 against a planted ledger's 1.46 and a correct ledger's 7.99 (ε = 8 target, σ = 2.85,
20 full-batch steps); the bound is valid at 95% for any mechanism, so a correct ledger is flagged
with probability ≤ 5%.
"""
from __future__ import annotations

import pytest

from lalora.audit import audit_federated_run, plant
from lalora.privacy.accountant import epsilon_for


def test_planted_step_undercount_is_caught():
    """One run under the planted bug; the releases are those of the correct run (the bug changes
    only what the ledger says), so the same bound also shows the correct claim would pass."""
    with plant("ledger_undercount"):
        res = audit_federated_run(8.0, seed=0, planted="ledger_undercount")
    assert (res.steps_run, res.steps_counted) == (20, 1)
    assert res.violates and res.epsilon_lb > res.claimed_epsilon
    true_epsilon = epsilon_for(res.noise_multiplier, res.delta, 1.0, res.steps_run)
    assert res.epsilon_lb <= true_epsilon


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_correct_ledger_passes_and_undercount_caught(seed):
    ok = audit_federated_run(8.0, seed=seed)
    assert ok.steps_counted == ok.steps_run == 20
    assert not ok.violates and ok.epsilon_lb > 1.0        # the audit sees real leakage...
    with plant("ledger_undercount"):
        bad = audit_federated_run(8.0, seed=seed, planted="ledger_undercount")
    assert bad.violates                                     # ...more than an under-counting ledger claims


@pytest.mark.slow
def test_cli_run_audit_catches_undercount():
    from lalora.cli import main

    assert main(["audit", "--epsilon", "3", "--trials", "100", "--run", "--planted",
                 "ledger_undercount"]) == 1

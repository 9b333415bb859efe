"""A real Flower deployment (issue 18, first part): a SuperLink and three SuperNodes as separate
processes on 127.0.0.1 (free ports), each node with its own partition and state folder, la-lora on
a shrunk digits-swin for 2 rounds through ``flwr run`` (lalora.flower.demo, also ``make flower-demo``).

Checks: the run finishes with OS-entropy noise on every node; no private metric reaches the
server's run folder; every node's persisted ledger counts exactly the steps it ran -- counted here
independently from the seeded schedule -- and its ε equals what the server reports and stays
within the target. Every process is stopped by run_demo (its own process groups).
Not covered yet: killing and restarting a SuperNode mid-run (a restarted SuperNode registers under
a new node id, which the ServerApp does not rediscover).
"""
from __future__ import annotations

import os

import pytest


@pytest.mark.slow
def test_superlink_and_three_supernodes(tmp_path, monkeypatch):
    from lalora.federated.simulation import client_schedule
    from lalora.flower.demo import run_demo
    from lalora.privacy.accountant import PrivacyLedger

    if not os.environ.get("LALORA_CACHE"):
        monkeypatch.setenv("LALORA_CACHE", str(tmp_path / "cache"))   # never ~/.cache
    res = run_demo(tmp_path / "demo", rounds=2, nodes=3, clients_per_round=2, epsilon=3.0,
                   local_steps=2, timeout=1500)
    final = res["final"]
    assert final["noise_sources"] == ["os-entropy"]
    assert final["epsilon_spent"] <= 3.0 + 1e-9
    for row in res["metrics"]:
        assert "train_loss" not in row and "mean_batch_size" not in row
    schedule = client_schedule(3, 2, 2, seed=0)          # the seeded schedule, recomputed here
    for i in range(3):
        ran = 2 * sum(i in s for s in schedule)          # local_steps x rounds it was sampled in
        ledger = PrivacyLedger.from_dict(res["node_ledgers"][i]) if ran else None
        assert final["per_client_steps"][i] == ran
        if ran:
            (run,) = ledger.clients                      # one run on this node
            assert ledger.steps(run) == ran
            assert sorted(ledger.rounds(run)) == [t + 1 for t, s in enumerate(schedule) if i in s]
            assert ledger.epsilon(run) == pytest.approx(final["per_client_epsilon"][i], rel=1e-9)
            assert ledger.epsilon(run) <= 3.0 + 1e-9

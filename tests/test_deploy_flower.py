"""A real Flower deployment (issue 18): a SuperLink and three SuperNodes as separate
processes on 127.0.0.1 (free ports), each node with its own partition and state folder, la-lora on
a shrunk digits-swin for 2 rounds through ``flwr run`` (lalora.flower.demo, also ``make flower-demo``).

Checks: the run finishes with OS-entropy noise on every node; no private metric reaches the
server's run folder; every node's persisted ledger counts exactly the steps it ran -- counted here
independently from the seeded schedule -- and its ε equals what the server reports and stays
within the target. Every process is stopped by run_demo (its own process groups).
One SuperNode is killed (SIGKILL, its whole process group) while a round runs without it and is
started again with the same node config: it registers under a new node id, the ServerApp finds
it (setup query to unknown nodes) and the node serves its next round from its persisted ledger.
"""
from __future__ import annotations

import os
import re

import pytest


@pytest.mark.slow
def test_superlink_and_three_supernodes_with_a_node_restart(tmp_path, monkeypatch):
    from lalora.privacy.plan import client_schedule
    from lalora.flower.demo import run_demo
    from lalora.privacy.accountant import PrivacyLedger

    if not os.environ.get("LALORA_CACHE"):
        monkeypatch.setenv("LALORA_CACHE", str(tmp_path / "cache"))   # never ~/.cache
    # schedule (seed 0): round 1 {0, 1}, round 2 {1, 2}, round 3 {0, 2}: node 0 is killed while
    # round 2 runs without it, and must serve round 3 from its persisted ledger
    res = run_demo(tmp_path / "demo", rounds=3, nodes=3, clients_per_round=2, epsilon=3.0,
                   local_steps=2, timeout=1500, restart_node=0, restart_at_round=2)
    assert res["restarted_at_s"] is not None
    log = (tmp_path / "demo" / "node0.log").read_text(errors="replace")
    ids = re.findall(r"SuperNode ID: (\d+)", log)
    assert len(ids) == 2 and ids[0] != ids[1]          # it rejoined under a new node id
    final = res["final"]
    assert final["noise_sources"] == ["os-entropy"]
    assert final["epsilon_spent"] <= 3.0 + 1e-9
    for row in res["metrics"]:
        assert "train_loss" not in row and "mean_batch_size" not in row
    schedule = client_schedule(3, 2, 3, seed=0)          # the seeded schedule, recomputed here
    assert schedule == [[0, 1], [1, 2], [0, 2]]
    for i in range(3):
        rounds = [t + 1 for t, s in enumerate(schedule) if i in s]
        ran = 2 * len(rounds)                            # local_steps x rounds it was sampled in
        assert final["per_client_steps"][i] == ran
        ledger = PrivacyLedger.from_dict(res["node_ledgers"][i])
        (run,) = ledger.clients                          # one run on this node
        assert ledger.steps(run) == ran
        assert sorted(ledger.rounds(run)) == rounds      # node 0: [1, 3], across its restart
        assert ledger.epsilon(run) == pytest.approx(final["per_client_epsilon"][i], rel=1e-9)
        assert ledger.epsilon(run) <= 3.0 + 1e-9


@pytest.mark.slow
def test_seeded_deployment_equals_the_inprocess_engine(tmp_path, monkeypatch):
    """Seeded streams on the nodes (noise="seeded", simulation semantics over real processes): the
    final global LoRA/head state equals the in-process engine's for the same config."""
    import torch

    from lalora.federated.simulation import Simulator
    from lalora.flower.demo import run_demo
    from lalora.flower.rundir import GLOBAL_STATE_FILE
    from lalora.flower.server_app import config_from_run_config
    from lalora.results import load_checkpoint

    if not os.environ.get("LALORA_CACHE"):
        monkeypatch.setenv("LALORA_CACHE", str(tmp_path / "cache"))
    res = run_demo(tmp_path / "demo", rounds=2, nodes=3, clients_per_round=2, epsilon=3.0,
                   local_steps=2, timeout=1500, noise="seeded")
    assert res["final"]["noise_sources"] == ["seeded"]
    deployed = load_checkpoint(f"{res['run_dir']}/{GLOBAL_STATE_FILE}")
    cfg, _ = config_from_run_config(res["run_config"])
    sim = Simulator(cfg)
    state = sim.initial_global_state()
    for t in range(1, sim.cfg.rounds + 1):
        state = sim.server_aggregate([sim.client_update(c, t, state) for c in sim.sampled_clients(t)],
                                     t, state)
    assert set(deployed) == set(state)
    for k in state:
        assert torch.allclose(deployed[k], state[k], rtol=0, atol=1e-6), k
    assert res["final"]["per_client_steps"] == sim.privacy_summary()["per_client_steps"]

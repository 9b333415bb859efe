"""FedSA-LoRA is scored over the clients that trained (sampled at least once), not every client: a
never-sampled client still holds B = 0 and a fresh head, so averaging it in would score the schedule.
The result JSON says which (``fedsa_scoring``)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_federated import tiny_config, tiny_task  # noqa: E402

from lalora.federated.runs import run_experiment
from lalora.federated.simulation import Simulator  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def _never_sampled_config(**kw):
    """A seed whose schedule (4 clients, 1 per round, 2 rounds) leaves at least one client out."""
    for seed in range(50):
        cfg = tiny_config("fedsa-lora", clients_per_round=1, rounds=2, epsilon="inf", seed=seed, **kw)
        sim = Simulator(cfg, task=tiny_task())
        trained = sorted({c for s in sim.schedule for c in s})
        if len(trained) < sim.cfg.clients:
            return cfg, sim, trained
    raise AssertionError("no seed leaves a client out")


def test_scored_over_trained_clients_only():
    cfg, sim, trained = _never_sampled_config()
    never = [c for c in range(sim.cfg.clients) if c not in trained]
    state = sim.initial_global_state()
    for t in (1, 2):
        ups = [sim.client_update(c, t, state) for c in sim.sampled_clients(t)]
        state = sim.server_aggregate(ups, t, state)
    ev = sim.evaluate(state)
    assert ev["fedsa_scoring"] == "trained-clients" and ev["scored_clients"] == trained
    per = ev["per_client_accuracy"]
    assert len(per) == sim.cfg.clients
    assert ev["accuracy"] == pytest.approx(np.mean([per[c] for c in trained]))
    # the untrained client is evaluated with the initial B and head: what the old all-client mean
    # would have mixed in
    sim._load_client(never[0], state)
    init = sim.initial_global_state()
    b = next(iter(sim.groups.names(("B",))))
    assert torch.equal(sim.groups.get_state()[b], init[b])


def test_before_training_all_clients_scored_and_result_json_says_which(tmp_path):
    sim = Simulator(tiny_config("fedsa-lora", epsilon="inf"), task=tiny_task())
    ev = sim.evaluate(sim.initial_global_state())
    assert ev["scored_clients"] == list(range(sim.cfg.clients))
    assert ev["fedsa_scoring"].startswith("all-clients")
    cfg, _, trained = _never_sampled_config()
    res = run_experiment(cfg, runs_dir=tmp_path, task=tiny_task(), progress=False)
    final = json.loads((Path(res.run_dir) / "final.json").read_text())
    assert final["fedsa_scoring"] == "trained-clients" and final["scored_clients"] == trained
    assert final["accuracy"] == pytest.approx(np.mean([final["per_client_accuracy"][c] for c in trained]))


def test_flower_engine_scores_the_same_clients():
    """Flower's federated evaluation (per-client models) scores the same clients as the in-process one."""
    from lalora.flower.run import run_flower

    cfg, _, trained = _never_sampled_config()
    cfg = cfg.replace(task_overrides={})
    sim = Simulator(cfg, task=tiny_task(dropout=0.0))
    state = sim.initial_global_state()
    for t in range(1, sim.cfg.rounds + 1):
        state = sim.server_aggregate([sim.client_update(c, t, state) for c in sim.sampled_clients(t)], t, state)
    ev = sim.evaluate(state)
    res = run_flower(cfg, runs_dir=None, backend="inprocess", task=tiny_task(dropout=0.0), progress=False)
    assert res.final["scored_clients"] == trained == ev["scored_clients"]
    assert res.final["fedsa_scoring"] == "trained-clients"
    assert res.final["accuracy"] == pytest.approx(ev["accuracy"], abs=1e-12)

"""The federated engine on a tiny MLP+LoRA task: schedules act on exactly the named factors and
steps, noise lands only on what trains, aggregation is the mean of the sampled clients, fedsa-lora
keeps B and head local, the filter leaves the ledger unchanged, same seed -> same result.

`tiny_task()` / `tiny_config()` are reused by test_resume.py and test_cli_run.py.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from lalora.config import RunConfig
from lalora.methods import METHODS
from lalora.federated.server import ClientUpdate, aggregate
from lalora.federated.runs import run_experiment
from lalora.federated.simulation import Simulator
from lalora.privacy.plan import client_schedule
from lalora.lora import inject_lora
from lalora.tasks.data import TensorDictDataset, stack_collate
from lalora.tasks.registry import Task

IN, HIDDEN, CLASSES, R = 10, 12, 3, 4


# Tiny tensors: one intra-op thread (tests/conftest.py) is ~10x faster than oversubscribed threads on a busy box.
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_task(num_train: int = 96, num_test: int = 48, dropout: float = 0.05) -> Task:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(num_train + num_test, IN, generator=g)
    w = torch.randn(IN, CLASSES, generator=g)
    y = (x @ w).argmax(1)
    train = TensorDictDataset({"x": x[:num_train], "labels": y[:num_train]})
    test = TensorDictDataset({"x": x[num_train:], "labels": y[num_train:]})

    def build_model() -> nn.Module:
        torch.manual_seed(7)
        model = nn.Sequential(OrderedDict(fc1=nn.Linear(IN, HIDDEN), act1=nn.Tanh(),
                                          fc2=nn.Linear(HIDDEN, HIDDEN), act2=nn.Tanh(),
                                          head=nn.Linear(HIDDEN, CLASSES)))
        for p in model.parameters():
            p.requires_grad_(False)
        inject_lora(model, ["fc1", "fc2"], r=R, alpha=R, dropout=dropout, seed=0)
        for p in model.head.parameters():
            p.requires_grad_(True)
        return model

    return Task(name="tiny", num_classes=CLASSES, train=train, test=test,
                train_labels=y[:num_train].numpy(), build_model=build_model,
                lora_targets=["fc1", "fc2"], head_name="head",
                forward=lambda m, b: m(b["x"]), collate=stack_collate,
                # batch = client size -> q = 1: the accountant is closed-form (fast tests);
                # test_resume.py uses q < 1 to exercise Poisson sampling across a resume.
                defaults={"rounds": 4, "local_steps": 4, "batch_size": num_train // 4, "clients": 4,
                          "clients_per_round": 2, "lr": 0.2, "optimizer": "sgd", "momentum": 0.0,
                          "weight_decay": 1e-3, "lr_decay": 0.99, "r": R, "alpha": float(R),
                          "partition": "iid", "beta": 0.5, "eval_every": 2})


def tiny_config(method: str = "la-lora", **kw) -> RunConfig:
    return RunConfig(task="tiny", method=method, **{"epsilon": 3.0, **kw})


def _snapshot(sim: Simulator) -> dict[str, torch.Tensor]:
    return sim.groups.get_state()


def _changed(before, after, group_names) -> set[str]:
    return {n for n in group_names if not torch.equal(before[n], after[n])}


# ----------------------------------------------------------------------------- schedules in action
@pytest.mark.parametrize("method", sorted(METHODS))
def test_one_round_moves_exactly_the_scheduled_factors(method):
    sim = Simulator(tiny_config(method), task=tiny_task())
    names = {g: set(sim.groups.params[g]) for g in ("A", "B", "head")}
    state = sim.initial_global_state()
    for t in (1, 2):   # round 2 matters for rolora
        moved: list[tuple[int, frozenset, set]] = []
        prev = {}

        def hook(k, t, trains, model, batch_size):
            now = _snapshot(sim)
            moved.append((k, trains, {g for g in ("A", "B", "head") if _changed(prev, now, names[g])}))
            prev.clear()
            prev.update(now)

        cid = sim.sampled_clients(t)[0]
        sim._load_client(cid, state)
        prev.update(_snapshot(sim))
        upd = sim.client_update(cid, t, state, step_hook=hook)
        assert len(moved) == sim.cfg.local_steps
        for k, trains, groups_moved in moved:
            expected = set(METHODS[method].trains(k, t)) | {"head"}
            assert trains == METHODS[method].trains(k, t)
            # exactly the scheduled factors (and the head) changed at this step
            assert groups_moved == expected, (method, t, k, groups_moved)
        # the update carries exactly the aggregated groups
        sent = {g for g in ("A", "B", "head") if names[g] & set(upd.state)}
        assert sent == set(METHODS[method].aggregated(t, sim.cfg.local_steps))
        state = sim.server_aggregate([upd], t, state)


def test_schedules_name_the_paper_steps():
    la, ffa, ro = METHODS["la-lora"], METHODS["ffa-lora"], METHODS["rolora"]
    assert [set(la.trains(k, 1)) for k in (1, 2, 3, 4)] == [{"B"}, {"A"}, {"B"}, {"A"}]
    assert [set(la.trains(k, 1, period=2)) for k in (1, 2, 3, 4)] == [{"B"}, {"B"}, {"A"}, {"A"}]
    assert all(ffa.trains(k, t) == {"B"} for k in range(1, 6) for t in range(1, 4))
    assert [set(ro.trains(1, t)) for t in (1, 2, 3)] == [{"B"}, {"A"}, {"B"}]
    assert ro.aggregated(1) == {"B", "head"} and ro.aggregated(2) == {"A", "head"}
    assert METHODS["fedsa-lora"].aggregated(1) == {"A"}
    assert METHODS["la-lora"].filter_default and not METHODS["dp-lora"].filter_default
    assert not METHODS["fedavg-lora"].private


def test_noise_lands_only_on_what_trains():
    """An empty Poisson batch is a noise-only step: the trained factor and the head move, the
    frozen factor does not (no noise, no weight decay)."""
    sim = Simulator(tiny_config("la-lora", filter=False), task=tiny_task())
    from lalora.federated import client as client_mod

    orig = client_mod.poisson_positions
    client_mod.poisson_positions = lambda n, q, g: torch.zeros(0, dtype=torch.long)
    try:
        names = {g: set(sim.groups.params[g]) for g in ("A", "B", "head")}
        log = []
        prev = {}

        def hook(k, t, trains, model, batch_size):
            now = _snapshot(sim)
            log.append((k, batch_size, {g for g in names if _changed(prev, now, names[g])}))
            prev.clear()
            prev.update(now)

        state = sim.initial_global_state()
        sim._load_client(0, state)
        prev.update(_snapshot(sim))
        sim.client_update(0, 1, state, step_hook=hook)
    finally:
        client_mod.poisson_positions = orig
    assert [b for _, b, _ in log] == [0] * sim.cfg.local_steps
    assert log[0][2] == {"B", "head"} and log[1][2] == {"A", "head"}


def test_dp_gradient_sees_only_trainable_factor(monkeypatch):
    """The DP step is called with exactly the scheduled factor (plus head) requiring grad, so the
    clipping norm covers them and nothing else."""
    import lalora.privacy.dp_step as dp_step

    seen = []
    real = dp_step.dp_gradient

    def spy(model, loss_fn, batch, **kw):
        seen.append({n.rsplit(".", 1)[-1] if "lora" in n else "head"
                     for n, p in model.named_parameters() if p.requires_grad})
        assert kw["noise_multiplier"] > 0 and math.isfinite(kw["clip_norm"])
        return real(model, loss_fn, batch, **kw)

    monkeypatch.setattr(dp_step, "dp_gradient", spy)
    sim = Simulator(tiny_config("la-lora"), task=tiny_task())
    sim.client_update(0, 1, sim.initial_global_state())
    assert seen[0] == {"lora_B", "head"} and seen[1] == {"lora_A", "head"}


# ----------------------------------------------------------------------------- aggregation
def test_aggregate_is_mean_of_sampled_clients():
    g = torch.Generator().manual_seed(0)
    glob = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(2, generator=g),
            "untouched": torch.randn(5, generator=g)}
    ups = [ClientUpdate({"a": torch.randn(3, 4, generator=g), "b": torch.randn(2, generator=g)},
                        num_samples=n, num_steps=1) for n in (1, 3, 4)]
    new = aggregate(ups, glob)
    ref_a = torch.stack([u.state["a"].double() for u in ups]).mean(0).float()
    torch.testing.assert_close(new["a"], ref_a, rtol=0, atol=1e-7)
    assert torch.equal(new["untouched"], glob["untouched"])
    w = aggregate(ups, glob, weighted=True)
    ref_w = sum(u.num_samples * u.state["b"].double() for u in ups) / 8
    torch.testing.assert_close(w["b"], ref_w.float(), rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="same keys"):
        aggregate([ups[0], ClientUpdate({"a": ups[1].state["a"]}, 1, 1)], glob)


def test_server_round_equals_mean_of_client_states():
    sim = Simulator(tiny_config("dp-lora"), task=tiny_task())
    state = sim.initial_global_state()
    ups = [sim.client_update(c, 1, state) for c in sim.sampled_clients(1)]
    new = sim.server_aggregate(ups, 1, state)
    for key in ups[0].state:
        ref = torch.stack([u.state[key].double() for u in ups]).mean(0).float()
        torch.testing.assert_close(new[key], ref, rtol=0, atol=1e-7)
    assert set(ups[0].state) == set(sim.groups.names())


def test_fedsa_keeps_B_and_head_local():
    sim = Simulator(tiny_config("fedsa-lora"), task=tiny_task())
    state = sim.initial_global_state()
    clients = sim.sampled_clients(1)
    ups = [sim.client_update(c, 1, state) for c in clients]
    a_names, local_names = set(sim.groups.names(("A",))), set(sim.groups.names(("B", "head")))
    assert set(ups[0].state) == a_names
    new = sim.server_aggregate(ups, 1, state)
    for n in local_names:   # the server never changes B or head
        assert torch.equal(new[n], state[n])
    c0, c1 = clients
    assert set(sim.client_local[c0]) == local_names
    b = next(iter(sim.groups.names(("B",))))
    assert not torch.equal(sim.client_local[c0][b], sim.client_local[c1][b])
    ev = sim.evaluate(new)
    assert len(ev["per_client_accuracy"]) == sim.cfg.clients
    # scored over the clients that trained (the two sampled in round 1), not every client
    assert ev["scored_clients"] == sorted(clients) and ev["fedsa_scoring"] == "trained-clients"
    assert ev["accuracy"] == pytest.approx(np.mean([ev["per_client_accuracy"][c] for c in clients]))


# ----------------------------------------------------------------------------- privacy accounting
def test_sigma_calibrated_on_worst_client_and_ledger_counts_steps():
    from lalora.privacy.accountant import epsilon_for

    cfg = tiny_config("dp-lora", epsilon=3.0, rounds=5)
    sim = Simulator(cfg, task=tiny_task())
    eps_planned = [epsilon_for(sim.noise_multiplier, cfg.delta, q, s) if s else 0.0
                   for q, s in zip(sim.sample_rates, sim.planned_steps)]
    assert max(eps_planned) <= 3.0 + 1e-6 and max(eps_planned) > 2.9
    state = sim.initial_global_state()
    for t in range(1, cfg.rounds + 1):
        ups = [sim.client_update(c, t, state) for c in sim.sampled_clients(t)]
        state = sim.server_aggregate(ups, t, state)
    assert [sim.ledger.steps(c) for c in range(cfg.clients or 4)] == sim.planned_steps
    np.testing.assert_allclose(sim.privacy_summary()["per_client_epsilon"], eps_planned, rtol=1e-9)
    # the memoised per-client value is the ledger's own
    for c in range(4):
        assert sim.client_epsilon(c) == pytest.approx(sim.ledger.epsilon(c) if sim.ledger.steps(c) else 0.0,
                                                      rel=1e-12)


def test_filter_leaves_ledger_unchanged():
    out = {}
    for flt in (True, False):
        sim = Simulator(tiny_config("la-lora", filter=flt), task=tiny_task())
        state = sim.initial_global_state()
        for t in (1, 2):
            ups = [sim.client_update(c, t, state) for c in sim.sampled_clients(t)]
            state = sim.server_aggregate(ups, t, state)
        out[flt] = (sim.noise_multiplier, sim.ledger.to_dict(), state)
    assert out[True][0] == out[False][0]
    assert out[True][1] == out[False][1]
    # ... while the filter did change the training
    assert any(not torch.equal(out[True][2][k], out[False][2][k]) for k in out[True][2])


def test_fedavg_is_not_private():
    sim = Simulator(tiny_config("fedavg-lora", epsilon=3.0), task=tiny_task())
    assert not sim.private and sim.noise_multiplier == 0.0 and math.isinf(sim.local.clip_norm)
    sim.client_update(0, 1, sim.initial_global_state())
    assert math.isinf(sim.ledger.epsilon(0))


def test_client_schedule_is_seeded_and_data_independent():
    a = client_schedule(8, 4, 10, seed=3)
    assert a == client_schedule(8, 4, 10, seed=3) and a != client_schedule(8, 4, 10, seed=4)
    assert all(len(set(s)) == 4 and all(0 <= c < 8 for c in s) for s in a)


# ----------------------------------------------------------------------------- whole runs
def test_same_seed_same_result(tmp_path):
    r1 = run_experiment(tiny_config("la-lora"), runs_dir=tmp_path / "a", task=tiny_task(), progress=False)
    r2 = run_experiment(tiny_config("la-lora"), runs_dir=tmp_path / "b", task=tiny_task(), progress=False)
    strip = lambda ms: [{k: v for k, v in m.items() if not k.endswith("_s")} for m in ms]
    assert strip(r1.metrics) == strip(r2.metrics)
    assert r1.final["accuracy"] == r2.final["accuracy"]
    assert r1.final["per_client_epsilon"] == r2.final["per_client_epsilon"]
    r3 = run_experiment(tiny_config("la-lora", seed=1), runs_dir=tmp_path / "a", task=tiny_task(),
                        progress=False)
    assert r3.run_dir != r1.run_dir and strip(r3.metrics) != strip(r1.metrics)
    # a finished run is served from its folder
    r4 = run_experiment(tiny_config("la-lora"), runs_dir=tmp_path / "a", task=tiny_task(), progress=False)
    assert r4.cached and r4.final == r1.final and r4.run_dir == r1.run_dir


def test_every_method_runs_end_to_end(tmp_path):
    for m in sorted(METHODS):
        r = run_experiment(tiny_config(m, rounds=2), runs_dir=tmp_path, task=tiny_task(), progress=False)
        assert 0.0 <= r.final["accuracy"] <= 1.0, m
        assert len(r.metrics) == 2 and r.metrics[-1]["round"] == 2
        if m == "fedavg-lora":
            assert r.final["epsilon_spent"] == "inf"
        else:
            assert 0 < r.final["epsilon_spent"] <= 3.0 + 1e-6


def test_fast_rdp_epsilon_equals_the_accountant():
    """The memoised per-round ε (one-step RDP curve x steps) is the accountant's number exactly."""
    from lalora.privacy.accountant import PrivacyLedger, calibrate_sigma, epsilon_for
    from lalora.privacy.accountant import cached_epsilon_for as _epsilon_for

    for sigma, q, steps in [(1.3, 0.1, 40), (2.0, 0.05, 7)]:
        assert _epsilon_for(sigma, 1e-5, q, steps, "rdp") == epsilon_for(sigma, 1e-5, q, steps, "rdp")
        ledger = PrivacyLedger(delta=1e-5, accountant="rdp")
        ledger.set_client(0, sample_rate=q, noise_multiplier=sigma)
        ledger.record_steps(0, steps, round=1)
        assert _epsilon_for(sigma, 1e-5, q, steps, "rdp") == ledger.epsilon(0)
    # σ for several clients: every pair meets ε, and the binding one is within the tolerance
    pairs = ((0.1, 40), (0.2, 20), (0.05, 80))
    sigma = calibrate_sigma(3.0, 1e-5, pairs, "rdp")
    eps = [epsilon_for(sigma, 1e-5, q, s, "rdp") for q, s in pairs]
    assert max(eps) <= 3.0 and max(eps) > 2.95

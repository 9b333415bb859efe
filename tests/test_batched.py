"""Client batching (federated/batched.py, dplora_kernels.grouped): all sampled clients of a round in
lock-step through one backbone must compute what the sequential reference computes.

- kernels: grouped per-sample LoRA gradients (client_index) == a float64 per-sample autograd loop;
  grouped_dp_gradient == dp_gradient run on each client alone (same generators: same noise), an
  empty client included (noise only);
- simulation, every method, tiny MLP task with q < 1 and LoRA dropout on: final global state (and
  fedsa's client-local B/head) within 1e-5 relative of sequential mode, same ledger, same accuracy;
  batched runs are bitwise repeatable;
- independence: changing one client's data leaves the other clients' updates unchanged;
- clients whose models differ -> one clear ValueError.
Slow: the same equivalence on ci-sized digits-swin (the Swin backbone, windowed attention).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dplora_kernels.api import lora_per_sample_grads
from dplora_kernels.dp import dp_gradient, grouped_dp_gradient
from dplora_kernels.grouped import client_groups
from dplora_kernels.lora import LoRALinear
from lalora.federated.batched import stack_client_states
from lalora.methods import METHODS
from lalora.federated.simulation import Simulator
from lalora.federated.state import ParamGroups

from test_federated import tiny_config, tiny_task

REL_TOL = 1e-5


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


# ----------------------------------------------------------------------------- kernels
def test_grouped_lora_per_sample_grads_match_float64_loop():
    g = torch.Generator().manual_seed(0)
    M, r, n, m, T = 3, 2, 5, 4, 3
    sizes = [2, 0, 3]
    N = sum(sizes)
    idx = torch.repeat_interleave(torch.arange(M), torch.tensor(sizes))
    A = torch.randn(M, r, n, generator=g, dtype=torch.float64)
    B = torch.randn(M, m, r, generator=g, dtype=torch.float64)
    x = torch.randn(N, T, n, generator=g, dtype=torch.float64)
    w_out = torch.randn(N, T, m, generator=g, dtype=torch.float64)   # loss_i = <w_i, h_i>
    s = 0.7
    res = lora_per_sample_grads(x.float(), w_out.float(), A.float(), B.float(), s, N, client_index=idx)
    for i in range(N):
        a = A[idx[i]].clone().requires_grad_(True)
        b = B[idx[i]].clone().requires_grad_(True)
        h = s * (x[i] @ a.T) @ b.T
        ga, gb = torch.autograd.grad((h * w_out[i]).sum(), (a, b))
        assert torch.allclose(res.grad_A[i].double(), ga, rtol=1e-5, atol=1e-6)
        assert torch.allclose(res.grad_B[i].double(), gb, rtol=1e-5, atol=1e-6)
        assert res.sqnorm_A[i].item() == pytest.approx(float(ga.pow(2).sum()), rel=1e-5)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.fc = LoRALinear(nn.Linear(6, 5), r=2, alpha=2.0, dropout=0.0)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)))


def _loss(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["labels"], reduction="none")


def test_grouped_dp_gradient_equals_dp_gradient_per_client():
    """One grouped step == dp_gradient on each client alone: same clipped sums, same noise draws
    (each client's own generator), an empty client gets noise only."""
    torch.manual_seed(0)
    model = _Tiny()
    with torch.no_grad():
        model.fc.lora_B.normal_()
    sizes = [3, 0, 4]
    xs = [torch.randn(n, 6) for n in sizes]
    ys = [torch.randint(0, 3, (n,)) for n in sizes]
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    states = []
    for j in range(3):   # distinct client states
        states.append({k: p.detach() + 0.1 * j * torch.randn_like(p) for k, p in model.named_parameters()
                       if k in names})
    expected = [4.0, 2.5, 3.0]
    kw = dict(clip_norm=0.5, noise_multiplier=0.8)
    # reference: each client alone
    ref = []
    for j in range(3):
        with torch.no_grad():
            for k, p in model.named_parameters():
                if k in states[j]:
                    p.copy_(states[j][k])
        dp_gradient(model, _loss, {"x": xs[j], "labels": ys[j]}, expected_batch_size=expected[j],
                    generator=torch.Generator().manual_seed(100 + j), **kw)
        ref.append({k: p.grad.clone() for k, p in model.named_parameters() if k in names})
        for p in model.parameters():
            p.grad = None
    stacks = {k: nn.Parameter(torch.stack([s[k] for s in states])) for k in names}
    grouped_dp_gradient(model, _loss, {"x": torch.cat(xs), "labels": torch.cat(ys)}, sizes=sizes, stacks=stacks,
                        expected_batch_sizes=expected,
                        generators=[torch.Generator().manual_seed(100 + j) for j in range(3)], **kw)
    for k in names:
        for j in range(3):
            assert torch.allclose(stacks[k].grad[j], ref[j][k], rtol=1e-5, atol=1e-6), (k, j)


def test_grouped_forward_uses_each_clients_factors():
    model = _Tiny()
    x = torch.randn(5, 6)
    sizes = [2, 3]
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    states = [{k: dict(model.named_parameters())[k].detach() + j * 0.3 for k in names} for j in range(2)]
    stacks = {k: torch.stack([s[k] for s in states]) for k in names}
    with client_groups(model, sizes, stacks):
        out = model(x)
    for j, (a, b) in enumerate(((0, 2), (2, 5))):
        m = copy.deepcopy(model)
        ParamGroups.from_model(m).set_state(states[j])
        assert torch.allclose(out[a:b], m(x[a:b]), atol=1e-6)
    assert model.fc._group is None and not model.head._forward_hooks   # restored on exit


def test_clients_with_different_models_are_refused():
    model = _Tiny()
    groups = ParamGroups.from_model(model)
    good = groups.get_state()
    bad = dict(good, **{"fc.lora_A": torch.zeros(3, 6)})   # another rank
    with pytest.raises(ValueError, match="client 1's 'fc.lora_A' has shape"):
        stack_client_states([good, bad], groups)
    missing = {k: v for k, v in good.items() if k != "head.bias"}
    with pytest.raises(ValueError, match="different LoRA/head parameters"):
        stack_client_states([good, missing], groups)
    with pytest.raises(ValueError, match="expected \\(clients=2"):
        with client_groups(model, [1, 1], {"fc.lora_A": torch.zeros(2, 3, 6), "fc.lora_B": torch.zeros(2, 5, 2)}):
            pass


# ----------------------------------------------------------------------------- simulation
def _run(method: str, batching: bool, task=None, rounds: int = 3, **kw):
    cfg = tiny_config(method, rounds=rounds, batch_size=8, clients_per_round=3, client_batching=batching, **kw)
    sim = Simulator(cfg, task=task if task is not None else tiny_task(num_train=320))
    state = sim.initial_global_state()
    for t in range(1, rounds + 1):
        state = sim.server_aggregate(sim.clients_update(sim.sampled_clients(t), t, state), t, state)
    return sim, state


@pytest.mark.parametrize("method", sorted(METHODS))
def test_batched_equals_sequential(method):
    seq, a = _run(method, False)
    bat, b = _run(method, True)
    assert bat.client_batching and not seq.client_batching
    for k in a:
        assert _rel_err(a[k], b[k]) <= REL_TOL, (k, _rel_err(a[k], b[k]))
    assert set(seq.client_local) == set(bat.client_local)
    for c in seq.client_local:   # fedsa-lora: each client's local B and head
        for k in seq.client_local[c]:
            assert _rel_err(seq.client_local[c][k], bat.client_local[c][k]) <= REL_TOL
    assert seq.ledger.to_dict() == bat.ledger.to_dict()
    assert seq.privacy_summary() == bat.privacy_summary()
    assert seq.evaluate(a)["accuracy"] == bat.evaluate(b)["accuracy"]
    # every random stream advanced identically
    for gs, gb in zip(seq.sampling_generators + seq.noise_generators + seq.dropout_generators,
                      bat.sampling_generators + bat.noise_generators + bat.dropout_generators):
        assert torch.equal(gs.get_state(), gb.get_state())


@pytest.mark.parametrize("kw", [{"clipping": "per_layer"}, {"optimizer": "adamw", "lr": 0.01},
                                {"optimizer": "sgd", "momentum": 0.9}], ids=["per-layer", "adamw", "momentum"])
def test_batched_equals_sequential_other_settings(kw):
    """Per-layer clipping; one optimizer over the client stacks == per-client AdamW / SGD momentum."""
    (seq, a), (bat, b) = _run("la-lora", False, **kw), _run("la-lora", True, **kw)
    for k in a:
        assert _rel_err(a[k], b[k]) <= REL_TOL, (k, _rel_err(a[k], b[k]))
    assert seq.ledger.to_dict() == bat.ledger.to_dict()


def test_batched_is_bitwise_repeatable():
    _, a = _run("la-lora", True)
    _, b = _run("la-lora", True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_one_clients_data_does_not_change_the_others_updates():
    cfg = tiny_config("dp-lora", rounds=1, batch_size=8, clients_per_round=3, client_batching=True)
    task_a, task_b = tiny_task(num_train=320), tiny_task(num_train=320)
    sim_a, sim_b = Simulator(cfg, task=task_a), Simulator(cfg, task=task_b)
    clients = sim_a.sampled_clients(1)
    victim = clients[1]
    idx = sim_b.client_data[victim].indices
    task_b.train.tensors["x"][idx] = torch.randn(len(idx), task_b.train.tensors["x"].shape[1])
    state = sim_a.initial_global_state()
    ua = sim_a.clients_update(clients, 1, state)
    ub = sim_b.clients_update(clients, 1, state)
    for u, v in zip(ua, ub):
        same = all(torch.allclose(u.state[k], v.state[k], rtol=0, atol=1e-6) for k in u.state)
        assert same == (u.client_id != victim), u.client_id


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_batched_equals_sequential_digits_swin(method):
    from lalora.config import RunConfig
    from lalora.tasks import get_task

    task = get_task("digits-swin", max_train_samples=240)
    out = []
    for batching in (False, True):
        cfg = RunConfig(task="digits-swin", method=method, epsilon=3.0, seed=0, rounds=3, local_steps=3,
                        batch_size=8, clients=6, clients_per_round=4, partition="iid", eval_batch_size=256,
                        client_batching=batching, task_overrides={"max_train_samples": 240})
        sim = Simulator(cfg, task=task)
        state = sim.initial_global_state()
        for t in range(1, 4):
            state = sim.server_aggregate(sim.clients_update(sim.sampled_clients(t), t, state), t, state)
        out.append((sim, state))
    (seq, a), (bat, b) = out
    for k in a:
        assert _rel_err(a[k], b[k]) <= REL_TOL, (k, _rel_err(a[k], b[k]))
    assert seq.ledger.to_dict() == bat.ledger.to_dict()
    assert seq.evaluate(a)["accuracy"] == bat.evaluate(b)["accuracy"]


def test_batching_falls_back_where_it_would_not_be_equivalent():
    from lalora.federated.batched import batching_blocker

    model = _Tiny()
    assert batching_blocker(model, ParamGroups.from_model(model)) is None
    model.drop = nn.Dropout(0.1)   # backbone dropout: global RNG over the concatenated batch
    assert "dropout outside the LoRA layers" in batching_blocker(model, ParamGroups.from_model(model))
    model = _Tiny()
    model.norm = nn.LayerNorm(5)   # a trainable non-Linear "head" parameter has no grouped form
    assert "not nn.Linear parameters" in batching_blocker(model, ParamGroups.from_model(model))

"""End-to-end audit of a whole federated run: canaries in one client's data, the run's releases
scored, the one-run bound (Steinke, Nasr & Jagielski 2023) set against what the run's *ledger*
claims.

Why: the step audits (canary.py, one_run.py) check one DP step or a hand-written training loop; they
cannot see the run's step counting. A ledger that recorded 1 of every 20 DP steps would pass them
all while the run spends far more ε than it reports. This audit goes through
``lalora.federated.simulation.Simulator`` -- its schedule, Poisson sampling, the real DP step,
the ledger -- and compares the empirical lower bound with ``Simulator.privacy_summary()``.

Setup: one client holds ``real`` samples (d informative inputs) and each of ``canaries`` canaries
with probability 1/2. The model is one LoRALinear(d + m -> k); canary i is ``scale·e_{d+i}`` with its
least likely label, so (A's canary columns start at 0, B is random) its gradient lies in column
d+i of A and is clipped to C. The auditor sees what the server sees -- the global state after every
round -- and scores canary i by the change of A[:, d+i] over each round projected on the canary's
own descent direction at the start of the round. It guesses "in" for the top ``guesses/2`` scores
and "out" for the bottom ones; ``stats.one_run_epsilon_lb`` turns the correct count into an ε lower
bound at ``confidence``, valid for any mechanism. A bound above the ledger's ε is a bug.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from . import stats

__all__ = ["RunAuditResult", "audit_federated_run", "ledger_undercount"]


@contextmanager
def ledger_undercount(every: int = 20) -> Iterator[None]:
    """Planted bug: the privacy ledger records ceil(n / every) of every n DP steps (1 of 20)."""
    from lalora.privacy.accountant import PrivacyLedger

    real = PrivacyLedger.record_steps

    def undercount(self, client, n, **kwargs):
        return real(self, client, math.ceil(n / every), **kwargs)

    with mock.patch.object(PrivacyLedger, "record_steps", undercount):
        yield


@dataclass
class RunAuditResult:
    planted: str | None
    epsilon_target: float
    delta: float
    noise_multiplier: float
    claimed_epsilon: float        # what the run's ledger reports (privacy_summary()["epsilon_spent"])
    steps_run: int                # DP steps the client really took
    steps_counted: int            # DP steps its ledger recorded
    canaries: int
    included: int
    guesses: int
    correct: int
    epsilon_lb: float             # one-run lower bound (confidence `confidence`)
    confidence: float
    seconds: float

    @property
    def violates(self) -> bool:
        """The run leaks provably more than its ledger says."""
        return self.epsilon_lb > self.claimed_epsilon

    def to_dict(self) -> dict:
        d = asdict(self)
        d["violates"] = self.violates
        return d


class _CanaryModel(nn.Module):
    def __init__(self, base: nn.Linear, r: int, seed: int, d: int):
        super().__init__()
        from lalora.lora import LoRALinear

        g = torch.Generator().manual_seed(seed + 1)
        self.lora = LoRALinear(base, r=r, alpha=float(r), dropout=0.0, generator=g)
        with torch.no_grad():
            self.lora.lora_A[:, d:] = 0.0      # canary columns start at 0: the gradient stays in A
            self.lora.lora_B.copy_(torch.randn(self.lora.lora_B.shape, generator=g))

    def forward(self, x):
        return self.lora(x)


def _canary_task(x, y, k: int, d: int, r: int, seed: int):
    from lalora.tasks.data import TensorDictDataset, stack_collate
    from lalora.tasks.registry import Task

    n_in = x.shape[1]
    g = torch.Generator().manual_seed(seed)
    w0 = torch.zeros(k, n_in)
    w0[:, :d] = torch.randn(k, d, generator=g) / math.sqrt(d)

    def build_model():
        base = nn.Linear(n_in, k, bias=False)
        with torch.no_grad():
            base.weight.copy_(w0)
        base.weight.requires_grad_(False)
        return _CanaryModel(base, r, seed, d)

    data = TensorDictDataset({"x": x, "labels": y})
    return Task(name="audit-canaries", num_classes=k, train=data, test=data, train_labels=y.numpy(),
                build_model=build_model, lora_targets=["lora"], head_name="none",
                forward=lambda m, b: m(b["x"]), collate=stack_collate, defaults={})


def audit_federated_run(epsilon: float = 8.0, *, delta: float = 1e-5, canaries: int = 1000,
                        real: int = 100, d: int = 8, k: int = 4, r: int = 4, rounds: int = 1,
                        local_steps: int = 20, guesses: int = 200, canary_scale: float = 100.0,
                        lr: float = 1.0, method: str = "dp-lora", confidence: float = 0.95,
                        seed: int = 0, planted: str | None = None) -> RunAuditResult:
    """Audit one federated run end to end (module docstring). Full-batch sampling (q = 1: every
    included canary is in every step); ``planted`` only labels the result (apply
    :func:`ledger_undercount` around the call)."""
    from lalora.config import RunConfig
    from lalora.federated.simulation import Simulator

    if not 2 <= guesses <= canaries:
        raise ValueError(f"guesses must lie in [2, canaries]; got {guesses}")
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    m, n_in = canaries, d + canaries
    xr = torch.zeros(real, n_in)
    xr[:, :d] = torch.randn(real, d, generator=g)
    yr = (xr[:, :d] @ torch.randn(d, k, generator=g)).argmax(1)
    xc = torch.zeros(m, n_in)
    xc[torch.arange(m), d + torch.arange(m)] = canary_scale
    task = _canary_task(torch.cat([xr, xc]), torch.cat([yr, torch.zeros(m, dtype=torch.long)]), k, d, r, seed)
    probe = task.build_model()
    with torch.no_grad():
        yc = probe(xc).argmin(1)          # the least likely label: the gradient does not vanish
    task.train.tensors["labels"][real:] = yc
    member = torch.rand(m, generator=g) < 0.5
    own = torch.cat([torch.arange(real), real + torch.nonzero(member).flatten()])
    cfg = RunConfig(task="audit-canaries", method=method, epsilon=epsilon, delta=delta, seed=seed,
                    rounds=rounds, local_steps=local_steps, batch_size=len(own), clients=1,
                    clients_per_round=1, lr=lr, optimizer="sgd", momentum=0.0, weight_decay=0.0,
                    lr_decay=1.0, r=r, alpha=float(r), partition="iid", beta=0.5, eval_every=rounds,
                    head="freeze")
    sim = Simulator(cfg, task=task, partitions=[own.numpy()])
    a_name = next(n for n in sim.groups.params["A"])
    b_name = next(n for n in sim.groups.params["B"])
    cols = d + torch.arange(m)
    state = sim.initial_global_state()
    score = torch.zeros(m, dtype=torch.float64)
    for t in range(1, rounds + 1):
        A0, B0 = state[a_name].double(), state[b_name].double()
        # each canary's descent direction in its own A column, at the state the round starts from
        logits = F.linear(xc.double(), torch.as_tensor(sim.model.lora.base.weight, dtype=torch.float64)) \
            + sim.model.lora.scaling * (xc.double() @ A0.t()) @ B0.t()
        gout = torch.softmax(logits, 1) - F.one_hot(yc, k).double()              # (m, k)
        direction = -(B0.t() @ gout.t())                                          # (r, m)
        direction = direction / direction.norm(dim=0, keepdim=True).clamp_min(1e-12)
        updates = [sim.client_update(c, t, state) for c in sim.sampled_clients(t)]
        state = sim.server_aggregate(updates, t, state)                           # the release
        score += ((state[a_name].double() - A0)[:, cols] * direction).sum(0)
    order = torch.argsort(score, descending=True)
    half = guesses // 2
    guessed_in, guessed_out = order[:half], order[len(order) - (guesses - half):]
    correct = int(member[guessed_in].sum()) + int((~member[guessed_out]).sum())
    privacy = sim.privacy_summary()
    return RunAuditResult(
        planted=planted, epsilon_target=epsilon, delta=delta, noise_multiplier=sim.noise_multiplier,
        claimed_epsilon=float(privacy["epsilon_spent"]), steps_run=rounds * local_steps,
        steps_counted=int(privacy["per_client_steps"][0]), canaries=m, included=int(member.sum()),
        guesses=guesses, correct=correct,
        epsilon_lb=stats.one_run_epsilon_lb(m, guesses, correct, delta=delta, confidence=confidence),
        confidence=confidence, seconds=time.perf_counter() - t0)



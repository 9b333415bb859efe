"""One-run audit (Steinke, Nasr & Jagielski 2023, "Privacy auditing with one (1) training run").

m canaries are each put in the client's data set independently with probability 1/2; ONE private
client training runs (several DP steps of the real `dp_gradient`, Poisson sampling at rate q, SGD);
the auditor scores every canary, guesses "in" for the k highest scores and "out" for the k lowest,
and counts correct guesses. Theorem 5.2 of the paper turns (m, r = 2k guesses, v correct) into an ε
lower bound at 95% confidence (`stats.one_run_epsilon_lb`), set against the accountant's ε for the
training actually run (σ calibrated for (ε, δ, q, steps); ε = epsilon_for(σ, δ, q, steps)).

Model: one LoRALinear(d + m -> k), B nonzero (a mid-training state), dropout 0. Real samples use the
first d inputs; canary i is the input scale·e_{d+i} with its least likely label, so its gradient
lives in column d+i of A (plus a share of B) and its norm exceeds C. White-box score of canary i:
sum over the steps that train A of the update of A[:, d+i] projected on canary i's own (descent)
gradient direction at that step -- the "gradient alignment" score. The bound is known to be loose
(it needs many canaries to approach ε); it is reported, not tuned.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..lora import LoRALinear, set_active_factors
from ..privacy.accountant import calibrate_sigma, epsilon_for
from ..privacy.dp_step import dp_gradient   # planted bugs patch names inside it: still seen at call time
from ..privacy.sampling import poisson_sample
from . import stats
from .canary import single_thread

__all__ = ["OneRunResult", "audit_one_run"]


@dataclass
class OneRunResult:
    planted: str | None
    epsilon_target: float
    delta: float
    noise_multiplier: float
    accountant_epsilon: float
    sample_rate: float
    steps: int
    method: str
    canaries: int
    included: int
    guesses: int
    correct: int
    epsilon_lb: float
    seconds: float

    @property
    def violates(self) -> bool:
        return self.epsilon_lb > self.accountant_epsilon

    def to_dict(self) -> dict:
        d = asdict(self)
        d["violates"] = self.violates
        return d


@single_thread()
def audit_one_run(epsilon: float = 8.0, *, delta: float = 1e-5, canaries: int = 1000, real: int = 200,
                  d: int = 8, k: int = 4, r: int = 4, steps: int = 20, sample_rate: float = 0.25,
                  clip_norm: float = 1.0, lr: float = 0.5, guesses: int = 100, method: str = "dp-lora",
                  canary_scale: float = 100.0, confidence: float = 0.95, seed: int = 0,
                  planted: str | None = None) -> OneRunResult:
    """Run the one-run audit (module docstring). `guesses` = r = k+ + k- (half each), fixed in advance.
    method "dp-lora" trains A and B every step; "la-lora" alternates B (odd steps) and A (even)."""
    if method not in ("dp-lora", "la-lora"):
        raise ValueError(f"method must be 'dp-lora' or 'la-lora'; got {method!r}")
    if not 2 <= guesses <= canaries:
        raise ValueError(f"guesses must lie in [2, canaries]; got {guesses}")
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    m, n_in = canaries, d + canaries
    base = nn.Linear(n_in, k, bias=False)
    with torch.no_grad():
        base.weight.zero_()
        base.weight[:, :d] = torch.randn(k, d, generator=g) / math.sqrt(d)
    model = LoRALinear(base, r=r, alpha=float(r), dropout=0.0, generator=g)
    with torch.no_grad():
        model.lora_B.copy_(torch.randn(k, r, generator=g))
    # data: real samples (linear teacher labels) + canaries, each in with probability 1/2
    xr = torch.zeros(real, n_in)
    xr[:, :d] = torch.randn(real, d, generator=g)
    yr = (xr[:, :d] @ torch.randn(d, k, generator=g)).argmax(1)
    xc = torch.zeros(m, n_in)
    xc[torch.arange(m), d + torch.arange(m)] = canary_scale
    with torch.no_grad():
        yc = model(xc).argmin(1)
    member = torch.rand(m, generator=g) < 0.5
    x = torch.cat([xr, xc[member]])
    y = torch.cat([yr, yc[member]])
    n = len(y)

    sigma = calibrate_sigma(epsilon, delta, [(sample_rate, steps)])
    acc_eps = epsilon_for(sigma, delta, sample_rate, steps)

    def loss_fn(mod, batch):
        return F.cross_entropy(mod(batch["x"]), batch["labels"], reduction="none")

    cols = d + torch.arange(m)
    score = torch.zeros(m, dtype=torch.float64)
    for step in range(1, steps + 1):
        which = "both" if method == "dp-lora" else ("B" if step % 2 else "A")
        set_active_factors(model, which)
        if which in ("A", "both"):   # each canary's own descent direction in its A column
            A = model.lora_A.detach().clone().requires_grad_(True)
            logits = F.linear(xc, model.base.weight) + model.scaling * (xc @ A.t()) @ model.lora_B.detach().t()
            gA = torch.autograd.grad(F.cross_entropy(logits, yc, reduction="sum"), A)[0][:, cols]  # (r, m)
            direction = -(gA / gA.norm(dim=0, keepdim=True).clamp_min(1e-12)).double()
            before = model.lora_A.detach()[:, cols].clone().double()
        idx = poisson_sample(n, sample_rate, g)
        batch = {"x": x[idx], "labels": y[idx]}
        dp_gradient(model, loss_fn, batch, clip_norm=clip_norm, noise_multiplier=sigma,
                     expected_batch_size=sample_rate * n, generator=g)
        with torch.no_grad():
            for p in (model.lora_A, model.lora_B):
                if p.requires_grad:
                    p -= lr * p.grad
                    p.grad = None
        if which in ("A", "both"):
            delta_A = model.lora_A.detach()[:, cols].double() - before
            score += (delta_A * direction).sum(0)
    set_active_factors(model, "both")

    order = torch.argsort(score, descending=True)
    half = guesses // 2
    guessed_in, guessed_out = order[:half], order[len(order) - (guesses - half):]
    correct = int(member[guessed_in].sum()) + int((~member[guessed_out]).sum())
    lb = stats.one_run_epsilon_lb(m, guesses, correct, delta=delta, confidence=confidence)
    return OneRunResult(planted=planted, epsilon_target=epsilon, delta=delta, noise_multiplier=sigma,
                        accountant_epsilon=acc_eps, sample_rate=sample_rate, steps=steps, method=method,
                        canaries=m, included=int(member.sum()), guesses=guesses, correct=correct,
                        epsilon_lb=lb, seconds=time.perf_counter() - t0)

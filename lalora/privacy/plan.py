"""RunPlan: everything privacy needs to know about a federated run, before any model or data.

From a resolved run config and the clients' dataset sizes alone follow

- the client schedule (who trains in round t: uniform without replacement, M of N, from the seed
  only -- data-independent, so each client's number of DP steps is known up front);
- each client's planned DP steps (K × rounds it is sampled) and Poisson rate q_i = batch / |D_i|;
- the ONE σ with which every client meets the target ε (``accountant.calibrate_sigma``: the
  client with the most steps, or the largest q, binds), 0 for a non-private run;
- ε per client after all its planned steps;
- the derived seeds of every per-client stream (Poisson sampling, DP noise, LoRA dropout) and of
  torch's global RNG after the model build.

One value, computed in one place: the Simulator reads it, the Flower server sends its σ and a node
checks that σ by building the same plan (no model), the paper's σ table prints it.

    plan = RunPlan.for_config(cfg, client_sizes)     # cfg: a resolved lalora.config.RunConfig
    plan = RunPlan.create(seed=..., clients=..., ...) # the same from plain numbers (paper σ table)
    plan.schedule[t - 1] / plan.sampled_clients(t); plan.planned_steps[c]; plan.sample_rates[c]
    plan.noise_multiplier; plan.client_epsilon(c, steps=None); plan.planned_epsilons
    plan.sampling_seeds[c], plan.noise_seeds[c], plan.dropout_seeds[c], plan.torch_seed

The config is read by attribute (duck-typed): this module sits below ``lalora.config`` (which
imports privacy's accountant names), so it never imports it.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lalora.privacy.accountant import DEFAULT_ACCOUNTANT, cached_epsilon_for, calibrate_sigma
from lalora.results import config_hash

__all__ = ["RunPlan", "client_schedule", "derived_seed", "noise_stream_key"]

# Tags that keep the derived streams apart (changing one changes every committed number).
_TAG_SCHEDULE, _TAG_SAMPLING, _TAG_NOISE, _TAG_TORCH, _TAG_DROPOUT = 1, 2, 3, 4, 5


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integer parts (numpy SeedSequence): independent streams per purpose."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0]
               % (2 ** 63 - 1))


def client_schedule(num_clients: int, per_round: int, rounds: int, seed: int) -> list[list[int]]:
    """Sampled clients of each round (index t-1), uniform without replacement, from the seed only."""
    rng = np.random.default_rng(derived_seed(seed, _TAG_SCHEDULE))
    return [sorted(int(c) for c in rng.choice(num_clients, size=per_round, replace=False))
            for _ in range(rounds)]


def noise_stream_key(config_dict: dict[str, Any]) -> int:
    """The part of the noise seeds that depends on the whole resolved config: two runs that differ
    only in ε (or any setting) must not draw the same N(0, 1) vectors, or their releases subtract
    to the clipped sum. ``client_batching`` is left out: it changes how a run is computed, not what
    it releases (both modes release the same updates to float rounding, so they draw the same noise)."""
    noise_cfg = {k: v for k, v in config_dict.items() if k != "client_batching"}
    return int(config_hash(noise_cfg, "noise-stream", length=15), 16)


@dataclass(frozen=True)
class RunPlan:
    seed: int
    clients: int
    rounds: int
    local_steps: int
    batch_size: int
    client_sizes: tuple[int, ...]
    private: bool
    epsilon: float
    delta: float
    accountant: str
    schedule: list[list[int]]          # round t -> sorted client ids (index t-1)
    planned_steps: list[int]           # DP steps per client over the whole run
    sample_rates: list[float]          # Poisson rate q_i = min(1, batch / |D_i|)
    noise_multiplier: float            # the one σ (0 when not private)
    sampling_seeds: list[int]
    noise_seeds: list[int]
    dropout_seeds: list[int]
    torch_seed: int

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, *, seed: int, clients: int, clients_per_round: int, rounds: int, local_steps: int,
               batch_size: int, client_sizes: Sequence[int], epsilon: float, delta: float,
               accountant: str = DEFAULT_ACCOUNTANT, private: bool = True, noise_key: int = 0) -> "RunPlan":
        """The plan from plain numbers. ``private=False``: σ = 0 (no calibration);
        ``noise_key``: see :func:`noise_stream_key` (only the noise seeds depend on it)."""
        sizes = tuple(int(n) for n in client_sizes)
        if len(sizes) != clients:
            raise ValueError(f"client_sizes lists {len(sizes)} clients, clients={clients}")
        empty = [i for i, n in enumerate(sizes) if n < 1]
        if empty:
            raise ValueError(f"client_sizes: clients {empty} have no training examples; "
                             "change partition/beta/seed")
        schedule = client_schedule(clients, clients_per_round, rounds, seed)
        rounds_of = [sum(cid in s for s in schedule) for cid in range(clients)]
        planned_steps = [local_steps * n for n in rounds_of]
        sample_rates = [min(1.0, batch_size / n) for n in sizes]
        sigma = (calibrate_sigma(float(epsilon), float(delta), zip(sample_rates, planned_steps), accountant)
                 if private else 0.0)
        return cls(
            seed=int(seed), clients=int(clients), rounds=int(rounds), local_steps=int(local_steps),
            batch_size=int(batch_size), client_sizes=sizes, private=bool(private), epsilon=float(epsilon),
            delta=float(delta), accountant=accountant, schedule=schedule, planned_steps=planned_steps,
            sample_rates=sample_rates, noise_multiplier=sigma,
            sampling_seeds=[derived_seed(seed, _TAG_SAMPLING, c) for c in range(clients)],
            noise_seeds=[derived_seed(seed, _TAG_NOISE, noise_key, c) for c in range(clients)],
            dropout_seeds=[derived_seed(seed, _TAG_DROPOUT, c) for c in range(clients)],
            torch_seed=derived_seed(seed, _TAG_TORCH))

    @classmethod
    def for_config(cls, cfg, client_sizes: Sequence[int]) -> "RunPlan":
        """The plan of a resolved ``lalora.config.RunConfig`` whose clients hold ``client_sizes``
        examples. The as-released (non-DP) mode still picks σ as real DP at cfg.epsilon would."""
        if not getattr(cfg, "is_resolved", False):
            raise ValueError("cfg must be a resolved RunConfig (RunConfig.resolve(task.defaults))")
        return cls.create(seed=cfg.seed, clients=cfg.clients, clients_per_round=cfg.clients_per_round,
                          rounds=cfg.rounds, local_steps=cfg.local_steps, batch_size=cfg.batch_size,
                          client_sizes=client_sizes, epsilon=cfg.epsilon, delta=cfg.delta,
                          accountant=cfg.accountant, private=cfg.private,
                          noise_key=noise_stream_key(cfg.to_dict()))

    # ------------------------------------------------------------------ reading
    def sampled_clients(self, t: int) -> list[int]:
        if not 1 <= t <= self.rounds:
            raise ValueError(f"round t must be in 1..{self.rounds}, got {t}")
        return list(self.schedule[t - 1])

    def client_epsilon(self, cid: int, steps: int | None = None) -> float:
        """ε of client ``cid`` after ``steps`` DP steps (default: all its planned steps) with the
        plan's σ and its q: 0 before any step, inf for a non-private run."""
        steps = self.planned_steps[cid] if steps is None else int(steps)
        if not steps:
            return 0.0
        if not self.private:
            return math.inf
        return cached_epsilon_for(float(self.noise_multiplier), float(self.delta),
                                  float(self.sample_rates[cid]), int(steps), self.accountant)

    @functools.cached_property
    def planned_epsilons(self) -> list[float]:
        """ε per client at the end of the run (the binding client's is just under the target)."""
        return [self.client_epsilon(c) for c in range(self.clients)]

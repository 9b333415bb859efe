"""The one server aggregator: mean of the sampled clients' states, key by key.

Every method goes through :func:`aggregate`; a method only changes *which* keys the clients send
(``MethodSchedule.aggregated``). Keys no client sent keep their global value, so a frozen factor
(ffa-lora's A, rolora's idle factor) and fedsa-lora's local B and head are untouched on the server.

Default: unweighted mean over the sampled clients (as the released code; SPEC §2). With
``weighted=True`` client k gets weight n_k / Σ n (FedAvg's original weighting).
The mean is computed in float64 and cast back, so the result does not depend on client order
beyond float64 rounding.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ClientUpdate:
    """What one client returns after a round: only the keys the server aggregates."""
    state: dict[str, torch.Tensor]
    num_samples: int
    num_steps: int
    client_id: int = -1
    metrics: dict = field(default_factory=dict)


def aggregate(updates: list[ClientUpdate], global_state: dict[str, torch.Tensor], *,
              weighted: bool = False) -> dict[str, torch.Tensor]:
    """New global state: for every key any client sent, the (weighted) mean of the clients' values;
    every other key unchanged. Tensors are fresh (no aliasing with the inputs)."""
    if not updates:
        raise ValueError("updates must hold at least one ClientUpdate")
    keys = set(updates[0].state)
    for u in updates[1:]:
        if set(u.state) != keys:
            raise ValueError("updates must all carry the same keys; got "
                             f"{sorted(keys ^ set(u.state))} in some but not all")
    unknown = keys - set(global_state)
    if unknown:
        raise ValueError(f"updates carry keys not in the global state: {sorted(unknown)}")
    if weighted:
        total = float(sum(u.num_samples for u in updates))
        if total <= 0:
            raise ValueError("weighted aggregation needs num_samples > 0")
        weights = [u.num_samples / total for u in updates]
    else:
        weights = [1.0 / len(updates)] * len(updates)

    new_state = {k: v.detach().clone() for k, v in global_state.items()}
    for key in keys:
        acc = torch.zeros_like(global_state[key], dtype=torch.float64)
        for w, u in zip(weights, updates):
            acc += w * u.state[key].detach().to(torch.float64)
        new_state[key] = acc.to(global_state[key].dtype)
    return new_state

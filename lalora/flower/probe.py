"""The deployed node's own clipping-unit probe, run once per task build after the terms are accepted.

The kernels' probe (run when the Simulator is built) looks at the first two examples of the data;
a forward that sorts the batch by a feature passes it whenever those happen to be in order. The
node adds lalora.privacy.unit_probe.verify_batch_equivariance on up to ``PROBE_SIZE`` examples of
its own shard at random positions, with random permutations -- drawn from OS entropy, so neither
the server nor the model's author can pick them. Nothing computed here leaves the node.
"""
from __future__ import annotations

import secrets

import torch

__all__ = ["probe_node_model", "PROBE_SIZE"]

PROBE_SIZE = 8


def probe_node_model(sim, cid: int, *, generator: torch.Generator | None = None) -> None:
    """Raise ClippingUnitError if the model's per-sample gradients are not per sample on client
    ``cid``'s examples (every LoRA factor and the head trainable, as in Simulator.verify_clipping_unit)."""
    from lalora.privacy.dp_step import per_sample_gradients
    from lalora.privacy.unit_probe import verify_batch_equivariance
    from lalora.federated.client import to_device

    data = sim.client_data[cid]
    if len(data) < 3:
        return        # the kernels' probe (two samples) is all that fits
    generator = generator or torch.Generator().manual_seed(secrets.randbits(63))
    index = torch.randperm(len(data), generator=generator)[:PROBE_SIZE]
    batch = to_device(data.batch(index), sim.device)

    def loss_fn(model, b):
        return torch.nn.functional.cross_entropy(sim.task.forward(model, b), b["labels"], reduction="none")

    sim.groups.set_trainable(frozenset({"A", "B"}), head=sim.train_head)
    try:
        verify_batch_equivariance(sim.model, loss_fn, batch, per_sample_gradients, generator=generator)
    finally:
        sim.groups.set_trainable(frozenset(), head=False)

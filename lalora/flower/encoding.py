"""What travels in a Flower message, and how LoRA state is packed into it.

Why a module of its own: the payload is the point of the methods' communication claims (FFA-LoRA
and RoLoRA send half of what DP-LoRA sends), so which keys go up and down is decided here, from the
method's schedule (``MethodSchedule``), and nowhere else.

- Uplink (client -> server), round t: exactly ``Simulator.aggregated_groups(t)`` -- what the server
  averages (FFA-LoRA: B + head; RoLoRA: the factor trained that round + head; FedSA-LoRA: A).
- Downlink (server -> client): the groups the server can ever change,
  {A, B, head} minus the method's frozen and local-only groups (head only if it trains). The client
  fills the rest from the shared seeded initial state (FFA-LoRA's frozen A) or its own store
  (FedSA-LoRA's B and head).

Tensors go as float32 numpy arrays (``flwr.app.Array``), so a round trip is bit-exact.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["downlink_groups", "state_to_record", "record_to_state", "payload_bytes", "KEYS"]


class KEYS:
    """Names of the records in message contents and in a ClientApp's ``Context.state``."""
    ARRAYS = "lalora.arrays"        # ArrayRecord: LoRA/head tensors (message)
    CONFIG = "lalora.config"        # ConfigRecord: round index, setup (message)
    METRICS = "lalora.metrics"      # MetricRecord: train/eval diagnostics (reply)
    SETUP = "lalora.setup"          # ConfigRecord in Context.state: the run config of this node
    # (the node's ledger, streams and local tensors: lalora.flower.node.NodeStore)


def downlink_groups(method, train_head: bool) -> frozenset:
    """Parameter groups the server sends to a client (those it can change)."""
    groups = {"A", "B"} - set(method.frozen)
    if train_head:
        groups.add("head")
    return frozenset(groups - set(method.local_only))


def state_to_record(state: dict[str, torch.Tensor]):
    from flwr.app import Array, ArrayRecord

    record = ArrayRecord()
    for name, tensor in state.items():
        record[name] = Array(np.ascontiguousarray(tensor.detach().cpu().numpy()))
    return record


def record_to_state(record) -> dict[str, torch.Tensor]:
    # .copy(): np.load gives a read-only view on the message bytes; torch warns on those.
    return {name: torch.from_numpy(array.numpy().copy()) for name, array in record.items()}


def payload_bytes(state_or_record) -> int:
    """Raw tensor bytes (numel x itemsize) of a state dict or ArrayRecord, without headers."""
    total = 0
    for value in state_or_record.values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        else:   # flwr.app.Array
            total += int(np.prod(value.shape, dtype=np.int64)) * np.dtype(value.dtype).itemsize
    return total


"""Client-grouped execution: several clients' LoRA factors and heads through ONE frozen backbone.

A batch is the concatenation of M clients' samples, client j's `sizes[j]` samples contiguous and
clients in a fixed order. Each client's trainable tensors are stacked with a leading client
dimension (LoRA A: (M, r, n), B: (M, m, r), a head's weight (M, c, d) and bias (M, c)). While
`client_groups(...)` is active:

  * every LoRALinear applies, to each sample, its own client's factors (one matmul per client
    segment of rows; the frozen base runs once on the whole batch) -- the one LoRA layer in a mode,
    not a second layer class;
  * every nn.Linear named in `stacks` (the head) has its output replaced, by a forward hook that
    runs before the engine's, with the per-client linear map; the engine's closed forms for
    nn.Linear (G_W,i = g_i^T x_i) never read the weight, so they stay right;
  * LoRA dropout, when `dropout_generators` are given, draws client j's masks from client j's own
    generator, segment by segment, in layer order: the same draws, in the same order and shapes,
    as when client j runs alone (M = 1) with that generator. So a client's masks never depend on
    another client's batch, and grouped and one-client-at-a-time runs see identical masks.

The per-sample-gradient engine records the group with each LoRA call and computes G_A,i, G_B,i with
sample i's own client's factors (`lora_per_sample_grads` per segment: Triton on CUDA). Per-sample
gradients land in the usual (N, P) arena whose views have the *unstacked* parameter shapes (a
sample only has a gradient for its own client's copy); `slice_samples` cuts out one client's rows,
and dp.grouped_dp_gradient clips, sums and noises each client's rows exactly as dp_gradient does
for that client alone.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .lora import LoRALinear
from .per_sample import GhostLinear, PerSampleGrads

__all__ = ["ClientGroup", "client_groups", "segment_rows", "slice_samples"]


@dataclass
class ClientGroup:
    """What a LoRALinear needs in grouped mode. sizes None: one client holding the whole batch."""
    sizes: tuple[int, ...] | None
    A: torch.Tensor | None = None          # (M, r, n) stacked factors, None: the layer's own
    B: torch.Tensor | None = None          # (M, m, r)
    dropout_generators: Sequence[torch.Generator] | None = None
    client_index: torch.Tensor | None = None   # (N,) long: sample i's client (for the kernels)

    def split(self, t: torch.Tensor) -> list[torch.Tensor]:
        return segment_rows(t, self.sizes)

    def dropout(self, x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
        if not training or p == 0.0:
            return x
        if self.dropout_generators is None:
            return F.dropout(x, p, True)
        parts = [x] if self.sizes is None else self.split(x)
        if len(parts) != len(self.dropout_generators):
            raise ValueError(f"{len(self.dropout_generators)} dropout generators for {len(parts)} clients")
        out = []
        for xj, g in zip(parts, self.dropout_generators):
            if xj.shape[0] == 0:      # a client with an empty batch draws nothing (as when it runs alone)
                out.append(xj)
                continue
            # keep with probability 1 - p: one vectorised uniform draw (cheaper than bernoulli_ on CPU)
            keep = torch.rand(xj.shape, generator=g, device=xj.device, dtype=xj.dtype) >= p
            out.append(xj * keep * (1.0 / (1.0 - p)))
        return out[0] if len(out) == 1 else torch.cat(out)

    def lora(self, x_dropped: torch.Tensor, A: torch.Tensor, B: torch.Tensor):
        """(u, delta) with each client's factors: u = x A_j^T, delta = u B_j^T per segment."""
        if self.A is None:
            u = F.linear(x_dropped, A)
            return u, F.linear(u, B)
        us, ds = [], []
        for j, xj in enumerate(self.split(x_dropped)):
            u = F.linear(xj, self.A[j])
            us.append(u)
            ds.append(F.linear(u, self.B[j]))
        return torch.cat(us), torch.cat(ds)


def segment_rows(t: torch.Tensor, sizes: Sequence[int] | None) -> list[torch.Tensor]:
    """Split t's leading (row) dim into client segments. Rows are sample-major: R = N * k rows for N
    samples (k tokens or windows per sample), so client j gets sizes[j] * k rows."""
    if sizes is None:
        return [t]
    n = sum(sizes)
    if n == 0 or t.shape[0] % n:
        raise ValueError(f"a grouped layer input has {t.shape[0]} rows, not a multiple of the {n} "
                         "samples of the round's clients (rows must be sample-major)")
    k = t.shape[0] // n
    return list(t.split([s * k for s in sizes]))


def _stack_shape_error(name: str, stack: torch.Tensor, param: torch.Tensor, m: int) -> ValueError:
    return ValueError(f"client stack {name!r} has shape {tuple(stack.shape)}; expected (clients={m}, "
                      f"*{tuple(param.shape)}): every client of a batched round must have the same "
                      "model (architecture, rank and LoRA targets)")


@contextlib.contextmanager
def client_groups(model: nn.Module, sizes: Sequence[int] | None = None,
                  stacks: dict[str, torch.Tensor] | None = None,
                  dropout_generators: Sequence[torch.Generator] | None = None):
    """Run `model` client-grouped while active (see the module doc).

    sizes: samples per client in row order (None: one client, only dropout_generators matter);
    stacks: parameter name -> (M, *param.shape) tensor for every LoRA factor and every nn.Linear
    parameter to take per client (names as in model.named_parameters()); None: the model's own.
    """
    stacks = dict(stacks or {})
    m = len(sizes) if sizes is not None else 1
    if stacks and sizes is None:
        raise ValueError("stacked client parameters need sizes (samples per client)")
    if dropout_generators is not None and len(dropout_generators) != m:
        raise ValueError(f"dropout_generators has {len(dropout_generators)} entries for {m} clients")
    params = dict(model.named_parameters())
    unknown = sorted(set(stacks) - set(params))
    if unknown:
        raise ValueError(f"stacks name parameters the model does not have: {unknown[:5]} (clients of a "
                         "batched round must share the model's architecture and LoRA targets)")
    for k, s in stacks.items():
        if tuple(s.shape) != (m, *params[k].shape):
            raise _stack_shape_error(k, s, params[k], m)
    touched, handles = [], []
    used: set[str] = set()
    client_index = None
    if stacks:   # built once per forward, shared by every layer (one host-to-device copy on a GPU)
        dev = next(iter(stacks.values())).device
        client_index = torch.repeat_interleave(torch.arange(m, device=dev), torch.tensor(list(sizes), device=dev))
    try:
        for name, mod in model.named_modules():
            pre = f"{name}." if name else ""
            if isinstance(mod, LoRALinear):
                a, b = stacks.get(pre + "lora_A"), stacks.get(pre + "lora_B")
                if stacks and (a is None or b is None):
                    raise ValueError(f"LoRA layer {name!r} has no client stack for its factors; every LoRA "
                                     "layer must be stacked (clients' LoRA targets must match)")
                used |= {pre + "lora_A", pre + "lora_B"}
                mod._group = ClientGroup(tuple(sizes) if sizes is not None else None, a, b, dropout_generators,
                                         client_index)
                touched.append(mod)
            elif isinstance(mod, nn.Linear) and pre + "weight" in stacks:
                w, bias = stacks[pre + "weight"], stacks.get(pre + "bias")
                if (mod.bias is None) != (bias is None):
                    raise ValueError(f"head {name!r}: stack its weight and bias together")
                used |= {pre + "weight", pre + "bias"}
                handles.append(mod.register_forward_hook(_grouped_linear_hook(tuple(sizes), w, bias),
                                                         prepend=True))
        left = sorted(set(stacks) - used)
        if left:
            raise ValueError(f"client stacks {left[:5]} belong to no LoRALinear or nn.Linear")
        yield
    finally:
        for mod in touched:
            mod._group = None
        for h in handles:
            h.remove()


def _grouped_linear_hook(sizes, weight, bias):
    def hook(module, inputs, output):
        parts = segment_rows(inputs[0], sizes)
        return torch.cat([F.linear(xj, weight[j], None if bias is None else bias[j])
                          for j, xj in enumerate(parts)])
    return hook


def slice_samples(psg: PerSampleGrads, start: int, stop: int) -> PerSampleGrads:
    """The PerSampleGrads of samples start..stop-1 (views, no copy): one client's rows."""
    ghost = [GhostLinear(gl.names, gl.x[start:stop], gl.g[start:stop], tuple(s[start:stop] for s in gl.sqnorms))
             for gl in psg.ghost]
    return PerSampleGrads({k: v[start:stop] for k, v in psg.grads.items()}, list(psg.unit_names), stop - start,
                          None if psg.arena is None else psg.arena[start:stop], ghost)

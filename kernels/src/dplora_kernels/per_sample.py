"""What the per-sample-gradient engine returns: PerSampleGrads (one (N, P) arena and its views) and
GhostLinear (a one-row-per-sample nn.Linear left unmaterialised).

A module of its own so the engine (which builds these) and the client-grouped path (which slices
them per client, grouped.slice_samples) both import it and neither imports the other.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from . import reference as ref

__all__ = ["GhostLinear", "PerSampleGrads"]


@dataclass
class GhostLinear:
    """An nn.Linear with one row per sample whose per-sample gradients are never materialised:
    G_W,i = g_i^T x_i, G_b,i = g_i. `sqnorms` are the per-parameter squared norms (N,)."""
    names: tuple[str, ...]     # (weight,) or (weight, bias)
    x: torch.Tensor            # (N, n), accumulation dtype
    g: torch.Tensor            # (N, m)
    sqnorms: tuple[torch.Tensor, ...]

    def clipped_sums(self, factors: torch.Tensor) -> list[torch.Tensor]:
        """sum_i c_i G_i for weight (and bias): (c ⊙ g)^T x and c^T g."""
        cg = self.g * factors.to(self.g.dtype).unsqueeze(1)
        out = [cg.T @ self.x]
        if len(self.names) == 2:
            out.append(cg.sum(0))
        return out


@dataclass
class PerSampleGrads:
    """Per-sample gradients by parameter name, all views of one (N, P) arena.

    grads: name -> (N, *param.shape); unit_names: the clipping units (a LoRA factor, a Linear's
    weight+bias, ...) in the order they were computed; ghost: layers left unmaterialised (only with
    ghost=True). Norms are taken from the arena when asked for (total_sqnorm, units, sqnorms), so a
    parameter written by several calls always gets the norm of its summed gradient.
    """
    grads: dict[str, torch.Tensor]
    unit_names: list[tuple[str, ...]]
    num_samples: int
    arena: torch.Tensor | None = None
    ghost: list[GhostLinear] = field(default_factory=list)

    def total_sqnorm(self) -> torch.Tensor:
        """Flat squared norm over all parameters jointly, (N,) (ghost layers included): ONE
        reduction over the arena's rows, whatever the number of parameters (computed once)."""
        return self._total_sqnorm

    @functools.cached_property
    def _total_sqnorm(self) -> torch.Tensor:
        n = self.num_samples
        total = None
        if self.arena is not None and self.arena.shape[1]:
            total = torch.linalg.vecdot(self.arena, self.arena)
        elif self.arena is None:
            for g in self.grads.values():
                sq = ref.sqnorm(g, n, g.device, ref.acc_dtype(g.dtype))
                total = sq if total is None else total + sq
        for gl in self.ghost:
            for sq in gl.sqnorms:
                total = sq if total is None else total + sq
        if total is None:
            device = self.arena.device if self.arena is not None else None
            return torch.zeros(n, dtype=torch.float32, device=device)
        return total

    @functools.cached_property
    def units(self) -> list[tuple[tuple[str, ...], torch.Tensor]]:
        """(names, (N,) squared norm of those parameters jointly) per clipping unit, ghosts excluded."""
        sq = self.sqnorms
        out = []
        for names in self.unit_names:
            total = sq[names[0]]
            for k in names[1:]:
                total = total + sq[k]
            out.append((names, total))
        return out

    @functools.cached_property
    def sqnorms(self) -> dict[str, torch.Tensor]:
        """Per-parameter squared norms (N,) (ghost layers included): one pass per parameter, needed
        only by per-layer clipping."""
        n = self.num_samples
        out = {k: ref.sqnorm(g, n, g.device, ref.acc_dtype(g.dtype)) for k, g in self.grads.items()}
        for gl in self.ghost:
            out.update(zip(gl.names, gl.sqnorms))
        return out

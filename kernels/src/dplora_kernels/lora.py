"""The one LoRA layer: a frozen nn.Linear plus a trainable low-rank update (LoRA, Hu et al. 2021).

    h = W0 x + s * B A dropout(x),  s = alpha / r,  A (r, in) Kaiming-uniform(a=sqrt 5),  B (out, r) = 0

so a wrapped model starts equal to its base. Why our own layer rather than a plain nn.Linear pair: the
per-sample-gradient engine (dplora_kernels.engine) needs the LoRA input *after dropout* and
u = x A^T from the forward, and `LoRALinear.forward` hands exactly those to a capture callback, so
per-sample gradients use this forward's dropout mask and reuse u instead of recomputing it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LoRALinear", "check_rank"]


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: base(x) + scaling * (dropout(x) A^T) B^T.

    `_capture`, when set by the DP engine, is called as `_capture(self, x_dropped, u, output)` on
    every forward, so per-sample gradients use exactly the activations of this forward (dropout mask
    included).
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.05, *,
                 generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear; got {type(base).__name__}")
        check_rank(r, base.in_features, base.out_features)
        if not (0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1); got {dropout!r}")
        if not (alpha > 0 and math.isfinite(alpha)):
            raise ValueError(f"alpha must be a finite number > 0; got {alpha!r}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha = int(r), float(alpha)
        self.scaling = self.alpha / self.r
        self.dropout = nn.Dropout(dropout)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=w.device, dtype=w.dtype))
        self.reset_lora_parameters(generator)
        self._capture = None
        self._group = None   # a grouped.ClientGroup while client_groups(...) is active

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """A ~ Kaiming-uniform(a=sqrt 5) (bound 1/sqrt(in)), B = 0; `generator` makes A reproducible
        (all clients of a federation share A's init, which FFA-LoRA relies on)."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
            self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = getattr(self, "_group", None)
        if group is None:
            x_dropped = self.dropout(x)
            u = F.linear(x_dropped, self.lora_A)                  # (..., r)
            delta = F.linear(u, self.lora_B)
        else:   # client-grouped mode (grouped.client_groups): each sample's own client's factors
            x_dropped = group.dropout(x, self.dropout.p, self.training)
            u, delta = group.lora(x_dropped, self.lora_A, self.lora_B)
        out = self.base(x) + self.scaling * delta
        if self._capture is not None:
            self._capture(self, x_dropped, u, out)
        return out

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, "
                f"dropout={self.dropout.p}")


def check_rank(r, in_features: int, out_features: int) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r < 1 or r > min(in_features, out_features):
        raise ValueError(f"r must be an int in [1, min(in_features, out_features)] = "
                         f"[1, {min(in_features, out_features)}]; got r={r!r}")



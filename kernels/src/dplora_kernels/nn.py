"""Drop-in modules and a DP step helper for someone else's LoRA training loop.

* `DPLoRALinear` wraps a frozen nn.Linear with LoRA factors (forward = base(x) + s·(dropout(x) Aᵀ) Bᵀ).
  Attached to a `DPStep`, its backward computes the input gradient and the per-sample LoRA gradients
  (fused kernel on CUDA) straight into the step's per-sample-gradient arena, and returns no summed
  dA/dB — autograd's ordinary LoRA gradient would be thrown away by DP anyway. Not attached, it is an
  ordinary LoRA layer with ordinary gradients.
* `DPLinear` does the same for a fully trainable linear layer (e.g. a classifier head).
* `DPStep` owns the arena, checks that no other trainable parameter escapes clipping, and after
  backward does the flat (all-layer) clip + sum + Gaussian noise in one grouped launch, writing
  p.grad = (sum_i c_i g_i + N(0, (sigma C)^2)) / expected_batch_size.

The loss must be a SUM of per-sample losses (reduction="sum"): per-sample gradients are gradients of
each sample's own loss. Rows are sample-major; for inputs whose leading dim is not the sample count
(Swin windows: (N * windows, 49, C)) call `dp.set_num_samples(N)` before backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from . import api
from . import reference as ref
from ._backend import resolve_backend


# Tests set this to True: the per-sample-gradient arena is then allocated full of NaN, so a slot the
# backward forgets to write surfaces as a FloatingPointError instead of stale memory.
POISON_ARENA = False


def _rows_view(t: torch.Tensor) -> torch.Tensor:
    """(R, ..., c) -> (R, T, c) with T the product of the middle dims; (R, c) stays 2-D."""
    return t if t.dim() == 2 else t.reshape(t.shape[0], -1, t.shape[-1])


class _LoRAFunction(torch.autograd.Function):
    """y = x W0ᵀ + b0 + s (xd Aᵀ) Bᵀ, where xd = dropout(x) is a separate input so that dropout's own
    backward still runs. The backward hands per-sample LoRA grads to the module's DPStep."""

    @staticmethod
    def forward(ctx, x, xd, weight, bias, A, B, scale, module):
        u = xd @ A.T
        y = nn.functional.linear(x, weight, bias) + scale * (u @ B.T)
        ctx.save_for_backward(xd, u, weight, A, B)
        ctx.scale, ctx.module = scale, module
        return y

    @staticmethod
    def backward(ctx, g):
        xd, u, weight, A, B = ctx.saved_tensors
        s, module = ctx.scale, ctx.module
        # under autocast the saved activations and g may be bf16/fp16 while the parameters are fp32:
        # compute in g's dtype (autograd casts each returned grad back to its input's dtype)
        dt = g.dtype
        xd, u, weight, A, B = (t.to(dt) for t in (xd, u, weight, A, B))
        gB = g @ B                                    # (.., r): needed for both dxd and G_A
        dx = g @ weight if ctx.needs_input_grad[0] else None
        dxd = (s * gB) @ A if ctx.needs_input_grad[1] else None
        need_A, need_B = ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        step = module._dp_step
        if step is None:                              # plain LoRA layer: ordinary summed gradients
            gA_sum = (s * gB).reshape(-1, gB.shape[-1]).T @ xd.reshape(-1, xd.shape[-1]) if need_A else None
            gB_sum = s * g.reshape(-1, g.shape[-1]).T @ u.reshape(-1, u.shape[-1]) if need_B else None
            return dx, dxd, None, None, gA_sum, gB_sum, None, None
        which = "both" if need_A and need_B else ("A" if need_A else ("B" if need_B else None))
        if which is not None:
            step._record_lora(module, _rows_view(xd), _rows_view(g), A, B, s, _rows_view(u),
                              _rows_view(gB), which)
        return dx, dxd, None, None, None, None, None, None   # no summed dA/dB: DPStep writes p.grad


class _LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, module):
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.module = bias is not None, module
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        module = ctx.module
        x, weight = x.to(g.dtype), weight.to(g.dtype)
        dx = g @ weight if ctx.needs_input_grad[0] else None
        step = module._dp_step
        if step is None:
            gw = g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
            gb = g.reshape(-1, g.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
            return dx, gw, gb, None
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            step._record_linear(module, _rows_view(x), _rows_view(g))
        return dx, None, None, None


class DPLoRALinear(nn.Module):
    """Frozen base nn.Linear + LoRA: y = base(x) + (alpha / r) * (dropout(x) Aᵀ) Bᵀ.

    lora_A (r, in) is Kaiming-uniform initialised, lora_B (out, r) zeros (PEFT's convention), so the
    wrapped model starts equal to the base model."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"base must be an nn.Linear; got {type(base).__name__}")
        if not (1 <= r <= min(base.in_features, base.out_features)):
            raise ValueError(f"r must be in [1, min(in, out)={min(base.in_features, base.out_features)}]; got {r}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha = r, float(alpha)
        self.scaling = self.alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self._dp_step: DPStep | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dp_step is not None:
            self._dp_step._check_forward(self)
        return _LoRAFunction.apply(x, self.dropout(x), self.base.weight, self.base.bias,
                                   self.lora_A, self.lora_B, self.scaling, self)

    def dp_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [("lora_A", self.lora_A), ("lora_B", self.lora_B)]


class DPLinear(nn.Linear):
    """A trainable nn.Linear (e.g. a classifier head) whose per-sample gradients go to a DPStep."""

    _dp_step = None

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "DPLinear":
        new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None,
                  device=lin.weight.device, dtype=lin.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(lin.weight)
            if lin.bias is not None:
                new.bias.copy_(lin.bias)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dp_step is not None:
            self._dp_step._check_forward(self)
        return _LinearFunction.apply(x, self.weight, self.bias, self)

    def dp_parameters(self) -> list[tuple[str, nn.Parameter]]:
        out = [("weight", self.weight)]
        return out + ([("bias", self.bias)] if self.bias is not None else [])


def add_dp_lora(model: nn.Module, targets: Iterable[str], r: int, alpha: float,
                dropout: float = 0.0) -> list[str]:
    """Replace every nn.Linear whose qualified name ends with one of `targets` by a DPLoRALinear.
    Returns the replaced names; ValueError naming `targets` if nothing matched."""
    targets = tuple(targets)
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and not isinstance(m, DPLinear)
             and any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        raise ValueError(f"targets {targets!r} matched no nn.Linear in the model")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, DPLoRALinear(getattr(parent, child), r, alpha, dropout))
    return names


@dataclass
class DPStepResult:
    per_sample_norms: torch.Tensor   # (N,) total (all-layer) gradient norm of each sample, before clipping
    clip_factors: torch.Tensor       # (N,)
    batch_size: int                  # N


class DPStep:
    """Flat-clipped, noised gradients for every DPLoRALinear / DPLinear in `model`.

    Usage per step: forward; loss (sum over samples).backward(); dp.clip_and_noise(); optimizer.step().
    noise std = noise_multiplier * clip_norm; p.grad = (clipped sum + noise) / expected_batch_size.
    Every other parameter with requires_grad=True is refused (ValueError listing names): it would be
    updated without clipping.
    """

    def __init__(self, model: nn.Module, clip_norm: float, noise_multiplier: float,
                 expected_batch_size: int, generator: torch.Generator | None = None, backend: str = "auto"):
        if not (float(clip_norm) > 0):
            raise ValueError(f"clip_norm must be > 0; got {clip_norm!r}")
        if not (float(noise_multiplier) >= 0 and math.isfinite(float(noise_multiplier))):
            raise ValueError(f"noise_multiplier must be finite and >= 0; got {noise_multiplier!r}")
        if not (isinstance(expected_batch_size, int) and expected_batch_size > 0):
            raise ValueError(f"expected_batch_size must be a positive int; got {expected_batch_size!r}")
        if math.isinf(float(clip_norm)) and float(noise_multiplier) > 0:
            raise ValueError("clip_norm=inf (no clipping) cannot be combined with noise_multiplier > 0")
        resolve_backend(backend)   # validates the name
        self.model, self.clip_norm, self.noise_multiplier = model, float(clip_norm), float(noise_multiplier)
        self.expected_batch_size, self.generator, self.backend = expected_batch_size, generator, backend
        self.modules = [m for m in model.modules() if isinstance(m, (DPLoRALinear, DPLinear))]
        if not self.modules:
            raise ValueError("model contains no DPLoRALinear / DPLinear module")
        for m in self.modules:
            m._dp_step = self
        self._check_no_unclipped_params()
        self.num_samples: int | None = None
        self._reset()

    # -- bookkeeping -------------------------------------------------------------------------------
    def _dp_param_ids(self) -> set[int]:
        return {id(p) for m in self.modules for _, p in m.dp_parameters()}

    def _check_no_unclipped_params(self) -> None:
        ours = self._dp_param_ids()
        bad = [n for n, p in self.model.named_parameters() if p.requires_grad and id(p) not in ours]
        if bad:
            raise ValueError(f"trainable parameters outside DP modules would escape clipping: {bad}")

    def _reset(self) -> None:
        self._arena = None            # (N, P) fp32, allocated at the first backward record of a step
        self._slots: dict[int, tuple[int, int]] = {}   # id(param) -> (offset, numel)
        self._written: dict[int, int] = {}             # id(param) -> times written this step
        self._sq: dict[int, torch.Tensor] = {}         # id(module) -> (N,) squared norm
        self._N: int | None = None

    def _check_forward(self, module) -> None:
        """A forward after this module's backward, before clip_and_noise, would be a second batch whose
        samples the arena would add onto the first batch's samples (a wrong clipping unit): refuse.
        (Weight sharing — two forwards, then one backward — is fine and handled in _store.)"""
        if torch.is_grad_enabled() and any(self._written.get(id(p), 0) for _, p in module.dp_parameters()):
            raise RuntimeError("forward of a DP module after its backward and before clip_and_noise(): "
                               "call dp.clip_and_noise() once per batch (gradient accumulation across "
                               "batches is not supported)")

    def set_num_samples(self, n: int | None) -> None:
        """Number of samples in the coming backward (the clipping unit). None: each layer's leading
        dim. Needed when rows != samples, e.g. Swin windows (N * windows rows)."""
        self.num_samples = n

    def detach(self) -> None:
        """Turn the modules back into ordinary layers (ordinary summed gradients)."""
        for m in self.modules:
            m._dp_step = None

    def _active_params(self) -> list[nn.Parameter]:
        return [p for m in self.modules for _, p in m.dp_parameters() if p.requires_grad]

    def _views(self, rows: int, params: list[nn.Parameter], device) -> list[torch.Tensor]:
        n = self.num_samples if self.num_samples is not None else rows
        if n == 0 and rows != 0 or n and rows % n:
            raise ValueError(f"num_samples={n} does not divide the {rows} rows of a layer input; "
                             "call set_num_samples(N) with the batch's sample count")
        if self._arena is None:
            active = self._active_params()
            off = 0
            for p in active:
                self._slots[id(p)] = (off, p.numel())
                off += p.numel()
            self._N = n
            alloc = torch.full if POISON_ARENA else (lambda shape, _v, **kw: torch.empty(shape, **kw))
            self._arena = alloc((n, off), float("nan"), device=device, dtype=torch.float32)
        elif n != self._N:
            raise ValueError(f"layers disagree on num_samples ({self._N} vs {n}); call set_num_samples(N)")
        out = []
        for p in params:
            o, k = self._slots[id(p)]
            out.append(self._arena[:, o:o + k].view(n, *p.shape))
        return out

    def _store(self, module, params, grads, sq) -> None:
        """Write per-sample grads into the arena (adding if the module ran twice this step)."""
        views = self._views(self._rows, params, grads[0].device)
        again = any(self._written.get(id(p), 0) for p in params)
        for p, v, g in zip(params, views, grads):
            if again and self._written.get(id(p), 0):
                v.add_(g)
            elif v.data_ptr() != g.data_ptr():
                v.copy_(g)
            self._written[id(p)] = self._written.get(id(p), 0) + 1
        if again:   # norm of the summed gradient, not the sum of norms
            self._sq[id(module)] = sum(ref.sqnorm(v, v.shape[0], v.device) for v in views)
        else:
            self._sq[id(module)] = sq

    def _record_lora(self, module, xd, g, A, B, scale, u, gB, which) -> None:
        self._rows = xd.shape[0]
        params = [p for name, p in module.dp_parameters() if (name == "lora_A" and which in ("both", "A"))
                  or (name == "lora_B" and which in ("both", "B"))]
        views = self._views(self._rows, params, xd.device)
        fresh = not any(self._written.get(id(p), 0) for p in params)
        N = self._N
        be = resolve_backend(self.backend, xd.device)
        if be == "triton" and fresh and xd.dtype != torch.float64:
            from . import triton_kernels as tk
            vA = views[0] if which in ("both", "A") else None
            vB = views[-1] if which in ("both", "B") else None
            gA, gBp, sqA, sqB = tk.lora_per_sample_grads(xd, g, A, B, scale, N, u, which,
                                                         out_A=vA, out_B=vB, gB_prod=gB)
        else:
            gA, gBp, sqA, sqB = api.lora_per_sample_grads(xd, g, A, B, scale, N, u=u, backend="torch",
                                                          which=which)
        grads = [t for t in (gA, gBp) if t is not None]
        self._store(module, params, grads, sqA + sqB)

    def _record_linear(self, module, x, g) -> None:
        self._rows = x.shape[0]
        params = [p for _, p in module.dp_parameters() if p.requires_grad]
        views = self._views(self._rows, params, x.device)
        be = resolve_backend(self.backend, x.device)
        res = api.linear_per_sample_grads(x, g, self._N, bias=module.bias is not None,
                                          backend=be if x.dtype != torch.float64 else "torch")
        grads = [res.grad_weight] + ([res.grad_bias] if module.bias is not None else [])
        names = [n for n, _ in module.dp_parameters()]
        grads = [gr for n, gr in zip(names, grads) if getattr(module, n).requires_grad]
        sq = sum(ref.sqnorm(gr, gr.shape[0], gr.device) for gr in grads)
        self._store(module, params, grads, sq)

    # -- the DP step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def clip_and_noise(self) -> DPStepResult:
        """Clip each sample's all-layer gradient to clip_norm, sum, add N(0, (sigma C)^2), divide by
        expected_batch_size and write p.grad for every active DP parameter. NaN/Inf -> FloatingPointError
        with p.grad untouched. A step with no backward (empty batch) writes noise only."""
        self._check_no_unclipped_params()
        active = self._active_params()
        if not active:
            raise ValueError("no DP parameter has requires_grad=True")
        if self._arena is None:   # empty batch (or no backward): N = 0, noise only
            dev = active[0].device
            self._N = 0
            self._arena = torch.empty((0, sum(p.numel() for p in active)), device=dev)
            off = 0
            for p in active:
                self._slots[id(p)] = (off, p.numel())
                off += p.numel()
        if [id(p) for p in active] != list(self._slots):
            self._reset()
            raise ValueError("the set of trainable DP parameters changed between backward and clip_and_noise")
        N = self._N
        views = []
        for p in active:
            o, k = self._slots[id(p)]
            v = self._arena[:, o:o + k].view(N, *p.shape)
            if not self._written.get(id(p), 0):
                v.zero_()             # a layer not used in this forward contributes a zero gradient
            views.append(v)
        sq_total = torch.zeros(N, device=self._arena.device, dtype=torch.float32)
        for m in self.modules:        # fixed module order -> deterministic
            if id(m) in self._sq:
                sq_total = sq_total + self._sq[id(m)].to(sq_total.device, torch.float32)
        if not bool(torch.isfinite(sq_total).all()):
            self._reset()
            raise FloatingPointError("non-finite per-sample gradient; p.grad left untouched")
        noise_std = self.noise_multiplier * self.clip_norm if self.noise_multiplier > 0 else 0.0
        sums, factors = api.clip_and_noise(views, sq_total, self.clip_norm, noise_std, self.generator,
                                           backend=self.backend)
        for p, s in zip(active, sums):
            p.grad = (s / self.expected_batch_size).to(p.dtype)
        self._reset()
        return DPStepResult(sq_total.sqrt(), factors, N)

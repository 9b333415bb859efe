"""Per-sample gradients of every trainable parameter in ONE backward pass (no per-sample loop).

How: while the engine is active, forward hooks record, for each call of a module that owns a
trainable parameter, its input activation and its output. `backward(loss, num_samples)` then runs a
single `torch.autograd.grad(loss, outputs)`: that gives dL/d(output) for every recorded call and
skips the summed parameter gradients autograd would otherwise compute (and DP would discard).
Per-sample gradients follow in closed form from (activation, grad_out) pairs:

  LoRALinear   G_A,i = s B^T g_i^T x_i, G_B,i = s g_i^T u_i  (x after dropout, u = x A^T)
               -> dplora_kernels.lora_per_sample_grads (Triton on CUDA)
  nn.Linear    G_W,i = g_i^T x_i, G_b,i = sum g_i  (head, PEFT lora_A/lora_B, anything else;
               PEFT's scaling multiplies lora_B's output, so its grad_out already carries s)
               -> dplora_kernels.linear_per_sample_grads
  nn.LayerNorm G_w,i = sum g_i * xhat_i, G_b,i = sum g_i
  nn.Embedding G_i = scatter of g_i into the rows of sample i's token ids  (N x V x d: small vocabularies)

Any other trainable parameter -> ValueError listing its name (silently missing a parameter from the
clipping norm would break the privacy guarantee). So does a trainable parameter of a supported layer
that the loss reaches without the layer being called (functional use, e.g. nn.MultiheadAttention's
out_proj), and a layer re-run inside the backward (activation checkpointing). Not detectable: a
parameter used both by its module and functionally elsewhere (e.g. a tied LM head via F.linear).

The clipping unit: an activation whose leading dimension is R is viewed as (N, R // N, ...), N = the
number of samples. Rows must be sample-major (batch-first): one sequence is one unit with T tokens,
and under timm Swin's windowed attention (B*nW, 49, C) one *image* is one unit, because timm stores
windows image-major (tests/test_per_sample_grads.py checks this, shifted windows included).
R % N != 0 raises (so does an input broadcast over the batch, leading dim 1), and so does a
BatchNorm in training mode (its batch statistics mix samples). A sequence-first layout whose T
happens to be a multiple of N cannot be told apart: models must be batch-first. A module called
several times (or a parameter shared by modules) gets the sum of its per-call per-sample gradients. In-place modification of a recorded activation or output after
the forward is detected (tensor version counter) and raises instead of giving wrong gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dplora_kernels import linear_per_sample_grads, lora_per_sample_grads

from ..lora import LoRALinear

__all__ = ["PerSampleGradEngine", "PerSampleGrads", "SUPPORTED_MODULES"]

SUPPORTED_MODULES = (LoRALinear, nn.Linear, nn.LayerNorm, nn.Embedding)


@dataclass
class _Call:
    module: nn.Module
    x: torch.Tensor            # layer input (after dropout for LoRALinear; token ids for Embedding)
    out: torch.Tensor          # layer output, whose gradient the backward provides
    u: torch.Tensor | None = None
    versions: tuple = ()


@dataclass
class PerSampleGrads:
    """Per-sample gradients (N, *param.shape) and squared norms (N,) by parameter name."""
    grads: dict[str, torch.Tensor]
    sqnorms: dict[str, torch.Tensor]
    num_samples: int

    def total_sqnorm(self) -> torch.Tensor:
        """Flat squared norm over all parameters jointly, (N,)."""
        if not self.sqnorms:
            return torch.zeros(self.num_samples, dtype=torch.float64)
        return torch.stack(list(self.sqnorms.values())).sum(0)


@dataclass
class PerSampleGradEngine:
    """Context manager: hooks the model's trainable modules while active.

        with PerSampleGradEngine(model) as eng:
            losses = loss_fn(model, batch)                   # (N,) per-sample losses
            psg = eng.backward(losses.sum(), num_samples=N)  # PerSampleGrads

    The set of trainable parameters is read on entry (requires_grad at that moment).
    """
    model: nn.Module
    num_samples_hint: int | None = None
    backend: str = "auto"
    _calls: list = field(default_factory=list, init=False, repr=False)
    _handles: list = field(default_factory=list, init=False, repr=False)

    # ---- setup ---------------------------------------------------------------------------------
    def __enter__(self) -> "PerSampleGradEngine":
        batchnorms = [n for n, m in self.model.named_modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        if batchnorms:   # batch statistics mix samples: no per-sample gradient (nor DP) exists
            raise ValueError(f"BatchNorm layers {batchnorms} are in training mode: batch statistics mix "
                             "samples, so per-sample gradients are undefined; put them in eval mode "
                             "or use GroupNorm/LayerNorm")
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        covered: set[int] = set()
        for name, m in self.model.named_modules():
            own = [p for p in m.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if isinstance(m, LoRALinear):
                covered |= {id(m.lora_A), id(m.lora_B)}   # the base is a child nn.Linear, hooked on its own
                m._capture = self._capture_lora
                self._handles.append(_Restore(m))
            elif isinstance(m, (nn.Linear, nn.LayerNorm, nn.Embedding)):
                if isinstance(m, nn.LayerNorm) and not m.elementwise_affine:
                    continue
                if isinstance(m, nn.Embedding) and (m.max_norm is not None or m.scale_grad_by_freq
                                                    or m.sparse):
                    continue
                covered |= {id(p) for p in own}
                self._handles.append(m.register_forward_hook(self._capture_module))
        missing = [n for n, p in self.params.items() if id(p) not in covered]
        if missing:
            self.close()
            raise ValueError(
                "PerSampleGradEngine cannot compute per-sample gradients for trainable parameters "
                f"{missing}: supported owners are LoRALinear, nn.Linear, nn.LayerNorm (affine) and "
                "nn.Embedding (no max_norm/scale_grad_by_freq/sparse); freeze them or use a supported layer")
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._calls.clear()

    # ---- forward capture -----------------------------------------------------------------------
    def _record(self, call: _Call) -> None:
        if not call.out.requires_grad:   # e.g. nothing upstream trainable and this layer frozen
            return
        call.versions = tuple(t._version for t in (call.x, call.out, call.u) if t is not None)
        self._calls.append(call)

    def _capture_lora(self, module: LoRALinear, x_dropped, u, out) -> None:
        if module.lora_A.requires_grad or module.lora_B.requires_grad:
            self._record(_Call(module, x_dropped.detach(), out, u.detach()))

    def _capture_module(self, module: nn.Module, inputs, output) -> None:
        if not isinstance(output, torch.Tensor):
            raise ValueError(f"{type(module).__name__} returned {type(output).__name__}; expected a tensor")
        self._record(_Call(module, inputs[0].detach(), output))

    # ---- backward ------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, num_samples: int | None = None, *,
                 retain_graph: bool = False) -> PerSampleGrads:
        """One backward pass of the (summed) loss; returns per-sample gradients of every trainable
        parameter (zeros for those the loss does not reach). Clears the recorded calls."""
        n = self.num_samples_hint if num_samples is None else num_samples
        if n is None or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_samples must be a positive int; got {n!r}")
        if loss.dim() != 0:
            raise ValueError(f"loss must be a scalar (the sum of per-sample losses); got shape {tuple(loss.shape)}")
        calls, self._calls = self._calls, []
        for c in calls:
            now = tuple(t._version for t in (c.x, c.out, c.u) if t is not None)
            if now != c.versions:
                raise RuntimeError(f"an activation or output of {type(c.module).__name__} was modified in "
                                   "place after the forward; per-sample gradients would be wrong "
                                   "(disable inplace=True in the layers after it)")
            if c.x.shape[0] % n:
                raise ValueError(f"num_samples={n} does not divide the leading dimension {c.x.shape[0]} of "
                                 f"a {type(c.module).__name__} input {tuple(c.x.shape)}: rows must be "
                                 "sample-major (batch-first), R = N * k. An input broadcast over the batch "
                                 "(leading dim 1, e.g. BERT's default position_ids) mixes samples: freeze "
                                 "that layer or pass per-sample inputs")
        grads: dict[int, torch.Tensor] = {}
        if loss.requires_grad:
            outs = [c.out for c in calls]
            # Trainable parameters whose module never ran may still be used functionally (e.g.
            # nn.MultiheadAttention reads out_proj.weight without calling out_proj): ask autograd for
            # their gradient in the same pass and refuse if the loss depends on them.
            called = {id(p) for c in calls for p in c.module.parameters(recurse=False)}
            uncalled = [(n, p) for n, p in self.params.items() if id(p) not in called]
            res = torch.autograd.grad(loss, outs + [p for _, p in uncalled], allow_unused=True,
                                      retain_graph=retain_graph)
            grad_outs = list(res[:len(outs)])
            used = [n for (n, _), g in zip(uncalled, res[len(outs):]) if g is not None]
            del res, outs
            if used:
                raise ValueError(f"trainable parameters {used} are used outside their module's forward "
                                 "(functional use), so hooks cannot see them; freeze them or call the module")
            if self._calls:   # forwards re-run inside backward: activation checkpointing
                self._calls.clear()
                raise RuntimeError("a hooked layer ran during the backward pass (activation checkpointing?): "
                                   "its per-sample gradients would be lost; disable gradient checkpointing")
            for i, c in enumerate(calls):
                g, grad_outs[i], calls[i] = grad_outs[i], None, None   # free each pair once used
                if g is None:
                    continue
                for p, gs in self._per_sample(c, g, n):
                    if p.requires_grad:
                        grads[id(p)] = grads[id(p)] + gs if id(p) in grads else gs
        out_g, out_sq = {}, {}
        for name, p in self.params.items():
            g = grads.get(id(p))
            if g is None:
                g = torch.zeros((n, *p.shape), dtype=_acc(p.dtype), device=p.device)
            out_g[name] = g
            out_sq[name] = g.reshape(n, -1).pow(2).sum(1)
        return PerSampleGrads(out_g, out_sq, n)

    def _per_sample(self, c: _Call, g: torch.Tensor, n: int):
        """Yield (parameter, per-sample gradient (N, *shape)) for one recorded call."""
        m = c.module
        if isinstance(m, LoRALinear):
            a_on, b_on = m.lora_A.requires_grad, m.lora_B.requires_grad
            which = "both" if (a_on and b_on) else ("A" if a_on else "B")
            r = lora_per_sample_grads(_rows(c.x), _rows(g), m.lora_A.detach(), m.lora_B.detach(),
                                      m.scaling, n, u=_rows(c.u), backend=self.backend, which=which)
            if a_on:
                yield m.lora_A, r.grad_A
            if b_on:
                yield m.lora_B, r.grad_B
        elif isinstance(m, nn.Linear):
            r = linear_per_sample_grads(_rows(c.x), _rows(g), n, bias=m.bias is not None,
                                        backend=self.backend)
            yield m.weight, r.grad_weight
            if m.bias is not None:
                yield m.bias, r.grad_bias
        elif isinstance(m, nn.LayerNorm):
            dt = _acc(c.x.dtype)
            shape = tuple(m.normalized_shape)
            xhat = F.layer_norm(c.x.to(dt), shape, None, None, m.eps)
            gs = g.to(dt).reshape(n, -1, *shape)
            yield m.weight, (gs * xhat.reshape(n, -1, *shape)).sum(1)
            if m.bias is not None:
                yield m.bias, gs.sum(1)
        elif isinstance(m, nn.Embedding):
            dt = _acc(g.dtype)
            ids = c.x.reshape(n, -1)                          # (N, L) token ids
            gs = g.to(dt).reshape(n, -1, m.embedding_dim)     # (N, L, d)
            if m.padding_idx is not None:                     # PyTorch gives the padding row no gradient
                gs = gs * (ids != m.padding_idx).unsqueeze(-1).to(dt)
            flat = (ids + torch.arange(n, device=ids.device).unsqueeze(1) * m.num_embeddings).reshape(-1)
            out = torch.zeros(n * m.num_embeddings, m.embedding_dim, dtype=dt, device=g.device)
            out.index_add_(0, flat, gs.reshape(-1, m.embedding_dim))
            yield m.weight, out.reshape(n, m.num_embeddings, m.embedding_dim)


class _Restore:
    """Handle that detaches the engine's capture callback from a LoRALinear."""

    def __init__(self, module: LoRALinear):
        self.module = module

    def remove(self) -> None:
        self.module._capture = None


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """(R, ..., c) -> (R, L, c): the 3-D layout the kernels take (extra dims are positions)."""
    if t is None:
        return None
    if t.dim() == 1:
        return t.reshape(t.shape[0], 1)
    return t.reshape(t.shape[0], -1, t.shape[-1]) if t.dim() > 2 else t

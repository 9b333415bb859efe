"""The per-sample-gradient engine: every trainable parameter's per-sample gradient in ONE backward pass.

How: while the engine is active, forward hooks record, for each call of a module that owns a
trainable parameter, its input activation and its output. `backward(loss, num_samples)` then runs a
single `torch.autograd.grad(loss, outputs)`: that gives dL/d(output) for every recorded call and
skips the summed parameter gradients autograd would otherwise compute (and DP would discard).
Per-sample gradients follow in closed form from (activation, grad_out) pairs:

  LoRALinear   G_A,i = v_i^T x_i, G_B,i = s g_i^T u_i  (x after dropout, u = x A^T, v = s g B = dL/du;
               v comes from the backward itself wherever autograd computes dL/du for the layers
               below, i.e. every fp32 LoRA layer after the first)
               -> reference.lora_per_sample_grads (torch), api.lora_per_sample_grads (Triton on CUDA)
  nn.Linear    G_W,i = g_i^T x_i, G_b,i = sum g_i  (head, PEFT lora_A/lora_B, anything else;
               PEFT's scaling multiplies lora_B's output, so its grad_out already carries s)
               -> reference / api.linear_per_sample_grads
  nn.LayerNorm G_w,i = sum g_i * xhat_i, G_b,i = sum g_i
  nn.Embedding G_i = scatter of g_i into the rows of sample i's token ids  (N x V x d: small vocabularies)
  Conv1D (HF)  G_W,i = x_i^T g_i (weight (in, out)), G_b,i = sum g_i
  raw (1, ...) parameters broadcast over the batch by their module's forward (cls_token, pos_embed):
               read as p.expand(N, ...) during that forward; dL/d(copy i) is sample i's gradient
All but LoRALinear are per-layer rules (rules.py), one registration per layer type; users add theirs
with register_per_sample_rule.

Where they go: ONE (N, P) arena (fp32; float64 for a float64 model), P = the total size of the
trainable parameters, with a (N, *shape) view per parameter (per_sample.PerSampleGrads). Squared
norms are taken from the arena, not per layer: the flat total is ONE row reduction over it (a
parameter written by several calls, a module run twice or a shared weight, is summed there first,
so its norm is the norm of the sum); per-parameter norms are computed only when asked for
(per-layer clipping). On the small Swin of benchmarks/dp_step.py this replaced 16 per-factor
norm reductions and their sum by one.

Ghost norms (`ghost=True`, used by the DP step): an nn.Linear called once whose input has ONE row
per sample (a head on a pooled feature, x (N, n), g (N, m)) is not materialised. Its per-sample
squared norm is ||g_i||^2 ||x_i||^2 (+ ||g_i||^2 for the bias) -- O(N (m + n)) instead of the
O(N m n) outer products -- and the clipped sum is (c ⊙ g)^T x, one (m x N)(N x n) matmul, the same
work as a non-private backward. Choice rule: with one row per sample it is never more expensive,
so it is always taken there; with k > 1 rows per sample the identity needs the (k x k) Gram
matrices (O(N k^2 (m + n))) and materialising wins whenever k (m + n) > m n, the usual case for
token layers, so the engine materialises every layer with k > 1.

Any other trainable parameter -> ValueError listing its name (silently missing a parameter from the
clipping norm would break the privacy guarantee). So does a trainable parameter of a supported layer
that the loss reaches without the layer being called (functional use, e.g. nn.MultiheadAttention's
out_proj), and a layer re-run inside the backward (activation checkpointing). Not detectable by the
hooks, but by the default model check of dp_gradient (checks.py): a parameter used both by its module
and functionally elsewhere (e.g. a tied LM head via F.linear), and a wrong registered rule.

The clipping unit: an activation whose leading dimension is R is viewed as (N, R // N, ...), N = the
number of samples. Rows must be sample-major (batch-first): one sequence is one unit with T tokens,
and under timm Swin's windowed attention (B*nW, 49, C) one *image* is one unit, because timm stores
windows image-major (tests check this, shifted windows included). R % N != 0 raises (so does an input
broadcast over the batch, leading dim 1), and so does a BatchNorm in training mode (its batch
statistics mix samples). A sequence-first layout whose T happens to be a multiple of N cannot be
told apart: models must be batch-first. A module called several times (or a parameter shared by
modules) gets the sum of its per-call per-sample gradients. In-place modification of a recorded
activation or output after the forward is detected (tensor version counter) and raises.

Mixed precision: under torch.autocast the recorded activations and output gradients may be bf16;
the kernel functions accumulate in fp32 and the arena is fp32, so per-sample gradients, norms, the
clipped sum and the noise are all fp32 whatever the forward's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from . import reference as ref
from ._backend import resolve_backend
from .api import lora_per_sample_grads
from .lora import LoRALinear
from .per_sample import GhostLinear, PerSampleGrads
from .rules import _rows, broadcast_parameters, rule_for

__all__ = ["PerSampleGradEngine", "PerSampleGrads", "GhostLinear", "SUPPORTED_MODULES"]

# the built-in layer types; rules.register_per_sample_rule adds more (rules.registered_rules() lists them)
SUPPORTED_MODULES = (LoRALinear, nn.Linear, nn.LayerNorm, nn.Embedding)

# Tests set this to True: the arena is then allocated full of NaN, so a slot the engine forgets to
# write surfaces as a non-finite gradient instead of stale memory.
POISON_ARENA = False


@dataclass
class _Call:
    module: nn.Module
    x: torch.Tensor            # layer input (after dropout for LoRALinear; token ids for Embedding)
    out: torch.Tensor          # layer output, whose gradient the backward provides
    u: torch.Tensor | None = None
    versions: tuple = ()
    group: object = None       # grouped.ClientGroup of a client-grouped LoRA call (stacked factors)
    u_graph: torch.Tensor | None = None   # u in the graph, when autograd computes v = dL/du anyway
    v: torch.Tensor | None = None         # dL/du from the backward (filled in by backward)
    rule: object = None                   # rules.PerSampleRule of a non-LoRA module
    param: nn.Parameter | None = None     # a raw parameter broadcast over the batch (out = its expanded copy)
    params: tuple = ()                    # the parameters a rule's call covers (they count as "called")
    kwargs: dict | None = None            # the forward's keyword arguments, for rules that read them


@dataclass
class PerSampleGradEngine:
    """Context manager: hooks the model's trainable modules while active.

        with PerSampleGradEngine(model) as eng:
            losses = loss_fn(model, batch)                   # (N,) per-sample losses
            psg = eng.backward(losses.sum(), num_samples=N)  # PerSampleGrads

    The set of trainable parameters is read on entry (requires_grad at that moment; the build's
    module walk is reused by the first entry when no parameter's requires_grad changed since: the
    module tree itself must not change between building and entering). The backend is
    checked when the engine is built (backend="triton" on CPU tensors without TRITON_INTERPRET=1
    raises here, not inside the backward), and so is that all trainable parameters share one device.
    """
    model: nn.Module
    num_samples_hint: int | None = None
    backend: str = "auto"
    _calls: list = field(default_factory=list, init=False, repr=False)
    _handles: list = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        # the build's walk is kept for the first entry (dp_gradient builds and enters once per step):
        # __enter__ reuses it when no parameter's requires_grad changed in between, else walks again
        self._walk = _trainable(self.model)
        self.params = self._walk[0]
        devices = sorted({str(p.device) for p in self.params.values()})
        if len(devices) > 1:
            raise ValueError(f"model parameters are on several devices {devices}; the per-sample-gradient "
                             "engine needs all trainable parameters on one device (move the model with .to())")
        self.device = torch.device(devices[0]) if devices else torch.device("cpu")
        # resolved once (raises ValueError naming `backend`), not per layer call; "auto" keeps float64
        # models on the torch path, as the kernel functions do (float64 is for reference checks)
        f64 = any(p.dtype == torch.float64 for p in self.params.values())
        self._backend = "torch" if self.backend == "auto" and f64 else resolve_backend(self.backend, self.device)

    # ---- setup ---------------------------------------------------------------------------------
    def __enter__(self) -> "PerSampleGradEngine":
        covered: set[int] = set()
        batchnorms = []
        refused: dict[str, str] = {}
        walk, self._walk = self._walk, None
        if walk is None or not _flags_unchanged(walk[2]):
            walk = _trainable(self.model)   # ONE walk: parameters, BatchNorm check and hooks
        params, owners, _ = walk
        for name, m, own in owners:
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                batchnorms.append(name)
            rule = rule_for(m)
            if not own and (rule is None or rule.claims is None):
                continue
            if isinstance(m, LoRALinear):
                covered |= {id(m.lora_A), id(m.lora_B)}   # the base is a child nn.Linear, hooked on its own
                m._capture = self._capture_lora
                self._handles.append(_Restore(m))
                continue
            why = rule.refuse(m) if rule is not None else None
            if rule is not None and why is None:
                claimed = tuple(p for p in (own if rule.claims is None else rule.claims(m)) if p.requires_grad)
                if claimed:
                    covered |= {id(p) for p in claimed}
                    if rule.kwargs:
                        self._handles.append(m.register_forward_hook(
                            lambda mod, inputs, kwargs, output, rule=rule, claimed=claimed:
                            self._capture_module(mod, inputs, output, rule, claimed, kwargs), with_kwargs=True))
                    else:
                        self._handles.append(m.register_forward_hook(
                            lambda mod, inputs, output, rule=rule, claimed=claimed:
                            self._capture_module(mod, inputs, output, rule, claimed)))
                continue
            if why is not None:
                refused[name or type(m).__name__] = why
            # own parameters a parent's rule did not claim (owners are walked parents first)
            bcast = broadcast_parameters(m, [p for p in own if id(p) not in covered])
            if bcast:   # raw parameters the module's forward broadcasts over the batch (rules.py)
                covered |= {id(p) for _, p in bcast}
                swap = _BroadcastSwap(m, bcast, self._record)
                self._handles += [m.register_forward_pre_hook(swap.before, with_kwargs=True),
                                  m.register_forward_hook(swap.after), swap]
        self.params = params
        self._names = {id(p): n for n, p in params.items()}
        if batchnorms:   # batch statistics mix samples: no per-sample gradient (nor DP) exists
            self.close()
            raise ValueError(f"BatchNorm layers {batchnorms} are in training mode: batch statistics mix "
                             "samples, so per-sample gradients are undefined; put them in eval mode "
                             "or use GroupNorm/LayerNorm")
        missing = [n for n, p in self.params.items() if id(p) not in covered]
        if missing:
            self.close()
            reasons = "".join(f"; {k}: {why}" for k, why in refused.items())
            raise ValueError(
                "PerSampleGradEngine cannot compute per-sample gradients for trainable parameters "
                f"{missing}: supported owners are LoRALinear, the layer types with a per-sample rule "
                "(nn.Linear, nn.LayerNorm (affine), nn.Embedding (no max_norm/scale_grad_by_freq/sparse), "
                "transformers' Conv1D, and any registered with dplora_kernels.register_per_sample_rule) and "
                "raw parameters of leading dimension 1 broadcast over the batch by their module's forward"
                f"{reasons}; freeze them, use a supported layer or register a rule for it")
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
            group = module._group if module._group is not None and module._group.A is not None else None
            # v = s g B (for G_A) is dL/du, which the backward computes anyway when the layer's input
            # needs a gradient (for the layers before it): take it from there instead of a second
            # matmul. Not for the first trainable layer (nothing upstream needs dL/dx), a grouped call
            # (its u is a concatenation off the graph), reduced precision (the closed form works in
            # fp32) or the Triton path (its kernel fuses v).
            take_v = (module.lora_A.requires_grad and x_dropped.requires_grad and group is None
                      and u.dtype == ref.acc_dtype(u.dtype) and self._backend == "torch")
            self._record(_Call(module, x_dropped.detach(), out, u.detach(), group=group,
                               u_graph=u if take_v else None))

    def _capture_module(self, module: nn.Module, inputs, output, rule, claimed, kwargs=None) -> None:
        if not isinstance(output, torch.Tensor):
            raise ValueError(f"{type(module).__name__} returned {type(output).__name__}; expected a tensor")
        if not inputs or not isinstance(inputs[0], torch.Tensor):
            raise ValueError(f"{type(module).__name__} was called without a positional tensor input; its "
                             "per-sample rule needs the activation as the first positional argument")
        self._record(_Call(module, inputs[0].detach(), output, rule=rule, params=claimed, kwargs=kwargs))

    # ---- backward ------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, num_samples: int | None = None, *,
                 retain_graph: bool = False, ghost: bool = False) -> PerSampleGrads:
        """One backward pass of the (summed) loss; returns per-sample gradients of every trainable
        parameter (zeros for those the loss does not reach) in one arena. ghost=True leaves eligible
        one-row-per-sample nn.Linear layers unmaterialised (PerSampleGrads.ghost; see module doc).
        Clears the recorded calls."""
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
        grad_outs: list = []
        if loss.requires_grad:
            outs = [c.out for c in calls]
            with_v = [c for c in calls if c.u_graph is not None]
            outs += [c.u_graph for c in with_v]
            # Trainable parameters whose module never ran may still be used functionally (e.g.
            # nn.MultiheadAttention reads out_proj.weight without calling out_proj): ask autograd for
            # their gradient in the same pass and refuse if the loss depends on them.
            called = {id(p) for c in calls for p in (c.params or c.module._parameters.values()) if p is not None}
            uncalled = [(k, p) for k, p in self.params.items() if id(p) not in called]
            res = torch.autograd.grad(loss, outs + [p for _, p in uncalled], allow_unused=True,
                                      retain_graph=retain_graph)
            grad_outs = list(res[:len(calls)])
            for c, g in zip(calls, grad_outs):
                # a call whose output does not reach the loss has no per-sample part (e.g. DoRA's
                # lora_B(lora_A(eye)) for a detached weight norm): its row layout does not matter
                if g is not None and c.x.shape[0] % n:
                    raise ValueError(f"num_samples={n} does not divide the leading dimension {c.x.shape[0]} of "
                                     f"a {type(c.module).__name__} input {tuple(c.x.shape)}: rows must be "
                                     "sample-major (batch-first), R = N * k. An input broadcast over the batch "
                                     "(leading dim 1, e.g. BERT's default position_ids) mixes samples: freeze "
                                     "that layer or pass per-sample inputs")
            for c, v in zip(with_v, res[len(calls):len(outs)]):
                c.v, c.u_graph = v, None
            used = [k for (k, _), g in zip(uncalled, res[len(outs):]) if g is not None]
            del res, outs
            if used:
                raise ValueError(f"trainable parameters {used} are used outside their module's forward "
                                 "(functional use), so hooks cannot see them; freeze them or call the module")
            if self._calls:   # forwards re-run inside backward: activation checkpointing
                self._calls.clear()
                raise RuntimeError("a hooked layer ran during the backward pass (activation checkpointing?): "
                                   "its per-sample gradients would be lost; disable gradient checkpointing")
        else:
            calls = []
        return self._fill(calls, grad_outs, n, ghost)

    @torch.no_grad()
    def _fill(self, calls: list, grad_outs: list, n: int, ghost: bool) -> PerSampleGrads:
        """Per-sample gradients of every call, written into one arena (see module doc)."""
        times_called: dict[int, int] = {}
        for c in calls:
            times_called[id(c.module)] = times_called.get(id(c.module), 0) + 1
        ghosts: list[GhostLinear] = []
        ghost_ids: set[int] = set()
        if ghost:
            for i, c in enumerate(calls):
                if grad_outs[i] is not None and self._ghost_eligible(c, n, times_called):
                    gl = self._ghost(c, grad_outs[i], n)
                    ghosts.append(gl)
                    ghost_ids |= {id(p) for p in c.module._parameters.values() if p is not None}
                    grad_outs[i] = calls[i] = None
        # the arena: one (N, P) buffer, P = total size of the parameters materialised, name order
        dt = torch.float64 if any(p.dtype == torch.float64 for p in self.params.values()) else torch.float32
        slots, off = {}, 0
        for k, p in self.params.items():
            if id(p) not in ghost_ids:
                slots[k] = (off, p.numel())
                off += p.numel()
        alloc = torch.full if POISON_ARENA else (lambda shape, _v, **kw: torch.empty(shape, **kw))
        arena = alloc((n, off), float("nan"), dtype=dt, device=self.device)
        views = {k: arena[:, o:o + m].view(n, *self.params[k].shape) for k, (o, m) in slots.items()}
        names = self._names
        writes: set[str] = set()
        units: dict[tuple[str, ...], None] = {}   # ordered set: a module called twice is one unit

        def target(p):
            # a parameter's first write goes into its arena view, given to the kernel functions as their
            # out= buffer (Triton stores there, no copy); a later call of the same module returns fresh
            # tensors, added below
            k = names[id(p)]
            return None if k in writes else views[k]

        for i, c in enumerate(calls):
            if c is None:
                continue
            g, grad_outs[i], calls[i] = grad_outs[i], None, None   # free each pair once used
            if g is None:
                continue
            for params, gs in self._per_sample(c, g, n, target):
                unit = tuple(names[id(p)] for p in params)
                for k, gk in zip(unit, gs):
                    if k in writes:
                        views[k].add_(gk)
                    else:
                        if gk is not views[k]:
                            views[k].copy_(gk)
                        writes.add(k)
                units[unit] = None
        for k in views:
            if k not in writes:   # the loss does not reach it: a zero gradient
                views[k].zero_()
        return PerSampleGrads(views, list(units), n, arena, ghosts)

    def _ghost_eligible(self, c: _Call, n: int, times_called: dict[int, int]) -> bool:
        m = c.module
        return (type(m) is nn.Linear and times_called[id(m)] == 1 and c.x.shape[0] == n
                and c.x.numel() == n * m.in_features
                and all(p.requires_grad for p in m._parameters.values() if p is not None))

    def _ghost(self, c: _Call, g: torch.Tensor, n: int) -> GhostLinear:
        m = c.module
        dt = ref.acc_dtype(c.x.dtype)
        x = c.x.reshape(n, m.in_features).to(dt)
        gg = g.reshape(n, m.out_features).to(dt)
        g_sq = gg.pow(2).sum(1)
        names = (self._names[id(m.weight)],)
        sqs = (g_sq * x.pow(2).sum(1),)
        if m.bias is not None:
            names, sqs = names + (self._names[id(m.bias)],), sqs + (g_sq,)
        return GhostLinear(names, x, gg, sqs)

    def _per_sample(self, c: _Call, g: torch.Tensor, n: int, target=lambda p: None):
        """Yield (parameters, their per-sample gradients (N, *shape)) per unit of one recorded call.
        target(p): the buffer p's per-sample gradient is to be written into (its arena view), or None.
        On the torch backend the LoRA and Linear closed forms call the reference directly: the
        engine builds their inputs (shapes, devices, dtypes, N | rows checked in backward), so the
        public functions' argument checks would only add Python time per layer."""
        m = c.module
        torch_path = self._backend == "torch"
        if c.param is not None:   # a broadcast raw parameter: dL/d(copy i) is sample i's gradient
            yield (c.param,), (g.to(ref.acc_dtype(g.dtype)).reshape(n, *c.param.shape),)
        elif c.rule is not None:
            if c.rule.kwargs:
                yield from c.rule.per_sample(m, c.x, g, n, target, self._backend, kwargs=c.kwargs)
            else:
                yield from c.rule.per_sample(m, c.x, g, n, target, self._backend)
        elif isinstance(m, LoRALinear):
            a_on, b_on = m.lora_A.requires_grad, m.lora_B.requires_grad
            which = "both" if (a_on and b_on) else ("A" if a_on else "B")
            out_A = target(m.lora_A) if a_on else None
            out_B = target(m.lora_B) if b_on else None
            if c.group is not None:   # each sample with its own client's factors (grouped.py)
                r = lora_per_sample_grads(_rows(c.x), _rows(g), c.group.A.detach(), c.group.B.detach(),
                                          m.scaling, n, u=_rows(c.u), backend=self._backend, which=which,
                                          client_index=c.group.client_index, out_A=out_A, out_B=out_B)
                gA, gB = r.grad_A, r.grad_B
            elif torch_path:
                gA, gB = ref.lora_per_sample_grads(_rows(c.x), _rows(g), m.lora_A, m.lora_B, float(m.scaling), n,
                                                   _rows(c.u), which, out_A, out_B, v=_rows(c.v))
            else:
                r = lora_per_sample_grads(_rows(c.x), _rows(g), m.lora_A.detach(), m.lora_B.detach(),
                                          m.scaling, n, u=_rows(c.u), backend=self._backend, which=which,
                                          out_A=out_A, out_B=out_B)
                gA, gB = r.grad_A, r.grad_B
            if a_on:
                yield (m.lora_A,), (gA,)
            if b_on:
                yield (m.lora_B,), (gB,)


def _trainable(model: nn.Module):
    """The trainable parameters by name, in named_parameters() order (it fixes the arena layout and
    the noise order; a shared parameter is listed once, under its first name), and for every module
    (name, module, its own trainable parameters), in one walk over the modules. The engine is built
    and entered every DP step: named_parameters() plus parameters(recurse=False) per module cost
    about 1 ms more on the small Swin of benchmarks/dp_step.py. The walk is named_modules()'s
    (pre-order, each module once) with an explicit stack instead of its nested generators (one
    frame per level per module): 75 vs 95 us on that Swin's 109 modules."""
    params: dict[str, nn.Parameter] = {}
    owners = []
    flags = []   # (parameter, requires_grad) of every parameter: what the walk's result depends on
    seen: set[int] = set()
    visited: set[int] = set()
    stack = [("", model)]
    while stack:
        name, m = stack.pop()
        if id(m) in visited:
            continue
        visited.add(id(m))
        own = []
        for k, p in m._parameters.items():
            if p is None:
                continue
            flags.append((p, p.requires_grad))
            if p.requires_grad:
                own.append(p)
                if id(p) not in seen:
                    params[f"{name}.{k}" if name else k] = p
            seen.add(id(p))
        owners.append((name, m, own))
        if m._modules:   # children pushed last-first, so they pop in registration order
            stack.extend((f"{name}.{k}" if name else k, c) for k, c in reversed(m._modules.items())
                         if c is not None)
    return params, owners, flags


def _flags_unchanged(flags) -> bool:
    """Is every parameter's requires_grad what the walk saw (so its parameters and owners still hold)?"""
    for p, f in flags:
        if p.requires_grad is not f:
            return False
    return True


class _BroadcastSwap:
    """While ``module``'s forward runs, each raw parameter p of ``params`` reads as p.expand(N, ...)
    (N = the leading dim of the forward's first tensor input); the expanded copy is recorded as the
    call's output, so the backward's dL/d(copy) is the per-sample gradient (rules.broadcast_parameters).
    The parameters are put back after the forward, and by remove() (the engine's close) if it raised."""

    def __init__(self, module: nn.Module, params: list, record):
        self.module, self.params, self.record = module, params, record

    def before(self, module, args, kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() > 0), None)
        if first is None:
            raise ValueError(f"{type(module).__name__} owns trainable parameters broadcast over the batch "
                             f"{[k for k, _ in self.params]} but its forward got no tensor input to read N from")
        n = first.shape[0]
        for k, p in self.params:
            copy = p.expand(n, *p.shape[1:])
            module._parameters[k] = copy   # read through nn.Module.__getattr__ during this forward only
            self.record(_Call(module, copy.detach(), copy, param=p))

    def after(self, module, args, output):
        self.remove()

    def remove(self) -> None:
        for k, p in self.params:
            self.module._parameters[k] = p


class _Restore:
    """Handle that detaches the engine's capture callback from a LoRALinear."""

    def __init__(self, module: LoRALinear):
        self.module = module

    def remove(self) -> None:
        self.module._capture = None

"""Per-layer rules: how the engine turns one recorded call of a module into per-sample gradients.

The engine (engine.py) records, for each call of a module that owns a trainable parameter, the
module's first input (the activation, rows sample-major: R = N * k) and dL/d(output). A **rule**
says, for one layer type, which of the module's own parameters it covers and how their per-sample
gradients (N, *shape) follow from that pair. One registration per layer type:

    from dplora_kernels import register_per_sample_rule

    @register_per_sample_rule(MyScale)            # y = x * weight (weight: (d,)), x: (R, ..., d)
    def my_scale(module, activation, grad_output, num_samples):
        g = (grad_output * activation).reshape(num_samples, -1, module.weight.numel())
        return {"weight": g.sum(1)}                # {parameter name: (N, *shape)}

Looked up through the class's MRO, so a subclass uses its base's rule unless it has its own;
``module_type`` may also be a dotted class name (``"transformers.pytorch_utils.Conv1D"``), matched
without importing that package. A rule must be exact: the default model check
(checks.py/unit_probe.py, the first step of every model) compares the engine against autograd's
batch gradient and a per-sample loop, so a wrong rule is refused there, naming the parameter.

Built in (exact, float64-tested): nn.Linear (and subclasses), nn.LayerNorm (affine), nn.Embedding
(no max_norm / scale_grad_by_freq / sparse), Hugging Face's Conv1D (GPT-2's ``c_attn``/``c_proj``,
weight (in, out); e.g. its bias under PEFT ``bias="lora_only"``), PEFT's LoRA on an embedding
(``lora_embedding_A``/``_B``, kept in child ParameterDicts: the rule ``claims`` them), DoRA's magnitude
vector on a Linear (PEFT's ``DoraLinearLayer``; its rule reads the forward's keyword arguments), and raw parameters with a leading
dimension of 1 that the module's own forward broadcasts over the batch (timm's ``cls_token`` and
``pos_embed``; :func:`broadcast_parameters`). The package's LoRALinear is not a rule: its forward
hands the engine x after dropout and u = x A^T itself (engine._capture_lora).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import reference as ref
from .api import linear_per_sample_grads

__all__ = ["PerSampleRule", "register_per_sample_rule", "rule_for", "registered_rules"]

# (parameters, their per-sample gradients (N, *shape)) per clipping-norm unit of one call
Units = Iterator[tuple[tuple[nn.Parameter, ...], tuple[torch.Tensor, ...]]]


@dataclass(frozen=True)
class PerSampleRule:
    """How per-sample gradients of one layer type's own parameters are computed.

    per_sample(module, x, grad_out, n, target, backend) yields (parameters, per-sample gradients);
    target(p) is the arena view p's gradient may be written into (or None); backend is "torch" or
    "triton". refuse(module) is None when the module is covered, else one line saying why not."""
    name: str
    per_sample: Callable[..., Units]
    refuse: Callable[[nn.Module], str | None] = lambda m: None
    # the parameters the rule covers when they are not the module's own (PEFT keeps LoRA factors in
    # child ParameterDicts); None: the module's own
    claims: Callable[[nn.Module], list[nn.Parameter]] | None = None
    kwargs: bool = False   # per_sample also gets the forward's keyword arguments (kwargs=...)


_RULES: dict[object, PerSampleRule] = {}


def _key(module_type) -> object:
    if isinstance(module_type, str):
        return module_type
    if isinstance(module_type, type) and issubclass(module_type, nn.Module):
        return module_type
    raise TypeError(f"module_type: expected an nn.Module subclass or a dotted class name, got {module_type!r}")


def register_per_sample_rule(module_type, fn: Callable | None = None, *, replace: bool = False):
    """Register ``fn(module, activation, grad_output, num_samples) -> {parameter name: (N, *shape)}``
    for ``module_type`` (a class or a dotted class name); usable as a decorator.

    ``activation`` is the module's first positional input and ``grad_output`` dL/d(its output), both
    detached, rows sample-major (leading dim R = N * k). Return the per-sample gradient of each of
    the module's own trainable parameters (``module.named_parameters(recurse=False)`` names); a
    missing, unknown or mis-shaped entry is refused with the rule's name. ``replace=True`` overrides
    an existing rule (a built-in included)."""
    key = _key(module_type)

    def add(f: Callable) -> Callable:
        if key in _RULES and not replace:
            raise ValueError(f"a per-sample rule for {_label(key)} is already registered ({_RULES[key].name}); "
                             "pass replace=True to override it")
        _RULES[key] = PerSampleRule(getattr(f, "__qualname__", repr(f)), _user_rule(f))
        _LOOKUP.clear()
        return f
    return add if fn is None else add(fn)


def rule_for(module: nn.Module) -> PerSampleRule | None:
    """The rule of the nearest class in ``type(module)``'s MRO that has one."""
    cls = type(module)
    try:
        return _LOOKUP[cls]   # the engine asks for every module at every step: one dict lookup
    except KeyError:
        pass
    found = None
    for t in cls.__mro__:
        found = _RULES.get(t) or _RULES.get(f"{t.__module__}.{t.__qualname__}")
        if found is not None:
            break
    _LOOKUP[cls] = found
    return found


_LOOKUP: dict[type, PerSampleRule | None] = {}


def registered_rules() -> list[str]:
    return sorted(_label(k) for k in _RULES)


def _label(key) -> str:
    return key if isinstance(key, str) else f"{key.__module__}.{key.__qualname__}"


def _user_rule(fn: Callable) -> Callable[..., Units]:
    name = getattr(fn, "__qualname__", repr(fn))

    def per_sample(m: nn.Module, x, g, n, target, backend) -> Units:
        own = {k: p for k, p in m.named_parameters(recurse=False) if p.requires_grad}
        out = fn(m, x, g, n)
        if not isinstance(out, dict):
            raise TypeError(f"per-sample rule {name} for {type(m).__name__} returned {type(out).__name__}; "
                            "expected {parameter name: (N, *shape) tensor}")
        unknown, missing = sorted(set(out) - set(own)), sorted(set(own) - set(out))
        if unknown or missing:
            raise ValueError(f"per-sample rule {name} for {type(m).__name__}: "
                             + (f"unknown or frozen parameters {unknown}" if unknown else "")
                             + ("; " if unknown and missing else "")
                             + (f"no gradient for trainable parameters {missing}" if missing else ""))
        for k, grad in out.items():
            if tuple(grad.shape) != (n, *own[k].shape):
                raise ValueError(f"per-sample rule {name} for {type(m).__name__}: {k} has shape "
                                 f"{tuple(grad.shape)}; expected {(n, *own[k].shape)} (num_samples first)")
        if out:
            yield tuple(own[k] for k in out), tuple(out[k] for k in out)
    return per_sample


# ---- built-in rules ------------------------------------------------------------------------------
def _rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """(R, ..., c) -> (R, L, c): the 3-D layout the kernels take (extra dims are positions)."""
    if t is None:
        return None
    if t.dim() == 1:
        return t.reshape(t.shape[0], 1)
    return t.reshape(t.shape[0], -1, t.shape[-1]) if t.dim() > 2 else t


def _scatter_per_sample(ids: torch.Tensor, grads: torch.Tensor, n: int, rows: int) -> torch.Tensor:
    """(N, rows, c): sample i's ``grads`` (N, L, c) summed into the table rows its token ``ids`` (N, L) pick
    (an embedding's per-sample gradient), one index_add over all samples."""
    c = grads.shape[-1]
    flat = (ids + torch.arange(n, device=ids.device).unsqueeze(1) * rows).reshape(-1)
    out = torch.zeros(n * rows, c, dtype=grads.dtype, device=grads.device)
    out.index_add_(0, flat, grads.reshape(-1, c))
    return out.reshape(n, rows, c)


def _linear(m: nn.Linear, x, g, n, target, backend) -> Units:
    w_on, b_on = m.weight.requires_grad, m.bias is not None and m.bias.requires_grad
    if w_on:
        out_w, out_b = target(m.weight), (target(m.bias) if b_on else None)
        if backend == "torch":   # the engine checked shapes, devices, dtypes and N | rows already
            gw, gb = ref.linear_per_sample_grads(_rows(x), _rows(g), n, b_on, out_w, out_b)
        else:
            r = linear_per_sample_grads(_rows(x), _rows(g), n, bias=b_on, backend=backend,
                                        out_weight=out_w, out_bias=out_b)
            gw, gb = r.grad_weight, r.grad_bias
        yield ((m.weight, m.bias) if b_on else (m.weight,)), (gw, gb)
    elif b_on:   # only the bias trains: G_b,i = sum of g over sample i's rows
        yield (m.bias,), (ref.per_sample_view(g, n).to(ref.acc_dtype(g.dtype)).sum(1),)


def _conv1d(m: nn.Module, x, g, n, target, backend) -> Units:
    """Hugging Face Conv1D: y = x W + b with W (in, out): G_W,i = x_i^T g_i (the Linear form, transposed)."""
    w_on, b_on = m.weight.requires_grad, m.bias is not None and m.bias.requires_grad
    dt = ref.acc_dtype(g.dtype)
    if w_on:
        xs = x.to(dt).reshape(n, -1, m.weight.shape[0])
        gs = g.to(dt).reshape(n, -1, m.weight.shape[1])
        params, grads = [m.weight], [torch.bmm(xs.transpose(1, 2), gs)]
        if b_on:
            params.append(m.bias)
            grads.append(gs.sum(1))
        yield tuple(params), tuple(grads)
    elif b_on:
        yield (m.bias,), (g.to(dt).reshape(n, -1, m.bias.shape[0]).sum(1),)


def _layer_norm(m: nn.LayerNorm, x, g, n, target, backend) -> Units:
    dt = ref.acc_dtype(x.dtype)
    shape = tuple(m.normalized_shape)
    gs = g.to(dt).reshape(n, -1, *shape)
    params, grads = [], []
    if m.weight.requires_grad:
        xhat = F.layer_norm(x.to(dt), shape, None, None, m.eps)
        params.append(m.weight)
        grads.append((gs * xhat.reshape(n, -1, *shape)).sum(1))
    if m.bias is not None and m.bias.requires_grad:
        params.append(m.bias)
        grads.append(gs.sum(1))
    if params:
        yield tuple(params), tuple(grads)


def _embedding(m: nn.Embedding, x, g, n, target, backend) -> Units:
    dt = ref.acc_dtype(g.dtype)
    ids = x.reshape(n, -1)                            # (N, L) token ids
    gs = g.to(dt).reshape(n, -1, m.embedding_dim)     # (N, L, d)
    if m.padding_idx is not None:                     # PyTorch gives the padding row no gradient
        gs = gs * (ids != m.padding_idx).unsqueeze(-1).to(dt)
    yield (m.weight,), (_scatter_per_sample(ids, gs, n, m.num_embeddings),)


def _refuse_layer_norm(m: nn.LayerNorm) -> str | None:
    return None if m.elementwise_affine else "a LayerNorm without elementwise_affine has no parameter"


def _refuse_embedding(m: nn.Embedding) -> str | None:
    if m.max_norm is not None or m.scale_grad_by_freq or m.sparse:
        return "nn.Embedding with max_norm, scale_grad_by_freq or sparse=True is not supported"
    return None


def _peft_embedding_factors(m: nn.Module) -> list[tuple[str, nn.Parameter, nn.Parameter, float]]:
    return [(a, m.lora_embedding_A[a], m.lora_embedding_B[a], float(m.scaling[a]))
            for a in m.active_adapters if a in m.lora_embedding_A]


def _peft_embedding(m: nn.Module, x, g, n, target, backend) -> Units:
    """PEFT's LoRA on an embedding: out = E[ids] + s * E_A[ids] B^T with E_A = A^T (V, r), B (d, r).
    G_B,i = s * g_i^T a_i (a_i = E_A[ids_i]); G_A,i = (scatter of s * g_i B into the rows ids_i)^T, with no
    gradient for the padding row (F.embedding's padding_idx)."""
    dt = ref.acc_dtype(g.dtype)
    base = m.get_base_layer()
    ids = x.reshape(n, -1)
    gs = g.to(dt).reshape(n, ids.shape[1], -1)
    scale = m._get_embed_scale() if hasattr(m, "_get_embed_scale") else None
    if scale is not None:
        gs = gs * scale.to(dt)
    keep = None if base.padding_idx is None else (ids != base.padding_idx).unsqueeze(-1).to(dt)
    for _, A, B, s in _peft_embedding_factors(m):
        params, grads = [], []
        if A.requires_grad:
            ga = s * (gs @ B.to(dt))                                  # dL/d(E_A[ids]) (N, L, r)
            if keep is not None:
                ga = ga * keep
            params.append(A)
            grads.append(_scatter_per_sample(ids, ga, n, A.shape[1]).transpose(1, 2))
        if B.requires_grad:
            a = F.embedding(ids, A.detach().to(dt).T)                 # (N, L, r), padding row included
            params.append(B)
            grads.append(s * torch.bmm(gs.transpose(1, 2), a))        # (N, d, r)
        if params:
            yield tuple(params), tuple(grads)


def _refuse_peft_embedding(m: nn.Module) -> str | None:
    base = m.get_base_layer()
    active = [a for a in m.active_adapters if a in m.lora_embedding_A]
    if any(a in getattr(m, "lora_variant", {}) for a in active):
        return "PEFT LoRA variants on an embedding (DoRA) are not supported"
    if any(a in getattr(m, "input_fns", {}) or a in getattr(m, "output_fns", {}) for a in active):
        return "PEFT embedding LoRA with input/output functions (tensor parallel) is not supported"
    if base.max_norm is not None or base.scale_grad_by_freq or base.sparse:
        return "the base nn.Embedding uses max_norm, scale_grad_by_freq or sparse=True"
    if getattr(m, "merged", False):
        return "the LoRA factors are merged into the base weight; unmerge them to train"
    return None


def _peft_embedding_claims(m: nn.Module) -> list[nn.Parameter]:
    return [p for _, A, B, _ in _peft_embedding_factors(m) for p in (A, B)]


def _dora_magnitude(m: nn.Module, x, g, n, target, backend, kwargs) -> Units:
    """PEFT DoRA on a Linear: its DoraLinearLayer adds (μ/w - 1) ⊙ W x + (μ/w) ⊙ s B A x to the base output,
    w = ||W + s B A|| per output row, held constant (DoRA §4.3, as PEFT does). So
    G_μ,i = sum over sample i's rows of g ⊙ (W x + s B A x) / w. (A and B are PEFT's lora_A/lora_B
    nn.Linear modules: the Linear rule takes them, their grad_out already carries μ/w.)"""
    if not m.weight.requires_grad:
        return
    dt = ref.acc_dtype(g.dtype)
    A, B, s = kwargs["lora_A"], kwargs["lora_B"], float(kwargs["scaling"])
    if getattr(B, "bias", None) is not None:
        raise ValueError("DoRA with a LoRA bias (lora_bias=True) is not supported by the per-sample rule")
    w = kwargs["base_layer"].weight.detach().to(dt)
    w = w.T if m.fan_in_fan_out else w                                 # (out, in)
    a, b = A.weight.detach().to(dt), B.weight.detach().to(dt)
    norm = torch.linalg.norm(w + s * (b @ a), dim=1)                  # (out,)
    xd = x.to(dt)
    d = (F.linear(xd, w) + s * F.linear(F.linear(xd, a), b)) / norm   # (R, ..., out)
    out = m.weight.shape[0]
    yield (m.weight,), ((g.to(dt) * d).reshape(n, -1, out).sum(1),)


def _refuse_dora(m: nn.Module) -> str | None:
    if type(m).__name__ != "DoraLinearLayer":
        return f"DoRA's magnitude on this layer type ({type(m).__name__}) is not supported, only on Linear layers"
    return None


_RULES[nn.Linear] = PerSampleRule("nn.Linear", _linear)
_RULES[nn.LayerNorm] = PerSampleRule("nn.LayerNorm", _layer_norm, _refuse_layer_norm)
_RULES[nn.Embedding] = PerSampleRule("nn.Embedding", _embedding, _refuse_embedding)
_RULES["transformers.pytorch_utils.Conv1D"] = PerSampleRule("transformers Conv1D", _conv1d)
_RULES["peft.tuners.lora.dora.DoraLinearLayer"] = PerSampleRule("PEFT DoRA magnitude (Linear)", _dora_magnitude,
                                                                 _refuse_dora, kwargs=True)
_RULES["peft.tuners.lora.layer.Embedding"] = PerSampleRule("PEFT LoRA Embedding", _peft_embedding,
                                                           _refuse_peft_embedding, _peft_embedding_claims)


# ---- raw parameters broadcast over the batch -----------------------------------------------------
def broadcast_parameters(module: nn.Module, own: list[nn.Parameter]) -> list[tuple[str, nn.Parameter]]:
    """The module's own trainable parameters that no rule covers, with 2 or more dimensions and a leading
    dimension of 1 (timm's ``cls_token`` (1, 1, d) and ``pos_embed`` (1, L, d)): candidates for broadcasting.

    While the module's forward runs, the engine replaces each by ``p.expand(N, *p.shape[1:])`` (N =
    the leading dim of the forward's first tensor input), so ``self.cls_token.expand(B, -1, -1)`` or
    ``x + self.pos_embed`` give sample i its own copy and dL/d(copy i) is sample i's gradient. A
    forward that uses the parameter otherwise (``self.pos_embed[0]``, a reduction over its first dim)
    attributes every sample's gradient to one copy: the default model check's per-sample loop sees
    that and refuses the model, naming the parameter."""
    ids = {id(p) for p in own}
    # 2-D or more: a (1,) parameter is a scalar (a temperature, a layer scale); expanded to (N,) it would
    # broadcast against the activation's LAST dimension, so it stays refused
    return [(k, p) for k, p in module._parameters.items()
            if p is not None and id(p) in ids and p.dim() >= 2 and p.shape[0] == 1]

"""LoRA layers, injection by module name, the active-factor switch, and PEFT interop.

LoRA (SPEC §1): h = W0 x + s * B A dropout(x), s = alpha / r, with W0 frozen, A (r, in) drawn
Kaiming-uniform(a=sqrt 5) and B (out, r) = 0, so an injected model starts equal to its base.

The layer itself, `LoRALinear`, lives in the standalone kernels package (dplora_kernels.lora, next to
the per-sample-gradient engine that reads its capture callback) and is re-exported here. PEFT `lora.Linear` layers are supported too (their `lora_A`/`lora_B` are plain
nn.Linear modules the engine hooks like any Linear), and `copy_lora_weights` moves factors between
the two so a test can check both give the same DP step.

Federated methods drive training through `set_active_factors` (which factor has requires_grad) and
move factors with `get_lora_state` / `set_lora_state` (names are canonical: PEFT's leading
"base_model.model." is stripped, so a PEFT state loads into our layers and vice versa).
"""

from __future__ import annotations

import math
import re
from typing import Literal, Sequence

import torch
from dplora_kernels.lora import LoRALinear, check_rank
from torch import nn

__all__ = [
    "LoRALinear", "inject_lora", "lora_modules", "set_active_factors", "get_lora_state",
    "set_lora_state", "trainable_parameters", "copy_lora_weights", "is_peft_lora", "lora_factors",
]

_PEFT_PREFIX = "base_model.model."


def _matches(name: str, targets: Sequence[str]) -> bool:
    """A target matches a module name by re.fullmatch or as a dotted suffix ("qkv" ~ "...attn.qkv")."""
    for t in targets:
        if name == t or name.endswith("." + t):
            return True
        try:
            if re.fullmatch(t, name):
                return True
        except re.error:
            pass
    return False


def inject_lora(model: nn.Module, targets: Sequence[str], r: int, alpha: float, dropout: float = 0.05,
                *, seed: int | None = None) -> list[str]:
    """Replace every nn.Linear whose name matches `targets` by a LoRALinear wrapping it, in place.

    targets: regexes (re.fullmatch on the module name) or plain suffixes, e.g. ["qkv", "proj"] for
    timm Swin, ["query", "key", "value", "attention.output.dense"] for HF BERT/RoBERTa.
    seed: if given, A is drawn from one generator seeded with it, modules in name order, so every
    client building the same model gets the same A. Returns the injected module names (sorted).
    Raises ValueError naming `targets` if nothing matches and naming `r` if the rank does not fit.
    """
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise ValueError("targets must name at least one module pattern")
    # never wrap a layer that already belongs to a LoRA layer (our base, PEFT's base/lora_A/lora_B)
    owned = {f"{n}.{c}" for n, m in lora_modules(model).items() for c, _ in m.named_modules() if c}
    matched = sorted(name for name, m in model.named_modules()
                     if isinstance(m, nn.Linear) and name and name not in owned and _matches(name, targets))
    if not matched:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:12]
        raise ValueError(f"targets={list(targets)!r} match no nn.Linear module of the model "
                         f"(some nn.Linear names: {linears})")
    for name in matched:   # check every rank before changing anything
        lin = model.get_submodule(name)
        try:
            check_rank(r, lin.in_features, lin.out_features)
        except ValueError as e:
            raise ValueError(f"{e} (module {name!r}: in={lin.in_features}, out={lin.out_features})") from None
    gen = None
    if seed is not None:
        device = next(model.parameters()).device
        gen = torch.Generator(device=device).manual_seed(int(seed))
    for name in matched:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout, generator=gen))
    return matched


def is_peft_lora(module: nn.Module) -> bool:
    """A PEFT LoRA layer: lora_A / lora_B are ModuleDicts (adapter name -> nn.Linear)."""
    return (isinstance(getattr(module, "lora_A", None), nn.ModuleDict)
            and isinstance(getattr(module, "lora_B", None), nn.ModuleDict))


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Our LoRALinear layers and PEFT lora layers, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear) or is_peft_lora(m)}


def _peft_adapter(module: nn.Module) -> str:
    active = getattr(module, "active_adapters", None) or list(module.lora_A.keys())
    active = [a for a in active if a in module.lora_A]
    if len(active) != 1:
        raise ValueError(f"expected exactly one active PEFT adapter; got {active}")
    return active[0]


def lora_factors(module: nn.Module) -> tuple[nn.Parameter, nn.Parameter, float]:
    """(A (r, in), B (out, r), scaling) of our layer or of a PEFT layer's active adapter."""
    if isinstance(module, LoRALinear):
        return module.lora_A, module.lora_B, module.scaling
    if is_peft_lora(module):
        a = _peft_adapter(module)
        return module.lora_A[a].weight, module.lora_B[a].weight, float(module.scaling[a])
    raise TypeError(f"not a LoRA layer: {type(module).__name__}")


def canonical_name(name: str) -> str:
    """Module name without PEFT's wrapper prefix "base_model.model." (wherever a PEFT model is
    nested), so PEFT and our names line up."""
    return name.replace(_PEFT_PREFIX, "")


def set_active_factors(model: nn.Module, which: Literal["A", "B", "both", "none"]) -> None:
    """Set requires_grad of every LoRA factor: only A, only B, both or none. Other parameters
    (e.g. the head) are left as they are."""
    if which not in ("A", "B", "both", "none"):
        raise ValueError(f"which must be 'A', 'B', 'both' or 'none'; got {which!r}")
    for m in lora_modules(model).values():
        A, B, _ = lora_factors(m)
        A.requires_grad_(which in ("A", "both"))
        B.requires_grad_(which in ("B", "both"))


def get_lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<module>.lora_A": A, "<module>.lora_B": B} as detached clones (canonical module names)."""
    state = {}
    for name, m in lora_modules(model).items():
        A, B, _ = lora_factors(m)
        state[f"{canonical_name(name)}.lora_A"] = A.detach().clone()
        state[f"{canonical_name(name)}.lora_B"] = B.detach().clone()
    return state


def set_lora_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy factors in place (the Parameters, and so optimizer references, are kept).

    Every key must name a LoRA factor of the model with the same shape (ValueError naming `state`);
    factors missing from `state` are left unchanged (e.g. FedSA-LoRA's local B).
    """
    params = {}
    for name, m in lora_modules(model).items():
        A, B, _ = lora_factors(m)
        params[f"{canonical_name(name)}.lora_A"] = A
        params[f"{canonical_name(name)}.lora_B"] = B
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise ValueError(f"state has keys that are no LoRA factor of the model: {unknown[:5]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(params[k].shape):
            raise ValueError(f"state[{k!r}] has shape {tuple(v.shape)}, the model's factor "
                             f"{tuple(params[k].shape)}")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


def copy_lora_weights(src: nn.Module, dst: nn.Module) -> None:
    """Copy every LoRA factor from `src` to `dst` (ours <-> PEFT), checking the scalings agree."""
    src_mods = {canonical_name(n): m for n, m in lora_modules(src).items()}
    dst_mods = {canonical_name(n): m for n, m in lora_modules(dst).items()}
    if set(src_mods) != set(dst_mods):
        raise ValueError(f"LoRA layers differ: only in src {sorted(set(src_mods) - set(dst_mods))[:5]}, "
                         f"only in dst {sorted(set(dst_mods) - set(src_mods))[:5]}")
    for name in src_mods:
        s_src, s_dst = lora_factors(src_mods[name])[2], lora_factors(dst_mods[name])[2]
        if not math.isclose(s_src, s_dst, rel_tol=1e-12):
            raise ValueError(f"scaling differs at {name!r}: src {s_src}, dst {s_dst}")
    set_lora_state(dst, get_lora_state(src))


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter with requires_grad, by name (the set a DP step privatizes)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}

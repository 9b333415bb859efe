"""Which parameters of a model are LoRA A, LoRA B and head, and how to swap them in and out.

The simulator keeps one frozen base model and moves each client's trainable tensors in and out of it
(``get_state`` / ``set_state`` copy in place; no Parameter is ever replaced, so optimizers, hooks and
the per-sample-gradient engine keep seeing the same objects).

Classification by parameter name, which covers both our ``LoRALinear`` (``….lora_A``) and PEFT
(``….lora_A.default.weight``): a name with a ``lora_A`` component is factor A, ``lora_B`` is factor
B, and every other parameter that is trainable when the model is built is the "head" (the classifier;
it trains at every step, SPEC §1). State keys are full parameter names.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

GROUPS = ("A", "B", "head")


def _group_of(name: str) -> str | None:
    parts = name.split(".")
    if "lora_A" in parts:
        return "A"
    if "lora_B" in parts:
        return "B"
    return None


@dataclass
class ParamGroups:
    params: dict[str, dict[str, nn.Parameter]]   # group -> name -> parameter

    @classmethod
    def from_model(cls, model: nn.Module) -> "ParamGroups":
        """Classify every LoRA factor, and every other *currently trainable* parameter as head."""
        groups: dict[str, dict[str, nn.Parameter]] = {g: {} for g in GROUPS}
        for name, p in model.named_parameters():
            g = _group_of(name)
            if g is not None:
                groups[g][name] = p
            elif p.requires_grad:
                groups["head"][name] = p
        if not groups["A"] or not groups["B"]:
            raise ValueError("model has no LoRA factors (no parameter named '*lora_A*'/'*lora_B*'); "
                             "inject LoRA before building the simulator")
        if len(groups["A"]) != len(groups["B"]):
            raise ValueError(f"model has {len(groups['A'])} lora_A but {len(groups['B'])} lora_B")
        return cls(groups)

    def names(self, groups=GROUPS) -> list[str]:
        return [n for g in GROUPS if g in groups for n in self.params[g]]

    def factor_params(self, factors) -> dict[str, tuple[nn.Parameter, str]]:
        """name -> (parameter, "A"|"B") for the given factors (used by the filter)."""
        return {n: (p, f) for f in ("A", "B") if f in factors for n, p in self.params[f].items()}

    def get_state(self, groups=GROUPS) -> dict[str, torch.Tensor]:
        return {n: self.params[g][n].detach().clone() for g in GROUPS if g in groups
                for n in self.params[g]}

    @torch.no_grad()
    def set_state(self, state: dict[str, torch.Tensor]) -> None:
        lookup = {n: p for g in GROUPS for n, p in self.params[g].items()}
        unknown = set(state) - set(lookup)
        if unknown:
            raise ValueError(f"state has keys that are not LoRA/head parameters: {sorted(unknown)[:5]}")
        for n, v in state.items():
            lookup[n].copy_(v)

    def set_trainable(self, factors, head: bool) -> None:
        """requires_grad on exactly the given factors (and the head if ``head``). A frozen parameter
        has requires_grad=False, so it gets no gradient, no noise and no optimizer update."""
        for g in GROUPS:
            on = head if g == "head" else g in factors
            for p in self.params[g].values():
                p.requires_grad_(on)
                if not on:
                    p.grad = None

    def zero_grad(self) -> None:
        for g in GROUPS:
            for p in self.params[g].values():
                p.grad = None

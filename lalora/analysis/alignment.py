"""Alignment of client updates: cosine similarity of ΔA, ΔB and Δ(BA) across clients.

The paper claims LA-LoRA "aligns update directions across clients" (its Figure 2). We measure it
per round: each client i starts from the global LoRA state (A⁰, B⁰) and returns (A_i, B_i); its
updates are ΔA_i = A_i − A⁰, ΔB_i = B_i − B⁰ and the effective weight update
Δ(BA)_i = s·(B_i A_i − B⁰ A⁰), each flattened and concatenated over all LoRA modules. The statistic
is the mean cosine similarity over all client pairs (i < j). Δ(BA) is the quantity that matters for
the model: factor updates can disagree while their products agree (and vice versa), because
(B, A) and (BG, G⁻¹A) give the same product.

States are dicts as returned by ``lalora.lora.get_lora_state``: "<module>.lora_A" (r, n) and
"<module>.lora_B" (m, r).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

State = Mapping[str, torch.Tensor]

__all__ = ["pairwise_cosine", "mean_pairwise_cosine", "lora_update_vectors", "client_update_alignment"]


def pairwise_cosine(vectors: torch.Tensor) -> torch.Tensor:
    """(k, d) -> (k, k) cosine similarities in float64; a zero vector has cosine 0 with everything."""
    if vectors.dim() != 2:
        raise ValueError(f"vectors: expected (clients, dim), got shape {tuple(vectors.shape)}")
    v = vectors.to(torch.float64)
    norms = v.norm(dim=1, keepdim=True)
    unit = torch.where(norms > 0, v / norms.clamp_min(1e-300), torch.zeros_like(v))
    return unit @ unit.T


def mean_pairwise_cosine(vectors: torch.Tensor) -> float:
    """Mean of the off-diagonal cosine similarities (NaN for fewer than two vectors)."""
    k = vectors.shape[0]
    if k < 2:
        return float("nan")
    c = pairwise_cosine(vectors)
    iu = torch.triu_indices(k, k, offset=1)
    return float(c[iu[0], iu[1]].mean())


def _modules(state: State) -> list[str]:
    mods = sorted(k[: -len(".lora_A")] for k in state if k.endswith(".lora_A"))
    if not mods:
        raise ValueError("state: no '<module>.lora_A' entries")
    missing = [m for m in mods if f"{m}.lora_B" not in state]
    if missing:
        raise ValueError(f"state: lora_B missing for modules {missing}")
    return mods


def lora_update_vectors(
    base: State, client: State, scaling: float | Mapping[str, float] = 1.0
) -> dict[str, torch.Tensor]:
    """Flattened float64 updates {"A": ΔA, "B": ΔB, "BA": Δ(sBA)} of one client, over all modules."""
    mods = _modules(base)
    parts: dict[str, list[torch.Tensor]] = {"A": [], "B": [], "BA": []}
    for m in mods:
        s = scaling[m] if isinstance(scaling, Mapping) else scaling
        a0, b0 = base[f"{m}.lora_A"].double(), base[f"{m}.lora_B"].double()
        a1, b1 = client[f"{m}.lora_A"].double(), client[f"{m}.lora_B"].double()
        parts["A"].append((a1 - a0).flatten())
        parts["B"].append((b1 - b0).flatten())
        parts["BA"].append((s * (b1 @ a1 - b0 @ a0)).flatten())
    return {k: torch.cat(v) for k, v in parts.items()}


def client_update_alignment(
    base: State, clients: Sequence[State], scaling: float | Mapping[str, float] = 1.0
) -> dict[str, float]:
    """Mean pairwise cosine similarity of client updates {"A", "B", "BA"} for one round.

    A factor that no client changed (e.g. A under FFA-LoRA, or the idle factor of a RoLoRA round)
    gives NaN for that key rather than a meaningless 0.
    """
    if len(clients) < 2:
        raise ValueError(f"clients: need at least 2 client states, got {len(clients)}")
    vecs = [lora_update_vectors(base, c, scaling) for c in clients]
    out = {}
    for key in ("A", "B", "BA"):
        stacked = torch.stack([v[key] for v in vecs])
        out[key] = float("nan") if bool((stacked == 0).all()) else mean_pairwise_cosine(stacked)
    return out


def summarize_alignment(per_round: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean over rounds of each key, ignoring NaN rounds."""
    out = {}
    for key in ("A", "B", "BA"):
        vals = np.array([r[key] for r in per_round], dtype=float)
        out[key] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
    return out


__all__.append("summarize_alignment")

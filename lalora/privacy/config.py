"""DPConfig: the differential-privacy settings of a run, validated when built.

One object carries everything the DP step and the accountant need (SPEC §3), so a bad value
fails at construction with a ValueError that names the field, not deep inside a training loop.

- ``mode="dp"``: real sample-level DP (per-sample clipping, Gaussian noise, Poisson sampling,
  an accountant). ``epsilon=inf`` inside this mode means "no noise, no clipping" (the non-DP
  reference, SPEC §3).
- ``mode="as-released"``: the authors' released code (batch-mean clip, no accountant); NOT
  differentially private, and every output built from it must say so.
- ``mode="off"``: ordinary training, no privacy machinery.

``noise_multiplier`` overrides calibration: when None, σ is computed from (ε, δ, q, steps) by
the accountant (``DPConfig.resolve_noise_multiplier``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from .accountant import DEFAULT_ACCOUNTANT

CLIPPING_CHOICES = ("flat", "per_layer")
ACCOUNTANT_CHOICES = ("rdp", "prv")
MODE_CHOICES = ("dp", "as-released", "off")


def _check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{field}={value!r} is not one of {', '.join(map(repr, choices))}")


def _as_float(field: str, value: Any) -> float:
    if isinstance(value, bool):  # bool is an int subclass; True as an epsilon is a bug
        raise ValueError(f"{field} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{field} must be a number, got {value!r}") from None


@dataclass
class DPConfig:
    epsilon: float = 3.0
    delta: float = 1e-5
    clip_norm: float = 1.0
    clipping: str = "flat"
    accountant: str = DEFAULT_ACCOUNTANT
    mode: str = "dp"
    noise_multiplier: float | None = None

    def __post_init__(self) -> None:
        self.epsilon = _as_float("epsilon", self.epsilon)
        if math.isnan(self.epsilon) or self.epsilon <= 0:
            raise ValueError(f"epsilon must be > 0 (inf means no noise), got {self.epsilon}")
        self.delta = _as_float("delta", self.delta)
        if not 0.0 < self.delta < 1.0:  # NaN fails this comparison too
            raise ValueError(f"delta must lie in (0, 1), got {self.delta}")
        self.clip_norm = _as_float("clip_norm", self.clip_norm)
        if math.isnan(self.clip_norm) or self.clip_norm <= 0:
            raise ValueError(f"clip_norm must be > 0 (inf means no clipping), got {self.clip_norm}")
        _check_choice("clipping", self.clipping, CLIPPING_CHOICES)
        _check_choice("accountant", self.accountant, ACCOUNTANT_CHOICES)
        _check_choice("mode", self.mode, MODE_CHOICES)
        if self.noise_multiplier is not None:
            self.noise_multiplier = _as_float("noise_multiplier", self.noise_multiplier)
            if not math.isfinite(self.noise_multiplier) or self.noise_multiplier < 0:
                raise ValueError(
                    f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier}")

    @property
    def is_private(self) -> bool:
        """True when the run is meant to be differentially private with a finite ε."""
        return self.mode == "dp" and math.isfinite(self.epsilon)

    def resolve_noise_multiplier(self, sample_rate: float, steps: int) -> float:
        """σ for this config: the explicit `noise_multiplier` if set, else the accountant's
        calibration for (epsilon, delta, sample_rate, steps). 0 when not private."""
        if self.noise_multiplier is not None:
            return self.noise_multiplier
        if not self.is_private:
            return 0.0
        from .accountant import noise_multiplier_for

        return noise_multiplier_for(self.epsilon, self.delta, sample_rate, steps,
                                    accountant=self.accountant)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict; epsilon/clip_norm=inf stay floats (json writes them as Infinity)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DPConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DPConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

"""The federated LoRA methods as data: which factor trains at local step k of round t, what the
server averages, what stays on the client (SPEC §2).

A method is a :class:`MethodSchedule` value, not a subclass: one client loop and one aggregator
serve every method, so a comparison differs only in these few fields. Steps and rounds count from 1.

| method        | trains at (k, t)                    | server averages     | local only |
|---------------|-------------------------------------|---------------------|------------|
| fedavg-lora   | A, B (no DP)                        | A, B, head          | -          |
| dp-lora       | A, B                                | A, B, head          | -          |
| ffa-lora      | B (A frozen at its shared init)     | B, head             | -          |
| rolora        | B if t odd, A if t even             | trained factor, head| -          |
| la-lora       | B if k odd, A if k even (filter on) | A, B, head          | -          |
| fedsa-lora    | A, B                                | A                   | B, head    |

B goes first in both alternating methods: with B0 = 0, dL/dA = s·Bᵀ·dL/dW = 0, so an A-first step
would be pure noise. ``period`` (RunConfig.alternation_period) stretches the alternation: la-lora
trains B for ``period`` steps, then A for ``period`` steps; rolora counts rounds instead of steps.
The head (every trainable non-LoRA parameter) trains at every step of every method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Factor = Literal["A", "B"]
BOTH = frozenset({"A", "B"})


@dataclass(frozen=True)
class MethodSchedule:
    name: str
    alternate: Literal["none", "round", "step"] = "none"
    frozen: frozenset = frozenset()        # factors that never train (ffa-lora: {"A"})
    local_only: frozenset = frozenset()    # parameter groups never sent to the server
    filter_default: bool = False           # low-pass filter on the noised gradient by default
    private: bool = True                   # False: no clipping, no noise, whatever epsilon says
    description: str = ""

    def trains(self, k: int, t: int, period: int = 1) -> frozenset:
        """LoRA factors trained at local step ``k`` of round ``t`` (both from 1)."""
        if k < 1 or t < 1:
            raise ValueError(f"local step k and round t count from 1, got k={k}, t={t}")
        if self.alternate == "step":
            return frozenset({"B"}) if ((k - 1) // period) % 2 == 0 else frozenset({"A"})
        if self.alternate == "round":
            return frozenset({"B"}) if ((t - 1) // period) % 2 == 0 else frozenset({"A"})
        return BOTH - self.frozen

    def trained_in_round(self, t: int, local_steps: int, period: int = 1) -> frozenset:
        out: frozenset = frozenset()
        for k in range(1, local_steps + 1):
            out |= self.trains(k, t, period)
        return out

    def aggregated(self, t: int, local_steps: int = 2, period: int = 1,
                   head: bool = True) -> frozenset:
        """Parameter groups ("A", "B", "head") the server averages after round ``t``: the factors
        trained in that round, plus the head when it trains, minus what stays local."""
        groups = set(self.trained_in_round(t, local_steps, period))
        if head:
            groups.add("head")
        return frozenset(groups - self.local_only)


METHODS: dict[str, MethodSchedule] = {
    m.name: m
    for m in (
        MethodSchedule("fedavg-lora", private=False,
                       description="FedAvg of both factors, no DP (upper bound)"),
        MethodSchedule("dp-lora", description="DP-SGD on both factors, FedAvg of both"),
        MethodSchedule("ffa-lora", frozen=frozenset({"A"}),
                       description="A frozen at the shared seeded init; only B trains and is averaged"),
        MethodSchedule("rolora", alternate="round",
                       description="B in odd rounds, A in even rounds; only the trained factor averaged"),
        MethodSchedule("la-lora", alternate="step", filter_default=True,
                       description="B at odd local steps, A at even ones; low-pass filter on the "
                                   "noised gradient; FedAvg of both"),
        MethodSchedule("fedsa-lora", local_only=frozenset({"B", "head"}),
                       description="both factors train; server averages A; B and head stay local "
                                   "(evaluated per client)"),
    )
}


def get_method(name: str) -> MethodSchedule:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method {name!r} is unknown; choices: {', '.join(METHODS)}") from None

"""Batch samplers for DP-SGD.

`poisson_sample` is the sampler the accountant assumes (SPEC §3): every example joins the batch
independently with probability q, drawn afresh each step, so the batch size is Binomial(N, q)
and may be 0. An empty batch is still a step: the DP step adds pure noise and the accountant
counts it -- callers must not skip it.

`shuffled_fixed_batches` (fixed-size batches of a shuffled epoch, what the released LA-LoRA
code does) is offered only for comparison. The accountant's guarantee does NOT hold for it;
anything trained with it must be labelled non-accounted (`ACCOUNTED` below says which is which).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterator

import torch

# Whether the accountant's (Poisson, add/remove-one) analysis covers batches drawn this way.
ACCOUNTED = {"poisson": True, "shuffled_fixed": False}


def _check_num_examples(num_examples: int) -> int:
    if isinstance(num_examples, bool) or not isinstance(num_examples, numbers.Integral):
        raise ValueError(f"num_examples must be an int, got {num_examples!r}")
    if num_examples <= 0:
        raise ValueError(f"num_examples must be >= 1 (a client without data cannot be sampled), "
                         f"got {num_examples}")
    return int(num_examples)


def poisson_sample(num_examples: int, sample_rate: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices (LongTensor, ascending, possibly empty) of a Poisson-sampled batch.

    Each of the `num_examples` examples is included independently with probability
    `sample_rate` (q in (0, 1]). The expected batch size, q * num_examples, is what the DP step
    divides by -- not the realised size, which would leak it.
    """
    num_examples = _check_num_examples(num_examples)
    try:
        q = float(sample_rate)
    except (TypeError, ValueError):
        raise ValueError(f"sample_rate must be a number in (0, 1], got {sample_rate!r}") from None
    if math.isnan(q) or not 0.0 < q <= 1.0:
        raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate}")
    device = generator.device if generator is not None else None   # draw where the generator lives
    mask = torch.rand(num_examples, generator=generator, device=device) < q
    return mask.nonzero(as_tuple=False).flatten()


def shuffled_fixed_batches(num_examples: int, batch_size: int,
                           generator: torch.Generator | None = None, *,
                           drop_last: bool = False) -> Iterator[torch.Tensor]:
    """NOT ACCOUNTED: one epoch of fixed-size batches from a random permutation.

    The accountants in `lalora.privacy.accountant` assume Poisson sampling; ε reported for a
    run using these batches is not a valid guarantee (SPEC §3). Kept for comparison with the
    released code only.
    """
    num_examples = _check_num_examples(num_examples)
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    order = torch.randperm(num_examples, generator=generator)
    for start in range(0, num_examples, batch_size):
        batch = order[start:start + batch_size]
        if drop_last and len(batch) < batch_size:
            return
        yield batch

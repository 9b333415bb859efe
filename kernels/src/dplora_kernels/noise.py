"""Secure Gaussian noise (``secure=True`` in dp_gradient, the default in DPTrainer).

A seeded ``torch.Generator`` (Mersenne Twister / Philox) is reproducible, which is what tests and
simulations want, and predictable, which a release does not: whoever learns the seed (or enough
outputs) can subtract the noise. Here every draw comes from the operating system's CSPRNG
(``os.urandom``, i.e. getrandom(2) / /dev/urandom), as Opacus' ``secure_mode`` takes its generator
from /dev/urandom (torchcsprng). The uniforms are 53-bit floats, turned into normals by Box-Muller in
float64; as Opacus' secure mode (arXiv 2107.10138, sec. 5.1, n = 2) each output is (z1+z2+z3+z4)/2
of four independent normals -- still N(0, 1) -- which defeats the floating-point attacks on the
low-order bits of a single Gaussian sample. Costs 32 bytes of OS randomness per noised coordinate
(the generation runs on the CPU, then moves to the parameters' device). Never reproducible: tests
that need bitwise reruns use ``secure=False`` with a seeded generator.
"""
from __future__ import annotations

import math
import os

import torch

__all__ = ["secure_standard_normal", "secure_gaussian_like"]


def _uniform_open(count: int) -> torch.Tensor:
    """`count` float64 uniforms in (0, 1], 53 bits each, from os.urandom."""
    raw = torch.frombuffer(bytearray(os.urandom(8 * count)), dtype=torch.int64)
    return ((raw & (2 ** 53 - 1)).to(torch.float64) + 1.0) * (1.0 / 2 ** 53)


def secure_standard_normal(count: int) -> torch.Tensor:
    """`count` N(0, 1) float64 values from the OS CSPRNG (module doc)."""
    if count <= 0:
        return torch.zeros(0, dtype=torch.float64)
    m = 4 * count                        # four normals per output (floating-point attack mitigation)
    pairs = (m + 1) // 2
    u1, u2 = _uniform_open(pairs), _uniform_open(pairs)
    r = torch.sqrt(-2.0 * torch.log(u1))
    theta = 2.0 * math.pi * u2
    z = torch.cat([r * torch.cos(theta), r * torch.sin(theta)])[:m]
    return z.reshape(4, count).sum(0) / 2.0


def secure_gaussian_like(shapes, std: float, device, dtype=torch.float32) -> list[torch.Tensor]:
    """N(0, std^2) tensors of the given shapes, one CSPRNG draw for all of them."""
    sizes = [math.prod(s) for s in shapes]
    z = (secure_standard_normal(sum(sizes)) * float(std)).to(dtype=dtype, device=device)
    return [part.view(s) for part, s in zip(z.split(sizes), shapes)]

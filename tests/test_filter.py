"""The [1,4,6,4,1]/16 low-pass filter: cos⁴(ω/2) response, 70/256 white-noise variance, axes of
∇A and ∇B, symmetric padding; compared with a float64 numpy reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lalora.federated.filters import (WHITE_NOISE_VARIANCE_FACTOR, filter_lora_grad, lowpass,
                                      symmetric_indices)


def _reference(x: np.ndarray) -> np.ndarray:
    """float64 reference along the last axis: numpy symmetric pad + explicit 5-tap sum."""
    k = np.array([1, 4, 6, 4, 1], dtype=np.float64) / 16
    pad = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(2, 2)], mode="symmetric")
    n = x.shape[-1]
    return sum(k[j] * pad[..., j:j + n] for j in range(5))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17])
def test_matches_float64_reference_including_borders(n):
    x = torch.randn(4, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    np.testing.assert_allclose(lowpass(x, dim=1).numpy(), _reference(x.numpy()), rtol=0, atol=1e-12)


def test_symmetric_indices_are_numpy_symmetric():
    assert symmetric_indices(4, 2).tolist() == [1, 0, 0, 1, 2, 3, 3, 2]


def test_constant_passes_unchanged():
    x = torch.full((3, 9), 2.5)
    torch.testing.assert_close(lowpass(x, 1), x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("omega", [0.0, 0.3, 0.9, math.pi / 2, 2.0, 2.8, math.pi])
def test_sinusoid_response_is_cos4_half_omega(omega):
    n = 256
    i = torch.arange(n, dtype=torch.float64)
    x = torch.cos(omega * i + 0.4)
    y = lowpass(x[None], dim=1)[0]
    inner = slice(4, n - 4)   # away from the borders the output is exactly H(ω)·x
    expected = math.cos(omega / 2) ** 4
    torch.testing.assert_close(y[inner], expected * x[inner], rtol=0, atol=1e-12)


def test_white_noise_variance_shrinks_by_70_over_256():
    assert WHITE_NOISE_VARIANCE_FACTOR == pytest.approx(70 / 256)
    x = torch.randn(64, 4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = lowpass(x, dim=1)[:, 4:-4]
    ratio = float(y.var() / x[:, 4:-4].var())
    # 64*4088 samples: the sample variance ratio is within ~1% of 70/256 = 0.2734
    assert ratio == pytest.approx(70 / 256, rel=0.02)


def test_axes_rows_of_A_along_input_columns_of_B_along_output():
    g = torch.Generator().manual_seed(1)
    ga = torch.randn(3, 11, generator=g, dtype=torch.float64)   # A: (r, n_in)
    gb = torch.randn(13, 3, generator=g, dtype=torch.float64)   # B: (m_out, r)
    np.testing.assert_allclose(filter_lora_grad(ga, "A").numpy(), _reference(ga.numpy()), atol=1e-12)
    np.testing.assert_allclose(filter_lora_grad(gb, "B").numpy(), _reference(gb.numpy().T).T, atol=1e-12)
    with pytest.raises(ValueError, match="factor"):
        filter_lora_grad(ga, "C")
    with pytest.raises(ValueError, match="2-D"):
        filter_lora_grad(ga[0], "A")

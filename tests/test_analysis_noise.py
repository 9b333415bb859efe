"""Noise amplification in the LoRA product (lalora.analysis.noise)."""
import math

import pytest
import torch

from lalora.analysis.noise import closed_form_sq_norms, loglog_slope, monte_carlo_sq_norms, noise_scan, weight_noise_per_step


def test_monte_carlo_matches_closed_forms():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 7, generator=g, dtype=torch.float64)
    B = torch.randn(9, 3, generator=g, dtype=torch.float64)
    mc = monte_carlo_sq_norms(A, B, 0.7, 4000, g)
    exact = closed_form_sq_norms(9, 7, 3, 0.7, A, B)
    assert exact["NB_NA"] == pytest.approx(9 * 7 * 3 * 0.7 ** 4)
    for k in exact:  # 4000 draws: Monte Carlo relative s.e. ~ 1 %
        assert mc[k] == pytest.approx(exact[k], rel=0.05), k


def test_noise_scan_slopes():
    scan = noise_scan(16, 12, 4, [0.05, 0.1, 0.3, 1.0, 3.0, 10.0], trials=300, seed=0)
    assert abs(scan.slopes["NB_NA"] - 2.0) <= 0.1
    assert abs(scan.slopes["NB_A"] - 1.0) <= 0.1
    assert abs(scan.slopes["B_NA"] - 1.0) <= 0.1
    assert max(scan.max_rel_error.values()) < 0.1
    # The cross term overtakes the linear terms above a crossover σ.
    assert scan.monte_carlo["NB_NA"][0] < scan.monte_carlo["NB_A"][0]
    assert scan.monte_carlo["NB_NA"][-1] > scan.monte_carlo["NB_A"][-1]
    assert loglog_slope([1, 10, 100], [3, 300, 30000]) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="x, y"):
        loglog_slope([1, 0], [1, 2])
    with pytest.raises(ValueError, match="m"):
        noise_scan(0, 2, 1, [1.0])


def test_weight_noise_per_step():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 20, generator=g, dtype=torch.float64) / math.sqrt(20)
    B = torch.randn(16, 4, generator=g, dtype=torch.float64) / 2
    res = weight_noise_per_step(A, B, noise_std=2.0, lr=0.5, scaling=1.0, trials=3000, generator=g)
    # LA-LoRA B step: RMS = s·lr·sqrt(m σ² ‖A‖²) exactly in expectation.
    exp_b = 0.5 * math.sqrt(16 * 4.0 * float(A.pow(2).sum()))
    exp_a = 0.5 * math.sqrt(20 * 4.0 * float(B.pow(2).sum()))
    assert res["la-lora-B-step"] == pytest.approx(exp_b, rel=0.05)
    assert res["la-lora-A-step"] == pytest.approx(exp_a, rel=0.05)
    cross = 0.25 * math.sqrt(16 * 20 * 4 * 2.0 ** 4)
    assert res["dp-lora-cross-term"] == pytest.approx(cross, rel=0.05)
    # The three terms are uncorrelated: the DP-LoRA total is their root-sum-square.
    assert res["dp-lora"] == pytest.approx(math.sqrt(exp_a ** 2 + exp_b ** 2 + cross ** 2), rel=0.05)
    assert res["dp-lora"] > max(res["la-lora-A-step"], res["la-lora-B-step"])

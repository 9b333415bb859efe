"""Numerical checks of the paper's claims (lalora.analysis.theory), each asserting its claim."""
import math

import numpy as np
import pytest
import torch

from lalora.analysis import theory


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_gradient_coupling_matches_autograd():
    res = theory.gradient_coupling(m=12, n=10, r=3, scale=2.0)
    assert res["rel_err_A"] < 1e-12 and res["rel_err_B"] < 1e-12


@pytest.mark.parametrize("shape", [(30, 20, 4), (8, 50, 3)])
def test_theorem2_closed_form_is_least_squares(shape):
    m, n, r = shape
    res = theory.projection_check(m=m, n=n, r=r, scale=0.5)
    assert res["closed_vs_lstsq_B"] < 1e-8 and res["closed_vs_lstsq_A"] < 1e-8
    assert res["resid_orth_B"] < 1e-8 and res["resid_orth_A"] < 1e-8


def test_theorem3_cross_term_vs_width():
    res = theory.cross_term_vs_width([16, 64, 256], r=4, eta=0.5, trials=2)
    assert max(res["alternating"]) < 1e-12  # alternating: W moves by exactly its first-order term
    sim = res["simultaneous"]
    assert min(sim) > 0.1  # the η² term is a sizeable share of the update at every width ...
    assert sim[-1] > 0.7 * sim[-2]  # ... and does not vanish as the width grows
    # The η² term relative to the O(η) term scales like η.
    half = theory.cross_term_vs_width([64], r=4, eta=0.25, trials=2)["simultaneous"][0]
    assert sim[1] / half == pytest.approx(2.0, rel=0.15)


@pytest.mark.parametrize("eta,p", [(0.3, None), (0.5, None), (0.8, None), (0.5, 2000)])
def test_theorem4_alternating_linear_convergence(eta, p):
    res = theory.alternating_matrix_sensing(eta=eta, measurements=p, iterations=30)
    L = np.asarray(res.losses)
    assert L[-1] < 1e-4 * L[0]
    assert res.measured_rate <= res.bound  # at or below (1 − η_c)²
    s, e = res.linear_phase
    seg = np.log(L[s:e + 1])
    fit = np.polyfit(np.arange(len(seg)), seg, 1)
    resid = seg - np.polyval(fit, np.arange(len(seg)))
    r2 = 1 - resid.var() / seg.var()
    assert r2 > 0.98  # a straight line in log-loss: linear convergence
    assert (np.diff(seg) < 0).all()  # monotone decrease in the linear phase


def test_theorem1_epsilon_scan_with_accountant():
    from lalora.privacy import epsilon_for

    res = theory.epsilon_scan(epsilon_for, steps=(100, 400, 1600), sigmas=(1.0, 2.0, 4.0))
    assert all(np.diff(res["epsilon_vs_steps"]) > 0) and all(np.diff(res["epsilon_vs_sigma"]) < 0)
    assert 0.3 < res["slope_steps"] < 0.8  # ε ~ √(TK) in this regime (Theorem 1's O(·))
    assert res["slope_sigma"] < -0.9


def test_filter_response_and_variance():
    from lalora.federated.filters import lowpass

    res = theory.filter_checks(lambda x: lowpass(x, dim=1))
    assert res["max_gain_error"] < 1e-10  # gain = cos⁴(ω/2) exactly away from the borders
    assert res["gain_measured"][0] == pytest.approx(1.0)
    assert res["variance_factor_measured"] == pytest.approx(70 / 256, rel=0.05)
    assert theory.FILTER_VARIANCE_FACTOR == pytest.approx(0.2734375)
